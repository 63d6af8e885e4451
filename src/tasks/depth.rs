//! Monocular depth: L1 over pixels with a depth label (0 = none), non-negative prediction,
//! RMSE / abs-rel / delta < 1.25, viridis colours over the image's own range.

use super::{picture, tensor, LabelMap, MetricContext, Target, TaskMetric, TaskSpec};
use crate::error::Result;
use crate::metrics::geometry::DepthError;
use candle_core::Tensor;
use image::RgbImage;
use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};

pub struct Depth;

struct Errors(DepthError);

impl TaskMetric for Errors {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        self.0
            .update(&pred.flatten_all()?.to_vec1::<f32>()?, &gt.data);
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        let (rmse, abs_rel, d1) = self.0.summary();
        serde_json::json!({ "rmse": rmse, "abs_rel": abs_rel, "delta_1_25": d1 })
    }
}

impl TaskSpec for Depth {
    fn name(&self) -> &'static str {
        "depth"
    }
    fn discrete(&self) -> bool {
        false
    }
    fn head_channels(&self, _classes: usize) -> usize {
        1
    }
    fn default_weight(&self) -> f64 {
        1.0
    }
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let (b, _, h, w) = t.check(logits)?;
        let mask: Vec<f32> = t.data.iter().map(|&v| (v > 0.0) as u8 as f32).collect();
        let valid = mask.iter().filter(|&&m| m > 0.0).count();
        let dev = logits.device();
        let mask = tensor(mask, &[b, 1, h, w], dev)?;
        let g = tensor(t.data.clone(), &[b, 1, h, w], dev)?;
        let l = (logits - g)?.abs()?.mul(&mask)?;
        Ok((l.sum_all()? / valid.max(1) as f64)?)
    }
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(logits.relu()?.squeeze(1)?)
    }
    fn metric(&self, ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(Errors(DepthError::new(ctx.max_depth)))
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("rmse", true)
    }
    /// Scaling the image by s brings the scene 1/s closer.
    fn rescale_values(&self, m: &mut LabelMap, scale: f64) {
        for v in &mut m.data {
            *v /= scale as f32;
        }
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        let v = pred.flatten_all()?.to_vec1::<f32>()?;
        let (lo, hi) = v
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        picture(pred, |v, i, _| {
            let t = if hi > lo {
                (v[i] - lo) / (hi - lo)
            } else {
                0.0
            };
            let c = ViridisRGB.get_color(t);
            [c.0, c.1, c.2]
        })
    }
}
