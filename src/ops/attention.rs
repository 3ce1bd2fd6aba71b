//! Multi-head self-attention on f32 slices, forward and backward: scores, the relative-position
//! term of Transformer-XL / ESPnet's `RelPositionMultiHeadedAttention` (rel-shift), masked
//! softmax and context.
//!
//! Activations stay in their projection layout `[B T, d]` (heads side by side): a head is a
//! strided [`Mat`] view, so no split/merge copies. The building blocks work on a block of query
//! rows of one utterance and head ([`scores`], [`masked_softmax`], [`context`]), so an inference
//! caller with no saved state can run blocks of query rows through the same kernels; the
//! training entry points ([`rel_pos_probs`], [`rel_pos_context`], [`rel_pos_backward`]) run them
//! over the whole batch on the pool.
use rayon::prelude::*;

use super::activation::{self, softmax_in_place};
use super::gemm::{grouped_sum, matmul_serial, Mat};

/// Shape of one attention call over a padded batch.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub batch: usize,
    /// Padded frames per utterance.
    pub frames: usize,
    /// Model dimension (all heads).
    pub dim: usize,
    pub heads: usize,
}

impl Geometry {
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Relative positions `T - 1 … -(T - 1)`: rows of the projected positional table.
    pub fn positions(&self) -> usize {
        2 * self.frames - 1
    }

    /// `1 / sqrt(d_k)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim() as f32).sqrt()
    }

    /// Head `h` of rows `row0..` of a `[*, d]` buffer, as a `[rows, d_k]` view.
    pub fn head<'a>(&self, x: &'a [f32], row0: usize, h: usize) -> Mat<'a> {
        let dk = self.head_dim();
        Mat {
            data: &x[row0 * self.dim + h * dk..],
            rs: self.dim,
            cs: 1,
        }
    }
}

/// `out [rows, keys] = q · kᵀ` for one head (`q` `[rows, d_k]`, `k` `[keys, d_k]`).
pub fn scores(q: Mat, k: Mat, (rows, keys, dk): (usize, usize, usize), out: &mut [f32]) {
    matmul_serial(rows, keys, dk, out, keys, q, k.t(), false);
}

/// Transformer-XL's relative-shift term for a block of query rows: `bd` holds
/// `(q + v) · pᵀ` `[rows, 2T - 1]` with `p` the projected positions `T - 1 … -(T - 1)`; query
/// row `r` (of the utterance) reads columns `T - 1 - r .. 2T - 1 - r`.
#[derive(Clone, Copy)]
pub struct RelShift<'a> {
    pub bd: &'a [f32],
    /// The block's first query row within the utterance.
    pub row0: usize,
}

/// In place over `scores` `[rows, keys]` holding `q · kᵀ`:
/// `softmax((scores + shift(bd)) * scale + (key_mask - 1) * 1e9)` per row, so masked keys get
/// exactly zero probability.
pub fn masked_softmax(
    scores: &mut [f32],
    keys: usize,
    scale: f32,
    key_mask: &[f32],
    rel: Option<RelShift>,
) {
    let key_mask = &key_mask[..keys];
    let pn = 2 * keys - 1;
    activation::simd(
        #[inline(always)]
        || {
            for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                match rel {
                    Some(RelShift { bd, row0 }) => {
                        let shifted = &bd[r * pn + (keys - 1 - (row0 + r))..][..keys];
                        for ((v, &s), &m) in row.iter_mut().zip(shifted).zip(key_mask) {
                            *v = (*v + s) * scale + (m - 1.0) * 1e9;
                        }
                    }
                    None => {
                        for (v, &m) in row.iter_mut().zip(key_mask) {
                            *v = *v * scale + (m - 1.0) * 1e9;
                        }
                    }
                }
                softmax_in_place(row);
            }
        },
    );
}

/// `out [rows, d_k] (row stride out_stride) = probs [rows, keys] · v [keys, d_k]`.
pub fn context(
    probs: &[f32],
    v: Mat,
    (rows, keys, dk): (usize, usize, usize),
    out: &mut [f32],
    out_stride: usize,
) {
    matmul_serial(
        rows,
        dk,
        keys,
        out,
        out_stride,
        Mat::rows(probs, keys),
        v,
        false,
    );
}

/// The projected inputs of relative-position attention: `q`, `k`, `v` `[B T, d]`, the
/// projected positions `p` `[2T - 1, d]` and the learned biases `u`, `v` `[d]`
/// (`pos_bias_u`, `pos_bias_v`).
#[derive(Clone, Copy)]
pub struct RelPosInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub p: &'a [f32],
    pub bias_u: &'a [f32],
    pub bias_v: &'a [f32],
}

impl<'a> RelPosInputs<'a> {
    /// For utterance `bi` and head `h`: the query plus each positional bias (`q + u` into
    /// `qu`, `q + v` into `qv`, `[T, d_k]`), and views of the head's keys `[T, d_k]` and
    /// projected positions `[2T - 1, d_k]`.
    fn head_views(
        &self,
        geo: &Geometry,
        (bi, h): (usize, usize),
        qu: &mut [f32],
        qv: &mut [f32],
    ) -> (Mat<'a>, Mat<'a>) {
        let (t, d, dk) = (geo.frames, geo.dim, geo.head_dim());
        let (bu, bv) = (&self.bias_u[h * dk..][..dk], &self.bias_v[h * dk..][..dk]);
        for r in 0..t {
            let qrow = &self.q[(bi * t + r) * d + h * dk..][..dk];
            for j in 0..dk {
                qu[r * dk + j] = qrow[j] + bu[j];
                qv[r * dk + j] = qrow[j] + bv[j];
            }
        }
        (geo.head(self.k, bi * t, h), geo.head(self.p, 0, h))
    }
}

/// Softmax probabilities `[B, H, T, T]` of relative-position attention:
/// `softmax(((q+u)·kᵀ + shift((q+v)·pᵀ)) / sqrt(d_k))` with padded keys (`frame_mask` `[B T]`
/// of 1/0) masked; one task per utterance and head.
pub fn rel_pos_probs(inp: &RelPosInputs, geo: Geometry, frame_mask: &[f32], probs: &mut [f32]) {
    let (t, dk, pn) = (geo.frames, geo.head_dim(), geo.positions());
    probs
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, out)| {
            let (bi, h) = (bh / geo.heads, bh % geo.heads);
            let mut qu = vec![0f32; t * dk];
            let mut qv = vec![0f32; t * dk];
            let (kh, ph) = inp.head_views(&geo, (bi, h), &mut qu, &mut qv);
            scores(Mat::rows(&qu, dk), kh, (t, t, dk), out);
            let mut bd = vec![0f32; t * pn];
            scores(Mat::rows(&qv, dk), ph, (t, pn, dk), &mut bd);
            let rel = RelShift { bd: &bd, row0: 0 };
            masked_softmax(out, t, geo.scale(), &frame_mask[bi * t..][..t], Some(rel));
        });
}

/// `probs · mask` of one utterance and head into `buf` (or `probs` itself without dropout).
fn dropped<'a>(probs: &'a [f32], mask: Option<&[f32]>, buf: &'a mut [f32]) -> &'a [f32] {
    match mask {
        Some(m) => {
            for ((o, &x), &s) in buf.iter_mut().zip(probs).zip(m) {
                *o = x * s;
            }
            buf
        }
        None => probs,
    }
}

/// Heads merged, `ctx [B T, d]`: `ctx[b, :, h, :] = dropout(probs[b, h]) · v[b, :, h, :]`
/// (`att_mask`: the attention dropout's scales, `[B, H, T, T]`); one task per utterance.
pub fn rel_pos_context(
    probs: &[f32],
    att_mask: Option<&[f32]>,
    v: &[f32],
    geo: Geometry,
    ctx: &mut [f32],
) {
    let (t, d, dk) = (geo.frames, geo.dim, geo.head_dim());
    ctx.par_chunks_mut(t * d).enumerate().for_each(|(bi, cb)| {
        let mut pd = vec![0f32; t * t];
        for h in 0..geo.heads {
            let off = (bi * geo.heads + h) * t * t;
            let a = dropped(
                &probs[off..][..t * t],
                att_mask.map(|m| &m[off..][..t * t]),
                &mut pd,
            );
            context(a, geo.head(v, bi * t, h), (t, t, dk), &mut cb[h * dk..], d);
        }
    });
}

/// Gradients of relative-position attention given the context's gradient: `dq`, `dk`, `dv`
/// `[B T, d]` (`dq` includes the paths through both biases), `dp` `[2T - 1, d]` for the
/// positional projection, and `du`, `dbv` `[d]` for the biases.
pub struct RelPosGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dp: Vec<f32>,
    pub du: Vec<f32>,
    pub dbv: Vec<f32>,
}

/// One utterance's rows of the q, k and v gradients.
type QkvRows<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

/// Backward of [`rel_pos_probs`] + [`rel_pos_context`]: utterances run in parallel, the shared
/// gradients (`dp`, `du`, `dbv`) summed in a fixed order.
pub fn rel_pos_backward(
    inp: &RelPosInputs,
    probs: &[f32],
    att_mask: Option<&[f32]>,
    dctx: &[f32],
    geo: Geometry,
) -> RelPosGrads {
    let (t, d, pn) = (geo.frames, geo.dim, geo.positions());
    let n = geo.batch * t;
    let mut dq = vec![0f32; n * d];
    let mut dk = vec![0f32; n * d];
    let mut dv = vec![0f32; n * d];
    // per utterance: dq, dk, dv rows; accumulators: dp [pn, d], du [H, dk], dbv [H, dk]
    let items: Vec<(usize, QkvRows)> = dq
        .chunks_mut(t * d)
        .zip(dk.chunks_mut(t * d).zip(dv.chunks_mut(t * d)))
        .enumerate()
        .collect();
    let acc = grouped_sum(items, pn * d + 2 * d, |(bi, rows), acc| {
        utterance_backward(inp, probs, att_mask, dctx, &geo, bi, rows, acc);
    });
    let (dp, rest) = acc.split_at(pn * d);
    let (du, dbv) = rest.split_at(d);
    RelPosGrads {
        dq,
        dk,
        dv,
        dp: dp.to_vec(),
        du: du.to_vec(),
        dbv: dbv.to_vec(),
    }
}

/// [`rel_pos_backward`] of utterance `bi`, every head: writes its q, k, v gradient rows and
/// adds into `acc` = `[dp (2T-1) d | du d | dbv d]`.
#[allow(clippy::too_many_arguments)]
fn utterance_backward(
    inp: &RelPosInputs,
    probs: &[f32],
    att_mask: Option<&[f32]>,
    dctx: &[f32],
    geo: &Geometry,
    bi: usize,
    (dqb, (dkb, dvb)): QkvRows,
    acc: &mut [f32],
) {
    let (t, d, dk, pn) = (geo.frames, geo.dim, geo.head_dim(), geo.positions());
    let inv = geo.scale();
    let (dp, rest) = acc.split_at_mut(pn * d);
    let (du, dbv) = rest.split_at_mut(d);
    let mut da = vec![0f32; t * t];
    let mut dbd = vec![0f32; t * pn];
    let mut qu = vec![0f32; t * dk];
    let mut qv = vec![0f32; t * dk];
    let mut pd = vec![0f32; t * t];
    let mut dqv = vec![0f32; t * dk];
    for h in 0..geo.heads {
        let off = (bi * geo.heads + h) * t * t;
        let pr = &probs[off..][..t * t];
        let m = att_mask.map(|m| &m[off..][..t * t]);
        let a = dropped(pr, m, &mut pd);
        let dch = geo.head(dctx, bi * t, h);
        let vh = geo.head(inp.v, bi * t, h);
        // dv_h = aᵀ · dctx_h ; da = dctx_h · v_hᵀ
        matmul_serial(
            t,
            dk,
            t,
            &mut dvb[h * dk..],
            d,
            Mat::rows(a, t).t(),
            dch,
            false,
        );
        matmul_serial(t, t, dk, &mut da, t, dch, vh.t(), false);
        // through dropout and softmax, then 1/sqrt(dk)
        for r in 0..t {
            let pr_r = &pr[r * t..][..t];
            let da_r = &mut da[r * t..][..t];
            if let Some(m) = m {
                for (g, &s) in da_r.iter_mut().zip(&m[r * t..][..t]) {
                    *g *= s;
                }
            }
            let dot: f32 = da_r.iter().zip(pr_r).map(|(&g, &p)| g * p).sum();
            for (g, &p) in da_r.iter_mut().zip(pr_r) {
                *g = p * (*g - dot) * inv;
            }
        }
        // ds → matrix_bd gradient in the unshifted [T, 2T-1] layout
        dbd.fill(0.0);
        for r in 0..t {
            let base = t - 1 - r;
            dbd[r * pn + base..r * pn + base + t].copy_from_slice(&da[r * t..][..t]);
        }
        let (kh, ph) = inp.head_views(geo, (bi, h), &mut qu, &mut qv);
        // d(q+u) = ds · k ; dk = dsᵀ · (q+u)
        matmul_serial(
            t,
            dk,
            t,
            &mut dqb[h * dk..],
            d,
            Mat::rows(&da, t),
            kh,
            false,
        );
        let qu_m = Mat::rows(&qu, dk);
        matmul_serial(
            t,
            dk,
            t,
            &mut dkb[h * dk..],
            d,
            Mat::rows(&da, t).t(),
            qu_m,
            false,
        );
        // d(q+v) = dbd · p ; dp += dbdᵀ · (q+v)
        matmul_serial(t, dk, pn, &mut dqv, dk, Mat::rows(&dbd, pn), ph, false);
        let qv_m = Mat::rows(&qv, dk);
        matmul_serial(
            pn,
            dk,
            t,
            &mut dp[h * dk..],
            d,
            Mat::rows(&dbd, pn).t(),
            qv_m,
            true,
        );
        for r in 0..t {
            let row = &mut dqb[r * d + h * dk..][..dk];
            for j in 0..dk {
                du[h * dk + j] += row[j];
                dbv[h * dk + j] += dqv[r * dk + j];
                row[j] += dqv[r * dk + j];
            }
        }
    }
}

/// Working memory of [`flash_attention`]: one score block and the running row statistics.
#[derive(Default)]
pub struct FlashBuffers {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Adds a score bias to a block `[rows, cols]` of scores whose first key is `k0` (the caller
/// knows the head and the query rows).
pub type ScoreBias<'a> = &'a (dyn Fn(usize, &mut [f32], usize) + Sync);

/// `out [rows, d_k] (row stride out_stride) = softmax(q · kᵀ + bias) · v` for one head, with
/// `q` already scaled, computed blockwise as FlashAttention does: keys in blocks of
/// `key_block`, each block's scores through the gemm, an online softmax (running row max and
/// sum, the partial context rescaled when the max grows), so no `[rows, keys]` matrix exists
/// and the memory is `rows × key_block` whatever the utterance's length. The bits depend on
/// `key_block` only, not on the thread that runs it.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention(
    q: Mat,
    k: Mat,
    v: Mat,
    (rows, keys, dk): (usize, usize, usize),
    key_block: usize,
    bias: Option<ScoreBias>,
    buf: &mut FlashBuffers,
    out: &mut [f32],
    out_stride: usize,
) {
    if rows == 0 {
        return;
    }
    let kb = key_block.clamp(1, keys.max(1));
    buf.scores.resize(rows * kb, 0.0);
    buf.acc.clear();
    buf.acc.resize(rows * dk, 0.0);
    buf.max.clear();
    buf.max.resize(rows, f32::NEG_INFINITY);
    buf.sum.clear();
    buf.sum.resize(rows, 0.0);
    let mut k0 = 0;
    while k0 < keys {
        let cols = kb.min(keys - k0);
        let s = &mut buf.scores[..rows * cols];
        let kt = Mat {
            data: &k.data[k0 * k.rs..],
            rs: k.cs,
            cs: k.rs,
        };
        matmul_serial(rows, cols, dk, s, cols, q, kt, false);
        if let Some(bias) = bias {
            bias(k0, s, cols);
        }
        activation::simd(
            #[inline(always)]
            || {
                for (r, row) in s.chunks_exact_mut(cols).enumerate() {
                    online_softmax_row(
                        row,
                        &mut buf.max[r],
                        &mut buf.sum[r],
                        &mut buf.acc[r * dk..(r + 1) * dk],
                    );
                }
            },
        );
        let vb = Mat {
            data: &v.data[k0 * v.rs..],
            rs: v.rs,
            cs: v.cs,
        };
        matmul_serial(
            rows,
            dk,
            cols,
            &mut buf.acc,
            dk,
            Mat::rows(s, cols),
            vb,
            true,
        );
        k0 += cols;
    }
    activation::simd(
        #[inline(always)]
        || {
            for r in 0..rows {
                let inv = 1.0 / buf.sum[r];
                let dst = &mut out[r * out_stride..r * out_stride + dk];
                for (o, &a) in dst.iter_mut().zip(&buf.acc[r * dk..(r + 1) * dk]) {
                    *o = a * inv;
                }
            }
        },
    );
}

/// One row of a key block in [`flash_attention`]: `row = exp(row - m)` with `m` the running
/// max, rescaling the row's partial sum and context when `m` grows.
#[inline(always)]
fn online_softmax_row(row: &mut [f32], max: &mut f32, sum: &mut f32, acc: &mut [f32]) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let block_max = chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if block_max > *max {
        if *sum > 0.0 {
            let scale = activation::fast_exp(*max - block_max);
            *sum *= scale;
            acc.iter_mut().for_each(|a| *a *= scale);
        }
        *max = block_max;
    }
    let mx = *max;
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = activation::fast_exp(*v - mx);
            *s += *v;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = activation::fast_exp(*v - mx);
        total += *v;
    }
    *sum += total;
}

#[cfg(test)]
mod flash_tests {
    use super::*;

    /// Blockwise attention with any tiles equals softmax(q·kᵀ + bias)·v computed directly in
    /// f64 (the bias a function of the query and key positions, as WavLM's).
    #[test]
    fn flash_attention_equals_direct_softmax_attention() {
        let (rows, keys, dk) = (37, 301, 8);
        let mut seed = 12345u64;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20_000) as f32 / 10_000.0 - 1.0
        };
        let q: Vec<f32> = (0..rows * dk).map(|_| 2.0 * rand()).collect();
        let k: Vec<f32> = (0..keys * dk).map(|_| 2.0 * rand()).collect();
        let v: Vec<f32> = (0..keys * dk).map(|_| rand()).collect();
        let bias_of = |i: usize, j: usize| ((i as f32 - j as f32) * 0.05).sin();
        let mut want = vec![0f64; rows * dk];
        for i in 0..rows {
            let s: Vec<f64> = (0..keys)
                .map(|j| {
                    (0..dk)
                        .map(|d| (q[i * dk + d] * k[j * dk + d]) as f64)
                        .sum::<f64>()
                        + bias_of(i, j) as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..dk {
                want[i * dk + d] = (0..keys).map(|j| e[j] * v[j * dk + d] as f64).sum::<f64>() / z;
            }
        }
        for key_block in [1, 7, 64, 301, 1000] {
            let bias = |k0: usize, tile: &mut [f32], cols: usize| {
                for (i, row) in tile.chunks_exact_mut(cols).enumerate() {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += bias_of(i, k0 + j);
                    }
                }
            };
            let mut out = vec![0f32; rows * dk];
            flash_attention(
                Mat::rows(&q, dk),
                Mat::rows(&k, dk),
                Mat::rows(&v, dk),
                (rows, keys, dk),
                key_block,
                Some(&bias),
                &mut FlashBuffers::default(),
                &mut out,
                dk,
            );
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(err < 1e-5, "key block {key_block}: {err}");
        }
    }
}
