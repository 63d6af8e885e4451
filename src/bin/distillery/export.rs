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
    /// A transfer student stage folder (`RUN/<mode>/finetune`), a timm folder or hub id of
    /// the student zoo, or a registered name (random init)
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Output file
    #[arg(long)]
    out: PathBuf,
    /// Input height,width (default: the model's training size or preprocessing crop)
    #[arg(long, value_parser = parse_hw)]
    size: Option<(usize, usize)>,
    /// Take uint8 RGB images [batch, H, W, 3] and normalise inside the graph
    #[arg(long)]
    include_preprocessing: bool,
}

pub fn run(a: Args) -> Result<()> {
    let Some(m) = &a.model.model else {
        bail!(
            "give --model (a transfer stage folder, a timm folder or hub id, or a registered name)"
        );
    };
    let Format::Onnx = a.format;
    let done = distillery::export::export(&distillery::export::ExportConfig {
        model: m.clone(),
        out: a.out.clone(),
        size: a.size,
        include_preprocessing: a.include_preprocessing,
        load: a.model.compute.load_options()?,
    })?;
    eprintln!(
        "wrote {} ({:.1} MB): {}; input {} at {}x{}, dynamic batch",
        done.path.display(),
        done.bytes as f64 / 1e6,
        done.description,
        done.input,
        done.hw.0,
        done.hw.1,
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
