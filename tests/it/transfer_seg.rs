//! Segmentation transfer end to end on scenes made of real handwritten digits
//! (`../shared/fixtures/digits`): each 48x48 scene holds four digits in a 2x2 layout
//! (jittered); its mask labels each digit's box (the extent of its ink) with the digit's class
//! (1..10), the box's one-pixel rim as ignore (255) and the rest as background (0) — an
//! `images/` + `masks/` set with 11 classes. Labelled scenes come from the digits' train split, test scenes from their
//! test split, the unlabelled transfer scenes from `unlabeled/` (no masks). Teacher: the tiny
//! DINOv2 fixture (random weights, fine-tuned here); student: the tiny timm ResNet fixture.

use crate::common;
use common::{bin, model_dir, ok};
use distillery::transfer::{Mode, Report, Stage};
use image::{GrayImage, Luma, RgbImage};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn digits(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/digits")
        .join(sub)
}

/// The digit images under `dir` with their class (None for the unlabelled folder), sorted.
fn digit_files(dir: &Path) -> Vec<(PathBuf, Option<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let class: u8 = p.file_name().unwrap().to_str().unwrap().parse().unwrap();
            for f in std::fs::read_dir(&p).unwrap() {
                out.push((f.unwrap().path(), Some(class)));
            }
        } else {
            out.push((p, None));
        }
    }
    out.sort();
    out
}

const SIDE: u32 = 48;

/// Scenes of four digits each from `files` (shuffled by `seed`) written as `images/NNN.png`
/// (RGB) and, where the digits have classes, `masks/NNN.png` under `root`. Returns the count.
fn write_scenes(files: &[(PathBuf, Option<u8>)], root: &Path, seed: u64) -> usize {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..files.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    std::fs::create_dir_all(root.join("images")).unwrap();
    let labelled = files[0].1.is_some();
    if labelled {
        std::fs::create_dir_all(root.join("masks")).unwrap();
    }
    let scenes = order.len() / 4;
    for s in 0..scenes {
        let mut img = GrayImage::new(SIDE, SIDE);
        let mut mask = GrayImage::new(SIDE, SIDE);
        for cell in 0..4u32 {
            let (path, class) = &files[order[4 * s + cell as usize]];
            let d = image::open(path).unwrap().to_luma8();
            let (ox, oy) = (
                (cell % 2) * 24 + rng.random_range(0..=4),
                (cell / 2) * 24 + rng.random_range(0..=4),
            );
            // the digit's box: the extent of its ink (value >= 64)
            let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
            for (x, y, p) in d.enumerate_pixels() {
                img.put_pixel(ox + x, oy + y, Luma([p[0]]));
                if p[0] >= 64 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
            }
            for y in y0..=y1.max(y0) {
                for x in x0..=x1.max(x0) {
                    if x0 == u32::MAX {
                        break;
                    }
                    let rim = x == x0 || x == x1 || y == y0 || y == y1;
                    let label = if rim { 255 } else { class.unwrap_or(0) + 1 };
                    mask.put_pixel(ox + x, oy + y, Luma([label]));
                }
            }
        }
        let rgb = RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let v = img.get_pixel(x, y)[0];
            image::Rgb([v, v, v])
        });
        rgb.save(root.join(format!("images/{s:03}.png"))).unwrap();
        if labelled {
            mask.save(root.join(format!("masks/{s:03}.png"))).unwrap();
        }
    }
    scenes
}

/// Labelled train and test scene sets and the unlabelled transfer scenes under `dir`.
fn scene_sets(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (train, test, unl) = (dir.join("train"), dir.join("test"), dir.join("unlabeled"));
    assert_eq!(write_scenes(&digit_files(&digits("train")), &train, 1), 50);
    assert_eq!(write_scenes(&digit_files(&digits("test")), &test, 2), 50);
    assert_eq!(
        write_scenes(&digit_files(&digits("unlabeled")), &unl, 3),
        75
    );
    (train, test, unl.join("images"))
}

fn seg_args(sets: &(PathBuf, PathBuf, PathBuf), out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "transfer",
        "--task",
        "segment",
        "--num-classes",
        "11",
        "--teacher",
        model_dir("dinov2").to_str().unwrap(),
        "--student",
        model_dir("timm-resnet-basic").to_str().unwrap(),
        "--labeled",
        sets.0.to_str().unwrap(),
        "--test",
        sets.1.to_str().unwrap(),
        "--transfer",
        sets.2.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--image-size",
        "48",
        "--teacher-image-size",
        "56",
        "--batch-size",
        "8",
        "--decoder-width",
        "32",
        "--teacher-lr",
        "3e-3",
        "--layer-decay",
        "1",
        "--distill-lr",
        "5e-3",
        "--finetune-lr",
        "5e-3",
        "--min-crop-scale",
        "0.5",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn report(out: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn segmentation_transfer_on_digit_scenes() {
    let dir = tempfile::tempdir().unwrap();
    let sets = scene_sets(dir.path());
    let out = dir.path().join("run");
    let o = bin(&seg_args(
        &sets,
        &out,
        &[
            "--compare",
            "task-oriented,scratch",
            "--teacher-epochs",
            "30",
            "--distill-epochs",
            "20",
            "--finetune-epochs",
            "20",
        ],
    ));
    ok(&o);
    let r = report(&out);
    println!("{}", r.markdown());
    for row in &r.rows {
        for v in [row.miou, row.pixel_acc].into_iter().flatten() {
            assert!((0.0..=1.0).contains(&v), "{row:?}");
        }
    }
    let miou = |m, s| r.row(m, s, "test").unwrap().miou.unwrap();
    let teacher = miou(Mode::TaskOriented, Stage::Teacher);
    let oriented = miou(Mode::TaskOriented, Stage::Finetune);
    let scratch = miou(Mode::Scratch, Stage::Finetune);
    // 11 classes; predicting background everywhere scores about 0.07 (its IoU / 11). The
    // fine-tuned teacher learns some digits; the student that matched its per-pixel predictions
    // on the unlabelled scenes, then fine-tuned, beats the same student fine-tuned from random
    // init with the same recipe (measured: teacher 0.121, task-oriented 0.112, scratch 0.071).
    assert!(teacher > 0.09, "teacher {teacher}");
    assert!(
        oriented > scratch + 0.02,
        "task-oriented {oriented} vs scratch {scratch}"
    );
    // per-class IoU of every scored row, background first
    assert_eq!(r.per_class_iou.len(), 4);
    assert!(r.per_class_iou.iter().all(|p| p.iou.len() == 11));
    assert!(r.markdown().contains("Per-class IoU"));
    for f in [
        "teacher/teacher.json",
        "task-oriented/distill/student.safetensors",
        "task-oriented/finetune/student.json",
        "scratch/finetune/loss.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("teacher/teacher.json")).unwrap())
            .unwrap();
    assert_eq!(tj["task"], "segment");
    assert_eq!(tj["blocks"], serde_json::json!([0, 1, 2]));
}

fn losses(out: &Path) -> Vec<f64> {
    common::loss_column(&out.join("task-oriented/distill/metrics.jsonl"))
}

#[test]
fn cached_logit_maps_dense_baseline_predict_and_bad_masks() {
    let dir = tempfile::tempdir().unwrap();
    let sets = scene_sets(dir.path());
    let short = [
        "--teacher-epochs",
        "3",
        "--distill-epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--crop-variants",
        "2",
    ];
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut a = short.to_vec();
        a.extend(extra);
        ok(&bin(&seg_args(&sets, &out, &a)));
        out
    };
    // Cached teacher logit maps ([11, 8, 8] per image at the teacher's 8x8 patch grid) and
    // the task-agnostic baseline with the per-patch contrastive loss, in one run.
    let cached = run(
        "cached",
        &[
            "--compare",
            "task-oriented,task-agnostic",
            "--cache-teacher",
            "--feature-loss",
            "contrastive",
        ],
    );
    let online = run("online", &["--mode", "task-oriented"]);
    let (c, o) = (losses(&cached), losses(&online));
    assert_eq!(c.len(), 2 * 9);
    // the first step sees the same crops and the same teacher maps up to f16 rounding
    assert!(
        (c[0] - o[0]).abs() <= 1e-4 * o[0].abs(),
        "{} vs {}",
        c[0],
        o[0]
    );
    for v in 0..2 {
        let f = cached.join(format!("teacher-logits/variant-{v}.f16"));
        assert_eq!(std::fs::metadata(f).unwrap().len(), 75 * 11 * 8 * 8 * 2);
    }
    let r = report(&cached);
    let passes = |r: &Report| {
        r.row(Mode::TaskOriented, Stage::Distill, "test")
            .unwrap()
            .teacher_forward_passes
    };
    assert_eq!(passes(&r), 2 * 75);
    assert_eq!(passes(&report(&online)), 2 * 9 * 8);
    // task-agnostic distillation trains no task head: its row has no scores
    assert!(r
        .rows
        .iter()
        .any(|x| x.mode == Mode::TaskAgnostic && x.stage == Stage::Distill && x.miou.is_none()));
    let ft = r.row(Mode::TaskAgnostic, Stage::Finetune, "test").unwrap();
    assert!(ft.miou.is_some_and(|m| (0.0..=1.0).contains(&m)));

    // predict: a palette class map at each image's size and an overlay; the maps score the
    // pixel accuracy the report gives for the same model
    let student = cached.join("task-oriented/finetune");
    let pred = dir.path().join("pred");
    ok(&bin(&[
        "predict",
        "--run",
        student.to_str().unwrap(),
        "--images",
        sets.1.join("images").to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]));
    let preds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pred.join("predictions.json")).unwrap())
            .unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 50);
    let (mut right, mut labelled) = (0usize, 0usize);
    for p in preds {
        let image = PathBuf::from(p["image"].as_str().unwrap());
        let mask_file = pred.join(p["mask"].as_str().unwrap());
        let dec = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&mask_file).unwrap(),
        ));
        let mut reader = dec.read_info().unwrap();
        assert_eq!(reader.info().color_type, png::ColorType::Indexed);
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!((reader.info().width, reader.info().height), (SIDE, SIDE));
        let gt = image::open(sets.1.join("masks").join(image.file_name().unwrap()))
            .unwrap()
            .to_luma8();
        for (p, g) in buf.iter().zip(gt.as_raw()) {
            assert!(*p < 11);
            if *g != 255 {
                labelled += 1;
                right += (p == g) as usize;
            }
        }
        let overlay = mask_file
            .to_str()
            .unwrap()
            .replace(".mask.png", ".overlay.png");
        let ov = image::open(&overlay).unwrap();
        assert_eq!((ov.width(), ov.height()), (SIDE, SIDE));
    }
    let acc = right as f64 / labelled as f64;
    let reported = r
        .row(Mode::TaskOriented, Stage::Finetune, "test")
        .unwrap()
        .pixel_acc
        .unwrap();
    assert!(
        (acc - reported).abs() < 1e-3,
        "predict {acc} vs report {reported}"
    );

    // bad masks: a label beyond the classes, and a mask of another size than its image
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("images")).unwrap();
    std::fs::create_dir_all(bad.join("masks")).unwrap();
    for i in 0..2 {
        std::fs::copy(
            sets.0.join(format!("images/{i:03}.png")),
            bad.join(format!("images/{i:03}.png")),
        )
        .unwrap();
        std::fs::copy(
            sets.0.join(format!("masks/{i:03}.png")),
            bad.join(format!("masks/{i:03}.png")),
        )
        .unwrap();
    }
    image::GrayImage::from_pixel(SIDE, SIDE, image::Luma([12]))
        .save(bad.join("masks/001.png"))
        .unwrap();
    let mut args = seg_args(&sets, &dir.path().join("bad-run"), &short);
    let at = args.iter().position(|a| a == "--labeled").unwrap();
    args[at + 1] = bad.to_str().unwrap().to_string();
    let o = bin(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("masks/001.png") && err.contains("label 12"),
        "{err}"
    );
    image::GrayImage::new(SIDE, 40)
        .save(bad.join("masks/001.png"))
        .unwrap();
    let o = bin(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("masks/001.png") && err.contains("48x40"),
        "{err}"
    );
}

#[test]
fn cache_verb_builds_a_runs_teacher_logits_and_resume_needs_only_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sets = scene_sets(dir.path());
    let out = dir.path().join("run");
    let short = [
        "--teacher-epochs",
        "1",
        "--distill-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--crop-variants",
        "2",
        "--cache-teacher",
    ];
    let mut a = short.to_vec();
    a.extend(["--stage", "teacher"]);
    ok(&bin(&seg_args(&sets, &out, &a)));
    // the cache verb runs the fine-tuned teacher over the run's two crop variants
    let o = bin(&["cache", "--transfer", out.to_str().unwrap(), "--quiet"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("150 teacher passes"));
    for v in 0..2 {
        let f = out.join(format!("teacher-logits/variant-{v}.f16"));
        assert_eq!(std::fs::metadata(f).unwrap().len(), 75 * 11 * 8 * 8 * 2);
    }
    // resuming from the folder alone reads its recipe; distillation finds the cache complete
    ok(&bin(&[
        "transfer",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--quiet",
    ]));
    let r = report(&out);
    let d = r.row(Mode::TaskOriented, Stage::Distill, "test").unwrap();
    assert_eq!(d.teacher_forward_passes, 0);
    assert!(r.row(Mode::TaskOriented, Stage::Finetune, "test").is_some());
    // a folder that is no transfer run
    let o = bin(&["cache", "--transfer", sets.0.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a transfer run folder"));
}
