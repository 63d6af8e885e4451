//! The models of task-oriented transfer: a foundation model with a task head (the teacher: a
//! linear classifier on its pooled tokens, or the multi-level segmentation head of
//! [`super::heads`]), and a student backbone from the registry (or a timm folder) with its
//! classifier or segmentation decoder, plus the projection head task-agnostic distillation
//! trains.

use super::data::View;
use super::heads::{self, LevelHead, SegDecoder, SegDecoderSpec};
use crate::error::{Error, Result};
use crate::models::backbone::{self, Backbone, BackboneSpec};
use crate::models::layers::{linear, Linear};
use crate::models::student::Init;
use crate::models::{self, EncoderOutput, FeatureRequest, LoadOptions, ModelFiles, VisionEncoder};
use crate::train::engine;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The task transferred.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransferTask {
    /// image classification: logits `[B, K]`
    #[default]
    Classify,
    /// semantic segmentation: logits `[B, K, h, w]`
    Segment,
}

/// Which tokens of the foundation model's final output the task head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Pool {
    /// the class token
    #[serde(rename = "cls")]
    #[value(name = "cls")]
    Cls,
    /// the mean of the patch tokens
    #[serde(rename = "mean")]
    #[value(name = "mean")]
    Mean,
    /// both, concatenated (DINOv2's linear evaluation)
    #[serde(rename = "cls+mean")]
    #[value(name = "cls+mean")]
    ClsMean,
}

impl Pool {
    /// Class token and mean patch token where the model has a class token, else the mean.
    pub fn default_for(enc: &dyn VisionEncoder) -> Self {
        if enc.info().prefix_tokens > 0 {
            Pool::ClsMean
        } else {
            Pool::Mean
        }
    }

    /// Width of the pooled feature of an encoder.
    pub fn dim(self, enc: &dyn VisionEncoder) -> usize {
        let c = enc.info().out_channels;
        match self {
            Pool::ClsMean => 2 * c,
            _ => c,
        }
    }
}

/// Pooled image features `[B, F]` of an encoder's final output (`[B, N, C]` tokens, or a
/// `[B, C, H, W]` map such as SAM's neck, which has only the mean).
pub fn pooled_tokens(out: &EncoderOutput, pool: Pool) -> Result<Tensor> {
    let last = out.last()?;
    if last.rank() == 4 {
        return match pool {
            Pool::Mean => Ok(last.mean(3)?.mean(2)?),
            _ => Err(Error::Invalid(
                "this model has no class token: use pool = \"mean\"".into(),
            )),
        };
    }
    let (_, n, _) = last.dims3()?;
    let p = out.prefix_tokens;
    let cls = || -> Result<Tensor> {
        if p == 0 {
            return Err(Error::Invalid(
                "this model has no class token: use pool = \"mean\"".into(),
            ));
        }
        Ok(last.narrow(1, 0, 1)?.squeeze(1)?)
    };
    let mean = || -> Result<Tensor> { Ok(last.narrow(1, p, n - p)?.mean(1)?) };
    Ok(match pool {
        Pool::Cls => cls()?,
        Pool::Mean => mean()?,
        Pool::ClsMean => Tensor::cat(&[cls()?, mean()?], D::Minus1)?,
    })
}

/// A model that predicts the task: class logits `[B, K]` per image, or `[B, K, h, w]` per
/// location for segmentation (at the model's own output grid).
pub trait Predictor: Send + Sync {
    /// Logits of normalised pixels; `train` lets BatchNorm use batch statistics.
    fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor>;
}

/// A teacher's task head.
pub enum TeacherHead {
    /// linear classifier on the pooled tokens
    Linear(Linear),
    /// segmentation head on the last blocks' patch tokens
    Seg(LevelHead),
    /// the model's own output is the logits (a user's fine-tuned ONNX model)
    Output,
}

/// A foundation model with (optionally) a task head.
pub struct TeacherNet {
    pub encoder: Arc<dyn VisionEncoder>,
    pub pool: Pool,
    pub head: Option<TeacherHead>,
}

impl TeacherNet {
    /// How it sees an image at side `size`: its preprocessing's normalisation.
    pub fn view(&self, image_size: usize) -> View {
        let p = &self.encoder.info().preprocess;
        View {
            image_size,
            mean: p.mean,
            std: p.std,
        }
    }

    /// Pooled features `[B, F]`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let out = self
            .encoder
            .forward_features(x, &FeatureRequest::last_only())?;
        pooled_tokens(&out, self.pool)
    }

    /// Final patch features `[B, C, h, w]` (task-agnostic distillation for segmentation).
    pub fn feature_map(&self, x: &Tensor) -> Result<Tensor> {
        let out = self
            .encoder
            .forward_features(x, &FeatureRequest::last_only())?;
        heads::final_map(&out)
    }
}

impl Predictor for TeacherNet {
    fn logits(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        match &self.head {
            Some(TeacherHead::Linear(l)) => l.forward(&self.features(x)?),
            Some(TeacherHead::Seg(h)) => h.logits(&*self.encoder, x),
            Some(TeacherHead::Output) => {
                let out = self
                    .encoder
                    .forward_features(x, &FeatureRequest::last_only())?;
                let last = out.last()?;
                match last.rank() {
                    // a vector output comes as one token
                    3 if last.dim(1)? == 1 => Ok(last.squeeze(1)?),
                    4 => Ok(last.clone()),
                    _ => Err(Error::Invalid(format!(
                        "the teacher's output {:?} is neither logits [B, K] nor a logit map [B, K, h, w]",
                        last.dims()
                    ))),
                }
            }
            None => Err(Error::Invalid("teacher has no task head".into())),
        }
    }
}

/// What a fine-tuned teacher is (`teacher.json` beside `teacher.safetensors`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherRecord {
    /// the foundation model's folder or hub id (its config and preprocessing are read there)
    pub source: String,
    #[serde(default)]
    pub task: TransferTask,
    pub pool: Pool,
    /// the blocks a segmentation head reads
    #[serde(default)]
    pub blocks: Vec<usize>,
    pub classes: Vec<String>,
    pub image_size: usize,
    /// the backbone was frozen (linear probe): `teacher.safetensors` holds only the head and
    /// the backbone is the source's
    pub frozen: bool,
}

/// What a teacher's head is.
#[derive(Clone, Debug, PartialEq)]
pub enum HeadSpec {
    /// linear classifier on `dim` pooled features
    Linear { dim: usize },
    /// segmentation head on `blocks` of `width` channels
    Seg { blocks: Vec<usize>, width: usize },
}

impl HeadSpec {
    /// The head a task needs on `enc` (pooled as `pool`).
    pub fn for_task(task: TransferTask, enc: &dyn VisionEncoder, pool: Pool) -> Self {
        match task {
            TransferTask::Classify => HeadSpec::Linear { dim: pool.dim(enc) },
            TransferTask::Segment => HeadSpec::Seg {
                blocks: heads::head_blocks(enc.info().depth),
                width: enc.info().width,
            },
        }
    }

    /// Its parameters (under `head.`) for `classes` classes.
    pub fn parameters(&self, classes: usize) -> Vec<(String, Vec<usize>, Init)> {
        match self {
            HeadSpec::Linear { dim } => vec![
                (
                    "head.weight".into(),
                    vec![classes, *dim],
                    Init::Normal(0.01),
                ),
                ("head.bias".into(), vec![classes], Init::Zeros),
            ],
            HeadSpec::Seg { blocks, width } => {
                heads::level_head_params("head", blocks.len(), *width, classes)
            }
        }
    }

    fn build(&self, w: &Weights, classes: usize) -> Result<TeacherHead> {
        Ok(match self {
            HeadSpec::Linear { dim } => TeacherHead::Linear(linear(w, *dim, classes, true)?),
            HeadSpec::Seg { blocks, width } => {
                TeacherHead::Seg(LevelHead::load(w, blocks.clone(), *width, classes)?)
            }
        })
    }
}

pub const TEACHER_WEIGHTS: &str = "teacher.safetensors";
pub const TEACHER_SPEC: &str = "teacher.json";

/// A teacher's files and parameters for fine-tuning.
pub struct TeacherParts {
    pub files: ModelFiles,
    /// the encoder over the source's weights (frozen teachers train only the head)
    pub frozen: Option<Arc<dyn VisionEncoder>>,
    pub pool: Pool,
    pub head: HeadSpec,
    /// trainable parameters: `encoder.*` (the checkpoint's names; not when frozen) and `head.*`
    pub params: VarMap,
    /// the encoder's depth (layer-wise lr decay)
    pub depth: usize,
    /// the normalisation its preprocessing asks for
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The parameters of a teacher to fine-tune: every tensor its encoder reads (under
/// `encoder.`, in f32) unless `freeze`, and a fresh `classes`-way head for `task`.
pub fn teacher_parts(
    source: &str,
    task: TransferTask,
    pool: Option<Pool>,
    classes: usize,
    freeze: bool,
    seed: u64,
    device: &Device,
) -> Result<TeacherParts> {
    let files = models::resolve(source)?;
    let w = files.open_weights(DType::F32, device)?;
    let enc: Arc<dyn VisionEncoder> = Arc::from(models::build(&files, &w)?);
    let pool = pool.unwrap_or_else(|| Pool::default_for(&*enc));
    let head = HeadSpec::for_task(task, &*enc, pool);
    let mut list = Vec::new();
    let mut given = HashMap::new();
    if !freeze {
        for n in w.used_names() {
            let t = w.get_any(&n)?;
            let name = format!("encoder.{n}");
            list.push((name.clone(), t.dims().to_vec(), Init::Zeros));
            given.insert(name, t);
        }
    }
    list.extend(head.parameters(classes));
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let params = engine::init_params(list, given, &mut rng, device, &files.weights_display)?;
    let pre = &enc.info().preprocess;
    Ok(TeacherParts {
        mean: pre.mean,
        std: pre.std,
        depth: enc.info().depth,
        frozen: freeze.then_some(enc),
        files,
        pool,
        head,
        params,
    })
}

/// A teacher built over weights named as [`teacher_parts`] makes them; `frozen` supplies the
/// encoder instead of `encoder.*`.
pub fn build_teacher(
    files: &ModelFiles,
    frozen: Option<&Arc<dyn VisionEncoder>>,
    pool: Pool,
    head: &HeadSpec,
    classes: usize,
    w: &Weights,
) -> Result<TeacherNet> {
    let encoder = match frozen {
        Some(e) => e.clone(),
        None => Arc::from(models::build(files, &w.pp("encoder"))?),
    };
    Ok(TeacherNet {
        encoder,
        pool,
        head: Some(head.build(&w.pp("head"), classes)?),
    })
}

/// Layer-wise learning-rate decay (BEiT / DINOv2 fine-tuning): a parameter of layer `i` of
/// `depth + 1` (0 = embeddings and tokens, `l + 1` = block `l`, `depth + 1` = final norm and
/// head) learns at `decay^(depth + 1 - i)` of the base rate.
pub fn layer_decay_scale(name: &str, depth: usize, decay: f64) -> f64 {
    let top = depth + 1;
    let parts: Vec<&str> = name.split('.').collect();
    let block = parts.windows(2).find_map(|w| {
        matches!(w[0], "layer" | "layers" | "blocks" | "block")
            .then(|| w[1].parse::<usize>().ok())
            .flatten()
    });
    let layer = match block {
        Some(b) => (b + 1).min(top),
        None if name.contains("embed")
            || name.contains("cls_token")
            || name.contains("reg_token")
            || name.contains("register")
            || name.contains("mask_token")
            || name.contains("pos_") =>
        {
            0
        }
        None => top,
    };
    decay.powi((top - layer) as i32)
}

/// Read a fine-tuned teacher from its stage folder (frozen: no gradients reach it).
pub fn load_teacher(dir: &Path, opts: &LoadOptions) -> Result<(TeacherRecord, TeacherNet)> {
    let rec: TeacherRecord = engine::read_json(&dir.join(TEACHER_SPEC))?;
    let files = models::resolve(&rec.source)?;
    let w = Weights::open_file_as(&dir.join(TEACHER_WEIGHTS), opts.dtype, &opts.device)?;
    let frozen: Option<Arc<dyn VisionEncoder>> = if rec.frozen {
        Some(Arc::from(models::load_from_files(&files, opts)?))
    } else {
        None
    };
    let head = match rec.task {
        TransferTask::Classify => HeadSpec::Linear {
            dim: w.shape_of("head.weight").map_or(0, |s| s[1]),
        },
        TransferTask::Segment => HeadSpec::Seg {
            blocks: rec.blocks.clone(),
            width: w.shape_of("head.norms.0.weight").map_or(0, |s| s[0]),
        },
    };
    let net = build_teacher(
        &files,
        frozen.as_ref(),
        rec.pool,
        &head,
        rec.classes.len(),
        &w,
    )?;
    Ok((rec, net))
}

/// Whether the teacher is a user's ONNX model (`PATH.onnx[:OUTPUT]`).
pub fn is_onnx_teacher(source: &str) -> bool {
    models::onnx_teacher::parse_spec(source).is_some()
}

/// A user's fine-tuned teacher as ONNX whose output is the task's logits (`[B, K]`, or
/// `[B, K, h, w]` for segmentation): task-oriented transfer uses it as it is.
pub fn onnx_task_teacher(source: &str, classes: Option<usize>) -> Result<TeacherNet> {
    let enc = models::onnx_teacher::OnnxEncoder::open(source)?;
    let k = enc.info().width;
    if let Some(classes) = classes.filter(|&c| c != k) {
        return Err(Error::Invalid(format!(
            "{source}: the ONNX teacher gives {k} logits per image or pixel; the task has {classes} classes"
        )));
    }
    Ok(TeacherNet {
        encoder: Arc::new(enc),
        pool: Pool::Mean,
        head: Some(TeacherHead::Output),
    })
}

/// A frozen foundation model without a head (task-agnostic distillation's target).
pub fn frozen_teacher(source: &str, pool: Option<Pool>, opts: &LoadOptions) -> Result<TeacherNet> {
    let enc: Arc<dyn VisionEncoder> = Arc::from(models::load(source, opts)?);
    Ok(TeacherNet {
        pool: pool.unwrap_or_else(|| Pool::default_for(&*enc)),
        encoder: enc,
        head: None,
    })
}

/// What a trained student is (`student.json` beside `student.safetensors`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentRecord {
    /// registered name (`mobilevitv2_100`, `resnet18`, `vit-s16`) or timm folder / hub id
    pub source: String,
    #[serde(default)]
    pub task: TransferTask,
    pub image_size: usize,
    pub classes: Vec<String>,
    /// the segmentation decoder's width
    #[serde(default)]
    pub decoder_width: usize,
}

pub const STUDENT_WEIGHTS: &str = "student.safetensors";
pub const STUDENT_SPEC: &str = "student.json";

/// A student's architecture: the backbone (with its classifier for classification) and, for
/// segmentation, the decoder on its pyramid.
pub struct StudentArch {
    pub backbone: Box<dyn BackboneSpec>,
    pub decoder: Option<SegDecoderSpec>,
}

impl StudentArch {
    /// Every parameter: the backbone's, then the decoder's.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = self.backbone.parameters();
        if let Some(d) = &self.decoder {
            p.extend(d.parameters());
        }
        p
    }

    pub fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut b = self.backbone.buffers();
        if let Some(d) = &self.decoder {
            b.extend(d.buffers());
        }
        b
    }

    /// The parameters that carry over from a checkpoint without the task head (the classifier
    /// or the decoder).
    fn body_parameters(&self) -> Result<Vec<(String, Vec<usize>, Init)>> {
        Ok(match self.decoder {
            Some(_) => self.backbone.parameters(),
            None => self.backbone.with_classes(0)?.parameters(),
        })
    }
}

/// The student `source` (a registered name, or a timm folder / hub id whose weights come
/// along) built for `task` with `classes` classes: a fresh classifier, or a segmentation
/// decoder `decoder_width` wide on its pyramid.
pub fn student_arch(
    source: &str,
    image_size: usize,
    task: TransferTask,
    classes: usize,
    decoder_width: usize,
    device: &Device,
) -> Result<(StudentArch, Option<Weights>)> {
    let (spec, own) = match backbone::spec(source, (image_size, image_size)) {
        Some(s) => (s, None),
        None => {
            let opts = LoadOptions {
                dtype: DType::F32,
                device: device.clone(),
            };
            match backbone::read_folder(source, &opts)? {
                Some(f) => (f.spec, Some(f.weights)),
                None => {
                    return Err(Error::Invalid(format!(
                        "student {source:?} is neither a registered name ({}) nor a timm folder of a registered family",
                        backbone::names().join(", ")
                    )))
                }
            }
        }
    };
    let arch = match task {
        TransferTask::Classify => StudentArch {
            backbone: spec.with_classes(classes)?,
            decoder: None,
        },
        TransferTask::Segment => {
            let backbone = spec.with_classes(0)?;
            // the pyramid's shape, from a throwaway build
            let (_, _, probe) = engine::random_backbone(&*backbone, 0, device, DType::F32)?;
            let info = probe.feature_info();
            StudentArch {
                backbone,
                decoder: Some(SegDecoderSpec::new(&info, decoder_width, classes)),
            }
        }
    };
    Ok((arch, own))
}

/// A student's parameters and buffers: from `init` weights where given (the task head too
/// when `keep_head`, else fresh and sized for the task), else drawn from `seed`. `extra` lists
/// training-only parameters (the projection head), always fresh.
pub fn student_params(
    arch: &StudentArch,
    init: Option<&Weights>,
    keep_head: bool,
    extra: Vec<(String, Vec<usize>, Init)>,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, VarMap)> {
    let source = PathBuf::from(arch.backbone.arch_name());
    let (taken, taken_buffers) = if keep_head {
        (arch.parameters(), arch.buffers())
    } else {
        (arch.body_parameters()?, arch.backbone.buffers())
    };
    let mut given = HashMap::new();
    let mut given_buffers = HashMap::new();
    if let Some(w) = init {
        for (name, _, _) in taken {
            given.insert(name.clone(), w.get_any(&name)?);
        }
        for (name, _, _) in taken_buffers {
            given_buffers.insert(name.clone(), w.get_any(&name)?);
        }
    }
    let mut list = arch.parameters();
    list.extend(extra);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let params = engine::init_params(list, given, &mut rng, device, &source)?;
    let buffers = engine::init_params(arch.buffers(), given_buffers, &mut rng, device, &source)?;
    Ok((params, buffers))
}

/// A student backbone with its classifier or segmentation decoder, and the projection head
/// onto a teacher's features while task-agnostic distillation trains it.
pub struct StudentNet {
    pub net: Box<dyn Backbone>,
    pub seg: Option<SegDecoder>,
    pub proj: Option<Linear>,
}

impl StudentNet {
    pub fn build(arch: &StudentArch, w: &Weights, state: &Weights) -> Result<Self> {
        let proj = match w.shape_of("proj.weight") {
            Some(s) => Some(linear(&w.pp("proj"), s[1], s[0], true)?),
            None => None,
        };
        Ok(Self {
            net: arch.backbone.build(w, state)?,
            seg: arch
                .decoder
                .as_ref()
                .map(|d| d.build(w, state))
                .transpose()?,
            proj,
        })
    }

    /// How it sees an image at side `size`: its preprocessing's normalisation.
    pub fn view(&self, image_size: usize) -> View {
        let p = self.net.preprocess();
        View {
            image_size,
            mean: p.mean,
            std: p.std,
        }
    }

    fn last_level(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.net
            .forward_intermediates(x, train)?
            .pop()
            .ok_or_else(|| Error::Invalid("student backbone without levels".into()))
    }

    /// Pooled image features `[B, F]` (timm's `pre_logits`).
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.last_level(x, train)?;
        self.net.pool(&last, train)
    }

    fn proj(&self) -> Result<&Linear> {
        self.proj
            .as_ref()
            .ok_or_else(|| Error::Invalid("student has no projection head".into()))
    }

    /// Pooled features through the projection head.
    pub fn projected(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.proj()?.forward(&self.features(x, train)?)
    }

    /// The last level's feature map through the projection head (per location), `[B, C, h, w]`.
    pub fn projected_map(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.last_level(x, train)?.permute((0, 2, 3, 1))?;
        Ok(self
            .proj()?
            .forward(&last)?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

impl Predictor for StudentNet {
    fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(seg) = &self.seg {
            return seg.forward(&self.net.forward_intermediates(x, train)?, train);
        }
        self.net
            .classify(&self.features(x, train)?)?
            .ok_or_else(|| Error::Invalid("student has no classifier".into()))
    }
}

/// Width of the student's features the projection head reads: pooled (one forward of a small
/// input), or the last level's channels for segmentation.
pub fn feature_dim(net: &StudentNet, image_size: usize) -> Result<usize> {
    if net.seg.is_some() {
        return net
            .net
            .feature_info()
            .last()
            .map(|f| f.channels)
            .ok_or_else(|| Error::Invalid("student backbone without levels".into()));
    }
    let x = Tensor::zeros((1, 3, image_size, image_size), DType::F32, net.net.device())?;
    Ok(net.features(&x, false)?.dim(1)?)
}

/// Save a student: its parameters (without the projection head) and buffers in the family's
/// checkpoint names, and its record.
pub fn export_student(
    dir: &Path,
    rec: &StudentRecord,
    params: &VarMap,
    buffers: &VarMap,
) -> Result<()> {
    let mut t: HashMap<String, Tensor> = engine::vars_of(params)?
        .into_iter()
        .filter(|(n, _)| !n.starts_with("proj."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    t.extend(
        engine::vars_of(buffers)?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone())),
    );
    crate::atomic::write_safetensors(&t, &dir.join(STUDENT_WEIGHTS))?;
    engine::write_json(&dir.join(STUDENT_SPEC), rec)
}

/// Read a trained student from its stage folder.
pub fn load_student(dir: &Path, opts: &LoadOptions) -> Result<(StudentRecord, StudentNet)> {
    let rec: StudentRecord = engine::read_json(&dir.join(STUDENT_SPEC))?;
    let (arch, _) = student_arch(
        &rec.source,
        rec.image_size,
        rec.task,
        rec.classes.len(),
        rec.decoder_width,
        &opts.device,
    )?;
    let w = Weights::open_file_as(&dir.join(STUDENT_WEIGHTS), opts.dtype, &opts.device)?;
    let net = StudentNet::build(&arch, &w, &w)?;
    Ok((rec, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_decay_follows_block_index() {
        let d = 0.5;
        // 12 blocks: embeddings at 0.5^13, block 0 at 0.5^12, block 11 at 0.5, head at 1.
        let s = |n| layer_decay_scale(n, 12, d);
        assert_eq!(
            s("encoder.embeddings.patch_embeddings.projection.weight"),
            d.powi(13)
        );
        assert_eq!(s("encoder.embeddings.cls_token"), d.powi(13));
        assert_eq!(
            s("encoder.encoder.layer.0.attention.attention.query.weight"),
            d.powi(12)
        );
        assert_eq!(s("encoder.blocks.11.mlp.fc1.weight"), d);
        assert_eq!(
            s("encoder.vision_model.encoder.layers.5.mlp.fc1.weight"),
            d.powi(7)
        );
        assert_eq!(s("encoder.layernorm.weight"), 1.0);
        assert_eq!(s("head.weight"), 1.0);
    }
}
