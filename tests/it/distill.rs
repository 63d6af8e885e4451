//! SAK stage 1 end to end on tiny checkpoints: two teachers of different families (DINOv2 and
//! SAM at its own geometry), a student initialised from a timm ViT folder, synthetic images in a
//! nested folder with one unreadable file. Resume must reproduce an uninterrupted run exactly.

use crate::common;

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
    common::metric_rows(&run.join("metrics.jsonl"))
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
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
    let out = student.forward(&x, false, false).unwrap();
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
    // Target statistics estimated from the cache are the online ones: the same whitened losses.
    let cache = tmp.path().join("cache-f32");
    let whiten = ["--target-norm", "whiten", "--target-norm-images", "5"];
    let online_w = tmp.path().join("online-whiten");
    let o = distill(
        &images,
        &online_w,
        &[&["--crop-variants", "2"][..], &whiten[..]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cached_w = tmp.path().join("cached-whiten");
    let o = distill(
        &images,
        &cached_w,
        &[&["--cache", &s(&cache)][..], &whiten[..]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (losses_of(&online_w), losses_of(&cached_w));
    assert_ne!(a, losses_of(&online), "whitened targets change the loss");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "online {a:?} vs cached {b:?}"
        );
    }
    // A cache built with other crops is refused.
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
/// state is in the checkpoint). On the CPU the half dtypes are emulated (`--emulate-half`);
/// without it a CPU run says so and computes in f32 (no loss scaler, the f32 run's losses).
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
        let full = run(
            &format!("{dtype}-full"),
            &["--dtype", dtype, "--emulate-half"],
        );
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
            student.forward(&x, false, false).is_ok(),
            "{dtype}: exported student runs in f32"
        );
    }
    let line = std::fs::read_to_string(tmp.path().join("f16-full/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(first["loss_scale"].as_f64(), Some(65536.0), "{first}");

    let split = tmp.path().join("f16-split");
    let f16 = ["--dtype", "f16", "--emulate-half"];
    let o = distill(
        &images,
        &split,
        &[&f16[..], &["--stop-after", "3"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = distill(&images, &split, &[&f16[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        losses(&tmp.path().join("f16-full")),
        losses(&split),
        "a resumed f16 run reproduces the uninterrupted one"
    );

    let fallback = tmp.path().join("f16-fallback");
    let o = distill(&images, &fallback, &["--dtype", "f16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("computing in f32 on the CPU"), "{err}");
    assert_eq!(
        losses(&fallback),
        reference,
        "the fallback run is the f32 run"
    );
}

/// Metric lines of a run that carry held-out evaluations.
fn eval_lines(run: &Path) -> Vec<serde_json::Value> {
    common::metric_rows(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v.get("eval/loss").is_some())
        .collect()
}

/// `--target-norm standardize` estimates and keeps the statistics, logs held-out fidelity
/// during training, `eval-distill` reproduces the last held-out loss from the checkpoint, and
/// the exported student returns features at the teacher's scale (the folded output projection
/// equals de-standardising the trained aligner's output).
#[test]
fn standardized_targets_held_out_fidelity_and_teacher_scale_export() {
    use candle_core::{DType, Device, Tensor};
    use distillery::target_norm::{TargetNorm, TargetStats, STATS_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let held = tmp.path().join("held");
    std::fs::create_dir_all(&held).unwrap();
    for i in 0..3u32 {
        let img = image::RgbImage::from_fn(50 + i * 9, 41, |x, y| {
            image::Rgb([(x * 5 + i * 40) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
        });
        img.save(held.join(format!("h{i}.png"))).unwrap();
    }
    let run = tmp.path().join("std");
    let s = |p: &Path| p.to_string_lossy().to_string();
    let o = distill(
        &images,
        &run,
        &[
            "--target-norm",
            "standardize",
            "--target-norm-images",
            "6",
            "--eval-images",
            &s(&held),
            "--eval-every",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join(STATS_FILE).is_file());
    let spec = std::fs::read_to_string(run.join("student.json")).unwrap();
    assert!(spec.contains("\"target_norm\": \"standardize\""), "{spec}");

    // held-out evaluations at steps 3 and 6: loss and a centred cosine per teacher and level
    let ev = eval_lines(&run);
    assert_eq!(
        ev.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 6]
    );
    let centred: Vec<f64> = ev[1]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with(".centred_cos"))
        .map(|(_, v)| v.as_f64().unwrap())
        .collect();
    assert_eq!(centred.len(), 8, "{}", ev[1]);
    assert!(centred.iter().all(|c| c.is_finite() && c.abs() <= 1.0));

    // eval-distill on the final checkpoint: the same held-out loss, plus the init baseline
    let o = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "eval-distill",
            &s(&run),
            "--images",
            &s(&held),
            "--baseline",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("centred") && table.contains("init"),
        "{table}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run.join("eval-distill.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 16);
    let student_loss = rows[0]["held_out_loss"].as_f64().unwrap();
    let last = ev[1]["eval/loss"].as_f64().unwrap();
    assert!(
        (student_loss - last).abs() <= 1e-5 * last.abs(),
        "{student_loss} vs {last}"
    );
    let init_loss = rows[15]["held_out_loss"].as_f64().unwrap();
    assert!(init_loss != student_loss);

    // the exported student (output projections) against the checkpoint's aligners mapped back
    let exported = distillery::train::stage1::load_student(&run).unwrap();
    let (tensors, state) =
        distillery::train::checkpoint::load(&run.join("checkpoint.safetensors"), &Device::Cpu)
            .unwrap();
    let spec: distillery::models::student::StudentSpec =
        serde_json::from_value(state["spec"].clone()).unwrap();
    assert_eq!(spec.target_norm, TargetNorm::Standardize);
    let params = tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let trained = distillery::models::student::Student::build(
        &spec,
        &distillery::weights::Weights::from_tensors(params, Path::new("ck")).unwrap(),
    )
    .unwrap();
    let widths: Vec<usize> = spec.teachers.iter().map(|t| t.dim).collect();
    let stats = TargetStats::load(
        &run.join(STATS_FILE),
        TargetNorm::Standardize,
        &widths,
        4,
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let a = exported.forward(&x, false, false).unwrap();
    let b = trained.forward(&x, false, true).unwrap();
    for (t, &width) in widths.iter().enumerate() {
        for k in 0..4 {
            let want = stats
                .get(t, k)
                .unwrap()
                .denormalize(&b.aligned[t][k])
                .unwrap();
            assert_eq!(a.teacher[t][k].dims()[1], width);
            let err = common::rel_err(&a.teacher[t][k].to_dtype(DType::F32).unwrap(), &want);
            assert!(err < 1e-5, "teacher {t} level {k}: {err}");
        }
    }

    // not a run folder: one line naming the missing checkpoint
    let o = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args(["eval-distill", &s(&held), "--images", &s(&held)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("checkpoint.safetensors") && e.contains("no checkpoint"),
        "{e}"
    );

    // resuming with another normalisation is refused
    let o = distill(&images, &run, &["--resume", "--target-norm", "whiten"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("target normalisation"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A student that fits standardised targets exactly: its exported features are the teacher's
/// features at the teacher's scale. The teacher is built from the student's own (perfectly
/// standardised) output: `T = A' * sigma + mu`, so the statistics estimated from `T` give back
/// `A'` as the target (loss 0) and the export must undo them.
#[test]
fn exact_fit_round_trips_to_the_teacher_scale() {
    use candle_core::{DType, Device, Tensor};
    use distillery::models::student::{preset, Student, StudentSpec, TeacherSlot};
    use distillery::target_norm::{Moments, TargetNorm, TargetStats};
    use distillery::train::engine::{seeded_params, vars_of, RunPaths};
    let dev = Device::Cpu;
    let slots = vec![TeacherSlot {
        name: "t".into(),
        dim: 40,
    }];
    let mut spec = StudentSpec::new(preset("vit-n8").unwrap(), 32, slots).unwrap();
    spec.target_norm = TargetNorm::Standardize;
    let vm = seeded_params(spec.parameters().unwrap(), 5, &dev, Path::new("init")).unwrap();
    let build = |vm: &candle_nn::VarMap| {
        Student::build(
            &spec,
            &distillery::weights::Weights::from_vars(vm, Path::new("init")).unwrap(),
        )
        .unwrap()
    };
    let x = Tensor::randn(0f32, 1f32, (3, 3, 32, 32), &dev).unwrap();
    // standardise the student's own aligner outputs: W' = W / sd, b' = (b - mu) / sd
    let out = build(&vm).forward(&x, false, true).unwrap();
    let vars = vars_of(&vm).unwrap();
    for k in 0..4 {
        let mut m = Moments::new(40, false);
        m.add_map(&out.aligned[0][k]).unwrap();
        let mu = Tensor::new(m.mean().iter().map(|&v| v as f32).collect::<Vec<_>>(), &dev).unwrap();
        let sd = Tensor::new(
            m.variance()
                .iter()
                .map(|&v| v.sqrt() as f32)
                .collect::<Vec<_>>(),
            &dev,
        )
        .unwrap();
        let w = &vars[&format!("tsap.0.aligners.{k}.weight")];
        let b = &vars[&format!("tsap.0.aligners.{k}.bias")];
        w.set(
            &w.as_tensor()
                .broadcast_div(&sd.unsqueeze(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        b.set(&((b.as_tensor() - &mu).unwrap() / &sd).unwrap())
            .unwrap();
    }
    let fitted = build(&vm).forward(&x, false, true).unwrap();
    // the teacher: the standardised output at another scale and offset per channel
    let sigma = Tensor::rand(0.5f32, 4.0, 40, &dev).unwrap();
    let mu = Tensor::randn(0f32, 3.0, 40, &dev).unwrap();
    let teacher: Vec<Tensor> = fitted.aligned[0]
        .iter()
        .map(|a| {
            a.broadcast_mul(&sigma.reshape((1, 40, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&mu.reshape((1, 40, 1, 1)).unwrap())
                .unwrap()
        })
        .collect();
    let moments: Vec<Moments> = teacher
        .iter()
        .map(|t| {
            let mut m = Moments::new(40, false);
            m.add_map(t).unwrap();
            m
        })
        .collect();
    let stats = TargetStats::from_moments(&[moments], TargetNorm::Standardize, &dev).unwrap();
    let loss = distillery::losses::teacher_loss(
        &fitted.aligned[0],
        &teacher,
        distillery::losses::FeatureLoss::Mse,
        Some(&stats.levels[0]),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert!(
        loss < 1e-6,
        "the student fits the standardised targets: {loss}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let paths = RunPaths::new(tmp.path());
    distillery::train::stage1::export_student(
        &paths,
        &spec,
        &vars,
        &candle_nn::VarMap::new(),
        Some(&stats),
    )
    .unwrap();
    let exported = distillery::train::stage1::load_student(tmp.path()).unwrap();
    let got = exported.forward(&x, false, false).unwrap();
    for (k, t) in teacher.iter().enumerate() {
        let err = common::rel_err(&got.teacher[0][k].to_dtype(DType::F32).unwrap(), t);
        assert!(
            err < 1e-3,
            "level {k}: exported features off the teacher by {err}"
        );
    }
}
