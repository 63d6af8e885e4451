//! Stage-1 augmentation: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, torchvision's
//! sampling with 10 attempts and a centre-crop fallback) and a horizontal flip, drawn from a
//! per-sample generator seeded by (seed, epoch, index) so any step can be replayed exactly.

use crate::error::Result;
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A crop rectangle in source pixels and whether to mirror it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
    pub flip: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub flip_p: f64,
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        Self {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
        }
    }
}

/// The generator for one sample.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    // SplitMix-style mixing of the three coordinates into one seed.
    let mut z = seed
        .wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

impl RandomResizedCrop {
    /// Draw a crop for an image of (w, h).
    pub fn sample(&self, (w, h): (u32, u32), rng: &mut impl Rng) -> CropBox {
        let area = (w as f64) * (h as f64);
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.random_range(self.scale.0..=self.scale.1);
            let ar = rng.random_range(lr0..=lr1).exp();
            let cw = (target * ar).sqrt().round() as u32;
            let ch = (target / ar).sqrt().round() as u32;
            if cw > 0 && ch > 0 && cw <= w && ch <= h {
                let top = rng.random_range(0..=h - ch);
                let left = rng.random_range(0..=w - cw);
                let flip = rng.random_bool(self.flip_p);
                return CropBox {
                    top,
                    left,
                    height: ch,
                    width: cw,
                    flip,
                };
            }
        }
        // Fallback: centre crop with the ratio clamped to the allowed range.
        let in_ratio = w as f64 / h as f64;
        let (cw, ch) = if in_ratio < self.ratio.0 {
            (w, ((w as f64 / self.ratio.0).round() as u32).min(h))
        } else if in_ratio > self.ratio.1 {
            (((h as f64 * self.ratio.1).round() as u32).min(w), h)
        } else {
            (w, h)
        };
        let flip = rng.random_bool(self.flip_p);
        CropBox {
            top: (h - ch) / 2,
            left: (w - cw) / 2,
            height: ch.max(1),
            width: cw.max(1),
            flip,
        }
    }
}

/// Cut `crop` out of `img`, resize it to `size` x `size` (bilinear), mirror if asked, and
/// return `[3, size, size]` normalised with `mean`/`std` (values scaled to 0..1 first).
pub fn crop_to_tensor(
    img: &RgbImage,
    crop: &CropBox,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    let view =
        image::imageops::crop_imm(img, crop.left, crop.top, crop.width, crop.height).to_image();
    let mut r = image::imageops::resize(&view, size as u32, size as u32, FilterType::Triangle);
    if crop.flip {
        image::imageops::flip_horizontal_in_place(&mut r);
    }
    let mut data = vec![0f32; 3 * size * size];
    for (x, y, p) in r.enumerate_pixels() {
        let i = y as usize * size + x as usize;
        for c in 0..3 {
            data[c * size * size + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_vec(data, (3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_are_valid_and_replayable() {
        let rrc = RandomResizedCrop::default();
        for i in 0..200u64 {
            let (w, h) = (100 + (i as u32 * 7) % 300, 50 + (i as u32 * 13) % 400);
            let a = rrc.sample((w, h), &mut sample_rng(7, 3, i));
            let b = rrc.sample((w, h), &mut sample_rng(7, 3, i));
            assert_eq!(a, b);
            assert!(a.left + a.width <= w && a.top + a.height <= h);
            let frac = (a.width * a.height) as f64 / (w * h) as f64;
            assert!(frac <= 1.0 + 1e-9 && frac > 0.0);
        }
        assert_ne!(
            rrc.sample((300, 200), &mut sample_rng(7, 3, 1)),
            rrc.sample((300, 200), &mut sample_rng(7, 4, 1))
        );
    }

    #[test]
    fn flip_mirrors_the_crop() {
        let img = RgbImage::from_fn(4, 2, |x, _| image::Rgb([x as u8 * 60, 0, 0]));
        let crop = |flip| CropBox {
            top: 0,
            left: 0,
            height: 2,
            width: 4,
            flip,
        };
        let a = crop_to_tensor(&img, &crop(false), 4, [0.0; 3], [1.0; 3], &Device::Cpu).unwrap();
        let b = crop_to_tensor(&img, &crop(true), 4, [0.0; 3], [1.0; 3], &Device::Cpu).unwrap();
        let a = a.get(0).unwrap().to_vec2::<f32>().unwrap();
        let b = b.get(0).unwrap().to_vec2::<f32>().unwrap();
        for y in 0..4 {
            for x in 0..4 {
                assert_eq!(a[y][x], b[y][3 - x]);
            }
        }
    }
}
