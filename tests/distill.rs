//! SAK stage 1 end to end on tiny checkpoints: two teachers of different families (DINOv2 and
//! SAM at its own geometry), a student initialised from a timm ViT folder, synthetic images in a
//! nested folder with one unreadable file. Resume must reproduce an uninterrupted run exactly.

mod common;

use common::model_dir;
use std::path::Path;
use std::process::Command;

fn write_images(dir: &Path) {
    std::fs::create_dir_all(dir.join("nested/deeper")).unwrap();
    for i in 0..9u32 {
        let (w, h) = (40 + i * 7, 70 - i * 3);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 31 + y * 7 + i * 11) % 256) as u8,
                ((x * y + i) % 256) as u8,
                ((y * 13) % 256) as u8,
            ])
        });
        let sub = if i % 3 == 0 { "nested/deeper" } else { "" };
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        img.save(dir.join(sub).join(format!("im{i}.{ext}")))
            .unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
}

fn distill(images: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let s = |p: &Path| p.to_string_lossy().to_string();
    let mut args = vec![
        "distill".to_string(),
        "--teacher".into(),
        s(&model_dir("dinov2")),
        "--teacher".into(),
        s(&model_dir("sam")),
        "--student".into(),
        s(&model_dir("timm-vit")),
        "--images".into(),
        s(images),
        "--out".into(),
        s(out),
        "--steps".into(),
        "6".into(),
        "--batch-size".into(),
        "3".into(),
        "--image-size".into(),
        "32".into(),
        "--checkpoint-every".into(),
        "2".into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args(&args)
        .output()
        .unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_is_exact_and_student_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);

    let full = tmp.path().join("full");
    let o = distill(&images, &full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("unreadable images skipped"), "{stderr}");
    let a = losses(&full);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    // per-teacher losses are logged
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(full.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    // Per-teacher keys use short names (the tiny fixtures' widths are no known size, so the
    // folder name), not the full paths.
    let mut keys: Vec<&String> = first
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("loss/"))
        .collect();
    keys.sort();
    assert_eq!(keys, ["loss/dinov2", "loss/sam"]);
    let spec = std::fs::read_to_string(full.join("student.json")).unwrap();
    assert!(spec.contains("\"name\": \"dinov2\""), "{spec}");
    let config = std::fs::read_to_string(full.join("config.toml")).unwrap();
    assert!(config.contains("\"sam="), "{config}");

    // Interrupted after 3 steps (checkpoint at 2 and at the stop), resumed to the end.
    let split = tmp.path().join("split");
    let o = distill(&images, &split, &["--stop-after", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !split.join("student.safetensors").exists(),
        "not exported before the end"
    );
    let o = distill(&images, &split, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = losses(&split);
    assert_eq!(
        a, b,
        "resumed run must reproduce the uninterrupted losses bit for bit"
    );
    assert_eq!(
        std::fs::read(full.join("student.safetensors")).unwrap(),
        std::fs::read(split.join("student.safetensors")).unwrap(),
        "same final weights"
    );

    // A loss plot is written (PNG signature).
    let png = std::fs::read(full.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Refuses to overwrite a run without --resume.
    let o = distill(&images, &full, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    // The exported student reloads without aligners and produces per-teacher maps.
    let student = distillery::train::stage1::load_student(&full).unwrap();
    let x =
        candle_core::Tensor::randn(0f32, 1f32, (1, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
    let out = student.forward(&x, false).unwrap();
    assert_eq!(out.normed.len(), 2);
    assert_eq!(out.normed[0][3].dims(), &[1, 32, 4, 4]);
}

/// `--teacher NAME=PATH` names a teacher; two teachers that would share a name are told apart.
#[test]
fn teacher_names_are_short_explicit_and_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let s = |p: &Path| p.to_string_lossy().to_string();
    let run = tmp.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "distill",
            "--teacher",
            &format!("big={}", s(&model_dir("dinov2"))),
            "--teacher",
            &s(&model_dir("dinov2")),
            "--teacher",
            &s(&model_dir("dinov2")),
            "--student",
            "vit-t16",
            "--images",
            &s(&images),
            "--out",
            &s(&run),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for k in ["loss/big", "loss/dinov2", "loss/dinov2-2"] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
}

fn losses_of(run: &Path) -> Vec<f64> {
    losses(run).into_iter().map(|x| x.1).collect()
}

/// Training from the teacher-feature cache gives the same losses as running the teachers online
/// on the same crops: a float32 cache agrees to float rounding (the cache runs the teachers on
/// differently composed batches, which can change the last bit of a product), a float16 cache to
/// half-precision rounding.
#[test]
fn cached_teachers_match_online_teachers() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let s = |p: &Path| p.to_string_lossy().to_string();
    let online = tmp.path().join("online");
    let o = distill(&images, &online, &["--crop-variants", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (dtype, tol) in [("f32", 1e-6), ("f16", 2e-3)] {
        let cache = tmp.path().join(format!("cache-{dtype}"));
        let o = Command::new(env!("CARGO_BIN_EXE_distillery"))
            .args([
                "cache",
                "--teacher",
                &s(&model_dir("dinov2")),
                "--teacher",
                &s(&model_dir("sam")),
                "--images",
                &s(&images),
                "--out",
                &s(&cache),
                "--image-size",
                "32",
                "--variants",
                "2",
                "--dtype",
                dtype,
                "--batch-size",
                "4",
                "--quiet",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let run = tmp.path().join(format!("cached-{dtype}"));
        let o = distill(&images, &run, &["--cache", &s(&cache)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (losses_of(&online), losses_of(&run));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= tol * x.abs(),
                "{dtype}: online {a:?} vs cached {b:?}"
            );
        }
    }
    // A cache built with other crops is refused.
    let cache = tmp.path().join("cache-f32");
    let run = tmp.path().join("wrong-seed");
    let o = distill(&images, &run, &["--cache", &s(&cache), "--seed", "5"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("seed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `kill -9` in the middle of a run leaves a loadable checkpoint, and `--resume` continues.
#[test]
fn kill_9_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let run = tmp.path().join("run");
    let s = |p: &Path| p.to_string_lossy().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "distill",
            "--teacher",
            &s(&model_dir("dinov2")),
            "--student",
            &s(&model_dir("timm-vit")),
            "--images",
            &s(&images),
            "--out",
            &s(&run),
            "--steps",
            "100000",
            "--batch-size",
            "3",
            "--image-size",
            "32",
            "--checkpoint-every",
            "1",
            "--quiet",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then kill without warning (SIGKILL).
    let ck = run.join("checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    while !ck.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let (tensors, state) =
        distillery::train::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 1 && !tensors.is_empty());
    // Resume continues from that step (stop after two more).
    let o = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "distill",
            "--out",
            &s(&run),
            "--resume",
            "--stop-after",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, state) = distillery::train::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    assert_eq!(state["step"].as_u64().unwrap(), step + 2);
}

/// Mixed precision: bf16 and f16 compute with f32 master weights and optimizer state. The
/// first step's loss (same initialisation, same batch) stays close to the f32 run's; the
/// checkpoint keeps f32 parameters; f16 logs its loss scale and resumes exactly (the scaler's
/// state is in the checkpoint).
#[test]
fn mixed_precision_keeps_f32_masters_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = distill(&images, &out, extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let f32_run = run("f32", &[]);
    let reference = losses(&f32_run);
    for dtype in ["bf16", "f16"] {
        let full = run(&format!("{dtype}-full"), &["--dtype", dtype]);
        let got = losses(&full);
        assert_eq!(got.len(), 6);
        let (a, b) = (got[0].1, reference[0].1);
        assert!(
            (a - b).abs() / b < 0.03,
            "{dtype}: first loss {a} vs f32 {b}"
        );
        assert!(got.iter().all(|(_, l)| l.is_finite()), "{got:?}");
        let ck = candle_core::safetensors::load(
            full.join("checkpoint.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (name, t) in &ck {
            if name.starts_with("model.") || name.starts_with("adam.m.") {
                assert_eq!(t.dtype(), candle_core::DType::F32, "{dtype}: {name}");
            }
        }
        assert_eq!(ck.contains_key("amp.scale"), dtype == "f16");
        let student = distillery::train::stage1::load_student(&full).unwrap();
        let x =
            candle_core::Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, student.device())
                .unwrap();
        assert!(
            student.forward(&x, false).is_ok(),
            "{dtype}: exported student runs in f32"
        );
    }
    let line = std::fs::read_to_string(tmp.path().join("f16-full/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(first["loss_scale"].as_f64(), Some(65536.0), "{first}");

    let split = tmp.path().join("f16-split");
    let o = distill(&images, &split, &["--dtype", "f16", "--stop-after", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = distill(&images, &split, &["--dtype", "f16", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        losses(&tmp.path().join("f16-full")),
        losses(&split),
        "a resumed f16 run reproduces the uninterrupted one"
    );
}
