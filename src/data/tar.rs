//! Images inside tar archives, read without extracting: an ImageNet-style train tar (whose
//! members are per-class tars, indexed recursively) or WebDataset shards (samples `key.jpg`,
//! `key.cls`, ...; the image members are used). Archives are indexed once (member name, data
//! offset, size) and members are then read by seeking, so random access is cheap.

use crate::error::{Error, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One image stored in an archive.
#[derive(Clone, Debug)]
pub struct TarMember {
    pub archive: Arc<PathBuf>,
    /// member path, nested archives joined with `/`
    pub name: String,
    /// absolute offset of the data in the archive file
    pub offset: u64,
    pub size: u64,
}

pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".jpg", ".jpeg", ".png", ".webp"]
        .iter()
        .any(|e| lower.ends_with(e))
}

/// Index the image members of an archive, descending into member archives (`*.tar`).
pub fn index_archive(path: &Path) -> Result<Vec<TarMember>> {
    let archive = Arc::new(path.to_path_buf());
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut out = Vec::new();
    index_region(&archive, file, 0, size, "", &mut out)?;
    Ok(out)
}

fn index_region(
    archive: &Arc<PathBuf>,
    mut file: std::fs::File,
    start: u64,
    len: u64,
    prefix: &str,
    out: &mut Vec<TarMember>,
) -> Result<std::fs::File> {
    let path = archive.as_path();
    let bad = |e: std::io::Error| Error::BadInput {
        path: path.to_path_buf(),
        msg: format!(
            "not a readable tar archive{}: {e}",
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" (inside {prefix})")
            }
        ),
    };
    file.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut nested = Vec::new();
    {
        let mut ar = tar::Archive::new((&mut file).take(len));
        for entry in ar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(bad)?.to_string_lossy().to_string();
            let full = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let offset = start + entry.raw_file_position();
            let size = entry.size();
            if name.to_ascii_lowercase().ends_with(".tar") {
                nested.push((offset, size, full));
            } else if is_image_name(&name) {
                out.push(TarMember {
                    archive: archive.clone(),
                    name: full,
                    offset,
                    size,
                });
            }
        }
    }
    for (offset, size, name) in nested {
        file = index_region(archive, file, offset, size, &name, out)?;
    }
    Ok(file)
}

/// Read a member's bytes.
pub fn read_member(m: &TarMember) -> Result<Vec<u8>> {
    let path = m.archive.as_path();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(m.offset))
        .map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; m.size as usize];
    f.read_exact(&mut buf).map_err(|e| Error::BadInput {
        path: path.to_path_buf(),
        msg: format!("{}: {e}", m.name),
    })?;
    Ok(buf)
}

/// Expand one `{a..b}` range in a shard pattern (`shard-{000000..000009}.tar`), keeping the
/// zero padding; a pattern without braces is returned as is.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let (Some(open), Some(close)) = (pattern.find('{'), pattern.find('}')) else {
        return Ok(vec![pattern.to_string()]);
    };
    let inner = &pattern[open + 1..close];
    let bad = || {
        Error::Invalid(format!(
            "shard pattern {pattern:?}: expected {{first..last}}"
        ))
    };
    let (a, b) = inner.split_once("..").ok_or_else(bad)?;
    let (first, last): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if first > last {
        return Err(bad());
    }
    let width = a.len();
    let mut out = Vec::new();
    for i in first..=last {
        let rest = expand_braces(&pattern[close + 1..])?;
        for r in rest {
            out.push(format!("{}{:0width$}{}", &pattern[..open], i, r));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_expansion() {
        assert_eq!(
            expand_braces("a-{08..11}.tar").unwrap(),
            vec!["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), vec!["plain.tar"]);
        assert!(expand_braces("a-{3..1}.tar").is_err());
    }
}
