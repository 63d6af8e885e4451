//! A reader for MATLAB level-5 `.mat` files (the format `save -v7` writes and `scipy.io.savemat`
//! produces): numeric and logical arrays, char arrays, cell arrays and structs, zlib-compressed
//! elements included. The data sets' annotations (BSDS `groundTruth`, PASCAL-Context `LabelMap`,
//! PASCAL part annotations) are stored this way. Level-7.3 files (HDF5) are rejected by name.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_OBJECT: u8 = 3;
const MX_CHAR: u8 = 4;
const MX_SPARSE: u8 = 5;

/// One MATLAB value. Arrays are column-major, as MATLAB stores them.
#[derive(Clone, Debug)]
pub enum MatValue {
    /// Numeric or logical array, converted to f64 (every MATLAB integer type fits exactly, but
    /// 64-bit integers above 2^53).
    Numeric {
        dims: Vec<usize>,
        data: Vec<f64>,
        logical: bool,
    },
    Char(String),
    Cell {
        dims: Vec<usize>,
        items: Vec<MatValue>,
    },
    /// Struct array: `elems[i]` maps field name to value for element i (column-major).
    Struct {
        dims: Vec<usize>,
        elems: Vec<BTreeMap<String, MatValue>>,
    },
    /// Anything this reader does not interpret (objects, sparse, function handles).
    Unsupported(&'static str),
}

impl MatValue {
    fn kind(&self) -> &'static str {
        match self {
            MatValue::Numeric { .. } => "numeric array",
            MatValue::Char(_) => "char array",
            MatValue::Cell { .. } => "cell array",
            MatValue::Struct { .. } => "struct",
            MatValue::Unsupported(k) => k,
        }
    }

    /// A 2-D numeric/logical array as `(height, width, row-major data)`.
    pub fn as_matrix(&self) -> Option<(usize, usize, Vec<f64>)> {
        let MatValue::Numeric { dims, data, .. } = self else {
            return None;
        };
        if dims.len() != 2 {
            return None;
        }
        let (h, w) = (dims[0], dims[1]);
        let mut out = vec![0.0; h * w];
        for c in 0..w {
            for r in 0..h {
                out[r * w + c] = data[c * h + r];
            }
        }
        Some((h, w, out))
    }

    /// A scalar number.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    /// Field `name` of element `i` of a struct array.
    pub fn field(&self, i: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct { elems, .. } => elems.get(i)?.get(name),
            _ => None,
        }
    }

    /// Number of elements of a struct or cell array (1 for anything else).
    pub fn len(&self) -> usize {
        match self {
            MatValue::Struct { elems, .. } => elems.len(),
            MatValue::Cell { items, .. } => items.len(),
            MatValue::Numeric { data, .. } => data.len(),
            _ => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The variables of a `.mat` file, by name.
#[derive(Debug)]
pub struct MatFile {
    pub path: PathBuf,
    pub vars: BTreeMap<String, MatValue>,
}

impl MatFile {
    /// Read and parse a file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Parse the bytes of a file (`path` is for messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |msg: String| Error::BadInput {
            path: path.to_path_buf(),
            msg: format!("not a readable MATLAB .mat file: {msg}"),
        };
        if bytes.len() < 128 {
            return Err(bad(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        if bytes.starts_with(b"MATLAB 7.3") || bytes[128..].starts_with(b"\x89HDF") {
            return Err(bad(
                "MATLAB v7.3 (HDF5) files are not supported; re-save with save(..., '-v7')".into(),
            ));
        }
        let version = u16::from_le_bytes([bytes[124], bytes[125]]);
        let endian = &bytes[126..128];
        if endian != b"IM" {
            let why = if endian == b"MI" {
                "big-endian files are not supported".to_string()
            } else {
                format!("bad header (version {version:#x}, endian mark {endian:?})")
            };
            return Err(bad(why));
        }
        let mut vars = BTreeMap::new();
        let mut r = Reader {
            buf: &bytes[128..],
            pos: 0,
        };
        while r.pos + 8 <= r.buf.len() {
            let (ty, data) = r.element().map_err(&bad)?;
            let (name, value) = match ty {
                MI_COMPRESSED => {
                    let mut inflated = Vec::new();
                    flate2::read::ZlibDecoder::new(data)
                        .read_to_end(&mut inflated)
                        .map_err(|e| bad(format!("corrupt compressed element: {e}")))?;
                    let mut inner = Reader {
                        buf: &inflated,
                        pos: 0,
                    };
                    let (ty, data) = inner.element().map_err(&bad)?;
                    if ty != MI_MATRIX {
                        continue;
                    }
                    parse_matrix(data).map_err(&bad)?
                }
                MI_MATRIX => parse_matrix(data).map_err(&bad)?,
                _ => continue,
            };
            vars.insert(name, value);
        }
        Ok(MatFile {
            path: path.to_path_buf(),
            vars,
        })
    }

    /// A variable, or an error naming the file and what it does contain.
    pub fn var(&self, name: &str) -> Result<&MatValue> {
        self.vars.get(name).ok_or_else(|| Error::BadInput {
            path: self.path.clone(),
            msg: format!(
                "no variable {name:?} (variables: {})",
                self.vars.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// An error about this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::BadInput {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// A variable that must be a 2-D numeric array: `(height, width, row-major data)`.
    pub fn matrix(&self, name: &str) -> Result<(usize, usize, Vec<f64>)> {
        let v = self.var(name)?;
        v.as_matrix()
            .ok_or_else(|| self.error(format!("{name:?} is a {}, not a 2-D array", v.kind())))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize) -> PResult<u32> {
        let b = self
            .buf
            .get(at..at + 4)
            .ok_or_else(|| format!("truncated at byte {at}"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Next data element: (type, payload). Handles the small-element format and padding.
    fn element(&mut self) -> PResult<(u32, &'a [u8])> {
        let first = self.u32_at(self.pos)?;
        if first >> 16 != 0 {
            // Small data element: type and size packed in 4 bytes, payload in the next 4.
            let ty = first & 0xffff;
            let n = (first >> 16) as usize;
            if n > 4 {
                return Err(format!("bad small element size {n} at byte {}", self.pos));
            }
            let data = self
                .buf
                .get(self.pos + 4..self.pos + 4 + n)
                .ok_or("truncated small element")?;
            self.pos += 8;
            return Ok((ty, data));
        }
        let n = self.u32_at(self.pos + 4)? as usize;
        let start = self.pos + 8;
        let data = self.buf.get(start..start + n).ok_or_else(|| {
            format!(
                "element at byte {} claims {n} bytes, only {} left (file truncated?)",
                self.pos,
                self.buf.len().saturating_sub(start)
            )
        })?;
        self.pos = if first == MI_COMPRESSED {
            start + n
        } else {
            start + n.div_ceil(8) * 8
        };
        Ok((first, data))
    }
}

/// Decode a numeric payload of any storage type to f64.
fn numbers(ty: u32, d: &[u8]) -> PResult<Vec<f64>> {
    fn conv<const N: usize>(d: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        d.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    Ok(match ty {
        MI_INT8 => d.iter().map(|&b| b as i8 as f64).collect(),
        MI_UINT8 | MI_UTF8 => d.iter().map(|&b| b as f64).collect(),
        MI_INT16 => conv(d, |a| i16::from_le_bytes(a) as f64),
        MI_UINT16 => conv(d, |a| u16::from_le_bytes(a) as f64),
        MI_INT32 => conv(d, |a| i32::from_le_bytes(a) as f64),
        MI_UINT32 => conv(d, |a| u32::from_le_bytes(a) as f64),
        MI_SINGLE => conv(d, |a| f32::from_le_bytes(a) as f64),
        MI_DOUBLE => conv(d, f64::from_le_bytes),
        MI_INT64 => conv(d, |a| i64::from_le_bytes(a) as f64),
        MI_UINT64 => conv(d, |a| u64::from_le_bytes(a) as f64),
        t => return Err(format!("unknown numeric storage type {t}")),
    })
}

/// Parse the payload of a miMATRIX element into (name, value).
fn parse_matrix(data: &[u8]) -> PResult<(String, MatValue)> {
    if data.is_empty() {
        // An empty element stands for an empty array (e.g. unset struct fields).
        return Ok((
            String::new(),
            MatValue::Numeric {
                dims: vec![0, 0],
                data: vec![],
                logical: false,
            },
        ));
    }
    let mut r = Reader { buf: data, pos: 0 };
    let (_, flags) = r.element()?;
    if flags.len() < 8 {
        return Err("array flags element too short".into());
    }
    let class = flags[0];
    let fl = flags[1];
    let logical = fl & 0x02 != 0;
    let (ty, dims) = r.element()?;
    let dims: Vec<usize> = numbers(ty, dims)?
        .into_iter()
        .map(|d| d.max(0.0) as usize)
        .collect();
    let count: usize = dims.iter().product();
    let (_, name) = r.element()?;
    let name = String::from_utf8_lossy(name).into_owned();
    let value = match class {
        MX_CELL => {
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let (_, d) = r.element()?;
                items.push(parse_matrix(d)?.1);
            }
            MatValue::Cell { dims, items }
        }
        MX_STRUCT => {
            let (ty, len) = r.element()?;
            let field_len = *numbers(ty, len)?
                .first()
                .ok_or("missing field name length")? as usize;
            let (_, names) = r.element()?;
            if field_len == 0 {
                return Err("zero struct field name length".into());
            }
            let fields: Vec<String> = names
                .chunks(field_len)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect();
            let mut elems = Vec::with_capacity(count);
            for _ in 0..count {
                let mut m = BTreeMap::new();
                for f in &fields {
                    let (_, d) = r.element()?;
                    m.insert(f.clone(), parse_matrix(d)?.1);
                }
                elems.push(m);
            }
            MatValue::Struct { dims, elems }
        }
        MX_CHAR => {
            let (ty, d) = r.element()?;
            let s = if ty == MI_UTF8 || ty == MI_UINT8 || ty == MI_INT8 {
                String::from_utf8_lossy(d).into_owned()
            } else {
                let codes = numbers(ty, d)?;
                // Column-major char matrix: a single row reads straight through.
                codes
                    .iter()
                    .map(|&c| char::from_u32(c as u32).unwrap_or('\u{fffd}'))
                    .collect()
            };
            MatValue::Char(s)
        }
        MX_OBJECT => MatValue::Unsupported("object"),
        MX_SPARSE => MatValue::Unsupported("sparse array"),
        6..=15 => {
            let (ty, d) = r.element()?;
            let data = numbers(ty, d)?;
            if data.len() != count {
                return Err(format!(
                    "array {name:?} has {} values for dimensions {dims:?}",
                    data.len()
                ));
            }
            MatValue::Numeric {
                dims,
                data,
                logical,
            }
        }
        _ => MatValue::Unsupported("unknown class"),
    };
    Ok((name, value))
}
