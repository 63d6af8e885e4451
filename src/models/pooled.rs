//! One image-level embedding per image, as each family's reference computes it (what retrieval
//! compares):
//!
//! - ViT, timm ViT, DINOv2 (with or without registers): the class token of the final output,
//!   after the final norm (`last_hidden_state[:, 0]`; timm's `global_pool='token'` pre-logits).
//!   A timm ViT without a class token averages its patch tokens (timm's `avg`).
//! - CLIP: `get_image_features`: the class token through `post_layernorm`, then the
//!   `visual_projection` (no bias) of a `CLIPModel` / `CLIPVisionModelWithProjection`
//!   checkpoint.
//! - SigLIP: `get_image_features` = the vision tower's pooled output: the multi-head attention
//!   pooling head (`head.probe` attends over the post-layernormed tokens, then
//!   `x + mlp(layernorm(x))`).
//!
//! SAM has no image-level embedding and is refused.

use super::layers::{linear, Activation, LayerNorm, Linear};
use super::{find_prefix, vision_cfg, Family, FeatureRequest, ModelFiles, VisionEncoder};
use crate::config::Cfg;
use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::{Tensor, D};

/// SigLIP's attention pooling head (`SiglipMultiheadAttentionPoolingHead`).
pub struct MapHead {
    /// `[1, 1, D]`
    probe: Tensor,
    /// `nn.MultiheadAttention`'s packed q, k, v projections, split
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl MapHead {
    fn load(w: &Weights, cfg: &Cfg, dim: usize, heads: usize, eps: f64) -> Result<Self> {
        let a = w.pp("attention");
        let in_w = a.get((3 * dim, dim), "in_proj_weight")?;
        let in_b = a.get(3 * dim, "in_proj_bias")?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::new(
                in_w.narrow(0, i * dim, dim)?.contiguous()?,
                Some(in_b.narrow(0, i * dim, dim)?.contiguous()?),
            ))
        };
        let hidden = cfg.positive("intermediate_size", 4 * dim)?;
        let act_name = cfg.string("hidden_act", "gelu_pytorch_tanh")?;
        let act = Activation::from_hf(&act_name).ok_or_else(|| Error::Config {
            path: cfg.path.clone(),
            msg: format!("unsupported hidden_act {act_name:?}"),
        })?;
        Ok(Self {
            probe: w.get((1, 1, dim), "probe")?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: linear(&a.pp("out_proj"), dim, dim, true)?,
            heads,
            norm: LayerNorm::load(&w.pp("layernorm"), dim, eps)?,
            fc1: linear(&w.pp("mlp.fc1"), dim, hidden, true)?,
            fc2: linear(&w.pp("mlp.fc2"), hidden, dim, true)?,
            act,
        })
    }

    /// tokens `[B, N, D]` -> `[B, D]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let probe = self.probe.broadcast_as((b, 1, d))?.contiguous()?;
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            Ok(t.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(&probe)?, 1)?;
        let k = split(self.k.forward(x)?, n)?;
        let v = split(self.v.forward(x)?, n)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let h = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, 1, d))?;
        let h = self.out.forward(&h)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.norm.forward(&h)?)?)?,
        )?;
        Ok((h + m)?.squeeze(1)?)
    }
}

/// How the final tokens become one vector.
pub enum PoolHead {
    /// token 0 of the final (normed) output
    Cls,
    /// mean of the patch tokens (after the prefix tokens)
    MeanPatch,
    /// CLIP: `post_layernorm` of the class token, then `visual_projection`
    ClipProjection { norm: LayerNorm, proj: Linear },
    /// SigLIP: attention pooling
    Map(Box<MapHead>),
    /// an ONNX model's vector output, as it is
    Vector,
    /// the spatial mean of an ONNX model's feature map
    MeanMap,
}

impl PoolHead {
    /// Name written into embedding manifests.
    pub fn name(&self) -> &'static str {
        match self {
            PoolHead::Cls => "cls",
            PoolHead::MeanPatch => "mean-patch",
            PoolHead::ClipProjection { .. } => "clip-projection",
            PoolHead::Map(_) => "siglip-map",
            PoolHead::Vector => "output",
            PoolHead::MeanMap => "mean-map",
        }
    }
}

/// An encoder with its pooling: images in, one vector each.
pub struct ImageEmbedder {
    pub encoder: Box<dyn VisionEncoder>,
    pub head: PoolHead,
    /// length of an embedding
    pub dim: usize,
}

impl ImageEmbedder {
    /// Pooled embeddings `[B, dim]` (not normalised) of normalised pixels `[B, 3, H, W]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self
            .encoder
            .forward_features(pixels, &FeatureRequest::last_only())?;
        let last = out.last()?;
        Ok(match &self.head {
            PoolHead::Cls => last.narrow(1, 0, 1)?.squeeze(1)?,
            PoolHead::MeanPatch => {
                let n = last.dim(1)?;
                let p = out.prefix_tokens;
                last.narrow(1, p, n - p)?.mean(1)?
            }
            PoolHead::ClipProjection { norm, proj } => {
                proj.forward(&norm.forward(&last.narrow(1, 0, 1)?.squeeze(1)?)?)?
            }
            PoolHead::Map(h) => h.forward(last)?,
            PoolHead::Vector => last.squeeze(1)?,
            PoolHead::MeanMap => last.mean(3)?.mean(2)?,
        })
    }
}

/// Rows scaled to unit length (`[B, D]`; a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// Load a zoo model with its image-level pooling (see the module doc).
pub fn load_embedder(files: &ModelFiles, opts: &super::LoadOptions) -> Result<ImageEmbedder> {
    let cfg = Cfg::read(&files.config)?;
    let family = super::detect_family(&cfg)?;
    let w = files.open_weights(opts.dtype, &opts.device)?;
    let encoder = super::build(files, &w)?;
    let info = encoder.info().clone();
    let missing = |what: &str, name: &str| Error::BadInput {
        path: files.weights_display.clone(),
        msg: format!("{what}: no tensor {name}"),
    };
    let (head, dim) = match family {
        Family::Onnx => {
            return Err(Error::Invalid(
                "ONNX models are opened from their file (PATH.onnx[:OUTPUT])".into(),
            ))
        }
        Family::Sam => return Err(Error::BadInput {
            path: files.config.clone(),
            msg: "SAM has no image-level embedding; embed with a ViT, DINOv2, CLIP or SigLIP model"
                .into(),
        }),
        Family::Vit | Family::Dinov2 | Family::Dinov2WithRegisters => (PoolHead::Cls, info.width),
        Family::TimmVit if info.prefix_tokens > 0 && encoder_has_cls(&*encoder) => {
            (PoolHead::Cls, info.width)
        }
        Family::TimmVit => (PoolHead::MeanPatch, info.width),
        Family::Clip => {
            let vcfg = vision_cfg(&cfg);
            let eps = vcfg.f64("layer_norm_eps", 1e-5)?;
            let tower = find_prefix(&w, "embeddings.patch_embedding.weight", files)?;
            if !w.contains("visual_projection.weight") {
                return Err(missing(
                    "a bare CLIPVisionModel has no projected image embedding (use the CLIPModel or CLIPVisionModelWithProjection checkpoint)",
                    "visual_projection.weight",
                ));
            }
            let out = w
                .shape_of("visual_projection.weight")
                .and_then(|s| s.first().copied())
                .unwrap_or(0);
            let proj = linear(&w.pp("visual_projection"), info.width, out, false)?;
            let norm = LayerNorm::load(&tower.pp("post_layernorm"), info.width, eps)?;
            (PoolHead::ClipProjection { norm, proj }, out)
        }
        Family::Siglip => {
            let vcfg = vision_cfg(&cfg);
            let eps = vcfg.f64("layer_norm_eps", 1e-6)?;
            let tower = find_prefix(&w, "embeddings.patch_embedding.weight", files)?;
            if !tower.contains("head.probe") {
                return Err(missing(
                    "this SigLIP checkpoint has no attention pooling head (vision_use_head = false)",
                    "head.probe",
                ));
            }
            let head = MapHead::load(&tower.pp("head"), &vcfg, info.width, info.num_heads, eps)?;
            (PoolHead::Map(Box::new(head)), info.width)
        }
    };
    Ok(ImageEmbedder { encoder, head, dim })
}

/// A user's ONNX model (`PATH.onnx[:OUTPUT]`) as an embedder: a vector output as it is, tokens
/// by their first (class) token when there are prefix tokens else their mean, a feature map by
/// its spatial mean.
pub fn onnx_embedder(spec: &str) -> Result<ImageEmbedder> {
    let enc = super::onnx_teacher::OnnxEncoder::open(spec)?;
    let head = match enc.output_rank() {
        2 => PoolHead::Vector,
        3 if enc.info().prefix_tokens > 0 => PoolHead::Cls,
        3 => PoolHead::MeanPatch,
        _ => PoolHead::MeanMap,
    };
    let dim = enc.info().width;
    Ok(ImageEmbedder {
        encoder: Box::new(enc),
        head,
        dim,
    })
}

fn encoder_has_cls(e: &dyn VisionEncoder) -> bool {
    e.token_encoder().is_some_and(|t| t.cls.is_some())
}
