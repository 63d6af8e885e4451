//! SAK stage 2: multi-task dense prediction on PASCAL-Context / NYUD-v2 with the distillation
//! loss kept (SPEC.md sections 2-4): `sum_t w_t L_t + gamma * L_distill`, AdamW (lr 2e-5,
//! wd 1e-6), poly 0.9 per iteration, gradient clipping 10; stem and adapters initialised from a
//! stage-1 run folder. Same run-folder behaviour as stage 1: progress bar, `metrics.jsonl`,
//! `loss.png`, atomic `checkpoint.safetensors`, exact `--resume`; at the end `model.safetensors`
//! + `model.json` and an evaluation on the validation split (`eval-val.json`).

use crate::data::augment::sample_rng;
use crate::data::dense::{self, DenseDataset, Task};
use crate::data::dense_aug::{prepare_eval, DenseAugment, Normalize, Prepared};
use crate::error::{Error, Result};
use crate::losses::FeatureLoss;
use crate::metrics::boundary::BoundaryOptions;
use crate::models::encoder::resample_pos_table;
use crate::models::multitask::{MultiTaskModel, MultiTaskSpec, RouterKind};
use crate::models::student::Init;
use crate::models::student::{preset, StudentSpec, TeacherSlot};
use crate::models::vit::TIMM_POS_KERNEL;
use crate::models::LoadOptions;
use crate::target_norm::TargetStats;
use crate::tasks::{MetricContext, Target, TaskMetric};
use crate::teacher::Teacher;
use crate::train::cache::FeatureCache;
use crate::train::checkpoint;
use crate::train::engine::{
    self, DataPlan, LoopConfig, Objective, RunFolder, RunOptions, RunPaths, RunSummary, StepLoss,
    StepModel, Trainer,
};
use crate::train::schedule::PolySchedule;
use crate::train::stage1::{distill_terms, STUDENT_SPEC};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Stage-2 configuration (`distillery train --config FILE.toml`); defaults are the reference
/// recipe (SPEC.md section 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// run folder (checkpoint, metrics, exported model)
    pub out: PathBuf,
    /// `pascal-context` or `nyud-v2`
    pub dataset: String,
    /// data set root in the MTI-Net/ATRC layout
    pub data_root: PathBuf,
    pub train_split: String,
    pub val_split: String,
    /// tasks to train (default: all the data set has)
    pub tasks: Vec<Task>,
    /// stage-1 run folder to start from, or a student preset (`vit-s16`, ...) with `teachers`
    pub init: String,
    /// teachers for the distillation term (default: the stage-1 run's)
    pub teachers: Vec<String>,
    /// gamma: weight of the distillation loss (0 = no teachers are run)
    pub distill_weight: f64,
    pub distill_loss: FeatureLoss,
    pub router: RouterKind,
    /// input (height, width); (0, 0) = the data set's (PASCAL 512x512, NYUD 448x576)
    #[serde(alias = "input_size")]
    pub input_hw: (usize, usize),
    pub batch_size: usize,
    pub steps: u64,
    pub lr: f64,
    pub weight_decay: f64,
    pub poly_power: f64,
    /// max global gradient norm (0 = off)
    pub clip_grad: f64,
    /// task weight overrides by task name (defaults: SPEC.md section 3)
    pub task_weights: BTreeMap<String, f64>,
    /// single-task baselines for Delta_m, by task name (its main metric's value)
    pub baselines: BTreeMap<String, f64>,
    pub augment: DenseAugment,
    pub seed: u64,
    pub checkpoint_every: u64,
    /// boundary matching tolerance; 0 = the data set's (PASCAL 0.0075, NYUD 0.011)
    pub edge_max_dist: f64,
    /// thresholds of the boundary evaluation (the reference: 99)
    pub edge_thresholds: usize,
    /// evaluate on the validation split at the end of training
    pub eval_at_end: bool,
    /// teacher-feature cache (`distillery cache --config`): teachers are not run
    pub cache: Option<PathBuf>,
    /// 0: fresh augmentation every epoch; K: epoch e replays the augmentation of variant
    /// e mod K (what a cache with K variants holds; a cache sets it)
    pub crop_variants: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::new(),
            dataset: "pascal-context".into(),
            data_root: PathBuf::new(),
            train_split: "train".into(),
            val_split: "val".into(),
            tasks: Vec::new(),
            init: String::new(),
            teachers: Vec::new(),
            distill_weight: 1.0,
            distill_loss: FeatureLoss::CosSmoothL1,
            router: RouterKind::Mor,
            input_hw: (0, 0),
            batch_size: 4,
            steps: 40_000,
            lr: 2e-5,
            weight_decay: 1e-6,
            poly_power: 0.9,
            clip_grad: 10.0,
            task_weights: BTreeMap::new(),
            baselines: BTreeMap::new(),
            augment: DenseAugment::default(),
            seed: 0,
            checkpoint_every: 1000,
            edge_max_dist: 0.0,
            edge_thresholds: 99,
            eval_at_end: true,
            cache: None,
            crop_variants: 0,
        }
    }
}

fn is_nyud(dataset: &str) -> bool {
    dataset.to_ascii_lowercase().starts_with("nyud")
}

impl TrainConfig {
    /// Read a TOML file (errors name the file).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config::read_toml(path)
    }

    pub fn tasks(&self) -> Vec<Task> {
        if !self.tasks.is_empty() {
            return self.tasks.clone();
        }
        if is_nyud(&self.dataset) {
            vec![Task::Semseg, Task::Depth, Task::Normals, Task::Edge]
        } else {
            vec![
                Task::Semseg,
                Task::Parts,
                Task::Saliency,
                Task::Normals,
                Task::Edge,
            ]
        }
    }

    pub fn input_hw(&self) -> (usize, usize) {
        match self.input_hw {
            (0, 0) if is_nyud(&self.dataset) => (448, 576),
            (0, 0) => (512, 512),
            s => s,
        }
    }

    pub fn edge_options(&self) -> BoundaryOptions {
        BoundaryOptions {
            max_dist: if self.edge_max_dist > 0.0 {
                self.edge_max_dist
            } else if is_nyud(&self.dataset) {
                0.011
            } else {
                0.0075
            },
            thresholds: self.edge_thresholds.max(1),
            thin: true,
            nms: true,
        }
    }

    pub fn weight(&self, t: Task) -> f64 {
        self.task_weights
            .get(t.name())
            .copied()
            .unwrap_or_else(|| t.spec().default_weight())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.out.as_os_str().is_empty() {
            return bad("no run folder (out = \"...\" or --out)".into());
        }
        if self.data_root.as_os_str().is_empty() {
            return bad("no data set root (data_root)".into());
        }
        if self.init.is_empty() {
            return bad("no init: a stage-1 run folder or a student preset".into());
        }
        if self.batch_size == 0 || self.steps == 0 {
            return bad("batch_size and steps must be positive".into());
        }
        if self.lr.is_nan() || self.lr <= 0.0 || self.weight_decay < 0.0 || self.clip_grad < 0.0 {
            return bad("lr must be positive; weight decay and clip non-negative".into());
        }
        self.augment.validate()?;
        for k in self.task_weights.keys().chain(self.baselines.keys()) {
            if Task::from_name(k).is_none() {
                return bad(format!("unknown task {k:?} in task_weights/baselines"));
            }
        }
        Ok(())
    }
}

/// Files a stage-2 run exports.
pub const MODEL_WEIGHTS: &str = "model.safetensors";
pub const MODEL_SPEC: &str = "model.json";

/// `model.json`: the model spec plus what evaluation and prediction need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunModelInfo {
    pub spec: MultiTaskSpec,
    pub dataset: String,
    pub input_hw: (usize, usize),
}

/// A stage-1 run's student spec and the teachers its recipe names.
fn stage1_spec(dir: &Path) -> Result<(StudentSpec, Vec<String>)> {
    let spec_p = dir.join("student.json");
    let text = std::fs::read_to_string(&spec_p).map_err(|e| Error::io(&spec_p, e))?;
    let spec: StudentSpec = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: spec_p.clone(),
        msg: e.to_string(),
    })?;
    let teachers = std::fs::read_to_string(dir.join("config.toml"))
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| {
            v.get("teachers")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();
    Ok((spec, teachers))
}

/// A stage-1 run's parameters: from its checkpoint (aligners included) when present, else the
/// exported student.
fn stage1_params(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let ck = dir.join("checkpoint.safetensors");
    let mut params = HashMap::new();
    if ck.is_file() {
        let (t, _) = checkpoint::load(&ck, &Device::Cpu)?;
        params = engine::model_tensors(&t);
        // a backbone stem's BatchNorm statistics
        params.extend(engine::buffer_tensors_of(&t));
    } else {
        let w = Weights::open_file(&dir.join("student.safetensors"))?;
        for n in w.names().map(str::to_string).collect::<Vec<_>>() {
            params.insert(n.clone(), w.get_any(&n)?);
        }
    }
    Ok(params)
}

fn is_stage1_run(init: &str) -> bool {
    Path::new(init).join("student.json").is_file()
}

/// What a recipe starts from: the stage-1 run's student spec (None for a preset), the teachers
/// of the distillation term (the config's, else the stage-1 run's) and the student's input
/// normalisation (the stage-1 run's, else ImageNet's). Reads the run folder once.
struct InitSource {
    stage1: Option<StudentSpec>,
    teachers: Vec<String>,
    norm: Normalize,
}

impl InitSource {
    fn of(cfg: &TrainConfig) -> Result<Self> {
        let (stage1, run_teachers) = if is_stage1_run(&cfg.init) {
            let (spec, t) = stage1_spec(Path::new(&cfg.init))?;
            (Some(spec), t)
        } else {
            (None, Vec::new())
        };
        let norm = stage1.as_ref().map_or(Normalize::IMAGENET, |s| Normalize {
            mean: s.mean,
            std: s.std,
        });
        let teachers = if cfg.teachers.is_empty() {
            run_teachers
        } else {
            cfg.teachers.clone()
        };
        Ok(Self {
            stage1,
            teachers,
            norm,
        })
    }
}

/// Stage-2 cache items: the training split, augmented as training augments it (from
/// (seed, variant, index)), each teacher fed the augmented input at its own geometry.
pub struct DenseItems {
    ds: Box<dyn DenseDataset>,
    aug: DenseAugment,
    hw: (usize, usize),
    norm: Normalize,
    seed: u64,
    recipe: String,
}

impl DenseItems {
    pub fn new(cfg: &TrainConfig, norm: Normalize) -> Result<Self> {
        let ds = dense::open_dataset(&cfg.dataset, &cfg.data_root, &cfg.train_split, &cfg.tasks())?;
        let recipe = cache_recipe(cfg, norm);
        Ok(Self {
            ds,
            aug: cfg.augment.clone(),
            hw: cfg.input_hw(),
            norm,
            seed: cfg.seed,
            recipe,
        })
    }
}

/// What, besides seed and variant, decides the teachers' inputs of a stage-2 cache.
fn cache_recipe(cfg: &TrainConfig, norm: Normalize) -> String {
    serde_json::json!({
        "dataset": cfg.dataset,
        "split": cfg.train_split,
        "input_hw": cfg.input_hw(),
        "augment": cfg.augment,
        "mean": norm.mean,
        "std": norm.std,
    })
    .to_string()
}

impl crate::train::cache::CacheItems for DenseItems {
    fn len(&self) -> usize {
        self.ds.len()
    }
    fn name(&self, i: usize) -> String {
        self.ds.id(i).to_string()
    }
    fn root(&self) -> PathBuf {
        self.ds.root().to_path_buf()
    }
    fn input_hw(&self, t: &Teacher) -> (usize, usize) {
        t.geometry.input_hw(self.hw)
    }
    fn inputs(&self, teachers: &[Teacher], v: u64, i: usize) -> Option<Vec<Tensor>> {
        let s = self.ds.load(i).ok()?;
        let p = self.aug.apply(
            &s,
            self.hw,
            self.norm,
            &mut sample_rng(self.seed, v, i as u64),
        );
        let x = Tensor::from_vec(p.image, (1, 3, self.hw.0, self.hw.1), &Device::Cpu).ok()?;
        teachers
            .iter()
            .map(|t| {
                t.input_from(&x, (self.norm.mean, self.norm.std))?
                    .squeeze(0)
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()
            .ok()
    }
    fn recipe(&self) -> String {
        self.recipe.clone()
    }
}

/// Build a teacher cache for a stage-2 recipe (K augmentation variants of the training split).
pub fn build_cache(
    cfg: &TrainConfig,
    out: &Path,
    opts: &crate::train::cache::BuildOptions,
    load: &LoadOptions,
) -> Result<crate::train::cache::Manifest> {
    let init = InitSource::of(cfg)?;
    let ids = &init.teachers;
    if ids.is_empty() {
        return Err(Error::Invalid(
            "no teachers to cache (set teachers or init)".into(),
        ));
    }
    let hw = cfg.input_hw();
    let teachers = Teacher::load_all(ids, hw.0.max(hw.1), &[], load)?;
    let mut o = opts.clone();
    o.seed = cfg.seed;
    crate::train::cache::build_from(&teachers, &DenseItems::new(cfg, init.norm)?, out, &o)
}

/// A training batch on the host.
struct Batch {
    pixels: Tensor,
    targets: Vec<Target>,
    /// [teacher][level] features read from a cache
    teacher_feats: Option<Vec<Vec<Tensor>>>,
}

/// Stack prepared samples into the network input and per-task targets.
fn collate(items: &[Prepared], tasks: &[Task]) -> Result<Batch> {
    let (h, w) = (items[0].h, items[0].w);
    let b = items.len();
    let mut px = Vec::with_capacity(b * 3 * h * w);
    for p in items {
        px.extend_from_slice(&p.image);
    }
    let pixels = Tensor::from_vec(px, (b, 3, h, w), &Device::Cpu)?;
    let mut targets = Vec::new();
    for &t in tasks {
        let c = t.label_channels();
        let mut data = Vec::with_capacity(b * c * h * w);
        for p in items {
            let m = &p.labels[&t];
            // interleaved HWC -> CHW
            for ch in 0..c {
                data.extend(m.data.iter().skip(ch).step_by(c).copied());
            }
        }
        targets.push(Target {
            task: t,
            b,
            c,
            h,
            w,
            data,
        });
    }
    Ok(Batch {
        pixels,
        targets,
        teacher_feats: None,
    })
}

/// A cache must hold this recipe's teachers, seed, items and augmentation.
fn check_cache(
    c: &FeatureCache,
    dir: &Path,
    cfg: &TrainConfig,
    teacher_ids: &[String],
    train: &dyn DenseDataset,
    norm: Normalize,
) -> Result<()> {
    let m = &c.manifest;
    let bad = |msg: String| Error::BadInput {
        path: dir.join("manifest.json"),
        msg,
    };
    if !teacher_ids.is_empty() {
        m.check_teachers(teacher_ids).map_err(bad)?;
    }
    if m.seed != cfg.seed {
        return Err(bad(format!(
            "cache was built with seed {}, the run uses {}",
            m.seed, cfg.seed
        )));
    }
    if cfg.crop_variants != 0 && cfg.crop_variants != m.variants {
        return Err(bad(format!(
            "cache holds {} variants, the run asks for {}",
            m.variants, cfg.crop_variants
        )));
    }
    if m.n_images != train.len() || (0..train.len()).any(|i| m.items[i] != train.id(i)) {
        return Err(bad("cache was built from a different list of images".into()));
    }
    if m.recipe != cache_recipe(cfg, norm) {
        return Err(bad(
            "cache was built for another data set, input size or augmentation".into(),
        ));
    }
    Ok(())
}

/// Fresh parameters on `device`: the stage-1 student's where available (its position table
/// resampled from `init_grid` when the input grid differs), everything else seeded; and the
/// BatchNorm buffers at their initial values.
fn build_params(
    spec: &MultiTaskSpec,
    mut init: HashMap<String, Tensor>,
    init_grid: Option<(usize, usize)>,
    seed: u64,
    device: &Device,
    source: &Path,
) -> Result<(VarMap, VarMap)> {
    if let (Some(t), Some(arch), Some(from), Some(to)) = (
        init.get_mut("stem.pos_embed"),
        spec.student.vit(),
        init_grid,
        spec.student.grid_hw(),
    ) {
        if from != to {
            *t = resample_pos_table(t, arch.pos_prefix, from, to, TIMM_POS_KERNEL)?;
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5A4B_2000);
    let student_buffers = spec.student.buffers()?;
    // the stem's BatchNorm statistics come from the stage-1 student, like its parameters
    let init_buffers: HashMap<String, Tensor> = student_buffers
        .iter()
        .filter_map(|(n, _, _)| init.remove(n).map(|t| (n.clone(), t)))
        .collect();
    let all = spec
        .student
        .parameters()?
        .into_iter()
        .chain(spec.task_parameters());
    let vm = engine::init_params(all, init, &mut rng, device, source)?;
    let buffers = student_buffers.into_iter().chain(
        spec.buffers()
            .into_iter()
            .map(|(name, n, v)| (name, vec![n], Init::Constant(v as f64))),
    );
    let bm = engine::init_params(buffers, init_buffers, &mut rng, device, source)?;
    Ok((vm, bm))
}

/// The stage-2 objective: weighted task losses plus gamma times the distillation loss.
struct MultiTask<'a> {
    model: StepModel<MultiTaskModel>,
    teachers: &'a [Teacher],
    cfg: &'a TrainConfig,
    norm: Normalize,
    distilling: bool,
    /// the stage-1 run's target normalisation, kept for the distillation term
    stats: Option<TargetStats>,
    device: Device,
    /// BatchNorm statistics (the heads', a backbone stem's), updated in place by the model
    buffers: VarMap,
}

impl Objective for MultiTask<'_> {
    type Batch = Batch;

    fn loss(&mut self, batch: Batch, step: u64) -> Result<StepLoss> {
        let cfg = self.cfg;
        let pixels = batch.pixels.to_device(&self.device)?;
        let mut noise = rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2A,
        );
        let dtype = self.model.dtype();
        let out = self.model.step()?.forward(
            &pixels.to_dtype(dtype)?,
            true,
            self.distilling,
            Some(&mut noise),
        )?;
        let mut total: Option<Tensor> = None;
        let mut parts = Vec::new();
        let mut add = |name: &str, l: Tensor, w: f64| -> Result<()> {
            parts.push((name.to_string(), l.to_scalar::<f32>()? as f64));
            let l = (l * w)?;
            total = Some(match total.take() {
                Some(a) => (a + l)?,
                None => l,
            });
            Ok(())
        };
        for ((task, logits), target) in out.logits.iter().zip(&batch.targets) {
            add(
                task.name(),
                task.spec().loss(&logits.to_dtype(DType::F32)?, target)?,
                cfg.weight(*task),
            )?;
        }
        if self.distilling {
            let feats = (0..out.aligned.len())
                .map(|k| match &batch.teacher_feats {
                    Some(f) => f[k]
                        .iter()
                        .map(|t| Ok(t.to_device(&self.device)?))
                        .collect::<Result<Vec<_>>>(),
                    None => {
                        let t = &self.teachers[k];
                        t.features(&t.input_from(&pixels, (self.norm.mean, self.norm.std))?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            if !feats.is_empty() {
                let (dl, _) =
                    distill_terms(&out.aligned, &feats, cfg.distill_loss, self.stats.as_ref())?;
                add("distill", dl, cfg.distill_weight)?;
            }
        }
        let loss = total.ok_or_else(|| Error::Invalid("no task to train".into()))?;
        Ok(StepLoss {
            loss,
            parts,
            images: pixels.dim(0)?,
            skipped: 0,
        })
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        engine::buffer_tensors(&self.buffers)
    }
}

/// Run (or resume) stage 2.
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    cfg.validate()?;
    let dev = &opts.device;
    let run = RunFolder::open(&cfg.out, opts.resume, dev)?;
    let tasks = cfg.tasks();
    let train: Arc<dyn DenseDataset> =
        dense::open_dataset(&cfg.dataset, &cfg.data_root, &cfg.train_split, &tasks)?.into();
    let hw = cfg.input_hw();

    // Student: a stage-1 run folder, or a preset with teachers.
    if !is_stage1_run(&cfg.init)
        && preset(&cfg.init).is_none()
        && crate::models::backbone::spec(&cfg.init, hw).is_none()
    {
        return Err(Error::BadInput {
            path: Path::new(&cfg.init).join(STUDENT_SPEC),
            msg: "init is neither a stage-1 run folder nor a student preset or registered backbone"
                .into(),
        });
    }
    let init = InitSource::of(cfg)?;
    let teacher_ids = &init.teachers;
    // Teacher features come from a cache, or teachers run online.
    let cache = match &cfg.cache {
        Some(dir) if cfg.distill_weight > 0.0 => {
            let c = FeatureCache::open(dir)?;
            check_cache(&c, dir, cfg, teacher_ids, train.as_ref(), init.norm)?;
            Some(Arc::new(c))
        }
        _ => None,
    };
    let variants = cache
        .as_ref()
        .map_or(cfg.crop_variants, |c| c.manifest.variants);
    let mut teachers = Vec::new();
    if cfg.distill_weight > 0.0 && cache.is_none() {
        if teacher_ids.is_empty() {
            return Err(Error::Invalid(
                "distill_weight > 0 but no teachers are known (set teachers)".into(),
            ));
        }
        let load = opts.teacher_load();
        for id in teacher_ids {
            teachers.push(Teacher::load(id, hw.0.max(hw.1), 0, &load)?);
        }
    }
    let slots: Vec<TeacherSlot> = match &cache {
        Some(c) => c.manifest.slots(),
        None => teachers.iter().map(Teacher::slot).collect(),
    };
    let distilling = !slots.is_empty();
    let (mut sspec, init_params) = if let Some(spec) = init.stage1 {
        let dir = Path::new(&cfg.init);
        if distilling && slots.len() != spec.teachers.len() {
            return Err(Error::Invalid(format!(
                "the stage-1 student has {} adapter paths, {} teachers given",
                spec.teachers.len(),
                slots.len()
            )));
        }
        // A resumed run takes every parameter from its own checkpoint.
        let params = if run.saved.is_some() {
            HashMap::new()
        } else {
            stage1_params(dir)?
        };
        (spec, params)
    } else {
        let (stem, (mean, std), src) = super::stage1::student_stem(&cfg.init, hw.0)?;
        if src.is_some() {
            return Err(Error::Invalid(format!(
                "init {:?} is neither a preset, a registered backbone nor a stage-1 run",
                cfg.init
            )));
        }
        let spec = StudentSpec::new(stem, hw.0, slots)?.with_norm(mean, std);
        (spec, HashMap::new())
    };
    if let Some(patch) = sspec.vit().map(|a| a.patch) {
        if !hw.0.is_multiple_of(patch) || !hw.1.is_multiple_of(patch) {
            return Err(Error::Invalid(format!(
                "input size {}x{} must be a multiple of the student's patch ({patch})",
                hw.0, hw.1
            )));
        }
    }
    // A student distilled on normalised targets keeps them: its aligners predict them.
    let stats = if distilling {
        super::stage1::load_target_stats(Path::new(&cfg.init), &sspec, dev)?
    } else {
        None
    };
    let init_grid = sspec.grid_hw();
    sspec.input_hw = Some(hw);
    let spec = MultiTaskSpec {
        student: sspec,
        tasks: tasks
            .iter()
            .map(|&t| (t, dense::head_channels(train.as_ref(), t)))
            .collect(),
        router: cfg.router,
    };
    let norm = Normalize {
        mean: spec.student.mean,
        std: spec.student.std,
    };
    let (varmap, bufmap) = build_params(
        &spec,
        init_params,
        init_grid,
        cfg.seed,
        dev,
        &Path::new(&cfg.init).join("checkpoint.safetensors"),
    )?;
    let mut trainer = Trainer::new(
        &run,
        &varmap,
        Some(&bufmap),
        cfg.weight_decay,
        cfg,
        |saved: &TrainConfig| {
            saved.init == cfg.init
                && saved.tasks() == tasks
                && saved.batch_size == cfg.batch_size
                && saved.seed == cfg.seed
                && saved.input_hw() == hw
                && saved.router == cfg.router
        },
        "another init/tasks/batch size/seed/input size/router",
    )?;
    let build_spec = spec.clone();
    let model = StepModel::new(
        &varmap,
        Some(&bufmap),
        opts.precision,
        &run.paths.checkpoint(),
        move |w, b| MultiTaskModel::build(&build_spec, w, b),
    )?;
    let total = cfg.steps;
    let schedule = PolySchedule {
        lr: cfg.lr,
        power: cfg.poly_power,
        total,
    };
    let plan = DataPlan {
        n: train.len(),
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        variants,
    };
    // Producer: augmented batches (and cached teacher features) ahead of the step.
    let (aug, seed, ptasks, pcache, ptrain) = (
        cfg.augment.clone(),
        cfg.seed,
        tasks.clone(),
        cache.clone(),
        train.clone(),
    );
    let produce = move |variant: u64, idx: &[usize]| -> Result<Batch> {
        let items: Vec<Prepared> = idx
            .par_iter()
            .map(|&i| {
                let s = ptrain.load(i)?;
                let mut rng = sample_rng(seed, variant, i as u64);
                Ok(aug.apply(&s, hw, norm, &mut rng))
            })
            .collect::<Result<_>>()?;
        let mut batch = collate(&items, &ptasks)?;
        if let Some(c) = &pcache {
            let keys: Vec<(u64, usize)> = idx.iter().map(|&i| (variant, i)).collect();
            batch.teacher_feats = Some(c.gather_all(&keys)?);
        }
        Ok(batch)
    };
    let mut objective = MultiTask {
        model,
        teachers: &teachers,
        cfg,
        norm,
        distilling,
        stats,
        device: dev.clone(),
        buffers: bufmap.clone(),
    };
    let mut summary = trainer.run(
        &mut objective,
        plan,
        produce,
        &LoopConfig {
            format: "distillery-stage2-v1",
            title: "SAK stage 2: multi-task loss",
            total,
            clip_grad: cfg.clip_grad,
            checkpoint_every: cfg.checkpoint_every,
            schedule: &|s| schedule.at(s),
            eval_every: 0,
        },
        cfg,
        &spec,
        opts,
    )?;
    if summary.finished() {
        // Export: parameters without aligners, plus BatchNorm statistics.
        let model = objective.model.model();
        let mut tensors = engine::export_tensors(trainer.vars());
        tensors.extend(engine::buffer_tensors(&bufmap)?);
        crate::atomic::write_safetensors(&tensors, &run.paths.file(MODEL_WEIGHTS))?;
        let info = RunModelInfo {
            spec: spec.clone(),
            dataset: cfg.dataset.clone(),
            input_hw: hw,
        };
        engine::write_json(&run.paths.file(MODEL_SPEC), &info)?;
        if cfg.eval_at_end {
            let val = dense::open_dataset(&cfg.dataset, &cfg.data_root, &cfg.val_split, &tasks)?;
            let r = evaluate(model, val.as_ref(), hw, norm, cfg, opts.progress)?;
            let p = run.paths.file(&format!("eval-{}.json", cfg.val_split));
            crate::atomic::write_bytes(&p, r.to_string().as_bytes())?;
            summary.eval = Some(r);
        }
    }
    Ok(summary)
}

/// Load a finished stage-2 run's model.
pub fn load_run(dir: &Path) -> Result<(MultiTaskModel, RunModelInfo, TrainConfig)> {
    let paths = RunPaths::new(dir);
    let cfg = TrainConfig::from_file(&paths.config())?;
    let info: RunModelInfo = engine::read_json(&paths.file(MODEL_SPEC))?;
    let w = Weights::open_file(&paths.file(MODEL_WEIGHTS))?;
    let model = MultiTaskModel::build(&info.spec, &w, &w)?;
    Ok((model, info, cfg))
}

/// A run's evaluation on one split, as written to `eval-{split}.json`.
pub struct RunEvaluation {
    /// per task its metrics, and `delta_m`
    pub metrics: serde_json::Value,
    pub tasks: Vec<Task>,
    pub images: usize,
    pub seconds: f64,
    /// where it was written
    pub path: PathBuf,
}

/// Evaluate an exported stage-2 run on `split` of its data set and write `eval-{split}.json`
/// into the run folder.
pub fn evaluate_run(run: &Path, split: &str, progress: bool) -> Result<RunEvaluation> {
    let (model, info, cfg) = load_run(run)?;
    let tasks: Vec<Task> = model.spec.tasks.iter().map(|(t, _)| *t).collect();
    let ds = dense::open_dataset(&info.dataset, &cfg.data_root, split, &tasks)?;
    let norm = Normalize {
        mean: model.spec.student.mean,
        std: model.spec.student.std,
    };
    let t0 = std::time::Instant::now();
    let metrics = evaluate(&model, ds.as_ref(), info.input_hw, norm, &cfg, progress)?;
    let seconds = t0.elapsed().as_secs_f64();
    let path = run.join(format!("eval-{split}.json"));
    crate::atomic::write_bytes(&path, metrics.to_string().as_bytes())?;
    Ok(RunEvaluation {
        metrics,
        tasks,
        images: ds.len(),
        seconds,
        path,
    })
}

/// Evaluate on a data set: every task's metrics (each task's spec accumulates its own) over
/// the set, and Delta_m against the configured baselines. Inputs are normalised and
/// centre-padded; padding is ignored.
pub fn evaluate(
    model: &MultiTaskModel,
    ds: &dyn DenseDataset,
    hw: (usize, usize),
    norm: Normalize,
    cfg: &TrainConfig,
    progress: bool,
) -> Result<serde_json::Value> {
    let mut metrics: Vec<(Task, Box<dyn TaskMetric>)> = model
        .spec
        .tasks
        .iter()
        .map(|&(t, classes)| {
            let ctx = MetricContext {
                classes,
                edge: cfg.edge_options(),
                max_depth: 80.0,
            };
            (t, t.spec().metric(&ctx))
        })
        .collect();
    let bar = crate::train::progress_bar(ds.len() as u64, 0, progress);
    for i in 0..ds.len() {
        let s = ds.load(i)?;
        // Images larger than the input (e.g. portrait photos for a landscape input) are padded
        // to a larger canvas, a multiple of the patch; the position table is resampled to it.
        let patch = model.spec.student.vit().map_or(32, |a| a.patch);
        let (ih, iw) = (s.image.height() as usize, s.image.width() as usize);
        let ehw = (
            hw.0.max(ih.div_ceil(patch) * patch),
            hw.1.max(iw.div_ceil(patch) * patch),
        );
        let p = prepare_eval(&s, ehw, norm)?;
        let x = Tensor::from_vec(p.image.clone(), (1, 3, ehw.0, ehw.1), &Device::Cpu)?
            .to_device(model.device())?;
        let out = model.forward(&x, false, false, None)?;
        let (top, left, vh, vw) = p.valid;
        for ((task, logits), (_, acc)) in out.logits.iter().zip(metrics.iter_mut()) {
            let pred = task.spec().predict(logits)?.squeeze(0)?;
            // rows and columns are the last two axes ([H, W] or [c, H, W])
            let r = pred.rank() - 2;
            let pred = pred.narrow(r, top, vh)?.narrow(r + 1, left, vw)?;
            acc.update(&pred, &s.labels[task])?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut r = serde_json::json!({ "images": ds.len() });
    let mut mains = Vec::new();
    for (t, acc) in &metrics {
        let v = acc.summary();
        let (key, lower) = t.spec().main_metric();
        if let (Some(m), Some(&base)) = (v[key].as_f64(), cfg.baselines.get(t.name())) {
            mains.push((m, base, lower));
        }
        r[t.name()] = v;
    }
    if !mains.is_empty() {
        r["delta_m"] = crate::metrics::delta_m(&mains).into();
    }
    Ok(r)
}
