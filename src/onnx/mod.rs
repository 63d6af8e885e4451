//! ONNX export and execution.
//!
//! Export: a family writes its inference graph into a [`Graph`] (ONNX nodes over named values,
//! weights as initializers, opset 17, a symbolic batch dimension); [`Graph::save`] encodes the
//! `ModelProto` with the protobuf messages `tract-onnx` ships (prost; no protoc at build time)
//! and writes it atomically, with the preprocessing in `metadata_props`.
//!
//! Execution: [`OnnxModel`] runs an ONNX file with `tract-onnx` (pure Rust), for checking an
//! export against the candle forward and for ONNX teachers.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// The operator set exported graphs use.
pub const OPSET: i64 = 17;
/// ONNX IR version of opset 17 (ONNX 1.12).
const IR_VERSION: i64 = 8;
/// Name of the symbolic batch dimension.
pub const BATCH: &str = "batch";

/// An attribute value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

/// An ONNX graph under construction: nodes in topological order, initializers, one image
/// input `[batch, 3, H, W]` and named outputs.
pub struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    input: pb::ValueInfoProto,
    outputs: Vec<pb::ValueInfoProto>,
    hw: (usize, usize),
    counter: usize,
}

fn value_info(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    typed_value_info(name, dims, pb::tensor_proto::DataType::Float)
}

fn typed_value_info(
    name: &str,
    dims: &[Option<usize>],
    elem: pb::tensor_proto::DataType,
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as Dim, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Some(n) => Dim::DimValue(*n as i64),
                None => Dim::DimParam(BATCH.into()),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

impl Graph {
    /// A graph whose input `name` is `[batch, channels, h, w]` f32.
    pub fn new(name: &str, channels: usize, (h, w): (usize, usize)) -> Self {
        Self {
            nodes: Vec::new(),
            initializers: Vec::new(),
            input: value_info(name, &[None, Some(channels), Some(h), Some(w)]),
            outputs: Vec::new(),
            hw: (h, w),
            counter: 0,
        }
    }

    /// A graph whose input `name` is an 8-bit RGB image batch `[batch, h, w, 3]` (uint8).
    pub fn new_image_u8(name: &str, (h, w): (usize, usize)) -> Self {
        Self {
            input: typed_value_info(
                name,
                &[None, Some(h), Some(w), Some(3)],
                pb::tensor_proto::DataType::Uint8,
            ),
            ..Self::new(name, 3, (h, w))
        }
    }

    /// `x` as f32.
    pub fn cast_f32(&mut self, x: &str) -> String {
        let to = pb::tensor_proto::DataType::Float as i64;
        self.node("Cast", &[x], vec![("to", Attr::Int(to))])
    }

    /// The input's name.
    pub fn input(&self) -> String {
        self.input.name.clone()
    }

    /// The input's (height, width).
    pub fn input_hw(&self) -> (usize, usize) {
        self.hw
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// A constant tensor (stored as f32, or i64 for shapes/axes), named after `hint`.
    pub fn constant(&mut self, hint: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(hint);
        let dims = t.dims().iter().map(|&d| d as i64).collect();
        let proto = match t.dtype() {
            DType::I64 => pb::TensorProto {
                dims,
                data_type: pb::tensor_proto::DataType::Int64 as i32,
                int64_data: t.flatten_all()?.to_vec1::<i64>()?,
                name: name.clone(),
                ..Default::default()
            },
            _ => {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                pb::TensorProto {
                    dims,
                    data_type: pb::tensor_proto::DataType::Float as i32,
                    raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    name: name.clone(),
                    ..Default::default()
                }
            }
        };
        self.initializers.push(proto);
        Ok(name)
    }

    /// An i64 vector constant (shapes, axes, pads).
    pub fn ints(&mut self, hint: &str, v: &[i64]) -> Result<String> {
        let t = Tensor::new(v, &Device::Cpu)?;
        self.constant(hint, &t)
    }

    /// Append a node `op(inputs)` with `attrs`; returns its (single) output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.push(op, inputs, attrs, out.clone());
        out
    }

    fn push(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, out: String) {
        use pb::attribute_proto::AttributeType as T;
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = pb::AttributeProto {
                    name: name.into(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.r#type = T::Int as i32;
                        p.i = i;
                    }
                    Attr::Ints(v) => {
                        p.r#type = T::Ints as i32;
                        p.ints = v;
                    }
                    Attr::Float(f) => {
                        p.r#type = T::Float as i32;
                        p.f = f;
                    }
                    Attr::Str(s) => {
                        p.r#type = T::String as i32;
                        p.s = s.as_bytes().to_vec();
                    }
                }
                p
            })
            .collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
    }

    /// Name `value` as a graph output (`rank` dimensions, the first the batch).
    pub fn output(&mut self, name: &str, value: &str, rank: usize) {
        self.push("Identity", &[value], vec![], name.to_string());
        let mut dims = vec![None];
        dims.extend(std::iter::repeat_n(Some(0usize), rank - 1));
        let mut vi = value_info(name, &dims);
        // only the rank and the batch are declared; other sizes are left to inference
        if let Some(pb::type_proto::Value::TensorType(t)) =
            vi.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(s) = t.shape.as_mut() {
                for d in s.dim.iter_mut().skip(1) {
                    d.value = None;
                }
            }
        }
        self.outputs.push(vi);
    }

    // ---- layers built from nodes ----

    /// `Conv` with weight `[out, in/groups, k, k]` and bias, symmetric padding `pad`.
    pub fn conv(
        &mut self,
        x: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Result<String> {
        let w = self.constant("w", weight)?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = bias {
            inputs.push(self.constant("b", b)?);
        }
        let k = weight.dims()[2] as i64;
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node(
            "Conv",
            &refs,
            vec![
                ("kernel_shape", Attr::Ints(vec![k, weight.dims()[3] as i64])),
                ("strides", Attr::Ints(vec![stride as i64; 2])),
                ("pads", Attr::Ints(vec![pad as i64; 4])),
                ("group", Attr::Int(groups as i64)),
            ],
        ))
    }

    /// An activation after a convolution or normalisation, from elementary operators
    /// (opset 17 has no `Gelu`: exact GELU is `0.5 x (1 + erf(x / sqrt 2))`).
    pub fn act(&mut self, x: &str, act: crate::kernels::Act) -> Result<String> {
        use crate::kernels::Act;
        Ok(match act {
            Act::Identity => x.to_string(),
            Act::Relu => self.node("Relu", &[x], vec![]),
            Act::Silu => {
                let s = self.node("Sigmoid", &[x], vec![]);
                self.node("Mul", &[x, &s], vec![])
            }
            Act::Gelu => {
                let z = self.scale(x, std::f32::consts::FRAC_1_SQRT_2)?;
                let erf = self.node("Erf", &[&z], vec![]);
                self.half_x_times_one_plus(x, &erf)?
            }
        })
    }

    /// `0.5 x (1 + u)`: the GELU forms around their `erf` or `tanh` term `u`.
    pub fn half_x_times_one_plus(&mut self, x: &str, u: &str) -> Result<String> {
        let one = self.scalar("one", 1.0)?;
        let p = self.node("Add", &[u, &one], vec![]);
        let h = self.scale(x, 0.5)?;
        Ok(self.node("Mul", &[&h, &p], vec![]))
    }

    /// A scalar f32 constant.
    pub fn scalar(&mut self, hint: &str, v: f32) -> Result<String> {
        let t = Tensor::new(&[v], &Device::Cpu)?;
        self.constant(hint, &t)
    }

    /// `x * k`
    pub fn scale(&mut self, x: &str, k: f32) -> Result<String> {
        let c = self.scalar("k", k)?;
        Ok(self.node("Mul", &[x, &c], vec![]))
    }

    /// `LayerNormalization` over the last axis.
    pub fn layer_norm(
        &mut self,
        x: &str,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<String> {
        let w = self.constant("ln_w", weight)?;
        let b = self.constant("ln_b", bias)?;
        Ok(self.node(
            "LayerNormalization",
            &[x, &w, &b],
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(eps as f32)),
            ],
        ))
    }

    /// `Reshape` to `shape` (0 copies the input's dimension, -1 is inferred).
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> Result<String> {
        let s = self.ints("shape", shape)?;
        Ok(self.node("Reshape", &[x, &s], vec![]))
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    /// Tokens `[B, h*w, C]` as a map `[B, C, h, w]`.
    pub fn tokens_to_map(&mut self, tokens: &str, (h, w): (usize, usize)) -> Result<String> {
        let m = self.transpose(tokens, &[0, 2, 1]);
        self.reshape(&m, &[0, -1, h as i64, w as i64])
    }

    /// A map `[B, C, h, w]` as tokens `[B, h*w, C]`.
    pub fn map_to_tokens(&mut self, map: &str) -> Result<String> {
        let flat = self.reshape(map, &[0, 0, -1])?;
        Ok(self.transpose(&flat, &[0, 2, 1]))
    }

    /// A constant `[1, ...]` tensor repeated along a first axis as long as `like`'s.
    pub fn expand_batch(&mut self, t: &Tensor, like: &str) -> Result<String> {
        let c = self.constant("const", t)?;
        let shape = self.node("Shape", &[like], vec![]);
        let zero = self.ints("idx", &[0])?;
        let b = self.node("Gather", &[&shape, &zero], vec![("axis", Attr::Int(0))]);
        let rest: Vec<i64> = t.dims()[1..].iter().map(|&d| d as i64).collect();
        let rest = self.ints("dims", &rest)?;
        let full = self.node("Concat", &[&b, &rest], vec![("axis", Attr::Int(0))]);
        Ok(self.node("Expand", &[&c, &full], vec![]))
    }

    /// `x[:, start..end]` along `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> Result<String> {
        let s = self.ints("start", &[start])?;
        let e = self.ints("end", &[end])?;
        let a = self.ints("axis", &[axis])?;
        Ok(self.node("Slice", &[x, &s, &e, &a], vec![]))
    }

    /// Mean over the spatial axes of `[B, C, H, W]`: `[B, C]`.
    pub fn global_pool(&mut self, x: &str) -> String {
        let p = self.node("GlobalAveragePool", &[x], vec![]);
        self.node("Flatten", &[&p], vec![("axis", Attr::Int(1))])
    }

    /// `ReduceMean` over `axes`, dimensions kept (opset 17 takes the axes as an attribute).
    pub fn reduce_mean(&mut self, x: &str, axes: &[i64]) -> String {
        self.node(
            "ReduceMean",
            &[x],
            vec![
                ("axes", Attr::Ints(axes.to_vec())),
                ("keepdims", Attr::Int(1)),
            ],
        )
    }

    /// `ReduceSum` over `axes`, dimensions kept (the axes are an input since opset 13).
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64]) -> Result<String> {
        let a = self.ints("axes", axes)?;
        Ok(self.node("ReduceSum", &[x, &a], vec![("keepdims", Attr::Int(1))]))
    }

    /// Bilinear resize of `[B, C, h, w]` (`from`) to `to`, with PyTorch's weights
    /// (`F.interpolate(mode="bilinear", align_corners)`), as two products with constant
    /// interpolation matrices: every runtime computes the same thing (ONNX `Resize`
    /// implementations differ at the borders; tract extrapolates `half_pixel` there).
    pub fn resize_bilinear(
        &mut self,
        x: &str,
        from: (usize, usize),
        to: (usize, usize),
        align_corners: bool,
    ) -> Result<String> {
        if from == to {
            return Ok(x.to_string());
        }
        let cpu = &Device::Cpu;
        let rx = crate::interp::linear_matrix(from.1, to.1, align_corners, cpu)?;
        let ry = crate::interp::linear_matrix(from.0, to.0, align_corners, cpu)?;
        let rxt = self.constant("resize_w", &rx.t()?.contiguous()?)?;
        let ry = self.constant("resize_h", &ry)?;
        let y = self.node("MatMul", &[x, &rxt], vec![]);
        Ok(self.node("MatMul", &[&ry, &y], vec![]))
    }

    /// GroupNorm with one group over a channels-last `x` of `rank` axes: every sample
    /// normalised over all its values, then `* weight + bias` on the last axis.
    pub fn group_norm1(
        &mut self,
        x: &str,
        rank: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<String> {
        let axes: Vec<i64> = (1..rank as i64).collect();
        let mean = self.reduce_mean(x, &axes);
        let c = self.node("Sub", &[x, &mean], vec![]);
        let sq = self.node("Mul", &[&c, &c], vec![]);
        let var = self.reduce_mean(&sq, &axes);
        let e = self.scalar("eps", eps as f32)?;
        let ve = self.node("Add", &[&var, &e], vec![]);
        let sd = self.node("Sqrt", &[&ve], vec![]);
        let y = self.node("Div", &[&c, &sd], vec![]);
        let w = self.constant("gn_w", weight)?;
        let b = self.constant("gn_b", bias)?;
        let y = self.node("Mul", &[&y, &w], vec![]);
        Ok(self.node("Add", &[&y, &b], vec![]))
    }

    /// A 1x1 convolution with weight `[out, in]`.
    pub fn pointwise(&mut self, x: &str, weight: &Tensor, bias: Option<&Tensor>) -> Result<String> {
        let (o, i) = weight.dims2()?;
        self.conv(x, &weight.reshape((o, i, 1, 1))?, bias, 1, 0, 1)
    }

    /// `x W^T + b` over the last axis (`MatMul` + `Add`), `W` `[out, in]`.
    pub fn linear(&mut self, x: &str, weight: &Tensor, bias: Option<&Tensor>) -> Result<String> {
        let wt = self.constant("wt", &weight.t()?.contiguous()?)?;
        let y = self.node("MatMul", &[x, &wt], vec![]);
        Ok(match bias {
            Some(b) => {
                let b = self.constant("b", b)?;
                self.node("Add", &[&y, &b], vec![])
            }
            None => y,
        })
    }

    /// Write the model: `outputs` declared, `metadata` as `metadata_props`.
    pub fn save(self, path: &Path, doc: &str, metadata: &[(String, String)]) -> Result<()> {
        let model = pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "distillery".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(pb::GraphProto {
                node: self.nodes,
                name: "distillery".into(),
                initializer: self.initializers,
                input: vec![self.input],
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| pb::StringStringEntryProto {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        };
        crate::atomic::write_bytes(path, &model.encode_to_vec())
    }
}

/// Copy the ONNX model `src` to `dst` with `entries` set in its `metadata_props` (replacing
/// keys it already has); nothing else changes. `dst` is written atomically.
pub fn stamp_metadata(src: &Path, dst: &Path, entries: &[(String, String)]) -> Result<()> {
    let mut model = read_proto(src)?;
    model
        .metadata_props
        .retain(|p| !entries.iter().any(|(k, _)| *k == p.key));
    model
        .metadata_props
        .extend(entries.iter().map(|(k, v)| pb::StringStringEntryProto {
            key: k.clone(),
            value: v.clone(),
        }));
    crate::atomic::write_bytes(dst, &model.encode_to_vec())
}

/// An ONNX model run by tract: parsed once, made runnable (optimised) per input shape on
/// first use.
pub struct OnnxModel {
    path: PathBuf,
    model: InferenceModel,
    outputs: Vec<String>,
    /// the input's declared dimensions (`None`: symbolic)
    input_dims: Vec<Option<usize>>,
    /// whether the input is uint8 (images with the preprocessing inside) rather than f32
    u8_input: bool,
    metadata: Vec<(String, String)>,
    plans: Mutex<HashMap<Vec<usize>, Arc<Plan>>>,
}

type Plan = TypedRunnableModel<TypedModel>;

fn tract_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::BadInput {
        path: path.to_path_buf(),
        msg: format!("{e:#}").replace('\n', "; "),
    }
}

/// The `ModelProto` of an ONNX file.
fn read_proto(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| tract_err(path, format!("not a readable ONNX model: {e}")))
}

/// A candle tensor as a tract tensor of element type `T` (shape kept).
fn to_tract<T: candle_core::WithDType + tract_onnx::prelude::Datum>(
    x: &Tensor,
    path: &Path,
) -> Result<tract_onnx::prelude::Tensor> {
    let data = x.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
    let a = tract_ndarray::ArrayD::from_shape_vec(x.dims().to_vec(), data)
        .map_err(|e| tract_err(path, e))?;
    Ok(a.into())
}

/// Run `f`, turning a panic inside tract (its optimiser has unimplemented corners) into an
/// error naming the file.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        Err(tract_err(
            path,
            format!("tract cannot run this model: {msg}"),
        ))
    })
}

impl OnnxModel {
    /// Parse `path`; `outputs` keeps only those outputs (by name; empty: all). Operators tract
    /// does not implement are named with their node; a missing output lists the available ones.
    pub fn open(path: &Path, outputs: &[&str]) -> Result<Self> {
        guarded(path, || Self::open_unguarded(path))?.select(outputs)
    }

    /// The same model computing only the outputs named in `keep` (empty: all of them).
    pub fn select(mut self, keep: &[&str]) -> Result<Self> {
        if keep.is_empty() {
            return Ok(self);
        }
        let path = self.path.clone();
        let outlets = keep
            .iter()
            .map(|k| {
                self.model
                    .find_outlet_label(k)
                    .filter(|_| self.outputs.iter().any(|o| o == k))
                    .ok_or_else(|| {
                        tract_err(
                            &path,
                            format!(
                                "no output named {k:?}; the model's outputs are {}",
                                self.outputs.join(", ")
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        self.model
            .set_output_outlets(&outlets)
            .map_err(|e| tract_err(&path, e))?;
        self.outputs = keep.iter().map(|k| k.to_string()).collect();
        if let Ok(mut plans) = self.plans.lock() {
            plans.clear();
        }
        Ok(self)
    }

    /// [`OnnxModel::open`] with every output, made runnable for inputs of `shape`.
    pub fn load(path: &Path, shape: &[usize]) -> Result<Self> {
        let m = Self::open(path, &[])?;
        m.plan(shape)?;
        Ok(m)
    }

    fn open_unguarded(path: &Path) -> Result<Self> {
        let proto = read_proto(path)?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| tract_err(path, "not a readable ONNX model: it has no graph"))?;
        let onnx = tract_onnx::onnx();
        if let Some(n) = graph
            .node
            .iter()
            .find(|n| !onnx.op_register.0.contains_key(&n.op_type))
        {
            let domain = if n.domain.is_empty() {
                String::new()
            } else {
                format!(" (domain {})", n.domain)
            };
            return Err(tract_err(
                path,
                format!(
                    "node {:?} uses operator {}{domain}, which tract cannot run",
                    n.name, n.op_type
                ),
            ));
        }
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let input = graph
            .input
            .iter()
            .find(|i| !initializers.contains(i.name.as_str()))
            .ok_or_else(|| tract_err(path, "the model has no input"))?;
        let (input_dims, elem) = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => (
                t.shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v))
                                    if v > 0 =>
                                {
                                    Some(v as usize)
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                t.elem_type,
            ),
            _ => (Vec::new(), pb::tensor_proto::DataType::Float as i32),
        };
        let u8_input = elem == pb::tensor_proto::DataType::Uint8 as i32;
        if !u8_input && elem != pb::tensor_proto::DataType::Float as i32 {
            return Err(tract_err(
                path,
                format!(
                    "input {:?} has element type {elem}; float32 images or uint8 images are supported",
                    input.name
                ),
            ));
        }
        let dir = path.parent().and_then(|d| d.to_str());
        let parsed = onnx
            .parse(&proto, dir)
            .map_err(|e| tract_err(path, format!("not a readable ONNX model: {e:#}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            model: parsed.model,
            outputs,
            input_dims,
            u8_input,
            metadata: proto
                .metadata_props
                .iter()
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect(),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The runnable plan for inputs of `shape` (built on first use).
    fn plan(&self, shape: &[usize]) -> Result<Arc<Plan>> {
        if let Some(p) = self.plans.lock().ok().and_then(|m| m.get(shape).cloned()) {
            return Ok(p);
        }
        if self.input_dims.len() != shape.len()
            || self
                .input_dims
                .iter()
                .zip(shape)
                .any(|(d, s)| d.is_some_and(|d| d != *s))
        {
            return Err(tract_err(
                &self.path,
                format!(
                    "input of shape {shape:?} given; the model takes {}",
                    self.describe_input()
                ),
            ));
        }
        let plan = guarded(&self.path, || {
            let fact = if self.u8_input {
                u8::fact(shape)
            } else {
                f32::fact(shape)
            };
            self.model
                .clone()
                .with_input_fact(0, fact.into())
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(|e| tract_err(&self.path, e))
        })?;
        let plan = Arc::new(plan);
        if let Ok(mut m) = self.plans.lock() {
            m.insert(shape.to_vec(), plan.clone());
        }
        Ok(plan)
    }

    fn describe_input(&self) -> String {
        let dims: Vec<String> = self
            .input_dims
            .iter()
            .map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string()))
            .collect();
        format!(
            "[{}] {}",
            dims.join(", "),
            if self.u8_input { "uint8" } else { "float32" }
        )
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Output names, in order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The input's declared dimensions (`None`: symbolic).
    pub fn input_dims(&self) -> &[Option<usize>] {
        &self.input_dims
    }

    /// The input's declared image (height, width): NHWC for uint8 images, NCHW otherwise;
    /// `None` when it is not a fixed-size 4-d image batch.
    pub fn input_hw(&self) -> Option<(usize, usize)> {
        let d = &self.input_dims;
        if d.len() != 4 {
            return None;
        }
        let (h, w) = if self.u8_input {
            (d[1], d[2])
        } else {
            (d[2], d[3])
        };
        h.zip(w)
    }

    /// Whether the input is uint8 images (NHWC) rather than float pixels.
    pub fn u8_input(&self) -> bool {
        self.u8_input
    }

    /// A `metadata_props` value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Run on `x` (f32, or u8 values for a uint8 input); every kept output as a candle tensor
    /// on the CPU.
    pub fn run(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let plan = self.plan(&dims)?;
        let x = x.to_device(&Device::Cpu)?;
        let input = if self.u8_input {
            to_tract::<u8>(&x, &self.path)?
        } else {
            to_tract::<f32>(&x, &self.path)?
        };
        let out = plan
            .run(tvec!(input.into()))
            .map_err(|e| tract_err(&self.path, e))?;
        out.iter()
            .map(|t| {
                let a = t
                    .to_array_view::<f32>()
                    .map_err(|e| tract_err(&self.path, e))?;
                let shape = a.shape().to_vec();
                let v: Vec<f32> = a.iter().copied().collect();
                Ok(candle_core::Tensor::from_vec(v, shape, &Device::Cpu)?)
            })
            .collect()
    }
}
