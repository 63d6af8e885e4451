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
        let opts = a.model.compute.load_options()?;
        // a registered student name (not a folder): its architecture at random init
        let named = backbone::open(m, &opts)?;
        if let Some((spec, net)) = named {
            println!("model: {m}");
            println!("architecture: {}", spec.arch_name());
            println!(
                "parameters: {} (+ {} buffer values)",
                backbone::count(&spec.parameters()),
                backbone::count(&spec.buffers())
            );
            let hw = net.preprocess().crop.unwrap_or((224, 224));
            let macs = backbone::macs(net.as_ref(), hw)?;
            println!(
                "MACs at {}x{}: {:.3} G ({macs})",
                hw.0,
                hw.1,
                macs as f64 / 1e9
            );
            println!("levels (channels@/stride): {}", levels_text(net.as_ref()));
            println!("preprocess: {:?}", net.preprocess());
            return Ok(());
        }
    }
    let (name, enc) = load_model(&a.model)?;
    let info = enc.info();
    println!("model: {name}");
    println!("{}", describe(info, info.input_hw));
    println!("sak levels (0-based blocks): {:?}", info.default_levels);
    println!("preprocess: {:?}", info.preprocess);
    Ok(())
}
