//! Evaluation: for classification top-1, top-5 and mean per-class accuracy (fractions in
//! [0, 1]; the mean over classes present suits imbalanced sets such as HAM10K), the confusion
//! matrix and its picture; for segmentation mIoU, pixel accuracy and per-class IoU at the
//! masks' full resolution; inference throughput for both.

use super::data::{Labeled, View};
use super::masks::MaskSet;
use super::models::Predictor;
use crate::data::ImageSource;
use crate::error::{Error, Result};
use crate::metrics::segmentation::MeanIou;
use crate::models::LoadOptions;
use crate::tasks::classification::Accuracy;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// A classifier's scores on a labelled set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassEval {
    pub images: usize,
    /// unreadable images (not scored)
    pub skipped: usize,
    pub top1: f64,
    pub top5: f64,
    pub mean_class_acc: f64,
    /// rows: true class, columns: predicted class
    pub confusion: Vec<Vec<u64>>,
    /// inference throughput (decoding excluded)
    pub images_per_s: f64,
}

/// Run `model` over the images of `set` in batches of `batch`: every readable image becomes an
/// input by `prepare` (with what scoring needs of it), and `score` receives each batch's
/// logits (f32, CPU) with those. Returns (images scored, unreadable images, seconds of
/// inference).
fn run_batches<T: Send>(
    model: &dyn Predictor,
    set: &dyn ImageSource,
    batch: usize,
    opts: &LoadOptions,
    prepare: impl Fn(usize, image::RgbImage) -> Result<(Tensor, T)> + Sync,
    mut score: impl FnMut(Vec<(usize, T)>, Tensor) -> Result<()>,
) -> Result<(usize, usize, f64)> {
    let (mut images, mut skipped, mut secs) = (0usize, 0usize, 0f64);
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let inputs: Vec<Option<(Tensor, T)>> = chunk
            .par_iter()
            .map(|&i| match set.load(i) {
                Ok(img) => prepare(i, img).map(Some),
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let mut xs = Vec::new();
        let mut kept = Vec::new();
        for (&i, it) in chunk.iter().zip(inputs) {
            if let Some((t, extra)) = it {
                xs.push(t);
                kept.push((i, extra));
            }
        }
        skipped += chunk.len() - kept.len();
        if kept.is_empty() {
            continue;
        }
        let x = Tensor::stack(&xs, 0)?
            .to_device(&opts.device)?
            .to_dtype(opts.dtype)?;
        let t0 = Instant::now();
        let logits = model
            .logits(&x, false)?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        secs += t0.elapsed().as_secs_f64();
        images += kept.len();
        score(kept, logits)?;
    }
    if images == 0 {
        return Err(Error::BadInput {
            path: set.root(),
            msg: "no readable image to evaluate".into(),
        });
    }
    Ok((images, skipped, secs))
}

/// Score `model` on `set`, each image prepared by `view` (centre crop of `crop_pct`), in
/// batches of `batch`.
pub fn evaluate(
    model: &dyn Predictor,
    set: &Labeled,
    view: View,
    crop_pct: f64,
    batch: usize,
    opts: &LoadOptions,
) -> Result<ClassEval> {
    let k = set.classes.len();
    let mut acc = Accuracy::default();
    let mut confusion = vec![vec![0u64; k]; k];
    let mut top5 = 0usize;
    let prepare = |i: usize, img| Ok((view.eval_tensor(&img, crop_pct)?, set.items[i].1));
    let (images, skipped, secs) = run_batches(model, set, batch, opts, prepare, |kept, logits| {
        let rows = logits.to_vec2::<f32>()?;
        if rows.first().is_some_and(|r| r.len() != k) {
            return Err(Error::Invalid(format!(
                "model predicts {} classes, the set has {k}",
                rows[0].len()
            )));
        }
        for ((_, label), r) in kept.iter().zip(&rows) {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
            acc.add(order[0], *label);
            confusion[*label][order[0]] += 1;
            top5 += order.iter().take(5).any(|&c| c == *label) as usize;
        }
        Ok(())
    })?;
    Ok(ClassEval {
        images,
        skipped,
        top1: acc.top1() / 100.0,
        top5: top5 as f64 / images as f64,
        mean_class_acc: acc.mean_class() / 100.0,
        confusion,
        images_per_s: images as f64 / secs.max(1e-9),
    })
}

/// A segmenter's scores on a labelled set (fractions in [0, 1]; per-class IoU counts a class
/// that never occurs nor is predicted as 0, as mIoU does).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SegEval {
    pub images: usize,
    pub skipped: usize,
    pub miou: f64,
    pub pixel_acc: f64,
    pub per_class_iou: Vec<f64>,
    pub images_per_s: f64,
}

/// The input of a segmentation evaluation: the whole image resized (not cropped) to the
/// model's square input.
pub fn whole_image_tensor(view: &View, img: &image::RgbImage) -> Result<Tensor> {
    let crop = crate::data::augment::CropBox {
        top: 0,
        left: 0,
        height: img.height(),
        width: img.width(),
        flip: false,
    };
    crate::data::augment::crop_to_tensor(
        img,
        &crop,
        view.image_size,
        view.mean,
        view.std,
        &candle_core::Device::Cpu,
    )
}

/// Class map `[H * W]` of one image's logits `[K, h, w]`: resized bilinearly to (H, W), argmax.
pub fn class_map(logits: &Tensor, (h, w): (usize, usize)) -> Result<Vec<u32>> {
    let up = crate::interp::resize_bilinear(&logits.unsqueeze(0)?, (h, w))?;
    Ok(up.argmax(1)?.flatten_all()?.to_vec1::<u32>()?)
}

/// Score a segmenter on `set`: each whole image resized to the model's input (`view`), the
/// logits resized bilinearly back to the mask's full resolution and scored there (mIoU over
/// the set's pooled counts, pixel accuracy over labelled pixels).
pub fn evaluate_masks(
    model: &dyn Predictor,
    set: &MaskSet,
    view: View,
    batch: usize,
    opts: &LoadOptions,
) -> Result<SegEval> {
    let k = set.rule.classes;
    let mut iou = MeanIou::new(k, set.rule.ignore);
    let prepare = |i: usize, img: image::RgbImage| {
        let (h, w, mask) = set.mask_for(i, &img)?;
        Ok((whole_image_tensor(&view, &img)?, (h, w, mask)))
    };
    let (images, skipped, secs) = run_batches(model, set, batch, opts, prepare, |kept, logits| {
        let (_, kl, _, _) = logits.dims4()?;
        if kl != k {
            return Err(Error::Invalid(format!(
                "model predicts {kl} classes, the set has {k}"
            )));
        }
        for (j, (_, (h, w, mask))) in kept.iter().enumerate() {
            iou.update(&class_map(&logits.get(j)?, (*h, *w))?, mask);
        }
        Ok(())
    })?;
    Ok(SegEval {
        images,
        skipped,
        miou: iou.miou() / 100.0,
        pixel_acc: iou.pixel_acc(),
        per_class_iou: iou.per_class(),
        images_per_s: images as f64 / secs.max(1e-9),
    })
}

/// A model's scores on one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scores {
    Classify(ClassEval),
    Segment(SegEval),
}

impl Scores {
    pub fn images_per_s(&self) -> f64 {
        match self {
            Scores::Classify(e) => e.images_per_s,
            Scores::Segment(e) => e.images_per_s,
        }
    }
}

/// Draw a confusion matrix (rows true, columns predicted; shade = share of the row) with class
/// names and counts, and write the PNG atomically.
pub fn confusion_png(
    confusion: &[Vec<u64>],
    classes: &[String],
    title: &str,
    path: &Path,
) -> Result<()> {
    use plotters::prelude::*;
    let k = confusion.len().max(1);
    let cell = (480 / k as u32).clamp(6, 48);
    let (left, top) = (110u32, 40u32);
    let (w, h) = (left + cell * k as u32 + 10, top + cell * k as u32 + 10);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    crate::train::plot::register_font();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| Error::io(path, std::io::Error::other(e.to_string()));
        root.draw(&Text::new(
            title.to_string(),
            (6, 6),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))
        .map_err(|e| err(&e))?;
        for (r, row) in confusion.iter().enumerate() {
            let n = row.iter().sum::<u64>().max(1) as f64;
            if cell >= 10 {
                let name: String = classes
                    .get(r)
                    .map_or(String::new(), |c| c.chars().take(14).collect());
                root.draw(&Text::new(
                    name,
                    (4, (top + r as u32 * cell + cell / 2) as i32 - 6),
                    ("sans-serif", 11).into_font().color(&BLACK),
                ))
                .map_err(|e| err(&e))?;
            }
            for (c, &v) in row.iter().enumerate() {
                let share = v as f64 / n;
                let shade = (255.0 * (1.0 - share)) as u8;
                let (x0, y0) = (
                    (left + c as u32 * cell) as i32,
                    (top + r as u32 * cell) as i32,
                );
                let colour = RGBColor(shade, shade, 255);
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell as i32 - 1, y0 + cell as i32 - 1)],
                    colour.filled(),
                ))
                .map_err(|e| err(&e))?;
                if cell >= 20 && v > 0 {
                    let ink = if share > 0.5 { WHITE } else { BLACK };
                    root.draw(&Text::new(
                        v.to_string(),
                        (x0 + 3, y0 + cell as i32 / 2 - 6),
                        ("sans-serif", 11).into_font().color(&ink),
                    ))
                    .map_err(|e| err(&e))?;
                }
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::Invalid("confusion picture buffer".into()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    crate::atomic::write_bytes(path, bytes.get_ref())
}
