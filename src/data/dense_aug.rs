//! Label-aware augmentation for multi-task training (SPEC.md section 4), in the reference's
//! order: random scale (image bilinear, labels nearest, depth divided by the scale), random crop
//! retried until the largest semseg class covers < 75%, horizontal flip (normals' x negated),
//! photometric distortion, normalisation, centre padding (image 0, class labels 255, normals
//! and depth 0). Evaluation: normalisation and centre padding only.

use super::dense::{DenseSample, LabelMap, Task, IGNORE};
use crate::error::{Error, Result};
use image::RgbImage;
use rand::Rng;
use std::collections::BTreeMap;

/// A sample ready for the network: normalised image [3, H, W] (CHW) and labels at (H, W).
#[derive(Clone, Debug)]
pub struct Prepared {
    pub id: String,
    pub h: usize,
    pub w: usize,
    pub image: Vec<f32>,
    pub labels: BTreeMap<Task, LabelMap>,
    /// The image's place inside the padded input: (top, left, height, width).
    pub valid: (usize, usize, usize, usize),
}

/// Augmentation parameters (defaults: the reference recipe).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenseAugment {
    pub scale: (f64, f64),
    pub cat_max_ratio: f64,
    pub crop_retries: usize,
    pub flip_p: f64,
    pub photometric: bool,
    pub brightness: f64,
    pub contrast: (f64, f64),
    pub saturation: (f64, f64),
    pub hue: i32,
}

impl Default for DenseAugment {
    fn default() -> Self {
        DenseAugment {
            scale: (0.5, 2.0),
            cat_max_ratio: 0.75,
            crop_retries: 10,
            flip_p: 0.5,
            photometric: true,
            brightness: 32.0,
            contrast: (0.5, 1.5),
            saturation: (0.5, 1.5),
            hue: 18,
        }
    }
}

/// Normalisation statistics in 0..1 units.
#[derive(Clone, Copy, Debug)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

/// Bilinear resize of an RGB image (pixel centres aligned, edges clamped: OpenCV's
/// INTER_LINEAR), rounded back to 8 bits.
pub fn resize_bilinear(img: &RgbImage, nh: usize, nw: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let coord = |o: usize, n_in: usize, n_out: usize| -> (usize, usize, f32) {
        let s = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, (s - i0 as f64) as f32)
    };
    let xs: Vec<_> = (0..nw).map(|x| coord(x, w, nw)).collect();
    let mut out = vec![0u8; nh * nw * 3];
    for y in 0..nh {
        let (y0, y1, fy) = coord(y, h, nh);
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let p = |yy: usize, xx: usize| src[(yy * w + xx) * 3 + c] as f32;
                let v = (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1))
                    + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1));
                out[(y * nw + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(nw as u32, nh as u32, out).expect("sized buffer")
}

/// Nearest-neighbour resize of a label map (OpenCV's INTER_NEAREST: source = floor(dst * scale)).
pub fn resize_nearest(m: &LabelMap, nh: usize, nw: usize) -> LabelMap {
    let mut data = Vec::with_capacity(nh * nw * m.c);
    for y in 0..nh {
        let sy = ((y as f64 * m.h as f64 / nh as f64).floor() as usize).min(m.h - 1);
        for x in 0..nw {
            let sx = ((x as f64 * m.w as f64 / nw as f64).floor() as usize).min(m.w - 1);
            let i = (sy * m.w + sx) * m.c;
            data.extend_from_slice(&m.data[i..i + m.c]);
        }
    }
    LabelMap {
        h: nh,
        w: nw,
        c: m.c,
        data,
    }
}

fn crop_label(m: &LabelMap, top: usize, left: usize, h: usize, w: usize) -> LabelMap {
    let mut data = Vec::with_capacity(h * w * m.c);
    for y in top..top + h {
        let s = (y * m.w + left) * m.c;
        data.extend_from_slice(&m.data[s..s + w * m.c]);
    }
    LabelMap { h, w, c: m.c, data }
}

fn flip_label(m: &mut LabelMap, negate_x: bool) {
    for y in 0..m.h {
        for x in 0..m.w / 2 {
            for c in 0..m.c {
                m.data
                    .swap((y * m.w + x) * m.c + c, (y * m.w + m.w - 1 - x) * m.c + c);
            }
        }
    }
    if negate_x {
        for px in m.data.chunks_exact_mut(m.c) {
            px[0] = -px[0];
        }
    }
}

/// Share of the most frequent class among labelled pixels, and how many classes occur.
fn max_class_share(m: &LabelMap) -> (f64, usize) {
    let mut counts = std::collections::HashMap::new();
    let mut total = 0usize;
    for &v in &m.data {
        if v != IGNORE {
            *counts.entry(v as i64).or_insert(0usize) += 1;
            total += 1;
        }
    }
    let max = counts.values().copied().max().unwrap_or(0);
    (max as f64 / total.max(1) as f64, counts.len())
}

/// U[lo, hi), or `lo` when the range is empty (a fixed value in the config).
fn uniform(rng: &mut (impl Rng + ?Sized), lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

impl DenseAugment {
    /// Check the ranges once, where the config is read.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Invalid(format!("augment: {m}")));
        if !(self.scale.0 > 0.0 && self.scale.1 >= self.scale.0) {
            return bad("scale must be (lo, hi) with 0 < lo <= hi");
        }
        if !(0.0..=1.0).contains(&self.flip_p) || !(0.0..=1.0).contains(&self.cat_max_ratio) {
            return bad("flip_p and cat_max_ratio must be in [0, 1]");
        }
        if self.brightness < 0.0 || self.hue < 0 || self.contrast.0 < 0.0 || self.saturation.0 < 0.0
        {
            return bad("brightness, hue and the contrast/saturation factors must be non-negative");
        }
        Ok(())
    }

    /// Augment one sample for training at input size (h, w).
    pub fn apply(
        &self,
        s: &DenseSample,
        (h, w): (usize, usize),
        norm: Normalize,
        rng: &mut impl Rng,
    ) -> Prepared {
        // 1. Random scale.
        let sc = uniform(rng, self.scale.0, self.scale.1);
        let (ih, iw) = (s.image.height() as usize, s.image.width() as usize);
        let (nh, nw) = (
            ((ih as f64 * sc).round() as usize).max(1),
            ((iw as f64 * sc).round() as usize).max(1),
        );
        let mut image = resize_bilinear(&s.image, nh, nw);
        let mut labels: BTreeMap<Task, LabelMap> = s
            .labels
            .iter()
            .map(|(&t, m)| {
                let mut r = resize_nearest(m, nh, nw);
                t.spec().rescale_values(&mut r, sc);
                (t, r)
            })
            .collect();
        // 2. Random crop, retried while one semseg class dominates.
        let (ch, cw) = (h.min(nh), w.min(nw));
        let mut offset = (0, 0);
        for _ in 0..self.crop_retries.max(1) {
            offset = (rng.random_range(0..=nh - ch), rng.random_range(0..=nw - cw));
            match labels.get(&Task::Semseg) {
                Some(seg) => {
                    let (share, n) = max_class_share(&crop_label(seg, offset.0, offset.1, ch, cw));
                    if n > 1 && share < self.cat_max_ratio {
                        break;
                    }
                }
                None => break,
            }
        }
        image = image::imageops::crop_imm(
            &image,
            offset.1 as u32,
            offset.0 as u32,
            cw as u32,
            ch as u32,
        )
        .to_image();
        for m in labels.values_mut() {
            *m = crop_label(m, offset.0, offset.1, ch, cw);
        }
        // 3. Flip.
        if rng.random_bool(self.flip_p) {
            image::imageops::flip_horizontal_in_place(&mut image);
            for (&t, m) in labels.iter_mut() {
                flip_label(m, t.spec().flip_negates_x());
            }
        }
        // 4. Photometric distortion.
        if self.photometric {
            self.photometric(&mut image, rng);
        }
        // 5-6. Normalise and pad.
        finish(&s.id, &image, labels, (h, w), norm)
    }

    /// mmseg's PhotoMetricDistortion: brightness, contrast (before or after, at random),
    /// saturation and hue in OpenCV's 8-bit HSV; every step p = 0.5 and clipped to 8 bits.
    fn photometric(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        let convert = |img: &mut RgbImage, alpha: f32, beta: f32| {
            for v in img.iter_mut() {
                *v = (*v as f32 * alpha + beta).clamp(0.0, 255.0) as u8;
            }
        };
        if rng.random_bool(0.5) {
            let b = uniform(rng, -self.brightness, self.brightness) as f32;
            convert(img, 1.0, b);
        }
        let contrast_first = rng.random_bool(0.5);
        let contrast = |img: &mut RgbImage, rng: &mut dyn rand::RngCore| {
            if rng.random_bool(0.5) {
                let a = uniform(rng, self.contrast.0, self.contrast.1) as f32;
                convert(img, a, 0.0);
            }
        };
        if contrast_first {
            contrast(img, rng);
        }
        if rng.random_bool(0.5) {
            let a = uniform(rng, self.saturation.0, self.saturation.1) as f32;
            for px in img.pixels_mut() {
                let (hh, s, v) = rgb_to_hsv(px.0);
                let s = (s as f32 * a).clamp(0.0, 255.0) as u8;
                px.0 = hsv_to_rgb(hh, s, v);
            }
        }
        if rng.random_bool(0.5) {
            let d = if self.hue > 0 {
                rng.random_range(-self.hue..self.hue)
            } else {
                0
            };
            for px in img.pixels_mut() {
                let (hh, s, v) = rgb_to_hsv(px.0);
                let hh = (hh as i32 + d).rem_euclid(180) as u8;
                px.0 = hsv_to_rgb(hh, s, v);
            }
        }
        if !contrast_first {
            contrast(img, rng);
        }
    }
}

/// Evaluation input: normalise and centre-pad to (h, w). The image must fit.
pub fn prepare_eval(s: &DenseSample, (h, w): (usize, usize), norm: Normalize) -> Result<Prepared> {
    let (ih, iw) = (s.image.height() as usize, s.image.width() as usize);
    if ih > h || iw > w {
        return Err(Error::Invalid(format!(
            "{}: image is {iw}x{ih}, larger than the evaluation input {w}x{h}",
            s.id
        )));
    }
    Ok(finish(&s.id, &s.image, s.labels.clone(), (h, w), norm))
}

/// Normalise, then centre-pad image (0) and labels (their pad values) to (h, w).
fn finish(
    id: &str,
    image: &RgbImage,
    labels: BTreeMap<Task, LabelMap>,
    (h, w): (usize, usize),
    norm: Normalize,
) -> Prepared {
    let (ih, iw) = (image.height() as usize, image.width() as usize);
    let (top, left) = ((h - ih) / 2, (w - iw) / 2);
    let mut out = vec![0f32; 3 * h * w];
    for (x, y, p) in image.enumerate_pixels() {
        let (x, y) = (x as usize + left, y as usize + top);
        for c in 0..3 {
            out[c * h * w + y * w + x] = (p[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
    let labels = labels
        .into_iter()
        .map(|(t, m)| {
            let mut p = LabelMap::filled(h, w, m.c, t.pad_value());
            for y in 0..ih {
                let d = ((y + top) * w + left) * m.c;
                p.data[d..d + iw * m.c].copy_from_slice(&m.data[y * iw * m.c..(y + 1) * iw * m.c]);
            }
            (t, p)
        })
        .collect();
    Prepared {
        id: id.to_string(),
        h,
        w,
        image: out,
        labels,
        valid: (top, left, ih, iw),
    }
}

/// OpenCV 8-bit RGB -> HSV (H in 0..180).
pub fn rgb_to_hsv([r, g, b]: [u8; 3]) -> (u8, u8, u8) {
    let (rf, gf, bf) = (r as f32, g as f32, b as f32);
    let v = rf.max(gf).max(bf);
    let mn = rf.min(gf).min(bf);
    let d = v - mn;
    let s = if v > 0.0 { 255.0 * d / v } else { 0.0 };
    let mut h = if d == 0.0 {
        0.0
    } else if v == rf {
        60.0 * (gf - bf) / d
    } else if v == gf {
        120.0 + 60.0 * (bf - rf) / d
    } else {
        240.0 + 60.0 * (rf - gf) / d
    };
    if h < 0.0 {
        h += 360.0;
    }
    (
        ((h / 2.0).round() as u32 % 180) as u8,
        s.round() as u8,
        v as u8,
    )
}

/// OpenCV 8-bit HSV (H in 0..180) -> RGB.
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    let h = h as f32 * 2.0 / 60.0;
    let s = s as f32 / 255.0;
    let v = v as f32;
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r.round() as u8, g.round() as u8, b.round() as u8]
}
