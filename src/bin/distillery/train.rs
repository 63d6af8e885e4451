//! `distillery train`: SAK stage 2 from a TOML recipe.

use crate::common::{report_run, ComputeArgs};
use anyhow::Result;
use distillery::train::stage2::{self, TrainConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with any TrainConfig field (out, dataset, data_root, init, tasks, ...)
    #[arg(long)]
    config: PathBuf,
    /// Run folder (overrides `out` in the config)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total steps (overrides the config; with --resume a larger value extends the run)
    #[arg(long)]
    steps: Option<u64>,
    /// Continue from the run folder's last checkpoint
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps in this invocation (with a checkpoint)
    #[arg(long)]
    stop_after: Option<u64>,
    /// Where the model trains (and online teachers run)
    #[command(flatten)]
    compute: ComputeArgs,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(o) = a.out {
        cfg.out = o;
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
    }
    let s = stage2::run(
        &cfg,
        &a.compute.run_options(a.resume, a.stop_after, a.quiet)?,
    )?;
    report_run(&s);
    if let Some(e) = s.eval {
        println!("{e}");
    }
    Ok(())
}
