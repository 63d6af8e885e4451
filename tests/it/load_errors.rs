//! Every load path of a training run names the file the user gave and what in it is wrong:
//! a tensor with the wrong shape, a tensor under the wrong name, and a truncated file, for the
//! teacher, the student source, the run checkpoint (`--resume`) and the teacher cache; and
//! recipe errors name the line and the key.

use crate::common;
use common::bin as run;

use candle_core::{Device, Tensor};
use common::{fixtures, model_dir};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// Expect failure with one `error:` line; return it.
fn fails(args: &[String]) -> String {
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

fn copy_model(name: &str, dst: &Path) -> PathBuf {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(model_dir(name)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst.to_path_buf()
}

fn edit_tensors(p: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let bytes = fs::read(p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let header_meta = meta.metadata().clone();
    let mut t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    f(&mut t);
    let t: Vec<(String, Tensor)> = t.into_iter().collect();
    safetensors::serialize_to_file(t.iter().map(|(n, t)| (n.as_str(), t)), header_meta, p).unwrap();
}

fn rename(t: &mut HashMap<String, Tensor>, from: &str, to: &str) {
    let v = t.remove(from).unwrap_or_else(|| panic!("no {from}"));
    t.insert(to.into(), v);
}

fn reshape_last_row_off(t: &mut HashMap<String, Tensor>, name: &str) {
    let v = t.remove(name).unwrap_or_else(|| panic!("no {name}"));
    let n = v.dim(0).unwrap();
    t.insert(name.into(), v.narrow(0, 0, n - 1).unwrap());
}

fn truncate(p: &Path) {
    let b = fs::read(p).unwrap();
    fs::write(p, &b[..b.len() * 2 / 3]).unwrap();
}

fn distill_args(teacher: &Path, student: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "distill",
        "--teacher",
        &s(teacher),
        "--student",
        &s(student),
        "--images",
        &s(&fixtures().join("dense/pascal/JPEGImages")),
        "--out",
        &s(out),
        "--steps",
        "2",
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
}

#[test]
fn teacher_and_student_source_errors_name_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // (role, fixture, a tensor of it, is the teacher)
    for (role, fixture, tensor) in [
        ("teacher", "dinov2", "embeddings.cls_token"),
        ("teacher", "dinov2", "encoder.layer.1.mlp.fc1.weight"),
        (
            "student",
            "vit-mlp96",
            "encoder.layer.2.intermediate.dense.weight",
        ),
        ("student", "timm-vit-reg", "blocks.3.mlp.fc1.weight"),
    ] {
        for case in ["shape", "name", "truncated"] {
            let dir = copy_model(fixture, &t.join(format!("{role}-{fixture}-{case}")));
            let weights = dir.join("model.safetensors");
            match case {
                "shape" => edit_tensors(&weights, |m| reshape_last_row_off(m, tensor)),
                "name" => edit_tensors(&weights, |m| rename(m, tensor, "renamed.weight")),
                _ => truncate(&weights),
            }
            let (teacher, student) = if role == "teacher" {
                (dir.clone(), model_dir("timm-vit"))
            } else {
                (model_dir("dinov2"), dir.clone())
            };
            let out = t.join(format!("run-{role}-{fixture}-{case}"));
            let e = fails(&distill_args(&teacher, &student, &out, &[]));
            assert!(e.contains(&s(&weights)), "{role} {case}: {e}");
            match case {
                "shape" => assert!(e.contains(tensor) && e.contains("shape"), "{e}"),
                "name" => assert!(e.contains(tensor) && e.contains("missing"), "{e}"),
                _ => {}
            }
            assert!(!out.join("checkpoint.safetensors").exists());
        }
    }
}

#[test]
fn run_checkpoint_errors_name_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for case in ["shape", "name", "truncated"] {
        let out = t.join(format!("run-{case}"));
        let args = distill_args(
            &model_dir("dinov2"),
            &model_dir("vit-mlp96"),
            &out,
            &["--stop-after", "1"],
        );
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ck = out.join("checkpoint.safetensors");
        let tensor = "model.stem.blocks.1.mlp.fc1.weight";
        match case {
            "shape" => edit_tensors(&ck, |m| reshape_last_row_off(m, tensor)),
            "name" => edit_tensors(&ck, |m| rename(m, tensor, "model.renamed")),
            _ => truncate(&ck),
        }
        let before = fs::read(&ck).unwrap();
        let e = fails(&distill_args(
            &model_dir("dinov2"),
            &model_dir("vit-mlp96"),
            &out,
            &["--resume"],
        ));
        assert!(e.contains(&s(&ck)), "{case}: {e}");
        if case != "truncated" {
            assert!(e.contains(tensor), "{case}: {e}");
        }
        assert_eq!(fs::read(&ck).unwrap(), before, "checkpoint left as it was");
    }
}

#[test]
fn cache_errors_name_the_cache_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let images = fixtures().join("dense/pascal/JPEGImages");
    let cache = t.join("cache");
    let o = run(&[
        "cache".into(),
        "--teacher".into(),
        s(&model_dir("dinov2")),
        "--images".into(),
        s(&images),
        "--out".into(),
        s(&cache),
        "--image-size".into(),
        "32".into(),
        "--quiet".into(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = cache.join("manifest.json");
    let original = fs::read_to_string(&manifest).unwrap();
    let data = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin") && p != &cache.join("valid.bin"))
        .expect("a data file");
    let student = model_dir("timm-vit");
    let with_cache = |out: &str| {
        let mut a = distill_args(&model_dir("dinov2"), &student, &t.join(out), &[]);
        a.extend(["--cache".to_string(), s(&cache)]);
        a
    };

    // wrong shape: the manifest says the maps are wider than the data files hold
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    let dim = m["teachers"][0]["dim"].as_u64().unwrap();
    m["teachers"][0]["dim"] = (dim + 1).into();
    fs::write(&manifest, m.to_string()).unwrap();
    let e = fails(&with_cache("r1"));
    assert!(e.contains(&s(&data)) && e.contains("bytes"), "{e}");

    // wrong name: a cache of another teacher
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    m["teachers"][0]["id"] = "/elsewhere/other-model".into();
    fs::write(&manifest, m.to_string()).unwrap();
    let e = fails(&with_cache("r2"));
    assert!(
        e.contains(&s(&manifest)) && e.contains("other-model"),
        "{e}"
    );

    // truncated manifest, then a truncated data file
    fs::write(&manifest, &original[..original.len() / 2]).unwrap();
    let e = fails(&with_cache("r3"));
    assert!(e.contains(&s(&manifest)), "{e}");
    fs::write(&manifest, &original).unwrap();
    truncate(&data);
    let e = fails(&with_cache("r4"));
    assert!(e.contains(&s(&data)) && e.contains("bytes"), "{e}");
}

#[test]
fn recipe_errors_name_line_and_key_and_out_comes_from_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = t.join("run.toml");
    fs::write(
        &cfg,
        format!(
            "out = \"{}\"\nteachers = [\"{}\"]\nbatch_size = \"eight\"\n",
            s(&t.join("run")),
            s(&model_dir("dinov2"))
        ),
    )
    .unwrap();
    let e = fails(&["distill".into(), "--config".into(), s(&cfg)]);
    assert!(
        e.contains(&s(&cfg)) && e.contains("line 3") && e.contains("batch_size"),
        "{e}"
    );

    // `out`, teachers and the rest from the recipe: no flag is demanded again
    fs::write(
        &cfg,
        format!(
            "out = \"{}\"\nteachers = [\"{}\"]\nstudent = \"{}\"\nimages = \"{}\"\n\
             steps = 1\nbatch_size = 2\nimage_size = 32\n",
            s(&t.join("run")),
            s(&model_dir("dinov2")),
            s(&model_dir("timm-vit")),
            s(&fixtures().join("dense/pascal/JPEGImages")),
        ),
    )
    .unwrap();
    let o = run(&[
        "distill".into(),
        "--config".into(),
        s(&cfg),
        "--quiet".into(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.join("run/student.json").is_file());

    // stage 2 recipes report the same way
    let s2 = t.join("s2.toml");
    fs::write(&s2, "out = \"x\"\ndata_root = \"d\"\n\nbatch_size = -1\n").unwrap();
    let e = fails(&["train".into(), "--config".into(), s(&s2)]);
    assert!(
        e.contains(&s(&s2)) && e.contains("line 4") && e.contains("batch_size"),
        "{e}"
    );
}
