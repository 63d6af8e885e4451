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
    /// teacher folders or hub ids
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
    pub name: String,
    pub encoder: Box<dyn VisionEncoder>,
    pub size: usize,
    pub levels: Vec<usize>,
}

impl Teacher {
    pub fn load(
        id: &str,
        student_size: usize,
        size_override: usize,
        opts: &LoadOptions,
    ) -> Result<Self> {
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
            name: id.to_string(),
            levels: info.default_levels.clone(),
            size,
            encoder,
        })
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
    let names: Vec<&str> = m.teachers.iter().map(|t| t.name.as_str()).collect();
    if cfg.teachers.is_empty() {
        cfg.teachers = names.iter().map(|s| s.to_string()).collect();
    } else if cfg.teachers.iter().map(String::as_str).collect::<Vec<_>>() != names {
        return Err(bad(format!(
            "cache holds teachers {names:?}, not {:?}",
            cfg.teachers
        )));
    }
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

/// A ViT checkpoint the student's stem starts from: its files and what it is.
pub struct StemSource {
    pub id: String,
    pub files: models::ModelFiles,
    pub info: models::ModelInfo,
}

impl StemSource {
    /// Resolve and inspect a folder or hub id; only plain ViTs can initialise the stem.
    pub fn open(id: &str) -> Result<Self> {
        let files = models::resolve(id)?;
        let info = models::load_from_files(&files, &LoadOptions::default())?
            .info()
            .clone();
        if !matches!(info.family, Family::Vit | Family::TimmVit) {
            return Err(Error::Invalid(format!(
                "{id}: a {} cannot initialise the student (a ViT is needed)",
                info.family
            )));
        }
        Ok(Self {
            id: id.to_string(),
            files,
            info,
        })
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
    let mut init = std::collections::HashMap::new();
    if let Some(src) = stem {
        init = pretrained_stem(src, spec)?;
    }
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

/// Stem weights from a ViT checkpoint (timm or transformers naming), with the position table
/// resampled to the student's grid.
fn pretrained_stem(
    src: &StemSource,
    spec: &StudentSpec,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let info = &src.info;
    if info.width != spec.dim || info.depth != spec.depth || info.patch != spec.patch {
        return Err(Error::Invalid(format!(
            "{}: width {}, depth {}, patch {} do not match the student",
            src.id, info.width, info.depth, info.patch
        )));
    }
    let files = &src.files;
    let w = Weights::open(
        &files.weights,
        &files.weights_display,
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let mut out = std::collections::HashMap::new();
    let g = spec.grid();
    let resample_pos = |t: Tensor| -> Result<Tensor> {
        let t = t.squeeze(0)?;
        let n = t.dim(0)? - 1;
        let side = (n as f64).sqrt().round() as usize;
        let grid = crate::interp::resample_grid_tokens(
            &t.narrow(0, 1, n)?,
            (side, side),
            (g, g),
            crate::interp::Kernel::BicubicAntialias,
        )?;
        Ok(Tensor::cat(&[&t.narrow(0, 0, 1)?, &grid], 0)?.unsqueeze(0)?)
    };
    if info.family == Family::TimmVit {
        let w = models::find_prefix(&w, "patch_embed.proj.weight", files)?;
        for (name, _, _) in spec.parameters() {
            if let Some(rest) = name.strip_prefix("stem.") {
                let t = w.get_any(rest)?;
                out.insert(
                    name.clone(),
                    if rest == "pos_embed" {
                        resample_pos(t)?
                    } else {
                        t
                    },
                );
            }
        }
    } else {
        let w = models::find_prefix(&w, "embeddings.patch_embeddings.projection.weight", files)?;
        let e = w.pp("embeddings");
        out.insert(
            "stem.patch_embed.proj.weight".into(),
            e.get_any("patch_embeddings.projection.weight")?,
        );
        out.insert(
            "stem.patch_embed.proj.bias".into(),
            e.get_any("patch_embeddings.projection.bias")?,
        );
        out.insert("stem.cls_token".into(), e.get_any("cls_token")?);
        out.insert(
            "stem.pos_embed".into(),
            resample_pos(e.get_any("position_embeddings")?)?,
        );
        for i in 0..spec.depth {
            let l = w.pp(format!("encoder.layer.{i}"));
            let s = format!("stem.blocks.{i}");
            let cat = |kind: &str| -> Result<Tensor> {
                let parts = ["query", "key", "value"]
                    .iter()
                    .map(|q| l.get_any(&format!("attention.attention.{q}.{kind}")))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            };
            out.insert(format!("{s}.attn.qkv.weight"), cat("weight")?);
            out.insert(format!("{s}.attn.qkv.bias"), cat("bias")?);
            for (dst, src) in [
                ("norm1", "layernorm_before"),
                ("attn.proj", "attention.output.dense"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
            ] {
                out.insert(
                    format!("{s}.{dst}.weight"),
                    l.get_any(&format!("{src}.weight"))?,
                );
                out.insert(
                    format!("{s}.{dst}.bias"),
                    l.get_any(&format!("{src}.bias"))?,
                );
            }
        }
    }
    Ok(out)
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
    let cfg = &cfg;
    let mut teachers = Vec::new();
    let slots: Vec<TeacherSlot> = match &cache {
        Some(c) => c
            .manifest
            .teachers
            .iter()
            .map(|t| TeacherSlot {
                name: t.name.clone(),
                dim: t.dim,
            })
            .collect(),
        None => {
            for (k, id) in cfg.teachers.iter().enumerate() {
                let size = cfg.teacher_sizes.get(k).copied().unwrap_or(0);
                teachers.push(Teacher::load(id, cfg.image_size, size, &load_opts)?);
            }
            teachers
                .iter()
                .map(|t| TeacherSlot {
                    name: t.name.clone(),
                    dim: t.encoder.info().width,
                })
                .collect()
        }
    };
    let (student_dims, patch, stem) = match preset(&cfg.student) {
        Some(d) => (d, 16, None),
        None => {
            let src = StemSource::open(&cfg.student)?;
            let i = &src.info;
            ((i.width, i.depth, i.num_heads), i.patch, Some(src))
        }
    };
    let spec = StudentSpec::new(student_dims, patch, cfg.image_size, slots.clone())?;
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

    // A resumed run takes every parameter from the checkpoint: skip reading the stem source.
    let stem = if resume_state.is_some() { None } else { stem };
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
        for (name, var) in &vars {
            let t = tensors
                .get(&format!("model.{name}"))
                .ok_or_else(|| Error::BadInput {
                    path: paths.checkpoint(),
                    msg: format!("missing parameter {name}"),
                })?;
            var.set(t)?;
        }
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
                cfg,
                "distillery-stage1-v1",
                done,
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

/// Write a run's checkpoint atomically: parameters (`model.*`), extra tensors such as buffers,
/// optimizer moments, and the step / config / format state.
pub(crate) fn save_checkpoint(
    paths: &RunPaths,
    vars: &std::collections::HashMap<String, Var>,
    extra: Vec<(String, Tensor)>,
    optim: &AdamW,
    cfg: &impl Serialize,
    format: &str,
    step: u64,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone()))
        .collect();
    tensors.extend(extra);
    tensors.extend(optim.state());
    let state = serde_json::json!({
        "step": step,
        "config": cfg,
        "format": format,
    });
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
