//! The contract every student backbone honours (as timm's models do): a pyramid of NCHW
//! feature maps (`forward_intermediates`), what each level is (`feature_info`: channels and
//! stride), pooled image features, and the preprocessing it expects. A registry maps names to
//! backbone specs; a spec lists its parameters (name, shape, initialiser, in the checkpoint
//! naming of the family's reference) and builds the backbone from them, so training, export and
//! loading need nothing family-specific.
//!
//! Adding a family: a file with its spec and backbone, and its line in [`registry`].

use super::encoder::{TokenEncoder, VitArch};
use super::student::Init;
use super::{evenly_spaced_blocks, Family, FeatureRequest, ModelInfo, VisionEncoder};
use crate::config::Cfg;
use crate::error::{Error, Result};
use crate::preprocess::{PreprocessConfig, Resample, IMAGENET_MEAN, IMAGENET_STD};
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// One level of a backbone's pyramid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureInfo {
    pub channels: usize,
    /// input pixels per feature-map cell
    pub stride: usize,
}

/// Levels of the given widths whose strides double from `first_stride`.
pub fn pyramid(widths: &[usize], first_stride: usize) -> Vec<FeatureInfo> {
    widths
        .iter()
        .enumerate()
        .map(|(i, &channels)| FeatureInfo {
            channels,
            stride: first_stride << i,
        })
        .collect()
}

/// What every built backbone carries besides its layers: the classifier on its pooled
/// features (when it has one), its preprocessing and its device.
pub struct Head {
    pub fc: Option<super::layers::Linear>,
    pub preprocess: PreprocessConfig,
    pub device: Device,
}

impl Head {
    /// A `classes`-way linear classifier on `features` pooled features, read under `fc_name`
    /// (none when `classes` is 0), on the device of `w`.
    pub fn load(
        w: &Weights,
        fc_name: &str,
        features: usize,
        classes: usize,
        preprocess: PreprocessConfig,
    ) -> Result<Self> {
        let fc = (classes > 0)
            .then(|| super::layers::linear(&w.pp(fc_name), features, classes, true))
            .transpose()?;
        Ok(Self {
            fc,
            preprocess,
            device: w.device().clone(),
        })
    }
}

/// A built backbone.
pub trait Backbone: Send + Sync {
    /// The levels [`Backbone::forward_intermediates`] returns, in order.
    fn feature_info(&self) -> Vec<FeatureInfo>;
    /// Feature maps `[B, C_k, H / s_k, W / s_k]` of normalised pixels `[B, 3, H, W]`. `train`:
    /// BatchNorm uses (and moves its running statistics with) the batch statistics.
    fn forward_intermediates(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>>;
    /// Image features `[B, C]` from the last level (timm's `pre_logits`): averaged over space
    /// (after the family's final convolution, when it has one; `train` as in
    /// [`Backbone::forward_intermediates`]).
    fn pool(&self, last: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(last.mean(3)?.mean(2)?)
    }
    /// Image features of pixels (eval mode).
    fn forward_pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let last = self
            .forward_intermediates(pixels, false)?
            .pop()
            .ok_or_else(|| Error::Invalid("backbone without levels".into()))?;
        self.pool(&last, false)
    }
    /// Its classifier, preprocessing and device.
    fn head(&self) -> &Head;
    /// The eval-mode pyramid as ONNX nodes reading `x` (same order as
    /// [`Backbone::forward_intermediates`]); families without an exporter say so.
    fn onnx_intermediates(&self, _g: &mut crate::onnx::Graph, _x: &str) -> Result<Vec<String>> {
        Err(Error::Invalid(
            "ONNX export is not available for this model family yet".into(),
        ))
    }
    /// Pooled features `[B, C]` as ONNX nodes from the last level (default: spatial mean, as
    /// [`Backbone::pool`]).
    fn onnx_pool(&self, g: &mut crate::onnx::Graph, last: &str) -> Result<String> {
        Ok(g.global_pool(last))
    }
    /// The classifier's logits `[B, classes]` from pooled features, when it has one.
    fn classify(&self, pooled: &Tensor) -> Result<Option<Tensor>> {
        self.head()
            .fc
            .as_ref()
            .map(|fc| fc.forward(pooled))
            .transpose()
    }
    /// How images are turned into its input.
    fn preprocess(&self) -> &PreprocessConfig {
        &self.head().preprocess
    }
    /// Where its parameters live.
    fn device(&self) -> &Device {
        &self.head().device
    }
}

/// Everything needed to create a backbone's parameters and build it.
pub trait BackboneSpec {
    /// The architecture's name (timm's where it has one).
    fn arch_name(&self) -> String;
    /// Every parameter: name, shape, initialiser.
    fn parameters(&self) -> Vec<(String, Vec<usize>, Init)>;
    /// State that is not trained but saved (BatchNorm running statistics): name, shape, value.
    fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        Vec::new()
    }
    /// Build from parameters and buffers named as [`BackboneSpec::parameters`] and
    /// [`BackboneSpec::buffers`] say.
    fn build(&self, w: &Weights, state: &Weights) -> Result<Box<dyn Backbone>>;
    /// The same backbone with a fresh `classes`-way classifier on its pooled features (0: none).
    fn with_classes(&self, _classes: usize) -> Result<Box<dyn BackboneSpec>> {
        Err(Error::Invalid(format!(
            "{} has no classifier head to replace",
            self.arch_name()
        )))
    }
}

/// A family's resolver: the spec for one of its names at input size (h, w), or None.
pub type Resolver = fn(&str, (usize, usize)) -> Option<Box<dyn BackboneSpec>>;

/// A family's reader of timm hub configs: the spec a `config.json` describes (checked against
/// the checkpoint's tensor shapes), or None when the architecture is not the family's.
pub type ConfigReader = fn(&Cfg, &Weights) -> Option<Result<Box<dyn BackboneSpec>>>;

/// One registered family.
pub struct FamilyEntry {
    pub name: &'static str,
    /// the input size (h, w) its published models are evaluated at
    pub default_input_hw: (usize, usize),
    pub resolve: Resolver,
    pub names: &'static [&'static str],
    pub from_config: Option<ConfigReader>,
}

/// The registry: every student family, each resolving its own names.
pub const FAMILIES: &[FamilyEntry] = &[
    FamilyEntry {
        name: "vit",
        default_input_hw: (224, 224),
        resolve: vit_spec,
        names: VIT_NAMES,
        from_config: None,
    },
    FamilyEntry {
        name: "resnet",
        default_input_hw: (224, 224),
        resolve: super::resnet::resolve,
        names: super::resnet::NAMES,
        from_config: Some(super::resnet::from_config),
    },
    FamilyEntry {
        name: "mobilevitv2",
        default_input_hw: (256, 256),
        resolve: super::mobilevit::resolve,
        names: super::mobilevit::NAMES,
        from_config: Some(super::mobilevit::from_config),
    },
    FamilyEntry {
        name: "fastvit",
        default_input_hw: (256, 256),
        resolve: super::fastvit::resolve,
        names: super::fastvit::NAMES,
        from_config: Some(super::fastvit::from_config),
    },
];

/// The spec of a named backbone for input size `input_hw`.
pub fn spec(name: &str, input_hw: (usize, usize)) -> Option<Box<dyn BackboneSpec>> {
    FAMILIES.iter().find_map(|f| (f.resolve)(name, input_hw))
}

/// The spec of a registered name at its family's default input size.
pub fn spec_at_default(name: &str) -> Option<Box<dyn BackboneSpec>> {
    FAMILIES
        .iter()
        .find_map(|f| (f.resolve)(name, f.default_input_hw))
}

/// A registered name (not an existing path) at random init (seed 0), or a timm folder / hub id
/// of a registered family; `Ok(None)` when `model` is neither.
pub fn open(model: &str, opts: &super::LoadOptions) -> Result<Option<Loaded>> {
    match spec_at_default(model).filter(|_| !std::path::Path::new(model).exists()) {
        Some(spec) => {
            let (_, _, net) = crate::train::engine::random_backbone(
                spec.as_ref(),
                0,
                &opts.device,
                candle_core::DType::F32,
            )?;
            Ok(Some((spec, net)))
        }
        None => load(model, opts),
    }
}

/// Total number of values in a parameter (or buffer) list.
pub fn count(list: &[(String, Vec<usize>, Init)]) -> usize {
    list.iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum()
}

/// Every registered backbone name.
pub fn names() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.names.iter().copied())
        .collect()
}

/// The spec a timm hub config names within one family: `None` when its `architecture`
/// (`resnet50.a1_in1k` -> `resnet50`) does not start with `prefix`; otherwise the family's spec
/// of that name (`named`), or an error listing the family's names.
pub fn timm_spec<S>(
    cfg: &Cfg,
    prefix: &str,
    family: &str,
    names: &[&str],
    named: impl Fn(&str) -> Option<S>,
) -> Option<Result<S>> {
    let arch = cfg.string("architecture", "").ok()?;
    let base = arch.split('.').next().unwrap_or("");
    if !base.starts_with(prefix) {
        return None;
    }
    Some(named(base).ok_or_else(|| {
        Error::Invalid(format!(
            "timm architecture {base:?} is not a supported {family} (known: {})",
            names.join(", ")
        ))
    }))
}

/// The number of classes of a checkpoint's classifier weight `name` (0 without one).
pub fn classes_in(w: &Weights, name: &str) -> usize {
    w.shape_of(name)
        .and_then(|s| s.first().copied())
        .unwrap_or(0)
}

/// `model_args.{key}` as 4 positive numbers (`default` when absent).
pub fn four_positive(args: &Cfg, key: &str, default: [usize; 4]) -> Result<[usize; 4]> {
    let v = args.usize_list(key, &default)?;
    args.ensure(v.len() == 4 && v.iter().all(|&x| x > 0), || {
        format!("model_args.{key} must be 4 positive numbers")
    })?;
    Ok([v[0], v[1], v[2], v[3]])
}

/// Multiply-accumulates of one image's eval forward at `input_hw` (the pyramid, pooling and the
/// classifier when there is one), counted as [`crate::macs`] does.
pub fn macs(net: &dyn Backbone, input_hw: (usize, usize)) -> Result<u64> {
    let x = Tensor::zeros(
        (1, 3, input_hw.0, input_hw.1),
        candle_core::DType::F32,
        net.device(),
    )?;
    let (r, n) = crate::macs::count(|| -> Result<()> {
        if let Some(last) = net.forward_intermediates(&x, false)?.pop() {
            net.classify(&net.pool(&last, false)?)?;
        }
        Ok(())
    });
    r?;
    Ok(n)
}

/// A loaded backbone and the spec it was built from.
pub type Loaded = (Box<dyn BackboneSpec>, Box<dyn Backbone>);

/// A timm hub folder or id of a registered family, read: the spec its `config.json`
/// describes, its weights and the config's `model_args` (widths and depths that differ from the
/// architecture name's).
pub struct TimmFolder {
    pub spec: Box<dyn BackboneSpec>,
    pub weights: Weights,
    pub model_args: Option<serde_json::Value>,
}

/// Read a timm hub folder or id (`config.json` + `model.safetensors`); `Ok(None)` when the
/// config names no registered family's architecture.
pub fn read_folder(model: &str, opts: &super::LoadOptions) -> Result<Option<TimmFolder>> {
    let files = super::resolve(model)?;
    let cfg = Cfg::read(&files.config)?;
    let w = files.open_weights(opts.dtype, &opts.device)?;
    let Some(spec) = spec_of_cfg(&cfg, &w) else {
        return Ok(None);
    };
    Ok(Some(TimmFolder {
        spec: spec?,
        weights: w,
        model_args: cfg.sub("model_args").map(|a| a.value),
    }))
}

/// The spec of the first family whose architecture `cfg` names (checked against `w`).
fn spec_of_cfg(cfg: &Cfg, w: &Weights) -> Option<Result<Box<dyn BackboneSpec>>> {
    FAMILIES
        .iter()
        .filter_map(|f| f.from_config)
        .find_map(|reader| reader(cfg, w))
}

/// The spec timm builds for architecture `arch` (a registered name) with `model_args` (as a
/// timm `config.json` holds them) at input `input_hw`, without a classifier; `source` names
/// where the arguments come from in errors.
pub fn spec_from_args(
    arch: &str,
    model_args: &serde_json::Value,
    input_hw: (usize, usize),
    source: &std::path::Path,
) -> Result<Box<dyn BackboneSpec>> {
    let cfg = Cfg {
        path: source.to_path_buf(),
        value: serde_json::json!({
            "architecture": arch,
            "model_args": model_args,
            "pretrained_cfg": { "input_size": [3, input_hw.0, input_hw.1] },
        }),
    };
    let none = Weights::from_tensors(Default::default(), source)?;
    match spec_of_cfg(&cfg, &none) {
        Some(spec) => spec?.with_classes(0),
        None => Err(Error::Invalid(format!(
            "{}: unknown architecture {arch:?} (known: {})",
            source.display(),
            names().join(", ")
        ))),
    }
}

/// A backbone from a timm hub folder or id of a registered family; `Ok(None)` when the config
/// names no registered family's architecture.
pub fn load(model: &str, opts: &super::LoadOptions) -> Result<Option<Loaded>> {
    let Some(f) = read_folder(model, opts)? else {
        return Ok(None);
    };
    let model = f.spec.build(&f.weights, &f.weights)?;
    Ok(Some((f.spec, model)))
}

const VIT_NAMES: &[&str] = &["vit-n8", "vit-t16", "vit-s16", "vit-b16", "vit-l16"];

/// ViT presets: plain ViT/16 stems (SPEC.md section 2), and `vit-n8`, a nano ViT with patch 8
/// (96 wide, 6 blocks) for demos and small inputs.
pub fn vit_preset(name: &str) -> Option<VitArch> {
    let (dim, depth, heads, patch) = match name {
        "vit-n8" => (96, 6, 3, 8),
        "vit-t16" => (192, 12, 3, 16),
        "vit-s16" => (384, 12, 6, 16),
        "vit-b16" => (768, 12, 12, 16),
        "vit-l16" => (1024, 24, 16, 16),
        _ => return None,
    };
    Some(VitArch::standard(dim, depth, heads, patch))
}

fn vit_spec(name: &str, input_hw: (usize, usize)) -> Option<Box<dyn BackboneSpec>> {
    vit_preset(name).map(|a| Box::new(ViTSpec::new(a, input_hw)) as Box<dyn BackboneSpec>)
}

/// A plain ViT in timm naming, without final norm (the SAK stem), its pyramid at four evenly
/// spaced blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViTSpec {
    #[serde(flatten)]
    pub arch: VitArch,
    /// training input (height, width): the position table's grid is this / patch
    #[serde(alias = "image_hw")]
    pub input_hw: (usize, usize),
    /// 0-based blocks whose outputs form the pyramid
    pub levels: Vec<usize>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// classes of the linear classifier `head` on the pooled last level (0: none)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_classes: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ViTSpec {
    pub fn new(arch: VitArch, input_hw: (usize, usize)) -> Self {
        Self {
            levels: evenly_spaced_blocks(arch.depth, 4),
            arch,
            input_hw,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            num_classes: 0,
        }
    }

    pub fn grid_hw(&self) -> (usize, usize) {
        (
            self.input_hw.0 / self.arch.patch,
            self.input_hw.1 / self.arch.patch,
        )
    }

    /// The stem's parameters under `prefix` (`stem.` in the SAK student, empty alone).
    pub fn parameters_under(&self, prefix: &str) -> Vec<(String, Vec<usize>, Init)> {
        let a = &self.arch;
        let d = a.dim;
        let h = a.mlp_hidden;
        let (gh, gw) = self.grid_hw();
        let n = gh * gw + a.pos_prefix;
        let mut p: Vec<(String, Vec<usize>, Init)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, init: Init| {
            p.push((format!("{prefix}{name}"), shape, init));
        };
        add(
            "patch_embed.proj.weight".into(),
            vec![d, 3, a.patch, a.patch],
            Init::TruncNormal(0.02),
        );
        add("patch_embed.proj.bias".into(), vec![d], Init::Zeros);
        if a.class_token {
            add("cls_token".into(), vec![1, 1, d], Init::Normal(1e-6));
        }
        if a.registers > 0 {
            add(
                "reg_token".into(),
                vec![1, a.registers, d],
                Init::Normal(1e-6),
            );
        }
        add("pos_embed".into(), vec![1, n, d], Init::TruncNormal(0.02));
        for i in 0..a.depth {
            let b = format!("blocks.{i}");
            for (name, o, inp, bias) in [
                ("attn.qkv", 3 * d, d, a.qkv_bias),
                ("attn.proj", d, d, true),
                ("mlp.fc1", h, d, true),
                ("mlp.fc2", d, h, true),
            ] {
                add(
                    format!("{b}.{name}.weight"),
                    vec![o, inp],
                    Init::TruncNormal(0.02),
                );
                if bias {
                    add(format!("{b}.{name}.bias"), vec![o], Init::Zeros);
                }
            }
            for norm in ["norm1", "norm2"] {
                add(format!("{b}.{norm}.weight"), vec![d], Init::Ones);
                add(format!("{b}.{norm}.bias"), vec![d], Init::Zeros);
            }
            if a.layer_scale {
                for ls in ["ls1", "ls2"] {
                    add(format!("{b}.{ls}.gamma"), vec![d], Init::Ones);
                }
            }
        }
        p
    }

    /// The encoder (blocks only, no final norm) from parameters in timm naming under `w`.
    pub fn encoder(&self, w: &Weights) -> Result<TokenEncoder> {
        let a = &self.arch;
        let info = ModelInfo {
            family: Family::TimmVit,
            depth: a.depth,
            width: a.dim,
            num_heads: a.heads,
            patch: a.patch,
            input_hw: self.input_hw,
            prefix_tokens: a.prefix_tokens(),
            out_channels: a.dim,
            default_levels: self.levels.clone(),
            preprocess: PreprocessConfig::exact(
                self.input_hw,
                Resample::Bicubic,
                self.mean,
                self.std,
            ),
        };
        super::vit::timm_encoder(w, a, info, false)
    }
}

/// A ViT backbone: its pyramid is the patch tokens of the spec's levels as maps.
pub struct ViTBackbone {
    encoder: TokenEncoder,
    levels: Vec<usize>,
    head: Head,
}

/// A ViT's pyramid levels: its width at its patch stride, once per level.
pub(crate) fn vit_feature_info(encoder: &TokenEncoder, levels: &[usize]) -> Vec<FeatureInfo> {
    let i = &encoder.info;
    vec![
        FeatureInfo {
            channels: i.width,
            stride: i.patch,
        };
        levels.len()
    ]
}

/// A ViT's pyramid: the patch tokens after each of `levels` (0-based blocks) as NCHW maps.
pub(crate) fn vit_pyramid(
    encoder: &TokenEncoder,
    levels: &[usize],
    pixels: &Tensor,
) -> Result<Vec<Tensor>> {
    let out = encoder.forward_features(pixels, &FeatureRequest::blocks(levels))?;
    levels.iter().map(|&b| out.feature_map(b + 1)).collect()
}

impl Backbone for ViTBackbone {
    fn feature_info(&self) -> Vec<FeatureInfo> {
        vit_feature_info(&self.encoder, &self.levels)
    }
    fn forward_intermediates(&self, pixels: &Tensor, _train: bool) -> Result<Vec<Tensor>> {
        vit_pyramid(&self.encoder, &self.levels, pixels)
    }
    fn head(&self) -> &Head {
        &self.head
    }
    fn onnx_intermediates(&self, g: &mut crate::onnx::Graph, x: &str) -> Result<Vec<String>> {
        let hw = g.input_hw();
        self.encoder.onnx_levels(g, x, hw, &self.levels)
    }
}

impl BackboneSpec for ViTSpec {
    fn arch_name(&self) -> String {
        let a = &self.arch;
        format!(
            "vit (width {}, depth {}, heads {}, patch {})",
            a.dim, a.depth, a.heads, a.patch
        )
    }
    fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = self.parameters_under("");
        if self.num_classes > 0 {
            let (c, d) = (self.num_classes, self.arch.dim);
            p.push(("head.weight".into(), vec![c, d], Init::TruncNormal(0.02)));
            p.push(("head.bias".into(), vec![c], Init::Zeros));
        }
        p
    }
    fn build(&self, w: &Weights, _state: &Weights) -> Result<Box<dyn Backbone>> {
        let encoder = self.encoder(w)?;
        let head = Head::load(
            w,
            "head",
            self.arch.dim,
            self.num_classes,
            encoder.info.preprocess.clone(),
        )?;
        Ok(Box::new(ViTBackbone {
            encoder,
            levels: self.levels.clone(),
            head,
        }))
    }
    fn with_classes(&self, classes: usize) -> Result<Box<dyn BackboneSpec>> {
        Ok(Box::new(Self {
            num_classes: classes,
            ..self.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_vit_builds_from_its_parameters_and_gives_its_pyramid() {
        let s = spec("vit-n8", (32, 48)).unwrap();
        assert!(spec("no-such-net", (32, 32)).is_none());
        assert!(names().iter().all(|n| spec(n, (64, 64)).is_some()));
        let (_vm, w) = crate::train::engine::seeded_weights(s.parameters(), 0);
        let b = s.build(&w, &w).unwrap();
        let info = b.feature_info();
        assert_eq!(info.len(), 4);
        assert!(info.iter().all(|f| f.channels == 96 && f.stride == 8));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 48), &Device::Cpu).unwrap();
        let maps = b.forward_intermediates(&x, false).unwrap();
        for m in &maps {
            assert_eq!(m.dims(), &[2, 96, 4, 6]);
        }
        // pooled = last map's spatial mean
        let pooled = b.forward_pooled(&x).unwrap();
        let want = maps[3].mean(3).unwrap().mean(2).unwrap();
        assert!(crate::kernels::test_util::max_abs_diff(&pooled, &want) < 1e-6);
        assert_eq!(b.preprocess().mean, IMAGENET_MEAN);
    }
}
