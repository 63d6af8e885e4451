//! CUDA kernels of our own (built with `--features cuda`): written in CUDA C here, compiled once
//! per process by NVRTC (the run-time compiler candle links), loaded into each device's
//! candle module cache. Only what candle's composed ops do slowly on a GPU lives here:
//!
//! - the AdamW update in place, two launches per parameter (moments, then the parameter)
//!   instead of ~12 element-wise ops each allocating a tensor; the arithmetic is the CPU
//!   kernel's ([`super::adamw`]), operation for operation in f32 (no fused multiply-add), so the
//!   two devices give the same bits;
//! - the depthwise convolution (FastViT, MobileViT-V2, ConvNeXt-style blocks) and its two
//!   gradients, one thread per output value (input value for the input gradient, one block per
//!   channel and tap for the kernel gradient); candle splits a grouped convolution into one
//!   convolution per channel, and the device-generic form of [`super::depthwise_conv2d`] costs
//!   a few ops per tap;
//! - adding a per-channel bias (a linear layer's, a convolution's or BatchNorm's shift): candle's
//!   broadcast add indexes every element through its strides and took 28 % of a stage-1 step's
//!   GPU time and 40 % of a bf16 ViT-B forward's (Nsight Compute, H100).

use super::AdamStep;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, InplaceOp2, Layout, Tensor};
use std::sync::OnceLock;

const MODULE: &str = "distillery_kernels";

const SRC: &str = r#"
extern "C" __global__ void adamw_moments(const unsigned int n, const float* g, float* mv,
                                         const float b1, const float c1, const float b2,
                                         const float c2) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float gi = g[i];
        mv[i] = mv[i] * b1 + gi * c1;
        mv[n + i] = mv[n + i] * b2 + (gi * gi) * c2;
    }
}

extern "C" __global__ void adamw_apply(const unsigned int n, float* w, const float* mv,
                                       const float keep, const float ib, const float eps,
                                       const float step) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float denom = sqrtf(mv[n + i]) * ib + eps;
        w[i] = w[i] * keep - (mv[i] / denom) * step;
    }
}

extern "C" __global__ void bias_add_f32(const unsigned long long n, const unsigned int c,
                                        const unsigned int inner, const float* x, const float* b,
                                        float* y) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + b[(i / inner) % c];
}

// bf16 as its 16 bits: widened to f32, added, rounded to nearest even (NaN stays NaN)
extern "C" __global__ void bias_add_bf16(const unsigned long long n, const unsigned int c,
                                         const unsigned int inner, const unsigned short* x,
                                         const unsigned short* b, unsigned short* y) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float s = __uint_as_float((unsigned int)x[i] << 16)
                  + __uint_as_float((unsigned int)b[(i / inner) % c] << 16);
    unsigned int u = __float_as_uint(s);
    if ((u & 0x7fffffffu) > 0x7f800000u) { y[i] = (unsigned short)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    y[i] = (unsigned short)(u >> 16);
}

struct Geom { int b, c, h, w, kh, kw, s, p, oh, ow; };

extern "C" __global__ void dw_forward(const Geom g, const float* x, const float* k, float* y) {
    const long long n = (long long)g.b * g.c * g.oh * g.ow;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ox = i % g.ow, oy = (i / g.ow) % g.oh;
    const long long plane = i / ((long long)g.ow * g.oh);
    const int c = plane % g.c;
    const float* xp = x + plane * g.h * g.w;
    const float* kc = k + (long long)c * g.kh * g.kw;
    float acc = 0.f;
    for (int ky = 0; ky < g.kh; ++ky) {
        const int iy = oy * g.s - g.p + ky;
        if (iy < 0 || iy >= g.h) continue;
        for (int kx = 0; kx < g.kw; ++kx) {
            const int ix = ox * g.s - g.p + kx;
            if (ix < 0 || ix >= g.w) continue;
            acc += xp[iy * g.w + ix] * kc[ky * g.kw + kx];
        }
    }
    y[i] = acc;
}

extern "C" __global__ void dw_input_grad(const Geom g, const float* dy, const float* k, float* dx) {
    const long long n = (long long)g.b * g.c * g.h * g.w;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ix = i % g.w, iy = (i / g.w) % g.h;
    const long long plane = i / ((long long)g.w * g.h);
    const int c = plane % g.c;
    const float* dyp = dy + plane * g.oh * g.ow;
    const float* kc = k + (long long)c * g.kh * g.kw;
    float acc = 0.f;
    for (int ky = 0; ky < g.kh; ++ky) {
        const int ty = iy + g.p - ky;
        if (ty < 0 || ty % g.s != 0 || ty / g.s >= g.oh) continue;
        for (int kx = 0; kx < g.kw; ++kx) {
            const int tx = ix + g.p - kx;
            if (tx < 0 || tx % g.s != 0 || tx / g.s >= g.ow) continue;
            acc += dyp[(ty / g.s) * g.ow + tx / g.s] * kc[ky * g.kw + kx];
        }
    }
    dx[i] = acc;
}

// one block of 256 threads per (channel, tap): the sum over batch and output positions
extern "C" __global__ void dw_kernel_grad(const Geom g, const float* x, const float* dy, float* dk) {
    const int taps = g.kh * g.kw;
    const int c = blockIdx.x / taps, tap = blockIdx.x % taps;
    const int ky = tap / g.kw, kx = tap % g.kw;
    const long long per_plane = (long long)g.oh * g.ow, n = g.b * per_plane;
    float acc = 0.f;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const int bi = j / per_plane;
        const int r = j % per_plane;
        const int oy = r / g.ow, ox = r % g.ow;
        const int iy = oy * g.s - g.p + ky, ix = ox * g.s - g.p + kx;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
        const long long plane = (long long)bi * g.c + c;
        acc += dy[plane * per_plane + r] * x[plane * g.h * g.w + iy * g.w + ix];
    }
    __shared__ float part[256];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) dk[blockIdx.x] = part[0];
}
"#;

/// The CPU half of a CUDA-only binary op: an error (callers check the device first).
macro_rules! cuda_only_cpu_fwd {
    () => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
}

/// The module's PTX, compiled on first use (NVRTC takes ~0.1 s).
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = CompileOptions {
            // `a * b + c` stays two roundings, as on the CPU
            fmad: Some(false),
            ..Default::default()
        };
        compile_ptx_with_opts(SRC, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile distillery's CUDA kernels: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The range of the moments buffer `[m | v]` for a parameter of `n` values: `2n` values,
/// indexed with 32 bits in the kernels.
fn moments_range(lmv: &Layout, n: usize) -> candle_core::Result<(usize, usize)> {
    if u32::try_from(2 * n).is_err() {
        candle_core::bail!("adamw on CUDA: a parameter of {n} values is too large")
    }
    let (m0, m1) = contiguous_range(lmv, "the moments")?;
    if m1 - m0 != 2 * n {
        candle_core::bail!("adamw on CUDA: moments of {} for {n} values", m1 - m0)
    }
    Ok((m0, m1))
}

fn launch_1d(n: usize) -> candle_core::Result<LaunchConfig> {
    let n = u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{n} elements: too many for one launch")))?;
    Ok(LaunchConfig::for_num_elems(n))
}

fn contiguous_range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => Err(candle_core::Error::Msg(format!(
            "CUDA kernel: {what} is not contiguous"
        ))),
    }
}

/// `mv = [m | v]` updated in place from the gradient.
struct Moments(AdamStep);

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("adamw-moments runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        mv: &mut CudaStorage,
        lmv: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let (g0, g1) = contiguous_range(lg, "the gradient")?;
        let n = g1 - g0;
        let (m0, m1) = moments_range(lmv, n)?;
        let dev = g.device().clone();
        let func = dev.get_or_load_custom_func("adamw_moments", MODULE, ptx()?)?;
        let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
        let mut mv = mv.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
        let s = &self.0;
        let (n32, b1, c1) = (n as u32, s.beta1 as f32, (1.0 - s.beta1) as f32);
        let (b2, c2) = (s.beta2 as f32, (1.0 - s.beta2) as f32);
        let mut b = func.builder();
        b.arg(&n32)
            .arg(&g)
            .arg(&mut mv)
            .arg(&b1)
            .arg(&c1)
            .arg(&b2)
            .arg(&c2);
        // SAFETY: the kernel reads n values of g and writes 2n of mv, both checked above.
        unsafe { b.launch(launch_1d(n)?) }.w()?;
        Ok(())
    }
}

/// `w` updated in place from the new moments.
struct Apply(AdamStep);

impl InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("adamw-apply runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        w: &mut CudaStorage,
        lw: &Layout,
        mv: &CudaStorage,
        lmv: &Layout,
    ) -> candle_core::Result<()> {
        let (w0, w1) = contiguous_range(lw, "the parameter")?;
        let n = w1 - w0;
        let (m0, m1) = moments_range(lmv, n)?;
        let dev = mv.device().clone();
        let func = dev.get_or_load_custom_func("adamw_apply", MODULE, ptx()?)?;
        let mv = mv.as_cuda_slice::<f32>()?.slice(m0..m1);
        let mut w = w.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
        let s = &self.0;
        let (n32, keep, ib) = (n as u32, s.keep as f32, s.inv_sqrt_bc2 as f32);
        let (eps, step) = (s.eps as f32, s.step_size as f32);
        let mut b = func.builder();
        b.arg(&n32)
            .arg(&mut w)
            .arg(&mv)
            .arg(&keep)
            .arg(&ib)
            .arg(&eps)
            .arg(&step);
        // SAFETY: the kernel writes n values of w and reads 2n of mv, both checked above.
        unsafe { b.launch(launch_1d(n)?) }.w()?;
        Ok(())
    }
}

/// Whether [`adamw_in_place`] takes these tensors: f32 on a CUDA device, contiguous, one shape.
pub fn adamw_in_place_fits(w: &Tensor, g: &Tensor, mv: &Tensor) -> bool {
    w.device().is_cuda()
        && [w, g, mv]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        && w.shape() == g.shape()
        && mv.elem_count() == 2 * w.elem_count()
}

/// One AdamW step in place: `mv` (the moments `[m | v]`, flat) and then `w` (a variable's
/// tensor) are overwritten.
pub fn adamw_in_place(
    w: &Tensor,
    g: &Tensor,
    mv: &Tensor,
    s: &AdamStep,
) -> candle_core::Result<()> {
    mv.inplace_op2(g, &Moments(*s))?;
    w.inplace_op2(mv, &Apply(*s))
}

/// The geometry as the kernels take it (a struct of i32 passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct DwGeom {
    b: i32,
    c: i32,
    h: i32,
    w: i32,
    kh: i32,
    kw: i32,
    s: i32,
    p: i32,
    oh: i32,
    ow: i32,
}

// SAFETY: plain old data of i32, laid out as the kernels' `Geom`.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for DwGeom {}

impl DwGeom {
    fn of(g: &super::depthwise::Geom) -> candle_core::Result<Self> {
        let i = |v: usize| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("depthwise conv: {v} too large")))
        };
        // the kernels index planes with 64-bit offsets, positions within a plane with 32 bits
        i(g.h * g.w)?;
        Ok(Self {
            b: i(g.b)?,
            c: i(g.c)?,
            h: i(g.h)?,
            w: i(g.w)?,
            kh: i(g.kh)?,
            kw: i(g.kw)?,
            s: i(g.stride)?,
            p: i(g.pad)?,
            oh: i(g.oh)?,
            ow: i(g.ow)?,
        })
    }
}

/// Which of the three depthwise kernels an op runs; its two operands, in order:
/// forward `(x, k)`, input gradient `(dy, k)`, kernel gradient `(x, dy)`.
#[derive(Clone, Copy)]
enum DwPass {
    Forward,
    InputGrad,
    KernelGrad,
}

struct Depthwise {
    geom: super::depthwise::Geom,
    pass: DwPass,
}

impl candle_core::CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        match self.pass {
            DwPass::Forward => "distillery-depthwise-conv2d-cuda",
            DwPass::InputGrad => "distillery-depthwise-input-grad-cuda",
            DwPass::KernelGrad => "distillery-depthwise-kernel-grad-cuda",
        }
    }

    cuda_only_cpu_fwd!();

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let g = &self.geom;
        let dg = DwGeom::of(g)?;
        let (a0, a1) = contiguous_range(la, "the first operand")?;
        let (b0, b1) = contiguous_range(lb, "the second operand")?;
        let dev = a.device().clone();
        let (fname, n_out, shape, cfg) = match self.pass {
            DwPass::Forward => {
                let n = g.b * g.c * g.oh * g.ow;
                ("dw_forward", n, vec![g.b, g.c, g.oh, g.ow], launch_1d(n)?)
            }
            DwPass::InputGrad => {
                let n = g.b * g.c * g.h * g.w;
                ("dw_input_grad", n, vec![g.b, g.c, g.h, g.w], launch_1d(n)?)
            }
            DwPass::KernelGrad => {
                let n = g.c * g.kh * g.kw;
                let cfg = LaunchConfig {
                    grid_dim: (
                        u32::try_from(n).map_err(|_| {
                            candle_core::Error::Msg("depthwise conv: too many taps".into())
                        })?,
                        1,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                ("dw_kernel_grad", n, vec![g.c, 1, g.kh, g.kw], cfg)
            }
        };
        let func = dev.get_or_load_custom_func(fname, MODULE, ptx()?)?;
        let a = a.as_cuda_slice::<f32>()?.slice(a0..a1);
        let b = b.as_cuda_slice::<f32>()?.slice(b0..b1);
        // SAFETY: every element is written by the kernel (one thread or block per element).
        let out = unsafe { dev.alloc::<f32>(n_out)? };
        if n_out > 0 {
            let mut l = func.builder();
            l.arg(&dg).arg(&a).arg(&b).arg(&out);
            // SAFETY: the kernels read the operands within the geometry checked by Geom::new.
            unsafe { l.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let op = |pass| Depthwise {
            geom: self.geom,
            pass,
        };
        let dx = dy.apply_op2_no_bwd(k, &op(DwPass::InputGrad))?;
        let dk = x.apply_op2_no_bwd(&dy, &op(DwPass::KernelGrad))?;
        Ok((Some(dx), Some(dk)))
    }
}

/// The depthwise convolution on a CUDA device (f32), differentiable in `x` and `k`; `None`
/// elsewhere.
pub(super) fn depthwise_conv2d(
    x: &Tensor,
    k: &Tensor,
    geom: super::depthwise::Geom,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.dtype() != DType::F32 || k.dtype() != DType::F32 {
        return Ok(None);
    }
    let (x, k) = (x.contiguous()?, k.contiguous()?);
    Ok(Some(x.apply_op2(
        &k,
        Depthwise {
            geom,
            pass: DwPass::Forward,
        },
    )?))
}

/// `x + b` with `b: [C]` broadcast along dimension `dim` of `x`.
struct BiasAdd {
    c: usize,
    inner: usize,
}

impl candle_core::CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "distillery-bias-add-cuda"
    }

    cuda_only_cpu_fwd!();

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let (x0, x1) = contiguous_range(lx, "the input")?;
        let (b0, b1) = contiguous_range(lb, "the bias")?;
        let n = x1 - x0;
        if b1 - b0 != self.c || self.c == 0 || self.inner == 0 {
            candle_core::bail!("bias add: {} bias values for {} channels", b1 - b0, self.c)
        }
        let c = u32::try_from(self.c)
            .map_err(|_| candle_core::Error::Msg("bias add: too many channels".into()))?;
        let inner = u32::try_from(self.inner)
            .map_err(|_| candle_core::Error::Msg("bias add: planes too large".into()))?;
        let n64 = n as u64;
        let blocks = u32::try_from(n.div_ceil(256))
            .map_err(|_| candle_core::Error::Msg("bias add: too many values".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dev = x.device().clone();
        macro_rules! run {
            ($t:ty, $f:literal) => {{
                let func = dev.get_or_load_custom_func($f, MODULE, ptx()?)?;
                let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
                let bs = b.as_cuda_slice::<$t>()?.slice(b0..b1);
                // SAFETY: every element is written, one thread each.
                let out = unsafe { dev.alloc::<$t>(n)? };
                if n > 0 {
                    let mut l = func.builder();
                    l.arg(&n64).arg(&c).arg(&inner).arg(&xs).arg(&bs).arg(&out);
                    // SAFETY: reads n values of x and c of b, checked above.
                    unsafe { l.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match x.dtype() {
            DType::F32 => run!(f32, "bias_add_f32"),
            DType::BF16 => run!(half::bf16, "bias_add_bf16"),
            d => candle_core::bail!("bias add on CUDA: {d:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let outer = x.elem_count() / (self.c * self.inner);
        let db = dy
            .reshape((outer, self.c, self.inner))?
            .to_dtype(DType::F32)?
            .sum(2)?
            .sum(0)?
            .to_dtype(b.dtype())?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// `x + b` for `b: [C]` along dimension `dim` of `x` on a CUDA device (f32, bf16; same dtype),
/// differentiable in both; `None` elsewhere.
pub(super) fn bias_add(x: &Tensor, b: &Tensor, dim: usize) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cuda()
        || x.dtype() != b.dtype()
        || !matches!(x.dtype(), DType::F32 | DType::BF16)
        || dim >= x.rank()
        || x.dim(dim)? != b.elem_count()
    {
        return Ok(None);
    }
    let inner = x.dims()[dim + 1..].iter().product::<usize>();
    let op = BiasAdd {
        c: b.elem_count(),
        inner,
    };
    if op.c == 0 || inner == 0 {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?
            .apply_op2(&b.flatten_all()?.contiguous()?, op)?,
    ))
}

/// Run on a machine with a GPU and a `--features cuda` build (CI has neither); without a
/// visible GPU they say so and pass. The CPU kernels they compare with are tested against
/// PyTorch references elsewhere.
#[cfg(test)]
mod tests {
    use super::super::test_util::rel_err;
    use super::*;
    use candle_core::{Device, Var};

    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("no CUDA device, skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn depthwise_forward_and_gradients_match_the_cpu_kernel() {
        let Some(gpu) = gpu() else { return };
        let cpu = Device::Cpu;
        for (c, h, w, kk, stride, pad) in [
            (5, 13, 11, 3, 1, 1),
            (6, 16, 15, 7, 1, 3),
            (4, 17, 12, 3, 2, 1),
            (3, 9, 10, 5, 2, 0),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &cpu).unwrap();
            let k = Tensor::randn(0f32, 0.5, (c, 1, kk, kk), &cpu).unwrap();
            let run = |dev: &Device| {
                let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
                let kv = Var::from_tensor(&k.to_device(dev).unwrap()).unwrap();
                let y = crate::kernels::depthwise_conv2d(&xv, &kv, pad, stride).unwrap();
                // a loss whose gradient differs per output element
                let r = Tensor::arange(0f32, y.elem_count() as f32, dev)
                    .unwrap()
                    .reshape(y.shape())
                    .unwrap()
                    .affine(0.37, 0.0)
                    .unwrap()
                    .sin()
                    .unwrap();
                let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().to_device(&cpu).unwrap();
                (y.to_device(&cpu).unwrap(), grad(&xv), grad(&kv))
            };
            let (y0, dx0, dk0) = run(&cpu);
            let (y1, dx1, dk1) = run(&gpu);
            for (what, a, b) in [("y", &y1, &y0), ("dx", &dx1, &dx0), ("dk", &dk1, &dk0)] {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let e = rel_err(a, b, 1e-6);
                assert!(e < 1e-5, "{what} k{kk} s{stride} p{pad}: rel err {e}");
            }
        }
    }

    #[test]
    fn bias_add_and_its_gradients_match_candles_broadcast_add() {
        let Some(gpu) = gpu() else { return };
        let cpu = Device::Cpu;
        for (dims, dim) in [
            (vec![37usize, 19], 1usize),
            (vec![3, 6, 5, 7], 1),
            (vec![4, 9, 11], 2),
        ] {
            let c = dims[dim];
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, c, &cpu).unwrap();
            let mut bshape = vec![1; dims.len()];
            bshape[dim] = c;
            for dt in [DType::F32, DType::BF16] {
                let (xg, bg) = (
                    x.to_dtype(dt).unwrap().to_device(&gpu).unwrap(),
                    b.to_dtype(dt).unwrap().to_device(&gpu).unwrap(),
                );
                let got = bias_add(&xg, &bg, dim).unwrap().expect("runs on CUDA");
                let want = x
                    .to_dtype(dt)
                    .unwrap()
                    .broadcast_add(&b.to_dtype(dt).unwrap().reshape(bshape.as_slice()).unwrap())
                    .unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&cpu).unwrap();
                assert_eq!(
                    f(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    f(&want).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{dims:?} {dt:?}"
                );
            }
            // gradients of sum(y * r) in f32 against candle's on the CPU
            let r = Tensor::randn(0f32, 1.0, dims.as_slice(), &cpu).unwrap();
            let (xv, bv) = (
                Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap(),
                Var::from_tensor(&b.to_device(&gpu).unwrap()).unwrap(),
            );
            let y = bias_add(&xv, &bv, dim).unwrap().unwrap();
            let g = (&y * r.to_device(&gpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let db = g.get(bv.as_tensor()).unwrap().to_device(&cpu).unwrap();
            let dx = g.get(xv.as_tensor()).unwrap().to_device(&cpu).unwrap();
            let mut sum_dims: Vec<usize> = (0..dims.len()).filter(|&d| d != dim).collect();
            sum_dims.reverse();
            let mut want_db = r.clone();
            for d in sum_dims {
                want_db = want_db.sum(d).unwrap();
            }
            assert!(rel_err(&db, &want_db, 1e-6) < 1e-5, "{dims:?} db");
            assert!(rel_err(&dx, &r, 1e-6) == 0.0, "{dims:?} dx");
        }
    }

    #[test]
    fn adamw_in_place_gives_the_cpu_kernels_bits() {
        let Some(gpu) = gpu() else { return };
        let cpu = Device::Cpu;
        let n = 70_001;
        let w = Tensor::randn(0f32, 1.0, n, &cpu).unwrap();
        let g = Tensor::randn(0f32, 0.1, n, &cpu).unwrap();
        let m = Tensor::randn(0f32, 0.05, n, &cpu).unwrap();
        let v = Tensor::randn(0f32, 0.01, n, &cpu).unwrap().sqr().unwrap();
        let s = AdamStep {
            keep: 1.0 - 3e-4 * 0.05,
            beta1: 0.9,
            beta2: 0.999,
            inv_sqrt_bc2: 1.0 / (1.0f64 - 0.999f64.powi(7)).sqrt(),
            eps: 1e-8,
            step_size: 3e-4 / (1.0 - 0.9f64.powi(7)),
        };
        let (w0, m0, v0) = crate::kernels::adamw_update(&w, &g, &m, &v, &s)
            .unwrap()
            .unwrap();
        let wg = w.to_device(&gpu).unwrap();
        let mv = Tensor::cat(&[&m, &v], 0).unwrap().to_device(&gpu).unwrap();
        let gg = g.to_device(&gpu).unwrap();
        assert!(adamw_in_place_fits(&wg, &gg, &mv));
        adamw_in_place(&wg, &gg, &mv, &s).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_device(&cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        assert_eq!(bits(&wg), bits(&w0));
        assert_eq!(bits(&mv.narrow(0, 0, n).unwrap()), bits(&m0));
        assert_eq!(bits(&mv.narrow(0, n, n).unwrap()), bits(&v0));
    }
}
