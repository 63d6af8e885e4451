//! `distillery export`: a model as an ONNX file.

use crate::common::ModelArgs;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy)]
enum Format {
    Onnx,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Output file
    #[arg(long)]
    out: PathBuf,
    /// Input height,width (default: the model's preprocessing crop)
    #[arg(long, value_parser = parse_hw)]
    size: Option<(usize, usize)>,
}

pub fn run(a: Args) -> Result<()> {
    let Some(m) = &a.model.model else {
        bail!("give --model (a timm folder or hub id, or a registered name at random init)");
    };
    let Format::Onnx = a.format;
    let opts = a.model.compute.load_options()?;
    let Some((spec, net)) = distillery::models::backbone::open(m, &opts)? else {
        bail!("{m}: ONNX export covers the student zoo's families (timm folders or names); this model is not one of them");
    };
    let hw = a
        .size
        .unwrap_or_else(|| net.preprocess().crop.unwrap_or((224, 224)));
    distillery::models::export::export_onnx(net.as_ref(), hw, &spec.arch_name(), &a.out)?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.1} MB; input pixel_values [batch, 3, {}, {}]; outputs stages.*, pre_logits{})",
        a.out.display(),
        bytes as f64 / 1e6,
        hw.0,
        hw.1,
        if net.head().fc.is_some() { ", logits" } else { "" }
    );
    Ok(())
}

/// `H,W` or `S` (square).
fn parse_hw(s: &str) -> std::result::Result<(usize, usize), String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    match v.as_slice() {
        [n] if *n > 0 => Ok((*n, *n)),
        [h, w] if *h > 0 && *w > 0 => Ok((*h, *w)),
        _ => Err(format!("{s:?}: give H,W or S (positive)")),
    }
}
