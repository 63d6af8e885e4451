//! `distillery demo`: a real multi-teacher distillation on data embedded in the binary (two tiny
//! teachers of different families, public-domain photographs, a small student), then the
//! pictures a user looks at: `loss.png` and, per teacher, its features next to the student's
//! as the first three PCA components in RGB.

use crate::error::{Error, Result};
use crate::models::student::Student;
use crate::models::{FeatureRequest, LoadOptions};
use crate::teacher::Teacher;
use crate::train::engine::{RunOptions, RunPaths, RunSummary};
use crate::train::stage1::{self, DistillConfig};
use crate::viz::{map_rows, photo_tile, write_grid, Pca3};
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub steps: u64,
    pub progress: bool,
    /// epochs of the transfer part's distillation and fine-tuning (the teacher gets 3x);
    /// 0 skips the transfer part
    pub transfer_epochs: u64,
}

/// What it produced.
#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub run: RunSummary,
    pub first_loss: f64,
    pub pictures: Vec<PathBuf>,
    /// the transfer part's report (in `out/transfer`)
    pub transfer: Option<crate::transfer::Report>,
}

/// Photos shown in the pictures (of the embedded set).
const SHOWN: &[&str] = &["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"];

/// The recipe: both embedded teachers, the `vit-n8` student at 128 px, batch 8.
pub fn demo_config(out: &Path, steps: u64) -> Result<DistillConfig> {
    let teachers = crate::embedded::demo_teacher_dirs()?
        .iter()
        .map(|d| d.to_string_lossy().to_string())
        .collect();
    Ok(DistillConfig {
        out: Some(out.to_path_buf()),
        teachers,
        student: "vit-n8".into(),
        images: crate::embedded::demo_photos_dir()?,
        image_size: 128,
        batch_size: 8,
        steps,
        lr: 2e-3,
        warmup_epochs: 2.0,
        checkpoint_every: 50,
        ..DistillConfig::default()
    })
}

/// Where a demo goes when no folder is named: `runs/demo`, or `runs/demo-2`, ... when taken.
pub fn default_out() -> PathBuf {
    (1..)
        .map(|k| match k {
            1 => PathBuf::from("runs/demo"),
            k => PathBuf::from(format!("runs/demo-{k}")),
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from("runs/demo"))
}

/// Run the demo into `opts.out` (which must not hold a run yet).
pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    let cfg = demo_config(&opts.out, opts.steps)?;
    let run = stage1::run(
        &cfg,
        &opts.out,
        &RunOptions {
            progress: opts.progress,
            ..RunOptions::default()
        },
    )?;
    let first_loss = first_metric(&opts.out.join("metrics.jsonl"))?;
    let photos: Vec<PathBuf> = SHOWN.iter().map(|n| cfg.images.join(n)).collect();
    let pictures = compare_pictures(&opts.out, &cfg.teachers, &photos)?;
    let transfer = if opts.transfer_epochs > 0 {
        let tout = opts.out.join("transfer");
        let tcfg = transfer_config(&tout, opts.transfer_epochs)?;
        Some(crate::transfer::run(
            &tcfg,
            &tout,
            &RunOptions {
                progress: opts.progress,
                ..RunOptions::default()
            },
            None,
        )?)
    } else {
        None
    };
    Ok(DemoSummary {
        run,
        first_loss,
        pictures,
        transfer,
    })
}

/// The transfer part: the embedded DINOv2 teacher fine-tuned on 200 embedded handwritten
/// digits, distilled into a `vit-n8` student on 300 unlabelled ones, the student fine-tuned;
/// compared with the same student fine-tuned from scratch, on 200 held-out digits.
pub fn transfer_config(out: &Path, epochs: u64) -> Result<crate::transfer::TransferConfig> {
    use crate::transfer::{Mode, TransferConfig};
    let digits = crate::embedded::demo_digits_dir()?;
    let teacher = crate::embedded::demo_teacher_dirs()?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Invalid("no embedded teacher".into()))?;
    Ok(TransferConfig {
        out: Some(out.to_path_buf()),
        teacher: teacher.to_string_lossy().to_string(),
        student: "vit-n8".into(),
        labeled: digits.join("train"),
        test: digits.join("test"),
        transfer: Some(digits.join("unlabeled")),
        modes: vec![Mode::TaskOriented, Mode::Scratch],
        image_size: 32,
        teacher_image_size: 32,
        batch_size: 32,
        teacher_epochs: 3 * epochs,
        distill_epochs: epochs,
        finetune_epochs: epochs,
        teacher_lr: 1e-3,
        layer_decay: 1.0,
        distill_lr: 2e-3,
        finetune_lr: 1e-3,
        min_crop_scale: Some(0.5),
        ..TransferConfig::default()
    })
}

fn first_metric(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["loss"].as_f64())
        .ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            msg: "no loss recorded".into(),
        })
}

/// The student as trained: from the run's checkpoint, aligners included, so its outputs live
/// in each teacher's feature space.
fn trained_student(run: &Path) -> Result<Student> {
    let paths = RunPaths::new(run);
    let spec = stage1::load_student(run)?.spec;
    let w = Weights::open_file(&paths.checkpoint())?;
    Student::build(&spec, &w.pp("model"))
}

/// Per teacher, a picture `pca-<teacher>.png` in `run`: rows are photos; columns the photo, then
/// for the first and the last distilled level the teacher's features and the student's
/// (aligned) features, both coloured with the teacher's PCA basis, so equal colours mean equal
/// features.
pub fn compare_pictures(
    run: &Path,
    teachers: &[String],
    photos: &[PathBuf],
) -> Result<Vec<PathBuf>> {
    let student = trained_student(run)?;
    let spec = student.spec.clone();
    let loaded = Teacher::load_all(teachers, spec.image_size, &[], &LoadOptions::default())?;
    let images = photos
        .iter()
        .map(|p| crate::preprocess::read_image(p))
        .collect::<Result<Vec<_>>>()?;
    let side = spec.image_size as u32;
    let crop =
        |img: &image::RgbImage, size: usize, mean: [f32; 3], std: [f32; 3]| -> Result<Tensor> {
            let tile = photo_tile(img, (size as u32, size as u32));
            let t = Tensor::from_vec(tile.into_raw(), (size, size, 3), &Device::Cpu)?
                .permute((2, 0, 1))?
                .to_dtype(candle_core::DType::F32)?;
            let t = (t / 255.0)?;
            let m = Tensor::new(&mean, &Device::Cpu)?.reshape((3, 1, 1))?;
            let s = Tensor::new(&std, &Device::Cpu)?.reshape((3, 1, 1))?;
            Ok(t.broadcast_sub(&m)?.broadcast_div(&s)?)
        };
    let batch = |size: usize, mean: [f32; 3], std: [f32; 3]| -> Result<Tensor> {
        let items = images
            .iter()
            .map(|i| crop(i, size, mean, std))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&items, 0)?)
    };
    let sx = batch(spec.image_size, spec.mean, spec.std)?;
    let sout = student.forward(&sx, false, true)?;
    let mut written = Vec::new();
    for (k, teacher) in loaded.iter().enumerate() {
        let (mean, std) = teacher.norm();
        let tx = batch(teacher.size(), mean, std)?;
        let out = teacher
            .encoder
            .forward_features(&tx, &FeatureRequest::blocks(&teacher.levels))?;
        let nl = teacher.levels.len();
        let shown_levels = if nl > 1 { vec![0, nl - 1] } else { vec![0] };
        let mut columns = vec!["photo".to_string()];
        let mut cells: Vec<Vec<image::RgbImage>> = images
            .iter()
            .map(|i| vec![photo_tile(i, (side, side))])
            .collect();
        for &l in &shown_levels {
            let tmap = out.feature_map(teacher.levels[l] + 1)?;
            let smap = &sout.aligned[k][l];
            let (trows, srows) = (map_rows(&tmap)?, map_rows(smap)?);
            let pca = Pca3::fit(&trows.concat())?;
            let tg = (tmap.dim(2)?, tmap.dim(3)?);
            let sg = (smap.dim(2)?, smap.dim(3)?);
            for (i, row) in cells.iter_mut().enumerate() {
                let timg = pca.image(&trows[i], tg, 1);
                let simg = pca.image(&srows[i], sg, 1);
                let up = |im: image::RgbImage| {
                    image::imageops::resize(&im, side, side, image::imageops::FilterType::Nearest)
                };
                row.push(up(timg));
                row.push(up(simg));
            }
            columns.push(format!("{}\nblock {}", teacher.name, teacher.levels[l]));
            columns.push(format!("student\nlevel {l}"));
        }
        let path = run.join(format!("pca-{}.png", teacher.name));
        write_grid(
            &path,
            &format!(
                "{} vs the distilled student: first 3 PCA components of patch features (teacher's basis)",
                teacher.name
            ),
            &columns,
            &cells,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// `features --pca`: a picture of a model's features on images: per image a row with the image
/// and, for each requested hidden state, its patch features' first three PCA components (one
/// basis per column, fitted over all the images).
pub fn model_pictures(
    path: &Path,
    images: &[image::RgbImage],
    columns: Vec<(String, Tensor)>,
    title: &str,
) -> Result<()> {
    let side = 128u32;
    let mut cells: Vec<Vec<image::RgbImage>> = images
        .iter()
        .map(|i| vec![photo_tile(i, (side, side))])
        .collect();
    let mut names = vec!["image".to_string()];
    for (name, map) in columns {
        let rows = map_rows(&map)?;
        let pca = Pca3::fit(&rows.concat())?;
        let g = (map.dim(2)?, map.dim(3)?);
        let scale = (side as usize / g.0.max(g.1)).max(1) as u32;
        for (i, row) in cells.iter_mut().enumerate() {
            row.push(pca.image(&rows[i], g, scale));
        }
        names.push(name);
    }
    write_grid(path, title, &names, &cells)
}
