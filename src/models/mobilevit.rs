//! MobileViT-V2 as timm builds it (`timm/models/mobilevit.py` on `byobnet.py`): a 3x3/2 stem
//! (conv, BatchNorm, SiLU) and five stages. Every stage opens with an inverted residual block
//! (1x1 expansion x2, depthwise 3x3 carrying the stride, linear 1x1 projection; an identity
//! shortcut only where shape and stride allow); stages 3-5 then add a MobileViT-V2 block: a
//! depthwise 3x3 and a 1x1 projection to half the width, the map cut into 2x2 patches (pixel `p`
//! of every patch forms a sequence over the patches), transformer blocks of separable linear
//! self-attention and a 1x1 MLP (x2, SiLU) with GroupNorm(1) pre-norms, a final GroupNorm,
//! folding back and a 1x1 projection with BatchNorm. A map whose side is odd is first resized
//! (bilinear, align_corners) to the next even size, as timm does. Global average pooling and a
//! linear classifier `head.fc` finish it.
//!
//! Widths: `(64, 128, 256, 384, 512) * multiplier` (stem `32 * multiplier`) for
//! `mobilevitv2_050 ... _200`, times timm's `width_factor` (rounded to multiples of 8).
//! Pyramid (timm `forward_intermediates`): the five stages, strides 2, 4, 8, 16, 32.
//! Weight names are timm's (`stem.conv`, `stem.bn`, `stages.{i}.{j}.conv1_1x1.conv`, ...,
//! `transformer.{k}.attn.qkv_proj`, `head.fc`).

use super::backbone::{Backbone, BackboneSpec, FeatureInfo, Head};
use super::layers::{conv1x1_linear, pointwise, ConvBn, GroupNorm1, Linear};
use super::student::Init;
use crate::config::Cfg;
use crate::error::{Error, Result};
use crate::kernels::Act;
use crate::preprocess::TimmDataConfig;
use crate::weights::Weights;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// The registered names and their width multipliers.
const VARIANTS: &[(&str, f64)] = &[
    ("mobilevitv2_050", 0.5),
    ("mobilevitv2_075", 0.75),
    ("mobilevitv2_100", 1.0),
    ("mobilevitv2_125", 1.25),
    ("mobilevitv2_150", 1.5),
    ("mobilevitv2_175", 1.75),
    ("mobilevitv2_200", 2.0),
];

/// The registered names.
pub const NAMES: &[&str] = &[
    "mobilevitv2_050",
    "mobilevitv2_075",
    "mobilevitv2_100",
    "mobilevitv2_125",
    "mobilevitv2_150",
    "mobilevitv2_175",
    "mobilevitv2_200",
];

const GN_EPS: f64 = 1e-5;
const BASE_WIDTHS: [usize; 5] = [64, 128, 256, 384, 512];
/// Inverted-residual blocks per stage, and MobileViT-V2 transformer depths (stages 3-5).
const BLOCKS: [usize; 5] = [1, 2, 1, 1, 1];
const TRANSFORMER_DEPTH: [usize; 5] = [0, 0, 2, 4, 3];
const STRIDES: [usize; 5] = [1, 2, 2, 2, 2];
/// Expansion of the inverted residuals; width of the attention relative to the stage.
const EXPANSION: f64 = 2.0;
const TRANSFORMER_RATIO: f64 = 0.5;
const MLP_RATIO: usize = 2;
const PATCH: usize = 2;

/// timm's `make_divisible(v, 8)`: the nearest multiple of 8, not below 8 and not more than 10%
/// below `v`.
fn make_divisible(v: f64) -> usize {
    let d = 8usize;
    let mut n = d.max(((v + d as f64 / 2.0) as usize) / d * d);
    if (n as f64) < 0.9 * v {
        n += d;
    }
    n
}

/// A MobileViT-V2's widths, classifier size and data configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MobileVitV2Spec {
    /// timm architecture name (`mobilevitv2_100`)
    pub arch: String,
    /// the name's width multiplier (`_075` -> 0.75)
    pub multiplier: f64,
    /// timm's `width_factor` model argument (1.0 for the published models)
    pub width_factor: f64,
    /// classifier outputs (0: no classifier)
    pub num_classes: usize,
    pub data: TimmDataConfig,
}

/// One block of the plan, by its checkpoint prefix.
enum BlockPlan {
    InvertedResidual {
        name: String,
        inp: usize,
        mid: usize,
        out: usize,
        stride: usize,
    },
    MobileVit {
        name: String,
        chs: usize,
        dim: usize,
        depth: usize,
    },
}

/// A convolution (no bias) + BatchNorm (+ SiLU) as timm's `ConvNormAct` (`{name}.conv`,
/// `{name}.bn`).
struct Unit {
    name: String,
    /// `[out, in / groups, k, k]`
    shape: [usize; 4],
    stride: usize,
    groups: usize,
    act: bool,
}

impl MobileVitV2Spec {
    /// A published MobileViT-V2 by timm name, without classifier, for inputs of `input_hw`.
    pub fn named(name: &str, input_hw: (usize, usize)) -> Option<Self> {
        let &(arch, multiplier) = VARIANTS.iter().find(|(n, _)| *n == name)?;
        Some(Self {
            arch: arch.to_string(),
            multiplier,
            width_factor: 1.0,
            num_classes: 0,
            // timm's `mobilevitv2_*.cvnets_in1k`: no normalisation, crop 0.888, bicubic
            data: TimmDataConfig {
                input_hw,
                mean: [0.0; 3],
                std: [1.0; 3],
                crop_pct: 0.888,
                interpolation: "bicubic".into(),
            },
        })
    }

    fn stem_width(&self) -> usize {
        let stem = (32.0 * self.multiplier) as usize;
        (stem as f64 * self.width_factor).round_ties_even() as usize
    }

    /// The five stage widths.
    fn widths(&self) -> [usize; 5] {
        BASE_WIDTHS.map(|c| {
            let c = if self.multiplier == 1.0 {
                c
            } else {
                (c as f64 * self.multiplier) as usize
            };
            make_divisible(c as f64 * self.width_factor)
        })
    }

    /// Width of the pooled features (and the classifier's input).
    pub fn num_features(&self) -> usize {
        self.widths()[4]
    }

    fn plan(&self) -> Vec<Vec<BlockPlan>> {
        let mut inp = self.stem_width();
        let mut stages = Vec::new();
        for (i, &out) in self.widths().iter().enumerate() {
            let mut blocks = Vec::new();
            for j in 0..BLOCKS[i] {
                blocks.push(BlockPlan::InvertedResidual {
                    name: format!("stages.{i}.{j}"),
                    inp,
                    mid: make_divisible(inp as f64 * EXPANSION),
                    out,
                    stride: if j == 0 { STRIDES[i] } else { 1 },
                });
                inp = out;
            }
            if TRANSFORMER_DEPTH[i] > 0 {
                blocks.push(BlockPlan::MobileVit {
                    name: format!("stages.{i}.{}", BLOCKS[i]),
                    chs: out,
                    dim: make_divisible(out as f64 * TRANSFORMER_RATIO),
                    depth: TRANSFORMER_DEPTH[i],
                });
            }
            stages.push(blocks);
        }
        stages
    }

    fn stem_unit(&self) -> Unit {
        unit("stem", [self.stem_width(), 3, 3, 3], 2, 1, true)
    }

    /// Every convolution + BatchNorm, in order.
    fn all_units(&self) -> Vec<Unit> {
        let mut v = vec![self.stem_unit()];
        for b in self.plan().iter().flatten() {
            v.extend(block_units(b));
        }
        v
    }

    /// The transformer parameters of every MobileViT block: name, shape, init.
    fn transformer_parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = Vec::new();
        let conv = |p: &mut Vec<_>, name: String, o: usize, i: usize, bias: bool| {
            p.push((
                format!("{name}.weight"),
                vec![o, i, 1, 1],
                conv_init(o, 1, 1),
            ));
            if bias {
                p.push((format!("{name}.bias"), vec![o], Init::Zeros));
            }
        };
        let norm = |p: &mut Vec<_>, name: String, c: usize| {
            p.push((format!("{name}.weight"), vec![c], Init::Ones));
            p.push((format!("{name}.bias"), vec![c], Init::Zeros));
        };
        for b in self.plan().iter().flatten() {
            let BlockPlan::MobileVit {
                name,
                chs,
                dim,
                depth,
            } = b
            else {
                continue;
            };
            conv(&mut p, format!("{name}.conv_1x1"), *dim, *chs, false);
            for k in 0..*depth {
                let t = format!("{name}.transformer.{k}");
                norm(&mut p, format!("{t}.norm1"), *dim);
                conv(
                    &mut p,
                    format!("{t}.attn.qkv_proj"),
                    1 + 2 * dim,
                    *dim,
                    true,
                );
                conv(&mut p, format!("{t}.attn.out_proj"), *dim, *dim, true);
                norm(&mut p, format!("{t}.norm2"), *dim);
                conv(&mut p, format!("{t}.mlp.fc1"), MLP_RATIO * dim, *dim, true);
                conv(&mut p, format!("{t}.mlp.fc2"), *dim, MLP_RATIO * dim, true);
            }
            norm(&mut p, format!("{name}.norm"), *dim);
        }
        p
    }

    /// Names of the BatchNorms timm zero-initialises: the last of each inverted residual with
    /// an identity shortcut (the block starts as the identity).
    fn zero_init_norms(&self) -> Vec<String> {
        self.plan()
            .iter()
            .flatten()
            .filter_map(|b| match b {
                BlockPlan::InvertedResidual {
                    name,
                    inp,
                    out,
                    stride,
                    ..
                } if inp == out && *stride == 1 => Some(format!("{name}.conv3_1x1.bn")),
                _ => None,
            })
            .collect()
    }
}

fn unit(name: &str, shape: [usize; 4], stride: usize, groups: usize, act: bool) -> Unit {
    Unit {
        name: name.to_string(),
        shape,
        stride,
        groups,
        act,
    }
}

/// The convolution + BatchNorm units of one block.
fn block_units(b: &BlockPlan) -> Vec<Unit> {
    match b {
        BlockPlan::InvertedResidual {
            name,
            inp,
            mid,
            out,
            stride,
        } => vec![
            unit(&format!("{name}.conv1_1x1"), [*mid, *inp, 1, 1], 1, 1, true),
            unit(
                &format!("{name}.conv2_kxk"),
                [*mid, 1, 3, 3],
                *stride,
                *mid,
                true,
            ),
            unit(
                &format!("{name}.conv3_1x1"),
                [*out, *mid, 1, 1],
                1,
                1,
                false,
            ),
        ],
        BlockPlan::MobileVit { name, chs, dim, .. } => vec![
            unit(&format!("{name}.conv_kxk"), [*chs, 1, 3, 3], 1, *chs, true),
            unit(
                &format!("{name}.conv_proj"),
                [*chs, *dim, 1, 1],
                1,
                1,
                false,
            ),
        ],
    }
}

/// timm's byobnet convolution init: normal with std `sqrt(2 / fan_out)`, `fan_out = k * k *
/// out / groups`.
fn conv_init(out: usize, k: usize, groups: usize) -> Init {
    Init::Normal((2.0 / (k * k * out / groups) as f64).sqrt())
}

impl BackboneSpec for MobileVitV2Spec {
    fn arch_name(&self) -> String {
        self.arch.clone()
    }

    fn with_classes(&self, classes: usize) -> Result<Box<dyn BackboneSpec>> {
        Ok(Box::new(Self {
            num_classes: classes,
            ..self.clone()
        }))
    }

    fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let zero = self.zero_init_norms();
        let mut p = Vec::new();
        for u in self.all_units() {
            let [o, _, k, _] = u.shape;
            p.push((
                format!("{}.conv.weight", u.name),
                u.shape.to_vec(),
                conv_init(o, k, u.groups),
            ));
            let bn = format!("{}.bn", u.name);
            let scale = if zero.contains(&bn) {
                Init::Zeros
            } else {
                Init::Ones
            };
            p.push((format!("{bn}.weight"), vec![o], scale));
            p.push((format!("{bn}.bias"), vec![o], Init::Zeros));
        }
        p.extend(self.transformer_parameters());
        if self.num_classes > 0 {
            p.push((
                "head.fc.weight".into(),
                vec![self.num_classes, self.num_features()],
                Init::Normal(0.01),
            ));
            p.push(("head.fc.bias".into(), vec![self.num_classes], Init::Zeros));
        }
        p
    }

    fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut b = Vec::new();
        for u in self.all_units() {
            let c = u.shape[0];
            b.push((format!("{}.bn.running_mean", u.name), vec![c], Init::Zeros));
            b.push((format!("{}.bn.running_var", u.name), vec![c], Init::Ones));
        }
        b
    }

    fn build(&self, w: &Weights, state: &Weights) -> Result<Box<dyn Backbone>> {
        let load = |u: &Unit| load_unit(u, w, state);
        let mut stages = Vec::new();
        for plan in self.plan() {
            let mut blocks = Vec::new();
            for b in &plan {
                let units = block_units(b)
                    .iter()
                    .map(load)
                    .collect::<Result<Vec<_>>>()?;
                blocks.push(match b {
                    BlockPlan::InvertedResidual {
                        inp, out, stride, ..
                    } => Block::InvertedResidual {
                        units,
                        residual: inp == out && *stride == 1,
                    },
                    BlockPlan::MobileVit {
                        name,
                        chs,
                        dim,
                        depth,
                    } => {
                        let [local, proj]: [ConvBn; 2] = units
                            .try_into()
                            .map_err(|_| Error::Invalid("MobileViT block units".into()))?;
                        let w = w.pp(name);
                        Block::MobileVit(Box::new(MobileVitBlock {
                            local,
                            conv_1x1: w
                                .get((*dim, *chs, 1, 1), "conv_1x1.weight")?
                                .reshape((*dim, *chs))?,
                            layers: (0..*depth)
                                .map(|k| {
                                    TransformerLayer::load(&w.pp(format!("transformer.{k}")), *dim)
                                })
                                .collect::<Result<_>>()?,
                            norm: GroupNorm1::load(&w.pp("norm"), *dim, GN_EPS)?,
                            proj,
                            dim: *dim,
                        }))
                    }
                });
            }
            stages.push(blocks);
        }
        Ok(Box::new(MobileVitV2 {
            widths: self.widths(),
            stem: load(&self.stem_unit())?,
            stages,
            head: Head::load(
                w,
                "head.fc",
                self.num_features(),
                self.num_classes,
                self.data.preprocess(),
            )?,
        }))
    }
}

/// timm's `ConvNormAct` named `{name}.conv` / `{name}.bn`, SiLU when the unit has one.
fn load_unit(u: &Unit, w: &Weights, state: &Weights) -> Result<ConvBn> {
    let unit = ConvBn::load(
        w,
        state,
        &format!("{}.conv", u.name),
        &format!("{}.bn", u.name),
        u.shape,
        u.stride,
        u.groups,
    )?;
    Ok(unit.with_act(if u.act { Act::Silu } else { Act::Identity }))
}

/// Separable linear self-attention and the 1x1 MLP, each after a GroupNorm(1), over tokens
/// `[B, P, N, D]` (P pixels per patch, N patches).
struct TransformerLayer {
    norm1: GroupNorm1,
    qkv: Linear,
    out: Linear,
    norm2: GroupNorm1,
    fc1: Linear,
    fc2: Linear,
}

impl TransformerLayer {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm1::load(&w.pp("norm1"), dim, GN_EPS)?,
            qkv: conv1x1_linear(&w.pp("attn.qkv_proj"), dim, 1 + 2 * dim)?,
            out: conv1x1_linear(&w.pp("attn.out_proj"), dim, dim)?,
            norm2: GroupNorm1::load(&w.pp("norm2"), dim, GN_EPS)?,
            fc1: conv1x1_linear(&w.pp("mlp.fc1"), dim, MLP_RATIO * dim)?,
            fc2: conv1x1_linear(&w.pp("mlp.fc2"), MLP_RATIO * dim, dim)?,
        })
    }

    /// The layer as ONNX nodes over tokens `[B, P, N, D]`.
    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, dim: usize) -> Result<String> {
        use crate::onnx::Attr;
        let d = dim as i64;
        let n1 = self.norm1.onnx(g, x, 4)?;
        let qkv = self.qkv.onnx(g, &n1)?;
        let q = g.slice(&qkv, 3, 0, 1)?;
        let scores = g.node("Softmax", &[&q], vec![("axis", Attr::Int(2))]);
        let key = g.slice(&qkv, 3, 1, 1 + d)?;
        let value = g.slice(&qkv, 3, 1 + d, 1 + 2 * d)?;
        let weighted = g.node("Mul", &[&key, &scores], vec![]);
        let context = g.reduce_sum(&weighted, &[2])?;
        let v = g.node("Relu", &[&value], vec![]);
        let attn = g.node("Mul", &[&v, &context], vec![]);
        let o = self.out.onnx(g, &attn)?;
        let x = g.node("Add", &[x, &o], vec![]);
        let n2 = self.norm2.onnx(g, &x, 4)?;
        let h = self.fc1.onnx(g, &n2)?;
        let h = g.act(&h, Act::Silu)?;
        let h = self.fc2.onnx(g, &h)?;
        Ok(g.node("Add", &[&x, &h], vec![]))
    }

    fn forward(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let (b, p, n, _) = x.dims4()?;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        // one query score per token, softmax over the patches
        let q = qkv.narrow(D::Minus1, 0, 1)?.reshape((b, p, n))?;
        let scores = crate::kernels::softmax_last_dim(&q)?.unsqueeze(3)?;
        let key = qkv.narrow(D::Minus1, 1, dim)?;
        let value = qkv.narrow(D::Minus1, 1 + dim, dim)?;
        let context = key.broadcast_mul(&scores)?.sum_keepdim(2)?; // [B, P, 1, D]
        let attn = value.relu()?.broadcast_mul(&context)?;
        let x = (x + self.out.forward(&attn)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.silu()?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

struct MobileVitBlock {
    local: ConvBn,
    conv_1x1: Tensor,
    layers: Vec<TransformerLayer>,
    norm: GroupNorm1,
    proj: ConvBn,
    dim: usize,
}

impl MobileVitBlock {
    /// The block as ONNX nodes reading `x` `[B, C, h, w]`.
    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, (h, w): (usize, usize)) -> Result<String> {
        let (nh, nw) = (h.div_ceil(PATCH), w.div_ceil(PATCH));
        let x = g.resize_bilinear(x, (h, w), (nh * PATCH, nw * PATCH), true)?;
        let x = self.local.onnx(g, &x)?;
        let x = g.pointwise(&x, &self.conv_1x1, None)?;
        let (d, p, nh, nw) = (self.dim as i64, PATCH as i64, nh as i64, nw as i64);
        let t = g.reshape(&x, &[0, d, nh, p, nw, p])?;
        let t = g.transpose(&t, &[0, 3, 5, 2, 4, 1]);
        let mut t = g.reshape(&t, &[0, p * p, nh * nw, d])?;
        for layer in &self.layers {
            t = layer.onnx(g, &t, self.dim)?;
        }
        let t = self.norm.onnx(g, &t, 4)?;
        let t = g.reshape(&t, &[0, p, p, nh, nw, d])?;
        let t = g.transpose(&t, &[0, 5, 3, 1, 4, 2]);
        let x = g.reshape(&t, &[0, d, nh * p, nw * p])?;
        self.proj.onnx(g, &x)
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (nh, nw) = (h.div_ceil(PATCH), w.div_ceil(PATCH));
        let x = crate::interp::resize_bilinear_corners(x, (nh * PATCH, nw * PATCH))?;
        let x = pointwise(&self.local.forward(&x, train)?, &self.conv_1x1)?;
        let d = self.dim;
        // [B, D, nh, ph, nw, pw] -> [B, ph, pw, nh, nw, D] -> tokens [B, P, N, D]
        let mut t = x
            .reshape((b, d, nh, PATCH, nw, PATCH))?
            .permute((0, 3, 5, 2, 4, 1))?
            .contiguous()?
            .reshape((b, PATCH * PATCH, nh * nw, d))?;
        for layer in &self.layers {
            t = layer.forward(&t, d)?;
        }
        let t = self.norm.forward(&t)?;
        let x = t
            .reshape((b, PATCH, PATCH, nh, nw, d))?
            .permute((0, 5, 3, 1, 4, 2))?
            .contiguous()?
            .reshape((b, d, nh * PATCH, nw * PATCH))?;
        self.proj.forward(&x, train)
    }
}

enum Block {
    InvertedResidual { units: Vec<ConvBn>, residual: bool },
    MobileVit(Box<MobileVitBlock>),
}

impl Block {
    /// The block as ONNX nodes reading `x` of side `hw`; the output and its side.
    fn onnx(
        &self,
        g: &mut crate::onnx::Graph,
        x: &str,
        hw: (usize, usize),
    ) -> Result<(String, (usize, usize))> {
        match self {
            Block::InvertedResidual { units, residual } => {
                let (mut h, mut side) = (x.to_string(), hw);
                for u in units {
                    h = u.onnx(g, &h)?;
                    side = (u.out_side(side.0), u.out_side(side.1));
                }
                let y = if *residual {
                    g.node("Add", &[&h, x], vec![])
                } else {
                    h
                };
                Ok((y, side))
            }
            Block::MobileVit(m) => {
                let side = (hw.0.div_ceil(PATCH) * PATCH, hw.1.div_ceil(PATCH) * PATCH);
                Ok((m.onnx(g, x, hw)?, side))
            }
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::InvertedResidual { units, residual } => {
                let mut h = x.clone();
                for u in units {
                    h = u.forward(&h, train)?;
                }
                Ok(if *residual { (h + x)? } else { h })
            }
            Block::MobileVit(m) => m.forward(x, train),
        }
    }
}

/// A built MobileViT-V2.
pub struct MobileVitV2 {
    widths: [usize; 5],
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: Head,
}

impl Backbone for MobileVitV2 {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        super::backbone::pyramid(&self.widths, 2)
    }

    fn forward_intermediates(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = self.stem.forward(pixels, train)?;
        let mut out = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x, train)?;
            }
            out.push(x.clone());
        }
        Ok(out)
    }

    fn head(&self) -> &Head {
        &self.head
    }

    fn onnx_intermediates(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<Vec<String>> {
        let (h, w) = g.input_hw();
        let mut side = (self.stem.out_side(h), self.stem.out_side(w));
        let mut x = self.stem.onnx(g, x)?;
        let mut out = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                (x, side) = block.onnx(g, &x, side)?;
            }
            out.push(x.clone());
        }
        Ok(out)
    }
}

/// The registry's resolver.
pub fn resolve(name: &str, input_hw: (usize, usize)) -> Option<Box<dyn BackboneSpec>> {
    MobileVitV2Spec::named(name, input_hw).map(|s| Box::new(s) as Box<dyn BackboneSpec>)
}

/// A timm hub config of a MobileViT-V2: `architecture` (`mobilevitv2_100.cvnets_in1k`),
/// optional `model_args.width_factor`, `pretrained_cfg`; the classifier's size is read off the
/// checkpoint (`head.fc.weight`).
pub fn from_config(cfg: &Cfg, w: &Weights) -> Option<Result<Box<dyn BackboneSpec>>> {
    let spec = super::backbone::timm_spec(cfg, "mobilevitv2", "MobileViT-V2", NAMES, |b| {
        MobileVitV2Spec::named(b, (256, 256))
    })?;
    Some(
        spec.and_then(|s| configure(s, cfg, w))
            .map(|s| Box::new(s) as Box<dyn BackboneSpec>),
    )
}

fn configure(mut spec: MobileVitV2Spec, cfg: &Cfg, w: &Weights) -> Result<MobileVitV2Spec> {
    if let Some(args) = cfg.sub("model_args") {
        spec.width_factor = args.f64("width_factor", 1.0)?;
        args.ensure(spec.width_factor > 0.0 && spec.width_factor <= 8.0, || {
            "model_args.width_factor must be in (0, 8]".to_string()
        })?;
    }
    spec.num_classes = super::backbone::classes_in(w, "head.fc.weight");
    spec.data = TimmDataConfig::from_cfg(cfg, spec.data)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_timm() {
        // timm.layers.make_divisible
        for (v, want) in [
            (8.0, 8),
            (12.0, 16),
            (20.0, 24),
            (36.0, 40),
            (3.0, 8),
            (100.0, 104),
        ] {
            assert_eq!(make_divisible(v), want, "{v}");
        }
    }

    #[test]
    fn parameter_counts_and_widths_match_timm() {
        // timm 1.0.31, 1000 classes: sum(p.numel() for p in model.parameters()), and the
        // widths of feature_info
        for (name, params, widths) in [
            ("mobilevitv2_050", 1_370_593usize, [32, 64, 128, 192, 256]),
            ("mobilevitv2_075", 2_866_009, [48, 96, 192, 288, 384]),
            ("mobilevitv2_100", 4_901_841, [64, 128, 256, 384, 512]),
            ("mobilevitv2_175", 14_251_833, [112, 224, 448, 672, 896]),
        ] {
            let mut s = MobileVitV2Spec::named(name, (256, 256)).unwrap();
            s.num_classes = 1000;
            assert_eq!(
                super::super::backbone::count(&s.parameters()),
                params,
                "{name}"
            );
            assert_eq!(s.widths(), widths, "{name}");
        }
    }
}
