//! The `distillery` binary: the acceptance form of `features`, and bad input (one clear error
//! line naming the file, non-zero exit, no panic, nothing clobbered).

use crate::common;

use candle_core::{Device, Tensor};
use common::{model_dir, reference, rel_err};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distillery"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// Run and expect failure: returns the single stderr line.
fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert_ne!(
        out.status.code(),
        Some(101),
        "panic exit code for {args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want exactly one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

fn copy_model(name: &str, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(model_dir(name)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

#[test]
fn features_writes_reference_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, case) in [
        ("sam", "down"),
        ("clip", "up"),
        ("dinov2-registers", "down"),
    ] {
        let pix = common::fixtures()
            .join("refs")
            .join(format!("{model}-{case}.safetensors"));
        let out = tmp.path().join(format!("{model}.safetensors"));
        let o = bin()
            .args([
                "features",
                "--model",
                &s(&model_dir(model)),
                "--pixels",
                &s(&pix),
                "--out",
                &s(&out),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        // What was loaded is shown on stderr.
        assert!(
            stderr.contains("depth=") && stderr.contains("grid="),
            "{stderr}"
        );
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let want = reference(&format!("{model}-{case}"));
        assert_eq!(
            got.len(),
            want.len() - 1,
            "same tensor names (less pixel_values)"
        );
        for (k, v) in &want {
            if k == "pixel_values" {
                continue;
            }
            assert!(rel_err(&got[k], v) <= 1e-4, "{model} {k}");
        }
    }
}

#[test]
fn features_from_image_and_default_demo() {
    // No arguments: embedded demo model and sample image.
    let o = bin().args(["features"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("last_hidden_state") && stdout.contains("[1, 261, 48]"),
        "{stdout}"
    );
    // An image through the checkpoint's preprocessor_config.json (CLIP: shortest edge 32, crop 32).
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.png");
    image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 128])
    })
    .save(&img)
    .unwrap();
    let out = tmp.path().join("f.safetensors");
    let o = bin()
        .args([
            "features",
            "--model",
            &s(&model_dir("clip")),
            "--image",
            &s(&img),
            "--out",
            &s(&out),
            "--levels",
            "sak",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    // depth 3 -> evenly spaced blocks [0, 0, 1, 2] -> hidden states 1, 2, 3
    assert_eq!(got["hidden_states.3"].dims(), &[1, 17, 32]);
    assert!(!got.contains_key("last_hidden_state"));
}

#[test]
fn missing_folder() {
    let e = fails(&[
        "features",
        "--model",
        "/nonexistent/model-dir",
        "--pixels",
        "x.safetensors",
    ]);
    assert!(
        e.contains("/nonexistent/model-dir") && e.contains("no such folder"),
        "{e}"
    );
}

#[test]
fn folder_without_files() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains(&s(tmp.path())) && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn unsupported_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("vit", tmp.path());
    fs::write(tmp.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("config.json") && e.contains("unsupported model_type \"bert\""),
        "{e}"
    );
}

#[test]
fn invalid_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("vit", tmp.path());
    fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
    fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "vit", "hidden_size": 30, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(e.contains("not divisible"), "{e}");
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("dinov2", tmp.path());
    edit_weights(tmp.path(), |t| {
        t.remove("encoder.layer.1.mlp.fc2.weight");
    });
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("model.safetensors")
            && e.contains("missing tensor \"encoder.layer.1.mlp.fc2.weight\""),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("siglip", tmp.path());
    edit_weights(tmp.path(), |t| {
        t.insert(
            "encoder.layers.0.self_attn.k_proj.weight".into(),
            Tensor::zeros((32, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("model.safetensors")
            && e.contains("k_proj.weight")
            && e.contains("[32, 16]")
            && e.contains("[32, 32]"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("vit", tmp.path());
    let p = tmp.path().join("model.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!").unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("model.safetensors") && e.contains("not valid JSON"),
        "{e}"
    );
    fs::write(&p, b"abc").unwrap();
    let e = fails(&["info", "--model", &s(tmp.path())]);
    assert!(
        e.contains("model.safetensors") && e.contains("too short"),
        "{e}"
    );
}

#[test]
fn unreadable_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("broken.jpg");
    fs::write(&img, b"this is not an image").unwrap();
    let e = fails(&[
        "features",
        "--model",
        &s(&model_dir("vit")),
        "--image",
        &s(&img),
    ]);
    assert!(
        e.contains("broken.jpg") && e.contains("cannot read image"),
        "{e}"
    );
    let missing = tmp.path().join("nope.png");
    let e = fails(&[
        "features",
        "--model",
        &s(&model_dir("vit")),
        "--image",
        &s(&missing),
    ]);
    assert!(e.contains("nope.png"), "{e}");
}

#[test]
fn bad_pixel_values_and_nothing_clobbered() {
    let tmp = tempfile::tempdir().unwrap();
    let pix = tmp.path().join("pix.safetensors");
    let t = Tensor::zeros((3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("pixel_values".to_string(), t)].into_iter().collect(),
        &pix,
    )
    .unwrap();
    let out: PathBuf = tmp.path().join("good.safetensors");
    fs::write(&out, b"previous good output").unwrap();
    let e = fails(&[
        "features",
        "--model",
        &s(&model_dir("vit")),
        "--pixels",
        &s(&pix),
        "--out",
        &s(&out),
    ]);
    assert!(
        e.contains("pix.safetensors") && e.contains("[B, 3, H, W]") && e.contains("[3, 32, 32]"),
        "{e}"
    );
    assert_eq!(fs::read(&out).unwrap(), b"previous good output");

    let t = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("images".to_string(), t)].into_iter().collect(), &pix)
        .unwrap();
    let e = fails(&[
        "features",
        "--model",
        &s(&model_dir("vit")),
        "--pixels",
        &s(&pix),
    ]);
    assert!(
        e.contains("pix.safetensors") && e.contains("no tensor named pixel_values"),
        "{e}"
    );

    let e = fails(&[
        "features",
        "--model",
        &s(&model_dir("vit")),
        "--pixels",
        &s(&tmp.path().join("absent.safetensors")),
    ]);
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn hub_id_not_cached_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .env("HF_HOME", tmp.path())
        .args(["info", "--model", "nobody/nothing"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("nobody/nothing") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

/// `distillery demo`: a real two-teacher distillation on the embedded photos, a normal run
/// folder, the loss curve and one teacher-vs-student PCA picture per teacher.
#[test]
fn demo_runs_and_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = bin()
        .args([
            "demo",
            "--out",
            &s(&out),
            "--steps",
            "6",
            "--transfer-epochs",
            "1",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for f in [
        "loss.png",
        "pca-dinov2-demo.png",
        "pca-sam-demo.png",
        "student.safetensors",
        "student.json",
        "metrics.jsonl",
        "config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(stdout.contains("pca-sam-demo.png"), "{stdout}");
    // 4 photo rows x 5 columns (photo, 2 levels x teacher/student) of 128 px tiles
    let img = image::open(out.join("pca-dinov2-demo.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (5 * 134 + 6, 58 + 4 * 134 + 6));
    // the teacher tiles are not flat: the features vary over the photo
    let tile = image::imageops::crop_imm(&img, 6 + 134, 58 + 6, 128, 128).to_image();
    let first = tile.get_pixel(0, 0);
    assert!(tile.pixels().any(|p| p != first));
    let lines = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    assert!(lines.contains("loss/dinov2-demo") && lines.contains("loss/sam-demo"));
    // the transfer part: teacher, distilled and fine-tuned student, scratch student
    let report: distillery::transfer::Report =
        serde_json::from_str(&fs::read_to_string(out.join("transfer/report.json")).unwrap())
            .unwrap();
    assert_eq!(report.rows.len(), 4);
    assert!(stdout.contains("| task-oriented | finetune |"), "{stdout}");
}

#[test]
fn features_pca_picture() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("pca.png");
    let o = bin()
        .args(["features", "--pca", &s(&png), "--levels", "2,4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    // one image row, columns: image + 2 levels
    assert_eq!(img.dimensions(), (3 * 134 + 6, 58 + 134 + 6));
}
