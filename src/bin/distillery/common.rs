//! Arguments and printing shared by several verbs.

use anyhow::Result;
use candle_core::{DType, Tensor};
use distillery::device::{compute_precision, DeviceSpec, Precision};
use distillery::models::{self, LoadOptions};
use std::collections::HashMap;

/// A model to run for inference.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (config.json + model.safetensors) or hub id (org/name[@revision]);
    /// defaults to the demo checkpoint embedded in the binary
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Where and in which precision models run.
#[derive(clap::Args, Clone, Copy)]
pub struct ComputeArgs {
    /// Device: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build)
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype: f32, bf16 or f16 (training keeps f32 master weights and optimizer
    /// state; f16 scales the loss)
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Compute bf16/f16 on the CPU as asked (emulated, slower than f32; to check the half
    /// dtype's numerics) instead of falling back to f32
    #[arg(long)]
    pub emulate_half: bool,
}

impl ComputeArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        load_options(self.device, self.dtype, self.emulate_half)
    }
}

/// Where and in which precision models run, for verbs whose `--dtype` names how results are
/// stored (`cache`, `embed`).
#[derive(clap::Args, Clone, Copy)]
pub struct StoreComputeArgs {
    /// Device the models run on: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Dtype the models compute in: f32, bf16 or f16
    #[arg(long, default_value = "f32")]
    pub compute_dtype: Precision,
    /// Compute bf16/f16 on the CPU as asked (emulated, slower than f32) instead of falling back
    /// to f32
    #[arg(long)]
    pub emulate_half: bool,
}

impl StoreComputeArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        load_options(self.device, self.compute_dtype, self.emulate_half)
    }
}

fn load_options(device: DeviceSpec, dtype: Precision, emulate: bool) -> Result<LoadOptions> {
    let device = device.open()?;
    Ok(LoadOptions {
        dtype: compute_precision(&device, dtype, emulate).dtype(),
        device,
    })
}

/// How one training invocation runs (not part of the recipe).
#[derive(clap::Args)]
pub struct RunArgs {
    /// Continue from the run folder's last checkpoint (a larger --steps extends the run)
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in this invocation (with a checkpoint), e.g. for preemptible
    /// jobs
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Where the model trains (online teachers run there too) and in which precision
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    pub fn options(&self) -> Result<distillery::train::engine::RunOptions> {
        let device = self.compute.device.open()?;
        Ok(distillery::train::engine::RunOptions {
            resume: self.resume,
            stop_after: self.stop_after,
            progress: !self.quiet,
            precision: compute_precision(&device, self.compute.dtype, self.compute.emulate_half),
            device,
        })
    }
}

/// The named model (or the embedded demo model) and its name.
pub fn load_model(m: &ModelArgs) -> Result<(String, Box<dyn distillery::VisionEncoder>)> {
    let name = match &m.model {
        Some(s) => s.clone(),
        None => distillery::embedded::demo_model_dir()?
            .to_string_lossy()
            .to_string(),
    };
    let enc = models::load(&name, &m.compute.load_options()?)?;
    Ok((name, enc))
}

fn stats(t: &Tensor) -> Result<(f32, f32)> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    let mean = t.mean_all()?.to_scalar::<f32>()?;
    let var = t
        .broadcast_sub(&t.mean_all()?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok((mean, var.sqrt()))
}

/// One line per tensor (shape, mean, std), in natural name order.
pub fn print_tensors(tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    // Natural order: numeric name segments compare as numbers.
    names.sort_by_key(|n| {
        n.split('.')
            .map(|seg| match seg.parse::<usize>() {
                Ok(v) => (0u8, v, String::new()),
                Err(_) => (1u8, 0, seg.to_string()),
            })
            .collect::<Vec<_>>()
    });
    for n in names {
        let t = &tensors[n];
        let (mean, std) = stats(t)?;
        println!(
            "{n:<20} {:<18} mean {mean:>9.4} std {std:>9.4}",
            format!("{:?}", t.dims())
        );
    }
    Ok(())
}

/// The run's outcome, one line on stderr.
pub fn report_run(s: &distillery::train::engine::RunSummary) {
    eprintln!(
        "steps {}..{} of {}; last loss {:.5}; {:.2} images/s; {} unreadable images skipped",
        s.start_step, s.end_step, s.total_steps, s.last_loss, s.images_per_s, s.skipped_images
    );
}

/// A backbone's levels, `channels@/stride` each.
pub fn levels_text(net: &dyn distillery::models::backbone::Backbone) -> String {
    net.feature_info()
        .iter()
        .map(|f| format!("{}@/{}", f.channels, f.stride))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Print the tensors' summary and, with `out`, write them atomically.
pub fn emit(tensors: &HashMap<String, Tensor>, out: Option<&std::path::Path>) -> Result<()> {
    print_tensors(tensors)?;
    if let Some(out) = out {
        distillery::atomic::write_safetensors(tensors, out)?;
        eprintln!("wrote {} tensors to {}", tensors.len(), out.display());
    }
    Ok(())
}
