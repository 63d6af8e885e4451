//! Image lists: split files (`filename[,classname]` per line), list files of paths, and the
//! images of a set given as a folder or a split file. Shared by the transfer pipeline and
//! retrieval.

use super::tar::is_image_name;
use super::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One line of a split file: a file name and, for classification splits, its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitLine {
    pub line: usize,
    pub file: String,
    pub class: Option<String>,
}

/// Parse a split file's text (one image per line, `filename[,classname]`, no header; blank
/// lines and `#` comments skipped). `path` is named in errors.
pub fn parse_split(text: &str, path: &Path) -> Result<Vec<SplitLine>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut parts = l.split(',').map(str::trim);
        let file = parts.next().unwrap_or_default().to_string();
        let class = parts.next().map(str::to_string);
        if file.is_empty() || class.as_deref() == Some("") || parts.next().is_some() {
            return Err(Error::BadInput {
                path: path.to_path_buf(),
                msg: format!(
                    "line {}: expected `filename` or `filename,classname`, got {l:?}",
                    i + 1
                ),
            });
        }
        out.push(SplitLine {
            line: i + 1,
            file,
            class,
        });
    }
    if out.is_empty() {
        return Err(Error::BadInput {
            path: path.to_path_buf(),
            msg: "split file lists no images".into(),
        });
    }
    Ok(out)
}

/// Every image file under `dir` (recursively), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_image_name(&p.to_string_lossy()) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Images named in a list file, one path per line (relative paths from the list's folder; the
/// first comma- or tab-separated field of a line is the path; blank lines and `#` comments
/// skipped). Paths that do not exist are dropped with a warning; none existing is an error.
pub struct ListSource {
    list: PathBuf,
    files: Vec<PathBuf>,
}

impl ListSource {
    /// Images already found (`source` is named in messages).
    pub fn from_files(source: &Path, files: Vec<PathBuf>) -> Self {
        Self {
            list: source.to_path_buf(),
            files,
        }
    }

    pub fn open(list: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
        let base = list.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        let mut missing = 0usize;
        for l in text.lines() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let first = l.split([',', '\t']).next().unwrap_or_default().trim();
            let p = base.join(first);
            if p.is_file() {
                files.push(p);
            } else {
                missing += 1;
            }
        }
        if missing > 0 {
            tracing::warn!("{}: {missing} listed images do not exist", list.display());
        }
        if files.is_empty() {
            return Err(Error::BadInput {
                path: list.to_path_buf(),
                msg: format!("lists no existing image ({missing} missing)"),
            });
        }
        Ok(Self {
            list: list.to_path_buf(),
            files,
        })
    }
}

impl ImageSource for ListSource {
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
        self.list.clone()
    }
}

/// The unlabelled transfer set: a list file (`.txt`, `.lst`, `.list`, `.csv`), else any source
/// [`ImageSet`] reads (folder tree, tar archive, shard pattern).
pub fn open_unlabeled(path: &Path) -> Result<Box<dyn ImageSource>> {
    let is_list = path.is_file()
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["txt", "lst", "list", "csv"].contains(&e.to_ascii_lowercase().as_str())
        });
    Ok(if is_list {
        Box::new(ListSource::open(path)?)
    } else {
        Box::new(ImageSet::open(path)?)
    })
}

/// The images of a set: every image under a folder (under its `images/` when it has one), or
/// those a split file names, found under `images_root` (default: the file's folder) directly,
/// under `images/` or `images/*/`, or in a folder named after the line's class.
pub fn set_images(path: &Path, images_root: Option<&Path>) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        folder_images(path)
    } else if path.is_file() {
        let root = images_root
            .map(Path::to_path_buf)
            .or_else(|| path.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        split_images(path, &root)
    } else {
        Err(Error::BadInput {
            path: path.to_path_buf(),
            msg: "no such folder or split file".into(),
        })
    }
}

/// Every image under `dir` (a data-set root's `images/` when it has one), sorted.
fn folder_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let base = if dir.join("images").is_dir() {
        dir.join("images")
    } else {
        dir.to_path_buf()
    };
    let files = image_files(&base)?;
    if files.is_empty() {
        return Err(Error::BadInput {
            path: base,
            msg: "no images (jpg, jpeg, png, webp)".into(),
        });
    }
    Ok(files)
}

/// The images a split file names, found under `root`.
fn split_images(file: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let lines = parse_split(&text, file)?;
    let mut subs = vec![root.to_path_buf(), root.join("images")];
    if let Ok(rd) = std::fs::read_dir(root.join("images")) {
        let mut s: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        s.sort();
        subs.extend(s);
    }
    lines
        .iter()
        .map(|l| {
            subs.iter()
                .flat_map(|s| {
                    let nested = l.class.as_ref().map(|c| s.join(c).join(&l.file));
                    std::iter::once(s.join(&l.file)).chain(nested)
                })
                .find(|p| p.is_file())
                .ok_or_else(|| Error::BadInput {
                    path: file.to_path_buf(),
                    msg: format!(
                        "line {}: {} is not in {} nor its images/ or class folders",
                        l.line,
                        l.file,
                        root.display()
                    ),
                })
        })
        .collect()
}
