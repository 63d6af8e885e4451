//! The `distillery` command line: a thin layer over the library. Each verb is one module that
//! parses its arguments into the library's types and calls the library.

mod bench;
mod cache;
mod common;
mod demo;
mod distill;
mod embed;
mod eval;
mod eval_distill;
mod eval_edges;
mod export;
mod features;
mod info;
mod predict;
mod reparameterize;
mod retrieve;
mod train;
mod transfer;

use anyhow::Result;
use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Distil two embedded tiny teachers (DINOv2 + SAM) into a small student on embedded
    /// photos, then draw loss.png and per-teacher PCA pictures of teacher vs student features
    Demo(demo::Args),
    /// Run an encoder and write every block's output (hidden_states.{i}, last_hidden_state)
    Features(features::Args),
    /// SAK stage 1: distil frozen teachers into a student on unlabeled images
    Distill(Box<distill::Args>),
    /// Run teachers once over a data set and store their distilled levels for training
    /// (stage 1: --teacher + --images; stage 2: --config with the training recipe)
    Cache(cache::Args),
    /// SAK stage 2: multi-task dense prediction (+ distillation) from a TOML recipe
    Train(train::Args),
    /// Evaluate a stage-2 run on a split: every task's metrics and Delta_m
    Eval(eval::Args),
    /// Predict every image of a folder with a stage-2 run: PNGs per task + index.html
    Predict(predict::Args),
    /// What a distilled student learned, on held-out images: per teacher and level raw and
    /// centred cosine (teacher mean removed) with the teacher's features; --baseline adds
    /// the untrained initialisation
    EvalDistill(eval_distill::Args),
    /// Boundary benchmark (BSDS500 boundaryBench without MATLAB): ODS F, OIS F, AP
    EvalEdges(eval_edges::Args),
    /// Write a model as an ONNX file (pyramid, pooled features, logits; dynamic batch)
    Export(export::Args),
    /// Show what a model folder or hub id contains
    Info(info::Args),
    /// Time a ViT-B/16-size forward pass, or a SAK stage-1 training step (random weights)
    Bench(bench::Args),
    /// Task-oriented transfer: fine-tune a foundation model on labelled images, distil its
    /// predictions into a small student on unlabelled images, fine-tune the student; with the
    /// task-agnostic, scratch and pretrained baselines and a report
    Transfer(Box<transfer::Args>),
    /// Pooled, L2-normalised image embeddings of a pool (LAION / clip-retrieval layout:
    /// img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet), sharded and resumable
    Embed(embed::Args),
    /// Query-balanced transfer set: k nearest pool images per query, test copies excluded
    Retrieve(retrieve::Args),
    /// Fold a FastViT's multi-branch training form into its single-branch inference form
    Reparameterize(reparameterize::Args),
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Demo(a) => demo::run(a),
        Command::Features(a) => features::run(a),
        Command::Distill(a) => distill::run(*a),
        Command::Cache(a) => cache::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::EvalEdges(a) => eval_edges::run(a),
        Command::EvalDistill(a) => eval_distill::run(a),
        Command::Info(a) => info::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Reparameterize(a) => reparameterize::run(a),
        Command::Transfer(a) => transfer::run(*a),
        Command::Embed(a) => embed::run(a),
        Command::Retrieve(a) => retrieve::run(a),
    }
}

/// Keep freed memory mapped: tensors of the same sizes are freed and allocated again at every
/// layer and every step, and returning their pages to the OS makes each reuse pay page faults
/// (the kernel zeroing fresh pages took 23% of a MobileViT-V2 training step with a 1 s purge
/// delay; without purging the step ran 25% faster at the same peak resident memory, since a
/// training loop's resident set is its per-step peak either way). `MIMALLOC_PURGE_DELAY` in the
/// environment takes precedence.
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
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

/// Run `f` on a worker of rayon's global pool (one thread per core, large stacks for candle's
/// recursive backward pass) instead of on the main thread. The parallel kernels then use the
/// calling worker and the others, and the main thread sleeps: on a 2-core machine the main
/// thread doing candle's serial work next to two busy rayon workers (and candle's own
/// element-wise pool) put three or four busy threads on two cores.
/// `DISTILLERY_MAIN_THREAD=1` runs on the main thread as before (for comparison).
fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var_os("DISTILLERY_MAIN_THREAD").is_some() {
        return f();
    }
    // Thread count: RAYON_NUM_THREADS, else one per logical CPU (rayon's rule).
    let built = rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build_global();
    if built.is_err() {
        return f();
    }
    rayon::scope(|_| f())
}

/// candle's element-wise worker pool spins 25,000 rounds after each op before it sleeps; next
/// to the rayon workers that run the matrix products and fused kernels, that spinning takes a
/// core from them (on 2 cores the stage-1 student step ran 8-10% slower). 200 rounds keep
/// back-to-back element-wise ops warm. `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment
/// takes precedence.
fn tune_candle_pool() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Before any thread is started: candle reads it when its pool is first used.
        std::env::set_var(VAR, "200");
    }
}

fn main() {
    tune_allocator();
    tune_candle_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = on_compute_pool(run) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
