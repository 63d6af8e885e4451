//! The distillation feature loss in one pass (CPU, f32): for student and teacher maps of the
//! same shape `[B, ...]`,
//!
//! `loss = w_cos (1 - mean_b cos_b) + w_sl1 mean(SmoothL1_beta=1(s - t)) + w_mse mean((s - t)^2)`
//!
//! with `cos_b = <s_b, t_b> / max(|s_b| |t_b|, 1e-8)` over each image's whole flattened map.
//! The composition of candle ops this replaces reads the maps ~10 times and allocates as many
//! map-sized temporaries, forward and backward; here the forward reads each map once (five
//! per-image sums) and the backward once more for the sums and once to write the gradient.
//! The teacher side gets no gradient (targets are detached).

use super::fast_path;
use super::op::{apply, apply_no_bwd, operands, In, Kernel};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

const EPS: f64 = 1e-8;
/// Elements summed in f32 lanes before the partial sum is added in f64.
const BLOCK: usize = 4096;

/// The weights of the three terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    pub cosine: f64,
    pub smooth_l1: f64,
    pub mse: f64,
}

/// Per image: `<s,t>`, `|s|^2`, `|t|^2`, sum of SmoothL1, sum of squared differences.
type Sums = [f64; 5];

#[inline(always)]
fn sums_body(s: &[f32], t: &[f32], out: &mut Sums) {
    const L: usize = 8;
    let mut acc = [[0f32; L]; 5];
    let n = s.len() / L * L;
    for (sc, tc) in s[..n].chunks_exact(L).zip(t[..n].chunks_exact(L)) {
        for i in 0..L {
            let (a, b) = (sc[i], tc[i]);
            let d = a - b;
            let ad = d.abs();
            // SmoothL1 (beta 1) without a branch: m = min(|d|, 1); m (|d| - m/2).
            let m = ad.min(1.0);
            acc[0][i] += a * b;
            acc[1][i] += a * a;
            acc[2][i] += b * b;
            acc[3][i] += m * (ad - 0.5 * m);
            acc[4][i] += d * d;
        }
    }
    for (k, lanes) in acc.iter().enumerate() {
        out[k] += lanes.iter().map(|&v| v as f64).sum::<f64>();
    }
    for (&a, &b) in s[n..].iter().zip(&t[n..]) {
        let d = (a - b) as f64;
        let ad = d.abs();
        let m = ad.min(1.0);
        out[0] += a as f64 * b as f64;
        out[1] += a as f64 * a as f64;
        out[2] += b as f64 * b as f64;
        out[3] += m * (ad - 0.5 * m);
        out[4] += d * d;
    }
}
multiversion!(sums_block, sums_body, (s: &[f32], t: &[f32], out: &mut Sums));

/// The per-image sums of `[B, m]` maps, blocks in parallel.
fn image_sums(s: &[f32], t: &[f32], b: usize) -> Vec<Sums> {
    let m = s.len() / b.max(1);
    (0..b)
        .into_par_iter()
        .map(|i| {
            let (si, ti) = (&s[i * m..(i + 1) * m], &t[i * m..(i + 1) * m]);
            si.par_chunks(BLOCK)
                .zip(ti.par_chunks(BLOCK))
                .map(|(sc, tc)| {
                    let mut o = [0f64; 5];
                    sums_block(sc, tc, &mut o);
                    o
                })
                .reduce(
                    || [0f64; 5],
                    |mut a, o| {
                        for k in 0..5 {
                            a[k] += o[k];
                        }
                        a
                    },
                )
        })
        .collect()
}

impl LossWeights {
    fn value(&self, sums: &[Sums], n: usize) -> f64 {
        let b = sums.len() as f64;
        let cos_mean = sums
            .iter()
            .map(|s| s[0] / (s[1].sqrt() * s[2].sqrt()).max(EPS))
            .sum::<f64>()
            / b;
        let (sl1, sq) = sums
            .iter()
            .fold((0.0, 0.0), |(a, q), s| (a + s[3], q + s[4]));
        self.cosine * (1.0 - cos_mean) + (self.smooth_l1 * sl1 + self.mse * sq) / n as f64
    }

    /// Per image `(a, c)` with `d loss / d s_i = a t_i + c s_i + (smooth-L1 and MSE terms)`.
    fn cosine_coefficients(&self, sums: &[Sums]) -> Vec<(f32, f32)> {
        let b = sums.len() as f64;
        sums.iter()
            .map(|s| {
                let den = s[1].sqrt() * s[2].sqrt();
                let k = -self.cosine / b;
                if den > EPS {
                    // d cos / d s = (t - (<s,t> / |s|^2) s) / (|s| |t|)
                    ((k / den) as f32, (-k * s[0] / (s[1] * den)) as f32)
                } else {
                    // the denominator is clamped: d cos / d s = t / eps
                    ((k / EPS) as f32, 0.0)
                }
            })
            .collect()
    }
}

#[inline(always)]
fn grad_body(s: &[f32], t: &[f32], out: &mut [f32], c: &[f32; 5]) {
    // c = [a, c, w_sl1/N, 2 w_mse/N, upstream gradient]
    for ((o, &a), &b) in out.iter_mut().zip(s).zip(t) {
        let d = a - b;
        *o = c[4] * (c[0] * b + c[1] * a + c[2] * d.clamp(-1.0, 1.0) + c[3] * d);
    }
}
multiversion!(grad_block, grad_body, (s: &[f32], t: &[f32], out: &mut [f32], c: &[f32; 5]));

struct FeatureLossOp(LossWeights);

/// The batch size and the student and teacher values of same-shape contiguous f32 maps.
fn maps<'a>(name: &str, xs: &[In<'a>]) -> candle_core::Result<(usize, &'a [f32], &'a [f32])> {
    let [s, t] = operands(name, xs)?;
    if s.dims() != t.dims() || s.dims().is_empty() {
        candle_core::bail!(
            "feature loss: student {:?} and teacher {:?} differ in shape",
            s.dims(),
            t.dims()
        )
    }
    Ok((s.dims()[0], s.data, t.data))
}

impl Kernel for FeatureLossOp {
    fn name(&self) -> &'static str {
        "distillery-feature-loss"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (b, s, t) = maps(self.name(), xs)?;
        let v = self.0.value(&image_sums(s, t, b), s.len());
        Ok((vec![v as f32], Shape::from(())))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [s, t] = operands(self.name(), xs)?;
        let g = g.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let ds = apply_no_bwd(FeatureLossGrad(self.0, g), &[s, t])?;
        Ok(vec![Some(ds), None])
    }
}

/// `d loss / d s` times the upstream gradient.
struct FeatureLossGrad(LossWeights, f32);

impl Kernel for FeatureLossGrad {
    fn name(&self) -> &'static str {
        "distillery-feature-loss-grad"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (b, s, t) = maps(self.name(), xs)?;
        let shape = xs[0].shape.clone();
        let n = s.len();
        if n == 0 {
            return Ok((Vec::new(), shape));
        }
        let m = n / b;
        let coef = self.0.cosine_coefficients(&image_sums(s, t, b));
        let (wl, wm) = (
            (self.0.smooth_l1 / n as f64) as f32,
            (2.0 * self.0.mse / n as f64) as f32,
        );
        let mut out = vec![0f32; n];
        out.par_chunks_mut(m)
            .zip(s.par_chunks(m).zip(t.par_chunks(m)))
            .zip(coef)
            .for_each(|((o, (si, ti)), (a, c))| {
                let k = [a, c, wl, wm, self.1];
                o.par_chunks_mut(BLOCK)
                    .zip(si.par_chunks(BLOCK).zip(ti.par_chunks(BLOCK)))
                    .for_each(|(ob, (sb, tb))| grad_block(sb, tb, ob, &k));
            });
        Ok((out, shape))
    }
}

/// The weighted feature loss of two same-shape maps `[B, ...]` (teacher detached) in one pass
/// on CPU f32; `None` elsewhere (the caller composes it from candle ops).
pub fn fused_feature_loss(
    s: &Tensor,
    t: &Tensor,
    w: LossWeights,
) -> candle_core::Result<Option<Tensor>> {
    if !(fast_path(s) && fast_path(t)) {
        return Ok(None);
    }
    Ok(Some(apply(FeatureLossOp(w), &[s, &t.detach()])?))
}
