//! Segmentation heads of task-oriented transfer.
//!
//! - Teacher: DINOv2's multi-level linear head ("+ms" linear evaluation): the patch tokens of
//!   the last four blocks, each layer-normalised (a LayerNorm of the head's own per level, in
//!   place of the reference's BatchNorm over the concatenation), concatenated over channels and
//!   mapped to class logits by one 1x1 convolution at the patch grid. The logits are resized
//!   bilinearly to wherever they are compared (mask, student grid).
//! - Student: SegFormer's all-MLP decoder over the backbone's pyramid (mmseg
//!   `SegformerHead` names): each level of stride >= 4 (the last four at most) through a 1x1
//!   conv + BatchNorm + ReLU to `width` channels, resized bilinearly to the finest of them,
//!   concatenated, fused by a 1x1 conv + BatchNorm + ReLU, and classified by a 1x1 conv
//!   (`conv_seg`). Logits come out at the finest level's stride (4 for the CNN families).

use crate::error::{Error, Result};
use crate::interp::resize_bilinear;
use crate::kernels::Act;
use crate::models::backbone::FeatureInfo;
use crate::models::layers::{conv1x1_linear, ConvBn, LayerNorm, Linear};
use crate::models::student::Init;
use crate::models::{EncoderOutput, FeatureRequest, VisionEncoder};
use crate::weights::Weights;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// The blocks a teacher's segmentation head reads: the last four (all of a shallower model).
pub fn head_blocks(depth: usize) -> Vec<usize> {
    (depth.saturating_sub(4)..depth).collect()
}

/// The parameters of a [`LevelHead`] under `prefix` for `levels` levels of `width` channels.
pub fn level_head_params(
    prefix: &str,
    levels: usize,
    width: usize,
    classes: usize,
) -> Vec<(String, Vec<usize>, Init)> {
    let mut p = Vec::new();
    for i in 0..levels {
        p.push((
            format!("{prefix}.norms.{i}.weight"),
            vec![width],
            Init::Ones,
        ));
        p.push((format!("{prefix}.norms.{i}.bias"), vec![width], Init::Zeros));
    }
    p.push((
        format!("{prefix}.conv_seg.weight"),
        vec![classes, levels * width, 1, 1],
        Init::Normal(0.01),
    ));
    p.push((
        format!("{prefix}.conv_seg.bias"),
        vec![classes],
        Init::Zeros,
    ));
    p
}

/// The teacher's segmentation head (see the module doc).
pub struct LevelHead {
    pub blocks: Vec<usize>,
    norms: Vec<LayerNorm>,
    conv: Linear,
}

impl LevelHead {
    /// Read the head of `blocks` over `width`-channel levels from `w` (names as
    /// [`level_head_params`] makes them, without the prefix).
    pub fn load(w: &Weights, blocks: Vec<usize>, width: usize, classes: usize) -> Result<Self> {
        let norms = (0..blocks.len())
            .map(|i| LayerNorm::load(&w.pp(format!("norms.{i}")), width, 1e-6))
            .collect::<Result<Vec<_>>>()?;
        let conv = conv1x1_linear(&w.pp("conv_seg"), blocks.len() * width, classes)?;
        Ok(Self {
            blocks,
            norms,
            conv,
        })
    }

    /// What the encoder must compute for this head.
    pub fn request(&self) -> FeatureRequest {
        FeatureRequest::blocks(&self.blocks)
    }

    /// Class logits `[B, K, h, w]` at the patch grid from the encoder's output.
    pub fn forward(&self, out: &EncoderOutput) -> Result<Tensor> {
        let mut levels = Vec::with_capacity(self.blocks.len());
        for (b, norm) in self.blocks.iter().zip(&self.norms) {
            // [B, C, h, w] -> channels last for the LayerNorm
            let m = out.feature_map(b + 1)?.permute((0, 2, 3, 1))?;
            levels.push(norm.forward(&m)?);
        }
        let x = Tensor::cat(&levels, D::Minus1)?;
        Ok(self.conv.forward(&x)?.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Logits of pixels through `encoder`.
    pub fn logits(&self, encoder: &dyn VisionEncoder, x: &Tensor) -> Result<Tensor> {
        self.forward(&encoder.forward_features(x, &self.request())?)
    }
}

/// The final output of an encoder as a `[B, C, h, w]` map of patch features (SAM's neck output
/// is one already).
pub fn final_map(out: &EncoderOutput) -> Result<Tensor> {
    let last = out.last()?;
    if last.rank() == 4 {
        return Ok(last.clone());
    }
    let (b, n, c) = last.dims3()?;
    let (h, w) = out.grid;
    let p = out.prefix_tokens;
    Ok(crate::kernels::swap_inner(&last.narrow(1, p, n - p)?)?.reshape((b, c, h, w))?)
}

/// The student's decoder: which pyramid levels it reads and its width.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegDecoderSpec {
    /// (pyramid index, channels) of the levels read
    pub levels: Vec<(usize, usize)>,
    pub width: usize,
    pub classes: usize,
}

const DECODER: &str = "decode_head";

impl SegDecoderSpec {
    /// The decoder for a pyramid: levels of stride >= 4 (all when none is), the last four at
    /// most.
    pub fn new(info: &[FeatureInfo], width: usize, classes: usize) -> Self {
        let mut levels: Vec<(usize, usize)> = info
            .iter()
            .enumerate()
            .filter(|(_, f)| f.stride >= 4)
            .map(|(i, f)| (i, f.channels))
            .collect();
        if levels.is_empty() {
            levels = info.iter().map(|f| f.channels).enumerate().collect();
        }
        let skip = levels.len().saturating_sub(4);
        levels.drain(..skip);
        Self {
            levels,
            width,
            classes,
        }
    }

    fn conv_bn(&self, name: &str, inp: usize) -> Vec<(String, Vec<usize>, Init)> {
        let d = self.width;
        vec![
            (
                format!("{DECODER}.{name}.conv.weight"),
                vec![d, inp, 1, 1],
                Init::Normal((2.0 / d as f64).sqrt()),
            ),
            (format!("{DECODER}.{name}.bn.weight"), vec![d], Init::Ones),
            (format!("{DECODER}.{name}.bn.bias"), vec![d], Init::Zeros),
        ]
    }

    fn norm_names(&self) -> Vec<String> {
        let mut n: Vec<String> = (0..self.levels.len())
            .map(|i| format!("{DECODER}.convs.{i}.bn"))
            .collect();
        n.push(format!("{DECODER}.fusion_conv.bn"));
        n
    }

    /// Its parameters (names under `decode_head.`).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut p = Vec::new();
        for (i, &(_, c)) in self.levels.iter().enumerate() {
            p.extend(self.conv_bn(&format!("convs.{i}"), c));
        }
        p.extend(self.conv_bn("fusion_conv", self.levels.len() * self.width));
        p.push((
            format!("{DECODER}.conv_seg.weight"),
            vec![self.classes, self.width, 1, 1],
            Init::Normal(0.01),
        ));
        p.push((
            format!("{DECODER}.conv_seg.bias"),
            vec![self.classes],
            Init::Zeros,
        ));
        p
    }

    /// Its BatchNorm running statistics.
    pub fn buffers(&self) -> Vec<(String, Vec<usize>, Init)> {
        self.norm_names()
            .into_iter()
            .flat_map(|n| {
                [
                    (format!("{n}.running_mean"), vec![self.width], Init::Zeros),
                    (format!("{n}.running_var"), vec![self.width], Init::Ones),
                ]
            })
            .collect()
    }

    pub fn build(&self, w: &Weights, state: &Weights) -> Result<SegDecoder> {
        let (w, state) = (w.pp(DECODER), state.pp(DECODER));
        let d = self.width;
        let unit = |name: &str, inp: usize| -> Result<ConvBn> {
            Ok(ConvBn::load(
                &w,
                &state,
                &format!("{name}.conv"),
                &format!("{name}.bn"),
                [d, inp, 1, 1],
                1,
                1,
            )?
            .with_act(Act::Relu))
        };
        let convs = self
            .levels
            .iter()
            .enumerate()
            .map(|(i, &(_, c))| unit(&format!("convs.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(SegDecoder {
            levels: self.levels.iter().map(|l| l.0).collect(),
            convs,
            fusion: unit("fusion_conv", self.levels.len() * d)?,
            cls: conv1x1_linear(&w.pp("conv_seg"), d, self.classes)?,
        })
    }
}

/// The student's decoder, built.
pub struct SegDecoder {
    levels: Vec<usize>,
    convs: Vec<ConvBn>,
    fusion: ConvBn,
    cls: Linear,
}

impl SegDecoder {
    /// Class logits `[B, K, h, w]` at the finest level read, from the backbone's pyramid.
    pub fn forward(&self, pyramid: &[Tensor], train: bool) -> Result<Tensor> {
        let mut maps = Vec::with_capacity(self.levels.len());
        let mut size = None;
        for (&l, conv) in self.levels.iter().zip(&self.convs) {
            let x = pyramid.get(l).ok_or_else(|| {
                Error::Invalid(format!(
                    "decoder reads level {l}, the backbone gave {}",
                    pyramid.len()
                ))
            })?;
            let y = conv.forward(x, train)?;
            let (_, _, h, w) = y.dims4()?;
            let hw = *size.get_or_insert((h, w));
            maps.push(resize_bilinear(&y, hw)?);
        }
        let fused = self.fusion.forward(&Tensor::cat(&maps, 1)?, train)?;
        let y = self.cls.forward(&fused.permute((0, 2, 3, 1))?)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

impl crate::models::export::OnnxHead for SegDecoder {
    /// Class logits `logits` `[B, K, H, W]` at the input's resolution (bilinear, as
    /// `F.interpolate(align_corners=False)` from the finest level read).
    fn onnx(
        &self,
        g: &mut crate::onnx::Graph,
        levels: &[String],
        sides: &[(usize, usize)],
        _pooled: &str,
    ) -> Result<Vec<(String, String, usize)>> {
        let mut maps = Vec::with_capacity(self.levels.len());
        let mut size = None;
        for (&l, conv) in self.levels.iter().zip(&self.convs) {
            let (Some(x), Some(&side)) = (levels.get(l), sides.get(l)) else {
                return Err(Error::Invalid(format!(
                    "decoder reads level {l}, the backbone gave {}",
                    levels.len()
                )));
            };
            let y = conv.onnx(g, x)?;
            let hw = *size.get_or_insert(side);
            maps.push(g.resize_bilinear(&y, side, hw, false)?);
        }
        let refs: Vec<&str> = maps.iter().map(String::as_str).collect();
        let cat = g.node("Concat", &refs, vec![("axis", crate::onnx::Attr::Int(1))]);
        let fused = self.fusion.onnx(g, &cat)?;
        let logits = self.cls.onnx_pointwise(g, &fused)?;
        let from = size.ok_or_else(|| Error::Invalid("decoder without levels".into()))?;
        let logits = g.resize_bilinear(&logits, from, g.input_hw(), false)?;
        Ok(vec![("logits".into(), logits, 4)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::backbone::pyramid;

    #[test]
    fn decoder_reads_the_last_four_levels_of_stride_four_or_more() {
        let info = pyramid(&[16, 24, 48, 64, 80], 2); // strides 2..32
        let s = SegDecoderSpec::new(&info, 32, 5);
        assert_eq!(s.levels, vec![(1, 24), (2, 48), (3, 64), (4, 80)]);
        let vit = vec![FeatureInfo {
            channels: 64,
            stride: 16,
        }];
        assert_eq!(SegDecoderSpec::new(&vit, 32, 5).levels, vec![(0, 64)]);
        assert_eq!(head_blocks(12), vec![8, 9, 10, 11]);
        assert_eq!(head_blocks(2), vec![0, 1]);
    }
}
