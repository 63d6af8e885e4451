//! `distillery predict`: a stage-2 run's predictions for a folder of images.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Stage-2 run folder
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    images: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let (model, info, _) = distillery::train::stage2::load_run(&a.run)?;
    let t0 = std::time::Instant::now();
    let n = distillery::predict::predict_folder(&model, info.input_hw, &a.images, &a.out)?;
    eprintln!(
        "{n} images in {:.1} s; open {}",
        t0.elapsed().as_secs_f64(),
        a.out.join("index.html").display()
    );
    Ok(())
}
