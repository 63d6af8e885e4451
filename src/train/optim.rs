//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` update), with its state
//! exposed as named tensors so checkpoints can restore it exactly. Global-norm gradient
//! clipping.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// completed update steps
    pub t: u64,
    params: Vec<Param>,
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// multiplier of the step's learning rate (layer-wise decay), 1 by default
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
    /// On a GPU: the moments as one flat buffer `[m | v]` that the in-place CUDA update
    /// writes; `m` and `v` are then views of it.
    packed: Option<Tensor>,
}

/// One AdamW update `(w', m', v')` from candle ops (any device or dtype); the fused CPU kernel
/// [`crate::kernels::adamw_update`] does the same arithmetic in one pass.
fn composed_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &crate::kernels::AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let w = (w * s.keep)?;
    let m = ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((v.sqrt()? * s.inv_sqrt_bc2)? + s.eps)?;
    let upd = ((&m / denom)? * s.step_size)?;
    Ok(((w - upd)?, m, v))
}

impl Param {
    /// The update in place on a GPU (f32, contiguous): two kernel launches instead of a dozen
    /// element-wise ops that each allocate. Returns false where it does not apply.
    #[cfg(feature = "cuda")]
    fn update_on_gpu(&mut self, g: &Tensor, step: &crate::kernels::AdamStep) -> Result<bool> {
        use crate::kernels::cuda::{adamw_in_place, adamw_in_place_fits};
        let w = self.var.as_tensor();
        if !w.device().is_cuda() {
            return Ok(false);
        }
        let packed = match &self.packed {
            Some(t) => t.clone(),
            None => Tensor::cat(&[self.m.flatten_all()?, self.v.flatten_all()?], 0)?,
        };
        let g = g.contiguous()?;
        if !adamw_in_place_fits(w, &g, &packed) {
            return Ok(false);
        }
        adamw_in_place(w, &g, &packed, step)?;
        if self.packed.is_none() {
            let n = w.elem_count();
            self.m = packed.narrow(0, 0, n)?.reshape(w.shape())?;
            self.v = packed.narrow(0, n, n)?.reshape(w.shape())?;
            self.packed = Some(packed);
        }
        Ok(true)
    }
}

impl AdamW {
    /// Parameters in name order. Weight decay applies to matrices and kernels (rank >= 2),
    /// not to biases, norms, scales, tokens or position tables of rank < 2.
    pub fn new(vars: &HashMap<String, Var>, weight_decay: f64) -> Result<Self> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let mut params = Vec::with_capacity(names.len());
        for n in names {
            let var = vars[n].clone();
            let decay = var.rank() >= 2 && !n.ends_with("pos_embed") && !n.ends_with("cls_token");
            params.push(Param {
                name: n.clone(),
                m: var.zeros_like()?,
                v: var.zeros_like()?,
                packed: None,
                var,
                decay,
                lr_scale: 1.0,
            });
        }
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            params,
        })
    }

    /// Global L2 norm of the gradients; if above `max_norm`, scale them down to it (as
    /// `clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        // One read of one value: on a GPU each read is a synchronisation and a copy to the host,
        // so the per-parameter sums stay on the device until they are added up.
        let sums = self
            .params
            .iter()
            .filter_map(|p| grads.get(p.var.as_tensor()))
            .map(|g| g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let total = if sums.is_empty() {
            0.0
        } else {
            Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()? as f64
        };
        let norm = total.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            for p in &self.params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * s)?);
                }
            }
        }
        Ok(norm)
    }

    /// Scale each parameter's learning rate by `scale(name)` (layer-wise lr decay); the
    /// weight decay step scales with it, as PyTorch's per-group `lr` does.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // A leaf's gradient can still carry its backward graph (candle's conv2d kernel
            // gradient does); the moments must not, or every step's activations stay alive
            // through the chain m_t -> m_{t-1}.
            let g = g.detach();
            let g = &g;
            let lr = lr * p.lr_scale;
            let decays = p.decay && self.weight_decay > 0.0;
            let step = crate::kernels::AdamStep {
                keep: if decays {
                    1.0 - lr * self.weight_decay
                } else {
                    1.0
                },
                beta1: self.beta1,
                beta2: self.beta2,
                inv_sqrt_bc2: 1.0 / bc2.sqrt(),
                eps: self.eps,
                step_size: lr / bc1,
            };
            #[cfg(feature = "cuda")]
            if p.update_on_gpu(g, &step)? {
                continue;
            }
            let w = p.var.as_tensor().detach();
            let (w2, m, v) = match crate::kernels::adamw_update(&w, g, &p.m, &p.v, &step)? {
                Some(r) => r,
                None => composed_update(&w, g, &p.m, &p.v, &step)?,
            };
            (p.m, p.v) = (m, v);
            p.var.set(&w2)?;
        }
        Ok(())
    }

    /// Multiply every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&self, grads: &mut GradStore, factor: f64) -> Result<()> {
        for p in &self.params {
            if let Some(g) = grads.remove(p.var.as_tensor()) {
                grads.insert(p.var.as_tensor(), (g * factor)?);
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`adam.m.<param>`, `adam.v.<param>`) and the update count
    /// (`adam.t`; it trails the step when steps were skipped).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            out.push((format!("adam.m.{}", p.name), p.m.clone()));
            out.push((format!("adam.v.{}", p.name), p.v.clone()));
        }
        out.push(("adam.t".into(), scalar(self.t as f64)?));
        Ok(out)
    }

    /// Restore the moments; the update count is `adam.t` when the checkpoint has it, else `t`.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::Invalid(format!("checkpoint lacks optimizer state {k}")))
            };
            p.m = get(format!("adam.m.{}", p.name))?;
            p.v = get(format!("adam.v.{}", p.name))?;
            p.packed = None;
        }
        self.t = match tensors.get("adam.t") {
            Some(v) => read_scalar(v)? as u64,
            None => t,
        };
        Ok(())
    }
}

fn scalar(v: f64) -> Result<Tensor> {
    Ok(Tensor::new(&[v], &candle_core::Device::Cpu)?)
}

fn read_scalar(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .unwrap_or(0.0))
}

/// Dynamic loss scaling for f16 training, as `torch.amp.GradScaler` does by default: the loss
/// is multiplied by `scale` (initially 2^16) before the backward pass so small gradients do not
/// underflow in f16; the gradients are divided by it again; a step whose gradients are not
/// finite is skipped and the scale halved; after 2000 finite steps in a row it doubles.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    good_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// Account for one step whose unscaled gradients were (or were not) all finite; returns
    /// whether the optimizer should take the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
        }
        finite
    }

    /// `amp.scale` and `amp.good_steps`, for checkpoints.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("amp.scale".into(), scalar(self.scale)?),
            ("amp.good_steps".into(), scalar(self.good_steps as f64)?),
        ])
    }

    /// The saved scaler, or a fresh one when the checkpoint has none (it was not f16).
    pub fn from_state(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        match (tensors.get("amp.scale"), tensors.get("amp.good_steps")) {
            (Some(s), Some(g)) => Ok(Self {
                scale: read_scalar(s)?,
                good_steps: read_scalar(g)? as u64,
            }),
            _ => Ok(Self::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lr_scales_scale_the_first_adam_step() {
        // The first AdamW step moves each weight by lr * g / (|g| + eps) (bias-corrected
        // moments are g and g^2): by lr * scale here, minus the decoupled decay for matrices.
        let mut vars = HashMap::new();
        for n in ["block.w", "head.w"] {
            vars.insert(
                n.to_string(),
                Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap()).unwrap(),
            );
        }
        let mut opt = AdamW::new(&vars, 0.1).unwrap();
        opt.set_lr_scales(|n| if n.starts_with("block") { 0.25 } else { 1.0 });
        let loss = (vars["block.w"].as_tensor().sum_all().unwrap() * 3.0)
            .unwrap()
            .add(&(vars["head.w"].as_tensor().sum_all().unwrap() * -5.0).unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 0.01).unwrap();
        let get = |n: &str| vars[n].as_tensor().to_vec2::<f32>().unwrap()[0].clone();
        for (n, scale, sign) in [("block.w", 0.25f64, 1.0f64), ("head.w", 1.0, -1.0)] {
            let lr = 0.01 * scale;
            for (w, w0) in get(n).iter().zip([1.0f64, -2.0]) {
                let want = w0 * (1.0 - lr * 0.1) - lr * sign;
                assert!((*w as f64 - want).abs() < 1e-6, "{n}: {w} vs {want}");
            }
        }
    }

    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_scaler_backs_off_and_grows_like_grad_scaler() {
        let mut s = LossScaler::default();
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(s.scale, 65536.0);
        s.update(true);
        let mut saved = HashMap::new();
        saved.extend(s.state().unwrap());
        assert_eq!(LossScaler::from_state(&saved).unwrap(), s);
        assert_eq!(
            LossScaler::from_state(&HashMap::new()).unwrap(),
            LossScaler::default()
        );
    }

    /// The fused CPU update gives the composition's bits (with and without decay).
    #[test]
    fn fused_update_equals_the_composition() {
        let dev = Device::Cpu;
        let n = 40_000; // several of the kernel's chunks and a partial one
        let w = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let g = Tensor::randn(0f32, 0.1, n, &dev).unwrap();
        let m = Tensor::randn(0f32, 0.05, n, &dev).unwrap();
        let v = Tensor::randn(0f32, 0.01, n, &dev).unwrap().sqr().unwrap();
        for keep in [1.0, 1.0 - 1e-3 * 0.05] {
            let s = crate::kernels::AdamStep {
                keep,
                beta1: 0.9,
                beta2: 0.999,
                inv_sqrt_bc2: 1.0 / (1.0f64 - 0.999f64.powi(3)).sqrt(),
                eps: 1e-8,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
            };
            let fused = crate::kernels::adamw_update(&w, &g, &m, &v, &s)
                .unwrap()
                .expect("CPU f32 takes the fused path");
            let composed = composed_update(&w, &g, &m, &v, &s).unwrap();
            for (a, b) in [
                (&fused.0, &composed.0),
                (&fused.1, &composed.1),
                (&fused.2, &composed.2),
            ] {
                let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits());
                assert_eq!(differ.count(), 0, "keep {keep}");
            }
            assert_ne!(
                fused.0.to_vec1::<f32>().unwrap(),
                w.to_vec1::<f32>().unwrap()
            );
        }
    }

    /// torch 2.15: p = tensor([1., -2.]), AdamW(lr=0.1, wd=0.01), grads g1 = [0.5, -1.0] then
    /// g2 = [0.25, 0.5]; printed p after each step.
    #[test]
    fn matches_torch_adamw() {
        let v = Var::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap();
        let mut vars = HashMap::new();
        vars.insert("w".to_string(), v.clone());
        let mut opt = AdamW::new(&vars, 0.01).unwrap();
        let expect = [[0.899_000_05f32, -1.898], [0.804_883_06, -1.869_468_3]];
        for (g, want) in [[0.5f32, -1.0], [0.25, 0.5]].iter().zip(expect) {
            let loss = (v.as_tensor() * Tensor::new(&[*g], &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
            let got = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn moments_do_not_keep_the_backward_graph() {
        // candle returns conv2d kernel gradients that still track the ops that made them; the
        // optimizer state must be detached from them (otherwise memory grows every step).
        let dev = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &dev).unwrap())
                .unwrap();
        let x =
            Var::from_tensor(&Tensor::ones((1, 1, 5, 5), candle_core::DType::F32, &dev).unwrap())
                .unwrap();
        let h = (x.as_tensor() * 2.0).unwrap();
        let loss = h
            .conv2d(w.as_tensor(), 1, 1, 1, 1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut vars = HashMap::new();
        vars.insert("w".to_string(), w.clone());
        let mut opt = AdamW::new(&vars, 0.01).unwrap();
        opt.step(&grads, 0.1).unwrap();
        for (name, t) in opt.state().unwrap() {
            assert!(!t.track_op(), "{name} keeps a backward graph");
        }
    }
}
