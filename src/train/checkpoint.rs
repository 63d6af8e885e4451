//! Checkpoints: one safetensors file holding named tensors plus a JSON state string in the
//! header metadata, written to a temporary file in the same folder and renamed into place, so a
//! crash (even `kill -9`) mid-write leaves the previous checkpoint intact.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const STATE_KEY: &str = "distillery_state";

/// Write `tensors` and `state` (JSON) atomically to `path`.
pub fn save(path: &Path, tensors: &[(String, Tensor)], state: &serde_json::Value) -> Result<()> {
    let tmp = crate::atomic::temp_path_beside(path)?;
    let contiguous = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert(STATE_KEY.to_string(), state.to_string());
    let res = safetensors::serialize_to_file(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| Error::io(&tmp, e))
    .and_then(|_| {
        // Make the data durable before the rename makes it visible.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))
    })
    .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Read a checkpoint: tensors and the JSON state.
pub fn load(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            msg: "not a distillery checkpoint (no state in the header)".into(),
        })?;
    let state: serde_json::Value = serde_json::from_str(state).map_err(|e| Error::BadInput {
        path: path.to_path_buf(),
        msg: format!("checkpoint state is not valid JSON: {e}"),
    })?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: crate::weights::clean_candle_msg(&e),
        })?;
    Ok((tensors, state))
}

/// Set every variable from the checkpoint tensor `{prefix}{name}`; a missing tensor or a shape
/// that does not fit is reported with the checkpoint's path.
pub fn restore<'a>(
    vars: impl IntoIterator<Item = (&'a String, &'a candle_core::Var)>,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    path: &Path,
) -> Result<()> {
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            name: key.clone(),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                name: key,
                expected: var.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        var.set(t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ck.safetensors");
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        save(
            &p,
            &[("a".into(), t.clone())],
            &serde_json::json!({"step": 3}),
        )
        .unwrap();
        let (ts, st) = load(&p, &Device::Cpu).unwrap();
        assert_eq!(st["step"], 3);
        assert_eq!(
            ts["a"].to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()
        );
        // no temporary files are left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
