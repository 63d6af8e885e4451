//! The image sets of task-oriented transfer: labelled classification sets (an ImageFolder tree
//! `root/<class>/*.jpg`, or a split file of `filename,classname` lines as the paper's published
//! splits are, with an images root), a per-class label budget, and the unlabelled transfer set
//! (any image source the tool reads, or a list file with one path per line); batches of random
//! resized crops seen by one or several models (each at its own size and normalisation), and
//! evaluation inputs.

use crate::data::augment::{crop_to_tensor, sample_rng, CropBox};
pub use crate::data::lists::{image_files, open_unlabeled, parse_split, ListSource, SplitLine};
use crate::data::{ImageSource, RandomResizedCrop};
use crate::error::{Error, Result};
use crate::preprocess::PreprocessConfig;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A labelled image set: files with class indices into `classes`.
#[derive(Clone, Debug)]
pub struct Labeled {
    pub items: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
    /// where it was read from (named in messages)
    pub source: PathBuf,
}

impl Labeled {
    /// A labelled set from an ImageFolder tree or a split file. Split files name images
    /// relative to `images_root` (default: the split file's folder), directly or under a folder
    /// named after the class (EuroSAT's layout). `classes` fixes the class list (evaluation
    /// sets use the training set's); without it the classes are the sorted names found.
    pub fn open(
        path: &Path,
        images_root: Option<&Path>,
        classes: Option<&[String]>,
    ) -> Result<Self> {
        if path.is_dir() {
            Self::folder(path, classes)
        } else if path.is_file() {
            let root = images_root
                .map(Path::to_path_buf)
                .or_else(|| path.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            Self::split(path, &root, classes)
        } else {
            Err(Error::BadInput {
                path: path.to_path_buf(),
                msg: "no such folder (class sub-folders) or split file".into(),
            })
        }
    }

    fn folder(root: &Path, classes: Option<&[String]>) -> Result<Self> {
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let p = e.map_err(|e| Error::io(root, e))?.path();
            if p.is_dir() {
                dirs.push(p);
            }
        }
        dirs.sort();
        if dirs.is_empty() {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: "no class sub-folders (expected root/<class>/<image>)".into(),
            });
        }
        let names: Vec<String> = dirs
            .iter()
            .map(|d| {
                d.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        let classes = match classes {
            Some(c) => c.to_vec(),
            None => names.clone(),
        };
        let mut items = Vec::new();
        for (dir, name) in dirs.iter().zip(&names) {
            let k = class_index(&classes, name, dir)?;
            let files = image_files(dir)?;
            if files.is_empty() {
                return Err(Error::BadInput {
                    path: dir.clone(),
                    msg: "class folder has no images (jpg, jpeg, png, webp)".into(),
                });
            }
            items.extend(files.into_iter().map(|f| (f, k)));
        }
        Ok(Self {
            items,
            classes,
            source: root.to_path_buf(),
        })
    }

    fn split(file: &Path, root: &Path, classes: Option<&[String]>) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let lines = parse_split(&text, file)?;
        let classes = match classes {
            Some(c) => c.to_vec(),
            None => {
                let mut c: Vec<String> = lines.iter().filter_map(|l| l.class.clone()).collect();
                c.sort();
                c.dedup();
                c
            }
        };
        let mut items = Vec::with_capacity(lines.len());
        for l in &lines {
            let Some(class) = &l.class else {
                return Err(Error::BadInput {
                    path: file.to_path_buf(),
                    msg: format!(
                        "line {}: {:?} has no class (classification splits are `filename,classname`)",
                        l.line, l.file
                    ),
                });
            };
            let k = class_index(&classes, class, file)?;
            let direct = root.join(&l.file);
            let nested = root.join(class).join(&l.file);
            let p = if direct.is_file() {
                direct
            } else if nested.is_file() {
                nested
            } else {
                return Err(Error::BadInput {
                    path: file.to_path_buf(),
                    msg: format!(
                        "line {}: {} does not exist (nor {})",
                        l.line,
                        direct.display(),
                        nested.display()
                    ),
                });
            };
            items.push((p, k));
        }
        Ok(Self {
            items,
            classes,
            source: file.to_path_buf(),
        })
    }

    /// Images per class.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &(_, k) in &self.items {
            c[k] += 1;
        }
        c
    }

    /// At most `per_class` images of each class (classes with fewer keep all), drawn without
    /// replacement from (seed, class); `0` keeps everything. The kept images stay in order.
    pub fn budget(&self, per_class: usize, seed: u64) -> Self {
        if per_class == 0 {
            return self.clone();
        }
        let mut keep = vec![false; self.items.len()];
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes.len()];
        for (i, &(_, k)) in self.items.iter().enumerate() {
            by_class[k].push(i);
        }
        for (k, mut idx) in by_class.into_iter().enumerate() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            idx.shuffle(&mut rng);
            for &i in idx.iter().take(per_class) {
                keep[i] = true;
            }
        }
        Self {
            items: self
                .items
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(it, _)| it.clone())
                .collect(),
            classes: self.classes.clone(),
            source: self.source.clone(),
        }
    }
}

fn class_index(classes: &[String], name: &str, path: &Path) -> Result<usize> {
    classes
        .iter()
        .position(|c| c == name)
        .ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            msg: format!(
                "class {name:?} is not one of the training set's {} classes",
                classes.len()
            ),
        })
}

impl ImageSource for Labeled {
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

/// How one model sees a crop: square side and normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    /// the square input side
    pub image_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl View {
    /// The evaluation input of an image: shortest side resized to `size / crop_pct`, centre
    /// crop `size` (timm's eval transform), `[3, size, size]`.
    pub fn eval_tensor(&self, img: &image::RgbImage, crop_pct: f64) -> Result<Tensor> {
        let resize = ((self.image_size as f64 / crop_pct.clamp(0.05, 1.0)).floor() as usize)
            .max(self.image_size);
        PreprocessConfig::short_edge_crop(resize, self.image_size, self.mean, self.std)
            .apply(img, &Device::Cpu)
    }
}

/// A batch of random resized crops: one `[B, 3, s, s]` tensor per view (the same crop and flip
/// in every view), the data-set indices kept, and how many images were unreadable (skipped).
pub struct Crops {
    pub views: Vec<Tensor>,
    pub kept: Vec<usize>,
    pub skipped: usize,
}

/// Crops of items `indices` of `data` for augmentation pass `epoch`: each drawn from the
/// per-sample generator (seed, epoch, index), so a step replays exactly. Unreadable images are
/// skipped (a batch with none readable is an error).
pub fn crops(
    data: &dyn ImageSource,
    views: &[View],
    rrc: &RandomResizedCrop,
    seed: u64,
    epoch: u64,
    indices: &[usize],
) -> Result<Crops> {
    Ok(crops_with(data, views, rrc, seed, epoch, indices, |_, _, _| Ok(()))?.0)
}

/// [`crops`], with what `extra` makes of each kept item from its index, image and crop (a mask
/// cut the same way), in the order of `Crops::kept`. An error from `extra` fails the batch.
pub fn crops_with<T: Send>(
    data: &dyn ImageSource,
    views: &[View],
    rrc: &RandomResizedCrop,
    seed: u64,
    epoch: u64,
    indices: &[usize],
    extra: impl Fn(usize, &image::RgbImage, &CropBox) -> Result<T> + Sync,
) -> Result<(Crops, Vec<T>)> {
    type Item<T> = Option<(Vec<Tensor>, T)>;
    let items: Vec<Result<Item<T>>> = indices
        .par_iter()
        .map(|&i| {
            let img = match data.load(i) {
                Ok(img) => img,
                Err(e) => {
                    tracing::warn!("skipping unreadable image: {e}");
                    return Ok(None);
                }
            };
            let crop = rrc.sample(img.dimensions(), &mut sample_rng(seed, epoch, i as u64));
            let ts = views
                .iter()
                .map(|v| crop_to_tensor(&img, &crop, v.image_size, v.mean, v.std, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?;
            Ok(Some((ts, extra(i, &img, &crop)?)))
        })
        .collect();
    let mut per_view: Vec<Vec<Tensor>> = vec![Vec::new(); views.len()];
    let (mut kept, mut extras, mut skipped) = (Vec::new(), Vec::new(), 0);
    for (it, &i) in items.into_iter().zip(indices) {
        match it? {
            Some((ts, x)) => {
                kept.push(i);
                extras.push(x);
                for (k, t) in ts.into_iter().enumerate() {
                    per_view[k].push(t);
                }
            }
            None => skipped += 1,
        }
    }
    if kept.is_empty() {
        return Err(Error::BadInput {
            path: data.root(),
            msg: format!(
                "none of the {} images of a batch is readable",
                indices.len()
            ),
        });
    }
    let views = per_view
        .iter()
        .map(|v| Ok(Tensor::stack(v, 0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((
        Crops {
            views,
            kept,
            skipped,
        },
        extras,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures")
            .join(rel)
    }

    #[test]
    fn published_split_files_parse_with_their_budgets() {
        // EuroSAT 5 per class (10 classes), HAM10K at most 100 per class (7 classes, 700
        // lines), ADE20K 1,200 filenames without classes.
        for (rel, lines, classes) in [
            ("ml-vfm-kt-splits/EuroSAT/train_5img_per_class.txt", 50, 10),
            (
                "ml-vfm-kt-splits/HAM10K/train_100img_max_per_class.txt",
                700,
                7,
            ),
            ("ml-vfm-kt-splits/ADE20K/train_1200img.txt", 1200, 0),
        ] {
            let p = shared(rel);
            let text = std::fs::read_to_string(&p).unwrap();
            let s = parse_split(&text, &p).unwrap();
            assert_eq!(s.len(), lines, "{rel}");
            let mut c: Vec<_> = s.iter().filter_map(|l| l.class.clone()).collect();
            c.sort();
            c.dedup();
            assert_eq!(c.len(), classes, "{rel}");
        }
        let p = shared("ml-vfm-kt-splits/EuroSAT/train_5img_per_class.txt");
        let s = parse_split(&std::fs::read_to_string(&p).unwrap(), &p).unwrap();
        assert_eq!(s[0].file, "AnnualCrop_2200.jpg");
        assert_eq!(s[0].class.as_deref(), Some("AnnualCrop"));
        let e = parse_split("a.jpg,x,y\n", Path::new("bad.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.txt") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn image_folder_split_file_and_budget() {
        let digits = shared("digits/train");
        let set = Labeled::open(&digits, None, None).unwrap();
        assert_eq!(set.classes.len(), 10);
        assert_eq!(set.counts(), vec![20; 10]);
        let b = set.budget(5, 3);
        assert_eq!(b.counts(), vec![5; 10]);
        assert_eq!(b.items, set.budget(5, 3).items);
        assert_ne!(b.items, set.budget(5, 4).items);
        assert!(b.items.iter().all(|it| set.items.contains(it)));
        assert_eq!(set.budget(100, 3).items, set.items);

        // A split file naming the same images, flat and nested under the class folder.
        let dir = tempfile::tempdir().unwrap();
        let (f0, _) = &set.items[0];
        let name0 = f0.file_name().unwrap().to_string_lossy().to_string();
        std::fs::copy(f0, dir.path().join("flat.png")).unwrap();
        std::fs::create_dir(dir.path().join("3")).unwrap();
        std::fs::copy(f0, dir.path().join("3").join(&name0)).unwrap();
        let split = dir.path().join("split.txt");
        std::fs::write(&split, format!("flat.png,0\n{name0},3\n")).unwrap();
        let s = Labeled::open(&split, None, Some(&set.classes)).unwrap();
        assert_eq!(s.items.len(), 2);
        assert_eq!(s.items[1].1, 3);
        // a missing file is named with its line
        std::fs::write(&split, "flat.png,0\nnope.png,1\n").unwrap();
        let e = Labeled::open(&split, None, None).unwrap_err().to_string();
        assert!(
            e.contains("split.txt") && e.contains("line 2") && e.contains("nope.png"),
            "{e}"
        );
        // an empty class folder is an error naming it
        std::fs::create_dir_all(dir.path().join("tree/a")).unwrap();
        std::fs::create_dir_all(dir.path().join("tree/b")).unwrap();
        std::fs::copy(f0, dir.path().join("tree/a/x.png")).unwrap();
        let e = Labeled::open(&dir.path().join("tree"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tree/b") && e.contains("no images"), "{e}");
        // an evaluation set with a class the training set lacks
        let e = Labeled::open(&dir.path().join("tree"), None, Some(&["a".to_string()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"b\""), "{e}");
    }

    #[test]
    fn list_files_and_grayscale_crops() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        let img = shared("digits/unlabeled");
        let mut names: Vec<_> = std::fs::read_dir(&img)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let text = format!(
            "# retrieved\n{}\n{},0.93\nmissing.png\n",
            names[0].display(),
            names[1].display()
        );
        std::fs::write(&list, text).unwrap();
        let src = open_unlabeled(&list).unwrap();
        assert_eq!(src.len(), 2);
        std::fs::write(&list, "missing.png\n").unwrap();
        assert!(open_unlabeled(&list).is_err());
        // grayscale PNGs come out as 3-channel crops in every view, replayably
        let views = [
            View {
                image_size: 16,
                mean: [0.5; 3],
                std: [0.5; 3],
            },
            View {
                image_size: 8,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
        ];
        let c = crops(&*src, &views, &RandomResizedCrop::default(), 1, 0, &[1, 0]).unwrap();
        assert_eq!(c.views[0].dims(), &[2, 3, 16, 16]);
        assert_eq!(c.views[1].dims(), &[2, 3, 8, 8]);
        assert_eq!(c.kept, vec![1, 0]);
        let again = crops(&*src, &views, &RandomResizedCrop::default(), 1, 0, &[1, 0]).unwrap();
        let d = (&c.views[0] - &again.views[0]).unwrap().abs().unwrap();
        assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
