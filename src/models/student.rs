//! The SAK student (SPEC.md section 2): a Teacher-Agnostic Stem shared by all teachers and one
//! Teacher-Specific Adapter Path per teacher. The stem runs once per batch; the paths only read
//! its outputs.
//!
//! - **ViT stem** (the paper's: plain ViT/16 in timm naming, final norm removed): L+1 adapters
//!   chained `R_0 = a_0(X_0)`, `R_l = a_l(R_{l-1} + X_l)` over the stem's block outputs.
//! - **Any registered backbone** (`resnet50`, `mobilevitv2_100`, `fastvit_t8`, ...): its pyramid
//!   levels differ in width and stride, so the chain has no counterpart; each distilled level k
//!   gets its own adapter `R_k = a_k(X_k)` at the level's width, applied per position.
//!
//! Then per (level, teacher) a LayerNorm over channels and, when widths differ, a training-only
//! aligner Linear to the teacher's width.
//!
//! Parameter names: `stem.*` (timm names of the stem), `tsap.{t}.adapters.{l}.{down,up}.{weight,bias}`,
//! `tsap.{t}.adapters.{l}.scale`, `tsap.{t}.norms.{k}.{weight,bias}`,
//! `tsap.{t}.aligners.{k}.{weight,bias}` (dropped at export); a student trained on normalised
//! targets (`target_norm`) exports `tsap.{t}.outputs.{k}.{weight,bias}`: the aligner with the
//! inverse normalisation folded in, mapping its features back to the teacher's scale. A
//! backbone stem's BatchNorm running statistics are buffers `stem.*.running_{mean,var}`.

use super::backbone::{Backbone, BackboneSpec, FeatureInfo, ViTSpec};
use super::encoder::{TokenEncoder, VitArch};
use super::layers::{LayerNorm, Linear};
use super::{evenly_spaced_blocks, FeatureRequest, VisionEncoder};
use crate::error::{Error, Result};
use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
use crate::target_norm::TargetNorm;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// A teacher as the student sees it: a name (for logs and outputs) and its feature width.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherSlot {
    pub name: String,
    pub dim: usize,
}

/// A backbone of a registered family as the student's stem: its architecture and pyramid
/// (recorded so that `student.json` describes the parameters without building the network;
/// checked on build).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetStem {
    /// the registry's name (`resnet18`, `mobilevitv2_100`, `fastvit_t8`, ...), or the timm
    /// architecture `model_args` configure
    pub backbone: String,
    /// timm's `model_args` of a stem whose widths or depths are not the registered name's (a
    /// timm folder's `config.json` holds them); absent for a registered name
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_args: Option<serde_json::Value>,
    /// every level of its pyramid, in `forward_intermediates` order
    pub pyramid: Vec<FeatureInfo>,
}

impl NetStem {
    /// The backbone at input `input_hw`, without a classifier.
    pub fn spec(&self, input_hw: (usize, usize)) -> Result<Box<dyn BackboneSpec>> {
        let name = &self.backbone;
        if let Some(args) = &self.model_args {
            let at = std::path::Path::new("student.json (model_args)");
            return super::backbone::spec_from_args(name, args, input_hw, at);
        }
        registered_stem(name, input_hw)?.ok_or_else(|| {
            Error::Invalid(format!(
                "unknown student {name:?} (known: {})",
                super::backbone::names().join(", ")
            ))
        })
    }

    /// The stem a backbone built from `name` (configured by timm's `model_args` when its
    /// widths are not the registered name's) makes: its pyramid, and its preprocessing's mean
    /// and std.
    pub fn of(
        name: &str,
        model_args: Option<serde_json::Value>,
        net: &dyn Backbone,
    ) -> (StemArch, InputNorm) {
        let p = net.preprocess();
        let stem = NetStem {
            backbone: name.to_string(),
            model_args,
            pyramid: net.feature_info(),
        };
        (StemArch::Backbone(stem), (p.mean, p.std))
    }

    /// The stem's name for messages (`resnet50`; `resnet18 (custom widths)`).
    pub fn describe(&self) -> String {
        match self.model_args {
            Some(_) => format!("{} (custom widths)", self.backbone),
            None => self.backbone.clone(),
        }
    }
}

/// The registered backbone `name` at input `input_hw` without a classifier; None when `name` is not
/// registered.
pub fn registered_stem(
    name: &str,
    input_hw: (usize, usize),
) -> Result<Option<Box<dyn BackboneSpec>>> {
    super::backbone::spec(name, input_hw)
        .map(|s| s.with_classes(0))
        .transpose()
}

/// An input normalisation: per-channel mean and std.
pub type InputNorm = ([f32; 3], [f32; 3]);

/// What the stem is. Stored flat in `student.json`: a backbone stem by its `backbone` and
/// `pyramid` keys, a ViT stem by its architecture's keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StemArch {
    Backbone(NetStem),
    Vit(VitArch),
}

impl From<VitArch> for StemArch {
    fn from(a: VitArch) -> Self {
        StemArch::Vit(a)
    }
}

impl StemArch {
    /// The ViT architecture (None for a backbone).
    pub fn vit(&self) -> Option<&VitArch> {
        match self {
            StemArch::Vit(a) => Some(a),
            StemArch::Backbone(_) => None,
        }
    }

    /// A registered non-ViT backbone as a stem at input `input_hw` (built once at random init to read
    /// its pyramid), with its preprocessing's mean and std; None when `name` is not registered.
    pub fn backbone(name: &str, input_hw: (usize, usize)) -> Result<Option<(Self, InputNorm)>> {
        let Some(spec) = registered_stem(name, input_hw)? else {
            return Ok(None);
        };
        let (_, _, net) =
            crate::train::engine::random_backbone(spec.as_ref(), 0, &Device::Cpu, DType::F32)?;
        Ok(Some(NetStem::of(name, None, net.as_ref())))
    }
}

/// Everything needed to rebuild a student (saved as `student.json` next to its weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentSpec {
    /// the stem: a ViT's architecture (width, depth, heads, MLP width, patch, qkv bias, eps,
    /// activation, class/register tokens, layer scale) or a registered backbone, stored flat in
    /// `student.json`
    #[serde(flatten)]
    pub stem: StemArch,
    /// training resolution: a ViT stem's position table has the grid `image_size / patch`
    pub image_size: usize,
    /// non-square training resolution (height, width) overriding `image_size` (stage 2 on
    /// NYUD: 448x576); the position table then has that grid
    #[serde(default, alias = "image_hw", skip_serializing_if = "Option::is_none")]
    pub input_hw: Option<(usize, usize)>,
    pub teachers: Vec<TeacherSlot>,
    /// the distilled levels: 0-based blocks of a ViT stem, pyramid levels of a backbone stem
    pub levels: Vec<usize>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// how the distillation targets were normalised (the exported output projections undo it)
    #[serde(default, skip_serializing_if = "TargetNorm::is_none")]
    pub target_norm: TargetNorm,
}

/// Student stem presets (see [`super::backbone::vit_preset`]).
pub fn preset(name: &str) -> Option<VitArch> {
    super::backbone::vit_preset(name)
}

/// An adapter's bottleneck width for features `d` wide (SAK: D/4).
fn bottleneck(d: usize) -> usize {
    (d / 4).max(1)
}

impl StudentSpec {
    /// A student with `stem` trained at `image_size`, distilling 4 levels (SAK's; a backbone
    /// stem with fewer levels distils all of them), mean and std ImageNet's (a backbone stem's
    /// own: see [`StudentSpec::with_norm`]).
    pub fn new(
        stem: impl Into<StemArch>,
        image_size: usize,
        teachers: Vec<TeacherSlot>,
    ) -> Result<Self> {
        let stem = stem.into();
        let levels = match &stem {
            StemArch::Vit(arch) => {
                arch.validate()
                    .map_err(|m| Error::Invalid(format!("student stem: {m}")))?;
                let (dim, patch) = (arch.dim, arch.patch);
                if !dim.is_multiple_of(4) {
                    return Err(Error::Invalid(format!(
                        "student width {dim} must divide by 4 (adapter bottleneck)"
                    )));
                }
                if image_size < patch || !image_size.is_multiple_of(patch) {
                    return Err(Error::Invalid(format!(
                        "student image size {image_size} must be a positive multiple of the patch ({patch})"
                    )));
                }
                evenly_spaced_blocks(arch.depth, 4)
            }
            StemArch::Backbone(net) => {
                if net.pyramid.is_empty() {
                    return Err(Error::Invalid(format!(
                        "student {} has no feature levels",
                        net.describe()
                    )));
                }
                if image_size == 0 {
                    return Err(Error::Invalid("student image size must be positive".into()));
                }
                last_levels(net.pyramid.len(), 4)
            }
        };
        if teachers.is_empty() {
            return Err(Error::Invalid("at least one teacher is needed".into()));
        }
        Ok(Self {
            levels,
            stem,
            image_size,
            input_hw: None,
            teachers,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            target_norm: TargetNorm::None,
        })
    }

    /// The same student normalising its input with `mean` and `std`.
    pub fn with_norm(self, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self { mean, std, ..self }
    }

    /// The same student distilling `n` levels (SAK's 4 by default: evenly spaced blocks of a
    /// ViT, the last `n` levels of a backbone's pyramid): as many as each teacher gives (an
    /// ONNX teacher's one output is distilled at the last block).
    pub fn with_level_count(self, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid(
                "the teachers give no levels to distil".into(),
            ));
        }
        let levels = match &self.stem {
            StemArch::Vit(arch) => evenly_spaced_blocks(arch.depth, n),
            StemArch::Backbone(net) => {
                if n > net.pyramid.len() {
                    return Err(Error::Invalid(format!(
                        "the teachers give {n} levels but student {} has {} ({}); give the \
                         teachers fewer levels",
                        net.describe(),
                        net.pyramid.len(),
                        describe_levels(&net.pyramid)
                    )));
                }
                last_levels(net.pyramid.len(), n)
            }
        };
        Ok(Self { levels, ..self })
    }

    /// The ViT stem's architecture (None for a backbone stem).
    pub fn vit(&self) -> Option<&VitArch> {
        self.stem.vit()
    }

    /// The stem's name for messages (`vit 384x12 /16`, `resnet50`).
    pub fn stem_name(&self) -> String {
        match &self.stem {
            StemArch::Vit(a) => format!("vit {}x{} /{}", a.dim, a.depth, a.patch),
            StemArch::Backbone(n) => n.describe(),
        }
    }

    /// Width and stride of every distilled level.
    pub fn level_info(&self) -> Vec<FeatureInfo> {
        match &self.stem {
            StemArch::Vit(a) => vec![
                FeatureInfo {
                    channels: a.dim,
                    stride: a.patch,
                };
                self.levels.len()
            ],
            StemArch::Backbone(n) => self.levels.iter().map(|&l| n.pyramid[l]).collect(),
        }
    }

    /// Training input (height, width).
    pub fn input_hw(&self) -> (usize, usize) {
        self.input_hw.unwrap_or((self.image_size, self.image_size))
    }

    /// A ViT stem's position-table grid (rows, columns); None for a backbone stem.
    pub fn grid_hw(&self) -> Option<(usize, usize)> {
        let a = self.vit()?;
        let (h, w) = self.input_hw();
        Some((h / a.patch, w / a.patch))
    }

    /// A ViT stem as a backbone spec (a timm ViT without final norm).
    pub fn stem_spec(&self) -> Option<ViTSpec> {
        self.vit().map(|a| self.vit_spec(a))
    }

    fn vit_spec(&self, arch: &VitArch) -> ViTSpec {
        ViTSpec {
            arch: arch.clone(),
            input_hw: self.input_hw(),
            levels: self.levels.clone(),
            mean: self.mean,
            std: self.std,
            num_classes: 0,
        }
    }

    /// The stem's own parameters and buffers, named under `stem.`.
    #[allow(clippy::type_complexity)]
    fn stem_lists(
        &self,
    ) -> Result<(
        Vec<(String, Vec<usize>, Init)>,
        Vec<(String, Vec<usize>, Init)>,
    )> {
        Ok(match &self.stem {
            StemArch::Vit(a) => (self.vit_spec(a).parameters_under("stem."), Vec::new()),
            StemArch::Backbone(n) => {
                let spec = n.spec(self.input_hw())?;
                let under = |l: Vec<(String, Vec<usize>, Init)>| {
                    l.into_iter()
                        .map(|(name, s, i)| (format!("stem.{name}"), s, i))
                        .collect()
                };
                (under(spec.parameters()), under(spec.buffers()))
            }
        })
    }

    /// State that is saved but not trained (a backbone stem's BatchNorm statistics): name,
    /// shape, initial value.
    pub fn buffers(&self) -> Result<Vec<(String, Vec<usize>, Init)>> {
        Ok(self.stem_lists()?.1)
    }

    /// Every parameter: name, shape, initialiser.
    pub fn parameters(&self) -> Result<Vec<(String, Vec<usize>, Init)>> {
        let mut p = self.stem_lists()?.0;
        let lin = |p: &mut Vec<(String, Vec<usize>, Init)>,
                   name: String,
                   o: usize,
                   i: usize,
                   bias: bool| {
            p.push((
                format!("{name}.weight"),
                vec![o, i],
                Init::TruncNormal(0.02),
            ));
            if bias {
                p.push((format!("{name}.bias"), vec![o], Init::Zeros));
            }
        };
        let ln = |p: &mut Vec<(String, Vec<usize>, Init)>, name: String, dim: usize| {
            p.push((format!("{name}.weight"), vec![dim], Init::Ones));
            p.push((format!("{name}.bias"), vec![dim], Init::Zeros));
        };
        let info = self.level_info();
        for (t, teacher) in self.teachers.iter().enumerate() {
            for (l, d) in self.adapter_widths().into_iter().enumerate() {
                let ad = format!("tsap.{t}.adapters.{l}");
                lin(&mut p, format!("{ad}.down"), bottleneck(d), d, true);
                lin(&mut p, format!("{ad}.up"), d, bottleneck(d), true);
                p.push((format!("{ad}.scale"), vec![1], Init::Ones));
            }
            for (k, level) in info.iter().enumerate() {
                let d = level.channels;
                ln(&mut p, format!("tsap.{t}.norms.{k}"), d);
                if teacher.dim != d {
                    lin(
                        &mut p,
                        format!("tsap.{t}.aligners.{k}"),
                        teacher.dim,
                        d,
                        true,
                    );
                }
            }
        }
        Ok(p)
    }

    /// The width of every adapter of a path: a ViT's L+1 (all its width), a backbone's one per
    /// distilled level.
    fn adapter_widths(&self) -> Vec<usize> {
        match &self.stem {
            StemArch::Vit(a) => vec![a.dim; a.depth + 1],
            StemArch::Backbone(_) => self.level_info().iter().map(|l| l.channels).collect(),
        }
    }
}

/// The last `n` of `count` pyramid levels (all of them when there are fewer).
fn last_levels(count: usize, n: usize) -> Vec<usize> {
    (count.saturating_sub(n)..count).collect()
}

/// `64@/4, 128@/8, ...`
fn describe_levels(p: &[FeatureInfo]) -> String {
    p.iter()
        .map(|l| format!("{}@/{}", l.channels, l.stride))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parameter initialisers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
    /// normal with std, truncated at +-2 std (values beyond are redrawn)
    TruncNormal(f64),
    /// every element this value (buffers such as running variances)
    Constant(f64),
}

impl Init {
    /// Draw the initial value from `rng` (so initialisation is reproducible from a seed).
    pub fn tensor(
        self,
        shape: &[usize],
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut normal = |std: f64, cut: Option<f64>| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let z: f64 = rng.sample(rand_distr::StandardNormal);
                    let z = match cut {
                        // resample outside the cut, as trunc_normal_ does
                        Some(c) if z.abs() > c => {
                            let mut z2: f64 = rng.sample(rand_distr::StandardNormal);
                            while z2.abs() > c {
                                z2 = rng.sample(rand_distr::StandardNormal);
                            }
                            z2
                        }
                        _ => z,
                    };
                    (z * std) as f32
                })
                .collect()
        };
        Ok(match self {
            Init::Zeros => Tensor::zeros(shape, DType::F32, device)?,
            Init::Ones => Tensor::ones(shape, DType::F32, device)?,
            Init::Normal(s) => Tensor::from_vec(normal(s, None), shape, device)?,
            Init::TruncNormal(s) => Tensor::from_vec(normal(s, Some(2.0)), shape, device)?,
            Init::Constant(v) => (Tensor::ones(shape, DType::F32, device)? * v)?,
        })
    }
}

/// `a(x) = x + s * Up(GELU(Down(x)))`
pub struct Adapter {
    down: Linear,
    up: Linear,
    scale: Tensor,
}

impl Adapter {
    fn load(w: &Weights, d: usize) -> Result<Self> {
        Ok(Self {
            down: super::layers::linear(&w.pp("down"), d, bottleneck(d), true)?,
            up: super::layers::linear(&w.pp("up"), bottleneck(d), d, true)?,
            scale: w.get(1, "scale")?,
        })
    }

    /// The adapter as ONNX nodes over tokens `[B, N, D]`.
    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        let h = self.down.onnx(g, x)?;
        let h = super::layers::Activation::Gelu.onnx(g, &h)?;
        let y = self.up.onnx(g, &h)?;
        let s = g.constant("adapter_scale", &self.scale)?;
        let y = g.node("Mul", &[&y, &s], vec![]);
        Ok(g.node("Add", &[x, &y], vec![]))
    }

    /// `a(r + x)`: one fused training node when gradients are taken on CPU f32.
    pub fn forward_sum(&self, r: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self.fused(Some(r), x)? {
            Some(y) => Ok(y),
            None => self.forward(&(r + x)?),
        }
    }

    fn fused(&self, r: Option<&Tensor>, x: &Tensor) -> Result<Option<Tensor>> {
        if !crate::kernels::fused_training_enabled() {
            return Ok(None);
        }
        let (Some(db), Some(ub)) = (&self.down.bias, &self.up.bias) else {
            return Ok(None);
        };
        let p = crate::kernels::AdapterParams {
            down: (self.down.weight.clone(), db.clone()),
            up: (self.up.weight.clone(), ub.clone()),
            scale: self.scale.clone(),
        };
        Ok(crate::kernels::adapter_train(r, x, &p)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(None, x)? {
            return Ok(y);
        }
        let bias = self
            .down
            .bias
            .as_ref()
            .ok_or_else(|| Error::Invalid("adapter down projection without bias".into()))?;
        let h = crate::kernels::linear_gelu(x, &self.down.weight, bias)?;
        // s * up(h) with the scale folded into the up projection's (small) weight and bias:
        // one pass over the activations fewer, forward and backward.
        let up_bias = self
            .up
            .bias
            .as_ref()
            .ok_or_else(|| Error::Invalid("adapter up projection without bias".into()))?;
        let scaled = super::layers::Linear {
            weight: self.up.weight.broadcast_mul(&self.scale)?,
            bias: Some(up_bias.broadcast_mul(&self.scale)?),
        };
        let y = scaled.forward(&h)?;
        Ok((x + y)?)
    }
}

struct Path {
    adapters: Vec<Adapter>,
    norms: Vec<LayerNorm>,
    aligners: Vec<Option<Linear>>,
    /// exported output projections to the teacher's scale (target-normalised students)
    outputs: Vec<Option<Linear>>,
}

impl Path {
    /// The outputs at level `k` from the adapter tokens `r` `[B, h*w, C]` (prefix tokens
    /// dropped) on a `grid`: the LayerNorm-ed map, the aligned map (when asked) and what the
    /// student outputs for the teacher.
    fn level(
        &self,
        k: usize,
        r: &Tensor,
        grid: (usize, usize),
        aligned: bool,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let n = self.norms[k].forward(r)?;
        let al = if aligned {
            let a = match &self.aligners[k] {
                Some(lin) => lin.forward(&n)?,
                None => n.clone(),
            };
            Some(tokens_to_map(&a, 0, grid)?)
        } else {
            None
        };
        let map = tokens_to_map(&n, 0, grid)?;
        let out = match &self.outputs[k] {
            Some(o) => tokens_to_map(&o.forward(&n)?, 0, grid)?,
            None => map.clone(),
        };
        Ok((map, al, out))
    }

    /// [`Path::level`] as ONNX nodes on adapter tokens `r`: the LayerNorm-ed tokens and what
    /// the student outputs for the teacher (tokens).
    fn onnx_level(
        &self,
        g: &mut crate::onnx::Graph,
        k: usize,
        r: &str,
    ) -> Result<(String, String)> {
        let n = self.norms[k].onnx(g, r)?;
        let o = match &self.outputs[k] {
            Some(o) => o.onnx(g, &n)?,
            None => n.clone(),
        };
        Ok((n, o))
    }
}

/// Student outputs for one batch.
pub struct StudentOutput {
    /// raw stem features `[B, h_k*w_k, C_k]` at each level k (a ViT's patch tokens, class and
    /// register tokens dropped; a backbone's map, flattened) (input of the task routers in
    /// stage 2)
    pub stem: Vec<Tensor>,
    /// `[teacher][level]`: LayerNorm-ed adapter features as `[B, C_k, h_k, w_k]` maps
    pub normed: Vec<Vec<Tensor>>,
    /// `[teacher][level]`: the same after the aligner (teacher width), when requested
    pub aligned: Vec<Vec<Tensor>>,
    /// `[teacher][level]`: what the student outputs for the teacher: the exported output
    /// projection's maps (teacher width and scale) when it has them, else `normed`
    pub teacher: Vec<Vec<Tensor>>,
    /// per level its grid (h_k, w_k)
    pub grids: Vec<(usize, usize)>,
}

/// The shared stem.
enum Stem {
    Vit(Box<TokenEncoder>),
    Net(Box<dyn Backbone>),
}

pub struct Student {
    pub spec: StudentSpec,
    stem: Stem,
    paths: Vec<Path>,
    /// no classifier; the stem's preprocessing and the device
    head: super::backbone::Head,
}

/// Token sequence `[B, P + h*w, D]` -> patch map `[B, D, h, w]`.
fn tokens_to_map(t: &Tensor, prefix: usize, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, n, d) = t.dims3()?;
    Ok(crate::kernels::swap_inner(&t.narrow(1, prefix, n - prefix)?)?.reshape((b, d, h, w))?)
}

/// Map `[B, C, h, w]` -> tokens `[B, h*w, C]`.
fn map_to_tokens(m: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::swap_inner(&m.flatten_from(2)?)?)
}

impl Student {
    /// Build from parameters named as in [`StudentSpec::parameters`] (a backbone stem's
    /// BatchNorm statistics read from `w` too: an exported student keeps them with its
    /// weights). Aligners are optional (an exported student has none).
    pub fn build(spec: &StudentSpec, w: &Weights) -> Result<Self> {
        Self::build_with_state(spec, w, w)
    }

    /// Build from parameters `w` and buffers `state` (BatchNorm running statistics, updated in
    /// place by training-mode forwards).
    pub fn build_with_state(spec: &StudentSpec, w: &Weights, state: &Weights) -> Result<Self> {
        let (stem, preprocess) = match &spec.stem {
            StemArch::Vit(a) => {
                let enc = spec.vit_spec(a).encoder(&w.pp("stem"))?;
                let p = enc.info.preprocess.clone();
                (Stem::Vit(Box::new(enc)), p)
            }
            StemArch::Backbone(n) => {
                let net = n
                    .spec(spec.input_hw())?
                    .build(&w.pp("stem"), &state.pp("stem"))?;
                if net.feature_info() != n.pyramid {
                    return Err(Error::Invalid(format!(
                        "student {}: the spec records levels {}, the built network has {}",
                        n.describe(),
                        describe_levels(&n.pyramid),
                        describe_levels(&net.feature_info())
                    )));
                }
                let mut p = net.preprocess().clone();
                (p.mean, p.std) = (spec.mean, spec.std);
                (Stem::Net(net), p)
            }
        };
        let adapter_widths = spec.adapter_widths();
        let info = spec.level_info();
        let mut paths = Vec::new();
        for (t, teacher) in spec.teachers.iter().enumerate() {
            let pw = w.pp(format!("tsap.{t}"));
            let adapters = adapter_widths
                .iter()
                .enumerate()
                .map(|(l, &d)| Adapter::load(&pw.pp(format!("adapters.{l}")), d))
                .collect::<Result<Vec<_>>>()?;
            let mut norms = Vec::new();
            let mut aligners = Vec::new();
            let mut outputs = Vec::new();
            for (k, level) in info.iter().enumerate() {
                let d = level.channels;
                norms.push(LayerNorm::load(&pw.pp(format!("norms.{k}")), d, 1e-5)?);
                let al = pw.pp(format!("aligners.{k}"));
                aligners.push(if teacher.dim != d && al.contains("weight") {
                    Some(super::layers::linear(&al, d, teacher.dim, true)?)
                } else {
                    None
                });
                let o = pw.pp(format!("outputs.{k}"));
                outputs.push(if o.contains("weight") {
                    Some(super::layers::linear(&o, d, teacher.dim, true)?)
                } else {
                    None
                });
            }
            paths.push(Path {
                adapters,
                norms,
                aligners,
                outputs,
            });
        }
        Ok(Self {
            spec: spec.clone(),
            head: super::backbone::Head {
                fc: None,
                preprocess,
                device: w.device().clone(),
            },
            stem,
            paths,
        })
    }

    /// Where the parameters live (inputs must be there too).
    pub fn device(&self) -> &Device {
        &self.head.device
    }

    /// The grid of every distilled level at the training input (a backbone's: from one
    /// eval-mode forward of a blank image, since families round odd sides differently).
    pub fn level_grids(&self) -> Result<Vec<(usize, usize)>> {
        self.level_grids_at(self.spec.input_hw())
    }

    /// The grid of every distilled level for an input of (h, w).
    pub fn level_grids_at(&self, (h, w): (usize, usize)) -> Result<Vec<(usize, usize)>> {
        match &self.stem {
            Stem::Vit(_) => {
                let a = self.vit_arch()?;
                Ok(vec![(h / a.patch, w / a.patch); self.spec.levels.len()])
            }
            Stem::Net(_) => {
                let x = Tensor::zeros((1, 3, h, w), DType::F32, self.device())?;
                self.forward_intermediates(&x, false)?
                    .iter()
                    .map(|m| Ok((m.dim(2)?, m.dim(3)?)))
                    .collect()
            }
        }
    }

    /// The distilled levels of a backbone stem's whole pyramid (tensors or ONNX values).
    fn distilled<T: Clone>(&self, pyramid: Vec<T>) -> Result<Vec<T>> {
        self.spec
            .levels
            .iter()
            .map(|&l| {
                pyramid.get(l).cloned().ok_or_else(|| {
                    Error::Invalid(format!(
                        "the stem gave {} levels, the student distils level {l}",
                        pyramid.len()
                    ))
                })
            })
            .collect()
    }

    fn vit_arch(&self) -> Result<&VitArch> {
        self.spec
            .vit()
            .ok_or_else(|| Error::Invalid("the student's stem is not a ViT".into()))
    }

    /// The student as a [`Backbone`] (the stem's pyramid at the distilled levels).
    pub fn as_backbone(&self) -> &dyn Backbone {
        self
    }

    /// Run the stem once and every adapter path on its outputs. `train`: a backbone stem's
    /// BatchNorm uses (and moves its running statistics with) the batch statistics; `aligned`:
    /// the aligner outputs are computed too.
    pub fn forward(&self, pixels: &Tensor, train: bool, aligned: bool) -> Result<StudentOutput> {
        let mut normed = Vec::new();
        let mut al = Vec::new();
        let mut teacher = Vec::new();
        let (stem, grids) = match &self.stem {
            Stem::Vit(enc) => {
                let a = self.vit_arch()?;
                let (depth, prefix) = (a.depth, a.prefix_tokens());
                let patches =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, prefix, t.dim(1)? - prefix)?) };
                let req = FeatureRequest {
                    hidden_states: (0..=depth).collect(),
                    last: false,
                };
                let out = enc.forward_features(pixels, &req)?;
                let x: Vec<&Tensor> = (0..=depth).map(|i| &out.hidden_states[&i]).collect();
                let stem = self
                    .spec
                    .levels
                    .iter()
                    .map(|&b| Ok(patches(x[b + 1])?.contiguous()?))
                    .collect::<Result<Vec<_>>>()?;
                for path in &self.paths {
                    // R_0 = a_0(X_0), R_l = a_l(R_{l-1} + X_l)
                    let mut r = vec![path.adapters[0].forward(x[0])?];
                    for l in 1..=depth {
                        let next = path.adapters[l].forward_sum(&r[l - 1], x[l])?;
                        r.push(next);
                    }
                    let levels = self
                        .spec
                        .levels
                        .iter()
                        .enumerate()
                        .map(|(k, &b)| path.level(k, &patches(&r[b + 1])?, out.grid, aligned))
                        .collect::<Result<Vec<_>>>()?;
                    push_levels(levels, &mut normed, &mut al, &mut teacher);
                }
                (stem, vec![out.grid; self.spec.levels.len()])
            }
            Stem::Net(_) => {
                let mut stem = Vec::new();
                let mut grids = Vec::new();
                for m in self.forward_intermediates(pixels, train)? {
                    let (_, _, h, w) = m.dims4()?;
                    stem.push(map_to_tokens(&m)?);
                    grids.push((h, w));
                }
                for path in &self.paths {
                    // R_k = a_k(X_k), one adapter per level
                    let levels = (0..stem.len())
                        .map(|k| {
                            let r = path.adapters[k].forward(&stem[k])?;
                            path.level(k, &r, grids[k], aligned)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    push_levels(levels, &mut normed, &mut al, &mut teacher);
                }
                (stem, grids)
            }
        };
        Ok(StudentOutput {
            stem,
            normed,
            aligned: al,
            teacher,
            grids,
        })
    }
}

/// One path's per-level outputs appended as the next teacher's row of each.
fn push_levels(
    levels: Vec<(Tensor, Option<Tensor>, Tensor)>,
    normed: &mut Vec<Vec<Tensor>>,
    aligned: &mut Vec<Vec<Tensor>>,
    teacher: &mut Vec<Vec<Tensor>>,
) {
    let (mut n, mut a, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for (map, al, out) in levels {
        n.push(map);
        a.extend(al);
        t.push(out);
    }
    normed.push(n);
    aligned.push(a);
    teacher.push(t);
}

/// The student's forward pass in an ONNX graph (tokens `[B, h_k*w_k, C_k]` per level).
pub struct OnnxStudent {
    /// per level the raw stem features as tokens (a ViT's patch tokens)
    pub stem: Vec<String>,
    /// `[teacher][level]` the LayerNorm-ed adapter tokens
    pub normed: Vec<Vec<String>>,
    /// `[teacher][level]` through the output projection where the student has one
    pub teacher: Vec<Vec<String>>,
    /// per level its grid (h_k, w_k) at the graph's input size
    pub grids: Vec<(usize, usize)>,
}

impl Student {
    /// The forward pass as ONNX nodes reading normalised pixels `x` of the graph's input size.
    pub fn onnx_forward(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<OnnxStudent> {
        let hw = g.input_hw();
        let grids = self.level_grids_at(hw)?;
        let (mut normed, mut teacher) = (Vec::new(), Vec::new());
        let stem = match &self.stem {
            Stem::Vit(enc) => {
                let depth = self.vit_arch()?.depth;
                let t = enc.onnx_hidden_states(g, x, hw, depth)?;
                let stem = self
                    .spec
                    .levels
                    .iter()
                    .map(|&b| t.patches(g, &t.hidden[b + 1]))
                    .collect::<Result<Vec<_>>>()?;
                for path in &self.paths {
                    // R_0 = a_0(X_0), R_l = a_l(R_{l-1} + X_l)
                    let mut r = vec![path.adapters[0].onnx(g, &t.hidden[0])?];
                    for l in 1..=depth {
                        let s = g.node("Add", &[&r[l - 1], &t.hidden[l]], vec![]);
                        r.push(path.adapters[l].onnx(g, &s)?);
                    }
                    let (n, o): (Vec<_>, Vec<_>) = self
                        .spec
                        .levels
                        .iter()
                        .enumerate()
                        .map(|(k, &b)| {
                            let p = t.patches(g, &r[b + 1])?;
                            path.onnx_level(g, k, &p)
                        })
                        .collect::<Result<Vec<_>>>()?
                        .into_iter()
                        .unzip();
                    normed.push(n);
                    teacher.push(o);
                }
                stem
            }
            Stem::Net(_) => {
                let stem = self
                    .onnx_intermediates(g, x)?
                    .iter()
                    .map(|m| g.map_to_tokens(m))
                    .collect::<Result<Vec<_>>>()?;
                for path in &self.paths {
                    // R_k = a_k(X_k), one adapter per level
                    let (n, o): (Vec<_>, Vec<_>) = stem
                        .iter()
                        .enumerate()
                        .map(|(k, s)| {
                            let r = path.adapters[k].onnx(g, s)?;
                            path.onnx_level(g, k, &r)
                        })
                        .collect::<Result<Vec<_>>>()?
                        .into_iter()
                        .unzip();
                    normed.push(n);
                    teacher.push(o);
                }
                stem
            }
        };
        Ok(OnnxStudent {
            stem,
            normed,
            teacher,
            grids,
        })
    }

    /// What the student computes for its teachers, as ONNX nodes, named as `distillery
    /// features` names them: the raw stem patch tokens `stem.level.{k}` `[B, h*w, D]` and per
    /// teacher `teacher.{t}.level.{k}` `[B, C, h, w]` (the LayerNorm-ed adapter features,
    /// through the output projection to the teacher's width and scale when the student has
    /// one). (name, value, rank) each.
    pub fn onnx_outputs(
        &self,
        g: &mut crate::onnx::Graph,
        x: &str,
    ) -> Result<Vec<(String, String, usize)>> {
        let f = self.onnx_forward(g, x)?;
        let mut out: Vec<(String, String, usize)> = f
            .stem
            .iter()
            .enumerate()
            .map(|(k, v)| (format!("stem.level.{k}"), v.clone(), 3))
            .collect();
        for (ti, levels) in f.teacher.iter().enumerate() {
            for (k, v) in levels.iter().enumerate() {
                out.push((
                    format!("teacher.{ti}.level.{k}"),
                    g.tokens_to_map(v, f.grids[k])?,
                    4,
                ));
            }
        }
        Ok(out)
    }
}

/// The SAK student as a backbone: its pyramid is the shared stem's features at the distilled
/// levels (what the task routers read).
impl Backbone for Student {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        match &self.stem {
            Stem::Vit(enc) => super::backbone::vit_feature_info(enc, &self.spec.levels),
            Stem::Net(_) => self.spec.level_info(),
        }
    }
    fn forward_intermediates(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        match &self.stem {
            Stem::Vit(enc) => super::backbone::vit_pyramid(enc, &self.spec.levels, pixels),
            Stem::Net(net) => self.distilled(net.forward_intermediates(pixels, train)?),
        }
    }
    fn head(&self) -> &super::backbone::Head {
        &self.head
    }
    fn onnx_intermediates(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<Vec<String>> {
        match &self.stem {
            Stem::Vit(enc) => {
                let hw = g.input_hw();
                enc.onnx_levels(g, x, hw, &self.spec.levels)
            }
            Stem::Net(net) => self.distilled(net.onnx_intermediates(g, x)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::max_abs_diff;
    use crate::models::backbone::BackboneSpec;

    #[test]
    fn student_pyramid_is_its_stem_as_a_plain_vit_backbone() {
        let slots = vec![TeacherSlot {
            name: "t".into(),
            dim: 48,
        }];
        let spec = StudentSpec::new(preset("vit-n8").unwrap(), 32, slots).unwrap();
        let (_vm, w) = crate::train::engine::seeded_weights(spec.parameters().unwrap(), 3);
        let student = Student::build(&spec, &w).unwrap();
        // the same stem parameters, loaded as the registry's plain ViT backbone
        let plain = spec.stem_spec().unwrap().build(&w.pp("stem"), &w).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let a = student
            .as_backbone()
            .forward_intermediates(&x, false)
            .unwrap();
        let b = plain.forward_intermediates(&x, false).unwrap();
        let out = student.forward(&x, false, false).unwrap();
        assert_eq!(student.as_backbone().feature_info(), plain.feature_info());
        assert_eq!(a.len(), 4);
        for k in 0..4 {
            assert_eq!(a[k].dims(), &[2, 96, 4, 4]);
            assert!(max_abs_diff(&a[k], &b[k]) < 1e-5);
            // and the training forward's stem tokens are the same features
            let tok = tokens_to_map(&out.stem[k], 0, (4, 4)).unwrap();
            assert!(max_abs_diff(&a[k], &tok) < 1e-5);
        }
    }

    /// `student.json` of run folders written before the input size was called `input_hw`
    /// (`image_hw`) still reads, and writes back under the new name.
    #[test]
    fn student_json_reads_the_older_input_size_key() {
        let slots = vec![TeacherSlot {
            name: "t".into(),
            dim: 48,
        }];
        let spec = StudentSpec {
            input_hw: Some((32, 48)),
            ..StudentSpec::new(preset("vit-n8").unwrap(), 32, slots).unwrap()
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"input_hw\":[32,48]"), "{json}");
        let old: StudentSpec =
            serde_json::from_str(&json.replace("\"input_hw\"", "\"image_hw\"")).unwrap();
        assert_eq!(old, spec);
        assert_eq!(old.input_hw(), (32, 48));
    }

    /// An adapter step, composed and fused (one autograd node), against torch: output and the
    /// gradients of `sum(y * dy)` for the inputs and every parameter, with and without `r`.
    #[test]
    fn adapter_step_and_its_gradients_match_torch_composed_and_fused() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/refs/adapter.safetensors");
        let refs = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        let params: std::collections::HashMap<String, Tensor> = refs
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("param.")?.to_string(), v.clone())))
            .collect();
        let names: Vec<String> = params.keys().cloned().collect();
        let w = Weights::from_tensors(params, &p).unwrap();
        let adapter = Adapter::load(&w, 40).unwrap();
        let rel = |a: &Tensor, b: &Tensor| crate::kernels::test_util::rel_err(a, b, 1e-12);
        for case in ["sum", "single"] {
            for fused in [false, true] {
                let what = format!("{case} fused={fused}");
                let r = candle_core::Var::from_tensor(&refs["r"]).unwrap();
                let x = candle_core::Var::from_tensor(&refs["x"]).unwrap();
                let guard = fused.then(crate::kernels::FusedGradients::enable);
                let y = match case {
                    "sum" => adapter.forward_sum(r.as_tensor(), x.as_tensor()),
                    _ => adapter.forward(x.as_tensor()),
                }
                .unwrap();
                let loss = (&y * &refs["dy"]).unwrap().sum_all().unwrap();
                let grads = crate::kernels::backward_with(guard.as_ref(), &loss).unwrap();
                assert!(rel(&y, &refs[&format!("{case}.y")]) < 1e-5, "{what}: y");
                let dx = grads.get(x.as_tensor()).unwrap();
                assert!(rel(dx, &refs[&format!("{case}.dx")]) < 1e-4, "{what}: dx");
                if case == "sum" {
                    let dr = grads.get(r.as_tensor()).unwrap();
                    assert!(rel(dr, &refs["sum.dr"]) < 1e-4, "{what}: dr");
                }
                for name in &names {
                    let t = w.get_any(name).unwrap();
                    let g = grads
                        .get(&t)
                        .unwrap_or_else(|| panic!("{what}: no grad of {name}"));
                    let e = rel(g, &refs[&format!("{case}.grad.{name}")]);
                    assert!(e < 1e-4, "{what}: {name} grad off by {e}");
                }
                // the fused node keeps its parameters out of candle's graph
                let y = adapter.forward(x.as_tensor()).unwrap();
                let plain = y.sum_all().unwrap().backward().unwrap();
                let in_graph = plain.get(&w.get_any("down.weight").unwrap()).is_some();
                assert_eq!(in_graph, !fused, "{what}: down.weight in candle's graph");
            }
        }
    }

    /// Every value of a store redrawn at a realistic scale (initialisers leave LayerNorms at
    /// identity, biases at zero and BatchNorm statistics at 0/1, which would make a check
    /// vacuous); variances stay positive.
    fn randomise(vm: &candle_nn::VarMap, seed: u64) {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for n in names {
            let v = &data[n];
            let shape = v.as_tensor().dims().to_vec();
            let t = Init::Normal(0.3)
                .tensor(&shape, &mut rng, &Device::Cpu)
                .unwrap();
            let t = if n.ends_with("running_var") {
                (t.abs().unwrap() + 0.5).unwrap()
            } else {
                t
            };
            v.set(&t).unwrap();
        }
    }

    /// A backbone stem: the student's pyramid is the registered backbone's at the distilled
    /// levels (the same parameters and BatchNorm statistics), and each adapter path's output is
    /// `LayerNorm(X + s * Up(GELU(Down(X))))` per position, computed here in f64 from plain
    /// tensor operations.
    #[test]
    fn backbone_stem_student_matches_its_backbone_and_the_adapter_formula() {
        let slots = vec![
            TeacherSlot {
                name: "a".into(),
                dim: 48,
            },
            TeacherSlot {
                name: "b".into(),
                dim: 128,
            },
        ];
        let (stem, (mean, std)) = StemArch::backbone("mobilevitv2_050", (40, 56))
            .unwrap()
            .unwrap();
        assert_eq!(
            (mean, std),
            ([0.0; 3], [1.0; 3]),
            "MobileViT-V2 reads [0, 1] pixels"
        );
        let spec = StudentSpec::new(stem, 40, slots)
            .unwrap()
            .with_norm(mean, std);
        let spec = StudentSpec {
            input_hw: Some((40, 56)),
            ..spec.with_level_count(3).unwrap()
        };
        assert_eq!(spec.levels, [2, 3, 4]);
        let widths: Vec<usize> = spec.level_info().iter().map(|l| l.channels).collect();
        assert_eq!(widths, [128, 192, 256]);
        // aligners only where the widths differ (teacher b matches level 0)
        let params = spec.parameters().unwrap();
        let has = |n: &str| params.iter().any(|p| p.0 == n);
        assert!(has("tsap.0.aligners.0.weight") && !has("tsap.1.aligners.0.weight"));
        assert!(has("tsap.1.adapters.2.down.weight") && !has("tsap.1.adapters.3.down.weight"));
        let (vm, w) = crate::train::engine::seeded_weights(params, 3);
        let (bm, b) = crate::train::engine::seeded_weights(spec.buffers().unwrap(), 4);
        randomise(&vm, 5);
        randomise(&bm, 6);
        let student = Student::build_with_state(&spec, &w, &b).unwrap();
        let StemArch::Backbone(ns) = &spec.stem else {
            unreachable!()
        };
        let plain = ns
            .spec(spec.input_hw())
            .unwrap()
            .build(&w.pp("stem"), &b.pp("stem"))
            .unwrap();
        let x = Tensor::randn(0.5f32, 0.3, (2, 3, 40, 56), &Device::Cpu).unwrap();
        let want = plain.forward_intermediates(&x, false).unwrap();
        let got = student
            .as_backbone()
            .forward_intermediates(&x, false)
            .unwrap();
        assert_eq!(got.len(), 3);
        let out = student.forward(&x, false, true).unwrap();
        // MobileViT-V2 resizes odd-sided maps before its 2x2 patches
        assert_eq!(out.grids, [(6, 8), (4, 4), (2, 2)]);
        assert_eq!(student.level_grids().unwrap(), out.grids);
        let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for (k, &l) in spec.levels.iter().enumerate() {
            assert!(max_abs_diff(&got[k], &want[l]) < 1e-6);
            let tok = tokens_to_map(&out.stem[k], 0, out.grids[k]).unwrap();
            assert!(max_abs_diff(&tok, &want[l]) < 1e-6);
            for t in 0..2 {
                let p = |n: &str| f64_(&w.get_any(&format!("tsap.{t}.{n}")).unwrap());
                let xk = f64_(&out.stem[k]); // [B, hw, C]
                let lin = |x: &Tensor, wn: &str, bn: &str| {
                    x.broadcast_matmul(&p(wn).t().unwrap())
                        .unwrap()
                        .broadcast_add(&p(bn))
                        .unwrap()
                };
                let h = lin(
                    &xk,
                    &format!("adapters.{k}.down.weight"),
                    &format!("adapters.{k}.down.bias"),
                )
                .gelu_erf()
                .unwrap();
                let up = lin(
                    &h,
                    &format!("adapters.{k}.up.weight"),
                    &format!("adapters.{k}.up.bias"),
                );
                let s = p(&format!("adapters.{k}.scale"));
                let r = (&xk + up.broadcast_mul(&s).unwrap()).unwrap();
                let mu = r.mean_keepdim(2).unwrap();
                let c = r.broadcast_sub(&mu).unwrap();
                let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
                let n = c
                    .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&p(&format!("norms.{k}.weight")))
                    .unwrap()
                    .broadcast_add(&p(&format!("norms.{k}.bias")))
                    .unwrap();
                let n_map = tokens_to_map(&n, 0, out.grids[k]).unwrap();
                let err = max_abs_diff(&out.normed[t][k], &n_map.to_dtype(DType::F32).unwrap());
                assert!(err < 1e-4, "teacher {t} level {k}: {err}");
                let want_dim = if t == 0 || k > 0 {
                    spec.teachers[t].dim
                } else {
                    128
                };
                assert_eq!(out.aligned[t][k].dim(1).unwrap(), want_dim);
            }
        }
        // student.json round trip keeps the stem (and a ViT spec still reads as a ViT)
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("\"backbone\":\"mobilevitv2_050\""), "{text}");
        assert_eq!(serde_json::from_str::<StudentSpec>(&text).unwrap(), spec);
        let vit = StudentSpec::new(preset("vit-n8").unwrap(), 32, spec.teachers.clone()).unwrap();
        let text = serde_json::to_string(&vit).unwrap();
        assert!(
            text.contains("\"dim\":96") && !text.contains("backbone"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<StudentSpec>(&text).unwrap(), vit);
        // a training forward moves the stem's BatchNorm statistics in the buffer store
        let before: Vec<(String, Tensor)> = crate::train::engine::buffer_tensors(&bm)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.copy().unwrap()))
            .collect();
        student.forward(&x, true, true).unwrap();
        let after: std::collections::HashMap<String, Tensor> =
            crate::train::engine::buffer_tensors(&bm)
                .unwrap()
                .into_iter()
                .collect();
        let moved = before
            .iter()
            .filter(|(n, t)| max_abs_diff(t, &after[n]) > 1e-6)
            .count();
        assert!(
            moved > 0 && moved == before.len(),
            "{moved} of {}",
            before.len()
        );
        // more levels than the backbone has is a clear error
        let e = spec.clone().with_level_count(9).unwrap_err().to_string();
        assert!(e.contains("mobilevitv2_050") && e.contains("32@/2"), "{e}");
    }
}
