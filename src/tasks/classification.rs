//! Image classification: one label per image (a 1x1 label map, 255 = unlabelled). Logits may be
//! `[B, C]` or a dense `[B, C, H, W]` map, which is averaged over space first. Cross-entropy,
//! argmax, top-1 accuracy and mean per-class accuracy (both in %), a class-coloured swatch.

use super::segmentation::{argmax_classes, class_colour};
use super::{
    cross_entropy, picture, LabelMap, MetricContext, Target, TaskMetric, TaskSpec, IGNORE,
};
use crate::error::{Error, Result};
use candle_core::Tensor;
use image::RgbImage;

pub struct Classify;

/// `[B, C]` or `[B, C, H, W]` logits as `[B, C, 1, 1]` (spatial mean).
fn pooled(logits: &Tensor) -> Result<Tensor> {
    Ok(match logits.rank() {
        2 => logits.unsqueeze(2)?.unsqueeze(3)?,
        4 => logits.mean_keepdim(3)?.mean_keepdim(2)?,
        r => {
            return Err(Error::Invalid(format!(
                "classification logits must be [B, C] or [B, C, H, W], got rank {r}"
            )))
        }
    })
}

/// Top-1 and mean per-class accuracy.
#[derive(Default)]
pub struct Accuracy {
    /// per class: (correct, seen)
    per_class: Vec<(u64, u64)>,
}

impl Accuracy {
    pub fn add(&mut self, pred: usize, label: usize) {
        if self.per_class.len() <= label {
            self.per_class.resize(label + 1, (0, 0));
        }
        self.per_class[label].1 += 1;
        if pred == label {
            self.per_class[label].0 += 1;
        }
    }
    /// Share of correctly classified images, in %.
    pub fn top1(&self) -> f64 {
        let (c, n) = self
            .per_class
            .iter()
            .fold((0, 0), |(a, b), &(c, n)| (a + c, b + n));
        100.0 * c as f64 / n.max(1) as f64
    }
    /// Mean over classes that occur of each class's accuracy, in %.
    pub fn mean_class(&self) -> f64 {
        let accs: Vec<f64> = self
            .per_class
            .iter()
            .filter(|x| x.1 > 0)
            .map(|&(c, n)| c as f64 / n as f64)
            .collect();
        100.0 * accs.iter().sum::<f64>() / accs.len().max(1) as f64
    }
}

impl TaskMetric for Accuracy {
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()> {
        let p = pred.flatten_all()?.to_vec1::<f32>()?;
        for (&p, &g) in p.iter().zip(&gt.data) {
            if g != IGNORE {
                self.add(p as usize, g as usize);
            }
        }
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({ "top1": self.top1(), "mean_class_acc": self.mean_class() })
    }
}

impl TaskSpec for Classify {
    fn name(&self) -> &'static str {
        "classify"
    }
    fn discrete(&self) -> bool {
        true
    }
    fn head_channels(&self, classes: usize) -> usize {
        classes
    }
    fn default_weight(&self) -> f64 {
        1.0
    }
    fn loss(&self, logits: &Tensor, t: &Target) -> Result<Tensor> {
        let x = pooled(logits)?;
        cross_entropy(&x, t, &vec![1.0; x.dim(1)?])
    }
    /// `[B, 1, 1]` class indices.
    fn predict(&self, logits: &Tensor) -> Result<Tensor> {
        argmax_classes(&pooled(logits)?)
    }
    fn metric(&self, _ctx: &MetricContext) -> Box<dyn TaskMetric> {
        Box::new(Accuracy::default())
    }
    fn main_metric(&self) -> (&'static str, bool) {
        ("top1", false)
    }
    fn render(&self, pred: &Tensor) -> Result<RgbImage> {
        picture(pred, |v, i, _| class_colour(v[i] as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Task;
    use candle_core::Device;

    #[test]
    fn cross_entropy_and_accuracy_by_hand() {
        // Two images, three classes; image 0 labelled 2, image 1 unlabelled... and a third
        // image labelled 0. Logits [B, C]:
        let logits = Tensor::new(
            &[[0f32, 1.0, 2.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let t = Target {
            task: Task::Classify,
            b: 3,
            c: 1,
            h: 1,
            w: 1,
            data: vec![2.0, IGNORE, 0.0],
        };
        let l = Classify
            .loss(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // -log softmax: image 0 at class 2: log(1 + e + e^2) - 2; image 2 at class 0:
        // log(e + 2) - 1; mean over the 2 labelled images.
        let e = std::f32::consts::E;
        let want = ((1.0 + e + e * e).ln() - 2.0 + (e + 2.0).ln() - 1.0) / 2.0;
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
        // A dense map gives the same as its spatial mean.
        let dense = logits.unsqueeze(2).unwrap().unsqueeze(3).unwrap();
        let dense = dense.repeat((1, 1, 2, 2)).unwrap();
        let l2 = Classify
            .loss(&dense, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l2 - want).abs() < 1e-5);
        let p = Classify.predict(&logits).unwrap();
        assert_eq!(p.dims(), &[3, 1, 1]);
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, 0.0, 0.0]
        );

        // Accuracy: class 0 seen 3 times, 2 right; class 1 seen once, wrong -> top1 50 %,
        // mean per-class (2/3 + 0) / 2 = 33.3 %.
        let mut a = Accuracy::default();
        for (p, g) in [(0, 0), (0, 0), (1, 0), (0, 1)] {
            a.add(p, g);
        }
        assert!((a.top1() - 50.0).abs() < 1e-9);
        assert!((a.mean_class() - 100.0 / 3.0).abs() < 1e-9);
    }
}
