//! `act(x * a[c] + b[c])` over `[B, C, H, W]`: a BatchNorm (in evaluation, or with batch
//! statistics folded into `a` and `b`) and the activation after it as one pass over the map,
//! forward and backward, where candle would run four broadcast binary ops and a unary op, each
//! allocating a full-size result. The backward returns `dx` and the per-channel `da`, `db` in
//! one pass too. CPU f32 only; other devices and dtypes compose candle ops.

use super::op::{apply, apply_no_bwd, operands, In, Kernel};
use super::{exp_approx, gelu_grad_one, gelu_one};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

/// The activation after the affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    Silu,
    /// exact (erf) GELU
    Gelu,
}

impl Act {
    fn code(self) -> u8 {
        self as u8
    }
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-v))
}

#[inline(always)]
fn activate(v: f32, act: u8) -> f32 {
    match act {
        1 => v.max(0.0),
        2 => v * sigmoid(v),
        3 => gelu_one(v),
        _ => v,
    }
}

/// d act(v) / dv.
#[inline(always)]
fn slope(v: f32, act: u8) -> f32 {
    match act {
        1 => {
            if v > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        2 => {
            let s = sigmoid(v);
            s * (1.0 + v * (1.0 - s))
        }
        3 => gelu_grad_one(v),
        _ => 1.0,
    }
}

#[inline(always)]
fn forward_body(x: &[f32], y: &mut [f32], a: f32, b: f32, act: u8) {
    // one loop per activation so each vectorises without a branch inside
    match act {
        1 => y
            .iter_mut()
            .zip(x)
            .for_each(|(d, &v)| *d = activate(v * a + b, 1)),
        2 => y
            .iter_mut()
            .zip(x)
            .for_each(|(d, &v)| *d = activate(v * a + b, 2)),
        3 => y
            .iter_mut()
            .zip(x)
            .for_each(|(d, &v)| *d = activate(v * a + b, 3)),
        _ => y.iter_mut().zip(x).for_each(|(d, &v)| *d = v * a + b),
    }
}
multiversion!(pub(super) forward_plane, forward_body, (x: &[f32], y: &mut [f32], a: f32, b: f32, act: u8));

/// `y = act(u + v)`, one loop per activation.
#[inline(always)]
fn add_act_body(u: &[f32], v: &[f32], y: &mut [f32], act: u8) {
    #[inline(always)]
    fn run<const ACT: u8>(u: &[f32], v: &[f32], y: &mut [f32]) {
        y.iter_mut()
            .zip(u.iter().zip(v))
            .for_each(|(d, (&p, &q))| *d = activate(p + q, ACT));
    }
    match act {
        1 => run::<1>(u, v, y),
        2 => run::<2>(u, v, y),
        3 => run::<3>(u, v, y),
        _ => run::<0>(u, v, y),
    }
}
multiversion!(add_act_slice, add_act_body, (u: &[f32], v: &[f32], y: &mut [f32], act: u8));

/// `d = g * act'(u + v)`, one loop per activation.
#[inline(always)]
fn add_act_grad_body(u: &[f32], v: &[f32], g: &[f32], d: &mut [f32], act: u8) {
    #[inline(always)]
    fn run<const ACT: u8>(u: &[f32], v: &[f32], g: &[f32], d: &mut [f32]) {
        d.iter_mut()
            .zip(u.iter().zip(v).zip(g))
            .for_each(|(d, ((&p, &q), &g))| *d = g * slope(p + q, ACT));
    }
    match act {
        1 => run::<1>(u, v, g, d),
        2 => run::<2>(u, v, g, d),
        3 => run::<3>(u, v, g, d),
        _ => run::<0>(u, v, g, d),
    }
}
multiversion!(
    add_act_grad_slice,
    add_act_grad_body,
    (u: &[f32], v: &[f32], g: &[f32], d: &mut [f32], act: u8)
);

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 16 * 1024;

/// `(u, v[, w]) -> act(u + v [+ w])` (a residual sum, or a sum of branches, and the activation
/// after it), one shape.
struct AddAct(Act);

impl Kernel for AddAct {
    fn name(&self) -> &'static str {
        "distillery-add-act"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (u, v, w) = match xs {
            [u, v] => (u, v, None),
            [u, v, w] => (u, v, Some(w.data)),
            _ => candle_core::bail!("{}: takes 2 or 3 operands", self.name()),
        };
        let mut y = vec![0f32; u.data.len()];
        let act = self.0.code();
        y.par_chunks_mut(CHUNK)
            .zip(u.data.par_chunks(CHUNK).zip(v.data.par_chunks(CHUNK)))
            .enumerate()
            .for_each(|(i, (y, (u, v)))| match w {
                None => add_act_slice(u, v, y, act),
                Some(w) => {
                    let mut s = vec![0f32; y.len()];
                    add_act_slice(u, v, &mut s, Act::Identity.code());
                    add_act_slice(&s, &w[i * CHUNK..i * CHUNK + y.len()], y, act);
                }
            });
        Ok((y, u.shape.clone()))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let d = match (self.0, xs) {
            (Act::Identity, _) => g.clone(),
            (_, [u, v]) => apply_no_bwd(AddActBwd(self.0), &[u, v, g])?,
            (_, [u, v, w]) => {
                let s = apply_no_bwd(AddAct(Act::Identity), &[u, v])?;
                apply_no_bwd(AddActBwd(self.0), &[&s, w, g])?
            }
            _ => candle_core::bail!("{}: takes 2 or 3 operands", self.name()),
        };
        Ok(vec![Some(d); xs.len()])
    }
}

/// `(u, v, g) -> g * act'(u + v)`, the gradient of [`AddAct`] for both operands.
struct AddActBwd(Act);

impl Kernel for AddActBwd {
    fn name(&self) -> &'static str {
        "distillery-add-act-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [u, v, g] = operands(self.name(), xs)?;
        let mut d = vec![0f32; u.data.len()];
        let act = self.0.code();
        d.par_chunks_mut(CHUNK)
            .zip(u.data.par_chunks(CHUNK).zip(v.data.par_chunks(CHUNK)))
            .zip(g.data.par_chunks(CHUNK))
            .for_each(|((d, (u, v)), g)| add_act_grad_slice(u, v, g, d, act));
        Ok((d, u.shape.clone()))
    }
}

/// `act(sum of parts)` of tensors of one shape (a residual sum, or a block's branches, and the
/// activation after it), differentiable in every part: on CPU f32 one pass forward and one
/// backward per three parts, where candle runs an add per part, the activation and, for ReLU,
/// four full-size ops in its backward.
pub fn sum_act(parts: &[&Tensor], act: Act) -> candle_core::Result<Tensor> {
    let Some((first, rest)) = parts.split_first() else {
        candle_core::bail!("sum_act: nothing to sum")
    };
    if let Some(p) = rest.iter().find(|p| p.shape() != first.shape()) {
        candle_core::bail!(
            "sum_act: shapes {:?} and {:?} differ",
            first.dims(),
            p.dims()
        )
    }
    let fast = parts.iter().all(|p| super::fast_path(p));
    match parts.len() {
        1 => act.apply(first),
        2 | 3 if fast => apply(AddAct(act), parts),
        n if fast => {
            let head = sum_act(&parts[..n - 2], Act::Identity)?;
            apply(AddAct(act), &[&head, parts[n - 2], parts[n - 1]])
        }
        _ => {
            let mut y = (*first).clone();
            for p in rest {
                y = (y + *p)?;
            }
            act.apply(&y)
        }
    }
}

/// `dx = g * act'(v) * a`; returns `(sum g act'(v) x, sum g act'(v))`.
#[inline(always)]
fn backward_body(x: &[f32], g: &[f32], dx: &mut [f32], a: f32, b: f32, act: u8, sums: &mut [f32]) {
    // one loop per activation (a constant `act` inside), so each vectorises
    #[inline(always)]
    fn run<const ACT: u8>(x: &[f32], g: &[f32], dx: &mut [f32], a: f32, b: f32) -> (f32, f32) {
        // eight running sums per quantity, so the sums vectorise too
        let (mut sa, mut sb) = ([0f32; LANES], [0f32; LANES]);
        let main = x.len() / LANES * LANES;
        let chunks = dx[..main]
            .chunks_exact_mut(LANES)
            .zip(x[..main].chunks_exact(LANES))
            .zip(g[..main].chunks_exact(LANES));
        for ((dc, xc), gc) in chunks {
            for l in 0..LANES {
                let dv = gc[l] * slope(xc[l] * a + b, ACT);
                dc[l] = dv * a;
                sa[l] += dv * xc[l];
                sb[l] += dv;
            }
        }
        let (mut ta, mut tb) = (sa.iter().sum::<f32>(), sb.iter().sum::<f32>());
        for i in main..x.len() {
            let dv = g[i] * slope(x[i] * a + b, ACT);
            dx[i] = dv * a;
            ta += dv * x[i];
            tb += dv;
        }
        (ta, tb)
    }
    let (sa, sb) = match act {
        1 => run::<1>(x, g, dx, a, b),
        2 => run::<2>(x, g, dx, a, b),
        3 => run::<3>(x, g, dx, a, b),
        _ => run::<0>(x, g, dx, a, b),
    };
    sums[0] = sa;
    sums[1] = sb;
}
multiversion!(
    backward_plane,
    backward_body,
    (x: &[f32], g: &[f32], dx: &mut [f32], a: f32, b: f32, act: u8, sums: &mut [f32])
);

const LANES: usize = 8;

/// `sum(x - shift)` and `sum((x - shift)^2)` of one plane, in eight lanes.
#[inline(always)]
fn moments_body(x: &[f32], shift: f32, out: &mut [f64]) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let main = x.len() / LANES * LANES;
    for c in x[..main].chunks_exact(LANES) {
        for l in 0..LANES {
            let d = c[l] - shift;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut t1, mut t2) = (0f64, 0f64);
    for l in 0..LANES {
        t1 += s1[l] as f64;
        t2 += s2[l] as f64;
    }
    for &v in &x[main..] {
        let d = (v - shift) as f64;
        t1 += d;
        t2 += d * d;
    }
    out[0] = t1;
    out[1] = t2;
}
multiversion!(plane_moments, moments_body, (x: &[f32], shift: f32, out: &mut [f64]));

/// Per-channel mean and biased variance: `x [B, C, H, W] -> [2, C]`. Two passes (the mean, then
/// the spread about it) so the variance does not lose precision to cancellation.
struct ChannelStats;

impl Kernel for ChannelStats {
    fn name(&self) -> &'static str {
        "distillery-channel-stats"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x] = operands(self.name(), xs)?;
        let (b, c, hw) = dims(&x)?;
        Ok((channel_moments(x.data, (b, c, hw)), Shape::from((2, c))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        stats: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x] = operands(self.name(), xs)?;
        // d mean / dx = 1 / N; d var / dx = 2 (x - mean) / N: dx = a x + b per channel
        let (b, _, h, w) = x.dims4()?;
        let n = (b * h * w) as f64;
        let (mean, dm, dv) = (stats.get(0)?, g.get(0)?, g.get(1)?);
        let a = (&dv * (2.0 / n))?;
        let shift = ((&dm / n)? - (&a * &mean)?)?;
        Ok(vec![Some(channel_affine_act(
            x,
            &a,
            &shift,
            Act::Identity,
        )?)])
    }
}

/// Per-channel `[mean; biased variance]` (`2 * C` values) of `[B, C, HW]` values. Two passes
/// (the mean, then the spread about it) so the variance does not lose precision to
/// cancellation; one task per channel.
pub(super) fn channel_moments(x: &[f32], (b, c, hw): (usize, usize, usize)) -> Vec<f32> {
    let n = (b * hw).max(1) as f64;
    let mut stats = vec![0f32; 2 * c];
    let per_channel: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |i: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            let mut m = [0f64; 2];
            let mut sum = 0f64;
            for i in 0..b {
                plane_moments(plane(i), 0.0, &mut m);
                sum += m[0];
            }
            let mean = sum / n;
            let mut sq = 0f64;
            let mut dev = 0f64;
            for i in 0..b {
                plane_moments(plane(i), mean as f32, &mut m);
                dev += m[0];
                sq += m[1];
            }
            // the shift is the f32-rounded mean: correct for what it left behind
            let d = dev / n;
            (mean as f32, (sq / n - d * d).max(0.0) as f32)
        })
        .collect();
    for (ch, (m, v)) in per_channel.into_iter().enumerate() {
        stats[ch] = m;
        stats[c + ch] = v;
    }
    stats
}

/// Per-channel `(mean, biased variance)` of `x: [B, C, H, W]` as `[2, C]` (BatchNorm's batch
/// statistics), differentiable; f32 on the CPU runs one fused kernel.
pub fn channel_stats(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::fast_path(x) {
        return apply(ChannelStats, &[x]);
    }
    let (b, c, h, w) = x.dims4()?;
    let flat = x.transpose(0, 1)?.reshape((c, b * h * w))?;
    let mean = flat.mean_keepdim(1)?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
    Tensor::cat(&[mean.t()?, var.t()?], 0)
}

/// `(batch, channels, plane size)` of an NCHW operand.
fn dims(x: &In) -> candle_core::Result<(usize, usize, usize)> {
    let (b, c, h, w) = x.shape.dims4()?;
    Ok((b, c, h * w))
}

/// Forward: `(x [B, C, H, W], ab [2, C]) -> y`.
struct AffineAct(Act);

impl Kernel for AffineAct {
    fn name(&self) -> &'static str {
        "distillery-channel-affine-act"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, ab] = operands(self.name(), xs)?;
        let c = x.shape.dims4()?.1;
        let (a, b) = ab.data.split_at(c);
        affine_forward(&x, a, b, self.0)
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, ab] = operands(self.name(), xs)?;
        let (b, c, h, w) = x.dims4()?;
        let n = b * c * h * w;
        let packed = apply_no_bwd(AffineActBwd(self.0), &[x, ab, g])?;
        let dx = packed.narrow(0, 0, n)?.reshape((b, c, h, w))?;
        // per-plane (da, db) partial sums -> [2, C]
        let dab = packed
            .narrow(0, n, 2 * b * c)?
            .reshape((b, c, 2))?
            .sum(0)?
            .t()?
            .contiguous()?;
        Ok(vec![Some(dx), Some(dab)])
    }
}

/// `act(x * a[c] + b[c])` over an NCHW operand.
fn affine_forward(
    x: &In,
    a: &[f32],
    b: &[f32],
    act: Act,
) -> candle_core::Result<(Vec<f32>, Shape)> {
    let (_, c, hw) = dims(x)?;
    if a.len() != c || b.len() != c {
        candle_core::bail!(
            "channel affine: {} / {} coefficients for {c} channels",
            a.len(),
            b.len()
        )
    }
    let mut y = vec![0f32; x.data.len()];
    let act = act.code();
    y.par_chunks_mut(hw.max(1))
        .zip(x.data.par_chunks(hw.max(1)))
        .enumerate()
        .for_each(|(p, (yp, xp))| forward_plane(xp, yp, a[p % c], b[p % c], act));
    Ok((y, x.shape.clone()))
}

/// Backward: `(x, ab, g) -> [dx (flattened), per-plane (da, db)]`.
struct AffineActBwd(Act);

impl Kernel for AffineActBwd {
    fn name(&self) -> &'static str {
        "distillery-channel-affine-act-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, ab, g] = operands(self.name(), xs)?;
        let c = x.shape.dims4()?.1;
        let (a, b) = ab.data.split_at(c);
        let out = affine_backward(&x, a, b, g.data, self.0)?;
        let len = out.len();
        Ok((out, Shape::from(len)))
    }
}

/// The backward of `act(x * a[c] + b[c])` for the output gradient `g`: `[dx (flattened),
/// per-plane (sum g act' x, sum g act')]`.
fn affine_backward(
    x: &In,
    a: &[f32],
    b: &[f32],
    g: &[f32],
    act: Act,
) -> candle_core::Result<Vec<f32>> {
    let (batch, c, hw) = dims(x)?;
    let x = x.data;
    let n = x.len();
    if g.len() != n || a.len() != c || b.len() != c {
        candle_core::bail!(
            "channel affine backward: operands disagree with {:?}",
            (batch, c, hw)
        )
    }
    let mut out = vec![0f32; n + 2 * batch * c];
    let (dx, sums) = out.split_at_mut(n);
    let act = act.code();
    dx.par_chunks_mut(hw.max(1))
        .zip(sums.par_chunks_mut(2))
        .enumerate()
        .for_each(|(p, (dxp, s))| {
            let r = p * hw..(p + 1) * hw;
            let ch = p % c;
            backward_plane(&x[r.clone()], &g[r], dxp, a[ch], b[ch], act, s);
        });
    Ok(out)
}

/// `y += p * x + q`.
#[inline(always)]
fn add_affine_body(x: &[f32], y: &mut [f32], p: f32, q: f32) {
    y.iter_mut().zip(x).for_each(|(d, &v)| *d += v * p + q);
}
multiversion!(pub(super) add_affine, add_affine_body, (x: &[f32], y: &mut [f32], p: f32, q: f32));

/// BatchNorm's per-channel map `x * a + b` from `[weight; bias]` and the statistics
/// `[mean; biased variance]` (both `[2, C]`): `(a, b, 1 / sqrt(var + eps))`.
pub(super) fn bn_coefficients(
    weight: &[f32],
    bias: &[f32],
    stats: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = weight.len();
    let inv: Vec<f32> = stats[c..].iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let a: Vec<f32> = weight.iter().zip(&inv).map(|(g, i)| g * i).collect();
    let b = (0..c).map(|ch| bias[ch] - stats[ch] * a[ch]).collect();
    (a, b, inv)
}

/// One channel of a BatchNorm's backward with batch statistics: for `y = a (z - mean) + b`
/// (`a = weight * inv`, `inv = 1 / sqrt(var + eps)`) and an upstream gradient `v` whose sums
/// over the channel's `count` values are `sv = sum v` and `svz = sum v z`, the input gradient is
/// `dz = a v + p z + q` (the statistics' dependence on `z` included).
pub(super) struct BnGrad {
    pub dweight: f64,
    pub p: f64,
    pub q: f64,
}

pub(super) fn bn_grad(a: f64, inv: f64, mean: f64, (sv, svz): (f64, f64), count: f64) -> BnGrad {
    let dweight = inv * (svz - mean * sv);
    let p = -a * inv * dweight / count;
    BnGrad {
        dweight,
        p,
        q: -a * sv / count - p * mean,
    }
}

/// BatchNorm with batch statistics and its activation as one node: `(x [B, C, H, W], [weight;
/// bias] [2, C], [mean; biased variance] of x [2, C], given without gradient) -> y`. Its
/// backward is that of the whole map, the statistics' dependence on `x` included.
struct BnTrain {
    act: Act,
    eps: f32,
}

fn bn_operands(name: &str, x: &In, gb: &In, stats: &In) -> candle_core::Result<()> {
    let c = x.shape.dims4()?.1;
    if gb.data.len() != 2 * c || stats.data.len() != 2 * c {
        candle_core::bail!("{name}: parameters or statistics are not [2, {c}]")
    }
    Ok(())
}

impl Kernel for BnTrain {
    fn name(&self) -> &'static str {
        "distillery-batch-norm-train"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, gb, stats] = operands(self.name(), xs)?;
        bn_operands(self.name(), &x, &gb, &stats)?;
        let (w, b) = gb.data.split_at(gb.data.len() / 2);
        let (a, b, _) = bn_coefficients(w, b, stats.data, self.eps);
        affine_forward(&x, &a, &b, self.act)
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, gb, stats] = operands(self.name(), xs)?;
        let (n, c) = (x.elem_count(), x.dim(1)?);
        let params = Tensor::cat(&[gb, stats], 0)?;
        let bwd = BnTrainBwd {
            act: self.act,
            eps: self.eps,
        };
        let packed = apply_no_bwd(bwd, &[x, &params, g])?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgb = packed.narrow(0, n, 2 * c)?.reshape((2, c))?;
        Ok(vec![Some(dx), Some(dgb), None])
    }
}

/// Backward of [`BnTrain`]: `(x, [weight; bias; mean; var] [4, C], g) -> [dx (flattened),
/// dweight [C], dbias [C]]`.
struct BnTrainBwd {
    act: Act,
    eps: f32,
}

impl Kernel for BnTrainBwd {
    fn name(&self) -> &'static str {
        "distillery-batch-norm-train-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, params, g] = operands(self.name(), xs)?;
        let (batch, c, hw) = dims(&x)?;
        if params.data.len() != 4 * c {
            candle_core::bail!("{}: parameters are not [4, {c}]", self.name())
        }
        let (gb, stats) = params.data.split_at(2 * c);
        let (a, b, inv) = bn_coefficients(&gb[..c], &gb[c..], stats, self.eps);
        // dv = g act'(x a + b); dx = a dv - a mean(dv) - a inv xhat mean(dv xhat): the first
        // term and the per-plane sums in one pass, the rest a per-channel `p x + q` after
        let mut out = affine_backward(&x, &a, &b, g.data, self.act)?;
        let n = x.data.len();
        let count = (batch * hw).max(1) as f64;
        let mut dgb = vec![0f32; 2 * c];
        let mut pq = vec![0f32; 2 * c];
        for ch in 0..c {
            let (mut sx, mut s) = (0f64, 0f64);
            for i in 0..batch {
                let at = n + 2 * (i * c + ch);
                sx += out[at] as f64;
                s += out[at + 1] as f64;
            }
            let d = bn_grad(
                a[ch] as f64,
                inv[ch] as f64,
                stats[ch] as f64,
                (s, sx),
                count,
            );
            pq[ch] = d.p as f32;
            pq[c + ch] = d.q as f32;
            dgb[ch] = d.dweight as f32;
            dgb[c + ch] = s as f32;
        }
        let (dx, tail) = out.split_at_mut(n);
        dx.par_chunks_mut(hw.max(1))
            .zip(x.data.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(p, (dxp, xp))| add_affine(xp, dxp, pq[p % c], pq[c + p % c]));
        tail[..2 * c].copy_from_slice(&dgb);
        out.truncate(n + 2 * c);
        Ok((out, Shape::from(n + 2 * c)))
    }
}

/// BatchNorm in training mode and the activation after it: `act((x - mean) / sqrt(var + eps) *
/// weight + bias)` with the per-channel mean and biased variance of `x: [B, C, H, W]`,
/// differentiable in `x` (through the statistics too), `weight` and `bias` (`[C]`). Returns the
/// output and the statistics `[2, C]` (mean; biased variance), detached, for the running
/// estimates. On CPU f32 one node forward and backward (composed, the input would collect two
/// full-size gradients: from the statistics and from the map); elsewhere candle ops.
pub fn batch_norm_train_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: Act,
) -> candle_core::Result<(Tensor, Tensor)> {
    let c = x.dim(1)?;
    let (weight, bias) = (weight.reshape(c)?, bias.reshape(c)?);
    if super::fast_path(x) && super::fast_path(&weight) && super::fast_path(&bias) {
        let stats = apply_no_bwd(ChannelStats, &[x])?;
        let gb = Tensor::cat(&[weight.reshape((1, c))?, bias.reshape((1, c))?], 0)?;
        let bn = BnTrain {
            act,
            eps: eps as f32,
        };
        let y = apply(bn, &[x, &gb, &stats])?;
        return Ok((y, stats));
    }
    let stats = channel_stats(x)?;
    let (scale, shift) = bn_scale_shift(&weight, &bias, &stats.get(0)?, &stats.get(1)?, eps)?;
    Ok((channel_affine_act(x, &scale, &shift, act)?, stats.detach()))
}

/// BatchNorm as a per-channel map `x * scale + shift`: `scale = weight / sqrt(var + eps)`,
/// `shift = bias - mean * scale` (all `[C]`, differentiable).
pub fn bn_scale_shift(
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let scale = weight.div(&(var + eps)?.sqrt()?)?;
    let shift = (bias - mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// `act(x * a + b)` with `a`, `b` per channel (`[C]`) over `x: [B, C, H, W]`, differentiable in
/// all three.
pub fn channel_affine_act(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    act: Act,
) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    if super::fast_path(x) && super::fast_path(a) && super::fast_path(b) {
        let ab = Tensor::cat(&[a.reshape((1, c))?, b.reshape((1, c))?], 0)?;
        return apply(AffineAct(act), &[x, &ab]);
    }
    let y = super::add_channel_bias(&x.broadcast_mul(&a.reshape((1, c, 1, 1))?)?, b, 1)?;
    act.apply(&y)
}

impl Act {
    /// The activation as candle ops (any device and dtype).
    fn apply(self, y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::Identity => Ok(y.clone()),
            Act::Relu => y.relu(),
            Act::Silu => y.silu(),
            Act::Gelu => super::gelu_erf(y),
        }
    }
}

/// `x * s[c]` over `x: [B, C, H, W]` (`s` holds C values in any shape: a layer scale `[C, 1,
/// 1]`), differentiable in both. On CPU f32 one pass forward and backward; candle's broadcast
/// multiply reduces its gradient for `s` with a slow strided sum.
pub fn channel_scale(x: &Tensor, s: &Tensor) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let s = s.reshape(c)?;
    if super::fast_path(x) && super::fast_path(&s) {
        let zero = Tensor::zeros(c, x.dtype(), x.device())?;
        return channel_affine_act(x, &s, &zero, Act::Identity);
    }
    x.broadcast_mul(&s.reshape((1, c, 1, 1))?)
}

/// `x + b[c]` over `x: [B, C, H, W]` (a convolution's bias), differentiable in both; see
/// [`channel_scale`].
pub fn channel_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    channel_bias_act(x, b, Act::Identity)
}

/// `act(x + b[c])` over `x: [B, C, H, W]` (a convolution's bias and the activation after it)
/// in one pass forward and backward on CPU f32.
pub fn channel_bias_act(x: &Tensor, b: &Tensor, act: Act) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let b = b.reshape(c)?;
    if super::fast_path(x) && super::fast_path(&b) {
        let one = Tensor::ones(c, x.dtype(), x.device())?;
        return channel_affine_act(x, &one, &b, act);
    }
    act.apply(&super::add_channel_bias(x, &b, 1)?)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_abs_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// The statistics kernel against the composed form (forward and the gradient of a
    /// weighted sum of both statistics), on data with a large mean.
    #[test]
    fn channel_stats_match_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap() + 20.0).unwrap(),
        )
        .unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
        let fast = channel_stats(x.as_tensor()).unwrap();
        let xt = x.as_tensor();
        let flat = xt.transpose(0, 1).unwrap().reshape((4, 105)).unwrap();
        let mean = flat.mean_keepdim(1).unwrap();
        let var = flat
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap();
        let slow = Tensor::cat(&[mean.t().unwrap(), var.t().unwrap()], 0).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-4);
        let grad = |s: &Tensor| {
            let g = (s * &r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(xt).unwrap().clone()
        };
        assert!(max_abs_diff(&grad(&fast), &grad(&slow)) < 1e-5);
    }

    /// The kernel against the same map composed of candle ops, forward and all gradients.
    #[test]
    fn matches_composed_ops() {
        let dev = Device::Cpu;
        for act in [Act::Identity, Act::Relu, Act::Silu, Act::Gelu] {
            let x = Var::randn(0f32, 2.0, (3, 4, 5, 7), &dev).unwrap();
            let a = Var::randn(0f32, 1.0, 4, &dev).unwrap();
            let b = Var::randn(0f32, 1.0, 4, &dev).unwrap();
            let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
            let run = |fast: bool| {
                let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
                let y = if fast {
                    channel_affine_act(xt, at, bt, act).unwrap()
                } else {
                    let y = xt
                        .broadcast_mul(&at.reshape((1, 4, 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&bt.reshape((1, 4, 1, 1)).unwrap())
                        .unwrap();
                    act.apply(&y).unwrap()
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                (y, grad(&x), grad(&a), grad(&b))
            };
            let (f, s) = (run(true), run(false));
            assert!(max_abs_diff(&f.0, &s.0) < 1e-5, "{act:?} y");
            assert!(max_abs_diff(&f.1, &s.1) < 1e-5, "{act:?} dx");
            assert!(max_abs_diff(&f.2, &s.2) < 1e-3, "{act:?} da");
            assert!(max_abs_diff(&f.3, &s.3) < 1e-3, "{act:?} db");
        }
    }

    /// BatchNorm in training mode against candle's broadcast ops written out (f64): output,
    /// statistics and the gradients of input (through the statistics), weight and bias, for
    /// each activation, on data with a large mean; the f32 node and the composed fallback
    /// (f64) alike, within 1e-4 of the largest value.
    #[test]
    fn batch_norm_train_matches_broadcast_ops() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let (b, c, h, w) = (3, 5, 7, 6);
        let x0 = (Tensor::randn(0f64, 2.0, (b, c, h, w), &dev).unwrap() + 15.0).unwrap();
        let g0 = (Tensor::randn(0f64, 0.5, c, &dev).unwrap() + 1.0).unwrap();
        let b0 = Tensor::randn(0f64, 1.0, c, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (b, c, h, w), &dev).unwrap();
        let eps = 1e-5;
        let reference = |x: &Tensor, gm: &Tensor, bt: &Tensor, act: Act| {
            let bc = |t: &Tensor| t.reshape((1, c, 1, 1)).unwrap();
            let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap();
            let mean = mean.mean_keepdim(3).unwrap();
            let d = x.broadcast_sub(&mean).unwrap();
            let var = d
                .sqr()
                .unwrap()
                .mean_keepdim(0)
                .unwrap()
                .mean_keepdim(2)
                .unwrap();
            let var = var.mean_keepdim(3).unwrap();
            let xhat = d.broadcast_div(&(var.clone() + eps).unwrap().sqrt().unwrap());
            let y = xhat.unwrap().broadcast_mul(&bc(gm)).unwrap();
            let y = act.apply(&y.broadcast_add(&bc(bt)).unwrap()).unwrap();
            let stats = Tensor::cat(
                &[mean.flatten_all().unwrap(), var.flatten_all().unwrap()],
                0,
            );
            (y, stats.unwrap().reshape((2, c)).unwrap())
        };
        for act in [Act::Identity, Act::Relu, Act::Silu, Act::Gelu] {
            for dtype in [DType::F64, DType::F32] {
                let run = |fast: bool| {
                    let v = |t: &Tensor| {
                        let t = if fast {
                            t.to_dtype(dtype).unwrap()
                        } else {
                            t.clone()
                        };
                        Var::from_tensor(&t).unwrap()
                    };
                    let (x, gm, bt) = (v(&x0), v(&g0), v(&b0));
                    let (xt, gt, btt) = (x.as_tensor(), gm.as_tensor(), bt.as_tensor());
                    let (y, stats) = if fast {
                        batch_norm_train_act(xt, gt, btt, eps, act).unwrap()
                    } else {
                        reference(xt, gt, btt, act)
                    };
                    let rr = r.to_dtype(y.dtype()).unwrap();
                    let grads = (&y * &rr).unwrap().sum_all().unwrap().backward().unwrap();
                    let grad = |v: &Var| {
                        let g = grads.get(v.as_tensor()).unwrap();
                        g.to_dtype(DType::F32).unwrap()
                    };
                    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    [f32s(&y), f32s(&stats), grad(&x), grad(&gm), grad(&bt)]
                };
                let (got, want) = (run(true), run(false));
                let tol = if dtype == DType::F32 { 1e-4 } else { 1e-6 };
                for (i, what) in ["y", "stats", "dx", "dweight", "dbias"].iter().enumerate() {
                    let scale = max_abs_diff(&want[i], &want[i].zeros_like().unwrap()).max(1.0);
                    let err = max_abs_diff(&got[i], &want[i]) / scale;
                    assert!(err < tol, "{act:?} {dtype:?} {what}: {err}");
                }
            }
        }
    }

    /// Sums of 1 to 5 parts and the activation against candle's adds and activation: output
    /// and every part's gradient, every activation, a size that is not a multiple of the task
    /// size.
    #[test]
    fn sum_act_matches_composed_ops() {
        let dev = Device::Cpu;
        let shape = (2, 3, 77, 71);
        let r = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        for act in [Act::Identity, Act::Relu, Act::Silu, Act::Gelu] {
            for n in 1..=5 {
                let parts: Vec<Var> = (0..n)
                    .map(|_| Var::randn(0f32, 1.0, shape, &dev).unwrap())
                    .collect();
                let run = |fast: bool| {
                    let ts: Vec<&Tensor> = parts.iter().map(|p| p.as_tensor()).collect();
                    let y = if fast {
                        sum_act(&ts, act).unwrap()
                    } else {
                        let mut y = ts[0].clone();
                        for t in &ts[1..] {
                            y = (y + *t).unwrap();
                        }
                        act.apply(&y).unwrap()
                    };
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads: Vec<Tensor> = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
                    (y, grads)
                };
                let (f, c) = (run(true), run(false));
                assert!(max_abs_diff(&f.0, &c.0) < 1e-5, "{act:?} {n}: y");
                for (i, (a, b)) in f.1.iter().zip(&c.1).enumerate() {
                    assert!(max_abs_diff(a, b) < 1e-5, "{act:?} {n}: d{i}");
                }
            }
        }
    }

    /// Layer scale and bias add: values and gradients equal the broadcast composition.
    #[test]
    fn channel_scale_and_bias_match_broadcasting() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 2.0, (2, 5, 3, 4), &dev).unwrap();
        let s = Var::randn(0f32, 1.0, (5, 1, 1), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev).unwrap();
        for bias in [false, true] {
            let run = |fast: bool| {
                let (xt, st) = (x.as_tensor(), s.as_tensor());
                let y = match (fast, bias) {
                    (true, false) => channel_scale(xt, st).unwrap(),
                    (true, true) => channel_bias(xt, &st.flatten_all().unwrap()).unwrap(),
                    (false, false) => xt.broadcast_mul(&st.unsqueeze(0).unwrap()).unwrap(),
                    (false, true) => xt.broadcast_add(&st.unsqueeze(0).unwrap()).unwrap(),
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                (y, grad(&x), grad(&s))
            };
            let (f, c) = (run(true), run(false));
            assert!(max_abs_diff(&f.0, &c.0) < 1e-6, "bias {bias}: y");
            assert!(max_abs_diff(&f.1, &c.1) < 1e-6, "bias {bias}: dx");
            assert!(max_abs_diff(&f.2, &c.2) < 1e-4, "bias {bias}: ds");
        }
    }
}
