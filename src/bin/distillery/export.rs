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
    /// A transfer student stage folder (`RUN/<mode>/finetune`), a SAK stage-1 or stage-2 run,
    /// a timm folder or hub id of the student zoo, a registered name (random init), or a
    /// user's ONNX model to copy with --mean/--std/--rescale/--size in its metadata
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
    /// With a user's ONNX model as --model: its normalisation mean R,G,B, written into a copy's
    /// metadata (with --std, --rescale and --size) so that it can serve as a teacher
    #[arg(long, value_parser = parse_triple)]
    mean: Option<String>,
    /// With a user's ONNX model: its normalisation std R,G,B
    #[arg(long, value_parser = parse_triple)]
    std: Option<String>,
    /// With a user's ONNX model: the factor pixel values 0..255 are multiplied by (1/255)
    #[arg(long)]
    rescale: Option<f32>,
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
        input_hw: a.size,
        include_preprocessing: a.include_preprocessing,
        preprocessing: [
            ("mean", a.mean.clone()),
            ("std", a.std.clone()),
            ("rescale", a.rescale.map(|r| r.to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect(),
        load: a.model.compute.load_options()?,
    })?;
    eprintln!(
        "wrote {} ({:.1} MB): {}; input {} at {}x{}, dynamic batch",
        done.path.display(),
        done.bytes as f64 / 1e6,
        done.description,
        done.input,
        done.input_hw.0,
        done.input_hw.1,
    );
    Ok(())
}

/// Three comma-separated numbers (`0.485,0.456,0.406`).
fn parse_triple(s: &str) -> std::result::Result<String, String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    if v.len() != 3 || v.iter().any(|x| !x.is_finite()) {
        return Err(format!("{s:?}: give three numbers R,G,B"));
    }
    Ok(v.iter().map(f32::to_string).collect::<Vec<_>>().join(","))
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
