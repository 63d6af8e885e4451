//! What each transfer stage minimises: cross-entropy on labels (teacher and student
//! fine-tuning; per pixel with an ignore value for segmentation, the logits resized bilinearly
//! to the mask), the temperature-scaled KL divergence from the fine-tuned teacher's predictions
//! (task-oriented distillation; for segmentation the teacher's logits are resized bilinearly to
//! the student's logit grid and the KL is averaged over its pixels), and a cosine or
//! contrastive loss between the student's projected features and the frozen teacher's
//! (task-agnostic distillation; for segmentation per patch, the student's map resized to the
//! teacher's patch grid).

use super::models::{Predictor, StudentNet, TeacherNet};
use crate::error::{Error, Result};
use crate::train::engine::{Objective, StepLoss, StepModel};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::log_softmax;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// Mean cross-entropy of logits `[B, K]` against class indices.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    if labels.len() != b {
        return Err(Error::Invalid(format!(
            "{} labels for a batch of {b}",
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
        return Err(Error::Invalid(format!("label {bad} outside {k} classes")));
    }
    let logp = log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(labels, logits.device())?.unsqueeze(1)?;
    Ok(logp.gather(&idx, 1)?.mean_all()?.neg()?)
}

/// Mean per-pixel cross-entropy of logits `[B, K, h, w]` against class maps `[B, H, W]` (u32):
/// the logits are resized bilinearly to (H, W) (mmseg's `resize` before the loss), pixels
/// labelled `ignore` are left out; 0 when every pixel is ignored.
pub fn pixel_cross_entropy(logits: &Tensor, labels: &Tensor, ignore: u32) -> Result<Tensor> {
    let (b, k, _, _) = logits.dims4()?;
    let (lb, h, w) = labels.dims3()?;
    if lb != b {
        return Err(Error::Invalid(format!("{lb} masks for a batch of {b}")));
    }
    let raw = labels.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = raw.iter().find(|&&l| l != ignore && l as usize >= k) {
        return Err(Error::Invalid(format!("label {bad} outside {k} classes")));
    }
    let valid: Vec<f32> = raw.iter().map(|&l| (l != ignore) as u32 as f32).collect();
    let safe: Vec<u32> = raw
        .iter()
        .map(|&l| if l == ignore { 0 } else { l })
        .collect();
    let n = valid.iter().sum::<f32>().max(1.0) as f64;
    let dev = logits.device();
    let up = crate::interp::resize_bilinear(&logits.to_dtype(DType::F32)?, (h, w))?;
    let logp = log_softmax(&up, 1)?;
    let idx = Tensor::from_vec(safe, (b, 1, h, w), dev)?;
    let mask = Tensor::from_vec(valid, (b, 1, h, w), dev)?;
    Ok(((logp.gather(&idx, 1)? * mask)?.sum_all()? / -n)?)
}

/// The supervision of a labelled batch.
pub enum Labels {
    /// a class per image
    Classes(Vec<u32>),
    /// a class map `[B, H, W]` (u32) per image, with its ignore value
    Masks { masks: Tensor, ignore: u32 },
}

impl Labels {
    pub fn images(&self) -> Result<usize> {
        Ok(match self {
            Labels::Classes(c) => c.len(),
            Labels::Masks { masks, .. } => masks.dim(0)?,
        })
    }

    /// The cross-entropy of `logits` (`[B, K]` or `[B, K, h, w]`) against these labels.
    pub fn loss(&self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Labels::Classes(c) => cross_entropy(logits, c),
            Labels::Masks { masks, ignore } => {
                pixel_cross_entropy(logits, &masks.to_device(logits.device())?, *ignore)
            }
        }
    }
}

/// Teacher logits on the student's output grid: `[B, K, h, w]` maps resized bilinearly where
/// the grids differ (class logits `[B, K]` pass as they are).
pub fn on_student_grid(teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    if teacher.rank() == 4 && student.rank() == 4 {
        let (_, _, h, w) = student.dims4()?;
        return crate::interp::resize_bilinear(&teacher.to_dtype(DType::F32)?, (h, w));
    }
    Ok(teacher.clone())
}

/// Knowledge distillation (Hinton et al.): `T^2 * KL(softmax(t / T) || softmax(s / T))`,
/// summed over classes and averaged over the batch (PyTorch's `batchmean`). Logits are `[B, K]`
/// or `[B, K, H, W]` maps (then averaged over pixels too).
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        return Err(Error::Invalid(format!(
            "student logits {:?} and teacher logits {:?} differ",
            student.dims(),
            teacher.dims()
        )));
    }
    let t = temperature;
    let ls = log_softmax(&(student.to_dtype(DType::F32)? / t)?, 1)?;
    let lt = log_softmax(&(teacher.to_dtype(DType::F32)?.detach() / t)?, 1)?;
    let kl = (lt.exp()? * (lt - ls)?)?.sum(1)?;
    Ok((kl.mean_all()? * (t * t))?)
}

/// How task-agnostic distillation compares features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FeatureMatch {
    /// `1 - cos(student, teacher)` per image
    Cosine,
    /// InfoNCE over the batch: each student feature must pick its own image's teacher feature
    /// among the batch's (cosine similarities / 0.07)
    Contrastive,
}

/// Temperature of the contrastive loss (CLIP's initial value).
pub const CONTRASTIVE_TAU: f64 = 0.07;

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

/// The feature loss of `[B, F]` student (projected) and teacher features.
pub fn feature_match_loss(
    student: &Tensor,
    teacher: &Tensor,
    kind: FeatureMatch,
) -> Result<Tensor> {
    let s = l2_normalize(&student.to_dtype(DType::F32)?)?;
    let t = l2_normalize(&teacher.to_dtype(DType::F32)?.detach())?;
    match kind {
        FeatureMatch::Cosine => Ok((1.0 - (s * t)?.sum(D::Minus1)?.mean_all()?)?),
        FeatureMatch::Contrastive => {
            let b = s.dim(0)?;
            let sim = (s.matmul(&t.t()?)? / CONTRASTIVE_TAU)?;
            let labels: Vec<u32> = (0..b as u32).collect();
            cross_entropy(&sim, &labels)
        }
    }
}

/// Per-location feature loss of a student map `[B, C, hs, ws]` (projected) against the
/// teacher's patch features `[B, C, ht, wt]`: the student's map is resized bilinearly to the
/// teacher's grid; cosine averages `1 - cos` over every location, contrastive is InfoNCE within
/// each image (each student patch must pick its own location's teacher patch among the
/// image's), averaged over images.
pub fn feature_map_loss(student: &Tensor, teacher: &Tensor, kind: FeatureMatch) -> Result<Tensor> {
    let (b, c, h, w) = teacher.dims4()?;
    let s = crate::interp::resize_bilinear(&student.to_dtype(DType::F32)?, (h, w))?;
    let tokens = |x: &Tensor| -> Result<Tensor> {
        Ok(crate::kernels::swap_inner(&x.reshape((b, c, h * w))?)?)
    };
    let s = l2_normalize(&tokens(&s)?)?;
    let t = l2_normalize(&tokens(&teacher.to_dtype(DType::F32)?.detach())?)?;
    match kind {
        FeatureMatch::Cosine => Ok((1.0 - (s * t)?.sum(D::Minus1)?.mean_all()?)?),
        FeatureMatch::Contrastive => {
            let n = h * w;
            let sim = (s.matmul(&t.transpose(1, 2)?.contiguous()?)? / CONTRASTIVE_TAU)?;
            let labels: Vec<u32> = (0..b).flat_map(|_| 0..n as u32).collect();
            cross_entropy(&sim.reshape((b * n, n))?, &labels)
        }
    }
}

/// A batch of crops with labels.
pub struct LabeledBatch {
    pub x: Tensor,
    pub labels: Labels,
    pub skipped: usize,
}

/// What the teacher contributes to a distillation batch.
pub enum TeacherInput {
    /// the same crops as the teacher sees them (it runs online)
    Pixels(Tensor),
    /// its logits of those crops, from the cache
    Logits(Tensor),
}

/// A batch of crops as the student sees them, with the teacher's side.
pub struct PairBatch {
    pub student: Tensor,
    pub teacher: TeacherInput,
    pub skipped: usize,
}

/// Fine-tuning on labels: cross-entropy of the model's logits.
pub struct Supervised<M: Predictor> {
    pub model: StepModel<M>,
    pub buffers: VarMap,
    pub device: Device,
}

impl<M: Predictor> Objective for Supervised<M> {
    type Batch = LabeledBatch;
    fn loss(&mut self, b: LabeledBatch, _step: u64) -> Result<StepLoss> {
        let x = b.x.to_device(&self.device)?.to_dtype(self.model.dtype())?;
        let logits = self.model.step()?.logits(&x, true)?;
        Ok(StepLoss {
            loss: b.labels.loss(&logits)?,
            parts: Vec::new(),
            images: b.labels.images()?,
            skipped: b.skipped,
        })
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        crate::train::engine::buffer_tensors(&self.buffers)
    }
}

/// What the student is trained to match on the transfer set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// the fine-tuned teacher's predictions, at this temperature
    Predictions(f64),
    /// the frozen teacher's features (pooled, or patch maps for segmentation), through the
    /// student's projection head
    Features(FeatureMatch),
}

/// Distillation on the unlabelled transfer set: the teacher runs frozen on its view of each
/// crop, the student learns to match it.
pub struct Distill {
    pub student: StepModel<StudentNet>,
    pub buffers: VarMap,
    pub teacher: TeacherNet,
    pub target: Target,
    pub device: Device,
}

impl Objective for Distill {
    type Batch = PairBatch;
    fn loss(&mut self, b: PairBatch, _step: u64) -> Result<StepLoss> {
        let dtype = self.student.dtype();
        let xs = b.student.to_device(&self.device)?.to_dtype(dtype)?;
        let student = self.student.step()?;
        let pixels =
            |x: &Tensor| -> Result<Tensor> { Ok(x.to_device(&self.device)?.to_dtype(dtype)?) };
        let dense = student.seg.is_some();
        let kd = |tl: Tensor, t: f64| -> Result<Tensor> {
            let sl = student.logits(&xs, true)?;
            kd_loss(&sl, &on_student_grid(&tl.detach(), &sl)?, t)
        };
        let loss = match (self.target, &b.teacher) {
            (Target::Predictions(t), TeacherInput::Logits(tl)) => {
                kd(tl.to_device(&self.device)?, t)?
            }
            (Target::Predictions(t), TeacherInput::Pixels(xt)) => {
                kd(self.teacher.logits(&pixels(xt)?, false)?, t)?
            }
            (Target::Features(kind), TeacherInput::Pixels(xt)) if dense => {
                let tf = self.teacher.feature_map(&pixels(xt)?)?.detach();
                feature_map_loss(&student.projected_map(&xs, true)?, &tf, kind)?
            }
            (Target::Features(kind), TeacherInput::Pixels(xt)) => {
                let tf = self.teacher.features(&pixels(xt)?)?.detach();
                feature_match_loss(&student.projected(&xs, true)?, &tf, kind)?
            }
            (Target::Features(_), TeacherInput::Logits(_)) => {
                return Err(Error::Invalid(
                    "feature distillation needs the teacher online, not cached logits".into(),
                ))
            }
        };
        Ok(StepLoss {
            loss,
            parts: Vec::new(),
            images: xs.dim(0)?,
            skipped: b.skipped,
        })
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        crate::train::engine::buffer_tensors(&self.buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2<const N: usize>(v: &[[f32; 3]; N]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn scalar(t: Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    fn softmax(v: &[f64]) -> Vec<f64> {
        let m = v.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn kd_loss_is_t_squared_kl_by_hand() {
        let s = [[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let t = [[2.0f32, 0.0, 1.0], [0.5, 0.5, 0.5]];
        for temp in [1.0, 2.0, 4.0] {
            let mut want = 0.0;
            for i in 0..2 {
                let ps = softmax(&s[i].map(|x| x as f64 / temp));
                let pt = softmax(&t[i].map(|x| x as f64 / temp));
                want += (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>();
            }
            want = want / 2.0 * temp * temp;
            let got = scalar(kd_loss(&t2(&s), &t2(&t), temp).unwrap());
            assert!((got - want).abs() < 1e-5, "T={temp}: {got} vs {want}");
        }
        // identical predictions: zero
        assert!(scalar(kd_loss(&t2(&s), &t2(&s), 3.0).unwrap()).abs() < 1e-6);
        // per-pixel maps [B, K, H, W]: the mean over images and pixels
        let map = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .unsqueeze(3)
                .unwrap()
                .repeat((1, 1, 2, 3))
                .unwrap()
        };
        let (sm, tm) = (map(&t2(&s)), map(&t2(&t)));
        let a = scalar(kd_loss(&sm, &tm, 2.0).unwrap());
        let b = scalar(kd_loss(&t2(&s), &t2(&t), 2.0).unwrap());
        assert!((a - b).abs() < 1e-5);
    }

    #[test]
    fn cross_entropy_and_feature_losses_by_hand() {
        let l = [[0.0f32, 1.0, 2.0], [5.0, 0.0, 0.0]];
        let got = scalar(cross_entropy(&t2(&l), &[2, 1]).unwrap());
        let e = std::f64::consts::E;
        let want = ((1.0 + e + e * e).ln() - 2.0 + (e.powi(5) + 2.0).ln()) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!(cross_entropy(&t2(&l), &[3, 0]).is_err());

        // cosine: (1, 0, 0) vs (1, 1, 0): 1 - 1/sqrt2; (0, 2, 0) vs (0, 1, 0): 0
        let s = t2(&[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]);
        let t = t2(&[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]);
        let got = scalar(feature_match_loss(&s, &t, FeatureMatch::Cosine).unwrap());
        let want = (1.0 - 1.0 / 2f64.sqrt()) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // contrastive: cosine matrix [[1/sqrt2, 0], [1/sqrt2, 1]] / tau, CE against the diagonal
        let c = 1.0 / 2f64.sqrt() / CONTRASTIVE_TAU;
        let r = 1.0 / CONTRASTIVE_TAU;
        let want = ((c.exp() + 1.0).ln() - c + (c.exp() + r.exp()).ln() - r) / 2.0;
        let got = scalar(feature_match_loss(&s, &t, FeatureMatch::Contrastive).unwrap());
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }

    /// Bilinear (align_corners=False) weights of upsampling 2 columns to 4: clamped source
    /// positions 0, 0.25, 0.75, 1.
    fn up2to4(a: f64, b: f64) -> [f64; 4] {
        [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    }

    #[test]
    fn pixel_cross_entropy_resizes_and_ignores_by_hand() {
        // logits [1, K=2, 1, 2] -> resized to the 2x4 mask
        let (c0, c1) = ([0.0f64, 2.0], [1.0f64, -1.0]);
        let logits = Tensor::new(&[[[[0.0f32, 2.0]], [[1.0, -1.0]]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[[0u32, 1, 255, 1], [1, 0, 0, 255]]], &Device::Cpu).unwrap();
        let (u0, u1) = (up2to4(c0[0], c0[1]), up2to4(c1[0], c1[1]));
        let lab = [[0u32, 1, 255, 1], [1, 0, 0, 255]];
        let (mut sum, mut n) = (0.0, 0.0);
        for row in lab {
            for (x, &l) in row.iter().enumerate() {
                if l == 255 {
                    continue;
                }
                let p = softmax(&[u0[x], u1[x]]);
                sum -= p[l as usize].ln();
                n += 1.0;
            }
        }
        let got = scalar(pixel_cross_entropy(&logits, &labels, 255).unwrap());
        assert!((got - sum / n).abs() < 1e-5, "{got} vs {}", sum / n);
        // through Labels, and a label outside the classes is refused
        let l = Labels::Masks {
            masks: labels,
            ignore: 255,
        };
        assert!((scalar(l.loss(&logits).unwrap()) - sum / n).abs() < 1e-5);
        let bad = Tensor::new(&[[[0u32, 2, 0, 0], [0, 0, 0, 0]]], &Device::Cpu).unwrap();
        assert!(pixel_cross_entropy(&logits, &bad, 255).is_err());
        // every pixel ignored: zero
        let none = Tensor::new(&[[[255u32; 4], [255; 4]]], &Device::Cpu).unwrap();
        assert_eq!(
            scalar(pixel_cross_entropy(&logits, &none, 255).unwrap()),
            0.0
        );
    }

    #[test]
    fn per_pixel_kd_resizes_the_teacher_to_the_student_grid_by_hand() {
        // teacher [1, 2, 1, 2], student [1, 2, 2, 4] (varying per column)
        let t = Tensor::new(&[[[[0.0f32, 2.0]], [[1.0, -1.0]]]], &Device::Cpu).unwrap();
        let sv = [[0.5f32, -0.5, 1.0, 0.0], [0.0, 0.3, -1.0, 2.0]];
        let s = Tensor::new(&[[[sv[0], sv[0]], [sv[1], sv[1]]]], &Device::Cpu).unwrap();
        let (u0, u1) = (up2to4(0.0, 2.0), up2to4(1.0, -1.0));
        let temp = 2.0;
        let mut want = 0.0;
        for x in 0..4 {
            let pt = softmax(&[u0[x] / temp, u1[x] / temp]);
            let ps = softmax(&[sv[0][x] as f64 / temp, sv[1][x] as f64 / temp]);
            want += (0..2).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>();
        }
        want = want / 4.0 * temp * temp;
        let aligned = on_student_grid(&t, &s).unwrap();
        assert_eq!(aligned.dims(), &[1, 2, 2, 4]);
        let got = scalar(kd_loss(&s, &aligned, temp).unwrap());
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn patch_feature_losses_by_hand() {
        // student [1, 2, 2, 2] resized to the teacher's 1x1 grid = the mean of its 4 cells
        let s = Tensor::new(
            &[[[[1.0f32, 3.0], [1.0, 3.0]], [[0.0, 0.0], [2.0, 2.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        let t = Tensor::new(&[[[[1.0f32]], [[0.0]]]], &Device::Cpu).unwrap();
        // mean student feature (2, 1): cos with (1, 0) = 2 / sqrt 5
        let got = scalar(feature_map_loss(&s, &t, FeatureMatch::Cosine).unwrap());
        let want = 1.0 - 2.0 / 5f64.sqrt();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // contrastive within an image: two locations, student (1,0),(0,1) vs teacher
        // (1,0),(1,1): rows of cos / tau, each must pick its own location
        let s = Tensor::new(&[[[[1.0f32, 0.0]], [[0.0, 1.0]]]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[[[1.0f32, 1.0]], [[0.0, 1.0]]]], &Device::Cpu).unwrap();
        let (r, c) = (1.0 / CONTRASTIVE_TAU, 1.0 / 2f64.sqrt() / CONTRASTIVE_TAU);
        // row 0: sims (1, 1/sqrt2) target 0; row 1: sims (0, 1/sqrt2) target 1
        let want = ((r.exp() + c.exp()).ln() - r + (1.0 + c.exp()).ln() - c) / 2.0;
        let got = scalar(feature_map_loss(&s, &t, FeatureMatch::Contrastive).unwrap());
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}
