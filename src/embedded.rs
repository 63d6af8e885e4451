//! The demo assets compiled into the binary, so `distillery demo` and `distillery features` run
//! with no arguments on a fresh machine: a demo checkpoint and sample image, two tiny teachers
//! of different families and a set of public-domain photographs. Written once to a folder under
//! the temporary directory when first used.

use crate::error::{Error, Result};
use std::path::PathBuf;

const FILES: Files = &[
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

/// The two tiny teachers `distillery demo` distils (random weights at realistic scale; 128 px,
/// patch 8): a DINOv2 with registers and a SAM image encoder.
/// Named files of one embedded folder.
type Files = &'static [(&'static str, &'static [u8])];

const DEMO_TEACHERS: &[(&str, Files)] = &[
    (
        "dinov2-demo",
        &[
            (
                "config.json",
                include_bytes!("../assets/demo-teachers/dinov2-demo/config.json"),
            ),
            (
                "model.safetensors",
                include_bytes!("../assets/demo-teachers/dinov2-demo/model.safetensors"),
            ),
            (
                "preprocessor_config.json",
                include_bytes!("../assets/demo-teachers/dinov2-demo/preprocessor_config.json"),
            ),
        ],
    ),
    (
        "sam-demo",
        &[
            (
                "config.json",
                include_bytes!("../assets/demo-teachers/sam-demo/config.json"),
            ),
            (
                "model.safetensors",
                include_bytes!("../assets/demo-teachers/sam-demo/model.safetensors"),
            ),
        ],
    ),
];

/// Public-domain / CC0 photographs (scikit-image's samples; assets/demo-photos/LICENSE.md).
const DEMO_PHOTOS: Files = &[
    (
        "astronaut.jpg",
        include_bytes!("../assets/demo-photos/astronaut.jpg"),
    ),
    (
        "brick.jpg",
        include_bytes!("../assets/demo-photos/brick.jpg"),
    ),
    (
        "camera.jpg",
        include_bytes!("../assets/demo-photos/camera.jpg"),
    ),
    ("cell.jpg", include_bytes!("../assets/demo-photos/cell.jpg")),
    (
        "chelsea.jpg",
        include_bytes!("../assets/demo-photos/chelsea.jpg"),
    ),
    (
        "clock.jpg",
        include_bytes!("../assets/demo-photos/clock.jpg"),
    ),
    (
        "coffee.jpg",
        include_bytes!("../assets/demo-photos/coffee.jpg"),
    ),
    (
        "coins.jpg",
        include_bytes!("../assets/demo-photos/coins.jpg"),
    ),
    (
        "grass.jpg",
        include_bytes!("../assets/demo-photos/grass.jpg"),
    ),
    (
        "gravel.jpg",
        include_bytes!("../assets/demo-photos/gravel.jpg"),
    ),
    (
        "hubble.jpg",
        include_bytes!("../assets/demo-photos/hubble.jpg"),
    ),
    ("ihc.jpg", include_bytes!("../assets/demo-photos/ihc.jpg")),
    (
        "microaneurysms.jpg",
        include_bytes!("../assets/demo-photos/microaneurysms.jpg"),
    ),
    (
        "retina.jpg",
        include_bytes!("../assets/demo-photos/retina.jpg"),
    ),
    (
        "rocket.jpg",
        include_bytes!("../assets/demo-photos/rocket.jpg"),
    ),
    ("text.jpg", include_bytes!("../assets/demo-photos/text.jpg")),
];

fn root() -> PathBuf {
    std::env::temp_dir().join(format!("distillery-demo-{}", env!("CARGO_PKG_VERSION")))
}

fn write_if_changed(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
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
    write_files(&dir, FILES)?;
    Ok(dir)
}

/// Write named files into `dir` (kept when unchanged).
fn write_files(dir: &std::path::Path, files: Files) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in files {
        write_if_changed(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Folders of the demo teachers, in order (DINOv2, SAM).
pub fn demo_teacher_dirs() -> Result<Vec<PathBuf>> {
    DEMO_TEACHERS
        .iter()
        .map(|(name, files)| {
            let dir = root().join("demo-teachers").join(name);
            write_files(&dir, files)?;
            Ok(dir)
        })
        .collect()
}

/// Folder of the demo photographs.
pub fn demo_photos_dir() -> Result<PathBuf> {
    let dir = root().join("demo-photos");
    write_files(&dir, DEMO_PHOTOS)?;
    Ok(dir)
}

/// Handwritten digits (assets/demo-digits-LICENSE.md): `train/<d>/`, `test/<d>/`, `unlabeled/`.
const DEMO_DIGITS_TAR: &[u8] = include_bytes!("../assets/demo-digits.tar");

/// Folder of the demo digits (`train/<digit>/*.png`, `test/<digit>/*.png`, `unlabeled/*.png`),
/// unpacked from the embedded archive.
pub fn demo_digits_dir() -> Result<PathBuf> {
    let base = root();
    std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    let tar = base.join("demo-digits.tar");
    write_if_changed(&tar, DEMO_DIGITS_TAR)?;
    let dir = base.join("demo-digits");
    for m in crate::data::tar::index_archive(&tar)? {
        let rel = std::path::Path::new(&m.name);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            continue;
        }
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_if_changed(&p, &crate::data::tar::read_member(&m)?)?;
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
