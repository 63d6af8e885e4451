//! Feature extraction: input loading (`pixel_values` safetensors or image files), running an
//! encoder, and writing hidden states with the reference layout, atomically.

use crate::error::{Error, Result};
use crate::models::{EncoderOutput, ModelInfo};
use crate::preprocess::read_image;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Read tensor `pixel_values` `[B, 3, H, W]` from a safetensors file.
pub fn read_pixels(path: &Path, device: &Device) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let view = st.tensor("pixel_values").map_err(|_| Error::BadInput {
        path: path.to_path_buf(),
        msg: format!(
            "no tensor named pixel_values (found: {})",
            st.names()
                .into_iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != 4 || shape[1] != 3 {
        return Err(Error::BadInput {
            path: path.to_path_buf(),
            msg: format!("pixel_values must be [B, 3, H, W], got shape {shape:?}"),
        });
    }
    let t = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::BadInput {
            path: path.to_path_buf(),
            msg: format!("pixel_values: {}", crate::weights::clean_candle_msg(&e)),
        })?
        .remove("pixel_values")
        .ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            msg: "no tensor named pixel_values".into(),
        })?;
    if !t.dtype().is_float() {
        return Err(Error::BadInput {
            path: path.to_path_buf(),
            msg: format!("pixel_values must be floating point, got {:?}", t.dtype()),
        });
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Preprocess image files into one batch (all must give the same size after preprocessing).
pub fn read_images(
    paths: &[PathBuf],
    pre: &crate::preprocess::PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    let mut items = Vec::with_capacity(paths.len());
    for p in paths {
        let img = read_image(p)?;
        items.push(pre.apply(&img, device)?);
    }
    let first = items.first().map(|t| t.dims().to_vec()).unwrap_or_default();
    for (p, t) in paths.iter().zip(&items) {
        if t.dims() != first.as_slice() {
            return Err(Error::BadInput {
                path: p.clone(),
                msg: format!(
                    "preprocesses to {:?} but the first image gives {first:?}; batch images of one size",
                    t.dims()
                ),
            });
        }
    }
    Ok(Tensor::stack(&items, 0)?)
}

/// Names and tensors to write for an encoder output (`hidden_states.{i}`, `last_hidden_state`).
pub fn output_tensors(out: &EncoderOutput) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    for (i, t) in &out.hidden_states {
        m.insert(format!("hidden_states.{i}"), t.contiguous()?);
    }
    if let Some(t) = &out.last_hidden_state {
        m.insert("last_hidden_state".to_string(), t.contiguous()?);
    }
    Ok(m)
}

/// One-line description of a loaded model for an input size.
pub fn describe(info: &ModelInfo, input_hw: (usize, usize)) -> String {
    let (gh, gw) = info.grid(input_hw);
    format!(
        "{} depth={} width={} heads={} patch={} native={}x{} input={}x{} grid={}x{} prefix_tokens={}",
        info.family,
        info.depth,
        info.width,
        info.num_heads,
        info.patch,
        info.input_hw.0,
        info.input_hw.1,
        input_hw.0,
        input_hw.1,
        gh,
        gw,
        info.prefix_tokens
    )
}

/// Output tensors of an exported SAK student: per teacher and level its features for that
/// teacher `teacher.{t}.level.{k}`: the LayerNorm-ed adapter features `[B, D, h, w]`, or, for a
/// student trained on normalised targets, `[B, C_teacher, h, w]` at the teacher's scale; and the raw stem tokens at each level
/// `stem.level.{k}` `[B, N, D]`.
pub fn student_tensors(
    student: &crate::models::student::Student,
    pixels: &Tensor,
) -> Result<HashMap<String, Tensor>> {
    let out = student.forward(pixels, false, false)?;
    let mut m = HashMap::new();
    for (k, t) in out.stem.iter().enumerate() {
        m.insert(format!("stem.level.{k}"), t.contiguous()?);
    }
    for (t, levels) in out.teacher.iter().enumerate() {
        for (k, f) in levels.iter().enumerate() {
            m.insert(format!("teacher.{t}.level.{k}"), f.contiguous()?);
        }
    }
    Ok(m)
}

/// The input of an exported SAK student: a `pixel_values` file as is, or image files resized to
/// the student's training size and normalised with its mean/std.
pub fn student_pixels(
    spec: &crate::models::student::StudentSpec,
    images: &[PathBuf],
    pixels: Option<&Path>,
    device: &Device,
) -> Result<Tensor> {
    if let Some(p) = pixels {
        return read_pixels(p, device);
    }
    if images.is_empty() {
        return Err(Error::Invalid(
            "give --image or --pixels for a student".into(),
        ));
    }
    let pre = crate::preprocess::PreprocessConfig::exact(
        (spec.image_size, spec.image_size),
        crate::preprocess::Resample::Bicubic,
        spec.mean,
        spec.std,
    );
    read_images(images, &pre, device)
}

/// Output tensors of a backbone, named as timm returns them: `stages.{i}` for every map of
/// `forward_intermediates` (NCHW, same order), `pre_logits` (pooled features) and, when it has
/// a classifier, `logits`. Eval mode.
pub fn backbone_tensors(
    net: &dyn crate::models::backbone::Backbone,
    pixels: &Tensor,
) -> Result<HashMap<String, Tensor>> {
    let maps = net.forward_intermediates(pixels, false)?;
    let mut m = HashMap::new();
    let last = maps
        .last()
        .cloned()
        .ok_or_else(|| Error::Invalid("backbone without levels".into()))?;
    for (i, t) in maps.into_iter().enumerate() {
        m.insert(format!("stages.{i}"), t.contiguous()?);
    }
    let pooled = net.pool(&last, false)?;
    if let Some(l) = net.classify(&pooled)? {
        m.insert("logits".into(), l.contiguous()?);
    }
    m.insert("pre_logits".into(), pooled.contiguous()?);
    Ok(m)
}
