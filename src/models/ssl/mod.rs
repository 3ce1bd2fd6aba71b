//! The wav2vec 2.0 / HuBERT / WavLM / data2vec-audio encoder (transformers' `Wav2Vec2Model`,
//! `HubertModel`, `WavLMModel` and `Data2VecAudioModel`), returning every hidden state as
//! `output_hidden_states=True` does.
//!
//! One definition covers the four families and every variant released checkpoints use:
//! `feat_extract_norm` "group" (GroupNorm on the first conv) or "layer" (LayerNorm after every
//! conv), `conv_bias`, any conv stack, the projection LayerNorm switch of HuBERT
//! (`feat_proj_layer_norm`), the weight-normed grouped positional conv (even or odd kernel),
//! and the post-LN ("base") or pre-LN (`do_stable_layer_norm`, "large") Transformer; WavLM adds
//! a gated relative position bias to attention (`wavlm.rs`), data2vec-audio replaces the
//! positional conv with a stack of LayerNorm'd conv layers (`data2vec.rs`).
//!
//! It runs two ways, chosen once from the [`Backend`](crate::device::Backend) by
//! [`SslEncoder`]:
//! - [`Wav2Vec2Model`] (this file): candle tensor ops on any device and dtype (CUDA, f16,
//!   bf16, and f32 on the CPU when the backend asks for tensor ops). Activations are
//!   time-major `[B, T, C]`, and every conv is a frame-matmul: its weight is arranged at load
//!   as `[K·C_in, C_out]` (rows ordered tap, then input channel) and the K frames each output
//!   reads are gathered with `index_select` in bounded chunks (candle's conv1d would add a
//!   transposing copy and one conv per group).
//! - [`CpuEncoder`] (`cpu.rs`): f32 on the CPU, one utterance per thread on plain slices.
//!
//! # Padding invariance
//! In a padded batch, every utterance's hidden states on its valid frames equal those of the
//! utterance run alone (up to float rounding), for every variant:
//! - conv frames are computed from valid samples only (the output-length formula), so LayerNorm
//!   convs need nothing more; the first conv's GroupNorm takes its per-channel statistics over
//!   each utterance's valid frames only (transformers takes them over the padded length, so its
//!   own batched output of group-norm models depends on the padding);
//! - padded frames are zeroed before the positional conv (and before every layer of
//!   data2vec-audio's stack), which then sees exactly the zero padding it sees alone;
//! - attention adds a large negative value to padded keys.
//!
//! Values on padded frames are unspecified; read only the first `valid_frames[b]` frames.
pub mod chunk;
pub mod config;
pub mod cost;
mod cpu;
mod data2vec;
mod executor;
pub mod wavlm;

pub use cpu::{CpuEncoder, StateSink, LONG_FRAMES};
pub use executor::SslEncoder;

use crate::models::checkpoint::LoadedCheckpoint;
use crate::models::ssl::config::{Activation, Wav2Vec2Config};
use crate::ops::profile::{Kind, Profiler};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Largest gathered-frames tensor per matmul (elements): bounds memory for long batches.
const CHUNK_ELEMS: usize = 1 << 23;
/// Largest block of attention scores (elements): 128 MiB of f32.
const ATTENTION_BLOCK_ELEMS: usize = 1 << 25;
/// nn.LayerNorm / nn.GroupNorm default eps, used by the feature-encoder norms.
const CONV_NORM_EPS: f64 = 1e-5;

/// Output frames for `n_samples` input samples (transformers' `_get_feat_extract_output_lengths`);
/// 0 when the input is shorter than the receptive field.
pub fn frames_for_samples(cfg: &Wav2Vec2Config, n_samples: usize) -> usize {
    cfg.conv_kernel
        .iter()
        .zip(&cfg.conv_stride)
        .fold(n_samples, |n, (&k, &s)| conv_out_len(n, k, s))
}

fn conv_out_len(n: usize, kernel: usize, stride: usize) -> usize {
    if n < kernel {
        0
    } else {
        (n - kernel) / stride + 1
    }
}

/// Zero mean, unit variance over the given (valid) samples, as transformers'
/// `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm` (variance eps 1e-7); applied when
/// `preprocessor_config.json` has `do_normalize: true`.
pub fn normalize_waveform(samples: &mut [f32]) {
    if samples.is_empty() {
        return;
    }
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = samples
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let rstd = 1.0 / (var + 1e-7).sqrt();
    for v in samples.iter_mut() {
        *v = ((*v as f64 - mean) * rstd) as f32;
    }
}

fn activation(name: &str) -> Result<Activation> {
    Activation::from_name(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("unsupported activation {name:?}")))
}

/// Checks a forward's arguments: `lengths` fit a `[b, s]` batch, the hidden state exists, and
/// the batch gives at least one frame.
fn check_batch(
    cfg: &Wav2Vec2Config,
    (b, s): (usize, usize),
    lengths: &[usize],
    max_hidden_state: usize,
) -> Result<()> {
    if lengths.len() != b || lengths.iter().any(|&n| n > s) {
        candle_core::bail!(
            "lengths {lengths:?} do not match a batch of {b} waveforms of {s} samples"
        );
    }
    if max_hidden_state > cfg.num_hidden_layers {
        candle_core::bail!(
            "hidden state {max_hidden_state} asked of a model with {} layers (states 0..={})",
            cfg.num_hidden_layers,
            cfg.num_hidden_layers
        );
    }
    if frames_for_samples(cfg, s) == 0 {
        candle_core::bail!(
            "a batch of {s} samples is shorter than the model's receptive field of {} samples",
            cfg.receptive_field()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- weights both executors read

/// How a checkpoint's `nn.Linear` weights are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearLayout {
    /// As stored, `[out, in]`: matmuls read them transposed (no copy).
    #[default]
    OutIn,
    /// Transposed once at load, `[in, out]`: what the CPU engine's gemm reads fastest.
    InOut,
}

impl LinearLayout {
    /// The shape of a `d_in → d_out` weight in this layout.
    fn shape(self, d_in: usize, d_out: usize) -> (usize, usize) {
        match self {
            LinearLayout::OutIn => (d_out, d_in),
            LinearLayout::InOut => (d_in, d_out),
        }
    }
}

/// Which norm follows a feature-encoder conv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvNormKind {
    None,
    /// GroupNorm(C, C): per-channel statistics over time (first conv of "group" models).
    Group,
    /// LayerNorm over channels at every frame ("layer" models).
    Layer,
}

impl ConvNormKind {
    fn of(cfg: &Wav2Vec2Config, layer: usize) -> Self {
        match (cfg.feat_extract_norm.as_str(), layer) {
            ("layer", _) => ConvNormKind::Layer,
            ("group", 0) => ConvNormKind::Group,
            _ => ConvNormKind::None,
        }
    }
}

/// Input channels of feature-encoder conv `layer`.
fn conv_in_channels(cfg: &Wav2Vec2Config, layer: usize) -> usize {
    if layer == 0 {
        1
    } else {
        cfg.conv_dim[layer - 1]
    }
}

/// Conv `layer`'s `conv.weight` `[C_out, C_in, K]` as `[K·C_in, C_out]`, rows ordered (tap,
/// input channel): in time-major memory the K frames an output reads are one contiguous run.
fn conv_frames_weight(vb: &VarBuilder, cfg: &Wav2Vec2Config, layer: usize) -> Result<Tensor> {
    let (c_in, c_out, k) = (
        conv_in_channels(cfg, layer),
        cfg.conv_dim[layer],
        cfg.conv_kernel[layer],
    );
    vb.get((c_out, c_in, k), "conv.weight")?
        .permute((2, 1, 0))?
        .reshape((k * c_in, c_out))?
        .contiguous()
}

/// The positional conv's weight (`vb` at `pos_conv_embed.conv`), weight norm applied, as
/// `[G, K·C_g, C_g]`: per group, rows ordered (tap, input channel).
fn positional_conv_weight(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Tensor> {
    let (h, k, g) = (
        cfg.hidden_size,
        cfg.num_conv_pos_embeddings,
        cfg.num_conv_pos_embedding_groups,
    );
    let cg = h / g;
    let vb32 = vb.clone().set_dtype(DType::F32);
    // weight_norm(dim=2): w = g · v / ‖v‖, the norm over dims (0, 1) per kernel tap.
    let v = vb32.get((h, cg, k), "weight_v")?;
    let gain = vb32.get((1, 1, k), "weight_g")?;
    let norm = v.sqr()?.sum_keepdim((0, 1))?.sqrt()?;
    v.broadcast_mul(&gain.broadcast_div(&norm)?)?
        .reshape((g, cg, cg, k))?
        .permute((0, 3, 2, 1))?
        .reshape((g, k * cg, cg))?
        .contiguous()?
        .to_dtype(vb.dtype())
}

/// q_proj, k_proj and v_proj (`vb` at `attention`) stacked into one `H → 3H` projection in
/// `layout`, and its bias; transformers scales the projected queries by head_dim^-0.5, which
/// is folded into the q rows here.
fn qkv_projection(
    vb: &VarBuilder,
    cfg: &Wav2Vec2Config,
    layout: LinearLayout,
) -> Result<(Tensor, Tensor)> {
    let h = cfg.hidden_size;
    let scale = ((h / cfg.num_attention_heads) as f64).powf(-0.5);
    let (mut weights, mut biases) = (Vec::with_capacity(3), Vec::with_capacity(3));
    for name in ["q_proj", "k_proj", "v_proj"] {
        let w = vb.get((h, h), &format!("{name}.weight"))?; // square: either layout
        let b = vb.get(h, &format!("{name}.bias"))?;
        let (w, b) = if name == "q_proj" {
            ((w * scale)?, (b * scale)?)
        } else {
            (w, b)
        };
        weights.push(w);
        biases.push(b);
    }
    // stacked along `out`: rows of `[out, in]`, columns of `[in, out]`
    let out_dim = match layout {
        LinearLayout::OutIn => 0,
        LinearLayout::InOut => 1,
    };
    Ok((Tensor::cat(&weights, out_dim)?, Tensor::cat(&biases, 0)?))
}

// ---------------------------------------------------------------- the tensor-op definition

/// `f` as a span of `kind`; when profiling, the device finishes the span's work inside it.
fn timed<R>(
    prof: &mut Profiler,
    kind: Kind,
    device: &Device,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let sync = prof.is_enabled();
    prof.time(kind, || {
        let out = f()?;
        if sync {
            device.synchronize()?;
        }
        Ok(out)
    })
}

fn act(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

/// nn.LayerNorm over the last dimension, statistics in f32 (two passes) whatever the dtype.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(x.dtype())
    }
}

/// nn.Linear on `[B, T, in]`, as one `[B·T, in] × [in, out]` matmul.
struct Linear {
    /// `[out, in]` or `[in, out]`, as `layout` says.
    weight: Tensor,
    bias: Tensor,
    layout: LinearLayout,
}

impl Linear {
    fn load(vb: VarBuilder, d_in: usize, d_out: usize, layout: LinearLayout) -> Result<Self> {
        Ok(Self {
            weight: vb.get(layout.shape(d_in, d_out), "weight")?,
            bias: vb.get(d_out, "bias")?,
            layout,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let w = match self.layout {
            LinearLayout::OutIn => self.weight.t()?,
            LinearLayout::InOut => self.weight.clone(),
        };
        let out = w.dim(1)?;
        x.reshape((b * t, d))?
            .matmul(&w)?
            .reshape((b, t, out))?
            .broadcast_add(&self.bias)
    }
}

/// A conv as a frame-matmul on time-major `x` `[G, B, T_in, C]` (G groups) with `weight`
/// `[G, K·C, C_out]`: output t of group g is the K frames from `t·stride` of `x[g]`,
/// flattened, times `weight[g]`. Returns the first `t_out` outputs `[G, B, t_out, C_out]`;
/// frames are gathered in chunks of at most `chunk_elems` values.
fn conv_frames(
    x: &Tensor,
    weight: &Tensor,
    (kernel, stride): (usize, usize),
    t_out: usize,
    chunk_elems: usize,
) -> Result<Tensor> {
    let (g, b, t_in, c) = x.dims4()?;
    let c_out = weight.dim(2)?;
    if t_out > 0 && (t_out - 1) * stride + kernel > t_in {
        candle_core::bail!("{t_in} frames are too few for {t_out} conv outputs");
    }
    let rows = (chunk_elems / (g * b * kernel * c).max(1)).max(1);
    let mut pieces = Vec::with_capacity(t_out.div_ceil(rows));
    for t0 in (0..t_out).step_by(rows) {
        let n = rows.min(t_out - t0);
        let idx: Vec<u32> = (t0..t0 + n)
            .flat_map(|t| (0..kernel).map(move |j| (t * stride + j) as u32))
            .collect();
        let idx = Tensor::from_vec(idx, n * kernel, x.device())?;
        let frames = x.index_select(&idx, 2)?.reshape((g, b * n, kernel * c))?;
        pieces.push(frames.matmul(weight)?.reshape((g, b, n, c_out))?);
    }
    Tensor::cat(&pieces, 2)
}

/// `GroupNorm(C, C)` on time-major `x` [B, T, C] with the statistics of utterance `b` taken
/// over its first `valid[b]` frames only (in f32), so padding cannot change them.
fn channel_norm(
    x: &Tensor,
    valid: &[usize],
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (_, _, c) = x.dims3()?;
    let xf = x.to_dtype(DType::F32)?;
    let w = weight.to_dtype(DType::F32)?.reshape((1, c))?;
    let b = bias.to_dtype(DType::F32)?.reshape((1, c))?;
    let (mut scales, mut shifts) = (Vec::with_capacity(valid.len()), Vec::new());
    for (i, &n) in valid.iter().enumerate() {
        let (mean, var) = if n == 0 {
            let z = Tensor::zeros((1, c), DType::F32, x.device())?;
            (z.clone(), (z + 1.0)?)
        } else {
            let xb = xf.get(i)?.narrow(0, 0, n)?;
            let mean = xb.mean_keepdim(0)?;
            let var = xb.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
            (mean, var)
        };
        let scale = w.broadcast_div(&(var + eps)?.sqrt()?)?;
        shifts.push((&b - mean.mul(&scale)?)?);
        scales.push(scale);
    }
    xf.broadcast_mul(&Tensor::stack(&scales, 0)?)?
        .broadcast_add(&Tensor::stack(&shifts, 0)?)?
        .to_dtype(x.dtype())
}

enum ConvNorm {
    None,
    Group { weight: Tensor, bias: Tensor },
    Layer(LayerNorm),
}

/// Mirrors `Wav2Vec2{NoLayerNorm,LayerNorm,GroupNorm}ConvLayer.forward`: conv, norm, activation.
struct ConvLayer {
    /// `[1, K·C_in, C_out]` (see [`conv_frames_weight`]).
    weight: Tensor,
    bias: Option<Tensor>,
    norm: ConvNorm,
    kernel: usize,
    stride: usize,
    act: Activation,
}

impl ConvLayer {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, i: usize) -> Result<Self> {
        let c_out = cfg.conv_dim[i];
        let bias = if cfg.conv_bias {
            Some(vb.get(c_out, "conv.bias")?)
        } else {
            None
        };
        let norm = match ConvNormKind::of(cfg, i) {
            ConvNormKind::Layer => {
                ConvNorm::Layer(LayerNorm::load(vb.pp("layer_norm"), c_out, CONV_NORM_EPS)?)
            }
            ConvNormKind::Group => ConvNorm::Group {
                weight: vb.get(c_out, "layer_norm.weight")?,
                bias: vb.get(c_out, "layer_norm.bias")?,
            },
            ConvNormKind::None => ConvNorm::None,
        };
        Ok(Self {
            weight: conv_frames_weight(&vb, cfg, i)?.unsqueeze(0)?,
            bias,
            norm,
            kernel: cfg.conv_kernel[i],
            stride: cfg.conv_stride[i],
            act: activation(&cfg.feat_extract_activation)?,
        })
    }

    /// `x` [B, T_in, C_in] with `valid[b]` valid frames → ([B, T_out, C_out], valid frames).
    fn forward(&self, x: &Tensor, valid: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let (b, t_in, _) = x.dims3()?;
        let t_out = conv_out_len(t_in, self.kernel, self.stride);
        let valid_out: Vec<usize> = valid
            .iter()
            .map(|&n| conv_out_len(n, self.kernel, self.stride))
            .collect();
        let shape = (self.kernel, self.stride);
        let y = conv_frames(&x.unsqueeze(0)?, &self.weight, shape, t_out, CHUNK_ELEMS)?;
        let mut y = y.reshape((b, t_out, self.weight.dim(2)?))?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let y = match &self.norm {
            ConvNorm::None => y,
            ConvNorm::Layer(ln) => ln.forward(&y)?,
            ConvNorm::Group { weight, bias } => {
                channel_norm(&y, &valid_out, weight, bias, CONV_NORM_EPS)?
            }
        };
        Ok((act(&y, self.act)?, valid_out))
    }
}

/// Mirrors `Wav2Vec2FeatureProjection` / `HubertFeatureProjection` (dropout is identity).
struct FeatureProjection {
    layer_norm: Option<LayerNorm>,
    projection: Linear,
}

impl FeatureProjection {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let c = cfg.conv_dim[cfg.conv_dim.len() - 1];
        let layer_norm = if cfg.has_feat_proj_layer_norm() {
            Some(LayerNorm::load(vb.pp("layer_norm"), c, cfg.layer_norm_eps)?)
        } else {
            None
        };
        Ok(Self {
            layer_norm,
            projection: Linear::load(vb.pp("projection"), c, cfg.hidden_size, layout)?,
        })
    }

    fn forward(&self, x: &Tensor, prof: &mut Profiler) -> Result<Tensor> {
        let x = match &self.layer_norm {
            Some(ln) => timed(prof, Kind::Norm, x.device(), || ln.forward(x))?,
            None => x.clone(),
        };
        timed(prof, Kind::Linear, x.device(), || {
            self.projection.forward(&x)
        })
    }
}

/// Mirrors `Wav2Vec2PositionalConvEmbedding.forward`: weight-normed grouped conv with
/// `K/2` zero padding, `SamePad` (drops the last frame for even `K`), activation.
struct PositionalConv {
    /// `[G, K·C_g, C_g]` (see [`positional_conv_weight`]).
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    groups: usize,
    act: Activation,
}

impl PositionalConv {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        Ok(Self {
            weight: positional_conv_weight(&vb, cfg)?,
            bias: vb.get(cfg.hidden_size, "bias")?,
            kernel: cfg.num_conv_pos_embeddings,
            groups: cfg.num_conv_pos_embedding_groups,
            act: activation(&cfg.feat_extract_activation)?,
        })
    }

    /// `x` [B, T, H] (padded frames already zero) → position embeddings [B, T, H].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (g, k) = (self.groups, self.kernel);
        let cg = h / g;
        let pad = k / 2;
        let xg = x
            .pad_with_zeros(1, pad, pad)?
            .reshape((b, t + 2 * pad, g, cg))?
            .permute((2, 0, 1, 3))?
            .contiguous()?;
        let y = conv_frames(&xg, &self.weight, (k, 1), t, CHUNK_ELEMS)?
            .permute((1, 2, 0, 3))?
            .reshape((b, t, h))?
            .broadcast_add(&self.bias)?;
        act(&y, self.act)
    }
}

/// Attention probabilities: softmax over the keys of `scores` [B, heads, rows, T] after adding
/// `mask` [B, 1, 1, T] (0 on valid keys; None when nothing is padded).
fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores.clone(),
    };
    // candle's CUDA softmax sums in f32 for f16/bf16; its CPU softmax sums in the input dtype,
    // which loses most of bf16's 8 bits over a few hundred keys, so the CPU sums in f32 too.
    if scores.device().is_cpu() && scores.dtype() != DType::F32 {
        let dtype = scores.dtype();
        return candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Mirrors `Wav2Vec2Attention.forward` (eager; dropout is identity).
struct Attention {
    /// q_proj, k_proj and v_proj as one `H → 3H` projection (see [`qkv_projection`]).
    qkv_proj: Linear,
    out_proj: Linear,
    heads: usize,
    /// WavLM: this layer's gate of the relative position bias.
    gate: Option<wavlm::GateOps>,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let (weight, bias) = qkv_projection(&vb, cfg, layout)?;
        let h = cfg.hidden_size;
        Ok(Self {
            qkv_proj: Linear {
                weight,
                bias,
                layout,
            },
            out_proj: Linear::load(vb.pp("out_proj"), h, h, layout)?,
            heads: cfg.num_attention_heads,
            gate: cfg
                .is_wavlm()
                .then(|| wavlm::GateOps::load(&vb, cfg))
                .transpose()?,
        })
    }

    /// `mask`: [B, 1, 1, T], 0 on valid keys (None when nothing is padded); `rel`: WavLM's
    /// relative position embedding (from the first layer), gated by this layer.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rel: Option<&wavlm::RelativePositionsOps>,
        prof: &mut Profiler,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let dev = x.device();
        let dh = h / self.heads;
        let qkv = timed(prof, Kind::Linear, dev, || self.qkv_proj.forward(x))?;
        let gate = match (&self.gate, rel) {
            (Some(gate), Some(_)) => Some(gate.forward(x)?),
            _ => None,
        };
        let ctx = timed(prof, Kind::Attention, dev, || {
            let qkv = qkv
                .reshape((b, t, 3, self.heads, dh))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let k_t = k.t()?;
            // Queries in blocks, so the scores held at once stay under ATTENTION_BLOCK_ELEMS
            // (B·heads·rows·T) however long the batch: memory O(T) per block instead of O(T²).
            let rows = (ATTENTION_BLOCK_ELEMS / (b * self.heads * t).max(1)).clamp(1, t.max(1));
            let mut blocks = Vec::with_capacity(t.div_ceil(rows));
            for q0 in (0..t).step_by(rows) {
                let n = rows.min(t - q0);
                let mut scores = q.narrow(2, q0, n)?.matmul(&k_t)?;
                if let (Some(gate), Some(rel)) = (&gate, rel) {
                    let bias = rel.block(q0, n, t, dev)?.to_dtype(scores.dtype())?;
                    let gated = gate.narrow(2, q0, n)?.broadcast_mul(&bias)?;
                    scores = (scores + gated)?;
                }
                blocks.push(masked_softmax(&scores, mask)?.matmul(&v)?);
            }
            Tensor::cat(&blocks, 2)?.transpose(1, 2)?.reshape((b, t, h))
        })?;
        timed(prof, Kind::Linear, dev, || self.out_proj.forward(&ctx))
    }
}

/// Mirrors `Wav2Vec2FeedForward.forward`.
struct FeedForward {
    intermediate_dense: Linear,
    output_dense: Linear,
    act: Activation,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate_dense: Linear::load(vb.pp("intermediate_dense"), h, f, layout)?,
            output_dense: Linear::load(vb.pp("output_dense"), f, h, layout)?,
            act: activation(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor, prof: &mut Profiler) -> Result<Tensor> {
        let dev = x.device();
        let y = timed(prof, Kind::Linear, dev, || {
            self.intermediate_dense.forward(x)
        })?;
        let y = timed(prof, Kind::Elementwise, dev, || act(&y, self.act))?;
        timed(prof, Kind::Linear, dev, || self.output_dense.forward(&y))
    }
}

/// Mirrors `Wav2Vec2EncoderLayer` (post-LN) and `Wav2Vec2EncoderLayerStableLayerNorm` (pre-LN).
struct EncoderLayer {
    attention: Attention,
    layer_norm: LayerNorm,
    feed_forward: FeedForward,
    final_layer_norm: LayerNorm,
    pre_ln: bool,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            attention: Attention::load(vb.pp("attention"), cfg, layout)?,
            layer_norm: LayerNorm::load(vb.pp("layer_norm"), h, eps)?,
            feed_forward: FeedForward::load(vb.pp("feed_forward"), cfg, layout)?,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), h, eps)?,
            pre_ln: cfg.do_stable_layer_norm,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        rel: Option<&wavlm::RelativePositionsOps>,
        prof: &mut Profiler,
    ) -> Result<Tensor> {
        let dev = x.device();
        let norm = |prof: &mut Profiler, ln: &LayerNorm, x: &Tensor| {
            timed(prof, Kind::Norm, dev, || ln.forward(x))
        };
        let add = |prof: &mut Profiler, a: &Tensor, b: &Tensor| {
            timed(prof, Kind::Elementwise, dev, || a + b)
        };
        if self.pre_ln {
            let normed = norm(prof, &self.layer_norm, x)?;
            let a = self.attention.forward(&normed, mask, rel, prof)?;
            let x = add(prof, x, &a)?;
            let normed = norm(prof, &self.final_layer_norm, &x)?;
            let f = self.feed_forward.forward(&normed, prof)?;
            add(prof, &x, &f)
        } else {
            let a = self.attention.forward(x, mask, rel, prof)?;
            let x = add(prof, x, &a)?;
            let x = norm(prof, &self.layer_norm, &x)?;
            let f = self.feed_forward.forward(&x, prof)?;
            let x = add(prof, &x, &f)?;
            norm(prof, &self.final_layer_norm, &x)
        }
    }
}

/// The positional embedding: one weight-normed conv, or data2vec-audio's stack.
enum Positional {
    Conv(PositionalConv),
    Stack(data2vec::PositionalStack),
}

/// Mirrors `Wav2Vec2Encoder` / `Wav2Vec2EncoderStableLayerNorm` with `output_hidden_states`
/// (and WavLM's / data2vec-audio's, which differ in the blocks).
struct Encoder {
    pos_conv_embed: Positional,
    layer_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    pre_ln: bool,
    /// WavLM: the first layer's relative position embedding, shared by every layer.
    rel_positions: Option<wavlm::RelativePositionsOps>,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        // Layers are built in parallel (their weight re-layouts are single-threaded copies).
        let (layers, pos_conv_embed) = rayon::join(
            || {
                (0..cfg.num_hidden_layers)
                    .into_par_iter()
                    .map(|l| EncoderLayer::load(vb.pp("layers").pp(l), cfg, layout))
                    .collect::<Result<Vec<_>>>()
            },
            || {
                let vb = vb.pp("pos_conv_embed");
                if cfg.is_data2vec_audio() {
                    data2vec::PositionalStack::load(&vb, cfg).map(Positional::Stack)
                } else {
                    PositionalConv::load(vb.pp("conv"), cfg).map(Positional::Conv)
                }
            },
        );
        let rel_positions = cfg
            .is_wavlm()
            .then(|| {
                let vb = vb.pp("layers").pp(0).pp("attention");
                wavlm::RelativePositionsOps::load(&vb, cfg)
            })
            .transpose()?;
        Ok(Self {
            pos_conv_embed: pos_conv_embed?,
            layer_norm: LayerNorm::load(vb.pp("layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            layers: layers?,
            pre_ln: cfg.do_stable_layer_norm,
            rel_positions,
        })
    }

    /// Hidden states 0..=`last` (`x` has its padded frames zeroed; `keep` [B, T, 1] is 1 on
    /// valid frames, None when nothing is padded).
    fn forward(
        &self,
        x: &Tensor,
        (mask, keep): (Option<&Tensor>, Option<&Tensor>),
        last: usize,
        prof: &mut Profiler,
    ) -> Result<Vec<Tensor>> {
        let dev = x.device();
        let pos = timed(prof, Kind::Conv, dev, || match &self.pos_conv_embed {
            Positional::Conv(conv) => conv.forward(x),
            Positional::Stack(stack) => stack.forward(x, keep),
        })?;
        let mut x = timed(prof, Kind::Elementwise, dev, || x + pos)?;
        if !self.pre_ln {
            x = timed(prof, Kind::Norm, dev, || self.layer_norm.forward(&x))?;
        }
        let mut states = Vec::with_capacity(last + 1);
        for layer in &self.layers[..last] {
            let next = layer.forward(&x, mask, self.rel_positions.as_ref(), prof)?;
            states.push(std::mem::replace(&mut x, next));
        }
        // The stable-LN encoder normalises only its final output.
        if self.pre_ln && last == self.layers.len() {
            x = timed(prof, Kind::Norm, dev, || self.layer_norm.forward(&x))?;
        }
        states.push(x);
        Ok(states)
    }
}

/// transformers' `Wav2Vec2Model` / `HubertModel` (inference) in candle tensor ops, returning
/// every hidden state; on the CPU in f32, [`CpuEncoder`] computes the same much faster.
pub struct Wav2Vec2Model {
    cfg: Wav2Vec2Config,
    conv_layers: Vec<ConvLayer>,
    feature_projection: FeatureProjection,
    encoder: Encoder,
    device: Device,
    dtype: DType,
}

impl Wav2Vec2Model {
    /// Loads from a `VarBuilder` over the canonical names of `config::expected_tensors`
    /// (state-dict keys without the `wav2vec2.`/`hubert.` prefix); the model computes in
    /// `vb.dtype()` on `vb.device()`.
    pub fn load(vb: VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        Self::load_with_layout(vb, cfg, LinearLayout::OutIn)
    }

    /// The model of a loaded checkpoint, in the linear-weight layout it was loaded with.
    pub fn from_checkpoint(ckpt: &LoadedCheckpoint) -> Result<Self> {
        Self::load_with_layout(ckpt.var_builder(), &ckpt.config, ckpt.linear_layout)
    }

    /// As [`Wav2Vec2Model::load`], with the `nn.Linear` weights under `vb` in `layout`.
    pub fn load_with_layout(
        vb: VarBuilder,
        cfg: &Wav2Vec2Config,
        layout: LinearLayout,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let fe = vb.pp("feature_extractor").pp("conv_layers");
        let conv_layers = (0..cfg.conv_dim.len())
            .into_par_iter()
            .map(|i| ConvLayer::load(fe.pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_layers,
            feature_projection: FeatureProjection::load(vb.pp("feature_projection"), cfg, layout)?,
            encoder: Encoder::load(vb.pp("encoder"), cfg, layout)?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Wav2Vec2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `wave` [B, S] (utterance `b` valid on its first `lengths[b]` samples; the rest may
    /// hold anything) and returns hidden states `0..=max_hidden_state`, each [B, T, H] in the
    /// model's dtype, exactly as transformers' `hidden_states` tuple (state 0 is the input to
    /// the first layer, state `num_hidden_layers` the final output), computing no layer beyond
    /// the last one asked for; and the valid frame count of every utterance.
    ///
    /// Memory: besides the states (B·T·H each), attention holds B·heads·T² scores per layer
    /// (in blocks of bounded size), so batch long utterances by total frames. Errors:
    /// `lengths` not matching `wave`, `max_hidden_state > num_hidden_layers`, or a batch
    /// shorter than the receptive field (an utterance shorter than it inside a longer batch
    /// just gets 0 valid frames).
    pub fn forward(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        self.forward_profiled(wave, lengths, max_hidden_state, &mut Profiler::disabled())
    }

    /// `forward`, timing every step into `prof` (each span waits for the device when `prof`
    /// is enabled).
    pub fn forward_profiled(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
        prof: &mut Profiler,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let (b, s) = wave.dims2()?;
        check_batch(&self.cfg, (b, s), lengths, max_hidden_state)?;
        let mut x = wave.to_dtype(self.dtype)?.reshape((b, s, 1))?;
        let mut valid = lengths.to_vec();
        for conv in &self.conv_layers {
            (x, valid) = timed(prof, Kind::Conv, &self.device, || conv.forward(&x, &valid))?;
        }
        let x = self.feature_projection.forward(&x, prof)?;
        let t = x.dim(1)?;
        let (x, mask, keep) = if valid.iter().all(|&n| n == t) {
            (x, None, None)
        } else {
            let keep: Vec<f32> = valid
                .iter()
                .flat_map(|&n| (0..t).map(move |i| if i < n { 1.0 } else { 0.0 }))
                .collect();
            let keep = Tensor::from_vec(keep, (b, t, 1), &self.device)?;
            // transformers uses finfo(dtype).min; any value that stays finite in the dtype works.
            let neg: f64 = if self.dtype == DType::F16 {
                -65504.0
            } else {
                -3.0e38
            };
            let mask = keep
                .affine(-neg, neg)?
                .reshape((b, 1, 1, t))?
                .to_dtype(self.dtype)?;
            let keep = keep.to_dtype(self.dtype)?;
            (x.broadcast_mul(&keep)?, Some(mask), Some(keep))
        };
        let states =
            self.encoder
                .forward(&x, (mask.as_ref(), keep.as_ref()), max_hidden_state, prof)?;
        Ok((states, valid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames gathered in chunks of a few outputs (the last one short) give the frames of one
    /// gather, for a strided conv and a grouped one.
    #[test]
    fn chunked_frame_gathers_equal_one_gather() {
        let dev = Device::Cpu;
        // strided: 3 utterances, 61 frames of 5 channels, kernel 3, stride 2 → 30 outputs
        let x = Tensor::randn(0f32, 1.0, (1, 3, 61, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (1, 15, 7), &dev).unwrap();
        // grouped: 4 groups of 3 channels, kernel 5, 23 outputs
        let xg = Tensor::randn(0f32, 1.0, (4, 3, 28, 3), &dev).unwrap();
        let wg = Tensor::randn(0f32, 0.3, (4, 15, 3), &dev).unwrap();
        for (x, w, shape, t_out) in [(&x, &w, (3, 2), 30), (&xg, &wg, (5, 1), 23)] {
            let (g, b, _, c) = x.dims4().unwrap();
            let whole = conv_frames(x, w, shape, t_out, usize::MAX).unwrap();
            let chunk = g * b * shape.0 * c * 7; // 7 outputs per chunk
            let chunked = conv_frames(x, w, shape, t_out, chunk).unwrap();
            assert_eq!(whole.dims(), &[g, b, t_out, w.dim(2).unwrap()]);
            let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (whole, chunked) = (values(whole), values(chunked));
            let d = whole
                .iter()
                .zip(&chunked)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d < 1e-5, "{shape:?}: {d}");
        }
        assert!(conv_frames(&x, &w, (3, 2), 31, 1 << 20).is_err());
    }
}
