//! Labelled segmentation sets: images with single-channel label PNGs (grey or palette), found
//! beside them by layout: an image under a folder named `images` has its mask at the same
//! relative path under the sibling `annotations/` (ADE20K's SceneParsing layout) or `masks/`
//! folder, with the extension `.png`. A set is given as such a folder (a data-set root with
//! `images/`, or any folder inside `images/`) or as a split file of image file names (the
//! paper's ADE20K splits) resolved under an images root.
//!
//! Label conventions: ADE20K's `annotations/` use 0 for "other" and 1..150 for the classes,
//! mapped as mmseg's `reduce_zero_label` does (0 -> ignore, c -> c - 1); a generic `masks/`
//! set holds class indices 0..K-1 with an ignore value. Crops of image and mask are cut
//! together (the mask resized nearest-neighbour).

use super::data::{crops_with, Crops, View};
use crate::data::augment::CropBox;
use crate::data::{ImageSource, RandomResizedCrop};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Classes of ADE20K's SceneParsing layout.
pub const ADE20K_CLASSES: usize = 150;

/// How the values of a label PNG become class indices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRule {
    pub classes: usize,
    /// the value that marks unlabelled pixels (after `reduce_zero_label`)
    pub ignore: u32,
    /// 0 -> ignore and c -> c - 1 (ADE20K)
    pub reduce_zero_label: bool,
}

impl LabelRule {
    /// The class index of a stored value (`ignore` for unlabelled pixels), or None when the
    /// value is outside the classes.
    pub fn map(&self, v: u32) -> Option<u32> {
        let v = if self.reduce_zero_label {
            match v {
                0 => return Some(self.ignore),
                v if v == self.ignore => return Some(self.ignore),
                v => v - 1,
            }
        } else {
            v
        };
        (v == self.ignore || (v as usize) < self.classes).then_some(v)
    }
}

/// A segmentation set: (image, mask) file pairs and the rule reading the masks.
#[derive(Clone, Debug)]
pub struct MaskSet {
    pub items: Vec<(PathBuf, PathBuf)>,
    pub rule: LabelRule,
    pub classes: Vec<String>,
    /// where it was read from (named in messages)
    pub source: PathBuf,
}

/// The mask of `image` by the layout rule: the last path component named `images` replaced by
/// `annotations` or `masks` (whichever holds the file), extension `.png`. Returns the mask and
/// whether it came from an `annotations` folder.
pub fn mask_of(image: &Path) -> Option<(PathBuf, bool)> {
    let comps: Vec<_> = image.components().collect();
    let at = comps.iter().rposition(|c| c.as_os_str() == "images")?;
    for (name, ade) in [("annotations", true), ("masks", false)] {
        let mut p = PathBuf::new();
        for (i, c) in comps.iter().enumerate() {
            if i == at {
                p.push(name);
            } else {
                p.push(c.as_os_str());
            }
        }
        p.set_extension("png");
        if p.is_file() {
            return Some((p, ade));
        }
    }
    None
}

/// Options of a segmentation set (from the recipe).
#[derive(Clone, Debug, Default)]
pub struct MaskOptions {
    /// 0: from the layout (ADE20K: 150)
    pub num_classes: usize,
    pub ignore_index: u32,
    /// None: from the layout (ADE20K: true)
    pub reduce_zero_label: Option<bool>,
    /// class names, one per line (default: ADE20K's numbers, or the indices)
    pub class_names: Option<PathBuf>,
}

impl MaskSet {
    /// A segmentation set from a folder or a split file (see the module doc). `images_root`
    /// resolves split-file names (default: the split file's folder): `root/NAME`,
    /// `root/images/NAME` or `root/images/<any>/NAME`. `rule` fixes the label rule (evaluation
    /// sets take the training set's).
    pub fn open(
        path: &Path,
        images_root: Option<&Path>,
        opts: &MaskOptions,
        rule: Option<&LabelRule>,
    ) -> Result<Self> {
        let images = crate::data::lists::set_images(path, images_root)?;
        let mut items = Vec::with_capacity(images.len());
        let mut ade = None;
        for img in images {
            let Some((mask, is_ade)) = mask_of(&img) else {
                return Err(Error::BadInput {
                    path: img.clone(),
                    msg: "no mask: expected the same name with .png under a sibling annotations/ or masks/ folder of images/".into(),
                });
            };
            ade.get_or_insert(is_ade);
            items.push((img, mask));
        }
        let rule = match rule {
            Some(r) => r.clone(),
            None => rule_for(opts, ade.unwrap_or(false), path)?,
        };
        let classes = class_names(opts, &rule)?;
        check_sizes(&items)?;
        Ok(Self {
            items,
            rule,
            classes,
            source: path.to_path_buf(),
        })
    }

    /// Class indices of mask `i` (`[H * W]`, row-major) with its (h, w); a value outside the
    /// classes is an error naming the file.
    pub fn load_mask(&self, i: usize) -> Result<(usize, usize, Vec<u32>)> {
        let path = &self.items[i].1;
        let (h, w, raw) = crate::data::dense::read_index_png(path)?;
        let mut out = Vec::with_capacity(raw.len());
        for v in raw {
            match self.rule.map(v as u32) {
                Some(c) => out.push(c),
                None => {
                    return Err(Error::BadInput {
                        path: path.clone(),
                        msg: format!(
                            "label {v} is outside the {} classes (ignore value {}{})",
                            self.rule.classes,
                            self.rule.ignore,
                            if self.rule.reduce_zero_label {
                                ", 0 = ignore and labels shifted down by one"
                            } else {
                                ""
                            }
                        ),
                    })
                }
            }
        }
        Ok((h, w, out))
    }

    /// Mask `i` read (as [`MaskSet::load_mask`]) and checked against its image's size.
    pub fn mask_for(&self, i: usize, img: &image::RgbImage) -> Result<(usize, usize, Vec<u32>)> {
        let (h, w, mask) = self.load_mask(i)?;
        if (w as u32, h as u32) != img.dimensions() {
            return Err(Error::BadInput {
                path: self.items[i].1.clone(),
                msg: format!(
                    "mask is {w}x{h} but its image is {}x{}",
                    img.width(),
                    img.height()
                ),
            });
        }
        Ok((h, w, mask))
    }

    /// The split file naming the set's images (one file name per line).
    pub fn split_text(&self) -> String {
        self.items
            .iter()
            .map(|(p, _)| format!("{}\n", p.display()))
            .collect()
    }
}

/// The label rule of a set whose masks come from `annotations/` folders (ADE20K) when `ade`.
fn rule_for(opts: &MaskOptions, ade: bool, path: &Path) -> Result<LabelRule> {
    let classes = match (opts.num_classes, ade) {
        (0, true) => ADE20K_CLASSES,
        (0, false) => {
            return Err(Error::BadInput {
                path: path.to_path_buf(),
                msg: "an images/ + masks/ set needs its class count: --num-classes".into(),
            })
        }
        (k, _) => k,
    };
    Ok(LabelRule {
        classes,
        ignore: opts.ignore_index,
        reduce_zero_label: opts.reduce_zero_label.unwrap_or(ade),
    })
}

fn class_names(opts: &MaskOptions, rule: &LabelRule) -> Result<Vec<String>> {
    let Some(p) = &opts.class_names else {
        return Ok((0..rule.classes).map(|c| c.to_string()).collect());
    };
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != rule.classes {
        return Err(Error::BadInput {
            path: p.clone(),
            msg: format!(
                "names {} classes, the set has {}",
                names.len(),
                rule.classes
            ),
        });
    }
    Ok(names)
}

/// Every mask must have its image's size (read from the headers only).
fn check_sizes(items: &[(PathBuf, PathBuf)]) -> Result<()> {
    items.par_iter().try_for_each(|(img, mask)| {
        let dims = |p: &Path| {
            image::image_dimensions(p).map_err(|e| Error::Image {
                path: p.to_path_buf(),
                msg: e.to_string(),
            })
        };
        let (a, b) = (dims(img)?, dims(mask)?);
        if a != b {
            return Err(Error::BadInput {
                path: mask.clone(),
                msg: format!(
                    "mask is {}x{} but its image {} is {}x{}",
                    b.0,
                    b.1,
                    img.display(),
                    a.0,
                    a.1
                ),
            });
        }
        Ok(())
    })
}

impl ImageSource for MaskSet {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn name(&self, i: usize) -> String {
        self.items[i].0.display().to_string()
    }
    fn load(&self, i: usize) -> Result<image::RgbImage> {
        crate::preprocess::read_image(&self.items[i].0)
    }
    fn root(&self) -> PathBuf {
        self.source.clone()
    }
}

/// Cut `crop` out of a `[h, w]` class map and resize it to `size` x `size` nearest-neighbour
/// (sampling at output pixel centres, as the image's resize aligns them), mirrored if asked.
pub fn crop_mask(mask: &[u32], (h, w): (usize, usize), crop: &CropBox, size: usize) -> Vec<u32> {
    let (ch, cw) = (crop.height as usize, crop.width as usize);
    let src = |o: usize, n: usize, start: usize, lim: usize| {
        (start + ((o as f64 + 0.5) * n as f64 / size as f64) as usize).min(lim - 1)
    };
    let cols: Vec<usize> = (0..size)
        .map(|x| {
            let x = if crop.flip { size - 1 - x } else { x };
            src(x, cw, crop.left as usize, w)
        })
        .collect();
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let row = src(y, ch, crop.top as usize, h) * w;
        out.extend(cols.iter().map(|&x| mask[row + x]));
    }
    out
}

/// Crops of images and masks for augmentation pass `epoch` (the same crop in every view), with
/// the masks `[B, S, S]` (u32) at the first view's side. A mask that does not match its image,
/// or holds a value outside the classes, is an error naming it; unreadable images are skipped.
pub fn mask_crops(
    data: &MaskSet,
    views: &[View],
    rrc: &RandomResizedCrop,
    seed: u64,
    epoch: u64,
    indices: &[usize],
) -> Result<(Crops, Tensor)> {
    let size = views.first().map_or(0, |v| v.image_size);
    let (c, masks) = crops_with(data, views, rrc, seed, epoch, indices, |i, img, crop| {
        let (h, w, mask) = data.mask_for(i, img)?;
        Ok(crop_mask(&mask, (h, w), crop, size))
    })?;
    let n = c.kept.len();
    let masks = Tensor::from_vec(masks.concat(), (n, size, size), &Device::Cpu)?;
    Ok((c, masks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ade_rule_shifts_and_ignores() {
        let r = LabelRule {
            classes: 150,
            ignore: 255,
            reduce_zero_label: true,
        };
        assert_eq!(r.map(0), Some(255));
        assert_eq!(r.map(1), Some(0));
        assert_eq!(r.map(150), Some(149));
        assert_eq!(r.map(255), Some(255));
        assert_eq!(r.map(151), None);
        let g = LabelRule {
            classes: 3,
            ignore: 255,
            reduce_zero_label: false,
        };
        assert_eq!(g.map(0), Some(0));
        assert_eq!(g.map(2), Some(2));
        assert_eq!(g.map(3), None);
        assert_eq!(g.map(255), Some(255));
    }

    #[test]
    fn mask_crop_by_hand() {
        // 4x3 map, values = 10 * row + col
        let m: Vec<u32> = (0..3)
            .flat_map(|r| (0..4).map(move |c| 10 * r + c))
            .collect();
        // the right 2x2 block at top 1, upsampled to 4x4: each source pixel twice each way
        let crop = CropBox {
            top: 1,
            left: 2,
            height: 2,
            width: 2,
            flip: false,
        };
        let out = crop_mask(&m, (3, 4), &crop, 4);
        assert_eq!(
            out,
            vec![12, 12, 13, 13, 12, 12, 13, 13, 22, 22, 23, 23, 22, 22, 23, 23]
        );
        let flipped = crop_mask(&m, (3, 4), &CropBox { flip: true, ..crop }, 4);
        assert_eq!(&flipped[..4], &[13, 13, 12, 12]);
        // downsampling the whole 4x3 map to 2x2 samples pixel centres (rows 0, 2; cols 1, 3)
        let all = CropBox {
            top: 0,
            left: 0,
            height: 3,
            width: 4,
            flip: false,
        };
        assert_eq!(crop_mask(&m, (3, 4), &all, 2), vec![1, 3, 21, 23]);
    }

    fn grey_png(path: &Path, (w, h): (u32, u32), f: impl Fn(u32, u32) -> u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn ade20k_layout_split_files_and_bad_masks() {
        let dir = tempfile::tempdir().unwrap();
        let ade = dir.path().join("ADEChallengeData2016");
        // the first three names of the paper's 1,200-image ADE20K split
        let split = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/ml-vfm-kt-splits/ADE20K/train_1200img.txt");
        let text = std::fs::read_to_string(&split).unwrap();
        let names: Vec<&str> = text.lines().take(3).collect();
        for (i, n) in names.iter().enumerate() {
            let stem = n.trim_end_matches(".jpg");
            let img = ade.join("images/training").join(n);
            std::fs::create_dir_all(img.parent().unwrap()).unwrap();
            image::RgbImage::from_pixel(6, 4, image::Rgb([i as u8 * 50, 0, 0]))
                .save_with_format(&img, image::ImageFormat::Jpeg)
                .unwrap();
            // annotation: 0 ("other") in the first column, then classes 1 and 150
            grey_png(
                &ade.join(format!("annotations/training/{stem}.png")),
                (6, 4),
                |x, _| match x {
                    0 => 0,
                    1..=3 => 1,
                    _ => 150,
                },
            );
        }
        let mine = dir.path().join("split.txt");
        std::fs::write(&mine, names.join("\n")).unwrap();
        let opts = MaskOptions {
            ignore_index: 255,
            ..Default::default()
        };
        let set = MaskSet::open(&mine, Some(&ade), &opts, None).unwrap();
        assert_eq!(set.items.len(), 3);
        assert_eq!(set.rule.classes, ADE20K_CLASSES);
        assert!(set.rule.reduce_zero_label);
        let (h, w, m) = set.load_mask(0).unwrap();
        assert_eq!((h, w), (4, 6));
        assert_eq!(&m[..6], &[255, 0, 0, 0, 149, 149]);
        // the same images as a folder (the data-set root, or images/training)
        assert_eq!(
            MaskSet::open(&ade, None, &opts, None).unwrap().items.len(),
            3
        );
        let t = MaskSet::open(&ade.join("images/training"), None, &opts, None).unwrap();
        assert_eq!(t.items, set.items);

        // generic images/ + masks/: class count required; values checked against it
        let gen = dir.path().join("gen");
        std::fs::create_dir_all(gen.join("images")).unwrap();
        image::RgbImage::new(5, 5)
            .save(gen.join("images/a.png"))
            .unwrap();
        grey_png(&gen.join("masks/a.png"), (5, 5), |x, _| x as u8);
        let e = MaskSet::open(&gen, None, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--num-classes"), "{e}");
        let three = MaskOptions {
            num_classes: 3,
            ..opts.clone()
        };
        let g = MaskSet::open(&gen, None, &three, None).unwrap();
        assert!(!g.rule.reduce_zero_label);
        let e = g.load_mask(0).unwrap_err().to_string();
        assert!(e.contains("masks/a.png") && e.contains("label 3"), "{e}");
        // a mask of another size than its image
        grey_png(&gen.join("masks/a.png"), (4, 5), |_, _| 0);
        let e = MaskSet::open(&gen, None, &three, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("masks/a.png") && e.contains("4x5"), "{e}");
        // an image without a mask
        std::fs::remove_file(gen.join("masks/a.png")).unwrap();
        let e = MaskSet::open(&gen, None, &three, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("images/a.png") && e.contains("no mask"), "{e}");
        // a split line naming a missing image
        std::fs::write(&mine, "ADE_train_99999999.jpg\n").unwrap();
        let e = MaskSet::open(&mine, Some(&ade), &opts, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("ADE_train_99999999.jpg"),
            "{e}"
        );
    }
}
