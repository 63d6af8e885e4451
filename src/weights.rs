//! Checkpoint access: memory-mapped safetensors files (one, or the shards listed in a
//! `model.safetensors.index.json`), looked up by the checkpoint's own tensor names under a
//! prefix. Every failure names the file and the tensor.

use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Inner {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
    /// what to name in an error about a missing tensor
    display_path: PathBuf,
    /// shape-only checkpoint: tensors are zeros of these shapes (dry runs, loader tests)
    manifest: Option<HashMap<String, Vec<usize>>>,
    /// trainable parameters: tensors are the variables themselves (updates are seen)
    vars: Option<HashMap<String, candle_core::Var>>,
    /// names looked up so far (which tensors a model reads)
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// A view on a set of safetensors files, with a name prefix.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Open one safetensors file as f32 on the CPU (run folders' own files).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_file_as(path, DType::F32, &Device::Cpu)
    }

    /// Open one safetensors file, read as `dtype` onto `device`.
    pub fn open_file_as(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::open(
            std::slice::from_ref(&path.to_path_buf()),
            path,
            dtype,
            device,
        )
    }

    /// Open safetensors files. `display_path` is named in errors about missing tensors (the
    /// checkpoint file, or the shard index).
    pub fn open(
        paths: &[PathBuf],
        display_path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            check_safetensors(p).map_err(|msg| Error::Safetensors {
                path: p.clone(),
                msg,
            })?;
            // SAFETY: the file is mapped read-only; distillery never writes to checkpoints it
            // reads, and users must not modify a checkpoint while a process reads it.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                msg: clean_candle_msg(&e),
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                index,
                display_path: display_path.to_path_buf(),
                manifest: None,
                vars: None,
                used: Default::default(),
            }),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        })
    }

    /// A shape-only checkpoint: every listed tensor reads as zeros of its shape. Lets a model
    /// of any size be built (and its weight names and shapes checked) without its weights.
    pub fn from_manifest(
        manifest: HashMap<String, Vec<usize>>,
        display_path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                files: Vec::new(),
                index: manifest.keys().map(|k| (k.clone(), 0)).collect(),
                display_path: display_path.to_path_buf(),
                manifest: Some(manifest),
                vars: None,
                used: Default::default(),
            }),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// Weights held in memory (tensors computed rather than read, such as a folded model).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, display_path: &Path) -> Result<Self> {
        let vm = candle_nn::VarMap::new();
        {
            let mut data = vm
                .data()
                .lock()
                .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?;
            for (k, t) in tensors {
                data.insert(k, candle_core::Var::from_tensor(&t)?);
            }
        }
        Self::from_vars(&vm, display_path)
    }

    /// Trainable parameters: every lookup returns the variable's own tensor, so models built
    /// from this view are trained by updating the variables.
    pub fn from_vars(vars: &candle_nn::VarMap, display_path: &Path) -> Result<Self> {
        Self::from_vars_as(vars, display_path, None)
    }

    /// Trainable parameters seen in another dtype (mixed precision): every lookup is the
    /// variable cast to `dtype`, a differentiable op, so gradients reach the (f32) variables.
    /// The casts are taken when the model is built: build the model again after an update.
    /// `None` keeps the variables' own dtype (exactly [`Weights::from_vars`]).
    pub fn from_vars_as(
        vars: &candle_nn::VarMap,
        display_path: &Path,
        dtype: Option<DType>,
    ) -> Result<Self> {
        let data = vars
            .data()
            .lock()
            .map_err(|_| Error::Invalid("parameter store lock poisoned".into()))?
            .clone();
        // the parameters' dtype: a float one (checkpoints carry integer counters such as
        // BatchNorm's `num_batches_tracked`, which must not decide how floats are read)
        let (device, dtype) = data
            .values()
            .find(|v| v.dtype().is_float())
            .or_else(|| data.values().next())
            .map(|v| (v.device().clone(), dtype.unwrap_or(v.dtype())))
            .unwrap_or((Device::Cpu, dtype.unwrap_or(DType::F32)));
        Ok(Self {
            inner: Arc::new(Inner {
                files: Vec::new(),
                index: data.keys().map(|k| (k.clone(), 0)).collect(),
                display_path: display_path.to_path_buf(),
                manifest: None,
                vars: Some(data),
                used: Default::default(),
            }),
            prefix: String::new(),
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the tensors are read from checkpoint files (a frozen model: a teacher, a model
    /// loaded for inference), not a parameter store's variables or tensors handed over in
    /// memory.
    pub fn reads_files(&self) -> bool {
        !self.inner.files.is_empty() && self.inner.vars.is_none() && self.inner.manifest.is_none()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A view with `s` appended to the prefix.
    pub fn pp(&self, s: impl AsRef<str>) -> Self {
        let s = s.as_ref();
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else if s.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, s)
        };
        Self {
            inner: self.inner.clone(),
            prefix,
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.index.contains_key(&self.full(name))
    }

    /// All tensor names (full, without the view's prefix applied).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.index.keys().map(|s| s.as_str())
    }

    /// Full names of the tensors read so far through any view of these weights (what a model
    /// built from them uses), sorted.
    pub fn used_names(&self) -> Vec<String> {
        self.inner
            .used
            .lock()
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.full(name);
        if let Some(m) = &self.inner.manifest {
            return m.get(&full).cloned();
        }
        if let Some(v) = &self.inner.vars {
            return v.get(&full).map(|v| v.dims().to_vec());
        }
        let &i = self.inner.index.get(&full)?;
        self.inner.files[i]
            .1
            .get(&full)
            .ok()
            .map(|v| v.shape().to_vec())
    }

    /// Load a tensor of any shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let Some(&i) = self.inner.index.get(&full) else {
            return Err(Error::MissingTensor {
                path: self.inner.display_path.clone(),
                name: full,
            });
        };
        if let Ok(mut used) = self.inner.used.lock() {
            used.insert(full.clone());
        }
        if let Some(v) = &self.inner.vars {
            return Ok(v[&full].as_tensor().to_dtype(self.dtype)?);
        }
        if let Some(m) = &self.inner.manifest {
            return Ok(Tensor::zeros(
                m[&full].as_slice(),
                self.dtype,
                &self.device,
            )?);
        }
        let (path, st) = &self.inner.files[i];
        let t = st
            .load(&full, &self.device)
            .map_err(|e| Error::Safetensors {
                path: path.clone(),
                msg: format!("tensor {full:?}: {}", clean_candle_msg(&e)),
            })?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Load a tensor and check its shape.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.check_shape(&shape.into(), name)?;
        self.get_any(name)
    }

    /// A stored tensor of another shape than `shape` is an error naming the file and tensor.
    fn check_shape(&self, shape: &Shape, name: &str) -> Result<()> {
        let full = self.full(name);
        if let Some(got) = self.shape_of(name) {
            if got != shape.dims() {
                let path = if self.inner.files.is_empty() {
                    self.inner.display_path.clone()
                } else {
                    self.inner.files[self.inner.index[&full]].0.clone()
                };
                return Err(Error::ShapeMismatch {
                    path,
                    name: full,
                    expected: shape.dims().to_vec(),
                    got,
                });
            }
        }
        Ok(())
    }

    /// Model state that a forward pass updates in place (BatchNorm running statistics), kept in
    /// f32 whatever the compute dtype. Over a parameter store it is the store's own variable
    /// (updates land in the store and its checkpoints); over files it is a fresh variable
    /// holding the stored value.
    pub fn state(&self, shape: impl Into<Shape>, name: &str) -> Result<candle_core::Var> {
        let shape: Shape = shape.into();
        if let Some(v) = self
            .inner
            .vars
            .as_ref()
            .and_then(|v| v.get(&self.full(name)))
        {
            self.check_shape(&shape, name)?;
            return Ok(v.clone());
        }
        let t = self.get(shape, name)?.to_dtype(DType::F32)?;
        Ok(candle_core::Var::from_tensor(&t)?)
    }
}

/// Check a safetensors file's framing before mapping it: header length, header JSON, and that
/// the data the header declares is all present (a truncated download is the common failure).
fn check_safetensors(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    if size < 8 {
        return Err(format!("file is {size} bytes, too short for a header"));
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(format!(
            "header length {n} is implausible; not a safetensors file?"
        ));
    }
    if 8 + n > size {
        return Err(format!(
            "file is truncated: header declares {n} bytes but the file has {size}"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| format!("header is not valid JSON ({e}); not a safetensors file?"))?;
    let obj = json
        .as_object()
        .ok_or_else(|| "header is not a JSON object".to_string())?;
    let mut end = 0u64;
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let off = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| a.get(1))
            .and_then(|x| x.as_u64())
            .ok_or_else(|| format!("tensor {name:?} has no data_offsets"))?;
        end = end.max(off);
    }
    if 8 + n + end > size {
        return Err(format!(
            "file is truncated: tensor data needs {} bytes, the file has {size}",
            8 + n + end
        ));
    }
    Ok(())
}

/// candle wraps errors with backtraces and context; keep the first line.
pub(crate) fn clean_candle_msg(e: &candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_weights_read_floats_as_floats_beside_integer_counters() {
        // a timm checkpoint: f32 parameters and i64 `num_batches_tracked` counters, in a map
        // whose order is arbitrary (each map draws its own)
        for _ in 0..8 {
            let mut t = HashMap::new();
            t.insert(
                "conv.weight".to_string(),
                Tensor::new(&[3.25f32, -1.5], &Device::Cpu).unwrap(),
            );
            for i in 0..6 {
                t.insert(
                    format!("bn{i}.num_batches_tracked"),
                    Tensor::new(&[7i64], &Device::Cpu).unwrap(),
                );
            }
            let w = Weights::from_tensors(t, Path::new("ckpt")).unwrap();
            assert_eq!(w.dtype(), DType::F32);
            let v = w.get_any("conv.weight").unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v, vec![3.25, -1.5]);
        }
    }
}
