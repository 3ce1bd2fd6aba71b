//! The wav2vec 2.0 / HuBERT encoder for CPU f32 inference, one utterance at a time on plain
//! slices: the engine `extract` runs on the CPU.
//!
//! One utterance per call, with no padding and no mask: every matmul is one single-threaded
//! `gemm` on strided views (the attention heads read the fused q/k/v projection in place, so
//! there are no head split or merge copies), and attention is computed in blocks of queries, so
//! its memory is O(T · block) instead of O(heads · T²) and the scores stay in cache. Callers
//! run different utterances on different threads (`parallel = false`), which keeps both cores
//! busy with no barrier per op; a lone utterance can instead spread every op over the pool
//! (`parallel = true`). Numerics are those of the candle model (`Wav2Vec2Model`): statistics in
//! f64, the same fused kernels for GELU and softmax, the same weight layouts.
use super::tensor_ops as ops;
use super::{
    conv_out_len, ConvNorm, EncoderLayer, Linear, LinearLayout, Wav2Vec2Model, CONV_NORM_EPS,
};
use crate::models::ssl::config::Activation;
use crate::ops::gemm::{matmul_serial, transpose, Mat};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Scores per attention block (query rows × keys): 512 KiB of f32, half a core's L2.
const BLOCK_SCORES: usize = 1 << 17;
/// Rows per task of row-wise work when an op is spread over the pool.
const ROWS_PER_TASK: usize = 64;

/// Stages of `CpuEncoder::profile`.
pub const STAGES: [&str; 7] = [
    "feature encoder convs",
    "projection + positional conv",
    "q/k/v projection",
    "attention (scores, softmax, context)",
    "attention output projection",
    "feed-forward",
    "residuals + layer norms",
];

/// CPU seconds per stage, summed over the threads that ran the engine (thread CPU time, so
/// other processes on the machine do not inflate it).
#[derive(Default)]
struct Profile {
    nanos: [std::sync::atomic::AtomicU64; STAGES.len()],
}

/// This thread's CPU time in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Charges the thread CPU time since the previous lap to a stage (when profiling).
struct Laps<'a> {
    profile: Option<&'a Profile>,
    last: u64,
}

impl<'a> Laps<'a> {
    fn new(profile: Option<&'a Profile>) -> Self {
        let last = if profile.is_some() {
            thread_cpu_nanos()
        } else {
            0
        };
        Self { profile, last }
    }

    fn lap(&mut self, stage: usize) {
        if let Some(p) = self.profile {
            let now = thread_cpu_nanos();
            p.nanos[stage].fetch_add(now - self.last, std::sync::atomic::Ordering::Relaxed);
            self.last = now;
        }
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// A weight matrix the engine reads in place: the values of a contiguous f32 CPU tensor,
/// shared with the candle model (no copy at load), or an f32 copy of any other tensor.
enum Weights {
    Shared {
        /// Keeps the storage alive; never written (model weights are not `Var`s).
        _tensor: Tensor,
        ptr: *const f32,
        len: usize,
    },
    Owned(Vec<f32>),
}

// SAFETY: `Shared` points into the storage of a tensor it keeps alive and that nothing
// writes to (the engine and the candle model only read their weights), so the values can be
// read from any thread.
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
}

impl Weights {
    /// A torch `Linear` weight `[n, k]` as a row-major `[k, n]` copy: the gemm reads it with
    /// unit stride along n, which runs the linears 5–25% faster than reading `[n, k]` in place
    /// (measured at the base model's shapes on one AVX-512 core: 500×3072×768 at 97 against
    /// 75 GFLOP/s). A parallel blocked transpose: ~0.13 s for the base model's 85 M weights on 2 cores.
    fn transposed(t: &Tensor) -> Result<Self> {
        let (n, k) = t.dims2()?;
        let src = Self::of(t)?;
        Ok(Self::Owned(transpose(&src, n, k)))
    }

    /// A linear layer's weight as `[in, out]`: shared when the checkpoint was loaded in that
    /// layout (`LinearLayout::InOut`, what extract does), else a transposed copy.
    fn linear(l: &Linear) -> Result<Self> {
        match l.layout {
            LinearLayout::InOut => Self::of(&l.weight),
            LinearLayout::OutIn => Self::transposed(&l.weight),
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

impl Layer {
    fn of(l: &EncoderLayer) -> Result<Self> {
        Ok(Self {
            qkv_w: Weights::linear(&l.attention.qkv_proj)?,
            qkv_b: to_vec(&l.attention.qkv_proj.bias)?,
            out_w: Weights::linear(&l.attention.out_proj)?,
            out_b: to_vec(&l.attention.out_proj.bias)?,
            ln1: Norm::from(&l.layer_norm.weight, &l.layer_norm.bias, l.layer_norm.eps)?,
            ff1_w: Weights::linear(&l.feed_forward.intermediate_dense)?,
            ff1_b: to_vec(&l.feed_forward.intermediate_dense.bias)?,
            ff2_w: Weights::linear(&l.feed_forward.output_dense)?,
            ff2_b: to_vec(&l.feed_forward.output_dense.bias)?,
            ln2: Norm::from(
                &l.final_layer_norm.weight,
                &l.final_layer_norm.bias,
                l.final_layer_norm.eps,
            )?,
        })
    }
}

/// LayerNorm parameters (statistics in f64, two passes, as the candle path).
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f64,
}

impl Norm {
    fn from(weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: to_vec(weight)?,
            bias: to_vec(bias)?,
            eps,
        })
    }

    /// Normalises every row of `xs` in place.
    fn rows(&self, xs: &mut [f32]) {
        let c = self.weight.len();
        for row in xs.chunks_exact_mut(c) {
            let mean = lane_sum(row, |v| v) / c as f64;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / c as f64;
            let rstd = 1.0 / (var + self.eps).sqrt();
            let (mean, rstd) = (mean as f32, rstd as f32);
            for ((y, &w), &b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *y = (*y - mean) * rstd * w + b;
            }
        }
    }
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

/// `f(first_row, rows)` over blocks of `c`-wide rows of `xs`, on the pool when `parallel`.
fn for_rows(xs: &mut [f32], c: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Send + Sync) {
    let task = ROWS_PER_TASK * c;
    if parallel {
        xs.par_chunks_mut(task)
            .enumerate()
            .for_each(|(i, rows)| f(i * ROWS_PER_TASK, rows));
    } else {
        xs.chunks_mut(task)
            .enumerate()
            .for_each(|(i, rows)| f(i * ROWS_PER_TASK, rows));
    }
}

/// Rows per gemm call (large enough that repacking the weights per call costs ~2%). Every matmul is cut into the same row blocks whether it runs on one
/// thread or over the pool, so an utterance gets the same bits either way.
const GEMM_ROWS: usize = 1024;

/// `dst[m, n] (row stride n) = bias + lhs · w`, where lhs row i starts at `lhs[i·lhs_rs]` and
/// holds k values (rows may overlap: the zero-copy frames of a strided conv) and `w` is
/// row-major `[k, n]`, or, when `w_t`, a torch `Linear` weight `[n, k]` read transposed; in
/// fixed blocks of `GEMM_ROWS` rows, on the pool when `parallel`.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    lhs: &[f32],
    lhs_rs: usize,
    k: usize,
    (w, w_t): (&[f32], bool),
    bias: Option<&[f32]>,
    dst: &mut [f32],
    n: usize,
    parallel: bool,
) {
    let m = dst.len() / n;
    assert!(
        m == 0 || ((m - 1) * lhs_rs + k <= lhs.len() && w.len() >= k * n),
        "gemm_rows: operands out of bounds"
    );
    let w_strides = if w_t { (1, k) } else { (n, 1) };
    let block = |bi: usize, rows: &mut [f32]| {
        // SAFETY: block bi reads lhs rows bi·GEMM_ROWS.. (in bounds, checked above) and
        // writes its own rows of dst.
        unsafe {
            ops::frames_gemm(
                rows.len() / n,
                n,
                k,
                lhs.as_ptr().add(bi * GEMM_ROWS * lhs_rs),
                lhs_rs,
                w.as_ptr(),
                w_strides,
                rows.as_mut_ptr(),
                n,
                bias,
                1,
            );
        }
    };
    if parallel {
        dst.par_chunks_mut(GEMM_ROWS * n)
            .enumerate()
            .for_each(|(bi, rows)| block(bi, rows));
    } else {
        dst.chunks_mut(GEMM_ROWS * n)
            .enumerate()
            .for_each(|(bi, rows)| block(bi, rows));
    }
}

/// `dst[m, n] = bias + a[m, k] · w` for a torch `Linear` weight transposed, `w` `[k, n]`.
fn linear(a: &[f32], w: &[f32], bias: &[f32], k: usize, dst: &mut [f32], parallel: bool) {
    gemm_rows(a, k, k, (w, false), Some(bias), dst, bias.len(), parallel);
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
    /// `x` [t_in, c_in] → [t_out, c_out].
    fn forward(&self, x: &[f32], parallel: bool) -> Vec<f32> {
        let (k, s, c) = (self.kernel, self.stride, self.c_out);
        let t_in = x.len() / self.c_in;
        let t_out = conv_out_len(t_in, k, s);
        let mut out = vec![0f32; t_out * c];
        let bias = self.bias.as_deref();
        if self.c_in == 1 {
            if let Post::GroupNormAct(norm, act) = &self.post {
                self.first_conv_group_norm(x, &mut out, norm, *act, parallel);
                return out;
            }
            for_rows(&mut out, c, parallel, |t0, rows| {
                ops::direct_conv_rows(x, &self.weight, bias, rows, t0, k, s, c);
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
                (&self.weight, false),
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
            let mut shared = vec![0f32; np * co];
            // SAFETY: every lhs row read is a row of x (bounds asserted above: the last one
            // read is 4(pairs−1)+4 ≤ 2·t_out); the outputs are this block's rows of y.
            unsafe {
                ops::frames_gemm(
                    2 * np,
                    co,
                    ci,
                    x[(4 * p0 + 1) * ci..].as_ptr(),
                    2 * ci,
                    w[ci * co..].as_ptr(),
                    (co, 1),
                    y.as_mut_ptr(),
                    co,
                    bias,
                    1,
                );
                ops::frames_gemm(
                    np,
                    co,
                    ci,
                    x[(4 * p0 + 2) * ci..].as_ptr(),
                    4 * ci,
                    outer.as_ptr(),
                    (co, 1),
                    shared.as_mut_ptr(),
                    co,
                    None,
                    1,
                );
            }
            // even rows += (e[2p] − e[2p+1])·W0, odd rows += (e[2p+2] − e[2p+1])·W2
            let (w0, w2) = (
                Mat::rows(&w[..ci * co], co),
                Mat::rows(&w[2 * ci * co..], co),
            );
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
        if parallel {
            paired
                .par_chunks_mut(2 * PAIRS * co)
                .enumerate()
                .for_each(|(bi, y)| block(bi, y));
        } else {
            paired
                .chunks_mut(2 * PAIRS * co)
                .enumerate()
                .for_each(|(bi, y)| block(bi, y));
        }
        if !last.is_empty() {
            let t = t_out - 1;
            gemm_rows(
                &x[2 * t * ci..],
                0,
                3 * ci,
                (w, false),
                bias,
                last,
                co,
                false,
            );
        }
    }

    fn post_rows(&self, rows: &mut [f32]) {
        match &self.post {
            Post::Act(act) => ops::bias_act_rows(rows, &[], *act),
            Post::LayerNormAct(norm, act) => {
                norm.rows(rows);
                ops::bias_act_rows(rows, &[], *act);
            }
            Post::GroupNormAct(..) => unreachable!("group norm is fused into the first conv"),
        }
    }

    /// The one-channel first conv with its GroupNorm and activation: the statistics pass and
    /// the output pass both compute the (cheap) conv, so its large output is written once.
    fn first_conv_group_norm(
        &self,
        x: &[f32],
        out: &mut [f32],
        norm: &Norm,
        act: Activation,
        parallel: bool,
    ) {
        let (k, s, c) = (self.kernel, self.stride, self.c_out);
        let bias = self.bias.as_deref();
        let t_out = out.len() / c;
        let stats = |task: usize| {
            let t0 = task * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(t_out - t0);
            let mut y = vec![0f32; rows * c];
            ops::direct_conv_rows(x, &self.weight, bias, &mut y, t0, k, s, c);
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
        for_rows(out, c, parallel, |t0, rows| {
            ops::direct_conv_rows(x, &self.weight, bias, rows, t0, k, s, c);
            for row in rows.chunks_exact_mut(c) {
                for ((v, &sc), &sh) in row.iter_mut().zip(&scale).zip(&shift) {
                    *v = *v * sc + sh;
                }
            }
            ops::bias_act_rows(rows, &[], act);
        });
    }
}

struct Layer {
    /// `[H, 3H]`: q (pre-scaled by head_dim^-0.5), k, v.
    qkv_w: Weights,
    qkv_b: Vec<f32>,
    out_w: Weights,
    out_b: Vec<f32>,
    ln1: Norm,
    ff1_w: Weights,
    ff1_b: Vec<f32>,
    ff2_w: Weights,
    ff2_b: Vec<f32>,
    ln2: Norm,
}

/// Reusable per-call buffers of the Transformer layers.
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    proj: Vec<f32>,
    ff: Vec<f32>,
    normed: Vec<f32>,
}

/// The CPU f32 inference engine of one loaded model (it reads the model's f32 CPU weights in
/// place, and copies any others).
pub struct CpuEncoder {
    convs: Vec<Conv>,
    proj_norm: Option<Norm>,
    proj_w: Weights,
    proj_b: Vec<f32>,
    /// `[G, K·C_g, C_g]`.
    pos_w: Weights,
    pos_b: Vec<f32>,
    pos_kernel: usize,
    pos_groups: usize,
    pos_act: Activation,
    enc_norm: Norm,
    layers: Vec<Layer>,
    pre_ln: bool,
    hidden: usize,
    heads: usize,
    ffn: usize,
    ffn_act: Activation,
    /// Per-stage CPU time, when `enable_profile` was called.
    profile: Option<Profile>,
    /// Attention scores per block (query rows × keys).
    block_scores: usize,
}

impl CpuEncoder {
    /// From now on, account the CPU time of serial (one thread per utterance) runs per stage.
    pub fn enable_profile(&mut self) {
        self.profile = Some(Profile::default());
    }

    /// Limits attention blocks to `scores` query-key products (at least 1 query row): smaller
    /// blocks, less memory; the results do not depend on it (tests use tiny blocks).
    pub fn set_attention_block(&mut self, scores: usize) {
        self.block_scores = scores.max(1);
    }

    /// CPU seconds per stage so far (empty unless `enable_profile` was called).
    pub fn profile(&self) -> Vec<(&'static str, f64)> {
        self.profile
            .as_ref()
            .map(|p| {
                STAGES
                    .iter()
                    .zip(&p.nanos)
                    .map(|(name, n)| {
                        (
                            *name,
                            n.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The engine of `model`: f32 CPU weights are shared, any others copied as f32.
    pub fn new(model: &Wav2Vec2Model) -> Result<Self> {
        let cfg = &model.cfg;
        let mut convs = Vec::with_capacity(model.conv_layers.len());
        for (i, layer) in model.conv_layers.iter().enumerate() {
            let c_in = if i == 0 { 1 } else { cfg.conv_dim[i - 1] };
            let post = match &layer.norm {
                ConvNorm::None => Post::Act(layer.act),
                ConvNorm::Layer(ln) => {
                    Post::LayerNormAct(Norm::from(&ln.weight, &ln.bias, ln.eps)?, layer.act)
                }
                ConvNorm::Group { weight, bias } if c_in == 1 => {
                    Post::GroupNormAct(Norm::from(weight, bias, CONV_NORM_EPS)?, layer.act)
                }
                ConvNorm::Group { .. } => {
                    candle_core::bail!("GroupNorm is only supported on the first conv")
                }
            };
            let weight = Weights::of(&layer.weight)?;
            let outer_taps = (layer.kernel == 3 && layer.stride == 2 && c_in > 1).then(|| {
                let n = c_in * cfg.conv_dim[i];
                let (w0, w2) = (&weight[..n], &weight[2 * n..3 * n]);
                w0.iter().zip(w2).map(|(a, b)| a + b).collect()
            });
            convs.push(Conv {
                weight,
                outer_taps,
                bias: layer.bias.as_ref().map(to_vec).transpose()?,
                kernel: layer.kernel,
                stride: layer.stride,
                c_in,
                c_out: cfg.conv_dim[i],
                post,
            });
        }
        let fp = &model.feature_projection;
        let enc = &model.encoder;
        let layers = enc
            .layers
            .par_iter()
            .map(Layer::of)
            .collect::<Result<Vec<_>>>()?;
        let pos = &enc.pos_conv_embed;
        Ok(Self {
            convs,
            proj_norm: fp
                .layer_norm
                .as_ref()
                .map(|ln| Norm::from(&ln.weight, &ln.bias, ln.eps))
                .transpose()?,
            proj_w: Weights::linear(&fp.projection)?,
            proj_b: to_vec(&fp.projection.bias)?,
            pos_w: Weights::of(&pos.weight)?,
            pos_b: to_vec(&pos.bias)?,
            pos_kernel: pos.kernel,
            pos_groups: pos.groups,
            pos_act: pos.act,
            enc_norm: Norm::from(
                &enc.layer_norm.weight,
                &enc.layer_norm.bias,
                enc.layer_norm.eps,
            )?,
            layers,
            pre_ln: enc.pre_ln,
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            ffn: cfg.intermediate_size,
            ffn_act: model
                .encoder
                .layers
                .first()
                .map(|l| l.feed_forward.act)
                .unwrap_or(Activation::Gelu),
            profile: None,
            block_scores: BLOCK_SCORES,
        })
    }

    /// Frames of the model output for `n` samples.
    pub fn frames_for_samples(&self, n: usize) -> usize {
        self.convs
            .iter()
            .fold(n, |n, c| conv_out_len(n, c.kernel, c.stride))
    }

    /// Runs one utterance `wave` (already normalised when the model asks for it) and returns
    /// the hidden states `keep` (sorted, numbered as transformers' `hidden_states`), each
    /// `[T, H]` row-major, and T. Computes no layer past the last one kept. `parallel`
    /// spreads every op over the current rayon pool; otherwise all runs on this thread.
    pub fn forward(
        &self,
        wave: &[f32],
        keep: &[usize],
        parallel: bool,
    ) -> Result<(Vec<Vec<f32>>, usize)> {
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
        let mut laps = Laps::new(if parallel {
            None
        } else {
            self.profile.as_ref()
        });
        let mut x = wave.to_vec();
        for conv in &self.convs {
            x = conv.forward(&x, parallel);
        }
        let h = self.hidden;
        let c = self.convs.last().map(|c| c.c_out).unwrap_or(1);
        if let Some(norm) = &self.proj_norm {
            for_rows(&mut x, c, parallel, |_, rows| norm.rows(rows));
        }
        laps.lap(0);
        let mut hs = vec![0f32; t * h];
        linear(&x, &self.proj_w, &self.proj_b, c, &mut hs, parallel);
        drop(x);
        let pos = self.positional(&hs, t, parallel);
        for_rows(&mut hs, h, parallel, |t0, rows| {
            for (v, p) in rows.iter_mut().zip(&pos[t0 * h..]) {
                *v += p;
            }
            if !self.pre_ln {
                self.enc_norm.rows(rows);
            }
        });
        drop(pos);
        laps.lap(1);
        let mut states = Vec::with_capacity(keep.len());
        if keep.contains(&0) {
            states.push(hs.clone());
        }
        let mut scratch = Scratch {
            qkv: vec![0f32; t * 3 * h],
            ctx: vec![0f32; t * h],
            proj: vec![0f32; t * h],
            ff: vec![0f32; t * self.ffn],
            normed: if self.pre_ln {
                vec![0f32; t * h]
            } else {
                Vec::new()
            },
        };
        for (l, layer) in self.layers[..last].iter().enumerate() {
            self.layer(layer, &mut hs, t, &mut scratch, parallel, &mut laps);
            if keep.contains(&(l + 1)) {
                if self.pre_ln && l + 1 == self.layers.len() {
                    // The stable-LN encoder normalises only its final output.
                    for_rows(&mut hs, h, parallel, |_, rows| self.enc_norm.rows(rows));
                }
                states.push(hs.clone());
            }
            laps.lap(6);
        }
        Ok((states, t))
    }

    /// The weight-normed grouped positional conv (`K/2` zero padding both sides, the first T
    /// outputs) and its activation.
    fn positional(&self, x: &[f32], t: usize, parallel: bool) -> Vec<f32> {
        let (h, g, k) = (self.hidden, self.pos_groups, self.pos_kernel);
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
        let mut out = vec![0f32; t * h];
        let group = |gi: usize, dst: *mut f32| {
            // SAFETY: group gi writes columns gi·cg..(gi+1)·cg of `out` only; its input rows
            // are the padded frames of group gi, t + k - 1 ≤ tp rows of cg.
            unsafe {
                ops::frames_gemm(
                    t,
                    cg,
                    k * cg,
                    xg[gi * tp * cg..].as_ptr(),
                    cg,
                    self.pos_w[gi * k * cg * cg..].as_ptr(),
                    (cg, 1),
                    dst.add(gi * cg),
                    h,
                    Some(&self.pos_b[gi * cg..(gi + 1) * cg]),
                    1,
                );
            }
        };
        let dst = SendPtr(out.as_mut_ptr());
        if parallel {
            (0..g).into_par_iter().for_each(|gi| group(gi, dst.get()));
        } else {
            (0..g).for_each(|gi| group(gi, dst.get()));
        }
        for_rows(&mut out, h, parallel, |_, rows| {
            ops::bias_act_rows(rows, &[], self.pos_act)
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
        laps: &mut Laps,
    ) {
        let h = self.hidden;
        if self.pre_ln {
            s.normed.copy_from_slice(x);
            for_rows(&mut s.normed, h, parallel, |_, rows| p.ln1.rows(rows));
            laps.lap(6);
            self.attention(
                p,
                &s.normed,
                t,
                (&mut s.qkv, &mut s.ctx, &mut s.proj),
                parallel,
                laps,
            );
            add_rows(x, &s.proj, h, None, parallel);
            s.normed.copy_from_slice(x);
            for_rows(&mut s.normed, h, parallel, |_, rows| p.ln2.rows(rows));
            laps.lap(6);
            self.feed_forward(p, &s.normed, &mut s.ff, &mut s.proj, parallel);
            laps.lap(5);
            add_rows(x, &s.proj, h, None, parallel);
        } else {
            self.attention(
                p,
                x,
                t,
                (&mut s.qkv, &mut s.ctx, &mut s.proj),
                parallel,
                laps,
            );
            add_rows(x, &s.proj, h, Some(&p.ln1), parallel);
            laps.lap(6);
            self.feed_forward(p, x, &mut s.ff, &mut s.proj, parallel);
            laps.lap(5);
            add_rows(x, &s.proj, h, Some(&p.ln2), parallel);
        }
    }

    /// Self-attention of `x` [T, H] into `out` [T, H] (out_proj applied).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        p: &Layer,
        x: &[f32],
        t: usize,
        (qkv, ctx, out): (&mut [f32], &mut [f32], &mut [f32]),
        parallel: bool,
        laps: &mut Laps,
    ) {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        linear(x, &p.qkv_w, &p.qkv_b, h, qkv, parallel);
        laps.lap(2);
        let qkv: &[f32] = qkv;
        let block = (self.block_scores / t).clamp(1, t);
        let rows_block = |bi: usize, ctx_rows: &mut [f32]| {
            let q0 = bi * block;
            let rows = ctx_rows.len() / h;
            let mut scores = vec![0f32; rows * t];
            for head in 0..heads {
                let q = Mat {
                    data: &qkv[q0 * 3 * h + head * dh..],
                    rs: 3 * h,
                    cs: 1,
                };
                let k_t = Mat {
                    data: &qkv[h + head * dh..],
                    rs: 1,
                    cs: 3 * h,
                };
                matmul_serial(rows, t, dh, &mut scores, t, q, k_t, false);
                ops::softmax_rows(&mut scores, t, t);
                let v = Mat {
                    data: &qkv[2 * h + head * dh..],
                    rs: 3 * h,
                    cs: 1,
                };
                matmul_serial(
                    rows,
                    dh,
                    t,
                    &mut ctx_rows[head * dh..],
                    h,
                    Mat::rows(&scores, t),
                    v,
                    false,
                );
            }
        };
        if parallel {
            ctx.par_chunks_mut(block * h)
                .enumerate()
                .for_each(|(bi, rows)| rows_block(bi, rows));
        } else {
            ctx.chunks_mut(block * h)
                .enumerate()
                .for_each(|(bi, rows)| rows_block(bi, rows));
        }
        laps.lap(3);
        linear(ctx, &p.out_w, &p.out_b, h, out, parallel);
        laps.lap(4);
    }

    /// `out` [T, H] = W2 · act(W1 · x + b1) + b2, through `ff` [T, F].
    fn feed_forward(&self, p: &Layer, x: &[f32], ff: &mut [f32], out: &mut [f32], parallel: bool) {
        let (h, f) = (self.hidden, self.ffn);
        linear(x, &p.ff1_w, &p.ff1_b, h, ff, parallel);
        for_rows(ff, f, parallel, |_, rows| {
            ops::bias_act_rows(rows, &[], self.ffn_act)
        });
        linear(ff, &p.ff2_w, &p.ff2_b, f, out, parallel);
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

/// A raw output pointer that tasks writing disjoint columns may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used by tasks that write disjoint regions of one buffer (see `positional`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl CpuEncoder {
    /// Runs utterances `0..n` (`wave(i)` gives utterance i, normalised) and hands each result
    /// to `sink(i, ..)` as soon as it is done, from the thread that computed it; when `sink`
    /// returns false, no further utterance is started. With at least as many utterances as
    /// pool threads, each thread takes the next utterance in order and runs it alone (no
    /// barriers, both cores busy); otherwise the utterances run one after the other with every
    /// op spread over the pool.
    pub fn run_each<W, S>(&self, n: usize, keep: &[usize], wave: W, sink: S)
    where
        W: Fn(usize) -> Vec<f32> + Sync,
        S: Fn(usize, Result<(Vec<Vec<f32>>, usize)>) -> bool + Sync,
    {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let threads = rayon::current_num_threads();
        if n < threads || threads == 1 {
            for i in 0..n {
                if !sink(i, self.forward(&wave(i), keep, threads > 1)) {
                    return;
                }
            }
            return;
        }
        let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
        rayon::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|_| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if !sink(i, self.forward(&wave(i), keep, false)) {
                        stop.store(true, Ordering::Relaxed);
                    }
                });
            }
        });
    }

    /// Peak bytes `forward` allocates for an utterance of `samples` samples keeping `kept`
    /// hidden states (its conv outputs, the states, the layer buffers), for memory planning.
    pub fn peak_bytes(&self, samples: usize, kept: usize) -> u64 {
        let mut t_in = samples;
        let mut c_in = 1;
        let mut conv_peak = 0;
        for c in &self.convs {
            let t_out = conv_out_len(t_in, c.kernel, c.stride);
            conv_peak = conv_peak.max(t_in * c_in + t_out * c.c_out);
            t_in = t_out;
            c_in = c.c_out;
        }
        let (t, h) = (t_in, self.hidden);
        let pos = (t + self.pos_kernel) * h + 2 * t * h;
        let layers = t * (7 * h + self.ffn) + self.block_scores.max(t);
        let states = kept * t * h;
        4 * (conv_peak.max(pos) + states + layers) as u64
    }
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
            let want = direct.forward(&x, false);
            let got = fast.forward(&x, false);
            assert_eq!(want.len(), got.len());
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 2e-6, "t_in {t_in}: {worst}");
            assert_eq!(
                fast.forward(&x, true),
                got,
                "pool and one thread give the same bits"
            );
        }
    }
}
