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

impl FeatureLoss {
    /// The weights of the cosine, smooth-L1 and MSE terms.
    pub fn weights(self) -> crate::kernels::LossWeights {
        let (cosine, smooth_l1, mse) = match self {
            FeatureLoss::CosSmoothL1 => (0.9, 0.1, 0.0),
            FeatureLoss::Cosine => (1.0, 0.0, 0.0),
            FeatureLoss::Mse => (0.0, 0.0, 1.0),
        };
        crate::kernels::LossWeights {
            cosine,
            smooth_l1,
            mse,
        }
    }
}

/// The grid a student grid and a teacher grid are compared on: the larger (by cells); equal
/// sizes keep the student's.
pub fn compare_grid(student: (usize, usize), teacher: (usize, usize)) -> (usize, usize) {
    if student.0 * student.1 < teacher.0 * teacher.1 {
        teacher
    } else {
        student
    }
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
    Ok(if compare_grid((hs, ws), (ht, wt)) == (hs, ws) {
        (student.clone(), resize_bilinear(teacher, (hs, ws))?)
    } else {
        (resize_bilinear(student, (ht, wt))?, teacher.clone())
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
    let w = kind.weights();
    if let Some(l) = crate::kernels::fused_feature_loss(&s, &t, w)? {
        return Ok(l);
    }
    // Off the CPU fast path: the same terms from candle ops.
    let mut total = Tensor::zeros((), s.dtype(), s.device())?;
    if w.cosine != 0.0 {
        total = (total + (cosine_distance(&s, &t)? * w.cosine)?)?;
    }
    if w.smooth_l1 != 0.0 {
        total = (total + (smooth_l1(&s, &t)? * w.smooth_l1)?)?;
    }
    if w.mse != 0.0 {
        total = (total + ((&s - &t)?.sqr()?.mean_all()? * w.mse)?)?;
    }
    Ok(total)
}

/// One teacher's distillation loss: a term per level (student map against the teacher map,
/// normalised by `norms[level]` when the targets are normalised), summed.
pub fn teacher_loss(
    student: &[Tensor],
    teacher: &[Tensor],
    kind: FeatureLoss,
    norms: Option<&[crate::target_norm::LevelNorm]>,
) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (k, (s, t)) in student.iter().zip(teacher).enumerate() {
        let t = match norms.and_then(|n| n.get(k)) {
            Some(n) => n.normalize(t)?,
            None => t.clone(),
        };
        // Losses are computed in f32 whatever the compute dtype.
        let l = feature_loss(&s.to_dtype(candle_core::DType::F32)?, &t, kind)?;
        total = Some(match total {
            Some(a) => (a + l)?,
            None => l,
        });
    }
    total.ok_or_else(|| Error::Invalid("teacher without levels".into()))
}

/// Task losses: each task's spec ([`crate::tasks`]) owns its loss and default weight.
pub mod tasks {
    use crate::error::Result;
    pub use crate::tasks::edge::EDGE_POS_WEIGHT;
    pub use crate::tasks::Target;
    use crate::tasks::Task;
    use candle_core::Tensor;

    /// Default task weight (SPEC.md section 3).
    pub fn default_weight(task: Task) -> f64 {
        task.spec().default_weight()
    }

    /// The task's loss on full-resolution logits `[B, C, H, W]`.
    pub fn task_loss(logits: &Tensor, t: &Target) -> Result<Tensor> {
        t.task.spec().loss(logits, t)
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

    /// Loss and student gradient against torch (`gen_fixtures.py feature_loss`): f32 runs the
    /// fused CPU kernel, f64 the composition of candle ops used off the fast path.
    #[test]
    fn loss_and_gradient_match_torch() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/refs/feature-loss.safetensors");
        let refs = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
        let kinds = [
            ("cos_smooth_l1", FeatureLoss::CosSmoothL1),
            ("cosine", FeatureLoss::Cosine),
            ("mse", FeatureLoss::Mse),
        ];
        for case in ["a", "b"] {
            for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
                let s = refs[&format!("{case}.student")].to_dtype(dtype).unwrap();
                let t = refs[&format!("{case}.teacher")].to_dtype(dtype).unwrap();
                for (name, kind) in kinds {
                    let sv = candle_core::Var::from_tensor(&s).unwrap();
                    let loss = feature_loss(sv.as_tensor(), &t, kind).unwrap();
                    let got = loss.to_dtype(candle_core::DType::F64).unwrap();
                    let got = got.to_scalar::<f64>().unwrap();
                    let want = refs[&format!("{case}.{name}.loss")]
                        .to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()[0];
                    let what = format!("{case} {name} {dtype:?}");
                    assert!(
                        (got - want).abs() < 1e-5 * want.abs(),
                        "{what}: {got} vs {want}"
                    );
                    let g = loss.backward().unwrap();
                    let g = g.get(sv.as_tensor()).unwrap();
                    let g = g.to_dtype(candle_core::DType::F64).unwrap();
                    let want = &refs[&format!("{case}.{name}.grad")];
                    let want = want.to_dtype(candle_core::DType::F64).unwrap();
                    let scale = want.abs().unwrap().max_all().unwrap();
                    let scale = scale.to_scalar::<f64>().unwrap();
                    let err = (g - want).unwrap().abs().unwrap().max_all().unwrap();
                    let err = err.to_scalar::<f64>().unwrap();
                    assert!(
                        scale > 0.0 && err < 1e-4 * scale,
                        "{what}: grad {err} vs {scale}"
                    );
                }
            }
        }
    }
}
