//! Hugging Face hub ids: files are taken from the local hub cache (`HF_HOME`, or `HF_HUB_CACHE`)
//! and downloaded into it when missing, unless `HF_HUB_OFFLINE` is set, in which case only the
//! cache is used.

use crate::config::Cfg;
use crate::error::{Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// `org/name` or `org/name@revision`, not an existing path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// `HF_HUB_OFFLINE` set to a true value.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The hub cache folder: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

fn split_id(id: &str) -> (String, String) {
    match id.split_once('@') {
        Some((name, rev)) if !rev.is_empty() => (name.to_string(), rev.to_string()),
        _ => (
            id.split('@').next().unwrap_or(id).to_string(),
            "main".to_string(),
        ),
    }
}

/// Something that yields a file of the repo, or None when the repo does not have it.
trait Source {
    fn file(&self, name: &str) -> Result<Option<PathBuf>>;
}

struct CacheSource {
    cache: Cache,
    repo: Repo,
    id: String,
    rev: String,
}

impl Source for CacheSource {
    fn file(&self, name: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cache.repo(self.repo.clone()).get(name) {
            return Ok(Some(p));
        }
        // A commit hash as revision names the snapshot folder directly.
        let snap = self
            .cache
            .path()
            .join(format!("models--{}", self.id.replace('/', "--")))
            .join("snapshots")
            .join(&self.rev)
            .join(name);
        Ok(snap.is_file().then_some(snap))
    }
}

struct ApiSource {
    repo: hf_hub::api::sync::ApiRepo,
    cached: CacheSource,
}

impl Source for ApiSource {
    fn file(&self, name: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached.file(name)? {
            return Ok(Some(p));
        }
        match self.repo.get(name) {
            Ok(p) => Ok(Some(p)),
            // The sync API does not tell a 404 from other failures in a typed way.
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("404") {
                    Ok(None)
                } else {
                    Err(Error::Hub(format!("{}: {name}: {msg}", self.cached.id)))
                }
            }
        }
    }
}

/// Resolve a hub id to local files, downloading what is missing unless offline.
pub fn fetch_model(id: &str) -> Result<ModelFiles> {
    let (name, rev) = split_id(id);
    let cache = cache();
    let repo = Repo::with_revision(name.clone(), RepoType::Model, rev.clone());
    let cached = CacheSource {
        cache: cache.clone(),
        repo: repo.clone(),
        id: name.clone(),
        rev: rev.clone(),
    };
    if offline() {
        resolve_with(&cached, &name, cache.path(), true)
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(cache.path().clone())
            .with_progress(true)
            .build()
            .map_err(|e| Error::Hub(format!("{name}: {e}")))?;
        let src = ApiSource {
            repo: api.repo(repo),
            cached,
        };
        resolve_with(&src, &name, cache.path(), false)
    }
}

fn resolve_with(src: &dyn Source, id: &str, cache_dir: &Path, offline: bool) -> Result<ModelFiles> {
    let missing = |what: &str| Error::ModelNotFound {
        path: PathBuf::from(id),
        msg: if offline {
            format!(
                "{what} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                cache_dir.display()
            )
        } else {
            format!("{what} not found on the hub")
        },
    };
    let config = src
        .file("config.json")?
        .ok_or_else(|| missing("config.json"))?;
    let (weights, display) = if let Some(p) = src.file("model.safetensors")? {
        (vec![p.clone()], p)
    } else if let Some(index) = src.file("model.safetensors.index.json")? {
        let shards = shard_names(&index)?;
        let mut paths = Vec::new();
        for s in shards {
            paths.push(src.file(&s)?.ok_or_else(|| missing(&s))?);
        }
        (paths, index)
    } else {
        return Err(missing("model.safetensors"));
    };
    let preprocessor = src.file("preprocessor_config.json")?;
    Ok(ModelFiles {
        dir: config.parent().map(Path::to_path_buf).unwrap_or_default(),
        config,
        weights,
        weights_display: display,
        preprocessor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_shapes() {
        assert!(looks_like_hub_id("facebook/dinov2-base"));
        assert!(looks_like_hub_id("openai/clip-vit-base-patch16@main"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("plain"));
        assert_eq!(split_id("a/b@v1"), ("a/b".into(), "v1".into()));
        assert_eq!(split_id("a/b"), ("a/b".into(), "main".into()));
    }
}

/// Where a model's files live after resolution.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// file to name in errors about missing tensors
    pub weights_display: PathBuf,
    pub preprocessor: Option<PathBuf>,
}

impl ModelFiles {
    /// Map the checkpoint's safetensors files, read as `dtype` onto `device`.
    pub fn open_weights(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<crate::weights::Weights> {
        crate::weights::Weights::open(&self.weights, &self.weights_display, dtype, device)
    }

    /// Resolve the files of a local model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::ModelNotFound {
                path: dir.to_path_buf(),
                msg: "no such folder".into(),
            });
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::ModelNotFound {
                path: dir.to_path_buf(),
                msg: "folder has no config.json".into(),
            });
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (weights, weights_display) = if single.is_file() {
            (vec![single.clone()], single)
        } else if index.is_file() {
            (shards_from_index(&index)?, index)
        } else {
            return Err(Error::ModelNotFound {
                path: dir.to_path_buf(),
                msg: "folder has neither model.safetensors nor model.safetensors.index.json".into(),
            });
        };
        let pre = dir.join("preprocessor_config.json");
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            weights_display,
            preprocessor: pre.is_file().then_some(pre),
        })
    }
}

/// The distinct shard file names a `model.safetensors.index.json` lists, sorted.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let cfg = Cfg::read(index)?;
    let map = cfg
        .value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            msg: "no weight_map object".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let files = shard_names(index)?;
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(Error::ModelNotFound {
                path: index.to_path_buf(),
                msg: format!("shard {f} listed in weight_map is missing"),
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// Resolve a folder or hub id to files.
pub fn resolve(model: &str) -> Result<ModelFiles> {
    let p = Path::new(model);
    if p.exists() || !looks_like_hub_id(model) {
        return ModelFiles::from_dir(p);
    }
    fetch_model(model)
}
