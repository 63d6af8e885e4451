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

/// The header of a `.npy` array: shape, element kind (`f`, `i`, `u`, `b`) and size in
/// bytes, and where the data starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub shape: Vec<usize>,
    pub kind: char,
    pub size: usize,
    pub offset: usize,
}

impl Header {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Parse a `.npy` header (C order, little-endian) from the start of `b`. Checks that `b` holds
/// the whole array (so a header declaring a huge shape is refused, not allocated).
pub fn parse_header(b: &[u8]) -> std::result::Result<Header, String> {
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
    let (endian, kind) = descr.split_at(1.min(descr.len()));
    if endian == ">" {
        return Err("big-endian arrays are not supported".into());
    }
    let size: usize = kind
        .get(1..)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("dtype {descr:?}"))?;
    let h = Header {
        kind: kind.chars().next().unwrap_or('?'),
        size,
        offset: start + hlen,
        shape,
    };
    let bytes = h
        .shape
        .iter()
        .try_fold(size, |a, &d| a.checked_mul(d))
        .ok_or("the shape overflows")?;
    let have = b.len() - h.offset.min(b.len());
    if have < bytes {
        return Err(format!(
            "{have} data bytes for shape {:?} of {descr} ({bytes} needed)",
            h.shape
        ));
    }
    Ok(h)
}

fn parse_f32(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let h = parse_header(b)?;
    let (n, size) = (h.elements(), h.size);
    let data = &b[h.offset..];
    let c = data[..n * size].chunks_exact(size);
    let out: Vec<f32> = match (h.kind, size) {
        ('f', 4) => c
            .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
            .collect(),
        ('f', 8) => c
            .map(|v| f64::from_le_bytes(v.try_into().expect("8 bytes")) as f32)
            .collect(),
        ('f', 2) => c
            .map(|v| half::f16::from_le_bytes([v[0], v[1]]).to_f32())
            .collect(),
        ('u', 1) | ('b', 1) => c.map(|v| v[0] as f32).collect(),
        ('u', 2) => c.map(|v| u16::from_le_bytes([v[0], v[1]]) as f32).collect(),
        ('i', 2) => c.map(|v| i16::from_le_bytes([v[0], v[1]]) as f32).collect(),
        ('i', 4) => c
            .map(|v| i32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32)
            .collect(),
        ('u', 4) => c
            .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32)
            .collect(),
        (k, n) => return Err(format!("unsupported dtype {k}{n}")),
    };
    Ok((h.shape, out))
}

/// Element types [`write_2d`] stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyType {
    F16,
    F32,
}

impl NpyType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyType::F16 => 2,
            NpyType::F32 => 4,
        }
    }

    /// `f16` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            NpyType::F16 => "f16",
            NpyType::F32 => "f32",
        }
    }
}

/// FNV-1a (64-bit) over bytes: a stable content fingerprint (not cryptographic).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The bytes of a C-order 2-D `.npy` array (format 1.0) of `rows` x `cols` values stored as
/// `ty` (little-endian), readable by `numpy.load`.
pub fn encode_2d(values: &[f32], rows: usize, cols: usize, ty: NpyType) -> Result<Vec<u8>> {
    if values.len() != rows * cols {
        return Err(Error::Invalid(format!(
            "{} values for a {rows} x {cols} array",
            values.len()
        )));
    }
    let descr = match ty {
        NpyType::F16 => "<f2",
        NpyType::F32 => "<f4",
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, then \n
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut b = Vec::with_capacity(10 + header.len() + values.len() * 4);
    b.extend_from_slice(b"\x93NUMPY\x01\x00");
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    match ty {
        NpyType::F16 => {
            for v in values {
                b.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        NpyType::F32 => {
            for v in values {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_arrays_read_back_with_numpys_header_layout() {
        let v = [1.0f32, -2.5, 0.25, 3.0, 0.0, 65504.0];
        for ty in [NpyType::F16, NpyType::F32] {
            let b = encode_2d(&v, 2, 3, ty).unwrap();
            // the data starts 64-byte aligned, as numpy writes it
            let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
            assert_eq!((10 + hlen) % 64, 0);
            assert_eq!(b[10 + hlen - 1], b'\n');
            let (shape, back) = parse_f32(&b).unwrap();
            assert_eq!(shape, vec![2, 3]);
            assert_eq!(back, v.to_vec());
        }
        assert!(encode_2d(&v, 4, 2, NpyType::F32).is_err());
    }
}
