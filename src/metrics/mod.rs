//! Evaluation metrics for the dense-prediction tasks (SPEC.md section 6), one file per family.

pub mod boundary;
pub mod fidelity;
pub mod geometry;
pub mod saliency;
pub mod segmentation;

/// Multi-task gain over single-task baselines, in percent:
/// `(1/T) sum_t (-1)^{l_t} (M_t - B_t) / B_t x 100`, `l_t` = 1 where lower is better.
/// Each entry is (metric, baseline, lower_is_better).
pub fn delta_m(entries: &[(f64, f64, bool)]) -> f64 {
    if entries.is_empty() {
        return 0.0;
    }
    let s: f64 = entries
        .iter()
        .map(|&(m, b, lower)| {
            let d = (m - b) / b;
            if lower {
                -d
            } else {
                d
            }
        })
        .sum();
    100.0 * s / entries.len() as f64
}
