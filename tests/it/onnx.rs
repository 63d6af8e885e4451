//! ONNX export: each exported family run by tract (pure Rust ONNX runtime) agrees with the
//! candle forward on the same random pixels, at batch 1 and 3, for every output (pyramid,
//! pooled features, logits).

use crate::common;

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
        let x = common::pixels(&[batch, 3, hw.0, hw.1], batch as u64);
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

/// A transfer student stage folder for `source` (a fixture folder's weights), `task` with
/// `classes` classes, its task head at random init, written as the transfer pipeline does.
fn transfer_student(
    dir: &std::path::Path,
    source: &str,
    task: distillery::transfer::models::TransferTask,
    classes: usize,
) {
    use distillery::transfer::models as tm;
    let source = model_dir(source).to_string_lossy().to_string();
    let (arch, own) = tm::student_arch(&source, 64, task, classes, 16, &Device::Cpu).unwrap();
    let (params, buffers) =
        tm::student_params(&arch, own.as_ref(), false, vec![], 11, &Device::Cpu).unwrap();
    let rec = tm::StudentRecord {
        source,
        task,
        image_size: 64,
        classes: (0..classes).map(|i| format!("class, {i}")).collect(),
        decoder_width: 16,
    };
    std::fs::create_dir_all(dir).unwrap();
    tm::export_student(dir, &rec, &params, &buffers).unwrap();
}

/// Export a transfer student and compare the ONNX `logits` (tract) with the candle model's,
/// segmentation logits resized to the input as the tool's own predictions are; with the
/// preprocessing baked in the ONNX input is uint8 NHWC and candle gets the normalised pixels.
fn check_transfer_student(dir: &std::path::Path, hw: (usize, usize), baked: bool) {
    use distillery::transfer::models::{load_student, Predictor};
    let out = dir.join(if baked { "baked.onnx" } else { "plain.onnx" });
    let done = distillery::export::export(&distillery::export::ExportConfig {
        model: dir.to_string_lossy().to_string(),
        out: out.clone(),
        input_hw: Some(hw),
        include_preprocessing: baked,
        preprocessing: Vec::new(),
        load: LoadOptions::default(),
    })
    .unwrap();
    assert_eq!(done.input_hw, hw);
    let (rec, net) = load_student(dir, &LoadOptions::default()).unwrap();
    let p = net.net.preprocess().clone();
    for batch in [1usize, 3] {
        let img = Tensor::rand(0f32, 255.0, (batch, hw.0, hw.1, 3), &Device::Cpu)
            .unwrap()
            .floor()
            .unwrap();
        let nchw = img.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let per = |v: [f32; 3]| Tensor::new(&v, &Device::Cpu).unwrap().reshape((1, 3, 1, 1));
        let x = ((nchw * p.rescale as f64).unwrap())
            .broadcast_sub(&per(p.mean).unwrap())
            .unwrap()
            .broadcast_div(&per(p.std).unwrap())
            .unwrap();
        let mut want = net.logits(&x, false).unwrap();
        if want.rank() == 4 {
            want = distillery::interp::resize_bilinear(&want, hw).unwrap();
        }
        let model = if baked {
            OnnxModel::load(&out, &[batch, hw.0, hw.1, 3]).unwrap()
        } else {
            OnnxModel::load(&out, &[batch, 3, hw.0, hw.1]).unwrap()
        };
        let got = model.run(if baked { &img } else { &x }).unwrap();
        let i = model
            .outputs()
            .iter()
            .position(|n| n == "logits")
            .expect("a logits output");
        assert_eq!(got[i].dims()[1], rec.classes.len());
        let err = common::rel_err(&got[i], &want);
        assert!(
            err <= 1e-4,
            "{} batch {batch}: rel err {err}",
            out.display()
        );
    }
}

#[test]
fn transfer_students_export_with_their_task_heads() {
    use distillery::transfer::models::TransferTask;
    let tmp = tempfile::tempdir().unwrap();
    for (name, task, hw) in [
        ("timm-resnet-basic", TransferTask::Classify, (40, 36)),
        ("timm-mobilevitv2-050", TransferTask::Segment, (45, 38)),
        ("timm-fastvit-sa12", TransferTask::Segment, (64, 64)),
    ] {
        let dir = tmp.path().join(name);
        transfer_student(&dir, name, task, 4);
        check_transfer_student(&dir, hw, false);
        check_transfer_student(&dir, hw, true);
    }
    // the class names and the task travel in the metadata
    let bytes = std::fs::read(tmp.path().join("timm-mobilevitv2-050/plain.onnx")).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("segmentation") && text.contains("[\"class, 0\""));
}

/// A SAK student (two teachers, the first with output projections to its width as a
/// target-normalised student exports them) exported from its run folder: every output matches
/// what `distillery features` computes for the student, under the same names.
#[test]
fn sak_student_exports_its_teacher_features() {
    use distillery::models::student::{preset, StudentSpec, TeacherSlot};
    use distillery::train::engine::{vars_of, RunPaths};
    use distillery::train::stage1;
    let slots = vec![
        TeacherSlot {
            name: "a".into(),
            dim: 48,
        },
        TeacherSlot {
            name: "b".into(),
            dim: 96,
        },
    ];
    let spec = StudentSpec::new(preset("vit-n8").unwrap(), 32, slots).unwrap();
    let (vm, bm) = stage1::new_student_params(&spec, None, 3, &Device::Cpu).unwrap();
    let vars = vars_of(&vm).unwrap();
    // move every parameter off its init (adapters start near the identity)
    for v in vars.values() {
        let t = v.as_tensor();
        let noise = Tensor::randn(0f32, 0.2, t.shape(), &Device::Cpu).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    stage1::export_student(&RunPaths::new(&run), &spec, &vars, &bm, None).unwrap();
    // output projections for teacher 0 (what a target-normalised run exports)
    let wpath = run.join(stage1::STUDENT_WEIGHTS);
    let mut w = candle_core::safetensors::load(&wpath, &Device::Cpu).unwrap();
    let d = spec.vit().unwrap().dim;
    for k in 0..spec.levels.len() {
        let r = |s: &[usize]| Tensor::randn(0f32, 0.3, s, &Device::Cpu).unwrap();
        w.insert(format!("tsap.0.outputs.{k}.weight"), r(&[48, d]));
        w.insert(format!("tsap.0.outputs.{k}.bias"), r(&[48]));
    }
    candle_core::safetensors::save(&w, &wpath).unwrap();
    let out = tmp.path().join("sak.onnx");
    distillery::export::export(&distillery::export::ExportConfig {
        model: run.to_string_lossy().to_string(),
        out: out.clone(),
        input_hw: None,
        include_preprocessing: false,
        preprocessing: Vec::new(),
        load: LoadOptions::default(),
    })
    .unwrap();
    let student = stage1::load_student(&run).unwrap();
    for batch in [1usize, 3] {
        let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &Device::Cpu).unwrap();
        let want = distillery::features::student_tensors(&student, &x).unwrap();
        let model = OnnxModel::load(&out, &[batch, 3, 32, 32]).unwrap();
        let got = model.run(&x).unwrap();
        assert_eq!(got.len(), want.len());
        assert_eq!(got.len(), 3 * spec.levels.len());
        for (name, g) in model.outputs().iter().zip(&got) {
            let err = common::rel_err(g, &want[name]);
            assert!(err <= 1e-4, "batch {batch} {name}: rel err {err}");
        }
        assert_eq!(got[4].dims(), &[batch, 48, 4, 4]);
    }
}
