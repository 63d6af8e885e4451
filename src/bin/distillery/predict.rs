//! `distillery predict`: a trained model's predictions for a folder of images — a stage-2 run
//! (dense maps per task), or a transfer stage folder (top-k classes).

use crate::common::ComputeArgs;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Stage-2 run folder, or a transfer stage folder (`RUN/teacher`, `RUN/<mode>/finetune`)
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    images: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Classes listed per image (transfer classifiers)
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let n = if distillery::transfer::predict::is_transfer_model(&a.run) {
        distillery::transfer::predict::predict_folder(
            &a.run,
            &a.images,
            &a.out,
            a.top_k,
            &a.compute.load_options()?,
        )?
        .len()
    } else {
        let (model, info, _) = distillery::train::stage2::load_run(&a.run)?;
        distillery::predict::predict_folder(&model, info.input_hw, &a.images, &a.out)?
    };
    eprintln!(
        "{n} images in {:.1} s; open {}",
        t0.elapsed().as_secs_f64(),
        a.out.join("index.html").display()
    );
    Ok(())
}
