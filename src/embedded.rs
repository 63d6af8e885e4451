//! The demo checkpoint and sample image compiled into the binary, so `distillery features`
//! runs with no arguments on a fresh machine. Written once to a cache folder when first used.

use crate::error::{Error, Result};
use std::path::PathBuf;

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../assets/demo-model/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../assets/demo-model/model.safetensors"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../assets/demo-model/preprocessor_config.json"),
    ),
];

const SAMPLE_PNG: &[u8] = include_bytes!("../assets/sample.png");

fn root() -> PathBuf {
    std::env::temp_dir().join(format!("distillery-demo-{}", env!("CARGO_PKG_VERSION")))
}

fn write_if_changed(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).map(|b| b == bytes).unwrap_or(false) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Folder holding the embedded demo model (DINOv2 with registers, 224 px, patch 14).
pub fn demo_model_dir() -> Result<PathBuf> {
    let dir = root().join("demo-model");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (name, bytes) in FILES {
        write_if_changed(&dir.join(name), bytes)?;
    }
    Ok(dir)
}

/// Path of the embedded sample image.
pub fn sample_image() -> Result<PathBuf> {
    let dir = root();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let p = dir.join("sample.png");
    write_if_changed(&p, SAMPLE_PNG)?;
    Ok(p)
}
