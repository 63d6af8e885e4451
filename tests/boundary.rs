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
