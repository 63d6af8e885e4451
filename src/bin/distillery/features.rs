//! `distillery features`: run an encoder (or an exported student) and write its outputs.

use crate::common::{emit, levels_text, load_model, ModelArgs};
use anyhow::{bail, Result};
use distillery::device::compute_precision;
use distillery::features::{
    describe, output_tensors, read_images, read_pixels, student_pixels, student_tensors,
};
use distillery::models::FeatureRequest;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    if let Some(m) = &a.model.model {
        let dir = Path::new(m);
        if dir.join(distillery::train::stage1::STUDENT_SPEC).is_file() {
            if a.pca.is_some() {
                bail!("--pca draws a model's features; for a distilled student run `distillery demo` pictures come from its teachers");
            }
            return student(dir, &a);
        }
    }
    if let Some(m) = &a.model.model {
        if distillery::models::onnx_teacher::parse_spec(m).is_some() {
            if a.pca.is_some() {
                bail!("--pca draws a ViT's patch features; {m} is an ONNX model");
            }
            return onnx(m, &a);
        }
    }
    if let Some(m) = &a.model.model {
        let opts = a.model.compute.load_options()?;
        if let Some((_, net)) = distillery::models::backbone::load(m, &opts)? {
            if a.pca.is_some() {
                bail!("--pca draws a ViT's patch features; {m} is a CNN");
            }
            return backbone(m, net.as_ref(), &a, &opts);
        }
    }
    if a.pca.is_some() && a.pixels.is_some() {
        bail!("--pca needs --image (it draws the images next to their features)");
    }
    let (name, enc) = load_model(&a.model)?;
    let info = enc.info().clone();
    let dev = a.model.compute.device.open()?;
    let image = if a.pixels.is_none() && a.image.is_empty() {
        let sample = distillery::embedded::sample_image()?;
        eprintln!("input: embedded sample image {}", sample.display());
        vec![sample]
    } else {
        a.image.clone()
    };
    let x = match &a.pixels {
        Some(p) => read_pixels(p, &dev)?,
        None => read_images(&image, &info.preprocess, &dev)?,
    };
    let c = &a.model.compute;
    let x = x.to_dtype(compute_precision(&dev, c.dtype, c.emulate_half).dtype())?;
    let (b, _, h, w) = x.dims4()?;
    eprintln!("model: {name}");
    eprintln!("loaded: {} batch={b}", describe(&info, (h, w)));
    let req = match (&a.pca, a.levels.as_str()) {
        (Some(_), "all") => FeatureRequest::blocks(&info.default_levels),
        _ => FeatureRequest::parse(&a.levels, &info)?,
    };
    let t0 = std::time::Instant::now();
    let o = enc.forward_features(&x, &req)?;
    if let Some(p) = &a.pca {
        pca_picture(p, &image, &o, &name)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tensors = output_tensors(&o)?;
    eprintln!("forward: {secs:.3} s ({:.1} images/s)", b as f64 / secs);
    emit(&tensors, a.out.as_deref())
}

/// `features --model` on a CNN backbone (timm naming): `stages.{i}`, `pre_logits`, `logits`.
fn backbone(
    name: &str,
    net: &dyn distillery::models::backbone::Backbone,
    a: &Args,
    opts: &distillery::models::LoadOptions,
) -> Result<()> {
    let x = match (&a.pixels, a.image.is_empty()) {
        (Some(p), _) => read_pixels(p, &opts.device)?,
        (None, false) => read_images(&a.image, net.preprocess(), &opts.device)?,
        (None, true) => {
            let sample = distillery::embedded::sample_image()?;
            eprintln!("input: embedded sample image {}", sample.display());
            read_images(&[sample], net.preprocess(), &opts.device)?
        }
    };
    let x = x.to_dtype(opts.dtype)?;
    eprintln!("model: {name}");
    eprintln!("levels (channels@/stride): {}", levels_text(net));
    let t0 = std::time::Instant::now();
    let tensors = distillery::features::backbone_tensors(net, &x)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "forward: {secs:.3} s ({:.1} images/s)",
        x.dim(0)? as f64 / secs
    );
    emit(&tensors, a.out.as_deref())
}

/// `features --model PATH.onnx[:OUTPUT]`: the named output, under its name, as the model gives
/// it.
fn onnx(spec: &str, a: &Args) -> Result<()> {
    use distillery::VisionEncoder;
    let enc = distillery::models::onnx_teacher::OnnxEncoder::open(spec)?;
    let cpu = candle_core::Device::Cpu;
    let x = match (&a.pixels, a.image.is_empty()) {
        (Some(p), _) => read_pixels(p, &cpu)?,
        (None, false) => read_images(&a.image, &enc.info().preprocess, &cpu)?,
        (None, true) => {
            let sample = distillery::embedded::sample_image()?;
            eprintln!("input: embedded sample image {}", sample.display());
            read_images(&[sample], &enc.info().preprocess, &cpu)?
        }
    };
    eprintln!("model: {spec} (output {}, run by tract)", enc.output_name());
    let t0 = std::time::Instant::now();
    let y = enc.forward_raw(&x)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "forward: {secs:.3} s ({:.1} images/s)",
        x.dim(0)? as f64 / secs
    );
    let tensors = std::collections::HashMap::from([(enc.output_name().to_string(), y)]);
    emit(&tensors, a.out.as_deref())
}

/// `features --model <RUN_DIR>` on an exported SAK student.
fn student(dir: &Path, a: &Args) -> Result<()> {
    let student = distillery::train::stage1::load_student(dir)?;
    let spec = &student.spec;
    let x = student_pixels(spec, &a.image, a.pixels.as_deref(), student.device())?;
    eprintln!(
        "student: {} stem trained at {} px, levels {:?}",
        spec.stem_name(),
        spec.image_size,
        spec.levels
    );
    for (t, slot) in spec.teachers.iter().enumerate() {
        eprintln!("teacher.{t} = {} (width {})", slot.name, slot.dim);
    }
    emit(&student_tensors(&student, &x)?, a.out.as_deref())
}

/// `--pca`: pictures of the computed hidden states (patch tokens) of a model.
fn pca_picture(
    path: &Path,
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
