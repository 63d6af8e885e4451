//! The boundary benchmark against the MATLAB BSDS500 benchmark's own outputs.

use distillery::metrics::boundary::{self, BoundaryOptions};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn read_table(p: PathBuf) -> Vec<Vec<f64>> {
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
        .filter(|v: &Vec<f64>| !v.is_empty())
        .collect()
}

#[test]
fn bsds_bench_png_matches_matlab() {
    let root = fixtures().join("bsds-bench");
    let opts = BoundaryOptions {
        thresholds: 5,
        ..Default::default()
    };
    let (res, n) =
        boundary::evaluate_dirs(&root.join("png"), &root.join("groundTruth"), &opts).unwrap();
    assert_eq!(n, 5);
    let want = &read_table(root.join("test_2/eval_bdry.txt"))[0];
    let got = [
        res.ods_threshold,
        res.ods_r,
        res.ods_p,
        res.ods_f,
        res.ois_r,
        res.ois_p,
        res.ois_f,
        res.ap,
    ];
    eprintln!("got  {got:?}\nwant {want:?}");
    for thr in read_table(root.join("test_2/eval_bdry_thr.txt"))
        .iter()
        .zip(&res.per_threshold)
    {
        eprintln!("thr {:?} vs {:?}", thr.0, thr.1);
    }
    assert!(
        (res.ods_f - want[3]).abs() < 0.002,
        "ODS F {} vs MATLAB {}",
        res.ods_f,
        want[3]
    );
    assert!(
        (res.ois_f - want[6]).abs() < 0.002,
        "OIS F {} vs MATLAB {}",
        res.ois_f,
        want[6]
    );
    assert!(
        (res.ap - want[7]).abs() < 0.002,
        "AP {} vs MATLAB {}",
        res.ap,
        want[7]
    );
}

#[test]
fn triangle_filter_hand_cases() {
    // Delta: separable [1 2 1]/4 in both directions.
    let mut img = vec![0f32; 25];
    img[12] = 16.0;
    let out = boundary::conv_tri(&img, 5, 5, 1);
    assert_eq!(out[12], 4.0);
    assert_eq!((out[7], out[11], out[13], out[17]), (2.0, 2.0, 2.0, 2.0));
    assert_eq!((out[6], out[8], out[16], out[18]), (1.0, 1.0, 1.0, 1.0));
    // Symmetric padding repeats the edge pixel: [1 1 2 3 3].
    let out = boundary::conv_tri(&[1.0, 2.0, 3.0], 1, 3, 1);
    assert_eq!(out, vec![1.25, 2.0, 2.75]);
    // Radius 4: weights 1..5..1 / 25; a constant image stays constant.
    let out = boundary::conv_tri(&vec![0.5; 60], 6, 10, 4);
    assert!(out.iter().all(|&v| (v - 0.5).abs() < 1e-6));
}

#[test]
fn nms_keeps_the_ridge_and_fades_the_border() {
    // A vertical ridge: columns 8..13 carry 0.2 0.6 1.0 0.6 0.2.
    let (h, w) = (24, 24);
    let profile = [(8, 0.2f32), (9, 0.6), (10, 1.0), (11, 0.6), (12, 0.2)];
    let mut e = vec![0f32; h * w];
    for y in 0..h {
        for &(x, v) in &profile {
            e[y * w + x] = v;
        }
    }
    let out = boundary::edge_nms(&e, h, w);
    for y in 5..h - 5 {
        for x in 0..w {
            let v = out[y * w + x];
            if x == 10 {
                assert!(v > 0.5, "ridge suppressed at ({y},{x}): {v}");
            } else {
                assert!(v == 0.0 || x < 5 || x >= w - 5, "({y},{x}) kept {v}");
            }
        }
    }
    // Border rows fade linearly over 5 pixels: row y scaled by y/5.
    let mid = out[12 * w + 10];
    for y in 0..5 {
        assert!(
            (out[y * w + 10] - mid * y as f32 / 5.0).abs() < 1e-5,
            "row {y}"
        );
    }
}
