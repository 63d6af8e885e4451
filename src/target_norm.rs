//! Teacher-target normalisation for feature distillation.
//!
//! With the reference loss (cosine over the whole flattened map) the direction shared by all of
//! a teacher's tokens dominates the objective: a student can score a high raw cosine while
//! carrying none of the teacher's spatial structure. Normalising the targets per teacher and
//! level removes that shared direction and balances the channels, as Theia (per-channel
//! standardised teacher features) and AM-RADIO's PHI-S (invertible standardisation of each
//! teacher's distribution) do:
//! - `standardize`: `(t - mean) / sqrt(var + eps)` per channel;
//! - `whiten`: ZCA whitening `U diag(1 / sqrt(lambda + eps)) U^T (t - mean)` from the channel
//!   covariance's eigendecomposition (decorrelates the channels too; like every whitening it
//!   amplifies directions of tiny variance, which `eps` bounds).
//!
//! `eps` is `1e-4` times the mean channel variance, so the transform is scale-free. Statistics
//! are population moments over every token of a sample of teacher maps, accumulated in f64.
//! Both transforms are invertible: a student trained on normalised targets is mapped back to
//! the teacher's scale at export (the inverse folded into its output projection).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Relative regulariser: `eps = EPS_REL * mean channel variance`.
pub const EPS_REL: f64 = 1e-4;

/// How distillation targets are normalised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetNorm {
    /// raw teacher features (the SAK reference)
    #[default]
    None,
    /// per-channel mean and standard deviation
    Standardize,
    /// ZCA whitening with the channel covariance
    Whiten,
}

impl TargetNorm {
    pub fn is_none(&self) -> bool {
        *self == TargetNorm::None
    }
}

/// First and second moments of feature channels over tokens, accumulated in f64 on the CPU.
#[derive(Clone, Debug)]
pub struct Moments {
    channels: usize,
    count: f64,
    sum: Vec<f64>,
    /// per-channel sums of squares, or the full `C x C` sum of outer products
    second: Vec<f64>,
    full: bool,
}

impl Moments {
    /// `full`: keep the cross-channel products (needed for whitening).
    pub fn new(channels: usize, full: bool) -> Self {
        Self {
            channels,
            count: 0.0,
            sum: vec![0.0; channels],
            second: vec![0.0; if full { channels * channels } else { channels }],
            full,
        }
    }

    /// Moments for `kind` (full products for whitening).
    pub fn for_kind(channels: usize, kind: TargetNorm) -> Self {
        Self::new(channels, kind == TargetNorm::Whiten)
    }

    /// Add every token of a `[B, C, h, w]` map.
    pub fn add_map(&mut self, map: &Tensor) -> Result<()> {
        let (b, c, h, w) = map.dims4()?;
        let tokens = map
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?;
        self.add_tokens(&tokens)
    }

    /// Add the rows of a `[N, C]` matrix.
    pub fn add_tokens(&mut self, x: &Tensor) -> Result<()> {
        let (n, c) = x.dims2()?;
        if c != self.channels {
            return Err(Error::Invalid(format!(
                "feature statistics: {c} channels, expected {}",
                self.channels
            )));
        }
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let s = x.sum(0)?.to_vec1::<f64>()?;
        let q = if self.full {
            x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?
        } else {
            x.sqr()?.sum(0)?.to_vec1::<f64>()?
        };
        self.count += n as f64;
        for (a, v) in self.sum.iter_mut().zip(s) {
            *a += v;
        }
        for (a, v) in self.second.iter_mut().zip(q) {
            *a += v;
        }
        Ok(())
    }

    pub fn count(&self) -> f64 {
        self.count
    }

    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1.0);
        self.sum.iter().map(|s| s / n).collect()
    }

    /// Population variance per channel.
    pub fn variance(&self) -> Vec<f64> {
        let n = self.count.max(1.0);
        let mean = self.mean();
        let c = self.channels;
        (0..c)
            .map(|i| {
                let q = if self.full {
                    self.second[i * c + i]
                } else {
                    self.second[i]
                };
                (q / n - mean[i] * mean[i]).max(0.0)
            })
            .collect()
    }

    /// Population covariance, row-major `C x C` (None without cross products).
    pub fn covariance(&self) -> Option<Vec<f64>> {
        if !self.full {
            return None;
        }
        let n = self.count.max(1.0);
        let mean = self.mean();
        let c = self.channels;
        let mut cov = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                cov[i * c + j] = self.second[i * c + j] / n - mean[i] * mean[j];
            }
        }
        Some(cov)
    }
}

/// The normalisation of one (teacher, level): `y = A (t - mean)`, inverted by
/// `t = A^-1 y + mean`. `A` is diagonal (`[C]`) for standardisation and a symmetric `[C, C]`
/// matrix for whitening; all f32 on the device the features live on.
#[derive(Clone, Debug)]
pub struct LevelNorm {
    pub mean: Tensor,
    pub forward: Tensor,
    pub inverse: Tensor,
}

impl LevelNorm {
    /// The transform of `kind` from accumulated moments (`kind` must not be `None`).
    pub fn from_moments(m: &Moments, kind: TargetNorm, device: &Device) -> Result<Self> {
        let c = m.channels;
        if m.count < 2.0 {
            return Err(Error::Invalid(
                "target statistics need at least two feature tokens".into(),
            ));
        }
        let var = m.variance();
        let mean_var = var.iter().sum::<f64>() / c as f64;
        if mean_var <= 0.0 || !mean_var.is_finite() {
            return Err(Error::Invalid(
                "teacher features are constant: they cannot be standardised".into(),
            ));
        }
        let eps = EPS_REL * mean_var;
        let t32 = |v: Vec<f64>, shape: &[usize]| -> Result<Tensor> {
            let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        let mean = t32(m.mean(), &[c])?;
        Ok(match kind {
            TargetNorm::None => {
                return Err(Error::Invalid("no target normalisation to build".into()))
            }
            TargetNorm::Standardize => {
                let std: Vec<f64> = var.iter().map(|v| (v + eps).sqrt()).collect();
                Self {
                    mean,
                    forward: t32(std.iter().map(|s| 1.0 / s).collect(), &[c])?,
                    inverse: t32(std, &[c])?,
                }
            }
            TargetNorm::Whiten => {
                let cov = m.covariance().ok_or_else(|| {
                    Error::Invalid("whitening needs cross-channel moments".into())
                })?;
                let eig =
                    nalgebra::SymmetricEigen::new(nalgebra::DMatrix::from_row_slice(c, c, &cov));
                let lam: Vec<f64> = eig.eigenvalues.iter().map(|l| l.max(0.0) + eps).collect();
                let u = &eig.eigenvectors;
                // U diag(f(lambda)) U^T, row-major
                let build = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
                    let mut out = vec![0.0; c * c];
                    for (k, &l) in lam.iter().enumerate() {
                        let s = f(l);
                        for i in 0..c {
                            let ui = u[(i, k)] * s;
                            for j in 0..c {
                                out[i * c + j] += ui * u[(j, k)];
                            }
                        }
                    }
                    out
                };
                Self {
                    mean,
                    forward: t32(build(&|l| 1.0 / l.sqrt()), &[c, c])?,
                    inverse: t32(build(&|l| l.sqrt()), &[c, c])?,
                }
            }
        })
    }

    pub fn channels(&self) -> usize {
        self.mean.dims()[0]
    }

    fn is_diagonal(&self) -> bool {
        self.forward.rank() == 1
    }

    /// `x A^T` for the rows of `[N, C]` tokens with `a` = forward or inverse.
    fn rows(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        Ok(if self.is_diagonal() {
            x.broadcast_mul(a)?
        } else {
            // A is symmetric: x A^T = x A
            x.matmul(a)?
        })
    }

    /// Apply `a` along the channels of a `[B, C, h, w]` map.
    fn channels_of_map(&self, map: &Tensor, a: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = map.dims4()?;
        let x = map.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        Ok(self
            .rows(&x, a)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// The normalised target of a teacher map `[B, C, h, w]` (f32).
    pub fn normalize(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        let centred = t.broadcast_sub(&self.mean.reshape((1, (), 1, 1))?)?;
        if self.is_diagonal() {
            Ok(centred.broadcast_mul(&self.forward.reshape((1, (), 1, 1))?)?)
        } else {
            self.channels_of_map(&centred, &self.forward)
        }
    }

    /// Map a normalised prediction `[B, C, h, w]` back to the teacher's scale.
    pub fn denormalize(&self, y: &Tensor) -> Result<Tensor> {
        let y = y.to_dtype(DType::F32)?;
        let lin = if self.is_diagonal() {
            y.broadcast_mul(&self.inverse.reshape((1, (), 1, 1))?)?
        } else {
            self.channels_of_map(&y, &self.inverse)?
        };
        Ok(lin.broadcast_add(&self.mean.reshape((1, (), 1, 1))?)?)
    }

    /// Fold the inverse into a linear output projection `y = W x + b` (`W` `[C, D]`; `None`
    /// means the identity, when the student already has the teacher's width): returns `W'`,
    /// `b'` with `W' x + b' = A^-1 (W x + b) + mean`.
    pub fn fold(&self, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let c = self.channels();
        let dev = self.mean.device();
        let w = match weight {
            Some(w) => w.to_dtype(DType::F32)?,
            None => Tensor::eye(c, DType::F32, dev)?,
        };
        let b = match bias {
            Some(b) => b.to_dtype(DType::F32)?,
            None => Tensor::zeros(c, DType::F32, dev)?,
        };
        let w2 = self
            .rows(&w.t()?.contiguous()?, &self.inverse)?
            .t()?
            .contiguous()?;
        let b2 = (self.rows(&b.reshape((1, c))?, &self.inverse)?.reshape(c)? + &self.mean)?;
        Ok((w2, b2))
    }
}

/// File a run keeps its target statistics in.
pub const STATS_FILE: &str = "target-norm.safetensors";

/// Normalisations per teacher and level.
#[derive(Clone, Debug)]
pub struct TargetStats {
    pub kind: TargetNorm,
    /// `[teacher][level]`
    pub levels: Vec<Vec<LevelNorm>>,
}

impl TargetStats {
    /// Build from moments `[teacher][level]`.
    pub fn from_moments(
        moments: &[Vec<Moments>],
        kind: TargetNorm,
        device: &Device,
    ) -> Result<Self> {
        let levels = moments
            .iter()
            .map(|l| {
                l.iter()
                    .map(|m| LevelNorm::from_moments(m, kind, device))
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(Self { kind, levels })
    }

    pub fn get(&self, teacher: usize, level: usize) -> Result<&LevelNorm> {
        self.levels
            .get(teacher)
            .and_then(|l| l.get(level))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no target statistics for teacher {teacher}, level {level}"
                ))
            })
    }

    /// Write atomically: `{t}.{k}.{mean,forward,inverse}`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut m = HashMap::new();
        for (t, levels) in self.levels.iter().enumerate() {
            for (k, n) in levels.iter().enumerate() {
                m.insert(format!("{t}.{k}.mean"), n.mean.clone());
                m.insert(format!("{t}.{k}.forward"), n.forward.clone());
                m.insert(format!("{t}.{k}.inverse"), n.inverse.clone());
            }
        }
        crate::atomic::write_safetensors(&m, path)
    }

    /// Read statistics for `widths[t]`-channel teachers with `levels` levels each; every
    /// tensor's presence and shape is checked (errors name the file).
    pub fn load(
        path: &Path,
        kind: TargetNorm,
        widths: &[usize],
        levels: usize,
        device: &Device,
    ) -> Result<Self> {
        let w = crate::weights::Weights::open_file(path)?;
        let bad = |msg: String| Error::BadInput {
            path: path.to_path_buf(),
            msg,
        };
        let mut out = Vec::new();
        for (t, &c) in widths.iter().enumerate() {
            let mut per = Vec::new();
            for k in 0..levels {
                let a_shape: &[usize] = match kind {
                    TargetNorm::Whiten => &[c, c],
                    _ => &[c],
                };
                let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
                    let key = format!("{t}.{k}.{name}");
                    if !w.contains(&key) {
                        return Err(bad(format!("missing {key}")));
                    }
                    let x = w.get_any(&key)?;
                    if x.dims() != shape {
                        return Err(bad(format!(
                            "{key} has shape {:?}, expected {shape:?}",
                            x.dims()
                        )));
                    }
                    Ok(x.to_dtype(DType::F32)?.to_device(device)?)
                };
                per.push(LevelNorm {
                    mean: get("mean", &[c])?,
                    forward: get("forward", a_shape)?,
                    inverse: get("inverse", a_shape)?,
                });
            }
            out.push(per);
        }
        Ok(Self { kind, levels: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> HashMap<String, Tensor> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/refs/target-norm.safetensors");
        candle_core::safetensors::load(p, &Device::Cpu).expect("target-norm reference")
    }

    fn vec64(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], rel: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= rel * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Moments accumulated map by map (different grids) against numpy's statistics over all
    /// tokens at once; the transforms against numpy's std and eigh-based ZCA matrices.
    #[test]
    fn statistics_match_numpy() {
        let r = reference();
        let mut diag = Moments::new(8, false);
        let mut full = Moments::new(8, true);
        for i in 0..3 {
            diag.add_map(&r[&format!("maps.{i}")]).unwrap();
            full.add_map(&r[&format!("maps.{i}")]).unwrap();
        }
        assert_eq!(diag.count(), 64.0);
        assert_close(&diag.mean(), &vec64(&r["mean"]), 1e-10, "mean");
        assert_close(&diag.variance(), &vec64(&r["var"]), 1e-9, "var");
        assert_close(&full.variance(), &vec64(&r["var"]), 1e-9, "var (full)");
        let s = LevelNorm::from_moments(&diag, TargetNorm::Standardize, &Device::Cpu).unwrap();
        assert_close(&vec64(&s.inverse), &vec64(&r["std"]), 1e-6, "std");
        let w = LevelNorm::from_moments(&full, TargetNorm::Whiten, &Device::Cpu).unwrap();
        assert_close(&vec64(&w.forward), &vec64(&r["whiten"]), 1e-5, "whiten");
        assert_close(&vec64(&w.inverse), &vec64(&r["unwhiten"]), 1e-5, "unwhiten");
        // the whitened sample has identity covariance, up to the regulariser
        let mut after = Moments::new(8, true);
        for i in 0..3 {
            after
                .add_map(&w.normalize(&r[&format!("maps.{i}")]).unwrap())
                .unwrap();
        }
        let cov = after.covariance().unwrap();
        for i in 0..8 {
            for j in 0..8 {
                // the nearly constant channel (variance 1e-6) is not blown up to unit
                // variance: eps bounds the amplification
                let want = if i == j && i != 5 { 1.0 } else { 0.0 };
                assert!(
                    (cov[i * 8 + j] - want).abs() < 1e-2,
                    "cov[{i},{j}] = {}",
                    cov[i * 8 + j]
                );
            }
        }
    }

    /// normalize then denormalize is the identity; a folded projection equals projecting and
    /// then denormalising.
    #[test]
    fn inverse_and_fold_round_trip() {
        let r = reference();
        let x = &r["maps.0"];
        for kind in [TargetNorm::Standardize, TargetNorm::Whiten] {
            let mut m = Moments::for_kind(8, kind);
            m.add_map(x).unwrap();
            let n = LevelNorm::from_moments(&m, kind, &Device::Cpu).unwrap();
            let back = n.denormalize(&n.normalize(x).unwrap()).unwrap();
            assert_close(&vec64(&back), &vec64(x), 1e-5, "round trip");
            // a projection from 5 student channels
            let wt = Tensor::randn(0f32, 1.0, (8, 5), &Device::Cpu).unwrap();
            let bt = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
            let tokens = Tensor::randn(0f32, 1.0, (7, 5), &Device::Cpu).unwrap();
            let (w2, b2) = n.fold(Some(&wt), Some(&bt)).unwrap();
            let folded = tokens
                .matmul(&w2.t().unwrap())
                .unwrap()
                .broadcast_add(&b2)
                .unwrap();
            let proj = tokens
                .matmul(&wt.t().unwrap())
                .unwrap()
                .broadcast_add(&bt)
                .unwrap();
            let map = proj.t().unwrap().reshape((1, 8, 7, 1)).unwrap();
            let want = n
                .denormalize(&map)
                .unwrap()
                .reshape((8, 7))
                .unwrap()
                .t()
                .unwrap();
            assert_close(&vec64(&folded), &vec64(&want), 1e-5, "fold");
        }
    }

    #[test]
    fn stats_file_round_trip_and_shape_errors() {
        let r = reference();
        let mut m = Moments::new(8, false);
        m.add_map(&r["maps.1"]).unwrap();
        let stats =
            TargetStats::from_moments(&[vec![m.clone(), m]], TargetNorm::Standardize, &Device::Cpu)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATS_FILE);
        stats.save(&p).unwrap();
        let back = TargetStats::load(&p, TargetNorm::Standardize, &[8], 2, &Device::Cpu).unwrap();
        assert_close(
            &vec64(&back.get(0, 1).unwrap().inverse),
            &vec64(&stats.get(0, 1).unwrap().inverse),
            0.0,
            "saved std",
        );
        let e = TargetStats::load(&p, TargetNorm::Whiten, &[8], 2, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains(STATS_FILE) && e.contains("0.0.forward"), "{e}");
        let e = TargetStats::load(&p, TargetNorm::Standardize, &[8], 3, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing 0.2.mean"), "{e}");
    }
}
