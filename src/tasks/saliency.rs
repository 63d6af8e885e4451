//! Salient-object detection: two-class cross-entropy weighted by the batch's class balance,
//! foreground probability, pooled max F-measure (plus per-image SOD metrics), grey levels.

use super::{
    cross_entropy, grey, picture, quantized, LabelMap, MetricContext, Target, TaskMetric, TaskSpec,
    IGNORE,
};
use crate::error::Result;
use crate::metrics::saliency::{PooledMaxF, SodMetrics};
use candle_core::Tensor;
use image::RgbImage;

pub struct Saliency;

#[derive(Default)]
struct SalMetric {
    pooled: PooledMaxF,
    sod: SodMetrics,
}

impl TaskMetric for SalMetric {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        let (h, w) = (gt.h, gt.w);
        let pv = quantized(pred)?;
        let gv: Vec<u8> = gt.data.iter().map(|&v| v as u8).collect();
        self.pooled.update(&pv, &gv, IGNORE as u8);
        let p8: Vec<u8> = pv.iter().map(|&v| (v * 255.0) as u8).collect();
        let g8: Vec<u8> = gv.iter().map(|&v| if v == 1 { 255 } else { 0 }).collect();
        self.sod.update(&p8, &g8, h, w);
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({ "maxf": self.pooled.max_f(), "per_image": self.sod.summary() })
    }
}

impl TaskSpec for Saliency {
    fn name(&self) -> &'static str {
        "saliency"
    }
    fn discrete(&self) -> bool {
        true
    }
    fn head_channels(&self, _classes: usize) -> usize {
        2
    }
    fn default_weight(&self) -> f64 {
        5.0
    }
    /// Cross-entropy with the classes weighted (1 - p, p), p the share of negatives among the
    /// batch's labelled pixels.
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let valid = t.data.iter().filter(|&&v| v != IGNORE).count();
        let neg = t.data.iter().filter(|&&v| v == 0.0).count();
        let p = neg as f32 / valid.max(1) as f32;
        cross_entropy(logits, t, &[1.0 - p, p])
    }
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(logits, 1)?
            .narrow(1, 1, 1)?
            .squeeze(1)?)
    }
    fn metric(&self, _ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(SalMetric::default())
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("maxf", false)
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        picture(pred, |v, i, _| grey(v[i]))
    }
}
