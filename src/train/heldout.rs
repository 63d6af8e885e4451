//! What a distilled student really learned, on held-out images: per teacher and level the raw
//! and centred cosine with the teacher's features (see [`crate::metrics::fidelity`]) and the
//! held-out distillation loss. Used by `distillery eval-distill RUN --images DIR` and by
//! `distill --eval-images DIR --eval-every N` (logged to `metrics.jsonl`, plotted in
//! `loss.png`).
//!
//! Each held-out image is its largest centred square, fed to the student at its training size
//! and to every teacher at its own geometry; the teachers run once and their maps are kept (at
//! the grid the loss compares on: the larger of the student's and the teacher's). The student
//! is compared in the teacher's space: its aligner output, mapped back to the teacher's scale
//! when it was trained on normalised targets.

use super::engine::{self, RunPaths};
use super::stage1::{new_student_params, student_stem, DistillConfig, Geometry};
use crate::data::{CropBox, ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::interp::resize_bilinear;
use crate::losses::{compare_grid, teacher_loss, FeatureLoss};
use crate::metrics::fidelity::{token_mean, Fidelity, FidelityReport};
use crate::models::student::{Student, StudentSpec};
use crate::target_norm::TargetStats;
use crate::teacher::Teacher;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Held-out images prepared once: student inputs and the teachers' maps.
pub struct HeldOut {
    /// student input batches `[b, 3, S, S]` (host)
    pixels: Vec<Tensor>,
    /// `[batch][teacher][level]` teacher maps on the comparison grid (device)
    teacher_maps: Vec<Vec<Vec<Tensor>>>,
    /// `[teacher][level]` teacher mean feature over every held-out token
    means: Vec<Vec<Tensor>>,
    teachers: Vec<String>,
    /// 0-based stem blocks of the levels
    blocks: Vec<usize>,
    pub images: usize,
    pub skipped: usize,
}

/// One (teacher, level) row.
#[derive(Clone, Debug, Serialize)]
pub struct LevelFidelity {
    pub model: String,
    pub teacher: String,
    pub level: usize,
    pub block: usize,
    #[serde(flatten)]
    pub report: FidelityReport,
}

/// A held-out evaluation of one student.
#[derive(Clone, Debug, Serialize)]
pub struct HeldOutEval {
    /// distillation loss (the run's loss and target normalisation), image-weighted mean
    pub loss: f64,
    pub levels: Vec<LevelFidelity>,
}

impl HeldOutEval {
    /// Metric lines for `metrics.jsonl`: `eval/loss` and
    /// `eval/{teacher}.l{k}.{raw_cos,centred_cos}`.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![("eval/loss".to_string(), self.loss)];
        for l in &self.levels {
            let key = format!("eval/{}.l{}", l.teacher, l.level);
            m.push((format!("{key}.raw_cos"), l.report.raw_cos));
            m.push((format!("{key}.centred_cos"), l.report.centred_cos));
        }
        m
    }
}

/// The largest centred square of a `w x h` image, unflipped.
fn centre_square((w, h): (u32, u32)) -> CropBox {
    let side = w.min(h);
    CropBox {
        top: (h - side) / 2,
        left: (w - side) / 2,
        height: side,
        width: side,
        flip: false,
    }
}

fn on_grid(map: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = map.dims4()?;
    if (h, w) == grid {
        Ok(map.clone())
    } else {
        resize_bilinear(&map.to_dtype(DType::F32)?, grid)
    }
}

impl HeldOut {
    /// Decode up to `max_images` images of `data` (unreadable ones are skipped with a
    /// warning), run the teachers once and keep their maps.
    pub fn prepare(
        data: &dyn ImageSource,
        student: &Student,
        teachers: &[Teacher],
        max_images: usize,
        batch_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let spec = &student.spec;
        let geo = Geometry::new(spec, teachers);
        let n = data.len().min(max_images.max(1));
        let grids = student.level_grids()?;
        let mut pixels = Vec::new();
        let mut teacher_maps = Vec::new();
        let (mut images, mut skipped) = (0, 0);
        let idx: Vec<usize> = (0..n).collect();
        for chunk in idx.chunks(batch_size.max(1)) {
            let mut st = Vec::new();
            let mut ts: Vec<Vec<Tensor>> = vec![Vec::new(); teachers.len()];
            for &i in chunk {
                let img = match data.load(i) {
                    Ok(img) => img,
                    Err(e) => {
                        tracing::warn!("held-out: skipping unreadable image: {e}");
                        skipped += 1;
                        continue;
                    }
                };
                let (s, t) = geo.inputs(&img, &centre_square(img.dimensions()))?;
                st.push(s);
                for (k, x) in t.into_iter().enumerate() {
                    ts[k].push(x);
                }
            }
            if st.is_empty() {
                continue;
            }
            images += st.len();
            pixels.push(Tensor::stack(&st, 0)?);
            let mut per_teacher = Vec::new();
            for (t, px) in teachers.iter().zip(&ts) {
                let feats = t.features(&Tensor::stack(px, 0)?)?;
                per_teacher.push(
                    feats
                        .iter()
                        .zip(&grids)
                        .map(|(f, &grid)| {
                            let (_, _, h, w) = f.dims4()?;
                            on_grid(
                                &f.to_device(device)?.to_dtype(DType::F32)?,
                                compare_grid(grid, (h, w)),
                            )
                        })
                        .collect::<Result<Vec<_>>>()?,
                );
            }
            teacher_maps.push(per_teacher);
        }
        if images == 0 {
            return Err(Error::BadInput {
                path: data.root(),
                msg: "no readable held-out image".into(),
            });
        }
        let means = (0..teachers.len())
            .map(|k| {
                (0..spec.levels.len())
                    .map(|l| {
                        let maps: Vec<Tensor> =
                            teacher_maps.iter().map(|b| b[k][l].clone()).collect();
                        token_mean(&maps)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pixels,
            teacher_maps,
            means,
            teachers: teachers.iter().map(|t| t.name.clone()).collect(),
            blocks: spec.levels.clone(),
            images,
            skipped,
        })
    }

    /// Evaluate `student` (parameters in `dtype`; `model` names it in the rows): fidelity in
    /// the teacher's space and the held-out loss with the run's loss `kind` and target
    /// statistics.
    pub fn evaluate(
        &self,
        student: &Student,
        dtype: DType,
        model: &str,
        kind: FeatureLoss,
        stats: Option<&TargetStats>,
    ) -> Result<HeldOutEval> {
        let mut acc: Vec<Vec<Fidelity>> = self
            .means
            .iter()
            .map(|l| l.iter().map(Fidelity::new).collect::<Result<_>>())
            .collect::<Result<_>>()?;
        let mut loss = 0.0;
        for (px, maps) in self.pixels.iter().zip(&self.teacher_maps) {
            let x = px.to_device(student.device())?.to_dtype(dtype)?;
            let out = student.forward(&x, false, true)?;
            for (k, per) in maps.iter().enumerate() {
                let norms = stats.and_then(|s| s.levels.get(k)).map(Vec::as_slice);
                let l = teacher_loss(&out.aligned[k], per, kind, norms)?;
                loss += l.to_scalar::<f32>()? as f64 * x.dim(0)? as f64;
                for (l, t) in per.iter().enumerate() {
                    let s = out.aligned[k][l].to_dtype(DType::F32)?;
                    let s = match stats {
                        Some(st) => st.get(k, l)?.denormalize(&s)?,
                        None => s,
                    };
                    let (_, _, h, w) = t.dims4()?;
                    acc[k][l].add(&on_grid(&s, (h, w))?, t)?;
                }
            }
        }
        let levels = acc
            .iter()
            .enumerate()
            .flat_map(|(k, per)| {
                per.iter().enumerate().map(move |(l, f)| LevelFidelity {
                    model: model.to_string(),
                    teacher: self.teachers[k].clone(),
                    level: l,
                    block: self.blocks[l],
                    report: f.report(),
                })
            })
            .collect();
        Ok(HeldOutEval {
            loss: loss / self.images.max(1) as f64,
            levels,
        })
    }
}

/// `eval-distill` settings.
#[derive(Clone, Debug)]
pub struct EvalDistillConfig {
    /// a stage-1 run folder (its checkpoint is evaluated)
    pub run: PathBuf,
    /// held-out images (folder tree, list file, tar)
    pub images: PathBuf,
    /// also evaluate the student at its initialisation (same seed and stem source)
    pub baseline: bool,
    pub max_images: usize,
    pub batch_size: usize,
    pub device: Device,
}

/// The file `eval-distill` writes its JSON lines to.
pub const EVAL_FILE: &str = "eval-distill.jsonl";

/// Evaluate a run's student (and optionally its initialisation) on held-out images; writes
/// one JSON line per (model, teacher, level) to `RUN/eval-distill.jsonl`.
pub fn eval_distill(cfg: &EvalDistillConfig) -> Result<(HeldOut, Vec<HeldOutEval>)> {
    let paths = RunPaths::new(&cfg.run);
    let ck = paths.checkpoint();
    if !ck.is_file() {
        return Err(Error::BadInput {
            path: ck,
            msg: "not a distill run folder (no checkpoint)".into(),
        });
    }
    let (tensors, state) = super::checkpoint::load(&ck, &cfg.device)?;
    let saved = engine::Saved {
        path: ck.clone(),
        tensors,
        state,
    };
    let run_cfg: DistillConfig = saved.config()?;
    let spec: StudentSpec = saved.spec()?.ok_or_else(|| Error::BadInput {
        path: ck.clone(),
        msg: "checkpoint has no student spec".into(),
    })?;
    let params = engine::model_tensors(&saved.tensors);
    let student = Student::build_with_state(
        &spec,
        &Weights::from_tensors(params, &ck)?,
        &Weights::from_tensors(engine::buffer_tensors_of(&saved.tensors), &ck)?,
    )?;
    let load = crate::models::LoadOptions {
        dtype: DType::F32,
        device: cfg.device.clone(),
    };
    let teachers = Teacher::load_all(
        &run_cfg.teachers,
        run_cfg.image_size,
        &run_cfg.teacher_sizes,
        &load,
    )?;
    if teachers.len() != spec.teachers.len() {
        return Err(Error::BadInput {
            path: ck,
            msg: format!(
                "the run has {} teachers, its student {} adapter paths",
                teachers.len(),
                spec.teachers.len()
            ),
        });
    }
    let stats = super::stage1::load_target_stats(&cfg.run, &spec, &cfg.device)?;
    let data = ImageSet::open(&cfg.images)?;
    let held = HeldOut::prepare(
        &data,
        &student,
        &teachers,
        cfg.max_images,
        cfg.batch_size,
        &cfg.device,
    )?;
    let mut evals = vec![held.evaluate(
        &student,
        DType::F32,
        "student",
        run_cfg.loss,
        stats.as_ref(),
    )?];
    if cfg.baseline {
        let (_, _, stem) = student_stem(&run_cfg.student, spec.image_size)?;
        let (vm, bm) = new_student_params(&spec, stem.as_ref(), run_cfg.seed, &cfg.device)?;
        let init = Student::build_with_state(
            &spec,
            &Weights::from_vars(&vm, Path::new("init"))?,
            &Weights::from_vars(&bm, Path::new("init"))?,
        )?;
        evals.push(held.evaluate(&init, DType::F32, "init", run_cfg.loss, stats.as_ref())?);
    }
    let mut text = String::new();
    for e in &evals {
        for l in &e.levels {
            let mut v = serde_json::to_value(l).map_err(|e| Error::Invalid(e.to_string()))?;
            v["held_out_loss"] = serde_json::json!(e.loss);
            text.push_str(&v.to_string());
            text.push('\n');
        }
    }
    crate::atomic::write_bytes(&paths.file(EVAL_FILE), text.as_bytes())?;
    Ok((held, evals))
}

/// The evaluations as a text table.
pub fn table(evals: &[HeldOutEval]) -> String {
    let mut s = format!(
        "{:<8} {:<16} {:>5} {:>5} {:>8} {:>9} {:>7} {:>8} {:>9}\n",
        "model", "teacher", "level", "block", "raw cos", "centred", "spread", "map cos", "loss"
    );
    for e in evals {
        for l in &e.levels {
            let r = &l.report;
            s.push_str(&format!(
                "{:<8} {:<16} {:>5} {:>5} {:>8.4} {:>9.4} {:>7.4} {:>8.4} {:>9.4}\n",
                l.model,
                l.teacher,
                l.level,
                l.block,
                r.raw_cos,
                r.centred_cos,
                r.centred_cos_std,
                r.map_cos,
                e.loss
            ));
        }
    }
    s
}
