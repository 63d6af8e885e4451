//! Plain ViT: transformers `ViTModel` naming and timm `VisionTransformer` naming (the latter is
//! what ImageNet-21k augreg checkpoints used to initialise SAK's student come in).

use super::encoder::{load_blocks, DimDefaults, Dims, PositionEmbedding, TokenEncoder, VitArch};
use super::layers::{BlockNames, LayerNorm, PatchEmbed, QkvNames};
use super::{evenly_spaced_blocks, find_prefix, Family, ModelFiles, ModelInfo};
use crate::config::Cfg;
use crate::error::Result;
use crate::interp::Kernel;
use crate::preprocess::{PreprocessConfig, Resample, TimmDataConfig, HALF};
use crate::weights::Weights;

/// How timm resamples a position table to another grid (`resample_abs_pos_embed`: bicubic with
/// antialiasing); the student stem, in timm naming, does the same.
pub const TIMM_POS_KERNEL: Kernel = Kernel::BicubicAntialias;

pub(crate) const HF_NAMES: BlockNames = BlockNames {
    norm1: "layernorm_before",
    qkv: QkvNames::Separate {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
    },
    proj: "attention.output.dense",
    norm2: "layernorm_after",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    swiglu_in: "",
    swiglu_out: "",
    ls1: "",
    ls2: "",
};

/// timm's block naming (also used by DINOv2's original release).
pub const TIMM_NAMES: BlockNames = BlockNames {
    norm1: "norm1",
    qkv: QkvNames::Fused("attn.qkv"),
    proj: "attn.proj",
    norm2: "norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    swiglu_in: "mlp.fc1",
    swiglu_out: "mlp.fc2",
    ls1: "ls1.gamma",
    ls2: "ls2.gamma",
};

const VIT_DEFAULTS: DimDefaults = DimDefaults {
    dim: 768,
    depth: 12,
    heads: 12,
    eps: 1e-12,
    act: "gelu",
    image_size: 224,
    patch: 16,
};

/// transformers `ViTModel` (or a ViT task model wrapping it).
pub fn load_hf(
    cfg: &Cfg,
    pre: Option<&Cfg>,
    w: &Weights,
    files: &ModelFiles,
) -> Result<TokenEncoder> {
    let d = Dims::from_hf(cfg, &VIT_DEFAULTS)?;
    let w = find_prefix(w, "embeddings.patch_embeddings.projection.weight", files)?;
    let emb = w.pp("embeddings");
    let n0 = d.native_grid().0 * d.native_grid().1;
    let preprocess = PreprocessConfig::exact(d.input_hw, Resample::Bilinear, HALF, HALF);
    let preprocess = match pre {
        Some(p) => preprocess.with_hf(p)?,
        None => preprocess,
    };
    Ok(TokenEncoder {
        info: info(Family::Vit, &d, 1, preprocess),
        patch_embed: PatchEmbed::load(
            &emb.pp("patch_embeddings.projection"),
            d.channels,
            d.dim,
            d.patch,
            true,
        )?,
        cls: Some(emb.get((1, 1, d.dim), "cls_token")?),
        registers: None,
        pos: PositionEmbedding::new(
            &emb.get((1, n0 + 1, d.dim), "position_embeddings")?,
            1,
            Kernel::Bicubic,
        )?,
        pre_norm: None,
        blocks: load_blocks(
            &w.pp("encoder.layer"),
            d.depth,
            &HF_NAMES,
            &d.block_spec(false, false),
        )?,
        final_norm: Some(LayerNorm::load(&w.pp("layernorm"), d.dim, d.eps)?),
    })
}

pub(crate) fn info(
    family: Family,
    d: &Dims,
    prefix: usize,
    preprocess: PreprocessConfig,
) -> ModelInfo {
    ModelInfo {
        family,
        depth: d.depth,
        width: d.dim,
        num_heads: d.heads,
        patch: d.patch,
        input_hw: d.input_hw,
        prefix_tokens: prefix,
        out_channels: d.dim,
        default_levels: evenly_spaced_blocks(d.depth, 4),
        preprocess,
    }
}

/// Sizes of timm's named ViT variants: (width, depth, heads).
fn timm_variant(name: &str) -> Option<(usize, usize, usize)> {
    Some(match name {
        "tiny" => (192, 12, 3),
        "small" => (384, 12, 6),
        "base" => (768, 12, 12),
        "large" => (1024, 24, 16),
        "huge" => (1280, 32, 16),
        "giant" => (1408, 40, 16),
        _ => return None,
    })
}

/// A timm hub folder: `config.json` with `architecture` (e.g. `vit_base_patch16_384.augreg_in21k_ft_in1k`),
/// optional `model_args` overriding sizes, and `pretrained_cfg` with input size and normalisation.
pub fn load_timm(
    cfg: &Cfg,
    _pre: Option<&Cfg>,
    w: &Weights,
    files: &ModelFiles,
) -> Result<TokenEncoder> {
    let arch = cfg.string("architecture", "")?;
    let base = arch.split('.').next().unwrap_or("");
    let parts: Vec<&str> = base.split('_').collect();
    let variant = parts.get(1).and_then(|v| timm_variant(v));
    let mut patch = parts
        .iter()
        .find_map(|p| p.strip_prefix("patch").and_then(|n| n.parse().ok()))
        .unwrap_or(16);
    let mut img = parts
        .last()
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(224);
    let (mut dim, mut depth, mut heads) = variant.unwrap_or((768, 12, 12));
    let mut mlp_ratio = 4.0;
    if let Some(args) = cfg.sub("model_args") {
        dim = args.positive("embed_dim", dim)?;
        depth = args.positive("depth", depth)?;
        heads = args.positive("num_heads", heads)?;
        patch = args.positive("patch_size", patch)?;
        img = args.size2("img_size", img)?.0;
        mlp_ratio = args.f64("mlp_ratio", mlp_ratio)?;
    } else {
        cfg.ensure(variant.is_some(), || {
            format!("cannot tell the size of timm architecture {arch:?} (add model_args)")
        })?;
    }
    cfg.ensure(dim % heads == 0, || {
        format!("embed_dim {dim} not divisible by num_heads {heads}")
    })?;
    // The data config's input size drives preprocessing; the model's own grid comes from the
    // checkpoint's position table.
    let data = TimmDataConfig::from_cfg(
        cfg,
        TimmDataConfig {
            crop_pct: 0.9,
            interpolation: "bicubic".into(),
            ..TimmDataConfig::imagenet(img)
        },
    )?;
    let w = find_prefix(w, "patch_embed.proj.weight", files)?;
    // Structure that timm configs rarely spell out is read off the checkpoint's tensors.
    let mlp_hidden = match cfg.sub("model_args").map(|a| a.has("mlp_ratio")) {
        Some(true) => (dim as f64 * mlp_ratio) as usize,
        _ => w
            .shape_of("blocks.0.mlp.fc1.weight")
            .and_then(|s| s.first().copied())
            .unwrap_or((dim as f64 * mlp_ratio) as usize),
    };
    let registers = w
        .shape_of("reg_token")
        .and_then(|s| s.get(1).copied())
        .unwrap_or(0);
    let class_token = w.contains("cls_token");
    let grid = (img / patch) * (img / patch);
    let pos_rows = w
        .shape_of("pos_embed")
        .and_then(|s| s.get(1).copied())
        .unwrap_or(grid + 1);
    let prefix = usize::from(class_token) + registers;
    let pos_prefix = pos_rows.saturating_sub(grid);
    cfg.ensure(pos_prefix == 0 || pos_prefix == prefix, || {
        format!(
            "pos_embed has {pos_rows} rows: not a {0}x{0} grid plus 0 or {prefix} prefix rows",
            img / patch
        )
    })?;
    let arch = VitArch {
        dim,
        depth,
        heads,
        mlp_hidden,
        patch,
        qkv_bias: w.contains("blocks.0.attn.qkv.bias"),
        eps: 1e-6,
        act: super::layers::Activation::Gelu,
        class_token,
        registers,
        pos_prefix,
        layer_scale: w.contains("blocks.0.ls1.gamma"),
    };
    let preprocess = data.preprocess();
    let d = arch.dims((img, img));
    let info = info(Family::TimmVit, &d, arch.prefix_tokens(), preprocess);
    timm_encoder(&w, &arch, info, true)
}

/// A plain ViT in timm naming under `w` (`patch_embed.proj`, `cls_token`, `pos_embed`,
/// `blocks.N`, optional `norm`); also the student's stem, which has no final norm.
pub(crate) fn timm_encoder(
    w: &Weights,
    a: &VitArch,
    info: ModelInfo,
    final_norm: bool,
) -> Result<TokenEncoder> {
    let d = a.dims(info.input_hw);
    let (gh, gw) = d.native_grid();
    Ok(TokenEncoder {
        patch_embed: PatchEmbed::load(&w.pp("patch_embed.proj"), 3, d.dim, d.patch, true)?,
        cls: if a.class_token {
            Some(w.get((1, 1, d.dim), "cls_token")?)
        } else {
            None
        },
        registers: if a.registers > 0 {
            Some(w.get((1, a.registers, d.dim), "reg_token")?)
        } else {
            None
        },
        pos: PositionEmbedding::with_grid(
            &w.get((1, a.pos_prefix + gh * gw, d.dim), "pos_embed")?,
            a.pos_prefix,
            TIMM_POS_KERNEL,
            (gh, gw),
        )?,
        pre_norm: None,
        blocks: load_blocks(
            &w.pp("blocks"),
            d.depth,
            &TIMM_NAMES,
            &d.block_spec(false, a.layer_scale),
        )?,
        final_norm: if final_norm {
            Some(LayerNorm::load(&w.pp("norm"), d.dim, d.eps)?)
        } else {
            None
        },
        info,
    })
}
