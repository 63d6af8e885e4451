//! `distillery eval`: a stage-2 run's metrics on a split.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Stage-2 run folder
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value = "val")]
    split: String,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let r = distillery::train::stage2::evaluate_run(&a.run, &a.split, !a.quiet && !a.json)?;
    let m = &r.metrics;
    if a.json {
        println!("{m}");
        return Ok(());
    }
    for t in &r.tasks {
        let parts: Vec<String> = m[t.name()]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, x)| x.as_f64().map(|f| format!("{k} {f:.4}")))
                    .collect()
            })
            .unwrap_or_default();
        println!("{:9} {}", t.name(), parts.join("  "));
    }
    if let Some(d) = m["delta_m"].as_f64() {
        println!("delta_m   {d:+.2}%");
    }
    eprintln!(
        "{} images in {:.1} s; written to {}",
        r.images,
        r.seconds,
        r.path.display()
    );
    Ok(())
}
