//! `distillery info`: what a model folder or hub id contains.

use crate::common::{load_model, ModelArgs};
use anyhow::Result;
use distillery::features::describe;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: Args) -> Result<()> {
    let (name, enc) = load_model(&a.model)?;
    let info = enc.info();
    println!("model: {name}");
    println!("{}", describe(info, info.image_size));
    println!("sak levels (0-based blocks): {:?}", info.default_levels);
    println!("preprocess: {:?}", info.preprocess);
    Ok(())
}
