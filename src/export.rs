//! `distillery export`: any model the tool makes or loads, as an ONNX file.
//!
//! - a student of task-oriented transfer (a stage folder with `student.json` and
//!   `student.safetensors`): its backbone with the task head — classification `logits`
//!   `[B, K]`, or segmentation `logits` `[B, K, H, W]` at the input's resolution — and the class
//!   names and task in the metadata;
//! - a SAK multi-task model (a stage-2 run folder): every task's logits `logits.{task}`
//!   `[B, C, H, W]` at the input resolution (routers with clean gates, heads in eval mode);
//! - a SAK student (a stage-1 run folder): per teacher and level its features
//!   `teacher.{t}.level.{k}` and the stem's patch tokens `stem.level.{k}`, as `features` names
//!   them; teachers and levels in the metadata;
//! - a student-zoo backbone (a timm folder or hub id of a registered family, or a registered
//!   name at random init): pyramid, pooled features and its classifier when it has one.
//!
//! The input is normalised pixels, or uint8 RGB NHWC images with the preprocessing baked in
//! (`include_preprocessing`); the batch dimension is symbolic.

use crate::error::{Error, Result};
use crate::models::export::{
    export_graph, export_onnx_with, ExportOptions, OnnxHead, IMAGE_INPUT, INPUT,
};
use crate::models::LoadOptions;
use crate::transfer::models as transfer;
use std::path::{Path, PathBuf};

/// What to export, and how.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// a transfer stage folder, a timm folder / hub id, or a registered name
    pub model: String,
    pub out: PathBuf,
    /// input (height, width); default: the model's training or preprocessing size
    pub input_hw: Option<(usize, usize)>,
    pub include_preprocessing: bool,
    /// preprocessing to write into a user's ONNX model (`mean`, `std`, `rescale`; only for an
    /// ONNX `model`, which is then copied with these in its metadata)
    pub preprocessing: Vec<(String, String)>,
    pub load: LoadOptions,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Exported {
    pub path: PathBuf,
    pub bytes: u64,
    pub input: String,
    pub input_hw: (usize, usize),
    /// what the model is (`mobilevitv2_050 student (segmentation, 21 classes)`)
    pub description: String,
}

/// A SAK stage-2 run folder with its exported model.
fn is_stage2_run(dir: &Path) -> bool {
    use crate::train::stage2::{MODEL_SPEC, MODEL_WEIGHTS};
    dir.join(MODEL_SPEC).is_file() && dir.join(MODEL_WEIGHTS).is_file()
}

/// A SAK student folder (a stage-1 run): `student.json` names teachers and levels.
fn is_sak_student(dir: &Path) -> bool {
    let spec = dir.join(crate::train::stage1::STUDENT_SPEC);
    dir.join(crate::train::stage1::STUDENT_WEIGHTS).is_file()
        && std::fs::read_to_string(spec)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("teachers").is_some() && v.get("levels").is_some())
}

fn is_transfer_student(dir: &Path) -> bool {
    dir.join(transfer::STUDENT_SPEC).is_file() && dir.join(transfer::STUDENT_WEIGHTS).is_file()
}

/// Export `cfg.model` to `cfg.out` (written atomically; nothing is written on failure).
pub fn export(cfg: &ExportConfig) -> Result<Exported> {
    let dir = Path::new(&cfg.model);
    if let Some((file, _)) = crate::models::onnx_teacher::parse_spec(&cfg.model) {
        return stamp(cfg, Path::new(file));
    }
    if !cfg.preprocessing.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: --mean/--std/--rescale describe a user's ONNX model; distillery's own exports write the model's preprocessing",
            cfg.model
        )));
    }
    let (description, hw) = if is_stage2_run(dir) {
        let (model, info, _) = crate::train::stage2::load_run(dir)?;
        let hw = cfg.input_hw.unwrap_or(info.input_hw);
        let mut opts = options(cfg, "SAK multi-task model", hw);
        let tasks: Vec<serde_json::Value> = model
            .spec
            .tasks
            .iter()
            .map(|(t, c)| serde_json::json!({"task": t.name(), "channels": c}))
            .collect();
        opts.metadata
            .push(("tasks".into(), serde_json::Value::Array(tasks).to_string()));
        opts.metadata.push(("dataset".into(), info.dataset.clone()));
        let p = model.student.as_backbone().preprocess().clone();
        export_graph(&p, &opts, &cfg.out, |g, x| model.onnx_outputs(g, x))?;
        let names: Vec<&str> = model.spec.tasks.iter().map(|(t, _)| t.name()).collect();
        (format!("SAK multi-task model ({})", names.join(", ")), hw)
    } else if is_sak_student(dir) {
        let student = crate::train::stage1::load_student(dir)?;
        let spec = &student.spec;
        let hw = cfg.input_hw.unwrap_or(spec.input_hw());
        let mut opts = options(cfg, "SAK student", hw);
        let teachers: Vec<serde_json::Value> = spec
            .teachers
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dim": t.dim}))
            .collect();
        opts.metadata.push((
            "teachers".into(),
            serde_json::Value::Array(teachers).to_string(),
        ));
        opts.metadata
            .push(("levels".into(), serde_json::json!(spec.levels).to_string()));
        let p = student.as_backbone().preprocess().clone();
        export_graph(&p, &opts, &cfg.out, |g, x| student.onnx_outputs(g, x))?;
        let d = format!(
            "SAK student ({} stem, {} teachers, levels {:?})",
            spec.stem_name(),
            spec.teachers.len(),
            spec.levels
        );
        (d, hw)
    } else if is_transfer_student(dir) {
        let (rec, net) = transfer::load_student(dir, &cfg.load)?;
        let hw = cfg.input_hw.unwrap_or((rec.image_size, rec.image_size));
        let task = match rec.task {
            transfer::TransferTask::Classify => "classification",
            transfer::TransferTask::Segment => "segmentation",
        };
        let mut opts = options(cfg, &rec.source, hw);
        opts.metadata.push(("task".into(), task.into()));
        opts.metadata.push((
            "labels".into(),
            serde_json::to_string(&rec.classes)
                .map_err(|e| Error::Invalid(format!("class names: {e}")))?,
        ));
        let head = net.seg.as_ref().map(|s| s as &dyn OnnxHead);
        export_onnx_with(net.net.as_ref(), &opts, head, &cfg.out)?;
        let d = format!(
            "{} student ({task}, {} classes)",
            rec.source,
            rec.classes.len()
        );
        (d, hw)
    } else {
        let Some((spec, net)) = crate::models::backbone::open(&cfg.model, &cfg.load)? else {
            return Err(Error::Invalid(format!(
                "{}: ONNX export covers transfer students (a stage folder with {}) and the student zoo's families (timm folders, hub ids or registered names); this model is neither",
                cfg.model,
                transfer::STUDENT_SPEC
            )));
        };
        let hw = cfg
            .input_hw
            .unwrap_or_else(|| net.preprocess().crop.unwrap_or((224, 224)));
        let opts = options(cfg, &spec.arch_name(), hw);
        export_onnx_with(net.as_ref(), &opts, None, &cfg.out)?;
        (spec.arch_name(), hw)
    };
    let input = if cfg.include_preprocessing {
        IMAGE_INPUT
    } else {
        INPUT
    };
    written(cfg, input, hw, description)
}

/// What was written to `cfg.out` (its size read back).
fn written(
    cfg: &ExportConfig,
    input: &str,
    input_hw: (usize, usize),
    description: String,
) -> Result<Exported> {
    let bytes = std::fs::metadata(&cfg.out)
        .map_err(|e| Error::io(&cfg.out, e))?
        .len();
    Ok(Exported {
        path: cfg.out.clone(),
        bytes,
        input: input.into(),
        input_hw,
        description,
    })
}

/// A user's ONNX model copied with its preprocessing (`cfg.preprocessing`, `input_size` from
/// `cfg.input_hw`) in `metadata_props`, where ONNX teachers read it.
fn stamp(cfg: &ExportConfig, file: &Path) -> Result<Exported> {
    let mut entries = cfg.preprocessing.clone();
    if let Some((h, w)) = cfg.input_hw {
        entries.push(("input_size".into(), format!("{h},{w}")));
    }
    if entries.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: an ONNX model is only re-written with its preprocessing: give --mean/--std (and --rescale, --size)",
            file.display()
        )));
    }
    crate::onnx::stamp_metadata(file, &cfg.out, &entries)?;
    // the copy must still be a model tract can run
    let m = crate::onnx::OnnxModel::open(&cfg.out, &[])?;
    let hw = cfg.input_hw.or(m.input_hw()).unwrap_or_default();
    written(
        cfg,
        "as the model declares",
        hw,
        format!(
            "{} with its preprocessing in metadata_props",
            file.display()
        ),
    )
}

fn options(cfg: &ExportConfig, name: &str, hw: (usize, usize)) -> ExportOptions {
    ExportOptions {
        include_preprocessing: cfg.include_preprocessing,
        ..ExportOptions::new(name, hw)
    }
}
