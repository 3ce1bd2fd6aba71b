//! Layer normalisation on f32 rows, forward and backward, shared by every CPU executor.
use rayon::prelude::*;

use super::gemm::row_block;

/// What layer norm keeps for its backward: the normalised input and `1 / std` per row.
#[derive(Default)]
pub struct LayerNormSaved {
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per row of `dim` (biased variance, as
/// `torch.nn.LayerNorm`).
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
) -> LayerNormSaved {
    let dim = gamma.len();
    let rows = x.len() / dim;
    let mut saved = LayerNormSaved {
        xhat: vec![0f32; x.len()],
        rstd: vec![0f32; rows],
    };
    let per = row_block(rows);
    x.par_chunks(per * dim)
        .zip(y.par_chunks_mut(per * dim))
        .zip(saved.xhat.par_chunks_mut(per * dim))
        .zip(saved.rstd.par_chunks_mut(per))
        .for_each(|(((xb, yb), hb), rb)| {
            for (((xr, yr), hr), r) in xb
                .chunks_exact(dim)
                .zip(yb.chunks_exact_mut(dim))
                .zip(hb.chunks_exact_mut(dim))
                .zip(rb.iter_mut())
            {
                let mean = xr.iter().sum::<f32>() / dim as f32;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                *r = rstd;
                for ((h, o), (&v, (&g, &b))) in hr
                    .iter_mut()
                    .zip(yr.iter_mut())
                    .zip(xr.iter().zip(gamma.iter().zip(beta)))
                {
                    *h = (v - mean) * rstd;
                    *o = *h * g + b;
                }
            }
        });
    saved
}

/// Backward of `layer_norm_forward`: `dx (+)= ...`, `dgamma += Σ dy·xhat`, `dbeta += Σ dy`.
pub fn layer_norm_backward(
    dy: &[f32],
    saved: &LayerNormSaved,
    gamma: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let dim = gamma.len();
    let rows = dy.len() / dim;
    let per = row_block(rows);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dy
        .par_chunks(per * dim)
        .zip(dx.par_chunks_mut(per * dim))
        .zip(saved.xhat.par_chunks(per * dim))
        .zip(saved.rstd.par_chunks(per))
        .map(|(((gb, xb), hb), rb)| {
            let mut dg = vec![0f32; dim];
            let mut dbt = vec![0f32; dim];
            for (((gr, xr), hr), &rstd) in gb
                .chunks_exact(dim)
                .zip(xb.chunks_exact_mut(dim))
                .zip(hb.chunks_exact(dim))
                .zip(rb)
            {
                let (mut s1, mut s2) = (0f32, 0f32);
                for j in 0..dim {
                    let dh = gr[j] * gamma[j];
                    s1 += dh;
                    s2 += dh * hr[j];
                    dg[j] += gr[j] * hr[j];
                    dbt[j] += gr[j];
                }
                let (m1, m2) = (s1 / dim as f32, s2 / dim as f32);
                for j in 0..dim {
                    let v = rstd * (gr[j] * gamma[j] - m1 - hr[j] * m2);
                    if accumulate {
                        xr[j] += v;
                    } else {
                        xr[j] = v;
                    }
                }
            }
            (dg, dbt)
        })
        .collect();
    for (dg, dbt) in &partials {
        for j in 0..dim {
            dgamma[j] += dg[j];
            dbeta[j] += dbt[j];
        }
    }
}

// ---------------------------------------------------------------- inference: in place, no saved
// state (the SSL encoder's CPU executor; appended for issue #19)

/// `torch.nn.LayerNorm` on every `gamma.len()`-wide row of `xs`, in place, on this thread, for
/// executors that keep nothing for a backward: statistics in f64, two passes, one accumulator
/// per SIMD lane.
pub fn layer_norm_rows_in_place(xs: &mut [f32], gamma: &[f32], beta: &[f32], eps: f64) {
    let dim = gamma.len();
    super::activation::simd(|| {
        for row in xs.chunks_exact_mut(dim) {
            let mean = lane_sum(row, |v| v) / dim as f64;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / dim as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let (mean, rstd) = (mean as f32, rstd as f32);
            for ((y, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                *y = (*y - mean) * rstd * g + b;
            }
        }
    });
}

/// `Σ f(v)` in f64 over `row`, with one accumulator per SIMD lane (a single running sum would
/// make every add wait for the previous one).
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}
