//! Fast CPU kernels for the element-wise work that dominates a ViT forward after the matrix
//! products: exact (erf) GELU and the last-dimension softmax. They run multi-threaded with
//! rayon and are written branch-free so the compiler vectorises them; an AVX-512 (or AVX2)
//! build of the inner loops is selected at run time. Other devices/dtypes fall back to candle.
//!
//! Accuracy: `exp` is a Cephes-style polynomial (max rel. error ~2e-7 on the range used);
//! `erf` follows Abramowitz & Stegun 7.1.26 (max abs. error 1.5e-7).

mod attention;
mod op;

use candle_core::{DType, Shape, Tensor};
use op::{apply, apply_no_bwd, contiguous_f32, operands, In, Kernel};
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    // exp(x) = 2^n * exp(r), r = x - n ln2, |r| <= ln2/2.
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln2) by adding 1.5 * 2^23: the sum's last mantissa bits are then the
    // integer n (two's complement), read below as bits. An `as i32` cast instead saturates and
    // checks for NaN per lane, which the compiler cannot vectorise.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: the biased exponent n + 127 (in 1..=254 for the clamped range) shifted into place
    e * f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits() - 127) << 23)
}

/// `(Phi(x), exp(-x^2 / 2))`: the normal CDF through erf(x / sqrt 2) (A&S 7.1.26) and the
/// exponential it uses, which the derivative needs again.
#[inline(always)]
fn normal_cdf_and_exp(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = exp_approx(-a * a);
    let erf = (1.0 - poly * e).copysign(z);
    (0.5 * (1.0 + erf), e)
}

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    x * normal_cdf_and_exp(x).0
}

macro_rules! multiversion {
    ($vis:vis $name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { $body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

mod conv;
mod depthwise;
pub use conv::conv2d_im2col;
pub use depthwise::{depthwise_conv2d, max_pool_3x3_s2};
mod affine;
pub use affine::{
    batch_norm_train_act, bn_scale_shift, channel_affine_act, channel_bias, channel_bias_act,
    channel_scale, channel_stats, sum_act, Act,
};
mod adamw;
pub use adamw::{adamw_update, AdamStep};
#[cfg(feature = "cuda")]
pub mod cuda;
mod feature_loss;
pub use feature_loss::{fused_feature_loss, LossWeights};
mod fused;
mod fused_cnn;
pub use fused::{
    adapter_train, backward_with, fused_training_enabled, vit_block_infer, vit_block_train,
    AdapterParams, FusedGradients, VitBlockParams,
};
pub use fused_cnn::{conv_mlp_train, repmixer_train, ConvMlpParams, RepMixerParams};

#[inline(always)]
fn gelu_body(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_one(s);
    }
}
multiversion!(gelu_slice, gelu_body, (src: &[f32], dst: &mut [f32]));

#[inline(always)]
fn gelu_inplace_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_one(*v);
    }
}
multiversion!(gelu_slice_inplace, gelu_inplace_body, (x: &mut [f32]));

#[inline(always)]
fn gelu_grad_one(x: f32) -> f32 {
    // Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi): one exponential for both
    let (cdf, e) = normal_cdf_and_exp(x);
    cdf + x * (e * 0.398_942_3)
}

#[inline(always)]
fn gelu_bwd_body(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &xv), &gv) in out.iter_mut().zip(x).zip(g) {
        *o = gv * gelu_grad_one(xv);
    }
}
multiversion!(gelu_bwd_slice, gelu_bwd_body, (x: &[f32], g: &[f32], out: &mut [f32]));

struct GeluBwd;

impl Kernel for GeluBwd {
    fn name(&self) -> &'static str {
        "distillery-gelu-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, g] = operands(self.name(), xs)?;
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.data.par_chunks(CHUNK).zip(g.data.par_chunks(CHUNK)))
            .for_each(|(o, (xc, gc))| gelu_bwd_slice(xc, gc, o));
        Ok((out, x.shape.clone()))
    }
}

/// `grad * gelu'(x)` (fused on CPU f32).
fn gelu_backward(x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(x) && fast_path(grad) {
        apply_no_bwd(GeluBwd, &[x, grad])
    } else {
        grad * gelu_derivative(x)?
    }
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x) (candle ops, any device).
fn gelu_derivative(x: &Tensor) -> candle_core::Result<Tensor> {
    let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let pdf = ((x.sqr()? * -0.5)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    cdf + (x * pdf)?
}

#[inline(always)]
fn softmax_body(src: &[f32], dst: &mut [f32]) {
    // Lane-wise reductions so the loops vectorise (a plain fold is a serial dependency).
    const L: usize = 16;
    let mut mx = [f32::NEG_INFINITY; L];
    let chunks = src.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let mut max = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for m in mx {
        max = max.max(m);
    }
    let mut acc = [0f32; L];
    let n = src.len() / L * L;
    for (dc, sc) in dst[..n].chunks_exact_mut(L).zip(src[..n].chunks_exact(L)) {
        for i in 0..L {
            let e = exp_approx(sc[i] - max);
            dc[i] = e;
            acc[i] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (d, &s) in dst[n..].iter_mut().zip(&src[n..]) {
        let e = exp_approx(s - max);
        *d = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}
multiversion!(softmax_row, softmax_body, (src: &[f32], dst: &mut [f32]));

struct Gelu;

impl Kernel for Gelu {
    fn name(&self) -> &'static str {
        "distillery-gelu-erf"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x] = operands(self.name(), xs)?;
        let mut dst = vec![0f32; x.data.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(x.data.par_chunks(CHUNK))
            .for_each(|(d, s)| gelu_slice(s, d));
        Ok((dst, x.shape.clone()))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x] = operands(self.name(), xs)?;
        Ok(vec![Some(gelu_backward(x, grad)?)])
    }
}

/// `[B, R, C]` -> `[B, C, R]`: the two inner dimensions swapped, contiguous (tokens <-> maps).
struct SwapInner;

impl Kernel for SwapInner {
    fn name(&self) -> &'static str {
        "distillery-swap-inner"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x] = operands(self.name(), xs)?;
        let (b, r, c) = x.shape.dims3()?;
        Ok((swap_inner_values(x.data, (r, c)), Shape::from((b, c, r))))
    }

    fn backward(
        &self,
        _xs: &[&Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(swap_inner(grad)?)])
    }
}

/// `x` `[B, r, c]` row-major as `[B, c, r]` row-major. Each task writes a block of `TILE`
/// output rows (channels c0..c0 + TILE): it walks the input rows, reading each row's `TILE`
/// consecutive values of those channels into column `i` of its `TILE` output rows.
fn swap_inner_values(x: &[f32], (r, c): (usize, usize)) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out: Vec<f32> = Vec::with_capacity(x.len());
    if x.is_empty() {
        return out;
    }
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(c * r)
        .zip(x.par_chunks(r * c))
        .for_each(|(dst, src)| {
            dst.par_chunks_mut(TILE * r)
                .enumerate()
                .for_each(|(blk, dst)| {
                    let c0 = blk * TILE;
                    let t = dst.len() / r;
                    for i in 0..r {
                        let row = &src[i * c + c0..][..t];
                        for (j, &v) in row.iter().enumerate() {
                            dst[j * r + i].write(v);
                        }
                    }
                });
        });
    // SAFETY: the chunks cover all x.len() elements and each element of each chunk was
    // written above (output row c0 + j, column i for every i < r, j < t).
    unsafe { out.set_len(x.len()) };
    out
}

/// `[B, R, C]` -> `[B, C, R]` contiguous (`x.transpose(1, 2)?.contiguous()`): a patch token
/// sequence as a channel-major map and back. candle's strided copy of a transposed tensor goes
/// element by element through an index iterator on one thread (~70 ms of a stage-1 student
/// step at batch 8); CPU f32 takes a tiled, multi-threaded copy (differentiable).
pub fn swap_inner(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(x) && x.rank() == 3 {
        apply(SwapInner, &[x])
    } else {
        x.transpose(1, 2)?.contiguous()
    }
}

struct Softmax;

impl Kernel for Softmax {
    fn name(&self) -> &'static str {
        "distillery-softmax-last-dim"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x] = operands(self.name(), xs)?;
        let (src, n) = (x.data, x.dims().last().copied().unwrap_or(1).max(1));
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (CHUNK / n).max(1) * n;
        dst.par_chunks_mut(rows_per_task)
            .zip(src.par_chunks(rows_per_task))
            .for_each(|(d, s)| {
                for (dr, sr) in d.chunks_mut(n).zip(s.chunks(n)) {
                    softmax_row(sr, dr);
                }
            });
        Ok((dst, x.shape.clone()))
    }

    fn backward(
        &self,
        _xs: &[&Tensor],
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let dot = (grad * y)?.sum_keepdim(candle_core::D::Minus1)?;
        Ok(vec![Some((y * grad.broadcast_sub(&dot)?)?)])
    }
}

/// `out[m, n] = bias[n] + sum_k x[m, k] w[n, k]` with the bias written first and accumulated
/// into by the matrix product (no separate broadcast pass). `w` is stored `[n, k]`, or `[k, n]`
/// when `w.kn` (a frozen model's weights, see [`input_major`]).
fn gemm_xwt(
    x: &[f32],
    w: WeightView,
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let tb = !w.kn;
    let w = w.data;
    let mut out = match bias {
        Some(b) => {
            let mut o = Vec::with_capacity(m * n);
            for _ in 0..m {
                o.extend_from_slice(b);
            }
            o
        }
        // SAFETY: the product below writes every element without reading them
        // (`accumulate` is false without a bias).
        None => {
            return unsafe {
                written_by(m * n, |dst| {
                    gemm_raw(dst, x, w, (m, k, n), false, tb, false)
                })
            }
        }
    };
    // SAFETY: `out` holds m*n initialised elements.
    unsafe { gemm_raw(out.as_mut_ptr(), x, w, (m, k, n), false, tb, true) };
    out
}

/// A linear layer's weight as a kernel reads it: `[out, in]` row-major, or, when `kn`, stored
/// `[in, out]` row-major (its transpose).
#[derive(Clone, Copy)]
struct WeightView<'a> {
    data: &'a [f32],
    kn: bool,
}

impl<'a> WeightView<'a> {
    /// A weight stored `[out, in]` (as `nn.Linear` keeps it).
    fn out_major(data: &'a [f32]) -> Self {
        Self { data, kn: false }
    }
}

/// `w` (`[out, in]`, CPU f32) with the same values stored input-major (`[in, out]` row-major,
/// seen through a transposed view): the layout the matrix products read fastest, 3-9 % faster
/// per product on the AVX-512 machine's ViT shapes (the gemm crate then packs the weight with
/// unit strides). For weights no gradient is asked of (frozen teachers, inference): a trained
/// weight would be transposed again by each update. Other devices and dtypes, and weights that
/// are not 2-D, come back unchanged.
pub fn input_major(w: &Tensor) -> candle_core::Result<Tensor> {
    if !fast_path(w) || w.rank() != 2 || input_major_storage(w).is_some() {
        return Ok(w.clone());
    }
    w.t()?.contiguous()?.t()
}

/// The `[in, out]` contiguous tensor behind a weight stored input-major (see [`input_major`]).
fn input_major_storage(w: &Tensor) -> Option<Tensor> {
    if w.rank() != 2 || w.is_contiguous() || w.dims().contains(&1) {
        return None;
    }
    let t = w.t().ok()?;
    t.is_contiguous().then_some(t)
}

/// `n` values written by `fill` through the pointer it is given, with no zeroing pass first.
///
/// # Safety
/// `fill` must write every one of the `n` elements and read none before writing it.
unsafe fn written_by(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(v.as_mut_ptr());
    v.set_len(n);
    v
}

/// `(m, n, k)` of `x @ w^T` for `x: [m, k]` and `w` stored `[n, k]`, or `[k, n]` when `kn`,
/// and the weight as the product reads it.
fn linear_operands<'a>(
    x: &In,
    w: &In<'a>,
    kn: bool,
) -> candle_core::Result<((usize, usize, usize), WeightView<'a>)> {
    let (m, k) = x.shape.dims2()?;
    let (n, k2) = w.shape.dims2()?;
    let (n, k2) = if kn { (k2, n) } else { (n, k2) };
    if k != k2 {
        candle_core::bail!("linear kernel: x is [{m}, {k}] but w is [{n}, {k2}]")
    }
    Ok(((m, n, k), WeightView { data: w.data, kn }))
}

struct LinearNoBias {
    /// the weight operand is stored `[in, out]` (see [`input_major`])
    kn: bool,
}

impl Kernel for LinearNoBias {
    fn name(&self) -> &'static str {
        "distillery-linear"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, w] = operands(self.name(), xs)?;
        let ((m, n, k), w) = linear_operands(&x, &w, self.kn)?;
        Ok((gemm_xwt(x.data, w, None, m, n, k), Shape::from((m, n))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, w] = operands(self.name(), xs)?;
        let (dx, dw) = linear_grads(x, w, g, self.kn)?;
        Ok(vec![Some(dx), Some(dw)])
    }
}

struct LinearBias {
    /// apply exact GELU to the output in place
    gelu: bool,
    /// the weight operand is stored `[in, out]` (see [`input_major`])
    kn: bool,
}

impl Kernel for LinearBias {
    fn name(&self) -> &'static str {
        "distillery-linear-bias"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, w, b] = operands(self.name(), xs)?;
        let ((m, n, k), w) = linear_operands(&x, &w, self.kn)?;
        if b.data.len() != n {
            candle_core::bail!(
                "linear kernel: bias has {} values for {n} outputs",
                b.data.len()
            )
        }
        let mut out = gemm_xwt(x.data, w, Some(b.data), m, n, k);
        if self.gelu {
            out.par_chunks_mut(CHUNK).for_each(gelu_slice_inplace);
        }
        Ok((out, Shape::from((m, n))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, w, b] = operands(self.name(), xs)?;
        let g = if self.gelu {
            let pre = apply_no_bwd(
                LinearBias {
                    gelu: false,
                    kn: self.kn,
                },
                &[x, w, b],
            )?;
            gelu_backward(&pre, g)?
        } else {
            g.clone()
        };
        let (dx, dw) = linear_grads(x, w, &g, self.kn)?;
        Ok(vec![Some(dx), Some(dw), Some(bias_grad(&g)?)])
    }
}

/// `gelu(x @ w^T + b)` (`nn.Linear` then exact GELU): in one pass over memory on CPU when no
/// gradient is asked; when training, the product is kept as the GELU's input so the backward
/// pass does not recompute it (a fused op's backward would run the product a second time).
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let training = tracked(x) || tracked(w) || tracked(b);
    if fast_path(x) && fast_path(w) && fast_path(b) && !training {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&1);
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = w.dim(0)?;
        }
        let (w, kn) = weight_operand(w);
        apply(LinearBias { gelu: true, kn }, &[&x.reshape((m, k))?, &w, b])?.reshape(out_dims)
    } else {
        gelu_erf(&linear(x, w, Some(b))?)
    }
}

/// `op(a) @ op(b)` for 2-D contiguous f32 operands, `op` = transpose when flagged, as one
/// strided product (no transposed copies). Used by backward passes; not differentiable itself.
struct Gemm2 {
    ta: bool,
    tb: bool,
}

impl Kernel for Gemm2 {
    fn name(&self) -> &'static str {
        "distillery-gemm2"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [a, b] = operands(self.name(), xs)?;
        let (ar, ac) = a.shape.dims2()?;
        let (br, bc) = b.shape.dims2()?;
        let (a, b) = (a.data, b.data);
        // op(a): [m, k]; op(b): [k, n]
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.tb { (bc, br) } else { (br, bc) };
        if k != k2 {
            candle_core::bail!("gemm kernel: inner dimensions {k} and {k2} differ")
        }
        // SAFETY: a product that does not accumulate writes all m*n elements, reading none.
        let out = unsafe {
            written_by(m * n, |dst| {
                gemm_raw(dst, a, b, (m, k, n), self.ta, self.tb, false)
            })
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `dst (+)= op(a) @ op(b)` for row-major slices, `op(a)` `[rows, k]`, `op(b)` `[k, cols]`, `op`
/// = transpose when flagged (a transposed operand is read through its strides, not copied);
/// `accumulate` adds to `dst`. One multi-threaded GEMM.
fn gemm_into(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    (rows, k, cols): (usize, usize, usize),
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    assert!(
        dst.len() >= rows * cols,
        "gemm_into: destination smaller than {rows}x{cols}"
    );
    // SAFETY: dst holds rows*cols initialised elements.
    unsafe { gemm_raw(dst.as_mut_ptr(), a, b, (rows, k, cols), ta, tb, accumulate) }
}

/// [`gemm_into`] writing through a pointer.
///
/// # Safety
/// `dst` must be valid for `rows * cols` writes (and reads when `accumulate`), not overlapping
/// the operands.
unsafe fn gemm_raw(
    dst: *mut f32,
    a: &[f32],
    b: &[f32],
    (rows, k, cols): (usize, usize, usize),
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    assert!(
        a.len() >= rows * k && b.len() >= k * cols,
        "gemm: operands smaller than {rows}x{k} @ {k}x{cols}"
    );
    // stored [rows, k] (column stride 1, row stride k) or, transposed, [k, rows]
    let (a_cs, a_rs) = if ta {
        (rows as isize, 1)
    } else {
        (1, k as isize)
    };
    let (b_cs, b_rs) = if tb {
        (k as isize, 1)
    } else {
        (1, cols as isize)
    };
    // Tall products (a ViT's linear layers: batch x tokens rows) split into one block of rows
    // per thread, each a single-threaded product: on ViT-B/16 b8 forwards this ran 2-3 %
    // faster than the gemm crate's own threading (7 alternating rounds, 2-core Xeon).
    let threads = rayon::current_num_threads();
    if !ta && threads > 1 && rows >= 256 * threads {
        let per = rows.div_ceil(threads).div_ceil(16) * 16;
        let out = OutPtr(dst);
        (0..rows.div_ceil(per)).into_par_iter().for_each(|i| {
            let (r0, r1) = (i * per, ((i + 1) * per).min(rows));
            // SAFETY: rows r0..r1 of a (row stride k) and of dst (row stride cols) lie inside
            // the extents the caller vouched for; the blocks' destinations are disjoint.
            sgemm_with(
                (r1 - r0, cols, k),
                (out.get().add(r0 * cols), 1, cols as isize),
                (a[r0 * k..].as_ptr(), a_cs, a_rs),
                (b.as_ptr(), b_cs, b_rs),
                1.0,
                accumulate,
                gemm::Parallelism::None,
            );
        });
        return;
    }
    sgemm_with(
        (rows, cols, k),
        (dst, 1, cols as isize),
        (a.as_ptr(), a_cs, a_rs),
        (b.as_ptr(), b_cs, b_rs),
        1.0,
        accumulate,
        gemm::Parallelism::Rayon(threads),
    );
}

/// `op(a) @ op(b)` for 2-D tensors (fast path on CPU f32).
fn gemm2(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> candle_core::Result<Tensor> {
    if fast_path(a) && fast_path(b) {
        apply_no_bwd(Gemm2 { ta, tb }, &[a, b])
    } else {
        let a = if ta { a.t()? } else { a.clone() };
        let b = if tb { b.t()? } else { b.clone() };
        a.matmul(&b)
    }
}

/// Gradients of `y = x w^T (+ b)` for `x: [m, k]`, `w: [n, k]`, upstream `g: [m, n]`:
/// `dx = g w`, `dw = g^T x`, `db = 1^T g`; with `kn` (`w` stored `[k, n]`) `dx = g w^T` and
/// the weight's gradient `x^T g`, in the weight's own layout.
fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    kn: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    if kn {
        Ok((gemm2(g, w, false, true)?, gemm2(x, g, true, false)?))
    } else {
        Ok((gemm2(g, w, false, false)?, gemm2(g, x, true, false)?))
    }
}

/// `1^T g`: the bias gradient of a linear layer from its upstream gradient `g: [m, n]`.
fn bias_grad(g: &Tensor) -> candle_core::Result<Tensor> {
    let ones = Tensor::ones((1, g.dim(0)?), g.dtype(), g.device())?;
    gemm2(&ones, g, false, false)?.squeeze(0)
}

/// The weight operand of a linear kernel and whether it is stored `[in, out]`.
fn weight_operand(w: &Tensor) -> (Tensor, bool) {
    match input_major_storage(w) {
        Some(t) => (t, true),
        None => (w.clone(), false),
    }
}

/// `x + b` with `b: [C]` broadcast along dimension `dim` of `x` (a linear layer's or a
/// convolution's bias, BatchNorm's shift), differentiable in both; one kernel on a GPU.
pub fn add_channel_bias(x: &Tensor, b: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = cuda::bias_add(x, b, dim)? {
        return Ok(y);
    }
    let mut shape = vec![1; x.rank()];
    if let Some(d) = shape.get_mut(dim) {
        *d = b.elem_count();
    }
    x.broadcast_add(&b.reshape(shape)?)
}

/// `x @ w^T + b` over the last dimension of `x` (any leading dimensions), as `nn.Linear`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let n = w.dim(0)?;
    let m = x.elem_count() / k.max(1);
    let mut out_dims = dims.clone();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let x2 = x.reshape((m, k))?;
    let y = if fast_path(x) && w.dtype() == DType::F32 && w.device().is_cpu() {
        let (w, kn) = weight_operand(w);
        match b {
            Some(b) => apply(LinearBias { gelu: false, kn }, &[&x2, &w, b])?,
            None => apply(LinearNoBias { kn }, &[&x2, &w])?,
        }
    } else {
        let y = x2.matmul(&w.t()?)?;
        match b {
            Some(b) => add_channel_bias(&y, b, 1)?,
            None => y,
        }
    };
    y.reshape(out_dims)
}

/// Batched `a @ b^T` for `a: [B, M, K]`, `b: [B, N, K]`: one single-threaded product per batch
/// item, batch items in parallel (better than splitting each small product across threads).
struct BatchedMatmulBt;

impl Kernel for BatchedMatmulBt {
    fn name(&self) -> &'static str {
        "distillery-bmm-bt"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [a, b] = operands(self.name(), xs)?;
        let (bt, m, k) = a.shape.dims3()?;
        let (bt2, n, k2) = b.shape.dims3()?;
        if bt != bt2 || k != k2 {
            candle_core::bail!("bmm kernel: {:?} vs {:?}", a.dims(), b.dims())
        }
        let (a, b) = (a.data, b.data);
        let mut out = vec![0f32; bt * m * n];
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
            let ai = &a[i * m * k..(i + 1) * m * k];
            let bi = &b[i * n * k..(i + 1) * n * k];
            // SAFETY: slices cover the strided extents.
            unsafe {
                sgemm(
                    (m, n, k),
                    (o.as_mut_ptr(), 1, n as isize),
                    (ai.as_ptr(), 1, k as isize),
                    (bi.as_ptr(), k as isize, 1),
                    1.0,
                );
            }
        });
        Ok((out, Shape::from((bt, m, n))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [a, b] = operands(self.name(), xs)?;
        Ok(vec![
            Some(g.matmul(b)?),
            Some(g.transpose(1, 2)?.matmul(a)?),
        ])
    }
}

/// Batched `a @ b^T` over the last two dimensions (leading dimensions flattened).
pub fn matmul_bt(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(a) && fast_path(b) && a.rank() >= 3 && a.rank() == b.rank() {
        let ad = a.dims();
        let (m, k) = (ad[ad.len() - 2], ad[ad.len() - 1]);
        let n = b.dims()[b.rank() - 2];
        let batch = a.elem_count() / (m * k);
        let mut out_dims = ad.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = n;
        let a3 = a.contiguous()?.reshape((batch, m, k))?;
        let b3 = b.contiguous()?.reshape((batch, n, k))?;
        apply(BatchedMatmulBt, &[&a3, &b3])?.reshape(out_dims)
    } else {
        a.matmul(&b.t()?)
    }
}

/// Batched `a @ b` over the last two dimensions.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(a) && fast_path(b) && a.rank() >= 3 && a.rank() == b.rank() {
        // b^T contiguous makes the product an a @ (b^T)^T.
        matmul_bt(a, &b.t()?.contiguous()?)
    } else {
        a.matmul(b)
    }
}

/// Multi-head self-attention straight from a packed `qkv` buffer `[B, N, 3C]` (q, k, v each
/// `[N, heads, head_dim]` inside), to `[B, N, C]`. Work is split over (batch, head) pairs; each
/// computes `softmax(scale q k^T) v` with strided products into a scratch score matrix that
/// stays in cache, writing its head's columns of the output directly.
struct FusedAttention {
    heads: usize,
    scale: f32,
}

/// Raw output pointer shared by workers that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each (batch, head) task writes a disjoint set of output elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A buffer of `len` values filled by `f` on every (batch item, head) of a packed qkv
/// `[b, n, 3c]` with `heads` heads, in parallel with a scratch per worker; `f` gets the
/// buffer's start. Err (nothing returned) where any call returned false.
///
/// # Safety
/// Unless it returns false, each call must write only its own part of the buffer, and together
/// the calls must write all `len` values (the buffer is not zeroed first).
unsafe fn per_head_into(
    len: usize,
    (b, n, c): (usize, usize, usize),
    heads: usize,
    scale: f32,
    f: impl Fn(attention::Head, (usize, usize), *mut f32, &mut attention::Scratch) -> bool + Sync,
) -> Result<Vec<f32>, ()> {
    let hd = c / heads;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let ptr = OutPtr(out.as_mut_ptr());
    let declined = std::sync::atomic::AtomicBool::new(false);
    (0..b * heads)
        .into_par_iter()
        .for_each_init(attention::Scratch::default, |scratch, bh| {
            let (bi, hi) = (bh / heads, bh % heads);
            let base = bi * n * 3 * c + hi * hd;
            let head = attention::Head {
                q: base,
                k: base + c,
                v: base + 2 * c,
                stride: 3 * c,
                n,
                hd,
                scale,
            };
            if !f(head, (bi, hi), ptr.get(), scratch) {
                declined.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    if declined.into_inner() {
        return Err(());
    }
    // SAFETY: every call succeeded, so all `len` values were written (the caller's promise).
    unsafe { out.set_len(len) };
    Ok(out)
}

impl Kernel for FusedAttention {
    fn name(&self) -> &'static str {
        "distillery-fused-attention"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [qkv] = operands(self.name(), xs)?;
        let (b, n, c3) = qkv.shape.dims3()?;
        let qkv = qkv.data;
        let c = c3 / 3;
        let h = self.heads;
        if c3 % 3 != 0 || c % h != 0 {
            candle_core::bail!("attention kernel: width {c3} does not split into 3 x {h} heads")
        }
        // SAFETY: a head writes the output columns hi*hd..(hi+1)*hd of batch item bi's n rows
        // (row stride c), which no other head touches; the heads' columns make up all c.
        let out = unsafe {
            per_head_into(
                b * n * c,
                (b, n, c),
                h,
                self.scale,
                |head, (bi, hi), out, sc| {
                    let o = out.add(bi * n * c + hi * head.hd);
                    attention::head_forward(qkv, head, o, c, sc)
                },
            )
        }
        .map_err(|()| {
            candle_core::Error::Msg(
                "attention kernel: a head's rows do not fit the qkv buffer".into(),
            )
        })?;
        Ok((out, Shape::from((b, n, c))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [qkv] = operands(self.name(), xs)?;
        let bwd = FusedAttentionBwd {
            heads: self.heads,
            scale: self.scale,
        };
        Ok(vec![Some(apply_no_bwd(bwd, &[qkv, grad])?)])
    }
}

/// A strided single-precision product `dst = beta * op(lhs) @ op(rhs)` (`dst` overwritten),
/// operands given as (pointer, column stride, row stride), single-threaded.
///
/// # Safety
/// As [`sgemm_with`].
unsafe fn sgemm(
    dims: (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    beta: f32,
) {
    sgemm_with(dims, dst, lhs, rhs, beta, false, gemm::Parallelism::None);
}

/// `dst = beta * lhs @ rhs`, or `dst += beta * lhs @ rhs` when `accumulate`, for an `m x k`
/// lhs and a `k x n` rhs given as (pointer, column stride, row stride).
///
/// # Safety
/// The pointers with the given strides must address `m x k`, `k x n` and `m x n` valid
/// elements, and `dst` must not overlap the operands.
unsafe fn sgemm_with(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    beta: f32,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m, n, k, dst.0, dst.1, dst.2, accumulate, lhs.0, lhs.1, lhs.2, rhs.0, rhs.1, rhs.2, 1.0,
        beta, false, false, false, par,
    );
}

/// Gradient of [`FusedAttention`] w.r.t. the packed qkv, per (batch, head) like the forward:
/// recompute P = softmax(scale q k^T); dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dP * P));
/// dQ = scale dS K; dK = scale dS^T Q.
struct FusedAttentionBwd {
    heads: usize,
    scale: f32,
}

impl Kernel for FusedAttentionBwd {
    fn name(&self) -> &'static str {
        "distillery-fused-attention-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [qkv, dout] = operands(self.name(), xs)?;
        let (b, n, c3) = qkv.shape.dims3()?;
        let shape = qkv.shape.clone();
        let (qkv, dout) = (qkv.data, dout.data);
        let c = c3 / 3;
        let h = self.heads;
        if c3 % 3 != 0 || c % h != 0 || dout.len() != b * n * c {
            candle_core::bail!("attention bwd kernel: shapes do not match")
        }
        // SAFETY: a head writes its own q/k/v columns of dqkv (same layout as qkv); the heads'
        // columns make up all 3c.
        let dqkv = unsafe {
            per_head_into(
                b * n * c3,
                (b, n, c),
                h,
                self.scale,
                |head, (bi, hi), d, sc| {
                    let go = (bi * n * c + hi * head.hd, c);
                    attention::head_backward(qkv, head, dout, go, d, sc)
                },
            )
        }
        .map_err(|()| {
            candle_core::Error::Msg(
                "attention bwd kernel: a head's rows do not fit its buffers".into(),
            )
        })?;
        Ok((dqkv, shape))
    }
}

fn softmax_row_inplace(row: &mut [f32]) {
    // softmax_row reads and writes distinct slices; copy through a small stack buffer.
    let mut tmp = [0f32; 1024];
    if row.len() <= tmp.len() {
        let t = &mut tmp[..row.len()];
        t.copy_from_slice(row);
        softmax_row(t, row);
    } else {
        let t = row.to_vec();
        softmax_row(&t, row);
    }
}

/// The unfused attention from a packed qkv `[B, N, 3C]` (candle ops; any device).
pub fn attention_reference(qkv: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let qkv = qkv
        .reshape((b, n, 3, heads, c / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)? * scale)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = softmax_last_dim(&q.matmul(&k.t()?)?)?;
    attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
}

/// Self-attention from a packed qkv `[B, N, 3C]` to `[B, N, C]` (fused on CPU f32).
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    if fast_path(qkv) {
        let op = FusedAttention {
            heads,
            scale: scale as f32,
        };
        apply(op, &[qkv])
    } else {
        attention_reference(qkv, heads, scale)
    }
}

/// candle's fused LayerNorm forward, with a backward pass.
struct LayerNormOp {
    eps: f32,
}

impl Kernel for LayerNormOp {
    fn name(&self) -> &'static str {
        "distillery-layer-norm"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        // Delegate to candle's kernel through tensors built from the operands.
        let [x, w, b] = operands(self.name(), xs)?
            .map(|t| Tensor::from_slice(t.data, t.shape, &candle_core::Device::Cpu));
        let y = candle_nn::ops::layer_norm(&x?, &w?, &b?, self.eps)?;
        Ok((y.flatten_all()?.to_vec1::<f32>()?, y.shape().clone()))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, w, _] = operands(self.name(), xs)?;
        let d = x.dim(candle_core::D::Minus1)?;
        let packed = apply_no_bwd(LayerNormBwd { eps: self.eps }, &[x, w, g])?;
        let rows = x.elem_count() / d;
        let gx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let gw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let gb = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok(vec![Some(gx), Some(gw), Some(gb)])
    }
}

/// LayerNorm gradients, packed as `[rows + 2, D]`: dx rows, then dw, then db. Row sums are
/// accumulated in fixed-size row blocks and added in block order, so results do not depend on
/// thread scheduling (exact resume needs bit-identical gradients).
struct LayerNormBwd {
    eps: f32,
}

impl Kernel for LayerNormBwd {
    fn name(&self) -> &'static str {
        "distillery-layer-norm-bwd"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, w, g] = operands(self.name(), xs)?.map(|t| t.data);
        let d = w.len();
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, rest) = out.split_at_mut(rows * d);
        const BLOCK: usize = 64;
        let eps = self.eps;
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(BLOCK * d)
            .enumerate()
            .map(|(blk, dxb)| {
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                for (r, dxr) in dxb.chunks_exact_mut(d).enumerate() {
                    let row = blk * BLOCK + r;
                    let xr = &x[row * d..(row + 1) * d];
                    let gr = &g[row * d..(row + 1) * d];
                    let mean = xr.iter().sum::<f32>() / d as f32;
                    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                    let rstd = 1.0 / (var + eps).sqrt();
                    let mut s1 = 0f32;
                    let mut s2 = 0f32;
                    for j in 0..d {
                        let xh = (xr[j] - mean) * rstd;
                        let gw = gr[j] * w[j];
                        s1 += gw;
                        s2 += gw * xh;
                        dw[j] += gr[j] * xh;
                        db[j] += gr[j];
                    }
                    let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                    for j in 0..d {
                        let xh = (xr[j] - mean) * rstd;
                        dxr[j] = rstd * (gr[j] * w[j] - m1 - xh * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = rest.split_at_mut(d);
        for (pw, pb) in &partials {
            for j in 0..d {
                dw[j] += pw[j];
                db[j] += pb[j];
            }
        }
        Ok((out, Shape::from((rows + 2, d))))
    }
}

/// LayerNorm over the last dimension, differentiable (fast fused forward on CPU when no
/// gradient is being tracked through it).
///
/// Half-precision inputs are normalised in f32 and returned in their dtype (mixed precision
/// keeps normalisation statistics in f32).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if is_half(x) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return layer_norm(&f(x)?, &f(w)?, &f(b)?, eps)?.to_dtype(x.dtype());
    }
    let x = x.contiguous()?;
    if !(tracked(&x) || tracked(w) || tracked(b)) {
        candle_nn::ops::layer_norm(&x, w, b, eps)
    } else if fast_path(&x) {
        apply(LayerNormOp { eps }, &[&x, w, b])
    } else {
        candle_nn::ops::layer_norm_slow(&x, w, b, eps)
    }
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// Whether a gradient will be asked of `x` (candle's fused ops have no backward).
fn tracked(x: &Tensor) -> bool {
    x.is_variable() || x.track_op()
}

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(x) {
        apply(Gelu, &[x])
    } else {
        x.gelu_erf()
    }
}

/// Softmax over the last dimension.
/// Half-precision inputs are computed in f32 and returned in their dtype.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(x) {
        softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else if fast_path(x) {
        apply(Softmax, &[x])
    } else if tracked(x) {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// max |a - b| / max(max |b|, floor) (unit tests against references).
    pub(crate) fn rel_err(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
        let scale = b.abs().unwrap().max_all().unwrap();
        max_abs_diff(a, b) / scale.to_scalar::<f32>().unwrap().max(floor)
    }

    /// max |a - b| (unit tests).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::max_abs_diff;
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_matches_std() {
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_approx(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "exp({x}): {a} vs {b}");
        }
        // the ends of the clamped range, and beyond it (clamped, not wrapped around)
        for x in [-87.0f32, -86.7, 87.9, 88.0] {
            let (a, b) = (exp_approx(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "exp({x}): {a} vs {b}");
        }
        assert!(exp_approx(-1000.0) < 2e-38 && exp_approx(-1000.0) >= 0.0);
        assert!(exp_approx(1000.0) > 1e38 && exp_approx(1000.0).is_finite());
    }

    #[test]
    fn swap_inner_matches_the_strided_copy_and_passes_gradients_back() {
        let dev = Device::Cpu;
        for (b, r, c) in [
            (2usize, 197usize, 40usize),
            (1, 5, 3),
            (3, 16, 33),
            (2, 0, 4),
        ] {
            let x = candle_core::Var::randn(0f32, 1.0, (b, r, c), &dev).unwrap();
            let got = swap_inner(x.as_tensor()).unwrap();
            let want = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(got.dims(), &[b, c, r]);
            // a copy: every value in place, exactly
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            // d/dx sum(swap(x) * w) = w with its inner dimensions swapped back
            let w = Tensor::randn(0f32, 1.0, (b, c, r), &dev).unwrap();
            let g = (&got * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            let want = w.transpose(1, 2).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(dx), flat(&want), "{b}x{r}x{c}");
        }
        // a narrowed (non-contiguous) view is read through its layout
        let x = Tensor::arange(0f32, 2.0 * 7.0 * 5.0, &dev)
            .unwrap()
            .reshape((2, 7, 5))
            .unwrap()
            .narrow(1, 1, 6)
            .unwrap();
        let want = x.transpose(1, 2).unwrap().contiguous().unwrap();
        assert_eq!(max_abs_diff(&swap_inner(&x).unwrap(), &want), 0.0);
    }

    /// Reference values of the exact GELU from `torch.nn.functional.gelu(torch.tensor([...]))`
    /// (torch 2.15): x -> gelu(x).
    #[test]
    fn gelu_matches_reference_values() {
        let cases = [
            (-5.0f32, -1.192_092_9e-6f32),
            (-3.0, -0.004_050_225),
            (-1.0, -0.158_655_26),
            (-0.5, -0.154_268_77),
            (0.0, 0.0),
            (0.1, 0.053_982_783),
            (1.0, 0.841_344_7),
            (2.5, 2.484_475_9),
            (6.0, 6.0),
        ];
        let xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let y = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap();
        for ((x, want), got) in cases.iter().zip(y) {
            assert!((got - want).abs() < 2e-6, "gelu({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn gelu_and_softmax_match_candle_reference_ops() {
        let x = (Tensor::randn(0f32, 3f32, (7, 3001), &Device::Cpu).unwrap())
            .contiguous()
            .unwrap();
        let a = gelu_erf(&x).unwrap();
        let b = x.gelu_erf().unwrap();
        let e = max_abs_diff(&a, &b);
        assert!(e < 3e-6, "gelu err {e}");
        // Softmax against a float64 computation of the same rows.
        let got = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        for (row, out) in x.to_vec2::<f32>().unwrap().iter().zip(&got) {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&v, &o) in row.iter().zip(out) {
                let want = (v as f64 - m).exp() / sum;
                assert!(
                    (o as f64 - want).abs() <= 1e-5 * want.max(1e-4),
                    "softmax {o} vs {want}"
                );
            }
        }
    }

    /// Head widths the register-tiled head kernel takes (16..64) at token counts that leave
    /// partial row blocks, partial key panels and a single token, several heads and batch
    /// items, against the composition in float64.
    #[test]
    fn attention_head_kernel_matches_float64_reference() {
        let dev = Device::Cpu;
        for (b, n, heads, hd) in [
            (2, 197, 3, 64),
            (1, 5, 2, 16),
            (2, 17, 2, 32),
            (1, 29, 1, 48),
            (1, 1, 2, 64),
            (3, 12, 1, 64),
            (1, 33, 4, 16),
        ] {
            let qkv = Tensor::randn(0f32, 1f32, (b, n, 3 * heads * hd), &dev).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attention(&qkv, heads, scale).unwrap();
            let want = attention_reference(&qkv.to_dtype(DType::F64).unwrap(), heads, scale)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let e = max_abs_diff(&got, &want);
            assert!(e < 2e-5, "b={b} n={n} heads={heads} hd={hd}: off by {e}");
        }
    }

    /// The fused attention's gradient of `sum(attention(qkv) * w)` for a random `[b, n, 3 heads
    /// hd]` qkv, against central finite differences of the unfused composition in float64
    /// (candle's own autograd through the composition is not a usable reference: it returns
    /// zero gradients for q in this graph), at ~24 entries spread over q, k and v of every batch
    /// item and head, and the last entry.
    fn check_attention_gradient((b, n, heads, hd): (usize, usize, usize, usize), scale: f64) {
        let c3 = 3 * heads * hd;
        let dev = Device::Cpu;
        let qkv = Tensor::randn(0f32, 1f32, (b, n, c3), &dev).unwrap();
        let w = Tensor::randn(0f32, 1f32, (b, n, heads * hd), &dev).unwrap();
        let v = candle_core::Var::from_tensor(&qkv).unwrap();
        let g = (attention(v.as_tensor(), heads, scale).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(v.as_tensor()).unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        let f = |t: Vec<f64>| {
            let t = Tensor::from_vec(t, (b, n, c3), &dev).unwrap();
            (attention_reference(&t, heads, scale).unwrap() * &w64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let base = qkv
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // a stride coprime-ish to the row width walks through rows, heads and q/k/v
        let count = 24;
        let step = (base.len() / count).max(1) | 1;
        for idx in (0..base.len()).step_by(step).chain([base.len() - 1]) {
            let h = 1e-5;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[idx] += h;
            m[idx] -= h;
            let fd = (f(p) - f(m)) / (2.0 * h);
            assert!(
                (fd - g[idx] as f64).abs() < 1e-4 * (1.0 + fd.abs()),
                "{b}x{n}, {heads} heads of {hd}: grad[{idx}] {} vs fd {fd}",
                g[idx]
            );
        }
    }

    /// Forward against the unfused composition; gradient against finite differences (a head
    /// width the register-tiled kernels do not take: the library path).
    #[test]
    fn fused_attention_matches_reference_and_finite_differences() {
        let qkv = Tensor::randn(0f32, 1f32, (2, 7, 3 * 12), &Device::Cpu).unwrap();
        let a = attention(&qkv, 3, 0.2).unwrap();
        let b = attention_reference(&qkv, 3, 0.2).unwrap();
        let e = max_abs_diff(&a, &b);
        assert!(e < 1e-5, "attention err {e}");
        check_attention_gradient((2, 7, 3, 4), 0.2);
    }

    /// The register-tiled backward (head widths 16..64) at token counts that leave partial
    /// row blocks and key panels, and at a ViT's 197 tokens.
    #[test]
    fn tiled_attention_gradient_matches_finite_differences() {
        for (shape, scale) in [
            ((1, 197, 1, 64), 0.125),
            ((2, 17, 2, 16), 0.25),
            ((1, 29, 2, 32), 0.18),
            ((1, 13, 1, 48), 0.14),
            ((1, 1, 1, 64), 0.125),
        ] {
            check_attention_gradient(shape, scale);
        }
    }

    /// A weight stored input-major (a frozen model's layout) keeps its shape and values, and
    /// the linear kernels read it to the same products and gradients as candle's float64
    /// composition: with and without bias, with GELU, the weight's gradient in its own layout.
    #[test]
    fn input_major_weights_give_the_same_products_and_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (3, 5, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3f32, (24, 16), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1f32, 24, &dev).unwrap();
        let up = Tensor::randn(0f32, 1f32, (3, 5, 24), &dev).unwrap();
        let wk = input_major(&w).unwrap();
        assert!(!wk.is_contiguous() && input_major_storage(&wk).is_some());
        assert_eq!(wk.dims(), w.dims());
        assert_eq!(max_abs_diff(&wk, &w), 0.0);
        // already input-major, 1-D or another dtype: unchanged
        assert!(input_major_storage(&input_major(&wk).unwrap()).is_some());
        assert!(input_major(&b).unwrap().is_contiguous());
        // inference (nothing tracked): the fused linear+GELU and the plain product
        let e = max_abs_diff(
            &linear_gelu(&x, &wk, &b).unwrap(),
            &linear_gelu(&x, &w, &b).unwrap(),
        );
        assert!(e < 1e-5, "linear+gelu input-major off by {e}");
        let e = max_abs_diff(
            &linear(&x, &wk, None).unwrap(),
            &x.broadcast_matmul(&w.t().unwrap()).unwrap(),
        );
        assert!(e < 1e-5, "linear input-major off by {e}");
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for (bias, gelu) in [(true, false), (false, false), (true, true)] {
            let case = format!("bias={bias} gelu={gelu}");
            // the weight as a variable stored [in, out], seen [out, in] through a transpose
            let (xv, wtv, bv) = (
                candle_core::Var::from_tensor(&x).unwrap(),
                candle_core::Var::from_tensor(&w.t().unwrap().contiguous().unwrap()).unwrap(),
                candle_core::Var::from_tensor(&b).unwrap(),
            );
            let wv = wtv.as_tensor().t().unwrap();
            assert!(input_major_storage(&wv).is_some());
            let run = |x: &Tensor, w: &Tensor, b: &Tensor, reference: bool| {
                let y = if reference {
                    let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                    let y = if bias { y.broadcast_add(b).unwrap() } else { y };
                    if gelu {
                        y.gelu_erf().unwrap()
                    } else {
                        y
                    }
                } else if gelu {
                    linear_gelu(x, w, b).unwrap()
                } else {
                    linear(x, w, bias.then_some(b)).unwrap()
                };
                let up = up.to_dtype(y.dtype()).unwrap();
                let g = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g)
            };
            let (y, g) = run(xv.as_tensor(), &wv, bv.as_tensor(), false);
            let (x64, wt64, b64) = (
                candle_core::Var::from_tensor(&f64_of(&x)).unwrap(),
                candle_core::Var::from_tensor(&f64_of(&w).t().unwrap().contiguous().unwrap())
                    .unwrap(),
                candle_core::Var::from_tensor(&f64_of(&b)).unwrap(),
            );
            let (y_ref, g_ref) = run(
                x64.as_tensor(),
                &wt64.as_tensor().t().unwrap(),
                b64.as_tensor(),
                true,
            );
            let close = |a: &Tensor, r: &Tensor, what: &str| {
                let e = max_abs_diff(a, &r.to_dtype(DType::F32).unwrap());
                assert!(e < 1e-4, "{case}: {what} off by {e}");
            };
            close(&y, &y_ref, "y");
            close(
                g.get(xv.as_tensor()).unwrap(),
                g_ref.get(x64.as_tensor()).unwrap(),
                "dx",
            );
            let dwt = g.get(wtv.as_tensor()).unwrap();
            assert_eq!(dwt.dims(), [16, 24], "{case}: dw in the weight's layout");
            close(dwt, g_ref.get(wt64.as_tensor()).unwrap(), "dw");
            if bias {
                close(
                    g.get(bv.as_tensor()).unwrap(),
                    g_ref.get(b64.as_tensor()).unwrap(),
                    "db",
                );
            }
        }
    }

    #[test]
    fn fused_linear_gelu_matches_composition_and_gradient() {
        let x = Tensor::randn(0f32, 1f32, (3, 5, 16), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 0.3f32, (24, 16), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.1f32, 24, &Device::Cpu).unwrap();
        let fused = linear_gelu(&x, &w, &b).unwrap();
        let plain = x
            .matmul(&w.t().unwrap().broadcast_left(3).unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .gelu_erf()
            .unwrap();
        let e = max_abs_diff(&fused, &plain);
        assert!(e < 1e-5, "fused linear+gelu err {e}");
        let (xv, wv, bv) = (
            candle_core::Var::from_tensor(&x).unwrap(),
            candle_core::Var::from_tensor(&w).unwrap(),
            candle_core::Var::from_tensor(&b).unwrap(),
        );
        let up = Tensor::randn(0f32, 1f32, (3, 5, 24), &Device::Cpu).unwrap();
        let g1 = (linear_gelu(xv.as_tensor(), wv.as_tensor(), bv.as_tensor()).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference = xv
            .as_tensor()
            .broadcast_matmul(&wv.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(bv.as_tensor())
            .unwrap()
            .gelu_erf()
            .unwrap();
        let g2 = (reference * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&xv, &wv, &bv] {
            let d = (g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap();
            let e = d
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(e < 1e-4, "grad err {e}");
        }
    }

    #[test]
    fn layer_norm_gradients_match_autograd_of_the_composition() {
        let x = Tensor::randn(0f32, 2f32, (3, 70, 24), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.2f32, 24, &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.2f32, 24, &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 1f32, (3, 70, 24), &Device::Cpu).unwrap();
        let vars = [&x, &w, &b].map(|t| candle_core::Var::from_tensor(t).unwrap());
        let (xv, wv, bv) = (
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let y1 = layer_norm(xv, wv, bv, 1e-5).unwrap();
        let y2 = candle_nn::ops::layer_norm_slow(xv, wv, bv, 1e-5).unwrap();
        let e = max_abs_diff(&y1, &y2);
        assert!(e < 1e-5, "forward err {e}");
        let g1 = (y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [xv, wv, bv] {
            let d = (g1.get(v).unwrap() - g2.get(v).unwrap()).unwrap();
            let e = d
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(e < 1e-4, "layer norm grad err {e}");
        }
        // and against central finite differences in float64 for some entries of x and w
        let b64 = b.to_dtype(DType::F64).unwrap();
        let up64 = up.to_dtype(DType::F64).unwrap();
        let f = |xs: &Tensor, ws: &Tensor| {
            (candle_nn::ops::layer_norm_slow(xs, ws, &b64, 1e-5).unwrap() * &up64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (x64, w64) = (
            x.to_dtype(DType::F64).unwrap(),
            w.to_dtype(DType::F64).unwrap(),
        );
        let gx = g1
            .get(xv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gw = g1.get(wv).unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-5;
        let xb = x64.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0usize, 23, 500, 3 * 70 * 24 - 1] {
            let (mut p, mut m) = (xb.clone(), xb.clone());
            p[idx] += h;
            m[idx] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (3, 70, 24), &Device::Cpu).unwrap();
            let fd = (f(&t(p), &w64) - f(&t(m), &w64)) / (2.0 * h);
            assert!(
                (fd - gx[idx] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "dx[{idx}] {} vs {fd}",
                gx[idx]
            );
        }
        let wb = w64.to_vec1::<f64>().unwrap();
        for idx in [0usize, 11, 23] {
            let (mut p, mut m) = (wb.clone(), wb.clone());
            p[idx] += h;
            m[idx] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, 24, &Device::Cpu).unwrap();
            let fd = (f(&x64, &t(p)) - f(&x64, &t(m))) / (2.0 * h);
            assert!(
                (fd - gw[idx] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "dw[{idx}] {} vs {fd}",
                gw[idx]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        use candle_core::Var;
        let x = Var::new(&[-1.7f32, -0.3, 0.0, 0.4, 2.2], &Device::Cpu).unwrap();
        let w = Tensor::new(&[0.3f32, -1.0, 2.0, 0.5, 1.5], &Device::Cpu).unwrap();
        for which in 0..2 {
            let f = |t: &Tensor| -> Tensor {
                let y = if which == 0 {
                    gelu_erf(t).unwrap()
                } else {
                    softmax_last_dim(t).unwrap()
                };
                (y * &w).unwrap().sum_all().unwrap()
            };
            let g = f(x.as_tensor()).backward().unwrap();
            let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let base = x.as_tensor().to_vec1::<f32>().unwrap();
            for i in 0..base.len() {
                let h = 1e-2f32;
                let mut p = base.clone();
                p[i] += h;
                let mut m = base.clone();
                m[i] -= h;
                let fp = f(&Tensor::new(p.as_slice(), &Device::Cpu).unwrap())
                    .to_scalar::<f32>()
                    .unwrap();
                let fm = f(&Tensor::new(m.as_slice(), &Device::Cpu).unwrap())
                    .to_scalar::<f32>()
                    .unwrap();
                let fd = (fp - fm) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 2e-3,
                    "op {which} grad {i}: {} vs fd {fd}",
                    g[i]
                );
            }
        }
    }
}
