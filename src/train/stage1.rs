//! SAK stage 1: distil several frozen teachers into the student on unlabeled images.
//!
//! Each step: a batch of images, each with one RandomResizedCrop + flip (replayable from
//! (seed, epoch, index)); the student sees the crop at its resolution and normalisation, every
//! teacher at its own geometry (a canvas teacher such as SAM at 1024 px); the stem runs once and
//! all adapter paths read it; the loss sums one term per (teacher, level). Decoding and
//! augmentation run on the engine's producer thread ahead of the training step.

use crate::data::augment::{crop_to_tensor, sample_rng, RandomResizedCrop};
use crate::data::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::losses::{teacher_loss, FeatureLoss};
use crate::models::backbone::BackboneSpec;
use crate::models::encoder::resample_pos_table;
use crate::models::student::{
    preset, registered_stem, InputNorm, NetStem, StemArch, Student, StudentSpec, TeacherSlot,
};
use crate::models::{self, LoadOptions};
use crate::target_norm::{Moments, TargetNorm, TargetStats, STATS_FILE};
pub use crate::teacher::{dedup_names, parse_teacher_arg, short_name, Teacher};
use crate::train::cache::FeatureCache;
use crate::train::engine::{
    self, DataPlan, LoopConfig, Objective, RunFolder, RunOptions, RunPaths, RunSummary, StepLoss,
    StepModel, Trainer,
};
use crate::train::heldout::HeldOut;
use crate::train::schedule::CosineSchedule;
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Held-out images evaluated during `distill` (the first ones of `eval_images`).
pub const EVAL_MAX_IMAGES: usize = 256;

/// Files a stage-1 run exports.
pub const STUDENT_WEIGHTS: &str = "student.safetensors";
pub const STUDENT_SPEC: &str = "student.json";

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
    /// normalisation of the teachers' features before the loss (`none` = the SAK reference)
    pub target_norm: TargetNorm,
    /// images (epoch-0 crops) the target statistics are estimated on
    pub target_norm_images: usize,
    /// held-out images evaluated every `eval_every` steps (fidelity metrics, held-out loss)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_images: Option<PathBuf>,
    /// steps between held-out evaluations (0: at the end only, when `eval_images` is set)
    pub eval_every: u64,
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
            target_norm: TargetNorm::None,
            target_norm_images: 256,
            eval_images: None,
            eval_every: 0,
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
        if !self.target_norm.is_none() && self.target_norm_images == 0 {
            return bad("target_norm_images must be positive to estimate target statistics".into());
        }
        Ok(())
    }
}

/// What the teachers contribute to a batch.
pub enum TeacherBatch {
    /// per teacher, its input pixels `[B, 3, S_t, S_t]` (teachers run online)
    Pixels(Vec<Tensor>),
    /// per teacher and level, features `[B, C, h, w]` read from a cache
    Features(Vec<Vec<Tensor>>),
}

/// One prepared batch (host memory).
pub struct Batch {
    student: Tensor,
    teachers: TeacherBatch,
    skipped: usize,
}

impl TeacherBatch {
    /// Teacher `k`'s feature maps for the batch: run online, or as cached.
    pub fn features(&self, k: usize, teachers: &[Teacher]) -> Result<Vec<Tensor>> {
        match self {
            TeacherBatch::Pixels(px) => match (teachers.get(k), px.get(k)) {
                (Some(t), Some(px)) => t.features(px),
                _ => Err(Error::Invalid(format!("no teacher {k} in this batch"))),
            },
            TeacherBatch::Features(f) => f
                .get(k)
                .cloned()
                .ok_or_else(|| Error::Invalid(format!("no cached features of teacher {k}"))),
        }
    }

    /// Every teacher's feature maps, `[teacher][level]`.
    pub fn all_features(&self, teachers: &[Teacher]) -> Result<Vec<Vec<Tensor>>> {
        (0..self.len())
            .map(|k| self.features(k, teachers))
            .collect()
    }

    fn len(&self) -> usize {
        match self {
            TeacherBatch::Pixels(p) => p.len(),
            TeacherBatch::Features(f) => f.len(),
        }
    }

    fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(match self {
            TeacherBatch::Pixels(p) => TeacherBatch::Pixels(p.clone()),
            TeacherBatch::Features(f) => TeacherBatch::Features(
                f.iter()
                    .map(|l| l.iter().map(|t| Ok(t.to_device(dev)?)).collect())
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// The recipe and run folder of an invocation: the `config` file's recipe (or the defaults),
/// the run folder from `out` or else the recipe's `out`; when resuming without a config file
/// and without new teachers (`resume_own`), the run's own `config.toml`.
pub fn recipe(
    config: Option<&Path>,
    out: Option<&Path>,
    resume_own: bool,
) -> Result<(DistillConfig, PathBuf)> {
    let mut cfg = match config {
        Some(p) => crate::config::read_toml::<DistillConfig>(p)?,
        None => DistillConfig::default(),
    };
    let out = match out.map(Path::to_path_buf).or_else(|| cfg.out.clone()) {
        Some(o) => o,
        None => {
            return Err(Error::Invalid(
                "give the run folder: --out DIR, or out = \"DIR\" in --config".into(),
            ))
        }
    };
    if resume_own && config.is_none() {
        cfg = crate::config::read_toml(&RunPaths::new(&out).config())?;
    }
    cfg.out = Some(out.clone());
    Ok((cfg, out))
}

/// Input geometry of a batch: the student's square size and normalisation, and per teacher its
/// square size and normalisation.
pub(crate) struct Geometry {
    pub student_size: usize,
    pub student_norm: ([f32; 3], [f32; 3]),
    pub teachers: Vec<(usize, [f32; 3], [f32; 3])>,
}

impl Geometry {
    pub fn new(spec: &StudentSpec, teachers: &[Teacher]) -> Self {
        Self {
            student_size: spec.image_size,
            student_norm: (spec.mean, spec.std),
            teachers: teachers
                .iter()
                .map(|t| {
                    let (m, s) = t.norm();
                    (t.size(), m, s)
                })
                .collect(),
        }
    }

    /// One crop of `img` as the student's input `[3, S, S]` and each teacher's.
    pub fn inputs(
        &self,
        img: &image::RgbImage,
        crop: &crate::data::augment::CropBox,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (m, s) = self.student_norm;
        let st = crop_to_tensor(img, crop, self.student_size, m, s, &Device::Cpu)?;
        let ts = self
            .teachers
            .iter()
            .map(|&(size, m, s)| crop_to_tensor(img, crop, size, m, s, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        Ok((st, ts))
    }
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
            Ok(Some(geo.inputs(&img, &crop)?))
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
        Some(c) => TeacherBatch::Features(c.gather_all(&kept)?),
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

const IMAGENET_NORM: InputNorm = (
    crate::preprocess::IMAGENET_MEAN,
    crate::preprocess::IMAGENET_STD,
);

/// The stem a `--student` names at `image_size`: a ViT preset or a registered backbone (both at
/// random init), or a checkpoint to start from (a ViT, or a timm folder / hub id of a registered
/// backbone family). Returns the stem, its input mean and std, and the checkpoint.
pub fn student_stem(
    name: &str,
    image_size: usize,
) -> Result<(StemArch, InputNorm, Option<StemSource>)> {
    if let Some(arch) = preset(name) {
        return Ok((arch.into(), IMAGENET_NORM, None));
    }
    if !Path::new(name).exists() {
        if let Some((stem, norm)) = StemArch::backbone(name, (image_size, image_size))? {
            return Ok((stem, norm, None));
        }
        if !name.contains('/') {
            return Err(Error::Invalid(format!(
                "unknown student {name:?}: not a folder, a hub id (org/name), a ViT preset or a \
                 registered backbone (known: {})",
                crate::models::backbone::names().join(", ")
            )));
        }
    }
    let src = StemSource::open(name, image_size)?;
    Ok((src.stem.clone(), src.norm, Some(src)))
}

/// A checkpoint the student's stem starts from: a ViT (its architecture: everything its config
/// says — MLP width, tokens, layer scale, ...; its parameters in the stem's timm naming,
/// converted from whatever naming the checkpoint uses by the loader that reads it as a
/// teacher) or a timm folder of a registered backbone family (its parameters and BatchNorm
/// statistics; the classifier is not used).
pub struct StemSource {
    pub id: String,
    pub stem: StemArch,
    /// the checkpoint's input mean and std
    pub norm: InputNorm,
    /// a ViT checkpoint's position grid
    grid: Option<(usize, usize)>,
    /// `stem.*` tensors (parameters and buffers)
    tensors: std::collections::HashMap<String, Tensor>,
}

impl StemSource {
    /// Resolve and load a folder or hub id: a plain ViT, or a backbone of a registered family.
    pub fn open(id: &str, image_size: usize) -> Result<Self> {
        let bad = |msg: String| Error::BadInput {
            path: id.into(),
            msg: format!("cannot initialise the student from this checkpoint: {msg}"),
        };
        if let Some(f) = crate::models::backbone::read_folder(id, &LoadOptions::default())? {
            let name = f.spec.arch_name();
            let stem_spec = f.spec.with_classes(0)?;
            let list = |s: &dyn BackboneSpec| {
                s.parameters()
                    .into_iter()
                    .chain(s.buffers())
                    .map(|(n, shape, _)| (n, shape))
                    .collect::<Vec<_>>()
            };
            // at the registered name's widths the stem is that name; otherwise the config's
            // model_args describe it
            let registered = registered_stem(&name, (image_size, image_size))?;
            let model_args = match registered {
                Some(r) if list(r.as_ref()) == list(stem_spec.as_ref()) => None,
                _ => Some(f.model_args.clone().ok_or_else(|| {
                    bad(format!(
                        "its widths are not {name}'s and its config.json has no model_args"
                    ))
                })?),
            };
            let tensors = list(stem_spec.as_ref())
                .into_iter()
                .map(|(n, shape)| Ok((format!("stem.{n}"), f.weights.get(shape, &n)?)))
                .collect::<Result<_>>()?;
            let net = stem_spec.build(&f.weights, &f.weights)?;
            let (stem, norm) = NetStem::of(&name, model_args, net.as_ref());
            return Ok(Self {
                id: id.to_string(),
                norm,
                stem,
                grid: None,
                tensors,
            });
        }
        let enc = models::load(id, &LoadOptions::default())?;
        let tok = enc.token_encoder().ok_or_else(|| {
            bad(format!(
                "a {} is neither a plain ViT nor a registered backbone ({})",
                enc.info().family,
                crate::models::backbone::names().join(", ")
            ))
        })?;
        let arch = tok.vit_arch().map_err(bad)?;
        let tensors = tok
            .timm_tensors()?
            .into_iter()
            .map(|(n, t)| (format!("stem.{n}"), t))
            .collect();
        Ok(Self {
            id: id.to_string(),
            stem: arch.into(),
            // a ViT stem keeps the ImageNet statistics SAK trains with, whatever its source's
            norm: IMAGENET_NORM,
            grid: Some(tok.pos.grid_hw),
            tensors,
        })
    }

    /// The source's tensors for `list` (names under `stem.`): a ViT's position table
    /// resampled to the spec's grid; every shape is checked when the store is filled.
    fn tensors_for(
        &self,
        spec: &StudentSpec,
        list: &[(String, Vec<usize>, crate::models::student::Init)],
    ) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        for (name, _, _) in list {
            if !name.starts_with("stem.") {
                continue;
            }
            let t = self.tensors.get(name).ok_or_else(|| Error::BadInput {
                path: self.id.clone().into(),
                msg: format!("no tensor for student parameter {name}"),
            })?;
            let t = match (name.as_str(), spec.vit(), self.grid, spec.grid_hw()) {
                ("stem.pos_embed", Some(arch), Some(from), Some(to)) => resample_pos_table(
                    t,
                    arch.pos_prefix,
                    from,
                    to,
                    crate::models::vit::TIMM_POS_KERNEL,
                )?,
                _ => t.clone(),
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

/// Parameters and buffers of a fresh student on `device`: seeded initialisation, with the stem
/// (and its BatchNorm statistics) taken from `stem` when given.
pub fn new_student_params(
    spec: &StudentSpec,
    stem: Option<&StemSource>,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, VarMap)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (params, buffers) = (spec.parameters()?, spec.buffers()?);
    let (init, init_buffers, source) = match stem {
        Some(src) => (
            src.tensors_for(spec, &params)?,
            src.tensors_for(spec, &buffers)?,
            PathBuf::from(&src.id),
        ),
        None => (Default::default(), Default::default(), PathBuf::new()),
    };
    let vm = engine::init_params(params, init, &mut rng, device, &source)?;
    let bm = engine::init_params(buffers, init_buffers, &mut rng, device, &source)?;
    Ok((vm, bm))
}

/// The stage-1 objective: the student against every teacher (online or cached).
struct Distill<'a> {
    student: StepModel<Student>,
    teachers: &'a [Teacher],
    slots: &'a [TeacherSlot],
    kind: FeatureLoss,
    stats: Option<&'a TargetStats>,
    /// held-out images evaluated during training
    held_out: Option<HeldOut>,
    device: Device,
    cache_hint: CacheHint,
    /// a backbone stem's BatchNorm statistics (updated in place by the training forward)
    buffers: VarMap,
}

/// Tells the user once when online teachers take most of each step: `distillery cache` runs
/// them once per crop variant instead of once per step.
#[derive(Default)]
struct CacheHint {
    /// when the previous step's loss began
    last: Option<std::time::Instant>,
    given: bool,
}

impl CacheHint {
    /// After the first steps (warm-up), compare the teachers' time with a whole step's.
    /// Whether the hint was given now.
    fn observe(
        &mut self,
        step: u64,
        started: std::time::Instant,
        teachers: std::time::Duration,
    ) -> bool {
        let period = self.last.map(|p| started - p);
        self.last = Some(started);
        let Some(period) = period else {
            return false;
        };
        if self.given || step < 2 || teachers * 2 < period {
            return false;
        }
        self.given = true;
        tracing::warn!(
            "the teachers take {:.2} s of each {:.2} s step ({:.0} %); `distillery cache` computes \
             their features once per crop variant and `distill --cache` trains from them",
            teachers.as_secs_f64(),
            period.as_secs_f64(),
            100.0 * teachers.as_secs_f64() / period.as_secs_f64()
        );
        true
    }
}

impl Objective for Distill<'_> {
    type Batch = Batch;
    fn loss(&mut self, b: Batch, step: u64) -> Result<StepLoss> {
        let dtype = self.student.dtype();
        let x = b.student.to_device(&self.device)?.to_dtype(dtype)?;
        let tb = b.teachers.to_device(&self.device)?;
        let started = std::time::Instant::now();
        let (loss, per, teacher_time) = distill_loss(
            self.student.step()?,
            self.teachers,
            &x,
            &tb,
            self.kind,
            self.stats,
        )?;
        if matches!(tb, TeacherBatch::Pixels(_)) {
            self.cache_hint.observe(step, started, teacher_time);
        }
        Ok(StepLoss {
            loss,
            parts: self.slots.iter().map(|s| s.name.clone()).zip(per).collect(),
            images: x.dim(0)?,
            skipped: b.skipped,
        })
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        engine::buffer_tensors(&self.buffers)
    }

    fn evaluate(&mut self, _step: u64) -> Result<Option<Vec<(String, f64)>>> {
        let Some(h) = &self.held_out else {
            return Ok(None);
        };
        let dtype = self.student.dtype();
        let e = h.evaluate(
            self.student.model(),
            dtype,
            "student",
            self.kind,
            self.stats,
        )?;
        Ok(Some(e.metrics()))
    }
}

/// Run (or resume) stage 1 into `out`.
pub fn run(cfg: &DistillConfig, out: &Path, opts: &RunOptions) -> Result<RunSummary> {
    cfg.validate()?;
    let dev = &opts.device;
    let run = RunFolder::open(out, opts.resume, dev)?;
    let data = ImageSet::open(&cfg.images)?;
    let load_opts = opts.teacher_load();
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
    let saved_spec = match &run.saved {
        Some(s) => s.spec::<StudentSpec>()?,
        None => None,
    };
    let (spec, stem) = match saved_spec {
        Some(spec) => (spec, None),
        None => {
            let (arch, (mean, std), src) = student_stem(&cfg.student, cfg.image_size)?;
            let spec = StudentSpec::new(arch, cfg.image_size, slots.clone())?;
            (spec.with_norm(mean, std), src)
        }
    };
    // every teacher gives the same number of levels; the student distils that many
    let counts: Vec<(String, usize)> = match &cache {
        Some(c) => c
            .manifest
            .teachers
            .iter()
            .map(|t| (t.name.clone(), t.levels.len()))
            .collect(),
        None => teachers
            .iter()
            .map(|t| (t.name.clone(), t.levels.len()))
            .collect(),
    };
    let n_levels = counts.first().map_or(spec.levels.len(), |c| c.1);
    if counts.iter().any(|c| c.1 != n_levels) {
        let list: Vec<String> = counts.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        return Err(Error::Invalid(format!(
            "the teachers give different numbers of levels ({}); the student distils the same number from each",
            list.join(", ")
        )));
    }
    let spec = if run.saved.is_some() {
        if spec.levels.len() != n_levels {
            return Err(Error::Invalid(format!(
                "the saved student distils {} levels, the teachers give {n_levels}",
                spec.levels.len()
            )));
        }
        spec
    } else {
        StudentSpec {
            target_norm: cfg.target_norm,
            ..spec.with_level_count(n_levels)?
        }
    };
    let plan = DataPlan {
        n: data.len(),
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        variants: cfg.crop_variants,
    };
    let total = plan.total(cfg.steps, cfg.epochs);
    let schedule = CosineSchedule {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_lr: cfg.warmup_lr,
        warmup: (cfg.warmup_epochs * plan.steps_per_epoch() as f64).round() as u64,
        total,
    };

    let (varmap, buffers) = new_student_params(&spec, stem.as_ref(), cfg.seed, dev)?;
    let mut trainer = Trainer::new(
        &run,
        &varmap,
        Some(&buffers),
        cfg.weight_decay,
        cfg,
        |saved: &DistillConfig| {
            saved.teachers == cfg.teachers
                && saved.student == cfg.student
                && saved.image_size == cfg.image_size
                && saved.batch_size == cfg.batch_size
                && saved.seed == cfg.seed
                && saved.target_norm == cfg.target_norm
        },
        "other teachers/student/image size/batch size/seed/target normalisation",
    )?;
    let build_spec = spec.clone();
    let student = StepModel::new(
        &varmap,
        Some(&buffers),
        opts.precision,
        &run.paths.checkpoint(),
        move |w, state| Student::build_with_state(&build_spec, w, state),
    )?;
    let geo = Geometry::new(&spec, &teachers);
    let stats = target_stats(
        cfg,
        &run,
        &spec,
        &data,
        &geo,
        cache.as_deref(),
        &teachers,
        opts,
    )?;
    let held_out = match &cfg.eval_images {
        Some(dir) => {
            // a cached run has no teachers loaded: the held-out images need them
            let loaded;
            let ts = if teachers.is_empty() {
                loaded = Teacher::load_all(
                    &cfg.teachers,
                    cfg.image_size,
                    &cfg.teacher_sizes,
                    &load_opts,
                )?;
                &loaded
            } else {
                &teachers
            };
            let h = HeldOut::prepare(
                &ImageSet::open(dir)?,
                student.model(),
                ts,
                EVAL_MAX_IMAGES,
                cfg.batch_size,
                dev,
            )?;
            tracing::info!(
                "held-out evaluation on {} images of {}",
                h.images,
                dir.display()
            );
            Some(h)
        }
        None => None,
    };
    let (seed, strict) = (cfg.seed, cfg.strict_images);
    let producer_cache = cache.clone();
    let produce = move |variant: u64, idx: &[usize]| {
        make_batch(
            &data,
            &geo,
            producer_cache.as_deref(),
            seed,
            variant,
            idx,
            strict,
        )
    };
    let mut objective = Distill {
        student,
        teachers: &teachers,
        slots: &slots,
        kind: cfg.loss,
        stats: stats.as_ref(),
        held_out,
        device: dev.clone(),
        cache_hint: CacheHint::default(),
        buffers: buffers.clone(),
    };
    let summary = trainer.run(
        &mut objective,
        plan,
        produce,
        &LoopConfig {
            format: "distillery-stage1-v1",
            title: "SAK stage 1: distillation loss",
            total,
            clip_grad: cfg.clip_grad,
            checkpoint_every: cfg.checkpoint_every,
            schedule: &|s| schedule.at(s),
            eval_every: cfg.eval_every,
        },
        cfg,
        &spec,
        opts,
    )?;
    if summary.finished() {
        export_student(&run.paths, &spec, trainer.vars(), &buffers, stats.as_ref())?;
    }
    Ok(summary)
}

/// The stage-1 objective for one batch: every teacher at its own input (or its cached
/// features), then the student's stem once and every adapter path; one term per (teacher,
/// level), summed (targets normalised by `stats` when given). Returns the total, the
/// per-teacher sums and the time the teachers took.
pub fn distill_loss(
    student: &Student,
    teachers: &[Teacher],
    student_pixels: &Tensor,
    teacher_batch: &TeacherBatch,
    kind: FeatureLoss,
    stats: Option<&TargetStats>,
) -> Result<(Tensor, Vec<f64>, std::time::Duration)> {
    // Teachers first: their activations are freed before the student's are built.
    let started = std::time::Instant::now();
    let feats = teacher_batch.all_features(teachers)?;
    let teacher_time = started.elapsed();
    let out = student.forward(student_pixels, true, true)?;
    let (total, per_teacher) = distill_terms(&out.aligned, &feats, kind, stats)?;
    // one read for all teachers (on a GPU each read waits for the device)
    let per_teacher = Tensor::stack(&per_teacher, 0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    Ok((total, per_teacher, teacher_time))
}

/// The loss of the student's aligned maps against every teacher's feature maps (both
/// `[teacher][level]`): the sum of the per-teacher losses, and each of them. Stage 1 and the
/// distillation term of stage 2.
pub fn distill_terms(
    aligned: &[Vec<Tensor>],
    feats: &[Vec<Tensor>],
    kind: FeatureLoss,
    stats: Option<&TargetStats>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut total: Option<Tensor> = None;
    let mut per_teacher = Vec::with_capacity(aligned.len());
    for (k, (aligned, feats)) in aligned.iter().zip(feats).enumerate() {
        let norms = stats.and_then(|s| s.levels.get(k)).map(Vec::as_slice);
        let tl = teacher_loss(aligned, feats, kind, norms)?;
        total = Some(match total {
            Some(a) => (a + &tl)?,
            None => tl.clone(),
        });
        per_teacher.push(tl);
    }
    let total = total.ok_or_else(|| Error::Invalid("no teachers".into()))?;
    Ok((total, per_teacher))
}

/// Save the student without aligners: `student.safetensors` (with a backbone stem's BatchNorm
/// statistics) + `student.json`. A student
/// trained on normalised targets gets, per teacher and level, an output projection
/// `tsap.{t}.outputs.{k}` (the aligner, or the identity, with the inverse normalisation folded
/// in) so its exported features are at the teacher's scale.
pub fn export_student(
    paths: &RunPaths,
    spec: &StudentSpec,
    vars: &std::collections::HashMap<String, candle_core::Var>,
    buffers: &VarMap,
    stats: Option<&TargetStats>,
) -> Result<()> {
    let mut tensors = engine::export_tensors(vars);
    tensors.extend(engine::buffer_tensors(buffers)?);
    if let Some(stats) = stats {
        for t in 0..spec.teachers.len() {
            for k in 0..spec.levels.len() {
                let name = |what: &str| format!("tsap.{t}.{what}.{k}");
                let w = vars.get(&format!("{}.weight", name("aligners")));
                let b = vars.get(&format!("{}.bias", name("aligners")));
                let (w2, b2) = stats
                    .get(t, k)?
                    .fold(w.map(|v| v.as_tensor()), b.map(|v| v.as_tensor()))?;
                tensors.insert(format!("{}.weight", name("outputs")), w2);
                tensors.insert(format!("{}.bias", name("outputs")), b2);
            }
        }
    }
    crate::atomic::write_safetensors(&tensors, &paths.file(STUDENT_WEIGHTS))?;
    engine::write_json(&paths.file(STUDENT_SPEC), spec)
}

/// The target statistics a stage-1 run folder keeps for `spec` (None when its targets are
/// raw); every tensor's presence and shape is checked against the spec's teachers and levels.
pub fn load_target_stats(
    dir: &Path,
    spec: &StudentSpec,
    device: &Device,
) -> Result<Option<TargetStats>> {
    if spec.target_norm.is_none() {
        return Ok(None);
    }
    let widths: Vec<usize> = spec.teachers.iter().map(|t| t.dim).collect();
    TargetStats::load(
        &dir.join(STATS_FILE),
        spec.target_norm,
        &widths,
        spec.levels.len(),
        device,
    )
    .map(Some)
}

/// The run's target statistics (None for raw targets): estimated on a fresh run from the
/// teachers' features on the first `target_norm_images` images of epoch 0 (their training
/// crops; read from the cache when there is one) and saved in the run folder; read back when
/// resuming.
#[allow(clippy::too_many_arguments)]
fn target_stats(
    cfg: &DistillConfig,
    run: &RunFolder,
    spec: &StudentSpec,
    data: &ImageSet,
    geo: &Geometry,
    cache: Option<&FeatureCache>,
    teachers: &[Teacher],
    opts: &RunOptions,
) -> Result<Option<TargetStats>> {
    let kind = spec.target_norm;
    if kind.is_none() {
        return Ok(None);
    }
    if run.saved.is_some() {
        return load_target_stats(&run.paths.dir, spec, &opts.device);
    }
    let path = run.paths.file(STATS_FILE);
    let n = cfg.target_norm_images.min(data.len());
    let order = engine::epoch_order(cfg.seed, 0, data.len());
    let mut moments: Vec<Vec<Moments>> = spec
        .teachers
        .iter()
        .map(|t| vec![Moments::for_kind(t.dim, kind); spec.levels.len()])
        .collect();
    let bar = crate::train::progress_bar(n as u64, 0, opts.progress);
    bar.set_message("target statistics");
    for idx in order[..n].chunks(cfg.batch_size.max(1)) {
        let b = make_batch(data, geo, cache, cfg.seed, 0, idx, cfg.strict_images)?;
        for (k, m) in moments.iter_mut().enumerate() {
            let feats = b.teachers.features(k, teachers)?;
            for (m, f) in m.iter_mut().zip(&feats) {
                m.add_map(f)?;
            }
        }
        bar.inc(idx.len() as u64);
    }
    bar.finish_and_clear();
    let stats = TargetStats::from_moments(&moments, kind, &opts.device)?;
    stats.save(&path)?;
    tracing::info!(
        "target statistics ({kind:?}) from {n} images written to {}",
        path.display()
    );
    Ok(Some(stats))
}

/// Load an exported student from a run folder.
pub fn load_student(dir: &Path) -> Result<Student> {
    let paths = RunPaths::new(dir);
    let spec: StudentSpec = engine::read_json(&paths.file(STUDENT_SPEC))?;
    let w = Weights::open_file(&paths.file(STUDENT_WEIGHTS))?;
    Student::build(&spec, &w)
}

#[cfg(test)]
mod tests {
    use super::CacheHint;
    use std::time::{Duration, Instant};

    /// The cache hint comes once, after warm-up, when the teachers take at least half a step.
    #[test]
    fn cache_hint_once_when_teachers_dominate() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = CacheHint::default();
        // steps 10 s apart; teachers 4 s: no hint
        assert!(!h.observe(0, at(0), Duration::from_secs(4)));
        assert!(!h.observe(1, at(10), Duration::from_secs(4)));
        assert!(!h.observe(2, at(20), Duration::from_secs(4)));
        // warm-up steps do not count even when the teachers dominate
        let mut w = CacheHint::default();
        assert!(!w.observe(0, at(0), Duration::from_secs(9)));
        assert!(!w.observe(1, at(10), Duration::from_secs(9)));
        // teachers 6 s of a 10 s step: the hint, once
        assert!(h.observe(3, at(30), Duration::from_secs(6)));
        assert!(!h.observe(4, at(40), Duration::from_secs(6)));
    }
}
