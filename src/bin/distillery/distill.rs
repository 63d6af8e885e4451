//! `distillery distill`: SAK stage 1.

use crate::common::{report_run, RunArgs};
use anyhow::Result;
use distillery::train::stage1;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Teacher folder or hub id (repeat for several teachers)
    #[arg(long = "teacher")]
    teachers: Vec<String>,
    /// Student preset (vit-s16, vit-b16, vit-l16) or a ViT folder / hub id to start from
    #[arg(long)]
    student: Option<String>,
    /// Folder tree of unlabeled images (jpg, png, webp)
    #[arg(long)]
    images: Option<PathBuf>,
    /// Run folder (checkpoint, metrics.jsonl, exported student); or `out` in --config
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total training steps (default: epochs x steps per epoch)
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Student input size (teachers other than SAM get the same)
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Max global gradient norm (0 = off)
    #[arg(long)]
    clip_grad: Option<f64>,
    #[arg(long, value_enum)]
    loss: Option<distillery::losses::FeatureLoss>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop unreadable images from being skipped: fail instead
    #[arg(long)]
    strict_images: bool,
    /// Teacher-feature cache folder (`distillery cache`): teachers are not run
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Reuse K fixed crop variants per image (epoch e uses variant e mod K); a cache sets it
    #[arg(long)]
    crop_variants: Option<u64>,
    /// Normalise the teachers' features before the loss: none (the SAK reference),
    /// standardize (per channel) or whiten (ZCA); the exported student maps back to the
    /// teacher's scale
    #[arg(long, value_enum)]
    target_norm: Option<distillery::target_norm::TargetNorm>,
    /// Images (epoch-0 crops) the target statistics are estimated on
    #[arg(long)]
    target_norm_images: Option<usize>,
    /// Held-out images evaluated during training (raw/centred cosine per teacher and level,
    /// held-out loss in metrics.jsonl and loss.png)
    #[arg(long)]
    eval_images: Option<PathBuf>,
    /// Steps between held-out evaluations (default: only at the end)
    #[arg(long)]
    eval_every: Option<u64>,
    /// TOML file with any DistillConfig field; flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(a: Args) -> Result<()> {
    let (mut cfg, out) = stage1::recipe(
        a.config.as_deref(),
        a.out.as_deref(),
        a.run.resume && a.teachers.is_empty(),
    )?;
    if !a.teachers.is_empty() {
        cfg.teachers = a.teachers;
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        student,
        images,
        steps,
        epochs,
        batch_size,
        image_size,
        lr,
        weight_decay,
        clip_grad,
        loss,
        seed,
        checkpoint_every,
        crop_variants,
        target_norm,
        target_norm_images,
        eval_every
    );
    if a.eval_images.is_some() {
        cfg.eval_images = a.eval_images;
    }
    if a.cache.is_some() {
        cfg.cache = a.cache;
    }
    if a.strict_images {
        cfg.strict_images = true;
    }
    let opts = a.run.options()?;
    let s = stage1::run(&cfg, &out, &opts)?;
    report_run(&s);
    if s.finished() {
        eprintln!(
            "student exported to {}",
            out.join(stage1::STUDENT_WEIGHTS).display()
        );
    }
    Ok(())
}
