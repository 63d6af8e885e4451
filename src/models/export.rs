//! ONNX export of a backbone: its pyramid (`stages.{i}`, NCHW, timm `forward_intermediates`
//! order), pooled features (`pre_logits`) and, with a classifier, `logits`, for any batch size;
//! preprocessing (input size, mean, std, rescale) in the file's metadata.

use super::backbone::Backbone;
use crate::error::Result;
use crate::onnx::Graph;
use std::path::Path;

/// Name of the exported graph's input.
pub const INPUT: &str = "pixel_values";

/// Write `net` (eval mode) as an ONNX model for `[batch, 3, h, w]` normalised pixels; `name`
/// goes into the metadata (`model`).
pub fn export_onnx(net: &dyn Backbone, hw: (usize, usize), name: &str, path: &Path) -> Result<()> {
    let mut g = Graph::new(INPUT, 3, hw);
    let x = g.input();
    let levels = net.onnx_intermediates(&mut g, &x)?;
    for (i, v) in levels.iter().enumerate() {
        g.output(&format!("stages.{i}"), v, 4);
    }
    let last = levels
        .last()
        .ok_or_else(|| crate::error::Error::Invalid("backbone without levels".into()))?;
    let pooled = net.onnx_pool(&mut g, last)?;
    g.output("pre_logits", &pooled, 2);
    let head = net.head();
    if let Some(fc) = &head.fc {
        let logits = g.linear(&pooled, &fc.weight, fc.bias.as_ref())?;
        g.output("logits", &logits, 2);
    }
    let p = &head.preprocess;
    let list = |v: &[f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
    let meta = vec![
        ("model".to_string(), name.to_string()),
        ("input".to_string(), INPUT.to_string()),
        ("input_size".to_string(), format!("{},{}", hw.0, hw.1)),
        ("mean".to_string(), list(&p.mean)),
        ("std".to_string(), list(&p.std)),
        ("rescale".to_string(), p.rescale.to_string()),
        (
            "layout".to_string(),
            "NCHW float32, RGB scaled by rescale then (x - mean) / std".to_string(),
        ),
    ];
    g.save(path, &format!("{name} exported by distillery"), &meta)
}
