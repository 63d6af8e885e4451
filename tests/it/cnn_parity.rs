//! CNN students against timm: tiny random ResNets (basic blocks and bottlenecks) and
//! MobileViT-V2s (every weight, norm affine and BatchNorm statistic random) loaded from timm
//! hub folders. Eval mode: every
//! `forward_intermediates` map, `pre_logits` and `logits`; train mode, one step: logits with
//! batch statistics, the moved running statistics and gradients of mean(logits^2).

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{model_dir, reference, rel_err};
use distillery::kernels::FusedGradients;
use distillery::models::backbone;
use distillery::models::LoadOptions;
use distillery::train::engine::{init_params, vars_of};
use distillery::weights::Weights;
use std::collections::HashMap;
use std::path::Path;

const TOL: f32 = 1e-4;

/// Checks a timm CNN fixture: `levels` pyramid maps and `refs` training references (moved
/// running statistics and gradients) read from its reference file.
fn check(name: &str, levels: usize, refs: usize) {
    let dir = model_dir(name);
    let r = reference(name);
    let dev = common::test_device();
    let opts = LoadOptions {
        device: dev.clone(),
        ..LoadOptions::default()
    };
    let (_, net) = backbone::load(&dir.to_string_lossy(), &opts)
        .unwrap()
        .expect("a registered CNN family");
    // eval
    let x = &r["pixel_values"].to_device(&dev).unwrap();
    let maps = net.forward_intermediates(x, false).unwrap();
    assert_eq!(maps.len(), levels, "{name}");
    for (i, (m, f)) in maps.iter().zip(net.feature_info()).enumerate() {
        let want = &r[&format!("stages.{i}")];
        assert_eq!(m.dims()[1], f.channels, "{name} level {i} width");
        let e = rel_err(m, want);
        assert!(e < TOL, "{name} stages.{i}: rel err {e}");
    }
    let pooled = net.pool(&maps[levels - 1], false).unwrap();
    assert!(
        rel_err(&pooled, &r["pre_logits"]) < TOL,
        "{name} pre_logits"
    );
    let logits = net.classify(&pooled).unwrap().expect("classifier");
    let e = rel_err(&logits, &r["logits"]);
    assert!(e < TOL, "{name} logits: {e}");

    // one training step, with candle's backward and with the fused training nodes
    for fused in [false, true] {
        train_step(name, refs, fused);
    }
}

/// One training step from the checkpoint of fixture `name`, over a parameter store and a
/// buffer store: train-mode logits, the moved running statistics and the gradients against the
/// reference; `fused` runs it with a [`FusedGradients`] alive (the CPU's fused training nodes).
fn train_step(name: &str, refs: usize, fused: bool) {
    let dir = model_dir(name);
    let r = reference(name);
    let dev = common::test_device();
    let (spec, _) = backbone::load(
        &dir.to_string_lossy(),
        &LoadOptions {
            device: dev.clone(),
            ..LoadOptions::default()
        },
    )
    .unwrap()
    .expect("a registered CNN family");
    let file: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    // Every parameter and buffer comes from the checkpoint (nothing is drawn).
    let store = |list: Vec<(String, Vec<usize>, distillery::models::student::Init)>| {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        init_params(list, file.clone(), &mut rng, &dev, &dir).unwrap()
    };
    let params = store(spec.parameters());
    let buffers = store(spec.buffers());
    let net = spec
        .build(
            &Weights::from_vars(&params, Path::new("p")).unwrap(),
            &Weights::from_vars(&buffers, Path::new("b")).unwrap(),
        )
        .unwrap();
    let xt = &r["train.pixel_values"].to_device(&dev).unwrap();
    let guard = fused.then(FusedGradients::enable);
    let last = net.forward_intermediates(xt, true).unwrap().pop().unwrap();
    let y = net
        .classify(&net.pool(&last, true).unwrap())
        .unwrap()
        .unwrap();
    let e = rel_err(&y, &r["train.logits"]);
    assert!(e < TOL, "{name} train logits (fused {fused}): {e}");
    let loss = y.sqr().unwrap().mean_all().unwrap();
    let grads = distillery::kernels::backward_with(guard.as_ref(), &loss).unwrap();
    let pv = vars_of(&params).unwrap();
    let bv = vars_of(&buffers).unwrap();
    let mut checked = 0;
    for (k, want) in &r {
        if let Some(p) = k.strip_prefix("grad.") {
            let g = grads.get(pv[p].as_tensor()).expect("gradient");
            let e = rel_err(g, want);
            assert!(e < TOL, "{name} {k} (fused {fused}): rel err {e}");
            checked += 1;
        } else if let Some(b) = k.strip_prefix("train.").filter(|b| b.contains("running")) {
            let e = rel_err(bv[b].as_tensor(), want);
            assert!(e < TOL, "{name} {k} (fused {fused}): rel err {e}");
            checked += 1;
        }
    }
    assert_eq!(checked, refs, "{name}: references checked");
    assert_eq!(y.dtype(), DType::F32);
}

#[test]
fn resnet_basic_blocks_match_timm() {
    check("timm-resnet-basic", 5, 13);
}

#[test]
fn resnet_bottlenecks_match_timm() {
    check("timm-resnet-bottleneck", 5, 13);
}

/// MobileViT-V2 (0.5x and 0.75x at width factor 0.25): inverted residuals, linear attention,
/// GroupNorm, patch unfold/fold and the resize of odd-sided maps; 4 BatchNorms' running
/// statistics and weight gradients, 9 other parameters' gradients and the classifier's.
#[test]
fn mobilevitv2_matches_timm() {
    check("timm-mobilevitv2-050", 5, 4 * 3 + 10);
    check("timm-mobilevitv2-075", 5, 4 * 3 + 10);
}

/// FastViT in its training form (sa12-style with position encoding and attention; t8-style
/// RepMixer only): 4 BatchNorms' statistics and weight gradients, the listed parameters' and the
/// classifier's gradients.
#[test]
fn fastvit_training_form_matches_timm() {
    check("timm-fastvit-sa12", 4, 4 * 3 + 10);
    check("timm-fastvit-t8", 4, 4 * 3 + 8);
}

/// Reparameterization: timm's folded checkpoint loads and matches timm's folded outputs; our
/// folding of the training form gives timm's folded tensors, and a model built from them
/// matches the training form in evaluation; folding twice is an error.
#[test]
fn fastvit_reparameterizes_like_timm() {
    use distillery::models::fastvit;
    for name in ["timm-fastvit-sa12", "timm-fastvit-t8"] {
        let fused_name = format!("{name}-fused");
        let r = reference(&fused_name);
        let x = &r["pixel_values"];
        let logits = |dir: &Path| {
            let (spec, net) = backbone::load(&dir.to_string_lossy(), &LoadOptions::default())
                .unwrap()
                .unwrap();
            let maps = net.forward_intermediates(x, false).unwrap();
            let y = net
                .classify(&net.pool(maps.last().unwrap(), false).unwrap())
                .unwrap()
                .unwrap();
            (spec.arch_name(), maps, y)
        };
        let (arch, maps, y) = logits(&model_dir(&fused_name));
        assert!(arch.contains("reparameterized"), "{arch}");
        for (i, m) in maps.iter().enumerate() {
            let e = rel_err(m, &r[&format!("stages.{i}")]);
            assert!(e < TOL, "{fused_name} stages.{i}: {e}");
        }
        let e = rel_err(&y, &r["logits"]);
        assert!(e < TOL, "{fused_name} logits: {e}");

        // our folding of the training form
        let dir = model_dir(name);
        let cfg = distillery::config::Cfg::read(&dir.join("config.json")).unwrap();
        let file: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let w = Weights::from_tensors(file.clone(), &dir).unwrap();
        let spec = fastvit::spec_of_config(&cfg, &w).unwrap().unwrap();
        let (fspec, folded) = fastvit::reparameterize(&spec, &file).unwrap();
        let timm_folded: HashMap<String, Tensor> = candle_core::safetensors::load(
            model_dir(&fused_name).join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for (k, v) in &folded {
            let e = rel_err(v, &timm_folded[k]);
            assert!(e < TOL, "{name} folded {k}: {e}");
        }
        let fw = Weights::from_tensors(folded.clone(), &dir).unwrap();
        let net = backbone::BackboneSpec::build(&fspec, &fw, &fw).unwrap();
        let maps = net.forward_intermediates(x, false).unwrap();
        let y2 = net
            .classify(&net.pool(maps.last().unwrap(), false).unwrap())
            .unwrap()
            .unwrap();
        let e = rel_err(&y2, &r["logits"]);
        assert!(e < TOL, "{name} our folded logits: {e}");
        let again = fastvit::reparameterize(&fspec, &folded)
            .err()
            .unwrap()
            .to_string();
        assert!(again.contains("already reparameterized"), "{again}");
    }
}

#[test]
fn a_wrong_width_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir("timm-resnet-basic");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replacen("\"channels\": [\n      8,", "\"channels\": [\n      12,", 1);
    assert!(cfg.contains("12,"), "edited config");
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let e = backbone::load(&tmp.path().to_string_lossy(), &LoadOptions::default())
        .err()
        .expect("shape error")
        .to_string();
    assert!(e.contains("layer1.0.conv1.weight"), "{e}");

    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace(
            "\"architecture\": \"resnet18\"",
            "\"architecture\": \"resnet26d\"",
        );
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    let e = backbone::load(&tmp.path().to_string_lossy(), &LoadOptions::default())
        .err()
        .expect("unknown architecture")
        .to_string();
    assert!(e.contains("resnet26d") && e.contains("resnet50"), "{e}");
}

/// `features --model <timm folder>` writes timm's outputs under timm's names.
#[test]
fn features_verb_writes_timm_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let name = "timm-resnet-bottleneck";
    let refs = common::fixtures()
        .join("refs")
        .join(format!("{name}.safetensors"));
    let o = common::bin(&[
        "features".as_ref(),
        "--model".as_ref(),
        model_dir(name).as_os_str(),
        "--pixels".as_ref(),
        refs.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    common::ok(&o);
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let r = reference(name);
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "logits",
            "pre_logits",
            "stages.0",
            "stages.1",
            "stages.2",
            "stages.3",
            "stages.4"
        ]
    );
    for (k, t) in &got {
        let e = rel_err(t, &r[k]);
        assert!(e < TOL, "{k}: rel err {e}");
    }
    let o = common::bin(&[
        "info".as_ref(),
        "--model".as_ref(),
        model_dir(name).as_os_str(),
    ]);
    common::ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    // timm counts 20,567 parameters for this model (layers 1-2-1-1, widths 4-8-8-12, 7 classes)
    assert!(text.contains("parameters: 20567 "), "{text}");
    assert!(text.contains("48@/32"), "{text}");
}

/// `bench --model` times a registered student at random init or a model folder; an unknown name
/// lists the known ones.
#[test]
fn bench_times_any_model() {
    let tiny = model_dir("timm-resnet-basic");
    for m in ["resnet18".as_ref(), tiny.as_os_str()] {
        let o = common::bin(&[
            "bench".as_ref(),
            "--model".as_ref(),
            m,
            "--batch".as_ref(),
            "1".as_ref(),
            "--image".as_ref(),
            "32".as_ref(),
            "--iters".as_ref(),
            "1".as_ref(),
            "--json".as_ref(),
        ]);
        common::ok(&o);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["median_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    let o = common::bin(&["bench", "--model", "resnet9000"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("resnet50") && e.contains("vit-s16"), "{e}");
}

/// `info` reports MACs at the model's default input size as torch counts them
/// (`torch.utils.flop_counter.FlopCounterMode` total / 2, torch 2.15, timm 1.0.31, batch 1,
/// with the checkpoint's classifier), for every family and for a registered name at random init.
#[test]
fn info_reports_macs_as_torch_counts_them() {
    for (name, hw, want) in [
        ("timm-mobilevitv2-050", "256x256", 33_313_152u64),
        ("timm-mobilevitv2-075", "256x256", 80_562_560),
        ("timm-resnet-bottleneck", "224x224", 125_795_488),
        ("timm-resnet-basic", "224x224", 143_315_360),
        ("timm-fastvit-sa12", "256x256", 17_621_824),
        ("timm-fastvit-t8", "256x256", 19_511_680),
        ("timm-fastvit-sa12-fused", "256x256", 16_894_784),
    ] {
        let o = common::bin(&[
            "info".as_ref(),
            "--model".as_ref(),
            model_dir(name).as_os_str(),
        ]);
        common::ok(&o);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(&format!("MACs at {hw}: ")), "{name}: {text}");
        assert!(text.contains(&format!("({want})")), "{name}: {text}");
    }
    // mobilevitv2_100 without a classifier: torch counts 1,812,090,880 with the 1000-way head,
    // whose 512 x 1000 MACs are left out here
    let o = common::bin(&["info", "--model", "mobilevitv2_100"]);
    common::ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("(1811578880)"), "{text}");
    assert!(
        text.contains("64@/2 128@/4 256@/8 384@/16 512@/32"),
        "{text}"
    );
}

/// `bench --task train-step` runs a training step of a registered student.
#[test]
fn bench_times_a_training_step() {
    let o = common::bin(&[
        "bench",
        "--task",
        "train-step",
        "--model",
        "mobilevitv2_050",
        "--batch",
        "2",
        "--image",
        "64",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    common::ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["median_s"].as_f64().unwrap() > 0.0, "{v}");
    let o = common::bin(&["bench", "--task", "train-step"]);
    assert!(!o.status.success());
}

/// `bench --task stage1-step --student NAME` times a SAK step with a mobile student, phase by
/// phase; an unknown student lists the known ones.
#[test]
fn bench_times_a_sak_step_with_a_mobile_student() {
    let o = common::bin(&[
        "bench",
        "--task",
        "stage1-step",
        "--student",
        "mobilevitv2_050",
        "--teachers",
        "1",
        "--batch",
        "1",
        "--image",
        "32",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
    ]);
    common::ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["student"], "mobilevitv2_050", "{v}");
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 5, "{v}");
    let o = common::bin(&["bench", "--task", "stage1-step", "--student", "mobilevit9"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("mobilevit9") && e.contains("mobilevitv2_100"),
        "{e}"
    );
}

/// `reparameterize` writes a folded timm folder that loads by itself and gives timm's folded
/// outputs; folding it again, or folding a model that is not a FastViT, fails with a message.
#[test]
fn reparameterize_verb_writes_a_loadable_folded_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("folded");
    let o = common::bin(&[
        "reparameterize".as_ref(),
        "--model".as_ref(),
        model_dir("timm-fastvit-sa12").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    common::ok(&o);
    let r = reference("timm-fastvit-sa12-fused");
    let (spec, net) = backbone::load(&out.to_string_lossy(), &LoadOptions::default())
        .unwrap()
        .unwrap();
    assert!(spec.arch_name().contains("reparameterized"));
    let maps = net
        .forward_intermediates(&r["pixel_values"], false)
        .unwrap();
    let y = net
        .classify(&net.pool(maps.last().unwrap(), false).unwrap())
        .unwrap()
        .unwrap();
    let e = rel_err(&y, &r["logits"]);
    assert!(e < TOL, "folded logits: {e}");
    for (src, want) in [
        (out.clone(), "already reparameterized"),
        (model_dir("timm-resnet-basic"), "not a FastViT"),
    ] {
        let o = common::bin(&[
            "reparameterize".as_ref(),
            "--model".as_ref(),
            src.as_os_str(),
            "--out".as_ref(),
            tmp.path().join("again").as_os_str(),
        ]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{e}");
    }
}
