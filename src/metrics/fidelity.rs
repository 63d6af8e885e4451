//! How faithfully a student reproduces a teacher's feature maps, per token.
//!
//! - raw cosine: `cos(s_i, t_i)` per token, averaged;
//! - centred cosine: `cos(s_i - m, t_i - m)` with `m` the teacher's mean feature over every
//!   evaluated token, averaged. The direction shared by all tokens (which dominates the raw
//!   cosine of ViT features) is removed, so what remains is the spatial and semantic structure:
//!   a student that outputs the teacher's mean everywhere scores 0;
//! - spread: the standard deviation of the per-token centred cosine;
//! - map cosine: the reference loss's similarity (cosine over each image's whole flattened
//!   map), averaged over images.
//!
//! Cosines clamp the norm product at 1e-8 as `F.cosine_similarity` does.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;

/// Accumulated agreement of one (teacher, level).
#[derive(Clone, Debug)]
pub struct Fidelity {
    /// teacher mean feature `[C]` (f32)
    mean: Tensor,
    raw: f64,
    centred: f64,
    centred_sq: f64,
    map: f64,
    tokens: usize,
    images: usize,
}

/// Summary of one (teacher, level).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FidelityReport {
    pub raw_cos: f64,
    pub centred_cos: f64,
    pub centred_cos_std: f64,
    pub map_cos: f64,
    pub tokens: usize,
    pub images: usize,
}

/// Row-wise cosine of two `[N, C]` matrices.
fn row_cos(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    Ok((dot / (na * nb)?.clamp(1e-8, f64::INFINITY)?)?)
}

/// `[B, C, h, w]` -> `[B*h*w, C]` tokens in f32.
fn tokens(map: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = map.dims4()?;
    Ok(map
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .reshape((b * h * w, c))?)
}

/// Mean feature `[C]` over every token of `[B, C, h, w]` maps.
pub fn token_mean(maps: &[Tensor]) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    let mut n = 0usize;
    for m in maps {
        let t = tokens(m)?.to_dtype(DType::F64)?;
        n += t.dim(0)?;
        let s = t.sum(0)?;
        sum = Some(match sum {
            Some(a) => (a + s)?,
            None => s,
        });
    }
    let sum = sum.ok_or_else(|| Error::Invalid("no feature maps to average".into()))?;
    Ok((sum / n as f64)?.to_dtype(DType::F32)?)
}

impl Fidelity {
    /// Accumulator around the teacher's mean feature `[C]`.
    pub fn new(teacher_mean: &Tensor) -> Result<Self> {
        Ok(Self {
            mean: teacher_mean.to_dtype(DType::F32)?,
            raw: 0.0,
            centred: 0.0,
            centred_sq: 0.0,
            map: 0.0,
            tokens: 0,
            images: 0,
        })
    }

    /// Add a batch of student and teacher maps on the same grid `[B, C, h, w]`.
    pub fn add(&mut self, student: &Tensor, teacher: &Tensor) -> Result<()> {
        if student.dims() != teacher.dims() {
            return Err(Error::Invalid(format!(
                "fidelity: student map {:?} and teacher map {:?} differ",
                student.dims(),
                teacher.dims()
            )));
        }
        let b = student.dim(0)?;
        let (s, t) = (tokens(student)?, tokens(teacher)?);
        let mean = self.mean.to_device(s.device())?.unsqueeze(0)?;
        let raw = row_cos(&s, &t)?;
        let cen = row_cos(&s.broadcast_sub(&mean)?, &t.broadcast_sub(&mean)?)?;
        let flat = |m: &Tensor| -> Result<Tensor> { Ok(m.to_dtype(DType::F32)?.reshape((b, ()))?) };
        let map = row_cos(&flat(student)?, &flat(teacher)?)?;
        let sum = |x: &Tensor| -> Result<f64> {
            Ok(x.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
        };
        self.raw += sum(&raw)?;
        self.centred += sum(&cen)?;
        self.centred_sq += sum(&cen.sqr()?)?;
        self.map += sum(&map)?;
        self.tokens += s.dim(0)?;
        self.images += b;
        Ok(())
    }

    pub fn report(&self) -> FidelityReport {
        let n = self.tokens.max(1) as f64;
        let centred = self.centred / n;
        FidelityReport {
            raw_cos: self.raw / n,
            centred_cos: centred,
            centred_cos_std: (self.centred_sq / n - centred * centred).max(0.0).sqrt(),
            map_cos: self.map / self.images.max(1) as f64,
            tokens: self.tokens,
            images: self.images,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One image, C = 2, two tokens, worked by hand.
    /// teacher t0 = (3, 1), t1 = (1, 1) -> mean m = (2, 1); centred t: (1, 0), (-1, 0)
    /// student s0 = (2, 2), s1 = (2, 0)               centred s: (0, 1), (0, -1)
    /// raw: cos(s0, t0) = 8 / (sqrt 8 sqrt 10) = 0.894427, cos(s1, t1) = 2 / (2 sqrt 2) =
    /// 0.707107 -> mean 0.800767; centred: 0 and 0 -> 0, spread 0.
    /// map: s = (2, 2, 2, 0) channel-major -> [2, 2 | 2, 0], t -> [3, 1 | 1, 1]:
    /// dot = 6 + 2 + 2 + 0 = 10, |s| = sqrt 12, |t| = sqrt 12 -> 0.833333.
    /// A second student that is the teacher mirrored about the mean, s = 2m - t:
    /// centred cos = -1 for both tokens.
    #[test]
    fn hand_computed_case() {
        let dev = Device::Cpu;
        // [1, C=2, h=1, w=2]: channel-major
        let t = Tensor::new(&[3f32, 1.0, 1.0, 1.0], &dev)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let s = Tensor::new(&[2f32, 2.0, 2.0, 0.0], &dev)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let m = token_mean(std::slice::from_ref(&t)).unwrap();
        assert_eq!(m.to_vec1::<f32>().unwrap(), [2.0, 1.0]);
        let mut f = Fidelity::new(&m).unwrap();
        f.add(&s, &t).unwrap();
        let r = f.report();
        assert!((r.raw_cos - 0.800767).abs() < 1e-5, "{r:?}");
        assert!(
            r.centred_cos.abs() < 1e-6 && r.centred_cos_std < 1e-3,
            "{r:?}"
        );
        assert!((r.map_cos - 0.833333).abs() < 1e-5, "{r:?}");
        assert_eq!((r.tokens, r.images), (2, 1));

        let mirror = (m.reshape((1, 2, 1, 1)).unwrap() * 2.0)
            .unwrap()
            .broadcast_sub(&t)
            .unwrap();
        let mut g = Fidelity::new(&m).unwrap();
        g.add(&mirror, &t).unwrap();
        assert!((g.report().centred_cos + 1.0).abs() < 1e-6);
        // a student that outputs the teacher itself: 1 everywhere
        let mut h = Fidelity::new(&m).unwrap();
        h.add(&t, &t).unwrap();
        let r = h.report();
        assert!((r.raw_cos - 1.0).abs() < 1e-6 && (r.centred_cos - 1.0).abs() < 1e-6);
        assert!(f.add(&s.narrow(3, 0, 1).unwrap(), &t).is_err());
    }
}
