//! `distillery demo`: distil the embedded teachers on the embedded photos and draw pictures.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Run folder (default: runs/demo, or runs/demo-2, ... when that exists)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training steps
    #[arg(long, default_value_t = 150)]
    steps: u64,
    /// Epochs of the transfer part (distillation and fine-tuning; the teacher gets 3x);
    /// 0 skips it
    #[arg(long, default_value_t = 10)]
    transfer_epochs: u64,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let out = a.out.unwrap_or_else(distillery::demo::default_out);
    eprintln!(
        "demo: distilling 2 embedded teachers (DINOv2 with registers, SAM; tiny, random weights) \
         into a vit-n8 student on 16 embedded public-domain photos, {} steps, into {}",
        a.steps,
        out.display()
    );
    let t0 = std::time::Instant::now();
    let s = distillery::demo::run(&distillery::demo::DemoOptions {
        out: out.clone(),
        steps: a.steps,
        progress: !a.quiet,
        transfer_epochs: a.transfer_epochs,
    })?;
    eprintln!(
        "trained {} steps in {:.1} s ({:.1} images/s): loss {:.4} -> {:.4}",
        s.run.end_step,
        t0.elapsed().as_secs_f64(),
        s.run.images_per_s,
        s.first_loss,
        s.run.last_loss
    );
    println!("run folder:      {}", out.display());
    println!("loss curve:      {}", out.join("loss.png").display());
    for p in &s.pictures {
        println!("teacher/student: {}", p.display());
    }
    println!(
        "student:         {}",
        out.join("student.safetensors").display()
    );
    if let Some(r) = &s.transfer {
        println!(
            "\ntask-oriented transfer on embedded handwritten digits (DINOv2 teacher fine-tuned on \
             200 labelled digits, vit-n8 student distilled on 300 unlabelled ones), vs scratch:\n"
        );
        print!("{}", r.markdown());
        println!(
            "report:          {}",
            out.join("transfer/report.md").display()
        );
    }
    Ok(())
}
