//! FastViT's training-form blocks as single autograd nodes on CPU f32, by the mechanism of
//! [`super::fused`]: the forward keeps what the backward needs, the backward writes each
//! gradient once, and parameter gradients go to the [`super::FusedGradients`] sink.
//!
//! - **RepMixer** `x + gamma * (mixer(x) - norm(x))` with `mixer(x) = bn_i(x) +
//!   bn_k(dwconv_k(x)) + bn_s(s * x)` and `norm(x) = bn_n(x)`, every BatchNorm with batch
//!   statistics. All but the `bn_k` branch are per-channel affine maps of `x`, so the output is
//!   `alpha x + beta dk + delta` per channel with `dk = dwconv_k(x)`: one convolution, two
//!   moment passes and one combining pass. Composed it is nine nodes, and the input collects
//!   five gradients.
//! - **ConvMlp with its residual** `x + gamma * fc2(gelu(fc1(bn(dwconv_7(x)))))`, the 1x1
//!   convolutions one product per image.
//!
//! Composed, candle's backward gives every node's input a freshly zeroed gradient plus an
//! addition (a third of a FastViT training step went to those zeroing and addition passes);
//! here `dx` is written once per block.
//!
//! The batch statistics each node computed come back to the caller for the BatchNorms' running
//! estimates.

use super::affine::{add_affine, bn_coefficients, bn_grad, channel_moments, forward_plane};
use super::depthwise::{self, Geom};
use super::fused::{fused_training_enabled, give_gradients, msg, values, with_values};
use super::{fast_path, gelu_bwd_slice, gelu_slice, gemm_into, tracked, CHUNK};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// The tensors of a RepMixer in its training form: BatchNorm `(weight, bias)` pairs, the
/// depthwise convolution's weight `[C, 1, k, k]` (k odd, padding k / 2), the per-channel scale
/// convolution's weight (C values), the layer scale (C values).
#[derive(Clone)]
pub struct RepMixerParams {
    pub norm: (Tensor, Tensor),
    pub identity: (Tensor, Tensor),
    pub conv: Tensor,
    pub conv_bn: (Tensor, Tensor),
    pub scale: Tensor,
    pub scale_bn: (Tensor, Tensor),
    pub gamma: Tensor,
    pub eps: f32,
}

impl RepMixerParams {
    /// Every tensor, in the order the gradients are returned.
    fn all(&self) -> Vec<&Tensor> {
        vec![
            &self.norm.0,
            &self.norm.1,
            &self.identity.0,
            &self.identity.1,
            &self.conv,
            &self.conv_bn.0,
            &self.conv_bn.1,
            &self.scale,
            &self.scale_bn.0,
            &self.scale_bn.1,
            &self.gamma,
        ]
    }

    /// The kernel side when every tensor is CPU f32 and fits `c` channels.
    fn kernel(&self, c: usize) -> Option<usize> {
        let k = *self.conv.dims().last()?;
        let all = self.all();
        let ok = all_fast(&all)
            && all
                .iter()
                .filter(|t| t.id() != self.conv.id())
                .all(|t| t.elem_count() == c)
            && self.conv.dims() == [c, 1, k, k]
            && k % 2 == 1;
        ok.then_some(k)
    }
}

/// The tensors of a ConvMlp and its residual: the depthwise convolution `[C, 1, k, k]` and its
/// BatchNorm, `fc1` `([hidden, C(, 1, 1)], [hidden])`, `fc2` `([C, hidden(, 1, 1)], [C])`, the
/// layer scale (C values).
#[derive(Clone)]
pub struct ConvMlpParams {
    pub conv: Tensor,
    pub bn: (Tensor, Tensor),
    pub fc1: (Tensor, Tensor),
    pub fc2: (Tensor, Tensor),
    pub gamma: Tensor,
    pub eps: f32,
}

impl ConvMlpParams {
    fn all(&self) -> Vec<&Tensor> {
        vec![
            &self.conv,
            &self.bn.0,
            &self.bn.1,
            &self.fc1.0,
            &self.fc1.1,
            &self.fc2.0,
            &self.fc2.1,
            &self.gamma,
        ]
    }

    /// `(kernel side, hidden width)` when every tensor is CPU f32 and fits `c` channels.
    fn dims(&self, c: usize) -> Option<(usize, usize)> {
        let k = *self.conv.dims().last()?;
        let hidden = *self.fc1.0.dims().first()?;
        let ok = all_fast(&self.all())
            && self.conv.dims() == [c, 1, k, k]
            && k % 2 == 1
            && [&self.bn.0, &self.bn.1, &self.fc2.1, &self.gamma]
                .iter()
                .all(|t| t.elem_count() == c)
            && self.fc1.0.elem_count() == hidden * c
            && self.fc1.1.elem_count() == hidden
            && self.fc2.0.elem_count() == c * hidden
            && self.fc2.0.dims().first() == Some(&c);
        ok.then_some((k, hidden))
    }
}

fn all_fast(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| fast_path(t) && t.is_contiguous())
}

/// Batch statistics a node computed, `[mean; biased variance]` (`[2, C]`) per BatchNorm.
type Stats = Arc<Mutex<Vec<Vec<f32>>>>;

fn read_stats(s: &Stats) -> Result<Vec<Vec<f32>>> {
    Ok(s.lock().map_err(|_| msg("fused block: poisoned"))?.clone())
}

fn stats_tensors(s: &Stats, c: usize) -> Result<Vec<Tensor>> {
    read_stats(s)?
        .into_iter()
        .map(|v| Tensor::from_vec(v, (2, c), &Device::Cpu))
        .collect()
}

/// Whether a fused training node applies to `x` (a FusedGradients alive, a gradient asked, CPU
/// f32 NCHW).
fn applies(x: &Tensor) -> bool {
    fused_training_enabled() && tracked(x) && fast_path(x) && x.rank() == 4
}

/// The RepMixer on `x: [B, C, H, W]` in training mode as one node, with the batch statistics of
/// `x`, of the convolution's output and of the scale branch (`[2, C]` each, for the running
/// estimates of `norm` and `identity`, `conv_bn`, `scale_bn`); `None` where it does not apply
/// (no FusedGradients alive, no gradient asked, not CPU f32, other shapes).
pub fn repmixer_train(x: &Tensor, p: &RepMixerParams) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    if !applies(x) {
        return Ok(None);
    }
    let c = x.dim(1)?;
    let Some(k) = p.kernel(c) else {
        return Ok(None);
    };
    let stats = Stats::default();
    let op = RepMixerOp {
        p: p.clone(),
        k,
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op1(op)?;
    Ok(Some((y, stats_tensors(&stats, c)?)))
}

/// `x + gamma * fc2(gelu(fc1(bn(dwconv(x)))))` on `x: [B, C, H, W]` in training mode as one
/// node, with the BatchNorm's batch statistics (`[2, C]`); `None` where it does not apply.
pub fn conv_mlp_train(x: &Tensor, p: &ConvMlpParams) -> Result<Option<(Tensor, Tensor)>> {
    if !applies(x) {
        return Ok(None);
    }
    let c = x.dim(1)?;
    let Some((k, hidden)) = p.dims(c) else {
        return Ok(None);
    };
    let stats = Stats::default();
    let op = ConvMlpOp {
        p: p.clone(),
        k,
        hidden,
        stats: stats.clone(),
        saved: Mutex::new(None),
    };
    let y = x.contiguous()?.apply_op1(op)?;
    let mut s = stats_tensors(&stats, c)?;
    let bn = s.pop().ok_or_else(|| msg("conv mlp: no statistics"))?;
    Ok(Some((y, bn)))
}

/// `y = a x + b y + c`.
#[inline(always)]
fn axpby_body(x: &[f32], y: &mut [f32], a: f32, b: f32, c: f32) {
    y.iter_mut()
        .zip(x)
        .for_each(|(d, &v)| *d = a * v + b * *d + c);
}
multiversion!(axpby, axpby_body, (x: &[f32], y: &mut [f32], a: f32, b: f32, c: f32));

/// `d += a u + b v + c`.
#[inline(always)]
fn add_two_body(u: &[f32], v: &[f32], d: &mut [f32], a: f32, b: f32, c: f32) {
    d.iter_mut()
        .zip(u.iter().zip(v))
        .for_each(|(d, (&p, &q))| *d += a * p + b * q + c);
}
multiversion!(
    add_two,
    add_two_body,
    (u: &[f32], v: &[f32], d: &mut [f32], a: f32, b: f32, c: f32)
);

const LANES: usize = 8;

/// `(sum g, sum g u, sum g v)` of one plane, in eight lanes.
#[inline(always)]
fn dots_body(g: &[f32], u: &[f32], v: &[f32], out: &mut [f64]) {
    let (mut s0, mut s1, mut s2) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let main = g.len() / LANES * LANES;
    let chunks = g[..main]
        .chunks_exact(LANES)
        .zip(u[..main].chunks_exact(LANES))
        .zip(v[..main].chunks_exact(LANES));
    for ((gc, uc), vc) in chunks {
        for l in 0..LANES {
            s0[l] += gc[l];
            s1[l] += gc[l] * uc[l];
            s2[l] += gc[l] * vc[l];
        }
    }
    let lanes = |s: [f32; LANES]| s.iter().map(|&v| v as f64).sum::<f64>();
    let (mut t0, mut t1, mut t2) = (lanes(s0), lanes(s1), lanes(s2));
    for i in main..g.len() {
        t0 += g[i] as f64;
        t1 += (g[i] * u[i]) as f64;
        t2 += (g[i] * v[i]) as f64;
    }
    out[0] = t0;
    out[1] = t1;
    out[2] = t2;
}
multiversion!(plane_dots, dots_body, (g: &[f32], u: &[f32], v: &[f32], out: &mut [f64]));

/// Per channel `(sum g, sum g u, sum g v)` over `[B, C, HW]` values.
fn channel_dots(
    g: &[f32],
    u: &[f32],
    v: &[f32],
    (b, c, hw): (usize, usize, usize),
) -> Vec<[f64; 3]> {
    let hw1 = hw.max(1);
    let per_plane: Vec<[f64; 3]> = g
        .par_chunks(hw1)
        .zip(u.par_chunks(hw1).zip(v.par_chunks(hw1)))
        .map(|(gp, (up, vp))| {
            let mut s = [0f64; 3];
            plane_dots(gp, up, vp, &mut s);
            s
        })
        .collect();
    let mut out = vec![[0f64; 3]; c];
    for i in 0..b {
        for (ch, o) in out.iter_mut().enumerate() {
            let s = per_plane[i * c + ch];
            o.iter_mut().zip(s).for_each(|(o, s)| *o += s);
        }
    }
    out
}

/// `f(plane index, plane)` over the `hw`-long planes of `out`, in parallel.
fn per_plane(out: &mut [f32], hw: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    out.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(p, o)| f(p, o));
}

fn inv_std(var: f32, eps: f64) -> f64 {
    1.0 / (var as f64 + eps).sqrt()
}

/// The RepMixer's per-channel constants from the batch statistics of `x` and `dk`.
struct MixerChannel {
    mu: f64,
    var: f64,
    inv: f64,
    muk: f64,
    invk: f64,
    invs: f64,
    /// `mixer(x) - norm(x) = ax x + ak dk + bb`
    ax: f64,
    ak: f64,
    bb: f64,
}

/// The parameters' values in [`RepMixerParams::all`] order.
struct MixerValues<'a> {
    wn: &'a [f32],
    bn: &'a [f32],
    wi: &'a [f32],
    bi: &'a [f32],
    kernel: &'a [f32],
    wk: &'a [f32],
    bk: &'a [f32],
    s: &'a [f32],
    ws: &'a [f32],
    bs: &'a [f32],
    gamma: &'a [f32],
}

impl<'a> MixerValues<'a> {
    fn new(v: &[&'a [f32]]) -> Result<Self> {
        let &[wn, bn, wi, bi, kernel, wk, bk, s, ws, bs, gamma] = v else {
            return Err(msg("repmixer: expected 11 parameter tensors"));
        };
        Ok(Self {
            wn,
            bn,
            wi,
            bi,
            kernel,
            wk,
            bk,
            s,
            ws,
            bs,
            gamma,
        })
    }

    fn channel(&self, ch: usize, st: &[f32], stk: &[f32], eps: f64) -> MixerChannel {
        let c = self.wn.len();
        let f = |v: &[f32]| v[ch] as f64;
        let (mu, var, inv) = (st[ch] as f64, st[c + ch] as f64, inv_std(st[c + ch], eps));
        let (muk, invk) = (stk[ch] as f64, inv_std(stk[c + ch], eps));
        let sc = f(self.s);
        let invs = 1.0 / (sc * sc * var + eps).sqrt();
        let ax = (f(self.wi) - f(self.wn)) * inv + f(self.ws) * invs * sc;
        let ak = f(self.wk) * invk;
        let bb = f(self.bi) + f(self.bk) + f(self.bs) - f(self.bn) - ax * mu - ak * muk;
        MixerChannel {
            mu,
            var,
            inv,
            muk,
            invk,
            invs,
            ax,
            ak,
            bb,
        }
    }
}

struct RepMixerOp {
    p: RepMixerParams,
    k: usize,
    /// `[x, dk, s x]` batch statistics, written by the forward (the backward reads them)
    stats: Stats,
}

impl RepMixerOp {
    fn geom(&self, (b, c, h, w): (usize, usize, usize, usize)) -> Result<Geom> {
        Geom::new(&[b, c, h, w], &[c, 1, self.k, self.k], 1, self.k / 2)
    }

    fn forward(&self, x: &[f32], dims: (usize, usize, usize, usize)) -> Result<Vec<f32>> {
        let (b, c, h, w) = dims;
        let hw = h * w;
        let eps = self.p.eps as f64;
        let g = self.geom(dims)?;
        with_values(&self.p.all(), |vals| {
            let v = MixerValues::new(vals)?;
            let st = channel_moments(x, (b, c, hw));
            let mut y = depthwise::forward(&g, x, v.kernel);
            let stk = channel_moments(&y, (b, c, hw));
            // x + gamma (ax x + ak dk + bb)
            let co: Vec<[f32; 3]> = (0..c)
                .map(|ch| {
                    let m = v.channel(ch, &st, &stk, eps);
                    let gm = v.gamma[ch] as f64;
                    [
                        (1.0 + gm * m.ax) as f32,
                        (gm * m.ak) as f32,
                        (gm * m.bb) as f32,
                    ]
                })
                .collect();
            per_plane(&mut y, hw, |p, yp| {
                let [a, bk, d] = co[p % c];
                axpby(&x[p * hw..(p + 1) * hw], yp, a, bk, d);
            });
            // the scale branch's statistics: those of s x
            let mut sts = vec![0f32; 2 * c];
            for ch in 0..c {
                let s = v.s[ch];
                sts[ch] = s * st[ch];
                sts[c + ch] = s * s * st[c + ch];
            }
            *self.stats.lock().map_err(|_| msg("repmixer: poisoned"))? = vec![st, stk, sts];
            Ok(y)
        })
    }

    /// `dx` and the parameters' gradients (in [`RepMixerParams::all`] order) for `dy`.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let (b, c, h, w) = dims;
        let hw = h * w;
        let n = (b * hw).max(1) as f64;
        let eps = self.p.eps as f64;
        let g = self.geom(dims)?;
        let stats = read_stats(&self.stats)?;
        let [st, stk, _] = &stats[..] else {
            return Err(msg("repmixer: backward before forward"));
        };
        with_values(&self.p.all(), |vals| {
            let v = MixerValues::new(vals)?;
            // the convolution's output, recomputed (cheaper than keeping it)
            let mut dk = depthwise::forward(&g, x, v.kernel);
            let sums = channel_dots(dy, x, &dk, (b, c, hw));
            let mut grads: Vec<Vec<f32>> = (0..11)
                .map(|i| vec![0f32; if i == 4 { v.kernel.len() } else { c }])
                .collect();
            // per channel: dx = cg dy + cx x + c0 + conv^T(ddk); ddk = eg dy + ek dk + e0
            let mut co = vec![[0f32; 6]; c];
            for ch in 0..c {
                let m = v.channel(ch, st, stk, eps);
                let f = |t: &[f32]| t[ch] as f64;
                let gm = f(v.gamma);
                let [sg, sgx, sgk] = sums[ch];
                // the upstream gradient of mixer(x) - norm(x) is u = gamma dy
                let (su, sux, suk) = (gm * sg, gm * sgx, gm * sgk);
                let dgamma = m.ax * sgx + m.ak * sgk + m.bb * sg;
                // each BatchNorm's `(dweight, a, p, q)`: dz = a v + p z + q for upstream v
                let bn = |w: f64, inv: f64, mu: f64, sv: f64, svz: f64| {
                    let a = w * inv;
                    let d = bn_grad(a, inv, mu, (sv, svz), n);
                    (d.dweight, a, d.p, d.q)
                };
                let (dwi, ai, pi, qi) = bn(f(v.wi), m.inv, m.mu, su, sux);
                let (dwn, an, pn, qn) = bn(f(v.wn), m.inv, m.mu, -su, -sux);
                let sc = f(v.s);
                let (dws, as_, ps, qs) = bn(f(v.ws), m.invs, sc * m.mu, su, sc * sux);
                let (dwk, akk, pk, qk) = bn(f(v.wk), m.invk, m.muk, su, suk);
                // the scale branch z = s x: dz = as u + ps z + qs, ds = sum dz x
                let (sum_x, sum_xx) = (n * m.mu, n * (m.var + m.mu * m.mu));
                let dscale = as_ * sux + ps * sc * sum_xx + qs * sum_x;
                let cg = 1.0 + gm * (ai - an + sc * as_);
                let cx = pi + pn + sc * sc * ps;
                let c0 = qi + qn + sc * qs;
                co[ch] = [
                    cg as f32,
                    cx as f32,
                    c0 as f32,
                    (gm * akk) as f32,
                    pk as f32,
                    qk as f32,
                ];
                for (i, val) in [
                    (0, dwn),
                    (1, -su),
                    (2, dwi),
                    (3, su),
                    (5, dwk),
                    (6, su),
                    (7, dscale),
                    (8, dws),
                    (9, su),
                    (10, dgamma),
                ] {
                    grads[i][ch] = val as f32;
                }
            }
            // dk becomes the gradient at the convolution's output
            per_plane(&mut dk, hw, |p, d| {
                let [_, _, _, eg, ek, e0] = co[p % c];
                axpby(&dy[p * hw..(p + 1) * hw], d, eg, ek, e0);
            });
            grads[4] = depthwise::kernel_grad(&g, x, &dk);
            let dx = depthwise::input_grad_with(&g, &dk, v.kernel, |p, dxp| {
                let [cg, cx, c0, ..] = co[p % c];
                let r = p * hw..(p + 1) * hw;
                add_two(&dy[r.clone()], &x[r], dxp, cg, cx, c0);
            });
            Ok((dx, grads))
        })
    }
}

impl CustomOp1 for RepMixerOp {
    fn name(&self) -> &'static str {
        "distillery-repmixer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(values(s, l)?, l.shape().dims4()?)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims4()?;
        let dy = dy.contiguous()?;
        let (dx, grads) = with_values(&[x, &dy], |v| self.backward(v[0], v[1], dims))?;
        give_gradients(self.p.all(), grads)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

struct ConvMlpOp {
    p: ConvMlpParams,
    k: usize,
    hidden: usize,
    /// the BatchNorm's batch statistics, written by the forward
    stats: Stats,
    saved: Mutex<Option<MlpSaved>>,
}

/// What the forward keeps: the convolution's output, fc1's output before and after GELU, fc2's
/// output (before the layer scale).
struct MlpSaved {
    conv: Vec<f32>,
    pre: Vec<f32>,
    act: Vec<f32>,
    mlp: Vec<f32>,
}

/// The parameters' values in [`ConvMlpParams::all`] order.
struct MlpValues<'a> {
    kernel: &'a [f32],
    wc: &'a [f32],
    bc: &'a [f32],
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
    gamma: &'a [f32],
}

impl<'a> MlpValues<'a> {
    fn new(v: &[&'a [f32]]) -> Result<Self> {
        let &[kernel, wc, bc, w1, b1, w2, b2, gamma] = v else {
            return Err(msg("conv mlp: expected 8 parameter tensors"));
        };
        Ok(Self {
            kernel,
            wc,
            bc,
            w1,
            b1,
            w2,
            b2,
            gamma,
        })
    }

    /// The BatchNorm as `x a + b` per channel, and `1 / sqrt(var + eps)`.
    fn bn(&self, st: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        bn_coefficients(self.wc, self.bc, st, eps)
    }
}

/// `rows` rows of `row_len` values each get `bias[row % bias.len()]` added.
fn add_row_bias(x: &mut [f32], row_len: usize, bias: &[f32]) {
    let nb = bias.len();
    x.par_chunks_mut(row_len.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let b = bias[r % nb];
            row.iter_mut().for_each(|v| *v += b);
        });
}

impl ConvMlpOp {
    fn geom(&self, (b, c, h, w): (usize, usize, usize, usize)) -> Result<Geom> {
        Geom::new(&[b, c, h, w], &[c, 1, self.k, self.k], 1, self.k / 2)
    }

    fn forward(&self, x: &[f32], dims: (usize, usize, usize, usize)) -> Result<Vec<f32>> {
        let (b, c, h, w) = dims;
        let hw = h * w;
        let hd = self.hidden;
        let g = self.geom(dims)?;
        with_values(&self.p.all(), |vals| {
            let v = MlpValues::new(vals)?;
            let conv = depthwise::forward(&g, x, v.kernel);
            let st = channel_moments(&conv, (b, c, hw));
            let (a, sh, _) = v.bn(&st, self.p.eps);
            let mut norm = vec![0f32; conv.len()];
            per_plane(&mut norm, hw, |p, o| {
                let ch = p % c;
                forward_plane(&conv[p * hw..(p + 1) * hw], o, a[ch], sh[ch], 0);
            });
            let mut pre = vec![0f32; b * hd * hw];
            for i in 0..b {
                let img = &norm[i * c * hw..(i + 1) * c * hw];
                let dst = &mut pre[i * hd * hw..(i + 1) * hd * hw];
                gemm_into(dst, v.w1, img, (hd, c, hw), false, false, false);
            }
            drop(norm);
            let mut act = vec![0f32; pre.len()];
            pre.par_chunks_mut(hw.max(1))
                .zip(act.par_chunks_mut(hw.max(1)))
                .enumerate()
                .for_each(|(r, (p, a))| {
                    let bias = v.b1[r % hd];
                    p.iter_mut().for_each(|v| *v += bias);
                    gelu_slice(&*p, a);
                });
            let mut mlp = vec![0f32; x.len()];
            for i in 0..b {
                let img = &act[i * hd * hw..(i + 1) * hd * hw];
                let dst = &mut mlp[i * c * hw..(i + 1) * c * hw];
                gemm_into(dst, v.w2, img, (c, hd, hw), false, false, false);
            }
            add_row_bias(&mut mlp, hw, v.b2);
            let mut y = x.to_vec();
            per_plane(&mut y, hw, |p, yp| {
                add_affine(&mlp[p * hw..(p + 1) * hw], yp, v.gamma[p % c], 0.0);
            });
            *self.stats.lock().map_err(|_| msg("conv mlp: poisoned"))? = vec![st];
            *self.saved.lock().map_err(|_| msg("conv mlp: poisoned"))? = Some(MlpSaved {
                conv,
                pre,
                act,
                mlp,
            });
            Ok(y)
        })
    }

    /// `dx` and the parameters' gradients (in [`ConvMlpParams::all`] order) for `dy`.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        s: MlpSaved,
        dims: (usize, usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let (b, c, h, w) = dims;
        let hw = h * w;
        let hd = self.hidden;
        let n = (b * hw).max(1) as f64;
        let g = self.geom(dims)?;
        let stats = read_stats(&self.stats)?;
        let st = stats
            .first()
            .ok_or_else(|| msg("conv mlp: backward before forward"))?;
        with_values(&self.p.all(), |vals| {
            let v = MlpValues::new(vals)?;
            // y = x + gamma mlp: u = gamma dy at fc2's output
            let sums = channel_dots(dy, &s.mlp, &s.mlp, (b, c, hw));
            drop(s.mlp);
            let mut u = vec![0f32; dy.len()];
            per_plane(&mut u, hw, |p, o| {
                forward_plane(&dy[p * hw..(p + 1) * hw], o, v.gamma[p % c], 0.0, 0);
            });
            let dgamma: Vec<f32> = sums.iter().map(|s| s[1] as f32).collect();
            let db2: Vec<f32> = (0..c)
                .map(|ch| (v.gamma[ch] as f64 * sums[ch][0]) as f32)
                .collect();
            // fc2 and GELU, image by image; fc1's activation buffer takes the gradient of its
            // pre-activation
            let mut dw2 = vec![0f32; c * hd];
            let mut dact = vec![0f32; hd * hw];
            let mut dpre = s.act;
            for i in 0..b {
                let ui = &u[i * c * hw..(i + 1) * c * hw];
                let ai = &mut dpre[i * hd * hw..(i + 1) * hd * hw];
                gemm_into(&mut dw2, ui, &*ai, (c, hw, hd), false, true, i > 0);
                gemm_into(&mut dact, v.w2, ui, (hd, c, hw), true, false, false);
                let pi = &s.pre[i * hd * hw..(i + 1) * hd * hw];
                ai.par_chunks_mut(CHUNK)
                    .zip(pi.par_chunks(CHUNK).zip(dact.par_chunks(CHUNK)))
                    .for_each(|(o, (x, g))| gelu_bwd_slice(x, g, o));
            }
            drop((u, dact, s.pre));
            let row_sums: Vec<f64> = dpre
                .par_chunks(hw.max(1))
                .map(|r| r.iter().map(|&v| v as f64).sum())
                .collect();
            let mut db1 = vec![0f64; hd];
            for (r, s) in row_sums.iter().enumerate() {
                db1[r % hd] += s;
            }
            // fc1 (its input, the normalised map, recomputed per image) and the BatchNorm
            let (a, sh, inv) = v.bn(st, self.p.eps);
            let mut dw1 = vec![0f32; hd * c];
            let mut dh = vec![0f32; x.len()];
            let mut norm = vec![0f32; c * hw];
            for i in 0..b {
                let conv_i = &s.conv[i * c * hw..(i + 1) * c * hw];
                per_plane(&mut norm, hw, |p, o| {
                    forward_plane(&conv_i[p * hw..(p + 1) * hw], o, a[p], sh[p], 0);
                });
                let di = &dpre[i * hd * hw..(i + 1) * hd * hw];
                gemm_into(&mut dw1, di, &norm, (hd, hw, c), false, true, i > 0);
                let dst = &mut dh[i * c * hw..(i + 1) * c * hw];
                gemm_into(dst, v.w1, di, (c, hd, hw), true, false, false);
            }
            drop((dpre, norm));
            let sums = channel_dots(&dh, &s.conv, &s.conv, (b, c, hw));
            let mut dwc = vec![0f32; c];
            let mut dbc = vec![0f32; c];
            let mut co = vec![[0f32; 3]; c];
            for ch in 0..c {
                let sv = sums[ch][0];
                let d = bn_grad(
                    a[ch] as f64,
                    inv[ch] as f64,
                    st[ch] as f64,
                    (sv, sums[ch][1]),
                    n,
                );
                co[ch] = [a[ch], d.p as f32, d.q as f32];
                dwc[ch] = d.dweight as f32;
                dbc[ch] = sv as f32;
            }
            // dh becomes the gradient at the convolution's output
            per_plane(&mut dh, hw, |p, d| {
                let [a, pc, qc] = co[p % c];
                axpby(&s.conv[p * hw..(p + 1) * hw], d, pc, a, qc);
            });
            drop(s.conv);
            let dkernel = depthwise::kernel_grad(&g, x, &dh);
            let dx = depthwise::input_grad_with(&g, &dh, v.kernel, |p, dxp| {
                add_affine(&dy[p * hw..(p + 1) * hw], dxp, 1.0, 0.0);
            });
            let db1 = db1.into_iter().map(|v| v as f32).collect();
            Ok((dx, vec![dkernel, dwc, dbc, dw1, db1, dw2, db2, dgamma]))
        })
    }
}

impl CustomOp1 for ConvMlpOp {
    fn name(&self) -> &'static str {
        "distillery-conv-mlp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(values(s, l)?, l.shape().dims4()?)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| msg("conv mlp: poisoned"))?
            .take()
            .ok_or_else(|| msg("conv mlp: backward ran twice over one forward"))?;
        let dims = x.dims4()?;
        let dy = dy.contiguous()?;
        let (dx, grads) = with_values(&[x, &dy], |v| self.backward(v[0], v[1], saved, dims))?;
        give_gradients(self.p.all(), grads)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::rel_err;
    use super::*;
    use crate::kernels::FusedGradients;
    use candle_core::{DType, Var};

    const TOL: f32 = 1e-4;

    fn randn(shape: &[usize], mean: f64, std: f64) -> Tensor {
        (Tensor::randn(0f64, std, shape, &Device::Cpu).unwrap() + mean).unwrap()
    }

    /// BatchNorm with batch statistics written out in broadcast ops: `(y, [mean; var])`.
    fn bn_ref(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor) {
        let c = x.dim(1).unwrap();
        let chan = |t: &Tensor| t.reshape((1, c, 1, 1)).unwrap();
        let avg = |t: &Tensor| {
            let t = t.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap();
            t.mean_keepdim(3).unwrap()
        };
        let mean = avg(x);
        let d = x.broadcast_sub(&mean).unwrap();
        let var = avg(&d.sqr().unwrap());
        let xhat = d
            .broadcast_div(&(var.clone() + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let y = xhat
            .broadcast_mul(&chan(w))
            .unwrap()
            .broadcast_add(&chan(b))
            .unwrap();
        let stats = Tensor::cat(
            &[mean.flatten_all().unwrap(), var.flatten_all().unwrap()],
            0,
        );
        (y, stats.unwrap().reshape((2, c)).unwrap())
    }

    fn depthwise_ref(x: &Tensor, k: &Tensor) -> Tensor {
        let (c, side) = (x.dim(1).unwrap(), k.dim(3).unwrap());
        x.conv2d(k, side / 2, 1, 1, c).unwrap()
    }

    fn chan_mul(x: &Tensor, s: &Tensor) -> Tensor {
        let c = x.dim(1).unwrap();
        x.broadcast_mul(&s.reshape((1, c, 1, 1)).unwrap()).unwrap()
    }

    /// Runs `f` on variables made from `values` (f32 for the fused node, f64 for the
    /// reference) and returns the outputs it gives, then the gradients of `sum(y * r)` for the
    /// input and every value, all in f32.
    fn outputs_and_grads(
        values: &[Tensor],
        r: &Tensor,
        fused: bool,
        f: impl Fn(&[Var]) -> (Tensor, Vec<Tensor>),
    ) -> Vec<Tensor> {
        let dtype = if fused { DType::F32 } else { DType::F64 };
        let vars: Vec<Var> = values
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let guard = fused.then(FusedGradients::enable);
        let (y, extra) = f(&vars);
        let loss = (&y * r.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = crate::kernels::backward_with(guard.as_ref(), &loss).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let mut out = vec![f32s(&y)];
        out.extend(extra.iter().map(f32s));
        out.extend(
            vars.iter()
                .map(|v| f32s(grads.get(v.as_tensor()).expect("a gradient"))),
        );
        out
    }

    fn compare(names: &[&str], got: &[Tensor], want: &[Tensor]) {
        assert_eq!(got.len(), names.len());
        assert_eq!(want.len(), names.len());
        for ((name, g), w) in names.iter().zip(got).zip(want) {
            assert_eq!(g.dims(), w.dims(), "{name}");
            let e = rel_err(g, w, 1e-3);
            assert!(e < TOL, "{name}: rel err {e}");
        }
    }

    /// The RepMixer node against its composition in f64 broadcast ops (three BatchNorm
    /// branches, the depthwise 3x3 convolution through candle's grouped convolution, the
    /// per-channel scale, the norm branch subtracted, the layer scale): output, the three
    /// branches' batch statistics and the gradients of the input and all eleven parameters,
    /// on an odd-sided batch with a nonzero mean and a layer scale of realistic size.
    #[test]
    fn repmixer_node_matches_composed_ops() {
        let (b, c, h, w) = (3, 6, 9, 7);
        let eps = 1e-5;
        let vec_c = |m: f64, s: f64| randn(&[c], m, s);
        let values = vec![
            randn(&[b, c, h, w], 0.5, 2.0),
            vec_c(1.0, 0.5),
            vec_c(0.0, 1.0),
            vec_c(1.0, 0.5),
            vec_c(0.0, 1.0),
            randn(&[c, 1, 3, 3], 0.0, 0.4),
            vec_c(1.0, 0.5),
            vec_c(0.0, 1.0),
            randn(&[c, 1, 1, 1], 1.0, 0.5),
            vec_c(1.0, 0.5),
            vec_c(0.0, 1.0),
            vec_c(0.0, 0.5),
        ];
        let r = randn(&[b, c, h, w], 0.0, 1.0);
        let got = outputs_and_grads(&values, &r, true, |v| {
            let t = |i: usize| v[i].as_tensor().clone();
            let p = RepMixerParams {
                norm: (t(1), t(2)),
                identity: (t(3), t(4)),
                conv: t(5),
                conv_bn: (t(6), t(7)),
                scale: t(8),
                scale_bn: (t(9), t(10)),
                gamma: t(11),
                eps: eps as f32,
            };
            repmixer_train(v[0].as_tensor(), &p)
                .unwrap()
                .expect("the node applies")
        });
        let want = outputs_and_grads(&values, &r, false, |v| {
            let t = |i: usize| v[i].as_tensor();
            let x = t(0);
            let (yn, sx) = bn_ref(x, t(1), t(2), eps);
            let (yi, _) = bn_ref(x, t(3), t(4), eps);
            let (yk, sk) = bn_ref(&depthwise_ref(x, t(5)), t(6), t(7), eps);
            let (ys, ss) = bn_ref(&chan_mul(x, t(8)), t(9), t(10), eps);
            let mix = (((yi + yk).unwrap() + ys).unwrap() - yn).unwrap();
            ((x + chan_mul(&mix, t(11))).unwrap(), vec![sx, sk, ss])
        });
        let names = [
            "y",
            "stats x",
            "stats conv",
            "stats scale",
            "dx",
            "d norm.w",
            "d norm.b",
            "d identity.w",
            "d identity.b",
            "d conv",
            "d conv_bn.w",
            "d conv_bn.b",
            "d scale",
            "d scale_bn.w",
            "d scale_bn.b",
            "d gamma",
        ];
        compare(&names, &got, &want);
    }

    /// The ConvMlp residual node against its composition in f64 ops (depthwise 7x7 through
    /// candle's grouped convolution, BatchNorm with batch statistics, the 1x1 convolutions as
    /// products, exact GELU, layer scale, residual): output, statistics, every gradient.
    #[test]
    fn conv_mlp_node_matches_composed_ops() {
        let (b, c, h, w, hd) = (3, 5, 9, 8, 15);
        let eps = 1e-5;
        let values = vec![
            randn(&[b, c, h, w], 0.3, 1.5),
            randn(&[c, 1, 7, 7], 0.0, 0.2),
            randn(&[c], 1.0, 0.5),
            randn(&[c], 0.0, 1.0),
            randn(&[hd, c], 0.0, 0.4),
            randn(&[hd], 0.0, 0.5),
            randn(&[c, hd], 0.0, 0.3),
            randn(&[c], 0.0, 0.5),
            randn(&[c], 0.0, 0.5),
        ];
        let r = randn(&[b, c, h, w], 0.0, 1.0);
        let got = outputs_and_grads(&values, &r, true, |v| {
            let t = |i: usize| v[i].as_tensor().clone();
            let p = ConvMlpParams {
                conv: t(1),
                bn: (t(2), t(3)),
                fc1: (t(4), t(5)),
                fc2: (t(6), t(7)),
                gamma: t(8),
                eps: eps as f32,
            };
            let (y, stats) = conv_mlp_train(v[0].as_tensor(), &p)
                .unwrap()
                .expect("the node applies");
            (y, vec![stats])
        });
        let want = outputs_and_grads(&values, &r, false, |v| {
            let t = |i: usize| v[i].as_tensor();
            let x = t(0);
            let (hn, st) = bn_ref(&depthwise_ref(x, t(1)), t(2), t(3), eps);
            let pointwise = |x: &Tensor, wt: &Tensor, bias: &Tensor| {
                let (o, i) = wt.dims2().unwrap();
                let y = wt
                    .broadcast_left(b)
                    .unwrap()
                    .matmul(&x.reshape((b, i, h * w)).unwrap())
                    .unwrap()
                    .reshape((b, o, h, w))
                    .unwrap();
                y.broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                    .unwrap()
            };
            let act = pointwise(&hn, t(4), t(5)).gelu_erf().unwrap();
            let mlp = pointwise(&act, t(6), t(7));
            ((x + chan_mul(&mlp, t(8))).unwrap(), vec![st])
        });
        let names = [
            "y", "stats", "dx", "d conv", "d bn.w", "d bn.b", "d fc1.w", "d fc1.b", "d fc2.w",
            "d fc2.b", "d gamma",
        ];
        compare(&names, &got, &want);
    }

    /// Without a FusedGradients alive, or with no gradient asked, the nodes step aside (the
    /// caller composes the block and no gradient can be lost).
    #[test]
    fn fused_cnn_nodes_apply_only_when_training_with_the_sink() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 5], 0.0, 1.0).to_dtype(DType::F32).unwrap())
            .unwrap();
        let v = |s: &[usize]| randn(s, 1.0, 0.1).to_dtype(DType::F32).unwrap();
        let p = ConvMlpParams {
            conv: v(&[3, 1, 3, 3]),
            bn: (v(&[3]), v(&[3])),
            fc1: (v(&[6, 3]), v(&[6])),
            fc2: (v(&[3, 6]), v(&[3])),
            gamma: v(&[3]),
            eps: 1e-5,
        };
        assert!(conv_mlp_train(x.as_tensor(), &p).unwrap().is_none());
        let _guard = FusedGradients::enable();
        assert!(conv_mlp_train(&x.as_tensor().detach(), &p)
            .unwrap()
            .is_none());
        assert!(conv_mlp_train(x.as_tensor(), &p).unwrap().is_some());
    }
}
