//! Resampling kernels with the exact semantics of PyTorch's `F.interpolate`
//! (`align_corners=False`, no antialiasing), used to resample position embeddings and SAM's
//! relative-position tables to a new grid. Inputs are small (a few thousand vectors), so these
//! run on the host in f32 like PyTorch's CPU kernels.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Cubic convolution coefficients for PyTorch's bicubic mode (A = -0.75).
fn cubic_coeffs(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| <= 1
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// The resampling kernel, mirroring the `F.interpolate` call a reference implementation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `mode="bicubic", align_corners=False` (cubic convolution, A = -0.75, edge clamping)
    Bicubic,
    /// `mode="bicubic", align_corners=False, antialias=True` (A = -0.5, support widened when
    /// downsampling, weights renormalised at the borders)
    BicubicAntialias,
}

/// Interpolation taps along one axis: for each output index, (input indices, weights).
type Taps = Vec<(Vec<usize>, Vec<f32>)>;

fn bicubic_taps(input: usize, output: usize) -> Taps {
    let s = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = s * (o as f32 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let base = base as i64;
            let idx = (0..4)
                .map(|k| (base - 1 + k).clamp(0, input as i64 - 1) as usize)
                .collect();
            (idx, cubic_coeffs(t).to_vec())
        })
        .collect()
}

/// Keys' cubic filter with A = -0.5, used by the antialiased path.
fn aa_cubic(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn aa_bicubic_taps(input: usize, output: usize) -> Taps {
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|o| {
            let center = scale * (o as f32 + 0.5);
            // C++ truncation towards zero, as the reference kernel does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(input as i64);
            let mut idx = Vec::new();
            let mut wts = Vec::new();
            for j in xmin..xmax {
                idx.push(j as usize);
                wts.push(aa_cubic((j as f32 - center + 0.5) * invscale));
            }
            let total: f32 = wts.iter().sum();
            if total != 0.0 {
                wts.iter_mut().for_each(|w| *w /= total);
            }
            (idx, wts)
        })
        .collect()
}

fn taps(kernel: Kernel, input: usize, output: usize) -> Taps {
    match kernel {
        Kernel::Bicubic => bicubic_taps(input, output),
        Kernel::BicubicAntialias => aa_bicubic_taps(input, output),
    }
}

/// Separable 2-D resampling of a channels-last grid `[h, w, c]` (row-major) to `[oh, ow, c]`.
pub fn resample_hwc(
    data: &[f32],
    (h, w, c): (usize, usize, usize),
    (oh, ow): (usize, usize),
    kernel: Kernel,
) -> Vec<f32> {
    assert_eq!(data.len(), h * w * c, "resample_hwc: buffer size");
    let ty = taps(kernel, h, oh);
    let tx = taps(kernel, w, ow);
    // Horizontal pass: [h, ow, c].
    let mut tmp = vec![0f32; h * ow * c];
    for y in 0..h {
        for (ox, (ix, wx)) in tx.iter().enumerate() {
            let dst = &mut tmp[(y * ow + ox) * c..(y * ow + ox + 1) * c];
            for (&i, &wt) in ix.iter().zip(wx) {
                let src = &data[(y * w + i) * c..(y * w + i + 1) * c];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += wt * s;
                }
            }
        }
    }
    // Vertical pass: [oh, ow, c].
    let mut out = vec![0f32; oh * ow * c];
    for (oy, (iy, wy)) in ty.iter().enumerate() {
        let dst = &mut out[oy * ow * c..(oy + 1) * ow * c];
        for (&i, &wt) in iy.iter().zip(wy) {
            let src = &tmp[i * ow * c..(i + 1) * ow * c];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += wt * s;
            }
        }
    }
    out
}

/// Linear interpolation taps (`align_corners=False`): for each output index the two input
/// indices and their weights.
fn linear_taps(n: usize, on: usize) -> Vec<(usize, usize, f32, f32)> {
    let s = n as f32 / on as f32;
    (0..on)
        .map(|o| {
            let real = (s * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            let l1 = real - i0 as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Linear (1-D) resampling of `[n, c]` rows to `[on, c]`, as `F.interpolate(mode="linear")`
/// applied along n.
pub fn linear_rows(data: &[f32], (n, c): (usize, usize), on: usize) -> Vec<f32> {
    assert_eq!(data.len(), n * c, "linear_rows: buffer size");
    let mut out = vec![0f32; on * c];
    for (o, (i0, i1, l0, l1)) in linear_taps(n, on).into_iter().enumerate() {
        for j in 0..c {
            out[o * c + j] = l0 * data[i0 * c + j] + l1 * data[i1 * c + j];
        }
    }
    out
}

/// Linear interpolation taps with `align_corners=True`: the first and last samples of input and
/// output coincide (output o reads input position `o * (n - 1) / (on - 1)`).
fn linear_taps_corners(n: usize, on: usize) -> Vec<(usize, usize, f32, f32)> {
    let s = if on > 1 {
        (n - 1) as f32 / (on - 1) as f32
    } else {
        0.0
    };
    (0..on)
        .map(|o| {
            let real = s * o as f32;
            let i0 = (real.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            let l1 = real - i0 as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// The `[on, n]` matrix of linear interpolation from n to on samples (`corners`: PyTorch's
/// `align_corners=True`).
pub fn linear_matrix(n: usize, on: usize, corners: bool, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; on * n];
    let taps = if corners {
        linear_taps_corners(n, on)
    } else {
        linear_taps(n, on)
    };
    for (o, (i0, i1, l0, l1)) in taps.into_iter().enumerate() {
        m[o * n + i0] += l0;
        m[o * n + i1] += l1;
    }
    Ok(Tensor::from_vec(m, (on, n), device)?)
}

/// Bilinear resize of `[B, C, H, W]` maps to `[B, C, oh, ow]` with the weights of
/// `F.interpolate(mode="bilinear", align_corners=False)`, as two small matrix products, so it is
/// differentiable and runs on any device.
pub fn resize_bilinear(x: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
    resize_bilinear_with(x, hw, false)
}

/// [`resize_bilinear`] with `align_corners=True` weights (corner pixels map onto corner pixels).
pub fn resize_bilinear_corners(x: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
    resize_bilinear_with(x, hw, true)
}

fn resize_bilinear_with(x: &Tensor, (oh, ow): (usize, usize), corners: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let ry = linear_matrix(h, oh, corners, dev)?.to_dtype(x.dtype())?; // [oh, h]
    let rx = linear_matrix(w, ow, corners, dev)?.to_dtype(x.dtype())?; // [ow, w]
                                                                       // [B*C*H, W] @ [W, ow] -> [B*C, H, ow]
    let y = x
        .reshape((b * c * h, w))?
        .matmul(&rx.t()?)?
        .reshape((b * c, h, ow))?;
    // [oh, H] @ [B*C, H, ow] (broadcast over B*C)
    let y = ry.broadcast_left(b * c)?.matmul(&y)?;
    Ok(y.reshape((b, c, oh, ow))?)
}

/// Bicubically resample a `[h*w, c]` token grid tensor to `[oh*ow, c]` (any dtype/device; the
/// computation runs in f32 on the host and the result is returned in the input's dtype/device).
pub fn resample_grid_tokens(
    tokens: &Tensor,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    kernel: Kernel,
) -> Result<Tensor> {
    let (n, c) = tokens.dims2()?;
    if n != h * w {
        return Err(crate::Error::Invalid(format!(
            "position grid {h}x{w} does not match {n} tokens"
        )));
    }
    if (h, w) == (oh, ow) {
        return Ok(tokens.clone());
    }
    let data = tokens
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = resample_hwc(&data, (h, w, c), (oh, ow), kernel);
    Ok(Tensor::from_vec(out, (oh * ow, c), &Device::Cpu)?
        .to_dtype(tokens.dtype())?
        .to_device(tokens.device())?)
}

/// Linearly resample a `[n, c]` table to `[on, c]` (SAM relative-position tables).
pub fn resample_rows(table: &Tensor, on: usize) -> Result<Tensor> {
    let (n, c) = table.dims2()?;
    if n == on {
        return Ok(table.clone());
    }
    let data = table
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = linear_rows(&data, (n, c), on);
    Ok(Tensor::from_vec(out, (on, c), &Device::Cpu)?
        .to_dtype(table.dtype())?
        .to_device(table.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-computed reference: torch.nn.functional.interpolate(x, size=..., mode=..., align_corners=False)
    // for small inputs; values derived by hand from the kernel definitions.
    #[test]
    fn linear_matches_hand_computed() {
        // [0, 10] upsampled to 4: src = (o+0.5)/2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamp
        let out = linear_rows(&[0.0, 10.0], (2, 1), 4);
        let expect = [0.0, 2.5, 7.5, 10.0];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    /// torch 2.15: `F.interpolate(torch.arange(6.).view(1,1,2,3), size=(3,4), mode="bilinear",
    /// align_corners=True)`.
    #[test]
    fn bilinear_corners_matches_torch() {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = resize_bilinear_corners(&x, (3, 4))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            0.0f32,
            0.666_666_7,
            1.333_333_4,
            2.0,
            1.5,
            2.166_666_7,
            2.833_333_5,
            3.5,
            3.0,
            3.666_666_7,
            4.333_333_5,
            5.0,
        ];
        assert_eq!(y.len(), want.len());
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }

    /// torch 2.15: `F.interpolate(torch.arange(6.).view(1,1,2,3), size=(3,5), mode="bilinear",
    /// align_corners=False)`.
    #[test]
    fn bilinear_matches_torch() {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = resize_bilinear(&x, (3, 5))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            0.0f32, 0.4, 1.0, 1.6, 2.0, 1.5, 1.9, 2.5, 3.1, 3.5, 3.0, 3.4, 4.0, 4.6, 5.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }

    #[test]
    fn bicubic_identity_and_constant() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let same = resample_hwc(&data, (3, 4, 1), (3, 4), Kernel::Bicubic);
        for (a, b) in same.iter().zip(&data) {
            assert!((a - b).abs() < 1e-5);
        }
        // Cubic weights sum to 1, so a constant field stays constant at any size.
        let ones = vec![2.5f32; 5 * 5 * 2];
        for k in [Kernel::Bicubic, Kernel::BicubicAntialias] {
            let up = resample_hwc(&ones, (5, 5, 2), (7, 3), k);
            assert!(up.iter().all(|v| (v - 2.5).abs() < 1e-5));
            let same = resample_hwc(&data, (3, 4, 1), (3, 4), k);
            assert!(same.iter().zip(&data).all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }

    #[test]
    fn bicubic_1d_hand_computed() {
        // Input row [0, 1, 2, 3] -> 8 samples. Output 1: real = 0.5*1.5-0.5 = 0.25, base 0,
        // t = 0.25, taps (-1->0, 0, 1, 2) with coefficients from A=-0.75.
        let c = cubic_coeffs(0.25);
        let expect1 = c[0] * 0.0 + c[1] * 0.0 + c[2] * 1.0 + c[3] * 2.0;
        // Coefficients by hand: c1(0.25) = (1.25*0.25-2.25)*0.0625+1 = 0.87890625,
        // c1(0.75)=(1.25*0.75-2.25)*0.5625+1=0.26171875, c2(1.25)=-0.10546875, c2(1.75)=-0.03515625
        assert!((c[0] + 0.10546875).abs() < 1e-7);
        assert!((c[1] - 0.878_906_25).abs() < 1e-7);
        assert!((c[2] - 0.261_718_75).abs() < 1e-7);
        assert!((c[3] + 0.035_156_25).abs() < 1e-7);
        let data = [0.0f32, 1.0, 2.0, 3.0];
        let out = resample_hwc(&data, (1, 4, 1), (1, 8), Kernel::Bicubic);
        assert!((out[1] - expect1).abs() < 1e-6, "{out:?}");
    }

    /// Reference values printed by torch 2.15:
    /// `F.interpolate(torch.tensor([0.,1.,2.,3.]).view(1,1,1,4), size=(1,n), mode="bicubic",
    /// align_corners=False[, antialias=True])`.
    #[test]
    fn matches_torch_reference_values() {
        let data = [0.0f32, 1.0, 2.0, 3.0];
        let cases: [(Kernel, usize, &[f32]); 3] = [
            (Kernel::BicubicAntialias, 2, &[0.5868, 2.4132]),
            (
                Kernel::BicubicAntialias,
                8,
                &[
                    -0.0882, 0.1679, 0.7099, 1.2500, 1.7500, 2.2901, 2.8321, 3.0882,
                ],
            ),
            (
                Kernel::Bicubic,
                8,
                &[
                    -0.1055, 0.1914, 0.6680, 1.2969, 1.7031, 2.3320, 2.8086, 3.1055,
                ],
            ),
        ];
        for (k, n, expect) in cases {
            let out = resample_hwc(&data, (1, 4, 1), (1, n), k);
            for (a, b) in out.iter().zip(expect) {
                assert!((a - b).abs() < 1e-4, "{k:?} {n}: {out:?}");
            }
        }
    }
}
