//! A user's ONNX model as a frozen encoder (teacher): `model.onnx:output` names the file and the
//! output to use (the only output when the name is left out). It runs with tract on the CPU.
//!
//! The output becomes the encoder's one hidden state (index 1, "block 0") and its final output:
//! a feature map `[B, C, h, w]`, tokens `[B, N, C]` (the patch grid is the input's grid at the
//! stride that fits, the remaining leading tokens are prefix tokens) or a vector `[B, C]` (a
//! 1x1 map). Preprocessing: the file's `metadata_props` (`mean`, `std`, `rescale`,
//! `input_size`, as `distillery export` writes them), else a transformers
//! `preprocessor_config.json` beside the file, else ImageNet statistics at 224 (with a
//! warning). Models that take uint8 images (preprocessing inside) get the pixels
//! de-normalised; models exported with a fixed batch of 1 are run one image at a time.

use super::{EncoderOutput, Family, FeatureRequest, ModelInfo, VisionEncoder};
use crate::config::Cfg;
use crate::error::{Error, Result};
use crate::onnx::OnnxModel;
use crate::preprocess::{PreprocessConfig, Resample, IMAGENET_MEAN, IMAGENET_STD};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// `PATH.onnx` or `PATH.onnx:OUTPUT` split into the file and the output name.
pub fn parse_spec(spec: &str) -> Option<(&str, Option<&str>)> {
    let is_onnx = |p: &str| p.to_ascii_lowercase().ends_with(".onnx");
    if is_onnx(spec) {
        return Some((spec, None));
    }
    match spec.rsplit_once(':') {
        Some((file, out)) if is_onnx(file) && !out.is_empty() => Some((file, Some(out))),
        _ => None,
    }
}

/// How the chosen output is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Map,
    Tokens { prefix: usize },
    Vector,
}

/// An ONNX model's output as a frozen encoder.
pub struct OnnxEncoder {
    model: OnnxModel,
    output: String,
    info: ModelInfo,
    layout: Layout,
    /// the model takes one image at a time
    single: bool,
}

/// A metadata value of `n` comma-separated numbers.
fn metadata_list<T: std::str::FromStr>(
    path: &Path,
    key: &str,
    v: &str,
    n: usize,
) -> Result<Vec<T>> {
    let parts: Option<Vec<T>> = v.split(',').map(|p| p.trim().parse::<T>().ok()).collect();
    parts
        .filter(|p| p.len() == n)
        .ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            msg: format!("metadata {key}={v:?} is not {n} comma-separated numbers"),
        })
}

fn triple(path: &Path, key: &str, v: &str) -> Result<[f32; 3]> {
    let p = metadata_list::<f32>(path, key, v, 3)?;
    Ok([p[0], p[1], p[2]])
}

/// The preprocessing of an ONNX model (see the module doc) at `declared` (h, w) when the
/// input's size is fixed.
fn preprocessing(model: &OnnxModel, declared: Option<(usize, usize)>) -> Result<PreprocessConfig> {
    let path = model.path();
    if let (Some(m), Some(s)) = (model.metadata("mean"), model.metadata("std")) {
        let hw = match model.metadata("input_size") {
            Some(v) => match metadata_list::<usize>(path, "input_size", v, 2)?.as_slice() {
                &[h, w] if h > 0 && w > 0 => (h, w),
                _ => {
                    return Err(Error::BadInput {
                        path: path.to_path_buf(),
                        msg: format!("metadata input_size={v:?} is not a positive H,W"),
                    })
                }
            },
            None => declared.unwrap_or((224, 224)),
        };
        let mut p = PreprocessConfig::exact(
            hw,
            Resample::Bicubic,
            triple(path, "mean", m)?,
            triple(path, "std", s)?,
        );
        if let Some(r) = model.metadata("rescale") {
            p.rescale = r.trim().parse().map_err(|_| Error::BadInput {
                path: path.to_path_buf(),
                msg: format!("metadata rescale={r:?} is not a number"),
            })?;
        }
        return Ok(p);
    }
    let hw = declared.unwrap_or((224, 224));
    let base = PreprocessConfig::exact(hw, Resample::Bicubic, IMAGENET_MEAN, IMAGENET_STD);
    let beside = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("preprocessor_config.json");
    if beside.is_file() {
        let mut p = base.with_hf(&Cfg::read(&beside)?)?;
        if let Some(fixed) = declared {
            p.resize = crate::preprocess::Resize::Exact(fixed.0, fixed.1);
            p.crop = None;
        }
        return Ok(p);
    }
    tracing::warn!(
        "{}: no preprocessing in its metadata and no preprocessor_config.json beside it; assuming ImageNet mean/std at {}x{}",
        path.display(),
        hw.0,
        hw.1
    );
    Ok(base)
}

impl OnnxEncoder {
    /// Open `spec` (`PATH.onnx[:OUTPUT]`).
    pub fn open(spec: &str) -> Result<Self> {
        let (file, output) = parse_spec(spec).ok_or_else(|| {
            Error::Invalid(format!("{spec}: not an ONNX model (PATH.onnx[:OUTPUT])"))
        })?;
        let path = Path::new(file);
        if !path.is_file() {
            return Err(Error::BadInput {
                path: path.to_path_buf(),
                msg: "no such ONNX file".into(),
            });
        }
        // parsed once; the output chosen afterwards
        let all = OnnxModel::open(path, &[])?;
        let output = match output {
            Some(o) => o.to_string(),
            None => match all.outputs() {
                [one] => one.clone(),
                many => {
                    return Err(Error::BadInput {
                        path: path.to_path_buf(),
                        msg: format!(
                            "the model has several outputs ({}); name one: {file}:OUTPUT",
                            many.join(", ")
                        ),
                    })
                }
            },
        };
        let model = all.select(&[output.as_str()])?;
        let dims = model.input_dims().to_vec();
        if dims.len() != 4 {
            return Err(Error::BadInput {
                path: path.to_path_buf(),
                msg: format!(
                    "its input has {} dimensions; an image batch has 4",
                    dims.len()
                ),
            });
        }
        let declared = model.input_hw();
        let preprocess = preprocessing(&model, declared)?;
        let hw = declared.unwrap_or_else(|| preprocess.output_size((256, 256)));
        let single = dims[0] == Some(1);
        let mut enc = Self {
            model,
            output,
            info: ModelInfo {
                family: Family::Onnx,
                depth: 1,
                width: 0,
                num_heads: 0,
                patch: 1,
                input_hw: hw,
                prefix_tokens: 0,
                out_channels: 0,
                default_levels: vec![0],
                preprocess,
            },
            layout: Layout::Map,
            single,
        };
        // one blank image tells the output's width, layout and stride
        let probe = enc.raw(&Tensor::zeros(
            (1, 3, hw.0, hw.1),
            DType::F32,
            &Device::Cpu,
        )?)?;
        let (layout, width, grid) = enc.layout_of(&probe, hw)?;
        enc.layout = layout;
        enc.info.width = width;
        enc.info.out_channels = width;
        enc.info.patch = (hw.0 / grid.0.max(1)).max(1);
        enc.info.prefix_tokens = match layout {
            Layout::Tokens { prefix } => prefix,
            _ => 0,
        };
        Ok(enc)
    }

    /// The output's layout, width and grid for an input of `hw`.
    fn layout_of(&self, t: &Tensor, hw: (usize, usize)) -> Result<(Layout, usize, (usize, usize))> {
        let bad = |msg: String| Error::BadInput {
            path: self.model.path().to_path_buf(),
            msg,
        };
        match t.dims() {
            &[_, c, h, w] => Ok((Layout::Map, c, (h, w))),
            &[_, n, c] => {
                // the grid of some stride that leaves at most 16 leading tokens
                (1..=hw.0.min(hw.1))
                    .filter(|s| hw.0.is_multiple_of(*s) && hw.1.is_multiple_of(*s))
                    .map(|s| (hw.0 / s, hw.1 / s))
                    .find(|&(gh, gw)| gh * gw <= n && n - gh * gw <= 16)
                    .map(|g| {
                        (
                            Layout::Tokens {
                                prefix: n - g.0 * g.1,
                            },
                            c,
                            g,
                        )
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "output {:?} has {n} tokens, which is no patch grid of a {}x{} input",
                            self.output, hw.0, hw.1
                        ))
                    })
            }
            &[_, c] => Ok((Layout::Vector, c, (1, 1))),
            d => Err(bad(format!(
                "output {:?} has shape {d:?}; a feature map, tokens or a vector is needed",
                self.output
            ))),
        }
    }

    /// The output for normalised pixels `[B, 3, H, W]`, as the model gives it (f32, CPU).
    fn raw(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let x = if self.model.u8_input() {
            let p = &self.info.preprocess;
            let per = |v: [f32; 3]| Tensor::new(&v, &Device::Cpu)?.reshape((1, 3, 1, 1));
            let rgb = x
                .broadcast_mul(&per(p.std)?)?
                .broadcast_add(&per(p.mean)?)?
                .affine(1.0 / p.rescale as f64, 0.0)?
                .round()?
                .clamp(0f32, 255f32)?;
            rgb.permute((0, 2, 3, 1))?.contiguous()?
        } else {
            x
        };
        let run = |x: &Tensor| -> Result<Tensor> {
            self.model.run(x)?.pop().ok_or_else(|| Error::BadInput {
                path: self.model.path().to_path_buf(),
                msg: "the model gave no output".into(),
            })
        };
        if self.single && x.dim(0)? > 1 {
            let parts = (0..x.dim(0)?)
                .map(|i| run(&x.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        } else {
            run(&x)
        }
    }

    /// The output's rank: 4 (feature map), 3 (tokens) or 2 (vector).
    pub fn output_rank(&self) -> usize {
        match self.layout {
            Layout::Map => 4,
            Layout::Tokens { .. } => 3,
            Layout::Vector => 2,
        }
    }

    /// The chosen output's name.
    pub fn output_name(&self) -> &str {
        &self.output
    }

    /// The output as the model gives it, for normalised pixels.
    pub fn forward_raw(&self, pixels: &Tensor) -> Result<Tensor> {
        self.raw(pixels)
    }
}

impl VisionEncoder for OnnxEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_features(&self, pixels: &Tensor, req: &FeatureRequest) -> Result<EncoderOutput> {
        if let Some(&bad) = req.hidden_states.iter().find(|&&i| i != 1) {
            return Err(Error::Invalid(format!(
                "{}: an ONNX teacher has one output ({}) as hidden state 1; hidden state {bad} does not exist",
                self.model.path().display(),
                self.output
            )));
        }
        let (_, _, h, w) = pixels.dims4()?;
        let out = self.raw(pixels)?;
        let (layout, _, grid) = self.layout_of(&out, (h, w))?;
        // the reference layouts: tokens [B, N, C]; maps channels-last as SAM's hidden states
        let (hidden, last) = match layout {
            Layout::Map => (out.permute((0, 2, 3, 1))?.contiguous()?, out.clone()),
            Layout::Tokens { .. } => (out.clone(), out.clone()),
            Layout::Vector => {
                let t = out.unsqueeze(1)?;
                (t.clone(), t)
            }
        };
        let prefix = match layout {
            Layout::Tokens { prefix } => prefix,
            _ => 0,
        };
        let dtype = pixels.dtype();
        let dev = pixels.device();
        let back = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?.to_dtype(dtype)?) };
        let mut hidden_states = BTreeMap::new();
        if !req.hidden_states.is_empty() {
            hidden_states.insert(1, back(hidden)?);
        }
        Ok(EncoderOutput {
            hidden_states,
            last_hidden_state: if req.last { Some(back(last)?) } else { None },
            grid,
            prefix_tokens: prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_the_file_and_the_output() {
        assert_eq!(parse_spec("m.onnx"), Some(("m.onnx", None)));
        assert_eq!(
            parse_spec("d/M.ONNX:feat"),
            Some(("d/M.ONNX", Some("feat")))
        );
        assert_eq!(
            parse_spec(r"C:\m\t.onnx:last_hidden_state"),
            Some((r"C:\m\t.onnx", Some("last_hidden_state")))
        );
        assert_eq!(parse_spec("m.onnx:"), None);
        assert_eq!(parse_spec("facebook/dinov2-small"), None);
        assert_eq!(parse_spec("a:b"), None);
    }

    #[test]
    fn metadata_lists_are_checked() {
        let p = Path::new("t.onnx");
        assert_eq!(triple(p, "mean", "0.5, 0.25,1").unwrap(), [0.5, 0.25, 1.0]);
        let e = triple(p, "std", "0.5,0.5").unwrap_err().to_string();
        assert!(e.contains("t.onnx") && e.contains("std"), "{e}");
        assert!(metadata_list::<usize>(p, "input_size", "224,x", 2).is_err());
    }
}
