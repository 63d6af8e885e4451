//! Image preprocessing as a checkpoint's `preprocessor_config.json` describes it: resize
//! (shortest edge, exact size or longest edge), centre crop, rescale, normalise, pad.

use crate::config::Cfg;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use std::path::Path;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
pub const HALF: [f32; 3] = [0.5, 0.5, 0.5];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    None,
    /// shorter side to this length, aspect kept
    ShortestEdge(usize),
    /// longer side to this length, aspect kept (SAM)
    LongestEdge(usize),
    /// exactly (h, w)
    Exact(usize, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Bilinear,
    Bicubic,
}

impl Resample {
    /// PIL's resample codes as stored in preprocessor configs.
    fn from_pil(code: usize) -> Self {
        match code {
            0 => Resample::Nearest,
            2 => Resample::Bilinear,
            _ => Resample::Bicubic,
        }
    }

    fn filter(self) -> FilterType {
        match self {
            Resample::Nearest => FilterType::Nearest,
            Resample::Bilinear => FilterType::Triangle,
            Resample::Bicubic => FilterType::CatmullRom,
        }
    }
}

/// A complete preprocessing recipe.
/// timm's data configuration (`pretrained_cfg` in a hub folder's `config.json`): evaluation
/// resizes the shorter side to `input / crop_pct` and centre-crops `input`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimmDataConfig {
    /// (height, width) of the model input
    pub input_hw: (usize, usize),
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub crop_pct: f64,
    /// `bilinear` or `bicubic`
    pub interpolation: String,
}

impl TimmDataConfig {
    /// timm's defaults (ImageNet statistics, crop 0.875, bilinear) at `side` px.
    pub fn imagenet(side: usize) -> Self {
        Self {
            input_hw: (side, side),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            crop_pct: 0.875,
            interpolation: "bilinear".into(),
        }
    }

    /// Read `pretrained_cfg` of a timm `config.json` over `default` (fields it lacks keep the
    /// default's).
    pub fn from_cfg(cfg: &Cfg, default: Self) -> Result<Self> {
        let mut d = default;
        let Some(p) = cfg.sub("pretrained_cfg") else {
            return Ok(d);
        };
        let input = p.usize_list("input_size", &[3, d.input_hw.0, d.input_hw.1])?;
        if input.len() == 3 && input[1] > 0 && input[2] > 0 {
            d.input_hw = (input[1], input[2]);
        }
        for (key, slot) in [("mean", &mut d.mean), ("std", &mut d.std)] {
            if let Some(m) = p.f32_list(key)? {
                cfg.ensure(m.len() == 3, || {
                    format!("pretrained_cfg.{key} must have 3 values")
                })?;
                *slot = [m[0], m[1], m[2]];
            }
        }
        d.crop_pct = p.f64("crop_pct", d.crop_pct)?;
        d.interpolation = p.string("interpolation", &d.interpolation)?;
        Ok(d)
    }

    /// The evaluation preprocessing: shorter side to `input / crop_pct`, centre crop.
    pub fn preprocess(&self) -> PreprocessConfig {
        let (h, w) = self.input_hw;
        let side = h.max(w);
        let mut p = PreprocessConfig::short_edge_crop(
            (side as f64 / self.crop_pct).floor() as usize,
            side,
            self.mean,
            self.std,
        );
        p.crop = Some((h, w));
        p.resample = if self.interpolation == "bilinear" {
            Resample::Bilinear
        } else {
            Resample::Bicubic
        };
        p
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    pub resize: Resize,
    pub resample: Resample,
    pub crop: Option<(usize, usize)>,
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// zero-pad (after normalisation) at the bottom/right to (h, w)
    pub pad: Option<(usize, usize)>,
}

impl PreprocessConfig {
    /// Resize shortest edge to `resize`, centre-crop `crop`.
    pub fn short_edge_crop(resize: usize, crop: usize, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            resize: Resize::ShortestEdge(resize),
            resample: Resample::Bicubic,
            crop: Some((crop, crop)),
            rescale: 1.0 / 255.0,
            mean,
            std,
            pad: None,
        }
    }

    /// Resize to exactly (h, w).
    pub fn exact(
        input_hw: (usize, usize),
        resample: Resample,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Self {
        Self {
            resize: Resize::Exact(input_hw.0, input_hw.1),
            resample,
            crop: None,
            rescale: 1.0 / 255.0,
            mean,
            std,
            pad: None,
        }
    }

    /// SAM: longest side to `side`, normalise, zero-pad to side x side.
    pub fn longest_edge_pad(side: usize, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            resize: Resize::LongestEdge(side),
            resample: Resample::Bilinear,
            crop: None,
            rescale: 1.0 / 255.0,
            mean,
            std,
            pad: Some((side, side)),
        }
    }

    /// Apply the fields a transformers `preprocessor_config.json` sets on top of `self`.
    pub fn with_hf(mut self, cfg: &Cfg) -> Result<Self> {
        if !cfg.bool("do_resize", true)? {
            self.resize = Resize::None;
        } else if let Some(size) = cfg.sub("size") {
            if let Some(s) = size.usize_opt("shortest_edge")? {
                self.resize = Resize::ShortestEdge(s);
            } else if let Some(s) = size.usize_opt("longest_edge")? {
                self.resize = Resize::LongestEdge(s);
            } else if size.has("height") && size.has("width") {
                self.resize =
                    Resize::Exact(size.positive("height", 1)?, size.positive("width", 1)?);
            }
        } else if let Some(s) = cfg.usize_opt("size")? {
            self.resize = match self.resize {
                Resize::ShortestEdge(_) => Resize::ShortestEdge(s),
                Resize::LongestEdge(_) => Resize::LongestEdge(s),
                _ => Resize::Exact(s, s),
            };
        }
        if let Some(code) = cfg.usize_opt("resample")? {
            self.resample = Resample::from_pil(code);
        }
        if cfg.has("do_center_crop") && !cfg.bool("do_center_crop", true)? {
            self.crop = None;
        } else if let Some(c) = cfg.sub("crop_size") {
            self.crop = Some((c.positive("height", 1)?, c.positive("width", 1)?));
        } else if let Some(c) = cfg.usize_opt("crop_size")? {
            self.crop = Some((c, c));
        }
        if !cfg.bool("do_rescale", true)? {
            self.rescale = 1.0;
        } else {
            self.rescale = cfg.f64("rescale_factor", self.rescale as f64)? as f32;
        }
        if !cfg.bool("do_normalize", true)? {
            self.mean = [0.0; 3];
            self.std = [1.0; 3];
        } else {
            if let Some(m) = cfg.f32_list("image_mean")? {
                self.mean = triple(cfg, "image_mean", &m)?;
            }
            if let Some(s) = cfg.f32_list("image_std")? {
                self.std = triple(cfg, "image_std", &s)?;
            }
        }
        if cfg.has("do_pad") && !cfg.bool("do_pad", false)? {
            self.pad = None;
        } else if let Some(p) = cfg.sub("pad_size") {
            self.pad = Some((p.positive("height", 1)?, p.positive("width", 1)?));
        }
        Ok(self)
    }

    /// Output size for an input of (h, w).
    pub fn output_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (h, w) = resized_size(self.resize, (h, w));
        let (h, w) = self.crop.unwrap_or((h, w));
        self.pad
            .map(|(ph, pw)| (ph.max(h), pw.max(w)))
            .unwrap_or((h, w))
    }

    /// Turn an RGB image into a normalised `[3, H, W]` tensor.
    pub fn apply(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w0, h0) = img.dimensions();
        let (rh, rw) = resized_size(self.resize, (h0 as usize, w0 as usize));
        let resized;
        let img = if (rh, rw) != (h0 as usize, w0 as usize) {
            resized = image::imageops::resize(img, rw as u32, rh as u32, self.resample.filter());
            &resized
        } else {
            img
        };
        let (ch, cw, top, left) = match self.crop {
            Some((ch, cw)) => {
                let ch = ch.min(rh);
                let cw = cw.min(rw);
                (ch, cw, (rh - ch) / 2, (rw - cw) / 2)
            }
            None => (rh, rw, 0, 0),
        };
        let (oh, ow) = self
            .pad
            .map(|(ph, pw)| (ph.max(ch), pw.max(cw)))
            .unwrap_or((ch, cw));
        let mut data = vec![0f32; 3 * oh * ow];
        for y in 0..ch {
            for x in 0..cw {
                let p = img.get_pixel((left + x) as u32, (top + y) as u32);
                for c in 0..3 {
                    let v = p[c] as f32 * self.rescale;
                    data[c * oh * ow + y * ow + x] = (v - self.mean[c]) / self.std[c];
                }
            }
        }
        Ok(Tensor::from_vec(data, (3, oh, ow), device)?)
    }
}

fn triple(cfg: &Cfg, key: &str, v: &[f32]) -> Result<[f32; 3]> {
    cfg.ensure(v.len() == 3, || format!("{key} must have 3 values"))?;
    Ok([v[0], v[1], v[2]])
}

fn resized_size(resize: Resize, (h, w): (usize, usize)) -> (usize, usize) {
    match resize {
        Resize::None => (h, w),
        Resize::Exact(rh, rw) => (rh, rw),
        Resize::ShortestEdge(s) => {
            if h <= w {
                (s, (s as f64 * w as f64 / h as f64) as usize)
            } else {
                ((s as f64 * h as f64 / w as f64) as usize, s)
            }
        }
        Resize::LongestEdge(s) => {
            let scale = s as f64 / h.max(w) as f64;
            (
                ((h as f64 * scale + 0.5) as usize).max(1),
                ((w as f64 * scale + 0.5) as usize).max(1),
            )
        }
    }
}

/// Decode an image file to RGB.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let img = reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_reference_rules() {
        // CLIP: shortest edge 224 on 480x640 -> 224x298 (int truncation), crop 224.
        let p = PreprocessConfig::short_edge_crop(224, 224, CLIP_MEAN, CLIP_STD);
        assert_eq!(resized_size(p.resize, (480, 640)), (224, 298));
        assert_eq!(p.output_size((480, 640)), (224, 224));
        // SAM: longest edge 1024 on 321x481 -> 683x1024, padded to 1024x1024.
        let s = PreprocessConfig::longest_edge_pad(1024, IMAGENET_MEAN, IMAGENET_STD);
        assert_eq!(resized_size(s.resize, (321, 481)), (683, 1024));
        assert_eq!(s.output_size((321, 481)), (1024, 1024));
    }

    #[test]
    fn normalises_and_pads() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([255, 0, 51]));
        let p = PreprocessConfig {
            resize: Resize::None,
            resample: Resample::Bilinear,
            crop: None,
            rescale: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
            pad: Some((4, 4)),
        };
        let t = p.apply(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 4, 4]);
        let v = t.to_vec3::<f32>().unwrap();
        assert!((v[0][0][0] - 1.0).abs() < 1e-6);
        assert!((v[1][1][3] + 1.0).abs() < 1e-6);
        assert!((v[2][0][0] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
        // padded rows are zero
        assert_eq!(v[0][3][0], 0.0);
    }
}
