//! Frozen teachers as training sees them: a loaded encoder with a short name, the blocks it is
//! distilled at, and the input geometry it asks for. The geometry comes from the teacher's own
//! preprocessing: a checkpoint whose preprocessing pads to a fixed canvas (SAM: longest side to
//! 1024, zero-padded to 1024 x 1024) is fed at that canvas; every other teacher runs at any
//! resolution and is fed what the student sees.

use crate::error::Result;
use crate::models::student::TeacherSlot;
use crate::models::{self, Family, FeatureRequest, LoadOptions, ModelInfo, VisionEncoder};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Where a teacher's input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geometry {
    /// a fixed square canvas of this side: the image's longest side is resized to it and the
    /// rest zero-padded at the bottom/right (the teacher's preprocessing pads)
    Canvas(usize),
    /// the student's input, at this square size for square crops (the student's size unless
    /// overridden)
    Follow(usize),
}

impl Geometry {
    /// The geometry a model's preprocessing asks for; `student_size` for any-resolution
    /// teachers, `size_override` > 0 replaces either.
    pub fn of(info: &ModelInfo, student_size: usize, size_override: usize) -> Self {
        match (size_override, info.preprocess.pad) {
            (0, Some((h, w))) => Geometry::Canvas(h.max(w)),
            (0, None) => Geometry::Follow(student_size),
            (s, Some(_)) => Geometry::Canvas(s),
            (s, None) => Geometry::Follow(s),
        }
    }

    /// Side of the square input for square crops.
    pub fn side(self) -> usize {
        match self {
            Geometry::Canvas(s) | Geometry::Follow(s) => s,
        }
    }

    /// Input (h, w) for a student input of `student_hw`.
    pub fn input_hw(self, student_hw: (usize, usize)) -> (usize, usize) {
        match self {
            Geometry::Canvas(s) => (s, s),
            Geometry::Follow(_) => student_hw,
        }
    }
}

/// A frozen teacher with the geometry it is fed.
pub struct Teacher {
    /// short name for metrics, plots and specs (`dinov2-b14`, or `--teacher NAME=...`)
    pub name: String,
    /// the folder or hub id it was loaded from
    pub id: String,
    pub encoder: Box<dyn VisionEncoder>,
    pub geometry: Geometry,
    /// 0-based blocks whose outputs are distilled
    pub levels: Vec<usize>,
    /// device and dtype the encoder runs on
    pub load: LoadOptions,
}

/// Split a teacher argument `NAME=PATH` into its explicit name and source; a plain path or hub
/// id (or an existing path that contains `=`) has no explicit name.
pub fn parse_teacher_arg(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once('=') {
        Some((name, id))
            if !name.is_empty() && !name.contains(['/', '\\']) && !Path::new(arg).exists() =>
        {
            (Some(name), id)
        }
        _ => (None, arg),
    }
}

/// The short name of a model: family and size when the width is a known one (`dinov2-b14`,
/// `clip-l14`, `sam-h16`, `siglip-so400m14`), else the last component of the folder or hub id.
pub fn short_name(info: &ModelInfo, id: &str) -> String {
    let family = match info.family {
        Family::Vit | Family::TimmVit => "vit",
        Family::Dinov2 => "dinov2",
        Family::Dinov2WithRegisters => "dinov2reg",
        Family::Clip => "clip",
        Family::Siglip => "siglip",
        Family::Sam => "sam",
        Family::Onnx => {
            // the file's stem (`teacher.onnx:feat` -> `teacher`)
            let file = models::onnx_teacher::parse_spec(id).map_or(id, |(f, _)| f);
            let stem = Path::new(file).file_stem().and_then(|s| s.to_str());
            return stem.unwrap_or("onnx").to_string();
        }
    };
    let size = match info.width {
        192 => Some("ti"),
        384 => Some("s"),
        768 => Some("b"),
        1024 => Some("l"),
        1152 if info.family == Family::Siglip => Some("so400m"),
        1280 => Some("h"),
        1536 if info.family != Family::Sam => Some("g"),
        1664 => Some("bigg"),
        _ => None,
    };
    match size {
        Some(sz) => format!("{family}-{sz}{}", info.patch),
        None => {
            let id = id.split('@').next().unwrap_or(id);
            let last = id
                .trim_end_matches(['/', '\\'])
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or(id);
            if last.is_empty() {
                family.to_string()
            } else {
                last.to_string()
            }
        }
    }
}

/// Make names unique in order: the second `x` becomes `x-2`, and so on.
pub fn dedup_names(names: &mut [String]) {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for i in 0..names.len() {
        let base = names[i].clone();
        let taken = |n: &str, names: &[String]| names[..i].iter().any(|m| m == n);
        let mut k = seen.get(&base).copied().unwrap_or(1);
        let mut candidate = base.clone();
        while taken(&candidate, names) {
            k += 1;
            candidate = format!("{base}-{k}");
        }
        seen.insert(base, k);
        names[i] = candidate;
    }
}

impl Teacher {
    /// Load one teacher (`NAME=PATH` or a folder / hub id) on `opts`' device and dtype, at the
    /// geometry its preprocessing asks for (see [`Geometry::of`]).
    pub fn load(
        arg: &str,
        student_size: usize,
        size_override: usize,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (name, id) = parse_teacher_arg(arg);
        let encoder = models::load(id, opts)?;
        let info = encoder.info();
        Ok(Self {
            name: name.map_or_else(|| short_name(info, id), str::to_string),
            id: id.to_string(),
            levels: info.default_levels.clone(),
            geometry: Geometry::of(info, student_size, size_override),
            encoder,
            load: opts.clone(),
        })
    }

    /// Load several teachers (sizes: per-teacher overrides, may be empty) with unique names.
    pub fn load_all(
        args: &[String],
        student_size: usize,
        sizes: &[usize],
        opts: &LoadOptions,
    ) -> Result<Vec<Self>> {
        let mut ts = args
            .iter()
            .enumerate()
            .map(|(k, a)| Self::load(a, student_size, sizes.get(k).copied().unwrap_or(0), opts))
            .collect::<Result<Vec<_>>>()?;
        let mut names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
        dedup_names(&mut names);
        for (t, n) in ts.iter_mut().zip(names) {
            t.name = n;
        }
        Ok(ts)
    }

    /// `NAME=ID`: how a run records this teacher, so a resumed or later run gets the same name.
    pub fn arg(&self) -> String {
        format!("{}={}", self.name, self.id)
    }

    /// The teacher as the student sees it.
    pub fn slot(&self) -> TeacherSlot {
        TeacherSlot {
            name: self.name.clone(),
            dim: self.encoder.info().width,
        }
    }

    /// Side of the square input for square crops.
    pub fn size(&self) -> usize {
        self.geometry.side()
    }

    /// The teacher's normalisation (mean, std).
    pub fn norm(&self) -> ([f32; 3], [f32; 3]) {
        let p = &self.encoder.info().preprocess;
        (p.mean, p.std)
    }

    /// Feature maps `[B, C, h, w]` (f32, detached) at the distilled levels. The pixels are
    /// moved to the teacher's device and dtype.
    pub fn features(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let pixels = pixels
            .to_device(&self.load.device)?
            .to_dtype(self.load.dtype)?;
        let out = self
            .encoder
            .forward_features(&pixels, &FeatureRequest::blocks(&self.levels))?;
        self.levels
            .iter()
            .map(|&b| Ok(out.feature_map(b + 1)?.to_dtype(DType::F32)?.detach()))
            .collect()
    }

    /// The teacher's input from a batch the student sees (`[B, 3, H, W]`, normalised with
    /// `from` = (mean, std)): re-normalised to the teacher's statistics and, for a canvas
    /// teacher, resized (longest side to the canvas) and zero-padded bottom/right.
    pub fn input_from(&self, x: &Tensor, from: ([f32; 3], [f32; 3])) -> Result<Tensor> {
        let (m, s) = self.norm();
        let dev = x.device();
        // y = ((x * std_s + mean_s) - mean_t) / std_t, per channel
        let a: Vec<f32> = (0..3).map(|c| from.1[c] / s[c]).collect();
        let b: Vec<f32> = (0..3).map(|c| (from.0[c] - m[c]) / s[c]).collect();
        let a = Tensor::from_vec(a, (1, 3, 1, 1), dev)?;
        let b = Tensor::from_vec(b, (1, 3, 1, 1), dev)?;
        let y = x.broadcast_mul(&a)?.broadcast_add(&b)?;
        let Geometry::Canvas(side) = self.geometry else {
            return Ok(y);
        };
        let (_, _, h, w) = y.dims4()?;
        let sc = side as f64 / h.max(w) as f64;
        let (nh, nw) = (
            ((h as f64 * sc).round() as usize).clamp(1, side),
            ((w as f64 * sc).round() as usize).clamp(1, side),
        );
        let y = crate::interp::resize_bilinear(&y, (nh, nw))?;
        Ok(y.pad_with_zeros(2, 0, side - nh)?
            .pad_with_zeros(3, 0, side - nw)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(family: Family, width: usize, patch: usize) -> ModelInfo {
        ModelInfo {
            family,
            depth: 12,
            width,
            num_heads: 12,
            patch,
            input_hw: (224, 224),
            prefix_tokens: 1,
            out_channels: width,
            default_levels: vec![2, 5, 8, 11],
            preprocess: crate::preprocess::PreprocessConfig::exact(
                (224, 224),
                crate::preprocess::Resample::Bicubic,
                [0.5; 3],
                [0.5; 3],
            ),
        }
    }

    #[test]
    fn short_names() {
        let hub = "facebook/dinov2-base";
        assert_eq!(
            short_name(&info(Family::Dinov2, 768, 14), hub),
            "dinov2-b14"
        );
        assert_eq!(short_name(&info(Family::Clip, 1024, 14), "x"), "clip-l14");
        assert_eq!(short_name(&info(Family::Sam, 1280, 16), "x"), "sam-h16");
        assert_eq!(
            short_name(&info(Family::Siglip, 1152, 14), "x"),
            "siglip-so400m14"
        );
        // unknown widths: the folder's or hub id's last component
        assert_eq!(
            short_name(&info(Family::Dinov2, 48, 14), "/work/models/tiny-dino/"),
            "tiny-dino"
        );
        assert_eq!(
            short_name(&info(Family::Clip, 40, 14), "org/my-clip@main"),
            "my-clip"
        );
    }

    #[test]
    fn names_are_deduplicated_in_order() {
        let mut n: Vec<String> = ["a", "b", "a", "a", "a-2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        dedup_names(&mut n);
        assert_eq!(n, ["a", "b", "a-2", "a-3", "a-2-2"]);
    }

    #[test]
    fn teacher_arguments() {
        assert_eq!(parse_teacher_arg("dino=/m/d"), (Some("dino"), "/m/d"));
        assert_eq!(parse_teacher_arg("/m/a=b"), (None, "/m/a=b"));
        assert_eq!(
            parse_teacher_arg("facebook/dinov2-base"),
            (None, "facebook/dinov2-base")
        );
        assert_eq!(parse_teacher_arg("=x"), (None, "=x"));
    }

    #[test]
    fn geometry_follows_the_preprocessing() {
        // any-resolution preprocessing: the student's size, or the override
        let vit = info(Family::Vit, 768, 16);
        assert_eq!(Geometry::of(&vit, 384, 0), Geometry::Follow(384));
        assert_eq!(Geometry::of(&vit, 384, 224), Geometry::Follow(224));
        assert_eq!(Geometry::Follow(384).input_hw((448, 576)), (448, 576));
        // a padding preprocessing (SAM's): its canvas whatever the student's size
        let mut sam = info(Family::Sam, 768, 16);
        sam.preprocess =
            crate::preprocess::PreprocessConfig::longest_edge_pad(1024, [0.5; 3], [0.5; 3]);
        assert_eq!(Geometry::of(&sam, 384, 0), Geometry::Canvas(1024));
        assert_eq!(Geometry::Canvas(1024).input_hw((448, 576)), (1024, 1024));
    }
}
