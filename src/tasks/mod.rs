//! What a task is, in one place per task: label layout, head channels, loss, prediction,
//! metric accumulator, main metric and rendering. Training, evaluation, prediction and the data
//! layer ask a task's [`TaskSpec`] instead of matching on the task.
//!
//! Adding a task: a file here with its spec, a variant in [`Task`] and its line in
//! [`Task::spec`].

pub mod classification;
pub mod depth;
pub mod edge;
pub mod normals;
pub mod saliency;
pub mod segmentation;

use crate::error::{Error, Result};
use crate::metrics::boundary::BoundaryOptions;
use candle_core::{Device, Tensor};
use image::RgbImage;

/// Label value of unlabelled pixels (class-map tasks).
pub const IGNORE: f32 = 255.0;

/// A task's name in recipes, metrics and file names.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Semseg,
    Parts,
    Saliency,
    Normals,
    Edge,
    Depth,
    /// image-level classification (one label per image)
    Classify,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Semseg,
        Task::Parts,
        Task::Saliency,
        Task::Normals,
        Task::Edge,
        Task::Depth,
        Task::Classify,
    ];

    /// The registry: each task's behaviour.
    pub fn spec(self) -> &'static dyn TaskSpec {
        match self {
            Task::Semseg => &segmentation::SEMSEG,
            Task::Parts => &segmentation::PARTS,
            Task::Saliency => &saliency::Saliency,
            Task::Normals => &normals::Normals,
            Task::Edge => &edge::Edge,
            Task::Depth => &depth::Depth,
            Task::Classify => &classification::Classify,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name()
    }

    pub fn from_name(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Channels of the label map.
    pub fn label_channels(self) -> usize {
        self.spec().label_channels()
    }

    /// Whether the label is a class map (nearest-neighbour resampling, 255 = ignore).
    pub fn is_discrete(self) -> bool {
        self.spec().discrete()
    }

    /// Value used for padding and for "no label".
    pub fn pad_value(self) -> f32 {
        self.spec().pad_value()
    }
}

/// A label map, row-major, `c` interleaved channels per pixel (an image-level label is a 1x1
/// map).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMap {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl LabelMap {
    pub fn filled(h: usize, w: usize, c: usize, v: f32) -> Self {
        LabelMap {
            h,
            w,
            c,
            data: vec![v; h * w * c],
        }
    }
}

/// A batch of labels for one task: `[B, c, H, W]` channel-first host data (class maps use
/// 255 = ignore; normals and depth zero = ignore).
pub struct Target {
    pub task: Task,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// channel-first per image: b x c x h x w
    pub data: Vec<f32>,
}

impl Target {
    /// Check that logits `[B, C, H, W]` fit these labels; returns (b, classes, h, w).
    pub fn check(&self, logits: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = logits.dims4()?;
        if (b, h, w) != (self.b, self.h, self.w) {
            return Err(Error::Invalid(format!(
                "{}: logits {:?} do not match labels {}x{}x{}",
                self.task.name(),
                logits.dims(),
                self.b,
                self.h,
                self.w
            )));
        }
        Ok((b, c, h, w))
    }
}

/// What metric accumulators need to know beyond the task.
#[derive(Clone, Debug)]
pub struct MetricContext {
    /// classes of a class-map task
    pub classes: usize,
    /// boundary matching (edge)
    pub edge: BoundaryOptions,
    /// depth evaluation cap in metres
    pub max_depth: f32,
}

/// Accumulates a task's metric over a data set.
pub trait TaskMetric: Send {
    /// One image: its prediction (as [`TaskSpec::predict`] gives it, batch dimension removed:
    /// `[H, W]` or `[c, H, W]`, cropped to the labelled area) and its label.
    fn update(&mut self, pred: &Tensor, gt: &LabelMap) -> Result<()>;
    /// Every metric of the task, as JSON (numbers in the reference's units).
    fn summary(&self) -> serde_json::Value;
}

/// Everything that makes a task what it is.
pub trait TaskSpec: Send + Sync {
    fn name(&self) -> &'static str;
    /// channels of the label map (normals 3, others 1)
    fn label_channels(&self) -> usize {
        1
    }
    /// class-valued labels (nearest resampling, 255 = ignore)
    fn discrete(&self) -> bool;
    /// padding / "no label" value
    fn pad_value(&self) -> f32 {
        if self.discrete() {
            IGNORE
        } else {
            0.0
        }
    }
    /// output channels of the head, given the data set's classes for this task
    fn head_channels(&self, classes: usize) -> usize;
    /// default loss weight (SPEC.md section 3)
    fn default_weight(&self) -> f64;
    /// the training loss on logits `[B, C, H, W]` at label resolution
    fn loss(&self, logits: &Tensor, target: &Target) -> Result<Tensor>;
    /// predictions from logits `[B, C, H, W]`: `[B, H, W]` maps or `[B, c, H, W]` vectors
    fn predict(&self, logits: &Tensor) -> Result<Tensor>;
    /// a fresh metric accumulator
    fn metric(&self, ctx: &MetricContext) -> Box<dyn TaskMetric>;
    /// the key of the main metric in [`TaskMetric::summary`] and whether lower is better
    fn main_metric(&self) -> (&'static str, bool);
    /// a picture of one prediction (`[H, W]` or `[c, H, W]`)
    fn render(&self, pred: &Tensor) -> Result<RgbImage>;
    /// Adjust label values after the image was scaled by `scale` (depth: a closer camera).
    fn rescale_values(&self, _m: &mut LabelMap, _scale: f64) {}
    /// Whether a horizontal flip negates the label's first channel (normals' x).
    fn flip_negates_x(&self) -> bool {
        false
    }
}

pub(crate) fn tensor(v: Vec<f32>, shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// Probabilities rounded to 8 bits: the reference saves saliency and edge maps as PNGs and
/// scores those.
pub(crate) fn quantized(p: &Tensor) -> Result<Vec<f32>> {
    Ok(p.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| (v * 255.0).round() / 255.0)
        .collect())
}

/// (h, w) of a prediction `[H, W]` or `[c, H, W]`, and its values.
pub(crate) fn plane(pred: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let d = pred.dims();
    if d.len() < 2 {
        return Err(Error::Invalid(format!("prediction {d:?} is not a map")));
    }
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    Ok((h, w, pred.flatten_all()?.to_vec1::<f32>()?))
}

/// A picture from a per-pixel colour function over (values, pixel index, pixels per plane).
pub(crate) fn picture(
    pred: &Tensor,
    colour: impl Fn(&[f32], usize, usize) -> [u8; 3],
) -> Result<RgbImage> {
    let (h, w, v) = plane(pred)?;
    let mut img = RgbImage::new(w as u32, h as u32);
    for i in 0..h * w {
        img.put_pixel(
            (i % w) as u32,
            (i / w) as u32,
            image::Rgb(colour(&v, i, h * w)),
        );
    }
    Ok(img)
}

/// A probability as a grey level.
pub(crate) fn grey(x: f32) -> [u8; 3] {
    let g = (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [g, g, g]
}

/// Weighted cross-entropy over labelled pixels: `-sum w_y log p_y / valid`, with `weights` per
/// class (255 = ignore).
pub(crate) fn cross_entropy(logits: &Tensor, t: &Target, weights: &[f32]) -> Result<Tensor> {
    let (b, c, h, w) = t.check(logits)?;
    let hw = h * w;
    let valid = t.data.iter().filter(|&&v| v != IGNORE).count();
    let mut onehot = vec![0f32; b * c * hw];
    for i in 0..b {
        for px in 0..hw {
            let v = t.data[i * hw + px];
            if v == IGNORE {
                continue;
            }
            let k = v as usize;
            if k >= c {
                return Err(Error::Invalid(format!(
                    "{} label {k} outside the head's {c} classes",
                    t.task.name()
                )));
            }
            onehot[(i * c + k) * hw + px] = weights[k];
        }
    }
    let onehot = tensor(onehot, &[b, c, h, w], logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    Ok(((logp * onehot)?.sum_all()?.neg()? / valid.max(1) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.spec().name(), t.name());
            assert_eq!(Task::from_name(t.name()), Some(t));
            // serde uses the same names as the specs
            let j = serde_json::to_string(&t).unwrap();
            assert_eq!(j, format!("\"{}\"", t.name()));
        }
    }
}
