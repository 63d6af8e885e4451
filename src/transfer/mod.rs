//! Task-oriented knowledge transfer (SPEC.md section 8), for image classification and semantic
//! segmentation: (1) fine-tune a foundation model with a task head on the few labelled images; (2) train a small student to match the fine-tuned
//! teacher's predictions (KL at temperature T) on an unlabelled transfer set; (3) fine-tune the
//! student on the labelled images. The baselines run in the same command: task-agnostic
//! transfer (match the frozen teacher's pooled features through a projection head, then
//! fine-tune), scratch (fine-tune from random init) and pretrained (fine-tune from the
//! student's own checkpoint). Every stage is a run of the training engine in its own folder
//! (resumable, runnable alone); `report.json` / `report.md` compare the rows.
//!
//! Run folder: `teacher/`, `<mode>/distill/`, `<mode>/finetune/`, each with the engine's files,
//! the exported model, `stage.json` (what it cost and how it scored) and confusion matrices.

pub mod cache;
pub mod data;
pub mod eval;
pub mod heads;
pub mod masks;
pub mod models;
pub mod objectives;
pub mod predict;

use crate::error::{Error, Result};
use crate::models::LoadOptions;
use crate::train::engine::{
    self, DataPlan, LoopConfig, RunFolder, RunOptions, RunSummary, StepModel, Trainer,
};
use crate::train::schedule::CosineSchedule;
use candle_nn::VarMap;
use data::{crops, open_unlabeled, Labeled, View};
use eval::Scores;
use masks::{LabelRule, MaskOptions, MaskSet};
pub use models::TransferTask;
use models::{Pool, StudentArch, StudentNet, StudentRecord, TeacherRecord};
use objectives::{
    Distill, FeatureMatch, LabeledBatch, Labels, PairBatch, Supervised, Target, TeacherInput,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Which pipeline a student goes through.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// distil the fine-tuned teacher's predictions, then fine-tune
    TaskOriented,
    /// distil the frozen teacher's features, then fine-tune
    TaskAgnostic,
    /// fine-tune from random init
    Scratch,
    /// fine-tune from the student's own pretrained checkpoint
    Pretrained,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::TaskOriented => "task-oriented",
            Mode::TaskAgnostic => "task-agnostic",
            Mode::Scratch => "scratch",
            Mode::Pretrained => "pretrained",
        }
    }
    /// whether the student is distilled before fine-tuning
    pub fn distills(self) -> bool {
        matches!(self, Mode::TaskOriented | Mode::TaskAgnostic)
    }
}

/// A stage of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Teacher,
    Distill,
    Finetune,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Teacher => "teacher",
            Stage::Distill => "distill",
            Stage::Finetune => "finetune",
        }
    }
}

/// The recipe of a transfer run (`transfer.toml`; command-line flags override it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// run folder (the `--out` flag overrides it)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    pub task: TransferTask,
    /// foundation model folder or hub id
    pub teacher: String,
    /// registered student name or timm folder / hub id
    pub student: String,
    /// labelled training images: ImageFolder tree or split file
    pub labeled: PathBuf,
    /// held-out evaluation images (same forms)
    pub test: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<PathBuf>,
    /// root of the images a split file names (default: the split file's folder)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_root: Option<PathBuf>,
    /// unlabelled transfer set: folder, tar, shard pattern or list file
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<PathBuf>,
    pub modes: Vec<Mode>,
    /// labelled images kept per class (0 = all; classification)
    pub labels_per_class: usize,
    /// segmentation classes (0: from the layout, ADE20K's annotations/ = 150)
    pub num_classes: usize,
    /// mask value of unlabelled pixels (after reduce_zero_label)
    pub ignore_index: u32,
    /// map mask value 0 to ignore and c to c - 1 (default: for ADE20K's annotations/ layout)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reduce_zero_label: Option<bool>,
    /// segmentation class names, one per line
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_names: Option<PathBuf>,
    /// channels of the student's segmentation decoder
    pub decoder_width: usize,
    /// student input side
    pub image_size: usize,
    /// teacher input side (0 = the student's)
    pub teacher_image_size: usize,
    pub batch_size: usize,
    pub teacher_epochs: u64,
    pub distill_epochs: u64,
    pub finetune_epochs: u64,
    pub seed: u64,
    /// teacher fine-tuning peak learning rate
    pub teacher_lr: f64,
    /// layer-wise learning-rate decay of the teacher's blocks (1 = none)
    pub layer_decay: f64,
    /// train only the teacher's head (linear probe)
    pub freeze_teacher: bool,
    /// tokens the teacher's head reads (default: cls+mean where there is a class token)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    pub distill_lr: f64,
    /// softmax temperature of task-oriented distillation (the loss is T^2-scaled)
    pub temperature: f64,
    /// feature loss of task-agnostic distillation
    pub feature_loss: FeatureMatch,
    /// K > 0: distillation cycles through K fixed crop variants per transfer image (epoch e
    /// uses variant e mod K); 0: fresh crops every epoch
    pub crop_variants: u64,
    /// task-oriented distillation reads the teacher's logits of the crop variants from a cache
    /// built once (`RUN/teacher-logits/`, f16) instead of running the teacher every epoch
    pub cache_teacher: bool,
    pub finetune_lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub min_lr: f64,
    /// max global gradient norm (0 = off)
    pub clip_grad: f64,
    /// smallest area share of a random resized crop (default 0.08 for classification, 0.25
    /// for segmentation)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_crop_scale: Option<f64>,
    /// evaluation centre crop share (timm's crop_pct)
    pub eval_crop_pct: f64,
    pub checkpoint_every: u64,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            out: None,
            task: TransferTask::Classify,
            teacher: String::new(),
            student: String::new(),
            labeled: PathBuf::new(),
            test: PathBuf::new(),
            val: None,
            images_root: None,
            transfer: None,
            modes: vec![Mode::TaskOriented],
            labels_per_class: 0,
            num_classes: 0,
            ignore_index: 255,
            reduce_zero_label: None,
            class_names: None,
            decoder_width: 128,
            image_size: 256,
            teacher_image_size: 224,
            batch_size: 64,
            teacher_epochs: 20,
            distill_epochs: 20,
            finetune_epochs: 20,
            seed: 0,
            teacher_lr: 5e-5,
            layer_decay: 0.75,
            freeze_teacher: false,
            pool: None,
            distill_lr: 1e-3,
            temperature: 4.0,
            feature_loss: FeatureMatch::Cosine,
            crop_variants: 0,
            cache_teacher: false,
            finetune_lr: 5e-4,
            weight_decay: 0.05,
            warmup_epochs: 1.0,
            min_lr: 1e-6,
            clip_grad: 1.0,
            min_crop_scale: None,
            eval_crop_pct: 0.875,
            checkpoint_every: 500,
        }
    }
}

impl TransferConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if self.task == TransferTask::Segment && self.labels_per_class > 0 {
            return bad("labels_per_class is for classification: give a segmentation budget as a split file of image names (as the ADE20K splits are)");
        }
        if self.task == TransferTask::Segment && self.decoder_width == 0 {
            return bad("decoder_width must be positive");
        }
        if self.teacher.is_empty() {
            return bad("give the teacher: --teacher or teacher = \"...\"");
        }
        if self.student.is_empty() {
            return bad("give the student: --student or student = \"...\"");
        }
        if self.labeled.as_os_str().is_empty() || self.test.as_os_str().is_empty() {
            return bad("give the labelled and test sets: --labeled and --test");
        }
        if self.cache_teacher && self.crop_variants == 0 {
            return bad("cache_teacher needs fixed crop variants: crop_variants = K > 0");
        }
        if self.modes.is_empty() {
            return bad("give at least one mode");
        }
        if self.batch_size == 0 || self.image_size == 0 {
            return bad("batch_size and image_size must be positive");
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return bad("temperature must be positive");
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return bad("layer_decay must be in (0, 1]");
        }
        if !(self.crop_scale() > 0.0 && self.crop_scale() <= 1.0) {
            return bad("min_crop_scale must be in (0, 1]");
        }
        if !(self.eval_crop_pct > 0.0 && self.eval_crop_pct <= 1.0) {
            return bad("eval_crop_pct must be in (0, 1]");
        }
        Ok(())
    }

    fn teacher_size(&self) -> usize {
        if self.teacher_image_size > 0 {
            self.teacher_image_size
        } else {
            self.image_size
        }
    }

    /// Whether a checkpoint made with `old` can be continued with this recipe.
    fn same_data(&self, old: &Self) -> bool {
        (
            &old.teacher,
            &old.student,
            &old.labeled,
            old.task,
            old.labels_per_class,
            old.image_size,
            old.teacher_size(),
            old.batch_size,
            old.seed,
        ) == (
            &self.teacher,
            &self.student,
            &self.labeled,
            self.task,
            self.labels_per_class,
            self.image_size,
            self.teacher_size(),
            self.batch_size,
            self.seed,
        )
    }

    /// The smallest crop share in effect.
    pub fn crop_scale(&self) -> f64 {
        self.min_crop_scale.unwrap_or(match self.task {
            TransferTask::Classify => 0.08,
            TransferTask::Segment => 0.25,
        })
    }

    fn rrc(&self) -> crate::data::RandomResizedCrop {
        crate::data::RandomResizedCrop {
            scale: (self.crop_scale(), 1.0),
            ..Default::default()
        }
    }

    fn mask_options(&self) -> MaskOptions {
        MaskOptions {
            num_classes: self.num_classes,
            ignore_index: self.ignore_index,
            reduce_zero_label: self.reduce_zero_label,
            class_names: self.class_names.clone(),
        }
    }
}

/// The recipe and run folder of an invocation: the `config` file's recipe (or the defaults),
/// the run folder from `out` or else the recipe's `out`; resuming without a config file reads
/// the run's own `config.toml`.
pub fn recipe(
    config: Option<&Path>,
    out: Option<&Path>,
    resume: bool,
) -> Result<(TransferConfig, PathBuf)> {
    let mut cfg: TransferConfig = match config {
        Some(p) => crate::config::read_toml(p)?,
        None => TransferConfig::default(),
    };
    let out = out
        .map(Path::to_path_buf)
        .or_else(|| cfg.out.clone())
        .ok_or_else(|| {
            Error::Invalid("give the run folder: --out DIR, or out = \"DIR\" in --config".into())
        })?;
    let own = out.join("config.toml");
    if resume && config.is_none() && own.is_file() {
        cfg = crate::config::read_toml(&own)?;
    }
    cfg.out = Some(out.clone());
    Ok((cfg, out))
}

/// What one finished stage cost and scored (`stage.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// the pipeline (the teacher belongs to task-oriented transfer)
    pub mode: Mode,
    pub stage: Stage,
    /// "teacher" or "student"
    pub model: String,
    pub steps: u64,
    /// training wall time of the invocation that finished the stage
    pub seconds: f64,
    /// training throughput
    pub images_per_s: f64,
    /// teacher forward passes the stage ran (distillation runs the teacher online)
    pub teacher_forward_passes: u64,
    /// scores per split (none where the stage trains no task head)
    pub evals: Vec<(String, Scores)>,
}

const STAGE_RECORD: &str = "stage.json";

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    pub mode: Mode,
    pub stage: Stage,
    pub model: String,
    pub split: Option<String>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub mean_class_acc: Option<f64>,
    pub miou: Option<f64>,
    pub pixel_acc: Option<f64>,
    /// training throughput of the stage
    pub images_per_s: f64,
    pub seconds: f64,
    pub eval_images_per_s: Option<f64>,
    pub teacher_forward_passes: u64,
}

/// Per-class IoU of one (mode, stage, split) of a segmentation transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerClass {
    pub mode: Mode,
    pub stage: Stage,
    pub split: String,
    pub iou: Vec<f64>,
}

/// `report.json`: one row per (mode, stage, split); for segmentation also the per-class IoU of
/// each.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rows: Vec<ReportRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class_iou: Vec<PerClass>,
    /// class names (for the per-class table)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
}

impl Report {
    fn add(&mut self, r: &StageRecord) {
        let base = ReportRow {
            mode: r.mode,
            stage: r.stage,
            model: r.model.clone(),
            split: None,
            top1: None,
            top5: None,
            mean_class_acc: None,
            miou: None,
            pixel_acc: None,
            images_per_s: r.images_per_s,
            seconds: r.seconds,
            eval_images_per_s: None,
            teacher_forward_passes: r.teacher_forward_passes,
        };
        if r.evals.is_empty() {
            self.rows.push(base.clone());
        }
        for (split, e) in &r.evals {
            let row = ReportRow {
                split: Some(split.clone()),
                eval_images_per_s: Some(e.images_per_s()),
                ..base.clone()
            };
            self.rows.push(match e {
                Scores::Classify(e) => ReportRow {
                    top1: Some(e.top1),
                    top5: Some(e.top5),
                    mean_class_acc: Some(e.mean_class_acc),
                    ..row
                },
                Scores::Segment(e) => ReportRow {
                    miou: Some(e.miou),
                    pixel_acc: Some(e.pixel_acc),
                    ..row
                },
            });
        }
        self.per_class_iou
            .extend(r.evals.iter().filter_map(|(split, e)| match e {
                Scores::Segment(e) => Some(PerClass {
                    mode: r.mode,
                    stage: r.stage,
                    split: split.clone(),
                    iou: e.per_class_iou.clone(),
                }),
                Scores::Classify(_) => None,
            }));
    }

    /// The row of (mode, stage) on `split`.
    pub fn row(&self, mode: Mode, stage: Stage, split: &str) -> Option<&ReportRow> {
        self.rows
            .iter()
            .find(|r| r.mode == mode && r.stage == stage && r.split.as_deref() == Some(split))
    }

    /// The report as Markdown: the table of rows (classification or segmentation metrics, as
    /// the rows hold), then for segmentation the per-class IoU of every scored row.
    pub fn markdown(&self) -> String {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", 100.0 * v));
        let seg = self.rows.iter().any(|r| r.miou.is_some());
        let metrics = if seg {
            "mIoU % | pixel acc %"
        } else {
            "top-1 % | top-5 % | mean class acc %"
        };
        let rule = if seg { "---|---" } else { "---|---|---" };
        let mut s = format!(
            "| mode | stage | model | split | {metrics} | train img/s | seconds | teacher passes |\n|---|---|---|---|{rule}|---|---|---|\n"
        );
        for r in &self.rows {
            let m = if seg {
                format!("{} | {}", pct(r.miou), pct(r.pixel_acc))
            } else {
                format!(
                    "{} | {} | {}",
                    pct(r.top1),
                    pct(r.top5),
                    pct(r.mean_class_acc)
                )
            };
            s += &format!(
                "| {} | {} | {} | {} | {m} | {:.1} | {:.1} | {} |\n",
                r.mode.name(),
                r.stage.name(),
                r.model,
                r.split.as_deref().unwrap_or("-"),
                r.images_per_s,
                r.seconds,
                r.teacher_forward_passes
            );
        }
        if !self.per_class_iou.is_empty() {
            s += "\n## Per-class IoU %\n\n| class |";
            for p in &self.per_class_iou {
                s += &format!(" {} {} ({}) |", p.mode.name(), p.stage.name(), p.split);
            }
            s += "\n|---|";
            s += &"---|".repeat(self.per_class_iou.len());
            s += "\n";
            let k = self
                .per_class_iou
                .iter()
                .map(|p| p.iou.len())
                .max()
                .unwrap_or(0);
            for c in 0..k {
                let name = self
                    .classes
                    .get(c)
                    .cloned()
                    .unwrap_or_else(|| c.to_string());
                s += &format!("| {name} |");
                for p in &self.per_class_iou {
                    s += &format!(" {} |", pct(p.iou.get(c).copied()));
                }
                s += "\n";
            }
        }
        s
    }
}

/// The data sets of a run.
struct Sets {
    labeled: Arc<TaskSet>,
    /// (split name, set)
    evals: Vec<(String, TaskSet)>,
}

/// A labelled set of the run's task.
pub enum TaskSet {
    Classes(Labeled),
    Masks(MaskSet),
}

impl TaskSet {
    /// Open a labelled set for `cfg.task`; evaluation sets pass the training set (`train`) so
    /// that they share its classes and label rule.
    pub fn open(cfg: &TransferConfig, path: &Path, train: Option<&TaskSet>) -> Result<Self> {
        let root = cfg.images_root.as_deref();
        Ok(match (cfg.task, train) {
            (TransferTask::Classify, None) => TaskSet::Classes(
                Labeled::open(path, root, None)?.budget(cfg.labels_per_class, cfg.seed),
            ),
            (TransferTask::Classify, Some(t)) => {
                TaskSet::Classes(Labeled::open(path, root, Some(t.classes()))?)
            }
            (TransferTask::Segment, t) => {
                let rule: Option<&LabelRule> = match t {
                    Some(TaskSet::Masks(m)) => Some(&m.rule),
                    _ => None,
                };
                let mut set = MaskSet::open(path, root, &cfg.mask_options(), rule)?;
                if let Some(t) = t {
                    set.classes = t.classes().to_vec();
                }
                TaskSet::Masks(set)
            }
        })
    }

    pub fn classes(&self) -> &[String] {
        match self {
            TaskSet::Classes(s) => &s.classes,
            TaskSet::Masks(s) => &s.classes,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TaskSet::Classes(s) => s.items.len(),
            TaskSet::Masks(s) => s.items.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The set as a split file (the drawn budget, reusable with `--labeled`).
    pub fn split_text(&self) -> String {
        match self {
            TaskSet::Classes(s) => s
                .items
                .iter()
                .map(|(p, k)| format!("{},{}\n", p.display(), s.classes[*k]))
                .collect(),
            TaskSet::Masks(s) => s.split_text(),
        }
    }

    /// A training batch of items `idx`: crops as `view` sees them with their labels.
    fn batch(
        &self,
        view: View,
        rrc: &crate::data::RandomResizedCrop,
        seed: u64,
        epoch: u64,
        idx: &[usize],
    ) -> Result<LabeledBatch> {
        match self {
            TaskSet::Classes(data) => {
                let c = crops(data, &[view], rrc, seed, epoch, idx)?;
                Ok(LabeledBatch {
                    labels: Labels::Classes(
                        c.kept.iter().map(|&i| data.items[i].1 as u32).collect(),
                    ),
                    x: c.views[0].clone(),
                    skipped: c.skipped,
                })
            }
            TaskSet::Masks(data) => {
                let (c, masks) = masks::mask_crops(data, &[view], rrc, seed, epoch, idx)?;
                Ok(LabeledBatch {
                    labels: Labels::Masks {
                        masks,
                        ignore: data.rule.ignore,
                    },
                    x: c.views[0].clone(),
                    skipped: c.skipped,
                })
            }
        }
    }
}

/// Everything one stage needs from the run.
struct Ctx<'a> {
    cfg: &'a TransferConfig,
    out: &'a Path,
    opts: &'a RunOptions,
    sets: &'a Sets,
}

impl Ctx<'_> {
    fn classes(&self) -> usize {
        self.sets.labeled.classes().len()
    }

    fn task(&self) -> TransferTask {
        self.cfg.task
    }

    /// The student's architecture for this run's task.
    fn student_arch(&self) -> Result<(StudentArch, Option<crate::weights::Weights>)> {
        models::student_arch(
            &self.cfg.student,
            self.cfg.image_size,
            self.task(),
            self.classes(),
            self.cfg.decoder_width,
            &self.opts.device,
        )
    }

    fn student_record(&self) -> StudentRecord {
        StudentRecord {
            source: self.cfg.student.clone(),
            task: self.task(),
            image_size: self.cfg.image_size,
            classes: self.sets.labeled.classes().to_vec(),
            decoder_width: match self.task() {
                TransferTask::Segment => self.cfg.decoder_width,
                TransferTask::Classify => 0,
            },
        }
    }

    fn load(&self) -> LoadOptions {
        self.opts.teacher_load()
    }

    fn stage_dir(&self, mode: Mode, stage: Stage) -> PathBuf {
        match stage {
            Stage::Teacher => self.out.join("teacher"),
            s => self.out.join(mode.name()).join(s.name()),
        }
    }

    fn plan(&self, n: usize) -> DataPlan {
        DataPlan {
            n,
            batch_size: self.cfg.batch_size.min(n).max(1),
            seed: self.cfg.seed,
            variants: 0,
        }
    }

    fn schedule(&self, plan: &DataPlan, lr: f64, epochs: u64) -> CosineSchedule {
        let total = plan.total(0, epochs);
        CosineSchedule {
            lr,
            min_lr: self.cfg.min_lr,
            warmup_lr: self.cfg.min_lr,
            warmup: ((self.cfg.warmup_epochs * plan.steps_per_epoch() as f64).round() as u64)
                .min(total / 2),
            total,
        }
    }

    fn trainer<'r>(
        &self,
        run: &'r RunFolder,
        params: &VarMap,
        buffers: &VarMap,
    ) -> Result<Trainer<'r>> {
        Trainer::new(
            run,
            params,
            Some(buffers),
            self.cfg.weight_decay,
            self.cfg,
            |old: &TransferConfig| self.cfg.same_data(old),
            "another teacher/student/labelled set/budget/image size/batch size/seed",
        )
    }

    /// Run a stage's step loop with the recipe's clipping, checkpoint interval and `schedule`;
    /// `names` = (checkpoint format, loss plot title).
    #[allow(clippy::too_many_arguments)]
    fn train<O: crate::train::engine::Objective>(
        &self,
        trainer: &mut Trainer,
        objective: &mut O,
        plan: DataPlan,
        produce: impl Fn(u64, &[usize]) -> Result<O::Batch> + Send + 'static,
        schedule: &CosineSchedule,
        names: (&str, &str),
        spec: &impl Serialize,
    ) -> Result<RunSummary> {
        trainer.run(
            objective,
            plan,
            produce,
            &LoopConfig {
                format: names.0,
                title: names.1,
                total: schedule.total,
                clip_grad: self.cfg.clip_grad,
                checkpoint_every: self.cfg.checkpoint_every,
                schedule: &|s| schedule.at(s),
                eval_every: 0,
            },
            self.cfg,
            spec,
            self.opts,
        )
    }

    /// Fine-tune `model` on the labelled set with cross-entropy (crops as `view` says).
    #[allow(clippy::too_many_arguments)]
    fn fit_labels<M: models::Predictor>(
        &self,
        trainer: &mut Trainer,
        model: StepModel<M>,
        buffers: VarMap,
        view: View,
        plan: DataPlan,
        schedule: &CosineSchedule,
        names: (&str, &str),
        spec: &impl Serialize,
    ) -> Result<RunSummary> {
        let mut objective = Supervised {
            model,
            buffers,
            device: self.opts.device.clone(),
        };
        let (data, rrc, seed) = (self.sets.labeled.clone(), self.cfg.rrc(), self.cfg.seed);
        let produce = move |epoch, idx: &[usize]| data.batch(view, &rrc, seed, epoch, idx);
        self.train(
            trainer,
            &mut objective,
            plan,
            produce,
            schedule,
            names,
            spec,
        )
    }

    /// Score a model on every evaluation split (classifiers also get confusion matrices drawn
    /// into `dir`).
    fn evaluate(
        &self,
        model: &dyn models::Predictor,
        view: View,
        dir: &Path,
        title: &str,
    ) -> Result<Vec<(String, Scores)>> {
        let mut out = Vec::new();
        for (split, set) in &self.sets.evals {
            let scores = match set {
                TaskSet::Classes(set) => {
                    let e = eval::evaluate(
                        model,
                        set,
                        view,
                        self.cfg.eval_crop_pct,
                        self.cfg.batch_size,
                        &self.load(),
                    )?;
                    eval::confusion_png(
                        &e.confusion,
                        &set.classes,
                        &format!("{title}: {split}, top-1 {:.1} %", 100.0 * e.top1),
                        &dir.join(format!("confusion-{split}.png")),
                    )?;
                    Scores::Classify(e)
                }
                TaskSet::Masks(set) => Scores::Segment(eval::evaluate_masks(
                    model,
                    set,
                    view,
                    self.cfg.batch_size,
                    &self.load(),
                )?),
            };
            out.push((split.clone(), scores));
        }
        Ok(out)
    }
}

/// What a stage run came to.
enum Outcome {
    Done(StageRecord),
    /// stopped before its last step (`--stop-after`); later stages cannot run
    Stopped,
}

/// The stage's finished record, or None when it must (still) run; a finished stage is reused
/// only when resuming (otherwise the engine refuses its existing checkpoint).
fn finished(dir: &Path, resume: bool) -> Result<Option<StageRecord>> {
    let p = dir.join(STAGE_RECORD);
    if resume && p.is_file() {
        return Ok(Some(engine::read_json(&p)?));
    }
    Ok(None)
}

/// Open a stage's run folder: resuming where it has a checkpoint, fresh otherwise.
fn open_run(dir: &Path, opts: &RunOptions) -> Result<RunFolder> {
    let resume = opts.resume && dir.join("checkpoint.safetensors").is_file();
    RunFolder::open(dir, resume, &opts.device)
}

fn finish(dir: &Path, rec: StageRecord) -> Result<Outcome> {
    engine::write_json(&dir.join(STAGE_RECORD), &rec)?;
    Ok(Outcome::Done(rec))
}

fn record(mode: Mode, stage: Stage, model: &str, s: &RunSummary, t0: Instant) -> StageRecord {
    StageRecord {
        mode,
        stage,
        model: model.into(),
        steps: s.total_steps,
        seconds: t0.elapsed().as_secs_f64(),
        images_per_s: s.images_per_s,
        teacher_forward_passes: 0,
        evals: Vec::new(),
    }
}

/// A student as each training step sees it, over its parameter and buffer stores.
fn student_model(
    arch: StudentArch,
    params: &VarMap,
    buffers: &VarMap,
    run: &RunFolder,
    opts: &RunOptions,
) -> Result<StepModel<StudentNet>> {
    StepModel::new(
        params,
        Some(buffers),
        opts.precision,
        &run.paths.checkpoint(),
        move |w, st| StudentNet::build(&arch, w, st),
    )
}

/// Stage 1: fine-tune the teacher with a linear head on the labelled set; a user's ONNX
/// teacher (already fine-tuned) is only evaluated.
fn teacher_stage(ctx: &Ctx, dir: &Path) -> Result<Outcome> {
    let (cfg, opts) = (ctx.cfg, ctx.opts);
    let t0 = Instant::now();
    if models::is_onnx_teacher(&cfg.teacher) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let net = models::onnx_task_teacher(&cfg.teacher, Some(ctx.classes()))?;
        let view = net.view(cfg.teacher_size());
        let mut r = StageRecord {
            mode: Mode::TaskOriented,
            stage: Stage::Teacher,
            model: "teacher (ONNX, as given)".into(),
            steps: 0,
            seconds: 0.0,
            images_per_s: 0.0,
            teacher_forward_passes: 0,
            evals: Vec::new(),
        };
        r.evals = ctx.evaluate(&net, view, dir, "teacher")?;
        r.seconds = t0.elapsed().as_secs_f64();
        return finish(dir, r);
    }
    let run = open_run(dir, opts)?;
    let k = ctx.classes();
    let parts = models::teacher_parts(
        &cfg.teacher,
        ctx.task(),
        cfg.pool,
        k,
        cfg.freeze_teacher,
        cfg.seed,
        &opts.device,
    )?;
    let rec = TeacherRecord {
        source: cfg.teacher.clone(),
        task: ctx.task(),
        pool: parts.pool,
        blocks: match &parts.head {
            models::HeadSpec::Seg { blocks, .. } => blocks.clone(),
            models::HeadSpec::Linear { .. } => Vec::new(),
        },
        classes: ctx.sets.labeled.classes().to_vec(),
        image_size: cfg.teacher_size(),
        frozen: cfg.freeze_teacher,
    };
    let view = View {
        image_size: cfg.teacher_size(),
        mean: parts.mean,
        std: parts.std,
    };
    let plan = ctx.plan(ctx.sets.labeled.len());
    let schedule = ctx.schedule(&plan, cfg.teacher_lr, cfg.teacher_epochs);
    let buffers = VarMap::new();
    let mut trainer = ctx.trainer(&run, &parts.params, &buffers)?;
    if !cfg.freeze_teacher && cfg.layer_decay < 1.0 {
        let (depth, decay) = (parts.depth, cfg.layer_decay);
        trainer.set_lr_scales(|n| models::layer_decay_scale(n, depth, decay));
    }
    let (files, frozen, pool, head) = (
        parts.files.clone(),
        parts.frozen.clone(),
        parts.pool,
        parts.head.clone(),
    );
    let model = StepModel::new(
        &parts.params,
        None,
        opts.precision,
        &run.paths.checkpoint(),
        move |w, _| models::build_teacher(&files, frozen.as_ref(), pool, &head, k, w),
    )?;
    let summary = ctx.fit_labels(
        &mut trainer,
        model,
        buffers,
        view,
        plan,
        &schedule,
        (
            "distillery-transfer-teacher-v1",
            "transfer: teacher fine-tuning (cross-entropy)",
        ),
        &rec,
    )?;
    if !summary.finished() {
        return Ok(Outcome::Stopped);
    }
    let tensors = engine::vars_of(&parts.params)?
        .into_iter()
        .filter(|(n, _)| !cfg.freeze_teacher || n.starts_with("head."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    crate::atomic::write_safetensors(&tensors, &dir.join(models::TEACHER_WEIGHTS))?;
    engine::write_json(&dir.join(models::TEACHER_SPEC), &rec)?;
    let mut r = record(Mode::TaskOriented, Stage::Teacher, "teacher", &summary, t0);
    let (_, net) = models::load_teacher(dir, &ctx.load())?;
    r.evals = ctx.evaluate(&net, view, dir, "teacher")?;
    finish(dir, r)
}

/// Stage 2: distil the teacher into a fresh student on the transfer set.
fn distill_stage(ctx: &Ctx, mode: Mode, dir: &Path) -> Result<Outcome> {
    let (cfg, opts) = (ctx.cfg, ctx.opts);
    let t0 = Instant::now();
    let transfer_path = cfg
        .transfer
        .as_ref()
        .ok_or_else(|| Error::Invalid("distillation needs the transfer set: --transfer".into()))?;
    let data: Arc<dyn crate::data::ImageSource> = Arc::from(open_unlabeled(transfer_path)?);
    let (teacher, target) = match mode {
        Mode::TaskOriented => (
            task_teacher(cfg, ctx.out, Some(ctx.classes()), &ctx.load())?,
            Target::Predictions(cfg.temperature),
        ),
        _ => (
            models::frozen_teacher(&cfg.teacher, cfg.pool, &ctx.load())?,
            Target::Features(cfg.feature_loss),
        ),
    };
    let run = open_run(dir, opts)?;
    let (arch, _) = ctx.student_arch()?;
    let (_, _, probe) = engine::random_backbone(
        &*arch.backbone,
        cfg.seed,
        &opts.device,
        candle_core::DType::F32,
    )?;
    let probe = StudentNet {
        net: probe,
        seg: None,
        proj: None,
    };
    let sview = probe.view(cfg.image_size);
    let extra = match target {
        Target::Features(_) => {
            let (s, t) = match ctx.task() {
                TransferTask::Classify => (
                    models::feature_dim(&probe, cfg.image_size)?,
                    teacher.pool.dim(&*teacher.encoder),
                ),
                TransferTask::Segment => (
                    probe.net.feature_info().last().map_or(0, |f| f.channels),
                    teacher.encoder.info().out_channels,
                ),
            };
            vec![
                (
                    "proj.weight".to_string(),
                    vec![t, s],
                    crate::models::student::Init::TruncNormal(0.02),
                ),
                (
                    "proj.bias".to_string(),
                    vec![t],
                    crate::models::student::Init::Zeros,
                ),
            ]
        }
        Target::Predictions(_) => Vec::new(),
    };
    drop(probe);
    let (params, buffers) =
        models::student_params(&arch, None, false, extra, cfg.seed, &opts.device)?;
    let rec = ctx.student_record();
    let tview = teacher.view(cfg.teacher_size());
    let plan = DataPlan {
        variants: cfg.crop_variants,
        ..ctx.plan(data.len())
    };
    // Task-oriented distillation with fixed variants reads the teacher's logits from a cache.
    let (cache, cache_passes) = match target {
        Target::Predictions(_) if cfg.cache_teacher => {
            let (c, passes) = teacher_logit_cache(
                cfg,
                ctx.out,
                &teacher,
                &*data,
                transfer_path,
                &ctx.load(),
                opts.progress,
            )?;
            (Some(Arc::new(c)), passes)
        }
        _ => (None, 0),
    };
    let schedule = ctx.schedule(&plan, cfg.distill_lr, cfg.distill_epochs);
    let mut trainer = ctx.trainer(&run, &params, &buffers)?;
    let student = student_model(arch, &params, &buffers, &run, opts)?;
    let mut objective = Distill {
        student,
        buffers: buffers.clone(),
        teacher,
        target,
        device: opts.device.clone(),
    };
    let (rrc, seed) = (cfg.rrc(), cfg.seed);
    let online = cache.is_none();
    let produce = move |variant: u64, idx: &[usize]| {
        let views = if online {
            vec![sview, tview]
        } else {
            vec![sview]
        };
        let c = crops(&*data, &views, &rrc, seed, variant, idx)?;
        let teacher = match &cache {
            Some(cache) => TeacherInput::Logits(cache.logits(variant, &c.kept)?),
            None => TeacherInput::Pixels(c.views[1].clone()),
        };
        Ok(PairBatch {
            student: c.views[0].clone(),
            teacher,
            skipped: c.skipped,
        })
    };
    let summary = ctx.train(
        &mut trainer,
        &mut objective,
        plan,
        produce,
        &schedule,
        (
            "distillery-transfer-distill-v1",
            match target {
                Target::Predictions(_) => "transfer: task-oriented distillation (KL)",
                Target::Features(_) => "transfer: task-agnostic distillation (features)",
            },
        ),
        &rec,
    )?;
    if !summary.finished() {
        return Ok(Outcome::Stopped);
    }
    models::export_student(dir, &rec, &params, &buffers)?;
    let mut r = record(mode, Stage::Distill, "student", &summary, t0);
    r.teacher_forward_passes = if online {
        (summary.end_step - summary.start_step) * plan.batch_size as u64
    } else {
        cache_passes
    };
    if let Target::Predictions(_) = target {
        let (_, net) = models::load_student(dir, &ctx.load())?;
        r.evals = ctx.evaluate(
            &net,
            sview,
            dir,
            &format!("{} student after distillation", mode.name()),
        )?;
    }
    finish(dir, r)
}

/// Build (or reuse) a run's teacher-logit cache (`RUN/teacher-logits/`): the fine-tuned
/// teacher over every crop variant of the transfer set `data` (read from `transfer`). Returns
/// the cache and the teacher forward passes run.
fn teacher_logit_cache(
    cfg: &TransferConfig,
    out: &Path,
    teacher: &models::TeacherNet,
    data: &dyn crate::data::ImageSource,
    transfer: &Path,
    load: &LoadOptions,
    progress: bool,
) -> Result<(cache::LogitCache, u64)> {
    let tdir = out.join("teacher");
    // the teacher's logits of one image, from a forward of one blank input
    let size = cfg.teacher_size();
    let blank = candle_core::Tensor::zeros((1, 3, size, size), load.dtype, &load.device)?;
    let shape = models::Predictor::logits(teacher, &blank, false)?.dims()[1..].to_vec();
    let weights = tdir.join(models::TEACHER_WEIGHTS);
    let manifest = cache::LogitManifest {
        teacher_bytes: std::fs::metadata(&weights)
            .map_err(|e| Error::io(&weights, e))?
            .len(),
        teacher: tdir,
        transfer: transfer.to_path_buf(),
        images: data.len(),
        shape,
        variants: cfg.crop_variants,
        seed: cfg.seed,
        teacher_size: size,
        min_crop_scale: cfg.crop_scale(),
    };
    cache::LogitCache::build(
        &out.join("teacher-logits"),
        &manifest,
        teacher,
        data,
        teacher.view(size),
        &cfg.rrc(),
        cfg.batch_size,
        load,
        progress,
    )
}

/// What [`build_teacher_cache`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSummary {
    pub images: usize,
    pub variants: u64,
    /// teacher forward passes run (0 when the cache was complete)
    pub teacher_forward_passes: u64,
}

/// The fine-tuned teacher of a task-oriented transfer into `out`: the user's ONNX model as
/// given (its logits checked against `classes` when known), else the teacher stage's.
fn task_teacher(
    cfg: &TransferConfig,
    out: &Path,
    classes: Option<usize>,
    load: &LoadOptions,
) -> Result<models::TeacherNet> {
    if models::is_onnx_teacher(&cfg.teacher) {
        return models::onnx_task_teacher(&cfg.teacher, classes);
    }
    let tdir = out.join("teacher");
    if !tdir.join(models::TEACHER_SPEC).is_file() {
        return Err(Error::BadInput {
            path: tdir,
            msg: "no fine-tuned teacher: run the teacher stage first".into(),
        });
    }
    Ok(models::load_teacher(&tdir, load)?.1)
}

/// `distillery cache --transfer RUN`: build the teacher-logit cache of a transfer run whose
/// teacher stage has finished, from the run's recipe (`RUN/config.toml`; it needs
/// `crop_variants` > 0). A later `distillery transfer --out RUN --resume` with `cache_teacher`
/// distils from it without running the teacher.
pub fn build_teacher_cache(out: &Path, load: &LoadOptions, progress: bool) -> Result<CacheSummary> {
    let own = out.join("config.toml");
    if !own.is_file() {
        return Err(Error::BadInput {
            path: out.to_path_buf(),
            msg: "not a transfer run folder (no config.toml): run `distillery transfer` first"
                .into(),
        });
    }
    let (cfg, _) = recipe(None, Some(out), true)?;
    cfg.validate()?;
    if cfg.crop_variants == 0 {
        return Err(Error::BadInput {
            path: own,
            msg: "the cache holds fixed crop variants: set crop_variants = K > 0".into(),
        });
    }
    let transfer = cfg.transfer.clone().ok_or_else(|| Error::BadInput {
        path: own.clone(),
        msg: "the recipe names no transfer set".into(),
    })?;
    let teacher = task_teacher(&cfg, out, None, load)?;
    let data = open_unlabeled(&transfer)?;
    let (_, passes) = teacher_logit_cache(&cfg, out, &teacher, &*data, &transfer, load, progress)?;
    Ok(CacheSummary {
        images: data.len(),
        variants: cfg.crop_variants,
        teacher_forward_passes: passes,
    })
}

/// Stage 3: fine-tune the student on the labelled set (from the distilled student, the
/// student's own checkpoint, or random init, as the mode says).
fn finetune_stage(ctx: &Ctx, mode: Mode, dir: &Path) -> Result<Outcome> {
    let (cfg, opts) = (ctx.cfg, ctx.opts);
    let t0 = Instant::now();
    let (arch, own) = ctx.student_arch()?;
    // Where the student starts, and whether its classifier comes along (a distilled
    // task-oriented student's classifier already predicts the task's classes).
    let (init, keep_head): (Option<crate::weights::Weights>, bool) = match mode {
        Mode::TaskOriented | Mode::TaskAgnostic => {
            let ddir = ctx.stage_dir(mode, Stage::Distill);
            let p = ddir.join(models::STUDENT_WEIGHTS);
            if !p.is_file() {
                return Err(Error::BadInput {
                    path: ddir,
                    msg: "no distilled student: run the distill stage first".into(),
                });
            }
            (
                Some(crate::weights::Weights::open_file_as(
                    &p,
                    candle_core::DType::F32,
                    &opts.device,
                )?),
                mode == Mode::TaskOriented,
            )
        }
        Mode::Pretrained => match own {
            Some(w) => (Some(w), false),
            None => {
                return Err(Error::Invalid(format!(
                    "mode pretrained needs the student's pretrained checkpoint: {:?} is a registered name; give a timm folder or hub id",
                    cfg.student
                )))
            }
        },
        Mode::Scratch => (None, false),
    };
    let run = open_run(dir, opts)?;
    let (params, buffers) = models::student_params(
        &arch,
        init.as_ref(),
        keep_head,
        Vec::new(),
        cfg.seed,
        &opts.device,
    )?;
    let rec = ctx.student_record();
    let plan = ctx.plan(ctx.sets.labeled.len());
    let schedule = ctx.schedule(&plan, cfg.finetune_lr, cfg.finetune_epochs);
    let mut trainer = ctx.trainer(&run, &params, &buffers)?;
    let model = student_model(arch, &params, &buffers, &run, opts)?;
    let view = model.model().view(cfg.image_size);
    let summary = ctx.fit_labels(
        &mut trainer,
        model,
        buffers.clone(),
        view,
        plan,
        &schedule,
        (
            "distillery-transfer-finetune-v1",
            "transfer: student fine-tuning (cross-entropy)",
        ),
        &rec,
    )?;
    if !summary.finished() {
        return Ok(Outcome::Stopped);
    }
    models::export_student(dir, &rec, &params, &buffers)?;
    let mut r = record(mode, Stage::Finetune, "student", &summary, t0);
    let (_, net) = models::load_student(dir, &ctx.load())?;
    r.evals = ctx.evaluate(&net, view, dir, &format!("{} student", mode.name()))?;
    finish(dir, r)
}

/// The stages a mode runs, in order.
fn stages_of(mode: Mode) -> &'static [Stage] {
    match mode {
        Mode::TaskOriented => &[Stage::Teacher, Stage::Distill, Stage::Finetune],
        Mode::TaskAgnostic => &[Stage::Distill, Stage::Finetune],
        Mode::Scratch | Mode::Pretrained => &[Stage::Finetune],
    }
}

/// Run (or resume) a transfer into `out`: every mode's stages (or only `only`), then the
/// report of every finished stage.
pub fn run(
    cfg: &TransferConfig,
    out: &Path,
    opts: &RunOptions,
    only: Option<Stage>,
) -> Result<Report> {
    cfg.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // The recipe, so that `--resume` and `distillery cache --transfer` need only the folder.
    let text = toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::atomic::write_bytes(&out.join("config.toml"), text.as_bytes())?;
    let labeled = TaskSet::open(cfg, &cfg.labeled, None)?;
    let mut evals = vec![(
        "test".to_string(),
        TaskSet::open(cfg, &cfg.test, Some(&labeled))?,
    )];
    if let Some(v) = &cfg.val {
        evals.push(("val".to_string(), TaskSet::open(cfg, v, Some(&labeled))?));
    }
    // The drawn budget, as a split file anyone can reuse.
    crate::atomic::write_bytes(&out.join("labeled.txt"), labeled.split_text().as_bytes())?;
    let sets = Sets {
        labeled: Arc::new(labeled),
        evals,
    };
    let ctx = Ctx {
        cfg,
        out,
        opts,
        sets: &sets,
    };
    let mut modes = cfg.modes.clone();
    modes.dedup();
    let mut report = Report::default();
    if cfg.task == TransferTask::Segment {
        report.classes = sets.labeled.classes().to_vec();
    }
    let mut teacher_done: Option<StageRecord> = None;
    'modes: for &mode in &modes {
        for &stage in stages_of(mode) {
            if only.is_some_and(|o| o != stage) {
                continue;
            }
            let dir = ctx.stage_dir(mode, stage);
            let outcome = match (stage, &teacher_done, finished(&dir, opts.resume)?.as_ref()) {
                (Stage::Teacher, Some(r), _) | (_, _, Some(r)) => Outcome::Done(r.clone()),
                (Stage::Teacher, None, None) => teacher_stage(&ctx, &dir)?,
                (Stage::Distill, _, None) => distill_stage(&ctx, mode, &dir)?,
                (Stage::Finetune, _, None) => finetune_stage(&ctx, mode, &dir)?,
            };
            match outcome {
                Outcome::Done(r) => {
                    if stage == Stage::Teacher {
                        teacher_done = Some(r.clone());
                    }
                    report.add(&r);
                }
                Outcome::Stopped => break 'modes,
            }
        }
    }
    engine::write_json(&out.join("report.json"), &report)?;
    crate::atomic::write_bytes(&out.join("report.md"), report.markdown().as_bytes())?;
    Ok(report)
}
