//! SAK stage-2 model (SPEC.md section 2): the distilled student (stem + adapter paths), one
//! Mixture-of-Representations router per (level, task) and one dense head per task.
//!
//! Router: per-token MLP `Linear(D -> D/2) -> LayerNorm -> GELU -> Linear(D/2 -> 2(N+1))` on the
//! stem's patch tokens, mean over tokens, split into clean and noise logits; training gates
//! `clean + eps * (softplus(noise) + 0.01)`, eps ~ N(0, 1); evaluation gates `clean`; dense
//! softmax over the N+1 experts (F_0 = raw stem features, F_1..N = the LayerNorm-ed adapter
//! features). `RouterKind::None` sums the experts instead (the paper's ablation).
//!
//! Head: per level `Linear(D -> D/4)`, bilinear resize to H/4 x W/4, concatenation (D channels),
//! `Conv3x3(D -> D)`, BatchNorm, GELU, `Conv1x1(D -> C)`, logits bilinearly upsampled to H x W.
//!
//! A student with a backbone stem has levels of different widths C_k and strides: router k
//! works at C_k (`C_k -> C_k/2`), and the head's width D is [`BACKBONE_HEAD_WIDTH`] (each level
//! projected `C_k -> D/4`); a ViT stem's D is its width, as in the paper.
//!
//! Parameter names: the student's (`stem.*`, `tsap.*`), `routers.{level}.{task}.{fc1,norm,fc2}.*`,
//! `heads.{task}.proj.{level}.*`, `heads.{task}.conv.weight`, `heads.{task}.bn.{weight,bias}`,
//! `heads.{task}.cls.{weight,bias}`; BatchNorm running statistics are buffers
//! `heads.{task}.bn.running_{mean,var}`.

use super::layers::{BatchNorm2d, LayerNorm, Linear};
use super::student::{Init, Student, StudentOutput, StudentSpec};
use crate::error::Result;
use crate::interp::resize_bilinear;
use crate::tasks::Task;
use crate::weights::Weights;
use candle_core::{Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How router outputs combine the experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// Mixture-of-Representations: noisy softmax gates per (level, task)
    #[default]
    Mor,
    /// plain sum of stem and adapter features (ablation)
    None,
}

/// Everything needed to rebuild a stage-2 model (`model.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiTaskSpec {
    pub student: StudentSpec,
    /// tasks and their head output channels
    pub tasks: Vec<(Task, usize)>,
    pub router: RouterKind,
}

/// The task heads' width D on a student with a backbone stem.
pub const BACKBONE_HEAD_WIDTH: usize = 256;

impl MultiTaskSpec {
    fn experts(&self) -> usize {
        self.student.teachers.len() + 1
    }

    /// The width of each level the routers read.
    fn widths(&self) -> Vec<usize> {
        self.student
            .level_info()
            .iter()
            .map(|l| l.channels)
            .collect()
    }

    /// The task heads' width D: a ViT stem's width, [`BACKBONE_HEAD_WIDTH`] otherwise.
    fn head_width(&self) -> usize {
        self.student.vit().map_or(BACKBONE_HEAD_WIDTH, |a| a.dim)
    }

    /// Parameters beyond the student's: name, shape, initialiser.
    pub fn task_parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let d = self.head_width();
        let widths = self.widths();
        let levels = widths.len();
        let mut p = Vec::new();
        let lin = |p: &mut Vec<(String, Vec<usize>, Init)>, n: String, o: usize, i: usize| {
            p.push((format!("{n}.weight"), vec![o, i], Init::TruncNormal(0.02)));
            p.push((format!("{n}.bias"), vec![o], Init::Zeros));
        };
        for (task, ch) in &self.tasks {
            let t = task.name();
            if self.router == RouterKind::Mor {
                for (k, &c) in widths.iter().enumerate() {
                    let r = format!("routers.{k}.{t}");
                    lin(&mut p, format!("{r}.fc1"), c / 2, c);
                    p.push((format!("{r}.norm.weight"), vec![c / 2], Init::Ones));
                    p.push((format!("{r}.norm.bias"), vec![c / 2], Init::Zeros));
                    lin(&mut p, format!("{r}.fc2"), 2 * self.experts(), c / 2);
                }
            }
            let h = format!("heads.{t}");
            for (k, &c) in widths.iter().enumerate() {
                lin(&mut p, format!("{h}.proj.{k}"), d / 4, c);
            }
            // Kaiming-normal (fan-out, ReLU gain) for the convolutions, as torchvision does.
            p.push((
                format!("{h}.conv.weight"),
                vec![d, levels * (d / 4), 3, 3],
                Init::Normal((2.0 / (d * 9) as f64).sqrt()),
            ));
            p.push((format!("{h}.bn.weight"), vec![d], Init::Ones));
            p.push((format!("{h}.bn.bias"), vec![d], Init::Zeros));
            p.push((
                format!("{h}.cls.weight"),
                vec![*ch, d, 1, 1],
                Init::TruncNormal(0.02),
            ));
            p.push((format!("{h}.cls.bias"), vec![*ch], Init::Zeros));
        }
        p
    }

    /// BatchNorm buffers: name, shape, initial value.
    pub fn buffers(&self) -> Vec<(String, usize, f32)> {
        let d = self.head_width();
        self.tasks
            .iter()
            .flat_map(|(t, _)| {
                let h = format!("heads.{}.bn", t.name());
                [
                    (format!("{h}.running_mean"), d, 0.0),
                    (format!("{h}.running_var"), d, 1.0),
                ]
            })
            .collect()
    }
}

struct Router {
    fc1: Linear,
    norm: LayerNorm,
    fc2: Linear,
}

const BN_EPS: f64 = 1e-5;

struct Head {
    proj: Vec<Linear>,
    conv: Tensor,
    bn: BatchNorm2d,
    cls_w: Tensor,
    cls_b: Tensor,
}

/// Model outputs for one batch.
pub struct MultiTaskOutput {
    /// per task, logits `[B, C, H, W]` at input resolution
    pub logits: Vec<(Task, Tensor)>,
    /// `[teacher][level]` aligned adapter maps (for the distillation loss), when requested
    pub aligned: Vec<Vec<Tensor>>,
    /// per (level, task) the gate probabilities `[B, N+1]` (empty for `RouterKind::None`)
    pub gates: Vec<Vec<Tensor>>,
}

pub struct MultiTaskModel {
    pub spec: MultiTaskSpec,
    pub student: Student,
    pub decoder: Decoder,
}

/// Routers and heads: everything after the student.
pub struct Decoder {
    spec: MultiTaskSpec,
    routers: Vec<Vec<Router>>, // [level][task]
    heads: Vec<Head>,
}

impl MultiTaskModel {
    /// Build from parameters (student + task parameters) and buffers (running statistics).
    pub fn build(spec: &MultiTaskSpec, w: &Weights, buffers: &Weights) -> Result<Self> {
        Ok(Self {
            spec: spec.clone(),
            student: Student::build_with_state(&spec.student, w, buffers)?,
            decoder: Decoder::build(spec, w, buffers)?,
        })
    }

    /// Where the parameters live.
    pub fn device(&self) -> &candle_core::Device {
        self.student.device()
    }

    /// Forward pass. `noise` draws the router noise (training); `None` = clean gates.
    pub fn forward(
        &self,
        pixels: &Tensor,
        train: bool,
        aligned: bool,
        noise: Option<&mut dyn rand::RngCore>,
    ) -> Result<MultiTaskOutput> {
        let (_, _, ih, iw) = pixels.dims4()?;
        let out = self.student.forward(pixels, train, aligned)?;
        self.decoder.forward(out, (ih, iw), train, noise)
    }
}

impl Decoder {
    /// Build the task parameters (`routers.*`, `heads.*`) and buffers.
    pub fn build(spec: &MultiTaskSpec, w: &Weights, buffers: &Weights) -> Result<Self> {
        let d = spec.head_width();
        let widths = spec.widths();
        let levels = widths.len();
        let lin = |w: &Weights, i: usize, o: usize| super::layers::linear(w, i, o, true);
        let mut routers = Vec::new();
        if spec.router == RouterKind::Mor {
            for (k, &c) in widths.iter().enumerate() {
                let mut per = Vec::new();
                for (t, _) in &spec.tasks {
                    let r = w.pp(format!("routers.{k}.{}", t.name()));
                    per.push(Router {
                        fc1: lin(&r.pp("fc1"), c, c / 2)?,
                        norm: LayerNorm::load(&r.pp("norm"), c / 2, 1e-5)?,
                        fc2: lin(&r.pp("fc2"), c / 2, 2 * spec.experts())?,
                    });
                }
                routers.push(per);
            }
        }
        let mut heads = Vec::new();
        for (t, ch) in &spec.tasks {
            let h = w.pp(format!("heads.{}", t.name()));
            let hb = buffers.pp(format!("heads.{}", t.name()));
            heads.push(Head {
                proj: widths
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| lin(&h.pp(format!("proj.{k}")), c, d / 4))
                    .collect::<Result<_>>()?,
                conv: h.get((d, levels * (d / 4), 3, 3), "conv.weight")?,
                bn: BatchNorm2d::load(&h.pp("bn"), &hb.pp("bn"), d, BN_EPS)?,
                cls_w: h.get((*ch, d, 1, 1), "cls.weight")?,
                cls_b: h.get(*ch, "cls.bias")?,
            });
        }
        Ok(Self {
            spec: spec.clone(),
            routers,
            heads,
        })
    }

    /// Current BatchNorm running statistics, by buffer name.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((t, _), h) in self.spec.tasks.iter().zip(&self.heads) {
            out.extend(h.bn.state_tensors(&format!("heads.{}.bn", t.name())));
        }
        Ok(out)
    }

    /// Routers and heads on the student's outputs, logits at (ih, iw). `train` selects
    /// BatchNorm batch statistics and, with `noise`, noisy gates.
    pub fn forward(
        &self,
        out: StudentOutput,
        (ih, iw): (usize, usize),
        train: bool,
        noise: Option<&mut dyn rand::RngCore>,
    ) -> Result<MultiTaskOutput> {
        let b = out.stem[0].dim(0)?;
        let d = self.spec.head_width();
        let widths = self.spec.widths();
        let levels = widths.len();
        let n_exp = self.spec.experts();
        let mut noise = noise;
        let stem_maps: Vec<Tensor> = out
            .stem
            .iter()
            .zip(&out.grids)
            .zip(&widths)
            .map(|((t, &(gh, gw)), &c)| Ok(crate::kernels::swap_inner(t)?.reshape((b, c, gh, gw))?))
            .collect::<Result<_>>()?;
        let mut gates = Vec::new();
        // mixed[task][level]: [B, D, gh, gw]
        let mut mixed: Vec<Vec<Tensor>> = vec![Vec::new(); self.spec.tasks.len()];
        for k in 0..levels {
            let mut experts = vec![stem_maps[k].clone()];
            for path in &out.normed {
                experts.push(path[k].clone());
            }
            let stacked = Tensor::stack(&experts, 1)?; // [B, E, D, gh, gw]
            let mut gk = Vec::new();
            for (ti, _) in self.spec.tasks.iter().enumerate() {
                let m = match self.spec.router {
                    RouterKind::None => stacked.sum(1)?,
                    RouterKind::Mor => {
                        let r = &self.routers[k][ti];
                        let h = r.fc1.forward(&out.stem[k])?;
                        let h = crate::kernels::gelu_erf(&r.norm.forward(&h)?)?;
                        let logits = r.fc2.forward(&h)?.mean(1)?; // [B, 2E]
                        let eps = match noise.as_deref_mut() {
                            Some(rng) if train => {
                                let eps: Vec<f32> = (0..b * n_exp)
                                    .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
                                    .collect();
                                Some(Tensor::from_vec(eps, (b, n_exp), logits.device())?)
                            }
                            _ => None,
                        };
                        let p = gate_probs(&logits, eps.as_ref())?; // [B, E]
                        gk.push(p.clone());
                        stacked
                            .broadcast_mul(&p.reshape((b, n_exp, 1, 1, 1))?)?
                            .sum(1)?
                    }
                };
                mixed[ti].push(m);
            }
            gates.push(gk);
        }
        let (qh, qw) = (ih.div_ceil(4), iw.div_ceil(4));
        let mut logits = Vec::new();
        for (ti, (task, _)) in self.spec.tasks.iter().enumerate() {
            let head = &self.heads[ti];
            let mut parts = Vec::new();
            for (k, (m, proj)) in mixed[ti].iter().zip(&head.proj).enumerate() {
                let (gh, gw) = out.grids[k];
                let tok = crate::kernels::swap_inner(&m.reshape((b, widths[k], gh * gw))?)?;
                let p = proj.forward(&tok)?; // [B, hw, D/4]
                let map = crate::kernels::swap_inner(&p)?.reshape((b, d / 4, gh, gw))?;
                parts.push(resize_bilinear(&map, (qh, qw))?);
            }
            let x = Tensor::cat(&parts, 1)?;
            let x = x.conv2d(&head.conv, 1, 1, 1, 1)?;
            let x = head.bn.forward(&x, train)?;
            let x = crate::kernels::gelu_erf(&x)?;
            let x = x
                .conv2d(&head.cls_w, 0, 1, 1, 1)?
                .broadcast_add(&head.cls_b.reshape((1, (), 1, 1))?)?;
            logits.push((*task, resize_bilinear(&x, (ih, iw))?));
        }
        Ok(MultiTaskOutput {
            logits,
            aligned: out.aligned,
            gates,
        })
    }
}

impl MultiTaskModel {
    /// Every task's logits at the input resolution, `logits.{task}` `[B, C, H, W]`, as ONNX
    /// nodes reading normalised pixels `x` (eval mode: running BatchNorm statistics folded into
    /// the head convolutions, clean gates).
    pub fn onnx_outputs(
        &self,
        g: &mut crate::onnx::Graph,
        x: &str,
    ) -> Result<Vec<(String, String, usize)>> {
        let f = self.student.onnx_forward(g, x)?;
        self.decoder.onnx(g, &f)
    }
}

impl Decoder {
    fn onnx(
        &self,
        g: &mut crate::onnx::Graph,
        f: &super::student::OnnxStudent,
    ) -> Result<Vec<(String, String, usize)>> {
        let (ih, iw) = g.input_hw();
        let (qh, qw) = (ih.div_ceil(4), iw.div_ceil(4));
        let n_exp = self.spec.experts() as i64;
        let mut out = Vec::new();
        for (ti, (task, _)) in self.spec.tasks.iter().enumerate() {
            let head = &self.heads[ti];
            let mut parts = Vec::new();
            for (k, proj) in head.proj.iter().enumerate() {
                // the experts: the stem's tokens and every teacher path's
                let mut experts = vec![f.stem[k].clone()];
                experts.extend(f.normed.iter().map(|path| path[k].clone()));
                let mixed = match self.spec.router {
                    RouterKind::None => {
                        let refs: Vec<&str> = experts.iter().map(String::as_str).collect();
                        g.node("Sum", &refs, vec![])
                    }
                    RouterKind::Mor => {
                        let r = &self.routers[k][ti];
                        let h = r.fc1.onnx(g, &f.stem[k])?;
                        let h = r.norm.onnx(g, &h)?;
                        let h = super::layers::Activation::Gelu.onnx(g, &h)?;
                        let h = r.fc2.onnx(g, &h)?;
                        let logits = g.reduce_mean(&h, &[1]); // [B, 1, 2E]
                        let clean = g.slice(&logits, 2, 0, n_exp)?;
                        let p = g.node(
                            "Softmax",
                            &[&clean],
                            vec![("axis", crate::onnx::Attr::Int(2))],
                        );
                        let mut acc: Option<String> = None;
                        for (e, ex) in experts.iter().enumerate() {
                            let pe = g.slice(&p, 2, e as i64, e as i64 + 1)?; // [B, 1, 1]
                            let term = g.node("Mul", &[ex, &pe], vec![]);
                            acc = Some(match acc {
                                Some(a) => g.node("Add", &[&a, &term], vec![]),
                                None => term,
                            });
                        }
                        acc.ok_or_else(|| crate::Error::Invalid("a router without experts".into()))?
                    }
                };
                let t = proj.onnx(g, &mixed)?;
                let map = g.tokens_to_map(&t, f.grids[k])?;
                parts.push(g.resize_bilinear(&map, f.grids[k], (qh, qw), false)?);
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let x = g.node("Concat", &refs, vec![("axis", crate::onnx::Attr::Int(1))]);
            let (w, b) = head.bn.fold_into(&head.conv)?;
            let x = g.conv(&x, &w, Some(&b), 1, 1, 1)?;
            let x = super::layers::Activation::Gelu.onnx(g, &x)?;
            let x = g.conv(&x, &head.cls_w, Some(&head.cls_b), 1, 0, 1)?;
            let x = g.resize_bilinear(&x, (qh, qw), (ih, iw), false)?;
            out.push((format!("logits.{}", task.name()), x, 4));
        }
        Ok(out)
    }
}

/// Router gate probabilities from the token-averaged router output `[B, 2E]` (clean logits, then
/// noise logits): `softmax(clean + eps * (softplus(noise) + 0.01))` with `eps ~ N(0, 1)` given
/// (training), `softmax(clean)` without.
pub fn gate_probs(logits: &Tensor, eps: Option<&Tensor>) -> Result<Tensor> {
    let e = logits.dim(1)? / 2;
    let clean = logits.narrow(1, 0, e)?;
    let g = match eps {
        Some(eps) => {
            let raw = logits.narrow(1, e, e)?;
            // softplus(x) = max(x, 0) + log(1 + exp(-|x|))
            let sp = (raw.relu()? + (raw.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
            (clean + (eps * (sp + 0.01)?)?)?
        }
        None => clean,
    };
    Ok(candle_nn::ops::softmax(&g, D::Minus1)?)
}

/// Predictions from a task's logits (see [`crate::tasks::TaskSpec::predict`]).
pub fn predictions(task: Task, logits: &Tensor) -> Result<Tensor> {
    task.spec().predict(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn noisy_and_clean_gates_hand_case() {
        // clean (0, 1), noise logits (0, ln(e - 1)) -> softplus (ln 2, 1); eps (1, -1).
        let l = Tensor::new(
            &[[0f32, 1.0, 0.0, (std::f32::consts::E - 1.0).ln()]],
            &Device::Cpu,
        )
        .unwrap();
        let eps = Tensor::new(&[[1f32, -1.0]], &Device::Cpu).unwrap();
        let g0 = 2f32.ln() + 0.01;
        let g1: f32 = 1.0 - (1.0 + 0.01);
        let z = g0.exp() + g1.exp();
        let want = [g0.exp() / z, g1.exp() / z];
        let got = gate_probs(&l, Some(&eps))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for k in 0..2 {
            assert!((got[0][k] - want[k]).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // Evaluation: softmax of the clean logits only.
        let got = gate_probs(&l, None).unwrap().to_vec2::<f32>().unwrap();
        let z = 1.0 + 1f32.exp();
        assert!((got[0][0] - 1.0 / z).abs() < 1e-6 && (got[0][1] - 1f32.exp() / z).abs() < 1e-6);
    }
}
