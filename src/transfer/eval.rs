//! Classification evaluation: top-1, top-5 and mean per-class accuracy (fractions in [0, 1];
//! the mean over classes present suits imbalanced sets such as HAM10K), the confusion matrix
//! and its picture, and inference throughput.

use super::data::{Labeled, View};
use super::models::Classifier;
use crate::data::ImageSource;
use crate::error::{Error, Result};
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

/// Score `model` on `set`, each image prepared by `view` (centre crop of `crop_pct`), in
/// batches of `batch`.
pub fn evaluate(
    model: &dyn Classifier,
    set: &Labeled,
    view: View,
    crop_pct: f64,
    batch: usize,
    opts: &LoadOptions,
) -> Result<ClassEval> {
    let k = set.classes.len();
    let mut acc = Accuracy::default();
    let mut confusion = vec![vec![0u64; k]; k];
    let (mut top5, mut images, mut skipped) = (0usize, 0usize, 0usize);
    let mut secs = 0f64;
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let inputs: Vec<Option<Tensor>> = chunk
            .par_iter()
            .map(|&i| match set.load(i) {
                Ok(img) => view.eval_tensor(&img, crop_pct).map(Some),
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let kept: Vec<(usize, Tensor)> = chunk
            .iter()
            .zip(inputs)
            .filter_map(|(&i, t)| t.map(|t| (i, t)))
            .collect();
        skipped += chunk.len() - kept.len();
        if kept.is_empty() {
            continue;
        }
        let x = Tensor::stack(&kept.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), 0)?
            .to_device(&opts.device)?
            .to_dtype(opts.dtype)?;
        let t0 = Instant::now();
        let logits = model.logits(&x, false)?.to_dtype(DType::F32)?;
        let rows = logits
            .to_device(&candle_core::Device::Cpu)?
            .to_vec2::<f32>()?;
        secs += t0.elapsed().as_secs_f64();
        if rows.first().is_some_and(|r| r.len() != k) {
            return Err(Error::Invalid(format!(
                "model predicts {} classes, the set has {k}",
                rows[0].len()
            )));
        }
        for ((i, _), r) in kept.iter().zip(&rows) {
            let label = set.items[*i].1;
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
            acc.add(order[0], label);
            confusion[label][order[0]] += 1;
            top5 += order.iter().take(5).any(|&c| c == label) as usize;
            images += 1;
        }
    }
    if images == 0 {
        return Err(Error::BadInput {
            path: set.source.clone(),
            msg: "no readable image to evaluate".into(),
        });
    }
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
