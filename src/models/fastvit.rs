//! FastViT as timm builds it (`timm/models/fastvit.py`), in its **training form** — the
//! multi-branch, re-parameterisable blocks with BatchNorm — and in the single-branch
//! **inference form** that [`reparameterize`] folds it into (timm's `inference_mode=True`
//! layout, `reparam_conv` tensors), which loads and runs by itself.
//!
//! Structure: a stem of three MobileOne blocks (3x3/2 conv, depthwise 3x3/2, 1x1; each a sum of
//! a kxk conv+BN branch, a 1x1 conv+BN "scale" branch and a BN identity branch where shapes
//! allow, then GELU); four stages, stages 2-4 opening with a patch embedding (a 7x7/2
//! depthwise conv+BN plus a 3x3/2 one, with two filters per channel, then a 1x1 MobileOne);
//! RepMixer blocks (`x + g * (mixer(x) - norm(x))`, mixer a depthwise MobileOne, norm a BN) or,
//! in `fastvit_sa*`'s last stage, a conditional position encoding (`x + dwconv7x7(x)`) and
//! attention blocks (BN, multi-head attention with 32-wide heads); every block ends with a
//! ConvMlp (depthwise 7x7 + BN, 1x1 up, GELU, 1x1 down) under a layer scale. After the stages a
//! MobileOne 3x3 with two filters per channel and squeeze-excite doubles the width before
//! global average pooling and the classifier `head.fc`.
//!
//! Pyramid (timm `forward_intermediates`): the four stages, strides 4, 8, 16, 32; pooled
//! features (`pre_logits`) come after the final convolution.

use super::backbone::{Backbone, BackboneSpec, FeatureInfo, Head};
use super::layers::{
    conv1x1_linear, conv2d, pointwise, Activation, Attention, BatchNorm2d, ConvBn, Linear, BN_EPS,
};
use super::student::Init;
use crate::config::Cfg;
use crate::error::{Error, Result};
use crate::kernels::{channel_bias_act, gelu_erf, Act};
use crate::onnx::Graph;
use crate::preprocess::TimmDataConfig;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The registered names.
pub const NAMES: &[&str] = &["fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12"];

const HEAD_DIM: usize = 32;
const MIXER_KERNEL: usize = 3;
const DOWN_KERNEL: usize = 7;
const DOWN_SMALL_KERNEL: usize = 3;
const MLP_KERNEL: usize = 7;
const POS_KERNEL: usize = 7;
const LAYER_SCALE_INIT: f64 = 1e-5;

/// A FastViT's structure, classifier size, data configuration and form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FastVitSpec {
    /// timm architecture name (`fastvit_t8`)
    pub arch: String,
    /// blocks per stage
    pub layers: [usize; 4],
    /// stage widths
    pub embed_dims: [usize; 4],
    /// MLP expansion per stage
    pub mlp_ratios: [f64; 4],
    /// stages whose blocks are attention blocks (the others are RepMixer blocks)
    pub attention: [bool; 4],
    /// stages with a conditional position encoding before their blocks
    pub pos_emb: [bool; 4],
    /// classifier outputs (0: no classifier)
    pub num_classes: usize,
    pub data: TimmDataConfig,
    /// the re-parameterised inference form (single-branch convolutions with bias)
    pub fused: bool,
}

impl FastVitSpec {
    /// A published FastViT by timm name (training form, no classifier) for inputs of `input_hw`.
    pub fn named(name: &str, input_hw: (usize, usize)) -> Option<Self> {
        let wide = [64, 128, 256, 512];
        let (layers, embed_dims, ratio, sa) = match name {
            "fastvit_t8" => ([2, 2, 4, 2], [48, 96, 192, 384], 3.0, false),
            "fastvit_t12" => ([2, 2, 6, 2], wide, 3.0, false),
            "fastvit_s12" => ([2, 2, 6, 2], wide, 4.0, false),
            "fastvit_sa12" => ([2, 2, 6, 2], wide, 4.0, true),
            _ => return None,
        };
        Some(Self {
            arch: name.to_string(),
            layers,
            embed_dims,
            mlp_ratios: [ratio; 4],
            attention: [false, false, false, sa],
            pos_emb: [false, false, false, sa],
            num_classes: 0,
            // timm's `fastvit_*.apple_in1k`: ImageNet statistics, crop 0.9, bicubic
            data: TimmDataConfig {
                input_hw,
                crop_pct: 0.9,
                interpolation: "bicubic".into(),
                ..TimmDataConfig::imagenet(input_hw.0)
            },
            fused: false,
        })
    }

    /// Width of the final convolution (and of the pooled features).
    pub fn num_features(&self) -> usize {
        2 * self.embed_dims[3]
    }

    /// The whole network as a plan of re-parameterisable pieces.
    fn plan(&self) -> Plan {
        let f = self.fused;
        let d = self.embed_dims;
        let stem = vec![
            MobileOnePlan::new("stem.0", 3, d[0], 3, 2, 1, f),
            MobileOnePlan::new("stem.1", d[0], d[0], 3, 2, d[0], f),
            MobileOnePlan::new("stem.2", d[0], d[0], 1, 1, 1, f),
        ];
        let mut stages = Vec::new();
        let mut prev = d[0];
        for (i, &dim) in d.iter().enumerate() {
            let s = format!("stages.{i}");
            let downsample = (i > 0 || prev != dim).then(|| {
                (
                    LargeKernelPlan {
                        name: format!("{s}.downsample.proj.0"),
                        inp: prev,
                        out: dim,
                        fused: f,
                    },
                    MobileOnePlan::new(&format!("{s}.downsample.proj.1"), dim, dim, 1, 1, 1, f),
                )
            });
            let hidden = (dim as f64 * self.mlp_ratios[i]) as usize;
            let blocks = (0..self.layers[i])
                .map(|j| {
                    let b = format!("{s}.blocks.{j}");
                    let mlp = MlpPlan {
                        name: format!("{b}.mlp"),
                        dim,
                        hidden,
                    };
                    if self.attention[i] {
                        BlockPlan::Attention { name: b, dim, mlp }
                    } else {
                        BlockPlan::RepMixer {
                            mixer: RepMixerPlan {
                                name: format!("{b}.token_mixer"),
                                dim,
                                fused: f,
                            },
                            name: b,
                            dim,
                            mlp,
                        }
                    }
                })
                .collect();
            stages.push(StagePlan {
                downsample,
                pos_emb: self.pos_emb[i].then(|| RepCpePlan {
                    name: format!("{s}.pos_emb"),
                    dim,
                    fused: f,
                }),
                blocks,
            });
            prev = dim;
        }
        let mut final_conv =
            MobileOnePlan::new("final_conv", d[3], self.num_features(), 3, 1, d[3], f);
        final_conv.se = Some((self.num_features() as f64 / 16.0).round().max(1.0) as usize);
        Plan {
            stem,
            stages,
            final_conv,
        }
    }

    fn pieces(&self) -> Vec<Piece> {
        let mut v = Vec::new();
        self.plan().pieces(&mut v);
        if self.num_classes > 0 {
            let (n, c) = (self.num_classes, self.num_features());
            v.push(Piece::Param(
                "head.fc.weight".into(),
                vec![n, c],
                Init::TruncNormal(0.02),
            ));
            v.push(Piece::Param("head.fc.bias".into(), vec![n], Init::Zeros));
        }
        v
    }
}

/// A named part of the parameter list.
enum Piece {
    /// a convolution without bias and the BatchNorm after it (`{name}.conv`, `{name}.bn`)
    ConvBn(String, [usize; 4]),
    /// a BatchNorm (`{name}.weight`, `bias`, `running_mean`, `running_var`)
    Bn(String, usize),
    /// any other parameter
    Param(String, Vec<usize>, Init),
}

/// timm's default convolution init (kaiming-uniform, a = sqrt 5) has std `1 / sqrt(3 fan_in)`.
fn conv_init(shape: &[usize]) -> Init {
    let fan_in: usize = shape[1..].iter().product();
    Init::Normal(1.0 / (3.0 * fan_in as f64).sqrt())
}

fn conv_with_bias(v: &mut Vec<Piece>, name: &str, shape: [usize; 4]) {
    v.push(Piece::Param(
        format!("{name}.weight"),
        shape.to_vec(),
        conv_init(&shape),
    ));
    v.push(Piece::Param(
        format!("{name}.bias"),
        vec![shape[0]],
        Init::Zeros,
    ));
}

/// A MobileOne block: branches summed, optional squeeze-excite, optional GELU.
#[derive(Clone)]
struct MobileOnePlan {
    name: String,
    inp: usize,
    out: usize,
    k: usize,
    stride: usize,
    groups: usize,
    identity: bool,
    kxk: bool,
    scale: bool,
    act: bool,
    /// squeeze-excite reduction width
    se: Option<usize>,
    fused: bool,
}

impl MobileOnePlan {
    fn new(
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        groups: usize,
        fused: bool,
    ) -> Self {
        Self {
            name: name.to_string(),
            inp,
            out,
            k,
            stride,
            groups,
            identity: inp == out && stride == 1,
            kxk: true,
            scale: k > 1,
            act: true,
            se: None,
            fused,
        }
    }

    fn kernel_shape(&self, k: usize) -> [usize; 4] {
        [self.out, self.inp / self.groups, k, k]
    }

    fn pieces(&self, v: &mut Vec<Piece>) {
        let n = &self.name;
        if self.fused {
            conv_with_bias(v, &format!("{n}.reparam_conv"), self.kernel_shape(self.k));
        } else {
            if self.identity {
                v.push(Piece::Bn(format!("{n}.identity"), self.inp));
            }
            if self.kxk {
                v.push(Piece::ConvBn(
                    format!("{n}.conv_kxk.0"),
                    self.kernel_shape(self.k),
                ));
            }
            if self.scale {
                v.push(Piece::ConvBn(
                    format!("{n}.conv_scale"),
                    self.kernel_shape(1),
                ));
            }
        }
        if let Some(rd) = self.se {
            conv_with_bias(v, &format!("{n}.se.fc1"), [rd, self.out, 1, 1]);
            conv_with_bias(v, &format!("{n}.se.fc2"), [self.out, rd, 1, 1]);
        }
    }

    fn load(&self, w: &Weights, state: &Weights) -> Result<MobileOne> {
        let n = &self.name;
        let se = self
            .se
            .map(|rd| -> Result<_> {
                Ok((
                    conv1x1_linear(&w.pp(format!("{n}.se.fc1")), self.out, rd)?,
                    conv1x1_linear(&w.pp(format!("{n}.se.fc2")), rd, self.out)?,
                ))
            })
            .transpose()?;
        let branches = if self.fused {
            Branches::Fused(ConvBias::load(
                &w.pp(format!("{n}.reparam_conv")),
                self.kernel_shape(self.k),
                self.stride,
                self.groups,
            )?)
        } else {
            let cb = |name: String, k| {
                conv_bn(
                    w,
                    state,
                    &name,
                    self.kernel_shape(k),
                    self.stride,
                    self.groups,
                )
            };
            Branches::Train {
                k: self.k,
                stride: self.stride,
                groups: self.groups,
                identity: self
                    .identity
                    .then(|| bn(w, state, &format!("{n}.identity"), self.inp))
                    .transpose()?,
                kxk: self
                    .kxk
                    .then(|| cb(format!("{n}.conv_kxk.0"), self.k))
                    .transpose()?,
                scale: self
                    .scale
                    .then(|| cb(format!("{n}.conv_scale"), 1))
                    .transpose()?,
            }
        };
        Ok(MobileOne {
            branches,
            se,
            act: self.act,
        })
    }
}

/// The patch embedding's large-kernel convolution: 7x7 and 3x3 conv+BN branches, no activation.
struct LargeKernelPlan {
    name: String,
    inp: usize,
    out: usize,
    fused: bool,
}

impl LargeKernelPlan {
    fn shape(&self, k: usize) -> [usize; 4] {
        [self.out, 1, k, k]
    }

    fn pieces(&self, v: &mut Vec<Piece>) {
        let n = &self.name;
        if self.fused {
            conv_with_bias(v, &format!("{n}.reparam_conv"), self.shape(DOWN_KERNEL));
        } else {
            v.push(Piece::ConvBn(
                format!("{n}.large_conv"),
                self.shape(DOWN_KERNEL),
            ));
            v.push(Piece::ConvBn(
                format!("{n}.small_conv"),
                self.shape(DOWN_SMALL_KERNEL),
            ));
        }
    }

    fn load(&self, w: &Weights, state: &Weights) -> Result<Branches> {
        let n = &self.name;
        Ok(if self.fused {
            Branches::Fused(ConvBias::load(
                &w.pp(format!("{n}.reparam_conv")),
                self.shape(DOWN_KERNEL),
                2,
                self.inp,
            )?)
        } else {
            let cb =
                |b: &str, k| conv_bn(w, state, &format!("{n}.{b}"), self.shape(k), 2, self.inp);
            Branches::Train {
                k: DOWN_KERNEL,
                stride: 2,
                groups: self.inp,
                identity: None,
                kxk: Some(cb("large_conv", DOWN_KERNEL)?),
                scale: Some(cb("small_conv", DOWN_SMALL_KERNEL)?),
            }
        })
    }
}

/// RepMixer: `x + g * (mixer(x) - norm(x))`, mixer a depthwise 3x3 MobileOne without
/// activation, norm a BatchNorm (a MobileOne with only its identity branch).
struct RepMixerPlan {
    name: String,
    dim: usize,
    fused: bool,
}

impl RepMixerPlan {
    /// A depthwise 3x3 MobileOne of the training form without activation.
    fn branch(&self, part: &str) -> MobileOnePlan {
        let name = format!("{}.{part}", self.name);
        let (d, k) = (self.dim, MIXER_KERNEL);
        MobileOnePlan {
            act: false,
            ..MobileOnePlan::new(&name, d, d, k, 1, d, false)
        }
    }

    fn mixer(&self) -> MobileOnePlan {
        self.branch("mixer")
    }

    fn norm(&self) -> MobileOnePlan {
        let mut m = self.branch("norm");
        m.kxk = false;
        m.scale = false;
        m
    }

    fn gamma(&self) -> String {
        format!("{}.layer_scale.gamma", self.name)
    }

    fn pieces(&self, v: &mut Vec<Piece>) {
        if self.fused {
            conv_with_bias(
                v,
                &format!("{}.reparam_conv", self.name),
                [self.dim, 1, MIXER_KERNEL, MIXER_KERNEL],
            );
        } else {
            self.norm().pieces(v);
            self.mixer().pieces(v);
            v.push(Piece::Param(
                self.gamma(),
                vec![self.dim, 1, 1],
                Init::Constant(LAYER_SCALE_INIT),
            ));
        }
    }

    fn load(&self, w: &Weights, state: &Weights) -> Result<RepMixer> {
        Ok(if self.fused {
            RepMixer::Fused(ConvBias::load(
                &w.pp(format!("{}.reparam_conv", self.name)),
                [self.dim, 1, MIXER_KERNEL, MIXER_KERNEL],
                1,
                self.dim,
            )?)
        } else {
            RepMixer::Train(Box::new(RepMixerBranches {
                norm: self.norm().load(w, state)?,
                mixer: self.mixer().load(w, state)?,
                gamma: w.get((self.dim, 1, 1), &self.gamma())?,
            }))
        })
    }
}

/// Conditional position encoding: `x + dwconv7x7(x)` (with bias).
struct RepCpePlan {
    name: String,
    dim: usize,
    fused: bool,
}

impl RepCpePlan {
    fn shape(&self) -> [usize; 4] {
        [self.dim, 1, POS_KERNEL, POS_KERNEL]
    }

    fn pieces(&self, v: &mut Vec<Piece>) {
        let part = if self.fused {
            "reparam_conv"
        } else {
            "pos_enc"
        };
        conv_with_bias(v, &format!("{}.{part}", self.name), self.shape());
    }

    fn load(&self, w: &Weights) -> Result<(ConvBias, bool)> {
        let part = if self.fused {
            "reparam_conv"
        } else {
            "pos_enc"
        };
        let conv = ConvBias::load(
            &w.pp(format!("{}.{part}", self.name)),
            self.shape(),
            1,
            self.dim,
        )?;
        Ok((conv, !self.fused))
    }
}

/// ConvMlp: depthwise 7x7 conv + BN, 1x1 up (bias), GELU, 1x1 down (bias).
struct MlpPlan {
    name: String,
    dim: usize,
    hidden: usize,
}

impl MlpPlan {
    fn pieces(&self, v: &mut Vec<Piece>) {
        let n = &self.name;
        v.push(Piece::ConvBn(
            format!("{n}.conv"),
            [self.dim, 1, MLP_KERNEL, MLP_KERNEL],
        ));
        // timm's ConvMlp: truncated normal (std 0.02) 1x1 convolutions, zero biases
        let trunc = Init::TruncNormal(0.02);
        v.push(Piece::Param(
            format!("{n}.fc1.weight"),
            vec![self.hidden, self.dim, 1, 1],
            trunc,
        ));
        v.push(Piece::Param(
            format!("{n}.fc1.bias"),
            vec![self.hidden],
            Init::Zeros,
        ));
        v.push(Piece::Param(
            format!("{n}.fc2.weight"),
            vec![self.dim, self.hidden, 1, 1],
            trunc,
        ));
        v.push(Piece::Param(
            format!("{n}.fc2.bias"),
            vec![self.dim],
            Init::Zeros,
        ));
    }

    fn load(&self, w: &Weights, state: &Weights) -> Result<Mlp> {
        let n = &self.name;
        Ok(Mlp {
            conv: conv_bn(
                w,
                state,
                &format!("{n}.conv"),
                [self.dim, 1, MLP_KERNEL, MLP_KERNEL],
                1,
                self.dim,
            )?,
            fc1: conv1x1_linear(&w.pp(format!("{n}.fc1")), self.dim, self.hidden)?,
            fc2: conv1x1_linear(&w.pp(format!("{n}.fc2")), self.hidden, self.dim)?,
        })
    }
}

enum BlockPlan {
    RepMixer {
        name: String,
        dim: usize,
        mixer: RepMixerPlan,
        mlp: MlpPlan,
    },
    Attention {
        name: String,
        dim: usize,
        mlp: MlpPlan,
    },
}

impl BlockPlan {
    fn pieces(&self, v: &mut Vec<Piece>) {
        let ls = |v: &mut Vec<Piece>, name: String, dim: usize| {
            v.push(Piece::Param(
                name,
                vec![dim, 1, 1],
                Init::Constant(LAYER_SCALE_INIT),
            ))
        };
        match self {
            BlockPlan::RepMixer {
                name,
                dim,
                mixer,
                mlp,
            } => {
                mixer.pieces(v);
                mlp.pieces(v);
                ls(v, format!("{name}.layer_scale.gamma"), *dim);
            }
            BlockPlan::Attention { name, dim, mlp } => {
                v.push(Piece::Bn(format!("{name}.norm"), *dim));
                let t = format!("{name}.token_mixer");
                v.push(Piece::Param(
                    format!("{t}.qkv.weight"),
                    vec![3 * dim, *dim],
                    Init::TruncNormal(0.02),
                ));
                v.push(Piece::Param(
                    format!("{t}.proj.weight"),
                    vec![*dim, *dim],
                    Init::TruncNormal(0.02),
                ));
                v.push(Piece::Param(
                    format!("{t}.proj.bias"),
                    vec![*dim],
                    Init::Zeros,
                ));
                ls(v, format!("{name}.layer_scale_1.gamma"), *dim);
                mlp.pieces(v);
                ls(v, format!("{name}.layer_scale_2.gamma"), *dim);
            }
        }
    }

    fn load(&self, w: &Weights, state: &Weights) -> Result<Block> {
        Ok(match self {
            BlockPlan::RepMixer {
                name,
                dim,
                mixer,
                mlp,
            } => Block::RepMixer {
                mixer: mixer.load(w, state)?,
                mlp: mlp.load(w, state)?,
                gamma: w.get((*dim, 1, 1), &format!("{name}.layer_scale.gamma"))?,
            },
            BlockPlan::Attention { name, dim, mlp } => {
                let t = w.pp(format!("{name}.token_mixer"));
                Block::Attention {
                    norm: bn(w, state, &format!("{name}.norm"), *dim)?,
                    attn: Attention::new(
                        super::layers::linear(&t.pp("qkv"), *dim, 3 * dim, false)?,
                        super::layers::linear(&t.pp("proj"), *dim, *dim, true)?,
                        dim / HEAD_DIM,
                        HEAD_DIM,
                    ),
                    gamma1: w.get((*dim, 1, 1), &format!("{name}.layer_scale_1.gamma"))?,
                    mlp: mlp.load(w, state)?,
                    gamma2: w.get((*dim, 1, 1), &format!("{name}.layer_scale_2.gamma"))?,
                }
            }
        })
    }
}

struct StagePlan {
    downsample: Option<(LargeKernelPlan, MobileOnePlan)>,
    pos_emb: Option<RepCpePlan>,
    blocks: Vec<BlockPlan>,
}

struct Plan {
    stem: Vec<MobileOnePlan>,
    stages: Vec<StagePlan>,
    final_conv: MobileOnePlan,
}

impl Plan {
    fn pieces(&self, v: &mut Vec<Piece>) {
        for m in &self.stem {
            m.pieces(v);
        }
        for s in &self.stages {
            if let Some((lk, m)) = &s.downsample {
                lk.pieces(v);
                m.pieces(v);
            }
            if let Some(p) = &s.pos_emb {
                p.pieces(v);
            }
            for b in &s.blocks {
                b.pieces(v);
            }
        }
        self.final_conv.pieces(v);
    }

    /// Every `reparam_conv` of the inference form: the training form's modules loaded from
    /// `w` and folded ([`Branches::folded`], [`RepMixer::folded`], [`pos_emb_folded`]).
    fn fuse(&self, w: &Weights) -> Result<Vec<(String, ConvBias)>> {
        let mut out = Vec::new();
        let mobile = |m: &MobileOnePlan| -> Result<(String, ConvBias)> {
            Ok((m.name.clone(), m.load(w, w)?.branches.folded()?))
        };
        for m in &self.stem {
            out.push(mobile(m)?);
        }
        for s in &self.stages {
            if let Some((lk, m)) = &s.downsample {
                out.push((lk.name.clone(), lk.load(w, w)?.folded()?));
                out.push(mobile(m)?);
            }
            if let Some(p) = &s.pos_emb {
                out.push((p.name.clone(), pos_emb_folded(&p.load(w)?)?));
            }
            for b in &s.blocks {
                if let BlockPlan::RepMixer { mixer, .. } = b {
                    out.push((mixer.name.clone(), mixer.load(w, w)?.folded()?));
                }
            }
        }
        out.push(mobile(&self.final_conv)?);
        Ok(out)
    }
}

/// The identity as a grouped convolution kernel `[c, c / groups, k, k]`.
fn identity_kernel(c: usize, groups: usize, k: usize) -> Result<Tensor> {
    let per = c / groups;
    let mut v = vec![0f32; c * per * k * k];
    for i in 0..c {
        v[((i * per + i % per) * k + k / 2) * k + k / 2] = 1.0;
    }
    Ok(Tensor::from_vec(v, (c, per, k, k), &Device::Cpu)?)
}

/// RepMixer's `x + g * (mixer(x) - norm(x))` as one depthwise convolution, from the mixer's
/// and the norm's folded (kernel, bias) and the layer scale `g` `[dim, 1, 1]`.
fn fold_repmixer(
    (mk, mb): (Tensor, Tensor),
    (nk, nb): (Tensor, Tensor),
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let g = g.to_dtype(DType::F32)?;
    let id = identity_kernel(g.dim(0)?, g.dim(0)?, mk.dim(3)?)?;
    let k = (id + (mk - nk)?.broadcast_mul(&g.unsqueeze(3)?)?)?;
    let b = (mb - nb)?.mul(&g.flatten_all()?)?;
    Ok((k, b))
}

/// The position encoding as one convolution: the training form's residual `x + conv(x)`
/// folded into the kernel; the inference form as it is.
fn pos_emb_folded((conv, residual): &(ConvBias, bool)) -> Result<ConvBias> {
    Ok(if *residual {
        ConvBias {
            weight: plus_identity(&conv.weight)?,
            ..conv.clone()
        }
    } else {
        conv.clone()
    })
}

/// A depthwise kernel `[c, 1, k, k]` plus the identity (a residual folded in).
fn plus_identity(kernel: &Tensor) -> Result<Tensor> {
    let (c, k) = (kernel.dim(0)?, kernel.dim(3)?);
    Ok((identity_kernel(c, c, k)? + kernel.to_dtype(DType::F32)?)?)
}

/// Zero-pad a `[o, i, s, s]` kernel to `[o, i, k, k]`, centred.
fn pad_kernel(kernel: &Tensor, k: usize) -> Result<Tensor> {
    let p = (k - kernel.dim(3)?) / 2;
    Ok(kernel.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?)
}

fn sum_parts(parts: Vec<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
    let mut it = parts.into_iter();
    let (mut k, mut b) = it
        .next()
        .ok_or_else(|| Error::Invalid("a block without branches".into()))?;
    for (k2, b2) in it {
        k = (k + k2)?;
        b = (b + b2)?;
    }
    Ok((k, b))
}

fn bn(w: &Weights, state: &Weights, name: &str, c: usize) -> Result<BatchNorm2d> {
    BatchNorm2d::load(&w.pp(name), &state.pp(name), c, BN_EPS)
}

/// timm's `ConvNormAct` without activation, named `{name}.conv` / `{name}.bn`.
fn conv_bn(
    w: &Weights,
    state: &Weights,
    name: &str,
    shape: [usize; 4],
    stride: usize,
    groups: usize,
) -> Result<ConvBn> {
    let (conv, norm) = (format!("{name}.conv"), format!("{name}.bn"));
    ConvBn::load(w, state, &conv, &norm, shape, stride, groups)
}

/// A convolution with bias (the inference form's `reparam_conv`).
#[derive(Clone)]
struct ConvBias {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    groups: usize,
}

impl ConvBias {
    fn load(w: &Weights, shape: [usize; 4], stride: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(shape.as_slice(), "weight")?,
            bias: w.get(shape[0], "bias")?,
            stride,
            groups,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(3)?;
        let y = conv2d(x, &self.weight, k / 2, self.stride, self.groups)?;
        Ok(crate::kernels::channel_bias(&y, &self.bias)?)
    }

    /// The convolution as an ONNX node reading `x` of side `input_hw`; the output and its side.
    fn onnx(&self, g: &mut Graph, x: &str, hw: Side) -> Result<(String, Side)> {
        let k = self.weight.dim(3)?;
        let side = |n: usize| (n + 2 * (k / 2) - k) / self.stride + 1;
        let y = g.conv(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            k / 2,
            self.groups,
        )?;
        Ok((y, (side(hw.0), side(hw.1))))
    }
}

/// A map's (height, width) while an ONNX graph is built.
type Side = (usize, usize);

/// Summed branches (training form) or their single fused convolution.
enum Branches {
    Train {
        /// kernel size, stride and groups of the fused convolution
        k: usize,
        stride: usize,
        groups: usize,
        identity: Option<BatchNorm2d>,
        kxk: Option<ConvBn>,
        scale: Option<ConvBn>,
    },
    Fused(ConvBias),
}

impl Branches {
    /// The branches' sum and `act` after it (one node on the CPU, see
    /// [`crate::kernels::sum_act`]).
    fn forward_act(&self, x: &Tensor, train: bool, act: Act) -> Result<Tensor> {
        match self {
            Branches::Fused(c) => Ok(crate::kernels::sum_act(&[&c.forward(x)?], act)?),
            Branches::Train {
                identity,
                kxk,
                scale,
                ..
            } => {
                let mut outs = Vec::new();
                if let Some(b) = identity {
                    outs.push(b.forward(x, train)?);
                }
                if let Some(c) = scale {
                    outs.push(c.forward(x, train)?);
                }
                if let Some(c) = kxk {
                    outs.push(c.forward(x, train)?);
                }
                if outs.is_empty() {
                    return Err(Error::Invalid("a block without branches".into()));
                }
                Ok(crate::kernels::sum_act(
                    &outs.iter().collect::<Vec<_>>(),
                    act,
                )?)
            }
        }
    }
}

impl Branches {
    /// The one convolution equal to the branches in evaluation (the re-parameterisation).
    fn folded(&self) -> Result<ConvBias> {
        match self {
            Branches::Fused(c) => Ok(c.clone()),
            Branches::Train {
                k,
                stride,
                groups,
                identity,
                kxk,
                scale,
            } => {
                let mut parts = Vec::new();
                if let Some(b) = identity {
                    parts.push(b.fold_into(&identity_kernel(b.channels()?, *groups, *k)?)?);
                }
                if let Some(c) = kxk {
                    parts.push(c.folded()?);
                }
                if let Some(c) = scale {
                    let (w, b) = c.folded()?;
                    parts.push((pad_kernel(&w, *k)?, b));
                }
                let (weight, bias) = sum_parts(parts)?;
                Ok(ConvBias {
                    weight,
                    bias,
                    stride: *stride,
                    groups: *groups,
                })
            }
        }
    }
}

/// `x * gamma` with `gamma` `[C, 1, 1]`.
fn onnx_layer_scale(g: &mut Graph, x: &str, gamma: &Tensor) -> Result<String> {
    let c = g.constant("gamma", gamma)?;
    Ok(g.node("Mul", &[x, &c], vec![]))
}

struct MobileOne {
    branches: Branches,
    se: Option<(Linear, Linear)>,
    act: bool,
}

impl MobileOne {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let act = if self.act { Act::Gelu } else { Act::Identity };
        let Some((fc1, fc2)) = &self.se else {
            return self.branches.forward_act(x, train, act);
        };
        let y = self.branches.forward_act(x, train, Act::Identity)?;
        let s = y.mean(3)?.mean(2)?;
        let gate = candle_nn::ops::sigmoid(&fc2.forward(&fc1.forward(&s)?.relu()?)?)?;
        let y = y.broadcast_mul(&gate.unsqueeze(2)?.unsqueeze(3)?)?;
        Ok(if self.act { gelu_erf(&y)? } else { y })
    }

    /// The block, re-parameterised, as ONNX nodes.
    fn onnx(&self, g: &mut Graph, x: &str, hw: Side) -> Result<(String, Side)> {
        let (mut y, side) = self.branches.folded()?.onnx(g, x, hw)?;
        if let Some((fc1, fc2)) = &self.se {
            let s = g.node("GlobalAveragePool", &[&y], vec![]);
            let s = fc1.onnx_pointwise(g, &s)?;
            let s = g.node("Relu", &[&s], vec![]);
            let s = fc2.onnx_pointwise(g, &s)?;
            let gate = g.node("Sigmoid", &[&s], vec![]);
            y = g.node("Mul", &[&y, &gate], vec![]);
        }
        if self.act {
            y = Activation::Gelu.onnx(g, &y)?;
        }
        Ok((y, side))
    }
}

enum RepMixer {
    Train(Box<RepMixerBranches>),
    Fused(ConvBias),
}

struct RepMixerBranches {
    norm: MobileOne,
    mixer: MobileOne,
    gamma: Tensor,
}

impl RepMixer {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            RepMixer::Fused(c) => c.forward(x),
            RepMixer::Train(b) => {
                if train {
                    if let Some(y) = b.fused_train(x)? {
                        return Ok(y);
                    }
                }
                let d = (b.mixer.forward(x, train)? - b.norm.forward(x, train)?)?;
                Ok((x + layer_scale(&d, &b.gamma)?)?)
            }
        }
    }
}

impl RepMixerBranches {
    /// The training forward as one node where it applies (CPU f32 with a
    /// [`crate::kernels::FusedGradients`] alive; see [`crate::kernels::repmixer_train`]), the
    /// BatchNorms' running estimates moved as the composed forward moves them.
    fn fused_train(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (
            Branches::Train {
                stride: 1,
                identity: Some(id),
                kxk: Some(kxk),
                scale: Some(sc),
                ..
            },
            Branches::Train {
                identity: Some(norm),
                kxk: None,
                scale: None,
                ..
            },
        ) = (&self.mixer.branches, &self.norm.branches)
        else {
            return Ok(None);
        };
        let plain = |m: &MobileOne| m.se.is_none() && !m.act;
        let (Some((kw, kbn)), Some((sw, sbn))) = (kxk.linear_parts(), sc.linear_parts()) else {
            return Ok(None);
        };
        let eps = id.eps();
        if !plain(&self.mixer)
            || !plain(&self.norm)
            || [norm, kbn, sbn].iter().any(|b| b.eps() != eps)
        {
            return Ok(None);
        }
        let p = crate::kernels::RepMixerParams {
            norm: norm.affine(),
            identity: id.affine(),
            conv: kw.clone(),
            conv_bn: kbn.affine(),
            scale: sw.clone(),
            scale_bn: sbn.affine(),
            gamma: self.gamma.clone(),
            eps: eps as f32,
        };
        let Some((y, stats)) = crate::kernels::repmixer_train(x, &p)? else {
            return Ok(None);
        };
        let (b, c, h, w) = x.dims4()?;
        let count = b * h * w;
        for (bn, s) in [(norm, 0), (id, 0), (kbn, 1), (sbn, 2)] {
            bn.track(&stats[s], count)?;
        }
        // the two convolutions: k x k taps and one per output value
        crate::macs::add(b * c * h * w * (kw.elem_count() / c.max(1) + 1));
        Ok(Some(y))
    }
}

impl RepMixer {
    /// The mixer as one depthwise convolution (the re-parameterisation).
    fn folded(&self) -> Result<ConvBias> {
        match self {
            RepMixer::Fused(c) => Ok(c.clone()),
            RepMixer::Train(b) => {
                let m = b.mixer.branches.folded()?;
                let n = b.norm.branches.folded()?;
                let (weight, bias) =
                    fold_repmixer((m.weight, m.bias), (n.weight, n.bias), &b.gamma)?;
                Ok(ConvBias { weight, bias, ..m })
            }
        }
    }
}

fn layer_scale(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::channel_scale(x, gamma)?)
}

struct Mlp {
    conv: ConvBn,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// `x + gamma * mlp(x)` in training mode.
    fn residual(&self, x: &Tensor, gamma: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            if let Some(y) = self.fused_train(x, gamma)? {
                return Ok(y);
            }
        }
        Ok((x + layer_scale(&self.forward(x, train)?, gamma)?)?)
    }

    /// The residual MLP in training mode as one node where it applies (see
    /// [`crate::kernels::conv_mlp_train`]).
    fn fused_train(&self, x: &Tensor, gamma: &Tensor) -> Result<Option<Tensor>> {
        let Some((kw, bn)) = self.conv.linear_parts() else {
            return Ok(None);
        };
        let (Some(b1), Some(b2)) = (&self.fc1.bias, &self.fc2.bias) else {
            return Ok(None);
        };
        let p = crate::kernels::ConvMlpParams {
            conv: kw.clone(),
            bn: bn.affine(),
            fc1: (self.fc1.weight.clone(), b1.clone()),
            fc2: (self.fc2.weight.clone(), b2.clone()),
            gamma: gamma.clone(),
            eps: bn.eps() as f32,
        };
        let Some((y, stats)) = crate::kernels::conv_mlp_train(x, &p)? else {
            return Ok(None);
        };
        let (b, c, h, w) = x.dims4()?;
        bn.track(&stats, b * h * w)?;
        let hidden = self.fc1.weight.dim(0)?;
        crate::macs::add(b * c * h * w * (kw.elem_count() / c.max(1) + 2 * hidden));
        Ok(Some(y))
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.conv.forward(x, train)?;
        // a 1x1 convolution, its bias and the activation after it (bias + GELU in one pass)
        let pointwise_act = |l: &Linear, x: &Tensor, act: Act| -> Result<Tensor> {
            let y = pointwise(x, &l.weight)?;
            Ok(match (&l.bias, act) {
                (Some(b), _) => channel_bias_act(&y, b, act)?,
                (None, Act::Gelu) => gelu_erf(&y)?,
                (None, _) => y,
            })
        };
        let h = pointwise_act(&self.fc1, &x, Act::Gelu)?;
        pointwise_act(&self.fc2, &h, Act::Identity)
    }

    fn onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let x = self.conv.onnx(g, x)?;
        let h = self.fc1.onnx_pointwise(g, &x)?;
        let h = Activation::Gelu.onnx(g, &h)?;
        self.fc2.onnx_pointwise(g, &h)
    }
}

enum Block {
    RepMixer {
        mixer: RepMixer,
        mlp: Mlp,
        gamma: Tensor,
    },
    Attention {
        norm: BatchNorm2d,
        attn: Attention,
        gamma1: Tensor,
        mlp: Mlp,
        gamma2: Tensor,
    },
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::RepMixer { mixer, mlp, gamma } => {
                let x = mixer.forward(x, train)?;
                mlp.residual(&x, gamma, train)
            }
            Block::Attention {
                norm,
                attn,
                gamma1,
                mlp,
                gamma2,
            } => {
                let (b, c, h, w) = x.dims4()?;
                let t = crate::kernels::swap_inner(&norm.forward(x, train)?.flatten_from(2)?)?;
                let a = attn.forward(&t)?.transpose(1, 2)?.reshape((b, c, h, w))?;
                let x = (x + layer_scale(&a, gamma1)?)?;
                mlp.residual(&x, gamma2, train)
            }
        }
    }

    /// The block (its token mixer re-parameterised) as ONNX nodes reading `x` of side `input_hw`.
    fn onnx(&self, g: &mut Graph, x: &str, hw: Side) -> Result<String> {
        let residual_mlp = |g: &mut Graph, x: &str, mlp: &Mlp, gamma: &Tensor| {
            let m = mlp.onnx(g, x)?;
            let m = onnx_layer_scale(g, &m, gamma)?;
            Ok::<_, Error>(g.node("Add", &[x, &m], vec![]))
        };
        match self {
            Block::RepMixer { mixer, mlp, gamma } => {
                let (x, _) = mixer.folded()?.onnx(g, x, hw)?;
                residual_mlp(g, &x, mlp, gamma)
            }
            Block::Attention {
                norm,
                attn,
                gamma1,
                mlp,
                gamma2,
            } => {
                let c = gamma1.dim(0)? as i64;
                let (h, w) = (hw.0 as i64, hw.1 as i64);
                let t = norm.onnx(g, x)?;
                let t = g.reshape(&t, &[0, c, h * w])?;
                let t = g.transpose(&t, &[0, 2, 1]);
                let a = attn.onnx(g, &t)?;
                let a = g.transpose(&a, &[0, 2, 1]);
                let a = g.reshape(&a, &[0, c, h, w])?;
                let a = onnx_layer_scale(g, &a, gamma1)?;
                let x = g.node("Add", &[x, &a], vec![]);
                residual_mlp(g, &x, mlp, gamma2)
            }
        }
    }
}

struct Stage {
    downsample: Option<(Branches, MobileOne)>,
    /// the position encoding and whether it adds its input (training form)
    pos_emb: Option<(ConvBias, bool)>,
    blocks: Vec<Block>,
}

/// A built FastViT.
pub struct FastVit {
    dims: [usize; 4],
    stem: Vec<MobileOne>,
    stages: Vec<Stage>,
    final_conv: MobileOne,
    head: Head,
}

impl Backbone for FastVit {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        super::backbone::pyramid(&self.dims, 4)
    }

    fn forward_intermediates(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = pixels.clone();
        for m in &self.stem {
            x = m.forward(&x, train)?;
        }
        let mut out = Vec::with_capacity(4);
        for s in &self.stages {
            if let Some((lk, m)) = &s.downsample {
                x = m.forward(&lk.forward_act(&x, train, Act::Identity)?, train)?;
            }
            if let Some((pe, residual)) = &s.pos_emb {
                let y = pe.forward(&x)?;
                x = if *residual { (y + &x)? } else { y };
            }
            for b in &s.blocks {
                x = b.forward(&x, train)?;
            }
            out.push(x.clone());
        }
        Ok(out)
    }

    fn pool(&self, last: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.final_conv.forward(last, train)?;
        Ok(y.mean(3)?.mean(2)?)
    }

    /// The re-parameterised (inference) form whichever form was loaded: every multi-branch
    /// block is one convolution.
    fn onnx_intermediates(&self, g: &mut Graph, x: &str) -> Result<Vec<String>> {
        let mut side = g.input_hw();
        let mut x = x.to_string();
        for m in &self.stem {
            (x, side) = m.onnx(g, &x, side)?;
        }
        let mut out = Vec::with_capacity(4);
        for s in &self.stages {
            if let Some((lk, m)) = &s.downsample {
                (x, side) = lk.folded()?.onnx(g, &x, side)?;
                (x, side) = m.onnx(g, &x, side)?;
            }
            if let Some(pe) = &s.pos_emb {
                (x, side) = pos_emb_folded(pe)?.onnx(g, &x, side)?;
            }
            for b in &s.blocks {
                x = b.onnx(g, &x, side)?;
            }
            out.push(x.clone());
        }
        Ok(out)
    }

    fn onnx_pool(&self, g: &mut Graph, last: &str) -> Result<String> {
        // the final convolution keeps the side (3x3, stride 1)
        let (y, _) = self.final_conv.onnx(g, last, (1, 1))?;
        Ok(g.global_pool(&y))
    }

    fn head(&self) -> &Head {
        &self.head
    }
}

impl BackboneSpec for FastVitSpec {
    fn arch_name(&self) -> String {
        if self.fused {
            format!("{} (reparameterized)", self.arch)
        } else {
            self.arch.clone()
        }
    }

    fn with_classes(&self, classes: usize) -> Result<Box<dyn BackboneSpec>> {
        Ok(Box::new(Self {
            num_classes: classes,
            ..self.clone()
        }))
    }

    fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = Vec::new();
        for piece in self.pieces() {
            match piece {
                Piece::ConvBn(name, shape) => {
                    p.push((
                        format!("{name}.conv.weight"),
                        shape.to_vec(),
                        conv_init(&shape),
                    ));
                    p.push((format!("{name}.bn.weight"), vec![shape[0]], Init::Ones));
                    p.push((format!("{name}.bn.bias"), vec![shape[0]], Init::Zeros));
                }
                Piece::Bn(name, c) => {
                    p.push((format!("{name}.weight"), vec![c], Init::Ones));
                    p.push((format!("{name}.bias"), vec![c], Init::Zeros));
                }
                Piece::Param(name, shape, init) => p.push((name, shape, init)),
            }
        }
        p
    }

    fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut b = Vec::new();
        for piece in self.pieces() {
            let (name, c) = match piece {
                Piece::ConvBn(name, shape) => (format!("{name}.bn"), shape[0]),
                Piece::Bn(name, c) => (name, c),
                Piece::Param(..) => continue,
            };
            b.push((format!("{name}.running_mean"), vec![c], Init::Zeros));
            b.push((format!("{name}.running_var"), vec![c], Init::Ones));
        }
        b
    }

    fn build(&self, w: &Weights, state: &Weights) -> Result<Box<dyn Backbone>> {
        let plan = self.plan();
        let stem = plan
            .stem
            .iter()
            .map(|m| m.load(w, state))
            .collect::<Result<_>>()?;
        let mut stages = Vec::new();
        for s in &plan.stages {
            stages.push(Stage {
                downsample: s
                    .downsample
                    .as_ref()
                    .map(|(lk, m)| -> Result<_> { Ok((lk.load(w, state)?, m.load(w, state)?)) })
                    .transpose()?,
                pos_emb: s.pos_emb.as_ref().map(|p| p.load(w)).transpose()?,
                blocks: s
                    .blocks
                    .iter()
                    .map(|b| b.load(w, state))
                    .collect::<Result<_>>()?,
            });
        }
        Ok(Box::new(FastVit {
            dims: self.embed_dims,
            stem,
            stages,
            final_conv: plan.final_conv.load(w, state)?,
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

/// Fold a training-form FastViT's tensors (parameters and BatchNorm statistics, by timm name)
/// into the inference form: every MobileOne block, RepMixer, large-kernel patch embedding and
/// position encoding becomes one convolution with bias (`reparam_conv`), as timm's
/// `reparameterize()` does. Returns the inference-form spec and its tensors (f32).
pub fn reparameterize(
    spec: &FastVitSpec,
    tensors: &HashMap<String, Tensor>,
) -> Result<(FastVitSpec, HashMap<String, Tensor>)> {
    if spec.fused {
        return Err(Error::Invalid(format!(
            "{} is already reparameterized (inference form); nothing to fold",
            spec.arch
        )));
    }
    let w = Weights::from_tensors(tensors.clone(), std::path::Path::new(&spec.arch))?;
    let fused_convs: HashMap<String, ConvBias> = spec.plan().fuse(&w)?.into_iter().collect();
    let fused = FastVitSpec {
        fused: true,
        ..spec.clone()
    };
    let mut out = HashMap::new();
    for (name, _, _) in fused.parameters().into_iter().chain(fused.buffers()) {
        let value = match name.strip_suffix(".reparam_conv.weight") {
            Some(block) => fused_convs.get(block).map(|c| c.weight.clone()),
            None => match name.strip_suffix(".reparam_conv.bias") {
                Some(block) => fused_convs.get(block).map(|c| c.bias.clone()),
                None => Some(w.get_any(&name)?),
            },
        };
        let value = value.ok_or_else(|| Error::Invalid(format!("no fused value for {name}")))?;
        out.insert(name, value.to_dtype(DType::F32)?);
    }
    Ok((fused, out))
}

/// Fold the training-form FastViT at `model` (a timm folder or hub id) into its inference form
/// and write it to the folder `out` as a timm folder of its own (`config.json` with
/// `model_args.inference_mode = true`, `model.safetensors`), both written atomically.
/// Returns the folded spec.
pub fn reparameterize_folder(model: &str, out: &std::path::Path) -> Result<FastVitSpec> {
    let files = super::resolve(model)?;
    let cfg = Cfg::read(&files.config)?;
    let w = files.open_weights(DType::F32, &Device::Cpu)?;
    let spec = spec_of_config(&cfg, &w).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: architecture {:?} is not a FastViT (only FastViT has a training form to fold)",
            files.config.display(),
            cfg.string("architecture", "").unwrap_or_default()
        ))
    })??;
    let mut tensors = HashMap::new();
    for p in &files.weights {
        tensors.extend(
            candle_core::safetensors::load(p, &Device::Cpu)
                .map_err(|e| Error::io(p, crate::weights::clean_candle_msg(&e)))?,
        );
    }
    let (fused, folded) = reparameterize(&spec, &tensors)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut config = cfg.value.clone();
    if let Some(obj) = config.as_object_mut() {
        let args = obj
            .entry("model_args")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(a) = args.as_object_mut() {
            a.insert("inference_mode".into(), serde_json::Value::Bool(true));
        }
    }
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
    crate::atomic::write_safetensors(&folded, &out.join("model.safetensors"))?;
    crate::atomic::write_bytes(&out.join("config.json"), text.as_bytes())?;
    Ok(fused)
}

/// The registry's resolver.
pub fn resolve(name: &str, input_hw: (usize, usize)) -> Option<Box<dyn BackboneSpec>> {
    FastVitSpec::named(name, input_hw).map(|s| Box::new(s) as Box<dyn BackboneSpec>)
}

/// A timm hub config of a FastViT: `architecture` (`fastvit_t8.apple_in1k`), optional
/// `model_args` (`layers`, `embed_dims`, `mlp_ratios`, `inference_mode` for the
/// reparameterized form), `pretrained_cfg`; the classifier's size is read off the checkpoint.
pub fn from_config(cfg: &Cfg, w: &Weights) -> Option<Result<Box<dyn BackboneSpec>>> {
    spec_of_config(cfg, w).map(|r| r.map(|s| Box::new(s) as Box<dyn BackboneSpec>))
}

/// [`from_config`] with the concrete spec.
pub fn spec_of_config(cfg: &Cfg, w: &Weights) -> Option<Result<FastVitSpec>> {
    let spec = super::backbone::timm_spec(cfg, "fastvit", "FastViT", NAMES, |b| {
        FastVitSpec::named(b, (256, 256))
    })?;
    Some(spec.and_then(|s| configure(s, cfg, w)))
}

fn configure(mut spec: FastVitSpec, cfg: &Cfg, w: &Weights) -> Result<FastVitSpec> {
    if let Some(args) = cfg.sub("model_args") {
        spec.layers = super::backbone::four_positive(&args, "layers", spec.layers)?;
        spec.embed_dims = super::backbone::four_positive(&args, "embed_dims", spec.embed_dims)?;
        if let Some(r) = args.f32_list("mlp_ratios")? {
            args.ensure(r.len() == 4 && r.iter().all(|&x| x > 0.0), || {
                "model_args.mlp_ratios must be 4 positive numbers".to_string()
            })?;
            spec.mlp_ratios = [r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64];
        }
        spec.fused = args.bool("inference_mode", false)?;
        for (i, &d) in spec.embed_dims.iter().enumerate() {
            args.ensure(!spec.attention[i] || d % HEAD_DIM == 0, || {
                format!("model_args.embed_dims[{i}] = {d} must be a multiple of {HEAD_DIM} (attention heads)")
            })?;
        }
        let mut prev = spec.embed_dims[0];
        for (i, &d) in spec.embed_dims.iter().enumerate() {
            args.ensure(d % prev == 0, || {
                format!("model_args.embed_dims[{i}] = {d} must be a multiple of the previous width {prev} (grouped patch embedding)")
            })?;
            prev = d;
        }
    }
    spec.num_classes = super::backbone::classes_in(w, "head.fc.weight");
    spec.data = TimmDataConfig::from_cfg(cfg, spec.data)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_timm() {
        // timm 1.0.31, 1000 classes: sum(p.numel() for p in model.parameters())
        for (name, want) in [
            ("fastvit_t8", 4_026_232usize),
            ("fastvit_t12", 7_553_704),
            ("fastvit_s12", 9_473_576),
            ("fastvit_sa12", 11_580_968),
        ] {
            let mut s = FastVitSpec::named(name, (256, 256)).unwrap();
            s.num_classes = 1000;
            assert_eq!(
                super::super::backbone::count(&s.parameters()),
                want,
                "{name}"
            );
        }
    }
}
