//! Where tensors live and in which precision they are computed: `--device cpu|cuda[:N]` and
//! `--dtype f32|bf16|f16`, shared by every verb that runs a model.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::str::FromStr;

/// A device named on the command line or in a recipe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device by ordinal (`cuda` = `cuda:0`)
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| format!("{s:?}: the CUDA ordinal must be a number (cuda:0)")),
                None => Err(format!("{s:?}: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Open the device; CUDA needs a build with `--features cuda` and a visible GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                let dev = Device::new_cuda(n).map_err(|e| {
                    Error::Invalid(format!(
                        "cannot open CUDA device {n} (a build with --features cuda and a visible GPU are needed): {e}"
                    ))
                })?;
                #[cfg(feature = "cuda")]
                if std::env::var_os("DISTILLERY_CUDA_EVENTS").is_none() {
                    if let Device::Cuda(d) = &dev {
                        // SAFETY: every operation on this device runs on its one stream
                        // (candle's), so the per-tensor events that order uses across
                        // streams order nothing; no tensor of the device exists yet.
                        unsafe { d.disable_event_tracking() };
                    }
                }
                Ok(dev)
            }
        }
    }
}

/// A compute precision named on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            other => Err(format!("{other:?}: expected f32, bf16 or f16")),
        }
    }
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

/// Whether this CPU multiplies in `p` natively: bf16 needs AVX-512 BF16 (x86-64) or the BF16
/// extension (aarch64), f16 needs AVX-512 FP16 (x86-64) or FP16 arithmetic
/// (aarch64). Always true for f32.
pub fn cpu_native(p: Precision) -> bool {
    match p {
        Precision::F32 => true,
        #[cfg(target_arch = "x86_64")]
        Precision::Bf16 => std::arch::is_x86_feature_detected!("avx512bf16"),
        #[cfg(target_arch = "x86_64")]
        Precision::F16 => std::arch::is_x86_feature_detected!("avx512fp16"),
        #[cfg(target_arch = "aarch64")]
        Precision::Bf16 => std::arch::is_aarch64_feature_detected!("bf16"),
        #[cfg(target_arch = "aarch64")]
        Precision::F16 => std::arch::is_aarch64_feature_detected!("fp16"),
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        _ => false,
    }
}

/// The precision to compute in on `device` when `requested` is asked for. On a GPU that is the
/// request. On the CPU candle computes bf16/f16 element by element through conversions, which
/// is slower than f32 (measured on an AVX2 machine: a ViT-S/16 forward 2.3x, a cached SAK
/// stage-1 step 3.8x), and distillery has no half-precision CPU kernels yet (not even where the
/// CPU has native bf16 dot products), so the CPU computes in f32 (with a warning saying why,
/// once per process) unless `emulate` asks for the half dtype anyway (to check its numerics).
pub fn compute_precision(device: &Device, requested: Precision, emulate: bool) -> Precision {
    if !device.is_cpu() || requested == Precision::F32 || emulate {
        return requested;
    }
    let hardware = if cpu_native(requested) {
        "this CPU has native support for it, but distillery has no CPU kernels that use it yet"
    } else {
        "this CPU has no native support for it"
    };
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "--dtype {requested}: computing in f32 on the CPU instead ({hardware}; emulated \
             half precision is slower than f32); --emulate-half keeps {requested}"
        );
    }
    Precision::F32
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("CUDA:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("f8".parse::<Precision>().is_err());
    }

    /// Half precision falls back to f32 on the CPU unless emulation is asked for; f32 is
    /// never changed.
    #[test]
    fn cpu_half_precision_falls_back_to_f32() {
        let cpu = Device::Cpu;
        for p in [Precision::Bf16, Precision::F16] {
            assert_eq!(compute_precision(&cpu, p, false), Precision::F32, "{p}");
            assert_eq!(compute_precision(&cpu, p, true), p, "{p}");
        }
        assert_eq!(
            compute_precision(&cpu, Precision::F32, false),
            Precision::F32
        );
        assert!(cpu_native(Precision::F32));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
