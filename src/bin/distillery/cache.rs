//! `distillery cache`: run teachers once and store their distilled levels.

use crate::common::StoreComputeArgs;
use anyhow::{bail, Result};
use distillery::train::{cache, stage2};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Teacher folder or hub id (repeat); order is kept
    #[arg(long = "teacher", required_unless_present_any = ["config", "transfer"])]
    teachers: Vec<String>,
    /// Images: folder tree, .tar archive or shard pattern
    #[arg(long, required_unless_present_any = ["config", "transfer"])]
    images: Option<PathBuf>,
    /// Transfer run folder (`distillery transfer --out`) whose teacher stage has finished:
    /// cache its fine-tuned teacher's logits on the run's crop variants of its transfer set
    /// (RUN/teacher-logits; the run's recipe says which)
    #[arg(long, conflicts_with_all = ["teachers", "images", "config", "out"])]
    transfer: Option<PathBuf>,
    /// Stage-2 recipe (`distillery train --config`): cache its teachers on K augmented
    /// variants of its training split
    #[arg(long, conflicts_with_all = ["teachers", "images"])]
    config: Option<PathBuf>,
    /// Cache folder to create
    #[arg(long, required_unless_present = "transfer")]
    out: Option<PathBuf>,
    /// Student input size the cache is for (teachers other than SAM use it)
    #[arg(long, default_value_t = 384)]
    image_size: usize,
    /// Fixed crop/flip variants per image (training epoch e uses variant e mod K)
    #[arg(long, default_value_t = 1)]
    variants: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage type of the cached features
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    dtype: String,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Where the teachers run
    #[command(flatten)]
    compute: StoreComputeArgs,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let load = a.compute.load_options()?;
    let bo = cache::BuildOptions {
        image_size: a.image_size,
        variants: a.variants,
        seed: a.seed,
        dtype: a.dtype,
        batch_size: a.batch_size,
        progress: !a.quiet,
    };
    let t0 = std::time::Instant::now();
    if let Some(run) = &a.transfer {
        let s = distillery::transfer::build_teacher_cache(run, &load, !a.quiet)?;
        eprintln!(
            "teacher logits of {} images x {} variants ({} teacher passes) in {:.1} s into {}",
            s.images,
            s.variants,
            s.teacher_forward_passes,
            t0.elapsed().as_secs_f64(),
            run.join("teacher-logits").display()
        );
        return Ok(());
    }
    let Some(out) = a.out else {
        bail!("give the cache folder: --out DIR");
    };
    let m = match (a.config, a.images) {
        (Some(c), _) => {
            stage2::build_cache(&stage2::TrainConfig::from_file(&c)?, &out, &bo, &load)?
        }
        (None, Some(images)) => cache::build_for(&a.teachers, &images, &out, &bo, &load)?,
        (None, None) => bail!("give --images (stage 1), --config (stage 2) or --transfer RUN"),
    };
    let items = m.n_images as u64 * m.variants;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "cached {} teachers x {items} items in {secs:.1} s ({:.1} items/s) into {}",
        m.teachers.len(),
        items as f64 / secs,
        out.display()
    );
    Ok(())
}
