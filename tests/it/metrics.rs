//! Metrics against reference values: PySODMetrics' own test vectors for saliency, hand-computed
//! cases for mIoU, normals, depth and Delta_m.

use distillery::metrics::geometry::{DepthError, NormalsError};
use distillery::metrics::saliency::{PooledMaxF, SodMetrics};
use distillery::metrics::segmentation::MeanIou;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn gray(p: PathBuf) -> (Vec<u8>, usize, usize) {
    let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    // OpenCV's IMREAD_GRAYSCALE weights (what PySODMetrics reads with).
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let v = rgb
        .pixels()
        .map(|p| (0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).round() as u8)
        .collect();
    (v, h, w)
}

#[test]
fn saliency_matches_pysodmetrics() {
    let root = fixtures().join("saliency-metrics");
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("version_performance.json")).unwrap(),
    )
    .unwrap();
    let r = &refs["v1_4_0"];
    let mut m = SodMetrics::default();
    let mut names: Vec<_> = std::fs::read_dir(root.join("masks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3);
    for n in &names {
        let (g, h, w) = gray(root.join("masks").join(n));
        let (p, hp, wp) = gray(root.join("preds").join(n));
        assert_eq!((h, w), (hp, wp));
        m.update(&p, &g, h, w);
    }
    let s = m.summary();
    let close = |got: f64, key: &str| {
        let want = r[key].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "{key}: {got} vs PySODMetrics {want}"
        );
    };
    close(s.max_fm, "maxFm");
    close(s.mean_fm, "meanFm");
    close(s.adp_fm, "adpFm");
    close(s.mae, "MAE");
    close(s.s_measure, "Smeasure");
    close(s.max_em, "maxEm");
    close(s.mean_em, "meanEm");
    close(s.adp_em, "adpEm");
}

#[test]
fn pooled_max_f_hand_case() {
    // 4 valid pixels: gt 1,1,0,0; probs .9,.4,.6,.1; one ignored pixel.
    let mut m = PooledMaxF::default();
    m.update(&[0.9, 0.4, 0.6, 0.1, 1.0], &[1, 1, 0, 0, 255], 255);
    // t in (0.1, 0.4]: TP 2, PP 3 -> P 2/3, R 1 -> F = 1.3*(2/3)/(0.3*(2/3)+1) = 0.7222..
    // t in (0.6, 0.9]: TP 1, PP 1 -> P 1, R .5 -> F = 1.3*.5/(0.3+.5) = 0.8125
    assert!((m.max_f() - 81.25).abs() < 1e-9, "{}", m.max_f());
}

#[test]
fn miou_hand_case() {
    let mut m = MeanIou::new(3, 255);
    m.update(&[0, 0, 1, 1, 2, 0], &[0, 1, 1, 1, 255, 2]);
    // class 0: TP1 FP2 FN0 -> 1/3; class 1: TP2 FN1 -> 2/3; class 2: FN1 -> 0.
    assert!((m.miou() - 100.0 / 3.0).abs() < 1e-9, "{}", m.miou());
    // Accumulation over a second image pools counts (not a mean of per-image IoUs).
    m.update(&[2], &[2]);
    assert!((m.per_class()[2] - 0.5).abs() < 1e-12);
}

#[test]
fn normals_and_depth_hand_cases() {
    let mut n = NormalsError::default();
    // 0 deg, 90 deg, 180 deg, scaled prediction (0 deg), ignored pixel.
    let pred = [0., 0., 1., 1., 0., 0., 0., 0., -1., 0., 0., 5., 1., 0., 0.];
    let gt = [0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 1., 0.];
    n.update(&pred, &gt, &[true, true, true, true, false]);
    let (mean, median, a, b, c) = n.summary();
    assert!((mean - 67.5).abs() < 1e-4, "{mean}");
    assert!((median - 45.0).abs() < 1e-4, "{median}");
    assert_eq!((a, b, c), (50.0, 50.0, 50.0));

    let mut d = DepthError::new(80.0);
    d.update(&[1.0, 2.0, 5.0, 3.0], &[2.0, 2.0, 0.0, 90.0]);
    let (rmse, abs_rel, delta) = d.summary();
    assert!((rmse - (0.5f64).sqrt()).abs() < 1e-12);
    assert!((abs_rel - 0.25).abs() < 1e-12);
    assert!((delta - 0.5).abs() < 1e-12);
}

#[test]
fn delta_m_hand_case() {
    // +10% on a higher-is-better metric, RMSE 0.5 -> 0.45 (10% better): mean +10%.
    let d = distillery::metrics::delta_m(&[(55.0, 50.0, false), (0.45, 0.5, true)]);
    assert!((d - 10.0).abs() < 1e-9, "{d}");
}
