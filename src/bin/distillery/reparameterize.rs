//! `distillery reparameterize`: fold a FastViT's training form into its inference form.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A training-form FastViT: timm folder or hub id
    #[arg(long)]
    model: String,
    /// Folder for the folded model (config.json + model.safetensors)
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let spec = distillery::models::fastvit::reparameterize_folder(&a.model, &a.out)?;
    let params = distillery::models::backbone::count(
        &distillery::models::backbone::BackboneSpec::parameters(&spec),
    );
    println!(
        "{} -> {}: {} ({params} parameters)",
        a.model,
        a.out.display(),
        distillery::models::backbone::BackboneSpec::arch_name(&spec)
    );
    Ok(())
}
