//! Retrieval end to end: pooled embeddings against the reference implementations, then
//! `distillery embed` + `distillery retrieve` on real photos with planted altered copies.

use crate::common;

use common::{bin, model_dir, reference, rel_err};
use distillery::models::pooled::load_embedder;
use distillery::models::{resolve, LoadOptions};

fn embedding_matches(model: &str) {
    let files = resolve(model_dir(model).to_str().unwrap()).unwrap();
    let m = load_embedder(&files, &LoadOptions::default()).unwrap();
    let r = reference(&format!("embed-{model}"));
    let got = m.embed(&r["pixel_values"]).unwrap();
    let err = rel_err(&got, &r["embedding"]);
    assert!(err < 1e-4, "{model}: relative error {err}");
    assert_eq!(m.dim, r["embedding"].dim(1).unwrap());
}

#[test]
fn clip_embedding_is_get_image_features() {
    embedding_matches("clip");
}

#[test]
fn siglip_embedding_is_the_attention_pooled_output() {
    embedding_matches("siglip");
}

#[test]
fn dinov2_vit_and_timm_embeddings_are_the_normed_class_token() {
    for m in ["dinov2", "vit", "timm-vit"] {
        embedding_matches(m);
    }
}

use std::path::{Path, PathBuf};

/// The real photos of `../shared/fixtures` (BSDS500, mmsegmentation's samples), sorted.
fn photos() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.ends_with("digits") {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jpg") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// An altered copy: 3-4 % cropped off the borders, resized to 60 %, re-encoded as JPEG
/// quality 60.
fn altered_copy(src: &Path, dst: &Path) {
    let img = image::open(src).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let (x0, y0) = (w * 4 / 100, h * 4 / 100);
    let crop =
        image::imageops::crop_imm(&img, x0, y0, w * 97 / 100 - x0, h * 96 / 100 - y0).to_image();
    let small = image::imageops::resize(
        &crop,
        w * 6 / 10,
        h * 6 / 10,
        image::imageops::FilterType::Triangle,
    );
    let mut f = std::fs::File::create(dst).unwrap();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 60)
        .encode_image(&small)
        .unwrap();
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    queries: Vec<String>,
}

/// Queries: 4 photos; evaluation: 2 photos; pool: the other 15 photos, an altered copy of every
/// query and evaluation photo, a byte-for-byte duplicate of one photo and a broken file.
fn scene() -> Scene {
    let all = photos();
    assert!(
        all.len() >= 21,
        "expected the shared fixture photos, found {}",
        all.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for d in ["q", "ev", "pool"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let (q, ev) = ([0usize, 5, 12, 19], [3usize, 17]);
    let mut queries = Vec::new();
    for (i, p) in all.iter().enumerate() {
        let n = format!("p{i:02}.jpg");
        if q.contains(&i) {
            std::fs::copy(p, root.join("q").join(&n)).unwrap();
            altered_copy(p, &root.join("pool").join(format!("copy_{n}")));
            queries.push(n);
        } else if ev.contains(&i) {
            std::fs::copy(p, root.join("ev").join(&n)).unwrap();
            altered_copy(p, &root.join("pool").join(format!("evcopy_{n}")));
        } else {
            std::fs::copy(p, root.join("pool").join(&n)).unwrap();
        }
    }
    std::fs::copy(&all[1], root.join("pool").join("twin_p01.jpg")).unwrap();
    std::fs::write(root.join("pool").join("broken.jpg"), b"not a jpeg").unwrap();
    Scene {
        _dir: dir,
        root,
        queries,
    }
}

fn run_ok(args: &[&str]) -> String {
    let out = bin(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?} failed: {err}");
    err
}

fn run_err(args: &[&str]) -> String {
    let out = bin(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn planted_copies_are_first_neighbours_and_evaluation_copies_are_excluded() {
    let s = scene();
    let p = |x: &str| s.root.join(x).display().to_string();
    let model = model_dir("timm-vit").display().to_string();
    let emb = p("emb");
    // two workers split the pool's 5 shards (23 files, 5 per shard)
    for part in ["1/2", "0/2"] {
        let e = run_ok(&[
            "embed",
            "--model",
            &model,
            "--images",
            &p("pool"),
            "--out",
            &emb,
            "--shard-size",
            "5",
            "--shard",
            part,
            "--quiet",
        ]);
        assert!(e.contains("of 23 images embedded"), "{e}");
    }
    for i in 0..5 {
        assert!(s
            .root
            .join(format!("emb/img_emb/img_emb_{i}.npy"))
            .is_file());
        assert!(s
            .root
            .join(format!("emb/metadata/metadata_{i}.parquet"))
            .is_file());
    }
    let list = p("out/retrieved.txt");
    // `retrieve --pool EMB`, and that with the queries, evaluation images and k = 3
    let pool = ["retrieve", "--pool", emb.as_str()];
    let (q, ev) = (p("q"), p("ev"));
    let select = [&pool[..], &["--queries", &q, "--exclude", &ev, "--k", "3"]].concat();
    let e = run_ok(&[&select[..], &["--out", &list, "--quiet"]].concat());
    assert!(e.contains("12 images = 4 queries x k = 3"), "{e}");
    assert!(e.contains("(2 excluded"), "{e}");
    let lines = jsonl(&s.root.join("out/retrieved.jsonl"));
    assert_eq!(lines.len(), 12);
    let listed: Vec<String> = std::fs::read_to_string(&list)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let paths: Vec<String> = lines
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, paths);
    for q in &s.queries {
        let first = lines
            .iter()
            .find(|l| l["query"].as_str().unwrap().ends_with(q.as_str()) && l["rank"] == 1)
            .unwrap();
        assert_eq!(
            name(Path::new(first["path"].as_str().unwrap())),
            format!("copy_{q}"),
            "{lines:?}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l["query"].as_str().unwrap().ends_with(q.as_str()))
                .count(),
            3
        );
    }
    let names: Vec<String> = paths.iter().map(|x| name(Path::new(x))).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("evcopy_") || n == "broken.jpg"),
        "{names:?}"
    );
    let mut uniq = names.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 12);
    assert!(!(names.contains(&"p01.jpg".into()) && names.contains(&"twin_p01.jpg".into())));
    assert!(s.root.join("out/retrieved.png").is_file());

    // scanning the pool in two parts and merging gives the same list
    for (i, part) in ["0/2", "1/2"].iter().enumerate() {
        run_ok(
            &[
                &select[..],
                &["--shard", part, "--out", &p(&format!("part{i}")), "--quiet"],
            ]
            .concat(),
        );
    }
    let merged = p("out/merged.txt");
    run_ok(
        &[
            &pool[..],
            &[
                "--merge",
                &p("part0"),
                &p("part1"),
                "--out",
                &merged,
                "--quiet",
            ],
        ]
        .concat(),
    );
    assert_eq!(
        std::fs::read_to_string(&merged).unwrap(),
        std::fs::read_to_string(&list).unwrap()
    );
    let e = run_err(&[&pool[..], &["--merge", &p("part0"), "--out", &merged]].concat());
    assert!(e.contains("part 1/2 is missing"), "{e}");

    // queries given as an embedding folder of the same model give the same list
    run_ok(&[
        "embed",
        "--model",
        &model,
        "--images",
        &p("q"),
        "--out",
        &p("qemb"),
        "--quiet",
    ]);
    let again = p("out/again.txt");
    run_ok(
        &[
            &pool[..],
            &[
                "--queries",
                &p("qemb"),
                "--exclude",
                &p("ev"),
                "--k",
                "3",
                "--out",
                &again,
                "--quiet",
                "--sheet-queries",
                "0",
            ],
        ]
        .concat(),
    );
    let a: Vec<serde_json::Value> = jsonl(&s.root.join("out/again.jsonl"));
    assert_eq!(
        a.iter().map(|l| l["path"].clone()).collect::<Vec<_>>(),
        lines.iter().map(|l| l["path"].clone()).collect::<Vec<_>>()
    );

    // bad input: another model's queries, k beyond the pool, a damaged shard
    let clip = model_dir("clip").display().to_string();
    run_ok(&[
        "embed",
        "--model",
        &clip,
        "--images",
        &p("q"),
        "--out",
        &p("qclip"),
        "--quiet",
    ]);
    let e = run_err(
        &[
            &pool[..],
            &["--queries", &p("qclip"), "--k", "1", "--out", &again],
        ]
        .concat(),
    );
    assert!(e.contains("qclip") && e.contains("embedded with"), "{e}");
    let e = run_err(
        &[
            &pool[..],
            &["--queries", &p("q"), "--k", "10", "--out", &again],
        ]
        .concat(),
    );
    assert!(e.contains("need 40 pool images, the pool has 22"), "{e}");
    let npy2 = s.root.join("emb/img_emb/img_emb_2.npy");
    let bytes = std::fs::read(&npy2).unwrap();
    std::fs::write(&npy2, &bytes[..bytes.len() - 10]).unwrap();
    let e = run_ok(
        &[
            &pool[..],
            &["--queries", &p("q"), "--k", "1", "--out", &again, "--quiet"],
        ]
        .concat(),
    );
    assert!(
        e.contains("img_emb_2.npy") && e.contains("skipping shard 2"),
        "{e}"
    );
    assert_eq!(jsonl(&s.root.join("out/again.jsonl")).len(), 4);

    // resume: a run killed after shard 2's rows were written but before its metadata redoes
    // that shard only (the damaged one), keeping the other four
    std::fs::remove_file(s.root.join("emb/metadata/metadata_2.parquet")).unwrap();
    let e = run_err(&[
        "embed",
        "--model",
        &model,
        "--images",
        &p("pool"),
        "--out",
        &emb,
        "--shard-size",
        "5",
    ]);
    assert!(e.contains("--resume"), "{e}");
    let e = run_ok(&[
        "embed",
        "--model",
        &model,
        "--images",
        &p("pool"),
        "--out",
        &emb,
        "--shard-size",
        "5",
        "--resume",
        "--quiet",
    ]);
    assert!(e.contains("1 shards written, 4 kept"), "{e}");
    run_ok(&[&select[..], &["--out", &again, "--quiet"]].concat());
    assert_eq!(
        std::fs::read_to_string(&again).unwrap(),
        std::fs::read_to_string(&list).unwrap()
    );
    let e = run_err(&[
        "embed",
        "--model",
        &clip,
        "--images",
        &p("pool"),
        "--out",
        &emb,
        "--shard-size",
        "5",
        "--resume",
    ]);
    assert!(
        e.contains("embed.json") && e.contains("embedded with model"),
        "{e}"
    );
    let sam = model_dir("sam").display().to_string();
    let e = run_err(&[
        "embed",
        "--model",
        &sam,
        "--images",
        &p("q"),
        "--out",
        &p("samemb"),
    ]);
    assert!(e.contains("SAM has no image-level embedding"), "{e}");
}
