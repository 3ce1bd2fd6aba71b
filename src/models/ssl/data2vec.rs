//! data2vec-audio's positional embedding (transformers' `Data2VecAudioPositionalConvEmbedding`),
//! for both executors: `num_conv_pos_embeddings` layers of a grouped conv (kernel
//! `conv_pos_kernel_size`, `K/2` zero padding both sides, the first T outputs), LayerNorm over
//! channels without parameters (eps 1e-5), activation; each layer reads the previous one.
//!
//! In a padded batch every layer's padded frames are zeroed before the next layer reads them,
//! so each utterance sees exactly the zero padding it sees alone (transformers does not, and
//! its batched data2vec-audio output depends on the padding).
use super::config::{Activation, Wav2Vec2Config};
use super::{act, activation, conv_frames, LayerNorm, CHUNK_ELEMS};
use crate::ops::activation::{gelu_in_place, gelu_tanh_in_place, relu_in_place, silu_in_place};
use crate::ops::gemm::{matmul_serial, Mat};
use crate::ops::norm::layer_norm_rows_in_place;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// nn.LayerNorm's default eps (the positional conv layers' norm takes no config value).
const POS_NORM_EPS: f64 = 1e-5;

/// A grouped conv's `conv.weight` `[H, H/G, K]` as `[G, K·C_g, C_g]`: per group, rows ordered
/// (tap, input channel), as the frame-matmul reads it.
fn grouped_conv_weight(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Tensor> {
    let (h, k, g) = (
        cfg.hidden_size,
        cfg.conv_pos_kernel_size,
        cfg.num_conv_pos_embedding_groups,
    );
    let cg = h / g;
    vb.get((h, cg, k), "weight")?
        .reshape((g, cg, cg, k))?
        .permute((0, 3, 2, 1))?
        .reshape((g, k * cg, cg))?
        .contiguous()
}

// ---------------------------------------------------------------- CPU engine

/// One positional conv layer's weights for the CPU engine.
struct CpuLayer {
    /// `[G, K·C_g, C_g]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// The positional conv stack on `[T, H]` slices (the CPU engine's).
pub struct CpuPositionalStack {
    layers: Vec<CpuLayer>,
    hidden: usize,
    groups: usize,
    kernel: usize,
    act: Activation,
}

fn activate(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::Gelu => gelu_in_place(xs),
        Activation::GeluTanh => gelu_tanh_in_place(xs),
        Activation::Relu => relu_in_place(xs),
        Activation::Silu => silu_in_place(xs),
    }
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl CpuPositionalStack {
    /// `vb` at `encoder.pos_conv_embed`.
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let layers = (0..cfg.num_conv_pos_embeddings)
            .map(|j| {
                let conv = vb.pp("layers").pp(j).pp("conv");
                Ok(CpuLayer {
                    weight: f32_values(&grouped_conv_weight(&conv, cfg)?)?,
                    bias: f32_values(&conv.get(cfg.hidden_size, "bias")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            hidden: cfg.hidden_size,
            groups: cfg.num_conv_pos_embedding_groups,
            kernel: cfg.conv_pos_kernel_size,
            act: activation(&cfg.feat_extract_activation)?,
        })
    }

    /// Position embeddings of `x` `[T, H]`.
    pub fn forward(&self, x: &[f32], t: usize, parallel: bool) -> Vec<f32> {
        let mut y = x.to_vec();
        for layer in &self.layers {
            y = self.layer(layer, &y, t, parallel);
        }
        y
    }

    fn layer(&self, p: &CpuLayer, x: &[f32], t: usize, parallel: bool) -> Vec<f32> {
        let (h, g, k) = (self.hidden, self.groups, self.kernel);
        let cg = h / g;
        let pad = k / 2;
        let tp = t + 2 * pad;
        // One gemm per group over the overlapping frames of a zero-padded group-major copy.
        let group = |gi: usize| {
            let mut xg = vec![0f32; tp * cg];
            for (row, src) in xg[pad * cg..(pad + t) * cg]
                .chunks_exact_mut(cg)
                .zip(x.chunks_exact(h))
            {
                row.copy_from_slice(&src[gi * cg..(gi + 1) * cg]);
            }
            let mut y = vec![0f32; t * cg];
            let bias = &p.bias[gi * cg..(gi + 1) * cg];
            y.chunks_exact_mut(cg).for_each(|r| r.copy_from_slice(bias));
            let frames = Mat {
                data: &xg,
                rs: cg,
                cs: 1,
            };
            let w = Mat::rows(&p.weight[gi * k * cg * cg..(gi + 1) * k * cg * cg], cg);
            matmul_serial(t, cg, k * cg, &mut y, cg, frames, w, true);
            y
        };
        let per_group: Vec<Vec<f32>> = if parallel {
            (0..g).into_par_iter().map(group).collect()
        } else {
            (0..g).map(group).collect()
        };
        let mut out = vec![0f32; t * h];
        let (ones, zeros) = (vec![1f32; h], vec![0f32; h]);
        let finish = |(i, row): (usize, &mut [f32])| {
            for (gi, dst) in row.chunks_exact_mut(cg).enumerate() {
                dst.copy_from_slice(&per_group[gi][i * cg..(i + 1) * cg]);
            }
            layer_norm_rows_in_place(row, &ones, &zeros, POS_NORM_EPS);
            activate(self.act, row);
        };
        if parallel {
            out.par_chunks_mut(h).enumerate().for_each(finish);
        } else {
            out.chunks_mut(h).enumerate().for_each(finish);
        }
        out
    }
}

// ---------------------------------------------------------------- tensor ops

/// The positional conv stack in tensor ops on `[B, T, H]`.
pub struct PositionalStack {
    /// Per layer: `[G, K·C_g, C_g]` and the bias `[H]`.
    layers: Vec<(Tensor, Tensor)>,
    norm: LayerNorm,
    groups: usize,
    kernel: usize,
    act: Activation,
}

impl PositionalStack {
    /// `vb` at `encoder.pos_conv_embed`.
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_conv_pos_embeddings)
            .map(|j| {
                let conv = vb.pp("layers").pp(j).pp("conv");
                Ok((grouped_conv_weight(&conv, cfg)?, conv.get(h, "bias")?))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm {
            weight: Tensor::ones(h, vb.dtype(), vb.device())?,
            bias: Tensor::zeros(h, vb.dtype(), vb.device())?,
            eps: POS_NORM_EPS,
        };
        Ok(Self {
            layers,
            norm,
            groups: cfg.num_conv_pos_embedding_groups,
            kernel: cfg.conv_pos_kernel_size,
            act: activation(&cfg.feat_extract_activation)?,
        })
    }

    /// `x` `[B, T, H]` (padded frames zero) → position embeddings `[B, T, H]`; `keep`
    /// `[B, T, 1]` (1 on valid frames) when the batch is padded.
    pub fn forward(&self, x: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (g, k) = (self.groups, self.kernel);
        let (cg, pad) = (h / g, k / 2);
        let mut y = x.clone();
        for (j, (weight, bias)) in self.layers.iter().enumerate() {
            if j > 0 {
                if let Some(keep) = keep {
                    y = y.broadcast_mul(keep)?;
                }
            }
            let yg = y
                .pad_with_zeros(1, pad, pad)?
                .reshape((b, t + 2 * pad, g, cg))?
                .permute((2, 0, 1, 3))?
                .contiguous()?;
            let z = conv_frames(&yg, weight, (k, 1), t, CHUNK_ELEMS)?
                .permute((1, 2, 0, 3))?
                .reshape((b, t, h))?
                .broadcast_add(bias)?;
            y = act(&self.norm.forward(&z)?, self.act)?;
        }
        Ok(y)
    }
}
