//! ONNX export of a backbone: its pyramid (`stages.{i}`, NCHW, timm `forward_intermediates`
//! order), pooled features (`pre_logits`) and, with a classifier, `logits`, for any batch size;
//! a task head ([`OnnxHead`]) may add outputs of its own. The input is either normalised
//! pixels (`pixel_values`, `[batch, 3, H, W]` f32; the preprocessing is written into the
//! file's metadata) or, with the preprocessing baked in, 8-bit RGB images (`image`,
//! `[batch, H, W, 3]` uint8).

use super::backbone::Backbone;
use crate::error::{Error, Result};
use crate::onnx::Graph;
use candle_core::{DType, Tensor};
use std::path::Path;

/// Name of the exported graph's input (normalised pixels).
pub const INPUT: &str = "pixel_values";
/// Name of the input with the preprocessing baked in (uint8 RGB, NHWC).
pub const IMAGE_INPUT: &str = "image";

/// How to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// input (height, width)
    pub input_hw: (usize, usize),
    /// the model's name (metadata `model`)
    pub name: String,
    /// take uint8 RGB NHWC images and normalise inside the graph
    pub include_preprocessing: bool,
    /// further metadata (task, labels, ...)
    pub metadata: Vec<(String, String)>,
}

impl ExportOptions {
    pub fn new(name: &str, input_hw: (usize, usize)) -> Self {
        Self {
            input_hw,
            name: name.to_string(),
            include_preprocessing: false,
            metadata: Vec::new(),
        }
    }
}

/// A task head on a backbone's exported outputs.
pub trait OnnxHead {
    /// Add the head's nodes reading the pyramid (`levels`, with each level's `(h, w)` in
    /// `sides`) and the pooled features; its outputs as (name, value, rank).
    fn onnx(
        &self,
        g: &mut Graph,
        levels: &[String],
        sides: &[(usize, usize)],
        pooled: &str,
    ) -> Result<Vec<(String, String, usize)>>;
}

/// Write `net` (eval mode) as an ONNX model for `[batch, 3, h, w]` normalised pixels; `name`
/// goes into the metadata (`model`).
pub fn export_onnx(
    net: &dyn Backbone,
    input_hw: (usize, usize),
    name: &str,
    path: &Path,
) -> Result<()> {
    export_onnx_with(net, &ExportOptions::new(name, input_hw), None, path)
}

/// The sides `(h, w)` of the pyramid for an input of `input_hw` (one forward of a blank image).
fn pyramid_sides(net: &dyn Backbone, input_hw: (usize, usize)) -> Result<Vec<(usize, usize)>> {
    let x = Tensor::zeros((1, 3, input_hw.0, input_hw.1), DType::F32, net.device())?;
    net.forward_intermediates(&x, false)?
        .iter()
        .map(|t| Ok((t.dim(2)?, t.dim(3)?)))
        .collect()
}

/// Write `net` (eval mode) with an optional task head as an ONNX model (see the module doc).
pub fn export_onnx_with(
    net: &dyn Backbone,
    opts: &ExportOptions,
    head: Option<&dyn OnnxHead>,
    path: &Path,
) -> Result<()> {
    export_graph(&net.head().preprocess, opts, path, |g, x| {
        let levels = net.onnx_intermediates(g, x)?;
        let mut outputs: Vec<(String, String, usize)> = levels
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("stages.{i}"), v.clone(), 4))
            .collect();
        let last = levels
            .last()
            .ok_or_else(|| Error::Invalid("backbone without levels".into()))?;
        let pooled = net.onnx_pool(g, last)?;
        outputs.push(("pre_logits".into(), pooled.clone(), 2));
        if let Some(fc) = &net.head().fc {
            let logits = g.linear(&pooled, &fc.weight, fc.bias.as_ref())?;
            outputs.push(("logits".into(), logits, 2));
        }
        if let Some(h) = head {
            let sides = pyramid_sides(net, opts.input_hw)?;
            outputs.extend(h.onnx(g, &levels, &sides, &pooled)?);
        }
        Ok(outputs)
    })
}

/// Write an ONNX model whose nodes `body` adds, reading normalised pixels (the value it is
/// given) and returning its outputs (name, value, rank); the input — normalised pixels or
/// uint8 images normalised with `p` inside the graph — and the metadata as `opts` says.
pub fn export_graph(
    p: &crate::preprocess::PreprocessConfig,
    opts: &ExportOptions,
    path: &Path,
    body: impl FnOnce(&mut Graph, &str) -> Result<Vec<(String, String, usize)>>,
) -> Result<()> {
    let hw = opts.input_hw;
    let (mut g, x) = if opts.include_preprocessing {
        let mut g = Graph::new_image_u8(IMAGE_INPUT, hw);
        let x = normalise(&mut g, p)?;
        (g, x)
    } else {
        let g = Graph::new(INPUT, 3, hw);
        let x = g.input();
        (g, x)
    };
    for (name, value, rank) in body(&mut g, &x)? {
        g.output(&name, &value, rank);
    }
    let list = |v: &[f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
    let mut meta = vec![
        ("model".to_string(), opts.name.clone()),
        ("input_size".to_string(), format!("{},{}", hw.0, hw.1)),
        ("mean".to_string(), list(&p.mean)),
        ("std".to_string(), list(&p.std)),
        ("rescale".to_string(), p.rescale.to_string()),
    ];
    if opts.include_preprocessing {
        meta.push(("input".into(), IMAGE_INPUT.into()));
        meta.push((
            "layout".into(),
            "NHWC uint8 RGB resized to input_size; rescale, mean and std are applied inside the graph"
                .into(),
        ));
    } else {
        meta.push(("input".into(), INPUT.into()));
        meta.push((
            "layout".into(),
            "NCHW float32, RGB scaled by rescale then (x - mean) / std".into(),
        ));
    }
    meta.extend(opts.metadata.iter().cloned());
    g.save(
        path,
        &format!("{} exported by distillery", opts.name),
        &meta,
    )
}

/// uint8 NHWC RGB to normalised NCHW f32: `(x * rescale - mean) / std`.
fn normalise(g: &mut Graph, p: &crate::preprocess::PreprocessConfig) -> Result<String> {
    let x = g.input();
    let x = g.cast_f32(&x);
    let x = g.transpose(&x, &[0, 3, 1, 2]);
    let x = g.scale(&x, p.rescale)?;
    let per_channel =
        |v: [f32; 3]| Tensor::new(&v, &candle_core::Device::Cpu)?.reshape((1, 3, 1, 1));
    let mean = g.constant("mean", &per_channel(p.mean)?)?;
    let std = g.constant("std", &per_channel(p.std)?)?;
    let x = g.node("Sub", &[&x, &mean], vec![]);
    Ok(g.node("Div", &[&x, &std], vec![]))
}
