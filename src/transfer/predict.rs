//! Predictions of a transfer model — a fine-tuned teacher (`teacher/`) or a student stage
//! folder (`<mode>/finetune/`) — on a folder of images: the top-k classes with probabilities
//! per image (`predictions.json`) and a contact sheet of thumbnails with their labels
//! (`index.html`).

use super::data::View;
use super::models::{self, Classifier};
use crate::data::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::models::LoadOptions;
use crate::predict::{safe_stem, write_html_table, Cell};
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Whether `dir` holds a transfer model (a student or a fine-tuned teacher).
pub fn is_transfer_model(dir: &Path) -> bool {
    dir.join(models::STUDENT_SPEC).is_file() || dir.join(models::TEACHER_SPEC).is_file()
}

/// A transfer model with how it sees images and its class names.
pub struct Loaded {
    pub model: Box<dyn Classifier>,
    pub view: View,
    pub classes: Vec<String>,
}

/// Load the classifier of a transfer stage folder.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    if dir.join(models::STUDENT_SPEC).is_file() {
        let (rec, net) = models::load_student(dir, opts)?;
        return Ok(Loaded {
            view: net.view(rec.image_size),
            model: Box::new(net),
            classes: rec.classes,
        });
    }
    if dir.join(models::TEACHER_SPEC).is_file() {
        let (rec, net) = models::load_teacher(dir, opts)?;
        return Ok(Loaded {
            view: net.view(rec.image_size),
            model: Box::new(net),
            classes: rec.classes,
        });
    }
    Err(Error::BadInput {
        path: dir.to_path_buf(),
        msg: format!(
            "not a transfer model folder (no {} or {})",
            models::STUDENT_SPEC,
            models::TEACHER_SPEC
        ),
    })
}

/// One class and its probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub class: String,
    pub probability: f64,
}

/// The top classes of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub image: String,
    pub top: Vec<Scored>,
}

/// The `k` most probable classes of each row of logits `[B, K]`.
pub fn top_k(logits: &Tensor, classes: &[String], k: usize) -> Result<Vec<Vec<Scored>>> {
    let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec2::<f32>()?;
    Ok(p.iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order
                .into_iter()
                .take(k)
                .map(|c| Scored {
                    class: classes.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    probability: row[c] as f64,
                })
                .collect()
        })
        .collect())
}

/// Classify every image under `images` with the model in `dir`; write thumbnails,
/// `predictions.json` and `index.html` into `out`. Unreadable images are skipped with a
/// warning. Returns the predictions.
pub fn predict_folder(
    dir: &Path,
    images: &Path,
    out: &Path,
    k: usize,
    opts: &LoadOptions,
) -> Result<Vec<Prediction>> {
    let m = load(dir, opts)?;
    let set = ImageSet::open(images)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut preds = Vec::new();
    let mut rows = Vec::new();
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(32) {
        let loaded: Vec<Option<(usize, image::RgbImage, Tensor)>> = chunk
            .par_iter()
            .map(|&i| match set.load(i) {
                Ok(img) => {
                    let t = m.view.eval_tensor(&img, 0.875)?;
                    Ok(Some((i, img, t)))
                }
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let loaded: Vec<_> = loaded.into_iter().flatten().collect();
        if loaded.is_empty() {
            continue;
        }
        let x = Tensor::stack(&loaded.iter().map(|l| l.2.clone()).collect::<Vec<_>>(), 0)?
            .to_device(&opts.device)?
            .to_dtype(opts.dtype)?;
        let tops = top_k(&m.model.logits(&x, false)?, &m.classes, k.max(1))?;
        for ((i, img, _), top) in loaded.iter().zip(tops) {
            let name = set.name(*i);
            let file = format!("{}.png", safe_stem(&name, *i));
            let path = out.join(&file);
            crate::viz::photo_tile(img, (160, 160))
                .save(&path)
                .map_err(|e| Error::io(&path, e))?;
            let text = top
                .iter()
                .map(|s| format!("{} {:.1} %", s.class, 100.0 * s.probability))
                .collect::<Vec<_>>()
                .join("\n");
            rows.push(vec![
                Cell::Image {
                    file,
                    title: name.clone(),
                },
                Cell::Text(text),
            ]);
            preds.push(Prediction { image: name, top });
        }
    }
    crate::train::engine::write_json(&out.join("predictions.json"), &preds)?;
    write_html_table(out, &["image".into(), format!("top {k}")], &rows)?;
    Ok(preds)
}
