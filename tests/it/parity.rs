//! Numerical parity with the reference implementations (transformers 5.23 / timm 1.0.31 on
//! torch 2.15): every hidden state and the final output of every family, at input sizes other
//! than the checkpoint's, up- and down-sampling the position tables, square and non-square.
//! References are produced by scripts/gen_fixtures.py.

use crate::common;

use common::{model_dir, reference, rel_err};
use distillery::models::{self, FeatureRequest, LoadOptions};

const TOL: f32 = 1e-4;

fn check(model: &str, case: &str) {
    let enc = models::load(&model_dir(model).to_string_lossy(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let r = reference(&format!("{model}-{case}"));
    let x = &r["pixel_values"];
    let out = enc
        .forward_features(x, &FeatureRequest::all(enc.info().depth))
        .unwrap_or_else(|e| panic!("{model}-{case}: {e}"));
    let n_ref = r.keys().filter(|k| k.starts_with("hidden_states.")).count();
    assert_eq!(
        out.hidden_states.len(),
        n_ref,
        "{model}-{case}: number of hidden states"
    );
    assert_eq!(n_ref, enc.info().depth + 1);
    for (i, t) in &out.hidden_states {
        let e = rel_err(t, &r[&format!("hidden_states.{i}")]);
        assert!(e <= TOL, "{model}-{case} hidden_states.{i}: rel err {e}");
    }
    let last = out.last_hidden_state.expect("last_hidden_state");
    let e = rel_err(&last, &r["last_hidden_state"]);
    assert!(e <= TOL, "{model}-{case} last_hidden_state: rel err {e}");
}

#[test]
fn vit() {
    check("vit", "up");
    check("vit", "down");
}

#[test]
fn timm_vit() {
    check("timm-vit", "up");
    check("timm-vit", "down");
}

#[test]
fn timm_vit_with_registers_layer_scale_and_mlp_ratio_3() {
    check("timm-vit-reg", "native");
    check("timm-vit-reg", "up");
}

#[test]
fn vit_with_mlp_96_and_no_qkv_bias() {
    check("vit-mlp96", "native");
}

#[test]
fn dinov2() {
    check("dinov2", "up");
    check("dinov2", "down");
}

#[test]
fn dinov2_swiglu() {
    check("dinov2-swiglu", "up");
}

#[test]
fn dinov2_with_registers() {
    check("dinov2-registers", "up");
    check("dinov2-registers", "down");
}

#[test]
fn clip_full_checkpoint() {
    check("clip", "up");
    check("clip", "down");
}

#[test]
fn siglip() {
    check("siglip", "up");
    check("siglip", "down");
}

#[test]
fn sam_full_checkpoint() {
    check("sam", "native");
    check("sam", "down");
    check("sam", "up");
}

/// Selected levels equal the same hidden states of a full run, and nothing else is returned.
#[test]
fn level_selection_matches_full_run() {
    for model in ["dinov2-registers", "sam"] {
        let enc =
            models::load(&model_dir(model).to_string_lossy(), &LoadOptions::default()).unwrap();
        let case = if model == "sam" { "down" } else { "up" };
        let r = reference(&format!("{model}-{case}"));
        let req = FeatureRequest::blocks(&[1]);
        assert_eq!(req.blocks_needed(enc.info().depth), 2);
        let out = enc.forward_features(&r["pixel_values"], &req).unwrap();
        assert!(out.last_hidden_state.is_none());
        assert_eq!(
            out.hidden_states.keys().copied().collect::<Vec<_>>(),
            vec![2]
        );
        assert!(rel_err(&out.hidden_states[&2], &r["hidden_states.2"]) <= TOL);
        // The feature map view drops prefix tokens and is [B, C, h, w].
        let map = out.feature_map(2).unwrap();
        let (gh, gw) = out.grid;
        assert_eq!(map.dims(), &[r["pixel_values"].dim(0).unwrap(), 32, gh, gw]);
    }
}

#[test]
fn sak_levels_follow_spec() {
    // SPEC.md section 1: B/S 2,5,8,11; L 5,11,17,23; H 7,15,23,31; g 9,19,29,39.
    assert_eq!(models::evenly_spaced_blocks(12, 4), vec![2, 5, 8, 11]);
    assert_eq!(models::evenly_spaced_blocks(24, 4), vec![5, 11, 17, 23]);
    assert_eq!(models::evenly_spaced_blocks(32, 4), vec![7, 15, 23, 31]);
    assert_eq!(models::evenly_spaced_blocks(40, 4), vec![9, 19, 29, 39]);
    // SAM uses its global-attention blocks when it has four; the tiny fixture has two
    // (blocks 1 and 3), so it falls back to evenly spaced blocks.
    let sam = models::load(&model_dir("sam").to_string_lossy(), &LoadOptions::default()).unwrap();
    assert_eq!(sam.info().default_levels, vec![0, 1, 2, 3]);
}

/// Non-square SAM inputs run (the reference cannot; shapes follow the grid).
#[test]
fn sam_non_square() {
    let enc = models::load(&model_dir("sam").to_string_lossy(), &LoadOptions::default()).unwrap();
    let x =
        candle_core::Tensor::randn(0f32, 1f32, (1, 3, 48, 72), &candle_core::Device::Cpu).unwrap();
    let out = enc.forward_features(&x, &FeatureRequest::all(4)).unwrap();
    assert_eq!(out.hidden_states[&4].dims(), &[1, 6, 9, 32]);
    assert_eq!(out.last_hidden_state.unwrap().dims(), &[1, 16, 6, 9]);
}

/// A checkpoint split into shards with a `model.safetensors.index.json` loads like the single
/// file.
#[test]
fn sharded_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir("vit");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let all =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let shard: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, tmp.path().join(&file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let enc = models::load(&tmp.path().to_string_lossy(), &LoadOptions::default()).unwrap();
    let r = reference("vit-up");
    let out = enc
        .forward_features(&r["pixel_values"], &FeatureRequest::last_only())
        .unwrap();
    assert!(rel_err(&out.last_hidden_state.unwrap(), &r["last_hidden_state"]) <= TOL);
}
