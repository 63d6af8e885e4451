//! `distillery retrieve`: a query-balanced transfer set from an embedding folder.

use crate::common::ComputeArgs;
use anyhow::Result;
use distillery::retrieval::embed::parse_part;
use distillery::retrieval::retrieve::{retrieve, RetrieveConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Embedding folder of the pool (`distillery embed`, or LAION's img_emb/ + metadata/)
    #[arg(long)]
    pool: PathBuf,
    /// Queries: an embedding folder, or images (folder, class folders, split file) embedded
    /// with the pool's model
    #[arg(long, required_unless_present = "merge")]
    queries: Option<PathBuf>,
    /// Where split files' names are found (default: the split file's folder)
    #[arg(long)]
    images_root: Option<PathBuf>,
    /// Nearest neighbours per query
    #[arg(long, conflicts_with = "budget")]
    k: Option<usize>,
    /// Total images; k = budget / queries
    #[arg(long)]
    budget: Option<usize>,
    /// Evaluation images (embedding folder or image set): pool images this close are dropped
    #[arg(long)]
    exclude: Option<PathBuf>,
    /// Cosine at or above which a pool image counts as a copy of an evaluation image
    #[arg(long, default_value_t = 0.95)]
    dedup: f32,
    /// Model for image queries when the pool has no embed.json (must be the pool's model)
    #[arg(long)]
    model: Option<String>,
    /// The list to write (LIST.jsonl and LIST.png beside it); with --shard, the part file
    #[arg(long)]
    out: PathBuf,
    /// Scan only pool shards j with j mod N = i and write the candidates to --out
    #[arg(long, value_parser = parse_part, conflicts_with = "merge")]
    shard: Option<(usize, usize)>,
    /// Candidates per query kept by a --shard scan (default max(4k, k+16))
    #[arg(long)]
    candidates: Option<usize>,
    /// Part files of --shard scans to combine
    #[arg(long, num_args = 1..)]
    merge: Vec<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Queries shown in the contact sheet LIST.png (0: none)
    #[arg(long, default_value_t = 8)]
    sheet_queries: usize,
    /// Where queries are embedded and the pool is scored
    #[command(flatten)]
    compute: ComputeArgs,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let load = a.compute.load_options()?;
    let cfg = RetrieveConfig {
        pool: a.pool,
        queries: a.queries,
        images_root: a.images_root,
        exclude: a.exclude,
        k: a.k,
        budget: a.budget,
        dedup: a.dedup,
        model: a.model,
        out: a.out,
        part: a.shard,
        candidates: a.candidates,
        merge: a.merge,
        batch_size: a.batch_size,
        sheet_queries: a.sheet_queries,
        progress: !a.quiet,
    };
    let s = retrieve(&cfg, &load)?;
    let files: Vec<String> = s.outputs.iter().map(|p| p.display().to_string()).collect();
    if s.selected == 0 {
        eprintln!(
            "scanned {} pool rows for {} queries (k = {}), {} excluded; candidates in {}; {:.1} s",
            s.pool_rows,
            s.queries,
            s.k,
            s.excluded,
            files.join(", "),
            s.seconds
        );
    } else {
        eprintln!(
            "{} images = {} queries x k = {} from {} pool rows ({} excluded as copies of evaluation images, {} exact duplicates, {} scans); {:.1} s -> {}",
            s.selected,
            s.queries,
            s.k,
            s.pool_rows,
            s.excluded,
            s.duplicates,
            s.scans,
            s.seconds,
            files.join(", ")
        );
    }
    for u in &s.unusable_shards {
        eprintln!("warning: shard set aside: {u}");
    }
    Ok(())
}
