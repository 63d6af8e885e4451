//! The teacher zoo: vision encoders loaded from Hugging Face model folders (or hub ids) with the
//! checkpoint's own weight names, runnable at any input resolution, exposing every block's output.
//!
//! The family is chosen from `config.json` (`model_type`, or timm's `architecture`), never from
//! the folder name.

pub mod backbone;
pub mod clip;
pub mod dinov2;
pub mod encoder;
pub mod export;
pub mod fastvit;
pub mod layers;
pub mod mobilevit;
pub mod multitask;
pub mod onnx_teacher;
pub mod pooled;
pub mod resnet;
pub mod sam;
pub mod siglip;
pub mod student;
pub mod vit;

use crate::config::Cfg;
use crate::error::{Error, Result};
pub use crate::hub::{resolve, ModelFiles};
use crate::preprocess::PreprocessConfig;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::fmt;

/// Supported model families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// transformers `ViTModel`
    Vit,
    /// timm `VisionTransformer` naming (`blocks.N.attn.qkv`, ...)
    TimmVit,
    Dinov2,
    Dinov2WithRegisters,
    /// CLIP vision tower
    Clip,
    /// SigLIP vision tower
    Siglip,
    /// SAM image encoder
    Sam,
    /// a user's ONNX model (one named output), run by tract
    Onnx,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Vit => "vit",
            Family::TimmVit => "timm-vit",
            Family::Dinov2 => "dinov2",
            Family::Dinov2WithRegisters => "dinov2-with-registers",
            Family::Clip => "clip",
            Family::Siglip => "siglip",
            Family::Sam => "sam",
            Family::Onnx => "onnx",
        })
    }
}

/// `model_type` values accepted in `config.json`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "vit",
    "dinov2",
    "dinov2_with_registers",
    "clip",
    "clip_vision_model",
    "siglip",
    "siglip_vision_model",
    "sam",
    "sam_vision_model",
];

/// What a loaded encoder is.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub family: Family,
    /// number of transformer blocks
    pub depth: usize,
    /// token width
    pub width: usize,
    pub num_heads: usize,
    pub patch: usize,
    /// the checkpoint's native input (height, width)
    pub input_hw: (usize, usize),
    /// cls + register tokens in front of the patch tokens (0 for SigLIP and SAM)
    pub prefix_tokens: usize,
    /// channels of `last_hidden_state` (SAM: the neck's output channels)
    pub out_channels: usize,
    /// blocks whose outputs SAK distils (SPEC.md section 1): 4 evenly spaced, 0-based
    pub default_levels: Vec<usize>,
    /// how images are prepared for this checkpoint
    pub preprocess: PreprocessConfig,
}

impl ModelInfo {
    /// Patch grid for an input of `(h, w)` pixels.
    pub fn grid(&self, (h, w): (usize, usize)) -> (usize, usize) {
        (h / self.patch, w / self.patch)
    }
}

/// Four evenly spaced blocks (0-based): L/4-1, L/2-1, 3L/4-1, L-1.
pub fn evenly_spaced_blocks(depth: usize, n: usize) -> Vec<usize> {
    (1..=n).map(|k| (k * depth / n).max(1) - 1).collect()
}

/// Which outputs to compute. Hidden-state index 0 is the embeddings output, index `i` the output
/// of block `i-1`. Blocks after the last requested level are not run unless `last` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureRequest {
    pub hidden_states: Vec<usize>,
    pub last: bool,
}

impl FeatureRequest {
    /// All hidden states (0..=depth) and the final output.
    pub fn all(depth: usize) -> Self {
        Self {
            hidden_states: (0..=depth).collect(),
            last: true,
        }
    }

    /// Only the outputs of the given 0-based blocks (hidden-state index = block + 1).
    pub fn blocks(blocks: &[usize]) -> Self {
        Self {
            hidden_states: blocks.iter().map(|b| b + 1).collect(),
            last: false,
        }
    }

    /// A request as a user writes it: `all`, `sak` (the model's default distillation levels)
    /// or a comma list of hidden-state indices (0 = embeddings, i = block i-1).
    pub fn parse(s: &str, info: &ModelInfo) -> Result<Self> {
        Ok(match s.trim() {
            "all" => Self::all(info.depth),
            "sak" => Self::blocks(&info.default_levels),
            list => {
                let mut idx = Vec::new();
                for p in list.split(',') {
                    let v: usize = p
                        .trim()
                        .parse()
                        .map_err(|_| Error::Invalid(format!("--levels: {p:?} is not an index")))?;
                    if v > info.depth {
                        return Err(Error::Invalid(format!(
                            "--levels: {v} is out of range 0..={}",
                            info.depth
                        )));
                    }
                    idx.push(v);
                }
                Self {
                    hidden_states: idx,
                    last: false,
                }
            }
        })
    }

    /// Only the final output.
    pub fn last_only() -> Self {
        Self {
            hidden_states: Vec::new(),
            last: true,
        }
    }

    /// Number of blocks that must run to satisfy the request.
    pub fn blocks_needed(&self, depth: usize) -> usize {
        if self.last {
            depth
        } else {
            self.hidden_states.iter().copied().max().unwrap_or(0)
        }
    }

    pub fn validate(&self, depth: usize) -> Result<()> {
        if let Some(&bad) = self.hidden_states.iter().find(|&&i| i > depth) {
            return Err(Error::Invalid(format!(
                "hidden state {bad} requested but the model has only {depth} blocks (0..={depth})"
            )));
        }
        Ok(())
    }
}

/// Outputs of an encoder forward pass.
#[derive(Clone, Debug)]
pub struct EncoderOutput {
    /// hidden-state index -> tensor, in the layout of the reference implementation
    /// (`[B, N, C]` tokens, or `[B, H, W, C]` for SAM)
    pub hidden_states: BTreeMap<usize, Tensor>,
    /// the model's final output (`[B, N, C]`, or SAM's neck output `[B, C, H, W]`)
    pub last_hidden_state: Option<Tensor>,
    /// patch grid (h, w)
    pub grid: (usize, usize),
    /// tokens before the patch tokens in token layouts
    pub prefix_tokens: usize,
}

impl EncoderOutput {
    /// The final output (asked for with `FeatureRequest::last`).
    pub fn last(&self) -> Result<&Tensor> {
        self.last_hidden_state
            .as_ref()
            .ok_or_else(|| Error::Invalid("the encoder returned no final output".into()))
    }

    /// A hidden state as a `[B, C, h, w]` feature map of patch tokens (prefix tokens dropped).
    pub fn feature_map(&self, index: usize) -> Result<Tensor> {
        let t = self
            .hidden_states
            .get(&index)
            .ok_or_else(|| Error::Invalid(format!("hidden state {index} was not computed")))?;
        let (gh, gw) = self.grid;
        match t.rank() {
            4 => Ok(t.permute((0, 3, 1, 2))?.contiguous()?),
            3 => {
                let (b, n, c) = t.dims3()?;
                let t = t.narrow(1, self.prefix_tokens, n - self.prefix_tokens)?;
                Ok(crate::kernels::swap_inner(&t)?.reshape((b, c, gh, gw))?)
            }
            r => Err(Error::Invalid(format!("unexpected hidden state rank {r}"))),
        }
    }
}

/// A frozen vision encoder.
pub trait VisionEncoder: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Run the encoder on normalised pixels `[B, 3, H, W]`, computing only what `req` asks for.
    fn forward_features(&self, pixels: &Tensor, req: &FeatureRequest) -> Result<EncoderOutput>;

    /// The plain token encoder behind this model, when it is one (ViT-like families).
    fn token_encoder(&self) -> Option<&encoder::TokenEncoder> {
        None
    }
}

/// Check the pixel tensor before a forward pass.
pub(crate) fn check_pixels(info: &ModelInfo, pixels: &Tensor) -> Result<(usize, usize)> {
    let dims = pixels.dims();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(Error::Invalid(format!(
            "pixel_values must be [B, 3, H, W], got {dims:?}"
        )));
    }
    let (h, w) = (dims[2], dims[3]);
    if h < info.patch || w < info.patch {
        return Err(Error::Invalid(format!(
            "input {h}x{w} is smaller than one {p}x{p} patch",
            p = info.patch
        )));
    }
    Ok((h, w))
}

/// Prefixes under which a vision tower's weights are found in the checkpoints people download
/// (bare tower, full CLIP/SigLIP/SAM model, task model wrappers).
const PREFIXES: &[&str] = &[
    "",
    "vision_model",
    "vision_encoder",
    "model.vision_model",
    "dinov2",
    "vit",
    "model",
];

/// Find the prefix under which `probe` exists.
pub(crate) fn find_prefix(w: &Weights, probe: &str, files: &ModelFiles) -> Result<Weights> {
    for p in PREFIXES {
        let v = w.pp(p);
        if v.contains(probe) {
            return Ok(v);
        }
    }
    Err(Error::MissingTensor {
        path: files.weights_display.clone(),
        name: probe.to_string(),
    })
}

/// Detect the family from a config.json.
pub fn detect_family(cfg: &Cfg) -> Result<Family> {
    if let Some(mt) = cfg.str_opt("model_type")? {
        return Ok(match mt.as_str() {
            "vit" => Family::Vit,
            "dinov2" => Family::Dinov2,
            "dinov2_with_registers" => Family::Dinov2WithRegisters,
            "clip" | "clip_vision_model" => Family::Clip,
            "siglip" | "siglip_vision_model" => Family::Siglip,
            "sam" | "sam_vision_model" => Family::Sam,
            other => {
                return Err(Error::UnsupportedModel {
                    path: cfg.path.clone(),
                    model_type: other.to_string(),
                    supported: format!("{}, timm vit_*", SUPPORTED_MODEL_TYPES.join(", ")),
                })
            }
        });
    }
    if let Some(arch) = cfg.str_opt("architecture")? {
        if arch.starts_with("vit_") {
            return Ok(Family::TimmVit);
        }
        return Err(Error::UnsupportedModel {
            path: cfg.path.clone(),
            model_type: format!("timm architecture {arch}"),
            supported: format!("{}, timm vit_*", SUPPORTED_MODEL_TYPES.join(", ")),
        });
    }
    Err(Error::Config {
        path: cfg.path.clone(),
        msg: "no model_type (transformers) or architecture (timm) key".into(),
    })
}

/// The vision part of a config: full CLIP/SigLIP/SAM configs nest it under `vision_config`.
pub(crate) fn vision_cfg(cfg: &Cfg) -> Cfg {
    cfg.sub("vision_config").unwrap_or_else(|| cfg.clone())
}

/// Load options.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// Load an encoder from resolved files.
pub fn load_from_files(files: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn VisionEncoder>> {
    // Config problems are reported before the (large) weights are touched.
    detect_family(&Cfg::read(&files.config)?)?;
    build(files, &files.open_weights(opts.dtype, &opts.device)?)
}

/// Build an encoder from the config files in `files` and the given weights.
pub fn build(files: &ModelFiles, w: &Weights) -> Result<Box<dyn VisionEncoder>> {
    let cfg = Cfg::read(&files.config)?;
    let family = detect_family(&cfg)?;
    let pre = match &files.preprocessor {
        Some(p) => Some(Cfg::read(p)?),
        None => None,
    };
    let enc: Box<dyn VisionEncoder> = match family {
        Family::Vit => Box::new(vit::load_hf(&cfg, pre.as_ref(), w, files)?),
        Family::TimmVit => Box::new(vit::load_timm(&cfg, pre.as_ref(), w, files)?),
        Family::Dinov2 | Family::Dinov2WithRegisters => {
            Box::new(dinov2::load(&cfg, family, pre.as_ref(), w, files)?)
        }
        Family::Clip => Box::new(clip::load(&cfg, pre.as_ref(), w, files)?),
        Family::Siglip => Box::new(siglip::load(&cfg, pre.as_ref(), w, files)?),
        Family::Sam => Box::new(sam::load(&cfg, pre.as_ref(), w, files)?),
        Family::Onnx => {
            return Err(Error::Invalid(
                "ONNX models are opened from their file (PATH.onnx[:OUTPUT])".into(),
            ))
        }
    };
    Ok(enc)
}

/// Load an encoder from a local folder or a hub id (`org/name`, optionally `org/name@revision`).
/// A path that exists locally always wins; otherwise the id is resolved through the hub cache
/// (respecting `HF_HOME` and `HF_HUB_OFFLINE`).
///
/// `PATH.onnx[:OUTPUT]` is a user's ONNX model ([`onnx_teacher::OnnxEncoder`]).
pub fn load(model: &str, opts: &LoadOptions) -> Result<Box<dyn VisionEncoder>> {
    if onnx_teacher::parse_spec(model).is_some() {
        return Ok(Box::new(onnx_teacher::OnnxEncoder::open(model)?));
    }
    let files = resolve(model)?;
    load_from_files(&files, opts)
}
