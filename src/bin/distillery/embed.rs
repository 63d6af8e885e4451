//! `distillery embed`: pooled, L2-normalised image embeddings of a pool, in the LAION /
//! clip-retrieval layout.

use crate::common::StoreComputeArgs;
use anyhow::Result;
use distillery::data::npy::NpyType;
use distillery::retrieval::embed::{embed, parse_part, EmbedConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or hub id (ViT, DINOv2, CLIP, SigLIP; CLIP/SigLIP give their projected
    /// image embedding)
    #[arg(long)]
    model: String,
    /// The pool: folder tree, .tar archive, shard pattern or list file
    #[arg(long)]
    images: PathBuf,
    /// Embedding folder to write (img_emb/, metadata/, embed.json)
    #[arg(long)]
    out: PathBuf,
    /// Images per shard
    #[arg(long, default_value_t = 10_000)]
    shard_size: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Storage type of the embeddings
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    dtype: String,
    /// Embed only shards j with j mod N = i (run N of these, any order, into one --out)
    #[arg(long, value_parser = parse_part)]
    shard: Option<(usize, usize)>,
    /// Continue a folder this command started (complete shards are kept)
    #[arg(long)]
    resume: bool,
    /// Where the model runs
    #[command(flatten)]
    compute: StoreComputeArgs,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let load = a.compute.load_options()?;
    let cfg = EmbedConfig {
        model: a.model,
        images: a.images,
        out: a.out.clone(),
        shard_size: a.shard_size,
        batch_size: a.batch_size,
        dtype: if a.dtype == "f32" {
            NpyType::F32
        } else {
            NpyType::F16
        },
        part: a.shard,
        resume: a.resume,
        progress: !a.quiet,
    };
    let s = embed(&cfg, &load)?;
    eprintln!(
        "{} of {} images embedded ({}-d) into {}: {} shards written, {} kept, {} unreadable; {:.1} s, {:.1} images/s",
        s.embedded,
        s.images,
        s.dim,
        a.out.display(),
        s.written,
        s.kept,
        s.unreadable,
        s.seconds,
        s.images_per_s
    );
    Ok(())
}
