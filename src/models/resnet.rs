//! ResNet as timm builds it (`timm/models/resnet.py`, ResNet v1.5): a 7x7/2 stem convolution,
//! BatchNorm, ReLU and a 3x3/2 max pool, then four stages of basic blocks (ResNet-18/34) or
//! bottlenecks (ResNet-50/101/152, stride on the 3x3), a 1x1 projection shortcut where the shape
//! changes, global average pooling and a linear classifier `fc`. Weight names are timm's
//! (`conv1`, `bn1`, `layer{1-4}.{i}.conv{1-3}` / `bn{1-3}` / `downsample.{0,1}`, `fc`).
//!
//! Pyramid (timm `forward_intermediates`): the stem activation (stride 2) and each stage
//! (strides 4, 8, 16, 32). BatchNorm trains with batch statistics and keeps its running
//! statistics as buffers.

use super::backbone::{Backbone, BackboneSpec, FeatureInfo, Head};
use super::layers::ConvBn;
use super::student::Init;
use crate::config::Cfg;
use crate::error::Result;
use crate::kernels::Act;
use crate::preprocess::TimmDataConfig;
use crate::weights::Weights;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The registered names.
pub const NAMES: &[&str] = &["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"];

/// Width of timm's plain 7x7 stem (its `stem_width` argument only shapes the deep stems).
const STEM_WIDTH: usize = 64;

/// Block type and blocks per stage of each named depth.
fn depth_of(name: &str) -> Option<(bool, [usize; 4])> {
    Some(match name {
        "resnet18" => (false, [2, 2, 2, 2]),
        "resnet34" => (false, [3, 4, 6, 3]),
        "resnet50" => (true, [3, 4, 6, 3]),
        "resnet101" => (true, [3, 4, 23, 3]),
        "resnet152" => (true, [3, 8, 36, 3]),
        _ => return None,
    })
}

/// A ResNet's structure, classifier size and data configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetSpec {
    /// timm architecture name (`resnet50`)
    pub arch: String,
    /// bottleneck blocks (expansion 4) rather than basic blocks
    pub bottleneck: bool,
    /// blocks per stage
    pub layers: [usize; 4],
    /// block widths per stage (before expansion)
    pub channels: [usize; 4],
    /// classifier outputs (0: no classifier)
    pub num_classes: usize,
    pub data: TimmDataConfig,
}

/// One block of the plan: where it is and its shapes.
struct BlockPlan {
    name: String,
    inplanes: usize,
    planes: usize,
    stride: usize,
    downsample: bool,
}

impl ResNetSpec {
    /// A standard ResNet by timm name, without classifier, for inputs of `input_hw`.
    pub fn named(name: &str, input_hw: (usize, usize)) -> Option<Self> {
        let (bottleneck, layers) = depth_of(name)?;
        Some(Self {
            arch: name.to_string(),
            bottleneck,
            layers,
            channels: [64, 128, 256, 512],
            num_classes: 0,
            // timm's `resnet*.a1_in1k` evaluation settings, at the requested size
            data: TimmDataConfig {
                input_hw,
                crop_pct: 0.95,
                interpolation: "bicubic".into(),
                ..TimmDataConfig::imagenet(input_hw.0)
            },
        })
    }

    fn expansion(&self) -> usize {
        if self.bottleneck {
            4
        } else {
            1
        }
    }

    /// Width of the pooled features (and the classifier's input).
    pub fn num_features(&self) -> usize {
        self.channels[3] * self.expansion()
    }

    fn plan(&self) -> Vec<Vec<BlockPlan>> {
        let mut inplanes = STEM_WIDTH;
        let mut stages = Vec::new();
        for (i, (&n, &planes)) in self.layers.iter().zip(&self.channels).enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if b == 0 && i > 0 { 2 } else { 1 };
                let out = planes * self.expansion();
                blocks.push(BlockPlan {
                    name: format!("layer{}.{b}", i + 1),
                    inplanes,
                    planes,
                    stride,
                    downsample: b == 0 && (stride != 1 || inplanes != out),
                });
                inplanes = out;
            }
            stages.push(blocks);
        }
        stages
    }

    /// A block's residual branch (in order) and its projection shortcut, when it has one.
    fn units(&self, b: &BlockPlan) -> (Vec<Unit>, Option<Unit>) {
        let (n, p, i) = (&b.name, b.planes, b.inplanes);
        let out = p * self.expansion();
        let unit = |k: usize, shape: [usize; 4], stride: usize| Unit {
            conv: format!("{n}.conv{k}"),
            norm: format!("{n}.bn{k}"),
            shape,
            stride,
        };
        let branch = if self.bottleneck {
            vec![
                unit(1, [p, i, 1, 1], 1),
                unit(2, [p, p, 3, 3], b.stride),
                unit(3, [out, p, 1, 1], 1),
            ]
        } else {
            vec![unit(1, [p, i, 3, 3], b.stride), unit(2, [p, p, 3, 3], 1)]
        };
        let shortcut = b.downsample.then(|| Unit {
            conv: format!("{n}.downsample.0"),
            norm: format!("{n}.downsample.1"),
            shape: [out, i, 1, 1],
            stride: b.stride,
        });
        (branch, shortcut)
    }

    /// Every convolution + BatchNorm: the stem, then each block's branch and shortcut.
    fn all_units(&self) -> Vec<Unit> {
        let mut v = vec![Unit::stem()];
        for b in self.plan().into_iter().flatten() {
            let (branch, shortcut) = self.units(&b);
            v.extend(branch);
            v.extend(shortcut);
        }
        v
    }

    /// Every BatchNorm by name and width.
    fn norms(&self) -> Vec<(String, usize)> {
        self.all_units()
            .into_iter()
            .map(|u| (u.norm, u.shape[0]))
            .collect()
    }

    /// Every convolution: name, shape `[out, in, k, k]`.
    fn convs(&self) -> Vec<(String, Vec<usize>)> {
        self.all_units()
            .into_iter()
            .map(|u| (format!("{}.weight", u.conv), u.shape.to_vec()))
            .collect()
    }

    /// The last BatchNorm of a block, whose scale timm initialises to zero (each residual
    /// branch starts as the identity).
    fn is_last_norm(&self, name: &str) -> bool {
        let last = if self.bottleneck { ".bn3" } else { ".bn2" };
        name.starts_with("layer") && name.ends_with(last)
    }
}

impl BackboneSpec for ResNetSpec {
    fn arch_name(&self) -> String {
        self.arch.clone()
    }

    fn with_classes(&self, classes: usize) -> Result<Box<dyn BackboneSpec>> {
        Ok(Box::new(Self {
            num_classes: classes,
            ..self.clone()
        }))
    }

    fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = Vec::new();
        for (name, shape) in self.convs() {
            // timm: kaiming normal, fan-out, ReLU gain
            let fan_out = (shape[0] * shape[2] * shape[3]) as f64;
            p.push((name, shape, Init::Normal((2.0 / fan_out).sqrt())));
        }
        for (name, c) in self.norms() {
            let scale = if self.is_last_norm(&name) {
                Init::Zeros
            } else {
                Init::Ones
            };
            p.push((format!("{name}.weight"), vec![c], scale));
            p.push((format!("{name}.bias"), vec![c], Init::Zeros));
        }
        if self.num_classes > 0 {
            let f = self.num_features();
            let bound = (1.0 / f as f64).sqrt();
            p.push((
                "fc.weight".into(),
                vec![self.num_classes, f],
                Init::Normal(bound / 3f64.sqrt()),
            ));
            p.push(("fc.bias".into(), vec![self.num_classes], Init::Zeros));
        }
        p
    }

    fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut b = Vec::new();
        for (name, c) in self.norms() {
            b.push((format!("{name}.running_mean"), vec![c], Init::Zeros));
            b.push((format!("{name}.running_var"), vec![c], Init::Ones));
        }
        b
    }

    fn build(&self, w: &Weights, state: &Weights) -> Result<Box<dyn Backbone>> {
        let load = |u: &Unit| ConvBn::load(w, state, &u.conv, &u.norm, u.shape, u.stride, 1);
        let mut stages = Vec::new();
        for plan in self.plan() {
            let mut blocks = Vec::new();
            for b in plan {
                let (branch, shortcut) = self.units(&b);
                let n = branch.len();
                blocks.push(Block {
                    // ReLU between the branch's units; the last one's comes after the sum
                    branch: branch
                        .iter()
                        .enumerate()
                        .map(|(i, u)| {
                            let act = if i + 1 < n { Act::Relu } else { Act::Identity };
                            Ok(load(u)?.with_act(act))
                        })
                        .collect::<Result<_>>()?,
                    shortcut: shortcut.as_ref().map(load).transpose()?,
                });
            }
            stages.push(blocks);
        }
        Ok(Box::new(ResNet {
            spec: self.clone(),
            stem: load(&Unit::stem())?.with_act(Act::Relu),
            stages,
            head: Head::load(
                w,
                "fc",
                self.num_features(),
                self.num_classes,
                self.data.preprocess(),
            )?,
        }))
    }
}

/// A convolution (no bias) and the BatchNorm after it, by their checkpoint names.
struct Unit {
    conv: String,
    norm: String,
    /// `[out, in, k, k]`
    shape: [usize; 4],
    stride: usize,
}

impl Unit {
    /// The 7x7/2 stem.
    fn stem() -> Self {
        Self {
            conv: "conv1".into(),
            norm: "bn1".into(),
            shape: [STEM_WIDTH, 3, 7, 7],
            stride: 2,
        }
    }
}

struct Block {
    /// conv + BN units in order, ReLU between them
    branch: Vec<ConvBn>,
    shortcut: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for u in &self.branch {
            h = u.forward(&h, train)?;
        }
        let skip = match &self.shortcut {
            Some(u) => u.forward(x, train)?,
            None => x.clone(),
        };
        Ok(crate::kernels::sum_act(&[&h, &skip], Act::Relu)?)
    }
}

/// A built ResNet.
pub struct ResNet {
    spec: ResNetSpec,
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: Head,
}

impl Backbone for ResNet {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        let e = self.spec.expansion();
        let widths: Vec<usize> = std::iter::once(STEM_WIDTH)
            .chain(self.spec.channels.iter().map(|c| c * e))
            .collect();
        super::backbone::pyramid(&widths, 2)
    }

    fn forward_intermediates(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(pixels, train)?;
        let mut out = vec![x.clone()];
        let mut x = super::layers::max_pool_3x3_s2(&x)?;
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x, train)?;
            }
            out.push(x.clone());
        }
        Ok(out)
    }

    fn head(&self) -> &Head {
        &self.head
    }

    fn onnx_intermediates(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<Vec<String>> {
        let stem = self.stem.onnx(g, x)?;
        let mut out = vec![stem.clone()];
        // inputs are >= 0 after the ReLU: MaxPool's -inf padding equals the zero padding here
        let mut x = g.node(
            "MaxPool",
            &[&stem],
            vec![
                ("kernel_shape", crate::onnx::Attr::Ints(vec![3, 3])),
                ("strides", crate::onnx::Attr::Ints(vec![2, 2])),
                ("pads", crate::onnx::Attr::Ints(vec![1; 4])),
            ],
        );
        for stage in &self.stages {
            for block in stage {
                let mut h = x.clone();
                for u in &block.branch {
                    h = u.onnx(g, &h)?;
                }
                let skip = match &block.shortcut {
                    Some(u) => u.onnx(g, &x)?,
                    None => x.clone(),
                };
                let sum = g.node("Add", &[&h, &skip], vec![]);
                x = g.node("Relu", &[&sum], vec![]);
            }
            out.push(x.clone());
        }
        Ok(out)
    }
}

/// The registry's resolver.
pub fn resolve(name: &str, input_hw: (usize, usize)) -> Option<Box<dyn BackboneSpec>> {
    ResNetSpec::named(name, input_hw).map(|s| Box::new(s) as Box<dyn BackboneSpec>)
}

/// A timm hub config of a ResNet: `architecture` (`resnet50.a1_in1k`), optional `model_args`
/// (`layers`, `channels`), `pretrained_cfg`; the classifier's size is read off
/// the checkpoint (`fc.weight`).
pub fn from_config(cfg: &Cfg, w: &Weights) -> Option<Result<Box<dyn BackboneSpec>>> {
    let spec = super::backbone::timm_spec(cfg, "resnet", "ResNet", NAMES, |b| {
        ResNetSpec::named(b, (224, 224))
    })?;
    Some(
        spec.and_then(|s| configure(s, cfg, w))
            .map(|s| Box::new(s) as Box<dyn BackboneSpec>),
    )
}

fn configure(mut spec: ResNetSpec, cfg: &Cfg, w: &Weights) -> Result<ResNetSpec> {
    if let Some(args) = cfg.sub("model_args") {
        spec.layers = super::backbone::four_positive(&args, "layers", spec.layers)?;
        spec.channels = super::backbone::four_positive(&args, "channels", spec.channels)?;
    }
    spec.num_classes = super::backbone::classes_in(w, "fc.weight");
    spec.data = TimmDataConfig::from_cfg(cfg, spec.data)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_has_timms_parameter_count_and_pyramid() {
        // timm: resnet50 has 25,557,032 parameters with its 1000-class head; resnet18 11,689,512.
        for (name, want) in [("resnet50", 25_557_032usize), ("resnet18", 11_689_512)] {
            let mut s = ResNetSpec::named(name, (224, 224)).unwrap();
            s.num_classes = 1000;
            assert_eq!(
                super::super::backbone::count(&s.parameters()),
                want,
                "{name}"
            );
        }
        let s = ResNetSpec {
            layers: [1, 1, 1, 1],
            channels: [4, 8, 8, 16],
            ..ResNetSpec::named("resnet50", (40, 56)).unwrap()
        };
        let (_vm, w) = crate::train::engine::seeded_weights(s.parameters(), 1);
        let (_bm, b) = crate::train::engine::seeded_weights(s.buffers(), 2);
        let net = s.build(&w, &b).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40, 56), &candle_core::Device::Cpu).unwrap();
        let maps = net.forward_intermediates(&x, false).unwrap();
        let info = net.feature_info();
        assert_eq!(maps.len(), 5);
        for (m, f) in maps.iter().zip(&info) {
            assert_eq!(m.dims()[1], f.channels);
            assert_eq!(m.dims()[2], 40usize.div_ceil(f.stride));
            assert_eq!(m.dims()[3], 56usize.div_ceil(f.stride));
        }
        assert_eq!(info[4].channels, 64);
    }
}
