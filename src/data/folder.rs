//! Unlabeled images from a folder tree of any depth (jpg, jpeg, png, webp; case-insensitive),
//! from tar archives found there or given directly (ImageNet-style nested tars, WebDataset
//! shards), or from a shard pattern `shard-{000000..000099}.tar`. Items are in a stable order.

use super::tar::{expand_braces, index_archive, is_image_name, read_member, TarMember};
use super::ImageSource;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
enum Item {
    File(PathBuf),
    Member(TarMember),
}

pub struct ImageSet {
    root: PathBuf,
    items: Vec<Item>,
}

fn is_tar(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tar"))
}

impl ImageSet {
    pub fn open(root: &Path) -> Result<Self> {
        let text = root.to_string_lossy();
        let mut items = Vec::new();
        if text.contains('{') {
            for shard in expand_braces(&text)? {
                let p = PathBuf::from(&shard);
                if !p.is_file() {
                    return Err(Error::BadInput {
                        path: p,
                        msg: "shard listed by the pattern does not exist".into(),
                    });
                }
                items.extend(index_archive(&p)?.into_iter().map(Item::Member));
            }
        } else if root.is_file() && is_tar(root) {
            items.extend(index_archive(root)?.into_iter().map(Item::Member));
        } else if root.is_dir() {
            let mut files = Vec::new();
            let mut stack = vec![root.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
                for e in entries {
                    let e = e.map_err(|e| Error::io(&dir, e))?;
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if is_tar(&p) || is_image_name(&p.to_string_lossy()) {
                        files.push(p);
                    }
                }
            }
            files.sort();
            for p in files {
                if is_tar(&p) {
                    items.extend(index_archive(&p)?.into_iter().map(Item::Member));
                } else {
                    items.push(Item::File(p));
                }
            }
        } else {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: "not a folder, a .tar archive or a shard pattern".into(),
            });
        }
        if items.is_empty() {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: "no images (jpg, jpeg, png, webp) found".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            items,
        })
    }
}

impl ImageSource for ImageSet {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn name(&self, i: usize) -> String {
        match &self.items[i] {
            Item::File(p) => p.display().to_string(),
            Item::Member(m) => format!("{}:{}", m.archive.display(), m.name),
        }
    }

    fn load(&self, i: usize) -> Result<image::RgbImage> {
        match &self.items[i] {
            Item::File(p) => crate::preprocess::read_image(p),
            Item::Member(m) => {
                let bytes = read_member(m)?;
                image::load_from_memory(&bytes)
                    .map(|im| im.to_rgb8())
                    .map_err(|e| Error::Image {
                        path: PathBuf::from(self.name(i)),
                        msg: e.to_string(),
                    })
            }
        }
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    fn tar_of(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn reads_nested_imagenet_tar_and_webdataset_shards() {
        let dir = tempfile::tempdir().unwrap();
        // ImageNet layout: train.tar holds n0001.tar, n0002.tar with JPEG/PNG members.
        let c1 = tar_of(&[("n0001_1.png", png(5, 4)), ("n0001_2.png", png(6, 3))]);
        let c2 = tar_of(&[("n0002_1.png", png(7, 2))]);
        let outer = tar_of(&[("n0001.tar", c1), ("n0002.tar", c2)]);
        let train = dir.path().join("train.tar");
        std::fs::write(&train, outer).unwrap();
        let set = ImageSet::open(&train).unwrap();
        assert_eq!(set.len(), 3);
        let dims: Vec<_> = (0..3).map(|i| set.load(i).unwrap().dimensions()).collect();
        assert_eq!(dims, vec![(5, 4), (6, 3), (7, 2)]);
        assert!(set.name(1).ends_with("n0001.tar/n0001_2.png"));

        // WebDataset shards: key.png + key.cls per sample; a brace pattern lists them.
        for s in 0..2 {
            let shard = tar_of(&[
                ("a.png", png(3 + s, 3)),
                ("a.cls", b"1".to_vec()),
                ("b.png", png(4, 4 + s)),
                ("b.cls", b"0".to_vec()),
            ]);
            std::fs::write(dir.path().join(format!("shard-{s:04}.tar")), shard).unwrap();
        }
        let pattern = dir.path().join("shard-{0000..0001}.tar");
        let set = ImageSet::open(&pattern).unwrap();
        assert_eq!(set.len(), 4);
        assert_eq!(set.load(3).unwrap().dimensions(), (4, 5));
        // A folder with loose images and shards mixes both.
        std::fs::write(dir.path().join("loose.png"), png(2, 2)).unwrap();
        let all = ImageSet::open(dir.path()).unwrap();
        assert_eq!(all.len(), 3 + 4 + 1);
    }

    #[test]
    fn corrupt_archive_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.tar");
        std::fs::write(&p, vec![7u8; 1500]).unwrap();
        let e = ImageSet::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad.tar"), "{e}");
    }
}
