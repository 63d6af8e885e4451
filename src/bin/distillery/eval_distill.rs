//! `distillery eval-distill`: what a distilled student learned, on held-out images.

use anyhow::Result;
use distillery::device::DeviceSpec;
use distillery::train::heldout::{self, EvalDistillConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A `distill` run folder (its latest checkpoint is evaluated)
    run: PathBuf,
    /// Held-out images: folder tree, list file or tar (not the training images)
    #[arg(long)]
    images: PathBuf,
    /// Also evaluate the student at its initialisation (same seed and stem)
    #[arg(long)]
    baseline: bool,
    /// Evaluate at most this many images (the first ones)
    #[arg(long, default_value_t = 256)]
    max_images: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = EvalDistillConfig {
        run: a.run.clone(),
        images: a.images,
        baseline: a.baseline,
        max_images: a.max_images,
        batch_size: a.batch_size,
        device: a.device.open()?,
    };
    let (held, evals) = heldout::eval_distill(&cfg)?;
    eprintln!(
        "{} held-out images ({} unreadable skipped); per token: raw cosine, centred cosine \
         (teacher mean removed), its spread (std); the loss's map cosine",
        held.images, held.skipped
    );
    print!("{}", heldout::table(&evals));
    eprintln!("wrote {}", a.run.join(heldout::EVAL_FILE).display());
    Ok(())
}
