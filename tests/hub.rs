//! The hub code path, offline, against a local cache folder laid out as huggingface_hub lays it
//! out (`models--org--name/{refs/main, snapshots/<commit>/...}`), located through `HF_HOME`.
//! One test in this binary: it sets process environment variables.

#[path = "it/common.rs"]
mod common;

use common::{model_dir, reference, rel_err};
use distillery::models::{self, FeatureRequest, LoadOptions};
use std::fs;

#[test]
fn loads_hub_id_from_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home
        .path()
        .join("hub")
        .join("models--tiny-org--dinov2-registers");
    let snap = repo.join("snapshots").join(commit);
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs").join("main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(model_dir("dinov2-registers").join(f), snap.join(f)).unwrap();
    }
    // SAFETY (edition 2021: set_var is safe): single test in this binary.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::remove_var("HF_HUB_CACHE");

    let files = models::resolve("tiny-org/dinov2-registers").unwrap();
    assert!(files.config.starts_with(&snap), "{:?}", files.config);

    let enc = models::load("tiny-org/dinov2-registers", &LoadOptions::default()).unwrap();
    let r = reference("dinov2-registers-up");
    let out = enc
        .forward_features(&r["pixel_values"], &FeatureRequest::last_only())
        .unwrap();
    assert!(rel_err(&out.last_hidden_state.unwrap(), &r["last_hidden_state"]) <= 1e-4);

    // A pinned commit resolves to its snapshot folder.
    assert!(models::resolve(&format!("tiny-org/dinov2-registers@{commit}")).is_ok());

    // Not in the cache while offline: a clear error naming the id and the cache.
    let err = models::load("tiny-org/absent", &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tiny-org/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
