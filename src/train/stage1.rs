//! SAK stage 1: distil several frozen teachers into the student on unlabeled images.
//!
//! Each step: a batch of images, each with one RandomResizedCrop + flip (replayable from
//! (seed, epoch, index)); the student sees the crop at its resolution and normalisation, every
//! teacher at its own (SAM: 1024 px); the stem runs once and all adapter paths read it; the
//! loss sums one term per (teacher, level). Decoding and augmentation run on worker threads
//! ahead of the training step.

use crate::data::augment::{crop_to_tensor, sample_rng, RandomResizedCrop};
use crate::data::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::losses::{feature_loss, FeatureLoss};
use crate::models::encoder::{resample_pos_table, VitArch};
use crate::models::student::{preset, Student, StudentSpec, TeacherSlot};
use crate::models::{self, Family, FeatureRequest, LoadOptions, VisionEncoder};
use crate::train::cache::FeatureCache;
use crate::train::checkpoint;
use crate::train::optim::AdamW;
use crate::train::schedule::CosineSchedule;
use crate::weights::Weights;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

/// Stage-1 configuration; defaults are the reference recipe (SPEC.md section 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// run folder (the `--out` flag overrides it)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// teacher folders or hub ids, optionally named: `NAME=PATH`
    pub teachers: Vec<String>,
    /// preset (vit-s16, vit-b16, vit-l16) or a ViT folder / hub id to initialise from
    pub student: String,
    pub images: PathBuf,
    /// student input size (teachers other than SAM use it too)
    pub image_size: usize,
    /// per-teacher input size overrides (0 = automatic)
    pub teacher_sizes: Vec<usize>,
    pub batch_size: usize,
    /// total steps; 0 means `epochs` x steps per epoch
    pub steps: u64,
    pub epochs: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    /// max global gradient norm (0 = off)
    pub clip_grad: f64,
    pub loss: FeatureLoss,
    pub seed: u64,
    pub checkpoint_every: u64,
    /// unreadable images stop the run instead of being skipped
    pub strict_images: bool,
    /// 0: fresh crops every epoch; K: epoch e reuses the crops of variant e mod K (what a
    /// teacher cache with K variants holds)
    pub crop_variants: u64,
    /// teacher-feature cache folder (`distillery cache`); teachers are then not run
    pub cache: Option<PathBuf>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            out: None,
            teachers: Vec::new(),
            student: "vit-s16".into(),
            images: PathBuf::new(),
            image_size: 384,
            teacher_sizes: Vec::new(),
            batch_size: 128,
            steps: 0,
            epochs: 30,
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_lr: 1.25e-7,
            warmup_epochs: 2.0,
            weight_decay: 0.01,
            clip_grad: 0.0,
            loss: FeatureLoss::CosSmoothL1,
            seed: 0,
            checkpoint_every: 500,
            strict_images: false,
            crop_variants: 0,
            cache: None,
        }
    }
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.teachers.is_empty() && self.cache.is_none() {
            return bad("no teacher given (--teacher or --cache)".into());
        }
        if self.batch_size == 0 {
            return bad("batch size must be positive".into());
        }
        if self.image_size == 0 {
            return bad("image size must be positive".into());
        }
        if self.steps == 0 && self.epochs == 0 {
            return bad("set steps or epochs".into());
        }
        if self.lr.is_nan()
            || self.lr <= 0.0
            || self.min_lr < 0.0
            || self.weight_decay < 0.0
            || self.clip_grad < 0.0
        {
            return bad(
                "learning rates, weight decay and clip must be non-negative (lr > 0)".into(),
            );
        }
        if !self.teacher_sizes.is_empty() && self.teacher_sizes.len() != self.teachers.len() {
            return bad("teacher_sizes needs one entry per teacher".into());
        }
        Ok(())
    }
}

/// A frozen teacher with the geometry it is fed.
pub struct Teacher {
    /// short name for metrics, plots and specs (`dinov2-b14`, or `--teacher NAME=...`)
    pub name: String,
    /// the folder or hub id it was loaded from
    pub id: String,
    pub encoder: Box<dyn VisionEncoder>,
    pub size: usize,
    pub levels: Vec<usize>,
}

/// Split a teacher argument `NAME=PATH` into its explicit name and source; a plain path or hub
/// id (or an existing path that contains `=`) has no explicit name.
pub fn parse_teacher_arg(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once('=') {
        Some((name, id))
            if !name.is_empty() && !name.contains(['/', '\\']) && !Path::new(arg).exists() =>
        {
            (Some(name), id)
        }
        _ => (None, arg),
    }
}

/// The short name of a model: family and size when the width is a known one (`dinov2-b14`,
/// `clip-l14`, `sam-h16`, `siglip-so400m14`), else the last component of the folder or hub id.
pub fn short_name(info: &models::ModelInfo, id: &str) -> String {
    let family = match info.family {
        Family::Vit | Family::TimmVit => "vit",
        Family::Dinov2 => "dinov2",
        Family::Dinov2WithRegisters => "dinov2reg",
        Family::Clip => "clip",
        Family::Siglip => "siglip",
        Family::Sam => "sam",
    };
    let size = match info.width {
        192 => Some("ti"),
        384 => Some("s"),
        768 => Some("b"),
        1024 => Some("l"),
        1152 if info.family == Family::Siglip => Some("so400m"),
        1280 => Some("h"),
        1536 if info.family != Family::Sam => Some("g"),
        1664 => Some("bigg"),
        _ => None,
    };
    match size {
        Some(sz) => format!("{family}-{sz}{}", info.patch),
        None => {
            let id = id.split('@').next().unwrap_or(id);
            let last = id
                .trim_end_matches(['/', '\\'])
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or(id);
            if last.is_empty() {
                family.to_string()
            } else {
                last.to_string()
            }
        }
    }
}

/// Make names unique in order: the second `x` becomes `x-2`, and so on.
pub fn dedup_names(names: &mut [String]) {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for i in 0..names.len() {
        let base = names[i].clone();
        let taken = |n: &str, names: &[String]| names[..i].iter().any(|m| m == n);
        let mut k = seen.get(&base).copied().unwrap_or(1);
        let mut candidate = base.clone();
        while taken(&candidate, names) {
            k += 1;
            candidate = format!("{base}-{k}");
        }
        seen.insert(base, k);
        names[i] = candidate;
    }
}

impl Teacher {
    /// Load one teacher (`NAME=PATH` or a folder / hub id) at its geometry: SAM at its own
    /// square size, others at the student's size, unless `size_override` > 0.
    pub fn load(
        arg: &str,
        student_size: usize,
        size_override: usize,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (name, id) = parse_teacher_arg(arg);
        let encoder = models::load(id, opts)?;
        let info = encoder.info();
        let size = if size_override > 0 {
            size_override
        } else if info.family == Family::Sam {
            info.image_size.0.max(info.image_size.1)
        } else {
            student_size
        };
        Ok(Self {
            name: name.map_or_else(|| short_name(info, id), str::to_string),
            id: id.to_string(),
            levels: info.default_levels.clone(),
            size,
            encoder,
        })
    }

    /// Load several teachers (sizes: per-teacher overrides, may be empty) with unique names.
    pub fn load_all(
        args: &[String],
        student_size: usize,
        sizes: &[usize],
        opts: &LoadOptions,
    ) -> Result<Vec<Self>> {
        let mut ts = args
            .iter()
            .enumerate()
            .map(|(k, a)| Self::load(a, student_size, sizes.get(k).copied().unwrap_or(0), opts))
            .collect::<Result<Vec<_>>>()?;
        let mut names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
        dedup_names(&mut names);
        for (t, n) in ts.iter_mut().zip(names) {
            t.name = n;
        }
        Ok(ts)
    }

    /// `NAME=ID`: how a run records this teacher, so a resumed or later run gets the same name.
    pub fn arg(&self) -> String {
        format!("{}={}", self.name, self.id)
    }

    /// The teacher as the student sees it.
    pub fn slot(&self) -> TeacherSlot {
        TeacherSlot {
            name: self.name.clone(),
            dim: self.encoder.info().width,
        }
    }

    /// Feature maps `[B, C, h, w]` at the distilled levels.
    pub fn features(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let out = self
            .encoder
            .forward_features(pixels, &FeatureRequest::blocks(&self.levels))?;
        self.levels
            .iter()
            .map(|&b| Ok(out.feature_map(b + 1)?.detach()))
            .collect()
    }
}

/// What the teachers contribute to a batch.
pub enum TeacherBatch {
    /// per teacher, its input pixels `[B, 3, S_t, S_t]` (teachers run online)
    Pixels(Vec<Tensor>),
    /// per teacher and level, features `[B, C, h, w]` read from a cache
    Features(Vec<Vec<Tensor>>),
}

/// One prepared batch.
struct Batch {
    student: Tensor,
    teachers: TeacherBatch,
    skipped: usize,
}

/// Data order: a permutation of the data set per epoch, from (seed, epoch).
pub(crate) fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    v.shuffle(&mut rng);
    v
}

struct Geometry {
    student_size: usize,
    student_norm: ([f32; 3], [f32; 3]),
    teachers: Vec<(usize, [f32; 3], [f32; 3])>,
}

fn make_batch(
    data: &ImageSet,
    geo: &Geometry,
    cache: Option<&FeatureCache>,
    seed: u64,
    crop_epoch: u64,
    indices: &[usize],
    strict: bool,
) -> Result<Batch> {
    let rrc = RandomResizedCrop::default();
    // Per sample: None when the image was unreadable (or invalid in the cache) and skipped.
    type Item = Result<Option<(Tensor, Vec<Tensor>)>>;
    let items: Vec<Item> = indices
        .par_iter()
        .map(|&i| {
            if cache.is_some_and(|c| !c.is_valid(crop_epoch, i)) {
                if strict {
                    return Err(Error::Image {
                        path: data.name(i).into(),
                        msg: "unreadable when the cache was built".into(),
                    });
                }
                return Ok(None);
            }
            let img = match data.load(i) {
                Ok(img) => img,
                Err(e) if !strict => {
                    tracing::warn!("skipping unreadable image: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let crop = rrc.sample(
                img.dimensions(),
                &mut sample_rng(seed, crop_epoch, i as u64),
            );
            let (m, s) = geo.student_norm;
            let st = crop_to_tensor(&img, &crop, geo.student_size, m, s, &Device::Cpu)?;
            let ts = geo
                .teachers
                .iter()
                .map(|&(size, m, s)| crop_to_tensor(&img, &crop, size, m, s, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?;
            Ok(Some((st, ts)))
        })
        .collect();
    let mut student = Vec::new();
    let mut kept = Vec::new();
    let mut teachers: Vec<Vec<Tensor>> = vec![Vec::new(); geo.teachers.len()];
    let mut skipped = 0;
    for (it, &i) in items.into_iter().zip(indices) {
        match it? {
            Some((s, ts)) => {
                student.push(s);
                kept.push((crop_epoch, i));
                for (k, t) in ts.into_iter().enumerate() {
                    teachers[k].push(t);
                }
            }
            None => skipped += 1,
        }
    }
    if student.is_empty() {
        return Err(Error::BadInput {
            path: data.root(),
            msg: "no readable image in a whole batch".into(),
        });
    }
    let teachers = match cache {
        Some(c) => TeacherBatch::Features(
            c.manifest
                .teachers
                .iter()
                .enumerate()
                .map(|(t, ct)| {
                    (0..ct.levels.len())
                        .map(|k| c.gather(t, k, &kept))
                        .collect()
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => TeacherBatch::Pixels(
            teachers
                .into_iter()
                .map(|t| Ok(Tensor::stack(&t, 0)?))
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    Ok(Batch {
        student: Tensor::stack(&student, 0)?,
        teachers,
        skipped,
    })
}

/// A cache must describe this data set, seed and crop variants; teachers not given are taken
/// from it, and `crop_variants` 0 adopts the cache's.
fn check_cache(
    c: &FeatureCache,
    cfg: &mut DistillConfig,
    data: &ImageSet,
    dir: &Path,
) -> Result<()> {
    let m = &c.manifest;
    let bad = |msg: String| Error::BadInput {
        path: dir.join("manifest.json"),
        msg,
    };
    if !cfg.teachers.is_empty() {
        m.check_teachers(&cfg.teachers).map_err(bad)?;
    }
    cfg.teachers = m.teacher_args();
    if m.seed != cfg.seed {
        return Err(bad(format!(
            "cache was built with seed {}, the run uses {}",
            m.seed, cfg.seed
        )));
    }
    if cfg.crop_variants == 0 {
        cfg.crop_variants = m.variants;
    } else if cfg.crop_variants != m.variants {
        return Err(bad(format!(
            "cache holds {} crop variants, the run asks for {}",
            m.variants, cfg.crop_variants
        )));
    }
    if m.n_images != data.len() || (0..data.len()).any(|i| m.items[i] != data.name(i)) {
        return Err(bad("cache was built from a different list of images".into()));
    }
    Ok(())
}

/// Where a run keeps its files.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn student_weights(&self) -> PathBuf {
        self.dir.join("student.safetensors")
    }
    pub fn student_spec(&self) -> PathBuf {
        self.dir.join("student.json")
    }
    /// Create the run folder; when resuming, load its checkpoint (which must exist); a fresh
    /// run refuses to start over an existing checkpoint.
    #[allow(clippy::type_complexity)]
    pub fn prepare(
        &self,
        resume: bool,
    ) -> Result<Option<(std::collections::HashMap<String, Tensor>, serde_json::Value)>> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let p = self.checkpoint();
        if resume {
            if !p.is_file() {
                return Err(Error::BadInput {
                    path: p,
                    msg: "no checkpoint to resume from".into(),
                });
            }
            return Ok(Some(checkpoint::load(&p, &Device::Cpu)?));
        }
        if p.exists() {
            return Err(Error::BadInput {
                path: p,
                msg: "run folder already has a checkpoint; pass --resume to continue it or choose another run folder".into(),
            });
        }
        Ok(None)
    }

    /// stage 2: the exported multi-task model
    pub fn model_weights(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn model_spec(&self) -> PathBuf {
        self.dir.join("model.json")
    }
}

/// Options of one invocation that are not part of the recipe.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: bool,
    /// stop (with a checkpoint) after this many steps in this invocation
    pub stop_after: Option<u64>,
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub total_steps: u64,
    pub last_loss: f64,
    pub images_per_s: f64,
    pub skipped_images: usize,
}

/// A ViT checkpoint the student's stem starts from: its architecture (everything its config
/// says: MLP width, tokens, layer scale, ...) and its parameters in the stem's timm naming,
/// converted from whatever naming the checkpoint uses by the loader that reads it as a teacher.
pub struct StemSource {
    pub id: String,
    pub arch: VitArch,
    /// the checkpoint's position grid
    pub grid: (usize, usize),
    /// `stem.*` tensors
    pub tensors: std::collections::HashMap<String, Tensor>,
}

impl StemSource {
    /// Resolve and load a folder or hub id; only plain ViTs can initialise the stem.
    pub fn open(id: &str) -> Result<Self> {
        let enc = models::load(id, &LoadOptions::default())?;
        let bad = |msg: String| Error::BadInput {
            path: id.into(),
            msg: format!("cannot initialise the student from this checkpoint: {msg}"),
        };
        let tok = enc
            .token_encoder()
            .ok_or_else(|| bad(format!("a {} is not a plain ViT", enc.info().family)))?;
        let arch = tok.vit_arch().map_err(bad)?;
        let tensors = tok
            .timm_tensors()?
            .into_iter()
            .map(|(n, t)| (format!("stem.{n}"), t))
            .collect();
        Ok(Self {
            id: id.to_string(),
            arch,
            grid: tok.pos.grid_hw,
            tensors,
        })
    }

    /// The stem parameters for `spec`: the position table resampled to its grid, every shape
    /// checked (an error names the source).
    fn stem_params(&self, spec: &StudentSpec) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        for (name, shape, _) in spec.parameters() {
            if !name.starts_with("stem.") {
                continue;
            }
            let t = self.tensors.get(&name).ok_or_else(|| Error::BadInput {
                path: self.id.clone().into(),
                msg: format!("no tensor for student parameter {name}"),
            })?;
            let t = if name == "stem.pos_embed" {
                resample_pos_table(
                    t,
                    spec.arch.pos_prefix,
                    self.grid,
                    spec.grid_hw(),
                    crate::interp::Kernel::BicubicAntialias,
                )?
            } else {
                t.clone()
            };
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: self.id.clone().into(),
                    name,
                    expected: shape,
                    got: t.dims().to_vec(),
                });
            }
            out.insert(name, t);
        }
        Ok(out)
    }
}

/// Parameters of a fresh student: seeded initialisation, with the stem taken from `stem` when
/// given.
pub fn new_student_params(
    spec: &StudentSpec,
    stem: Option<&StemSource>,
    seed: u64,
) -> Result<VarMap> {
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut init = match stem {
        Some(src) => src.stem_params(spec)?,
        None => std::collections::HashMap::new(),
    };
    {
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?;
        for (name, shape, how) in spec.parameters() {
            let t = match init.remove(&name) {
                Some(t) => t,
                None => how.tensor(&shape, &mut rng, &dev)?,
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

pub(crate) fn vars_of(vm: &VarMap) -> Result<std::collections::HashMap<String, Var>> {
    Ok(vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?
        .clone())
}

/// Run (or resume) stage 1 into `out`.
pub fn run(cfg: &DistillConfig, out: &Path, opts: &RunOptions) -> Result<RunSummary> {
    cfg.validate()?;
    let paths = RunPaths {
        dir: out.to_path_buf(),
    };
    let resume_state = paths.prepare(opts.resume)?;
    let data = ImageSet::open(&cfg.images)?;
    let load_opts = LoadOptions::default();
    let mut cfg = cfg.clone();
    let cache = match cfg.cache.clone() {
        Some(dir) => {
            let c = FeatureCache::open(&dir)?;
            check_cache(&c, &mut cfg, &data, &dir)?;
            Some(Arc::new(c))
        }
        None => None,
    };
    let teachers = match &cache {
        Some(_) => Vec::new(),
        None => Teacher::load_all(
            &cfg.teachers,
            cfg.image_size,
            &cfg.teacher_sizes,
            &load_opts,
        )?,
    };
    let slots: Vec<TeacherSlot> = match &cache {
        Some(c) => c.manifest.slots(),
        None => {
            // The run records its teachers with their names (config.toml, checkpoint).
            cfg.teachers = teachers.iter().map(Teacher::arg).collect();
            teachers.iter().map(Teacher::slot).collect()
        }
    };
    let cfg = &cfg;
    // A resumed run rebuilds the student from the spec in its checkpoint and takes every
    // parameter from there: the stem source is not read again.
    let saved_spec = match &resume_state {
        Some((_, state)) if !state["spec"].is_null() => Some(
            serde_json::from_value::<StudentSpec>(state["spec"].clone()).map_err(|e| {
                Error::BadInput {
                    path: paths.checkpoint(),
                    msg: format!("student spec unreadable: {e}"),
                }
            })?,
        ),
        _ => None,
    };
    let (spec, stem) = match (saved_spec, preset(&cfg.student)) {
        (Some(spec), _) => (spec, None),
        (None, Some(arch)) => (StudentSpec::new(arch, cfg.image_size, slots.clone())?, None),
        (None, None) => {
            let src = StemSource::open(&cfg.student)?;
            let spec = StudentSpec::new(src.arch.clone(), cfg.image_size, slots.clone())?;
            (spec, resume_state.is_none().then_some(src))
        }
    };
    let b = cfg.batch_size;
    let steps_per_epoch = (data.len() / b).max(1) as u64;
    let total = if cfg.steps > 0 {
        cfg.steps
    } else {
        cfg.epochs * steps_per_epoch
    };
    let schedule = CosineSchedule {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_lr: cfg.warmup_lr,
        warmup: (cfg.warmup_epochs * steps_per_epoch as f64).round() as u64,
        total,
    };

    let varmap = new_student_params(&spec, stem.as_ref(), cfg.seed)?;
    let vars = vars_of(&varmap)?;
    let mut optim = AdamW::new(&vars, cfg.weight_decay)?;
    let mut start = 0u64;
    if let Some((tensors, state)) = &resume_state {
        let saved: DistillConfig =
            serde_json::from_value(state["config"].clone()).map_err(|e| Error::BadInput {
                path: paths.checkpoint(),
                msg: format!("checkpoint config unreadable: {e}"),
            })?;
        let same_model = saved.teachers == cfg.teachers
            && saved.student == cfg.student
            && saved.image_size == cfg.image_size
            && saved.batch_size == cfg.batch_size
            && saved.seed == cfg.seed;
        if !same_model {
            return Err(Error::BadInput {
                path: paths.checkpoint(),
                msg: "checkpoint was made with other teachers/student/image size/batch size/seed"
                    .into(),
            });
        }
        checkpoint::restore(&vars, tensors, "model.", &paths.checkpoint())?;
        start = state["step"].as_u64().unwrap_or(0);
        optim.load_state(tensors, start)?;
        truncate_metrics(&paths.metrics(), start)?;
    } else {
        std::fs::write(paths.config(), toml::to_string(cfg).unwrap_or_default())
            .map_err(|e| Error::io(paths.config(), e))?;
        let _ = std::fs::remove_file(paths.metrics());
    }
    let student = Student::build(&spec, &Weights::from_vars(&varmap, &paths.checkpoint())?)?;
    let end = match opts.stop_after {
        Some(n) => (start + n).min(total),
        None => total,
    };

    // Producer: batches for steps start..end, decoded and augmented ahead of the training step.
    let geo = Geometry {
        student_size: spec.image_size,
        student_norm: (spec.mean, spec.std),
        teachers: teachers
            .iter()
            .map(|t| {
                let p = &t.encoder.info().preprocess;
                (t.size, p.mean, p.std)
            })
            .collect(),
    };
    let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
    let seed = cfg.seed;
    let strict = cfg.strict_images;
    let variants = cfg.crop_variants;
    let n = data.len();
    let producer_cache = cache.clone();
    let producer = std::thread::spawn(move || {
        let mut order_epoch = u64::MAX;
        let mut order = Vec::new();
        for step in start..end {
            let epoch = step / steps_per_epoch;
            if epoch != order_epoch {
                order = epoch_order(seed, epoch, n);
                order_epoch = epoch;
            }
            let pos = (step % steps_per_epoch) as usize;
            let idx: Vec<usize> = (0..b).map(|j| order[(pos * b + j) % n]).collect();
            let crop_epoch = if variants > 0 {
                epoch % variants
            } else {
                epoch
            };
            let batch = make_batch(
                &data,
                &geo,
                producer_cache.as_deref(),
                seed,
                crop_epoch,
                &idx,
                strict,
            );
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                break;
            }
        }
    });

    let bar = crate::train::progress_bar(total, start, opts.progress);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.metrics())
        .map_err(|e| Error::io(paths.metrics(), e))?;
    let t_run = Instant::now();
    let mut images = 0usize;
    let mut skipped = 0usize;
    let mut last_loss = f64::NAN;
    for step in start..end {
        let t0 = Instant::now();
        let batch = rx
            .recv()
            .map_err(|_| Error::Invalid("data loader stopped".into()))??;
        let t_data = t0.elapsed().as_secs_f64();
        let (loss, per_teacher) = distill_loss(
            &student,
            &teachers,
            &batch.student,
            &batch.teachers,
            cfg.loss,
        )?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(Error::Invalid(format!(
                "loss became {loss_v} at step {step}"
            )));
        }
        let mut grads = loss.backward()?;
        let grad_norm = optim.clip_grad_norm(&mut grads, cfg.clip_grad)?;
        let lr = schedule.at(step);
        optim.step(&grads, lr)?;
        let bsz = batch.student.dim(0)?;
        images += bsz;
        skipped += batch.skipped;
        last_loss = loss_v;
        let secs = t0.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({
            "step": step + 1,
            "epoch": step / steps_per_epoch,
            "loss": loss_v,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": bsz as f64 / secs,
            "data_wait_s": t_data,
            "skipped_images": batch.skipped,
        });
        for (t, l) in slots.iter().zip(&per_teacher) {
            rec[format!("loss/{}", t.name)] = serde_json::json!(l);
        }
        writeln!(metrics, "{rec}").map_err(|e| Error::io(paths.metrics(), e))?;
        bar.set_message(format!("loss {loss_v:.4} {:.1} img/s", bsz as f64 / secs));
        bar.inc(1);
        let done = step + 1;
        if done % cfg.checkpoint_every.max(1) == 0 || done == end {
            metrics.flush().map_err(|e| Error::io(paths.metrics(), e))?;
            save_checkpoint(
                &paths,
                &vars,
                Vec::new(),
                &optim,
                &RunState {
                    format: "distillery-stage1-v1",
                    step: done,
                    config: cfg,
                    spec: &spec,
                },
            )?;
        }
    }
    drop(rx);
    let _ = producer.join();
    bar.finish_and_clear();
    if end > start {
        crate::train::plot::plot_losses(
            &paths.metrics(),
            &paths.dir.join("loss.png"),
            "SAK stage 1: distillation loss",
        )?;
    }
    if end == total {
        export_student(&paths, &spec, &vars)?;
    }
    Ok(RunSummary {
        start_step: start,
        end_step: end,
        total_steps: total,
        last_loss,
        images_per_s: images as f64 / t_run.elapsed().as_secs_f64().max(1e-9),
        skipped_images: skipped,
    })
}

/// The stage-1 objective for one batch: the student's stem once, every adapter path, every
/// teacher at its own input; one term per (teacher, level), summed. Returns the total and the
/// per-teacher sums.
pub fn distill_loss(
    student: &Student,
    teachers: &[Teacher],
    student_pixels: &Tensor,
    teacher_batch: &TeacherBatch,
    kind: FeatureLoss,
) -> Result<(Tensor, Vec<f64>)> {
    let out = student.forward(student_pixels, true)?;
    let mut total: Option<Tensor> = None;
    let mut per_teacher = Vec::with_capacity(out.aligned.len());
    for k in 0..out.aligned.len() {
        let feats = match teacher_batch {
            TeacherBatch::Pixels(px) => teachers[k].features(&px[k])?,
            TeacherBatch::Features(f) => f[k].clone(),
        };
        let mut tl: Option<Tensor> = None;
        for (s, t) in out.aligned[k].iter().zip(&feats) {
            let l = feature_loss(s, t, kind)?;
            tl = Some(match tl {
                Some(a) => (a + l)?,
                None => l,
            });
        }
        let tl = tl.ok_or_else(|| Error::Invalid("teacher without levels".into()))?;
        per_teacher.push(tl.to_scalar::<f32>()? as f64);
        total = Some(match total {
            Some(a) => (a + tl)?,
            None => tl,
        });
    }
    let total = total.ok_or_else(|| Error::Invalid("no teachers".into()))?;
    Ok((total, per_teacher))
}

/// What a checkpoint's header records besides tensors: enough to check and rebuild the run.
#[derive(Serialize)]
pub(crate) struct RunState<'a, C: Serialize, S: Serialize> {
    pub format: &'a str,
    pub step: u64,
    /// the recipe
    pub config: &'a C,
    /// the model's spec (resume rebuilds the model from it)
    pub spec: &'a S,
}

/// Write a run's checkpoint atomically: parameters (`model.*`), extra tensors such as buffers,
/// optimizer moments, and the run state.
pub(crate) fn save_checkpoint(
    paths: &RunPaths,
    vars: &std::collections::HashMap<String, Var>,
    extra: Vec<(String, Tensor)>,
    optim: &AdamW,
    state: &RunState<impl Serialize, impl Serialize>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone()))
        .collect();
    tensors.extend(extra);
    tensors.extend(optim.state());
    let state = serde_json::to_value(state).map_err(|e| Error::Invalid(e.to_string()))?;
    checkpoint::save(&paths.checkpoint(), &tensors, &state)
}

/// Drop metric lines past `step` (written after the checkpoint a resumed run restarts from).
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut s = kept.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Save the student without aligners: `student.safetensors` + `student.json`.
pub fn export_student(
    paths: &RunPaths,
    spec: &StudentSpec,
    vars: &std::collections::HashMap<String, Var>,
) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .filter(|(n, _)| !n.contains(".aligners."))
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    crate::features::write_safetensors_atomic(&tensors, &paths.student_weights())?;
    let json = serde_json::to_string_pretty(spec).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(paths.student_spec(), json).map_err(|e| Error::io(paths.student_spec(), e))
}

/// Load an exported student from a run folder.
pub fn load_student(dir: &Path) -> Result<Student> {
    let paths = RunPaths {
        dir: dir.to_path_buf(),
    };
    let spec_text = std::fs::read_to_string(paths.student_spec())
        .map_err(|e| Error::io(paths.student_spec(), e))?;
    let spec: StudentSpec = serde_json::from_str(&spec_text).map_err(|e| Error::Config {
        path: paths.student_spec(),
        msg: e.to_string(),
    })?;
    let w = Weights::open_file(&paths.student_weights())?;
    Student::build(&spec, &w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(family: Family, width: usize, patch: usize) -> models::ModelInfo {
        models::ModelInfo {
            family,
            depth: 12,
            width,
            num_heads: 12,
            patch,
            image_size: (224, 224),
            prefix_tokens: 1,
            out_channels: width,
            default_levels: vec![2, 5, 8, 11],
            preprocess: crate::preprocess::PreprocessConfig::exact(
                (224, 224),
                crate::preprocess::Resample::Bicubic,
                [0.5; 3],
                [0.5; 3],
            ),
        }
    }

    #[test]
    fn short_names() {
        let hub = "facebook/dinov2-base";
        assert_eq!(
            short_name(&info(Family::Dinov2, 768, 14), hub),
            "dinov2-b14"
        );
        assert_eq!(short_name(&info(Family::Clip, 1024, 14), "x"), "clip-l14");
        assert_eq!(short_name(&info(Family::Sam, 1280, 16), "x"), "sam-h16");
        assert_eq!(
            short_name(&info(Family::Siglip, 1152, 14), "x"),
            "siglip-so400m14"
        );
        // unknown widths: the folder's or hub id's last component
        assert_eq!(
            short_name(&info(Family::Dinov2, 48, 14), "/work/models/tiny-dino/"),
            "tiny-dino"
        );
        assert_eq!(
            short_name(&info(Family::Clip, 40, 14), "org/my-clip@main"),
            "my-clip"
        );
    }

    #[test]
    fn names_are_deduplicated_in_order() {
        let mut n: Vec<String> = ["a", "b", "a", "a", "a-2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        dedup_names(&mut n);
        assert_eq!(n, ["a", "b", "a-2", "a-3", "a-2-2"]);
    }

    #[test]
    fn teacher_arguments() {
        assert_eq!(parse_teacher_arg("dino=/m/d"), (Some("dino"), "/m/d"));
        assert_eq!(parse_teacher_arg("/m/a=b"), (None, "/m/a=b"));
        assert_eq!(
            parse_teacher_arg("facebook/dinov2-base"),
            (None, "facebook/dinov2-base")
        );
        assert_eq!(parse_teacher_arg("=x"), (None, "=x"));
    }
}
