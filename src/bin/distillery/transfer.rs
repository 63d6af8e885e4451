//! `distillery transfer`: task-oriented knowledge transfer and its baselines.

use crate::common::RunArgs;
use anyhow::Result;
use distillery::transfer::{
    self, models::Pool, objectives::FeatureMatch, Mode, Stage, TransferTask,
};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with any TransferConfig field; flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder (teacher/, <mode>/distill/, <mode>/finetune/, report.json, report.md)
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, value_enum)]
    task: Option<TransferTask>,
    /// Foundation model folder or hub id
    #[arg(long)]
    teacher: Option<String>,
    /// Student: registered name (mobilevitv2_100, fastvit_t8, resnet18, vit-s16) or timm folder
    #[arg(long)]
    student: Option<String>,
    /// Labelled training images: ImageFolder tree (root/<class>/*) or `filename,classname` split
    /// file; for segmentation a folder with images/ and annotations/ (ADE20K) or masks/, or a
    /// split file of image names
    #[arg(long)]
    labeled: Option<PathBuf>,
    /// Held-out test images (same forms)
    #[arg(long)]
    test: Option<PathBuf>,
    #[arg(long)]
    val: Option<PathBuf>,
    /// Root of the images split files name (default: the split file's folder)
    #[arg(long)]
    images_root: Option<PathBuf>,
    /// Unlabelled transfer set: folder, tar, shard pattern or list file (one path per line)
    #[arg(long)]
    transfer: Option<PathBuf>,
    /// Pipeline to run (default task-oriented)
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Run several pipelines into one report (comma list)
    #[arg(long, value_enum, value_delimiter = ',')]
    compare: Vec<Mode>,
    /// Run only this stage (its inputs must exist in the run folder)
    #[arg(long, value_enum)]
    stage: Option<Stage>,
    /// Labelled images kept per class (0 = all)
    #[arg(long)]
    labels_per_class: Option<usize>,
    /// Segmentation classes (default: 150 for ADE20K's annotations/ layout)
    #[arg(long)]
    num_classes: Option<usize>,
    /// Mask value of unlabelled pixels (default 255)
    #[arg(long)]
    ignore_index: Option<u32>,
    /// Map mask value 0 to ignore and c to c - 1 (default: on for ADE20K's annotations/)
    #[arg(long)]
    reduce_zero_label: Option<bool>,
    /// Segmentation class names, one per line
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Channels of the student's segmentation decoder (default 128)
    #[arg(long)]
    decoder_width: Option<usize>,
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    teacher_image_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    teacher_epochs: Option<u64>,
    #[arg(long)]
    distill_epochs: Option<u64>,
    #[arg(long)]
    finetune_epochs: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    teacher_lr: Option<f64>,
    #[arg(long)]
    layer_decay: Option<f64>,
    /// Train only the teacher's head (linear probe)
    #[arg(long)]
    freeze_teacher: bool,
    #[arg(long, value_enum)]
    pool: Option<Pool>,
    #[arg(long)]
    distill_lr: Option<f64>,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long, value_enum)]
    feature_loss: Option<FeatureMatch>,
    /// Fixed crop variants per transfer image (epoch e uses variant e mod K; 0 = fresh crops)
    #[arg(long)]
    crop_variants: Option<u64>,
    /// Run the fine-tuned teacher once over the crop variants and distil from its cached
    /// logits (RUN/teacher-logits, f16)
    #[arg(long)]
    cache_teacher: bool,
    #[arg(long)]
    finetune_lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    min_crop_scale: Option<f64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(a: Args) -> Result<()> {
    let (mut cfg, out) = transfer::recipe(a.config.as_deref(), a.out.as_deref(), a.run.resume)?;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        task,
        teacher,
        student,
        labeled,
        test,
        labels_per_class,
        num_classes,
        ignore_index,
        decoder_width,
        image_size,
        teacher_image_size,
        batch_size,
        teacher_epochs,
        distill_epochs,
        finetune_epochs,
        seed,
        teacher_lr,
        layer_decay,
        distill_lr,
        temperature,
        feature_loss,
        crop_variants,
        finetune_lr,
        weight_decay,
        checkpoint_every
    );
    macro_rules! set_opt {
        ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f; } )* };
    }
    set_opt!(
        val,
        images_root,
        transfer,
        pool,
        min_crop_scale,
        reduce_zero_label,
        class_names
    );
    if a.cache_teacher {
        cfg.cache_teacher = true;
    }
    if a.freeze_teacher {
        cfg.freeze_teacher = true;
    }
    if let Some(m) = a.mode {
        cfg.modes = vec![m];
    }
    if !a.compare.is_empty() {
        cfg.modes = a.compare;
    }
    let report = transfer::run(&cfg, &out, &a.run.options()?, a.stage)?;
    print!("{}", report.markdown());
    eprintln!("report: {}", out.join("report.json").display());
    Ok(())
}
