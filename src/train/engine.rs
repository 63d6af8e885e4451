//! The training engine every training verb runs on: the run folder (config, checkpoint,
//! metrics, plot), resume, the parameter store, the data producer thread, the step (loss,
//! backward, gradient clipping, AdamW, schedule), metrics lines, atomic checkpoints and the
//! progress bar. What is trained and on what is injected as an [`Objective`] plus a batch
//! producer; SAK stage 1 and stage 2 are objectives.
//!
//! Data order: epoch e visits the data set in the permutation drawn from (seed, e); step s of
//! the epoch takes positions `s*B .. s*B+B` (wrapping); with `variants` K > 0 the batch is
//! built from augmentation variant e mod K (what a teacher cache with K variants holds), else
//! from variant e.

use crate::device::Precision;
use crate::error::{Error, Result};
use crate::models::student::Init;
use crate::train::checkpoint;
use crate::train::optim::{AdamW, LossScaler};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// Where a run keeps its files.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn loss_plot(&self) -> PathBuf {
        self.dir.join("loss.png")
    }
    /// Any other file of the run (what an objective exports).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A checkpoint read back for `--resume`.
pub struct Saved {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub state: serde_json::Value,
}

impl Saved {
    pub fn step(&self) -> u64 {
        self.state["step"].as_u64().unwrap_or(0)
    }

    fn field<T: DeserializeOwned>(&self, key: &str, what: &str) -> Result<Option<T>> {
        if self.state[key].is_null() {
            return Ok(None);
        }
        serde_json::from_value(self.state[key].clone())
            .map(Some)
            .map_err(|e| Error::BadInput {
                path: self.path.clone(),
                msg: format!("{what} unreadable: {e}"),
            })
    }

    /// The recipe the run was started with.
    pub fn config<C: DeserializeOwned>(&self) -> Result<C> {
        self.field("config", "checkpoint config")?
            .ok_or_else(|| Error::BadInput {
                path: self.path.clone(),
                msg: "checkpoint has no config".into(),
            })
    }

    /// The model spec the run was built from (None in checkpoints older than specs).
    pub fn spec<S: DeserializeOwned>(&self) -> Result<Option<S>> {
        self.field("spec", "model spec")
    }
}

/// The parameters of a checkpoint's tensors (`model.*`), by parameter name.
pub fn model_tensors(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    under(tensors, "model.")
}

/// The buffers of a checkpoint's tensors (BatchNorm statistics), by name.
pub fn buffer_tensors_of(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    under(tensors, "buffer.")
}

fn under(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// A run folder opened for training: created if needed; when resuming its checkpoint (which
/// must exist) is read onto `device`; a fresh run refuses to start over an existing checkpoint.
pub struct RunFolder {
    pub paths: RunPaths,
    pub saved: Option<Saved>,
}

impl RunFolder {
    pub fn open(dir: &Path, resume: bool, device: &Device) -> Result<Self> {
        let paths = RunPaths::new(dir);
        std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(&paths.dir, e))?;
        let p = paths.checkpoint();
        let saved = if resume {
            if !p.is_file() {
                return Err(Error::BadInput {
                    path: p,
                    msg: "no checkpoint to resume from".into(),
                });
            }
            let (tensors, state) = checkpoint::load(&p, device)?;
            Some(Saved {
                path: p,
                tensors,
                state,
            })
        } else {
            if p.exists() {
                return Err(Error::BadInput {
                    path: p,
                    msg: "run folder already has a checkpoint; pass --resume to continue it or choose another run folder".into(),
                });
            }
            None
        };
        Ok(Self { paths, saved })
    }
}

/// Options of one invocation that are not part of the recipe.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub resume: bool,
    /// stop (with a checkpoint) after this many steps in this invocation
    pub stop_after: Option<u64>,
    pub progress: bool,
    /// where the model, its optimizer state and the teachers live
    pub device: Device,
    /// compute dtype of the forward and backward passes (teachers run in it too); the
    /// parameters and optimizer state stay f32 (mixed precision), f16 scales the loss
    pub precision: Precision,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            resume: false,
            stop_after: None,
            progress: false,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

impl RunOptions {
    /// How frozen teachers are loaded: on the run's device, in its compute dtype.
    pub fn teacher_load(&self) -> crate::models::LoadOptions {
        crate::models::LoadOptions {
            dtype: self.precision.dtype(),
            device: self.device.clone(),
        }
    }
}

/// A model as each training step sees it. In f32 it is built once over the parameter store's
/// variables. In mixed precision it is built again at every step over the variables cast to
/// the compute dtype (the casts are differentiable, so gradients reach the f32 variables, which
/// the optimizer updates); state such as BatchNorm statistics stays in the f32 buffer store.
pub struct StepModel<M> {
    params: VarMap,
    buffers: VarMap,
    dtype: DType,
    path: PathBuf,
    #[allow(clippy::type_complexity)]
    build: Box<dyn Fn(&Weights, &Weights) -> Result<M>>,
    model: M,
}

impl<M> StepModel<M> {
    /// `build(parameters, buffers)` makes the model; `path` is named in errors.
    pub fn new(
        params: &VarMap,
        buffers: Option<&VarMap>,
        precision: Precision,
        path: &Path,
        build: impl Fn(&Weights, &Weights) -> Result<M> + 'static,
    ) -> Result<Self> {
        let buffers = buffers.cloned().unwrap_or_else(VarMap::new);
        let dtype = precision.dtype();
        let model = build(
            &Weights::from_vars_as(params, path, Some(dtype))?,
            &Weights::from_vars(&buffers, path)?,
        )?;
        Ok(Self {
            params: params.clone(),
            buffers,
            dtype,
            path: path.to_path_buf(),
            build: Box::new(build),
            model,
        })
    }

    /// The model for the next step (rebuilt over fresh casts in mixed precision).
    pub fn step(&mut self) -> Result<&M> {
        if self.dtype != DType::F32 {
            self.model = (self.build)(
                &Weights::from_vars_as(&self.params, &self.path, Some(self.dtype))?,
                &Weights::from_vars(&self.buffers, &self.path)?,
            )?;
        }
        Ok(&self.model)
    }

    /// The model as last built.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The compute dtype: inputs are cast to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub total_steps: u64,
    pub last_loss: f64,
    pub images_per_s: f64,
    pub skipped_images: usize,
    /// evaluation at the end of training, when the objective has one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<serde_json::Value>,
}

impl RunSummary {
    /// Whether the run reached its last step (and exported).
    pub fn finished(&self) -> bool {
        self.end_step == self.total_steps
    }
}

/// Fill a parameter store on `device`: each listed parameter takes the tensor given for its
/// name (whose shape must match; the error names `source`), else its initialiser's draw from
/// `rng` (in list order, so a seed reproduces the initialisation).
pub fn init_params(
    list: impl IntoIterator<Item = (String, Vec<usize>, Init)>,
    mut given: HashMap<String, Tensor>,
    rng: &mut impl rand::Rng,
    device: &Device,
    source: &Path,
) -> Result<VarMap> {
    let vm = VarMap::new();
    {
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?;
        for (name, shape, how) in list {
            let t = match given.remove(&name) {
                Some(t) if t.dims() == shape.as_slice() => t.to_device(device)?,
                Some(t) => {
                    return Err(Error::ShapeMismatch {
                        path: source.to_path_buf(),
                        name,
                        expected: shape,
                        got: t.dims().to_vec(),
                    })
                }
                None => how.tensor(&shape, rng, device)?,
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

/// A store of `list` drawn from `seed` alone (nothing given): a model at random init.
pub fn seeded_params(
    list: impl IntoIterator<Item = (String, Vec<usize>, Init)>,
    seed: u64,
    device: &Device,
    source: &Path,
) -> Result<VarMap> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    init_params(list, HashMap::new(), &mut rng, device, source)
}

/// A registered backbone at random init: its parameter and buffer stores (parameters drawn
/// from `seed`, buffers at their initial values) and the backbone built over them, with the
/// parameters used as `dtype` (differentiable casts of the f32 stores).
pub fn random_backbone(
    spec: &dyn crate::models::backbone::BackboneSpec,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<(VarMap, VarMap, Box<dyn crate::models::backbone::Backbone>)> {
    let source = PathBuf::from(spec.arch_name());
    let params = seeded_params(spec.parameters(), seed, device, &source)?;
    let buffers = seeded_params(spec.buffers(), seed, device, &source)?;
    let net = spec.build(
        &Weights::from_vars_as(&params, &source, Some(dtype))?,
        &Weights::from_vars(&buffers, &source)?,
    )?;
    Ok((params, buffers, net))
}

/// Seeded parameters for `list` on the CPU, as a store and as weights (tests).
#[cfg(test)]
pub(crate) fn seeded_weights(
    list: Vec<(String, Vec<usize>, Init)>,
    seed: u64,
) -> (VarMap, crate::weights::Weights) {
    let vm = seeded_params(list, seed, &Device::Cpu, Path::new("init")).expect("seeded parameters");
    let w = crate::weights::Weights::from_vars(&vm, Path::new("init")).expect("weights");
    (vm, w)
}

/// The tensors of a buffer store (BatchNorm statistics), for checkpoints and exports.
pub fn buffer_tensors(buffers: &VarMap) -> Result<Vec<(String, Tensor)>> {
    Ok(vars_of(buffers)?
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect())
}

/// The variables of a store, by name.
pub fn vars_of(vm: &VarMap) -> Result<HashMap<String, Var>> {
    Ok(vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?
        .clone())
}

/// Parameters without the training-only ones (`.aligners.`), as tensors to export.
pub fn export_tensors(vars: &HashMap<String, Var>) -> HashMap<String, Tensor> {
    vars.iter()
        .filter(|(n, _)| !n.contains(".aligners."))
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// Write a JSON description atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::atomic::write_bytes(path, json.as_bytes())
}

/// Read a JSON description (errors name the file).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Data order: a permutation of the data set per epoch, from (seed, epoch).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    v.shuffle(&mut rng);
    v
}

/// How batches are drawn from a data set of `n` items.
#[derive(Clone, Copy, Debug)]
pub struct DataPlan {
    pub n: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// K > 0: epoch e uses augmentation variant e mod K
    pub variants: u64,
}

impl DataPlan {
    pub fn steps_per_epoch(&self) -> u64 {
        (self.n / self.batch_size.max(1)).max(1) as u64
    }

    /// Total steps: `steps` if set, else `epochs` x steps per epoch.
    pub fn total(&self, steps: u64, epochs: u64) -> u64 {
        if steps > 0 {
            steps
        } else {
            epochs * self.steps_per_epoch()
        }
    }
}

/// One step's objective value and what to log with it.
pub struct StepLoss {
    /// the scalar to minimise
    pub loss: Tensor,
    /// named parts logged as `loss/{name}`
    pub parts: Vec<(String, f64)>,
    /// images in the batch
    pub images: usize,
    /// images skipped while building the batch (unreadable)
    pub skipped: usize,
}

/// What a training run optimises, given a batch.
pub trait Objective {
    type Batch: Send + 'static;
    /// The loss of one batch at `step` (0-based).
    fn loss(&mut self, batch: Self::Batch, step: u64) -> Result<StepLoss>;
    /// State besides the trainable parameters that checkpoints keep (BatchNorm statistics),
    /// by name (saved as `buffer.{name}`).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// A held-out evaluation after `step` steps, logged as its own metrics line; None when
    /// the objective has nothing to evaluate.
    fn evaluate(&mut self, _step: u64) -> Result<Option<Vec<(String, f64)>>> {
        Ok(None)
    }
}

/// The recipe-level settings of the step loop.
pub struct LoopConfig<'a> {
    /// checkpoint format tag (`distillery-stage1-v1`, ...)
    pub format: &'a str,
    /// title of `loss.png`
    pub title: &'a str,
    pub total: u64,
    /// max global gradient norm (0 = off)
    pub clip_grad: f64,
    pub checkpoint_every: u64,
    /// learning rate at a step
    pub schedule: &'a dyn Fn(u64) -> f64,
    /// steps between [`Objective::evaluate`] calls (0: only after the last step)
    pub eval_every: u64,
}

/// What a checkpoint's header records besides tensors: enough to check and rebuild the run.
#[derive(Serialize)]
struct RunState<'a, C: Serialize, S: Serialize> {
    format: &'a str,
    step: u64,
    /// the recipe
    config: &'a C,
    /// the model's spec (resume rebuilds the model from it)
    spec: &'a S,
}

/// An optimiser over a run's parameters, positioned at its first step.
pub struct Trainer<'r> {
    run: &'r RunFolder,
    vars: HashMap<String, Var>,
    optim: AdamW,
    /// the f16 loss scaler as of the last step (saved with checkpoints)
    scaler: Option<LossScaler>,
    /// first step of this invocation
    pub start: u64,
}

impl<'r> Trainer<'r> {
    /// Set up training of `params` (and `buffers`, saved in checkpoints but not trained).
    /// Resuming: `same_recipe(saved config)` must hold (else the error says `differs`), and
    /// parameters, buffers and optimizer state are restored from the checkpoint; metric lines
    /// past it are dropped. A fresh run writes `config.toml` and starts a new metrics file.
    pub fn new<C: Serialize + DeserializeOwned>(
        run: &'r RunFolder,
        params: &VarMap,
        buffers: Option<&VarMap>,
        weight_decay: f64,
        config: &C,
        same_recipe: impl Fn(&C) -> bool,
        differs: &str,
    ) -> Result<Self> {
        let vars = vars_of(params)?;
        let mut optim = AdamW::new(&vars, weight_decay)?;
        let paths = &run.paths;
        let mut start = 0;
        match &run.saved {
            Some(saved) => {
                let old: C = saved.config()?;
                if !same_recipe(&old) {
                    return Err(Error::BadInput {
                        path: saved.path.clone(),
                        msg: format!("checkpoint was made with {differs}"),
                    });
                }
                checkpoint::restore(&vars, &saved.tensors, "model.", &saved.path)?;
                if let Some(b) = buffers {
                    checkpoint::restore(&vars_of(b)?, &saved.tensors, "buffer.", &saved.path)?;
                }
                start = saved.step();
                optim.load_state(&saved.tensors, start)?;
                truncate_metrics(&paths.metrics(), start)?;
            }
            None => {
                let text = toml::to_string(config).map_err(|e| Error::Invalid(e.to_string()))?;
                crate::atomic::write_bytes(&paths.config(), text.as_bytes())?;
                let _ = std::fs::remove_file(paths.metrics());
            }
        }
        Ok(Self {
            run,
            vars,
            optim,
            scaler: None,
            start,
        })
    }

    /// Scale each parameter's learning rate by `scale(name)` (layer-wise lr decay).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.optim.set_lr_scales(scale);
    }

    /// The trained variables, by name.
    pub fn vars(&self) -> &HashMap<String, Var> {
        &self.vars
    }

    /// Last step of this invocation for a run of `total` steps.
    pub fn end(&self, total: u64, opts: &RunOptions) -> u64 {
        opts.stop_after
            .map_or(total, |n| (self.start + n).min(total))
    }

    /// Train from `self.start` to the end of this invocation: `produce(variant, indices)`
    /// builds each batch on a worker thread ahead of the step; `objective` turns it into a
    /// loss. Writes metrics, checkpoints (every `checkpoint_every` steps and at the end) and
    /// `loss.png`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<O, C, S, P>(
        &mut self,
        objective: &mut O,
        plan: DataPlan,
        produce: P,
        lc: &LoopConfig,
        config: &C,
        spec: &S,
        opts: &RunOptions,
    ) -> Result<RunSummary>
    where
        O: Objective,
        C: Serialize,
        S: Serialize,
        P: Fn(u64, &[usize]) -> Result<O::Batch> + Send + 'static,
    {
        let paths = &self.run.paths;
        let start = self.start;
        let total = lc.total;
        let end = self.end(total, opts);
        let steps_per_epoch = plan.steps_per_epoch();
        let (tx, rx) = mpsc::sync_channel::<Result<O::Batch>>(2);
        let producer = std::thread::spawn(move || {
            let (b, n) = (plan.batch_size, plan.n);
            let mut order_epoch = u64::MAX;
            let mut order = Vec::new();
            for step in start..end {
                let epoch = step / steps_per_epoch;
                if epoch != order_epoch {
                    order = epoch_order(plan.seed, epoch, n);
                    order_epoch = epoch;
                }
                let pos = (step % steps_per_epoch) as usize;
                let idx: Vec<usize> = (0..b).map(|j| order[(pos * b + j) % n]).collect();
                let variant = if plan.variants > 0 {
                    epoch % plan.variants
                } else {
                    epoch
                };
                let batch = produce(variant, &idx);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });

        let bar = crate::train::progress_bar(total, start, opts.progress);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.metrics())
            .map_err(|e| Error::io(paths.metrics(), e))?;
        // f16 needs loss scaling (bf16 has f32's range); its state is part of the checkpoint.
        self.scaler = match (opts.precision, &self.run.saved) {
            (Precision::F16, Some(saved)) => Some(LossScaler::from_state(&saved.tensors)?),
            (Precision::F16, None) => Some(LossScaler::default()),
            _ => None,
        };
        let t_run = Instant::now();
        let mut images = 0usize;
        let mut skipped = 0usize;
        let mut last_loss = f64::NAN;
        for step in start..end {
            let t0 = Instant::now();
            let batch = rx
                .recv()
                .map_err(|_| Error::Invalid("data loader stopped".into()))??;
            let t_data = t0.elapsed().as_secs_f64();
            // fused training nodes (a ViT block, an adapter step) for this step's graph
            let fused = crate::kernels::FusedGradients::enable();
            let out = objective.loss(batch, step)?;
            let loss_v = out.loss.to_scalar::<f32>()? as f64;
            if !loss_v.is_finite() {
                return Err(Error::Invalid(format!(
                    "loss became {loss_v} at step {step}"
                )));
            }
            let lr = (lc.schedule)(step);
            let (grad_norm, stepped) = match &mut self.scaler {
                None => {
                    let mut grads = fused.backward(&out.loss)?;
                    let norm = self.optim.clip_grad_norm(&mut grads, lc.clip_grad)?;
                    self.optim.step(&grads, lr)?;
                    (norm, true)
                }
                Some(sc) => {
                    let mut grads = fused.backward(&(&out.loss * sc.scale)?)?;
                    self.optim.scale_grads(&mut grads, 1.0 / sc.scale)?;
                    let norm = self.optim.clip_grad_norm(&mut grads, lc.clip_grad)?;
                    let ok = sc.update(norm.is_finite());
                    if ok {
                        self.optim.step(&grads, lr)?;
                    }
                    (norm, ok)
                }
            };
            drop(fused);
            images += out.images;
            skipped += out.skipped;
            last_loss = loss_v;
            let secs = t0.elapsed().as_secs_f64();
            let ips = out.images as f64 / secs;
            let mut rec = serde_json::json!({
                "step": step + 1,
                "epoch": step / steps_per_epoch,
                "loss": loss_v,
                "lr": lr,
                "grad_norm": grad_norm,
                "images_per_s": ips,
                "data_wait_s": t_data,
                "skipped_images": out.skipped,
            });
            for (name, v) in &out.parts {
                rec[format!("loss/{name}")] = serde_json::json!(v);
            }
            if let Some(sc) = &self.scaler {
                rec["loss_scale"] = serde_json::json!(sc.scale);
                rec["step_skipped"] = serde_json::json!(!stepped);
            }
            writeln!(metrics, "{rec}").map_err(|e| Error::io(paths.metrics(), e))?;
            bar.set_message(format!("loss {loss_v:.4} {ips:.1} img/s"));
            bar.inc(1);
            let done = step + 1;
            if (lc.eval_every > 0 && done % lc.eval_every == 0) || done == end {
                if let Some(parts) = objective.evaluate(done)? {
                    let mut rec = serde_json::json!({ "step": done });
                    for (name, v) in parts {
                        rec[name] = serde_json::json!(v);
                    }
                    writeln!(metrics, "{rec}").map_err(|e| Error::io(paths.metrics(), e))?;
                }
            }
            if done % lc.checkpoint_every.max(1) == 0 || done == end {
                metrics.flush().map_err(|e| Error::io(paths.metrics(), e))?;
                self.save(objective, lc.format, done, config, spec)?;
            }
        }
        drop(rx);
        let _ = producer.join();
        bar.finish_and_clear();
        if end > start {
            crate::train::plot::plot_losses(&paths.metrics(), &paths.loss_plot(), lc.title)?;
        }
        Ok(RunSummary {
            start_step: start,
            end_step: end,
            total_steps: total,
            last_loss,
            images_per_s: images as f64 / t_run.elapsed().as_secs_f64().max(1e-9),
            skipped_images: skipped,
            eval: None,
        })
    }

    /// Write the checkpoint atomically: parameters (`model.*`), the objective's buffers
    /// (`buffer.*`), optimizer moments and the run state.
    fn save<O: Objective>(
        &self,
        objective: &O,
        format: &str,
        step: u64,
        config: &impl Serialize,
        spec: &impl Serialize,
    ) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone()))
            .collect();
        tensors.extend(
            objective
                .buffers()?
                .into_iter()
                .map(|(n, t)| (format!("buffer.{n}"), t)),
        );
        tensors.extend(self.optim.state()?);
        if let Some(sc) = &self.scaler {
            tensors.extend(sc.state()?);
        }
        let state = serde_json::to_value(RunState {
            format,
            step,
            config,
            spec,
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        checkpoint::save(&self.run.paths.checkpoint(), &tensors, &state)
    }
}

/// Drop metric lines past `step` (written after the checkpoint a resumed run restarts from).
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut s = kept.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_plan_visits_every_item_once_per_epoch() {
        let plan = DataPlan {
            n: 10,
            batch_size: 3,
            seed: 7,
            variants: 0,
        };
        assert_eq!(plan.steps_per_epoch(), 3);
        assert_eq!(plan.total(0, 4), 12);
        assert_eq!(plan.total(5, 4), 5);
        let mut o = epoch_order(7, 1, 10);
        assert_ne!(o, epoch_order(7, 2, 10));
        o.sort();
        assert_eq!(o, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn init_params_takes_given_tensors_and_checks_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let given: HashMap<String, Tensor> = [(
            "a".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        )]
        .into();
        let list = vec![
            ("a".to_string(), vec![2], Init::Zeros),
            ("b".to_string(), vec![3], Init::Ones),
        ];
        let vm = init_params(list.clone(), given, &mut rng, &Device::Cpu, Path::new("x")).unwrap();
        let v = vars_of(&vm).unwrap();
        assert_eq!(v["a"].as_tensor().to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(v["b"].as_tensor().to_vec1::<f32>().unwrap(), [1.0; 3]);
        let wrong: HashMap<String, Tensor> =
            [("a".to_string(), Tensor::new(&[1f32], &Device::Cpu).unwrap())].into();
        let e = init_params(
            list,
            wrong,
            &mut rng,
            &Device::Cpu,
            Path::new("src.safetensors"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("src.safetensors") && e.contains('a'), "{e}");
    }
}
