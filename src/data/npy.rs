//! A reader for NumPy `.npy` arrays of floats or integers (NYUD depth maps are stored this way).

use crate::error::{Error, Result};
use std::path::Path;

/// Read a C-order `.npy` array as f32: (shape, values). Accepts little-endian f4/f8/f2 and
/// integer dtypes; Fortran order and big-endian data are rejected with a message.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_f32(&bytes).map_err(|msg| Error::BadInput {
        path: path.to_path_buf(),
        msg: format!("not a readable .npy array: {msg}"),
    })
}

fn parse_f32(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let k = header
            .find(&format!("'{key}'"))
            .ok_or(format!("header has no {key}"))?;
        Ok(header[k + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or("");
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_s = field("shape")?;
    let shape_s = &shape_s[1..shape_s.find(')').ok_or("bad shape")?];
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry {s:?}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[start + hlen..];
    let (endian, kind) = descr.split_at(1.min(descr.len()));
    if endian == ">" {
        return Err("big-endian arrays are not supported".into());
    }
    let size: usize = kind[1..].parse().map_err(|_| format!("dtype {descr:?}"))?;
    if data.len() < n * size {
        return Err(format!(
            "{} data bytes for shape {shape:?} of {descr}",
            data.len()
        ));
    }
    let c = data[..n * size].chunks_exact(size);
    let out: Vec<f32> = match (&kind[..1], size) {
        ("f", 4) => c
            .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
            .collect(),
        ("f", 8) => c
            .map(|v| f64::from_le_bytes(v.try_into().expect("8 bytes")) as f32)
            .collect(),
        ("f", 2) => c
            .map(|v| half::f16::from_le_bytes([v[0], v[1]]).to_f32())
            .collect(),
        ("u", 1) | ("b", 1) => c.map(|v| v[0] as f32).collect(),
        ("u", 2) => c.map(|v| u16::from_le_bytes([v[0], v[1]]) as f32).collect(),
        ("i", 2) => c.map(|v| i16::from_le_bytes([v[0], v[1]]) as f32).collect(),
        ("i", 4) => c
            .map(|v| i32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32)
            .collect(),
        ("u", 4) => c
            .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32)
            .collect(),
        _ => return Err(format!("unsupported dtype {descr:?}")),
    };
    Ok((shape, out))
}
