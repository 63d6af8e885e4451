//! One attention head's forward, `o_i = softmax(scale q_i K^T) V`, reading q, k and v where
//! they lie in the packed qkv buffer: as AVX-512 register-tiled products where the machine and
//! the head width allow, else as two library products and a row softmax.
//!
//! The library path runs two products per head (197x197x64 and 197x64x197 for a ViT at 224 px),
//! which spend a large share of their time packing operands and dispatching: 150 GFLOP/s on the
//! 2-core Xeon against ~300 for the linear layers, and the three-pass softmax was a quarter of
//! it. The tiled path transposes K once per head into 16-key panels; a block of query rows then
//! gets its score rows from 12x32 register tiles (each k panel value loaded once per 12 rows,
//! each q value broadcast once per 32 keys), the rows' exponentials while they are in L1, and
//! their outputs from 6x`hd` register tiles over the value rows read in place, scaled by the
//! rows' 1 / sum at the store.

use super::{sgemm, softmax_row_inplace};

/// Query rows per block: score tiles are `ROWS` x 32 (24 accumulators).
const ROWS: usize = 12;
/// Output rows per register tile (`OUT_ROWS` x `hd` with `hd` <= 64: at most 24 accumulators).
const OUT_ROWS: usize = 6;
/// Keys per panel (one AVX-512 vector of f32).
const LANES: usize = 16;

/// Where one head's operands lie: row `i` of q, k and v at `q + i * stride` (and `k`, `v`
/// likewise), `hd` values each.
#[derive(Clone, Copy)]
pub(super) struct Head {
    pub(super) q: usize,
    pub(super) k: usize,
    pub(super) v: usize,
    pub(super) stride: usize,
    pub(super) n: usize,
    pub(super) hd: usize,
    pub(super) scale: f32,
}

/// Whether the register-tiled path runs here for head width `hd` (AVX-512, `hd` a multiple of
/// 16 up to 64).
fn tiled(hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        hd > 0
            && hd.is_multiple_of(LANES)
            && hd <= 4 * LANES
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = hd;
        false
    }
}

/// Per-task scratch: K transposed into panels and a block of score rows (tiled path), or the
/// head's whole score matrix (library path).
#[derive(Default)]
pub(super) struct Scratch {
    kt: Vec<f32>,
    s: Vec<f32>,
}

/// One head's attention output, written to rows `i < n` at `out + i * out_stride`. Returns
/// false (writing nothing) where q, k or v do not fit `qkv`.
///
/// # Safety
/// `out` must be valid for writes of `hd` values at `out + i * out_stride` for every row
/// `i < n`, not overlap `qkv`, and no other thread may access those values meanwhile.
pub(super) unsafe fn head_forward(
    qkv: &[f32],
    h: Head,
    out: *mut f32,
    out_stride: usize,
    scratch: &mut Scratch,
) -> bool {
    if h.n == 0 {
        return true;
    }
    let last = |base: usize| base + (h.n - 1) * h.stride + h.hd;
    if [h.q, h.k, h.v].iter().any(|&b| last(b) > qkv.len()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if tiled(h.hd) {
        // SAFETY: AVX-512F was detected by `tiled`; every read is inside `qkv` (checked
        // above); the caller vouches for the output rows.
        unsafe { avx512::head(qkv, h, out, out_stride, scratch) };
        return true;
    }
    let (n, hd, stride) = (h.n, h.hd, h.stride as isize);
    let scores = &mut scratch.s;
    scores.clear();
    scores.resize(n * n, 0.0);
    // SAFETY: q, k and v rows lie inside `qkv` (checked above); `scores` holds n x n values;
    // the caller vouches for the output rows.
    unsafe {
        // scores[i, j] = scale * sum_d q[i, d] k[j, d]
        let (q, k) = (qkv.as_ptr().add(h.q), qkv.as_ptr().add(h.k));
        sgemm(
            (n, n, hd),
            (scores.as_mut_ptr(), 1, n as isize),
            (q, 1, stride),
            (k, stride, 1),
            h.scale,
        );
    }
    for row in scores.chunks_exact_mut(n) {
        softmax_row_inplace(row);
    }
    // SAFETY: as above.
    unsafe {
        sgemm(
            (n, hd, n),
            (out, 1, out_stride as isize),
            (scores.as_ptr(), 1, n as isize),
            (qkv.as_ptr().add(h.v), 1, stride),
            1.0,
        );
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Head, Scratch, LANES, OUT_ROWS, ROWS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn head(
        qkv: &[f32],
        h: Head,
        out: *mut f32,
        out_stride: usize,
        sc: &mut Scratch,
    ) {
        let (n, hd) = (h.n, h.hd);
        let panels = n.div_ceil(LANES);
        let np = panels * LANES;
        // kt: panel p holds keys 16p..16p+16 as hd rows of 16 (zero past the last key)
        sc.kt.clear();
        sc.kt.resize(panels * hd * LANES, 0.0);
        for j in 0..n {
            let (p, jj) = (j / LANES, j % LANES);
            let row = &qkv[h.k + j * h.stride..][..hd];
            let panel = &mut sc.kt[p * hd * LANES..][..hd * LANES];
            for (d, &x) in row.iter().enumerate() {
                panel[d * LANES + jj] = x;
            }
        }
        sc.s.clear();
        sc.s.resize(ROWS * np, 0.0);
        let kt = sc.kt.as_ptr();
        let s = sc.s.as_mut_ptr();
        let base = qkv.as_ptr();
        for i0 in (0..n).step_by(ROWS) {
            // rows past the last one repeat it (their results are not stored)
            let rows: [*const f32; ROWS] =
                std::array::from_fn(|r| base.add(h.q + (i0 + r).min(n - 1) * h.stride));
            let mut p = 0;
            while p + 2 <= panels {
                scores::<2>(
                    &rows,
                    kt.add(p * hd * LANES),
                    hd,
                    h.scale,
                    s.add(p * LANES),
                    np,
                );
                p += 2;
            }
            if p < panels {
                scores::<1>(
                    &rows,
                    kt.add(p * hd * LANES),
                    hd,
                    h.scale,
                    s.add(p * LANES),
                    np,
                );
            }
            let valid = (n - i0).min(ROWS);
            // unnormalised probabilities in place; each row's 1 / sum scales its outputs
            let mut inv = [0f32; ROWS];
            for (r, inv) in inv.iter_mut().enumerate().take(valid) {
                *inv = exp_row(s.add(r * np), n);
            }
            let s = sc.s.as_ptr();
            let v = base.add(h.v);
            for r0 in (0..valid).step_by(OUT_ROWS) {
                let rows = (valid - r0).min(OUT_ROWS);
                let o = out.add((i0 + r0) * out_stride);
                let p = s.add(r0 * np);
                let inv = &inv[r0..r0 + rows];
                match hd / LANES {
                    1 => outputs::<1>(p, np, v, h.stride, n, o, out_stride, inv),
                    2 => outputs::<2>(p, np, v, h.stride, n, o, out_stride, inv),
                    3 => outputs::<3>(p, np, v, h.stride, n, o, out_stride, inv),
                    _ => outputs::<4>(p, np, v, h.stride, n, o, out_stride, inv),
                }
            }
        }
    }

    /// `s[r, 16c..16c+16] = scale * sum_d q_r[d] kt[c][d]` for `ROWS` query rows and `NP` key
    /// panels (row `r` of `s` at `s + r * s_stride`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scores<const NP: usize>(
        rows: &[*const f32; ROWS],
        kt: *const f32,
        hd: usize,
        scale: f32,
        s: *mut f32,
        s_stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NP]; ROWS];
        for d in 0..hd {
            let mut b = [_mm512_setzero_ps(); NP];
            for (c, bc) in b.iter_mut().enumerate() {
                *bc = _mm512_loadu_ps(kt.add(c * hd * LANES + d * LANES));
            }
            for r in 0..ROWS {
                let a = _mm512_set1_ps(*rows[r].add(d));
                for c in 0..NP {
                    acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for (r, row) in acc.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                _mm512_storeu_ps(s.add(r * s_stride + c * LANES), _mm512_mul_ps(x, sv));
            }
        }
    }

    /// `exp(x)` per lane for `x <= 0`, the polynomial and range reduction of
    /// `kernels::exp_approx` (max rel. error ~2e-7), 2^n applied by `vscalefps`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_ps(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_66,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(e, n)
    }

    /// `row[j] = exp(row[j] - max)` for `j < n` in place; returns `1 / sum`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_row(row: *mut f32, n: usize) -> f32 {
        let full = n / LANES * LANES;
        let tail: __mmask16 = (1u32 << (n - full)).wrapping_sub(1) as __mmask16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(LANES) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(row.add(j)));
        }
        if tail != 0 {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail, row.add(full)));
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        for j in (0..full).step_by(LANES) {
            let e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row.add(j)), mx));
            _mm512_storeu_ps(row.add(j), e);
            sum = _mm512_add_ps(sum, e);
        }
        if tail != 0 {
            let x = _mm512_maskz_loadu_ps(tail, row.add(full));
            let e = _mm512_maskz_mov_ps(tail, exp_ps(_mm512_sub_ps(x, mx)));
            _mm512_mask_storeu_ps(row.add(full), tail, e);
            sum = _mm512_add_ps(sum, e);
        }
        1.0 / _mm512_reduce_add_ps(sum)
    }

    /// `o_r = inv[r] sum_j p[r, j] v_j` for `inv.len()` (<= `OUT_ROWS`) rows of weights over
    /// `n` value rows of `16 NV` values each.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn outputs<const NV: usize>(
        p: *const f32,
        p_stride: usize,
        v: *const f32,
        v_stride: usize,
        n: usize,
        o: *mut f32,
        o_stride: usize,
        inv: &[f32],
    ) {
        let rows = inv.len();
        let mut acc = [[_mm512_setzero_ps(); NV]; OUT_ROWS];
        // rows past `rows` repeat the last one (not stored)
        let prow: [*const f32; OUT_ROWS] =
            std::array::from_fn(|r| p.add(r.min(rows - 1) * p_stride));
        for j in 0..n {
            let vj = v.add(j * v_stride);
            let mut b = [_mm512_setzero_ps(); NV];
            for (c, bc) in b.iter_mut().enumerate() {
                *bc = _mm512_loadu_ps(vj.add(c * LANES));
            }
            for r in 0..OUT_ROWS {
                let a = _mm512_set1_ps(*prow[r].add(j));
                for c in 0..NV {
                    acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
                }
            }
        }
        for ((r, row), &inv) in acc.iter().enumerate().zip(inv) {
            let inv = _mm512_set1_ps(inv);
            for (c, &x) in row.iter().enumerate() {
                _mm512_storeu_ps(o.add(r * o_stride + c * LANES), _mm512_mul_ps(x, inv));
            }
        }
    }
}
