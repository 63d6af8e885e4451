//! Speed measurement: a forward pass of a ViT-B/16-size encoder (random weights written as a
//! transformers ViT checkpoint and loaded through the normal path).

use crate::error::{Error, Result};
use crate::models::{FeatureRequest, LoadOptions, VisionEncoder};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Size of a random ViT checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct VitSize {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub patch: usize,
    pub image: usize,
}

impl VitSize {
    pub const BASE16: VitSize = VitSize {
        dim: 768,
        depth: 12,
        heads: 12,
        mlp: 3072,
        patch: 16,
        image: 224,
    };
}

/// Write a transformers-layout ViT checkpoint with random weights into `dir`.
pub fn write_random_vit(dir: &Path, s: VitSize, device: &Device) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "model_type": "vit",
        "hidden_size": s.dim,
        "num_hidden_layers": s.depth,
        "num_attention_heads": s.heads,
        "intermediate_size": s.mlp,
        "image_size": s.image,
        "patch_size": s.patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "qkv_bias": true,
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_string()).map_err(|e| Error::io(&cfg_path, e))?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let d = s.dim;
    let n = (s.image / s.patch) * (s.image / s.patch) + 1;
    let rnd = |t: &mut HashMap<String, Tensor>, name: String, shape: &[usize]| -> Result<()> {
        t.insert(name, (Tensor::randn(0f32, 1f32, shape, device)? * 0.02)?);
        Ok(())
    };
    rnd(&mut t, "embeddings.cls_token".into(), &[1, 1, d])?;
    rnd(&mut t, "embeddings.position_embeddings".into(), &[1, n, d])?;
    rnd(
        &mut t,
        "embeddings.patch_embeddings.projection.weight".into(),
        &[d, 3, s.patch, s.patch],
    )?;
    rnd(
        &mut t,
        "embeddings.patch_embeddings.projection.bias".into(),
        &[d],
    )?;
    for i in 0..s.depth {
        let p = format!("encoder.layer.{i}");
        for (name, o, inn) in [
            ("attention.attention.query", d, d),
            ("attention.attention.key", d, d),
            ("attention.attention.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", s.mlp, d),
            ("output.dense", d, s.mlp),
        ] {
            rnd(&mut t, format!("{p}.{name}.weight"), &[o, inn])?;
            rnd(&mut t, format!("{p}.{name}.bias"), &[o])?;
        }
        for ln in ["layernorm_before", "layernorm_after"] {
            t.insert(
                format!("{p}.{ln}.weight"),
                Tensor::ones(d, DType::F32, device)?,
            );
            t.insert(
                format!("{p}.{ln}.bias"),
                Tensor::zeros(d, DType::F32, device)?,
            );
        }
    }
    t.insert(
        "layernorm.weight".into(),
        Tensor::ones(d, DType::F32, device)?,
    );
    t.insert(
        "layernorm.bias".into(),
        Tensor::zeros(d, DType::F32, device)?,
    );
    crate::atomic::write_safetensors(&t, &dir.join("model.safetensors"))
}

/// Timing result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub image: usize,
    pub iters: usize,
    pub mean_s: f64,
    pub median_s: f64,
    pub min_s: f64,
    pub images_per_s: f64,
}

/// Time the forward pass of a random ViT-B/16-size encoder (see [`time_forward`]).
pub fn time_vit_base_forward(
    batch: usize,
    image: usize,
    warmup: usize,
    iters: usize,
    opts: &LoadOptions,
) -> Result<BenchResult> {
    let (_dir, enc) = random_vit(VitSize::BASE16, opts)?;
    time_forward(enc.as_ref(), batch, image, warmup, iters, opts)
}

/// Time `iters` forward passes (after `warmup`) of `enc` on random pixels.
pub fn time_forward(
    enc: &dyn VisionEncoder,
    batch: usize,
    image: usize,
    warmup: usize,
    iters: usize,
    opts: &LoadOptions,
) -> Result<BenchResult> {
    let req = FeatureRequest::last_only();
    time_fn(
        &|x| Ok(enc.forward_features(x, &req)?.last()?.clone()),
        (batch, image, warmup, iters),
        opts,
    )
}

/// Time `iters` calls (after `warmup`) of `forward` on random pixels `[batch, 3, image, image]`;
/// `shape` = (batch, image, warmup, iters).
fn time_fn(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    (batch, image, warmup, iters): (usize, usize, usize, usize),
    opts: &LoadOptions,
) -> Result<BenchResult> {
    let x =
        Tensor::randn(0f32, 1f32, (batch, 3, image, image), &opts.device)?.to_dtype(opts.dtype)?;
    let run = || -> Result<()> {
        // Reading one value forces asynchronous devices to finish.
        let _ = forward(&x)?
            .flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok(())
    };
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    let median = median(&mut sorted);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    Ok(BenchResult {
        batch,
        image,
        iters: times.len(),
        mean_s: mean,
        median_s: median,
        min_s: sorted[0],
        images_per_s: batch as f64 / median,
    })
}

/// Time the eval forward of any model: a registered student name at random init (`resnet50`,
/// `vit-s16`, every level of its pyramid; loaded from a checkpoint file as inference loads a
/// model), a timm CNN folder or hub id, or any encoder folder or hub id (its last hidden
/// state).
pub fn time_model(
    model: &str,
    (batch, image, warmup, iters): (usize, usize, usize, usize),
    opts: &LoadOptions,
) -> Result<BenchResult> {
    let shape = (batch, image, warmup, iters);
    let pyramid = |net: &dyn crate::models::backbone::Backbone| {
        time_fn(
            &|x| {
                net.forward_intermediates(x, false)?
                    .pop()
                    .ok_or_else(|| Error::Invalid("backbone without levels".into()))
            },
            shape,
            opts,
        )
    };
    if let Some(spec) = crate::models::backbone::spec(model, (image, image)) {
        // the model as inference loads it (`predict`, `export`): random parameters written to a
        // checkpoint file and read back as frozen weights
        let (params, buffers, _) =
            crate::train::engine::random_backbone(spec.as_ref(), 0, &Device::Cpu, DType::F32)?;
        let dir = tempfile::Builder::new()
            .prefix("distillery-bench-model")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let file = dir.path().join("model.safetensors");
        let mut tensors =
            crate::train::engine::export_tensors(&crate::train::engine::vars_of(&params)?);
        tensors.extend(crate::train::engine::buffer_tensors(&buffers)?);
        crate::atomic::write_safetensors(&tensors, &file)?;
        let w = crate::weights::Weights::open_file_as(&file, opts.dtype, &opts.device)?;
        let net = spec.build(&w, &w)?;
        return pyramid(net.as_ref());
    }
    if !model.contains('/') && !Path::new(model).exists() {
        return Err(Error::Invalid(format!(
            "{model:?} is neither a model folder, a hub id (org/name) nor a known student name ({})",
            crate::models::backbone::names().join(", ")
        )));
    }
    if let Some((_, net)) = crate::models::backbone::load(model, opts)? {
        return pyramid(net.as_ref());
    }
    let enc = crate::models::load(model, opts)?;
    time_forward(enc.as_ref(), batch, image, warmup, iters, opts)
}

/// Time one training step of a registered student at random init with a 1000-way classifier:
/// train-mode forward (BatchNorm batch statistics), cross-entropy on random labels, backward,
/// AdamW (as `scripts/bench_torch.py --timm NAME --train`).
pub fn time_train_step(
    model: &str,
    (batch, image, warmup, iters): (usize, usize, usize, usize),
    opts: &LoadOptions,
) -> Result<BenchResult> {
    let spec = crate::models::backbone::spec(model, (image, image))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{model:?} is not a known student name ({})",
                crate::models::backbone::names().join(", ")
            ))
        })?
        .with_classes(1000)?;
    let (params, _buffers, net) =
        crate::train::engine::random_backbone(spec.as_ref(), 0, &opts.device, DType::F32)?;
    let mut opt = crate::train::optim::AdamW::new(&crate::train::engine::vars_of(&params)?, 0.05)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 97) % 1000).collect();
    let labels = Tensor::new(labels, &opts.device)?;
    let step = |x: &Tensor| -> Result<Tensor> {
        let last = net
            .forward_intermediates(x, true)?
            .pop()
            .ok_or_else(|| Error::Invalid("backbone without levels".into()))?;
        let logits = net
            .classify(&net.pool(&last, true)?)?
            .ok_or_else(|| Error::Invalid("no classifier".into()))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        Ok(loss)
    };
    let opt = std::cell::RefCell::new(&mut opt);
    time_fn(
        &|x| {
            let fused = crate::kernels::FusedGradients::enable();
            let loss = step(x)?;
            let grads = fused.backward(&loss)?;
            opt.borrow_mut().step(&grads, 1e-4)?;
            Ok(loss)
        },
        (batch, image, warmup, iters),
        &LoadOptions {
            dtype: DType::F32,
            ..opts.clone()
        },
    )
}

/// Build a random ViT of size `s` in a temporary folder and load it.
pub fn random_vit(
    s: VitSize,
    opts: &LoadOptions,
) -> Result<(tempfile::TempDir, Box<dyn VisionEncoder>)> {
    let dir = tempfile::Builder::new()
        .prefix("distillery-bench")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    write_random_vit(dir.path(), s, &Device::Cpu)?;
    let enc = crate::models::load(&dir.path().to_string_lossy(), opts)?;
    Ok((dir, enc))
}

/// Peak resident memory of this process so far, in MiB (Linux `VmHWM`; None elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Timing of one SAK stage-1 training step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepBench {
    pub precision: String,
    /// the student (a ViT preset or a registered backbone)
    pub student: String,
    pub teachers: usize,
    pub batch: usize,
    pub image: usize,
    /// teacher features read from memory (as from a cache) instead of running the teachers
    pub cached: bool,
    pub iters: usize,
    pub median_s: f64,
    pub min_s: f64,
    /// median seconds of each phase of the step, in order
    pub phases: Vec<(String, f64)>,
    pub peak_rss_mib: Option<f64>,
}

/// The phases of a stage-1 step, timed separately.
pub const STEP_PHASES: [&str; 5] = [
    "teachers",
    "student forward",
    "loss",
    "backward",
    "optimizer",
];

/// Median of `v`, sorted in place (NaN when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One stage-1 step (student forward + every teacher + loss + backward + AdamW) of `student` (a
/// ViT preset such as `vit-s16` or a registered backbone such as `mobilevitv2_100`) with
/// `n_teachers` ViT-B/16-size teachers (random weights) at `image` px; with
/// `cached`, the teachers' features are computed once before timing and the step reads them
/// (the `--cache` path's step).
#[allow(clippy::too_many_arguments)]
pub fn time_stage1_step(
    student: &str,
    n_teachers: usize,
    batch: usize,
    image: usize,
    warmup: usize,
    iters: usize,
    cached: bool,
    dev: &Device,
    precision: crate::device::Precision,
) -> Result<StepBench> {
    use crate::models::student::{Student, StudentSpec, TeacherSlot};
    use crate::teacher::Teacher;
    use crate::train::engine::StepModel;
    use crate::train::stage1::{distill_terms, new_student_params, student_stem, TeacherBatch};
    let student_name = student;
    let opts = LoadOptions {
        device: dev.clone(),
        dtype: precision.dtype(),
    };
    let mut dirs = Vec::new();
    let mut teachers = Vec::new();
    for _ in 0..n_teachers {
        let dir = tempfile::Builder::new()
            .prefix("distillery-bench-teacher")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        write_random_vit(dir.path(), VitSize::BASE16, &Device::Cpu)?;
        teachers.push(Teacher::load(
            &dir.path().to_string_lossy(),
            image,
            0,
            &opts,
        )?);
        dirs.push(dir);
    }
    let slots = teachers
        .iter()
        .enumerate()
        .map(|(i, t)| TeacherSlot {
            name: format!("teacher{i}"),
            dim: t.encoder.info().width,
        })
        .collect();
    let (stem, (mean, std), src) = student_stem(student_name, image)?;
    let spec = StudentSpec::new(stem, image, slots)?.with_norm(mean, std);
    let (vm, bm) = new_student_params(&spec, src.as_ref(), 0, dev)?;
    let build_spec = spec.clone();
    let mut student = StepModel::new(
        &vm,
        Some(&bm),
        precision,
        Path::new("bench"),
        move |w, b| Student::build_with_state(&build_spec, w, b),
    )?;
    let vars = crate::train::engine::vars_of(&vm)?;
    let mut optim = crate::train::optim::AdamW::new(&vars, 0.01)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, image, image), dev)?;
    let mut tx = TeacherBatch::Pixels((0..n_teachers).map(|_| x.clone()).collect());
    if cached {
        tx = TeacherBatch::Features(tx.all_features(&teachers)?);
    }
    let mut times = Vec::new();
    let mut phases = vec![Vec::new(); STEP_PHASES.len()];
    // Peak memory of the step itself, not of writing the random teacher checkpoints above
    // (Linux: "5" resets the peak resident size).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    for i in 0..warmup + iters.max(1) {
        let t0 = Instant::now();
        let mut marks = Vec::with_capacity(STEP_PHASES.len());
        // Asynchronous devices finish a phase before it is timed.
        let mark = || -> Result<Instant> {
            dev.synchronize()?;
            Ok(Instant::now())
        };
        let feats = tx.all_features(&teachers)?;
        marks.push(mark()?);
        let fused = crate::kernels::FusedGradients::enable();
        let xs = x.to_dtype(student.dtype())?;
        let out = student.step()?.forward(&xs, true, true)?;
        marks.push(mark()?);
        let (loss, _) = distill_terms(
            &out.aligned,
            &feats,
            crate::losses::FeatureLoss::CosSmoothL1,
            None,
        )?;
        marks.push(mark()?);
        let grads = fused.backward(&loss)?;
        marks.push(mark()?);
        optim.step(&grads, 1e-4)?;
        marks.push(mark()?);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
            let mut prev = t0;
            for (p, m) in phases.iter_mut().zip(marks) {
                p.push((m - prev).as_secs_f64());
                prev = m;
            }
        }
    }
    let median_s = median(&mut times);
    Ok(StepBench {
        precision: format!("{precision:?}").to_lowercase(),
        student: student_name.to_string(),
        teachers: n_teachers,
        batch,
        image,
        cached,
        iters: times.len(),
        median_s,
        min_s: times[0],
        phases: STEP_PHASES
            .iter()
            .zip(phases.iter_mut())
            .map(|(n, p)| (n.to_string(), median(p)))
            .collect(),
        peak_rss_mib: peak_rss_mib(),
    })
}
