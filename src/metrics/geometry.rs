//! Surface-normal and depth metrics, pooled over every valid pixel of a data set.

/// Angular error of surface normals: mean, median and the share of pixels under
/// 11.25 / 22.5 / 30 degrees. Both vectors are L2-normalised; the angle is
/// `2 atan2(|p - g|, |p + g|)` (numerically stable at 0 and 180 degrees). Constant memory over
/// a data set: the mean and shares are exact, the median comes from a 0.001-degree histogram.
#[derive(Clone, Debug)]
pub struct NormalsError {
    n: u64,
    sum: f64,
    under: [u64; 3],
    hist: Vec<u64>,
}

const BINS_PER_DEGREE: f64 = 1000.0;

impl Default for NormalsError {
    fn default() -> Self {
        NormalsError {
            n: 0,
            sum: 0.0,
            under: [0; 3],
            hist: vec![0; (180.0 * BINS_PER_DEGREE) as usize + 1],
        }
    }
}

impl NormalsError {
    /// Add one image: `pred`, `gt` as [H*W*3] interleaved xyz; pixels where `valid` is false
    /// (or whose ground truth has zero length) are skipped.
    pub fn update(&mut self, pred: &[f32], gt: &[f32], valid: &[bool]) {
        for (i, &v) in valid.iter().enumerate() {
            if !v {
                continue;
            }
            let p = &pred[3 * i..3 * i + 3];
            let g = &gt[3 * i..3 * i + 3];
            let ng = (g[0] * g[0] + g[1] * g[1] + g[2] * g[2]).sqrt();
            if ng == 0.0 {
                continue;
            }
            let np = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt().max(1e-12);
            let (mut d2, mut s2) = (0f32, 0f32);
            for k in 0..3 {
                let (a, b) = (p[k] / np, g[k] / ng);
                d2 += (a - b) * (a - b);
                s2 += (a + b) * (a + b);
            }
            let angle = 2.0 * d2.sqrt().atan2(s2.sqrt()) * 180.0 / std::f32::consts::PI;
            self.n += 1;
            self.sum += angle as f64;
            for (c, t) in self.under.iter_mut().zip([11.25f32, 22.5, 30.0]) {
                *c += (angle < t) as u64;
            }
            let bin = ((angle as f64 * BINS_PER_DEGREE).round() as usize).min(self.hist.len() - 1);
            self.hist[bin] += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// (mean, median, % < 11.25, % < 22.5, % < 30) in degrees / percent.
    pub fn summary(&self) -> (f64, f64, f64, f64, f64) {
        if self.n == 0 {
            return (f64::NAN, f64::NAN, 0.0, 0.0, 0.0);
        }
        let n = self.n as f64;
        // The median as the mean of the two middle order statistics, from the histogram.
        let order_stat = |k: u64| -> f64 {
            let mut seen = 0;
            for (b, &c) in self.hist.iter().enumerate() {
                seen += c;
                if seen > k {
                    return b as f64 / BINS_PER_DEGREE;
                }
            }
            180.0
        };
        let median = if self.n % 2 == 1 {
            order_stat(self.n / 2)
        } else {
            (order_stat(self.n / 2 - 1) + order_stat(self.n / 2)) / 2.0
        };
        let pct = |c: u64| 100.0 * c as f64 / n;
        (
            self.sum / n,
            median,
            pct(self.under[0]),
            pct(self.under[1]),
            pct(self.under[2]),
        )
    }
}

/// Depth errors over pixels with `0 < gt < max_depth`: RMSE, mean absolute relative error and
/// the share with max(p/g, g/p) < 1.25.
#[derive(Clone, Debug)]
pub struct DepthError {
    max_depth: f32,
    n: u64,
    sq: f64,
    abs_rel: f64,
    delta1: u64,
}

impl DepthError {
    pub fn new(max_depth: f32) -> Self {
        DepthError {
            max_depth,
            n: 0,
            sq: 0.0,
            abs_rel: 0.0,
            delta1: 0,
        }
    }

    pub fn update(&mut self, pred: &[f32], gt: &[f32]) {
        for (&p, &g) in pred.iter().zip(gt) {
            if !(g > 0.0 && g < self.max_depth) {
                continue;
            }
            let (p, g) = (p as f64, g as f64);
            self.n += 1;
            self.sq += (p - g) * (p - g);
            self.abs_rel += (p - g).abs() / g;
            let ratio = if p > 0.0 {
                (p / g).max(g / p)
            } else {
                f64::INFINITY
            };
            self.delta1 += (ratio < 1.25) as u64;
        }
    }

    /// (RMSE, abs-rel, delta < 1.25 as a fraction).
    pub fn summary(&self) -> (f64, f64, f64) {
        let n = self.n.max(1) as f64;
        (
            (self.sq / n).sqrt(),
            self.abs_rel / n,
            self.delta1 as f64 / n,
        )
    }
}
