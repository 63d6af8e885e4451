//! Teacher-feature cache: run the teachers once over a data set and store the distilled levels,
//! so training reads features instead of recomputing every teacher at every step.
//!
//! Layout of a cache folder: `t{t}_l{k}.bin` holds teacher t's level k for every item as
//! `[C, h, w]` little-endian values of the cache dtype, items ordered `variant * N + image`;
//! `valid.bin` one byte per item (0 = unreadable image); `manifest.json` describes it and is
//! written last, after every data file is complete and renamed into place, so a folder with a
//! manifest is always a complete cache. Files are memory-mapped when training.
//!
//! Crops: item (v, i) uses the RandomResizedCrop drawn from (seed, v, i); a training run with
//! `crop_variants = K` draws epoch e's crops from (seed, e mod K, i), the same crops.

use crate::data::augment::{crop_to_tensor, sample_rng, RandomResizedCrop};
use crate::data::{ImageSet, ImageSource};
use crate::error::{Error, Result};
use crate::teacher::{parse_teacher_arg, Teacher};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedTeacher {
    /// short name (metrics, specs)
    pub name: String,
    /// folder or hub id the teacher was loaded from (caches written before names existed
    /// only have `name`, which then held the id)
    #[serde(default)]
    pub id: String,
    pub size: usize,
    pub dim: usize,
    /// (h, w) of the stored maps
    pub grid: (usize, usize),
    pub levels: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub teachers: Vec<CachedTeacher>,
    pub images: PathBuf,
    pub n_images: usize,
    pub variants: u64,
    pub seed: u64,
    /// "f32", "f16" or "bf16"
    pub dtype: String,
    /// names of the data set's items, in order (checked when training)
    pub items: Vec<String>,
    /// what produced the teacher inputs besides seed and variant (stage 2: data set, split,
    /// input size and augmentation, as JSON); empty for stage-1 crops
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipe: String,
}

impl CachedTeacher {
    pub fn source(&self) -> &str {
        if self.id.is_empty() {
            &self.name
        } else {
            &self.id
        }
    }
}

impl Manifest {
    /// The teachers as the student sees them.
    pub fn slots(&self) -> Vec<crate::models::student::TeacherSlot> {
        self.teachers
            .iter()
            .map(|t| crate::models::student::TeacherSlot {
                name: t.name.clone(),
                dim: t.dim,
            })
            .collect()
    }

    /// The teachers as a run records them (`NAME=ID`).
    pub fn teacher_args(&self) -> Vec<String> {
        self.teachers
            .iter()
            .map(|t| format!("{}={}", t.name, t.source()))
            .collect()
    }

    /// A run's teacher arguments (`NAME=ID` or ids) must name the cached teachers' sources in
    /// order; the message says what differs.
    pub fn check_teachers(&self, args: &[String]) -> std::result::Result<(), String> {
        let want: Vec<&str> = args.iter().map(|a| parse_teacher_arg(a).1).collect();
        let have: Vec<&str> = self.teachers.iter().map(CachedTeacher::source).collect();
        if want == have {
            Ok(())
        } else {
            Err(format!("cache holds teachers {have:?}, not {want:?}"))
        }
    }
}

/// What a cache is built over: named items and, for each (variant, item), every teacher's input.
pub trait CacheItems: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn name(&self, i: usize) -> String;
    /// where the items come from (recorded in the manifest)
    fn root(&self) -> PathBuf;
    /// input (h, w) the teacher is fed
    fn input_hw(&self, teacher: &Teacher) -> (usize, usize);
    /// per teacher its input `[3, h, w]` for item i of variant v; None = unreadable (stored as
    /// zeros and marked invalid)
    fn inputs(&self, teachers: &[Teacher], v: u64, i: usize) -> Option<Vec<Tensor>>;
    /// see [`Manifest::recipe`]
    fn recipe(&self) -> String {
        String::new()
    }
}

/// Stage-1 items: an image folder/archive with RandomResizedCrop + flip from (seed, v, i).
struct CropItems {
    data: ImageSet,
    seed: u64,
}

impl CacheItems for CropItems {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn name(&self, i: usize) -> String {
        self.data.name(i)
    }
    fn root(&self) -> PathBuf {
        self.data.root()
    }
    fn input_hw(&self, t: &Teacher) -> (usize, usize) {
        (t.size(), t.size())
    }
    fn inputs(&self, teachers: &[Teacher], v: u64, i: usize) -> Option<Vec<Tensor>> {
        let img = self.data.load(i).ok()?;
        let crop = RandomResizedCrop::default()
            .sample(img.dimensions(), &mut sample_rng(self.seed, v, i as u64));
        teachers
            .iter()
            .map(|t| {
                let (m, s) = t.norm();
                crop_to_tensor(&img, &crop, t.size(), m, s, &Device::Cpu)
            })
            .collect::<Result<Vec<_>>>()
            .ok()
    }
}

fn dtype_of(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => {
            return Err(Error::Invalid(format!(
                "cache dtype {s:?} (f32, f16 or bf16)"
            )))
        }
    })
}

fn data_file(dir: &Path, t: usize, k: usize) -> PathBuf {
    dir.join(format!("t{t}_l{k}.bin"))
}

/// Options for building a cache.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub image_size: usize,
    pub variants: u64,
    pub seed: u64,
    pub dtype: String,
    pub batch_size: usize,
    pub progress: bool,
}

/// Run `teachers` over every image x variant of `images` (stage-1 crops) and write the cache
/// into `out`.
pub fn build(
    teachers: &[Teacher],
    images: &Path,
    out: &Path,
    o: &BuildOptions,
) -> Result<Manifest> {
    let items = CropItems {
        data: ImageSet::open(images)?,
        seed: o.seed,
    };
    build_from(teachers, &items, out, o)
}

/// [`build`] for teachers named as on the command line (folders or hub ids, `name=id`),
/// loaded with `load` (device, compute dtype).
pub fn build_for(
    teacher_args: &[String],
    images: &Path,
    out: &Path,
    o: &BuildOptions,
    load: &crate::models::LoadOptions,
) -> Result<Manifest> {
    let teachers = Teacher::load_all(teacher_args, o.image_size, &[], load)?;
    build(&teachers, images, out, o)
}

/// Run `teachers` over every item x variant of `data` and write the cache into `out`.
pub fn build_from(
    teachers: &[Teacher],
    data: &dyn CacheItems,
    out: &Path,
    o: &BuildOptions,
) -> Result<Manifest> {
    let dtype = dtype_of(&o.dtype)?;
    if o.variants == 0 || o.batch_size == 0 {
        return Err(Error::Invalid(
            "variants and batch size must be positive".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join("manifest.json");
    if manifest_path.exists() {
        return Err(Error::BadInput {
            path: manifest_path,
            msg: "a cache already exists here; choose another folder".into(),
        });
    }
    let n = data.len();
    // [teacher][level] -> (temporary path, writer)
    let mut writers: Vec<Vec<(PathBuf, std::io::BufWriter<std::fs::File>)>> = Vec::new();
    let mut cached = Vec::new();
    for (t, teacher) in teachers.iter().enumerate() {
        let info = teacher.encoder.info();
        let (gh, gw) = info.grid(data.input_hw(teacher));
        cached.push(CachedTeacher {
            name: teacher.name.clone(),
            id: teacher.id.clone(),
            size: teacher.size(),
            dim: info.width,
            grid: (gh, gw),
            levels: teacher.levels.clone(),
        });
        let mut per = Vec::new();
        for k in 0..teacher.levels.len() {
            let p = data_file(out, t, k).with_extension("bin.tmp");
            let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            per.push((p, std::io::BufWriter::new(f)));
        }
        writers.push(per);
    }
    let mut valid = Vec::with_capacity(n * o.variants as usize);
    let total = n as u64 * o.variants;
    let bar = if o.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    for v in 0..o.variants {
        for chunk in (0..n).collect::<Vec<_>>().chunks(o.batch_size) {
            // Decode + crop in parallel; an unreadable image stores zeros and valid = 0.
            let inputs: Vec<Option<Vec<Tensor>>> = chunk
                .par_iter()
                .map(|&i| data.inputs(teachers, v, i))
                .collect();
            for (j, inp) in inputs.iter().enumerate() {
                valid.push(inp.is_some() as u8);
                if inp.is_none() {
                    tracing::warn!("cache: unreadable image {}", data.name(chunk[j]));
                }
            }
            for (t, teacher) in teachers.iter().enumerate() {
                let ok: Vec<Tensor> = inputs.iter().flatten().map(|x| x[t].clone()).collect();
                let feats = if ok.is_empty() {
                    Vec::new()
                } else {
                    teacher.features(&Tensor::stack(&ok, 0)?)?
                };
                let (gh, gw) = cached[t].grid;
                let per = cached[t].dim * gh * gw;
                for (k, (p, w)) in writers[t].iter_mut().enumerate() {
                    let mut row = 0;
                    for inp in &inputs {
                        let bytes = match inp {
                            Some(_) => {
                                let f = feats[k].get(row)?;
                                row += 1;
                                to_bytes(&f, dtype)?
                            }
                            None => vec![0u8; per * dtype.size_in_bytes()],
                        };
                        w.write_all(&bytes).map_err(|e| Error::io(&*p, e))?;
                    }
                }
            }
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    for (t, per) in writers.into_iter().enumerate() {
        for (k, (p, w)) in per.into_iter().enumerate() {
            let f = w.into_inner().map_err(|e| Error::io(&p, e.to_string()))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
            std::fs::rename(&p, data_file(out, t, k)).map_err(|e| Error::io(&p, e))?;
        }
    }
    let vp = out.join("valid.bin");
    std::fs::write(&vp, &valid).map_err(|e| Error::io(&vp, e))?;
    let manifest = Manifest {
        format: "distillery-teacher-cache-v1".into(),
        teachers: cached,
        images: data.root(),
        n_images: n,
        variants: o.variants,
        seed: o.seed,
        dtype: o.dtype.clone(),
        items: (0..n).map(|i| data.name(i)).collect(),
        recipe: data.recipe(),
    };
    let text = serde_json::to_string(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = out.join("manifest.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    Ok(manifest)
}

fn to_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(Error::Invalid(format!("cache dtype {other:?}"))),
    })
}

/// An opened cache, memory-mapped.
pub struct FeatureCache {
    pub manifest: Manifest,
    dtype: DType,
    /// [teacher][level]
    maps: Vec<Vec<memmap2::Mmap>>,
    valid: Vec<u8>,
}

impl FeatureCache {
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mp).map_err(|e| Error::BadInput {
            path: mp.clone(),
            msg: format!("not a complete teacher cache: {e}"),
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: mp.clone(),
            msg: e.to_string(),
        })?;
        let dtype = dtype_of(&manifest.dtype)?;
        let items = manifest.n_images * manifest.variants as usize;
        let mut maps = Vec::new();
        for (t, ct) in manifest.teachers.iter().enumerate() {
            let mut per = Vec::new();
            for k in 0..ct.levels.len() {
                let p = data_file(dir, t, k);
                let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
                let want = (items * ct.dim * ct.grid.0 * ct.grid.1 * dtype.size_in_bytes()) as u64;
                let got = f.metadata().map_err(|e| Error::io(&p, e))?.len();
                if got != want {
                    return Err(Error::BadInput {
                        path: p,
                        msg: format!("has {got} bytes, the manifest implies {want}"),
                    });
                }
                // SAFETY: read-only mapping of a file this process does not modify; a cache
                // must not be rewritten while a run reads it.
                per.push(unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?);
            }
            maps.push(per);
        }
        let vp = dir.join("valid.bin");
        let valid = std::fs::read(&vp).map_err(|e| Error::io(&vp, e))?;
        if valid.len() != items {
            return Err(Error::BadInput {
                path: vp,
                msg: format!("has {} entries for {items} items", valid.len()),
            });
        }
        Ok(Self {
            manifest,
            dtype,
            maps,
            valid,
        })
    }

    pub fn is_valid(&self, variant: u64, image: usize) -> bool {
        self.valid[variant as usize * self.manifest.n_images + image] != 0
    }

    /// Features of (variant, image) items for teacher t, level k: `[B, C, h, w]` f32.
    pub fn gather(&self, t: usize, k: usize, items: &[(u64, usize)]) -> Result<Tensor> {
        let ct = &self.manifest.teachers[t];
        let per = ct.dim * ct.grid.0 * ct.grid.1;
        let bytes = per * self.dtype.size_in_bytes();
        let map = &self.maps[t][k];
        let mut buf = Vec::with_capacity(items.len() * bytes);
        for &(v, i) in items {
            let idx = v as usize * self.manifest.n_images + i;
            buf.extend_from_slice(&map[idx * bytes..(idx + 1) * bytes]);
        }
        let shape = (items.len(), ct.dim, ct.grid.0, ct.grid.1);
        let t = Tensor::from_raw_buffer(
            &buf,
            self.dtype,
            &[shape.0, shape.1, shape.2, shape.3],
            &Device::Cpu,
        )?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Features of (variant, image) items for every teacher and level: `[teacher][level]`.
    pub fn gather_all(&self, items: &[(u64, usize)]) -> Result<Vec<Vec<Tensor>>> {
        self.manifest
            .teachers
            .iter()
            .enumerate()
            .map(|(t, ct)| {
                (0..ct.levels.len())
                    .map(|k| self.gather(t, k, items))
                    .collect()
            })
            .collect()
    }
}
