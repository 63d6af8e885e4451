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
//!
//! The backward recomputes the head's probabilities P the same way and gets dP = dO V^T from
//! the same score tiles (V packed like K); dS = P (dP - rowsum(P dP)) row by row; then dQ, dK
//! and dV from the output tiles, dK and dV reading dS and P down their columns (the
//! transposes are never formed).

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

impl Head {
    /// Whether rows `0..n` of q, k and v lie inside a buffer of `len` values.
    fn fits(&self, len: usize) -> bool {
        let last = |base: usize| base + (self.n - 1) * self.stride + self.hd;
        [self.q, self.k, self.v].iter().all(|&b| last(b) <= len)
    }
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

/// Per-task scratch: K (and V) transposed into panels and score rows (tiled path), or the
/// head's whole score matrices (library path).
#[derive(Default)]
pub(super) struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    s: Vec<f32>,
    ds: Vec<f32>,
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
    if !h.fits(qkv.len()) {
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
    // SAFETY: q and k rows lie inside `qkv` (checked above).
    unsafe { probabilities(qkv, h, scores) };
    // SAFETY: v rows lie inside `qkv`; `scores` holds n x n values; the caller vouches for the
    // output rows.
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

/// One head's gradients from the gradient `dout` of its output (row `i` at
/// `go + i * go_stride`): dq, dk and dv written where q, k and v lie in `qkv`, into `dqkv`
/// (same layout). Returns false (writing nothing) where the operands do not fit.
///
/// # Safety
/// `dqkv` must be valid for writes of the head's q, k and v rows at the offsets they have in
/// `qkv`, and no other thread may access those values meanwhile.
pub(super) unsafe fn head_backward(
    qkv: &[f32],
    h: Head,
    dout: &[f32],
    (go, go_stride): (usize, usize),
    dqkv: *mut f32,
    scratch: &mut Scratch,
) -> bool {
    if h.n == 0 {
        return true;
    }
    if !h.fits(qkv.len()) || go + (h.n - 1) * go_stride + h.hd > dout.len() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if tiled(h.hd) {
        // SAFETY: AVX-512F was detected by `tiled`; reads lie inside `qkv` and `dout` (checked
        // above); the caller vouches for the gradient rows.
        unsafe { avx512::head_grads(qkv, h, dout, (go, go_stride), dqkv, scratch) };
        return true;
    }
    let (n, hd, stride) = (h.n, h.hd, h.stride as isize);
    let (ni, gs) = (n as isize, go_stride as isize);
    let (p, dp) = (&mut scratch.s, &mut scratch.ds);
    // SAFETY: q and k rows lie inside `qkv` (checked above).
    unsafe { probabilities(qkv, h, p) };
    dp.clear();
    dp.resize(n * n, 0.0);
    let base = qkv.as_ptr();
    let (q, k, v) = (base.add(h.q), base.add(h.k), base.add(h.v));
    let g = dout.as_ptr().add(go);
    let (dq, dk, dv) = (dqkv.add(h.q), dqkv.add(h.k), dqkv.add(h.v));
    let dpm = dp.as_mut_ptr();
    // SAFETY: operands checked above; p and dp hold n x n values; the caller vouches for the
    // gradient rows.
    unsafe {
        // dV = P^T dO
        sgemm(
            (n, hd, n),
            (dv, 1, stride),
            (p.as_ptr(), ni, 1),
            (g, 1, gs),
            1.0,
        );
        // dP = dO V^T
        sgemm((n, n, hd), (dpm, 1, ni), (g, 1, gs), (v, stride, 1), 1.0);
    }
    // dS = P * (dP - rowsum(dP * P)), in place in dp
    for (pr, dr) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)) {
        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
        for (d, &pv) in dr.iter_mut().zip(pr) {
            *d = pv * (*d - dot);
        }
    }
    // SAFETY: as above.
    unsafe {
        // dQ = scale dS K ; dK = scale dS^T Q
        let dsp = dp.as_ptr();
        sgemm(
            (n, hd, n),
            (dq, 1, stride),
            (dsp, 1, ni),
            (k, 1, stride),
            h.scale,
        );
        sgemm(
            (n, hd, n),
            (dk, 1, stride),
            (dsp, ni, 1),
            (q, 1, stride),
            h.scale,
        );
    }
    true
}

/// `p` = softmax(scale q k^T), `n` x `n`, by a library product and a row softmax (the path
/// for widths and CPUs the register tiles do not take).
///
/// # Safety
/// Rows `0..n` of q and k must lie inside `qkv` ([`Head::fits`]).
unsafe fn probabilities(qkv: &[f32], h: Head, p: &mut Vec<f32>) {
    let (n, stride) = (h.n, h.stride as isize);
    p.clear();
    p.resize(n * n, 0.0);
    // SAFETY: q and k rows lie inside `qkv` (the caller's promise); `p` holds n x n values.
    unsafe {
        let (q, k) = (qkv.as_ptr().add(h.q), qkv.as_ptr().add(h.k));
        sgemm(
            (n, n, h.hd),
            (p.as_mut_ptr(), 1, n as isize),
            (q, 1, stride),
            (k, stride, 1),
            h.scale,
        );
    }
    for row in p.chunks_exact_mut(n) {
        softmax_row_inplace(row);
    }
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
        let np = n.div_ceil(LANES) * LANES;
        pack_panels(&mut sc.kt, &qkv[h.k..], h.stride, n, hd);
        sc.s.clear();
        sc.s.resize(ROWS * np, 0.0);
        let kt = sc.kt.as_ptr();
        let s = sc.s.as_mut_ptr();
        let base = qkv.as_ptr();
        for i0 in (0..n).step_by(ROWS) {
            score_rows(base.add(h.q), h.stride, i0, n, kt, hd, h.scale, s);
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
                outputs_any(false, hd, (p, np), (v, h.stride), n, (o, out_stride), inv);
            }
        }
    }

    /// `dst`: rows `j < n` of `src` (row `j` at `src[j * stride..]`, `hd` values) transposed
    /// into panels of 16 rows: panel `p` holds rows 16p..16p+16 as `hd` groups of 16 (zero past
    /// the last row). Each group of 16 is one gather of a value from 16 rows.
    #[target_feature(enable = "avx512f")]
    fn pack_panels(dst: &mut Vec<f32>, src: &[f32], stride: usize, n: usize, hd: usize) {
        let panels = n.div_ceil(LANES);
        dst.clear();
        dst.resize(panels * hd * LANES, 0.0);
        // gather offsets are 32-bit: row 15 of a panel must be within reach
        if i32::try_from(stride * (LANES - 1)).is_ok() {
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride as i32));
            for (p, panel) in dst.chunks_exact_mut(hd * LANES).enumerate() {
                let rows = (n - p * LANES).min(LANES);
                let mask: __mmask16 = ((1u32 << rows) - 1) as __mmask16;
                // rows p*16 .. p*16 + rows exist: the last one ends inside `src`
                assert!((p * LANES + rows - 1) * stride + hd <= src.len());
                let base = src[p * LANES * stride..].as_ptr();
                for (d, out) in panel.chunks_exact_mut(LANES).enumerate() {
                    // SAFETY: lane r < rows reads src[(p*16 + r) * stride + d], inside `src`
                    // (asserted above); masked lanes read nothing; `out` holds 16 values.
                    unsafe {
                        let v = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            mask,
                            idx,
                            base.add(d),
                        );
                        _mm512_storeu_ps(out.as_mut_ptr(), v);
                    }
                }
            }
            return;
        }
        for j in 0..n {
            let (p, jj) = (j / LANES, j % LANES);
            let row = &src[j * stride..][..hd];
            let panel = &mut dst[p * hd * LANES..][..hd * LANES];
            for (d, &x) in row.iter().enumerate() {
                panel[d * LANES + jj] = x;
            }
        }
    }

    /// Score rows `i0..i0 + ROWS` (rows past `n` repeat the last; their results are written
    /// but not meant to be read): `s[r, j] = scale a_{i0+r} . kt_j` over all key panels of
    /// `kt` (packed by [`pack_panels`] from `n` rows), row `r` at `s + r * np`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_rows(
        a: *const f32,
        a_stride: usize,
        i0: usize,
        n: usize,
        kt: *const f32,
        hd: usize,
        scale: f32,
        s: *mut f32,
    ) {
        let panels = n.div_ceil(LANES);
        let np = panels * LANES;
        let rows: [*const f32; ROWS] =
            std::array::from_fn(|r| a.add((i0 + r).min(n - 1) * a_stride));
        // key panels two at a time (12x32 tiles), an odd last one alone
        for p in (0..panels).step_by(2) {
            let (k, out) = (kt.add(p * hd * LANES), s.add(p * LANES));
            if p + 2 <= panels {
                scores::<2>(&rows, k, hd, scale, out, np);
            } else {
                scores::<1>(&rows, k, hd, scale, out, np);
            }
        }
    }

    /// [`outputs`] for head width `hd` (16, 32, 48 or 64), reading the weights transposed when
    /// `t`.
    #[target_feature(enable = "avx512f")]
    unsafe fn outputs_any(
        t: bool,
        hd: usize,
        p: (*const f32, usize),
        v: (*const f32, usize),
        n: usize,
        o: (*mut f32, usize),
        inv: &[f32],
    ) {
        let f = if t {
            by_width::<true>(hd)
        } else {
            by_width::<false>(hd)
        };
        f(p.0, p.1, v.0, v.1, n, o.0, o.1, inv)
    }

    type Outputs = unsafe fn(*const f32, usize, *const f32, usize, usize, *mut f32, usize, &[f32]);

    /// [`outputs`] instantiated for head width `hd`.
    fn by_width<const T: bool>(hd: usize) -> Outputs {
        match hd / LANES {
            1 => outputs::<1, T>,
            2 => outputs::<2, T>,
            3 => outputs::<3, T>,
            _ => outputs::<4, T>,
        }
    }

    /// Gradients of one head (see [`super::head_backward`]).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn head_grads(
        qkv: &[f32],
        h: Head,
        dout: &[f32],
        (go, go_stride): (usize, usize),
        dqkv: *mut f32,
        sc: &mut Scratch,
    ) {
        let (n, hd) = (h.n, h.hd);
        let np = n.div_ceil(LANES) * LANES;
        // score rows for whole row blocks: the last block's extra rows land in the padding
        let padded = n.div_ceil(ROWS) * ROWS * np;
        pack_panels(&mut sc.kt, &qkv[h.k..], h.stride, n, hd);
        pack_panels(&mut sc.vt, &qkv[h.v..], h.stride, n, hd);
        for m in [&mut sc.s, &mut sc.ds] {
            m.clear();
            m.resize(padded, 0.0);
        }
        let base = qkv.as_ptr();
        let g = dout.as_ptr().add(go);
        let (p, ds) = (sc.s.as_mut_ptr(), sc.ds.as_mut_ptr());
        for i0 in (0..n).step_by(ROWS) {
            // P rows (normalised) and dP = dO V^T rows, then dS = P (dP - rowsum(P dP))
            score_rows(
                base.add(h.q),
                h.stride,
                i0,
                n,
                sc.kt.as_ptr(),
                hd,
                h.scale,
                p.add(i0 * np),
            );
            score_rows(
                g,
                go_stride,
                i0,
                n,
                sc.vt.as_ptr(),
                hd,
                1.0,
                ds.add(i0 * np),
            );
            for i in i0..(i0 + ROWS).min(n) {
                let (pr, dr) = (p.add(i * np), ds.add(i * np));
                let inv = exp_row(pr, n);
                softmax_grad_row(pr, dr, inv, n);
            }
        }
        let (p, ds) = (sc.s.as_ptr(), sc.ds.as_ptr());
        let (q, k) = (base.add(h.q), base.add(h.k));
        let scale = [h.scale; OUT_ROWS];
        let ones = [1.0f32; OUT_ROWS];
        let st = h.stride;
        for r0 in (0..n).step_by(OUT_ROWS) {
            let rows = (n - r0).min(OUT_ROWS);
            let at = |m: *mut f32| (m.add(r0 * st), st);
            // dQ = scale dS K (rows of dS); dK = scale dS^T Q, dV = P^T dO (columns)
            let products = [
                (false, ds.add(r0 * np), (k, st), h.q, &scale),
                (true, ds.add(r0), (q, st), h.k, &scale),
                (true, p.add(r0), (g, go_stride), h.v, &ones),
            ];
            for (t, w, rows_of, grad, s) in products {
                outputs_any(t, hd, (w, np), rows_of, n, at(dqkv.add(grad)), &s[..rows]);
            }
        }
    }

    /// The mask of the first `left` lanes (all 16 when `left` >= 16).
    fn lanes_up_to(left: usize) -> __mmask16 {
        if left >= LANES {
            !0
        } else {
            (1u16 << left) - 1
        }
    }

    /// For a row of unnormalised probabilities `p` (`p * inv` sums to 1) and the gradient `dp`
    /// of the normalised ones: `p <- p * inv` and `dp <- p (dp - sum_j p_j dp_j)`, `n` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_grad_row(p: *mut f32, dp: *mut f32, inv: f32, n: usize) {
        let iv = _mm512_set1_ps(inv);
        let mut dot = _mm512_setzero_ps();
        for j in (0..n).step_by(LANES) {
            let m = lanes_up_to(n - j);
            let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(j)), iv);
            _mm512_mask_storeu_ps(p.add(j), m, x);
            dot = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, dp.add(j)), dot);
        }
        let dot = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
        for j in (0..n).step_by(LANES) {
            let m = lanes_up_to(n - j);
            let x = _mm512_maskz_loadu_ps(m, p.add(j));
            let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp.add(j)), dot);
            _mm512_mask_storeu_ps(dp.add(j), m, _mm512_mul_ps(x, d));
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
    /// `n` value rows of `16 NV` values each; `p[r, j]` at `p + r * p_stride + j`, or, when
    /// `T`, at `p + r + j * p_stride` (the weights read down columns: a transposed product).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn outputs<const NV: usize, const T: bool>(
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
        let (rs, cs) = if T { (1, p_stride) } else { (p_stride, 1) };
        let prow: [*const f32; OUT_ROWS] = std::array::from_fn(|r| p.add(r.min(rows - 1) * rs));
        for j in 0..n {
            let vj = v.add(j * v_stride);
            let mut b = [_mm512_setzero_ps(); NV];
            for (c, bc) in b.iter_mut().enumerate() {
                *bc = _mm512_loadu_ps(vj.add(c * LANES));
            }
            for r in 0..OUT_ROWS {
                let a = _mm512_set1_ps(*prow[r].add(j * cs));
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
