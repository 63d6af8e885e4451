//! Depthwise convolution (`groups == channels`, one `k_h x k_w` filter per channel), the
//! spatial mixing of every mobile network (MobileNet/MobileViT inverted residuals, FastViT's
//! RepMixer and MobileOne blocks). candle runs a grouped convolution as one convolution per
//! group plus a concatenation, which for hundreds of single-channel groups is mostly overhead,
//! forward and backward. On the CPU in f32 this module runs the direct loops instead: one task
//! per (image, channel) plane, rows of the output accumulated from rows of the input so the
//! inner loop is a contiguous (stride 1) multiply-add the compiler vectorises. Other devices and
//! dtypes use a differentiable sum of `k_h * k_w` shifted, per-channel-scaled views.

use super::op::{apply, apply_no_bwd, operands, In, Kernel};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

/// Shapes of one convolution (input channels `c`; the kernel's `[.., .., kh, kw]`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl Geom {
    /// A depthwise convolution: kernel `[C, 1, kh, kw]`.
    pub(super) fn new(
        x: &[usize],
        k: &[usize],
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        let &[kc, one, ..] = k else {
            candle_core::bail!("depthwise conv: kernel {k:?} must be 4-d")
        };
        let g = Self::of(x, k, stride, pad)?;
        if kc != g.c || one != 1 {
            candle_core::bail!("depthwise conv: kernel {k:?} does not fit {} channels", g.c)
        }
        Ok(g)
    }

    /// Any kernel `[.., .., kh, kw]` over input `[B, C, H, W]`.
    pub(super) fn of(
        x: &[usize],
        k: &[usize],
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        let (&[b, c, h, w], &[_, _, kh, kw]) = (x, k) else {
            candle_core::bail!("conv: input {x:?} and kernel {k:?} must be 4-d")
        };
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "conv: kernel {kh}x{kw} (padding {pad}, stride {stride}) does not fit \
                 a {h}x{w} input"
            )
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }

    pub(super) fn in_plane(&self) -> usize {
        self.h * self.w
    }

    pub(super) fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    /// The input row read by output row `o` through kernel row `k`, if inside the input.
    pub(super) fn in_row(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < self.h)
    }

    /// Output columns `lo..hi` whose input column `ox * stride + kx - pad` is inside the input.
    pub(super) fn out_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad.saturating_sub(kx).div_ceil(s);
        let hi = match (self.w - 1 + self.pad).checked_sub(kx) {
            Some(last) => (last / s + 1).min(self.ow),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Calls `f(out_row, in_row, tap, out_cols, first_in_col)` for every pair of an output row
    /// and an input row joined by a kernel tap: output columns `lo..hi` read input columns
    /// `first_in_col + (ox - lo) * stride`.
    pub(super) fn for_each_tap(
        &self,
        mut f: impl FnMut(usize, usize, usize, (usize, usize), usize),
    ) {
        for oy in 0..self.oh {
            for ky in 0..self.kh {
                let Some(iy) = self.in_row(oy, ky) else {
                    continue;
                };
                for kx in 0..self.kw {
                    let (lo, hi) = self.out_cols(kx);
                    if lo < hi {
                        let ix = lo * self.stride + kx - self.pad;
                        f(oy, iy, ky * self.kw + kx, (lo, hi), ix);
                    }
                }
            }
        }
    }
}

/// Planes go through a zero-padded copy whose rows are split into `stride` phases (columns `q,
/// q + s, q + 2s, ...` of a padded row stored side by side, `phase_w` each): output column `ox`
/// of tap `(ky, kx)` reads padded column `ox * s + kx`, which is element `ox + kx / s` of phase
/// `kx % s`, so every tap reads or writes one contiguous run of `ow` values for any stride,
/// with none of the per-tap border arithmetic of [`Geom::for_each_tap`]. Stride 1 is the plain
/// padded plane.
impl Geom {
    /// Values in one phase of a padded row.
    fn phase_w(&self) -> usize {
        (self.w + 2 * self.pad).div_ceil(self.stride)
    }

    /// `buf` as a zeroed split padded plane.
    fn zero_split(&self, buf: &mut Vec<f32>) {
        buf.clear();
        buf.resize((self.h + 2 * self.pad) * self.stride * self.phase_w(), 0.0);
    }

    /// Where the run of tap `(ky, kx)` for output row `oy` starts in the split plane.
    fn run_at(&self, oy: usize, ky: usize, kx: usize) -> usize {
        let s = self.stride;
        ((oy * s + ky) * s + kx % s) * self.phase_w() + kx / s
    }

    /// Calls `f(plane index, split index)` for every input value, row by row.
    fn for_each_split(&self, mut f: impl FnMut(usize, usize)) {
        let (s, pq) = (self.stride, self.phase_w());
        for iy in 0..self.h {
            let row = (iy + self.pad) * s;
            let (mut q, mut j) = (self.pad % s, self.pad / s);
            for ix in 0..self.w {
                f(iy * self.w + ix, (row + q) * pq + j);
                q += 1;
                if q == s {
                    q = 0;
                    j += 1;
                }
            }
        }
    }

    /// `plane` copied into the interior of the split `buf`, zeros around: every value of `buf`
    /// written once (no zeroing pass first).
    fn split_into(&self, plane: &[f32], buf: &mut Vec<f32>) {
        let (s, pq, p) = (self.stride, self.phase_w(), self.pad);
        let len = (self.h + 2 * p) * s * pq;
        if buf.len() != len {
            buf.clear();
            buf.resize(len, 0.0);
        }
        for (r, rows) in buf.chunks_exact_mut(s * pq).enumerate() {
            let src = r
                .checked_sub(p)
                .filter(|&iy| iy < self.h)
                .map(|iy| &plane[iy * self.w..(iy + 1) * self.w]);
            let Some(src) = src else {
                rows.fill(0.0);
                continue;
            };
            if s == 1 {
                rows[..p].fill(0.0);
                rows[p..p + self.w].copy_from_slice(src);
                rows[p + self.w..].fill(0.0);
                continue;
            }
            for (q, dst) in rows.chunks_exact_mut(pq).enumerate() {
                for (j, d) in dst.iter_mut().enumerate() {
                    // padded column j s + q is input column j s + q - p, when inside
                    *d = src.get((j * s + q).wrapping_sub(p)).copied().unwrap_or(0.0);
                }
            }
        }
    }

    /// The interior of the split `buf` copied out to `plane`.
    fn split_out(&self, buf: &[f32], plane: &mut [f32]) {
        if self.stride == 1 {
            let pw = self.phase_w();
            for (iy, row) in plane.chunks_mut(self.w).enumerate() {
                let at = (iy + self.pad) * pw + self.pad;
                row.copy_from_slice(&buf[at..at + self.w]);
            }
        } else {
            self.for_each_split(|i, at| plane[i] = buf[at]);
        }
    }
}

/// One output plane from one input plane and its filter.
#[inline(always)]
fn forward_body(g: &Geom, x: &[f32], k: &[f32], y: &mut [f32], buf: &mut Vec<f32>) {
    g.split_into(x, buf);
    for (oy, row) in y.chunks_mut(g.ow).enumerate() {
        for ky in 0..g.kh {
            for (kx, &a) in k[ky * g.kw..(ky + 1) * g.kw].iter().enumerate() {
                let at = g.run_at(oy, ky, kx);
                for (d, v) in row.iter_mut().zip(&buf[at..at + g.ow]) {
                    *d += a * v;
                }
            }
        }
    }
}

multiversion!(
    forward_plane,
    forward_body,
    (g: &Geom, x: &[f32], k: &[f32], y: &mut [f32], buf: &mut Vec<f32>)
);

/// Gradient of one input plane from its output-plane gradient: accumulated into the split
/// padded plane, then its interior kept.
#[inline(always)]
fn input_grad_body(g: &Geom, dy: &[f32], k: &[f32], dx: &mut [f32], buf: &mut Vec<f32>) {
    g.zero_split(buf);
    for (oy, src) in dy.chunks(g.ow).enumerate() {
        for ky in 0..g.kh {
            for (kx, &a) in k[ky * g.kw..(ky + 1) * g.kw].iter().enumerate() {
                let at = g.run_at(oy, ky, kx);
                for (d, v) in buf[at..at + g.ow].iter_mut().zip(src) {
                    *d += a * v;
                }
            }
        }
    }
    g.split_out(buf, dx);
}

multiversion!(
    input_grad_plane,
    input_grad_body,
    (g: &Geom, dy: &[f32], k: &[f32], dx: &mut [f32], buf: &mut Vec<f32>)
);

/// Adds one plane's contribution to its filter's gradient: element-wise products accumulate
/// into `acc` (`kh * kw` rows of `ow`, summed by [`reduce_taps`] once all planes of a channel
/// are in), so the inner loop is a vectorised multiply-add rather than a dot product's serial
/// sum.
#[inline(always)]
fn weight_grad_body(g: &Geom, x: &[f32], dy: &[f32], (acc, buf): (&mut [f32], &mut Vec<f32>)) {
    g.split_into(x, buf);
    let ow = g.ow;
    for (oy, out) in dy.chunks(ow).enumerate() {
        for ky in 0..g.kh {
            let taps = &mut acc[ky * g.kw * ow..(ky + 1) * g.kw * ow];
            for (kx, a) in taps.chunks_exact_mut(ow).enumerate() {
                let at = g.run_at(oy, ky, kx);
                for ((d, &o), &v) in a.iter_mut().zip(out).zip(&buf[at..at + ow]) {
                    *d += o * v;
                }
            }
        }
    }
}
multiversion!(
    weight_grad_plane,
    weight_grad_body,
    (g: &Geom, x: &[f32], dy: &[f32], scratch: (&mut [f32], &mut Vec<f32>))
);

/// `dk[t] += sum(acc row t)` for the weight gradient's per-tap accumulators.
fn reduce_taps(g: &Geom, acc: &[f32], dk: &mut [f32]) {
    for (d, row) in dk.iter_mut().zip(acc.chunks_exact(g.ow)) {
        *d += row.iter().sum::<f32>();
    }
}

/// The depthwise convolution of `x` (`[B, C, H, W]` values) with `k` (`[C, 1, kh, kw]`): one
/// task per (image, channel) plane.
pub(super) fn forward(g: &Geom, x: &[f32], k: &[f32]) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut y = vec![0f32; g.b * g.c * g.out_plane()];
    y.par_chunks_mut(g.out_plane().max(1))
        .enumerate()
        .for_each_init(Vec::new, |buf, (p, yp)| {
            let c = p % g.c;
            let xp = &x[p * g.in_plane()..(p + 1) * g.in_plane()];
            forward_plane(g, xp, &k[c * taps..(c + 1) * taps], yp, buf);
        });
    y
}

/// The input gradient for the output gradient `dy`; `post(plane, dx_plane)` runs on each
/// finished plane while it is in cache (a caller's element-wise terms).
pub(super) fn input_grad_with(
    g: &Geom,
    dy: &[f32],
    k: &[f32],
    post: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut dx = vec![0f32; g.b * g.c * g.in_plane()];
    dx.par_chunks_mut(g.in_plane().max(1))
        .enumerate()
        .for_each_init(Vec::new, |buf, (p, dxp)| {
            let c = p % g.c;
            let dyp = &dy[p * g.out_plane()..(p + 1) * g.out_plane()];
            input_grad_plane(g, dyp, &k[c * taps..(c + 1) * taps], dxp, buf);
            post(p, dxp);
        });
    dx
}

/// The kernel gradient `[C, 1, kh, kw]` for input `x` and output gradient `dy`: one task per
/// channel, over the batch.
pub(super) fn kernel_grad(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut dk = vec![0f32; g.c * taps];
    dk.par_chunks_mut(taps).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(acc, buf), (c, dkc)| {
            acc.clear();
            acc.resize(taps * g.ow, 0.0);
            for b in 0..g.b {
                let p = b * g.c + c;
                weight_grad_plane(
                    g,
                    &x[p * g.in_plane()..(p + 1) * g.in_plane()],
                    &dy[p * g.out_plane()..(p + 1) * g.out_plane()],
                    (acc, buf),
                );
            }
            reduce_taps(g, acc, dkc);
        },
    );
    dk
}

/// The forward pass: `(x [B, C, H, W], k [C, 1, kh, kw]) -> y [B, C, oh, ow]`.
struct DepthwiseConv {
    stride: usize,
    pad: usize,
}

impl Kernel for DepthwiseConv {
    fn name(&self) -> &'static str {
        "distillery-depthwise-conv2d"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, k] = operands(self.name(), xs)?;
        let g = Geom::new(x.dims(), k.dims(), self.stride, self.pad)?;
        Ok((
            forward(&g, x.data, k.data),
            Shape::from((g.b, g.c, g.oh, g.ow)),
        ))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, k] = operands(self.name(), xs)?;
        let dy = dy.contiguous()?;
        let geom = Geom::new(x.dims(), k.dims(), self.stride, self.pad)?;
        let dx = apply_no_bwd(InputGrad(geom), &[&dy, k])?;
        let dk = apply_no_bwd(KernelGrad(geom), &[x, &dy])?;
        Ok(vec![Some(dx), Some(dk)])
    }
}

/// `(dy, k) -> dx`.
struct InputGrad(Geom);

impl Kernel for InputGrad {
    fn name(&self) -> &'static str {
        "distillery-depthwise-conv2d-dx"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = self.0;
        let [dy, k] = operands(self.name(), xs)?.map(|t| t.data);
        let dx = input_grad_with(&g, dy, k, |_, _| {});
        Ok((dx, Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// `(x, dy) -> dk`.
struct KernelGrad(Geom);

impl Kernel for KernelGrad {
    fn name(&self) -> &'static str {
        "distillery-depthwise-conv2d-dk"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = self.0;
        let [x, dy] = operands(self.name(), xs)?.map(|t| t.data);
        Ok((kernel_grad(&g, x, dy), Shape::from((g.c, 1, g.kh, g.kw))))
    }
}

/// Depthwise `F.conv2d(x, k, padding=pad, stride=stride, groups=C)` for `x: [B, C, H, W]` and
/// `k: [C, 1, kh, kw]` (no bias), differentiable in both arguments on every device.
pub fn depthwise_conv2d(
    x: &Tensor,
    k: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let _geom = Geom::new(x.dims(), k.dims(), stride, pad)?;
    if super::fast_path(x) && super::fast_path(k) {
        return apply(DepthwiseConv { stride, pad }, &[x, k]);
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = super::cuda::depthwise_conv2d(x, k, _geom)? {
        return Ok(y);
    }
    depthwise_shifted(x, k, pad, stride)
}

/// The device-generic form: `sum over taps of k[:, tap] * (strided view of the padded input)`.
fn depthwise_shifted(x: &Tensor, k: &Tensor, pad: usize, s: usize) -> candle_core::Result<Tensor> {
    let g = Geom::new(x.dims(), k.dims(), s, pad)?;
    // Each tap reads `s * oh` rows from its offset: pad the bottom/right so they all exist.
    let extra = |n: usize, kn: usize, on: usize| (kn - 1 + s * on).saturating_sub(n + 2 * pad);
    let xp = x
        .pad_with_zeros(2, pad, pad + extra(g.h, g.kh, g.oh))?
        .pad_with_zeros(3, pad, pad + extra(g.w, g.kw, g.ow))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let mut v = xp.narrow(2, ky, s * g.oh)?.narrow(3, kx, s * g.ow)?;
            if s > 1 {
                v = v
                    .contiguous()?
                    .reshape((g.b, g.c, g.oh, s, g.ow, s))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((g.b, g.c, g.oh, g.ow))?;
            }
            let tap = k
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, g.c, 1, 1))?;
            let term = v.broadcast_mul(&tap)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise conv: empty kernel".into()))
}

/// 3x3 max pooling with stride 2 and padding 1 (PyTorch's `max_pool2d(x, 3, 2, 1)`: padded
/// positions never win); its gradient goes to the first maximum of each window in row-major
/// order, as PyTorch's does.
struct MaxPool3x3S2;

/// The output side of the pooling for an input side `n > 0`.
fn pooled(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// Visits every output position of one `h x w` plane with the flat index of its window's first
/// maximum (padding excluded).
fn for_each_argmax(xp: &[f32], h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    let ow = pooled(w);
    for oy in 0..pooled(h) {
        let rows = (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h);
        for ox in 0..ow {
            let cols = (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w);
            let (mut m, mut at) = (f32::NEG_INFINITY, rows.start * w + cols.start);
            for iy in rows.clone() {
                let start = iy * w + cols.start;
                for (i, &v) in xp[start..iy * w + cols.end].iter().enumerate() {
                    if v > m {
                        (m, at) = (v, start + i);
                    }
                }
            }
            f(oy * ow + ox, at);
        }
    }
}

fn pool_dims(x: &In) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = x.shape.dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("max pooling of an empty {h}x{w} map")
    }
    Ok((b, c, h, w))
}

impl Kernel for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "distillery-max-pool-3x3-s2"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x] = operands(self.name(), xs)?;
        let (b, c, h, w) = pool_dims(&x)?;
        let (oh, ow) = (pooled(h), pooled(w));
        let mut y = vec![0f32; b * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.data.par_chunks(h * w))
            .for_each(|(yp, xp)| for_each_argmax(xp, h, w, |o, i| yp[o] = xp[i]));
        Ok((y, Shape::from((b, c, oh, ow))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x] = operands(self.name(), xs)?;
        Ok(vec![Some(apply_no_bwd(MaxPoolBwd, &[x, g])?)])
    }
}

/// `(x, dy) -> dx` of [`MaxPool3x3S2`].
struct MaxPoolBwd;

impl Kernel for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "distillery-max-pool-3x3-s2-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, g] = operands(self.name(), xs)?;
        let (b, c, h, w) = pool_dims(&x)?;
        let plane = pooled(h) * pooled(w);
        if g.data.len() != b * c * plane {
            candle_core::bail!(
                "{}: gradient of {:?} for {:?}",
                self.name(),
                g.dims(),
                x.dims()
            )
        }
        let mut dx = vec![0f32; x.data.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.data.par_chunks(h * w))
            .zip(g.data.par_chunks(plane))
            .for_each(|((dp, xp), gp)| for_each_argmax(xp, h, w, |o, i| dp[i] += gp[o]));
        Ok((dx, x.shape.clone()))
    }
}

/// `max_pool2d(x, kernel 3, stride 2, padding 1)` of a CPU f32 `[B, C, H, W]` map,
/// differentiable.
pub fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    apply(MaxPool3x3S2, &[x])
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_abs_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// Against candle's pooling of the zero-padded input shifted to be positive (padding then
    /// never wins; the shift comes back off), on signed values and odd, tiny shapes.
    #[test]
    fn max_pool_matches_candle_with_padding_excluded() {
        for (h, w) in [(7, 10), (8, 8), (1, 1), (2, 5)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let k = 10.0;
            let want = ((x.clone() + k).unwrap())
                .pad_with_zeros(2, 1, 1)
                .unwrap()
                .pad_with_zeros(3, 1, 1)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            let want = (want - k).unwrap();
            let got = max_pool_3x3_s2(&x).unwrap();
            assert_eq!(got.dims(), want.dims(), "{h}x{w}");
            assert!(max_abs_diff(&got, &want) < 1e-5, "{h}x{w}");
        }
    }

    /// Output and both gradients of `sum(conv(x, k) * r)` by `conv`.
    fn run(
        conv: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        x: &Var,
        k: &Var,
        r: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let y = conv(x.as_tensor(), k.as_tensor()).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        let gk = grads.get(k.as_tensor()).unwrap().clone();
        (y, gx, gk)
    }

    /// The CPU kernel and the device-generic form against candle's grouped convolution (an
    /// independent implementation), forward and both gradients, over strides, paddings, kernel
    /// sizes and odd, non-square inputs.
    #[test]
    fn matches_grouped_convolution_forward_and_backward() {
        let dev = Device::Cpu;
        for (h, w, kh, kw, pad, s) in [
            (9, 7, 3, 3, 1, 1),
            (9, 7, 3, 3, 1, 2),
            (10, 13, 3, 3, 1, 2),
            (11, 8, 7, 7, 3, 1),
            (11, 8, 7, 7, 3, 2),
            (6, 9, 3, 3, 0, 1),
            (5, 5, 5, 3, 2, 3),
            (7, 10, 5, 3, 2, 1),
            (4, 6, 1, 1, 0, 1),
        ] {
            let c = 5;
            let x = Var::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let k = Var::randn(0f32, 1.0, (c, 1, kh, kw), &dev).unwrap();
            // candle's backward gets the width wrong when height and width leave different
            // remainders, so the reference pads explicitly and drops the unread rows/columns.
            let want = |x: &Tensor, k: &Tensor| {
                let p = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
                let (hp, wp) = (h + 2 * pad, w + 2 * pad);
                let p = p.narrow(2, 0, hp - (hp - kh) % s)?;
                let p = p.narrow(3, 0, wp - (wp - kw) % s)?;
                p.conv2d(k, 0, s, 1, c)
            };
            let probe = want(x.as_tensor(), k.as_tensor()).unwrap();
            let r = Tensor::randn(0f32, 1.0, probe.shape(), &dev).unwrap();
            let (y0, gx0, gk0) = run(want, &x, &k, &r);
            let fast = |x: &Tensor, k: &Tensor| depthwise_conv2d(x, k, pad, s);
            let generic = |x: &Tensor, k: &Tensor| depthwise_shifted(x, k, pad, s);
            for (name, (y, gx, gk)) in [
                ("cpu kernel", run(fast, &x, &k, &r)),
                ("generic", run(generic, &x, &k, &r)),
            ] {
                let case = format!("{name} {h}x{w} k{kh}x{kw} p{pad} s{s}");
                assert_eq!(y.dims(), y0.dims(), "{case}");
                assert!(max_abs_diff(&y, &y0) < 1e-4, "{case} forward");
                assert!(max_abs_diff(&gx, &gx0) < 1e-4, "{case} dx");
                assert!(max_abs_diff(&gk, &gk0) < 1e-3, "{case} dk");
            }
        }
    }

    /// A hand-computed case: 3x3 ones filter, stride 2, padding 1 over a 3x3 ramp.
    #[test]
    fn hand_computed_case() {
        let dev = Device::Cpu;
        let x = Tensor::arange(1f32, 10.0, &dev)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let k = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let y = depthwise_conv2d(&x, &k, 1, 2).unwrap();
        // windows centred on (0,0), (0,2), (2,0), (2,2) of [[1,2,3],[4,5,6],[7,8,9]]
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![12.0, 16.0, 24.0, 28.0]);
    }

    #[test]
    fn a_kernel_that_does_not_fit_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((4, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(depthwise_conv2d(&x, &k, 1, 1).is_err());
        let k = Tensor::zeros((3, 1, 7, 7), candle_core::DType::F32, &dev).unwrap();
        assert!(depthwise_conv2d(&x, &k, 1, 1).is_err());
    }
}
