//! Predictions of a transfer model — a fine-tuned teacher (`teacher/`) or a student stage
//! folder (`<mode>/finetune/`) — on a folder of images. Classifiers: the top-k classes with
//! probabilities per image (`predictions.json`) and a contact sheet of thumbnails with their
//! labels (`index.html`). Segmenters: per image a class map at the image's resolution as a
//! palette PNG (`<name>.mask.png`, pixel value = class index, VOC colours) and an overlay
//! (`<name>.overlay.png`), the classes covering most of it in `predictions.json`, and the
//! overlays in `index.html`.

use super::data::View;
use super::eval::{class_map, whole_image_tensor};
use super::models::{self, Predictor, TransferTask};
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
    pub model: Box<dyn Predictor>,
    pub task: TransferTask,
    pub view: View,
    pub classes: Vec<String>,
}

/// Load the classifier of a transfer stage folder.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    if dir.join(models::STUDENT_SPEC).is_file() {
        let (rec, net) = models::load_student(dir, opts)?;
        return Ok(Loaded {
            task: rec.task,
            view: net.view(rec.image_size),
            model: Box::new(net),
            classes: rec.classes,
        });
    }
    if dir.join(models::TEACHER_SPEC).is_file() {
        let (rec, net) = models::load_teacher(dir, opts)?;
        return Ok(Loaded {
            task: rec.task,
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

/// The top classes of one image (segmentation: the classes covering most of it, with their
/// share of its pixels, and the class map's file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub image: String,
    pub top: Vec<Scored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

/// The `k` classes covering most of a class map, with their pixel shares.
pub fn top_areas(map: &[u32], classes: &[String], k: usize) -> Vec<Scored> {
    let mut counts = vec![0usize; classes.len()];
    for &c in map {
        if let Some(n) = counts.get_mut(c as usize) {
            *n += 1;
        }
    }
    let mut order: Vec<usize> = (0..counts.len()).filter(|&c| counts[c] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|c| Scored {
            class: classes[c].clone(),
            probability: counts[c] as f64 / map.len().max(1) as f64,
        })
        .collect()
}

/// A class map as an 8-bit palette PNG (VOC colours; pixel value = class index), or a 16-bit
/// grey PNG beyond 256 classes.
pub fn class_map_png(map: &[u32], (h, w): (usize, usize), classes: usize) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        let data: Vec<u8> = if classes <= 256 {
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(
                (0..256u32)
                    .flat_map(crate::tasks::segmentation::class_colour)
                    .collect::<Vec<u8>>(),
            );
            map.iter().map(|&c| c as u8).collect()
        } else {
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Sixteen);
            map.iter().flat_map(|&c| (c as u16).to_be_bytes()).collect()
        };
        let err = |e: png::EncodingError| Error::Invalid(format!("encoding a class map: {e}"));
        let mut wr = enc.write_header().map_err(err)?;
        wr.write_image_data(&data).map_err(err)?;
    }
    Ok(bytes)
}

/// The image with its class map's colours laid over it at half strength.
pub fn overlay(img: &image::RgbImage, map: &[u32]) -> image::RgbImage {
    let mut out = img.clone();
    for (p, &c) in out.pixels_mut().zip(map) {
        let col = crate::tasks::segmentation::class_colour(c);
        for j in 0..3 {
            p[j] = ((p[j] as u16 + col[j] as u16) / 2) as u8;
        }
    }
    out
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

/// Classify (or segment) every image under `images` with the model in `dir`; write
/// thumbnails (or class maps and overlays), `predictions.json` and `index.html` into `out`.
/// Unreadable images are skipped with a warning. Returns the predictions.
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
                    let t = match m.task {
                        TransferTask::Classify => m.view.eval_tensor(&img, 0.875)?,
                        TransferTask::Segment => whole_image_tensor(&m.view, &img)?,
                    };
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
        let logits = m
            .model
            .logits(&x, false)?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        for (j, (i, img, _)) in loaded.iter().enumerate() {
            let name = set.name(*i);
            let stem = safe_stem(&name, *i);
            // (top classes, picture and its file, class-map file)
            let (top, picture, file, mask) = match m.task {
                TransferTask::Classify => (
                    top_k(&logits.get(j)?.unsqueeze(0)?, &m.classes, k.max(1))?.remove(0),
                    crate::viz::photo_tile(img, (160, 160)),
                    format!("{stem}.png"),
                    None,
                ),
                TransferTask::Segment => {
                    let (w, h) = img.dimensions();
                    let map = class_map(&logits.get(j)?, (h as usize, w as usize))?;
                    let file = format!("{stem}.mask.png");
                    let png = class_map_png(&map, (h as usize, w as usize), m.classes.len())?;
                    crate::atomic::write_bytes(&out.join(&file), &png)?;
                    (
                        top_areas(&map, &m.classes, k.max(1)),
                        overlay(img, &map),
                        format!("{stem}.overlay.png"),
                        Some(file),
                    )
                }
            };
            let path = out.join(&file);
            picture.save(&path).map_err(|e| Error::io(&path, e))?;
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
            preds.push(Prediction {
                image: name,
                top,
                mask,
            });
        }
    }
    crate::train::engine::write_json(&out.join("predictions.json"), &preds)?;
    write_html_table(out, &["image".into(), format!("top {k}")], &rows)?;
    Ok(preds)
}
