//! One bridge from a CPU kernel to candle's custom ops. candle has a trait per operand count
//! (`CustomOp1/2/3`), each wanting its storages unpacked, checked for f32 and contiguity, and
//! its output wrapped back; a [`Kernel`] says only what it computes (and, if it is
//! differentiable, its backward), and [`apply`] / [`apply_no_bwd`] run it on 1 to 3 tensors.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// One operand of a kernel: its values (contiguous, row-major) and its shape.
#[derive(Clone, Copy)]
pub(super) struct In<'a> {
    pub(super) data: &'a [f32],
    pub(super) shape: &'a Shape,
}

impl In<'_> {
    pub(super) fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
}

/// A CPU f32 computation over 1 to 3 operands, giving one tensor.
pub(super) trait Kernel: Send + Sync + 'static {
    /// The op's name in candle's graph and in errors.
    fn name(&self) -> &'static str;

    /// The output's values and shape from the operands.
    fn forward(&self, xs: &[In]) -> Result<(Vec<f32>, Shape)>;

    /// Each operand's gradient (`None`: none flows to it) from the operands, the output and the
    /// output's gradient. Needed only by kernels run with [`apply`].
    fn backward(
        &self,
        _xs: &[&Tensor],
        _out: &Tensor,
        _grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// The `N` operands (or gradients) of a kernel that takes exactly `N`.
pub(super) fn operands<T, const N: usize>(name: &str, xs: impl Into<Vec<T>>) -> Result<[T; N]> {
    let xs: Vec<T> = xs.into();
    let got = xs.len();
    xs.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: takes {N} operands, got {got}")))
}

/// The values of a contiguous f32 CPU storage under its layout.
pub(super) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

struct Op<K>(K);

impl<K: Kernel> Op<K> {
    fn run(&self, args: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let name = self.0.name();
        let xs = args
            .iter()
            .enumerate()
            .map(|(i, (s, l))| match contiguous_f32(s, l) {
                Some(data) => Ok(In {
                    data,
                    shape: l.shape(),
                }),
                None => Err(candle_core::Error::Msg(format!(
                    "{name}: operand {i} must be contiguous f32, is {:?}",
                    s.dtype()
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let (values, shape) = self.0.forward(&xs)?;
        if values.len() != shape.elem_count() {
            candle_core::bail!("{name}: {} values for shape {shape:?}", values.len())
        }
        Ok((CpuStorage::F32(values), shape))
    }

    fn grads<const N: usize>(
        &self,
        xs: &[&Tensor],
        out: &Tensor,
        g: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        operands(self.0.name(), self.0.backward(xs, out, g)?)
    }
}

impl<K: Kernel> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(&[(s, l)])
    }

    fn bwd(&self, a: &Tensor, out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let [da] = self.grads(&[a], out, g)?;
        Ok(da)
    }
}

impl<K: Kernel> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(&[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.grads(&[a, b], out, g)?;
        Ok((da, db))
    }
}

impl<K: Kernel> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.grads(&[a, b, c], out, g)?;
        Ok((da, db, dc))
    }
}

fn run<K: Kernel>(k: K, xs: &[&Tensor], differentiable: bool) -> Result<Tensor> {
    let name = k.name();
    let xs = xs
        .iter()
        .map(|x| x.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let op = Op(k);
    match (xs.as_slice(), differentiable) {
        ([a], true) => a.apply_op1(op),
        ([a], false) => a.apply_op1_no_bwd(&op),
        ([a, b], true) => a.apply_op2(b, op),
        ([a, b], false) => a.apply_op2_no_bwd(b, &op),
        ([a, b, c], true) => a.apply_op3(b, c, op),
        ([a, b, c], false) => a.apply_op3_no_bwd(b, c, &op),
        _ => candle_core::bail!("{name}: takes 1 to 3 operands, got {}", xs.len()),
    }
}

/// Runs `k` on `xs` (made contiguous first), recorded for autograd through
/// [`Kernel::backward`].
pub(super) fn apply<K: Kernel>(k: K, xs: &[&Tensor]) -> Result<Tensor> {
    run(k, xs, true)
}

/// Runs `k` on `xs` outside autograd (a backward pass's own kernels).
pub(super) fn apply_no_bwd<K: Kernel>(k: K, xs: &[&Tensor]) -> Result<Tensor> {
    run(k, xs, false)
}
