//! Multi-task dense-prediction data sets in the layouts users download (the MTI-Net / ATRC
//! releases of PASCAL-Context and NYUD-v2, SPEC.md section 5).
//!
//! Every label is a [`LabelMap`] of f32 values at image resolution: class indices for
//! segmentation and parts, 0/1 for saliency and boundaries, unit vectors for normals
//! (three channels), metres for depth. `IGNORE` (255) marks pixels without a label; normals and
//! depth mark them with a zero vector / zero depth instead.

use crate::error::{Error, Result};
use crate::mat::{MatFile, MatValue};
use crate::metrics::boundary::label_boundaries;
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::tasks::{LabelMap, Task, IGNORE};

/// One image with its labels.
#[derive(Clone, Debug)]
pub struct DenseSample {
    pub id: String,
    pub image: RgbImage,
    pub labels: BTreeMap<Task, LabelMap>,
}

/// A multi-task data set addressed by index.
pub trait DenseDataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn id(&self, i: usize) -> &str;
    fn tasks(&self) -> &[Task];
    /// Classes of a discrete task (head output channels for the others).
    fn classes(&self, t: Task) -> usize;
    fn load(&self, i: usize) -> Result<DenseSample>;
    fn root(&self) -> &Path;
}

/// Output channels of a task head on a data set.
pub fn head_channels(ds: &dyn DenseDataset, t: Task) -> usize {
    t.spec().head_channels(ds.classes(t))
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadInput {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ids: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(bad(path, "split list is empty"));
    }
    Ok(ids)
}

/// First existing file among candidates, or an error naming the first.
fn first_existing(cands: &[PathBuf]) -> Result<PathBuf> {
    cands
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| bad(&cands[0], "missing file"))
}

pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?
        .to_rgb8())
}

/// Raw sample values of a single-channel PNG: palette indices for indexed images (VOC-style
/// label PNGs), grey levels for 8/16-bit grey. Returns (h, w, values).
pub fn read_index_png(path: &Path) -> Result<(usize, usize, Vec<u16>)> {
    let err = |e: &dyn std::fmt::Display| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| err(&e))?;
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .ok_or_else(|| err(&"image too large"))?
    ];
    let info = reader.next_frame(&mut buf).map_err(|e| err(&e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    use png::{BitDepth, ColorType};
    let channels = match info.color_type {
        ColorType::Grayscale | ColorType::Indexed => 1,
        ColorType::GrayscaleAlpha => 2,
        _ => {
            return Err(bad(
                path,
                format!(
                    "label PNG must be single-channel (grey or palette), found {:?}",
                    info.color_type
                ),
            ))
        }
    };
    let row = info.line_size;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let line = &buf[y * row..(y + 1) * row];
        for x in 0..w {
            let v = match info.bit_depth {
                BitDepth::Eight => line[x * channels] as u16,
                BitDepth::Sixteen => {
                    u16::from_be_bytes([line[2 * x * channels], line[2 * x * channels + 1]])
                }
                d => {
                    let bits = d as usize;
                    let bit = x * bits;
                    let byte = line[bit / 8];
                    ((byte >> (8 - bits - bit % 8)) & ((1u16 << bits) - 1) as u8) as u16
                }
            };
            out.push(v);
        }
    }
    Ok((h, w, out))
}

fn expect_size(path: &Path, (h, w): (usize, usize), img: &RgbImage) -> Result<()> {
    if (h, w) != (img.height() as usize, img.width() as usize) {
        return Err(bad(
            path,
            format!(
                "label is {w}x{h} but the image is {}x{}",
                img.width(),
                img.height()
            ),
        ));
    }
    Ok(())
}

/// Normals from an RGB PNG: `2 v / 255 - 1` per channel.
fn read_normals_png(path: &Path, img: &RgbImage) -> Result<LabelMap> {
    let n = read_rgb(path)?;
    expect_size(path, (n.height() as usize, n.width() as usize), img)?;
    Ok(LabelMap {
        h: n.height() as usize,
        w: n.width() as usize,
        c: 3,
        data: n
            .into_raw()
            .into_iter()
            .map(|v| 2.0 * v as f32 / 255.0 - 1.0)
            .collect(),
    })
}

/// PASCAL-Context, MTI-Net/ATRC layout (`PASCAL_MT`).
pub struct PascalContext {
    root: PathBuf,
    ids: Vec<String>,
    tasks: Vec<Task>,
    /// Context label ids whose normals are kept (classes shared with NYUD); None = all.
    normals_classes: Option<Vec<u32>>,
}

/// The 24 PASCAL-Part person part names and their 6 groups (head 1, torso/neck 2, upper arm 3,
/// lower arm/hand 4, upper leg 5, lower leg/foot 6).
pub fn person_part_group(name: &str) -> Option<u8> {
    Some(match name {
        "hair" | "head" | "lear" | "lebrow" | "leye" | "mouth" | "nose" | "rear" | "rebrow"
        | "reye" => 1,
        "neck" | "torso" => 2,
        "luarm" | "ruarm" => 3,
        "llarm" | "rlarm" | "lhand" | "rhand" => 4,
        "luleg" | "ruleg" => 5,
        "llleg" | "rlleg" | "lfoot" | "rfoot" => 6,
        _ => return None,
    })
}

/// PASCAL-Part class index of "person".
const PERSON: f64 = 15.0;

impl PascalContext {
    pub const SEMSEG_CLASSES: usize = 21;
    pub const PART_CLASSES: usize = 7;

    pub fn open(root: &Path, split: &str, tasks: &[Task]) -> Result<Self> {
        if let Some(t) = tasks
            .iter()
            .find(|t| matches!(t, Task::Depth | Task::Classify))
        {
            return Err(Error::Invalid(format!(
                "PASCAL-Context has no {} labels",
                t.name()
            )));
        }
        let ids = read_list(&root.join("ImageSets/Context").join(format!("{split}.txt")))?;
        let normals_classes = if tasks.contains(&Task::Normals) {
            Self::shared_normal_classes(root)?
        } else {
            None
        };
        Ok(PascalContext {
            root: root.to_path_buf(),
            ids,
            tasks: tasks.to_vec(),
            normals_classes,
        })
    }

    /// Context ids of the classes NYUD also has (`json/{nyu,context}_classes.json`), whose
    /// distilled normals the reference keeps.
    fn shared_normal_classes(root: &Path) -> Result<Option<Vec<u32>>> {
        let (nyu, ctx) = (
            root.join("json/nyu_classes.json"),
            root.join("json/context_classes.json"),
        );
        if !nyu.is_file() || !ctx.is_file() {
            tracing::warn!(
                "{}: no json/nyu_classes.json + json/context_classes.json; keeping normals on every class",
                root.display()
            );
            return Ok(None);
        }
        let read = |p: &Path| -> Result<serde_json::Map<String, serde_json::Value>> {
            let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            match serde_json::from_str(&t) {
                Ok(serde_json::Value::Object(m)) => Ok(m),
                Ok(_) => Err(bad(p, "expected a JSON object of class name -> id")),
                Err(e) => Err(bad(p, e.to_string())),
            }
        };
        let (n, c) = (read(&nyu)?, read(&ctx)?);
        let mut ids = Vec::new();
        for name in n.keys() {
            if name == "unknown" {
                continue;
            }
            if let Some(v) = c.get(name).and_then(|v| v.as_u64()) {
                ids.push(v as u32);
            }
        }
        Ok(Some(ids))
    }

    fn label_map_mat(&self, id: &str) -> Result<(PathBuf, usize, usize, Vec<f64>)> {
        let p = self
            .root
            .join("pascal-context/trainval")
            .join(format!("{id}.mat"));
        let (h, w, d) = MatFile::open(&p)?.matrix("LabelMap")?;
        Ok((p, h, w, d))
    }

    fn parts(&self, id: &str, img: &RgbImage) -> Result<LabelMap> {
        let p = self.root.join("human_parts").join(format!("{id}.mat"));
        let (h, w) = (img.height() as usize, img.width() as usize);
        // Images without a parts file or without annotated people are ignored entirely.
        if !p.is_file() {
            return Ok(LabelMap::filled(h, w, 1, IGNORE));
        }
        let mat = MatFile::open(&p)?;
        let objects = mat
            .var("anno")?
            .field(0, "objects")
            .ok_or_else(|| mat.error("anno has no objects field"))?;
        let mut target: Option<Vec<f32>> = None;
        for o in 0..objects.len() {
            let is_person = objects
                .field(o, "class_ind")
                .and_then(MatValue::as_scalar)
                .is_some_and(|c| c == PERSON);
            let Some(parts) = objects.field(o, "parts").filter(|p| !p.is_empty()) else {
                continue;
            };
            if !is_person {
                continue;
            }
            let t = target.get_or_insert_with(|| vec![0.0; h * w]);
            for k in 0..parts.len() {
                let name = match parts.field(k, "part_name") {
                    Some(MatValue::Char(s)) => s.clone(),
                    _ => return Err(mat.error(format!("object {o} part {k} has no part_name"))),
                };
                let group = person_part_group(&name)
                    .ok_or_else(|| mat.error(format!("unknown person part {name:?}")))?;
                let (mh, mw, mask) = parts
                    .field(k, "mask")
                    .and_then(MatValue::as_matrix)
                    .ok_or_else(|| mat.error(format!("object {o} part {k} has no 2-D mask")))?;
                if (mh, mw) != (h, w) {
                    return Err(
                        mat.error(format!("part mask is {mw}x{mh} but the image is {w}x{h}"))
                    );
                }
                for (tv, &m) in t.iter_mut().zip(&mask) {
                    if m != 0.0 {
                        *tv = group as f32;
                    }
                }
            }
        }
        Ok(match target {
            Some(data) => LabelMap { h, w, c: 1, data },
            None => LabelMap::filled(h, w, 1, IGNORE),
        })
    }
}

impl DenseDataset for PascalContext {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }
    fn tasks(&self) -> &[Task] {
        &self.tasks
    }
    fn classes(&self, t: Task) -> usize {
        match t {
            Task::Semseg => Self::SEMSEG_CLASSES,
            Task::Parts => Self::PART_CLASSES,
            _ => 2,
        }
    }
    fn root(&self) -> &Path {
        &self.root
    }

    fn load(&self, i: usize) -> Result<DenseSample> {
        let id = &self.ids[i];
        let r = &self.root;
        let image = read_rgb(&r.join("JPEGImages").join(format!("{id}.jpg")))?;
        let (h, w) = (image.height() as usize, image.width() as usize);
        let mut labels = BTreeMap::new();
        let mut label_map = None;
        for &t in &self.tasks {
            let m = match t {
                Task::Semseg => {
                    let p = first_existing(&[
                        r.join("semseg/VOC12").join(format!("{id}.png")),
                        r.join("semseg/pascal-context").join(format!("{id}.png")),
                    ])?;
                    let (lh, lw, v) = read_index_png(&p)?;
                    expect_size(&p, (lh, lw), &image)?;
                    LabelMap {
                        h,
                        w,
                        c: 1,
                        data: v
                            .into_iter()
                            .map(|v| {
                                if (v as usize) < Self::SEMSEG_CLASSES {
                                    v as f32
                                } else {
                                    IGNORE
                                }
                            })
                            .collect(),
                    }
                }
                Task::Parts => self.parts(id, &image)?,
                Task::Saliency => {
                    let p = r.join("sal_distill").join(format!("{id}.png"));
                    let g = image::open(&p)
                        .map_err(|e| Error::Image {
                            path: p.clone(),
                            msg: e.to_string(),
                        })?
                        .to_luma8();
                    expect_size(&p, (g.height() as usize, g.width() as usize), &image)?;
                    LabelMap {
                        h,
                        w,
                        c: 1,
                        data: g
                            .into_raw()
                            .into_iter()
                            .map(|v| (v as f32 / 255.0 > 0.5) as u8 as f32)
                            .collect(),
                    }
                }
                Task::Edge | Task::Normals => {
                    if label_map.is_none() {
                        label_map = Some(self.label_map_mat(id)?);
                    }
                    let (p, lh, lw, lm) = label_map.as_ref().expect("set above");
                    expect_size(p, (*lh, *lw), &image)?;
                    if t == Task::Edge {
                        let b = label_boundaries(lm, h, w);
                        LabelMap {
                            h,
                            w,
                            c: 1,
                            data: b.data.iter().map(|&v| v as u8 as f32).collect(),
                        }
                    } else {
                        let p = r.join("normals_distill").join(format!("{id}.png"));
                        let mut n = read_normals_png(&p, &image)?;
                        if let Some(keep) = &self.normals_classes {
                            for (px, &c) in lm.iter().enumerate() {
                                if !keep.contains(&(c as u32)) {
                                    n.data[3 * px..3 * px + 3].fill(0.0);
                                }
                            }
                        }
                        n
                    }
                }
                Task::Depth | Task::Classify => unreachable!("rejected in open"),
            };
            labels.insert(t, m);
        }
        Ok(DenseSample {
            id: id.clone(),
            image,
            labels,
        })
    }
}

/// NYUD-v2, MTI-Net/ATRC layout (`NYUD_MT`).
pub struct Nyud {
    root: PathBuf,
    ids: Vec<String>,
    tasks: Vec<Task>,
}

impl Nyud {
    pub const SEMSEG_CLASSES: usize = 40;

    pub fn open(root: &Path, split: &str, tasks: &[Task]) -> Result<Self> {
        if let Some(t) = tasks
            .iter()
            .find(|t| matches!(t, Task::Parts | Task::Saliency | Task::Classify))
        {
            return Err(Error::Invalid(format!(
                "NYUD-v2 has no {} labels",
                t.name()
            )));
        }
        let ids = read_list(&root.join("gt_sets").join(format!("{split}.txt")))?;
        Ok(Nyud {
            root: root.to_path_buf(),
            ids,
            tasks: tasks.to_vec(),
        })
    }
}

impl DenseDataset for Nyud {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }
    fn tasks(&self) -> &[Task] {
        &self.tasks
    }
    fn classes(&self, t: Task) -> usize {
        if t == Task::Semseg {
            Self::SEMSEG_CLASSES
        } else {
            1
        }
    }
    fn root(&self) -> &Path {
        &self.root
    }

    fn load(&self, i: usize) -> Result<DenseSample> {
        let id = &self.ids[i];
        let r = &self.root;
        let ip = first_existing(&[
            r.join("images").join(format!("{id}.png")),
            r.join("images").join(format!("{id}.jpg")),
        ])?;
        let image = read_rgb(&ip)?;
        let (h, w) = (image.height() as usize, image.width() as usize);
        let mut labels = BTreeMap::new();
        for &t in &self.tasks {
            let m = match t {
                Task::Semseg => {
                    let p = r.join("segmentation").join(format!("{id}.png"));
                    let (lh, lw, v) = read_index_png(&p)?;
                    expect_size(&p, (lh, lw), &image)?;
                    // Stored 1..=40 with 0 = unlabelled.
                    let data = v
                        .into_iter()
                        .map(|v| {
                            if v >= 1 && (v as usize) <= Self::SEMSEG_CLASSES {
                                (v - 1) as f32
                            } else {
                                IGNORE
                            }
                        })
                        .collect();
                    LabelMap { h, w, c: 1, data }
                }
                Task::Edge => {
                    let p = r.join("edge").join(format!("{id}.png"));
                    let (lh, lw, v) = read_index_png(&p)?;
                    expect_size(&p, (lh, lw), &image)?;
                    let data = v.into_iter().map(|v| (v > 0) as u8 as f32).collect();
                    LabelMap { h, w, c: 1, data }
                }
                Task::Normals => {
                    read_normals_png(&r.join("normals").join(format!("{id}.png")), &image)?
                }
                Task::Depth => {
                    let p = r.join("depth").join(format!("{id}.npy"));
                    let (shape, data) = crate::data::npy::read_f32(&p)?;
                    if shape.iter().product::<usize>() != h * w
                        || shape.iter().filter(|&&d| d != 1).count() > 2
                    {
                        return Err(bad(
                            &p,
                            format!("depth has shape {shape:?}, the image is {h}x{w}"),
                        ));
                    }
                    LabelMap { h, w, c: 1, data }
                }
                Task::Parts | Task::Saliency | Task::Classify => unreachable!("rejected in open"),
            };
            labels.insert(t, m);
        }
        Ok(DenseSample {
            id: id.clone(),
            image,
            labels,
        })
    }
}

/// Open a data set by name: `pascal` / `pascal-context` or `nyud` / `nyud-v2`.
pub fn open_dataset(
    kind: &str,
    root: &Path,
    split: &str,
    tasks: &[Task],
) -> Result<Box<dyn DenseDataset>> {
    match kind.to_ascii_lowercase().as_str() {
        "pascal" | "pascal-context" | "pascalcontext" => {
            Ok(Box::new(PascalContext::open(root, split, tasks)?))
        }
        "nyud" | "nyud-v2" | "nyudv2" => Ok(Box::new(Nyud::open(root, split, tasks)?)),
        k => Err(Error::Invalid(format!(
            "unknown data set {k:?} (pascal-context or nyud-v2)"
        ))),
    }
}
