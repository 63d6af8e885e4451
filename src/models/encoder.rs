//! The plain-ViT token encoder shared by ViT, timm ViT, DINOv2 (with or without registers),
//! CLIP and SigLIP: patch embedding, optional cls/register tokens, absolute position embeddings
//! resampled to the input grid, optional pre-norm, pre-norm blocks, optional final norm.

use super::layers::{Block, LayerNorm, PatchEmbed};
use super::{check_pixels, EncoderOutput, FeatureRequest, ModelInfo, VisionEncoder};
use crate::error::Result;
use crate::interp::{resample_grid_tokens, Kernel};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Absolute position embeddings for prefix tokens and a patch grid.
pub struct PositionEmbedding {
    /// `[P + h0 * w0, D]`: P prefix (cls) positions, then the checkpoint's patch grid
    table: Tensor,
    prefix: usize,
    pub grid_hw: (usize, usize),
    pub kernel: Kernel,
    cache: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl PositionEmbedding {
    /// Wrap a `[P + h0*w0, D]` table (a leading 1 dim is removed).
    pub fn new(table: &Tensor, prefix: usize, kernel: Kernel) -> Result<Self> {
        let table = if table.rank() == 3 {
            table.squeeze(0)?
        } else {
            table.clone()
        };
        let (n, _) = table.dims2()?;
        let patches = n.saturating_sub(prefix);
        let side = (patches as f64).sqrt().round() as usize;
        if side * side != patches || patches == 0 {
            return Err(crate::Error::Invalid(format!(
                "position table has {patches} patch positions, not a square grid"
            )));
        }
        Self::with_grid(&table, prefix, kernel, (side, side))
    }

    /// Wrap a `[P + h0*w0, D]` table whose patch grid is `grid_hw` (rows, columns), for
    /// non-square tables.
    pub fn with_grid(
        table: &Tensor,
        prefix: usize,
        kernel: Kernel,
        grid_hw: (usize, usize),
    ) -> Result<Self> {
        let table = if table.rank() == 3 {
            table.squeeze(0)?
        } else {
            table.clone()
        };
        let (n, _) = table.dims2()?;
        if n != prefix + grid_hw.0 * grid_hw.1 {
            return Err(crate::Error::Invalid(format!(
                "position table has {n} positions, not {prefix} + {}x{}",
                grid_hw.0, grid_hw.1
            )));
        }
        Ok(Self {
            table,
            prefix,
            grid_hw,
            kernel,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Number of prefix rows in the table.
    pub fn prefix_len(&self) -> usize {
        self.prefix
    }

    /// Prefix positions `[1, P, D]`, if any.
    pub fn prefix(&self) -> Result<Option<Tensor>> {
        if self.prefix == 0 {
            return Ok(None);
        }
        Ok(Some(self.table.narrow(0, 0, self.prefix)?.unsqueeze(0)?))
    }

    /// Patch position embeddings for a grid, `[1, h*w, D]`. On the native grid this is a view of
    /// the table (so a trainable table gets gradients); other grids are resampled and cached
    /// (a trainable table is resampled afresh each time instead).
    pub fn for_grid(&self, hw: (usize, usize)) -> Result<Tensor> {
        let n0 = self.grid_hw.0 * self.grid_hw.1;
        let grid = self.table.narrow(0, self.prefix, n0)?;
        if hw == self.grid_hw {
            return Ok(grid.unsqueeze(0)?);
        }
        let cacheable = !self.table.track_op();
        if cacheable {
            if let Ok(cache) = self.cache.lock() {
                if let Some(t) = cache.get(&hw) {
                    return Ok(t.clone());
                }
            }
        }
        let t = resample_grid_tokens(&grid, self.grid_hw, hw, self.kernel)?.unsqueeze(0)?;
        if cacheable {
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(hw, t.clone());
            }
        }
        Ok(t)
    }
}

pub struct TokenEncoder {
    pub info: ModelInfo,
    pub patch_embed: PatchEmbed,
    /// `[1, 1, D]`
    pub cls: Option<Tensor>,
    /// `[1, R, D]`, inserted after the cls token once positions are added
    pub registers: Option<Tensor>,
    pub pos: PositionEmbedding,
    pub pre_norm: Option<LayerNorm>,
    pub blocks: Vec<Block>,
    pub final_norm: Option<LayerNorm>,
}

impl TokenEncoder {
    /// Tokens after patch + position embedding (and registers), before any block. Token order
    /// is cls, registers, patches; the position table's prefix rows go to the first prefix
    /// tokens (timm: cls and registers or none; transformers DINOv2: cls only).
    pub fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (patches, grid) = self.patch_embed.forward(pixels)?;
        let (b, _, d) = patches.dims3()?;
        let patches = patches.broadcast_add(&self.pos.for_grid(grid)?)?;
        let mut x = match self.prefix_tokens()? {
            None => patches,
            Some(pre) => Tensor::cat(&[&pre.broadcast_as((b, pre.dim(1)?, d))?, &patches], 1)?,
        };
        if let Some(norm) = &self.pre_norm {
            x = norm.forward(&x)?;
        }
        Ok((x, grid))
    }

    /// The prefix tokens `[1, P, D]` (cls, registers) with their positions added, the same
    /// for every image; None without prefix tokens.
    fn prefix_tokens(&self) -> Result<Option<Tensor>> {
        let mut prefix = Vec::new();
        if let Some(cls) = &self.cls {
            prefix.push(cls.clone());
        }
        if let Some(reg) = &self.registers {
            prefix.push(reg.clone());
        }
        if prefix.is_empty() {
            return Ok(None);
        }
        let mut pre = Tensor::cat(&prefix, 1)?;
        if let Some(p) = self.pos.prefix()? {
            let k = p.dim(1)?;
            let n = pre.dim(1)?;
            let with_pos = pre.narrow(1, 0, k)?.broadcast_add(&p)?;
            pre = if k == n {
                with_pos
            } else {
                Tensor::cat(&[&with_pos, &pre.narrow(1, k, n - k)?], 1)?
            };
        }
        Ok(Some(pre))
    }

    /// The encoder for `[batch, C, h, w]` pixels as ONNX nodes reading `x`: the token
    /// sequences after the embeddings (index 0) and after each of the first `blocks` blocks
    /// (index i: block i-1), no final norm.
    pub fn onnx_hidden_states(
        &self,
        g: &mut crate::onnx::Graph,
        x: &str,
        (h, w): (usize, usize),
        blocks: usize,
    ) -> Result<OnnxTokens> {
        let p = self.patch_embed.patch();
        if h % p != 0 || w % p != 0 {
            return Err(crate::Error::Invalid(format!(
                "ONNX export: input {h}x{w} must be a multiple of the patch ({p})"
            )));
        }
        let grid = (h / p, w / p);
        let d = self.info.width as i64;
        let (weight, bias) = self.patch_embed.conv_weights();
        let maps = g.conv(x, weight, bias, p, 0, 1)?;
        let tokens = g.reshape(&maps, &[0, d, -1])?;
        let tokens = g.transpose(&tokens, &[0, 2, 1]);
        let pos = g.constant("pos", &self.pos.for_grid(grid)?)?;
        let mut t = g.node("Add", &[&tokens, &pos], vec![]);
        let prefix = match self.prefix_tokens()? {
            Some(pre) => {
                let n = pre.dim(1)?;
                let c = g.expand_batch(&pre, &t)?;
                t = g.node(
                    "Concat",
                    &[&c, &t],
                    vec![("axis", crate::onnx::Attr::Int(1))],
                );
                n
            }
            None => 0,
        };
        if let Some(norm) = &self.pre_norm {
            t = norm.onnx(g, &t)?;
        }
        let mut hidden = vec![t.clone()];
        for blk in self.blocks.iter().take(blocks) {
            t = blk.onnx(g, &t)?;
            hidden.push(t.clone());
        }
        Ok(OnnxTokens {
            hidden,
            prefix,
            grid,
            width: self.info.width,
        })
    }

    /// The patch maps `[B, D, h/p, w/p]` after each of `levels` (0-based blocks) as ONNX nodes.
    pub fn onnx_levels(
        &self,
        g: &mut crate::onnx::Graph,
        x: &str,
        hw: (usize, usize),
        levels: &[usize],
    ) -> Result<Vec<String>> {
        let last = levels.iter().copied().max().unwrap_or(0);
        let t = self.onnx_hidden_states(g, x, hw, last + 1)?;
        levels
            .iter()
            .map(|&b| {
                let patches = t.patches(g, &t.hidden[b + 1])?;
                t.map(g, &patches)
            })
            .collect()
    }

    /// The architecture of this encoder as a student stem records it; only plain ViTs (no
    /// pre-norm, fc1-act-fc2 MLP, patch bias) qualify.
    pub fn vit_arch(&self) -> std::result::Result<VitArch, String> {
        if self.pre_norm.is_some() {
            return Err("it normalises tokens before the first block (CLIP pre-norm)".into());
        }
        let first = self.blocks.first().ok_or("it has no blocks")?;
        let (mlp_hidden, act) = first.plain_mlp().ok_or("its MLP is SwiGLU")?;
        if !self.patch_embed.has_bias() {
            return Err("its patch embedding has no bias".into());
        }
        let prefix = usize::from(self.cls.is_some())
            + self.registers.as_ref().map_or(0, |r| r.dim(1).unwrap_or(0));
        if self.pos.prefix_len() > prefix {
            return Err("its position table has more prefix rows than prefix tokens".into());
        }
        Ok(VitArch {
            dim: self.info.width,
            depth: self.blocks.len(),
            heads: self.info.num_heads,
            mlp_hidden,
            patch: self.info.patch,
            qkv_bias: first.qkv_bias(),
            eps: first.eps(),
            act,
            class_token: self.cls.is_some(),
            registers: prefix - usize::from(self.cls.is_some()),
            pos_prefix: self.pos.prefix_len(),
            layer_scale: first.has_layer_scale(),
        })
    }

    /// Every parameter in timm `VisionTransformer` naming (`patch_embed.proj.*`, `cls_token`,
    /// `reg_token`, `pos_embed` `[1, P + h*w, D]`, `blocks.{i}.*`), whatever naming the
    /// checkpoint used: how a pretrained ViT becomes a student stem.
    pub fn timm_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.patch_embed.named_tensors("patch_embed.proj");
        if let Some(c) = &self.cls {
            out.push(("cls_token".into(), c.clone()));
        }
        if let Some(r) = &self.registers {
            out.push(("reg_token".into(), r.clone()));
        }
        out.push(("pos_embed".into(), self.pos.table.unsqueeze(0)?));
        for (i, b) in self.blocks.iter().enumerate() {
            out.extend(b.timm_tensors(&format!("blocks.{i}")));
        }
        Ok(out)
    }
}

/// The architecture of a plain ViT: what a student stem is rebuilt from (`student.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitArch {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// hidden width of the MLP (fc1 output)
    pub mlp_hidden: usize,
    pub patch: usize,
    pub qkv_bias: bool,
    /// LayerNorm epsilon of the blocks
    pub eps: f64,
    /// MLP activation
    pub act: super::layers::Activation,
    pub class_token: bool,
    /// register tokens after the class token
    pub registers: usize,
    /// prefix tokens (class, then registers) that have a row in the position table
    pub pos_prefix: usize,
    /// per-channel layer scale after attention and MLP (`ls1.gamma`, `ls2.gamma`)
    pub layer_scale: bool,
}

impl VitArch {
    /// A timm-style ViT: class token with a position, qkv bias, MLP 4x, LayerNorm eps 1e-6.
    pub fn standard(dim: usize, depth: usize, heads: usize, patch: usize) -> Self {
        Self {
            dim,
            depth,
            heads,
            mlp_hidden: 4 * dim,
            patch,
            qkv_bias: true,
            eps: 1e-6,
            act: super::layers::Activation::Gelu,
            class_token: true,
            registers: 0,
            pos_prefix: 1,
            layer_scale: false,
        }
    }

    /// Tokens in front of the patch tokens.
    pub fn prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + self.registers
    }

    /// The block hyper-parameters at an input size.
    pub fn dims(&self, input_hw: (usize, usize)) -> Dims {
        Dims {
            dim: self.dim,
            depth: self.depth,
            heads: self.heads,
            mlp_hidden: self.mlp_hidden,
            eps: self.eps,
            act: self.act,
            input_hw,
            patch: self.patch,
            channels: 3,
            qkv_bias: self.qkv_bias,
        }
    }

    /// Check the numbers fit together (a hand-edited `student.json` may not).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dim == 0 || self.depth == 0 || self.heads == 0 || self.patch == 0 {
            return Err("dim, depth, heads and patch must be positive".into());
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(format!(
                "width {} is not divisible by {} heads",
                self.dim, self.heads
            ));
        }
        if self.mlp_hidden == 0 {
            return Err("mlp_hidden must be positive".into());
        }
        if self.pos_prefix > self.prefix_tokens() {
            return Err(format!(
                "pos_prefix {} exceeds the {} prefix tokens",
                self.pos_prefix,
                self.prefix_tokens()
            ));
        }
        Ok(())
    }
}

impl VisionEncoder for TokenEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn token_encoder(&self) -> Option<&TokenEncoder> {
        Some(self)
    }

    fn forward_features(&self, pixels: &Tensor, req: &FeatureRequest) -> Result<EncoderOutput> {
        check_pixels(&self.info, pixels)?;
        req.validate(self.blocks.len())?;
        let (mut x, grid) = self.embed(pixels)?;
        let mut hidden = BTreeMap::new();
        if req.hidden_states.contains(&0) {
            hidden.insert(0, x.clone());
        }
        let needed = req.blocks_needed(self.blocks.len());
        for (i, blk) in self.blocks.iter().take(needed).enumerate() {
            x = blk.forward(&x)?;
            if req.hidden_states.contains(&(i + 1)) {
                hidden.insert(i + 1, x.clone());
            }
        }
        let last = if req.last {
            Some(match &self.final_norm {
                Some(n) => n.forward(&x)?,
                None => x,
            })
        } else {
            None
        };
        Ok(EncoderOutput {
            hidden_states: hidden,
            last_hidden_state: last,
            grid,
            prefix_tokens: self.info.prefix_tokens,
        })
    }
}

/// The hyper-parameters every plain-ViT config carries, read with family defaults.
#[derive(Clone, Debug)]
pub struct Dims {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub eps: f64,
    pub act: super::layers::Activation,
    pub input_hw: (usize, usize),
    pub patch: usize,
    pub channels: usize,
    pub qkv_bias: bool,
}

/// Defaults of a family's configuration class.
pub struct DimDefaults {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: &'static str,
    pub image_size: usize,
    pub patch: usize,
}

impl Dims {
    /// Read the transformers keys (`hidden_size`, `num_hidden_layers`, ...). The MLP width comes
    /// from `intermediate_size`, or `mlp_ratio` x width when absent.
    pub fn from_hf(cfg: &crate::config::Cfg, d: &DimDefaults) -> Result<Self> {
        let dim = cfg.positive("hidden_size", d.dim)?;
        let heads = cfg.positive("num_attention_heads", d.heads)?;
        cfg.ensure(dim % heads == 0, || {
            format!("hidden_size {dim} is not divisible by num_attention_heads {heads}")
        })?;
        let mlp_hidden = match cfg.usize_opt("intermediate_size")? {
            Some(n) => n,
            None => (dim as f64 * cfg.f64("mlp_ratio", 4.0)?) as usize,
        };
        let act_name = cfg.string("hidden_act", d.act)?;
        let act = super::layers::Activation::from_hf(&act_name);
        cfg.ensure(act.is_some(), || {
            format!("unsupported hidden_act {act_name:?}")
        })?;
        let patch = cfg.positive("patch_size", d.patch)?;
        let channels = cfg.positive("num_channels", 3)?;
        cfg.ensure(channels == 3, || {
            format!("num_channels {channels} (only RGB is supported)")
        })?;
        Ok(Self {
            dim,
            depth: cfg.positive("num_hidden_layers", d.depth)?,
            heads,
            mlp_hidden,
            eps: cfg.f64("layer_norm_eps", d.eps)?,
            act: act.unwrap_or(super::layers::Activation::Gelu),
            input_hw: cfg.size2("image_size", d.image_size)?,
            patch,
            channels,
            qkv_bias: cfg.bool("qkv_bias", true)?,
        })
    }

    pub fn block_spec(&self, swiglu: bool, layer_scale: bool) -> super::layers::BlockSpec {
        super::layers::BlockSpec {
            dim: self.dim,
            num_heads: self.heads,
            mlp_hidden: self.mlp_hidden,
            qkv_bias: self.qkv_bias,
            eps: self.eps,
            act: self.act,
            swiglu,
            layer_scale,
        }
    }

    /// Patch grid of the checkpoint's native input.
    pub fn native_grid(&self) -> (usize, usize) {
        (self.input_hw.0 / self.patch, self.input_hw.1 / self.patch)
    }
}

/// Resample a `[1, P + h*w, D]` position table to a new grid, its P prefix rows kept apart.
pub fn resample_pos_table(
    table: &Tensor,
    prefix: usize,
    from: (usize, usize),
    to: (usize, usize),
    kernel: Kernel,
) -> Result<Tensor> {
    let t = table.squeeze(0)?;
    let n = t.dim(0)?.saturating_sub(prefix);
    let grid = resample_grid_tokens(&t.narrow(0, prefix, n)?, from, to, kernel)?;
    let t = if prefix > 0 {
        Tensor::cat(&[&t.narrow(0, 0, prefix)?, &grid], 0)?
    } else {
        grid
    };
    Ok(t.unsqueeze(0)?)
}

/// Load `depth` blocks found at `layers.{i}`.
pub fn load_blocks(
    layers: &crate::weights::Weights,
    depth: usize,
    names: &super::layers::BlockNames,
    spec: &super::layers::BlockSpec,
) -> Result<Vec<Block>> {
    (0..depth)
        .map(|i| Block::load(&layers.pp(i.to_string()), names, spec))
        .collect()
}

/// A token encoder's hidden states in an ONNX graph.
pub struct OnnxTokens {
    /// `[B, P + h*w, D]` after the embeddings (0) and after each block run
    pub hidden: Vec<String>,
    /// class and register tokens in front
    pub prefix: usize,
    pub grid: (usize, usize),
    pub width: usize,
}

impl OnnxTokens {
    /// The patch tokens `[B, h*w, D]` of a sequence (prefix tokens dropped).
    pub fn patches(&self, g: &mut crate::onnx::Graph, t: &str) -> Result<String> {
        let n = (self.prefix + self.grid.0 * self.grid.1) as i64;
        g.slice(t, 1, self.prefix as i64, n)
    }

    /// Patch tokens `[B, h*w, C]` as a map `[B, C, h, w]`.
    pub fn map(&self, g: &mut crate::onnx::Graph, patches: &str) -> Result<String> {
        g.tokens_to_map(patches, self.grid)
    }
}
