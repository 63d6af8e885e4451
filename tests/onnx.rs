//! ONNX export: each exported family run by tract (pure Rust ONNX runtime) agrees with the
//! candle forward on the same random pixels, at batch 1 and 3, for every output (pyramid,
//! pooled features, logits).

mod common;

use candle_core::{Device, Tensor};
use common::model_dir;
use distillery::models::LoadOptions;
use distillery::onnx::OnnxModel;

/// `folder`: a fixture model folder, or a registered name (random init).
fn check_family(folder: &str, hw: (usize, usize)) {
    let dir = model_dir(folder);
    let id = if dir.exists() {
        dir.to_string_lossy().to_string()
    } else {
        folder.to_string()
    };
    let (_, net) = distillery::models::backbone::open(&id, &LoadOptions::default())
        .unwrap()
        .expect("a registered family");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.onnx");
    distillery::models::export::export_onnx(net.as_ref(), hw, folder, &path).unwrap();
    for batch in [1usize, 3] {
        let x = Tensor::randn(0f32, 1.0, (batch, 3, hw.0, hw.1), &Device::Cpu).unwrap();
        let mut want = net.forward_intermediates(&x, false).unwrap();
        let pooled = net.pool(want.last().unwrap(), false).unwrap();
        let logits = net.classify(&pooled).unwrap();
        let logits_present = logits.is_some();
        want.push(pooled);
        want.extend(logits);
        let model = OnnxModel::load(&path, &[batch, 3, hw.0, hw.1]).unwrap();
        let got = model.run(&x).unwrap();
        let names = model.outputs().to_vec();
        let mut expected: Vec<String> = (0..want.len() - 1 - usize::from(logits_present))
            .map(|i| format!("stages.{i}"))
            .collect();
        expected.push("pre_logits".into());
        if logits_present {
            expected.push("logits".into());
        }
        assert_eq!(names, expected, "{folder}");
        assert_eq!(got.len(), want.len(), "{folder}: outputs {names:?}");
        for ((g, w), name) in got.iter().zip(&want).zip(&names) {
            let err = common::rel_err(g, w);
            assert!(err <= 1e-4, "{folder} batch {batch} {name}: rel err {err}");
        }
    }
}

#[test]
fn resnet_exports_match_candle() {
    check_family("timm-resnet-basic", (45, 38));
    check_family("timm-resnet-bottleneck", (40, 56));
}

#[test]
fn vit_exports_match_candle() {
    // the registered ViT presets at random init (class token, timm naming), non-square inputs
    check_family("vit-t16", (32, 48));
    check_family("vit-n8", (24, 40));
}

#[test]
fn mobilevit_exports_match_candle() {
    // odd map sides below stride 8 exercise the align-corners resize before the patches
    check_family("timm-mobilevitv2-050", (45, 38));
    check_family("timm-mobilevitv2-075", (32, 32));
}

#[test]
fn fastvit_exports_are_reparameterized_and_match_candle() {
    // the training form is folded into single convolutions while exporting, so its graph is
    // the inference form's; both forms agree with their candle forward
    for (folder, hw) in [
        ("timm-fastvit-t8", (40, 36)),
        ("timm-fastvit-sa12", (64, 48)),
        ("timm-fastvit-sa12-fused", (32, 32)),
    ] {
        check_family(folder, hw);
    }
    let count = |folder: &str| {
        let (_, net) = distillery::models::backbone::open(
            &model_dir(folder).to_string_lossy(),
            &LoadOptions::default(),
        )
        .unwrap()
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.onnx");
        distillery::models::export::export_onnx(net.as_ref(), (32, 32), folder, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n = bytes.windows(4).filter(|w| w == b"Conv").count();
        (n, bytes.len())
    };
    let (train, fused) = (count("timm-fastvit-t8"), count("timm-fastvit-t8-fused"));
    assert_eq!(
        train.0, fused.0,
        "same number of convolutions in both forms"
    );
}

#[test]
fn bad_onnx_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.onnx");
    std::fs::write(&junk, b"definitely not protobuf \xff\xff\xff").unwrap();
    let e = OnnxModel::load(&junk, &[1, 3, 8, 8])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("junk.onnx") && e.contains("not a readable ONNX model"),
        "{e}"
    );
    // a family the zoo does not export
    let out = tmp.path().join("m.onnx");
    let o = common::bin(&[
        "export",
        "--model",
        &model_dir("dinov2").to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
    ]);
    assert!(!o.status.success());
    assert!(!out.exists(), "nothing written on failure");
}
