//! DINOv2 (`Dinov2Model`) and DINOv2 with registers (`Dinov2WithRegistersModel`): layer scale,
//! optional SwiGLU FFN (giant), register tokens inserted after cls once positions are added.

use super::encoder::{load_blocks, DimDefaults, Dims, PositionEmbedding, TokenEncoder};
use super::layers::{swiglu_hidden, BlockNames, LayerNorm, PatchEmbed, QkvNames};
use super::vit::info;
use super::{find_prefix, Family, ModelFiles};
use crate::config::Cfg;
use crate::error::Result;
use crate::interp::Kernel;
use crate::preprocess::{PreprocessConfig, IMAGENET_MEAN, IMAGENET_STD};
use crate::weights::Weights;

const NAMES: BlockNames = BlockNames {
    norm1: "norm1",
    qkv: QkvNames::Separate {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
    },
    proj: "attention.output.dense",
    norm2: "norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    swiglu_in: "mlp.weights_in",
    swiglu_out: "mlp.weights_out",
    ls1: "layer_scale1.lambda1",
    ls2: "layer_scale2.lambda1",
};

const DEFAULTS: DimDefaults = DimDefaults {
    dim: 768,
    depth: 12,
    heads: 12,
    eps: 1e-6,
    act: "gelu",
    image_size: 224,
    patch: 14,
};

pub fn load(
    cfg: &Cfg,
    family: Family,
    pre: Option<&Cfg>,
    w: &Weights,
    files: &ModelFiles,
) -> Result<TokenEncoder> {
    let mut d = Dims::from_hf(cfg, &DEFAULTS)?;
    // DINOv2 sizes its MLP by mlp_ratio only.
    let ratio = cfg.f64("mlp_ratio", 4.0)?;
    let swiglu = cfg.bool("use_swiglu_ffn", false)?;
    d.mlp_hidden = if swiglu {
        swiglu_hidden(d.dim, ratio)
    } else {
        (d.dim as f64 * ratio) as usize
    };
    let registers = if family == Family::Dinov2WithRegisters {
        cfg.usize("num_register_tokens", 4)?
    } else {
        0
    };
    let w = find_prefix(w, "embeddings.patch_embeddings.projection.weight", files)?;
    let emb = w.pp("embeddings");
    // The checkpoint's position table decides the native grid.
    let n0 = d.native_grid().0 * d.native_grid().1;
    let preprocess = PreprocessConfig::short_edge_crop(256, 224, IMAGENET_MEAN, IMAGENET_STD);
    let preprocess = match pre {
        Some(p) => preprocess.with_hf(p)?,
        None => preprocess,
    };
    // transformers resamples DINOv2's table with plain bicubic, the registers variant with
    // antialiasing.
    let kernel = if family == Family::Dinov2WithRegisters {
        Kernel::BicubicAntialias
    } else {
        Kernel::Bicubic
    };
    Ok(TokenEncoder {
        info: info(family, &d, 1 + registers, preprocess),
        patch_embed: PatchEmbed::load(
            &emb.pp("patch_embeddings.projection"),
            d.channels,
            d.dim,
            d.patch,
            true,
        )?,
        cls: Some(emb.get((1, 1, d.dim), "cls_token")?),
        registers: if registers > 0 {
            Some(emb.get((1, registers, d.dim), "register_tokens")?)
        } else {
            None
        },
        pos: PositionEmbedding::new(
            &emb.get((1, n0 + 1, d.dim), "position_embeddings")?,
            1,
            kernel,
        )?,
        pre_norm: None,
        blocks: load_blocks(
            &w.pp("encoder.layer"),
            d.depth,
            &NAMES,
            &d.block_spec(swiglu, true),
        )?,
        final_norm: Some(LayerNorm::load(&w.pp("layernorm"), d.dim, d.eps)?),
    })
}
