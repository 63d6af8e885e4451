//! Boundary detection: weighted binary cross-entropy (positives 0.95, negatives 0.05) over
//! labelled pixels, sigmoid probability, the BSDS benchmark (ODS/OIS F, AP), grey levels.

use super::{
    grey, picture, quantized, tensor, LabelMap, MetricContext, Target, TaskMetric, TaskSpec, IGNORE,
};
use crate::error::Result;
use crate::metrics::boundary::{self, BinaryMap, BoundaryOptions, Counts, EdgeMap};
use candle_core::Tensor;
use image::RgbImage;

/// Weight of boundary pixels in the BCE (the rest get 1 - this).
pub const EDGE_POS_WEIGHT: f64 = 0.95;

pub struct Edge;

struct Bench {
    opts: BoundaryOptions,
    counts: Vec<Vec<Counts>>,
}

impl TaskMetric for Bench {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        let (h, w) = (gt.h, gt.w);
        let gt_map = BinaryMap {
            h,
            w,
            data: gt.data.iter().map(|&v| v == 1.0).collect(),
        };
        let pb = EdgeMap {
            h,
            w,
            data: quantized(pred)?,
        };
        self.counts
            .push(boundary::evaluate_image(&pb, &[gt_map], &self.opts));
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        let res = boundary::collect(&self.opts.threshold_values(), &self.counts);
        serde_json::json!({ "ods_f": 100.0 * res.ods_f, "ois_f": 100.0 * res.ois_f,
            "ap": 100.0 * res.ap, "max_dist": self.opts.max_dist })
    }
}

impl TaskSpec for Edge {
    fn name(&self) -> &'static str {
        "edge"
    }
    fn discrete(&self) -> bool {
        true
    }
    fn head_channels(&self, _classes: usize) -> usize {
        1
    }
    fn default_weight(&self) -> f64 {
        50.0
    }
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let (b, _, h, w) = t.check(logits)?;
        let hw = h * w;
        let mut mpos = vec![0f32; b * hw];
        let mut mneg = vec![0f32; b * hw];
        let mut valid = 0usize;
        for (i, &v) in t.data.iter().enumerate() {
            if v == IGNORE {
                continue;
            }
            valid += 1;
            if v > 0.5 {
                mpos[i] = EDGE_POS_WEIGHT as f32;
            } else {
                mneg[i] = (1.0 - EDGE_POS_WEIGHT) as f32;
            }
        }
        let dev = logits.device();
        let x = logits.squeeze(1)?;
        let mpos = tensor(mpos, &[b, h, w], dev)?;
        let mneg = tensor(mneg, &[b, h, w], dev)?;
        // softplus(x) = max(x, 0) + log(1 + exp(-|x|)); BCE(y=1) = softplus(-x),
        // BCE(y=0) = softplus(x).
        let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
        let sp_pos = (x.neg()?.relu()? + &tail)?;
        let sp_neg = (x.relu()? + &tail)?;
        let l = ((sp_pos * mpos)? + (sp_neg * mneg)?)?;
        Ok((l.sum_all()? / valid.max(1) as f64)?)
    }
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(logits)?.squeeze(1)?)
    }
    fn metric(&self, ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(Bench {
            opts: ctx.edge.clone(),
            counts: Vec::new(),
        })
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("ods_f", false)
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        picture(pred, |v, i, _| grey(v[i]))
    }
}
