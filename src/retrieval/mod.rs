//! Retrieval of task-related transfer sets (SPEC.md section 8, "query-balanced"): every
//! labelled image is a query, and each query takes the same number k of distinct pool images
//! by embedding similarity.
//!
//! - [`search`]: exact inner-product search, the pool scanned in blocks (one matrix product
//!   per block, as a flat index does) with a streaming top-m per query.
//! - [`balanced`]: the query-balanced assignment: candidate (query, image, score) pairs are
//!   taken best score first; an image goes to the first (best-scoring) query that claims it
//!   while that query still needs images, so the others move on to their next neighbours.
//!   When a query runs out of candidates, the search is redone with twice as many, up to the
//!   whole pool, so the total is exactly N x k whenever the pool holds N x k usable images.
//! - [`near_duplicates`]: pool images whose cosine to any evaluation image reaches a threshold
//!   (excluded, so the transfer set does not leak the test set).
//!
//! Embeddings are rows of f32, L2-normalised by the caller (inner product = cosine).

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

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

/// A scored pool image; ordered by score, ties by the lower index first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub index: usize,
}

impl Eq for Hit {}

impl Ord for Hit {
    /// "Greater" = better: higher score, then lower index.
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
const BLOCK: usize = 4096;

/// Scores of every query against pool rows `[start, end)`: `[queries x (end - start)]`.
fn block_scores(queries: Rows, pool: Rows, start: usize, end: usize) -> Result<Vec<f32>> {
    let (q, n, d) = (queries.len(), end - start, queries.dim);
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::from_slice(queries.data, (q, d), &dev)?;
    let b = candle_core::Tensor::from_slice(&pool.data[start * d..end * d], (n, d), &dev)?;
    Ok(a.matmul(&b.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The `m` best pool images of each query (best first), skipping pool rows in `skip`.
pub fn search(queries: Rows, pool: Rows, m: usize, skip: &HashSet<usize>) -> Result<Vec<Vec<Hit>>> {
    if queries.dim != pool.dim {
        return Err(Error::Invalid(format!(
            "queries are {}-d, the pool is {}-d",
            queries.dim, pool.dim
        )));
    }
    let q = queries.len();
    // min-heaps of the best m so far (Reverse: the worst kept is on top)
    let mut heaps: Vec<BinaryHeap<std::cmp::Reverse<Hit>>> =
        (0..q).map(|_| BinaryHeap::with_capacity(m + 1)).collect();
    let mut start = 0;
    while start < pool.len() {
        let end = (start + BLOCK).min(pool.len());
        let scores = block_scores(queries, pool, start, end)?;
        let n = end - start;
        heaps.par_iter_mut().enumerate().for_each(|(qi, heap)| {
            for (j, &score) in scores[qi * n..(qi + 1) * n].iter().enumerate() {
                let index = start + j;
                if skip.contains(&index) {
                    continue;
                }
                let hit = Hit { score, index };
                if heap.len() < m {
                    heap.push(std::cmp::Reverse(hit));
                } else if heap.peek().is_some_and(|w| hit > w.0) {
                    heap.pop();
                    heap.push(std::cmp::Reverse(hit));
                }
            }
        });
        start = end;
    }
    Ok(heaps
        .into_iter()
        .map(|h| {
            let mut v: Vec<Hit> = h.into_iter().map(|r| r.0).collect();
            v.sort_by(|a, b| b.cmp(a));
            v
        })
        .collect())
}

/// One selected pool image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub query: usize,
    pub index: usize,
    /// 1-based rank within its query (by score)
    pub rank: usize,
    pub score: f32,
}

/// Assign candidates to queries, best pair first, at most `k` per query and each image once
/// (`taken` marks images unavailable). Returns the picks of each query, best first.
fn assign(cands: &[Vec<Hit>], k: usize, taken: &HashSet<usize>) -> Vec<Vec<Hit>> {
    let mut pairs: Vec<(Hit, usize)> = cands
        .iter()
        .enumerate()
        .flat_map(|(q, hs)| hs.iter().map(move |h| (*h, q)))
        .collect();
    // best score first; ties: lower image index, then lower query
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut used: HashSet<usize> = taken.clone();
    let mut out: Vec<Vec<Hit>> = vec![Vec::new(); cands.len()];
    for (h, q) in pairs {
        if out[q].len() < k && !used.contains(&h.index) {
            used.insert(h.index);
            out[q].push(h);
        }
    }
    out
}

/// Query-balanced selection: exactly `k` distinct pool images per query (see the module doc),
/// never one in `skip`. Pool rows whose embedding equals an earlier row's exactly (the same
/// image stored twice) count once. Errors when the pool cannot give every query k images.
pub fn balanced(queries: Rows, pool: Rows, k: usize, skip: &HashSet<usize>) -> Result<Vec<Pick>> {
    let mut skip = skip.clone();
    skip.extend(exact_duplicates(pool));
    let usable = pool.len() - skip.iter().filter(|&&i| i < pool.len()).count();
    let need = queries.len() * k;
    if need > usable {
        return Err(Error::Invalid(format!(
            "{} queries x k = {k} need {need} pool images, the pool has {usable} usable",
            queries.len()
        )));
    }
    let mut m = (2 * k).max(k + 8).min(usable);
    loop {
        let cands = search(queries, pool, m, &skip)?;
        let got = assign(&cands, k, &HashSet::new());
        if got.iter().all(|g| g.len() == k) || m >= usable {
            if got.iter().any(|g| g.len() < k) {
                return Err(Error::Invalid(
                    "the pool could not give every query k images".into(),
                ));
            }
            return Ok(got
                .into_iter()
                .enumerate()
                .flat_map(|(q, hs)| {
                    hs.into_iter().enumerate().map(move |(r, h)| Pick {
                        query: q,
                        index: h.index,
                        rank: r + 1,
                        score: h.score,
                    })
                })
                .collect());
        }
        m = (2 * m).min(usable);
    }
}

/// Pool rows that repeat an earlier row's embedding bit for bit.
pub fn exact_duplicates(pool: Rows) -> HashSet<usize> {
    let mut seen: HashSet<Vec<u32>> = HashSet::new();
    let mut dup = HashSet::new();
    for i in 0..pool.len() {
        let key: Vec<u32> = pool.row(i).iter().map(|v| v.to_bits()).collect();
        if !seen.insert(key) {
            dup.insert(i);
        }
    }
    dup
}

/// Pool rows whose cosine to any evaluation row is at least `threshold`.
pub fn near_duplicates(evals: Rows, pool: Rows, threshold: f32) -> Result<HashSet<usize>> {
    if evals.dim != pool.dim {
        return Err(Error::Invalid(format!(
            "evaluation embeddings are {}-d, the pool is {}-d",
            evals.dim, pool.dim
        )));
    }
    let mut out = HashSet::new();
    let mut start = 0;
    while start < pool.len() {
        let end = (start + BLOCK).min(pool.len());
        let scores = block_scores(evals, pool, start, end)?;
        let n = end - start;
        for (i, s) in scores.iter().enumerate() {
            if *s >= threshold {
                out.insert(start + i % n);
            }
        }
        start = end;
    }
    Ok(out)
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

    #[test]
    fn search_returns_the_best_by_hand_and_skips() {
        // 2-d: queries along x and y; pool at angles 0, 30, 60, 90 degrees
        let q = rows(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let a = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
        let p = rows(&[a(60.0), a(0.0), a(90.0), a(30.0)]);
        let (q, p) = (Rows::new(&q, 2).unwrap(), Rows::new(&p, 2).unwrap());
        let hits = search(q, p, 2, &HashSet::new()).unwrap();
        assert_eq!(hits[0].iter().map(|h| h.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(hits[1].iter().map(|h| h.index).collect::<Vec<_>>(), [2, 0]);
        assert!((hits[0][1].score - 30f32.to_radians().cos()).abs() < 1e-6);
        let skip: HashSet<usize> = [1].into();
        let hits = search(q, p, 1, &skip).unwrap();
        assert_eq!(hits[0][0].index, 3);
        let bad = [1.0f32, 0.0, 0.0];
        assert!(search(Rows::new(&bad, 3).unwrap(), p, 1, &skip).is_err());
    }

    #[test]
    fn balanced_selection_resolves_collisions_by_score() {
        // Both queries like image 0 most; query 0 likes it more (cos 1 vs 0.8), so query 1
        // takes its next neighbours.
        let q = rows(&[vec![1.0, 0.0, 0.0], vec![0.8, 0.6, 0.0]]);
        let p = rows(&[
            vec![1.0, 0.0, 0.0], // 0: q0 1.0, q1 0.8
            vec![0.9, 0.0, 0.1], // 1: q0 high, q1 lower
            vec![0.0, 1.0, 0.0], // 2: q1 0.6
            vec![0.6, 0.8, 0.0], // 3: q1 0.96
            vec![0.0, 0.0, 1.0], // 4: nobody's
            vec![1.0, 0.0, 0.0], // 5: exact duplicate of 0: counts once
        ]);
        let (q, p) = (Rows::new(&q, 3).unwrap(), Rows::new(&p, 3).unwrap());
        let picks = balanced(q, p, 2, &HashSet::new()).unwrap();
        let of = |qi| -> Vec<usize> {
            picks
                .iter()
                .filter(|x| x.query == qi)
                .map(|x| x.index)
                .collect()
        };
        assert_eq!(of(0), vec![0, 1]);
        assert_eq!(of(1), vec![3, 2]);
        assert_eq!(picks.len(), 4);
        assert!(picks.iter().all(|x| x.index != 5));
        assert_eq!(picks.iter().find(|x| x.index == 2).unwrap().rank, 2);
        // every query gets exactly k; distinct images
        let set: HashSet<usize> = picks.iter().map(|x| x.index).collect();
        assert_eq!(set.len(), 4);
        // excluding image 1 pushes query 0 to its next neighbour (4 is the only one left)
        let picks = balanced(q, p, 2, &[1].into()).unwrap();
        assert!(picks.iter().any(|x| x.query == 0 && x.index == 4));
        // 2 queries x 3 > 5 usable images
        let e = balanced(q, p, 3, &HashSet::new()).unwrap_err().to_string();
        assert!(e.contains("need 6") && e.contains("5 usable"), "{e}");
    }

    #[test]
    fn balanced_selection_widens_the_search_until_every_query_is_full() {
        // 3 queries all nearest to the same cluster of 6 images, k = 3: the first searches
        // (m = 11 > pool) are the whole pool at once; make the pool larger than m so that the
        // widening matters: 40 images, all closest to query 0's direction.
        let q = rows(&[vec![1.0, 0.0], vec![0.99, 0.1], vec![0.98, 0.2]]);
        let p: Vec<Vec<f32>> = (0..40)
            .map(|i| vec![1.0, -(i as f32) * 0.01 - 0.5])
            .collect();
        let p = rows(&p);
        let (q, p) = (Rows::new(&q, 2).unwrap(), Rows::new(&p, 2).unwrap());
        let picks = balanced(q, p, 12, &HashSet::new()).unwrap();
        assert_eq!(picks.len(), 36);
        for qi in 0..3 {
            assert_eq!(picks.iter().filter(|x| x.query == qi).count(), 12);
        }
        let set: HashSet<usize> = picks.iter().map(|x| x.index).collect();
        assert_eq!(set.len(), 36);
    }

    #[test]
    fn near_duplicates_of_evaluation_images() {
        let e = rows(&[vec![1.0, 0.0]]);
        let p = rows(&[vec![1.0, 0.01], vec![1.0, 1.0], vec![0.0, 1.0]]);
        let (e, p) = (Rows::new(&e, 2).unwrap(), Rows::new(&p, 2).unwrap());
        assert_eq!(near_duplicates(e, p, 0.95).unwrap(), [0].into());
        assert_eq!(near_duplicates(e, p, 0.7).unwrap(), [0, 1].into());
        assert_eq!(k_for_budget(150_000, 1200).unwrap(), 125);
        assert!(k_for_budget(10, 20).is_err());
    }
}
