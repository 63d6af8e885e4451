//! Atomic file output: every file distillery writes goes to a temporary file beside its
//! destination first and is renamed into place, so a reader never sees a half-written file and
//! a failed or killed write leaves the previous file intact.

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Write tensors as safetensors: to a temporary file beside `path`, then rename, so a reader
/// never sees a half-written file and a failed write leaves any previous file intact.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = temp_path_beside(path)?;
    let res = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| Error::io(&tmp, crate::weights::clean_candle_msg(&e)))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Write bytes to a temporary file beside `path`, then rename (see [`write_safetensors`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path_beside(path)?;
    let res = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A temporary file name in `path`'s folder (same file system, so a rename is atomic); the
/// folder must exist.
pub fn temp_path_beside(path: &Path) -> Result<std::path::PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::io(dir, "output folder does not exist"));
    }
    Ok(dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    )))
}
