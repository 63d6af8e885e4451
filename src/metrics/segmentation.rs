//! Mean intersection-over-union for semantic segmentation and human parts, accumulated over a
//! data set: per-class TP/FP/FN pooled over every pixel, IoU averaged over all classes
//! (background included; a class whose union is empty counts 0, as the reference does).

/// Confusion counts over a data set.
#[derive(Clone, Debug)]
pub struct MeanIou {
    classes: usize,
    ignore: u32,
    tp: Vec<u64>,
    fp: Vec<u64>,
    fn_: Vec<u64>,
}

impl MeanIou {
    pub fn new(classes: usize, ignore: u32) -> Self {
        MeanIou {
            classes,
            ignore,
            tp: vec![0; classes],
            fp: vec![0; classes],
            fn_: vec![0; classes],
        }
    }

    /// Add one image: predicted class per pixel and ground truth (`ignore` pixels skipped;
    /// ground-truth values >= `classes` are treated as ignore too).
    pub fn update(&mut self, pred: &[u32], gt: &[u32]) {
        for (&p, &g) in pred.iter().zip(gt) {
            if g == self.ignore || g as usize >= self.classes {
                continue;
            }
            let (p, g) = (p as usize, g as usize);
            if p == g {
                self.tp[g] += 1;
            } else {
                self.fn_[g] += 1;
                if p < self.classes {
                    self.fp[p] += 1;
                }
            }
        }
    }

    /// IoU of every class (0 where the union is empty).
    pub fn per_class(&self) -> Vec<f64> {
        (0..self.classes)
            .map(|c| {
                let u = self.tp[c] + self.fp[c] + self.fn_[c];
                if u == 0 {
                    0.0
                } else {
                    self.tp[c] as f64 / u as f64
                }
            })
            .collect()
    }

    /// Share of labelled pixels predicted right (0 when none is labelled).
    pub fn pixel_acc(&self) -> f64 {
        let tp: u64 = self.tp.iter().sum();
        let all = tp + self.fn_.iter().sum::<u64>();
        if all == 0 {
            0.0
        } else {
            tp as f64 / all as f64
        }
    }

    /// mIoU in percent.
    pub fn miou(&self) -> f64 {
        100.0 * self.per_class().iter().sum::<f64>() / self.classes as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_accuracy_and_iou_by_hand() {
        // 3 classes, ignore 255: gt [0 0 1 1 2 255], pred [0 1 1 1 0 2]
        let mut m = MeanIou::new(3, 255);
        m.update(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 255]);
        // 3 of 5 labelled pixels right
        assert!((m.pixel_acc() - 0.6).abs() < 1e-12);
        // class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 -> 0
        let iou = m.per_class();
        assert!((iou[0] - 1.0 / 3.0).abs() < 1e-12 && (iou[1] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou[2], 0.0);
        assert!((m.miou() - 100.0 / 3.0).abs() < 1e-9);
    }
}
