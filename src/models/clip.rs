//! CLIP vision tower (`CLIPVisionModel`, or the vision half of a `CLIPModel` checkpoint):
//! class embedding, pre-layernorm, quick_gelu MLPs. `last_hidden_state` is the encoder output
//! (the post-layernorm only feeds the pooled output), as in the reference.

use super::encoder::{load_blocks, DimDefaults, Dims, PositionEmbedding, TokenEncoder};
use super::layers::{BlockNames, LayerNorm, PatchEmbed, QkvNames};
use super::vit::info;
use super::{find_prefix, vision_cfg, Family, ModelFiles};
use crate::config::Cfg;
use crate::error::Result;
use crate::interp::Kernel;
use crate::preprocess::{PreprocessConfig, CLIP_MEAN, CLIP_STD};
use crate::weights::Weights;

/// Block naming shared by CLIP and SigLIP.
pub const NAMES: BlockNames = BlockNames {
    norm1: "layer_norm1",
    qkv: QkvNames::Separate {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
    },
    proj: "self_attn.out_proj",
    norm2: "layer_norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    swiglu_in: "",
    swiglu_out: "",
    ls1: "",
    ls2: "",
};

const DEFAULTS: DimDefaults = DimDefaults {
    dim: 768,
    depth: 12,
    heads: 12,
    eps: 1e-5,
    act: "quick_gelu",
    image_size: 224,
    patch: 32,
};

pub fn load(cfg: &Cfg, pre: Option<&Cfg>, w: &Weights, files: &ModelFiles) -> Result<TokenEncoder> {
    let cfg = vision_cfg(cfg);
    let d = Dims::from_hf(&cfg, &DEFAULTS)?;
    let w = find_prefix(w, "embeddings.patch_embedding.weight", files)?;
    let emb = w.pp("embeddings");
    let (gh, gw) = d.native_grid();
    let preprocess =
        PreprocessConfig::short_edge_crop(d.input_hw.0, d.input_hw.0, CLIP_MEAN, CLIP_STD);
    let preprocess = match pre {
        Some(p) => preprocess.with_hf(p)?,
        None => preprocess,
    };
    let cls = emb.get(d.dim, "class_embedding")?.reshape((1, 1, d.dim))?;
    Ok(TokenEncoder {
        info: info(Family::Clip, &d, 1, preprocess),
        patch_embed: PatchEmbed::load(
            &emb.pp("patch_embedding"),
            d.channels,
            d.dim,
            d.patch,
            false,
        )?,
        cls: Some(cls),
        registers: None,
        pos: PositionEmbedding::new(
            &emb.get((gh * gw + 1, d.dim), "position_embedding.weight")?,
            1,
            Kernel::Bicubic,
        )?,
        pre_norm: Some(LayerNorm::load(&w.pp("pre_layrnorm"), d.dim, d.eps)?),
        blocks: load_blocks(
            &w.pp("encoder.layers"),
            d.depth,
            &NAMES,
            &d.block_spec(false, false),
        )?,
        final_norm: None,
    })
}
