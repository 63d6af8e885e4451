//! The teacher-logit cache of task-oriented distillation: the fine-tuned teacher runs once
//! over K fixed crop variants of every transfer image (variant v = the crops of augmentation
//! pass v, drawn from (seed, v, index) exactly as training draws them), its logits are stored
//! as f16 (`variant-{v}.f16`, one row per image of its logits, `[K]` or `[K, h, w]` at the
//! teacher's output grid for segmentation, row-major; NaN rows for unreadable images), and
//! distillation epoch e reads variant e mod K instead of running the teacher. Variants are
//! written atomically one by one, so an interrupted build resumes at the first missing one;
//! `manifest.json` records what the logits were computed from, and a cache made from anything
//! else is rebuilt.

use super::data::{crops, View};
use super::models::{Predictor, TeacherNet};
use crate::data::{ImageSource, RandomResizedCrop};
use crate::error::{Error, Result};
use crate::models::LoadOptions;
use candle_core::{DType, Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What cached logits were computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogitManifest {
    /// the fine-tuned teacher's folder and the size of its weights file
    pub teacher: PathBuf,
    pub teacher_bytes: u64,
    pub transfer: PathBuf,
    pub images: usize,
    /// the logits of one image: `[K]`, or `[K, h, w]` for segmentation
    pub shape: Vec<usize>,
    pub variants: u64,
    pub seed: u64,
    pub teacher_size: usize,
    pub min_crop_scale: f64,
}

/// Cached teacher logits, memory-mapped per variant.
pub struct LogitCache {
    dir: PathBuf,
    shape: Vec<usize>,
    images: usize,
    maps: Vec<memmap2::Mmap>,
}

fn variant_path(dir: &Path, v: u64) -> PathBuf {
    dir.join(format!("variant-{v}.f16"))
}

impl LogitCache {
    /// Build the missing variants of the cache in `dir` (all of them when the manifest
    /// differs) and open it. Returns the cache and the teacher forward passes run.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        dir: &Path,
        manifest: &LogitManifest,
        teacher: &TeacherNet,
        data: &dyn ImageSource,
        view: View,
        rrc: &RandomResizedCrop,
        batch: usize,
        opts: &LoadOptions,
        progress: bool,
    ) -> Result<(Self, u64)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mpath = dir.join("manifest.json");
        let same = mpath.is_file()
            && crate::train::engine::read_json::<LogitManifest>(&mpath)
                .ok()
                .as_ref()
                == Some(manifest);
        if !same {
            for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                let p = e.map_err(|e| Error::io(dir, e))?.path();
                if p.extension().is_some_and(|x| x == "f16") {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
            crate::train::engine::write_json(&mpath, manifest)?;
        }
        let n = manifest.images;
        let k: usize = manifest.shape.iter().product();
        let row_bytes = 2 * k;
        let mut passes = 0u64;
        let todo: Vec<u64> = (0..manifest.variants)
            .filter(|&v| {
                std::fs::metadata(variant_path(dir, v))
                    .map(|m| m.len() != (n * row_bytes) as u64)
                    .unwrap_or(true)
            })
            .collect();
        let bar = crate::train::progress_bar(todo.len() as u64 * n as u64, 0, progress);
        bar.set_message("teacher logits");
        let idx: Vec<usize> = (0..n).collect();
        for &v in &todo {
            let mut bytes = vec![0u8; n * row_bytes];
            let nan = f16::NAN.to_le_bytes();
            for px in bytes.chunks_exact_mut(2) {
                px.copy_from_slice(&nan);
            }
            for chunk in idx.chunks(batch.max(1)) {
                let c = match crops(data, &[view], rrc, manifest.seed, v, chunk) {
                    Ok(c) => c,
                    // a chunk of only unreadable images keeps its NaN rows
                    Err(Error::BadInput { .. }) => {
                        bar.inc(chunk.len() as u64);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let x = c.views[0].to_device(&opts.device)?.to_dtype(opts.dtype)?;
                let logits = teacher.logits(&x, false)?;
                if logits.dims()[1..] != manifest.shape[..] {
                    return Err(Error::Invalid(format!(
                        "teacher logits are {:?} per image, the cache holds {:?}",
                        &logits.dims()[1..],
                        manifest.shape
                    )));
                }
                let rows = logits
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .flatten_from(1)?
                    .to_vec2::<f32>()?;
                passes += rows.len() as u64;
                for (&i, row) in c.kept.iter().zip(&rows) {
                    for (j, &x) in row.iter().enumerate() {
                        let o = i * row_bytes + 2 * j;
                        bytes[o..o + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
                    }
                }
                bar.inc(chunk.len() as u64);
            }
            crate::atomic::write_bytes(&variant_path(dir, v), &bytes)?;
        }
        bar.finish_and_clear();
        Ok((
            Self::open(dir, n, manifest.shape.clone(), manifest.variants)?,
            passes,
        ))
    }

    fn open(dir: &Path, images: usize, shape: Vec<usize>, variants: u64) -> Result<Self> {
        let row: usize = shape.iter().product();
        let mut maps = Vec::new();
        for v in 0..variants {
            let p = variant_path(dir, v);
            let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: read-only map of a file this process wrote atomically; nothing writes it
            // while training reads it.
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?;
            if m.len() != images * row * 2 {
                return Err(Error::BadInput {
                    path: p,
                    msg: format!("holds {} bytes, expected {}", m.len(), images * row * 2),
                });
            }
            maps.push(m);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shape,
            images,
            maps,
        })
    }

    /// The logits `[B, ...shape]` of images `indices` in variant `v`.
    pub fn logits(&self, v: u64, indices: &[usize]) -> Result<Tensor> {
        let m = &self.maps[(v as usize) % self.maps.len()];
        let k: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(indices.len() * k);
        for &i in indices {
            if i >= self.images {
                return Err(Error::Invalid(format!("image {i} outside the cache")));
            }
            let row = &m[i * 2 * k..(i + 1) * 2 * k];
            for b in row.chunks_exact(2) {
                out.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
            if out[out.len() - k..].iter().any(|x| x.is_nan()) {
                return Err(Error::BadInput {
                    path: self.dir.clone(),
                    msg: format!(
                        "image {i} was unreadable when the cache was built; delete the cache to rebuild it"
                    ),
                });
            }
        }
        let mut dims = vec![indices.len()];
        dims.extend(&self.shape);
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }
}
