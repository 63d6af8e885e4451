//! SAM image encoder (`SamVisionModel`, or the `vision_encoder` of a `SamModel` checkpoint):
//! windowed and global attention with decomposed relative positions, absolute positions on an
//! NHWC grid, and the conv neck. Hidden states are `[B, H, W, C]`; `last_hidden_state` is the
//! neck output `[B, C, H, W]`, as in the reference.
//!
//! Other input sizes: the absolute table is resampled bicubically (antialiased, as timm's
//! `samvit` does) and each attention's relative tables linearly to `2 * size - 1`, as the
//! reference's `get_rel_pos` does.

use super::encoder::{DimDefaults, Dims};
use super::layers::{linear, Activation, LayerNorm, Linear, PatchEmbed};
use super::{
    check_pixels, find_prefix, vision_cfg, EncoderOutput, Family, FeatureRequest, ModelFiles,
    ModelInfo, VisionEncoder,
};
use crate::config::Cfg;
use crate::error::Result;
use crate::interp::{resample_grid_tokens, resample_rows, Kernel};
use crate::preprocess::{PreprocessConfig, IMAGENET_MEAN, IMAGENET_STD};
use crate::weights::Weights;
use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig};
use std::collections::BTreeMap;

const DEFAULTS: DimDefaults = DimDefaults {
    dim: 768,
    depth: 12,
    heads: 12,
    eps: 1e-6,
    act: "gelu",
    image_size: 1024,
    patch: 16,
};

struct RelPos {
    h: Tensor,
    w: Tensor,
}

/// Relative-position lookup `[q, k, C]` for a query/key length `size` (equal here):
/// `table'[i - j + size - 1]` with the table resized to `2 * size - 1` rows.
fn rel_pos_lookup(table: &Tensor, size: usize) -> Result<Tensor> {
    let resized = resample_rows(table, 2 * size - 1)?;
    let idx: Vec<u32> = (0..size)
        .flat_map(|i| (0..size).map(move |j| (i + size - 1 - j) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, size * size, table.device())?;
    let c = resized.dim(1)?;
    Ok(resized.index_select(&idx, 0)?.reshape((size, size, c))?)
}

struct SamAttention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
    rel: Option<RelPos>,
}

impl SamAttention {
    /// x: [B, h, w, C] -> [B, h, w, C]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let nh = self.heads;
        let hd = c / nh;
        let n = h * w;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((3, b * nh, n, hd))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut attn = crate::kernels::matmul_bt(&(&q * self.scale)?, &k)?;
        if let Some(rel) = &self.rel {
            let bn = b * nh;
            let rh = rel_pos_lookup(&rel.h, h)?; // [h, kh, hd]
            let rw = rel_pos_lookup(&rel.w, w)?; // [w, kw, hd]
            let rq = q.reshape((bn, h, w, hd))?;
            // rel_h[b, y, x, ky] = sum_c rq[b, y, x, c] * rh[y, ky, c]
            let rel_h = rq
                .permute((1, 0, 2, 3))?
                .reshape((h, bn * w, hd))?
                .matmul(&rh.transpose(1, 2)?)?
                .reshape((h, bn, w, h))?
                .permute((1, 0, 2, 3))?;
            // rel_w[b, y, x, kx] = sum_c rq[b, y, x, c] * rw[x, kx, c]
            let rel_w = rq
                .permute((2, 0, 1, 3))?
                .reshape((w, bn * h, hd))?
                .matmul(&rw.transpose(1, 2)?)?
                .reshape((w, bn, h, w))?
                .permute((1, 2, 0, 3))?;
            attn = attn
                .reshape((bn, h, w, h, w))?
                .broadcast_add(&rel_h.unsqueeze(4)?)?
                .broadcast_add(&rel_w.unsqueeze(3)?)?
                .reshape((bn, n, n))?;
        }
        let attn = crate::kernels::softmax_last_dim(&attn)?;
        let out = crate::kernels::matmul(&attn, &v)?
            .reshape((b, nh, h, w, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, h, w, c))?;
        self.proj.forward(&out)
    }
}

struct SamLayer {
    norm1: LayerNorm,
    attn: SamAttention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    act: Activation,
    window: usize,
}

impl SamLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm1.forward(x)?;
        let y = if self.window > 0 {
            let (b, h, w, c) = y.dims4()?;
            let ws = self.window;
            let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
            let y = y
                .pad_with_zeros(1, 0, ph - h)?
                .pad_with_zeros(2, 0, pw - w)?;
            let (nh, nw) = (ph / ws, pw / ws);
            let win = y
                .reshape((b, nh, ws, nw, ws, c))?
                .permute((0, 1, 3, 2, 4, 5))?
                .contiguous()?
                .reshape((b * nh * nw, ws, ws, c))?;
            let out = self.attn.forward(&win)?;
            out.reshape((b, nh, nw, ws, ws, c))?
                .permute((0, 1, 3, 2, 4, 5))?
                .contiguous()?
                .reshape((b, ph, pw, c))?
                .narrow(1, 0, h)?
                .narrow(2, 0, w)?
        } else {
            self.attn.forward(&y)?
        };
        let x = (x + y)?;
        let m = self.lin2.forward(
            &self
                .act
                .forward(&self.lin1.forward(&self.norm2.forward(&x)?)?)?,
        )?;
        Ok((x + m)?)
    }
}

pub struct SamEncoder {
    info: ModelInfo,
    patch_embed: PatchEmbed,
    /// `[h0 * w0, C]`
    pos: Option<Tensor>,
    pos_hw: (usize, usize),
    layers: Vec<SamLayer>,
    neck_conv1: Linear,
    neck_norm1: LayerNorm,
    neck_conv2: Conv2d,
    neck_norm2: LayerNorm,
}

pub fn load(cfg: &Cfg, pre: Option<&Cfg>, w: &Weights, files: &ModelFiles) -> Result<SamEncoder> {
    let cfg = vision_cfg(cfg);
    let d = Dims::from_hf(&cfg, &DEFAULTS)?;
    let dim = d.dim;
    let mlp_dim = match cfg.usize_opt("mlp_dim")? {
        Some(m) => m,
        None => (dim as f64 * cfg.f64("mlp_ratio", 4.0)?) as usize,
    };
    let out_ch = cfg.positive("output_channels", 256)?;
    let window = cfg.usize("window_size", 14)?;
    let global = cfg.usize_list("global_attn_indexes", &[2, 5, 8, 11])?;
    let use_abs = cfg.bool("use_abs_pos", true)?;
    let use_rel = cfg.bool("use_rel_pos", true)?;
    let (gh, gw) = d.native_grid();
    let w = find_prefix(w, "patch_embed.projection.weight", files)?;
    let hd = dim / d.heads;
    let mut layers = Vec::with_capacity(d.depth);
    for i in 0..d.depth {
        let lw = w.pp(format!("layers.{i}"));
        let is_global = global.contains(&i);
        let (rh, rw) = if is_global {
            (gh, gw)
        } else {
            (window, window)
        };
        let rel = if use_rel {
            Some(RelPos {
                h: lw.get((2 * rh - 1, hd), "attn.rel_pos_h")?,
                w: lw.get((2 * rw - 1, hd), "attn.rel_pos_w")?,
            })
        } else {
            None
        };
        layers.push(SamLayer {
            norm1: LayerNorm::load(&lw.pp("layer_norm1"), dim, d.eps)?,
            attn: SamAttention {
                qkv: linear(&lw.pp("attn.qkv"), dim, 3 * dim, d.qkv_bias)?,
                proj: linear(&lw.pp("attn.proj"), dim, dim, true)?,
                heads: d.heads,
                scale: (hd as f64).powf(-0.5),
                rel,
            },
            norm2: LayerNorm::load(&lw.pp("layer_norm2"), dim, d.eps)?,
            lin1: linear(&lw.pp("mlp.lin1"), dim, mlp_dim, true)?,
            lin2: linear(&lw.pp("mlp.lin2"), mlp_dim, dim, true)?,
            act: d.act,
            window: if is_global { 0 } else { window },
        });
    }
    let neck = w.pp("neck");
    let conv1 = neck
        .get((out_ch, dim, 1, 1), "conv1.weight")?
        .reshape((out_ch, dim))?;
    let conv2 = Conv2d::new(
        neck.get((out_ch, out_ch, 3, 3), "conv2.weight")?,
        None,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    );
    let preprocess = PreprocessConfig::longest_edge_pad(
        d.input_hw.0.max(d.input_hw.1),
        IMAGENET_MEAN,
        IMAGENET_STD,
    );
    let preprocess = match pre {
        Some(p) => preprocess.with_hf(p)?,
        None => preprocess,
    };
    let levels: Vec<usize> = if global.len() == 4 && global.iter().all(|&g| g < d.depth) {
        global.clone()
    } else {
        super::evenly_spaced_blocks(d.depth, 4)
    };
    Ok(SamEncoder {
        info: ModelInfo {
            family: Family::Sam,
            depth: d.depth,
            width: dim,
            num_heads: d.heads,
            patch: d.patch,
            input_hw: d.input_hw,
            prefix_tokens: 0,
            out_channels: out_ch,
            default_levels: levels,
            preprocess,
        },
        patch_embed: PatchEmbed::load(&w.pp("patch_embed.projection"), 3, dim, d.patch, true)?,
        pos: if use_abs {
            Some(
                w.get((1, gh, gw, dim), "pos_embed")?
                    .reshape((gh * gw, dim))?,
            )
        } else {
            None
        },
        pos_hw: (gh, gw),
        layers,
        neck_conv1: Linear::new(conv1, None),
        neck_norm1: LayerNorm::load(&neck.pp("layer_norm1"), out_ch, 1e-6)?,
        neck_conv2: conv2,
        neck_norm2: LayerNorm::load(&neck.pp("layer_norm2"), out_ch, 1e-6)?,
    })
}

impl SamEncoder {
    /// Neck on NHWC input -> NCHW output.
    fn neck(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.neck_norm1.forward(&self.neck_conv1.forward(x)?)?;
        let y = self
            .neck_conv2
            .forward(&y.permute((0, 3, 1, 2))?.contiguous()?)?;
        let y = self.neck_norm2.forward(&y.permute((0, 2, 3, 1))?)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

impl VisionEncoder for SamEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_features(&self, pixels: &Tensor, req: &FeatureRequest) -> Result<EncoderOutput> {
        check_pixels(&self.info, pixels)?;
        req.validate(self.layers.len())?;
        let (x, (gh, gw)) = self.patch_embed.forward(pixels)?;
        let b = x.dim(0)?;
        let c = x.dim(D::Minus1)?;
        let mut x = match &self.pos {
            Some(pos) => {
                let pos =
                    resample_grid_tokens(pos, self.pos_hw, (gh, gw), Kernel::BicubicAntialias)?;
                x.broadcast_add(&pos.unsqueeze(0)?)?
            }
            None => x,
        }
        .reshape((b, gh, gw, c))?;
        let mut hidden = BTreeMap::new();
        if req.hidden_states.contains(&0) {
            hidden.insert(0, x.clone());
        }
        let needed = req.blocks_needed(self.layers.len());
        for (i, layer) in self.layers.iter().take(needed).enumerate() {
            x = layer.forward(&x)?;
            if req.hidden_states.contains(&(i + 1)) {
                hidden.insert(i + 1, x.clone());
            }
        }
        let last = if req.last { Some(self.neck(&x)?) } else { None };
        Ok(EncoderOutput {
            hidden_states: hidden,
            last_hidden_state: last,
            grid: (gh, gw),
            prefix_tokens: 0,
        })
    }
}
