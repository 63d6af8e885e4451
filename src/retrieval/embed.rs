//! `distillery embed`: pooled, L2-normalised embeddings of a pool of images, written as an
//! embedding folder ([`super::store`]) in shards of a fixed number of images.
//!
//! Shard `j` holds the images `j * shard_size ..` of the pool's stable listing (minus any that
//! cannot be decoded, which are logged and left out). A shard is written when complete (rows,
//! then metadata, each atomically), so a killed run loses at most the shard in progress and a
//! rerun with `--resume` continues after the complete ones; `--shard i/N` embeds the shards
//! `j` with `j mod N = i`, so N machines or a job array split the pool into one folder.

use super::store::{self, Manifest};
use crate::data::npy::NpyType;
use crate::data::ImageSource;
use crate::error::{Error, Result};
use crate::models::pooled::{l2_normalize, load_embedder, ImageEmbedder};
use crate::models::LoadOptions;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to embed and how.
#[derive(Clone, Debug)]
pub struct EmbedConfig {
    /// model folder or hub id
    pub model: String,
    /// the pool: folder tree, tar archive, shard pattern or list file
    pub images: PathBuf,
    pub out: PathBuf,
    pub shard_size: usize,
    pub batch_size: usize,
    pub dtype: NpyType,
    /// `--shard i/N`: embed only shards `j` with `j mod N = i`
    pub part: Option<(usize, usize)>,
    /// continue a folder made by the same command
    pub resume: bool,
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct EmbedSummary {
    pub images: usize,
    pub dim: usize,
    pub shards: usize,
    /// shards this run wrote / found complete and kept
    pub written: usize,
    pub kept: usize,
    pub embedded: usize,
    pub unreadable: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Parse `i/N` (0 <= i < N).
pub fn parse_part(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected i/N, e.g. 0/4"))?;
    let (i, n) = (
        a.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: i is not a number"))?,
        b.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: N is not a number"))?,
    );
    if n == 0 || i >= n {
        return Err(format!("{s:?}: need 0 <= i < N"));
    }
    Ok((i, n))
}

/// FNV-1a over the listing (names in order, each ended by a 0 byte): pools listed
/// differently get different prints.
pub fn fingerprint<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let h = crate::data::npy::fnv1a(names.flat_map(|n| n.bytes().chain([0u8])));
    format!("{h:016x}")
}

/// How a model argument is recorded: a local folder as its absolute path, a hub id as given.
pub fn model_key(model: &str) -> String {
    let p = Path::new(model);
    if p.exists() {
        std::path::absolute(p)
            .map(|a| a.display().to_string())
            .unwrap_or_else(|_| model.to_string())
    } else {
        model.to_string()
    }
}

/// The embedding model of `model` and its manifest fields.
pub fn open_model(model: &str, load: &LoadOptions) -> Result<ImageEmbedder> {
    if crate::models::onnx_teacher::parse_spec(model).is_some() {
        return crate::models::pooled::onnx_embedder(model);
    }
    let files = crate::models::resolve(model)?;
    load_embedder(&files, load)
}

/// Embed `items` of `source` in batches: (rows of `dim` values, L2-normalised; the items
/// kept; the items that could not be decoded). Decoding of the next batch overlaps the
/// forward pass of the current one.
pub fn embed_items(
    model: &ImageEmbedder,
    source: &dyn ImageSource,
    items: &[usize],
    batch_size: usize,
    load: &LoadOptions,
    mut done: impl FnMut(usize),
) -> Result<(Vec<f32>, Vec<usize>, Vec<usize>)> {
    let pre = model.encoder.info().preprocess.clone();
    let decode = |chunk: &[usize]| -> (Vec<(usize, Tensor)>, Vec<usize>) {
        let res: Vec<(usize, Result<Tensor>)> = chunk
            .par_iter()
            .map(|&i| {
                (
                    i,
                    source.load(i).and_then(|img| pre.apply(&img, &Device::Cpu)),
                )
            })
            .collect();
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (i, r) in res {
            match r {
                Ok(t) => ok.push((i, t)),
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", source.name(i));
                    bad.push(i);
                }
            }
        }
        (ok, bad)
    };
    let forward = |batch: &[(usize, Tensor)]| -> Result<Vec<f32>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let x = Tensor::stack(&batch.iter().map(|b| b.1.clone()).collect::<Vec<_>>(), 0)?
            .to_device(&load.device)?
            .to_dtype(load.dtype)?;
        let e = l2_normalize(&model.embed(&x)?.to_dtype(DType::F32)?)?;
        Ok(e.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let chunks: Vec<&[usize]> = items.chunks(batch_size.max(1)).collect();
    let (mut rows, mut kept, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = chunks.first().map(|c| decode(c));
    for c in 1..=chunks.len() {
        let Some((cur, cur_bad)) = next.take() else {
            break;
        };
        let (out, dec) = rayon::join(|| forward(&cur), || chunks.get(c).map(|ch| decode(ch)));
        rows.extend(out?);
        kept.extend(cur.iter().map(|b| b.0));
        done(cur.len() + cur_bad.len());
        bad.extend(cur_bad);
        next = dec;
    }
    Ok((rows, kept, bad))
}

/// Run `embed` (see the module doc).
pub fn embed(cfg: &EmbedConfig, load: &LoadOptions) -> Result<EmbedSummary> {
    if cfg.shard_size == 0 || cfg.batch_size == 0 {
        return Err(Error::Invalid(
            "--shard-size and --batch-size must be positive".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let images = std::path::absolute(&cfg.images).map_err(|e| Error::io(&cfg.images, e))?;
    let source = crate::data::lists::open_unlabeled(&images)?;
    let n = source.len();
    let names: Vec<String> = (0..n).map(|i| source.name(i)).collect();
    let model = open_model(&cfg.model, load)?;
    let info = model.encoder.info();
    let manifest = Manifest {
        format: store::FORMAT.into(),
        model: model_key(&cfg.model),
        family: info.family.to_string(),
        pooling: model.head.name().into(),
        dim: model.dim,
        dtype: cfg.dtype.name().into(),
        shard_size: cfg.shard_size,
        images: n,
        shards: n.div_ceil(cfg.shard_size),
        fingerprint: fingerprint(names.iter().map(String::as_str)),
        source: cfg.images.display().to_string(),
    };
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    match Manifest::read(&cfg.out)? {
        Some(old) => {
            if let Some(diff) = manifest_difference(&old, &manifest) {
                return Err(Error::BadInput {
                    path: Manifest::path(&cfg.out),
                    msg: format!("{diff}; embed into a new --out folder"),
                });
            }
            if !cfg.resume && cfg.part.is_none() {
                return Err(Error::BadInput {
                    path: cfg.out.clone(),
                    msg: "already holds embeddings of this pool; pass --resume to complete it"
                        .into(),
                });
            }
        }
        None => {
            if store::is_embedding_folder(&cfg.out) {
                return Err(Error::BadInput {
                    path: cfg.out.clone(),
                    msg: "holds embeddings without a manifest (embed.json); embed into a new --out folder".into(),
                });
            }
            manifest.write(&cfg.out)?;
        }
    }
    let mine: Vec<usize> = (0..manifest.shards)
        .filter(|j| cfg.part.is_none_or(|(i, k)| j % k == i))
        .collect();
    let range = |j: usize| j * cfg.shard_size..((j + 1) * cfg.shard_size).min(n);
    let mut todo = Vec::new();
    let mut kept = 0;
    for &j in &mine {
        let complete = store::Shard::open(&cfg.out, j, Some(manifest.dim))
            .is_ok_and(|s| s.rows <= range(j).len());
        if complete {
            kept += 1;
        } else {
            todo.push(j);
        }
    }
    let total: usize = todo.iter().map(|&j| range(j).len()).sum();
    let pb = crate::train::progress_bar(total as u64, 0, cfg.progress);
    let log_path = cfg.out.join(match cfg.part {
        Some((i, k)) => format!("embed-log-{i}of{k}.jsonl"),
        None => "embed-log.jsonl".into(),
    });
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let (mut embedded, mut unreadable, mut seen) = (0, 0, 0usize);
    let t_run = std::time::Instant::now();
    for &j in &todo {
        let t_shard = std::time::Instant::now();
        let items: Vec<usize> = range(j).collect();
        let (rows, ok, bad) =
            embed_items(&model, source.as_ref(), &items, cfg.batch_size, load, |k| {
                seen += k;
                pb.inc(k as u64);
                let rate = seen as f64 / t_run.elapsed().as_secs_f64().max(1e-9);
                pb.set_message(format!("{rate:.1} images/s"));
            })?;
        let paths: Vec<String> = ok.iter().map(|&i| names[i].clone()).collect();
        store::write_shard(&cfg.out, j, &rows, manifest.dim, cfg.dtype, &paths)?;
        embedded += ok.len();
        unreadable += bad.len();
        let secs = t_shard.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "shard": j,
            "rows": ok.len(),
            "unreadable": bad.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>(),
            "seconds": secs,
            "images_per_s": items.len() as f64 / secs.max(1e-9),
        });
        writeln!(log, "{line}").map_err(|e| Error::io(&log_path, e))?;
    }
    pb.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(EmbedSummary {
        images: n,
        dim: manifest.dim,
        shards: manifest.shards,
        written: todo.len(),
        kept,
        embedded,
        unreadable,
        seconds,
        images_per_s: seen as f64 / t_run.elapsed().as_secs_f64().max(1e-9),
    })
}

/// The first field in which two manifests of one folder differ, as a sentence.
fn manifest_difference(old: &Manifest, new: &Manifest) -> Option<String> {
    let fields: [(&str, String, String); 7] = [
        ("model", old.model.clone(), new.model.clone()),
        ("pooling", old.pooling.clone(), new.pooling.clone()),
        ("dim", old.dim.to_string(), new.dim.to_string()),
        ("dtype", old.dtype.clone(), new.dtype.clone()),
        (
            "shard_size",
            old.shard_size.to_string(),
            new.shard_size.to_string(),
        ),
        ("images", old.images.to_string(), new.images.to_string()),
        (
            "fingerprint",
            old.fingerprint.clone(),
            new.fingerprint.clone(),
        ),
    ];
    fields
        .into_iter()
        .find(|(_, a, b)| a != b)
        .map(|(f, a, b)| match f {
            "fingerprint" => "the folder was embedded from a different listing of images".into(),
            _ => format!("the folder was embedded with {f} = {a}, this run has {b}"),
        })
}
