//! Saliency metrics.
//!
//! - [`PooledMaxF`]: the multi-task literature's (and SAK's) maxF: thresholds 0.05..0.95 on the
//!   foreground probability, TP/FP/FN pooled over the whole data set, F with beta^2 = 0.3, best
//!   threshold.
//! - [`SodMetrics`]: what salient-object benchmarks report, per image then averaged over images,
//!   as PySODMetrics computes them: max/mean/adaptive F-measure over 256 thresholds, MAE,
//!   S-measure (alpha 0.5) and max/mean/adaptive E-measure.

const EPS: f64 = f64::EPSILON; // numpy's np.spacing(1)
const BETA2: f64 = 0.3;

fn f_beta(p: f64, r: f64) -> f64 {
    let num = (1.0 + BETA2) * p * r;
    if num == 0.0 {
        0.0
    } else {
        num / (BETA2 * p + r)
    }
}

/// Data-set-pooled maximum F-measure.
#[derive(Clone, Debug)]
pub struct PooledMaxF {
    thresholds: Vec<f32>,
    tp: Vec<u64>,
    pp: Vec<u64>,
    ap: u64,
}

impl Default for PooledMaxF {
    fn default() -> Self {
        let thresholds: Vec<f32> = (1..20).map(|i| i as f32 * 0.05).collect();
        let n = thresholds.len();
        PooledMaxF {
            thresholds,
            tp: vec![0; n],
            pp: vec![0; n],
            ap: 0,
        }
    }
}

impl PooledMaxF {
    /// Add one image: foreground probability per pixel and ground truth (0/1, `ignore` skipped).
    pub fn update(&mut self, prob: &[f32], gt: &[u8], ignore: u8) {
        for (&p, &g) in prob.iter().zip(gt) {
            if g == ignore {
                continue;
            }
            let pos = g > 0;
            self.ap += pos as u64;
            for (k, &t) in self.thresholds.iter().enumerate() {
                if p >= t {
                    self.pp[k] += 1;
                    self.tp[k] += pos as u64;
                }
            }
        }
    }

    /// maxF in percent.
    pub fn max_f(&self) -> f64 {
        (0..self.thresholds.len())
            .map(|k| {
                let p = self.tp[k] as f64 / self.pp[k].max(1) as f64;
                let r = self.tp[k] as f64 / self.ap.max(1) as f64;
                f_beta(p, r)
            })
            .fold(0.0, f64::max)
            * 100.0
    }
}

/// Per-image salient-object metrics averaged over images (PySODMetrics definitions).
#[derive(Clone, Debug, Default)]
pub struct SodMetrics {
    n: usize,
    fm_curve: Vec<f64>,
    em_curve: Vec<f64>,
    adp_fm: f64,
    adp_em: f64,
    mae: f64,
    sm: f64,
}

/// Averaged results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SodSummary {
    pub max_fm: f64,
    pub mean_fm: f64,
    pub adp_fm: f64,
    pub mae: f64,
    pub s_measure: f64,
    pub max_em: f64,
    pub mean_em: f64,
    pub adp_em: f64,
}

impl SodMetrics {
    /// Add one image: `pred` and `gt` as 8-bit maps (gt > 128 is foreground; pred is scaled to
    /// [0, 1] and min-max stretched when not constant, as PySODMetrics prepares it).
    pub fn update(&mut self, pred: &[u8], gt: &[u8], h: usize, w: usize) {
        let gt: Vec<bool> = gt.iter().map(|&g| g > 128).collect();
        let mut p: Vec<f64> = pred.iter().map(|&v| v as f64 / 255.0).collect();
        let (lo, hi) = p
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if hi != lo {
            for v in &mut p {
                *v = (*v - lo) / (hi - lo);
            }
        }
        let n = p.len();
        let gt_fg = gt.iter().filter(|&&g| g).count();
        // Histograms of the 8-bit (truncated) prediction over foreground/background.
        let mut fg_hist = [0u64; 256];
        let mut bg_hist = [0u64; 256];
        for (&v, &g) in p.iter().zip(&gt) {
            let b = ((v * 255.0) as usize).min(255);
            if g {
                fg_hist[b] += 1;
            } else {
                bg_hist[b] += 1;
            }
        }
        // Cumulative counts for thresholds 255 down to 0.
        let (mut tp, mut fp) = (0u64, 0u64);
        let mut fm = Vec::with_capacity(256);
        let mut em = Vec::with_capacity(256);
        for b in (0..256).rev() {
            tp += fg_hist[b];
            fp += bg_hist[b];
            let prec = tp as f64 / (tp + fp).max(1) as f64;
            let rec = tp as f64 / gt_fg.max(1) as f64;
            fm.push(f_beta(prec, rec));
            em.push(e_measure(tp, fp, gt_fg, n));
        }
        if self.fm_curve.is_empty() {
            self.fm_curve = vec![0.0; 256];
            self.em_curve = vec![0.0; 256];
        }
        for k in 0..256 {
            self.fm_curve[k] += fm[k];
            self.em_curve[k] += em[k];
        }
        // Adaptive threshold: twice the mean prediction, at most 1.
        let mean = p.iter().sum::<f64>() / n as f64;
        let thr = (2.0 * mean).min(1.0);
        let (mut atp, mut afp) = (0u64, 0u64);
        for (&v, &g) in p.iter().zip(&gt) {
            if v >= thr {
                if g {
                    atp += 1;
                } else {
                    afp += 1;
                }
            }
        }
        self.adp_fm += if atp == 0 {
            0.0
        } else {
            f_beta(atp as f64 / (atp + afp) as f64, atp as f64 / gt_fg as f64)
        };
        self.adp_em += e_measure(atp, afp, gt_fg, n);
        self.mae += p
            .iter()
            .zip(&gt)
            .map(|(&v, &g)| (v - g as u8 as f64).abs())
            .sum::<f64>()
            / n as f64;
        self.sm += s_measure(&p, &gt, h, w);
        self.n += 1;
    }

    pub fn summary(&self) -> SodSummary {
        let n = self.n.max(1) as f64;
        let max = |c: &[f64]| c.iter().fold(0.0f64, |a, &b| a.max(b)) / n;
        let mean = |c: &[f64]| c.iter().sum::<f64>() / c.len().max(1) as f64 / n;
        SodSummary {
            max_fm: max(&self.fm_curve),
            mean_fm: mean(&self.fm_curve),
            adp_fm: self.adp_fm / n,
            mae: self.mae / n,
            s_measure: self.sm / n,
            max_em: max(&self.em_curve),
            mean_em: mean(&self.em_curve),
            adp_em: self.adp_em / n,
        }
    }
}

/// Enhanced-alignment measure of a binarised prediction from its confusion counts.
fn e_measure(fg_fg: u64, fg_bg: u64, gt_fg: usize, size: usize) -> f64 {
    let pred_fg = fg_fg + fg_bg;
    let pred_bg = size as u64 - pred_fg;
    let sum = if gt_fg == 0 {
        pred_bg as f64
    } else if gt_fg == size {
        pred_fg as f64
    } else {
        let bg_fg = gt_fg as u64 - fg_fg;
        let bg_bg = pred_bg - bg_fg;
        let mp = pred_fg as f64 / size as f64;
        let mg = gt_fg as f64 / size as f64;
        let parts = [
            (fg_fg, 1.0 - mp, 1.0 - mg),
            (fg_bg, 1.0 - mp, -mg),
            (bg_fg, -mp, 1.0 - mg),
            (bg_bg, -mp, -mg),
        ];
        parts
            .iter()
            .map(|&(k, a, b)| {
                let align = 2.0 * a * b / (a * a + b * b + EPS);
                (align + 1.0).powi(2) / 4.0 * k as f64
            })
            .sum()
    };
    sum / (size as f64 - 1.0 + EPS)
}

/// Structure measure (alpha = 0.5): object- and region-aware similarity.
fn s_measure(p: &[f64], gt: &[bool], h: usize, w: usize) -> f64 {
    let n = p.len() as f64;
    let y = gt.iter().filter(|&&g| g).count() as f64 / n;
    if y == 0.0 {
        return 1.0 - p.iter().sum::<f64>() / n;
    }
    if y == 1.0 {
        return p.iter().sum::<f64>() / n;
    }
    let object = {
        let fg: Vec<f64> = p
            .iter()
            .zip(gt)
            .filter(|(_, &g)| g)
            .map(|(&v, _)| v)
            .collect();
        let bg: Vec<f64> = p
            .iter()
            .zip(gt)
            .filter(|(_, &g)| !g)
            .map(|(&v, _)| 1.0 - v)
            .collect();
        y * s_object(&fg) + (1.0 - y) * s_object(&bg)
    };
    // Centroid of the foreground (rounded half to even, as numpy), 1-based split point.
    let (mut sy, mut sx, mut c) = (0.0, 0.0, 0.0);
    for (i, &g) in gt.iter().enumerate() {
        if g {
            sy += (i / w) as f64;
            sx += (i % w) as f64;
            c += 1.0;
        }
    }
    let x = (sx / c).round_ties_even() as usize + 1;
    let yy = (sy / c).round_ties_even() as usize + 1;
    let (x, yy) = (x.min(w), yy.min(h));
    let area = (h * w) as f64;
    let w1 = (x * yy) as f64 / area;
    let w2 = (yy * (w - x)) as f64 / area;
    let w3 = ((h - yy) * x) as f64 / area;
    let w4 = 1.0 - w1 - w2 - w3;
    let quad = |r0: usize, r1: usize, c0: usize, c1: usize| {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for r in r0..r1 {
            for cc in c0..c1 {
                a.push(p[r * w + cc]);
                b.push(gt[r * w + cc] as u8 as f64);
            }
        }
        ssim(&a, &b)
    };
    let region = w1 * quad(0, yy, 0, x)
        + w2 * quad(0, yy, x, w)
        + w3 * quad(yy, h, 0, x)
        + w4 * quad(yy, h, x, w);
    (0.5 * object + 0.5 * region).max(0.0)
}

fn s_object(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|&a| (a - mean) * (a - mean)).sum::<f64>() / (n - 1.0);
    2.0 * mean / (mean * mean + 1.0 + var.sqrt() + EPS)
}

fn ssim(p: &[f64], g: &[f64]) -> f64 {
    let n = p.len() as f64;
    if p.is_empty() {
        return 0.0;
    }
    let x = p.iter().sum::<f64>() / n;
    let y = g.iter().sum::<f64>() / n;
    let (mut sx, mut sy, mut sxy) = (0.0, 0.0, 0.0);
    for (&a, &b) in p.iter().zip(g) {
        sx += (a - x) * (a - x);
        sy += (b - y) * (b - y);
        sxy += (a - x) * (b - y);
    }
    let (sx, sy, sxy) = (sx / (n - 1.0), sy / (n - 1.0), sxy / (n - 1.0));
    let alpha = 4.0 * x * y * sxy;
    let beta = (x * x + y * y) * (sx + sy);
    if alpha != 0.0 {
        alpha / (beta + EPS)
    } else if beta == 0.0 {
        1.0
    } else {
        0.0
    }
}
