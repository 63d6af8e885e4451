//! Building blocks shared by every transformer family: linear, layer norm, attention, MLPs,
//! layer scale and the pre-norm block. Families differ only in weight names and a few switches,
//! which [`BlockNames`] and [`BlockSpec`] describe declaratively.

use crate::error::Result;
use crate::weights::Weights;
use candle_core::{Tensor, D};

/// `nn.Linear`: `y = x W^T + b` over the last dimension (fused bias on CPU).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        g.linear(x, &self.weight, self.bias.as_ref())
    }

    /// The layer over the channels of an NCHW map: a 1x1 `Conv`.
    pub fn onnx_pointwise(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        g.pointwise(x, &self.weight, self.bias.as_ref())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        count_linear(x, &self.weight);
        Ok(crate::kernels::linear(x, &self.weight, self.bias.as_ref())?)
    }

    /// `{name}.weight` and, when present, `{name}.bias`.
    pub fn named_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut v = vec![(format!("{name}.weight"), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push((format!("{name}.bias"), b.clone()));
        }
        v
    }
}

/// Record the MACs of `x @ w^T` (see [`crate::macs`]).
fn count_linear(x: &Tensor, w: &Tensor) {
    crate::macs::add(x.elem_count() * w.dim(0).unwrap_or(0));
}

/// Load `name.weight` [out, in] and optionally `name.bias` [out].
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(w.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(frozen_layout(w, weight)?, bias))
}

/// A linear weight as a model keeps it: one read from checkpoint files (a frozen model) is
/// stored input-major on CPU f32, the layout its products read fastest (see
/// [`crate::kernels::input_major`]); the tensor's shape and values are unchanged.
fn frozen_layout(w: &Weights, weight: Tensor) -> Result<Tensor> {
    if !w.reads_files() {
        return Ok(weight);
    }
    Ok(crate::kernels::input_major(&weight)?)
}

/// Load several linears with the same input and concatenate them along the output dimension,
/// so that e.g. separate q/k/v projections run as one matrix product.
pub fn fused_linear(
    parts: &[Weights],
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Linear> {
    let mut ws = Vec::with_capacity(parts.len());
    let mut bs = Vec::with_capacity(parts.len());
    for p in parts {
        ws.push(p.get((out_dim, in_dim), "weight")?);
        if bias {
            bs.push(p.get(out_dim, "bias")?);
        }
    }
    let weight = Tensor::cat(&ws, 0)?;
    let weight = match parts.first() {
        Some(p) => frozen_layout(p, weight)?,
        None => weight,
    };
    let bias = if bias {
        Some(Tensor::cat(&bs, 0)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// LayerNorm over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(dim, "weight")?,
            bias: w.get(dim, "bias")?,
            eps,
        })
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        g.layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// `{name}.weight` and `{name}.bias`.
    pub fn named_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{name}.weight"), self.weight.clone()),
            (format!("{name}.bias"), self.bias.clone()),
        ]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(crate::kernels::layer_norm(
            &x,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }
}

/// `F.conv2d(x, w, padding, stride, groups)` with a backward pass that is right for every input
/// size. candle derives the transposed convolution's output padding from the height alone, so
/// a strided convolution whose height and width leave different remainders gets a gradient of
/// the wrong width. Where the remainders are not zero, the padding is applied explicitly (the
/// rows and columns no output reads are left out), so the convolution itself divides evenly.
/// Depthwise convolutions (`groups` = input channels, any whole number of filters per channel)
/// run [`crate::kernels::depthwise_conv2d`]; dense ones on the CPU in f32
/// [`crate::kernels::conv2d_im2col`]; elsewhere 1x1 ones are one batched matrix product.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let y = conv2d_uncounted(x, w, padding, stride, groups)?;
    // every output value is a dot product over (in / groups) * kh * kw taps
    crate::macs::add(y.elem_count() * w.elem_count() / w.dim(0)?);
    Ok(y)
}

fn conv2d_uncounted(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let out = w.dim(0)?;
    if groups > 1 && groups == c && w.dim(1)? == 1 && out % c == 0 {
        // depthwise, with `out / c` filters per input channel (output o reads input o / m)
        let m = out / c;
        let x = if m == 1 {
            x.clone()
        } else {
            x.unsqueeze(2)?
                .broadcast_as((b, c, m, h, wd))?
                .contiguous()?
                .reshape((b, out, h, wd))?
        };
        return Ok(crate::kernels::depthwise_conv2d(&x, w, padding, stride)?);
    }
    if groups == 1 && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return Ok(crate::kernels::conv2d_im2col(x, w, padding, stride)?);
    }
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if groups == 1 && (kh, kw, stride, padding) == (1, 1, 1, 0) {
        return pointwise_uncounted(x, &w.reshape((out, c))?);
    }
    let rest = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) % stride;
    if stride == 1 || (rest(h, kh) == 0 && rest(wd, kw) == 0) {
        return Ok(x.conv2d(w, padding, stride, 1, groups)?);
    }
    let mut x = x.clone();
    for (dim, n, k) in [(2, h, kh), (3, wd, kw)] {
        let r = rest(n, k);
        x = if r <= padding {
            x.pad_with_zeros(dim, padding, padding - r)?
        } else {
            x.narrow(dim, 0, n - (r - padding))?
                .pad_with_zeros(dim, padding, 0)?
        };
    }
    Ok(x.conv2d(w, 0, stride, 1, groups)?)
}

/// `nn.MaxPool2d(3, stride=2, padding=1)` on a non-negative input (a ReLU output, as in every
/// ResNet stem): zero padding then gives PyTorch's maxima. candle's pooling has no backward for
/// overlapping windows, so when a gradient is needed the maximum is taken over the nine strided
/// shifts of the padded input (differentiable element-wise maxima); on the CPU in f32 one
/// kernel forward and backward.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return Ok(crate::kernels::max_pool_3x3_s2(x)?);
    }
    if !x.track_op() && !x.is_variable() {
        return Ok(x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?);
    }
    max_pool_shifts(x)
}

/// [`max_pool_3x3_s2`] as element-wise maxima of strided views (differentiable on any device).
fn max_pool_shifts(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    // Pad to 2 * out + 2 per side so every shift's window of 2 * out rows fits.
    let p = x
        .pad_with_zeros(2, 1, 2 * oh + 1 - h)?
        .pad_with_zeros(3, 1, 2 * ow + 1 - w)?;
    let mut m: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = p
            .narrow(2, dy, 2 * oh)?
            .reshape((b, c, oh, 2, 2 * ow + 2))?
            .narrow(3, 0, 1)?;
        for dx in 0..3 {
            let v = rows
                .narrow(4, dx, 2 * ow)?
                .reshape((b, c, oh, 1, ow, 2))?
                .narrow(5, 0, 1)?
                .reshape((b, c, oh, ow))?;
            m = Some(match m {
                Some(a) => a.maximum(&v)?,
                None => v,
            });
        }
    }
    m.ok_or_else(|| crate::error::Error::Invalid("empty pooling window".into()))
}

/// `nn.BatchNorm2d` over `[B, C, H, W]`, computed in f32 whatever the input's dtype (as mixed
/// precision does) and returned in the input's dtype. Training mode normalises with the batch
/// statistics and moves the running statistics (momentum 0.1, unbiased variance, as PyTorch);
/// evaluation uses the running statistics. The running statistics are state variables (see
/// [`Weights::state`]): a model trained over a parameter store updates the store.
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    eps: f64,
}

/// PyTorch's default BatchNorm momentum.
pub const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm2d {
    /// `weight`, `bias` from `w` and `running_mean`, `running_var` from `state`.
    pub fn load(w: &Weights, state: &Weights, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(channels, "weight")?,
            bias: w.get(channels, "bias")?,
            running_mean: state.state(channels, "running_mean")?,
            running_var: state.state(channels, "running_var")?,
            eps,
        })
    }

    /// Fold the eval-mode normalisation into the convolution before it: `W * s` per output
    /// channel and bias `beta - mean * s`, with `s = gamma / sqrt(var + eps)` (f32).
    pub fn fold_into(&self, conv_weight: &Tensor) -> Result<(Tensor, Tensor)> {
        use candle_core::DType;
        let (scale, bias) = self.eval_scale_shift()?;
        let weight = conv_weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
        Ok((weight, bias))
    }

    /// The eval-mode normalisation as a per-channel `x * scale + shift` (f32).
    fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        use candle_core::DType;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (mean, var) = (
            f(self.running_mean.as_tensor())?,
            f(self.running_var.as_tensor())?,
        );
        let (w, b) = (f(&self.weight)?, f(&self.bias)?);
        Ok(crate::kernels::bn_scale_shift(
            &w, &b, &mean, &var, self.eps,
        )?)
    }

    /// The number of channels.
    pub fn channels(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    /// The eval-mode normalisation as ONNX nodes: a depthwise 1x1 `Conv` carrying the scale
    /// and shift.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        let c = self.channels()?;
        let ones = Tensor::ones((c, 1, 1, 1), candle_core::DType::F32, self.weight.device())?;
        let (w, b) = self.fold_into(&ones)?;
        g.conv(x, &w, Some(&b), 1, 0, c)
    }

    /// `{name}.running_mean` and `{name}.running_var`, current values.
    pub fn state_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        vec![
            (
                format!("{name}.running_mean"),
                self.running_mean.as_tensor().clone(),
            ),
            (
                format!("{name}.running_var"),
                self.running_var.as_tensor().clone(),
            ),
        ]
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, crate::kernels::Act::Identity)
    }

    /// `(weight, bias)`.
    pub fn affine(&self) -> (Tensor, Tensor) {
        (self.weight.clone(), self.bias.clone())
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Moves the running estimates towards batch statistics `[mean; biased variance]` (`[2, C]`)
    /// of `count` values per channel, as PyTorch does (the variance made unbiased).
    pub fn track(&self, stats: &Tensor, count: usize) -> Result<()> {
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let n = count as f64;
        let unbiased = (var * (n / (n - 1.0).max(1.0)))?;
        let m_new =
            ((self.running_mean.as_tensor() * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?;
        let v_new =
            ((self.running_var.as_tensor() * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
        self.running_mean.set(&m_new)?;
        self.running_var.set(&v_new)?;
        Ok(())
    }

    /// The normalisation and the activation after it, as one pass over the map (the
    /// statistics fold into a per-channel scale and shift).
    pub fn forward_act(&self, x: &Tensor, train: bool, act: crate::kernels::Act) -> Result<Tensor> {
        use candle_core::DType;
        let (b, _, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        if train {
            let (weight, bias) = (
                self.weight.to_dtype(DType::F32)?,
                self.bias.to_dtype(DType::F32)?,
            );
            let (y, stats) =
                crate::kernels::batch_norm_train_act(&x, &weight, &bias, self.eps, act)?;
            self.track(&stats, b * h * w)?;
            return Ok(y.to_dtype(dtype)?);
        }
        let (scale, shift) = self.eval_scale_shift()?;
        Ok(crate::kernels::channel_affine_act(&x, &scale, &shift, act)?.to_dtype(dtype)?)
    }
}

/// `GroupNorm(1, C)` (timm's `GroupNorm1`): every sample normalised over all its values,
/// then a per-channel affine. Takes channels-last input `[B, ..., C]` (the statistics do not
/// depend on the layout); computed in f32 and returned in the input's dtype.
pub struct GroupNorm1 {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm1 {
    pub fn load(w: &Weights, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(channels, "weight")?,
            bias: w.get(channels, "bias")?,
            eps,
        })
    }

    /// The normalisation as ONNX nodes over a channels-last `x` of `rank` axes.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, rank: usize) -> Result<String> {
        g.group_norm1(x, rank, &self.weight, &self.bias, self.eps)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::DType;
        let dtype = x.dtype();
        let flat = x.to_dtype(DType::F32)?.flatten_from(1)?;
        let mean = flat.mean_keepdim(1)?;
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let y = centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape(x.shape())?;
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        Ok(y.broadcast_mul(&f32_of(&self.weight)?)?
            .broadcast_add(&f32_of(&self.bias)?)?
            .to_dtype(dtype)?)
    }
}

/// A 1x1 convolution `[B, C, H, W] -> [B, O, H, W]` with weight `[O, C]` (a `[O, C, 1, 1]`
/// convolution kernel reshaped), as one batched matrix product.
pub fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = pointwise_uncounted(x, w)?;
    crate::macs::add(y.elem_count() * w.dim(1)?);
    Ok(y)
}

fn pointwise_uncounted(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        // one product per image, the weight gradient accumulated across images in place
        let w = w.reshape((o, c, 1, 1))?;
        return Ok(crate::kernels::conv2d_im2col(x, &w, 0, 1)?);
    }
    let y = w.broadcast_left(b)?.matmul(&x.reshape((b, c, h * wd))?)?;
    Ok(y.reshape((b, o, h, wd))?)
}

/// A 1x1 convolution with bias (`weight` `[out, in, 1, 1]`, `bias`) as a linear layer over
/// channels (for channels-last tokens or pooled features).
pub fn conv1x1_linear(w: &Weights, inp: usize, out: usize) -> Result<Linear> {
    Ok(Linear::new(
        w.get((out, inp, 1, 1), "weight")?.reshape((out, inp))?,
        Some(w.get(out, "bias")?),
    ))
}

/// PyTorch's default BatchNorm epsilon (every CNN family here uses it).
pub const BN_EPS: f64 = 1e-5;

/// A convolution without bias, the BatchNorm after it and an activation: timm's `ConvNormAct`
/// and ResNet's conv/bn pairs. Padding is `k / 2`.
pub struct ConvBn {
    weight: Tensor,
    stride: usize,
    groups: usize,
    norm: BatchNorm2d,
    act: crate::kernels::Act,
}

impl ConvBn {
    /// `{conv}.weight` of `shape` `[out, in / groups, k, k]` and the BatchNorm named `norm`
    /// (parameters in `w`, running statistics in `state`); no activation.
    pub fn load(
        w: &Weights,
        state: &Weights,
        conv: &str,
        norm: &str,
        shape: [usize; 4],
        stride: usize,
        groups: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get(shape.as_slice(), &format!("{conv}.weight"))?,
            stride,
            groups,
            norm: BatchNorm2d::load(&w.pp(norm), &state.pp(norm), shape[0], BN_EPS)?,
            act: crate::kernels::Act::Identity,
        })
    }

    /// The same unit followed by `act` (fused into the BatchNorm pass).
    pub fn with_act(self, act: crate::kernels::Act) -> Self {
        Self { act, ..self }
    }

    /// The output side of this unit for an input side `n` (padding `k / 2`).
    pub fn out_side(&self, n: usize) -> usize {
        let k = self.weight.dims().get(3).copied().unwrap_or(1);
        (n + 2 * (k / 2) - k) / self.stride + 1
    }

    /// The convolution's weight and the BatchNorm when the unit has stride 1 and no activation
    /// (what a fused block node takes over).
    pub fn linear_parts(&self) -> Option<(&Tensor, &BatchNorm2d)> {
        (self.stride == 1 && self.act == crate::kernels::Act::Identity)
            .then_some((&self.weight, &self.norm))
    }

    /// The convolution with the eval-mode BatchNorm folded in: (weight, bias), f32.
    pub fn folded(&self) -> Result<(Tensor, Tensor)> {
        self.norm.fold_into(&self.weight)
    }

    /// The unit in eval mode as ONNX nodes reading `x`: one `Conv` with the BatchNorm folded
    /// into its weight and bias, then the activation.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        let (weight, bias) = self.folded()?;
        let k = self.weight.dim(3)?;
        let y = g.conv(x, &weight, Some(&bias), self.stride, k / 2, self.groups)?;
        g.act(&y, self.act)
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let k = self.weight.dim(3)?;
        let y = conv2d(x, &self.weight, k / 2, self.stride, self.groups)?;
        self.norm.forward_act(&y, train, self.act)
    }
}

/// Activation functions used by the supported families (serialised as `gelu`, `gelu_tanh`,
/// `quick_gelu`, `relu`, `silu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// exact GELU (erf)
    Gelu,
    /// tanh approximation (`gelu_pytorch_tanh`, `gelu_new`)
    GeluTanh,
    /// x * sigmoid(1.702 x) (OpenAI CLIP)
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    /// The activations of the token families, from elementary operators (opset 17 has no
    /// `Gelu`): exact GELU `0.5 x (1 + erf(x / sqrt 2))`, its tanh form, `x sigmoid(1.702 x)`.
    pub fn onnx(self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        use Activation as A;
        let act = self;
        Ok(match act {
            A::Relu => g.node("Relu", &[x], vec![]),
            A::Silu => g.act(x, crate::kernels::Act::Silu)?,
            A::QuickGelu => {
                let z = g.scale(x, 1.702)?;
                let s = g.node("Sigmoid", &[&z], vec![]);
                g.node("Mul", &[x, &s], vec![])
            }
            A::Gelu => g.act(x, crate::kernels::Act::Gelu)?,
            A::GeluTanh => {
                let x3 = g.node("Mul", &[x, x], vec![]);
                let x3 = g.node("Mul", &[&x3, x], vec![]);
                let c = g.scale(&x3, 0.044715)?;
                let u = g.node("Add", &[x, &c], vec![]);
                let u = g.scale(&u, (2.0f32 / std::f32::consts::PI).sqrt())?;
                let t = g.node("Tanh", &[&u], vec![]);
                g.half_x_times_one_plus(x, &t)?
            }
        })
    }

    /// Parse a `hidden_act` string of a transformers config.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => crate::kernels::gelu_erf(x)?,
            Self::GeluTanh => x.gelu()?,
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
        })
    }
}

/// Multi-head self-attention with one fused qkv projection.
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    /// Multi-head self-attention of `[B, N, D]` tokens as ONNX nodes (q, k and v as three
    /// projections cut from the fused one).
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        let d = self.proj.weight.dim(0)?;
        let h = self.num_heads as i64;
        let hd = d as i64 / h;
        let mut heads = |i: usize| -> Result<String> {
            let w = self.qkv.weight.narrow(0, i * d, d)?;
            let b = match &self.qkv.bias {
                Some(b) => Some(b.narrow(0, i * d, d)?),
                None => None,
            };
            let t = g.linear(x, &w, b.as_ref())?;
            let t = g.reshape(&t, &[0, -1, h, hd])?;
            Ok(g.transpose(&t, &[0, 2, 1, 3])) // [B, H, N, hd]
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let s = g.node("MatMul", &[&q, &kt], vec![]);
        let s = g.scale(&s, self.scale as f32)?;
        let p = g.node("Softmax", &[&s], vec![("axis", crate::onnx::Attr::Int(-1))]);
        let o = g.node("MatMul", &[&p, &v], vec![]);
        let o = g.transpose(&o, &[0, 2, 1, 3]);
        let o = g.reshape(&o, &[0, -1, d as i64])?;
        self.proj.onnx(g, &o)
    }

    pub fn new(qkv: Linear, proj: Linear, num_heads: usize, head_dim: usize) -> Self {
        Self {
            qkv,
            proj,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// x: [B, N, C] -> [B, N, C]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        // q k^T and attn v: 2 B N^2 C
        let (b, n, c3) = qkv.dims3()?;
        crate::macs::add(2 * b * n * n * (c3 / 3));
        let out = crate::kernels::attention(&qkv, self.num_heads, self.scale)?;
        self.proj.forward(&out)
    }
}

/// Feed-forward network of a block.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// fc1 -> act -> fc2
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    /// DINOv2-giant: w_in -> split -> silu(x1) * x2 -> w_out
    SwiGlu { w_in: Linear, w_out: Linear },
}

impl Mlp {
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        match self {
            Mlp::Plain { fc1, fc2, act } => {
                let h = fc1.onnx(g, x)?;
                let h = act.onnx(g, &h)?;
                fc2.onnx(g, &h)
            }
            Mlp::SwiGlu { w_in, w_out } => {
                let h = w_in.onnx(g, x)?;
                let half = (w_in.weight.dim(0)? / 2) as i64;
                let x1 = g.slice(&h, -1, 0, half)?;
                let x2 = g.slice(&h, -1, half, 2 * half)?;
                let s = g.act(&x1, crate::kernels::Act::Silu)?;
                let m = g.node("Mul", &[&s, &x2], vec![]);
                w_out.onnx(g, &m)
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Plain { fc1, fc2, act } => {
                let h = match (act, &fc1.bias) {
                    (Activation::Gelu, Some(b)) => {
                        count_linear(x, &fc1.weight);
                        crate::kernels::linear_gelu(x, &fc1.weight, b)?
                    }
                    _ => act.forward(&fc1.forward(x)?)?,
                };
                fc2.forward(&h)
            }
            Mlp::SwiGlu { w_in, w_out } => {
                let h = w_in.forward(x)?;
                let half = h.dim(D::Minus1)? / 2;
                let x1 = h.narrow(D::Minus1, 0, half)?;
                let x2 = h.narrow(D::Minus1, half, half)?;
                Ok(w_out.forward(&(x1.silu()? * x2)?)?)
            }
        }
    }
}

/// Hidden width of DINOv2's SwiGLU FFN (as the reference computes it).
pub fn swiglu_hidden(dim: usize, mlp_ratio: f64) -> usize {
    let hidden = (dim as f64 * mlp_ratio) as usize;
    let hidden = (hidden as f64 * 2.0 / 3.0) as usize;
    hidden.div_ceil(8) * 8
}

/// How attention projections are stored.
#[derive(Clone, Debug)]
pub enum QkvNames {
    /// three separate linears (transformers naming)
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
    },
    /// one fused linear (timm / SAM naming)
    Fused(&'static str),
}

/// Weight names of one pre-norm transformer block, relative to the block's prefix.
#[derive(Clone, Debug)]
pub struct BlockNames {
    pub norm1: &'static str,
    pub qkv: QkvNames,
    pub proj: &'static str,
    pub norm2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub swiglu_in: &'static str,
    pub swiglu_out: &'static str,
    pub ls1: &'static str,
    pub ls2: &'static str,
}

/// Hyper-parameters of a block.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    pub dim: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    pub qkv_bias: bool,
    pub eps: f64,
    pub act: Activation,
    pub swiglu: bool,
    pub layer_scale: bool,
}

/// `x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x))`
#[derive(Clone, Debug)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: Mlp,
    ls2: Option<Tensor>,
}

impl Block {
    pub fn load(w: &Weights, names: &BlockNames, spec: &BlockSpec) -> Result<Self> {
        let d = spec.dim;
        let qkv = match &names.qkv {
            QkvNames::Separate { q, k, v } => {
                fused_linear(&[w.pp(q), w.pp(k), w.pp(v)], d, d, spec.qkv_bias)?
            }
            QkvNames::Fused(name) => linear(&w.pp(name), d, 3 * d, spec.qkv_bias)?,
        };
        let proj = linear(&w.pp(names.proj), d, d, true)?;
        let mlp = if spec.swiglu {
            Mlp::SwiGlu {
                w_in: linear(&w.pp(names.swiglu_in), d, 2 * spec.mlp_hidden, true)?,
                w_out: linear(&w.pp(names.swiglu_out), spec.mlp_hidden, d, true)?,
            }
        } else {
            Mlp::Plain {
                fc1: linear(&w.pp(names.fc1), d, spec.mlp_hidden, true)?,
                fc2: linear(&w.pp(names.fc2), spec.mlp_hidden, d, true)?,
                act: spec.act,
            }
        };
        let (ls1, ls2) = if spec.layer_scale {
            (Some(w.get(d, names.ls1)?), Some(w.get(d, names.ls2)?))
        } else {
            (None, None)
        };
        Ok(Self {
            norm1: LayerNorm::load(&w.pp(names.norm1), d, spec.eps)?,
            attn: Attention::new(qkv, proj, spec.num_heads, d / spec.num_heads),
            ls1,
            norm2: LayerNorm::load(&w.pp(names.norm2), d, spec.eps)?,
            mlp,
            ls2,
        })
    }

    /// MLP width and activation of an fc1-act-fc2 MLP (None for SwiGLU).
    pub fn plain_mlp(&self) -> Option<(usize, Activation)> {
        match &self.mlp {
            Mlp::Plain { fc1, act, .. } => Some((fc1.weight.dim(0).ok()?, *act)),
            Mlp::SwiGlu { .. } => None,
        }
    }

    pub fn qkv_bias(&self) -> bool {
        self.attn.qkv.bias.is_some()
    }

    pub fn eps(&self) -> f64 {
        self.norm1.eps()
    }

    pub fn has_layer_scale(&self) -> bool {
        self.ls1.is_some()
    }

    /// Parameters in timm naming under `prefix` (a SwiGLU MLP keeps timm's `mlp.fc1`/`fc2`
    /// names for its two projections).
    pub fn timm_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut v = self.norm1.named_tensors(&format!("{prefix}.norm1"));
        v.extend(self.attn.qkv.named_tensors(&format!("{prefix}.attn.qkv")));
        v.extend(self.attn.proj.named_tensors(&format!("{prefix}.attn.proj")));
        v.extend(self.norm2.named_tensors(&format!("{prefix}.norm2")));
        let (a, b) = match &self.mlp {
            Mlp::Plain { fc1, fc2, .. } => (fc1, fc2),
            Mlp::SwiGlu { w_in, w_out } => (w_in, w_out),
        };
        v.extend(a.named_tensors(&format!("{prefix}.mlp.fc1")));
        v.extend(b.named_tensors(&format!("{prefix}.mlp.fc2")));
        for (name, ls) in [("ls1", &self.ls1), ("ls2", &self.ls2)] {
            if let Some(g) = ls {
                v.push((format!("{prefix}.{name}.gamma"), g.clone()));
            }
        }
        v
    }

    /// The block as ONNX nodes on `[B, N, D]` tokens.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<String> {
        let scaled = |g: &mut crate::onnx::Graph, y: String, ls: &Option<Tensor>| {
            Ok::<_, crate::error::Error>(match ls {
                Some(gamma) => {
                    let c = g.constant("ls", gamma)?;
                    g.node("Mul", &[&y, &c], vec![])
                }
                None => y,
            })
        };
        let n1 = self.norm1.onnx(g, x)?;
        let a = self.attn.onnx(g, &n1)?;
        let a = scaled(g, a, &self.ls1)?;
        let x = g.node("Add", &[x, &a], vec![]);
        let n2 = self.norm2.onnx(g, &x)?;
        let m = self.mlp.onnx(g, &n2)?;
        let m = scaled(g, m, &self.ls2)?;
        Ok(g.node("Add", &[&x, &m], vec![]))
    }

    /// The block's parameters for [`crate::kernels::vit_block_train`] (an fc1-GELU-fc2 MLP
    /// with biases only).
    fn fused_params(&self) -> Option<crate::kernels::VitBlockParams> {
        let Mlp::Plain {
            fc1,
            fc2,
            act: Activation::Gelu,
        } = &self.mlp
        else {
            return None;
        };
        let ln = |n: &LayerNorm| (n.weight.clone(), n.bias.clone());
        Some(crate::kernels::VitBlockParams {
            norm1: ln(&self.norm1),
            qkv: (self.attn.qkv.weight.clone(), self.attn.qkv.bias.clone()),
            proj: (self.attn.proj.weight.clone(), self.attn.proj.bias.clone()?),
            ls1: self.ls1.clone(),
            norm2: ln(&self.norm2),
            fc1: (fc1.weight.clone(), fc1.bias.clone()?),
            fc2: (fc2.weight.clone(), fc2.bias.clone()?),
            ls2: self.ls2.clone(),
            heads: self.attn.num_heads,
            scale: self.attn.scale as f32,
            eps: self.norm1.eps as f32,
        })
        .filter(|_| self.norm1.eps == self.norm2.eps)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // one node when training (with a FusedGradients alive), one pass when nothing is tracked
        if let Some(p) = self.fused_params() {
            let fused = if crate::kernels::fused_training_enabled() {
                crate::kernels::vit_block_train(x, &p)?
            } else {
                None
            };
            let fused = match fused {
                Some(y) => Some(y),
                None => crate::kernels::vit_block_infer(x, &p)?,
            };
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let scale = |y: Tensor, ls: &Option<Tensor>| -> Result<Tensor> {
            Ok(match ls {
                Some(g) => y.broadcast_mul(g)?,
                None => y,
            })
        };
        let y = scale(self.attn.forward(&self.norm1.forward(x)?)?, &self.ls1)?;
        let x = (x + y)?;
        let y = scale(self.mlp.forward(&self.norm2.forward(&x)?)?, &self.ls2)?;
        Ok((x + y)?)
    }
}

/// Patch embedding: a Conv2d with kernel = stride = patch, as a matrix product over patches.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Option<Tensor>,
    patch: usize,
    dim: usize,
}

impl PatchEmbed {
    pub fn load(w: &Weights, in_ch: usize, dim: usize, patch: usize, bias: bool) -> Result<Self> {
        let weight = w.get((dim, in_ch, patch, patch), "weight")?;
        let bias = if bias {
            Some(w.get(dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            patch,
            dim,
        })
    }

    pub fn patch(&self) -> usize {
        self.patch
    }

    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// The convolution's weight `[D, C, p, p]` and bias.
    pub fn conv_weights(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.weight, self.bias.as_ref())
    }

    /// `{name}.weight` `[D, C, p, p]` and the bias.
    pub fn named_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        Linear::new(self.weight.clone(), self.bias.clone()).named_tensors(name)
    }

    /// [B, C, H, W] -> ([B, h*w, D], (h, w)); trailing pixels that do not fill a patch are
    /// dropped, as a strided convolution does.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (b, c, hh, ww) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (hh / p, ww / p);
        let x = x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B*gh*gw, C*p*p]
        let cols = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let w = self.weight.reshape((self.dim, c * p * p))?;
        count_linear(&cols, &w);
        let mut y = cols.matmul(&w.t()?)?;
        if let Some(bias) = &self.bias {
            y = crate::kernels::add_channel_bias(&y, bias, 1)?;
        }
        Ok((y.reshape((b, gh * gw, self.dim))?, (gh, gw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use std::collections::HashMap;

    /// max |a - b| / max |b|, the scale floored at 1 (the key bias's gradient is zero up to
    /// rounding: softmax does not change when every score of a row moves by q.b_k)
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        crate::kernels::test_util::rel_err(a, b, 1.0)
    }

    /// The pooling kernel (forward and its first-maximum gradient) against the element-wise
    /// maxima of strided views and candle's backward of them, on positive inputs without ties
    /// at odd, non-square and tiny sizes.
    #[test]
    fn max_pool_kernel_matches_the_shifted_maxima() {
        let dev = Device::Cpu;
        for (h, w) in [(9, 12), (8, 8), (1, 1), (2, 5), (5, 2)] {
            let x = Tensor::rand(0.1f32, 2.0, (2, 3, h, w), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let run = |kernel: bool| {
                let y = if kernel {
                    max_pool_3x3_s2(x.as_tensor()).unwrap()
                } else {
                    max_pool_shifts(x.as_tensor()).unwrap()
                };
                let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
                (y, r)
            };
            let (y0, r) = run(false);
            let (y1, _) = run(true);
            let grad = |y: &Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().clone()
            };
            let case = format!("{h}x{w}");
            assert_eq!(y1.dims(), y0.dims(), "{case}");
            assert!(rel_err(&y1, &y0) < 1e-6, "{case} y");
            assert!(rel_err(&grad(&y1), &grad(&y0)) < 1e-6, "{case} dx");
        }
    }

    /// A timm ViT block, composed and fused (one autograd node), against timm: output, input
    /// gradient and every parameter's gradient of `sum(y * dy)`; case `a` also in transformers
    /// naming, whose separate q, k, v weights are concatenated into the block's qkv weight
    /// (their gradients then pass through the concatenation).
    #[test]
    fn block_and_its_gradients_match_timm_composed_and_fused() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/refs/vit-block.safetensors");
        let refs = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        for (case, heads, qkv_bias, layer_scale, hf) in [
            ("a", 3, true, false, false),
            ("b", 5, false, true, false),
            ("a", 3, true, false, true),
        ] {
            // (name in the block's naming, value, expected gradient)
            let mut params: Vec<(String, Tensor, Tensor)> = refs
                .iter()
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix(&format!("{case}.param."))?;
                    let grad = refs[&format!("{case}.grad.{name}")].clone();
                    Some((name.to_string(), v.clone(), grad))
                })
                .collect();
            let names = if hf {
                let hf_name = |n: &str| match n {
                    "norm1" => "layernorm_before".to_string(),
                    "attn.proj" => "attention.output.dense".into(),
                    "norm2" => "layernorm_after".into(),
                    "mlp.fc1" => "intermediate.dense".into(),
                    "mlp.fc2" => "output.dense".into(),
                    _ => unreachable!("{n}"),
                };
                let mut renamed = Vec::new();
                for (name, v, g) in params {
                    let (module, kind) = name.rsplit_once('.').unwrap();
                    if module == "attn.qkv" {
                        let d = v.dim(0).unwrap() / 3;
                        for (i, part) in ["query", "key", "value"].iter().enumerate() {
                            let cut = |t: &Tensor| t.narrow(0, i * d, d).unwrap();
                            let n = format!("attention.attention.{part}.{kind}");
                            renamed.push((n, cut(&v), cut(&g)));
                        }
                    } else {
                        renamed.push((format!("{}.{kind}", hf_name(module)), v, g));
                    }
                }
                params = renamed;
                &crate::models::vit::HF_NAMES
            } else {
                &crate::models::vit::TIMM_NAMES
            };
            let tensors = params.iter().map(|(n, v, _)| (n.clone(), v.clone()));
            let w = crate::weights::Weights::from_tensors(tensors.collect(), &p).unwrap();
            let x = &refs[&format!("{case}.x")];
            let dim = x.dim(2).unwrap();
            let spec = BlockSpec {
                dim,
                num_heads: heads,
                mlp_hidden: refs[&format!("{case}.param.mlp.fc1.bias")].dim(0).unwrap(),
                qkv_bias,
                eps: 1e-6,
                act: Activation::Gelu,
                swiglu: false,
                layer_scale,
            };
            let block = Block::load(&w, names, &spec).unwrap();
            // inference: plain (frozen) weights read from a file, nothing tracked
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("block.safetensors");
            let plain: HashMap<String, Tensor> = params
                .iter()
                .map(|(n, v, _)| (n.clone(), v.contiguous().unwrap()))
                .collect();
            candle_core::safetensors::save(&plain, &file).unwrap();
            let frozen = Block::load(&Weights::open_file(&file).unwrap(), names, &spec).unwrap();
            let e = rel_err(&frozen.forward(x).unwrap(), &refs[&format!("{case}.y")]);
            assert!(e < 1e-5, "{case} hf={hf} inference: y off by {e}");
            for fused in [false, true] {
                let xv = Var::from_tensor(x).unwrap();
                let guard = fused.then(crate::kernels::FusedGradients::enable);
                let y = block.forward(xv.as_tensor()).unwrap();
                let loss = (&y * &refs[&format!("{case}.dy")])
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = crate::kernels::backward_with(guard.as_ref(), &loss).unwrap();
                let what = format!("{case} hf={hf} fused={fused}");
                let e = rel_err(&y, &refs[&format!("{case}.y")]);
                assert!(e < 1e-5, "{what}: y off by {e}");
                let dx = grads.get(xv.as_tensor()).unwrap();
                let e = rel_err(dx, &refs[&format!("{case}.dx")]);
                assert!(e < 1e-5, "{what}: dx off by {e}");
                for (name, _, want) in &params {
                    let t = w.get_any(name).unwrap();
                    let g = grads
                        .get(&t)
                        .unwrap_or_else(|| panic!("{what}: no grad of {name}"));
                    let e = rel_err(&g.to_dtype(DType::F32).unwrap(), want);
                    assert!(e < 1e-5, "{what}: {name} grad off by {e}");
                }
                // the fused node keeps the block's own tensors out of candle's graph
                let y = block.forward(xv.as_tensor()).unwrap();
                let proj = if hf {
                    "attention.output.dense.weight"
                } else {
                    "attn.proj.weight"
                };
                let proj = w.get_any(proj).unwrap();
                let in_graph = y
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(&proj)
                    .is_some();
                assert_eq!(in_graph, !fused, "{what}: a weight in candle's graph");
            }
        }
    }
}
