//! `distillery info`: what a model folder or hub id contains.

use crate::common::{levels_text, load_model, ModelArgs};
use anyhow::Result;
use distillery::features::describe;
use distillery::models::backbone;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(m) = &a.model.model {
        if let Some((spec, net)) = backbone::load(m, &a.model.compute.load_options()?)? {
            println!("model: {m}");
            println!("architecture: {}", spec.arch_name());
            println!(
                "parameters: {} (+ {} buffer values)",
                backbone::count(&spec.parameters()),
                backbone::count(&spec.buffers())
            );
            println!("levels (channels@/stride): {}", levels_text(net.as_ref()));
            println!("preprocess: {:?}", net.preprocess());
            return Ok(());
        }
    }
    let (name, enc) = load_model(&a.model)?;
    let info = enc.info();
    println!("model: {name}");
    println!("{}", describe(info, info.image_size));
    println!("sak levels (0-based blocks): {:?}", info.default_levels);
    println!("preprocess: {:?}", info.preprocess);
    Ok(())
}
