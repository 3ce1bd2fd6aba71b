//! Trainable building blocks whose gradients reach every parameter: each kernel's forward and
//! backward side by side, one file per kind, each tested against PyTorch in `tests/ops.rs`.
//!
//! - `gemm`: matmuls on strided views, linear layers; `attention`: relative-position
//!   multi-head attention; `norm`: layer norm, masked batch norm, utterance MVN, global
//!   normalisation; `conv`: 3×3 im2col convs and the depthwise conv; `winograd`: stride-1 3×3
//!   convs; `activation`: softmax, SiLU, ReLU, GLU, residuals; `layer_sum`: the weighted layer
//!   sum; `ctc`: the CTC loss; `profile`: the scoped profiler.
//! - The f32-slice kernels serve the CPU executors; where the candle tensor-op path (CUDA,
//!   f16) needs its own version of a kernel it sits in the same file. candle's fused kernels
//!   (`candle_nn::LayerNorm`, `ops::softmax_last_dim`, `ops::layer_norm`, `ops::sdpa`) have no
//!   backward and silently cut the autograd graph, so training code uses only these: composite
//!   layer norm and softmax, a depthwise conv with a hand-written backward, a padding-aware
//!   batch norm and this module's seedable dropout.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

pub mod activation;
pub mod attention;
pub mod conv;
pub mod ctc;
pub mod gemm;
pub mod layer_sum;
pub mod norm;
pub mod profile;
pub mod winograd;

pub use conv::{depthwise_conv1d, depthwise_conv1d_shift_add, DepthwiseConv1d};
pub use norm::{
    layer_norm, utterance_mvn, LayerNorm, MaskedBatchNorm, ESPNET_LAYER_NORM_EPS,
    RUNNING_STAT_NAMES, TORCH_LAYER_NORM_EPS,
};

/// Softmax over the last dimension built from differentiable primitives (never the fused
/// `softmax_last_dim`, whose backward is missing).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// The random source of every dropout in one model: seedable so that a training run can be
/// repeated exactly (candle's CPU RNG cannot be seeded). On non-CPU devices dropout uses the
/// device RNG (`Device::set_seed`) instead, since building masks on the host would be slow there.
#[derive(Debug, Clone)]
pub struct DropoutRng(Arc<Mutex<MaskStream>>);

/// A counter-based stream: element `i` of the stream is a hash of (key, i), so any chunk of a
/// mask is drawn independently (in parallel, vectorised) and the bits do not depend on the
/// thread count.
#[derive(Debug)]
struct MaskStream {
    key: u64,
    pos: u64,
}

/// SplitMix64's output function (Steele, Lea & Flood 2014) of `key + (i + 1)·γ`.
#[inline(always)]
fn mix(key: u64, i: u64) -> u64 {
    let mut z = key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl MaskStream {
    fn new(seed: u64) -> Self {
        Self {
            key: mix(seed, 0x5EED),
            pos: 0,
        }
    }
}

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(MaskStream::new(seed))))
    }

    pub fn reseed(&self, seed: u64) -> Result<()> {
        let mut stream = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout rng lock poisoned".into()))?;
        *stream = MaskStream::new(seed);
        Ok(())
    }

    /// `n` inverted-dropout scales (`1 / (1 - p)` or 0), the stream's next `n` elements:
    /// element `i` keeps when the top 24 bits of its hash are at least `p · 2^24` (exact for p
    /// on a 2^-24 grid), whatever the thread count.
    pub fn keep_mask(&self, n: usize, p: f64) -> Result<Vec<f32>> {
        let scale = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * (1u64 << 24) as f64) as u64;
        let (key, start) = {
            let mut stream = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout rng lock poisoned".into()))?;
            let start = stream.pos;
            stream.pos += n as u64;
            (stream.key, start)
        };
        const CHUNK: usize = 1 << 15;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let first = start + (c * CHUNK) as u64;
                activation::simd(
                    #[inline(always)]
                    || {
                        for (i, o) in chunk.iter_mut().enumerate() {
                            let keep = (mix(key, first + i as u64) >> 40) >= threshold;
                            *o = if keep { scale } else { 0.0 };
                        }
                    },
                )
            });
        Ok(out)
    }
}

/// Inverted dropout (`torch.nn.Dropout`): identity in eval mode or when `p == 0`.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: DropoutRng,
}

impl Dropout {
    pub fn new(p: f64, rng: DropoutRng) -> Self {
        Self { p, rng }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        if !(0.0..1.0).contains(&self.p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {}", self.p)
        }
        if !x.device().is_cpu() {
            return candle_nn::ops::dropout(x, self.p as f32);
        }
        let mask = self.rng.keep_mask(x.elem_count(), self.p)?;
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// torch's default init of a conv's weight and bias: uniform in `±1 / sqrt(fan_in)`.
fn conv_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Pointwise (kernel 1) `torch.nn.Conv1d` applied to time-major `[B, T, C_in]` input as a
/// matmul; keys `weight` `[C_out, C_in, 1]` and `bias` like the checkpoint.
#[derive(Debug, Clone)]
pub struct PointwiseConv1d {
    weight: Tensor,
    bias: Tensor,
}

impl PointwiseConv1d {
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let init = conv_init(c_in);
        Ok(Self {
            weight: vb.get_with_hints((c_out, c_in, 1), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, _) = self.weight.dims3()?;
        let w = self.weight.reshape((c_out, c_in))?.t()?;
        x.broadcast_matmul(&w)?.broadcast_add(&self.bias)
    }
}

/// A `[B, T, 1]` tensor of 1 for frames `< lengths[b]` and 0 for padding, in `dtype`.
pub fn frame_mask(
    lengths: &[usize],
    frames: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = vec![0f32; lengths.len() * frames];
    for (row, &len) in mask.chunks_exact_mut(frames.max(1)).zip(lengths) {
        for v in row.iter_mut().take(len.min(frames)) {
            *v = 1.0;
        }
    }
    Tensor::from_vec(mask, (lengths.len(), frames, 1), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_mask_draws_the_sequential_stream() {
        let p = 0.3;
        let rng = DropoutRng::new(9);
        let n = 100_003;
        let first = rng.keep_mask(n, p).unwrap();
        let second = rng.keep_mask(17, p).unwrap();
        // the same stream drawn one at a time by a plain sequential SplitMix64
        struct SplitMix64(u64);
        impl SplitMix64 {
            fn next(&mut self) -> u64 {
                self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
        // the published first output for seed 0
        assert_eq!(SplitMix64(0).next(), 0xE220_A839_7B1D_CDAF);
        let mut seq = SplitMix64(MaskStream::new(9).key);
        let threshold = (p * (1u64 << 24) as f64) as u64;
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut draw = || {
            if (seq.next() >> 40) >= threshold {
                scale
            } else {
                0.0
            }
        };
        let want: Vec<f32> = (0..n).map(|_| draw()).collect();
        assert_eq!(first, want);
        let want2: Vec<f32> = (0..17).map(|_| draw()).collect();
        assert_eq!(second, want2);
        let kept = first.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
    }
}
