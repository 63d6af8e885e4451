//! Dense 2-D convolution (`groups == 1`) on the CPU in f32 as im2col + matrix product, forward
//! and backward: `y_b = W @ col(x_b)`, `dcol_b = W^T @ dy_b` folded back into `dx_b` (col2im),
//! `dW = sum_b dy_b @ col(x_b)^T`. candle's CPU convolution runs the input gradient as a
//! direct transposed convolution (per-element dot products) and is several times slower than a
//! matrix product; here every product is one multi-threaded GEMM over a whole image. 1x1
//! convolutions with stride 1 use the input itself as the column matrix.

use super::depthwise::Geom;
use super::op::{apply, apply_no_bwd, operands, In, Kernel};
use super::{gemm_into, gemm_raw, written_by};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

/// Rows `c * kh * kw .. (c + 1) * kh * kw` of the column matrix of one image `x` (`[C, H, W]`):
/// `col[(c, ky, kx)][(oy, ox)] = x[c, oy * s + ky - p, ox * s + kx - p]` (0 outside). Every
/// entry is written, so `col` may hold anything before.
fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    let taps = g.kh * g.kw;
    let n = g.out_plane();
    col.par_chunks_mut(taps * n)
        .enumerate()
        .for_each(|(c, rows)| {
            let plane = &x[c * g.in_plane()..(c + 1) * g.in_plane()];
            for (t, tap) in rows.chunks_exact_mut(n).enumerate() {
                let (ky, kx) = (t / g.kw, t % g.kw);
                let (lo, hi) = g.out_cols(kx);
                for (oy, dst) in tap.chunks_exact_mut(g.ow).enumerate() {
                    let Some(iy) = g.in_row(oy, ky).filter(|_| lo < hi) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let ix = lo * g.stride + kx - g.pad;
                    let dst = &mut dst[lo..hi];
                    if g.stride == 1 {
                        dst.copy_from_slice(&src[ix..ix + (hi - lo)]);
                    } else {
                        for (j, d) in dst.iter_mut().enumerate() {
                            *d = src[ix + j * g.stride];
                        }
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input position it read.
fn col2im(g: &Geom, col: &[f32], dx: &mut [f32]) {
    let taps = g.kh * g.kw;
    let n = g.out_plane();
    dx.par_chunks_mut(g.in_plane())
        .enumerate()
        .for_each(|(c, plane)| {
            let rows = &col[c * taps * n..(c + 1) * taps * n];
            g.for_each_tap(|oy, iy, t, (lo, hi), ix| {
                let src = &rows[t * n + oy * g.ow + lo..t * n + oy * g.ow + hi];
                let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                if g.stride == 1 {
                    for (d, v) in dst[ix..].iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (j, v) in src.iter().enumerate() {
                        dst[ix + j * g.stride] += v;
                    }
                }
            });
        });
}

/// Whether the column matrix is the input itself (1x1, stride 1, no padding).
fn direct(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

thread_local! {
    /// The column buffer [`with_column_buffer`] lends: kept between calls, so a network's
    /// convolutions fill one buffer of the largest size instead of allocating and zeroing one
    /// per call.
    static COLUMNS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f` on one image's column matrix of `g` (`c * kh * kw` rows, one column per output
/// position), lent from this thread's buffer: its values are whatever an earlier call left, so
/// `f` must write every entry before reading it.
fn with_column_buffer<R>(g: &Geom, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut col = COLUMNS.take();
    let len = g.c * g.kh * g.kw * g.out_plane();
    if col.len() < len {
        col.resize(len, 0.0);
    }
    let r = f(&mut col[..len]);
    COLUMNS.set(col);
    r
}

/// `f(b, columns)` for every image `b` of `x` in order, `columns` its column matrix: the
/// image itself, or [`im2col`] into the thread's column buffer.
fn for_each_columns(g: &Geom, x: &[f32], mut f: impl FnMut(usize, &[f32])) {
    let per = g.c * g.in_plane();
    if direct(g) {
        for b in 0..g.b {
            f(b, &x[b * per..(b + 1) * per]);
        }
        return;
    }
    with_column_buffer(g, |col| {
        for b in 0..g.b {
            im2col(g, &x[b * per..(b + 1) * per], col);
            f(b, col);
        }
    });
}

struct Conv {
    stride: usize,
    pad: usize,
}

impl Kernel for Conv {
    fn name(&self) -> &'static str {
        "distillery-conv2d"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [x, w] = operands(self.name(), xs)?;
        let g = Geom::of(x.dims(), w.dims(), self.stride, self.pad)?;
        let o = w.dims()[0];
        let k = g.c * g.kh * g.kw;
        if w.dims()[1] != g.c {
            candle_core::bail!(
                "conv: kernel {:?} does not fit {} input channels",
                w.dims(),
                g.c
            )
        }
        let (x, w) = (x.data, w.data);
        let n = g.out_plane();
        // SAFETY: each image's product overwrites its `o * n` outputs (no accumulation), and
        // the images cover all `b * o * n`.
        let y = unsafe {
            written_by(g.b * o * n, |y| {
                for_each_columns(&g, x, |b, cols| {
                    gemm_raw(y.add(b * o * n), w, cols, (o, k, n), false, false, false)
                })
            })
        };
        Ok((y, Shape::from((g.b, o, g.oh, g.ow))))
    }

    fn backward(
        &self,
        xs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [x, w] = operands(self.name(), xs)?;
        let dy = dy.contiguous()?;
        let g = Geom::of(x.dims(), w.dims(), self.stride, self.pad)?;
        let dx = apply_no_bwd(InputGrad(g), &[&dy, w])?;
        let dw = apply_no_bwd(KernelGrad { g, o: w.dim(0)? }, &[x, &dy])?;
        Ok(vec![Some(dx), Some(dw)])
    }
}

/// `(dy, w) -> dx`: per image `col2im(W^T @ dy_b)`.
struct InputGrad(Geom);

impl Kernel for InputGrad {
    fn name(&self) -> &'static str {
        "distillery-conv2d-dx"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = self.0;
        let [dy, w] = operands(self.name(), xs)?;
        let o = w.dims()[0];
        let (dy, w) = (dy.data, w.data);
        let k = g.c * g.kh * g.kw;
        let n = g.out_plane();
        let per = g.c * g.in_plane();
        let mut dx = vec![0f32; g.b * per];
        let dy_of = |b: usize| &dy[b * o * n..(b + 1) * o * n];
        if direct(&g) {
            for (b, dxb) in dx.chunks_exact_mut(per).enumerate() {
                gemm_into(dxb, w, dy_of(b), (k, o, n), true, false, false);
            }
        } else {
            // the product overwrites the whole column matrix of each image
            with_column_buffer(&g, |dcol| {
                for (b, dxb) in dx.chunks_exact_mut(per).enumerate() {
                    gemm_into(dcol, w, dy_of(b), (k, o, n), true, false, false);
                    col2im(&g, dcol, dxb);
                }
            });
        }
        Ok((dx, Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// `(x, dy) -> dW = sum_b dy_b @ col(x_b)^T`.
struct KernelGrad {
    g: Geom,
    o: usize,
}

impl Kernel for KernelGrad {
    fn name(&self) -> &'static str {
        "distillery-conv2d-dw"
    }

    fn forward(&self, xs: &[In]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (g, o) = (self.g, self.o);
        let [x, dy] = operands(self.name(), xs)?.map(|t| t.data);
        let k = g.c * g.kh * g.kw;
        let n = g.out_plane();
        let mut dw = vec![0f32; o * k];
        for_each_columns(&g, x, |b, cols| {
            let dyb = &dy[b * o * n..(b + 1) * o * n];
            gemm_into(&mut dw, dyb, cols, (o, n, k), false, true, b > 0);
        });
        Ok((dw, Shape::from((o, g.c, g.kh, g.kw))))
    }
}

/// `F.conv2d(x, w, padding=pad, stride=stride)` (one group, no bias, no dilation) for CPU f32
/// tensors, differentiable in both arguments.
pub fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    apply(Conv { stride, pad }, &[x, w])
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_abs_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// Against candle's convolution (an independent implementation; its input is padded
    /// explicitly so its own backward sees evenly dividing shapes): output and both gradients
    /// over kernel sizes, strides, paddings and odd, non-square inputs.
    #[test]
    fn matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        for (c, o, h, w, k, pad, s) in [
            (3, 5, 9, 7, 3, 1, 1),
            (3, 4, 9, 7, 3, 1, 2),
            (4, 6, 11, 8, 7, 3, 2),
            (5, 3, 6, 9, 1, 0, 1),
            (5, 3, 7, 9, 1, 0, 2),
            (2, 3, 5, 5, 5, 2, 3),
        ] {
            let x = Var::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let kv = Var::randn(0f32, 1.0, (o, c, k, k), &dev).unwrap();
            let want = |x: &Tensor, kt: &Tensor| {
                let p = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
                let (hp, wp) = (h + 2 * pad, w + 2 * pad);
                let p = p.narrow(2, 0, hp - (hp - k) % s)?;
                let p = p.narrow(3, 0, wp - (wp - k) % s)?;
                p.conv2d(kt, 0, s, 1, 1)
            };
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
                let y = f(x.as_tensor(), kv.as_tensor()).unwrap();
                let r = Tensor::ones(y.shape(), candle_core::DType::F32, &dev)
                    .unwrap()
                    .broadcast_mul(&Tensor::arange(0f32, y.dim(3).unwrap() as f32, &dev).unwrap())
                    .unwrap();
                let gr = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = gr.get(x.as_tensor()).unwrap().clone();
                let gk = gr.get(kv.as_tensor()).unwrap().clone();
                (y, gx, gk)
            };
            let (y0, gx0, gk0) = run(&want);
            let (y1, gx1, gk1) = run(&|x, kt| conv2d_im2col(x, kt, pad, s));
            let case = format!("c{c} o{o} {h}x{w} k{k} p{pad} s{s}");
            assert_eq!(y1.dims(), y0.dims(), "{case}");
            assert!(max_abs_diff(&y1, &y0) < 1e-4, "{case} forward");
            assert!(max_abs_diff(&gx1, &gx0) < 1e-3, "{case} dx");
            assert!(max_abs_diff(&gk1, &gk0) < 1e-3, "{case} dw");
        }
    }
}
