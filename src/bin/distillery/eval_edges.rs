//! `distillery eval-edges`: the BSDS boundary benchmark (ODS, OIS, AP).

use anyhow::{bail, Result};
use distillery::metrics::boundary::{evaluate_dirs, BoundaryOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Folder of predicted edge-probability PNGs (0-255 = probability 0-1)
    #[arg(long)]
    pred: PathBuf,
    /// Folder of ground truth with the same file stems: BSDS .mat (groundTruth), PASCAL-Context
    /// .mat (LabelMap) or PNG (non-zero = boundary)
    #[arg(long)]
    gt: PathBuf,
    /// Matching tolerance as a fraction of the image diagonal (PASCAL/BSDS 0.0075, NYUD 0.011)
    #[arg(long, default_value_t = 0.0075)]
    max_dist: f64,
    /// Number of thresholds, evenly spaced in (0, 1)
    #[arg(long, default_value_t = 99)]
    thresholds: usize,
    /// Non-maximum suppression of the predictions first (as the SAK/ATRC evaluation does)
    #[arg(long)]
    nms: bool,
    /// Do not thin the binarised predictions
    #[arg(long)]
    no_thin: bool,
    /// Print one JSON object (ods_f, ois_f, ap, ...) instead of text
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.thresholds == 0 {
        bail!("--thresholds must be at least 1");
    }
    if !(a.max_dist > 0.0 && a.max_dist < 1.0) {
        bail!("--max-dist must be in (0, 1), got {}", a.max_dist);
    }
    let opts = BoundaryOptions {
        max_dist: a.max_dist,
        thresholds: a.thresholds,
        thin: !a.no_thin,
        nms: a.nms,
    };
    let t0 = std::time::Instant::now();
    let (r, n) = evaluate_dirs(&a.pred, &a.gt, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let ips = n as f64 / secs;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["images"] = n.into();
        v["seconds"] = secs.into();
        v["images_per_s"] = ips.into();
        println!("{v}");
    } else {
        println!(
            "ods_f {:.6}  (threshold {:.4}, recall {:.6}, precision {:.6})",
            r.ods_f, r.ods_threshold, r.ods_r, r.ods_p
        );
        println!(
            "ois_f {:.6}  (recall {:.6}, precision {:.6})",
            r.ois_f, r.ois_r, r.ois_p
        );
        println!("ap    {:.6}", r.ap);
        eprintln!("{n} images in {secs:.2} s ({ips:.1} images/s)");
    }
    Ok(())
}
