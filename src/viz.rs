//! Pictures of features: the first three principal components of patch features shown as RGB
//! (the usual way DINOv2-style features are looked at), side by side with the photos, in a grid
//! with column titles.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::path::Path;

/// A 3-component PCA fitted on feature rows, with the colour range of the fitted data.
#[derive(Clone, Debug)]
pub struct Pca3 {
    pub mean: Vec<f64>,
    /// unit principal directions, largest variance first
    pub components: [Vec<f64>; 3],
    /// variance along each direction
    pub variances: [f64; 3],
    lo: [f64; 3],
    hi: [f64; 3],
}

/// `[B, C, h, w]` maps -> per image, `h*w` rows of C values.
pub fn map_rows(map: &Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
    let (b, c, h, w) = map.dims4()?;
    let t = map
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .reshape((b, c, h * w))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(t.to_vec3::<f32>()?)
}

impl Pca3 {
    /// Fit on rows (each of the same length C >= 1): mean, covariance, and its top three
    /// eigenvectors by power iteration with deflation; colours span the 1st-99th percentile of
    /// the fitted projections.
    pub fn fit(rows: &[Vec<f32>]) -> Result<Self> {
        let c = rows.first().map_or(0, Vec::len);
        if c == 0 || rows.iter().any(|r| r.len() != c) {
            return Err(Error::Invalid(
                "PCA needs rows of one non-zero length".into(),
            ));
        }
        let n = rows.len() as f64;
        let mut mean = vec![0f64; c];
        for r in rows {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64 / n;
            }
        }
        let mut cov = vec![0f64; c * c];
        let mut centred = vec![0f64; c];
        for r in rows {
            for (k, (&v, m)) in r.iter().zip(&mean).enumerate() {
                centred[k] = v as f64 - m;
            }
            for i in 0..c {
                let ci = centred[i];
                if ci == 0.0 {
                    continue;
                }
                let row = &mut cov[i * c..(i + 1) * c];
                for (x, &cj) in row.iter_mut().zip(&centred) {
                    *x += ci * cj;
                }
            }
        }
        cov.iter_mut().for_each(|x| *x /= n);
        let mut comps: Vec<Vec<f64>> = Vec::new();
        let mut vars = [0f64; 3];
        for (k, var) in vars.iter_mut().enumerate() {
            // deterministic start that is not orthogonal to a generic eigenvector
            let mut v: Vec<f64> = (0..c)
                .map(|i| 1.0 + ((i * 7 + k * 13) % 11) as f64 / 11.0)
                .collect();
            let mut lambda = 0.0;
            for _ in 0..500 {
                deflate(&mut v, &comps);
                let norm = dot(&v, &v).sqrt();
                if norm < 1e-300 {
                    break;
                }
                v.iter_mut().for_each(|x| *x /= norm);
                let w = matvec(&cov, &v, c);
                let next = dot(&v, &w);
                v = w;
                if (next - lambda).abs() <= 1e-12 * next.abs().max(1e-30) {
                    lambda = next;
                    break;
                }
                lambda = next;
            }
            deflate(&mut v, &comps);
            let norm = dot(&v, &v).sqrt();
            if norm > 1e-300 {
                v.iter_mut().for_each(|x| *x /= norm);
            } else {
                // fewer than k+1 directions carry variance: a unit vector orthogonal to the rest
                // (the first standard basis vector that is not in their span)
                for j in 0..c {
                    let mut e = vec![0.0; c];
                    e[j] = 1.0;
                    deflate(&mut e, &comps);
                    let n = dot(&e, &e).sqrt();
                    if n > 1e-6 {
                        v = e.iter().map(|x| x / n).collect();
                        break;
                    }
                }
                lambda = 0.0;
            }
            // sign convention: the largest entry is positive
            let big = v
                .iter()
                .cloned()
                .fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
            if big < 0.0 {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            *var = lambda.max(0.0);
            comps.push(v);
        }
        let components: [Vec<f64>; 3] = [comps[0].clone(), comps[1].clone(), comps[2].clone()];
        let mut pca = Self {
            mean,
            components,
            variances: vars,
            lo: [0.0; 3],
            hi: [1.0; 3],
        };
        let proj: Vec<[f64; 3]> = rows.iter().map(|r| pca.project(r)).collect();
        for k in 0..3 {
            let mut v: Vec<f64> = proj.iter().map(|p| p[k]).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            pca.lo[k] = at(0.01);
            pca.hi[k] = at(0.99);
        }
        Ok(pca)
    }

    /// Coordinates of one row along the three directions.
    pub fn project(&self, row: &[f32]) -> [f64; 3] {
        let mut out = [0f64; 3];
        for (o, comp) in out.iter_mut().zip(&self.components) {
            *o = row
                .iter()
                .zip(&self.mean)
                .zip(comp)
                .map(|((&x, m), u)| (x as f64 - m) * u)
                .sum();
        }
        out
    }

    /// A row as a colour: each component mapped from the fitted range to 0-255.
    pub fn color(&self, row: &[f32]) -> [u8; 3] {
        let p = self.project(row);
        let mut rgb = [0u8; 3];
        for k in 0..3 {
            let span = self.hi[k] - self.lo[k];
            let t = if span > 0.0 {
                (p[k] - self.lo[k]) / span
            } else {
                0.5
            };
            rgb[k] = (t.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
        rgb
    }

    /// A `h x w` grid of rows as an image, each cell `scale` pixels square.
    pub fn image(&self, rows: &[Vec<f32>], (h, w): (usize, usize), scale: u32) -> RgbImage {
        RgbImage::from_fn(w as u32 * scale, h as u32 * scale, |x, y| {
            let i = (y / scale) as usize * w + (x / scale) as usize;
            image::Rgb(rows.get(i).map_or([0, 0, 0], |r| self.color(r)))
        })
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn matvec(m: &[f64], v: &[f64], c: usize) -> Vec<f64> {
    (0..c).map(|i| dot(&m[i * c..(i + 1) * c], v)).collect()
}

fn deflate(v: &mut [f64], basis: &[Vec<f64>]) {
    for u in basis {
        let d = dot(v, u);
        v.iter_mut().zip(u).for_each(|(x, y)| *x -= d * y);
    }
}

/// A photo resized (and centre-cropped) to `w x h` pixels.
pub fn photo_tile(img: &RgbImage, (w, h): (u32, u32)) -> RgbImage {
    image::DynamicImage::ImageRgb8(img.clone())
        .resize_to_fill(w, h, image::imageops::FilterType::Triangle)
        .to_rgb8()
}

/// Lay out tiles (rows x columns, any sizes up to the largest) with column titles and a
/// title line, and write the PNG atomically.
pub fn write_grid(
    path: &Path,
    title: &str,
    columns: &[String],
    rows: &[Vec<RgbImage>],
) -> Result<()> {
    use plotters::prelude::*;
    let ncol = columns
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let tw = rows.iter().flatten().map(|t| t.width()).max().unwrap_or(64);
    let th = rows
        .iter()
        .flatten()
        .map(|t| t.height())
        .max()
        .unwrap_or(64);
    let (pad, head) = (6u32, 58u32);
    let w = ncol as u32 * (tw + pad) + pad;
    let h = head + rows.len() as u32 * (th + pad) + pad;
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = pad + c as u32 * (tw + pad);
            let y = head + pad + r as u32 * (th + pad);
            image::imageops::replace(&mut canvas, tile, x as i64, y as i64);
        }
    }
    crate::train::plot::register_font();
    {
        let (cw, ch) = canvas.dimensions();
        let root = BitMapBackend::with_buffer(canvas.as_mut(), (cw, ch)).into_drawing_area();
        let draw = |text: &str, x: i32, y: i32, size: i32| -> Result<()> {
            root.draw(&Text::new(
                text.to_string(),
                (x, y),
                ("sans-serif", size).into_font().color(&BLACK),
            ))
            .map_err(|e| Error::io(path, e))
        };
        // the title shrinks to fit the width (monospace: ~0.6 em per character)
        let fit = ((w - 2 * pad) as f64 / (0.6 * title.chars().count().max(1) as f64)) as i32;
        draw(title, pad as i32, 4, fit.clamp(8, 15))?;
        for (c, name) in columns.iter().enumerate() {
            // up to two lines per column title, each kept inside its column
            let max_chars = (tw / 7).max(4) as usize;
            for (j, line) in name.lines().take(2).enumerate() {
                let label: String = line.chars().take(max_chars).collect();
                let x = (pad + c as u32 * (tw + pad)) as i32;
                draw(&label, x, 24 + 15 * j as i32, 12)?;
            }
        }
        root.present().map_err(|e| Error::io(path, e))?;
    }
    let mut bytes = Vec::new();
    canvas
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::io(path, e))?;
    crate::atomic::write_bytes(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points spread along three known orthogonal directions with standard deviations 4, 2, 1
    /// (and nothing else): the fitted directions are those axes, in that order, with those
    /// variances (hand-computed: the sample variance of +-s over a symmetric set is s^2).
    #[test]
    fn pca_recovers_known_axes() {
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let axes = [[s, s, 0.0, 0.0], [s, -s, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
        let sd = [4.0, 2.0, 1.0];
        let mut rows = Vec::new();
        for (a, &d) in axes.iter().zip(&sd) {
            for sign in [-1.0, 1.0] {
                let r: Vec<f32> = (0..4)
                    .map(|i| (10.0 + sign * d * 3f64.sqrt() * a[i]) as f32)
                    .collect();
                rows.push(r);
            }
        }
        let p = Pca3::fit(&rows).unwrap();
        // 6 rows, each axis carries 2 of them at +-d*sqrt(3): variance = 2 * 3 d^2 / 6 = d^2
        for k in 0..3 {
            assert!(
                (p.variances[k] - sd[k] * sd[k]).abs() < 1e-6,
                "{:?}",
                p.variances
            );
            let cos = dot(&p.components[k], &axes[k]).abs();
            assert!(
                (cos - 1.0).abs() < 1e-9,
                "component {k}: {:?}",
                p.components[k]
            );
        }
        assert!(p.mean.iter().all(|m| (m - 10.0).abs() < 1e-6));
        // the extreme rows map to the ends of the colour range
        let c = p.color(&rows[1]);
        assert_eq!(c[0], 255);
    }

    #[test]
    fn rank_deficient_data_still_gives_three_directions() {
        let rows: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32, 0.0, 0.0]).collect();
        let p = Pca3::fit(&rows).unwrap();
        assert!(p.variances[1].abs() < 1e-12 && p.variances[2].abs() < 1e-12);
        for i in 0..3 {
            for j in 0..i {
                assert!(dot(&p.components[i], &p.components[j]).abs() < 1e-9);
            }
        }
    }
}
