//! Distillation losses (SPEC.md section 3): per (teacher, level) term on feature maps, the
//! smaller map bilinearly resized to the larger; terms are summed by the caller.

use crate::error::{Error, Result};
use crate::interp::resize_bilinear;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Which feature loss to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureLoss {
    /// `0.9 (1 - cos) + 0.1 SmoothL1(beta = 1)` (the reference)
    #[default]
    CosSmoothL1,
    /// `1 - cos`
    Cosine,
    /// mean squared error
    Mse,
}

/// Bring two `[B, C, h, w]` maps to the same grid: the smaller is bilinearly resized to the
/// larger (align_corners = false).
pub fn match_grids(student: &Tensor, teacher: &Tensor) -> Result<(Tensor, Tensor)> {
    let (bs, cs, hs, ws) = student.dims4()?;
    let (bt, ct, ht, wt) = teacher.dims4()?;
    if bs != bt || cs != ct {
        return Err(Error::Invalid(format!(
            "student map {:?} and teacher map {:?} differ in batch or channels",
            student.dims(),
            teacher.dims()
        )));
    }
    // The smaller grid goes to the larger; equal-size but different shapes go to the student's.
    Ok(if hs * ws < ht * wt {
        (resize_bilinear(student, (ht, wt))?, teacher.clone())
    } else {
        (student.clone(), resize_bilinear(teacher, (hs, ws))?)
    })
}

/// `1 - cos(s, t)` with the cosine over each image's whole flattened map (eps 1e-8 as
/// `F.cosine_similarity`), averaged over the batch.
pub fn cosine_distance(s: &Tensor, t: &Tensor) -> Result<Tensor> {
    let b = s.dim(0)?;
    let s = s.reshape((b, ()))?;
    let t = t.reshape((b, ()))?;
    let dot = (&s * &t)?.sum(D::Minus1)?;
    let ns = s.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nt = t.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / (ns * nt)?.clamp(1e-8, f64::INFINITY)?)?;
    Ok((1.0 - cos.mean_all()?)?)
}

/// Smooth L1 with beta = 1, mean over all elements.
pub fn smooth_l1(s: &Tensor, t: &Tensor) -> Result<Tensor> {
    let d = (s - t)?.abs()?;
    let quad = (d.sqr()? * 0.5)?;
    let lin = (&d - 0.5)?;
    let small = d.lt(1.0)?;
    Ok(small.where_cond(&quad, &lin)?.mean_all()?)
}

/// One distillation term between a student map and a teacher map (`[B, C, h, w]` each).
pub fn feature_loss(student: &Tensor, teacher: &Tensor, kind: FeatureLoss) -> Result<Tensor> {
    let (s, t) = match_grids(student, teacher)?;
    let t = t.detach();
    Ok(match kind {
        FeatureLoss::CosSmoothL1 => {
            ((cosine_distance(&s, &t)? * 0.9)? + (smooth_l1(&s, &t)? * 0.1)?)?
        }
        FeatureLoss::Cosine => cosine_distance(&s, &t)?,
        FeatureLoss::Mse => (&s - &t)?.sqr()?.mean_all()?,
    })
}

/// Task-loss weights and the head's target layout per task (SPEC.md section 3).
pub mod tasks {
    use crate::data::dense::{Task, IGNORE};
    use crate::error::{Error, Result};
    use candle_core::{Device, Tensor};

    /// Default task weights: PASCAL semseg 1, parts 2, normals 10, saliency 5, edge 50;
    /// NYUD semseg 1, normals 10, edge 50, depth 1.
    pub fn default_weight(task: Task) -> f64 {
        match task {
            Task::Semseg | Task::Depth => 1.0,
            Task::Parts => 2.0,
            Task::Normals => 10.0,
            Task::Saliency => 5.0,
            Task::Edge => 50.0,
        }
    }

    /// Positive/negative weights of the boundary BCE.
    pub const EDGE_POS_WEIGHT: f64 = 0.95;

    /// A batch of labels for one task: `[B, H, W]` (class maps, 255 = ignore) or `[B, c, H, W]`
    /// (normals, depth; zero = ignore), as host data.
    pub struct Target {
        pub task: Task,
        pub b: usize,
        pub c: usize,
        pub h: usize,
        pub w: usize,
        /// channel-first per image: b x c x h x w
        pub data: Vec<f32>,
    }

    fn tensor(v: Vec<f32>, shape: &[usize], dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, dev)?)
    }

    /// The task's loss on full-resolution logits `[B, C, H, W]`.
    pub fn task_loss(logits: &Tensor, t: &Target) -> Result<Tensor> {
        let (b, c, h, w) = logits.dims4()?;
        if (b, h, w) != (t.b, t.h, t.w) {
            return Err(Error::Invalid(format!(
                "{}: logits {:?} do not match labels {}x{}x{}",
                t.task.name(),
                logits.dims(),
                t.b,
                t.h,
                t.w
            )));
        }
        let dev = logits.device();
        let hw = h * w;
        match t.task {
            Task::Semseg | Task::Parts | Task::Saliency => {
                // Cross-entropy summed over valid pixels / their number; saliency weights the
                // classes by (1 - p, p) with p the share of negatives in the batch.
                let valid = t.data.iter().filter(|&&v| v != IGNORE).count();
                let weights = if t.task == Task::Saliency {
                    let neg = t.data.iter().filter(|&&v| v == 0.0).count();
                    let p = neg as f32 / valid.max(1) as f32;
                    vec![1.0 - p, p]
                } else {
                    vec![1.0; c]
                };
                let mut onehot = vec![0f32; b * c * hw];
                for i in 0..b {
                    for px in 0..hw {
                        let v = t.data[i * hw + px];
                        if v == IGNORE {
                            continue;
                        }
                        let k = v as usize;
                        if k >= c {
                            return Err(Error::Invalid(format!(
                                "{} label {k} outside the head's {c} classes",
                                t.task.name()
                            )));
                        }
                        onehot[(i * c + k) * hw + px] = weights[k];
                    }
                }
                let onehot = tensor(onehot, &[b, c, h, w], dev)?;
                let logp = candle_nn::ops::log_softmax(logits, 1)?;
                Ok(((logp * onehot)?.sum_all()?.neg()? / valid.max(1) as f64)?)
            }
            Task::Edge => {
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
            Task::Normals => {
                // L2-normalised prediction, L1 over the three channels, / valid pixels.
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
                let mask = tensor(mask, &[b, 1, h, w], dev)?;
                let g = tensor(t.data.clone(), &[b, 3, h, w], dev)?;
                let norm = logits
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::INFINITY)?;
                let p = logits.broadcast_div(&norm)?;
                let l = (p - g)?.abs()?.broadcast_mul(&mask)?;
                Ok((l.sum_all()? / valid.max(1) as f64)?)
            }
            Task::Depth => {
                let mask: Vec<f32> = t.data.iter().map(|&v| (v > 0.0) as u8 as f32).collect();
                let valid = mask.iter().filter(|&&m| m > 0.0).count();
                let mask = tensor(mask, &[b, 1, h, w], dev)?;
                let g = tensor(t.data.clone(), &[b, 1, h, w], dev)?;
                let l = (logits - g)?.abs()?.mul(&mask)?;
                Ok((l.sum_all()? / valid.max(1) as f64)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference: torch 2.15, seed 0, s = randn(2,3,2,2), t = randn(2,3,4,4) rounded to 4
    /// decimals; s upsampled bilinearly to 4x4; printed losses below.
    /// One reference value that clippy mistakes for log10(e).
    #[allow(clippy::approx_constant)]
    const T_4342: f32 = 0.4342;

    #[test]
    fn matches_torch() {
        let s: [f32; 24] = [
            -1.1258, -1.1524, -0.2506, -0.4339, 0.8487, 0.692, -0.316, -2.1152, 0.4681, -0.1577,
            1.4437, 0.266, 0.1665, 0.8744, -0.1435, -0.1116, 0.9318, 1.259, 2.005, 0.0537, 0.6181,
            -0.4128, -0.8411, -2.316,
        ];
        let t: [f32; 96] = [
            -0.2159, -0.7425, 0.5627, 0.2596, -0.174, -0.6787, 0.9383, 0.4889, 1.2032, 0.0845,
            -1.2001, -0.0048, -0.5181, -0.3067, -1.581, 1.7066, 0.2055, -0.4503, -0.5731, -0.5554,
            0.5943, 1.5419, 0.5073, -0.591, -1.3253, 0.1886, -0.0691, -0.4949, -1.4959, -0.1938,
            0.4455, 1.3253, 1.5091, 2.082, 1.7067, 2.3804, -1.1256, -0.317, -1.0925, -0.0852,
            0.3276, -0.7607, -1.5991, 0.0185, -0.7504, 0.1854, 0.6211, 0.6382, -0.0033, -0.5344,
            1.1687, 0.3945, 1.9415, 0.7915, -0.0203, -0.4372, -1.5353, -0.4127, 0.9663, 1.6248,
            -0.3656, -1.3024, 0.0994, 0.4418, 0.0732, 1.1133, 0.2823, T_4342, -0.8025, -1.2952,
            -0.7502, -1.312, 0.2064, -0.3334, -0.4288, 0.2329, 0.7969, -0.1848, -0.3701, -1.2103,
            -0.7015, 1.0367, -0.6037, -1.2788, 0.093, -0.6661, 0.608, -0.73, 1.375, 0.6596, 0.4766,
            -1.0163, 0.1804, 0.1083, -0.7548, 0.2443,
        ];
        let s = Tensor::from_slice(&s, (2, 3, 2, 2), &Device::Cpu).unwrap();
        let t = Tensor::from_slice(&t, (2, 3, 4, 4), &Device::Cpu).unwrap();
        for (kind, want) in [
            (FeatureLoss::CosSmoothL1, 0.995_251_8_f32),
            (FeatureLoss::Cosine, 1.032_647_4),
            (FeatureLoss::Mse, 1.637_555_5),
        ] {
            let got = feature_loss(&s, &t, kind)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((got - want).abs() < 1e-5, "{kind:?}: {got} vs {want}");
            // the teacher map is the larger one here; swapping roles resizes the other way
        }
    }
}
