//! SigLIP vision tower (`SiglipVisionModel`, or the vision half of a `SiglipModel`): no class
//! token, tanh-GELU MLPs, post-layernorm on `last_hidden_state`. The attention-pooling head is
//! not needed for features and is not loaded.

use super::clip::NAMES;
use super::encoder::{load_blocks, DimDefaults, Dims, PositionEmbedding, TokenEncoder};
use super::layers::{LayerNorm, PatchEmbed};
use super::vit::info;
use super::{find_prefix, vision_cfg, Family, ModelFiles};
use crate::config::Cfg;
use crate::error::Result;
use crate::interp::Kernel;
use crate::preprocess::{PreprocessConfig, Resample, HALF};
use crate::weights::Weights;

const DEFAULTS: DimDefaults = DimDefaults {
    dim: 768,
    depth: 12,
    heads: 12,
    eps: 1e-6,
    act: "gelu_pytorch_tanh",
    image_size: 224,
    patch: 16,
};

pub fn load(cfg: &Cfg, pre: Option<&Cfg>, w: &Weights, files: &ModelFiles) -> Result<TokenEncoder> {
    let cfg = vision_cfg(cfg);
    let d = Dims::from_hf(&cfg, &DEFAULTS)?;
    let w = find_prefix(w, "embeddings.patch_embedding.weight", files)?;
    let emb = w.pp("embeddings");
    let (gh, gw) = d.native_grid();
    let preprocess = PreprocessConfig::exact(d.input_hw, Resample::Bicubic, HALF, HALF);
    let preprocess = match pre {
        Some(p) => preprocess.with_hf(p)?,
        None => preprocess,
    };
    Ok(TokenEncoder {
        info: info(Family::Siglip, &d, 0, preprocess),
        patch_embed: PatchEmbed::load(
            &emb.pp("patch_embedding"),
            d.channels,
            d.dim,
            d.patch,
            true,
        )?,
        cls: None,
        registers: None,
        pos: PositionEmbedding::new(
            &emb.get((gh * gw, d.dim), "position_embedding.weight")?,
            0,
            Kernel::Bicubic,
        )?,
        pre_norm: None,
        blocks: load_blocks(
            &w.pp("encoder.layers"),
            d.depth,
            &NAMES,
            &d.block_spec(false, false),
        )?,
        final_norm: Some(LayerNorm::load(&w.pp("post_layernorm"), d.dim, d.eps)?),
    })
}
