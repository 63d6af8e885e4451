//! Training nodes that are several layers each, on CPU in f32: a whole pre-norm ViT block
//! (`x1 = x + ls1 * proj(attn(qkv(norm1(x)))); y = x1 + ls2 * fc2(gelu(fc1(norm2(x1))))`) and
//! a SAK adapter step (`s = r + x; y = s + scale * up(gelu(down(s)))`).
//!
//! Composed from candle ops a block is nine nodes and an adapter step six, and candle's backward
//! adds every gradient into a freshly zeroed tensor (`GradStore::or_insert` then `add`), one
//! allocation, one zeroing pass and one addition per operand of every node, activation-sized for
//! most. Here the
//! forward keeps what the backward needs and the backward writes each gradient once, in buffers
//! it owns. The parameters are read straight from their storages, outside candle's graph; their
//! gradients go to a per-thread sink that [`FusedGradients::backward`] merges into the
//! [`GradStore`]. The fused nodes are used only while a [`FusedGradients`] is alive on the thread,
//! so a plain `loss.backward()` never misses a gradient.

use super::op::{contiguous_f32, In, Kernel};
use super::{
    gelu_bwd_slice, gelu_slice, gelu_slice_inplace, gemm_raw, gemm_xwt, input_major_storage,
    written_by, FusedAttention, FusedAttentionBwd, LayerNormBwd, WeightView, CHUNK,
};
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

thread_local! {
    /// `(parameter, gradient)` pairs computed by fused nodes during the current backward pass;
    /// `None` while no [`FusedGradients`] is alive on this thread.
    static SINK: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// While alive, training forwards on this thread may use fused nodes whose parameter gradients
/// bypass candle's graph; take the gradients with [`FusedGradients::backward`].
pub struct FusedGradients {
    outer: Option<Vec<(Tensor, Tensor)>>,
}

impl FusedGradients {
    pub fn enable() -> Self {
        let outer = SINK.with(|s| s.borrow_mut().replace(Vec::new()));
        Self { outer }
    }

    /// `loss.backward()` with the fused nodes' parameter gradients merged in (added to any
    /// gradient candle computed for the same tensor).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        with_sink(|v| v.clear());
        let mut grads = loss.backward()?;
        let pending = SINK
            .with(|s| s.borrow_mut().as_mut().map(std::mem::take))
            .unwrap_or_default();
        // A parameter computed from others (transformers' q, k and v weights concatenated into
        // one qkv weight) passes its gradient on through candle: the gradient of
        // sum(p * g) with g held constant is g at p, so one more backward pass over the
        // parameters' own (small) graphs reaches the variables they are made from.
        let mut through: Option<Tensor> = None;
        let mut leaves = Vec::new();
        for (p, g) in pending {
            if p.is_variable() || !p.track_op() {
                leaves.push((p, g));
            } else {
                let term = (&p * &g)?.sum_all()?;
                through = Some(match through {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
        }
        if let Some(t) = through {
            let more = t.backward()?;
            for id in more.get_ids().copied().collect::<Vec<_>>() {
                if let Some(g) = more.get_id(id) {
                    add_gradient(&mut grads, id, g.clone())?;
                }
            }
        }
        for (p, g) in leaves {
            add_gradient(&mut grads, p.id(), g)?;
        }
        Ok(grads)
    }
}

/// The backward pass of `loss` through `fused` when given (a training forward that ran with
/// it alive), else candle's plain backward.
pub fn backward_with(fused: Option<&FusedGradients>, loss: &Tensor) -> Result<GradStore> {
    match fused {
        Some(f) => f.backward(loss),
        None => loss.backward(),
    }
}

/// `grads[id] += g`.
fn add_gradient(grads: &mut GradStore, id: candle_core::TensorId, g: Tensor) -> Result<()> {
    let g = match grads.get_id(id) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert_id(id, g);
    Ok(())
}

impl Drop for FusedGradients {
    fn drop(&mut self) {
        let outer = self.outer.take();
        SINK.with(|s| *s.borrow_mut() = outer);
    }
}

/// Whether a [`FusedGradients`] is alive on this thread.
pub fn fused_training_enabled() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Hands the gradients of `params` (same order, flat values) to the sink.
pub(super) fn give_gradients(params: Vec<&Tensor>, grads: Vec<Vec<f32>>) -> Result<()> {
    let pairs = params
        .into_iter()
        .zip(grads)
        .map(|(t, g)| Ok((t.clone(), Tensor::from_vec(g, t.shape(), &Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    with_sink(|sink| sink.extend(pairs)).ok_or_else(|| {
        msg("fused node: backward outside FusedGradients::backward (its parameter gradients would be lost)")
    })
}

fn with_sink<R>(f: impl FnOnce(&mut Vec<(Tensor, Tensor)>) -> R) -> Option<R> {
    SINK.with(|s| s.borrow_mut().as_mut().map(f))
}

/// The parameters of one block (`nn.Linear` weights are `[out, in]`).
#[derive(Clone)]
pub struct VitBlockParams {
    pub norm1: (Tensor, Tensor),
    pub qkv: (Tensor, Option<Tensor>),
    pub proj: (Tensor, Tensor),
    pub ls1: Option<Tensor>,
    pub norm2: (Tensor, Tensor),
    pub fc1: (Tensor, Tensor),
    pub fc2: (Tensor, Tensor),
    pub ls2: Option<Tensor>,
    pub heads: usize,
    pub scale: f32,
    pub eps: f32,
}

impl VitBlockParams {
    /// Every tensor, optional ones included when present, in the order [`Views::new`] reads.
    fn all(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.norm1.0, &self.norm1.1, &self.qkv.0];
        v.extend(&self.qkv.1);
        v.extend([&self.proj.0, &self.proj.1]);
        v.extend(&self.ls1);
        v.extend([&self.norm2.0, &self.norm2.1, &self.fc1.0, &self.fc1.1]);
        v.extend([&self.fc2.0, &self.fc2.1]);
        v.extend(&self.ls2);
        v
    }

    /// The tensors of [`Self::all`] as stored: a weight kept input-major (see
    /// [`super::input_major`]) as its contiguous `[in, out]` storage.
    fn stored(&self) -> Vec<Tensor> {
        self.all()
            .into_iter()
            .map(|t| input_major_storage(t).unwrap_or_else(|| t.clone()))
            .collect()
    }

    /// Whether a linear weight is stored input-major.
    fn any_input_major(&self) -> bool {
        [&self.qkv.0, &self.proj.0, &self.fc1.0, &self.fc2.0]
            .into_iter()
            .any(|w| input_major_storage(w).is_some())
    }

    /// `(dim, hidden)` when every tensor is a CPU f32 tensor of a consistent shape.
    fn dims(&self) -> Option<(usize, usize)> {
        let d = self.norm1.0.elem_count();
        let hidden = self.fc1.0.dim(0).ok()?;
        let ok = self.all().iter().all(|t| {
            super::fast_path(t) && (t.is_contiguous() || input_major_storage(t).is_some())
        }) && [
            &self.norm1.1,
            &self.proj.1,
            &self.norm2.0,
            &self.norm2.1,
            &self.fc2.1,
        ]
        .into_iter()
        .chain(&self.ls1)
        .chain(&self.ls2)
        .all(|t| t.elem_count() == d)
            && self.qkv.0.dims() == [3 * d, d]
            && self.qkv.1.as_ref().is_none_or(|b| b.elem_count() == 3 * d)
            && self.proj.0.dims() == [d, d]
            && self.fc1.0.dims() == [hidden, d]
            && self.fc1.1.elem_count() == hidden
            && self.fc2.0.dims() == [d, hidden]
            && self.heads > 0
            && d.is_multiple_of(self.heads);
        ok.then_some((d, hidden))
    }
}

/// The block on `x: [B, N, D]` as one autograd node, or `None` where it does not apply (no
/// [`FusedGradients`] alive on this thread, no gradient asked, not CPU f32, other shapes): the
/// caller then composes the block from its layers.
pub fn vit_block_train(x: &Tensor, p: &VitBlockParams) -> Result<Option<Tensor>> {
    if !fused_training_enabled() || !super::tracked(x) {
        return Ok(None);
    }
    match block_op(x, p, true)? {
        Some(op) => x.contiguous()?.apply_op1(op).map(Some),
        None => Ok(None),
    }
}

/// The block on `x: [B, N, D]` when no gradient is asked of it or its parameters (a frozen
/// teacher, inference), in one pass whose intermediates are dropped as soon as they are used;
/// `None` where it does not apply (not CPU f32, other shapes).
pub fn vit_block_infer(x: &Tensor, p: &VitBlockParams) -> Result<Option<Tensor>> {
    if super::tracked(x) || p.all().iter().any(|t| super::tracked(t)) {
        return Ok(None);
    }
    match block_op(x, p, false)? {
        Some(op) => x.contiguous()?.apply_op1_no_bwd(&op).map(Some),
        None => Ok(None),
    }
}

/// The block's node for `x` (None unless CPU f32 tokens of the parameters' width).
fn block_op(x: &Tensor, p: &VitBlockParams, keep: bool) -> Result<Option<BlockOp>> {
    if !super::fast_path(x) || x.rank() != 3 {
        return Ok(None);
    }
    let Some((d, hidden)) = p.dims() else {
        return Ok(None);
    };
    // input-major weights are frozen ones: their training form is the composed block
    if x.dim(2)? != d || (keep && p.any_input_major()) {
        return Ok(None);
    }
    Ok(Some(BlockOp {
        p: p.clone(),
        hidden,
        keep,
        saved: Mutex::new(None),
    }))
}

struct BlockOp {
    p: VitBlockParams,
    hidden: usize,
    /// keep the intermediates for a backward pass (training)
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// What the forward keeps for the backward (`[rows, width]` row-major each).
struct Saved {
    ln1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    /// projection output before layer scale (only with layer scale)
    proj: Option<Vec<f32>>,
    x1: Vec<f32>,
    ln2: Vec<f32>,
    /// fc1 output before GELU
    pre: Vec<f32>,
    act: Vec<f32>,
    /// fc2 output before layer scale (only with layer scale)
    mlp: Option<Vec<f32>>,
}

/// The parameters' values.
struct Views<'a> {
    n1w: &'a [f32],
    n1b: &'a [f32],
    qkvw: WeightView<'a>,
    qkvb: Option<&'a [f32]>,
    projw: WeightView<'a>,
    projb: &'a [f32],
    ls1: Option<&'a [f32]>,
    n2w: &'a [f32],
    n2b: &'a [f32],
    fc1w: WeightView<'a>,
    fc1b: &'a [f32],
    fc2w: WeightView<'a>,
    fc2b: &'a [f32],
    ls2: Option<&'a [f32]>,
}

impl<'a> Views<'a> {
    /// `s`: the values of [`VitBlockParams::stored`].
    fn new(p: &VitBlockParams, s: &[&'a [f32]]) -> Self {
        let mut it = s.iter().copied();
        let mut next = || it.next().unwrap_or(&[]);
        let weight = |data: &'a [f32], w: &Tensor| WeightView {
            data,
            kn: input_major_storage(w).is_some(),
        };
        Views {
            n1w: next(),
            n1b: next(),
            qkvw: weight(next(), &p.qkv.0),
            qkvb: p.qkv.1.as_ref().map(|_| next()),
            projw: weight(next(), &p.proj.0),
            projb: next(),
            ls1: p.ls1.as_ref().map(|_| next()),
            n2w: next(),
            n2b: next(),
            fc1w: weight(next(), &p.fc1.0),
            fc1b: next(),
            fc2w: weight(next(), &p.fc2.0),
            fc2b: next(),
            ls2: p.ls2.as_ref().map(|_| next()),
        }
    }
}

pub(super) fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// Runs `f` on the values of CPU f32 contiguous tensors.
pub(super) fn with_values<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut vals = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(c) => vals.push(
                contiguous_f32(c, l)
                    .ok_or_else(|| msg("fused node: a tensor is not contiguous f32"))?,
            ),
            _ => return Err(msg("fused node: a tensor is not on the CPU")),
        }
    }
    f(&vals)
}

#[inline(always)]
fn layer_norm_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        // lane-wise sums so the loops vectorise
        const L: usize = 16;
        let mut acc = [0f32; L];
        let full = d / L * L;
        for c in xr[..full].chunks_exact(L) {
            for i in 0..L {
                acc[i] += c[i];
            }
        }
        let mean = (acc.iter().sum::<f32>() + xr[full..].iter().sum::<f32>()) / d as f32;
        let mut acc = [0f32; L];
        for c in xr[..full].chunks_exact(L) {
            for i in 0..L {
                let t = c[i] - mean;
                acc[i] += t * t;
            }
        }
        let tail: f32 = xr[full..].iter().map(|v| (v - mean) * (v - mean)).sum();
        let rstd = 1.0 / ((acc.iter().sum::<f32>() + tail) / d as f32 + eps).sqrt();
        for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (v - mean) * rstd * wv + bv;
        }
    }
}
multiversion!(
    layer_norm_rows_into,
    layer_norm_body,
    (x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32])
);

/// LayerNorm of `[rows, d]` rows (biased variance, as `nn.LayerNorm`).
fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let rows_per = (CHUNK / d).max(1) * d;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(rows_per)
        .zip(x.par_chunks(rows_per))
        .for_each(|(yc, xc)| layer_norm_rows_into(xc, w, b, eps, yc));
    y
}

/// `(dx, dw, db)` of LayerNorm rows of `x` for the upstream `g`.
fn layer_norm_grads(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let d = w.len();
    let rows = x.len() / d;
    let shape = Shape::from((rows, d));
    let wshape = Shape::from(d);
    let op = |data, shape| In { data, shape };
    let (mut packed, _) =
        LayerNormBwd { eps }.forward(&[op(x, &shape), op(w, &wshape), op(g, &shape)])?;
    let db = packed.split_off((rows + 1) * d);
    let dw = packed.split_off(rows * d);
    Ok((packed, dw, db))
}

/// `a @ w^T + b` for `a: [m, k]`, `w: [n, k]` (stored `[k, n]` when `w.kn`).
fn linear(a: &[f32], w: WeightView, b: Option<&[f32]>, n: usize) -> Vec<f32> {
    let k = w.data.len() / n;
    gemm_xwt(a, w, b, a.len() / k, n, k)
}

/// `op(a) @ op(b)` into a new `[rows, cols]` buffer (`op` = transpose when flagged).
fn product(a: &[f32], b: &[f32], (rows, k, cols): (usize, usize, usize), ta: bool) -> Vec<f32> {
    // SAFETY: a product that does not accumulate writes all rows*cols elements, reading none.
    unsafe {
        written_by(rows * cols, |dst| {
            gemm_raw(dst, a, b, (rows, k, cols), ta, false, false)
        })
    }
}

/// Gradients of `y = a w^T + b` for upstream `g: [m, n]`: `(da, dw, db)`.
fn linear_grads(
    a: &[f32],
    w: &[f32],
    g: &[f32],
    n: usize,
    bias: bool,
) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let k = w.len() / n;
    let m = g.len() / n;
    let da = product(g, w, (m, n, k), false);
    let dw = product(g, a, (n, m, k), true);
    let db = bias.then(|| column_sums(g, n));
    (da, dw, db)
}

/// Sums of the columns of `[m, n]` rows (a product with a row of ones: deterministic).
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let ones = vec![1f32; g.len() / n];
    product(&ones, g, (1, g.len() / n, n), false)
}

/// `(g * s, column sums of g * pre)`: the gradients through a per-channel scale `s` of `pre`.
fn scale_grads(g: &[f32], s: &[f32], pre: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = s.len();
    let mut scaled = vec![0f32; g.len()];
    let mut ds = vec![0f32; d];
    for ((out, gr), pr) in scaled
        .chunks_exact_mut(d)
        .zip(g.chunks_exact(d))
        .zip(pre.chunks_exact(d))
    {
        for j in 0..d {
            out[j] = gr[j] * s[j];
            ds[j] += gr[j] * pr[j];
        }
    }
    (scaled, ds)
}

/// `acc += y` element-wise, in parallel.
fn add_into(acc: &mut [f32], y: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// `y` scaled per channel by `s` in place (rows of `s.len()`).
fn scale_rows(y: &mut [f32], s: &[f32]) {
    y.par_chunks_mut(s.len() * 64).for_each(|c| {
        for r in c.chunks_exact_mut(s.len()) {
            r.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
        }
    });
}

impl BlockOp {
    /// The block's output and, when `self.keep`, what the backward needs (otherwise every
    /// intermediate is dropped as soon as it is used, and GELU runs in place).
    fn forward(
        &self,
        x: &[f32],
        (b, n, d): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Option<Saved>)> {
        let p = &self.p;
        let keep = self.keep;
        with_values(&p.stored().iter().collect::<Vec<_>>(), |vals| {
            let v = Views::new(p, vals);
            let ln1 = layer_norm_rows(x, v.n1w, v.n1b, p.eps);
            let qkv = linear(&ln1, v.qkvw, v.qkvb, 3 * d);
            let ln1 = keep.then_some(ln1);
            let attention = FusedAttention {
                heads: p.heads,
                scale: p.scale,
            };
            let qkv_shape = Shape::from((b, n, 3 * d));
            let (att, _) = attention.forward(&[In {
                data: &qkv,
                shape: &qkv_shape,
            }])?;
            let qkv = keep.then_some(qkv);
            let mut x1 = linear(&att, v.projw, Some(v.projb), d);
            let att = keep.then_some(att);
            let proj = v.ls1.filter(|_| keep).map(|_| x1.clone());
            if let Some(s) = v.ls1 {
                scale_rows(&mut x1, s);
            }
            add_into(&mut x1, x);
            let ln2 = layer_norm_rows(&x1, v.n2w, v.n2b, p.eps);
            let mut pre = linear(&ln2, v.fc1w, Some(v.fc1b), self.hidden);
            let ln2 = keep.then_some(ln2);
            let (pre, act) = if keep {
                let mut act = vec![0f32; pre.len()];
                act.par_chunks_mut(CHUNK)
                    .zip(pre.par_chunks(CHUNK))
                    .for_each(|(o, i)| gelu_slice(i, o));
                (Some(pre), act)
            } else {
                pre.par_chunks_mut(CHUNK).for_each(gelu_slice_inplace);
                (None, pre)
            };
            let mut y = linear(&act, v.fc2w, Some(v.fc2b), d);
            let act = keep.then_some(act);
            let mlp = v.ls2.filter(|_| keep).map(|_| y.clone());
            if let Some(s) = v.ls2 {
                scale_rows(&mut y, s);
            }
            add_into(&mut y, &x1);
            let saved = match (ln1, qkv, att, ln2, pre, act) {
                (Some(ln1), Some(qkv), Some(att), Some(ln2), Some(pre), Some(act)) => Some(Saved {
                    ln1,
                    qkv,
                    att,
                    proj,
                    x1,
                    ln2,
                    pre,
                    act,
                    mlp,
                }),
                _ => None,
            };
            Ok((y, saved))
        })
    }

    /// `dx` and the parameters' gradients (in [`VitBlockParams::all`] order).
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        s: Saved,
        (b, n, d): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let p = &self.p;
        let hidden = self.hidden;
        with_values(&p.all(), |vals| {
            let v = Views::new(p, vals);
            // y = x1 + ls2 * mlp
            let (dmlp, dls2) = match (v.ls2, &s.mlp) {
                (Some(ls), Some(pre)) => {
                    let (g, ds) = scale_grads(dy, ls, pre);
                    (std::borrow::Cow::Owned(g), Some(ds))
                }
                _ => (std::borrow::Cow::Borrowed(dy), None),
            };
            let (dact, dfc2w, dfc2b) = linear_grads(&s.act, v.fc2w.data, &dmlp, d, true);
            drop(dmlp);
            // the GELU's output is no longer needed: its buffer takes the pre-activation's gradient
            let mut dpre = s.act;
            dpre.par_chunks_mut(CHUNK)
                .zip(s.pre.par_chunks(CHUNK).zip(dact.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| gelu_bwd_slice(x, g, o));
            drop(dact);
            let (dln2, dfc1w, dfc1b) = linear_grads(&s.ln2, v.fc1w.data, &dpre, hidden, true);
            drop(dpre);
            let (mut dx1, dn2w, dn2b) = layer_norm_grads(&s.x1, v.n2w, &dln2, p.eps)?;
            add_into(&mut dx1, dy);
            // x1 = x + ls1 * proj
            let (dproj, dls1) = match (v.ls1, &s.proj) {
                (Some(ls), Some(pre)) => {
                    let (g, ds) = scale_grads(&dx1, ls, pre);
                    (std::borrow::Cow::Owned(g), Some(ds))
                }
                _ => (std::borrow::Cow::Borrowed(&dx1[..]), None),
            };
            let (datt, dprojw, dprojb) = linear_grads(&s.att, v.projw.data, &dproj, d, true);
            drop(dproj);
            let bwd = FusedAttentionBwd {
                heads: p.heads,
                scale: p.scale,
            };
            let qkv_shape = Shape::from((b, n, 3 * d));
            let att_shape = Shape::from((b, n, d));
            let (dqkv, _) = bwd.forward(&[
                In {
                    data: &s.qkv,
                    shape: &qkv_shape,
                },
                In {
                    data: &datt,
                    shape: &att_shape,
                },
            ])?;
            drop(datt);
            let (dln1, dqkvw, dqkvb) =
                linear_grads(&s.ln1, v.qkvw.data, &dqkv, 3 * d, v.qkvb.is_some());
            let (mut dx, dn1w, dn1b) = layer_norm_grads(x, v.n1w, &dln1, p.eps)?;
            add_into(&mut dx, &dx1);
            let mut grads = vec![dn1w, dn1b, dqkvw];
            grads.extend(dqkvb);
            grads.extend([dprojw, dprojb.unwrap_or_default()]);
            grads.extend(dls1);
            grads.extend([dn2w, dn2b, dfc1w, dfc1b.unwrap_or_default()]);
            grads.extend([dfc2w, dfc2b.unwrap_or_default()]);
            grads.extend(dls2);
            Ok((dx, grads))
        })
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "distillery-vit-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        let dims = l.shape().dims3()?;
        let (y, saved) = self.forward(x, dims)?;
        *self.saved.lock().map_err(|_| msg("vit block: poisoned"))? = saved;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| msg("vit block: poisoned"))?
            .take()
            .ok_or_else(|| msg("vit block: backward ran twice over one forward"))?;
        let dims = x.dims3()?;
        let dy = dy.contiguous()?;
        let (dx, grads) = with_values(&[x, &dy], |v| self.backward(v[0], v[1], saved, dims))?;
        give_gradients(self.p.all(), grads)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

/// The parameters of one SAK adapter: `down` `[k, d]`, `up` `[d, k]` (with biases), `scale` `[1]`.
#[derive(Clone)]
pub struct AdapterParams {
    pub down: (Tensor, Tensor),
    pub up: (Tensor, Tensor),
    pub scale: Tensor,
}

impl AdapterParams {
    fn all(&self) -> Vec<&Tensor> {
        vec![
            &self.down.0,
            &self.down.1,
            &self.up.0,
            &self.up.1,
            &self.scale,
        ]
    }

    /// `(d, k)` when every tensor is a CPU f32 tensor of a consistent shape.
    fn dims(&self) -> Option<(usize, usize)> {
        let (k, d) = self.down.0.dims2().ok()?;
        let ok = self
            .all()
            .iter()
            .all(|t| super::fast_path(t) && t.is_contiguous())
            && self.down.1.elem_count() == k
            && self.up.0.dims() == [d, k]
            && self.up.1.elem_count() == d
            && self.scale.elem_count() == 1;
        ok.then_some((d, k))
    }
}

/// `y = s + scale * up(gelu(down(s)))` with `s = r + x` (or `s = x` without `r`), on `[.., d]`
/// tokens, as one autograd node; `None` where it does not apply (as [`vit_block_train`]).
pub fn adapter_train(r: Option<&Tensor>, x: &Tensor, p: &AdapterParams) -> Result<Option<Tensor>> {
    let inputs: Vec<&Tensor> = r.into_iter().chain([x]).collect();
    if !fused_training_enabled()
        || !inputs.iter().any(|t| super::tracked(t))
        || !inputs
            .iter()
            .all(|t| super::fast_path(t) && t.shape() == x.shape())
    {
        return Ok(None);
    }
    let Some((d, k)) = p.dims() else {
        return Ok(None);
    };
    if x.dim(candle_core::D::Minus1)? != d {
        return Ok(None);
    }
    let op = AdapterOp {
        p: p.clone(),
        k,
        saved: Mutex::new(None),
    };
    let x = x.contiguous()?;
    Ok(Some(match r {
        Some(r) => r.contiguous()?.apply_op2(&x, op)?,
        None => x.apply_op1(op)?,
    }))
}

struct AdapterOp {
    p: AdapterParams,
    /// bottleneck width
    k: usize,
    saved: Mutex<Option<AdapterSaved>>,
}

struct AdapterSaved {
    /// `r + x` (kept only when there is an `r`; else `x` is the node's operand)
    sum: Option<Vec<f32>>,
    /// down projection before GELU, and after
    pre: Vec<f32>,
    act: Vec<f32>,
}

impl AdapterOp {
    fn forward(&self, r: Option<&[f32]>, x: &[f32]) -> Result<(Vec<f32>, AdapterSaved)> {
        let sum = r.map(|r| {
            let mut s = r.to_vec();
            add_into(&mut s, x);
            s
        });
        let (y, pre, act) = with_values(&self.p.all(), |v| {
            let s = sum.as_deref().unwrap_or(x);
            let [dw, db, uw, ub, scale] = [v[0], v[1], v[2], v[3], v[4]];
            let pre = linear(s, WeightView::out_major(dw), Some(db), self.k);
            let mut act = vec![0f32; pre.len()];
            act.par_chunks_mut(CHUNK)
                .zip(pre.par_chunks(CHUNK))
                .for_each(|(o, i)| gelu_slice(i, o));
            let mut y = linear(&act, WeightView::out_major(uw), Some(ub), ub.len());
            let sc = scale[0];
            y.par_chunks_mut(CHUNK)
                .zip(s.par_chunks(CHUNK))
                .for_each(|(y, s)| y.iter_mut().zip(s).for_each(|(y, s)| *y = s + sc * *y));
            Ok((y, pre, act))
        })?;
        Ok((y, AdapterSaved { sum, pre, act }))
    }

    /// `ds` and the parameters' gradients (in [`AdapterParams::all`] order).
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        saved: AdapterSaved,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let s = saved.sum.as_deref().unwrap_or(x);
        with_values(&self.p.all(), |v| {
            let [dw, _, uw, ub, scale] = [v[0], v[1], v[2], v[3], v[4]];
            let (d, k, sc) = (ub.len(), self.k, scale[0]);
            // u = up(act); y = s + sc * u: d(up) = sc * (dy^T act, colsum dy), dsc = <dy, u>
            let (mut dact, mut duw, dub) = linear_grads(&saved.act, uw, dy, d, true);
            let mut dub = dub.unwrap_or_default();
            let dscale: f32 = duw.iter().zip(uw).map(|(g, w)| g * w).sum::<f32>()
                + dub.iter().zip(ub).map(|(g, b)| g * b).sum::<f32>();
            duw.iter_mut().chain(dub.iter_mut()).for_each(|g| *g *= sc);
            // d(act) = sc * dy up; d(pre) = d(act) * gelu'(pre)
            let mut dpre = saved.act;
            dact.iter_mut().for_each(|g| *g *= sc);
            dpre.par_chunks_mut(CHUNK)
                .zip(saved.pre.par_chunks(CHUNK).zip(dact.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| gelu_bwd_slice(x, g, o));
            let (mut ds, ddw, ddb) = linear_grads(s, dw, &dpre, k, true);
            add_into(&mut ds, dy);
            Ok((
                ds,
                vec![ddw, ddb.unwrap_or_default(), duw, dub, vec![dscale]],
            ))
        })
    }

    fn run_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| msg("adapter: poisoned"))?
            .take()
            .ok_or_else(|| msg("adapter: backward ran twice over one forward"))?;
        let dy = dy.contiguous()?;
        let (ds, grads) = with_values(&[x, &dy], |v| self.backward(v[0], v[1], saved))?;
        give_gradients(self.p.all(), grads)?;
        Tensor::from_vec(ds, x.shape(), &Device::Cpu)
    }

    fn run_forward(
        &self,
        r: Option<&[f32]>,
        x: &[f32],
        shape: &Shape,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, saved) = self.forward(r, x)?;
        *self.saved.lock().map_err(|_| msg("adapter: poisoned"))? = Some(saved);
        Ok((CpuStorage::F32(y), shape.clone()))
    }
}

pub(super) fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    contiguous_f32(s, l).ok_or_else(|| msg("fused node: operand not contiguous f32"))
}

impl CustomOp1 for AdapterOp {
    fn name(&self) -> &'static str {
        "distillery-adapter"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run_forward(None, values(s, l)?, l.shape())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.run_backward(x, dy)?))
    }
}

impl CustomOp2 for AdapterOp {
    fn name(&self) -> &'static str {
        "distillery-adapter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_forward(Some(values(s1, l1)?), values(s2, l2)?, l2.shape())
    }

    fn bwd(
        &self,
        _r: &Tensor,
        x: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // both operands get d(r + x)
        let ds = self.run_backward(x, dy)?;
        Ok((Some(ds.clone()), Some(ds)))
    }
}
