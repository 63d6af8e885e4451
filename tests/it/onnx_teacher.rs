//! A user's ONNX model as a teacher (`PATH.onnx:OUTPUT`): the fixture generator exported a tiny
//! random timm ViT with `torch.onnx.export` (outputs `features`, the last block's tokens, and
//! `pooled`) next to the same model as a timm folder. tract runs the file as torch does, the
//! file and its safetensors twin give the same distillation loss, and the verbs take it.

use crate::common;

use candle_core::{Device, Tensor};
use common::{model_dir, reference, rel_err};
use distillery::losses::FeatureLoss;
use distillery::models::onnx_teacher::OnnxEncoder;
use distillery::models::student::{preset, Student, StudentSpec};
use distillery::models::{FeatureRequest, LoadOptions, VisionEncoder};
use distillery::teacher::Teacher;
use distillery::train::stage1::{distill_loss, new_student_params, TeacherBatch};
use distillery::weights::Weights;
use std::path::Path;

fn onnx_file() -> String {
    model_dir("onnx-teacher")
        .join("teacher.onnx")
        .to_string_lossy()
        .to_string()
}

#[test]
fn onnx_teacher_runs_as_torch_and_as_its_safetensors_twin() {
    let r = reference("onnx-teacher");
    let x = &r["pixel_values"];
    let enc = OnnxEncoder::open(&format!("{}:features", onnx_file())).unwrap();
    let got = enc.forward_raw(x).unwrap();
    assert!(rel_err(&got, &r["features"]) <= 1e-4);
    // what it is: tokens with one class token on an 8-pixel grid, 32 wide, preprocessing from
    // the file's metadata
    let info = enc.info();
    assert_eq!((info.width, info.patch, info.prefix_tokens), (32, 8, 1));
    assert_eq!(info.preprocess.mean, [0.5; 3]);
    assert_eq!(info.input_hw, (32, 32));
    // the encoder view: hidden state 1 is the output; the twin's last block is the same map
    let out = enc
        .forward_features(x, &FeatureRequest::blocks(&[0]))
        .unwrap();
    let twin = distillery::models::load(
        &model_dir("onnx-teacher").to_string_lossy(),
        &LoadOptions::default(),
    )
    .unwrap();
    let t = twin
        .forward_features(x, &FeatureRequest::blocks(&[2]))
        .unwrap();
    let err = rel_err(&out.feature_map(1).unwrap(), &t.feature_map(3).unwrap());
    assert!(err <= 1e-4, "onnx vs safetensors twin: {err}");
    // the pooled output as an image embedding
    let emb =
        distillery::models::pooled::onnx_embedder(&format!("{}:pooled", onnx_file())).unwrap();
    assert_eq!(emb.dim, 32);
    assert!(rel_err(&emb.embed(x).unwrap(), &r["pooled"]) <= 1e-4);
}

#[test]
fn onnx_and_safetensors_teachers_give_the_same_distillation_loss() {
    let opts = LoadOptions::default();
    let onnx = Teacher::load(&format!("{}:features", onnx_file()), 32, 0, &opts).unwrap();
    let mut twin =
        Teacher::load(&model_dir("onnx-teacher").to_string_lossy(), 32, 0, &opts).unwrap();
    // the ONNX teacher gives one level (its output); the twin is read at the same block
    assert_eq!(onnx.levels, vec![0]);
    assert_eq!(onnx.name, "teacher");
    twin.levels = vec![2];
    assert_eq!(onnx.slot().dim, twin.slot().dim);
    let spec = StudentSpec::new(preset("vit-n8").unwrap(), 32, vec![onnx.slot()])
        .unwrap()
        .with_level_count(1)
        .unwrap();
    let (vars, _) = new_student_params(&spec, None, 5, &Device::Cpu).unwrap();
    let student = Student::build(
        &spec,
        &Weights::from_vars(&vars, Path::new("init")).unwrap(),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let batch = TeacherBatch::Pixels(vec![x.clone()]);
    for kind in [FeatureLoss::CosSmoothL1, FeatureLoss::Mse] {
        let (a, _, _) = distill_loss(
            &student,
            std::slice::from_ref(&onnx),
            &x,
            &batch,
            kind,
            None,
        )
        .unwrap();
        let (b, _, _) = distill_loss(
            &student,
            std::slice::from_ref(&twin),
            &x,
            &batch,
            kind,
            None,
        )
        .unwrap();
        let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!(
            a > 0.0 && (a - b).abs() <= 1e-5 * b.abs(),
            "{kind:?}: {a} vs {b}"
        );
    }
}

#[test]
fn verbs_take_an_onnx_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..4u32 {
        image::RgbImage::from_fn(40 + i, 36, |x, y| {
            image::Rgb([(x * 5 + i) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
        })
        .save(images.join(format!("im{i}.png")))
        .unwrap();
    }
    let run = tmp.path().join("run");
    let o = common::bin(&[
        "distill",
        "--teacher",
        &format!("{}:features", onnx_file()),
        "--student",
        "vit-n8",
        "--images",
        &images.to_string_lossy(),
        "--out",
        &run.to_string_lossy(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("student.json")).unwrap()).unwrap();
    // one teacher level: the six-block student distils its last block
    assert_eq!(spec["levels"], serde_json::json!([5]));
    assert_eq!(spec["teachers"][0]["name"], "teacher");
    // features writes the output under its own name
    let out = tmp.path().join("f.safetensors");
    let r = model_dir("onnx-teacher");
    let px = tmp.path().join("px.safetensors");
    let refs = reference("onnx-teacher");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "pixel_values".to_string(),
            refs["pixel_values"].clone(),
        )]),
        &px,
    )
    .unwrap();
    let o = common::bin(&[
        "features",
        "--model",
        &format!("{}:features", r.join("teacher.onnx").to_string_lossy()),
        "--pixels",
        &px.to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(rel_err(&f["features"], &refs["features"]) <= 1e-4);
}

#[test]
fn bad_onnx_teachers_are_named() {
    // several outputs and none named: the outputs are listed
    let e = OnnxEncoder::open(&onnx_file()).err().unwrap().to_string();
    assert!(
        e.contains("features, pooled") && e.contains("teacher.onnx"),
        "{e}"
    );
    let e = OnnxEncoder::open(&format!("{}:nope", onnx_file()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no output named \"nope\"") && e.contains("features, pooled"),
        "{e}"
    );
    // an operator tract does not implement: the node and the operator are named
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("odd.onnx");
    let mut g = distillery::onnx::Graph::new("x", 3, (8, 8));
    let y = g.node("FrobnicateImage", &["x"], vec![]);
    g.output("y", &y, 4);
    g.save(&path, "odd", &[]).unwrap();
    let e = OnnxEncoder::open(&format!("{}:y", path.display()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("odd.onnx") && e.contains("FrobnicateImage") && e.contains("node"),
        "{e}"
    );
    // a missing file
    let e = OnnxEncoder::open("/no/such/teacher.onnx:features")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such ONNX file"), "{e}");
}

/// A user's ONNX model gets its preprocessing written into a copy's metadata by `export
/// --mean/--std/--rescale/--size`; the copy opens as a teacher with it and computes the same.
#[test]
fn export_stamps_preprocessing_into_a_users_onnx_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stamped.onnx");
    let o = common::bin(&[
        "export",
        "--model",
        &onnx_file(),
        "--out",
        &out.to_string_lossy(),
        "--mean",
        "0.1,0.2,0.3",
        "--std",
        "0.5, 0.6, 0.7",
        "--rescale",
        "0.5",
        "--size",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let enc = OnnxEncoder::open(&format!("{}:features", out.display())).unwrap();
    let p = &enc.info().preprocess;
    assert_eq!(
        (p.mean, p.std, p.rescale),
        ([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], 0.5)
    );
    let r = reference("onnx-teacher");
    assert!(
        rel_err(
            &enc.forward_raw(&r["pixel_values"]).unwrap(),
            &r["features"]
        ) <= 1e-4
    );
    // the flags describe a user's model only; a user's model needs them
    let o = common::bin(&[
        "export",
        "--model",
        "resnet18",
        "--out",
        &tmp.path().join("r.onnx").to_string_lossy(),
        "--mean",
        "0.1,0.2,0.3",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("user's ONNX model"));
    let o = common::bin(&[
        "export",
        "--model",
        &onnx_file(),
        "--out",
        &tmp.path().join("x.onnx").to_string_lossy(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--mean/--std"));
    assert!(!tmp.path().join("x.onnx").exists());
}
