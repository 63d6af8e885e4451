//! Class-map tasks (semantic segmentation, human parts): per-pixel cross-entropy over labelled
//! pixels, argmax prediction, mean IoU, VOC colours.

use super::{
    cross_entropy, picture, LabelMap, MetricContext, Target, TaskMetric, TaskSpec, IGNORE,
};
use crate::error::Result;
use crate::metrics::segmentation::MeanIou;
use candle_core::{DType, Tensor};
use image::RgbImage;

/// A class-map task with its default loss weight.
pub struct ClassMap {
    pub name: &'static str,
    pub weight: f64,
}

pub const SEMSEG: ClassMap = ClassMap {
    name: "semseg",
    weight: 1.0,
};
pub const PARTS: ClassMap = ClassMap {
    name: "parts",
    weight: 2.0,
};

/// The PASCAL VOC colour of class `c` (bits of the index spread over the three channels).
pub fn class_colour(c: u32) -> [u8; 3] {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = c;
    for j in 0..8 {
        r |= ((c & 1) as u8) << (7 - j);
        g |= (((c >> 1) & 1) as u8) << (7 - j);
        b |= (((c >> 2) & 1) as u8) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

/// Argmax over the class axis of `[B, C, ...]`, as f32 class indices.
pub(crate) fn argmax_classes(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.argmax(1)?.to_dtype(DType::F32)?)
}

struct Iou(MeanIou);

impl TaskMetric for Iou {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        let pv: Vec<u32> = pred
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| v as u32)
            .collect();
        let gv: Vec<u32> = gt.data.iter().map(|&v| v as u32).collect();
        self.0.update(&pv, &gv);
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({ "miou": self.0.miou(), "per_class_iou": self.0.per_class() })
    }
}

impl TaskSpec for ClassMap {
    fn name(&self) -> &'static str {
        self.name
    }
    fn discrete(&self) -> bool {
        true
    }
    fn head_channels(&self, classes: usize) -> usize {
        classes
    }
    fn default_weight(&self) -> f64 {
        self.weight
    }
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let c = logits.dim(1)?;
        cross_entropy(logits, t, &vec![1.0; c])
    }
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        argmax_classes(logits)
    }
    fn metric(&self, ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(Iou(MeanIou::new(ctx.classes.max(1), IGNORE as u32)))
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("miou", false)
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        picture(pred, |v, i, _| class_colour(v[i] as u32))
    }
}
