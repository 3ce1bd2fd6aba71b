//! Mini-batch k-means (Sculley 2010) with k-means++ initialisation, as scikit-learn's
//! `MiniBatchKMeans` computes it (the model fairseq's `simple_kmeans` and ESPnet's
//! `perform_kmeans.sh` train for HuBERT units), over any [`FrameSource`]: frames are read in
//! batches, never all at once, so memory is bounded by the batch and the init sample.
//!
//! Per step: `batch_size` frames drawn uniformly (with replacement across steps), each
//! assigned to its nearest centre (squared Euclidean through one gemm:
//! `‖x‖² − 2 x·c + ‖c‖²`), every centre moved to the running mean of all frames ever assigned
//! to it (`c ← (c·n + Σx) / (n + m)`, per-centre counts `n`). Stopping: after `max_iter`
//! passes' worth of steps, or when the exponentially weighted batch inertia has not improved
//! for `max_no_improvement` steps (scikit-learn's rule). Initialisation: greedy k-means++
//! (`2 + ln K` candidates per centre) on `init_size` random frames, `n_init` times; the one
//! with the least inertia on a held-out random sample wins. Deterministic for a seed at any
//! thread count: draws come from one seeded stream, reductions run in a fixed order.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::ops::gemm::{matmul, Mat};

/// Frames a k-means reads, by global frame number `0..len()`.
pub trait FrameSource: Sync {
    fn dim(&self) -> usize;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies frames `ids` into `out` (`[ids.len(), dim]`, row-major).
    fn gather(&self, ids: &[u64], out: &mut [f32]) -> anyhow::Result<()>;
    /// Copies frames `start..start + out.len() / dim` into `out`.
    fn range(&self, start: u64, out: &mut [f32]) -> anyhow::Result<()>;
    /// Lets go of memory held for frames already read (mapped pages); called between batches.
    fn release(&self) {}
}

/// The options of one k-means fit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KmeansConfig {
    pub clusters: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// Passes over the frames at most (steps = max_iter · frames / batch_size).
    pub max_iter: usize,
    /// Stop when the smoothed batch inertia has not improved for this many steps (0: never).
    pub max_no_improvement: usize,
    /// k-means++ initialisations to draw; the best on a held-out sample is kept.
    pub n_init: usize,
    /// Frames each initialisation sees (default 3 · batch_size, at least 3 · clusters).
    pub init_size: Option<usize>,
}

impl Default for KmeansConfig {
    /// fairseq `simple_kmeans` / ESPnet's settings, except `n_init` (20 there).
    fn default() -> Self {
        Self {
            clusters: 100,
            seed: 0,
            batch_size: 10_000,
            max_iter: 100,
            max_no_improvement: 100,
            n_init: 3,
            init_size: None,
        }
    }
}

/// A fitted model and how it got there.
#[derive(Debug, Clone)]
pub struct KmeansFit {
    /// `[clusters, dim]`, row-major.
    pub centroids: Vec<f32>,
    pub dim: usize,
    /// Σ over every frame of the squared distance to its nearest centre.
    pub inertia: f64,
    pub frames: u64,
    pub steps: usize,
    /// Stopped by `max_no_improvement` before `max_iter` passes.
    pub converged_early: bool,
}

/// Fits `cfg.clusters` centres to `src`.
pub fn fit(src: &dyn FrameSource, cfg: &KmeansConfig) -> anyhow::Result<KmeansFit> {
    let (n, d, k) = (src.len(), src.dim(), cfg.clusters);
    anyhow::ensure!(k >= 1, "--clusters must be at least 1");
    anyhow::ensure!(cfg.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(d >= 1, "the frames have no dimensions");
    anyhow::ensure!(
        n >= k as u64,
        "{n} frames are fewer than the {k} clusters asked for"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let init_size = cfg
        .init_size
        .unwrap_or(cfg.batch_size.saturating_mul(3))
        .max(k.saturating_mul(3))
        .min(n as usize)
        .max(k);
    let draw = |rng: &mut ChaCha8Rng, m: usize| -> Vec<u64> {
        (0..m).map(|_| rng.random_range(0..n)).collect()
    };
    let mut held_out = vec![0f32; init_size * d];
    src.gather(&draw(&mut rng, init_size), &mut held_out)?;
    let mut best: Option<(f64, Vec<f32>)> = None;
    let mut sample = vec![0f32; init_size * d];
    for _ in 0..cfg.n_init.max(1) {
        src.gather(&draw(&mut rng, init_size), &mut sample)?;
        let centres = kmeans_pp(&sample, d, k, &mut rng);
        let inertia = assign(&held_out, d, &centres, None);
        if best.as_ref().is_none_or(|(b, _)| inertia < *b) {
            best = Some((inertia, centres));
        }
    }
    drop(sample);
    drop(held_out);
    src.release();
    let mut centres = best.map(|(_, c)| c).unwrap_or_default();

    let mut counts = vec![0f64; k];
    let steps = ((cfg.max_iter as u128 * n as u128) / cfg.batch_size as u128).max(1) as usize;
    let batch = cfg.batch_size.min(n as usize);
    let alpha = (2.0 * batch as f64 / (n as f64 + 1.0)).min(1.0);
    let (mut ewa, mut ewa_min, mut no_improvement) = (None::<f64>, f64::INFINITY, 0usize);
    let mut xs = vec![0f32; batch * d];
    let mut labels = vec![0u32; batch];
    let mut converged_early = false;
    let mut done = 0;
    for step in 0..steps {
        src.gather(&draw(&mut rng, batch), &mut xs)?;
        let inertia = assign(&xs, d, &centres, Some(&mut labels)) / batch as f64;
        update_centres(&xs, &labels, d, &mut centres, &mut counts);
        done = step + 1;
        if step % 16 == 15 {
            src.release();
        }
        // scikit-learn's convergence rule (the first batch measures the initialisation)
        if step == 0 {
            continue;
        }
        let smoothed = match ewa {
            None => inertia,
            Some(e) => e * (1.0 - alpha) + inertia * alpha,
        };
        ewa = Some(smoothed);
        if smoothed < ewa_min {
            ewa_min = smoothed;
            no_improvement = 0;
        } else {
            no_improvement += 1;
        }
        if cfg.max_no_improvement > 0 && no_improvement >= cfg.max_no_improvement {
            converged_early = true;
            break;
        }
    }
    src.release();
    let inertia = total_inertia(src, &centres)?;
    Ok(KmeansFit {
        centroids: centres,
        dim: d,
        inertia,
        frames: n,
        steps: done,
        converged_early,
    })
}

/// Σ over every frame of `src` of the squared distance to its nearest centre, streamed in
/// blocks (fixed block order, so the sum is the same at any thread count).
pub fn total_inertia(src: &dyn FrameSource, centres: &[f32]) -> anyhow::Result<f64> {
    let mut total = 0f64;
    for_blocks(src, |_, xs| {
        total += assign(xs, src.dim(), centres, None);
        Ok(())
    })?;
    Ok(total)
}

/// Frames per block when streaming a whole source.
const BLOCK_FRAMES: usize = 8192;

/// Calls `f(first frame, frames)` on consecutive blocks of `src`, in order.
pub fn for_blocks(
    src: &dyn FrameSource,
    mut f: impl FnMut(u64, &[f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let d = src.dim();
    let mut buf = vec![0f32; BLOCK_FRAMES * d];
    let mut start = 0u64;
    let mut blocks = 0usize;
    while start < src.len() {
        let m = (src.len() - start).min(BLOCK_FRAMES as u64) as usize;
        src.range(start, &mut buf[..m * d])?;
        f(start, &buf[..m * d])?;
        start += m as u64;
        blocks += 1;
        if blocks % 8 == 0 {
            src.release();
        }
    }
    src.release();
    Ok(())
}

/// Squared norms of the rows of `x` (`[m, d]`).
fn row_norms(x: &[f32], d: usize) -> Vec<f32> {
    x.par_chunks(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// Rows per distance block: bounds the `[rows, K]` score scratch.
const ASSIGN_ROWS: usize = 2048;

/// Nearest centre of every row of `xs` (`[m, d]`) into `labels` (when given); returns the
/// sum of squared distances. Ties go to the lower centre index, as numpy's argmin.
pub fn assign(xs: &[f32], d: usize, centres: &[f32], mut labels: Option<&mut [u32]>) -> f64 {
    let k = centres.len() / d;
    let c_norms = row_norms(centres, d);
    let m = xs.len() / d;
    let mut total = 0f64;
    for block in 0..m.div_ceil(ASSIGN_ROWS) {
        let r0 = block * ASSIGN_ROWS;
        let rows = (m - r0).min(ASSIGN_ROWS);
        let x = &xs[r0 * d..(r0 + rows) * d];
        // scores[i, j] = x_i · c_j
        let mut scores = vec![0f32; rows * k];
        matmul(
            rows,
            k,
            d,
            &mut scores,
            k,
            Mat::rows(x, d),
            Mat::rows(centres, d).t(),
            false,
        );
        let x_norms = row_norms(x, d);
        let best: Vec<(u32, f32)> = scores
            .par_chunks(k)
            .zip(&x_norms)
            .map(|(row, &xn)| {
                let (mut arg, mut min) = (0u32, f32::INFINITY);
                for (j, (&s, &cn)) in row.iter().zip(&c_norms).enumerate() {
                    let dist = cn - 2.0 * s;
                    if dist < min {
                        min = dist;
                        arg = j as u32;
                    }
                }
                (arg, (xn + min).max(0.0))
            })
            .collect();
        for (i, (arg, dist)) in best.into_iter().enumerate() {
            if let Some(l) = labels.as_deref_mut() {
                l[r0 + i] = arg;
            }
            total += dist as f64;
        }
    }
    total
}

/// Moves each centre to the running mean of every frame assigned to it so far.
fn update_centres(xs: &[f32], labels: &[u32], d: usize, centres: &mut [f32], counts: &mut [f64]) {
    let k = counts.len();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        members[l as usize].push(i);
    }
    centres
        .par_chunks_mut(d)
        .zip(counts.par_iter_mut())
        .zip(members.par_iter())
        .for_each(|((c, n), idx)| {
            if idx.is_empty() {
                return;
            }
            let mut sum = vec![0f64; d];
            for &i in idx {
                for (s, &v) in sum.iter_mut().zip(&xs[i * d..(i + 1) * d]) {
                    *s += v as f64;
                }
            }
            let total = *n + idx.len() as f64;
            for (cv, s) in c.iter_mut().zip(&sum) {
                *cv = ((*cv as f64 * *n + s) / total) as f32;
            }
            *n = total;
        });
}

/// Greedy k-means++ on the rows of `x` (`[m, d]`): the first centre uniformly at random, each
/// next one the best (least total potential) of `2 + ln K` candidates drawn with probability
/// proportional to the squared distance to the nearest centre so far.
fn kmeans_pp(x: &[f32], d: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let m = x.len() / d;
    let trials = 2 + (k as f64).ln() as usize;
    let norms = row_norms(x, d);
    let mut centres = Vec::with_capacity(k * d);
    let first = rng.random_range(0..m);
    centres.extend_from_slice(&x[first * d..(first + 1) * d]);
    let mut closest = distances_to(x, &norms, &x[first * d..(first + 1) * d], 1);
    let mut potential: f64 = closest.iter().map(|&v| v as f64).sum();
    // cumulative sums for the D² draws, rebuilt after each centre
    for _ in 1..k {
        let cum = cumulative(&closest);
        let candidates: Vec<usize> = (0..trials)
            .map(|_| {
                let r = rng.random::<f64>() * potential;
                cum.partition_point(|&c| c < r).min(m - 1)
            })
            .collect();
        let cand_rows: Vec<f32> = candidates
            .iter()
            .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
            .collect();
        // distances [trials, m]
        let dist = distances_to(x, &norms, &cand_rows, trials);
        let (mut best_c, mut best_pot, mut best_closest) = (0, f64::INFINITY, Vec::new());
        for t in 0..trials {
            let row = &dist[t * m..(t + 1) * m];
            let new_closest: Vec<f32> = closest.iter().zip(row).map(|(a, b)| a.min(*b)).collect();
            let pot: f64 = new_closest.iter().map(|&v| v as f64).sum();
            if pot < best_pot {
                best_pot = pot;
                best_c = candidates[t];
                best_closest = new_closest;
            }
        }
        centres.extend_from_slice(&x[best_c * d..(best_c + 1) * d]);
        closest = best_closest;
        potential = best_pot;
    }
    centres
}

fn cumulative(v: &[f32]) -> Vec<f64> {
    let mut acc = 0f64;
    v.iter()
        .map(|&x| {
            acc += x as f64;
            acc
        })
        .collect()
}

/// Squared distances `[c, m]` from each of the `c` rows of `cands` to each row of `x`.
fn distances_to(x: &[f32], x_norms: &[f32], cands: &[f32], c: usize) -> Vec<f32> {
    let d = cands.len() / c;
    let m = x.len() / d;
    let mut dots = vec![0f32; c * m];
    matmul(
        c,
        m,
        d,
        &mut dots,
        m,
        Mat::rows(cands, d),
        Mat::rows(x, d).t(),
        false,
    );
    let c_norms = row_norms(cands, d);
    dots.par_chunks_mut(m).zip(&c_norms).for_each(|(row, &cn)| {
        for (v, &xn) in row.iter_mut().zip(x_norms) {
            *v = (xn + cn - 2.0 * *v).max(0.0);
        }
    });
    dots
}

/// A [`FrameSource`] over frames held in memory (tests, small inputs).
pub struct InMemory {
    pub data: Vec<f32>,
    pub dim: usize,
}

impl FrameSource for InMemory {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> u64 {
        (self.data.len() / self.dim) as u64
    }
    fn gather(&self, ids: &[u64], out: &mut [f32]) -> anyhow::Result<()> {
        let d = self.dim;
        for (o, &i) in out.chunks_exact_mut(d).zip(ids) {
            let i = i as usize;
            o.copy_from_slice(&self.data[i * d..(i + 1) * d]);
        }
        Ok(())
    }
    fn range(&self, start: u64, out: &mut [f32]) -> anyhow::Result<()> {
        let s = start as usize * self.dim;
        out.copy_from_slice(&self.data[s..s + out.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Well-separated Gaussian blobs: k-means must find their centres.
    fn blobs(k: usize, per: usize, d: usize, seed: u64) -> (InMemory, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<f32> = (0..k * d).map(|_| rng.random_range(-20.0..20.0)).collect();
        let mut data = Vec::with_capacity(k * per * d);
        for i in 0..k * per {
            let c = i % k;
            for j in 0..d {
                data.push(centres[c * d + j] + rng.random_range(-0.5..0.5));
            }
        }
        (InMemory { data, dim: d }, centres)
    }

    #[test]
    fn finds_separated_clusters_and_is_deterministic() {
        let (src, truth) = blobs(8, 500, 16, 3);
        let cfg = KmeansConfig {
            clusters: 8,
            seed: 7,
            batch_size: 256,
            max_iter: 20,
            max_no_improvement: 30,
            n_init: 3,
            init_size: None,
        };
        let fit1 = fit(&src, &cfg).unwrap();
        // every true centre has a fitted centre within the noise
        for c in truth.chunks(16) {
            let nearest = fit1
                .centroids
                .chunks(16)
                .map(|f| f.iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum::<f32>())
                .fold(f32::INFINITY, f32::min);
            assert!(
                nearest < 0.1,
                "a true centre is {nearest} from the nearest fit"
            );
        }
        // inertia ≈ the noise variance: 16 dims × 1/12 per frame
        let per_frame = fit1.inertia / src.len() as f64;
        assert!((per_frame - 16.0 / 12.0).abs() < 0.1, "{per_frame}");
        let fit2 = fit(&src, &cfg).unwrap();
        assert_eq!(fit1.centroids, fit2.centroids);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let fit3 = pool.install(|| fit(&src, &cfg).unwrap());
        assert_eq!(
            fit1.centroids, fit3.centroids,
            "thread count changed the result"
        );
    }

    #[test]
    fn assignment_is_the_argmin_of_squared_distances() {
        let (src, _) = blobs(5, 40, 7, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let centres: Vec<f32> = (0..5 * 7).map(|_| rng.random_range(-20.0..20.0)).collect();
        let mut labels = vec![0u32; src.len() as usize];
        let total = assign(&src.data, 7, &centres, Some(&mut labels));
        let mut want_total = 0f64;
        for (x, &l) in src.data.chunks(7).zip(&labels) {
            let dists: Vec<f64> = centres
                .chunks(7)
                .map(|c| x.iter().zip(c).map(|(a, b)| ((a - b) as f64).powi(2)).sum())
                .collect();
            let best = dists.iter().cloned().fold(f64::INFINITY, f64::min);
            assert!((dists[l as usize] - best).abs() <= 1e-3 * best.max(1.0));
            want_total += best;
        }
        assert!((total - want_total).abs() < 1e-4 * want_total);
    }

    #[test]
    fn too_few_frames_is_a_clear_error() {
        let src = InMemory {
            data: vec![0.0; 10 * 4],
            dim: 4,
        };
        let cfg = KmeansConfig {
            clusters: 11,
            ..KmeansConfig::default()
        };
        let err = fit(&src, &cfg).unwrap_err().to_string();
        assert!(
            err.contains("10 frames are fewer than the 11 clusters"),
            "{err}"
        );
    }
}
