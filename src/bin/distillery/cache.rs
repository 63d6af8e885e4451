//! `distillery cache`: run teachers once and store their distilled levels.

use anyhow::{bail, Result};
use distillery::device::{DeviceSpec, Precision};
use distillery::models::LoadOptions;
use distillery::train::{cache, stage2};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Teacher folder or hub id (repeat); order is kept
    #[arg(long = "teacher", required_unless_present = "config")]
    teachers: Vec<String>,
    /// Images: folder tree, .tar archive or shard pattern
    #[arg(long, required_unless_present = "config")]
    images: Option<PathBuf>,
    /// Stage-2 recipe (`distillery train --config`): cache its teachers on K augmented
    /// variants of its training split
    #[arg(long, conflicts_with_all = ["teachers", "images"])]
    config: Option<PathBuf>,
    /// Cache folder to create
    #[arg(long)]
    out: PathBuf,
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
    /// Dtype the teachers compute in: f32, bf16 or f16
    #[arg(long, default_value = "f32")]
    compute_dtype: Precision,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Device the teachers run on: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let load = LoadOptions {
        dtype: a.compute_dtype.dtype(),
        device: a.device.open()?,
    };
    let bo = cache::BuildOptions {
        image_size: a.image_size,
        variants: a.variants,
        seed: a.seed,
        dtype: a.dtype,
        batch_size: a.batch_size,
        progress: !a.quiet,
    };
    let t0 = std::time::Instant::now();
    let m = match (a.config, a.images) {
        (Some(c), _) => {
            stage2::build_cache(&stage2::TrainConfig::from_file(&c)?, &a.out, &bo, &load)?
        }
        (None, Some(images)) => cache::build_for(&a.teachers, &images, &a.out, &bo, &load)?,
        (None, None) => bail!("give --images (stage 1) or --config (stage 2)"),
    };
    let items = m.n_images as u64 * m.variants;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "cached {} teachers x {items} items in {secs:.1} s ({:.1} items/s) into {}",
        m.teachers.len(),
        items as f64 / secs,
        a.out.display()
    );
    Ok(())
}
