//! The `distillery` command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use distillery::device::DeviceSpec;
use distillery::features::{
    describe, output_tensors, read_images, read_pixels, write_safetensors_atomic,
};
use distillery::models::{self, FeatureRequest, LoadOptions};
use std::path::PathBuf;

// Large tensors are allocated and freed at every op; mimalloc keeps those pages mapped instead
// of returning them to the kernel each time (a measurable share of CPU time otherwise).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "distillery",
    version,
    about = "Distil large vision foundation models into small, fast task models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchTask {
    /// ViT-B/16 encoder forward
    Forward,
    /// ViT-S/16 student + N ViT-B/16 teachers: forward, loss, backward, AdamW
    Stage1Step,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model folder (config.json + model.safetensors) or hub id (org/name[@revision]);
    /// defaults to the demo checkpoint embedded in the binary
    #[arg(long)]
    model: Option<String>,
    /// Compute dtype
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Subcommand)]
enum Command {
    /// Distil two embedded tiny teachers (DINOv2 + SAM) into a small student on embedded
    /// photos, then draw loss.png and per-teacher PCA pictures of teacher vs student features
    Demo {
        /// Run folder (default: runs/demo, or runs/demo-2, ... when that exists)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Training steps
        #[arg(long, default_value_t = 150)]
        steps: u64,
        #[arg(long)]
        quiet: bool,
    },
    /// Run an encoder and write every block's output (hidden_states.{i}, last_hidden_state)
    Features {
        #[command(flatten)]
        model: ModelArgs,
        /// Image file(s) to preprocess as the checkpoint says (repeat for a batch); defaults to
        /// the embedded sample image when neither --image nor --pixels is given
        #[arg(long, conflicts_with = "pixels")]
        image: Vec<PathBuf>,
        /// Safetensors file with a normalised `pixel_values` [B,3,H,W] (skips preprocessing)
        #[arg(long)]
        pixels: Option<PathBuf>,
        /// Output safetensors file (written atomically); without it only a summary is printed
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which hidden states: `all`, `sak` (4 evenly spaced blocks) or a comma list of
        /// hidden-state indices (0 = embeddings, i = block i-1)
        #[arg(long, default_value = "all")]
        levels: String,
        /// Also draw the patch features' first 3 PCA components as RGB per image into this PNG
        /// (the SAK levels, or the --levels list)
        #[arg(long)]
        pca: Option<PathBuf>,
    },
    /// SAK stage 1: distil frozen teachers into a student on unlabeled images
    Distill(Box<DistillArgs>),
    /// Run teachers once over a data set and store their distilled levels for training
    /// (stage 1: --teacher + --images; stage 2: --config with the training recipe)
    Cache {
        /// Teacher folder or hub id (repeat); order is kept
        #[arg(long = "teacher", required_unless_present = "config")]
        teachers: Vec<String>,
        /// Images: folder tree, .tar archive or shard pattern
        #[arg(long, required_unless_present = "config")]
        images: Option<PathBuf>,
        /// Stage-2 recipe (`distillery train --config`): cache its teachers on K augmented
        /// variants of its training split
        #[arg(long, conflicts_with_all = ["teachers", "images"])]
        config: Option<PathBuf>,
        /// Cache folder to create
        #[arg(long)]
        out: PathBuf,
        /// Student input size the cache is for (teachers other than SAM use it)
        #[arg(long, default_value_t = 384)]
        image_size: usize,
        /// Fixed crop/flip variants per image (training epoch e uses variant e mod K)
        #[arg(long, default_value_t = 1)]
        variants: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage type
        #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
        dtype: String,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Device the teachers run on: cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long)]
        quiet: bool,
    },
    /// SAK stage 2: multi-task dense prediction (+ distillation) from a TOML recipe
    Train {
        /// TOML file with any TrainConfig field (out, dataset, data_root, init, tasks, ...)
        #[arg(long)]
        config: PathBuf,
        /// Run folder (overrides `out` in the config)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Total steps (overrides the config; with --resume a larger value extends the run)
        #[arg(long)]
        steps: Option<u64>,
        /// Continue from the run folder's last checkpoint
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps in this invocation (with a checkpoint)
        #[arg(long)]
        stop_after: Option<u64>,
        /// Device to train on: cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a stage-2 run on a split: every task's metrics and Delta_m
    Eval {
        /// Stage-2 run folder
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "val")]
        split: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Predict every image of a folder with a stage-2 run: PNGs per task + index.html
    Predict {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Boundary benchmark (BSDS500 boundaryBench without MATLAB): ODS F, OIS F, AP
    EvalEdges(EvalEdgesArgs),
    /// Show what a model folder or hub id contains
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Time a ViT-B/16-size forward pass, or a SAK stage-1 training step (random weights)
    Bench {
        /// What to time
        #[arg(long, value_enum, default_value = "forward")]
        task: BenchTask,
        /// Teachers for --task stage1-step
        #[arg(long, default_value_t = 3)]
        teachers: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 224)]
        image: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Print the result as one JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct EvalEdgesArgs {
    /// Folder of predicted edge-probability PNGs (0-255 = probability 0-1)
    #[arg(long)]
    pred: PathBuf,
    /// Folder of ground truth with the same file stems: BSDS .mat (groundTruth), PASCAL-Context
    /// .mat (LabelMap) or PNG (non-zero = boundary)
    #[arg(long)]
    gt: PathBuf,
    /// Matching tolerance as a fraction of the image diagonal (PASCAL/BSDS 0.0075, NYUD 0.011)
    #[arg(long, default_value_t = 0.0075)]
    max_dist: f64,
    /// Number of thresholds, evenly spaced in (0, 1)
    #[arg(long, default_value_t = 99)]
    thresholds: usize,
    /// Non-maximum suppression of the predictions first (as the SAK/ATRC evaluation does)
    #[arg(long)]
    nms: bool,
    /// Do not thin the binarised predictions
    #[arg(long)]
    no_thin: bool,
    /// Print one JSON object (ods_f, ois_f, ap, ...) instead of text
    #[arg(long)]
    json: bool,
}

fn train(
    config: PathBuf,
    out: Option<PathBuf>,
    steps: Option<u64>,
    resume: bool,
    stop_after: Option<u64>,
    device: DeviceSpec,
    quiet: bool,
) -> Result<()> {
    use distillery::train::engine::RunOptions;
    use distillery::train::stage2::{self, TrainConfig};
    let mut cfg = TrainConfig::from_file(&config)?;
    if let Some(o) = out {
        cfg.out = o;
    }
    if let Some(s) = steps {
        cfg.steps = s;
    }
    let s = stage2::run(
        &cfg,
        &RunOptions {
            resume,
            stop_after,
            progress: !quiet,
            device: device.open()?,
        },
    )?;
    eprintln!(
        "steps {}..{} of {}; last loss {:.5}; {:.2} images/s",
        s.start_step, s.end_step, s.total_steps, s.last_loss, s.images_per_s
    );
    if let Some(e) = s.eval {
        println!("{e}");
    }
    Ok(())
}

fn eval_run(run: PathBuf, split: String, json: bool, quiet: bool) -> Result<()> {
    use distillery::data::dense::open_dataset;
    use distillery::data::dense_aug::Normalize;
    use distillery::train::stage2;
    let (model, info, cfg) = stage2::load_run(&run)?;
    let tasks: Vec<_> = model.spec.tasks.iter().map(|(t, _)| *t).collect();
    let ds = open_dataset(&info.dataset, &cfg.data_root, &split, &tasks)?;
    let norm = Normalize {
        mean: model.spec.student.mean,
        std: model.spec.student.std,
    };
    let t0 = std::time::Instant::now();
    let r = stage2::evaluate(
        &model,
        ds.as_ref(),
        info.input_hw,
        norm,
        &cfg,
        !quiet && !json,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let p = run.join(format!("eval-{split}.json"));
    distillery::features::write_atomic(&p, r.to_string().as_bytes())?;
    if json {
        println!("{r}");
    } else {
        for t in &tasks {
            let v = &r[t.name()];
            let parts: Vec<String> = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, x)| x.as_f64().map(|f| format!("{k} {f:.4}")))
                        .collect()
                })
                .unwrap_or_default();
            println!("{:9} {}", t.name(), parts.join("  "));
        }
        if let Some(d) = r["delta_m"].as_f64() {
            println!("delta_m   {d:+.2}%");
        }
        eprintln!(
            "{} images in {secs:.1} s; written to {}",
            ds.len(),
            p.display()
        );
    }
    Ok(())
}

fn eval_edges(a: EvalEdgesArgs) -> Result<()> {
    use distillery::metrics::boundary::{evaluate_dirs, BoundaryOptions};
    if a.thresholds == 0 {
        bail!("--thresholds must be at least 1");
    }
    if !(a.max_dist > 0.0 && a.max_dist < 1.0) {
        bail!("--max-dist must be in (0, 1), got {}", a.max_dist);
    }
    let opts = BoundaryOptions {
        max_dist: a.max_dist,
        thresholds: a.thresholds,
        thin: !a.no_thin,
        nms: a.nms,
    };
    let t0 = std::time::Instant::now();
    let (r, n) = evaluate_dirs(&a.pred, &a.gt, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let ips = n as f64 / secs;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["images"] = n.into();
        v["seconds"] = secs.into();
        v["images_per_s"] = ips.into();
        println!("{v}");
    } else {
        println!(
            "ods_f {:.6}  (threshold {:.4}, recall {:.6}, precision {:.6})",
            r.ods_f, r.ods_threshold, r.ods_r, r.ods_p
        );
        println!(
            "ois_f {:.6}  (recall {:.6}, precision {:.6})",
            r.ois_f, r.ois_r, r.ois_p
        );
        println!("ap    {:.6}", r.ap);
        eprintln!("{n} images in {secs:.2} s ({ips:.1} images/s)");
    }
    Ok(())
}

#[derive(clap::Args)]
struct DistillArgs {
    /// Teacher folder or hub id (repeat for several teachers)
    #[arg(long = "teacher")]
    teachers: Vec<String>,
    /// Student preset (vit-s16, vit-b16, vit-l16) or a ViT folder / hub id to start from
    #[arg(long)]
    student: Option<String>,
    /// Folder tree of unlabeled images (jpg, png, webp)
    #[arg(long)]
    images: Option<PathBuf>,
    /// Run folder (checkpoint, metrics.jsonl, exported student); or `out` in --config
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total training steps (default: epochs x steps per epoch)
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Student input size (teachers other than SAM get the same)
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Max global gradient norm (0 = off)
    #[arg(long)]
    clip_grad: Option<f64>,
    #[arg(long, value_enum)]
    loss: Option<distillery::losses::FeatureLoss>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop unreadable images from being skipped: fail instead
    #[arg(long)]
    strict_images: bool,
    /// Teacher-feature cache folder (`distillery cache`): teachers are not run
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Reuse K fixed crop variants per image (epoch e uses variant e mod K); a cache sets it
    #[arg(long)]
    crop_variants: Option<u64>,
    /// TOML file with any DistillConfig field; flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the run folder's last checkpoint (a larger --steps extends the run)
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps in this invocation (with a checkpoint), e.g. for preemptible jobs
    #[arg(long)]
    stop_after: Option<u64>,
    /// Device to train on (the teachers run there too): cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// No progress bar
    #[arg(long)]
    quiet: bool,
}

fn distill(a: DistillArgs) -> Result<()> {
    use distillery::train::engine::RunOptions;
    use distillery::train::stage1;
    let (mut cfg, out) = stage1::recipe(
        a.config.as_deref(),
        a.out.as_deref(),
        a.resume && a.teachers.is_empty(),
    )?;
    if !a.teachers.is_empty() {
        cfg.teachers = a.teachers;
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        student,
        images,
        steps,
        epochs,
        batch_size,
        image_size,
        lr,
        weight_decay,
        clip_grad,
        loss,
        seed,
        checkpoint_every,
        crop_variants
    );
    if a.cache.is_some() {
        cfg.cache = a.cache;
    }
    if a.strict_images {
        cfg.strict_images = true;
    }
    let opts = RunOptions {
        resume: a.resume,
        stop_after: a.stop_after,
        progress: !a.quiet,
        device: a.device.open()?,
    };
    let s = stage1::run(&cfg, &out, &opts)?;
    eprintln!(
        "steps {}..{} of {}; last loss {:.5}; {:.1} images/s; {} unreadable images skipped",
        s.start_step, s.end_step, s.total_steps, s.last_loss, s.images_per_s, s.skipped_images
    );
    if s.end_step == s.total_steps {
        eprintln!(
            "student exported to {}",
            out.join("student.safetensors").display()
        );
    }
    Ok(())
}

fn load_model(m: &ModelArgs) -> Result<(String, Box<dyn distillery::VisionEncoder>)> {
    let dtype = m.dtype.dtype();
    let opts = LoadOptions {
        dtype,
        device: m.device.open()?,
    };
    let name = match &m.model {
        Some(s) => s.clone(),
        None => distillery::embedded::demo_model_dir()?
            .to_string_lossy()
            .to_string(),
    };
    let enc = models::load(&name, &opts)?;
    Ok((name, enc))
}

fn parse_levels(s: &str, info: &distillery::ModelInfo) -> Result<FeatureRequest> {
    Ok(match s {
        "all" => FeatureRequest::all(info.depth),
        "sak" => FeatureRequest::blocks(&info.default_levels),
        list => {
            let mut idx = Vec::new();
            for p in list.split(',') {
                let v: usize = p
                    .trim()
                    .parse()
                    .with_context(|| format!("--levels: {p:?} is not an index"))?;
                if v > info.depth {
                    bail!("--levels: {v} is out of range 0..={}", info.depth);
                }
                idx.push(v);
            }
            FeatureRequest {
                hidden_states: idx,
                last: false,
            }
        }
    })
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

fn print_tensors(tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
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

/// `features --model <RUN_DIR>` on an exported SAK student.
fn student_features(
    dir: &std::path::Path,
    image: &[PathBuf],
    pixels: Option<&PathBuf>,
    out: Option<&PathBuf>,
) -> Result<()> {
    let student = distillery::train::stage1::load_student(dir)?;
    let spec = &student.spec;
    let dev = Device::Cpu;
    let x = match (pixels, image.is_empty()) {
        (Some(p), _) => read_pixels(p, &dev)?,
        (None, false) => {
            let pre = distillery::preprocess::PreprocessConfig::exact(
                (spec.image_size, spec.image_size),
                distillery::preprocess::Resample::Bicubic,
                spec.mean,
                spec.std,
            );
            let items = image
                .iter()
                .map(|p| Ok(pre.apply(&distillery::preprocess::read_image(p)?, &dev)?))
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&items, 0)?
        }
        (None, true) => bail!("give --image or --pixels for a student"),
    };
    eprintln!(
        "student: width={} depth={} patch={} trained at {} px, levels {:?}",
        spec.arch.dim, spec.arch.depth, spec.arch.patch, spec.image_size, spec.levels
    );
    for (t, slot) in spec.teachers.iter().enumerate() {
        eprintln!("teacher.{t} = {} (width {})", slot.name, slot.dim);
    }
    let tensors = distillery::features::student_tensors(&student, &x)?;
    print_tensors(&tensors)?;
    if let Some(out) = out {
        write_safetensors_atomic(&tensors, out)?;
        eprintln!("wrote {} tensors to {}", tensors.len(), out.display());
    }
    Ok(())
}

fn demo(out: Option<PathBuf>, steps: u64, quiet: bool) -> Result<()> {
    let out = match out {
        Some(o) => o,
        None => (1..)
            .map(|k| match k {
                1 => PathBuf::from("runs/demo"),
                k => PathBuf::from(format!("runs/demo-{k}")),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| PathBuf::from("runs/demo")),
    };
    eprintln!(
        "demo: distilling 2 embedded teachers (DINOv2 with registers, SAM; tiny, random weights) \
         into a vit-n8 student on 16 embedded public-domain photos, {steps} steps, into {}",
        out.display()
    );
    let t0 = std::time::Instant::now();
    let s = distillery::demo::run(&distillery::demo::DemoOptions {
        out: out.clone(),
        steps,
        progress: !quiet,
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
    Ok(())
}

/// `--pca`: pictures of the computed hidden states (patch tokens) of a model.
fn pca_picture(
    path: &std::path::Path,
    images: &[PathBuf],
    o: &distillery::EncoderOutput,
    name: &str,
) -> Result<()> {
    let imgs = images
        .iter()
        .map(|p| Ok(distillery::preprocess::read_image(p)?))
        .collect::<Result<Vec<_>>>()?;
    let cols = o
        .hidden_states
        .keys()
        .filter(|&&i| i > 0)
        .map(|&i| Ok((format!("block {}", i - 1), o.feature_map(i)?)))
        .collect::<Result<Vec<_>>>()?;
    if cols.is_empty() {
        bail!("--pca: no block outputs were computed (check --levels)");
    }
    distillery::demo::model_pictures(
        path,
        &imgs,
        cols,
        &format!("{name}: first 3 PCA components of patch features"),
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn features(
    model: ModelArgs,
    image: Vec<PathBuf>,
    pixels: Option<PathBuf>,
    out: Option<PathBuf>,
    levels: String,
    pca: Option<PathBuf>,
) -> Result<()> {
    if let Some(m) = &model.model {
        let dir = std::path::Path::new(m);
        if dir.join("student.json").is_file() {
            if pca.is_some() {
                bail!("--pca draws a model's features; for a distilled student run `distillery demo` pictures come from its teachers");
            }
            return student_features(dir, &image, pixels.as_ref(), out.as_ref());
        }
    }
    if pca.is_some() && pixels.is_some() {
        bail!("--pca needs --image (it draws the images next to their features)");
    }
    let (name, enc) = load_model(&model)?;
    let info = enc.info().clone();
    let dev = model.device.open()?;
    let image = if pixels.is_none() && image.is_empty() {
        let sample = distillery::embedded::sample_image()?;
        eprintln!("input: embedded sample image {}", sample.display());
        vec![sample]
    } else {
        image
    };
    let x = match &pixels {
        Some(p) => read_pixels(p, &dev)?,
        None => read_images(&image, &info, &dev)?,
    };
    let dtype = model.dtype.dtype();
    let x = x.to_dtype(dtype)?;
    let (b, _, h, w) = x.dims4()?;
    eprintln!("model: {name}");
    eprintln!("loaded: {} batch={b}", describe(&info, (h, w)));
    let req = match (&pca, levels.as_str()) {
        (Some(_), "all") => FeatureRequest::blocks(&info.default_levels),
        _ => parse_levels(&levels, &info)?,
    };
    let t0 = std::time::Instant::now();
    let o = enc.forward_features(&x, &req)?;
    if let Some(p) = &pca {
        pca_picture(p, &image, &o, &name)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tensors = output_tensors(&o)?;
    print_tensors(&tensors)?;
    eprintln!("forward: {secs:.3} s ({:.1} images/s)", b as f64 / secs);
    if let Some(out) = out {
        write_safetensors_atomic(&tensors, &out)?;
        eprintln!("wrote {} tensors to {}", tensors.len(), out.display());
    }
    Ok(())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Features {
            model,
            image,
            pixels,
            out,
            levels,
            pca,
        } => features(model, image, pixels, out, levels, pca),
        Command::Demo { out, steps, quiet } => demo(out, steps, quiet),
        Command::Distill(a) => distill(*a),
        Command::EvalEdges(a) => eval_edges(a),
        Command::Train {
            config,
            out,
            steps,
            resume,
            stop_after,
            device,
            quiet,
        } => train(config, out, steps, resume, stop_after, device, quiet),
        Command::Eval {
            run,
            split,
            json,
            quiet,
        } => eval_run(run, split, json, quiet),
        Command::Predict { run, images, out } => {
            let (model, info, _) = distillery::train::stage2::load_run(&run)?;
            let t0 = std::time::Instant::now();
            let n = distillery::predict::predict_folder(&model, info.input_hw, &images, &out)?;
            eprintln!(
                "{n} images in {:.1} s; open {}",
                t0.elapsed().as_secs_f64(),
                out.join("index.html").display()
            );
            Ok(())
        }
        Command::Cache {
            teachers,
            images,
            config,
            out,
            image_size,
            variants,
            seed,
            dtype,
            batch_size,
            device,
            quiet,
        } => {
            use distillery::teacher::Teacher;
            use distillery::train::{cache, stage2};
            let device = device.open()?;
            let bo = cache::BuildOptions {
                image_size,
                variants,
                seed,
                dtype,
                batch_size,
                progress: !quiet,
            };
            let t0 = std::time::Instant::now();
            let m = match (config, images) {
                (Some(c), _) => {
                    stage2::build_cache(&stage2::TrainConfig::from_file(&c)?, &out, &bo, &device)?
                }
                (None, Some(images)) => {
                    let opts = LoadOptions {
                        device,
                        ..LoadOptions::default()
                    };
                    let ts = Teacher::load_all(&teachers, image_size, &[], &opts)?;
                    cache::build(&ts, &images, &out, &bo)?
                }
                (None, None) => bail!("give --images (stage 1) or --config (stage 2)"),
            };
            let items = m.n_images as u64 * m.variants;
            eprintln!(
                "cached {} teachers x {items} items in {:.1} s ({:.1} items/s) into {}",
                m.teachers.len(),
                t0.elapsed().as_secs_f64(),
                items as f64 / t0.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
        Command::Info { model } => {
            let (name, enc) = load_model(&model)?;
            let info = enc.info();
            println!("model: {name}");
            println!("{}", describe(info, info.image_size));
            println!("sak levels (0-based blocks): {:?}", info.default_levels);
            println!("preprocess: {:?}", info.preprocess);
            Ok(())
        }
        Command::Bench {
            task: BenchTask::Stage1Step,
            teachers,
            batch,
            image,
            warmup,
            iters,
            device: d,
            json,
        } => {
            let r = distillery::bench::time_stage1_step(
                teachers,
                batch,
                image,
                warmup,
                iters,
                &d.open()?,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "SAK stage-1 step, ViT-S/16 student + {teachers} ViT-B/16 teachers, batch {batch}, {image} px: median {:.3} s, min {:.3} s, peak RSS {:.0} MiB",
                    r.median_s,
                    r.min_s,
                    r.peak_rss_mib.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            task: BenchTask::Forward,
            teachers: _,
            batch,
            image,
            warmup,
            iters,
            device: d,
            json,
        } => {
            let opts = LoadOptions {
                dtype: DType::F32,
                device: d.open()?,
            };
            let (_dir, enc) =
                distillery::bench::random_vit(distillery::bench::VitSize::BASE16, &opts)?;
            let r = distillery::bench::time_forward(
                enc.as_ref(),
                batch,
                image,
                warmup,
                iters,
                &opts.device,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "ViT-B/16 forward, batch {batch}, {image} px, {} threads: median {:.3} s, mean {:.3} s, min {:.3} s ({:.1} images/s)",
                    rayon::current_num_threads(),
                    r.median_s,
                    r.mean_s,
                    r.min_s,
                    r.images_per_s
                );
            }
            Ok(())
        }
    }
}

/// Keep freed memory mapped for a while: tensors of the same sizes are freed and allocated again
/// at every layer, and returning their pages to the OS at once makes each reuse pay page faults.
/// A bounded delay (not "never") keeps a long training run's resident memory near its working
/// set. `MIMALLOC_PURGE_DELAY` in the environment takes precedence.
fn tune_allocator() {
    // mimalloc v2 option ids (mimalloc.h): 4 = arena_eager_commit, 6 = allow_large_os_pages,
    // 15 = purge_delay.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const LARGE_OS_PAGES: libmimalloc_sys::mi_option_t = 6;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: setting allocator options is thread-safe and done before heavy allocation.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        // 2 MiB pages where the kernel allows them: far fewer page faults for the large,
        // short-lived activation buffers of training steps.
        libmimalloc_sys::mi_option_set(LARGE_OS_PAGES, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 1000);
    }
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
