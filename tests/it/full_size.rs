//! The real checkpoints' configurations (SAM ViT-B/L/H, DINOv2 B/L/g with and without registers,
//! CLIP ViT-L/14-336, SigLIP so400m, ViT-B/16) build with the exact tensor names and shapes
//! transformers saves for them (manifests from scripts/gen_fixtures.py). The weights are zeros
//! of those shapes, so the multi-GB checkpoints are not needed; a short forward at a small input
//! checks the assembled model runs and returns the reference layout.

use crate::common;

use candle_core::{DType, Device, Tensor};
use distillery::models::{self, FeatureRequest, ModelFiles};
use distillery::weights::Weights;
use std::collections::HashMap;

fn build(name: &str) -> Box<dyn distillery::VisionEncoder> {
    let dir = common::fixtures().join("full-size").join(name);
    let manifest: HashMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let files = ModelFiles {
        dir: dir.clone(),
        config: dir.join("config.json"),
        weights: vec![],
        weights_display: dir.join("manifest.json"),
        preprocessor: None,
    };
    let w = Weights::from_manifest(manifest, &files.weights_display, DType::BF16, &Device::Cpu);
    models::build(&files, &w).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (name, family, depth, width, patch, native size, sak levels)
type Case = (
    &'static str,
    &'static str,
    usize,
    usize,
    usize,
    usize,
    [usize; 4],
);

#[test]
fn full_size_configs_build() {
    let cases: &[Case] = &[
        ("sam-vit-base", "sam", 12, 768, 16, 1024, [2, 5, 8, 11]),
        ("sam-vit-large", "sam", 24, 1024, 16, 1024, [5, 11, 17, 23]),
        ("sam-vit-huge", "sam", 32, 1280, 16, 1024, [7, 15, 23, 31]),
        ("dinov2-base", "dinov2", 12, 768, 14, 518, [2, 5, 8, 11]),
        ("dinov2-large", "dinov2", 24, 1024, 14, 518, [5, 11, 17, 23]),
        ("dinov2-giant", "dinov2", 40, 1536, 14, 518, [9, 19, 29, 39]),
        (
            "dinov2-with-registers-giant",
            "dinov2-with-registers",
            40,
            1536,
            14,
            518,
            [9, 19, 29, 39],
        ),
        (
            "clip-vit-large-patch14-336",
            "clip",
            24,
            1024,
            14,
            336,
            [5, 11, 17, 23],
        ),
        (
            "siglip-so400m-patch14-384",
            "siglip",
            27,
            1152,
            14,
            384,
            [5, 12, 19, 26],
        ),
        (
            "vit-base-patch16-224",
            "vit",
            12,
            768,
            16,
            224,
            [2, 5, 8, 11],
        ),
    ];
    for &(name, family, depth, width, patch, size, levels) in cases {
        let enc = build(name);
        let info = enc.info();
        assert_eq!(info.family.to_string(), family, "{name}");
        assert_eq!(
            (info.depth, info.width, info.patch),
            (depth, width, patch),
            "{name}"
        );
        assert_eq!(info.input_hw, (size, size), "{name}");
        assert_eq!(info.default_levels, levels.to_vec(), "{name}");
        // A small non-square input through the first two blocks (SAM: a windowed one).
        let x = Tensor::zeros((1, 3, 2 * patch, 3 * patch), DType::BF16, &Device::Cpu).unwrap();
        let out = enc
            .forward_features(&x, &FeatureRequest::blocks(&[0, 1]))
            .unwrap();
        let h = &out.hidden_states[&2];
        if family == "sam" {
            assert_eq!(h.dims(), &[1, 2, 3, width], "{name}");
        } else {
            assert_eq!(h.dims(), &[1, info.prefix_tokens + 6, width], "{name}");
        }
        drop(enc);
    }
}
