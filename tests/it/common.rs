//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Where the model-parity tests run: the CPU, or the device `DISTILLERY_TEST_DEVICE` names
/// (`cuda`: a `--features cuda` test build on a GPU machine runs the same references there).
/// One device per process (each opening of a CUDA device is a distinct candle device).
pub fn test_device() -> Device {
    static DEV: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEV.get_or_init(|| match std::env::var("DISTILLERY_TEST_DEVICE") {
        Ok(s) if !s.is_empty() && s != "cpu" => s
            .parse::<distillery::device::DeviceSpec>()
            .and_then(|d| d.open().map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("DISTILLERY_TEST_DEVICE={s}: {e}")),
        _ => Device::Cpu,
    })
    .clone()
}

/// The fixtures folder: tests/fixtures of this checkout, or `DISTILLERY_FIXTURES` (a test
/// binary run on another machine).
pub fn fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("DISTILLERY_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join("refs").join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).expect("reference file")
}

/// Reproducible stand-in pixels: `shape` values in [-2, 2) from a hash of `seed` and the
/// index (unlike `Tensor::randn`, which draws from an unseeded generator).
pub fn pixels(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            // splitmix64
            let mut z = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("pixel tensor")
}

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Max |a - b| divided by max |b| (the reference tensor's scale).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    diff / scale
}

/// Every line of a metrics file (a run's `metrics.jsonl`) as JSON.
pub fn metric_rows(file: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `loss` of every line of a metrics file.
pub fn loss_column(file: &std::path::Path) -> Vec<f64> {
    metric_rows(file)
        .iter()
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// Run the CLI (hub offline) and collect its output.
pub fn bin<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distillery"))
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .expect("run distillery")
}

/// Expect success; otherwise show the exit code and both streams.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
