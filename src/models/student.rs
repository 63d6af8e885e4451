//! The SAK student (SPEC.md section 2): a Teacher-Agnostic Stem (plain ViT/16 in timm naming,
//! final norm removed) shared by all teachers, and one Teacher-Specific Adapter Path per teacher:
//! L+1 adapters chained `R_0 = a_0(X_0)`, `R_l = a_l(R_{l-1} + X_l)` over the stem's block
//! outputs, a LayerNorm per (level, teacher) and, when widths differ, a training-only aligner
//! Linear to the teacher's width. The stem runs once per batch; the paths only read its outputs.
//!
//! Parameter names: `stem.*` (timm ViT names), `tsap.{t}.adapters.{l}.{down,up}.{weight,bias}`,
//! `tsap.{t}.adapters.{l}.scale`, `tsap.{t}.norms.{k}.{weight,bias}`,
//! `tsap.{t}.aligners.{k}.{weight,bias}` (dropped at export); a student trained on normalised
//! targets (`target_norm`) exports `tsap.{t}.outputs.{k}.{weight,bias}`: the aligner with the
//! inverse normalisation folded in, mapping its features back to the teacher's scale.

use super::backbone::{Backbone, FeatureInfo, ViTSpec};
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

/// Everything needed to rebuild a student (saved as `student.json` next to its weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentSpec {
    /// the stem's architecture (width, depth, heads, MLP width, patch, qkv bias, eps,
    /// activation, class/register tokens, layer scale), stored flat in `student.json`
    #[serde(flatten)]
    pub arch: VitArch,
    /// training resolution: the position table's grid is `image_size / patch`
    pub image_size: usize,
    /// non-square training resolution (height, width) overriding `image_size` (stage 2 on
    /// NYUD: 448x576); the position table then has that grid
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_hw: Option<(usize, usize)>,
    pub teachers: Vec<TeacherSlot>,
    /// 0-based stem blocks whose adapter outputs are distilled
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

impl StudentSpec {
    pub fn new(arch: VitArch, image_size: usize, teachers: Vec<TeacherSlot>) -> Result<Self> {
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
        if teachers.is_empty() {
            return Err(Error::Invalid("at least one teacher is needed".into()));
        }
        Ok(Self {
            levels: evenly_spaced_blocks(arch.depth, 4),
            arch,
            image_size,
            image_hw: None,
            teachers,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            target_norm: TargetNorm::None,
        })
    }

    /// The same student distilling `n` levels (evenly spaced blocks; SAK's 4 by default): as
    /// many as each teacher gives (an ONNX teacher's one output is distilled at the last block).
    pub fn with_level_count(self, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid(
                "the teachers give no levels to distil".into(),
            ));
        }
        Ok(Self {
            levels: evenly_spaced_blocks(self.arch.depth, n),
            ..self
        })
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.arch.patch
    }

    /// Training input (height, width).
    pub fn hw(&self) -> (usize, usize) {
        self.image_hw.unwrap_or((self.image_size, self.image_size))
    }

    /// Position-table grid (rows, columns).
    pub fn grid_hw(&self) -> (usize, usize) {
        let (h, w) = self.hw();
        (h / self.arch.patch, w / self.arch.patch)
    }

    /// The stem as a backbone spec (a timm ViT without final norm).
    pub fn stem_spec(&self) -> ViTSpec {
        ViTSpec {
            arch: self.arch.clone(),
            image_hw: self.hw(),
            levels: self.levels.clone(),
            mean: self.mean,
            std: self.std,
            num_classes: 0,
        }
    }

    /// Every parameter: name, shape, initialiser.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let a = &self.arch;
        let d = a.dim;
        let mut p = self.stem_spec().parameters_under("stem.");
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
        for (t, teacher) in self.teachers.iter().enumerate() {
            for l in 0..=a.depth {
                let ad = format!("tsap.{t}.adapters.{l}");
                lin(&mut p, format!("{ad}.down"), d / 4, d, true);
                lin(&mut p, format!("{ad}.up"), d, d / 4, true);
                p.push((format!("{ad}.scale"), vec![1], Init::Ones));
            }
            for k in 0..self.levels.len() {
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
        p
    }
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
            down: super::layers::linear(&w.pp("down"), d, d / 4, true)?,
            up: super::layers::linear(&w.pp("up"), d / 4, d, true)?,
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// Student outputs for one batch.
pub struct StudentOutput {
    /// raw stem patch tokens `[B, h*w, D]` (class and register tokens dropped) at each level
    /// (input of the task routers in stage 2)
    pub stem: Vec<Tensor>,
    /// `[teacher][level]`: LayerNorm-ed adapter features as `[B, D, h, w]` maps
    pub normed: Vec<Vec<Tensor>>,
    /// `[teacher][level]`: the same after the aligner (teacher width), when requested
    pub aligned: Vec<Vec<Tensor>>,
    /// `[teacher][level]`: what the student outputs for the teacher: the exported output
    /// projection's maps (teacher width and scale) when it has them, else `normed`
    pub teacher: Vec<Vec<Tensor>>,
    pub grid: (usize, usize),
}

pub struct Student {
    pub spec: StudentSpec,
    stem: TokenEncoder,
    paths: Vec<Path>,
    /// no classifier; the stem's preprocessing and the device
    head: super::backbone::Head,
}

/// Token sequence `[B, P + h*w, D]` -> patch map `[B, D, h, w]`.
fn tokens_to_map(t: &Tensor, prefix: usize, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, n, d) = t.dims3()?;
    Ok(t.narrow(1, prefix, n - prefix)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, d, h, w))?)
}

impl Student {
    /// Build from parameters named as in [`StudentSpec::parameters`]. Aligners are optional
    /// (an exported student has none).
    pub fn build(spec: &StudentSpec, w: &Weights) -> Result<Self> {
        let a = &spec.arch;
        let stem = spec.stem_spec().encoder(&w.pp("stem"))?;
        let mut paths = Vec::new();
        for (t, teacher) in spec.teachers.iter().enumerate() {
            let pw = w.pp(format!("tsap.{t}"));
            let adapters = (0..=a.depth)
                .map(|l| Adapter::load(&pw.pp(format!("adapters.{l}")), a.dim))
                .collect::<Result<Vec<_>>>()?;
            let mut norms = Vec::new();
            let mut aligners = Vec::new();
            let mut outputs = Vec::new();
            for k in 0..spec.levels.len() {
                norms.push(LayerNorm::load(&pw.pp(format!("norms.{k}")), a.dim, 1e-5)?);
                let al = pw.pp(format!("aligners.{k}"));
                aligners.push(if teacher.dim != a.dim && al.contains("weight") {
                    Some(super::layers::linear(&al, a.dim, teacher.dim, true)?)
                } else {
                    None
                });
                let o = pw.pp(format!("outputs.{k}"));
                outputs.push(if o.contains("weight") {
                    Some(super::layers::linear(&o, a.dim, teacher.dim, true)?)
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
                preprocess: stem.info.preprocess.clone(),
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

    /// The student as a [`Backbone`] (the stem's pyramid).
    pub fn as_backbone(&self) -> &dyn Backbone {
        self
    }

    /// Run the stem once and every adapter path on its outputs.
    pub fn forward(&self, pixels: &Tensor, aligned: bool) -> Result<StudentOutput> {
        let depth = self.spec.arch.depth;
        let prefix = self.spec.arch.prefix_tokens();
        let patches =
            |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, prefix, t.dim(1)? - prefix)?) };
        let req = FeatureRequest {
            hidden_states: (0..=depth).collect(),
            last: false,
        };
        let out = self.stem.forward_features(pixels, &req)?;
        let x: Vec<&Tensor> = (0..=depth).map(|i| &out.hidden_states[&i]).collect();
        let stem = self
            .spec
            .levels
            .iter()
            .map(|&b| Ok(patches(x[b + 1])?.contiguous()?))
            .collect::<Result<_>>()?;
        let mut normed = Vec::new();
        let mut al = Vec::new();
        let mut teacher = Vec::new();
        for path in &self.paths {
            // R_0 = a_0(X_0), R_l = a_l(R_{l-1} + X_l)
            let mut r = vec![path.adapters[0].forward(x[0])?];
            for l in 1..=depth {
                let next = path.adapters[l].forward(&(&r[l - 1] + x[l])?)?;
                r.push(next);
            }
            let mut per_level = Vec::new();
            let mut per_level_al = Vec::new();
            let mut per_level_out = Vec::new();
            for (k, &b) in self.spec.levels.iter().enumerate() {
                let rl = &r[b + 1];
                let n = path.norms[k].forward(&patches(rl)?)?;
                if aligned {
                    let a = match &path.aligners[k] {
                        Some(lin) => lin.forward(&n)?,
                        None => n.clone(),
                    };
                    per_level_al.push(tokens_to_map(&a, 0, out.grid)?);
                }
                let map = tokens_to_map(&n, 0, out.grid)?;
                per_level_out.push(match &path.outputs[k] {
                    Some(o) => tokens_to_map(&o.forward(&n)?, 0, out.grid)?,
                    None => map.clone(),
                });
                per_level.push(map);
            }
            normed.push(per_level);
            al.push(per_level_al);
            teacher.push(per_level_out);
        }
        Ok(StudentOutput {
            stem,
            normed,
            aligned: al,
            teacher,
            grid: out.grid,
        })
    }
}

/// The student's forward pass in an ONNX graph (token values `[B, h*w, C]`, patch tokens
/// only).
pub struct OnnxStudent {
    pub tokens: super::encoder::OnnxTokens,
    /// per level the raw stem patch tokens
    pub stem: Vec<String>,
    /// `[teacher][level]` the LayerNorm-ed adapter tokens
    pub normed: Vec<Vec<String>>,
    /// `[teacher][level]` through the output projection where the student has one
    pub teacher: Vec<Vec<String>>,
}

impl Student {
    /// The forward pass as ONNX nodes reading normalised pixels `x` of the graph's input size.
    pub fn onnx_forward(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<OnnxStudent> {
        let depth = self.spec.arch.depth;
        let hw = g.input_hw();
        let t = self.stem.onnx_hidden_states(g, x, hw, depth)?;
        let stem = self
            .spec
            .levels
            .iter()
            .map(|&b| t.patches(g, &t.hidden[b + 1]))
            .collect::<Result<_>>()?;
        let (mut normed, mut teacher) = (Vec::new(), Vec::new());
        for path in &self.paths {
            // R_0 = a_0(X_0), R_l = a_l(R_{l-1} + X_l)
            let mut r = vec![path.adapters[0].onnx(g, &t.hidden[0])?];
            for l in 1..=depth {
                let s = g.node("Add", &[&r[l - 1], &t.hidden[l]], vec![]);
                r.push(path.adapters[l].onnx(g, &s)?);
            }
            let (mut n_t, mut o_t) = (Vec::new(), Vec::new());
            for (k, &b) in self.spec.levels.iter().enumerate() {
                let p = t.patches(g, &r[b + 1])?;
                let n = path.norms[k].onnx(g, &p)?;
                o_t.push(match &path.outputs[k] {
                    Some(o) => o.onnx(g, &n)?,
                    None => n.clone(),
                });
                n_t.push(n);
            }
            normed.push(n_t);
            teacher.push(o_t);
        }
        Ok(OnnxStudent {
            tokens: t,
            stem,
            normed,
            teacher,
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
                out.push((format!("teacher.{ti}.level.{k}"), f.tokens.map(g, v)?, 4));
            }
        }
        Ok(out)
    }
}

/// The SAK student as a backbone: its pyramid is the shared stem's patch features at the
/// distilled levels (what the task routers read).
impl Backbone for Student {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        super::backbone::vit_feature_info(&self.stem, &self.spec.levels)
    }
    fn forward_intermediates(&self, pixels: &Tensor, _train: bool) -> Result<Vec<Tensor>> {
        super::backbone::vit_pyramid(&self.stem, &self.spec.levels, pixels)
    }
    fn head(&self) -> &super::backbone::Head {
        &self.head
    }
    fn onnx_intermediates(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<Vec<String>> {
        let hw = g.input_hw();
        self.stem.onnx_levels(g, x, hw, &self.spec.levels)
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
        let (_vm, w) = crate::train::engine::seeded_weights(spec.parameters(), 3);
        let student = Student::build(&spec, &w).unwrap();
        // the same stem parameters, loaded as the registry's plain ViT backbone
        let plain = spec.stem_spec().build(&w.pp("stem"), &w).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let a = student
            .as_backbone()
            .forward_intermediates(&x, false)
            .unwrap();
        let b = plain.forward_intermediates(&x, false).unwrap();
        let out = student.forward(&x, false).unwrap();
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
}
