//! `distillery retrieve`: a query-balanced transfer set from an embedding folder.
//!
//! Queries (and evaluation images to exclude) are an embedding folder, or any image set
//! (folder, class folders, split file), embedded on the fly with the pool's model. The whole
//! pool is scanned at once, or in parts (`--shard i/N`, each scanning the shards `j mod N = i`
//! and writing its candidates to a part file) that `--merge` combines into the same result.
//!
//! Outputs beside LIST: LIST (one pool image path per line, the list `distillery transfer
//! --transfer` reads), `LIST.jsonl` (`path`, `query`, `rank`, `score` per selected image) and
//! `LIST.png`, a contact sheet of queries and their top neighbours.

use super::embed::{embed_items, model_key, open_model};
use super::store::{self, Embeddings};
use super::{Candidates, Exclude, Hit, Pick, Rows, ScanOptions};
use crate::data::lists::{set_images, ListSource};
use crate::error::{Error, Result};
use crate::models::LoadOptions;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What to retrieve.
#[derive(Clone, Debug)]
pub struct RetrieveConfig {
    pub pool: PathBuf,
    /// embedding folder or image set; not needed with `merge`
    pub queries: Option<PathBuf>,
    /// where split files' names are found
    pub images_root: Option<PathBuf>,
    pub exclude: Option<PathBuf>,
    pub k: Option<usize>,
    pub budget: Option<usize>,
    /// cosine at or above which a pool image counts as a copy of an evaluation image
    pub dedup: f32,
    /// the model for image queries when the pool has no manifest (LAION's folders)
    pub model: Option<String>,
    pub out: PathBuf,
    /// `--shard i/N`: scan part of the pool and write a part file to `out`
    pub part: Option<(usize, usize)>,
    /// candidates kept per query in a part file
    pub candidates: Option<usize>,
    /// part files to combine
    pub merge: Vec<PathBuf>,
    pub batch_size: usize,
    /// queries shown in the contact sheet (0: none)
    pub sheet_queries: usize,
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RetrieveSummary {
    pub queries: usize,
    pub k: usize,
    pub selected: usize,
    pub pool_rows: usize,
    pub excluded: usize,
    pub duplicates: usize,
    pub scans: usize,
    pub unusable_shards: Vec<String>,
    pub seconds: f64,
    /// files written
    pub outputs: Vec<PathBuf>,
}

/// Embeddings of a query or evaluation set with the paths they stand for.
pub struct Side {
    pub paths: Vec<String>,
    pub rows: Vec<f32>,
    pub dim: usize,
}

impl Side {
    pub fn rows(&self) -> Rows<'_> {
        Rows {
            data: &self.rows,
            dim: self.dim,
        }
    }
}

/// The model a pool was embedded with (its manifest), reconciled with `--model`.
fn pool_model(pool: &Embeddings, model: Option<&str>) -> Result<Option<String>> {
    let recorded = pool.manifest.as_ref().map(|m| m.model.clone());
    match (recorded, model) {
        (Some(r), Some(m)) if r != model_key(m) => Err(Error::BadInput {
            path: store::Manifest::path(&pool.root),
            msg: format!(
                "the pool was embedded with {r}, not {m}; queries must use the pool's model"
            ),
        }),
        (Some(r), _) => Ok(Some(r)),
        (None, m) => Ok(m.map(str::to_string)),
    }
}

/// Read or embed one side (`what` names it in messages: "queries", "evaluation images").
pub fn open_side(
    what: &str,
    path: &Path,
    cfg: &RetrieveConfig,
    pool: &Embeddings,
    load: &LoadOptions,
) -> Result<Side> {
    let side = if store::is_embedding_folder(path) {
        let e = Embeddings::open(path, None)?;
        if let (Some(a), Some(b)) = (&e.manifest, &pool.manifest) {
            if (&a.model, &a.pooling) != (&b.model, &b.pooling) {
                return Err(Error::BadInput {
                    path: path.to_path_buf(),
                    msg: format!(
                        "{what} were embedded with {} ({}), the pool {} with {} ({})",
                        a.model,
                        a.pooling,
                        pool.root.display(),
                        b.model,
                        b.pooling
                    ),
                });
            }
        }
        let (rows, ids) = e.load_all();
        Side {
            paths: e.paths_of(&ids)?,
            rows,
            dim: e.dim,
        }
    } else {
        let files = set_images(path, cfg.images_root.as_deref())?;
        let Some(model) = pool_model(pool, cfg.model.as_deref())? else {
            return Err(Error::BadInput {
                path: pool.root.clone(),
                msg: format!(
                    "the pool has no embed.json naming its model; give --model to embed the {what}, or give them as an embedding folder"
                ),
            });
        };
        let m = open_model(&model, load)?;
        let src = ListSource::from_files(path, files.clone());
        let items: Vec<usize> = (0..files.len()).collect();
        let (rows, _, bad) = embed_items(&m, &src, &items, cfg.batch_size, load, |_| {})?;
        if let Some(&b) = bad.first() {
            return Err(Error::BadInput {
                path: files[b].clone(),
                msg: format!("cannot read this image (one of the {what})"),
            });
        }
        Side {
            paths: files.iter().map(|p| p.display().to_string()).collect(),
            rows,
            dim: m.dim,
        }
    };
    if side.dim != pool.dim {
        return Err(Error::BadInput {
            path: path.to_path_buf(),
            msg: format!(
                "{what} are {}-d embeddings, the pool {} holds {}-d ones (a different model)",
                side.dim,
                pool.root.display(),
                pool.dim
            ),
        });
    }
    Ok(side)
}

/// k from `--k` or `--budget` for `queries` queries.
fn k_of(cfg: &RetrieveConfig, queries: usize) -> Result<usize> {
    match (cfg.k, cfg.budget) {
        (Some(k), None) if k > 0 => Ok(k),
        (None, Some(b)) => super::k_for_budget(b, queries),
        (Some(_), Some(_)) => Err(Error::Invalid("give --k or --budget, not both".into())),
        _ => Err(Error::Invalid("give --k (> 0) or --budget".into())),
    }
}

/// Run `retrieve` (see the module doc).
pub fn retrieve(cfg: &RetrieveConfig, load: &LoadOptions) -> Result<RetrieveSummary> {
    let t0 = std::time::Instant::now();
    check_out(&cfg.out)?;
    if !cfg.merge.is_empty() {
        return merge(cfg, t0);
    }
    let pool = Embeddings::open(&cfg.pool, cfg.part)?;
    let qpath = cfg
        .queries
        .as_ref()
        .ok_or_else(|| Error::Invalid("give the queries: --queries SET".into()))?;
    let queries = open_side("queries", qpath, cfg, &pool, load)?;
    let evals = match &cfg.exclude {
        Some(p) => Some(open_side("evaluation images", p, cfg, &pool, load)?),
        None => None,
    };
    let exclude = evals.as_ref().map(|e| Exclude {
        evals: e.rows(),
        threshold: cfg.dedup,
    });
    let nq = queries.paths.len();
    let k = k_of(cfg, nq)?;
    let unusable = pool.unusable_lines();
    let scan_opts = ScanOptions::new(&load.device, cfg.progress);
    if let Some((i, n)) = cfg.part {
        let m = cfg.candidates.unwrap_or((4 * k).max(k + 16));
        let c = super::scan(
            queries.rows(),
            &pool,
            m,
            &HashSet::new(),
            exclude.as_ref(),
            &scan_opts,
        )?;
        scan_opts.progress.finish_and_clear();
        let part = PartFile {
            part: (i, n),
            k,
            pool: pool_identity(&pool),
            queries: queries.paths.clone(),
            cands: c,
        };
        part.write(&cfg.out)?;
        return Ok(RetrieveSummary {
            queries: nq,
            k,
            selected: 0,
            pool_rows: pool.rows(),
            excluded: part.cands.excluded.len(),
            duplicates: 0,
            scans: 1,
            unusable_shards: unusable,
            seconds: t0.elapsed().as_secs_f64(),
            outputs: vec![cfg.out.clone()],
        });
    }
    let sel = super::balanced(
        queries.rows(),
        &pool,
        k,
        &HashSet::new(),
        exclude.as_ref(),
        &scan_opts,
    )
    .map_err(|e| pool_error(&pool, e))?;
    scan_opts.progress.finish_and_clear();
    let outputs = write_outputs(cfg, &pool, &queries.paths, &sel.picks)?;
    Ok(RetrieveSummary {
        queries: nq,
        k,
        selected: sel.picks.len(),
        pool_rows: pool.rows(),
        excluded: sel.excluded.len(),
        duplicates: sel.duplicates,
        scans: sel.scans,
        unusable_shards: unusable,
        seconds: t0.elapsed().as_secs_f64(),
        outputs,
    })
}

/// Selection errors name the pool.
fn pool_error(pool: &Embeddings, e: Error) -> Error {
    match e {
        Error::Invalid(msg) => Error::BadInput {
            path: pool.root.clone(),
            msg,
        },
        e => e,
    }
}

/// LIST must not be one of the files written beside it.
fn check_out(out: &Path) -> Result<()> {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ["jsonl", "png"].contains(&ext) {
        return Err(Error::BadInput {
            path: out.to_path_buf(),
            msg: "LIST.jsonl and LIST.png are written beside the list; name the list e.g. retrieved.txt".into(),
        });
    }
    Ok(())
}

/// What identifies a pool across part files.
fn pool_identity(pool: &Embeddings) -> String {
    match &pool.manifest {
        Some(m) => format!("{}#{}", m.model, m.fingerprint),
        None => std::path::absolute(&pool.root)
            .unwrap_or_else(|_| pool.root.clone())
            .display()
            .to_string(),
    }
}

/// One JSON line of LIST.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Line {
    pub path: String,
    pub query: String,
    pub rank: usize,
    pub score: f32,
}

/// Write LIST, LIST.jsonl and the contact sheet; returns the files written.
fn write_outputs(
    cfg: &RetrieveConfig,
    pool: &Embeddings,
    queries: &[String],
    picks: &[Pick],
) -> Result<Vec<PathBuf>> {
    let mut picks = picks.to_vec();
    picks.sort_by_key(|p| (p.query, p.rank));
    let ids: Vec<u64> = picks.iter().map(|p| p.index).collect();
    let paths = pool.paths_of(&ids)?;
    let mut list = String::new();
    let mut jsonl = String::new();
    for (p, path) in picks.iter().zip(&paths) {
        list.push_str(path);
        list.push('\n');
        let line = Line {
            path: path.clone(),
            query: queries[p.query].clone(),
            rank: p.rank,
            score: p.score,
        };
        jsonl.push_str(&serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?);
        jsonl.push('\n');
    }
    if let Some(d) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let jpath = cfg.out.with_extension("jsonl");
    crate::atomic::write_bytes(&cfg.out, list.as_bytes())?;
    crate::atomic::write_bytes(&jpath, jsonl.as_bytes())?;
    let mut out = vec![cfg.out.clone(), jpath];
    if cfg.sheet_queries > 0 {
        let sheet = cfg.out.with_extension("png");
        contact_sheet(&sheet, queries, &picks, &paths, cfg.sheet_queries)?;
        out.push(sheet);
    }
    Ok(out)
}

/// Queries (rows) with their top neighbours; images that cannot be read are grey.
fn contact_sheet(
    path: &Path,
    queries: &[String],
    picks: &[Pick],
    paths: &[String],
    rows: usize,
) -> Result<()> {
    const TILE: u32 = 96;
    const SHOWN: usize = 8;
    let tile = |p: &str| -> image::RgbImage {
        crate::preprocess::read_image(Path::new(p))
            .map(|img| crate::viz::photo_tile(&img, (TILE, TILE)))
            .unwrap_or_else(|_| {
                image::RgbImage::from_pixel(TILE, TILE, image::Rgb([160, 160, 160]))
            })
    };
    let mut grid = Vec::new();
    for (q, qp) in queries.iter().enumerate().take(rows) {
        let mut row = vec![tile(qp)];
        row.extend(
            picks
                .iter()
                .zip(paths)
                .filter(|(p, _)| p.query == q && p.rank <= SHOWN)
                .map(|(_, path)| tile(path)),
        );
        grid.push(row);
    }
    let k = picks.iter().map(|p| p.rank).max().unwrap_or(0);
    let mut columns = vec!["query".to_string()];
    columns.extend((1..=k.min(SHOWN)).map(|r| format!("#{r}")));
    let title = format!(
        "{} queries x k = {k}: the first {} queries and their top {}",
        queries.len(),
        rows.min(queries.len()),
        k.min(SHOWN)
    );
    crate::viz::write_grid(path, &title, &columns, &grid)
}

/// A partial scan (`--shard i/N`) in a safetensors file: the candidates as tensors, what
/// they were scanned for in the metadata.
pub struct PartFile {
    pub part: (usize, usize),
    pub k: usize,
    pub pool: String,
    pub queries: Vec<String>,
    pub cands: Candidates,
}

const PART_FORMAT: &str = "distillery-retrieval-part/1";

fn u64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl PartFile {
    pub fn write(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let c = &self.cands;
        let (q, m) = (c.hits.len(), c.m);
        let mut ids = vec![u64::MAX; q * m];
        let mut scores = vec![f32::NEG_INFINITY; q * m];
        for (qi, hs) in c.hits.iter().enumerate() {
            for (j, h) in hs.iter().enumerate().take(m) {
                ids[qi * m + j] = h.index;
                scores[qi * m + j] = h.score;
            }
        }
        let mut hashes: Vec<(u64, u64)> = c.hashes.iter().map(|(a, b)| (*a, *b)).collect();
        hashes.sort_unstable();
        let mut excluded: Vec<u64> = c.excluded.iter().copied().collect();
        excluded.sort_unstable();
        let bufs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("ids", Dtype::U64, vec![q, m], u64_bytes(&ids)),
            (
                "scores",
                Dtype::F32,
                vec![q, m],
                scores.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (
                "hash_ids",
                Dtype::U64,
                vec![hashes.len()],
                u64_bytes(&hashes.iter().map(|h| h.0).collect::<Vec<_>>()),
            ),
            (
                "hash_values",
                Dtype::U64,
                vec![hashes.len()],
                u64_bytes(&hashes.iter().map(|h| h.1).collect::<Vec<_>>()),
            ),
            (
                "excluded",
                Dtype::U64,
                vec![excluded.len()],
                u64_bytes(&excluded),
            ),
        ];
        let views: Vec<(String, TensorView)> = bufs
            .iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.to_string(), v))
                    .map_err(|e| Error::Invalid(format!("part file: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [
            ("format", PART_FORMAT.to_string()),
            ("part", format!("{}/{}", self.part.0, self.part.1)),
            ("k", self.k.to_string()),
            ("m", m.to_string()),
            ("scanned", c.scanned.to_string()),
            ("pool", self.pool.clone()),
            (
                "queries",
                serde_json::to_string(&self.queries).map_err(|e| Error::Invalid(e.to_string()))?,
            ),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Invalid(format!("part file: {e}")))?;
        crate::atomic::write_bytes(path, &bytes)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadInput {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a retrieval part file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(PART_FORMAT) {
            return Err(bad(format!(
                "not a retrieval part file (format is not {PART_FORMAT})"
            )));
        }
        let field = |k: &str| -> Result<&String> {
            meta.get(k)
                .ok_or_else(|| bad(format!("part file has no {k}")))
        };
        let num = |k: &str| -> Result<usize> {
            field(k)?
                .parse()
                .map_err(|_| bad(format!("{k} is not a number")))
        };
        let part = super::embed::parse_part(field("part")?).map_err(bad)?;
        let (k, m, scanned) = (num("k")?, num("m")?, num("scanned")?);
        let queries: Vec<String> =
            serde_json::from_str(field("queries")?).map_err(|e| bad(format!("queries: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a retrieval part file: {e}")))?;
        let data = |name: &str| -> Result<&[u8]> {
            st.tensor(name)
                .map(|t| t.data())
                .map_err(|_| bad(format!("part file has no tensor {name}")))
        };
        let u64s = |name: &str| -> Result<Vec<u64>> {
            Ok(data(name)?
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        };
        let q = queries.len();
        let ids = u64s("ids")?;
        let scores: Vec<f32> = data("scores")?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (hid, hval) = (u64s("hash_ids")?, u64s("hash_values")?);
        if ids.len() != q * m || scores.len() != q * m || hid.len() != hval.len() {
            return Err(bad(format!(
                "tensors do not match {q} queries x {m} candidates"
            )));
        }
        let excluded: HashSet<u64> = u64s("excluded")?.into_iter().collect();
        let hits = (0..q)
            .map(|qi| {
                (0..m)
                    .map(|j| Hit {
                        index: ids[qi * m + j],
                        score: scores[qi * m + j],
                    })
                    .filter(|h| h.index != u64::MAX)
                    .collect()
            })
            .collect();
        Ok(Self {
            part,
            k,
            pool: field("pool")?.clone(),
            queries,
            cands: Candidates {
                hits,
                m,
                hashes: hid.into_iter().zip(hval).collect(),
                excluded,
                scanned,
            },
        })
    }
}

/// `--merge`: combine part files (all parts of one split of one pool, for the same queries
/// and k) and select.
fn merge(cfg: &RetrieveConfig, t0: std::time::Instant) -> Result<RetrieveSummary> {
    let pool = Embeddings::open(&cfg.pool, None)?;
    let parts: Vec<(PathBuf, PartFile)> = cfg
        .merge
        .iter()
        .map(|p| PartFile::read(p).map(|f| (p.clone(), f)))
        .collect::<Result<_>>()?;
    let (first_path, first) = &parts[0];
    let n = first.part.1;
    let mut seen = vec![false; n];
    for (p, f) in &parts {
        let differs = |what: &str| Error::BadInput {
            path: p.clone(),
            msg: format!("{what} differs from {}'s", first_path.display()),
        };
        if f.part.1 != n {
            return Err(differs("the number of parts"));
        }
        if f.queries != first.queries {
            return Err(differs("the query list"));
        }
        if f.k != first.k || f.cands.m != first.cands.m {
            return Err(differs("k or the candidates per query"));
        }
        if f.pool != first.pool {
            return Err(differs("the pool"));
        }
        if std::mem::replace(&mut seen[f.part.0], true) {
            return Err(Error::BadInput {
                path: p.clone(),
                msg: format!("part {}/{n} is given twice", f.part.0),
            });
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(Error::Invalid(format!(
            "part {missing}/{n} is missing from --merge"
        )));
    }
    if pool_identity(&pool) != first.pool {
        return Err(Error::BadInput {
            path: cfg.pool.clone(),
            msg: format!("is not the pool the parts scanned ({})", first.pool),
        });
    }
    let k = match cfg.k {
        Some(k) if k != first.k => {
            return Err(Error::Invalid(format!(
                "--k {k}, but the parts were scanned for k = {}",
                first.k
            )))
        }
        _ => first.k,
    };
    let queries = first.queries.clone();
    let m = first.cands.m;
    let merged = Candidates::merge(parts.into_iter().map(|(_, f)| f.cands).collect())?;
    let need = queries.len() * k;
    if need > merged.scanned {
        return Err(Error::BadInput {
            path: cfg.pool.clone(),
            msg: format!(
                "{} queries x k = {k} need {need} pool images, the parts scanned {}",
                queries.len(),
                merged.scanned
            ),
        });
    }
    let Some(picks) = merged.select(k).map_err(|e| pool_error(&pool, e))? else {
        return Err(Error::Invalid(format!(
            "{m} candidates per query were too few to give every query k = {k} distinct images; rescan the parts with --candidates {}",
            2 * m
        )));
    };
    let outputs = write_outputs(cfg, &pool, &queries, &picks)?;
    Ok(RetrieveSummary {
        queries: queries.len(),
        k,
        selected: picks.len(),
        pool_rows: merged.scanned,
        excluded: merged.excluded.len(),
        duplicates: merged.duplicates().len(),
        scans: n,
        unusable_shards: pool.unusable_lines(),
        seconds: t0.elapsed().as_secs_f64(),
        outputs,
    })
}
