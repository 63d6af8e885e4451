//! Surface normals: L1 between the L2-normalised prediction and the unit label over labelled
//! pixels (zero vector = unlabelled), angular errors, normals as RGB.

use super::{picture, tensor, LabelMap, MetricContext, Target, TaskMetric, TaskSpec};
use crate::error::Result;
use crate::metrics::geometry::NormalsError;
use candle_core::Tensor;
use image::RgbImage;

pub struct Normals;

/// `x / max(|x|, 1e-12)` over the channel axis of `[B, 3, H, W]`.
fn unit(logits: &Tensor) -> Result<Tensor> {
    let n = logits
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(logits.broadcast_div(&n)?)
}

#[derive(Default)]
struct Angles(NormalsError);

impl TaskMetric for Angles {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        let pv = pred.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
        let valid: Vec<bool> = gt
            .data
            .chunks(3)
            .map(|g| g.iter().any(|&v| v != 0.0))
            .collect();
        self.0.update(&pv, &gt.data, &valid);
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        let (mean, median, a, b, c) = self.0.summary();
        serde_json::json!({ "mean_angle": mean, "median_angle": median,
            "within_11_25": a, "within_22_5": b, "within_30": c })
    }
}

impl TaskSpec for Normals {
    fn name(&self) -> &'static str {
        "normals"
    }
    fn label_channels(&self) -> usize {
        3
    }
    fn discrete(&self) -> bool {
        false
    }
    fn head_channels(&self, _classes: usize) -> usize {
        3
    }
    fn default_weight(&self) -> f64 {
        10.0
    }
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let (b, _, h, w) = t.check(logits)?;
        let hw = h * w;
        let mut mask = vec![0f32; b * hw];
        for i in 0..b {
            for px in 0..hw {
                let n2: f32 = (0..3).map(|k| t.data[(i * 3 + k) * hw + px].powi(2)).sum();
                if n2 > 0.0 {
                    mask[i * hw + px] = 1.0;
                }
            }
        }
        let valid = mask.iter().filter(|&&m| m > 0.0).count();
        let dev = logits.device();
        let mask = tensor(mask, &[b, 1, h, w], dev)?;
        let g = tensor(t.data.clone(), &[b, 3, h, w], dev)?;
        let l = (unit(logits)? - g)?.abs()?.broadcast_mul(&mask)?;
        Ok((l.sum_all()? / valid.max(1) as f64)?)
    }
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        unit(logits)
    }
    fn metric(&self, _ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(Angles::default())
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("mean_angle", true)
    }
    fn flip_negates_x(&self) -> bool {
        true
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        picture(pred, |v, i, hw| {
            let f = |k: usize| {
                ((v[k * hw + i] + 1.0) / 2.0 * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            };
            [f(0), f(1), f(2)]
        })
    }
}
