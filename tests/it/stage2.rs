//! SAK stage 2 end to end on the tiny PASCAL-Context folder: a stage-1 run initialises the
//! student; training with distillation, exact resume, evaluation and predictions through the
//! CLI; task losses against torch.

use crate::common;
use common::{bin, ok};

use candle_core::{Device, Tensor};
use common::model_dir;
use distillery::data::dense::Task;
use distillery::losses::tasks::{task_loss, Target};
use std::path::{Path, PathBuf};

fn fx() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dense")
}

#[test]
fn task_losses_match_torch() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx().join("losses.json")).unwrap()).unwrap();
    for task in [
        Task::Semseg,
        Task::Saliency,
        Task::Edge,
        Task::Normals,
        Task::Depth,
    ] {
        let r = &refs[task.name()];
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let f = |k: &str| -> Vec<f32> {
            r[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        let logits =
            candle_core::Tensor::from_vec(f("logits"), shape.as_slice(), &candle_core::Device::Cpu)
                .unwrap();
        let labels = f("labels");
        let c = task.label_channels();
        let t = Target {
            task,
            b: shape[0],
            c,
            h: shape[2],
            w: shape[3],
            data: labels,
        };
        let got = task_loss(&logits, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = r["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{task:?}: {got} vs torch {want}"
        );
    }
}

fn write_config(path: &Path, out: &Path, init: &Path, steps: u64) {
    write_config_extra(path, out, init, steps, "");
}

fn write_config_extra(path: &Path, out: &Path, init: &Path, steps: u64, extra: &str) {
    let text = format!(
        r#"out = "{}"
dataset = "pascal-context"
data_root = "{}"
init = "{}"
input_hw = [64, 96]
batch_size = 2
steps = {steps}
checkpoint_every = 2
edge_thresholds = 9
seed = 5
{extra}

[baselines]
semseg = 5.0
normals = 50.0
"#,
        out.display(),
        fx().join("pascal").display(),
        init.display()
    );
    std::fs::write(path, text).unwrap();
}

/// A one-step stage-1 run with the given tiny teachers and a timm ViT student (patch 8).
fn stage1(t: &Path, teachers: &[&str]) -> PathBuf {
    stage1_with(t, "s1", teachers, &[])
}

fn stage1_with(t: &Path, name: &str, teachers: &[&str], extra: &[&str]) -> PathBuf {
    let s1 = t.join(name);
    let s = |p: &Path| p.to_string_lossy().to_string();
    let mut args = vec!["distill".to_string()];
    for name in teachers {
        args.push("--teacher".into());
        args.push(s(&model_dir(name)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&bin(&[
        args.as_slice(),
        &[
            "--student",
            &s(&model_dir("timm-vit")),
            "--images",
            &s(&fx().join("pascal/JPEGImages")),
            "--out",
            &s(&s1),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--quiet",
        ],
        extra,
    ]
    .concat()));
    s1
}

/// Stage 2 from a stage-1 run trained on standardised targets keeps its statistics for the
/// distillation term (the aligners predict standardised features): without the run's
/// statistics file it refuses to start, naming it.
#[test]
fn stage2_keeps_the_stage1_target_normalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let s1 = stage1_with(t, "s1-std", &["dinov2"], &["--target-norm", "standardize"]);
    let cfg = t.join("std.toml");
    write_config_extra(&cfg, &t.join("run"), &s1, 2, "eval_at_end = false");
    ok(&bin(&["train", "--config", &s(&cfg), "--quiet"]));
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(t.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first["loss/distill"].as_f64().unwrap().is_finite());
    std::fs::remove_file(s1.join("target-norm.safetensors")).unwrap();
    write_config_extra(&cfg, &t.join("run2"), &s1, 2, "eval_at_end = false");
    let o = bin(&["train", "--config", &s(&cfg), "--quiet"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("target-norm.safetensors"), "{e}");
}

#[test]
fn cached_teachers_give_the_online_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let s1 = stage1(t, &["dinov2", "sam"]);
    // Online teachers (DINOv2 at the input size, SAM at 1024 px) replaying 2 augmentation
    // variants, and the same recipe reading an f32 cache of those variants.
    let online = t.join("online");
    let cfg_on = t.join("online.toml");
    write_config_extra(
        &cfg_on,
        &online,
        &s1,
        4,
        "crop_variants = 2\neval_at_end = false",
    );
    ok(&bin(&["train", "--config", &s(&cfg_on), "--quiet"]));
    let cache = t.join("cache");
    ok(&bin(&[
        "cache",
        "--config",
        &s(&cfg_on),
        "--variants",
        "2",
        "--dtype",
        "f32",
        "--out",
        &s(&cache),
        "--quiet",
    ]));
    let cached = t.join("cached");
    let cfg_c = t.join("cached.toml");
    write_config_extra(
        &cfg_c,
        &cached,
        &s1,
        4,
        &format!(
            "crop_variants = 2\neval_at_end = false\ncache = \"{}\"",
            cache.display()
        ),
    );
    ok(&bin(&["train", "--config", &s(&cfg_c), "--quiet"]));
    let read = |run: &Path| common::metric_rows(&run.join("metrics.jsonl"));
    let (a, b) = (read(&online), read(&cached));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "loss/distill", "loss/semseg"] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                "step {}: {k} {u} vs {v}",
                x["step"]
            );
        }
    }
    // A cache of another recipe is refused by name.
    let cfg_bad = t.join("bad.toml");
    write_config_extra(
        &cfg_bad,
        &t.join("bad"),
        &s1,
        4,
        &format!(
            "crop_variants = 2\ncache = \"{}\"\n[augment]\nflip_p = 0.0",
            cache.display()
        ),
    );
    let o = bin(&["train", "--config", &s(&cfg_bad), "--quiet"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("manifest.json") && e.contains("augmentation"),
        "{e}"
    );
}

fn metric_lines(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            // everything but the timings
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for timing in ["images_per_s", "data_wait_s"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            v.to_string()
        })
        .collect()
}

#[test]
fn train_resume_eval_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_string_lossy().to_string();
    // Stage 1: a DINOv2 teacher, a timm ViT student (patch 8), the data set's photos.
    let s1 = stage1(t, &["dinov2"]);

    // Uninterrupted run.
    let full = t.join("full");
    let cfg_full = t.join("full.toml");
    write_config(&cfg_full, &full, &s1, 5);
    let o = bin(&["train", "--config", &s(&cfg_full), "--quiet"]);
    ok(&o);
    let lines = metric_lines(&full);
    assert_eq!(lines.len(), 5);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    for k in [
        "loss",
        "loss/semseg",
        "loss/parts",
        "loss/saliency",
        "loss/normals",
        "loss/edge",
        "loss/distill",
        "lr",
        "grad_norm",
    ] {
        assert!(
            first[k].as_f64().is_some_and(f64::is_finite),
            "{k} in {first}"
        );
    }
    for f in [
        "model.safetensors",
        "model.json",
        "loss.png",
        "eval-val.json",
        "checkpoint.safetensors",
    ] {
        assert!(full.join(f).is_file(), "{f}");
    }

    // Interrupted after 2 steps, then resumed: same metrics and same final weights.
    let part = t.join("part");
    let cfg_part = t.join("part.toml");
    write_config(&cfg_part, &part, &s1, 5);
    ok(&bin(&[
        "train",
        "--config",
        &s(&cfg_part),
        "--quiet",
        "--stop-after",
        "2",
    ]));
    assert!(!part.join("model.safetensors").exists());
    // Starting again without --resume must refuse to clobber the run.
    let o = bin(&["train", "--config", &s(&cfg_part), "--quiet"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    ok(&bin(&[
        "train",
        "--config",
        &s(&cfg_part),
        "--quiet",
        "--resume",
    ]));
    assert_eq!(metric_lines(&part), lines);
    assert_eq!(
        std::fs::read(part.join("model.safetensors")).unwrap(),
        std::fs::read(full.join("model.safetensors")).unwrap(),
        "resumed run ended with other weights"
    );

    // Evaluation through the CLI: every task, Delta_m against the configured baselines.
    let o = bin(&["eval", "--run", &s(&full), "--split", "val", "--json"]);
    ok(&o);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["images"], 2);
    let miou = r["semseg"]["miou"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&miou));
    assert!(r["parts"]["miou"].as_f64().is_some());
    assert!((0.0..=100.0).contains(&r["saliency"]["maxf"].as_f64().unwrap()));
    let angle = r["normals"]["mean_angle"].as_f64().unwrap();
    assert!((0.0..=180.0).contains(&angle));
    assert!((0.0..=100.0).contains(&r["edge"]["ods_f"].as_f64().unwrap()));
    let dm = r["delta_m"].as_f64().unwrap();
    let want = 100.0 * ((miou - 5.0) / 5.0 - (angle - 50.0) / 50.0) / 2.0;
    assert!((dm - want).abs() < 1e-6, "{dm} vs {want}");
    // The same numbers the training run wrote at its end.
    let at_end: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("eval-val.json")).unwrap())
            .unwrap();
    assert_eq!(at_end["semseg"], r["semseg"]);

    check_onnx_export(&full, t);

    // Predictions: one PNG per task per image at the image's size, and a contact sheet.
    let pred = t.join("pred");
    ok(&bin(&[
        "predict",
        "--run",
        &s(&full),
        "--images",
        &s(&fx().join("pascal/JPEGImages")),
        "--out",
        &s(&pred),
    ]));
    let html = std::fs::read_to_string(pred.join("index.html")).unwrap();
    for task in ["semseg", "parts", "saliency", "normals", "edge"] {
        let p = pred.join(format!("00000_2008_000001_{task}.png"));
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (96, 64), "{task}");
        assert!(html.contains(&format!("00000_2008_000001_{task}.png")));
    }
}

#[test]
fn bad_train_config_and_eval_edges_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "out = \"x\"\nlearning_rate = 1.0\n").unwrap();
    let o = bin(&["train", "--config", &cfg.to_string_lossy()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");

    // Ranges are checked where the config is read (no panic inside the data loader).
    std::fs::write(
        &cfg,
        "out = \"x\"\ndata_root = \"d\"\ninit = \"vit-s16\"\n[augment]\nscale = [1.0, 0.5]\n",
    )
    .unwrap();
    let o = bin(&["train", "--config", &cfg.to_string_lossy()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("augment: scale"), "{e}");

    // eval-edges: a prediction without ground truth, then a corrupt ground-truth file.
    let pred = tmp.path().join("pred");
    let gt = tmp.path().join("gt");
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    image::GrayImage::new(20, 10)
        .save(pred.join("a.png"))
        .unwrap();
    let run = || {
        bin(&[
            "eval-edges",
            "--pred",
            &pred.to_string_lossy(),
            "--gt",
            &gt.to_string_lossy(),
        ])
    };
    let o = run();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a.png") && e.contains("no ground truth"), "{e}");
    std::fs::write(gt.join("a.mat"), b"MATLAB 5.0 MAT-file, short").unwrap();
    let o = run();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a.mat"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn routers_and_heads_match_torch() {
    use distillery::models::multitask::{Decoder, MultiTaskSpec, RouterKind};
    use distillery::models::student::{StudentOutput, StudentSpec, TeacherSlot};
    use distillery::weights::Weights;
    let p = fx().join("decoder.safetensors");
    let w = Weights::open(
        std::slice::from_ref(&p),
        &p,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let slot = |n: &str| TeacherSlot {
        name: n.into(),
        dim: 16,
    };
    let student = StudentSpec::new(
        distillery::models::encoder::VitArch::standard(16, 4, 2, 8),
        32,
        vec![slot("a"), slot("b")],
    )
    .unwrap();
    assert_eq!(student.levels.len(), 4);
    let spec = MultiTaskSpec {
        student,
        tasks: vec![(Task::Semseg, 5), (Task::Normals, 3)],
        router: RouterKind::Mor,
    };
    let get = |n: &str| w.get_any(n).unwrap();
    let inputs = || StudentOutput {
        // the fixture's stem tokens carry the cls token; the student hands over patch tokens
        stem: (0..4)
            .map(|k| {
                let t = get(&format!("in.stem.{k}"));
                t.narrow(1, 1, t.dim(1).unwrap() - 1).unwrap()
            })
            .collect(),
        normed: (0..2)
            .map(|i| (0..4).map(|k| get(&format!("in.normed.{i}.{k}"))).collect())
            .collect(),
        aligned: vec![],
        teacher: vec![],
        grids: vec![(3, 5); 4],
    };
    let max_diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for (mode, train) in [("eval", false), ("train", true)] {
        let dec = Decoder::build(&spec, &w, &w).unwrap();
        let out = dec.forward(inputs(), (22, 38), train, None).unwrap();
        for (task, logits) in &out.logits {
            let want = get(&format!("out.{mode}.{}", task.name()));
            let d = max_diff(logits, &want);
            assert!(d < 1e-4, "{mode} {task:?}: max diff {d}");
        }
        if train {
            for (name, t) in dec.buffers().unwrap() {
                // heads.{task}.bn.running_x -> after.{task}.running_x
                let key = name.replace("heads.", "after.").replace(".bn.", ".");
                let d = max_diff(&t, &get(&key));
                assert!(d < 1e-5, "{name}: {d}");
            }
        }
    }
}

#[test]
fn nyud_without_distillation_trains_and_evaluates_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let s1 = stage1(t, &["dinov2"]);
    let run = t.join("nyud");
    let cfg = t.join("nyud.toml");
    let text = format!(
        r#"out = "{}"
dataset = "nyud-v2"
data_root = "{}"
init = "{}"
input_hw = [128, 160]
batch_size = 2
steps = 2
distill_weight = 0.0
router = "none"
edge_thresholds = 5
"#,
        run.display(),
        fx().join("nyud").display(),
        s1.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let o = bin(&["train", "--config", &s(&cfg), "--quiet"]);
    ok(&o);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for k in ["loss/semseg", "loss/depth", "loss/normals", "loss/edge"] {
        assert!(first[k].as_f64().is_some(), "{k} in {first}");
    }
    assert!(first.get("loss/distill").is_none());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-val.json")).unwrap()).unwrap();
    assert_eq!(r["images"], 1);
    let rmse = r["depth"]["rmse"].as_f64().unwrap();
    assert!(rmse.is_finite() && rmse > 0.0, "{r}");
    assert_eq!(r["edge"]["max_dist"], 0.011);
    assert!(r["semseg"]["per_class_iou"].as_array().unwrap().len() == 40);
    // a non-square model with plain-sum routing exports too
    check_onnx_export(&run, t);
}

/// `distillery export` of a stage-2 run: every task's logits (`logits.{task}`) as the model
/// computes them, at batch 2.
fn check_onnx_export(run: &Path, tmp: &Path) {
    let s = |p: &Path| p.to_string_lossy().to_string();
    let onnx = tmp.join("model.onnx");
    ok(&bin(&["export", "--model", &s(run), "--out", &s(&onnx)]));
    let (model, info, _) = distillery::train::stage2::load_run(run).unwrap();
    let (h, w) = info.input_hw;
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
    let want = model.forward(&x, false, false, None).unwrap().logits;
    let m = distillery::onnx::OnnxModel::load(&onnx, &[2, 3, h, w]).unwrap();
    let got = m.run(&x).unwrap();
    assert_eq!(got.len(), want.len());
    for ((name, g), (task, l)) in m.outputs().iter().zip(&got).zip(&want) {
        assert_eq!(name, &format!("logits.{}", task.name()));
        let err = common::rel_err(g, l);
        assert!(err <= 1e-4, "{name}: rel err {err}");
    }
}

#[test]
fn images_larger_than_the_input_are_evaluated_on_a_larger_canvas() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s1 = stage1(t, &["dinov2"]);
    let run = t.join("square");
    let cfg = t.join("square.toml");
    // 96x64 images, 64x64 training input: evaluation pads to 64x96 instead of failing.
    write_config_extra(&cfg, &run, &s1, 1, "distill_weight = 0.0");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("input_hw = [64, 96]", "input_hw = [64, 64]");
    std::fs::write(&cfg, text).unwrap();
    ok(&bin(&[
        "train",
        "--config",
        &cfg.to_string_lossy(),
        "--quiet",
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval-val.json")).unwrap()).unwrap();
    assert_eq!(r["images"], 2);
    assert!(r["semseg"]["miou"].as_f64().is_some());
}

#[test]
fn parameter_counts_match_the_reference() {
    // SPEC.md section 2: 3 teachers; B/PASCAL 133.5M (TAS 86.4M, TSAP 11.5M, routers 6.0M,
    // heads 29.5M); L/PASCAL 406.7M; L/NYUD 394.1M. Counted from the declared shapes.
    use distillery::models::multitask::{MultiTaskSpec, RouterKind};
    use distillery::models::student::{preset, StudentSpec, TeacherSlot};
    let count = |preset_name: &str, hw: (usize, usize), tasks: Vec<(Task, usize)>| {
        let slots = (0..3)
            .map(|i| TeacherSlot {
                name: format!("t{i}"),
                dim: 1024,
            })
            .collect();
        let mut student = StudentSpec::new(preset(preset_name).unwrap(), hw.0, slots).unwrap();
        student.input_hw = Some(hw);
        let spec = MultiTaskSpec {
            student,
            tasks,
            router: RouterKind::Mor,
        };
        let mut by = std::collections::BTreeMap::new();
        for (name, shape, _) in spec
            .student
            .parameters()
            .unwrap()
            .into_iter()
            .chain(spec.task_parameters())
        {
            if name.contains(".aligners.") {
                continue; // training-only
            }
            // The reference counts the per-level LayerNorms outside the adapter paths.
            let group = if name.contains(".norms.") {
                "norms".to_string()
            } else {
                name.split('.').next().unwrap().to_string()
            };
            *by.entry(group).or_insert(0usize) += shape.iter().product::<usize>();
        }
        let m = |k: &str| by[k] as f64 / 1e6;
        (m("stem"), m("tsap"), m("routers"), m("heads"), m("norms"))
    };
    let pascal = || {
        vec![
            (Task::Semseg, 21),
            (Task::Parts, 7),
            (Task::Saliency, 2),
            (Task::Normals, 3),
            (Task::Edge, 1),
        ]
    };
    let near = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= 0.05 + 1e-9,
            "{what}: {got:.3}M vs {want}M"
        );
    };
    let (tas, tsap, routers, heads, norms) = count("vit-b16", (512, 512), pascal());
    near(tas, 86.4, "B TAS");
    near(tsap, 11.5, "B TSAP");
    near(routers, 6.0, "B routers");
    near(heads, 29.5, "B heads");
    near(tas + tsap + routers + heads + norms, 133.5, "B/PASCAL");
    let (a, b, c, d, e) = count("vit-l16", (512, 512), pascal());
    near(a + b + c + d + e, 406.7, "L/PASCAL");
    let nyud = vec![
        (Task::Semseg, 40),
        (Task::Normals, 3),
        (Task::Edge, 1),
        (Task::Depth, 1),
    ];
    let (a, b, c, d, e) = count("vit-l16", (448, 576), nyud);
    near(a + b + c + d + e, 394.1, "L/NYUD");
}

/// SAK with a mobile student: `distill --student mobilevitv2_050` (one adapter per distilled
/// pyramid level, at the level's width and stride) resumes exactly with its BatchNorm
/// statistics, exports them, answers `features` per level and exports to ONNX, and stage 2
/// (routers and heads at the levels' widths) trains from it, resumes exactly, predicts and
/// exports.
#[test]
fn backbone_student_distils_and_trains_stage2() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let images = fx().join("pascal/JPEGImages");
    let distill = |out: &Path, extra: &[&str]| {
        let (dino, sam) = (s(&model_dir("dinov2")), s(&model_dir("sam")));
        let o = s(out);
        let args = [
            "distill",
            "--teacher",
            &dino,
            "--teacher",
            &sam,
            "--student",
            "mobilevitv2_050",
            "--images",
            &s(&images),
            "--out",
            &o,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--image-size",
            "48",
            "--checkpoint-every",
            "2",
            "--quiet",
        ];
        ok(&bin(&[&args[..], extra].concat()));
    };
    let losses = |run: &Path| common::loss_column(&run.join("metrics.jsonl"));
    let full = t.join("full");
    distill(&full, &[]);
    let part = t.join("part");
    distill(&part, &["--stop-after", "2"]);
    distill(&part, &["--resume"]);
    assert_eq!(losses(&full).len(), 4);
    assert_eq!(losses(&full), losses(&part));
    let spec = std::fs::read_to_string(full.join("student.json")).unwrap();
    assert!(spec.contains("\"backbone\": \"mobilevitv2_050\""), "{spec}");
    // the exported student carries BatchNorm statistics moved by training, equal after resume
    let load = |run: &Path| {
        candle_core::safetensors::load(run.join("student.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(&full), load(&part));
    let var = "stem.stages.1.0.conv3_1x1.bn.running_var";
    let ones = Tensor::ones_like(&a[var]).unwrap();
    assert!(common::max_abs_diff(&a[var], &ones) > 1e-4);
    for (name, t) in &a {
        assert!(common::max_abs_diff(t, &b[name]) == 0.0, "{name}");
    }
    // features per level at its own width: MobileViT-V2-050 levels 1-4 = 64/128/192/256
    let f = t.join("f.safetensors");
    let img = s(&images.join("2008_000001.jpg"));
    ok(&bin(&[
        "features",
        "--model",
        &s(&full),
        "--image",
        &img,
        "--out",
        &s(&f),
    ]));
    let f = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    for (k, c) in [64, 128, 192, 256].into_iter().enumerate() {
        for teacher in 0..2 {
            assert_eq!(
                f[&format!("teacher.{teacher}.level.{k}")].dim(1).unwrap(),
                c
            );
        }
        assert_eq!(f[&format!("stem.level.{k}")].dim(2).unwrap(), c);
    }
    assert_eq!(f[&"teacher.0.level.0".to_string()].dims(), &[1, 64, 12, 12]);
    // ONNX export (tract) gives what `features` computes, every output, at batch 2
    let onnx = t.join("student.onnx");
    ok(&bin(&["export", "--model", &s(&full), "--out", &s(&onnx)]));
    let student = distillery::train::stage1::load_student(&full).unwrap();
    let x = Tensor::rand(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
    let want = distillery::features::student_tensors(&student, &x).unwrap();
    let m = distillery::onnx::OnnxModel::load(&onnx, &[2, 3, 48, 48]).unwrap();
    let got = m.run(&x).unwrap();
    assert_eq!(got.len(), 12);
    for (name, g) in m.outputs().iter().zip(&got) {
        let err = common::rel_err(g, &want[name]);
        assert!(err <= 1e-4, "{name}: rel err {err}");
    }

    // stage 2 from the distilled student, interrupted and resumed
    let cfg = t.join("s2.toml");
    write_config_extra(&cfg, &t.join("s2"), &full, 4, "");
    ok(&bin(&["train", "--config", &s(&cfg), "--quiet"]));
    let cfg_b = t.join("s2b.toml");
    write_config_extra(&cfg_b, &t.join("s2b"), &full, 4, "");
    ok(&bin(&[
        "train",
        "--config",
        &s(&cfg_b),
        "--quiet",
        "--stop-after",
        "2",
    ]));
    ok(&bin(&[
        "train",
        "--config",
        &s(&cfg_b),
        "--quiet",
        "--resume",
    ]));
    assert_eq!(losses(&t.join("s2")), losses(&t.join("s2b")));
    let model = std::fs::read_to_string(t.join("s2/model.json")).unwrap();
    assert!(model.contains("mobilevitv2_050"), "{model}");
    let pred = t.join("pred");
    ok(&bin(&[
        "predict",
        "--run",
        &s(&t.join("s2")),
        "--images",
        &s(&images),
        "--out",
        &s(&pred),
    ]));
    assert!(pred.join("00000_2008_000001_semseg.png").is_file());
    check_onnx_export(&t.join("s2"), t);
}
