//! Boundary detection evaluation without MATLAB: the BSDS500 benchmark (`boundaryBench`) and the
//! non-maximum suppression the SAK/ATRC edge evaluation runs first (Piotr Dollár's `edgesNms`).
//!
//! Per image and threshold: binarise the edge-probability map (`pb >= t`), thin it to one-pixel
//! lines (MATLAB `bwmorph(.., 'thin', inf)`), then match predicted to ground-truth boundary pixels
//! one-to-one within `max_dist x image diagonal`, separately for each annotator. Recall counts the
//! ground-truth pixels matched (all annotators pooled), precision the predicted pixels matched to
//! any annotator. ODS pools counts over the set and takes the best threshold, OIS takes each
//! image's best threshold, AP is the area under the interpolated PR curve, all as
//! `collect_eval_bdry.m` computes them (including its linear interpolation between thresholds).
//!
//! The matcher: BSDS `correspondPixels` solves a min-cost assignment in which every unmatched
//! pixel costs far more than any match, so its matched count is the maximum bipartite matching
//! within the radius; this module computes that maximum exactly with Hopcroft-Karp (nearest
//! pixels first for the initial greedy pass).

use crate::error::{Error, Result};
use crate::mat::{MatFile, MatValue};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// A binary map, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryMap {
    pub h: usize,
    pub w: usize,
    pub data: Vec<bool>,
}

impl BinaryMap {
    pub fn count(&self) -> u64 {
        self.data.iter().filter(|&&b| b).count() as u64
    }
}

/// Thin a binary map in place to one-pixel-wide lines: MATLAB's `bwmorph(bw, 'thin', Inf)`
/// (Lam, Lee & Suen 1992, the two-subiteration algorithm of Guo & Hall), pixels outside the
/// map counting as background.
pub fn thin(map: &mut BinaryMap) {
    let (h, w) = (map.h, map.w);
    if h == 0 || w == 0 {
        return;
    }
    let luts = thin_luts();
    let mut deletions = Vec::new();
    loop {
        let mut changed = false;
        for lut in &luts {
            deletions.clear();
            let d = &map.data;
            let at = |r: isize, c: isize| -> bool {
                r >= 0
                    && c >= 0
                    && (r as usize) < h
                    && (c as usize) < w
                    && d[r as usize * w + c as usize]
            };
            for r in 0..h as isize {
                for c in 0..w as isize {
                    if !d[r as usize * w + c as usize] {
                        continue;
                    }
                    // x1..x8: E, NE, N, NW, W, SW, S, SE (north = previous row).
                    let n = (at(r, c + 1) as usize)
                        | (at(r - 1, c + 1) as usize) << 1
                        | (at(r - 1, c) as usize) << 2
                        | (at(r - 1, c - 1) as usize) << 3
                        | (at(r, c - 1) as usize) << 4
                        | (at(r + 1, c - 1) as usize) << 5
                        | (at(r + 1, c) as usize) << 6
                        | (at(r + 1, c + 1) as usize) << 7;
                    if lut[n] {
                        deletions.push(r as usize * w + c as usize);
                    }
                }
            }
            for &i in &deletions {
                map.data[i] = false;
            }
            changed |= !deletions.is_empty();
        }
        if !changed {
            break;
        }
    }
}

/// Deletion tables of the two subiterations, indexed by the 8-neighbour code (bit i = x_{i+1}).
fn thin_luts() -> [[bool; 256]; 2] {
    let mut luts = [[false; 256]; 2];
    #[allow(clippy::needless_range_loop)] // n is the neighbourhood code, not just an index
    for n in 0..256usize {
        let x = |i: usize| n >> ((i - 1) % 8) & 1 == 1; // x(1..=9), x9 = x1
        let xh = (0..4)
            .filter(|&i| !x(2 * i + 1) && (x(2 * i + 2) || x(2 * i + 3)))
            .count();
        let n1 = (1..=4).filter(|&k| x(2 * k - 1) || x(2 * k)).count();
        let n2 = (1..=4).filter(|&k| x(2 * k) || x(2 * k + 1)).count();
        let g12 = xh == 1 && (2..=3).contains(&n1.min(n2));
        let g3 = !((x(2) || x(3) || !x(8)) && x(1));
        let g3p = !((x(6) || x(7) || !x(4)) && x(5));
        luts[0][n] = g12 && g3;
        luts[1][n] = g12 && g3p;
    }
    luts
}

/// One-to-one correspondence of the set pixels of `pred` and `gt` within `max_dist` (a fraction
/// of the image diagonal): returns (which `pred` pixels are matched, number of `gt` pixels
/// matched). The matching has maximum cardinality.
pub fn correspond(pred: &BinaryMap, gt: &BinaryMap, max_dist: f64) -> (Vec<bool>, u64) {
    let p = set_pixels(pred);
    let (m, n) = correspond_lists(&p, &set_pixels(gt), pred.h, pred.w, max_dist);
    let mut matched = vec![false; pred.h * pred.w];
    for (&i, &ok) in p.iter().zip(&m) {
        matched[i as usize] = ok;
    }
    (matched, n)
}

/// Row-major indices of the set pixels.
pub fn set_pixels(m: &BinaryMap) -> Vec<u32> {
    m.data
        .iter()
        .enumerate()
        .filter(|(_, &b)| b)
        .map(|(i, _)| i as u32)
        .collect()
}

/// [`correspond`] on lists of set-pixel indices of an (h, w) image: per `pred` entry whether it
/// is matched, and the number of matched `gt` pixels.
pub fn correspond_lists(
    pred: &[u32],
    gt: &[u32],
    h: usize,
    w: usize,
    max_dist: f64,
) -> (Vec<bool>, u64) {
    let radius = max_dist * ((h * h + w * w) as f64).sqrt();
    let r = radius.ceil() as usize;
    // gt pixel index in a buffer padded by r on every side, so neighbours need no bounds checks;
    // offsets within the radius as linear deltas, nearest first.
    let pw = w + 2 * r;
    let mut offsets: Vec<(isize, isize)> = Vec::new();
    let ri = r as isize;
    for dy in -ri..=ri {
        for dx in -ri..=ri {
            let d2 = dx * dx + dy * dy;
            if (d2 as f64) <= radius * radius {
                offsets.push((d2, dy * pw as isize + dx));
            }
        }
    }
    offsets.sort();
    let deltas: Vec<isize> = offsets.iter().map(|o| o.1).collect();
    let at = |i: u32| (i as usize / w + r) * pw + i as usize % w + r;
    SCRATCH.with(|cell| {
        let mut gt_index = cell.borrow_mut();
        let need = (h + 2 * r) * pw;
        if gt_index.len() < need {
            gt_index.resize(need, u32::MAX);
        }
        for (k, &i) in gt.iter().enumerate() {
            gt_index[at(i)] = k as u32;
        }
        // Left side: pred pixels with at least one gt pixel in range; CSR adjacency.
        let mut left = Vec::new();
        let mut adj_start = vec![0u32];
        let mut adj = Vec::new();
        for (k, &i) in pred.iter().enumerate() {
            let c = at(i) as isize;
            let before = adj.len();
            for &d in &deltas {
                let g = gt_index[(c + d) as usize];
                if g != u32::MAX {
                    adj.push(g);
                }
            }
            if adj.len() > before {
                left.push(k);
                adj_start.push(adj.len() as u32);
            }
        }
        // Leave the scratch buffer all-empty for the next call.
        for &i in gt {
            gt_index[at(i)] = u32::MAX;
        }
        let m = hopcroft_karp(left.len(), gt.len(), &adj_start, &adj);
        let mut matched = vec![false; pred.len()];
        let mut n = 0;
        for (l, &k) in left.iter().enumerate() {
            if m[l] != u32::MAX {
                matched[k] = true;
                n += 1;
            }
        }
        (matched, n)
    })
}

thread_local! {
    /// Per-thread padded gt-index buffer of [`correspond`], kept all `u32::MAX` between calls.
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Maximum bipartite matching; returns the right partner of each left node (u32::MAX = none).
fn hopcroft_karp(n_left: usize, n_right: usize, start: &[u32], adj: &[u32]) -> Vec<u32> {
    const NONE: u32 = u32::MAX;
    let mut ml = vec![NONE; n_left];
    let mut mr = vec![NONE; n_right];
    // Greedy start: nearest free partner (adjacency lists are sorted by distance).
    for l in 0..n_left {
        for &r in &adj[start[l] as usize..start[l + 1] as usize] {
            if mr[r as usize] == NONE {
                mr[r as usize] = l as u32;
                ml[l] = r;
                break;
            }
        }
    }
    let mut dist = vec![u32::MAX; n_left];
    let mut queue = VecDeque::new();
    let mut iter = vec![0u32; n_left];
    let mut stack: Vec<u32> = Vec::new();
    loop {
        // BFS layers from free left nodes.
        queue.clear();
        for l in 0..n_left {
            if ml[l] == NONE {
                dist[l] = 0;
                queue.push_back(l as u32);
            } else {
                dist[l] = u32::MAX;
            }
        }
        let mut found = false;
        while let Some(l) = queue.pop_front() {
            let l = l as usize;
            for &r in &adj[start[l] as usize..start[l + 1] as usize] {
                let l2 = mr[r as usize];
                if l2 == NONE {
                    found = true;
                } else if dist[l2 as usize] == u32::MAX {
                    dist[l2 as usize] = dist[l] + 1;
                    queue.push_back(l2);
                }
            }
        }
        if !found {
            break;
        }
        // DFS along layers (iterative), augmenting vertex-disjoint shortest paths.
        for (l, it) in iter.iter_mut().enumerate() {
            *it = start[l];
        }
        for root in 0..n_left {
            if ml[root] != NONE {
                continue;
            }
            stack.clear();
            stack.push(root as u32);
            while let Some(&l) = stack.last() {
                let l = l as usize;
                if iter[l] == start[l + 1] {
                    dist[l] = u32::MAX; // dead end
                    stack.pop();
                    continue;
                }
                let r = adj[iter[l] as usize];
                iter[l] += 1;
                let l2 = mr[r as usize];
                if l2 == NONE {
                    // Augment along the stack.
                    let mut r = r;
                    while let Some(l) = stack.pop() {
                        let prev = ml[l as usize];
                        ml[l as usize] = r;
                        mr[r as usize] = l;
                        r = prev;
                    }
                    break;
                } else if dist[l2 as usize] == dist[l] + 1 {
                    stack.push(l2);
                }
            }
        }
    }
    ml
}

/// Separable triangle filter of radius `r` with symmetric (edge-repeating mirror) padding:
/// Piotr Dollár's `convTri(I, r)` for integer r >= 1.
pub fn conv_tri(img: &[f32], h: usize, w: usize, r: usize) -> Vec<f32> {
    if r == 0 {
        return img.to_vec();
    }
    let norm = ((r + 1) * (r + 1)) as f32;
    let f: Vec<f32> = (1..=r + 1)
        .chain((1..=r).rev())
        .map(|v| v as f32 / norm)
        .collect();
    let sym = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        loop {
            if i < 0 {
                i = -i - 1;
            } else if i >= n {
                i = 2 * n - i - 1;
            } else {
                return i as usize;
            }
        }
    };
    let r = r as isize;
    let mut tmp = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0f32;
            for (k, &fk) in f.iter().enumerate() {
                s += fk * img[y * w + sym(x as isize + k as isize - r, w)];
            }
            tmp[y * w + x] = s;
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0f32;
            for (k, &fk) in f.iter().enumerate() {
                s += fk * tmp[sym(y as isize + k as isize - r, h) * w + x];
            }
            out[y * w + x] = s;
        }
    }
    out
}

/// MATLAB-style gradient: central differences inside, one-sided at the borders.
/// Returns (d/dx along columns, d/dy along rows).
pub fn gradient2(img: &[f32], h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let mut gx = vec![0f32; h * w];
    let mut gy = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            gx[i] = if w < 2 {
                0.0
            } else if x == 0 {
                img[i + 1] - img[i]
            } else if x == w - 1 {
                img[i] - img[i - 1]
            } else {
                (img[i + 1] - img[i - 1]) / 2.0
            };
            gy[i] = if h < 2 {
                0.0
            } else if y == 0 {
                img[i + w] - img[i]
            } else if y == h - 1 {
                img[i] - img[i - w]
            } else {
                (img[i + w] - img[i - w]) / 2.0
            };
        }
    }
    (gx, gy)
}

/// Edge non-maximum suppression as the SAK/ATRC evaluation runs it before the benchmark:
/// `E = convTri(E, 1)`; orientation from second derivatives of `convTri(E, 4)`;
/// `edgesNms(E, O, r = 1, s = 5, m = 1.01)` (suppress a pixel when a bilinearly interpolated
/// neighbour along the normal, within radius 1, exceeds it / 1.01; fade a 5-pixel border).
pub fn edge_nms(edges: &[f32], h: usize, w: usize) -> Vec<f32> {
    let e = conv_tri(edges, h, w, 1);
    let (ox, oy) = gradient2(&conv_tri(&e, h, w, 4), h, w);
    let (oxx, _) = gradient2(&ox, h, w);
    let (oxy, oyy) = gradient2(&oy, h, w);
    let pi = std::f32::consts::PI;
    let orient: Vec<f32> = (0..h * w)
        .map(|i| {
            let sign = if -oxy[i] > 0.0 {
                1.0
            } else if -oxy[i] < 0.0 {
                -1.0
            } else {
                0.0
            };
            (oyy[i] * sign / (oxx[i] + 1e-5)).atan().rem_euclid(pi)
        })
        .collect();
    nms_oriented(&e, &orient, h, w, 1, 5, 1.01)
}

/// `edgesNmsMex(E, O, r, s, m)`.
fn nms_oriented(e0: &[f32], o: &[f32], h: usize, w: usize, r: i32, s: usize, m: f32) -> Vec<f32> {
    let interp = |x: f32, y: f32| -> f32 {
        let x = x.clamp(0.0, (w as f32 - 1.001).max(0.0));
        let y = y.clamp(0.0, (h as f32 - 1.001).max(0.0));
        let (x0, y0) = (x as usize, y as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (dx0, dy0) = (x - x0 as f32, y - y0 as f32);
        let (dx1, dy1) = (1.0 - dx0, 1.0 - dy0);
        e0[y0 * w + x0] * dx1 * dy1
            + e0[y0 * w + x1] * dx0 * dy1
            + e0[y1 * w + x0] * dx1 * dy0
            + e0[y1 * w + x1] * dx0 * dy0
    };
    let mut e = e0.to_vec();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let v = e0[i];
            if v == 0.0 {
                continue;
            }
            let v = v * m;
            let (c, s_) = (o[i].cos(), o[i].sin());
            for d in -r..=r {
                if d == 0 {
                    continue;
                }
                let n = interp(x as f32 + d as f32 * c, y as f32 + d as f32 * s_);
                if v < n {
                    e[i] = 0.0;
                    break;
                }
            }
        }
    }
    let s = s.min(w / 2).min(h / 2);
    if s > 0 {
        for x in 0..s {
            let f = x as f32 / s as f32;
            for y in 0..h {
                e[y * w + x] *= f;
                e[y * w + (w - 1 - x)] *= f;
            }
        }
        for y in 0..s {
            let f = y as f32 / s as f32;
            for x in 0..w {
                e[y * w + x] *= f;
                e[(h - 1 - y) * w + x] *= f;
            }
        }
    }
    e
}

/// Benchmark options.
#[derive(Clone, Debug)]
pub struct BoundaryOptions {
    /// Matching tolerance as a fraction of the image diagonal (BSDS/PASCAL 0.0075, NYUD 0.011).
    pub max_dist: f64,
    /// Number of thresholds, evenly spaced in (0, 1): `linspace(1/(n+1), 1 - 1/(n+1), n)`.
    pub thresholds: usize,
    /// Thin the binarised prediction before matching (the benchmark's default).
    pub thin: bool,
    /// Run edge NMS on the prediction first.
    pub nms: bool,
}

impl Default for BoundaryOptions {
    fn default() -> Self {
        BoundaryOptions {
            max_dist: 0.0075,
            thresholds: 99,
            thin: true,
            nms: false,
        }
    }
}

impl BoundaryOptions {
    pub fn threshold_values(&self) -> Vec<f64> {
        let n = self.thresholds;
        let (lo, hi) = (1.0 / (n + 1) as f64, 1.0 - 1.0 / (n + 1) as f64);
        (0..n)
            .map(|i| {
                if n == 1 {
                    lo
                } else {
                    lo + (hi - lo) * i as f64 / (n - 1) as f64
                }
            })
            .collect()
    }
}

/// Matched/total counts at one threshold: recall = cnt_r / sum_r, precision = cnt_p / sum_p.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub cnt_r: u64,
    pub sum_r: u64,
    pub cnt_p: u64,
    pub sum_p: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.cnt_r += o.cnt_r;
        self.sum_r += o.sum_r;
        self.cnt_p += o.cnt_p;
        self.sum_p += o.sum_p;
    }
    pub fn recall(&self) -> f64 {
        self.cnt_r as f64 / (self.sum_r.max(1)) as f64
    }
    pub fn precision(&self) -> f64 {
        self.cnt_p as f64 / (self.sum_p.max(1)) as f64
    }
}

/// An edge-probability map, row-major, values in [0, 1].
#[derive(Clone, Debug)]
pub struct EdgeMap {
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Counts at every threshold for one image against its annotators.
pub fn evaluate_image(pb: &EdgeMap, gts: &[BinaryMap], opts: &BoundaryOptions) -> Vec<Counts> {
    let pbv = if opts.nms {
        edge_nms(&pb.data, pb.h, pb.w)
    } else {
        pb.data.clone()
    };
    let sum_r: u64 = gts.iter().map(|g| g.count()).sum();
    let gt_lists: Vec<Vec<u32>> = gts.iter().map(set_pixels).collect();
    opts.threshold_values()
        .par_iter()
        .map(|&t| {
            let mut bmap = BinaryMap {
                h: pb.h,
                w: pb.w,
                data: pbv.iter().map(|&v| v as f64 >= t).collect(),
            };
            if opts.thin {
                thin(&mut bmap);
            }
            let p = set_pixels(&bmap);
            let mut matched_any = vec![false; p.len()];
            let mut cnt_r = 0;
            for g in &gt_lists {
                let (m1, n2) = correspond_lists(&p, g, pb.h, pb.w, opts.max_dist);
                cnt_r += n2;
                for (a, b) in matched_any.iter_mut().zip(m1) {
                    *a |= b;
                }
            }
            Counts {
                cnt_r,
                sum_r,
                cnt_p: matched_any.iter().filter(|&&b| b).count() as u64,
                sum_p: p.len() as u64,
            }
        })
        .collect()
}

pub fn f_measure(r: f64, p: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// Best F over the PR curve with the benchmark's linear interpolation between neighbouring
/// thresholds (100 steps): (threshold, recall, precision, F).
pub fn max_f(thresh: &[f64], r: &[f64], p: &[f64]) -> (f64, f64, f64, f64) {
    let mut best = (thresh[0], r[0], p[0], f_measure(r[0], p[0]));
    for i in 1..thresh.len() {
        for k in 0..100 {
            let d = k as f64 / 99.0;
            let t = thresh[i] * d + thresh[i - 1] * (1.0 - d);
            let rr = r[i] * d + r[i - 1] * (1.0 - d);
            let pp = p[i] * d + p[i - 1] * (1.0 - d);
            let f = f_measure(rr, pp);
            if f > best.3 {
                best = (t, rr, pp, f);
            }
        }
    }
    best
}

/// Data-set results, as `eval_bdry.txt` / `eval_bdry_thr.txt` / `eval_bdry_img.txt`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BoundaryResult {
    pub ods_threshold: f64,
    pub ods_r: f64,
    pub ods_p: f64,
    pub ods_f: f64,
    pub ois_r: f64,
    pub ois_p: f64,
    pub ois_f: f64,
    pub ap: f64,
    /// Per threshold: (threshold, recall, precision, F) with counts pooled over the set.
    pub per_threshold: Vec<(f64, f64, f64, f64)>,
    /// Per image: (best threshold, recall, precision, F).
    pub per_image: Vec<(f64, f64, f64, f64)>,
}

/// Aggregate per-image counts (`collect_eval_bdry.m`).
pub fn collect(thresh: &[f64], per_image: &[Vec<Counts>]) -> BoundaryResult {
    let n = thresh.len();
    let mut total = vec![Counts::default(); n];
    let mut best_sum = Counts::default();
    let mut scores = Vec::new();
    for counts in per_image {
        let r: Vec<f64> = counts.iter().map(Counts::recall).collect();
        let p: Vec<f64> = counts.iter().map(Counts::precision).collect();
        let (bt, br, bp, bf) = max_f(thresh, &r, &p);
        scores.push((bt, br, bp, bf));
        for (t, c) in total.iter_mut().zip(counts) {
            t.add(c);
        }
        // The last threshold reaching the image's (uninterpolated) best F.
        let f: Vec<f64> = r.iter().zip(&p).map(|(&r, &p)| f_measure(r, p)).collect();
        let fmax = f.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let b = f.iter().rposition(|&v| v == fmax).unwrap_or(0);
        best_sum.add(&counts[b]);
    }
    let r: Vec<f64> = total.iter().map(Counts::recall).collect();
    let p: Vec<f64> = total.iter().map(Counts::precision).collect();
    let (ods_threshold, ods_r, ods_p, ods_f) = max_f(thresh, &r, &p);
    let (ois_r, ois_p) = (best_sum.recall(), best_sum.precision());
    BoundaryResult {
        ods_threshold,
        ods_r,
        ods_p,
        ods_f,
        ois_r,
        ois_p,
        ois_f: f_measure(ois_r, ois_p),
        ap: area_pr(&r, &p),
        per_threshold: (0..n)
            .map(|i| (thresh[i], r[i], p[i], f_measure(r[i], p[i])))
            .collect(),
        per_image: scores,
    }
}

/// Area under the PR curve: precision linearly interpolated at recall 0:0.01:1 over the distinct
/// recall values (first occurrence), zero outside their range, times 0.01.
fn area_pr(r: &[f64], p: &[f64]) -> f64 {
    let mut pts: Vec<(f64, f64)> = Vec::new();
    let mut order: Vec<usize> = (0..r.len()).collect();
    order.sort_by(|&a, &b| r[a].total_cmp(&r[b]).then(a.cmp(&b)));
    for i in order {
        if pts.last().is_none_or(|l| l.0 != r[i]) {
            pts.push((r[i], p[i]));
        }
    }
    if pts.len() < 2 {
        return 0.0;
    }
    let mut sum = 0.0;
    for k in 0..=100 {
        let x = k as f64 * 0.01;
        if x < pts[0].0 || x > pts[pts.len() - 1].0 {
            continue;
        }
        let j = pts.partition_point(|q| q.0 < x);
        let v = if j == 0 {
            pts[0].1
        } else {
            let (a, b) = (pts[j - 1], pts[j]);
            a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)
        };
        sum += v;
    }
    sum * 0.01
}

/// Read an edge-probability PNG (8 or 16 bit grey, or colour converted to luma) as values / max.
pub fn read_edge_png(path: &Path) -> Result<EdgeMap> {
    let img = image::open(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match img {
        image::DynamicImage::ImageLuma16(g) => g
            .into_raw()
            .into_iter()
            .map(|v| v as f32 / 65535.0)
            .collect(),
        other => other
            .into_luma8()
            .into_raw()
            .into_iter()
            .map(|v| v as f32 / 255.0)
            .collect(),
    };
    Ok(EdgeMap { h, w, data })
}

/// Ground-truth boundaries of one image, one map per annotator. Accepts a BSDS `.mat`
/// (`groundTruth{i}.Boundaries`), a PASCAL-Context `.mat` (`LabelMap`: boundaries where its
/// Laplacian is non-zero, thinned) or a PNG (non-zero pixels).
pub fn read_ground_truth(path: &Path) -> Result<Vec<BinaryMap>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "mat" {
        let img = image::open(path).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let g = img.into_luma16();
        let (w, h) = (g.width() as usize, g.height() as usize);
        return Ok(vec![BinaryMap {
            h,
            w,
            data: g.into_raw().into_iter().map(|v| v > 0).collect(),
        }]);
    }
    let mat = MatFile::open(path)?;
    if let Some(gt) = mat.vars.get("groundTruth") {
        let items: Vec<&MatValue> = match gt {
            MatValue::Cell { items, .. } => items.iter().collect(),
            s @ MatValue::Struct { .. } => vec![s],
            _ => return Err(mat.error("groundTruth is neither a cell array nor a struct")),
        };
        let mut maps = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let b = it
                .field(0, "Boundaries")
                .and_then(MatValue::as_matrix)
                .ok_or_else(|| {
                    mat.error(format!("groundTruth{{{}}} has no 2-D Boundaries", i + 1))
                })?;
            maps.push(BinaryMap {
                h: b.0,
                w: b.1,
                data: b.2.iter().map(|&v| v != 0.0).collect(),
            });
        }
        if maps.is_empty() {
            return Err(mat.error("groundTruth holds no annotations"));
        }
        return Ok(maps);
    }
    if mat.vars.contains_key("LabelMap") {
        let (h, w, labels) = mat.matrix("LabelMap")?;
        return Ok(vec![label_boundaries(&labels, h, w)]);
    }
    Err(mat.error("neither groundTruth (BSDS) nor LabelMap (PASCAL-Context) found"))
}

/// Boundaries of a label map as the PASCAL-Context loaders derive them: pixels where the 3x3
/// Laplacian `[0 1 0; 1 -4 1; 0 1 0]` (reflect-101 border) is non-zero, then thinned.
pub fn label_boundaries(labels: &[f64], h: usize, w: usize) -> BinaryMap {
    let refl = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let i = if i < 0 { -i } else { i };
        (if i >= n { 2 * n - 2 - i } else { i }) as usize
    };
    let mut data = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            let at = |dy: isize, dx: isize| {
                labels[refl(y as isize + dy, h) * w + refl(x as isize + dx, w)]
            };
            let lap = at(-1, 0) + at(1, 0) + at(0, -1) + at(0, 1) - 4.0 * at(0, 0);
            data[y * w + x] = lap != 0.0;
        }
    }
    let mut m = BinaryMap { h, w, data };
    thin(&mut m);
    m
}

/// Evaluate a folder of predicted edge PNGs against a folder of ground truth with the same file
/// stems. Returns the result and the number of images.
pub fn evaluate_dirs(
    pred_dir: &Path,
    gt_dir: &Path,
    opts: &BoundaryOptions,
) -> Result<(BoundaryResult, usize)> {
    let pairs = pair_files(pred_dir, gt_dir)?;
    let per_image: Vec<Vec<Counts>> = pairs
        .par_iter()
        .map(|(p, g)| {
            let pb = read_edge_png(p)?;
            let gts = read_ground_truth(g)?;
            for m in &gts {
                if (m.h, m.w) != (pb.h, pb.w) {
                    return Err(Error::BadInput {
                        path: g.clone(),
                        msg: format!(
                            "ground truth is {}x{} but the prediction {} is {}x{}",
                            m.w,
                            m.h,
                            p.display(),
                            pb.w,
                            pb.h
                        ),
                    });
                }
            }
            Ok(evaluate_image(&pb, &gts, opts))
        })
        .collect::<Result<_>>()?;
    Ok((collect(&opts.threshold_values(), &per_image), pairs.len()))
}

/// (prediction PNG, ground-truth file) pairs by file stem, sorted by name.
fn pair_files(pred_dir: &Path, gt_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        Ok(v)
    };
    let preds: Vec<PathBuf> = list(pred_dir)?
        .into_iter()
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .collect();
    if preds.is_empty() {
        return Err(Error::BadInput {
            path: pred_dir.to_path_buf(),
            msg: "no .png predictions in this folder".into(),
        });
    }
    let gts = list(gt_dir)?;
    preds
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().unwrap_or_default().to_owned();
            let g = ["mat", "png"]
                .iter()
                .map(|e| gt_dir.join(&stem).with_extension(e))
                .find(|c| gts.contains(c))
                .ok_or_else(|| Error::BadInput {
                    path: p.clone(),
                    msg: format!(
                        "no ground truth {}.mat or .png in {}",
                        stem.to_string_lossy(),
                        gt_dir.display()
                    ),
                })?;
            Ok((p, g))
        })
        .collect()
}
