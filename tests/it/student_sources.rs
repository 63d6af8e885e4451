//! Students initialised from ViT checkpoints whose architecture is not the presets': an MLP
//! that is not 4x the width (transformers naming: 44 wide, MLP 96, no qkv bias; timm naming:
//! MLP ratio 3, no qkv bias, layer scale, 2 register tokens, a position table without prefix
//! rows). The stem must reproduce the reference implementation's block outputs, and a run must
//! train, resume, export and load back in `features` and stage 2 with every field kept.

use crate::common;
use common::{bin, ok};

use common::{fixtures, model_dir, reference, rel_err};
use distillery::models::student::{Student, StudentSpec, TeacherSlot};
use distillery::train::stage1::{new_student_params, StemSource};
use std::path::Path;

/// The stem built from `source` gives the reference's block outputs (patch tokens) at the
/// distilled levels.
fn stem_matches_reference(source: &str) {
    let src = StemSource::open(&model_dir(source).to_string_lossy(), 32).unwrap();
    let slot = TeacherSlot {
        name: "t".into(),
        dim: 16,
    };
    let spec = StudentSpec::new(src.stem.clone(), 32, vec![slot]).unwrap();
    let (vm, _) = new_student_params(&spec, Some(&src), 0, &candle_core::Device::Cpu).unwrap();
    let student = Student::build(
        &spec,
        &distillery::weights::Weights::from_vars(&vm, Path::new("test")).unwrap(),
    )
    .unwrap();
    let r = reference(&format!("{source}-native"));
    let out = student.forward(&r["pixel_values"], false, false).unwrap();
    let prefix = spec.vit().unwrap().prefix_tokens();
    for (k, &b) in spec.levels.iter().enumerate() {
        let want = &r[&format!("hidden_states.{}", b + 1)];
        let n = want.dim(1).unwrap();
        let want = want.narrow(1, prefix, n - prefix).unwrap();
        let e = rel_err(&out.stem[k], &want);
        assert!(e < 1e-4, "{source}: block {b}: rel err {e}");
    }
}

#[test]
fn transformers_vit_with_mlp_96_is_read_whole() {
    let src = StemSource::open(&model_dir("vit-mlp96").to_string_lossy(), 32).unwrap();
    let a = src.stem.vit().unwrap();
    assert_eq!((a.dim, a.depth, a.heads, a.patch), (44, 4, 4, 8));
    assert_eq!(a.mlp_hidden, 96);
    assert!(!a.qkv_bias);
    assert_eq!(a.eps, 1e-6);
    assert!(a.class_token && a.registers == 0 && a.pos_prefix == 1 && !a.layer_scale);
    stem_matches_reference("vit-mlp96");
}

#[test]
fn timm_vit_with_registers_and_layer_scale_is_read_whole() {
    let src = StemSource::open(&model_dir("timm-vit-reg").to_string_lossy(), 32).unwrap();
    let a = src.stem.vit().unwrap();
    assert_eq!((a.dim, a.depth, a.heads, a.patch), (32, 4, 2, 8));
    assert_eq!(a.mlp_hidden, 96);
    assert!(!a.qkv_bias);
    assert!(a.class_token && a.layer_scale);
    assert_eq!((a.registers, a.pos_prefix), (2, 0));
    stem_matches_reference("timm-vit-reg");
}

#[test]
fn a_non_vit_cannot_be_a_student_and_says_why() {
    let sam = model_dir("sam");
    let e = StemSource::open(&sam.to_string_lossy(), 32)
        .err()
        .expect("SAM is not a plain ViT")
        .to_string();
    assert!(e.contains(&*sam.to_string_lossy()), "{e}");
    assert!(
        e.contains("neither a plain ViT nor a registered backbone"),
        "{e}"
    );
}

/// timm folders of registered families at widths of their own (the test fixtures: ResNet-18
/// with channels 8-32, MobileViT-V2 at width factor 0.25, FastViT-T8 with other depths) are
/// stems as their config's `model_args` describe them: the student's stem gives timm's
/// feature maps, and a folder whose tensors disagree with its config names the tensor.
#[test]
fn timm_folders_of_custom_widths_are_stems() {
    use distillery::models::student::StemArch;
    for source in [
        "timm-resnet-basic",
        "timm-mobilevitv2-050",
        "timm-fastvit-t8",
    ] {
        let src = StemSource::open(&model_dir(source).to_string_lossy(), 32).unwrap();
        let StemArch::Backbone(net) = &src.stem else {
            panic!("{source}: not a backbone stem")
        };
        assert!(net.model_args.is_some(), "{source}");
        assert!(net.describe().contains("custom widths"), "{source}");
        let slot = TeacherSlot {
            name: "t".into(),
            dim: 16,
        };
        let spec = StudentSpec::new(src.stem.clone(), 32, vec![slot])
            .unwrap()
            .with_level_count(net.pyramid.len())
            .unwrap();
        // student.json round trip: the spec rebuilds from what is saved
        let json = serde_json::to_string(&spec).unwrap();
        let spec: StudentSpec = serde_json::from_str(&json).unwrap();
        let (vm, bm) = new_student_params(&spec, Some(&src), 0, &candle_core::Device::Cpu).unwrap();
        let w = |vm: &candle_nn::VarMap| {
            distillery::weights::Weights::from_vars(vm, Path::new("test")).unwrap()
        };
        let student = Student::build_with_state(&spec, &w(&vm), &w(&bm)).unwrap();
        let r = reference(source);
        let got = student
            .as_backbone()
            .forward_intermediates(&r["pixel_values"], false)
            .unwrap();
        assert_eq!(got.len(), net.pyramid.len(), "{source}");
        for (i, g) in got.iter().enumerate() {
            let e = rel_err(g, &r[&format!("stages.{i}")]);
            assert!(e < 1e-4, "{source} stages.{i}: rel err {e}");
        }
    }
    // tensors that disagree with the config: the one is named
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir("timm-resnet-basic");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replacen("\"channels\": [\n      8,", "\"channels\": [\n      12,", 1);
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let e = StemSource::open(&tmp.path().to_string_lossy(), 32)
        .err()
        .expect("shape error")
        .to_string();
    assert!(e.contains("layer1.0.conv1.weight"), "{e}");
}

/// A ViT stem's student.json keeps every architecture field of its checkpoint.
fn vit_fields(mlp_hidden: usize) -> impl Fn(&serde_json::Value) {
    move |spec| {
        assert_eq!(spec["mlp_hidden"], mlp_hidden, "{spec}");
        assert_eq!(spec["qkv_bias"], false, "{spec}");
        for key in [
            "eps",
            "act",
            "class_token",
            "registers",
            "pos_prefix",
            "layer_scale",
        ] {
            assert!(spec.get(key).is_some(), "student.json lacks {key}: {spec}");
        }
    }
}

/// distill (interrupted and resumed) -> student.json with every field -> features -> stage 2.
fn run_through(source: &str, check: impl Fn(&serde_json::Value)) {
    let tmp = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let run = tmp.path().join("run");
    let images = fixtures().join("dense/pascal/JPEGImages");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "distill",
            "--teacher",
            &s(&model_dir("dinov2")),
            "--teacher",
            &s(&model_dir("clip")),
            "--student",
            &s(&model_dir(source)),
            "--images",
            &s(&images),
            "--out",
            &s(&run),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a = args(&["--stop-after", "2"]);
    ok(&bin(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let a = args(&["--resume"]);
    ok(&bin(&a.iter().map(String::as_str).collect::<Vec<_>>()));

    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("student.json")).unwrap()).unwrap();
    check(&spec);

    let feats = tmp.path().join("f.safetensors");
    ok(&bin(&[
        "features",
        "--model",
        &s(&run),
        "--image",
        &s(&images.join("2008_000001.jpg")),
        "--out",
        &s(&feats),
    ]));
    assert!(feats.is_file());

    // `input_size`: the older name of `input_hw`, still read
    let cfg = tmp.path().join("s2.toml");
    std::fs::write(
        &cfg,
        format!(
            "out = \"{}\"\ndataset = \"pascal-context\"\ndata_root = \"{}\"\ninit = \"{}\"\n\
             input_size = [32, 48]\nbatch_size = 2\nsteps = 1\nedge_thresholds = 3\n",
            s(&tmp.path().join("s2")),
            s(&fixtures().join("dense/pascal")),
            s(&run)
        ),
    )
    .unwrap();
    ok(&bin(&["train", "--config", &s(&cfg), "--quiet"]));
    assert!(tmp.path().join("s2/model.safetensors").is_file());
}

#[test]
fn transformers_student_trains_resumes_exports_and_loads_back() {
    run_through("vit-mlp96", vit_fields(96));
}

#[test]
fn timm_student_trains_resumes_exports_and_loads_back() {
    run_through("timm-vit-reg", vit_fields(96));
}

#[test]
fn timm_backbone_student_of_custom_widths_trains_resumes_exports_and_loads_back() {
    run_through("timm-mobilevitv2-050", |spec| {
        assert_eq!(spec["backbone"], "mobilevitv2_050", "{spec}");
        assert_eq!(spec["model_args"]["width_factor"], 0.25, "{spec}");
    });
}

/// A timm folder of a registered backbone at its published widths (as `timm/mobilevitv2_050`
/// ships) initialises the stem: every stem parameter and BatchNorm statistic is the folder's,
/// the classifier is left out, and the input normalisation is the folder's.
#[test]
fn timm_backbone_folder_initialises_a_mobile_student() {
    use candle_core::{Device, Tensor};
    use distillery::models::backbone;
    use distillery::train::engine;
    let spec = backbone::spec_at_default("mobilevitv2_050")
        .unwrap()
        .with_classes(1000)
        .unwrap();
    let (params, buffers, _) =
        engine::random_backbone(spec.as_ref(), 7, &Device::Cpu, candle_core::DType::F32).unwrap();
    // every value off its initialiser (BatchNorm statistics included)
    let mut tensors = std::collections::HashMap::new();
    for vm in [&params, &buffers] {
        for (name, v) in engine::vars_of(vm).unwrap() {
            let t = v.as_tensor();
            let r = Tensor::randn(0f32, 0.2, t.shape(), &Device::Cpu).unwrap();
            let t = if name.ends_with("running_var") {
                (r.abs().unwrap() + 0.5).unwrap()
            } else {
                (t + r).unwrap()
            };
            tensors.insert(name, t);
        }
    }
    assert!(tensors.contains_key("head.fc.weight"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mobilevitv2_050.cvnets_in1k");
    std::fs::create_dir_all(&dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    // the fixture's config with the published width factor (1.0: the 050 multiplier is in the name)
    let cfg = std::fs::read_to_string(model_dir("timm-mobilevitv2-050").join("config.json"))
        .unwrap()
        .replace("\"width_factor\": 0.25", "\"width_factor\": 1.0")
        .replace("\"num_classes\": 6", "\"num_classes\": 1000");
    std::fs::write(dir.join("config.json"), cfg).unwrap();

    let (stem, norm, src) =
        distillery::train::stage1::student_stem(&dir.to_string_lossy(), 64).unwrap();
    assert_eq!(norm, ([0.0; 3], [1.0; 3]));
    let slot = TeacherSlot {
        name: "t".into(),
        dim: 16,
    };
    let spec = StudentSpec::new(stem, 64, vec![slot])
        .unwrap()
        .with_norm(norm.0, norm.1);
    let (vm, bm) = new_student_params(&spec, src.as_ref(), 0, &Device::Cpu).unwrap();
    let (vars, bufs) = (engine::vars_of(&vm).unwrap(), engine::vars_of(&bm).unwrap());
    let mut checked = 0;
    for (name, want) in &tensors {
        let key = format!("stem.{name}");
        let got = vars.get(&key).or_else(|| bufs.get(&key));
        match got {
            Some(v) => {
                assert_eq!(common::max_abs_diff(v.as_tensor(), want), 0.0, "{name}");
                checked += 1;
            }
            None => assert!(name.starts_with("head."), "{name} not in the student"),
        }
    }
    assert_eq!(checked, tensors.len() - 2, "all but the classifier");
    assert!(bufs.keys().any(|k| k.ends_with("running_mean")));
}
