//! One AdamW update in one pass over memory (CPU, f32): the parameter, its gradient and both
//! moments are read once and the new parameter and moments written once, instead of the ~12
//! whole-tensor temporaries the composition of candle ops allocates per parameter. The
//! arithmetic is the composition's, operation for operation in f32 (scalars rounded to f32 as
//! candle's affine ops round them), so both give the same bits.

use super::{contiguous_f32, fast_path};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The step's scalars.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// `1 - lr * weight_decay` (1 without decay)
    pub keep: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// `1 / sqrt(1 - beta2^t)`
    pub inv_sqrt_bc2: f64,
    pub eps: f64,
    /// `lr / (1 - beta1^t)`
    pub step_size: f64,
}

const CHUNK: usize = 16 * 1024;

/// `[w, g, m, v]` -> `[w', m', v']` (every output element written).
fn update([w, g, m, v]: [&[f32]; 4], [wo, mo, vo]: [&mut [MaybeUninit<f32>]; 3], s: &AdamStep) {
    let keep = s.keep as f32;
    let (b1, c1) = (s.beta1 as f32, (1.0 - s.beta1) as f32);
    let (b2, c2) = (s.beta2 as f32, (1.0 - s.beta2) as f32);
    let (ib, eps, step) = (s.inv_sqrt_bc2 as f32, s.eps as f32, s.step_size as f32);
    for i in 0..w.len() {
        let gi = g[i];
        let mi = m[i] * b1 + gi * c1;
        let vi = v[i] * b2 + (gi * gi) * c2;
        let denom = vi.sqrt() * ib + eps;
        mo[i].write(mi);
        vo[i].write(vi);
        wo[i].write(w[i] * keep - (mi / denom) * step);
    }
}

/// `(w', m', v')` after one AdamW step on CPU f32 tensors of one shape; `None` elsewhere (the
/// caller composes the step from candle ops).
pub fn adamw_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamStep,
) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
    let shape = w.shape();
    if [g, m, v].iter().any(|t| t.shape() != shape) || ![w, g, m, v].iter().all(|t| fast_path(t)) {
        return Ok(None);
    }
    let (w, g, m, v) = (
        w.contiguous()?,
        g.contiguous()?,
        m.contiguous()?,
        v.contiguous()?,
    );
    let guards = [&w, &g, &m, &v].map(|t| t.storage_and_layout());
    let mut views = Vec::with_capacity(4);
    for (st, l) in &guards {
        match &**st {
            Storage::Cpu(cpu) => match contiguous_f32(cpu, l) {
                Some(d) => views.push(d),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    let [wv, gv, mv, vv] = [views[0], views[1], views[2], views[3]];
    let n = wv.len();
    // outputs written once, not zeroed first (zeroing cost a third of the update's writes)
    let (mut wo, mut mo, mut vo): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    wo.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(
            mo.spare_capacity_mut()[..n]
                .par_chunks_mut(CHUNK)
                .zip(vo.spare_capacity_mut()[..n].par_chunks_mut(CHUNK)),
        )
        .enumerate()
        .for_each(|(c, (wo, (mo, vo)))| {
            let r = c * CHUNK..(c * CHUNK + wo.len());
            let inputs = [&wv[r.clone()], &gv[r.clone()], &mv[r.clone()], &vv[r]];
            update(inputs, [wo, mo, vo], s);
        });
    drop(guards);
    // SAFETY: `update` wrote all n elements of each (the chunks cover 0..n).
    unsafe {
        wo.set_len(n);
        mo.set_len(n);
        vo.set_len(n);
    }
    let dev = w.device();
    Ok(Some((
        Tensor::from_vec(wo, shape, dev)?,
        Tensor::from_vec(mo, shape, dev)?,
        Tensor::from_vec(vo, shape, dev)?,
    )))
}
