//! Embedding folders in the layout clip-retrieval and LAION publish:
//!
//! ```text
//! EMB/img_emb/img_emb_{i}.npy          [rows, dim] float16 or float32, rows L2-normalised
//! EMB/metadata/metadata_{i}.parquet    one row per embedding row: image_path (utf8)
//! EMB/embed.json                       distillery's manifest (model, dim, shard size, ...)
//! ```
//!
//! `numpy.load` and `pandas.read_parquet` read the shards; LAION's published embedding
//! folders (no `embed.json`, metadata with `url` instead of `image_path`) open as pools too.
//! Shards are memory-mapped and read a block of rows at a time; a shard whose files are
//! missing, truncated or disagree on the row count is set aside with the reason, and the others
//! stay usable.

use super::PoolScan;
use crate::data::npy::{self, NpyType};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `embed.json`: what made an embedding folder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    /// the model as given to `embed` (folder made absolute, or hub id)
    pub model: String,
    pub family: String,
    /// how tokens became one vector (`cls`, `clip-projection`, `siglip-map`, ...)
    pub pooling: String,
    pub dim: usize,
    /// `f16` or `f32`
    pub dtype: String,
    /// images per shard (the last may hold fewer; unreadable images are left out)
    pub shard_size: usize,
    /// images in the pool listing, and its fingerprint (names in order)
    pub images: usize,
    pub shards: usize,
    pub fingerprint: String,
    /// the pool as given to `embed`
    pub source: String,
}

pub const FORMAT: &str = "distillery-embeddings/1";

impl Manifest {
    pub fn path(root: &Path) -> PathBuf {
        root.join("embed.json")
    }

    /// The manifest of `root`, if it has one.
    pub fn read(root: &Path) -> Result<Option<Self>> {
        let p = Self::path(root);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::BadInput {
                path: p,
                msg: format!("not an embedding manifest: {e}"),
            })
    }

    pub fn write(&self, root: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("manifest: {e}")))?;
        crate::atomic::write_bytes(&Self::path(root), text.as_bytes())
    }
}

/// `img_emb/img_emb_{i}.npy` and `metadata/metadata_{i}.parquet` of shard `i`.
pub fn shard_files(root: &Path, i: usize) -> (PathBuf, PathBuf) {
    (
        root.join("img_emb").join(format!("img_emb_{i}.npy")),
        root.join("metadata").join(format!("metadata_{i}.parquet")),
    )
}

/// Parquet bytes of a one-column table `image_path` (utf8).
pub fn metadata_bytes(paths: &[String]) -> Result<Vec<u8>> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new(
        "image_path",
        DataType::Utf8,
        false,
    )]));
    let col: ArrayRef = Arc::new(StringArray::from_iter_values(paths.iter()));
    let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("metadata table: {e}"));
    let batch = RecordBatch::try_new(schema.clone(), vec![col]).map_err(|e| err(&e))?;
    let mut buf = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).map_err(|e| err(&e))?;
    w.write(&batch).map_err(|e| err(&e))?;
    w.close().map_err(|e| err(&e))?;
    Ok(buf)
}

/// Write shard `i` (embedding rows first, then metadata, each atomically: a shard whose
/// metadata exists is complete).
pub fn write_shard(
    root: &Path,
    i: usize,
    rows: &[f32],
    dim: usize,
    ty: NpyType,
    paths: &[String],
) -> Result<()> {
    let (emb, meta) = shard_files(root, i);
    for d in [emb.parent(), meta.parent()].into_iter().flatten() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    crate::atomic::write_bytes(&emb, &npy::encode_2d(rows, paths.len(), dim, ty)?)?;
    crate::atomic::write_bytes(&meta, &metadata_bytes(paths)?)
}

/// Rows of the metadata table of `path`: `image_path`, else `url` (LAION), as text.
pub fn read_metadata(path: &Path) -> Result<Vec<String>> {
    use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |msg: String| Error::BadInput {
        path: path.to_path_buf(),
        msg,
    };
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| bad(format!("not a readable parquet table: {e}")))?;
    let names: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let Some(col) = ["image_path", "url"]
        .iter()
        .find_map(|c| names.iter().position(|n| n == c))
    else {
        return Err(bad(format!(
            "no image_path or url column (columns: {})",
            names.join(", ")
        )));
    };
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), [col]);
    let reader = b
        .with_projection(mask)
        .build()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("cannot read: {e}")))?;
        let a = batch.column(0);
        let any = a.as_any();
        let get = |i: usize| -> Option<String> {
            if a.is_null(i) {
                return Some(String::new());
            }
            if let Some(s) = any.downcast_ref::<StringArray>() {
                return Some(s.value(i).to_string());
            }
            if let Some(s) = any.downcast_ref::<LargeStringArray>() {
                return Some(s.value(i).to_string());
            }
            any.downcast_ref::<StringViewArray>()
                .map(|s| s.value(i).to_string())
        };
        for i in 0..a.len() {
            out.push(get(i).ok_or_else(|| {
                bad(format!(
                    "column {} is {}, not text",
                    names[col],
                    a.data_type()
                ))
            })?);
        }
    }
    Ok(out)
}

/// Rows in a metadata table, from its footer only.
fn metadata_rows(path: &Path) -> std::result::Result<usize, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let r =
        SerializedFileReader::new(f).map_err(|e| format!("not a readable parquet table: {e}"))?;
    Ok(r.metadata().file_metadata().num_rows().max(0) as usize)
}

/// One memory-mapped embedding shard.
pub struct Shard {
    /// the shard number in the file names
    pub index: usize,
    pub emb: PathBuf,
    pub meta: PathBuf,
    pub rows: usize,
    cols: usize,
    map: memmap2::Mmap,
    offset: usize,
    ty: NpyType,
}

impl Shard {
    /// Open and check shard `index` of `root`: a 2-D float16/float32 array of `dim` columns
    /// (any when `dim` is None) and a metadata table of as many rows.
    pub fn open(root: &Path, index: usize, dim: Option<usize>) -> Result<Self> {
        let (emb, meta) = shard_files(root, index);
        let bad = |p: &Path, msg: String| Error::BadInput {
            path: p.to_path_buf(),
            msg,
        };
        let f = std::fs::File::open(&emb).map_err(|e| Error::io(&emb, e))?;
        // SAFETY: the map is read-only; shards are written to a temporary name and renamed,
        // so a finished shard file is never modified in place.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&emb, e))?;
        let h = npy::parse_header(&map)
            .map_err(|m| bad(&emb, format!("not a readable .npy array: {m}")))?;
        let ty = match (h.kind, h.size) {
            ('f', 2) => NpyType::F16,
            ('f', 4) => NpyType::F32,
            (k, s) => {
                return Err(bad(
                    &emb,
                    format!("embeddings must be float16 or float32, not {k}{s}"),
                ))
            }
        };
        let [rows, cols] = h.shape[..] else {
            return Err(bad(
                &emb,
                format!("embeddings must be [rows, dim], not shape {:?}", h.shape),
            ));
        };
        if let Some(d) = dim.filter(|&d| d != cols) {
            return Err(bad(&emb, format!("{cols}-d embeddings in a {d}-d pool")));
        }
        if cols == 0 {
            return Err(bad(&emb, "0-d embeddings".into()));
        }
        let n = metadata_rows(&meta).map_err(|m| bad(&meta, m))?;
        if n != rows {
            return Err(bad(
                &meta,
                format!(
                    "{n} metadata rows for {rows} embeddings in {}",
                    emb.display()
                ),
            ));
        }
        Ok(Self {
            index,
            emb,
            meta,
            rows,
            cols,
            map,
            offset: h.offset,
            ty,
        })
    }

    pub fn dim(&self) -> usize {
        self.cols
    }

    /// Rows `start ..` as f32 into `out` (`out.len() / dim` rows).
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let elem = self.ty.size();
        let from = self.offset + start * self.cols * elem;
        let bytes = &self.map[from..from + out.len() * elem];
        match self.ty {
            NpyType::F16 => {
                for (o, v) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([v[0], v[1]]).to_f32();
                }
            }
            NpyType::F32 => {
                for (o, v) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                }
            }
        }
    }
}

/// An embedding folder opened for reading.
pub struct Embeddings {
    pub root: PathBuf,
    pub manifest: Option<Manifest>,
    pub dim: usize,
    pub shards: Vec<Shard>,
    /// shards set aside: (file, why)
    pub unusable: Vec<(PathBuf, String)>,
}

/// Is `path` an embedding folder (has `img_emb/`)?
pub fn is_embedding_folder(path: &Path) -> bool {
    path.join("img_emb").is_dir()
}

/// Shard numbers found in `root/img_emb` (`img_emb_{i}.npy`), ascending.
fn shard_numbers(root: &Path) -> Result<Vec<usize>> {
    let dir = root.join("img_emb");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(i) = name
            .strip_prefix("img_emb_")
            .and_then(|s| s.strip_suffix(".npy"))
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push(i);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Embeddings {
    /// Open every shard of `root`, or only those with `i % n == part` for `Some((part, n))`.
    /// Unusable shards are listed in `unusable` (and logged); none usable is an error.
    pub fn open(root: &Path, part: Option<(usize, usize)>) -> Result<Self> {
        if !is_embedding_folder(root) {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: "not an embedding folder (no img_emb/; make one with `distillery embed`)"
                    .into(),
            });
        }
        let manifest = Manifest::read(root)?;
        let mut dim = manifest.as_ref().map(|m| m.dim);
        let mut shards = Vec::new();
        let mut unusable = Vec::new();
        let numbers = shard_numbers(root)?;
        if numbers.is_empty() {
            return Err(Error::BadInput {
                path: root.join("img_emb"),
                msg: "holds no img_emb_{i}.npy shard".into(),
            });
        }
        for i in numbers {
            if part.is_some_and(|(p, n)| i % n != p) {
                continue;
            }
            match Shard::open(root, i, dim) {
                Ok(s) => {
                    dim.get_or_insert(s.dim());
                    shards.push(s);
                }
                Err(e) => {
                    tracing::warn!("skipping shard {i}: {e}");
                    eprintln!("warning: skipping shard {i}: {e}");
                    unusable.push((shard_files(root, i).0, e.to_string()));
                }
            }
        }
        let Some(dim) = dim.filter(|_| !shards.is_empty()) else {
            return Err(Error::BadInput {
                path: root.to_path_buf(),
                msg: format!(
                    "no usable shard ({} set aside{})",
                    unusable.len(),
                    unusable
                        .first()
                        .map(|(_, why)| format!("; first: {why}"))
                        .unwrap_or_default()
                ),
            });
        };
        Ok(Self {
            root: root.to_path_buf(),
            manifest,
            dim,
            shards,
            unusable,
        })
    }

    /// The shards set aside, one `file: why` line each.
    pub fn unusable_lines(&self) -> Vec<String> {
        self.unusable
            .iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect()
    }

    /// Embedding rows in the usable shards.
    pub fn rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// Every row, in shard order, as one matrix (for query and evaluation sets, which are
    /// small), with each row's pool id.
    pub fn load_all(&self) -> (Vec<f32>, Vec<u64>) {
        let mut data = vec![0.0; self.rows() * self.dim];
        let mut ids = Vec::with_capacity(self.rows());
        let mut at = 0;
        for s in &self.shards {
            s.read(0, &mut data[at..at + s.rows * self.dim]);
            at += s.rows * self.dim;
            ids.extend((0..s.rows).map(|r| pool_id(s.index, r)));
        }
        (data, ids)
    }

    /// Image paths (metadata) of the given pool ids, read shard by shard.
    pub fn paths_of(&self, ids: &[u64]) -> Result<Vec<String>> {
        let mut by_shard: std::collections::BTreeMap<usize, Vec<(usize, usize)>> =
            Default::default();
        for (k, &id) in ids.iter().enumerate() {
            let (s, r) = split_id(id);
            by_shard.entry(s).or_default().push((k, r));
        }
        let mut out = vec![String::new(); ids.len()];
        for (s, want) in by_shard {
            let shard = self.shards.iter().find(|x| x.index == s).ok_or_else(|| {
                Error::Invalid(format!("pool id of shard {s}, which is not open"))
            })?;
            let names = read_metadata(&shard.meta)?;
            for (k, r) in want {
                out[k] = names.get(r).cloned().ok_or_else(|| Error::BadInput {
                    path: shard.meta.clone(),
                    msg: format!("has no row {r}"),
                })?;
            }
        }
        Ok(out)
    }
}

/// The pool id of row `r` of shard `s`: ids order by shard, then row.
pub fn pool_id(s: usize, r: usize) -> u64 {
    ((s as u64) << 32) | r as u64
}

/// (shard, row) of a pool id.
pub fn split_id(id: u64) -> (usize, usize) {
    ((id >> 32) as usize, (id & 0xffff_ffff) as usize)
}

impl PoolScan for Embeddings {
    fn dim(&self) -> usize {
        self.dim
    }

    fn segments(&self) -> Vec<(u64, usize)> {
        self.shards
            .iter()
            .map(|s| (pool_id(s.index, 0), s.rows))
            .collect()
    }

    fn read(&self, segment: usize, start: usize, out: &mut [f32]) {
        self.shards[segment].read(start, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_and_bad_shards_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let a = [0.6f32, 0.8, 1.0, 0.0, 0.0, 1.0];
        write_shard(
            root,
            0,
            &a,
            2,
            NpyType::F16,
            &["x/a.jpg".into(), "b.png".into(), "c".into()],
        )
        .unwrap();
        write_shard(root, 1, &[0.0, -1.0], 2, NpyType::F32, &["d.jpg".into()]).unwrap();
        // shard 2: metadata disagrees with the rows; shard 3: truncated array
        write_shard(root, 2, &[1.0, 0.0], 2, NpyType::F32, &["e".into()]).unwrap();
        let meta2 = shard_files(root, 2).1;
        std::fs::write(&meta2, metadata_bytes(&["e".into(), "f".into()]).unwrap()).unwrap();
        let (emb3, meta3) = shard_files(root, 3);
        let full = npy::encode_2d(&[1.0, 0.0, 0.0, 1.0], 2, 2, NpyType::F32).unwrap();
        std::fs::write(&emb3, &full[..full.len() - 3]).unwrap();
        std::fs::write(&meta3, metadata_bytes(&["g".into(), "h".into()]).unwrap()).unwrap();
        let e = Embeddings::open(root, None).unwrap();
        assert_eq!(e.dim, 2);
        assert_eq!(e.rows(), 4);
        assert_eq!(e.unusable.len(), 2);
        assert!(
            e.unusable[0].1.contains("2 metadata rows for 1"),
            "{:?}",
            e.unusable
        );
        assert!(e.unusable[1].1.contains("data bytes"), "{:?}", e.unusable);
        let (data, ids) = e.load_all();
        // f16 stores 0.6 and 0.8 to 3 decimals
        assert!((data[0] - 0.6).abs() < 1e-3 && (data[1] - 0.8).abs() < 1e-3);
        assert_eq!(&data[6..], &[0.0, -1.0]);
        assert_eq!(ids, vec![0, 1, 2, pool_id(1, 0)]);
        assert_eq!(
            e.paths_of(&[pool_id(1, 0), 1]).unwrap(),
            vec!["d.jpg".to_string(), "b.png".to_string()]
        );
        // part 1 of 2 holds shards 1 and 3 (3 is unusable)
        let odd = Embeddings::open(root, Some((1, 2))).unwrap();
        assert_eq!(odd.shards.len(), 1);
        // a pool with no usable shard is an error naming the folder
        let only_bad = Embeddings::open(root, Some((3, 4)));
        assert!(only_bad.is_err());
    }
}
