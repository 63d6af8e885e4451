//! `distillery bench`: time a forward, a SAK stage-1 step or a student's training step on random
//! weights.

use crate::common::ComputeArgs;
use anyhow::Result;
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Task {
    /// ViT-B/16 encoder forward
    Forward,
    /// SAK stage-1 step of --student (default vit-s16) with N ViT-B/16 teachers: forward, loss,
    /// backward, AdamW
    Stage1Step,
    /// One training step of --model (a registered student name) with a 1000-way classifier:
    /// train-mode forward, cross-entropy, backward, AdamW
    TrainStep,
}

#[derive(clap::Args)]
pub struct Args {
    /// What to time
    #[arg(long, value_enum, default_value = "forward")]
    task: Task,
    /// With --task forward: time this model instead of a random ViT-B/16 (a registered student
    /// name at random init such as resnet50 or vit-s16, or any model folder / hub id)
    #[arg(long)]
    model: Option<String>,
    /// Teachers for --task stage1-step
    #[arg(long, default_value_t = 3)]
    teachers: usize,
    /// The student for --task stage1-step: a ViT preset (vit-s16) or a registered backbone
    /// (mobilevitv2_100, fastvit_t8, resnet50, ...)
    #[arg(long, default_value = "vit-s16")]
    student: String,
    /// With --task stage1-step: print the median time of each phase (teachers, student
    /// forward, loss, backward, optimizer)
    #[arg(long)]
    breakdown: bool,
    /// With --task stage1-step: the teachers' features are computed once and read by every step
    /// (the step of `distill --cache`)
    #[arg(long)]
    cached: bool,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 224)]
    image: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Print the result as one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let opts = a.compute.load_options()?;
    let dtype = a.compute.dtype;
    match a.task {
        Task::Stage1Step => {
            let r = distillery::bench::time_stage1_step(
                &a.student,
                a.teachers,
                a.batch,
                a.image,
                a.warmup,
                a.iters,
                a.cached,
                &opts.device,
                dtype,
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "SAK stage-1 step{}, {} student + {} ViT-B/16 teachers, batch {}, {} px, {dtype:?}: median {:.3} s, min {:.3} s, peak RSS {:.0} MiB",
                    if a.cached { " (cached teacher features)" } else { "" },
                    a.student,
                    a.teachers,
                    a.batch,
                    a.image,
                    r.median_s,
                    r.min_s,
                    r.peak_rss_mib.unwrap_or(f64::NAN)
                );
                if a.breakdown {
                    for (phase, s) in &r.phases {
                        println!(
                            "  {phase:<16} {s:>7.3} s  {:>5.1} %",
                            100.0 * s / r.median_s
                        );
                    }
                }
            }
        }
        Task::TrainStep => {
            let model = a
                .model
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--task train-step needs --model NAME"))?;
            let shape = (a.batch, a.image, a.warmup, a.iters);
            let r = distillery::bench::time_train_step(model, shape, &opts)?;
            // the training step runs in f32 whatever --dtype says
            report(
                &a,
                &format!("{model} training step"),
                distillery::device::Precision::F32,
                &r,
            )?;
        }
        Task::Forward => {
            let shape = (a.batch, a.image, a.warmup, a.iters);
            let (what, r) = match &a.model {
                Some(m) => (m.clone(), distillery::bench::time_model(m, shape, &opts)?),
                None => (
                    "ViT-B/16".to_string(),
                    distillery::bench::time_vit_base_forward(
                        a.batch, a.image, a.warmup, a.iters, &opts,
                    )?,
                ),
            };
            report(&a, &format!("{what} forward"), dtype, &r)?;
        }
    }
    Ok(())
}

/// One timing as JSON or as a line.
fn report(
    a: &Args,
    what: &str,
    dtype: distillery::device::Precision,
    r: &distillery::bench::BenchResult,
) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{what}, batch {}, {} px, {dtype:?}, {} threads: median {:.3} s, mean {:.3} s, min {:.3} s ({:.1} images/s)",
            a.batch,
            a.image,
            rayon::current_num_threads(),
            r.median_s,
            r.mean_s,
            r.min_s,
            r.images_per_s
        );
    }
    Ok(())
}
