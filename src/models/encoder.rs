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
    /// Tokens after patch + position embedding (and registers), before any block.
    pub fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (patches, grid) = self.patch_embed.forward(pixels)?;
        let b = patches.dim(0)?;
        let pos = self.pos.for_grid(grid)?;
        let mut x = match &self.cls {
            Some(cls) => {
                let d = cls.dim(2)?;
                let cls = cls.broadcast_as((b, 1, d))?;
                let x = Tensor::cat(&[&cls, &patches], 1)?;
                let pos = match self.pos.prefix()? {
                    Some(p) => Tensor::cat(&[&p, &pos], 1)?,
                    None => pos,
                };
                x.broadcast_add(&pos)?
            }
            None => patches.broadcast_add(&pos)?,
        };
        if let Some(reg) = &self.registers {
            let (_, r, d) = reg.dims3()?;
            let n = x.dim(1)?;
            let reg = reg.broadcast_as((b, r, d))?;
            x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &reg, &x.narrow(1, 1, n - 1)?], 1)?;
        }
        if let Some(norm) = &self.pre_norm {
            x = norm.forward(&x)?;
        }
        Ok((x, grid))
    }
}

impl VisionEncoder for TokenEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
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
    pub image_size: (usize, usize),
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
            image_size: cfg.size2("image_size", d.image_size)?,
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
        (
            self.image_size.0 / self.patch,
            self.image_size.1 / self.patch,
        )
    }
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
