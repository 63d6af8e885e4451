//! What each transfer stage minimises: cross-entropy on labels (teacher and student
//! fine-tuning), the temperature-scaled KL divergence from the fine-tuned teacher's predictions
//! (task-oriented distillation), and a cosine or contrastive loss between the student's
//! projected features and the frozen teacher's (task-agnostic distillation).

use super::models::{Classifier, StudentNet, TeacherNet};
use crate::error::{Error, Result};
use crate::train::engine::{vars_of, Objective, StepLoss, StepModel};
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

/// A batch of crops with labels.
pub struct LabeledBatch {
    pub x: Tensor,
    pub labels: Vec<u32>,
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

/// The tensors of a buffer store (BatchNorm statistics), for checkpoints.
fn buffer_tensors(buffers: &VarMap) -> Result<Vec<(String, Tensor)>> {
    Ok(vars_of(buffers)?
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect())
}

/// Fine-tuning on labels: cross-entropy of the model's logits.
pub struct Supervised<M: Classifier> {
    pub model: StepModel<M>,
    pub buffers: VarMap,
    pub device: Device,
}

impl<M: Classifier> Objective for Supervised<M> {
    type Batch = LabeledBatch;
    fn loss(&mut self, b: LabeledBatch, _step: u64) -> Result<StepLoss> {
        let x = b.x.to_device(&self.device)?.to_dtype(self.model.dtype())?;
        let logits = self.model.step()?.logits(&x, true)?;
        Ok(StepLoss {
            loss: cross_entropy(&logits, &b.labels)?,
            parts: Vec::new(),
            images: b.labels.len(),
            skipped: b.skipped,
        })
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        buffer_tensors(&self.buffers)
    }
}

/// What the student is trained to match on the transfer set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// the fine-tuned teacher's predictions, at this temperature
    Predictions(f64),
    /// the frozen teacher's pooled features, through the student's projection head
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
        let loss = match (self.target, &b.teacher) {
            (Target::Predictions(t), TeacherInput::Logits(tl)) => {
                kd_loss(&student.logits(&xs, true)?, &tl.to_device(&self.device)?, t)?
            }
            (Target::Predictions(t), TeacherInput::Pixels(xt)) => {
                let tl = self.teacher.logits(&pixels(xt)?, false)?.detach();
                kd_loss(&student.logits(&xs, true)?, &tl, t)?
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
        buffer_tensors(&self.buffers)
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
        let sm = t2(&s)
            .unsqueeze(2)
            .unwrap()
            .unsqueeze(3)
            .unwrap()
            .repeat((1, 1, 2, 3))
            .unwrap();
        let tm = t2(&t)
            .unsqueeze(2)
            .unwrap()
            .unsqueeze(3)
            .unwrap()
            .repeat((1, 1, 2, 3))
            .unwrap();
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
}
