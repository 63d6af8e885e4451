//! `distillery train`: SAK stage 2 from a TOML recipe.

use crate::common::{report_run, RunArgs};
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
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(o) = a.out {
        cfg.out = o;
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
    }
    let s = stage2::run(&cfg, &a.run.options()?)?;
    report_run(&s);
    if let Some(e) = s.eval {
        println!("{e}");
    }
    Ok(())
}
