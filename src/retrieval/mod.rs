//! Retrieval of task-related transfer sets (SPEC.md section 8, "query-balanced"): every
//! labelled image is a query, and each query takes the same number k of distinct pool images
//! by embedding similarity.
//!
//! - [`scan`]: exact inner-product search, the pool scanned in blocks (one matrix product
//!   per block, as a flat index does) with a streaming top-m per query; scans of disjoint parts
//!   of a pool [merge](Candidates::merge) into the scan of the whole.
//! - [`balanced`]: the query-balanced assignment: candidate (query, image, score) pairs are
//!   taken best score first; an image goes to the first (best-scoring) query that claims it
//!   while that query still needs images, so the others move on to their next neighbours.
//!   When a query runs out of candidates, the search is redone with twice as many, up to the
//!   whole pool, so the total is exactly N x k whenever the pool holds N x k usable images.
//! - [`Exclude`]: pool images whose cosine to any evaluation image reaches a threshold are
//!   dropped during the scan, so the transfer set does not leak the test set.
//! - [`store`]: embedding folders (LAION / clip-retrieval layout); [`embed`] writes them,
//!   [`retrieve`] runs the whole selection and writes the transfer list.
//!
//! Embeddings are rows of f32, L2-normalised by the caller (inner product = cosine).

use crate::error::{Error, Result};
use candle_core::Device;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

pub mod embed;
pub mod retrieve;
pub mod store;

/// A row-major matrix of embeddings.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl<'a> Rows<'a> {
    pub fn new(data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(Error::Invalid(format!(
                "{} values are not rows of {dim}",
                data.len()
            )));
        }
        Ok(Self { data, dim })
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// A pool of embedding rows that can be scanned in blocks: one or more segments of
/// consecutive pool ids (an in-memory matrix is one segment from id 0; an embedding folder
/// has one per shard, see [`store::pool_id`]).
pub trait PoolScan: Sync {
    fn dim(&self) -> usize;
    /// (id of the first row, rows) of each segment, ids ascending
    fn segments(&self) -> Vec<(u64, usize)>;
    /// Rows `start ..` of `segment` as f32 into `out` (`out.len() / dim` rows).
    fn read(&self, segment: usize, start: usize, out: &mut [f32]);

    fn rows(&self) -> usize {
        self.segments().iter().map(|s| s.1).sum()
    }
}

impl PoolScan for Rows<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn segments(&self) -> Vec<(u64, usize)> {
        vec![(0, self.len())]
    }
    fn read(&self, _segment: usize, start: usize, out: &mut [f32]) {
        let s = start * self.dim;
        out.copy_from_slice(&self.data[s..s + out.len()]);
    }
}

/// A scored pool image; ordered by score, ties by the lower id first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub index: u64,
}

impl Eq for Hit {}

impl Ord for Hit {
    /// "Greater" = better: higher score, then lower id.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.index.cmp(&self.index))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Pool rows scanned per block.
const BLOCK: usize = 8192;
/// Rows read (and converted to f32) per task within a block.
const READ_CHUNK: usize = 512;

/// Where and how a scan runs.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// the device the block products run on
    pub device: Device,
    /// advanced by the rows of each block scanned (hidden when not shown)
    pub progress: indicatif::ProgressBar,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            progress: indicatif::ProgressBar::hidden(),
        }
    }
}

impl ScanOptions {
    /// A scan on `device` with a progress bar (rows/s) when `show`.
    pub fn new(device: &Device, show: bool) -> Self {
        let progress = crate::train::progress_bar(0, 0, show);
        Self {
            device: device.clone(),
            progress,
        }
    }
}

/// Evaluation embeddings whose near-duplicates (cosine >= threshold) leave the pool.
#[derive(Clone, Copy, Debug)]
pub struct Exclude<'a> {
    pub evals: Rows<'a>,
    pub threshold: f32,
}

/// What one scan of (part of) a pool found: the best `m` candidates of each query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    /// per query, best first, at most `m`
    pub hits: Vec<Vec<Hit>>,
    pub m: usize,
    /// content hash of every candidate's row (rows equal bit for bit share one)
    pub hashes: HashMap<u64, u64>,
    /// pool ids dropped as near-duplicates of evaluation rows
    pub excluded: HashSet<u64>,
    /// pool rows scanned
    pub scanned: usize,
}

/// FNV-1a over a row's bits.
fn row_hash(row: &[f32]) -> u64 {
    crate::data::npy::fnv1a(row.iter().flat_map(|v| v.to_bits().to_le_bytes()))
}

/// `a [p x d] . b [n x d]^T` on `device` as a row-major `[p x n]` f32 vector.
fn scores(a: &candle_core::Tensor, b: &[f32], n: usize, device: &Device) -> Result<Vec<f32>> {
    let d = b.len() / n.max(1);
    let b = candle_core::Tensor::from_slice(b, (n, d), &Device::Cpu)?.to_device(device)?;
    Ok(a.matmul(&b.t()?)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn check_dims(what: &str, a: usize, pool: usize) -> Result<()> {
    if a != pool {
        return Err(Error::Invalid(format!(
            "{what} are {a}-d, the pool is {pool}-d"
        )));
    }
    Ok(())
}

/// Scan the pool once: every query's best `m` rows (never one in `skip` or near-duplicate of
/// an evaluation row), with the hashes of the candidates' rows. The pool is read in blocks
/// (in parallel), each block scored with one matrix product on `device`, and a bounded heap
/// per query keeps the best `m`.
pub fn scan(
    queries: Rows,
    pool: &dyn PoolScan,
    m: usize,
    skip: &HashSet<u64>,
    exclude: Option<&Exclude>,
    opts: &ScanOptions,
) -> Result<Candidates> {
    let device = &opts.device;
    let d = pool.dim();
    check_dims("queries", queries.dim, d)?;
    if let Some(x) = exclude {
        check_dims("evaluation embeddings", x.evals.dim, d)?;
    }
    let q = queries.len();
    let on = |r: Rows| -> Result<candle_core::Tensor> {
        Ok(
            candle_core::Tensor::from_slice(r.data, (r.len(), r.dim), &Device::Cpu)?
                .to_device(device)?,
        )
    };
    let qt = if q > 0 { Some(on(queries)?) } else { None };
    let et = match exclude {
        Some(x) if !x.evals.is_empty() => Some((on(x.evals)?, x.evals.len(), x.threshold)),
        _ => None,
    };
    let mut heaps: Vec<BinaryHeap<std::cmp::Reverse<Hit>>> =
        (0..q).map(|_| BinaryHeap::with_capacity(m + 1)).collect();
    let mut excluded = HashSet::new();
    let mut scanned = 0;
    let mut buf: Vec<f32> = Vec::new();
    let t0 = std::time::Instant::now();
    opts.progress.set_length(pool.rows() as u64);
    opts.progress.set_position(0);
    for (seg, &(base, rows)) in pool.segments().iter().enumerate() {
        let mut start = 0;
        while start < rows {
            let end = (start + BLOCK).min(rows);
            let n = end - start;
            buf.clear();
            buf.resize(n * d, 0.0);
            buf.par_chunks_mut(READ_CHUNK * d)
                .enumerate()
                .for_each(|(c, out)| pool.read(seg, start + c * READ_CHUNK, out));
            let mut block_skip: HashSet<u64> = HashSet::new();
            if let Some((e, ne, threshold)) = &et {
                let s = scores(e, &buf, n, device)?;
                for r in 0..*ne {
                    for (j, &v) in s[r * n..(r + 1) * n].iter().enumerate() {
                        if v >= *threshold {
                            block_skip.insert(base + (start + j) as u64);
                        }
                    }
                }
            }
            let s = match &qt {
                Some(qt) => scores(qt, &buf, n, device)?,
                None => Vec::new(),
            };
            heaps.par_iter_mut().enumerate().for_each(|(qi, heap)| {
                for (j, &score) in s[qi * n..(qi + 1) * n].iter().enumerate() {
                    let index = base + (start + j) as u64;
                    let hit = Hit { score, index };
                    let room = heap.len() < m;
                    if !room && heap.peek().is_none_or(|w| hit <= w.0) {
                        continue;
                    }
                    if skip.contains(&index) || block_skip.contains(&index) {
                        continue;
                    }
                    if !room {
                        heap.pop();
                    }
                    heap.push(std::cmp::Reverse(hit));
                }
            });
            excluded.extend(block_skip);
            scanned += n;
            opts.progress.inc(n as u64);
            let rate = scanned as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            opts.progress.set_message(format!("{rate:.0} pool rows/s"));
            start = end;
        }
    }
    let hits: Vec<Vec<Hit>> = heaps
        .into_iter()
        .map(|h| {
            let mut v: Vec<Hit> = h.into_iter().map(|r| r.0).collect();
            v.sort_by(|a, b| b.cmp(a));
            v
        })
        .collect();
    let hashes = candidate_hashes(pool, &hits)?;
    Ok(Candidates {
        hits,
        m,
        hashes,
        excluded,
        scanned,
    })
}

/// Content hashes of the rows of every candidate.
fn candidate_hashes(pool: &dyn PoolScan, hits: &[Vec<Hit>]) -> Result<HashMap<u64, u64>> {
    let segs = pool.segments();
    let ids: HashSet<u64> = hits.iter().flatten().map(|h| h.index).collect();
    let ids: Vec<u64> = ids.into_iter().collect();
    ids.par_iter()
        .map(|&id| {
            let s = segs.partition_point(|&(b, _)| b <= id).saturating_sub(1);
            let (base, rows) = segs[s];
            let r = (id - base) as usize;
            if id < base || r >= rows {
                return Err(Error::Invalid(format!("pool id {id} is in no segment")));
            }
            let mut v = vec![0.0; pool.dim()];
            pool.read(s, r, &mut v);
            Ok((id, row_hash(&v)))
        })
        .collect()
}

impl Candidates {
    /// Combine scans of disjoint parts of one pool (same queries, same `m`): each query's best
    /// `m` of the union; exclusions and hashes united.
    pub fn merge(parts: Vec<Candidates>) -> Result<Candidates> {
        let mut it = parts.into_iter();
        let Some(mut acc) = it.next() else {
            return Err(Error::Invalid("nothing to merge".into()));
        };
        for p in it {
            if p.hits.len() != acc.hits.len() || p.m != acc.m {
                return Err(Error::Invalid(format!(
                    "partial scans differ: {} queries x {} candidates vs {} x {}",
                    acc.hits.len(),
                    acc.m,
                    p.hits.len(),
                    p.m
                )));
            }
            for (a, b) in acc.hits.iter_mut().zip(p.hits) {
                a.extend(b);
                a.sort_by(|x, y| y.cmp(x));
                a.truncate(acc.m);
            }
            acc.excluded.extend(p.excluded);
            acc.hashes.extend(p.hashes);
            acc.scanned += p.scanned;
        }
        let kept: HashSet<u64> = acc.hits.iter().flatten().map(|h| h.index).collect();
        acc.hashes.retain(|id, _| kept.contains(id));
        Ok(acc)
    }

    /// Candidates whose row repeats a lower id's row exactly (the same image stored twice):
    /// they count once.
    pub fn duplicates(&self) -> HashSet<u64> {
        let mut first: HashMap<u64, u64> = HashMap::new();
        for (&id, &h) in &self.hashes {
            first
                .entry(h)
                .and_modify(|f| *f = (*f).min(id))
                .or_insert(id);
        }
        self.hashes
            .iter()
            .filter(|(id, h)| first.get(h) != Some(id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Query-balanced selection over these candidates: `Ok(Some(picks))` when every query gets
    /// `k`; `Ok(None)` when some query ran short while some candidate list was cut at `m` (a
    /// wider scan may fill it); an error when the lists hold the whole usable pool and still
    /// fall short.
    pub fn select(&self, k: usize) -> Result<Option<Vec<Pick>>> {
        let dups = self.duplicates();
        let lists: Vec<Vec<Hit>> = self
            .hits
            .iter()
            .map(|hs| {
                hs.iter()
                    .filter(|h| !dups.contains(&h.index))
                    .copied()
                    .collect()
            })
            .collect();
        let got = assign(&lists, k);
        if got.iter().any(|g| g.len() < k) {
            if self.hits.iter().any(|h| h.len() >= self.m) {
                return Ok(None);
            }
            return Err(Error::Invalid(format!(
                "the pool could not give each of {} queries k = {k} distinct images",
                self.hits.len()
            )));
        }
        Ok(Some(
            got.into_iter()
                .enumerate()
                .flat_map(|(q, hs)| {
                    hs.into_iter().enumerate().map(move |(r, h)| Pick {
                        query: q,
                        index: h.index,
                        rank: r + 1,
                        score: h.score,
                    })
                })
                .collect(),
        ))
    }
}

/// One selected pool image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub query: usize,
    pub index: u64,
    /// 1-based rank within its query (by score)
    pub rank: usize,
    pub score: f32,
}

/// Assign candidates to queries, best pair first, at most `k` per query and each image once.
/// Returns the picks of each query, best first.
fn assign(cands: &[Vec<Hit>], k: usize) -> Vec<Vec<Hit>> {
    let mut pairs: Vec<(Hit, usize)> = cands
        .iter()
        .enumerate()
        .flat_map(|(q, hs)| hs.iter().map(move |h| (*h, q)))
        .collect();
    // best score first; ties: lower image id, then lower query
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut used: HashSet<u64> = HashSet::new();
    let mut out: Vec<Vec<Hit>> = vec![Vec::new(); cands.len()];
    for (h, q) in pairs {
        if out[q].len() < k && !used.contains(&h.index) {
            used.insert(h.index);
            out[q].push(h);
        }
    }
    out
}

/// The result of [`balanced`].
#[derive(Clone, Debug)]
pub struct Selection {
    pub picks: Vec<Pick>,
    /// pool ids excluded as near-duplicates of evaluation rows
    pub excluded: HashSet<u64>,
    /// exact duplicates among the candidates (counted once)
    pub duplicates: usize,
    /// pool scans made (the search widens when collisions starve a query)
    pub scans: usize,
    /// candidates per query in the last scan
    pub m: usize,
}

/// Query-balanced selection (see the module doc): exactly `k` distinct pool images per query,
/// never one in `skip` or a near-duplicate of an evaluation row; exact duplicates count once.
/// Errors when the pool cannot give every query k images.
pub fn balanced(
    queries: Rows,
    pool: &dyn PoolScan,
    k: usize,
    skip: &HashSet<u64>,
    exclude: Option<&Exclude>,
    opts: &ScanOptions,
) -> Result<Selection> {
    let rows = pool.rows();
    let need = queries.len() * k;
    if k == 0 || need > rows {
        return Err(Error::Invalid(format!(
            "{} queries x k = {k} need {need} pool images, the pool has {rows}",
            queries.len()
        )));
    }
    let mut m = (2 * k).max(k + 8).min(rows);
    let mut skip = skip.clone();
    let mut excluded = HashSet::new();
    let mut scans = 0;
    loop {
        let first = scans == 0;
        let mut c = scan(queries, pool, m, &skip, exclude.filter(|_| first), opts)?;
        scans += 1;
        if first {
            excluded = std::mem::take(&mut c.excluded);
            skip.extend(excluded.iter().copied());
        }
        match c.select(k)? {
            Some(picks) => {
                return Ok(Selection {
                    picks,
                    duplicates: c.duplicates().len(),
                    excluded,
                    scans,
                    m,
                })
            }
            None if m < rows => m = (2 * m).min(rows),
            None => {
                return Err(Error::Invalid(format!(
                    "the pool could not give each of {} queries k = {k} distinct images",
                    queries.len()
                )))
            }
        }
    }
}

/// Pool rows whose cosine to any evaluation row is at least `threshold`.
pub fn near_duplicates(evals: Rows, pool: &dyn PoolScan, threshold: f32) -> Result<HashSet<u64>> {
    let none = Rows {
        data: &[],
        dim: evals.dim,
    };
    let x = Exclude { evals, threshold };
    Ok(scan(
        none,
        pool,
        1,
        &HashSet::new(),
        Some(&x),
        &ScanOptions::default(),
    )?
    .excluded)
}

/// `k` for a total `budget` over `queries` queries (the largest k with queries x k <= budget).
pub fn k_for_budget(budget: usize, queries: usize) -> Result<usize> {
    if queries == 0 || budget < queries {
        return Err(Error::Invalid(format!(
            "a budget of {budget} cannot give each of {queries} queries one image"
        )));
    }
    Ok(budget / queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn rows(v: &[Vec<f32>]) -> Vec<f32> {
        v.iter().flat_map(|r| unit(r)).collect()
    }

    fn cpu() -> ScanOptions {
        ScanOptions::default()
    }

    fn ids(hs: &[Hit]) -> Vec<u64> {
        hs.iter().map(|h| h.index).collect()
    }

    fn of(picks: &[Pick], q: usize) -> Vec<u64> {
        picks
            .iter()
            .filter(|x| x.query == q)
            .map(|x| x.index)
            .collect()
    }

    #[test]
    fn scan_returns_the_best_by_hand_and_skips() {
        // 2-d: queries along x and y; pool at angles 60, 0, 90, 30 degrees
        let q = rows(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let a = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
        let p = rows(&[a(60.0), a(0.0), a(90.0), a(30.0)]);
        let (q, p) = (Rows::new(&q, 2).unwrap(), Rows::new(&p, 2).unwrap());
        let c = scan(q, &p, 2, &HashSet::new(), None, &cpu()).unwrap();
        assert_eq!(ids(&c.hits[0]), [1, 3]);
        assert_eq!(ids(&c.hits[1]), [2, 0]);
        assert!((c.hits[0][1].score - 30f32.to_radians().cos()).abs() < 1e-6);
        assert_eq!(c.scanned, 4);
        let c = scan(q, &p, 1, &[1].into(), None, &cpu()).unwrap();
        assert_eq!(c.hits[0][0].index, 3);
        let bad = [1.0f32, 0.0, 0.0];
        let e = scan(
            Rows::new(&bad, 3).unwrap(),
            &p,
            1,
            &HashSet::new(),
            None,
            &cpu(),
        );
        assert!(e.unwrap_err().to_string().contains("3-d, the pool is 2-d"));
    }

    #[test]
    fn balanced_selection_resolves_collisions_by_score() {
        // Both queries like image 0 most; query 0 likes it more (cos 1 vs 0.8), so query 1
        // takes its next neighbours.
        let q = rows(&[vec![1.0, 0.0, 0.0], vec![0.8, 0.6, 0.0]]);
        let p = rows(&[
            vec![1.0, 0.0, 0.0], // 0: q0 1.0, q1 0.8
            vec![0.9, 0.0, 0.1], // 1: q0 0.994, q1 0.79
            vec![0.0, 1.0, 0.0], // 2: q1 0.6
            vec![0.6, 0.8, 0.0], // 3: q1 0.96
            vec![0.0, 0.0, 1.0], // 4: nobody's
            vec![1.0, 0.0, 0.0], // 5: exact duplicate of 0: counts once
        ]);
        let (q, p) = (Rows::new(&q, 3).unwrap(), Rows::new(&p, 3).unwrap());
        let s = balanced(q, &p, 2, &HashSet::new(), None, &cpu()).unwrap();
        assert_eq!(of(&s.picks, 0), vec![0, 1]);
        // q1's order: 3 (0.96), then 1 (0.79) is taken by q0, 0 and 5 taken/duplicate, so 2
        assert_eq!(of(&s.picks, 1), vec![3, 2]);
        assert_eq!(s.picks.len(), 4);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.picks.iter().find(|x| x.index == 2).unwrap().rank, 2);
        // excluding image 1 pushes query 0 to its next free neighbour: 2 (cos 0) beats 4
        // (cos 0) on the lower id, but q1 claims 2 with 0.6 first, so q0 gets 4
        let s = balanced(q, &p, 2, &[1].into(), None, &cpu()).unwrap();
        assert_eq!(of(&s.picks, 0), vec![0, 4]);
        // 2 queries x 3 = 6 rows, but row 5 repeats row 0: only 5 distinct images
        let e = balanced(q, &p, 3, &HashSet::new(), None, &cpu())
            .unwrap_err()
            .to_string();
        assert!(e.contains("could not give each of 2 queries k = 3"), "{e}");
        let e = balanced(q, &p, 4, &HashSet::new(), None, &cpu())
            .unwrap_err()
            .to_string();
        assert!(e.contains("need 8 pool images, the pool has 6"), "{e}");
    }

    #[test]
    fn balanced_selection_widens_the_scan_until_every_query_is_full() {
        // 3 queries all nearest to one end of 40 images, k = 12: the first scan keeps the
        // best 24 of each query, which overlap, so query 2 runs short and the scan widens.
        let q = rows(&[vec![1.0, 0.0], vec![0.99, 0.1], vec![0.98, 0.2]]);
        let p: Vec<Vec<f32>> = (0..40)
            .map(|i| vec![1.0, -(i as f32) * 0.01 - 0.5])
            .collect();
        let p = rows(&p);
        let (q, p) = (Rows::new(&q, 2).unwrap(), Rows::new(&p, 2).unwrap());
        let s = balanced(q, &p, 12, &HashSet::new(), None, &cpu()).unwrap();
        assert!(s.scans >= 2, "{}", s.scans);
        assert_eq!(s.picks.len(), 36);
        for qi in 0..3 {
            assert_eq!(of(&s.picks, qi).len(), 12);
        }
        let set: HashSet<u64> = s.picks.iter().map(|x| x.index).collect();
        assert_eq!(set.len(), 36);
        // the same result as a scan of the whole pool at once
        let all = scan(q, &p, 40, &HashSet::new(), None, &cpu()).unwrap();
        assert_eq!(all.select(12).unwrap().unwrap(), s.picks);
    }

    #[test]
    fn evaluation_near_duplicates_are_excluded_during_the_scan() {
        let e = rows(&[vec![1.0, 0.0]]);
        let p = rows(&[
            vec![1.0, 0.01],
            vec![1.0, 1.0],
            vec![0.0, 1.0],
            vec![1.0, 0.2],
        ]);
        let (e, p) = (Rows::new(&e, 2).unwrap(), Rows::new(&p, 2).unwrap());
        assert_eq!(near_duplicates(e, &p, 0.95).unwrap(), [0, 3].into());
        assert_eq!(near_duplicates(e, &p, 0.7).unwrap(), [0, 1, 3].into());
        // the query along x would take 0 and 3 first; with the evaluation image excluded it
        // gets 1 (cos 0.707) and 2 (cos 0)
        let q = rows(&[vec![1.0, 0.0]]);
        let q = Rows::new(&q, 2).unwrap();
        let x = Exclude {
            evals: e,
            threshold: 0.95,
        };
        let s = balanced(q, &p, 2, &HashSet::new(), Some(&x), &cpu()).unwrap();
        assert_eq!(of(&s.picks, 0), vec![1, 2]);
        assert_eq!(s.excluded, [0, 3].into());
        assert_eq!(k_for_budget(150_000, 1200).unwrap(), 125);
        assert!(k_for_budget(10, 20).is_err());
    }

    /// A pool split into two segments with ids as shards give them.
    struct Split<'a>(Rows<'a>, usize);

    impl PoolScan for Split<'_> {
        fn dim(&self) -> usize {
            self.0.dim
        }
        fn segments(&self) -> Vec<(u64, usize)> {
            vec![(0, self.1), (1 << 32, self.0.len() - self.1)]
        }
        fn read(&self, seg: usize, start: usize, out: &mut [f32]) {
            let o = if seg == 0 { 0 } else { self.1 };
            self.0.read(0, o + start, out)
        }
    }

    /// One segment of a [`Split`] as a pool of its own (a `--shard i/N` scan).
    struct Part<'a>(&'a Split<'a>, usize);

    impl PoolScan for Part<'_> {
        fn dim(&self) -> usize {
            self.0.dim()
        }
        fn segments(&self) -> Vec<(u64, usize)> {
            vec![self.0.segments()[self.1]]
        }
        fn read(&self, _: usize, start: usize, out: &mut [f32]) {
            self.0.read(self.1, start, out)
        }
    }

    #[test]
    fn merged_partial_scans_equal_the_whole_scan() {
        // 60 pseudo-random 4-d rows (a fixed LCG), 5 queries, an exact duplicate across the
        // two parts and an evaluation image whose neighbours are excluded
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut p: Vec<Vec<f32>> = (0..60).map(|_| (0..4).map(|_| next()).collect()).collect();
        p[45] = p[3].clone();
        let mut q: Vec<Vec<f32>> = (0..5).map(|_| (0..4).map(|_| next()).collect()).collect();
        // query 0 is row 3 itself, so both copies are its first two candidates
        q[0] = p[3].clone();
        let e = rows(&[p[20].clone(), p[50].clone()]);
        let (p, q) = (rows(&p), rows(&q));
        let (p, q, e) = (
            Rows::new(&p, 4).unwrap(),
            Rows::new(&q, 4).unwrap(),
            Rows::new(&e, 4).unwrap(),
        );
        let x = Exclude {
            evals: e,
            threshold: 0.9,
        };
        let pool = Split(p, 30);
        let none = HashSet::new();
        let whole = scan(q, &pool, 12, &none, Some(&x), &cpu()).unwrap();
        let parts: Vec<Candidates> = (0..2)
            .map(|i| scan(q, &Part(&pool, i), 12, &none, Some(&x), &cpu()).unwrap())
            .collect();
        assert!(parts.iter().all(|c| c.scanned == 30));
        let merged = Candidates::merge(parts).unwrap();
        assert_eq!(merged.hits, whole.hits);
        assert_eq!(merged.excluded, whole.excluded);
        // the evaluation images are rows 20 and 50 (id 2^32 + 20) themselves
        assert!(whole.excluded.contains(&20) && whole.excluded.contains(&((1 << 32) + 20)));
        assert_eq!(merged.duplicates(), whole.duplicates());
        assert_eq!(merged.select(2).unwrap(), whole.select(2).unwrap());
        // the duplicate pair: row 3 and row 45 (id 2^32 + 15) hash alike; the later one
        // counts as the duplicate and query 0 takes row 3 and a different second image
        let dup = (1u64 << 32) + 15;
        assert_eq!(ids(&whole.hits[0][..2]), [3, dup]);
        assert_eq!(merged.hashes[&3], merged.hashes[&dup]);
        assert_eq!(merged.duplicates(), [dup].into());
        let picks = merged.select(2).unwrap().unwrap();
        assert_eq!(of(&picks, 0)[0], 3);
        assert!(!picks.iter().any(|x| x.index == dup));
        // whole-pool ids and contents agree with the unsplit matrix
        let flat = scan(q, &p, 12, &none, Some(&x), &cpu()).unwrap();
        let remap = |id: u64| {
            if id >= 1 << 32 {
                id - (1 << 32) + 30
            } else {
                id
            }
        };
        for (a, b) in whole.hits.iter().zip(&flat.hits) {
            assert_eq!(a.iter().map(|h| remap(h.index)).collect::<Vec<_>>(), ids(b));
        }
    }
}
