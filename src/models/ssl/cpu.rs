//! The wav2vec 2.0 / HuBERT encoder for CPU f32 inference, one utterance at a time on plain
//! slices: the executor extract, decode-time features and on-the-fly features run on the CPU.
//!
//! One utterance per call, with no padding and no mask: every matmul is a single-threaded
//! gemm on strided views (`ops::gemm`; the conv frames are overlapping rows of the input, the
//! attention heads read the fused q/k/v projection in place, so there are no im2col, head
//! split or merge copies), and attention is computed in blocks of queries, so its memory is
//! O(T · block) instead of O(heads · T²) and the scores stay in cache. Callers run different
//! utterances on different threads (`parallel = false`), which keeps every core busy with no
//! barrier per op; a lone utterance can instead spread every op over the pool
//! (`parallel = true`) and gets the same bits. The weights are its own, read from the
//! checkpoint's tensors (f32 CPU tensors in place, without a copy).
use super::chunk::Chunking;
use super::config::{Activation, Wav2Vec2Config};
use super::data2vec::CpuPositionalStack;
use super::wavlm::{BiasTable, Gate, PositionBias, RelativePositions};
use super::{
    activation, check_batch, conv_frames_weight, conv_in_channels, conv_out_len,
    positional_conv_weight, qkv_projection, ConvNormKind, LinearLayout, CONV_NORM_EPS,
};
use crate::ops::activation::{
    gelu_in_place, gelu_tanh_in_place, relu_in_place, silu_in_place, simd,
};
use crate::ops::attention::{flash_attention, FlashBuffers, ScoreBias};
use crate::ops::gemm::{matmul_serial, transpose, Mat};
use crate::ops::norm::layer_norm_rows_in_place;
use crate::ops::profile::{Kind, Profile, Profiler};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per attention task (one head): each (query block, key block) pair is one
/// `QUERY_BLOCK × KEY_BLOCK` score tile, 1 MiB of f32. Measured on a 120 s utterance
/// (wav2vec2-base, 2 threads): 512 rows 9.8 s of attention, 256 10.1 s, 128 11.2 s, 64 14.3 s
/// (fewer query blocks, fewer times each key and value tile is packed for the gemm).
const QUERY_BLOCK: usize = 512;
/// Keys per score tile of the blockwise (flash-style) attention.
const KEY_BLOCK: usize = 512;
/// Output frames per feature-encoder chunk: the conv stack runs over fixed windows of this
/// many frames (plus their receptive field), so its large early outputs never exist for the
/// whole utterance (a 5-minute utterance's first conv output alone is 2 GB).
const FRONT_END_FRAMES: usize = 320;
/// Frames from which an utterance runs with every op spread over the pool instead of on one
/// thread of its own (30 s at 50 frames/s): past this, one utterance per thread would leave
/// cores idle waiting for it, and per-op splitting costs little.
pub const LONG_FRAMES: usize = 1500;
/// Rows per task of row-wise work when an op is spread over the pool.
const ROWS_PER_TASK: usize = 64;
/// Rows per gemm call (large enough that repacking the weights per call costs ~2%). Every
/// matmul is cut into the same row blocks whether it runs on one thread or over the pool, so
/// an utterance gets the same bits either way.
const GEMM_ROWS: usize = 1024;
/// The fewest rows per gemm call when a product is cut for balance (see [`gemm_block_rows`]).
const MIN_GEMM_ROWS: usize = 256;

/// Rows per gemm call for an `m`-row product: a multiple of 8 blocks where the sizes allow
/// (so 2, 4 or 8 threads get equal shares: 3,000 rows in 3 blocks of 1,024 left one of two
/// cores idle a third of the time), between `MIN_GEMM_ROWS` and `GEMM_ROWS` rows each; up to
/// `GEMM_ROWS` rows, one call. It
/// depends on `m` alone, so a row's bits never depend on the pool.
fn gemm_block_rows(m: usize) -> usize {
    if m <= GEMM_ROWS {
        // a short utterance's product in one call (its thread has no one to share with)
        return GEMM_ROWS;
    }
    let blocks = 8 * m.div_ceil(8 * GEMM_ROWS).max(1);
    m.div_ceil(blocks)
        .next_multiple_of(16)
        .clamp(MIN_GEMM_ROWS, GEMM_ROWS)
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn activate(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::Gelu => gelu_in_place(xs),
        Activation::GeluTanh => gelu_tanh_in_place(xs),
        Activation::Relu => relu_in_place(xs),
        Activation::Silu => silu_in_place(xs),
    }
}

/// A weight matrix the engine reads in place: the values of a contiguous f32 CPU tensor
/// (no copy: a mapped checkpoint's own memory), or an f32 copy of any other tensor.
enum Weights {
    Shared {
        /// Keeps the storage alive; never written (checkpoint tensors are not `Var`s).
        _tensor: Tensor,
        ptr: *const f32,
        len: usize,
    },
    Owned(Vec<f32>),
}

// SAFETY: `Shared` points into the storage of a tensor it keeps alive and that nothing
// writes to (weights are only read), so the values can be read from any thread.
unsafe impl Send for Weights {}
unsafe impl Sync for Weights {}

impl Weights {
    fn of(t: &Tensor) -> Result<Self> {
        if t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() {
            let (storage, layout) = t.storage_and_layout();
            if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage {
                let len = t.elem_count();
                let start = layout.start_offset();
                if start + len <= v.len() {
                    // SAFETY: in bounds (checked); the Vec lives as long as the storage, which
                    // `_tensor` keeps alive, and is never reallocated (see above).
                    let ptr = unsafe { v.as_ptr().add(start) };
                    return Ok(Self::Shared {
                        _tensor: t.clone(),
                        ptr,
                        len,
                    });
                }
            }
        }
        Ok(Self::Owned(to_vec(t)?))
    }

    /// A torch `Linear` weight `[n, k]` as a row-major `[k, n]` copy: the gemm reads it with
    /// unit stride along n, which runs the linears 5–25% faster than reading `[n, k]` in place
    /// (measured at the base model's shapes on one AVX-512 core: 500×3072×768 at 97 against
    /// 75 GFLOP/s). A parallel blocked transpose: ~0.13 s for the base model's 85 M weights on 2 cores.
    fn transposed(t: &Tensor) -> Result<Self> {
        let (n, k) = t.dims2()?;
        let src = Self::of(t)?;
        Ok(Self::Owned(transpose(&src, n, k)))
    }

    /// A linear weight stored in `layout`, as `[in, out]`: shared when the checkpoint was
    /// loaded that way (`LinearLayout::InOut`, what extract does), else a transposed copy.
    fn in_out(t: &Tensor, layout: LinearLayout) -> Result<Self> {
        match layout {
            LinearLayout::InOut => Self::of(t),
            LinearLayout::OutIn => Self::transposed(t),
        }
    }
}

impl std::ops::Deref for Weights {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            // SAFETY: see `Weights::of`.
            Self::Shared { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            Self::Owned(v) => v,
        }
    }
}

/// `f(i, chunk)` over the `len`-long chunks of `xs`, on the pool when `parallel`.
fn for_chunks(
    xs: &mut [f32],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if parallel {
        xs.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, chunk)| f(i, chunk));
    } else {
        xs.chunks_mut(len)
            .enumerate()
            .for_each(|(i, chunk)| f(i, chunk));
    }
}

/// `f(first_row, rows)` over blocks of `c`-wide rows of `xs`, on the pool when `parallel`.
fn for_rows(xs: &mut [f32], c: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Send + Sync) {
    for_chunks(xs, ROWS_PER_TASK * c, parallel, |i, rows| {
        f(i * ROWS_PER_TASK, rows)
    });
}

/// `dst[m, n] (row stride n) = bias + lhs · w`, where lhs row i is the k values from
/// `lhs[i·lhs_rs]` (rows may overlap: the zero-copy frames of a strided conv) and `w` is
/// row-major `[k, n]`; in blocks of [`gemm_block_rows`] rows, on the pool when `parallel`.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    lhs: &[f32],
    lhs_rs: usize,
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    dst: &mut [f32],
    n: usize,
    parallel: bool,
) {
    let block_rows = gemm_block_rows(dst.len() / n.max(1));
    let block = |bi: usize, rows: &mut [f32]| {
        if let Some(b) = bias {
            rows.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b));
        }
        let a = Mat {
            data: &lhs[bi * block_rows * lhs_rs..],
            rs: lhs_rs,
            cs: 1,
        };
        matmul_serial(
            rows.len() / n,
            n,
            k,
            rows,
            n,
            a,
            Mat::rows(w, n),
            bias.is_some(),
        );
    };
    for_chunks(dst, block_rows * n, parallel, block);
}

/// LayerNorm parameters (statistics in f64; `ops::norm`).
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: to_vec(&vb.get(dim, "weight")?)?,
            bias: to_vec(&vb.get(dim, "bias")?)?,
            eps,
        })
    }

    /// Normalises every row of `xs` in place.
    fn rows(&self, xs: &mut [f32]) {
        layer_norm_rows_in_place(xs, &self.weight, &self.bias, self.eps);
    }
}

/// An `nn.Linear` as `[in, out]` and its bias.
struct Dense {
    weight: Weights,
    bias: Vec<f32>,
}

impl Dense {
    fn load(vb: VarBuilder, d_in: usize, d_out: usize, layout: LinearLayout) -> Result<Self> {
        Ok(Self {
            weight: Weights::in_out(&vb.get(layout.shape(d_in, d_out), "weight")?, layout)?,
            bias: to_vec(&vb.get(d_out, "bias")?)?,
        })
    }

    /// `dst[m, out] = bias + x[m, in] · W`.
    fn forward(&self, x: &[f32], d_in: usize, dst: &mut [f32], parallel: bool) {
        let n = self.bias.len();
        gemm_rows(
            x,
            d_in,
            d_in,
            &self.weight,
            Some(&self.bias),
            dst,
            n,
            parallel,
        );
    }
}

/// What follows a feature-encoder conv.
enum Post {
    Act(Activation),
    LayerNormAct(Norm, Activation),
    /// GroupNorm(C, C) over the utterance's frames, then the activation (first conv only).
    GroupNormAct(Norm, Activation),
}

struct Conv {
    /// `[K·C_in, C_out]`, rows ordered (tap, input channel).
    weight: Weights,
    /// `W0 + W2` (`[C_in, C_out]`) of a 3-tap stride-2 conv, for [`Conv::forward_3s2`].
    outer_taps: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    kernel: usize,
    stride: usize,
    c_in: usize,
    c_out: usize,
    post: Post,
}

impl Conv {
    /// Mirrors `Wav2Vec2{NoLayerNorm,LayerNorm,GroupNorm}ConvLayer` (`vb` at conv `i`).
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, i: usize) -> Result<Self> {
        let (c_in, c_out) = (conv_in_channels(cfg, i), cfg.conv_dim[i]);
        let (kernel, stride) = (cfg.conv_kernel[i], cfg.conv_stride[i]);
        let act = activation(&cfg.feat_extract_activation)?;
        let norm = || Norm::load(vb.pp("layer_norm"), c_out, CONV_NORM_EPS);
        let post = match ConvNormKind::of(cfg, i) {
            ConvNormKind::None => Post::Act(act),
            ConvNormKind::Layer => Post::LayerNormAct(norm()?, act),
            ConvNormKind::Group => Post::GroupNormAct(norm()?, act),
        };
        let weight = Weights::of(&conv_frames_weight(&vb, cfg, i)?)?;
        let outer_taps = (kernel == 3 && stride == 2 && c_in > 1).then(|| {
            let n = c_in * c_out;
            let (w0, w2) = (&weight[..n], &weight[2 * n..3 * n]);
            w0.iter().zip(w2).map(|(a, b)| a + b).collect()
        });
        let bias = if cfg.conv_bias {
            Some(to_vec(&vb.get(c_out, "conv.bias")?)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            outer_taps,
            bias,
            kernel,
            stride,
            c_in,
            c_out,
            post,
        })
    }

    /// `x` [t_in, c_in] → [t_out, c_out]. A GroupNorm first conv takes its per-channel
    /// `affine` (scale, shift), which [`Conv::group_norm_affine`] computes over the whole
    /// utterance, so the conv itself can run over any window of it.
    fn forward(&self, x: &[f32], affine: Option<&Affine>, parallel: bool) -> Vec<f32> {
        let (k, s, c) = (self.kernel, self.stride, self.c_out);
        let t_in = x.len() / self.c_in;
        let t_out = conv_out_len(t_in, k, s);
        let mut out = vec![0f32; t_out * c];
        let bias = self.bias.as_deref();
        if self.c_in == 1 {
            if let Post::GroupNormAct(_, act) = &self.post {
                let affine = match affine {
                    Some(a) => a.clone(),
                    None => self.group_norm_affine(x, parallel),
                };
                for_rows(&mut out, c, parallel, |t0, rows| {
                    direct_conv_rows(x, &self.weight, bias, rows, t0, k, s);
                    for row in rows.chunks_exact_mut(c) {
                        for ((v, &sc), &sh) in row.iter_mut().zip(&affine.0).zip(&affine.1) {
                            *v = *v * sc + sh;
                        }
                    }
                    activate(*act, rows);
                });
                return out;
            }
            for_rows(&mut out, c, parallel, |t0, rows| {
                direct_conv_rows(x, &self.weight, bias, rows, t0, k, s);
                self.post_rows(rows);
            });
            return out;
        }
        match &self.outer_taps {
            Some(outer) if t_out >= 2 => self.forward_3s2(x, outer, &mut out, parallel),
            _ => gemm_rows(
                x,
                s * self.c_in,
                k * self.c_in,
                &self.weight,
                bias,
                &mut out,
                c,
                parallel,
            ),
        }
        for_rows(&mut out, c, parallel, |_, rows| self.post_rows(rows));
        out
    }

    /// A 3-tap stride-2 conv (most of the feature encoder's work) by polyphase Winograd
    /// F(2, 2): with taps W0, W1, W2 (`[C_in, C_out]` each) and e = x[2t], o = x[2t+1],
    ///   y[2p]   = b + o[2p]·W1   + (e[2p] − e[2p+1])·W0 + e[2p+1]·(W0 + W2)
    ///   y[2p+1] = b + o[2p+1]·W1 + (e[2p+2] − e[2p+1])·W2 + e[2p+1]·(W0 + W2)
    /// The shared product saves a sixth of the conv's multiply-adds; every other operand is
    /// the input read in place (strided rows). Pairs are cut into fixed blocks from row 0, so
    /// a row's bits do not depend on the pool; an odd last row is computed directly.
    fn forward_3s2(&self, x: &[f32], outer: &[f32], out: &mut [f32], parallel: bool) {
        const PAIRS: usize = GEMM_ROWS / 2;
        let (ci, co) = (self.c_in, self.c_out);
        let t_out = out.len() / co;
        let pairs = t_out / 2;
        let w = &self.weight[..];
        let bias = self.bias.as_deref();
        assert!(
            w.len() == 3 * ci * co && outer.len() == ci * co && x.len() >= (2 * t_out + 1) * ci,
            "forward_3s2: operands out of bounds"
        );
        let (w0, w1, w2) = (
            Mat::rows(&w[..ci * co], co),
            Mat::rows(&w[ci * co..2 * ci * co], co),
            Mat::rows(&w[2 * ci * co..], co),
        );
        let (paired, last) = out.split_at_mut(2 * pairs * co);
        let block = |bi: usize, y: &mut [f32]| {
            let p0 = bi * PAIRS;
            let np = y.len() / (2 * co);
            // rows 4p (e[2p]), 4p+2 (e[2p+1]), 4p+4 (e[2p+2]) of x, p = p0..p0+np
            let row = |r: usize| &x[r * ci..(r + 1) * ci];
            let mut before = vec![0f32; np * ci];
            let mut after = vec![0f32; np * ci];
            for (i, (b, a)) in before
                .chunks_exact_mut(ci)
                .zip(after.chunks_exact_mut(ci))
                .enumerate()
            {
                let p = p0 + i;
                let (e0, e1, e2) = (row(4 * p), row(4 * p + 2), row(4 * p + 4));
                for j in 0..ci {
                    b[j] = e0[j] - e1[j];
                    a[j] = e2[j] - e1[j];
                }
            }
            // every row y[2p + r] = b + o[2p + r]·W1: the odd rows of x from 4p0 + 1
            if let Some(b) = bias {
                y.chunks_exact_mut(co).for_each(|r| r.copy_from_slice(b));
            }
            let odd = Mat {
                data: &x[(4 * p0 + 1) * ci..],
                rs: 2 * ci,
                cs: 1,
            };
            matmul_serial(2 * np, co, ci, y, co, odd, w1, bias.is_some());
            // e[2p+1]·(W0 + W2), shared by both rows of the pair: rows 4p + 2 of x
            let mut shared = vec![0f32; np * co];
            let centre = Mat {
                data: &x[(4 * p0 + 2) * ci..],
                rs: 4 * ci,
                cs: 1,
            };
            matmul_serial(
                np,
                co,
                ci,
                &mut shared,
                co,
                centre,
                Mat::rows(outer, co),
                false,
            );
            // even rows += (e[2p] − e[2p+1])·W0, odd rows += (e[2p+2] − e[2p+1])·W2
            matmul_serial(np, co, ci, y, 2 * co, Mat::rows(&before, ci), w0, true);
            matmul_serial(
                np,
                co,
                ci,
                &mut y[co..],
                2 * co,
                Mat::rows(&after, ci),
                w2,
                true,
            );
            for (pair, s) in y.chunks_exact_mut(2 * co).zip(shared.chunks_exact(co)) {
                for half in pair.chunks_exact_mut(co) {
                    for (v, &a) in half.iter_mut().zip(s) {
                        *v += a;
                    }
                }
            }
        };
        for_chunks(paired, 2 * PAIRS * co, parallel, block);
        if !last.is_empty() {
            let t = t_out - 1;
            gemm_rows(&x[2 * t * ci..], 0, 3 * ci, w, bias, last, co, false);
        }
    }

    fn post_rows(&self, rows: &mut [f32]) {
        match &self.post {
            Post::Act(act) => activate(*act, rows),
            Post::LayerNormAct(norm, act) => {
                norm.rows(rows);
                activate(*act, rows);
            }
            Post::GroupNormAct(..) => unreachable!("group norm is fused into the first conv"),
        }
    }

    /// The per-channel scale and shift of a GroupNorm(C, C) first conv over the utterance `x`
    /// (its statistics in f64): the conv is cheap, so it runs once here for the statistics and
    /// again where its output is used, and its large output is never held whole.
    fn group_norm_affine(&self, x: &[f32], parallel: bool) -> Affine {
        let Post::GroupNormAct(norm, _) = &self.post else {
            unreachable!("only a GroupNorm conv has a group-norm affine")
        };
        let (k, s, c) = (self.kernel, self.stride, self.c_out);
        let bias = self.bias.as_deref();
        let t_out = conv_out_len(x.len(), k, s);
        let stats = |task: usize| {
            let t0 = task * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(t_out - t0);
            let mut y = vec![0f32; rows * c];
            direct_conv_rows(x, &self.weight, bias, &mut y, t0, k, s);
            let (mut s1, mut s2) = (vec![0f64; c], vec![0f64; c]);
            for row in y.chunks_exact(c) {
                for ((a, q), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                    *a += v as f64;
                    *q += v as f64 * v as f64;
                }
            }
            (s1, s2)
        };
        let add = |(mut a1, mut a2): (Vec<f64>, Vec<f64>), (b1, b2): (Vec<f64>, Vec<f64>)| {
            a1.iter_mut().zip(&b1).for_each(|(a, b)| *a += b);
            a2.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
            (a1, a2)
        };
        let zero = || (vec![0f64; c], vec![0f64; c]);
        // Partial sums per task, added in task order either way (the same bits).
        let tasks = t_out.div_ceil(ROWS_PER_TASK);
        let partials: Vec<_> = if parallel {
            (0..tasks).into_par_iter().map(stats).collect()
        } else {
            (0..tasks).map(stats).collect()
        };
        let (sum, sumsq) = partials.into_iter().fold(zero(), add);
        let n = t_out.max(1) as f64;
        let (mut scale, mut shift) = (vec![0f32; c], vec![0f32; c]);
        for i in 0..c {
            let mean = sum[i] / n;
            let var = (sumsq[i] / n - mean * mean).max(0.0);
            let sc = norm.weight[i] as f64 / (var + norm.eps).sqrt();
            scale[i] = sc as f32;
            shift[i] = (norm.bias[i] as f64 - mean * sc) as f32;
        }
        (scale, shift)
    }
}

/// Per-channel (scale, shift) of a GroupNorm(C, C) over a whole utterance.
type Affine = (Vec<f32>, Vec<f32>);

/// Output rows `t0..` of a one-input-channel conv (K taps, `w` `[K, C]`, C = `w.len() / k`):
/// `out[t] = bias + Σ_j x[t·s + j] · w[j]`, as direct FMAs (too thin for a gemm).
fn direct_conv_rows(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    t0: usize,
    k: usize,
    s: usize,
) {
    let c = w.len() / k;
    simd(
        #[inline(always)]
        || {
            for (i, row) in out.chunks_exact_mut(c).enumerate() {
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
                let xs = &x[(t0 + i) * s..(t0 + i) * s + k];
                for (&a, wj) in xs.iter().zip(w.chunks_exact(c)) {
                    row.iter_mut().zip(wj).for_each(|(o, &wv)| *o += a * wv);
                }
            }
        },
    );
}

/// The context buffer's pointer, shared by attention tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: tasks write disjoint elements only (see `CpuEncoder::attention`).
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The pointer `offset` elements on (the caller keeps it in bounds).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Receives the hidden states a forward keeps, as each is computed: kept state `k` (in
/// `keep` order) in one piece, or in blocks of frames, in order, from a chunked forward.
pub trait StateSink {
    /// Appends `values`, whole `[rows, H]` frames row-major, to kept state `k`.
    fn rows(&mut self, k: usize, values: &[f32]) -> Result<()>;
}

/// Collects copies of the states.
impl StateSink for Vec<Vec<f32>> {
    fn rows(&mut self, k: usize, values: &[f32]) -> Result<()> {
        if self.len() <= k {
            self.resize_with(k + 1, Vec::new);
        }
        self[k].extend_from_slice(values);
        Ok(())
    }
}

/// One Transformer layer's weights (mirrors `Wav2Vec2EncoderLayer`, `vb` at layer l).
struct Layer {
    /// `[H, 3H]`: q (pre-scaled by head_dim^-0.5), k, v.
    qkv: Dense,
    out: Dense,
    ln1: Norm,
    ff1: Dense,
    ff2: Dense,
    ln2: Norm,
    /// WavLM: the gate of the relative position bias.
    gate: Option<Gate>,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let (h, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let (attn, ff) = (vb.pp("attention"), vb.pp("feed_forward"));
        let (qkv_w, qkv_b) = qkv_projection(&attn, cfg, layout)?;
        Ok(Self {
            qkv: Dense {
                weight: Weights::in_out(&qkv_w, layout)?,
                bias: to_vec(&qkv_b)?,
            },
            out: Dense::load(attn.pp("out_proj"), h, h, layout)?,
            ln1: Norm::load(vb.pp("layer_norm"), h, eps)?,
            ff1: Dense::load(ff.pp("intermediate_dense"), h, f, layout)?,
            ff2: Dense::load(ff.pp("output_dense"), f, h, layout)?,
            ln2: Norm::load(vb.pp("final_layer_norm"), h, eps)?,
            gate: cfg.is_wavlm().then(|| Gate::load(&attn, cfg)).transpose()?,
        })
    }

    /// WavLM: this layer's gated position bias for its attention input `x`.
    fn position_bias<'a>(
        &self,
        table: Option<&'a BiasTable>,
        x: &[f32],
        h: usize,
    ) -> Option<PositionBias<'a>> {
        Some(self.gate.as_ref()?.bias(table?, x, h))
    }
}

/// Reusable per-call buffers of the Transformer layers.
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    proj: Vec<f32>,
    normed: Vec<f32>,
    /// WavLM: the utterance's ungated relative position bias.
    bias_table: Option<BiasTable>,
}

/// The CPU f32 inference executor of the wav2vec 2.0 / HuBERT / WavLM / data2vec-audio encoder,
/// over its own f32 copy of the weights (f32 CPU tensors are read in place).
pub struct CpuEncoder {
    cfg: Wav2Vec2Config,
    convs: Vec<Conv>,
    proj_norm: Option<Norm>,
    projection: Dense,
    /// `[G, K·C_g, C_g]`.
    pos_w: Weights,
    pos_b: Vec<f32>,
    pos_act: Activation,
    enc_norm: Norm,
    layers: Vec<Layer>,
    ffn_act: Activation,
    /// Attention tiles: (query rows per task, keys per score tile).
    attention_blocks: (usize, usize),
    /// Fixed windows for long utterances (`extract --chunk-seconds`), off by default.
    chunking: Option<Chunking>,
    /// WavLM: the first layer's relative position embedding.
    rel_positions: Option<RelativePositions>,
    /// data2vec-audio: the positional conv stack (instead of `pos_w`, `pos_b`).
    pos_stack: Option<CpuPositionalStack>,
}

impl CpuEncoder {
    /// Loads from a `VarBuilder` over the canonical names of `config::expected_tensors`, with
    /// the `nn.Linear` weights in `layout` (what `Wav2Vec2Model::load_with_layout` reads);
    /// contiguous f32 CPU tensors are read in place, any others copied as f32.
    pub fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let fe = vb.pp("feature_extractor").pp("conv_layers");
        let convs = (0..cfg.conv_dim.len())
            .into_par_iter()
            .map(|i| Conv::load(fe.pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let fp = vb.pp("feature_projection");
        let c = cfg.conv_dim[cfg.conv_dim.len() - 1];
        let enc = vb.pp("encoder");
        let pos = enc.pp("pos_conv_embed").pp("conv");
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| Layer::load(enc.pp("layers").pp(l), cfg, layout))
            .collect::<Result<Vec<_>>>()?;
        let (pos_w, pos_b, pos_stack) = if cfg.is_data2vec_audio() {
            let stack = CpuPositionalStack::load(&enc.pp("pos_conv_embed"), cfg)?;
            (Weights::Owned(Vec::new()), Vec::new(), Some(stack))
        } else {
            let w = Weights::of(&positional_conv_weight(&pos, cfg)?)?;
            (w, to_vec(&pos.get(h, "bias")?)?, None)
        };
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            proj_norm: cfg
                .has_feat_proj_layer_norm()
                .then(|| Norm::load(fp.pp("layer_norm"), c, eps))
                .transpose()?,
            projection: Dense::load(fp.pp("projection"), c, h, layout)?,
            pos_w,
            pos_b,
            pos_act: activation(&cfg.feat_extract_activation)?,
            enc_norm: Norm::load(enc.pp("layer_norm"), h, eps)?,
            layers,
            ffn_act: activation(&cfg.hidden_act)?,
            attention_blocks: (QUERY_BLOCK, KEY_BLOCK),
            chunking: None,
            rel_positions: cfg
                .is_wavlm()
                .then(|| RelativePositions::load(&enc.pp("layers").pp(0).pp("attention"), cfg))
                .transpose()?,
            pos_stack,
        })
    }

    pub fn config(&self) -> &Wav2Vec2Config {
        &self.cfg
    }

    /// Sets the attention tiles: `query_rows` queries per task, `keys` keys per score tile
    /// (at least 1 each). Results agree to rounding whatever the tiles (tests use tiny ones);
    /// the bits depend on the tiles, never on the threads.
    pub fn set_attention_blocks(&mut self, query_rows: usize, keys: usize) {
        self.attention_blocks = (query_rows.max(1), keys.max(1));
    }

    /// Frames of the model output for `n` samples.
    pub fn frames_for_samples(&self, n: usize) -> usize {
        super::frames_for_samples(&self.cfg, n)
    }

    /// Runs one utterance `wave` (already normalised when the model asks for it) and returns
    /// the hidden states `keep` (sorted, numbered as transformers' `hidden_states`), each
    /// `[T, H]` row-major, and T. Computes no layer past the last one kept. `parallel`
    /// spreads every op over the current rayon pool (the same bits); otherwise all runs on
    /// this thread.
    pub fn forward(
        &self,
        wave: &[f32],
        keep: &[usize],
        parallel: bool,
    ) -> Result<(Vec<Vec<f32>>, usize)> {
        self.forward_profiled(wave, keep, parallel, &mut Profiler::disabled())
    }

    /// `forward`, timing every step into `prof`.
    pub fn forward_profiled(
        &self,
        wave: &[f32],
        keep: &[usize],
        parallel: bool,
        prof: &mut Profiler,
    ) -> Result<(Vec<Vec<f32>>, usize)> {
        let mut states = Vec::with_capacity(keep.len());
        let t = self.forward_into(wave, keep, parallel, prof, &mut states)?;
        Ok((states, t))
    }

    /// `forward_profiled`, handing each kept state to `sink` as soon as it is computed (no
    /// copy of the states is held here: a sink that encodes them to f16 halves their memory).
    /// With chunking set and an utterance longer than a window, the windows run one after
    /// the other and each hands its kept frames on. Returns T.
    pub fn forward_into(
        &self,
        wave: &[f32],
        keep: &[usize],
        parallel: bool,
        prof: &mut Profiler,
        sink: &mut dyn StateSink,
    ) -> Result<usize> {
        let Some(windows) = self.chunking.and_then(|c| c.windows(&self.cfg, wave.len())) else {
            return self.forward_whole_into(wave, keep, parallel, prof, sink);
        };
        let h = self.cfg.hidden_size;
        let mut frames = 0;
        for w in windows {
            let mut states: Vec<Vec<f32>> = Vec::with_capacity(keep.len());
            self.forward_whole_into(&wave[w.samples.clone()], keep, parallel, prof, &mut states)?;
            for (k, state) in states.iter().enumerate() {
                sink.rows(k, &state[w.keep.start * h..w.keep.end * h])?;
            }
            frames += w.keep.len();
        }
        Ok(frames)
    }

    /// Cuts utterances longer than a window into fixed windows (see [`Chunking`]); `None`
    /// runs every utterance whole.
    pub fn set_chunking(&mut self, chunking: Option<Chunking>) {
        self.chunking = chunking;
    }

    /// `forward_into` over the whole utterance at once.
    fn forward_whole_into(
        &self,
        wave: &[f32],
        keep: &[usize],
        parallel: bool,
        prof: &mut Profiler,
        sink: &mut dyn StateSink,
    ) -> Result<usize> {
        let last = keep.iter().copied().max().unwrap_or(0);
        if last > self.layers.len() {
            candle_core::bail!(
                "hidden state {last} asked of a model with {} layers",
                self.layers.len()
            );
        }
        let t = self.frames_for_samples(wave.len());
        if t == 0 {
            candle_core::bail!(
                "{} samples are shorter than the model's receptive field",
                wave.len()
            );
        }
        let (h, pre_ln) = (self.cfg.hidden_size, self.cfg.do_stable_layer_norm);
        let mut hs = prof.time(Kind::Conv, || self.front_end(wave, t, parallel));
        let pos = prof.time(Kind::Conv, || self.positional(&hs, t, parallel));
        prof.time(Kind::Norm, || {
            for_rows(&mut hs, h, parallel, |t0, rows| {
                for (v, p) in rows.iter_mut().zip(&pos[t0 * h..]) {
                    *v += p;
                }
                if !pre_ln {
                    self.enc_norm.rows(rows);
                }
            })
        });
        drop(pos);
        let mut kept = 0;
        if keep.contains(&0) {
            prof.time(Kind::Other, || sink.rows(kept, &hs))?;
            kept += 1;
        }
        let mut scratch = Scratch {
            qkv: vec![0f32; t * 3 * h],
            ctx: vec![0f32; t * h],
            proj: vec![0f32; t * h],
            normed: if pre_ln {
                vec![0f32; t * h]
            } else {
                Vec::new()
            },
            bias_table: self.rel_positions.as_ref().map(|r| r.table(t)),
        };
        for (l, layer) in self.layers[..last].iter().enumerate() {
            self.layer(layer, &mut hs, t, &mut scratch, parallel, prof);
            if keep.contains(&(l + 1)) {
                if pre_ln && l + 1 == self.layers.len() {
                    // The stable-LN encoder normalises only its final output.
                    prof.time(Kind::Norm, || {
                        for_rows(&mut hs, h, parallel, |_, rows| self.enc_norm.rows(rows))
                    });
                }
                prof.time(Kind::Other, || sink.rows(kept, &hs))?;
                kept += 1;
            }
        }
        Ok(t)
    }

    /// The feature encoder and the feature projection: `[t, H]` for `wave`. Runs in fixed
    /// windows of `FRONT_END_FRAMES` output frames, each with its receptive field of samples
    /// through the whole conv stack on one thread (windows in parallel when `parallel`), so
    /// the memory is a window's conv outputs per thread, whatever the length; a GroupNorm
    /// first conv takes its statistics over the whole utterance first.
    fn front_end(&self, wave: &[f32], t: usize, parallel: bool) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let c = self.convs.last().map_or(1, |c| c.c_out);
        let affine = self
            .convs
            .first()
            .filter(|conv| conv.c_in == 1 && matches!(conv.post, Post::GroupNormAct(..)))
            .map(|conv| conv.group_norm_affine(wave, parallel));
        let mut hs = vec![0f32; t * h];
        let window = |wi: usize, rows: &mut [f32]| {
            let f0 = wi * FRONT_END_FRAMES;
            let n = rows.len() / h;
            // The samples the window's frames read: back through every conv.
            let (mut a, mut b) = (f0, f0 + n);
            for conv in self.convs.iter().rev() {
                a *= conv.stride;
                b = (b - 1) * conv.stride + conv.kernel;
            }
            let mut x = self
                .convs
                .iter()
                .enumerate()
                .fold(wave[a..b].to_vec(), |x, (i, conv)| {
                    conv.forward(&x, affine.as_ref().filter(|_| i == 0), false)
                });
            if let Some(norm) = &self.proj_norm {
                for_rows(&mut x, c, false, |_, r| norm.rows(r));
            }
            self.projection.forward(&x, c, rows, false);
        };
        for_chunks(&mut hs, FRONT_END_FRAMES * h, parallel, window);
        hs
    }

    /// The weight-normed grouped positional conv (`K/2` zero padding both sides, the first T
    /// outputs) and its activation; data2vec-audio's stack instead when the model has one.
    fn positional(&self, x: &[f32], t: usize, parallel: bool) -> Vec<f32> {
        if let Some(stack) = &self.pos_stack {
            return stack.forward(x, t, parallel);
        }
        let (h, g, k) = (
            self.cfg.hidden_size,
            self.cfg.num_conv_pos_embedding_groups,
            self.cfg.num_conv_pos_embeddings,
        );
        let cg = h / g;
        let pad = k / 2;
        let tp = t + 2 * pad;
        // Group-major, zero-padded copy: the K frames an output reads are one contiguous run.
        let mut xg = vec![0f32; g * tp * cg];
        for (gi, dst) in xg.chunks_exact_mut(tp * cg).enumerate() {
            for (row, src) in dst[pad * cg..(pad + t) * cg]
                .chunks_exact_mut(cg)
                .zip(x.chunks_exact(h))
            {
                row.copy_from_slice(&src[gi * cg..(gi + 1) * cg]);
            }
        }
        // One gemm per group into its own [T, C_g] block (disjoint, so groups run in parallel).
        let mut yg = vec![0f32; g * t * cg];
        let group = |gi: usize, y: &mut [f32]| {
            let bias = &self.pos_b[gi * cg..(gi + 1) * cg];
            y.chunks_exact_mut(cg).for_each(|r| r.copy_from_slice(bias));
            let frames = Mat {
                data: &xg[gi * tp * cg..(gi + 1) * tp * cg],
                rs: cg,
                cs: 1,
            };
            let w = Mat::rows(&self.pos_w[gi * k * cg * cg..(gi + 1) * k * cg * cg], cg);
            matmul_serial(t, cg, k * cg, y, cg, frames, w, true);
        };
        for_chunks(&mut yg, t * cg, parallel, group);
        // Back to time-major [T, H], then the activation.
        let mut out = vec![0f32; t * h];
        for_rows(&mut out, h, parallel, |t0, rows| {
            for (i, row) in rows.chunks_exact_mut(h).enumerate() {
                for (gi, dst) in row.chunks_exact_mut(cg).enumerate() {
                    let at = (gi * t + t0 + i) * cg;
                    dst.copy_from_slice(&yg[at..at + cg]);
                }
            }
            activate(self.pos_act, rows);
        });
        out
    }

    /// One Transformer layer on `x` [T, H] in place (post-LN or pre-LN).
    fn layer(
        &self,
        p: &Layer,
        x: &mut [f32],
        t: usize,
        s: &mut Scratch,
        parallel: bool,
        prof: &mut Profiler,
    ) {
        let h = self.cfg.hidden_size;
        let buffers = (&mut s.qkv, &mut s.ctx, &mut s.proj);
        if self.cfg.do_stable_layer_norm {
            prof.time(Kind::Norm, || {
                s.normed.copy_from_slice(x);
                for_rows(&mut s.normed, h, parallel, |_, rows| p.ln1.rows(rows));
            });
            let bias = prof.time(Kind::Attention, || {
                p.position_bias(s.bias_table.as_ref(), &s.normed, h)
            });
            self.attention(p, &s.normed, t, buffers, bias.as_ref(), parallel, prof);
            prof.time(Kind::Norm, || {
                add_rows(x, &s.proj, h, None, parallel);
                s.normed.copy_from_slice(x);
                for_rows(&mut s.normed, h, parallel, |_, rows| p.ln2.rows(rows));
            });
            self.feed_forward(p, &s.normed, &mut s.proj, parallel, prof);
            prof.time(Kind::Elementwise, || {
                add_rows(x, &s.proj, h, None, parallel)
            });
        } else {
            let bias = prof.time(Kind::Attention, || {
                p.position_bias(s.bias_table.as_ref(), x, h)
            });
            self.attention(p, x, t, buffers, bias.as_ref(), parallel, prof);
            prof.time(Kind::Norm, || {
                add_rows(x, &s.proj, h, Some(&p.ln1), parallel)
            });
            self.feed_forward(p, x, &mut s.proj, parallel, prof);
            prof.time(Kind::Norm, || {
                add_rows(x, &s.proj, h, Some(&p.ln2), parallel)
            });
        }
    }

    /// Self-attention of `x` [T, H] into `out` [T, H] (out_proj applied).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        p: &Layer,
        x: &[f32],
        t: usize,
        (qkv, ctx, out): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        bias: Option<&PositionBias>,
        parallel: bool,
        prof: &mut Profiler,
    ) {
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let dh = h / heads;
        prof.time(Kind::Linear, || p.qkv.forward(x, h, qkv, parallel));
        let qkv: &[f32] = qkv;
        let (block, key_block) = self.attention_blocks;
        // One task per (block of query rows, head): blockwise attention over key tiles (no
        // [rows, T] scores) into the task's own [rows, d_h], then copied into its disjoint
        // columns of the context. Each task runs serially, so the pool never changes a bit.
        let qblocks = t.div_ceil(block);
        let dst = SharedDst(ctx.as_mut_ptr());
        let task = |task: usize| {
            let (bi, head) = (task / heads, task % heads);
            let q0 = bi * block;
            let rows = block.min(t - q0);
            let mut buf = FlashBuffers::default();
            let mut o = vec![0f32; rows * dh];
            let at = |base: usize| Mat {
                data: &qkv[base + head * dh..],
                rs: 3 * h,
                cs: 1,
            };
            // WavLM: the gated relative position bias of this head and these queries,
            // added to each score tile
            let add = |k0: usize, tile: &mut [f32], cols: usize| {
                if let Some(b) = bias {
                    b.add_to_block(head, q0, k0, tile, cols)
                }
            };
            flash_attention(
                at(q0 * 3 * h),
                at(h),
                at(2 * h),
                (rows, t, dh),
                key_block,
                bias.map(|_| &add as ScoreBias),
                &mut buf,
                &mut o,
                dh,
            );
            for (r, src) in o.chunks_exact(dh).enumerate() {
                // SAFETY: row q0 + r, columns head·dh.. of the [t, h] context: in bounds, and
                // written by this task only (tasks own disjoint (rows, head) blocks).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.at((q0 + r) * h + head * dh),
                        dh,
                    )
                };
            }
        };
        debug_assert_eq!(ctx.len(), t * h);
        prof.time(Kind::Attention, || {
            if parallel {
                (0..qblocks * heads).into_par_iter().for_each(task)
            } else {
                (0..qblocks * heads).for_each(task)
            }
        });
        prof.time(Kind::Linear, || p.out.forward(ctx, h, out, parallel));
    }

    /// `out` [T, H] = W2 · act(W1 · x + b1) + b2, in blocks of [`gemm_block_rows`] rows (the blocks
    /// every gemm uses anyway), each through its own `[rows, F]` buffer: the intermediate is
    /// never held for the whole utterance.
    fn feed_forward(
        &self,
        p: &Layer,
        x: &[f32],
        out: &mut [f32],
        parallel: bool,
        prof: &mut Profiler,
    ) {
        let (h, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        prof.time(Kind::Linear, || {
            let block = gemm_block_rows(out.len() / h);
            for_chunks(out, block * h, parallel, |bi, out_rows| {
                let rows = out_rows.len() / h;
                let x_rows = &x[bi * block * h..(bi * block + rows) * h];
                let mut ff = vec![0f32; rows * f];
                p.ff1.forward(x_rows, h, &mut ff, false);
                activate(self.ffn_act, &mut ff);
                p.ff2.forward(&ff, f, out_rows, false);
            })
        });
    }

    /// Runs utterances `0..n` (`wave(i)` gives utterance i, normalised, of `samples(i)`
    /// samples) and hands each result to `sink(i, ..)` as soon as it is done, from the thread
    /// that computed it; when `sink` returns false, no further utterance is started. See
    /// [`CpuEncoder::run_each_into`] for the schedule.
    pub fn run_each<W, S>(
        &self,
        n: usize,
        keep: &[usize],
        samples: &(dyn Fn(usize) -> usize + Sync),
        wave: W,
        sink: S,
    ) where
        W: Fn(usize) -> Vec<f32> + Sync,
        S: Fn(usize, Result<(Vec<Vec<f32>>, usize)>) -> bool + Sync,
    {
        self.run_each_into(n, keep, samples, wave, |_| Vec::new(), sink, None)
    }

    /// `run_each` with the states of utterance i handed to `states(i)`, a [`StateSink`], as
    /// they are computed, and every utterance's profile added to `profile` when given (its
    /// times summed over the threads).
    ///
    /// The schedule, in store order: a run of short utterances with at least as many as pool
    /// threads goes one utterance per thread, each thread taking the next (no barriers, every
    /// core busy); a long one (`LONG_FRAMES` or more) or a run shorter than the pool runs one
    /// utterance at a time with every op spread over the pool, so a long recording among
    /// short ones never leaves the other cores idle while one thread grinds through it. An
    /// utterance's bits do not depend on which way it ran.
    #[allow(clippy::too_many_arguments)]
    pub fn run_each_into<W, N, K, S>(
        &self,
        n: usize,
        keep: &[usize],
        samples: &(dyn Fn(usize) -> usize + Sync),
        wave: W,
        states: N,
        sink: S,
        profile: Option<&Mutex<Profile>>,
    ) where
        W: Fn(usize) -> Vec<f32> + Sync,
        N: Fn(usize) -> K + Sync,
        K: StateSink,
        S: Fn(usize, Result<(K, usize)>) -> bool + Sync,
    {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let run = |i: usize, parallel: bool| {
            let mut prof = if profile.is_some() {
                Profiler::enabled()
            } else {
                Profiler::disabled()
            };
            let mut kept = states(i);
            let result = self
                .forward_into(&wave(i), keep, parallel, &mut prof, &mut kept)
                .map(|t| (kept, t));
            if let Some(Ok(mut total)) = profile.map(Mutex::lock) {
                total.add(&prof.take());
            }
            sink(i, result)
        };
        let threads = rayon::current_num_threads();
        let long = |i: usize| self.frames_for_samples(samples(i)) >= LONG_FRAMES;
        let mut start = 0;
        while start < n {
            if long(start) || threads == 1 {
                if !run(start, threads > 1) {
                    return;
                }
                start += 1;
                continue;
            }
            let end = (start..n).find(|&i| long(i)).unwrap_or(n);
            if end - start < threads {
                for i in start..end {
                    if !run(i, true) {
                        return;
                    }
                }
                start = end;
                continue;
            }
            let (next, stop) = (AtomicUsize::new(start), AtomicBool::new(false));
            rayon::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|_| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if !run(i, false) {
                            stop.store(true, Ordering::Relaxed);
                        }
                    });
                }
            });
            if stop.load(Ordering::Relaxed) {
                return;
            }
            start = end;
        }
    }

    /// `Wav2Vec2Model::forward` on this executor: `wave` [B, S] (f32 on the CPU) with
    /// `lengths`, every utterance run alone (no padding) through `run_each`, laid out as the
    /// padded `[B, T, H]` states of the tensor-op path (zeros past the valid frames).
    pub fn forward_padded(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
        profile: Option<&Mutex<Profile>>,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let (b, s) = wave.dims2()?;
        check_batch(&self.cfg, (b, s), lengths, max_hidden_state)?;
        let t = self.frames_for_samples(s);
        let h = self.cfg.hidden_size;
        let rows = wave.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let valid: Vec<usize> = lengths
            .iter()
            .map(|&n| self.frames_for_samples(n))
            .collect();
        let keep: Vec<usize> = (0..=max_hidden_state).collect();
        let runnable: Vec<usize> = (0..b).filter(|&i| valid[i] > 0).collect();
        let results = Mutex::new((0..b).map(|_| None).collect::<Vec<_>>());
        self.run_each_into(
            runnable.len(),
            &keep,
            &|j| lengths[runnable[j]],
            |j| rows[runnable[j]][..lengths[runnable[j]]].to_vec(),
            |_| Vec::new(),
            |j, r| match results.lock() {
                Ok(mut slots) => {
                    slots[runnable[j]] = Some(r);
                    true
                }
                Err(_) => false,
            },
            profile,
        );
        let results = results
            .into_inner()
            .map_err(|_| candle_core::Error::Msg("a CPU engine thread panicked".into()))?;
        let mut flat = vec![vec![0f32; b * t * h]; keep.len()];
        for (i, r) in results.into_iter().enumerate() {
            let Some(r) = r else { continue };
            let (states, n) = r?;
            for (dst, state) in flat.iter_mut().zip(states) {
                dst[i * t * h..(i * t + n) * h].copy_from_slice(&state);
            }
        }
        let states = flat
            .into_iter()
            .map(|v| Tensor::from_vec(v, (b, t, h), &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        Ok((states, valid))
    }

    /// Peak bytes a forward allocates for an utterance of `samples` samples whose `kept`
    /// hidden states the sink holds at `state_bytes` bytes a value (4 as f32 copies, 2 as
    /// f16), with `threads` tasks at a time: a front-end window's conv outputs per thread, the
    /// positional conv's copies, the layer buffers and a feed-forward block and attention
    /// tile per thread, and the states. For memory planning (`extract` refuses or schedules
    /// by it).
    pub fn peak_bytes(
        &self,
        samples: usize,
        kept: usize,
        state_bytes: usize,
        threads: usize,
    ) -> u64 {
        let (t, h) = (self.frames_for_samples(samples), self.cfg.hidden_size);
        let threads = threads.max(1);
        // the states cover the utterance; the buffers one window of it when chunked
        let states = (kept * t * h * state_bytes) as u64;
        let (t, window_states) = match self.chunking {
            Some(c) if c.windows(&self.cfg, samples).is_some() => {
                let tw = t.min(c.window_frames(&self.cfg));
                (tw, kept * tw * h)
            }
            _ => (t, 0),
        };
        // one window of the conv stack, from its last output back to its samples
        let mut rows = FRONT_END_FRAMES.min(t.max(1));
        let mut window = 0;
        for conv in self.convs.iter().rev() {
            let rows_in = (rows - 1) * conv.stride + conv.kernel;
            window = window.max(rows_in * conv.c_in + rows * conv.c_out);
            rows = rows_in;
        }
        let front = t * h + threads * window;
        // padded group-major copy, the per-group outputs and the output, beside the states
        let pos = (t + self.cfg.num_conv_pos_embeddings) * h + 3 * t * h;
        let pre_ln = usize::from(self.cfg.do_stable_layer_norm);
        let (qb, kb) = self.attention_blocks;
        let per_task = GEMM_ROWS * self.cfg.intermediate_size
            + qb * (kb + 2 * h / self.cfg.num_attention_heads.max(1) + 2);
        let layers = t * h * (6 + pre_ln) + threads * per_task;
        let values = (front.max(pos).max(layers) + window_states) as u64 * 4;
        values + states
    }
}

/// `x += y` row by row, then the LayerNorm `norm` when given.
fn add_rows(x: &mut [f32], y: &[f32], h: usize, norm: Option<&Norm>, parallel: bool) {
    for_rows(x, h, parallel, |t0, rows| {
        for (v, &a) in rows.iter_mut().zip(&y[t0 * h..]) {
            *v += a;
        }
        if let Some(norm) = norm {
            norm.rows(rows);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{Activation, Conv, Post, Weights};

    /// A 3-tap stride-2 conv with deterministic pseudo-random weights.
    fn conv(c_in: usize, c_out: usize, winograd: bool) -> Conv {
        let value = |i: usize, salt: usize| {
            let h = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(40503)) % 1000;
            h as f32 / 1000.0 - 0.5
        };
        let weight: Vec<f32> = (0..3 * c_in * c_out).map(|i| value(i, 1) * 0.2).collect();
        let n = c_in * c_out;
        let outer: Vec<f32> = (0..n).map(|i| weight[i] + weight[2 * n + i]).collect();
        Conv {
            weight: Weights::Owned(weight),
            outer_taps: winograd.then_some(outer),
            bias: Some((0..c_out).map(|i| value(i, 2)).collect()),
            kernel: 3,
            stride: 2,
            c_in,
            c_out,
            post: Post::Act(Activation::Gelu),
        }
    }

    #[test]
    fn winograd_stride2_conv_equals_the_direct_conv() {
        let (c_in, c_out) = (24, 20);
        let (direct, fast) = (conv(c_in, c_out, false), conv(c_in, c_out, true));
        // t_out = 2, 3 (odd last row), 7, and across the 1,024-row blocks
        for t_in in [5, 7, 16, 2051, 4101] {
            let x: Vec<f32> = (0..t_in * c_in)
                .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
                .collect();
            let want = direct.forward(&x, None, false);
            let got = fast.forward(&x, None, false);
            assert_eq!(want.len(), got.len());
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 2e-6, "t_in {t_in}: {worst}");
            assert_eq!(
                fast.forward(&x, None, true),
                got,
                "pool and one thread give the same bits"
            );
        }
    }
}
