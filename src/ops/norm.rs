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

// ---------------------------------------------------------------------------------------------
// The tensor-op layer norm (candle path: CUDA, f16), differentiable through candle's autograd.

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// Layer normalisation over the last dimension from differentiable primitives:
/// `(x - mean) / sqrt(var + eps) * weight + bias`, biased variance as in `torch.nn.LayerNorm`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let std = (var + eps)?.sqrt()?;
    centred
        .broadcast_div(&std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// ESPnet's `LayerNorm` (transformer/layer_norm.py) uses eps 1e-12.
pub const ESPNET_LAYER_NORM_EPS: f64 = 1e-12;
/// `torch.nn.LayerNorm` default eps.
pub const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

/// Mirrors `torch.nn.LayerNorm(dim)` (keys `weight`, `bias`) with the composite `layer_norm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// ESPnet's LayerNorm: eps 1e-12.
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Self::load_with_eps(vb, dim, ESPNET_LAYER_NORM_EPS)
    }

    pub fn load_with_eps(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

// ---------------------------------------------------------------------------------------------
// Batch normalisation over the valid frames of a padded batch, and feature normalisations
// (utterance MVN, global). Each kernel has the f32-slice version (the CPU trainer) and, where
// the candle tensor-op path needs one (CUDA, f16), its tensor version beside it.

/// `torch.nn.BatchNorm1d` defaults.
pub const BATCH_NORM_EPS: f64 = 1e-5;
pub const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// Names of non-trainable state tensors (excluded from optimisers and gradient checks).
pub const RUNNING_STAT_NAMES: [&str; 2] = ["running_mean", "running_var"];

/// What batch norm keeps for its backward: the normalised input `[N, C]` and `1 / std` `[C]`.
#[derive(Default)]
pub struct BatchNormSaved {
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Per channel `(Σ_rows a·b, Σ_rows a)` of `[N, C]` matrices, reduced in a fixed order.
fn col_dot_sums(a: &[f32], b: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let per = row_block(a.len() / c);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = a
        .par_chunks(per * c)
        .zip(b.par_chunks(per * c))
        .map(|(ab, bb)| {
            let (mut s, mut t) = (vec![0f32; c], vec![0f32; c]);
            for (ar, br) in ab.chunks_exact(c).zip(bb.chunks_exact(c)) {
                for j in 0..c {
                    s[j] += ar[j] * br[j];
                    t[j] += ar[j];
                }
            }
            (s, t)
        })
        .collect();
    let (mut s, mut t) = (vec![0f32; c], vec![0f32; c]);
    for (ps, pt) in &parts {
        for j in 0..c {
            s[j] += ps[j];
            t[j] += pt[j];
        }
    }
    (s, t)
}

/// Σ over valid rows (`mask` 1) of `x` `[N, C]` (or of `(x - center)²` when `center` is
/// given), per channel, reduced in a fixed order.
fn masked_col_sums(x: &[f32], mask: &[f32], c: usize, center: Option<&[f32]>) -> Vec<f32> {
    let per = row_block(x.len() / c);
    let parts: Vec<Vec<f32>> = x
        .par_chunks(per * c)
        .zip(mask.par_chunks(per))
        .map(|(xb, mb)| {
            let mut s = vec![0f32; c];
            for (row, &m) in xb.chunks_exact(c).zip(mb) {
                if m == 0.0 {
                    continue;
                }
                match center {
                    None => s.iter_mut().zip(row).for_each(|(a, &v)| *a += v),
                    Some(cc) => s
                        .iter_mut()
                        .zip(row.iter().zip(cc))
                        .for_each(|(a, (&v, &m))| *a += (v - m) * (v - m)),
                }
            }
            s
        })
        .collect();
    let mut s = vec![0f32; c];
    for p in &parts {
        for (a, &v) in s.iter_mut().zip(p) {
            *a += v;
        }
    }
    s
}

/// Batch statistics: mean and biased variance per channel over the `valid` rows of `x`
/// `[N, C]` whose `mask` is 1 (padding never changes them).
pub fn masked_moments(x: &[f32], mask: &[f32], c: usize, valid: usize) -> (Vec<f32>, Vec<f32>) {
    let n = valid.max(1) as f32;
    let mean: Vec<f32> = masked_col_sums(x, mask, c, None)
        .iter()
        .map(|&s| s / n)
        .collect();
    let sq = masked_col_sums(x, mask, c, Some(&mean));
    (mean, sq.iter().map(|&s| s / n).collect())
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per channel of `x` `[N, C]` (batch
/// statistics from [`masked_moments`] in training, running ones in eval).
pub fn batch_norm_forward(
    x: &[f32],
    (mean, var): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    y: &mut [f32],
) -> BatchNormSaved {
    let c = gamma.len();
    let rstd: Vec<f32> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let mut xhat = vec![0f32; x.len()];
    xhat.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, row)| {
            for j in 0..c {
                o[j] = (row[j] - mean[j]) * rstd[j];
            }
        });
    y.par_chunks_mut(c)
        .zip(xhat.par_chunks(c))
        .for_each(|(o, row)| {
            for j in 0..c {
                o[j] = row[j] * gamma[j] + beta[j];
            }
        });
    BatchNormSaved { xhat, rstd }
}

/// Backward of a training [`batch_norm_forward`] with batch statistics over the `valid` rows
/// of `mask`: `dx = ...` (padded rows get only the affine term, they carry zero gradient in),
/// `dgamma += Σ dy·xhat`, `dbeta += Σ dy`.
pub fn batch_norm_backward(
    dy: &[f32],
    saved: &BatchNormSaved,
    gamma: &[f32],
    (mask, valid): (&[f32], usize),
    dx: &mut [f32],
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
) {
    let c = gamma.len();
    // Σ dy·x-hat and Σ dy over all rows (padded rows carry zero gradient)
    let (sg, sb) = col_dot_sums(dy, &saved.xhat, c);
    for j in 0..c {
        dgamma[j] += sg[j];
        dbeta[j] += sb[j];
    }
    let nv = valid.max(1) as f32;
    // dxhat = dy·gamma; Σ dxhat and Σ dxhat·xhat per channel
    let s1: Vec<f32> = (0..c).map(|j| sb[j] * gamma[j]).collect();
    let s2: Vec<f32> = (0..c).map(|j| sg[j] * gamma[j]).collect();
    let rstd = &saved.rstd;
    dx.par_chunks_mut(c)
        .zip(dy.par_chunks(c).zip(saved.xhat.par_chunks(c)))
        .enumerate()
        .for_each(|(r, (o, (g, xh)))| {
            let m = mask[r];
            for j in 0..c {
                o[j] = rstd[j] * (g[j] * gamma[j] - m * (s1[j] + xh[j] * s2[j]) / nv);
            }
        });
}

/// torch's running update in place: `(1 - m) * running + m * batch`, the variance unbiased
/// over the `valid` rows.
pub fn batch_norm_update_running(
    (running_mean, running_var): (&mut [f32], &mut [f32]),
    (mean, var): (&[f32], &[f32]),
    valid: usize,
    momentum: f64,
) {
    let n = valid.max(1) as f64;
    let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
    for (running, batch, factor) in [(running_mean, mean, 1.0), (running_var, var, unbiased)] {
        for (o, &b) in running.iter_mut().zip(batch) {
            *o = ((*o as f64) * (1.0 - momentum) + (b as f64) * (momentum * factor)) as f32;
        }
    }
}

/// Batch normalisation over the channel (last) axis of time-major `[B, T, C]` input, mirroring
/// `torch.nn.BatchNorm1d(C)` (keys `weight`, `bias`, `running_mean`, `running_var`; eps 1e-5,
/// momentum 0.1). Unlike torch, training statistics count only valid frames (`mask`), so padding
/// never changes them. The running statistics are stored as non-trainable state: they receive no
/// gradient and are updated in place during training forwards.
#[derive(Debug, Clone)]
pub struct MaskedBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

impl MaskedBatchNorm {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
            eps: BATCH_NORM_EPS,
            momentum: BATCH_NORM_MOMENTUM,
        })
    }

    /// `x`: `[B, T, C]`; `mask`: `[B, T, 1]` of 1 (valid) / 0 (padding); `valid`: number of ones.
    pub fn forward(&self, x: &Tensor, mask: &Tensor, valid: usize, train: bool) -> Result<Tensor> {
        if !train {
            let std = (&self.running_var + self.eps)?.sqrt()?;
            return x
                .broadcast_sub(&self.running_mean)?
                .broadcast_div(&std)?
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias);
        }
        let (b, t, c) = x.dims3()?;
        let n = valid.max(1) as f64;
        let masked = x.broadcast_mul(mask)?;
        let mean = (masked.reshape((b * t, c))?.sum_keepdim(0)? / n)?; // [1, C]
        let centred = x.broadcast_sub(&mean.reshape((1, 1, c))?)?;
        let var = (centred
            .broadcast_mul(mask)?
            .sqr()?
            .reshape((b * t, c))?
            .sum_keepdim(0)?
            / n)?;
        self.update_running(&mean.detach(), &var.detach(), n)?;
        let std = (var + self.eps)?.sqrt()?.reshape((1, 1, c))?;
        centred
            .broadcast_div(&std)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }

    /// torch's update: running = (1 - momentum) * running + momentum * batch, with the unbiased
    /// batch variance.
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: f64) -> Result<()> {
        let c = self.running_mean.dim(0)?;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = self.momentum;
        let new_mean = ((&self.running_mean * (1.0 - m))? + (mean.reshape(c)? * m)?)?;
        let new_var = ((&self.running_var * (1.0 - m))? + (var.reshape(c)? * (m * unbiased))?)?;
        self.running_mean.slice_set(&new_mean, 0, 0)?;
        self.running_var.slice_set(&new_var, 0, 0)
    }
}

/// Variance floor of utterance normalisation (keeps constant dimensions finite).
pub const UTTERANCE_VAR_FLOOR: f64 = 1e-6;

/// Utterance mean/variance normalisation in place over `x` `[B, T, D]`: per utterance and
/// dimension, `(x - mean) / sqrt(var + floor)` with the statistics of its `lengths[b]` valid
/// frames (padded frames are normalised too; their values are unused). Returns the normalised
/// `x` and `1 / std` `[B, D]` for the backward.
pub fn utterance_mvn_forward(
    x: &mut [f32],
    lengths: &[usize],
    t: usize,
    dim: usize,
) -> (Vec<f32>, Vec<f32>) {
    let floor = UTTERANCE_VAR_FLOOR as f32;
    let mut rstd = vec![0f32; lengths.len() * dim];
    x.par_chunks_mut(t * dim)
        .zip(rstd.par_chunks_mut(dim))
        .zip(lengths.par_iter())
        .for_each(|((xb, rb), &len)| {
            let n = len.min(t);
            let cnt = len.max(1) as f32;
            let mut mean = vec![0f32; dim];
            for row in xb[..n * dim].chunks_exact(dim) {
                mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v);
            }
            mean.iter_mut().for_each(|m| *m /= cnt);
            let mut var = vec![0f32; dim];
            for row in xb[..n * dim].chunks_exact(dim) {
                for j in 0..dim {
                    var[j] += (row[j] - mean[j]) * (row[j] - mean[j]);
                }
            }
            for j in 0..dim {
                rb[j] = 1.0 / (var[j] / cnt + floor).sqrt();
            }
            for row in xb.chunks_exact_mut(dim) {
                for j in 0..dim {
                    row[j] = (row[j] - mean[j]) * rb[j];
                }
            }
        });
    (x.to_vec(), rstd)
}

/// Backward of [`utterance_mvn_forward`] in place of `dy`, given its output `y` and `rstd`.
pub fn utterance_mvn_backward(
    dy: &mut [f32],
    (y, rstd): (&[f32], &[f32]),
    lengths: &[usize],
    t: usize,
    dim: usize,
) {
    dy.par_chunks_mut(t * dim)
        .zip(y.par_chunks(t * dim))
        .zip(rstd.par_chunks(dim))
        .zip(lengths.par_iter())
        .for_each(|(((gb, yb), rb), &len)| {
            let n = len.min(t);
            let cnt = len.max(1) as f32;
            let (mut s1, mut s2) = (vec![0f32; dim], vec![0f32; dim]);
            for (gr, yr) in gb.chunks_exact(dim).zip(yb.chunks_exact(dim)) {
                for j in 0..dim {
                    s1[j] += gr[j];
                    s2[j] += gr[j] * yr[j];
                }
            }
            for (ti, (gr, yr)) in gb
                .chunks_exact_mut(dim)
                .zip(yb.chunks_exact(dim))
                .enumerate()
            {
                let m = if ti < n { 1.0 } else { 0.0 };
                for j in 0..dim {
                    gr[j] = rb[j] * (gr[j] - m * (s1[j] + yr[j] * s2[j]) / cnt);
                }
            }
        });
}

/// [`utterance_mvn_forward`] as differentiable tensor ops: `[B, T, D]` → `[B, T, D]`.
pub fn utterance_mvn(x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let mask = super::frame_mask(lengths, t, x.dtype(), x.device())?; // [B, T, 1]
    let counts: Vec<f32> = lengths.iter().map(|&n| n.max(1) as f32).collect();
    let counts = Tensor::from_vec(counts, (b, 1, 1), x.device())?.to_dtype(x.dtype())?;
    let mean = x
        .broadcast_mul(&mask)?
        .sum_keepdim(1)?
        .broadcast_div(&counts)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred
        .broadcast_mul(&mask)?
        .sqr()?
        .sum_keepdim(1)?
        .broadcast_div(&counts)?;
    centred.broadcast_div(&(var + UTTERANCE_VAR_FLOOR)?.sqrt()?)
}

/// Global normalisation in place over features `[B, L, T, D]`: `(x - mean) / std` with one
/// `[D]` row of `mean`/`std` per input layer (`[L, D]`) or one for all (`[D]`). The statistics
/// are fixed, so there is no backward.
pub fn global_normalize(
    x: &mut [f32],
    (mean, std): (&[f32], &[f32]),
    (layers, t, dim): (usize, usize, usize),
) {
    let rows = mean.len() / dim;
    x.par_chunks_mut(t * dim)
        .enumerate()
        .for_each(|(bl, chunk)| {
            let li = if rows == 1 { 0 } else { bl % layers };
            let (m, s) = (&mean[li * dim..][..dim], &std[li * dim..][..dim]);
            for row in chunk.chunks_exact_mut(dim) {
                for j in 0..dim {
                    row[j] = (row[j] - m[j]) / s[j];
                }
            }
        });
}

// ---------------------------------------------------------------- inference: in place, no saved
// state (the SSL encoder's CPU executor; appended for issue #19)

/// `torch.nn.LayerNorm` on every `gamma.len()`-wide row of `xs`, in place, on this thread, for
/// executors that keep nothing for a backward: statistics in f64, two passes, one accumulator
/// per SIMD lane.
pub fn layer_norm_rows_in_place(xs: &mut [f32], gamma: &[f32], beta: &[f32], eps: f64) {
    let dim = gamma.len();
    super::activation::simd(
        #[inline(always)]
        || {
            for row in xs.chunks_exact_mut(dim) {
                let mean = lane_sum(row, |v| v) / dim as f64;
                let var = lane_sum(row, |v| (v - mean) * (v - mean)) / dim as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                let (mean, rstd) = (mean as f32, rstd as f32);
                for ((y, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                    *y = (*y - mean) * rstd * g + b;
                }
            }
        },
    );
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
