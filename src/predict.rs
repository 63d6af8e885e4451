//! Predictions of a stage-2 model on a folder of images, written as pictures a person can look
//! at: coloured segmentation and parts maps, saliency and boundary probabilities as grey levels,
//! normals as RGB, depth through the viridis colour map, and an HTML contact sheet.

use crate::data::dense::{DenseSample, Task};
use crate::data::dense_aug::{prepare_eval, resize_bilinear, Normalize};
use crate::data::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::interp;
use crate::models::multitask::{predictions, MultiTaskModel};
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::tasks::segmentation::class_colour;

/// Render one task's prediction (`[H, W]`, or `[3, H, W]` for normals) as an RGB picture.
pub fn render(task: Task, pred: &Tensor) -> Result<RgbImage> {
    task.spec().render(pred)
}

/// Predict every image under `images` and write `<stem>_<task>.png` files plus `index.html`.
/// Returns the number of images.
pub fn predict_folder(
    model: &MultiTaskModel,
    input_hw: (usize, usize),
    images: &Path,
    out: &Path,
) -> Result<usize> {
    let set = ImageSet::open(images)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let norm = Normalize {
        mean: model.spec.student.mean,
        std: model.spec.student.std,
    };
    let tasks: Vec<Task> = model.spec.tasks.iter().map(|(t, _)| *t).collect();
    let mut rows = Vec::new();
    for i in 0..set.len() {
        let name = set.name(i);
        let img = set.load(i)?;
        let (oh, ow) = (img.height() as usize, img.width() as usize);
        // Fit into the model's input (downscale only), centre-padded.
        let s = (input_hw.0 as f64 / oh as f64)
            .min(input_hw.1 as f64 / ow as f64)
            .min(1.0);
        let (fh, fw) = (
            ((oh as f64 * s).floor() as usize).max(1),
            ((ow as f64 * s).floor() as usize).max(1),
        );
        let fitted = if (fh, fw) == (oh, ow) {
            img.clone()
        } else {
            resize_bilinear(&img, fh, fw)
        };
        let sample = DenseSample {
            id: name.clone(),
            image: fitted,
            labels: BTreeMap::new(),
        };
        let p = prepare_eval(&sample, input_hw, norm)?;
        let x = Tensor::from_vec(p.image, (1, 3, input_hw.0, input_hw.1), &Device::Cpu)?
            .to_device(model.device())?;
        let outp = model.forward(&x, false, false, None)?;
        let (top, left, vh, vw) = p.valid;
        let stem = safe_stem(&name, i);
        let img_file = format!("{stem}_image.png");
        img.save(out.join(&img_file))
            .map_err(|e| Error::io(out.join(&img_file), e))?;
        let mut files = vec![img_file];
        for (task, logits) in &outp.logits {
            let l = logits.narrow(2, top, vh)?.narrow(3, left, vw)?;
            let l = interp::resize_bilinear(&l.contiguous()?, (oh, ow))?;
            let pred = predictions(*task, &l)?.squeeze(0)?;
            let f = format!("{stem}_{}.png", task.name());
            let path = out.join(&f);
            render(*task, &pred)?
                .save(&path)
                .map_err(|e| Error::io(&path, e))?;
            files.push(f);
        }
        rows.push((name, files));
    }
    write_contact_sheet(out, &tasks, &rows)?;
    Ok(rows.len())
}

/// A file-name-safe stem for image `i` named `name` (`00003_cat`).
pub fn safe_stem(name: &str, i: usize) -> String {
    let stem: String = Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{i:05}_{stem}")
}

fn write_contact_sheet(out: &Path, tasks: &[Task], rows: &[(String, Vec<String>)]) -> Result<()> {
    let mut headers = vec!["image".to_string()];
    headers.extend(tasks.iter().map(|t| t.name().to_string()));
    let cells: Vec<Vec<Cell>> = rows
        .iter()
        .map(|(name, files)| {
            files
                .iter()
                .map(|f| Cell::Image {
                    file: f.clone(),
                    title: name.clone(),
                })
                .collect()
        })
        .collect();
    write_html_table(out, &headers, &cells)
}

/// One cell of a contact sheet.
pub enum Cell {
    /// a picture in the output folder, with a hover title
    Image {
        file: String,
        title: String,
    },
    Text(String),
}

/// `out/index.html`: a table of pictures and text under `headers`, written atomically.
pub fn write_html_table(out: &Path, headers: &[String], rows: &[Vec<Cell>]) -> Result<()> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut html = String::from(
        "<!doctype html>\n<meta charset=\"utf-8\">\n<title>distillery predictions</title>\n\
         <style>body{font-family:sans-serif}td{padding:2px;text-align:center}img{max-width:240px}</style>\n\
         <table>\n<tr>",
    );
    for h in headers {
        html.push_str(&format!("<th>{}</th>", esc(h)));
    }
    html.push_str("</tr>\n");
    for row in rows {
        html.push_str("<tr>");
        for c in row {
            match c {
                Cell::Image { file, title } => html.push_str(&format!(
                    "<td><img src=\"{}\" title=\"{}\"></td>",
                    esc(file),
                    esc(title)
                )),
                Cell::Text(t) => {
                    html.push_str(&format!("<td>{}</td>", esc(t).replace('\n', "<br>")))
                }
            }
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    let p: PathBuf = out.join("index.html");
    crate::atomic::write_bytes(&p, html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};

    #[test]
    fn voc_palette_and_renderings() {
        // The published PASCAL VOC colours.
        assert_eq!(class_colour(0), [0, 0, 0]);
        assert_eq!(class_colour(1), [128, 0, 0]);
        assert_eq!(class_colour(2), [0, 128, 0]);
        assert_eq!(class_colour(15), [192, 128, 128]);
        assert_eq!(class_colour(20), [0, 64, 128]);
        let dev = Device::Cpu;
        // Depth: min and max map to the ends of viridis.
        let d = Tensor::new(&[[1f32, 3.0], [2.0, 3.0]], &dev).unwrap();
        let img = render(Task::Depth, &d).unwrap();
        let lo = ViridisRGB.get_color(0.0f32);
        let hi = ViridisRGB.get_color(1.0f32);
        assert_eq!(img.get_pixel(0, 0).0, [lo.0, lo.1, lo.2]);
        assert_eq!(img.get_pixel(1, 0).0, [hi.0, hi.1, hi.2]);
        // Normals: (n + 1) / 2 * 255 per channel; [3, 1, 1] map.
        let n = Tensor::new(&[[[0f32]], [[1.0]], [[-1.0]]], &dev).unwrap();
        assert_eq!(
            render(Task::Normals, &n).unwrap().get_pixel(0, 0).0,
            [128, 255, 0]
        );
    }
}
