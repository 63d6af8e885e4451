//! Images in a folder tree of any depth (jpg, jpeg, png, webp; case-insensitive), in a stable
//! sorted order.

use super::ImageSource;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
}

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

impl ImageFolder {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: "not a folder".into(),
            });
        }
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for e in entries {
                let e = e.map_err(|e| Error::io(&dir, e))?;
                let p = e.path();
                let ft = e.file_type().map_err(|e| Error::io(&p, e))?;
                if ft.is_dir() || (ft.is_symlink() && p.is_dir()) {
                    stack.push(p);
                } else if is_image(&p) {
                    files.push(p);
                }
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: format!("no images ({}) found", EXTENSIONS.join(", ")),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
        })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn name(&self, i: usize) -> String {
        self.files[i].display().to_string()
    }

    fn load(&self, i: usize) -> Result<image::RgbImage> {
        crate::preprocess::read_image(&self.files[i])
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }
}
