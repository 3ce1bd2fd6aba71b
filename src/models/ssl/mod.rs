//! The wav2vec 2.0 / HuBERT encoder (transformers' `Wav2Vec2Model` and `HubertModel`), in
//! candle, returning every hidden state as `output_hidden_states=True` does.
//!
//! One implementation covers both families and every variant released checkpoints use:
//! `feat_extract_norm` "group" (GroupNorm on the first conv) or "layer" (LayerNorm after every
//! conv), `conv_bias`, any conv stack, the projection LayerNorm switch of HuBERT
//! (`feat_proj_layer_norm`), the weight-normed grouped positional conv (even or odd kernel),
//! and the post-LN ("base") or pre-LN (`do_stable_layer_norm`, "large") Transformer.
//!
//! Layout: activations are time-major `[B, T, C]` throughout, and every conv is a
//! frame-matmul with its weight pre-arranged at load time as `[K·C_in, C_out]` (rows ordered
//! tap, then input channel). In time-major memory the K frames a conv output reads are one
//! contiguous run, so on the CPU (f32) each conv is a single gemm whose lhs rows overlap
//! (row stride `stride·C_in`, no im2col copy), the first conv (one input channel) is direct
//! FMAs fused with its GroupNorm and GELU, and the grouped positional conv is one gemm per
//! group writing straight into the output. On other devices and dtypes (CUDA, f16, bf16) the
//! same frames are gathered with `index_select` in bounded chunks and multiplied with
//! `matmul`; norms, activations and the attention softmax have fused multi-threaded CPU
//! kernels and plain tensor-op equivalents (see `wav2vec2_ops.rs`). This avoids candle's CPU
//! conv1d (a transposing output copy, one conv per group).
//!
//! # Padding invariance
//! In a padded batch, every utterance's hidden states on its valid frames equal those of the
//! utterance run alone (up to float rounding), for every variant:
//! - conv frames are computed from valid samples only (the output-length formula), so LayerNorm
//!   convs need nothing more; the first conv's GroupNorm takes its per-channel statistics over
//!   each utterance's valid frames only (transformers takes them over the padded length, so its
//!   own batched output of group-norm models depends on the padding);
//! - padded frames are zeroed before the positional conv, which then sees exactly the zero
//!   padding it sees alone;
//! - attention adds a large negative value to padded keys.
//!
//! Values on padded frames are unspecified; read only the first `valid_frames[b]` frames.
pub mod config;
mod cpu;
mod tensor_ops;

pub use cpu::CpuEncoder;

use crate::models::checkpoint::LoadedCheckpoint;
use crate::models::ssl::config::{Activation, Wav2Vec2Config};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Largest gathered-frames tensor per matmul (elements): bounds memory for long batches.
const CHUNK_ELEMS: usize = 1 << 23;
/// Largest block of attention scores (elements) on the tensor-op path: 128 MiB of f32.
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

/// nn.LayerNorm over the last dimension.
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
        tensor_ops::layer_norm_act(x, &self.weight, &self.bias, self.eps, None)
    }
}

/// How a checkpoint's `nn.Linear` weights are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearLayout {
    /// As stored, `[out, in]`: matmuls read them transposed (no copy).
    #[default]
    OutIn,
    /// Transposed once at load, `[in, out]`: what the CPU engine's gemm reads fastest.
    InOut,
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
        let shape = match layout {
            LinearLayout::OutIn => (d_out, d_in),
            LinearLayout::InOut => (d_in, d_out),
        };
        Ok(Self {
            weight: vb.get(shape, "weight")?,
            bias: vb.get(d_out, "bias")?,
            layout,
        })
    }

    /// The weight as `[in, out]` (a transposed view of an `[out, in]` one).
    fn in_out(&self) -> Result<Tensor> {
        match self.layout {
            LinearLayout::OutIn => self.weight.t(),
            LinearLayout::InOut => Ok(self.weight.clone()),
        }
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let w = self.in_out()?;
        let out = w.dim(1)?;
        x.reshape((b * t, d))?.matmul(&w)?.reshape((b, t, out))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul(x)?.broadcast_add(&self.bias)
    }
}

enum ConvNorm {
    None,
    /// GroupNorm(C, C): per-channel statistics over time (first conv of "group" models).
    Group {
        weight: Tensor,
        bias: Tensor,
    },
    /// LayerNorm over channels at every frame ("layer" models).
    Layer(LayerNorm),
}

/// Mirrors `Wav2Vec2{NoLayerNorm,LayerNorm,GroupNorm}ConvLayer.forward`: conv, norm, activation.
struct ConvLayer {
    /// `[K·C_in, C_out]`, rows ordered (tap, input channel) like the gathered frames.
    weight: Tensor,
    bias: Option<Tensor>,
    norm: ConvNorm,
    kernel: usize,
    stride: usize,
    act: Activation,
    /// The same layer fused for CPU f32 (first conv of "group" models only).
    fused: Option<tensor_ops::FirstConvGroupNorm>,
}

impl ConvLayer {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, i: usize) -> Result<Self> {
        let c_in = if i == 0 { 1 } else { cfg.conv_dim[i - 1] };
        let (c_out, kernel) = (cfg.conv_dim[i], cfg.conv_kernel[i]);
        let weight = vb
            .get((c_out, c_in, kernel), "conv.weight")?
            .permute((2, 1, 0))?
            .reshape((kernel * c_in, c_out))?
            .contiguous()?;
        let bias = if cfg.conv_bias {
            Some(vb.get(c_out, "conv.bias")?)
        } else {
            None
        };
        let norm = match (cfg.feat_extract_norm.as_str(), i) {
            ("layer", _) => {
                ConvNorm::Layer(LayerNorm::load(vb.pp("layer_norm"), c_out, CONV_NORM_EPS)?)
            }
            ("group", 0) => ConvNorm::Group {
                weight: vb.get(c_out, "layer_norm.weight")?,
                bias: vb.get(c_out, "layer_norm.bias")?,
            },
            _ => ConvNorm::None,
        };
        let (stride, act) = (
            cfg.conv_stride[i],
            activation(&cfg.feat_extract_activation)?,
        );
        let fused = match &norm {
            ConvNorm::Group {
                weight: nw,
                bias: nb,
            } if c_in == 1 && weight.device().is_cpu() => {
                Some(tensor_ops::FirstConvGroupNorm::new(
                    &weight,
                    bias.as_ref(),
                    nw,
                    nb,
                    kernel,
                    stride,
                    CONV_NORM_EPS,
                    act,
                )?)
            }
            _ => None,
        };
        Ok(Self {
            weight,
            bias,
            norm,
            kernel,
            stride,
            act,
            fused,
        })
    }

    /// `x` [B, T_in, C_in] with `valid[b]` valid frames → ([B, T_out, C_out], valid frames).
    fn forward(&self, x: &Tensor, valid: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let valid_out: Vec<usize> = valid
            .iter()
            .map(|&n| conv_out_len(n, self.kernel, self.stride))
            .collect();
        if let Some(fused) = &self.fused {
            if tensor_ops::FirstConvGroupNorm::applies_to(x) {
                return Ok((fused.forward(x, &valid_out)?, valid_out));
            }
        }
        let conv = |post| {
            tensor_ops::strided_conv(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.kernel,
                self.stride,
                CHUNK_ELEMS,
                post,
            )
        };
        let y = match &self.norm {
            ConvNorm::None => conv(tensor_ops::ConvPost::Act(self.act))?,
            ConvNorm::Layer(ln) => conv(tensor_ops::ConvPost::LayerNormAct {
                weight: &ln.weight,
                bias: &ln.bias,
                eps: ln.eps,
                act: self.act,
            })?,
            ConvNorm::Group { weight, bias } => {
                // Statistics need the whole output first: no fusion on this path.
                let y = conv(tensor_ops::ConvPost::Identity)?;
                tensor_ops::channel_norm_act(&y, &valid_out, weight, bias, CONV_NORM_EPS, self.act)?
            }
        };
        Ok((y, valid_out))
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.layer_norm {
            Some(ln) => self.projection.forward(&ln.forward(x)?),
            None => self.projection.forward(x),
        }
    }
}

/// Mirrors `Wav2Vec2PositionalConvEmbedding.forward`: weight-normed grouped conv with
/// `K/2` zero padding, `SamePad` (drops the last frame for even `K`), activation.
struct PositionalConv {
    /// `[G, K·C_g, C_g]`: per group, rows ordered (tap, input channel).
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    groups: usize,
    act: Activation,
}

impl PositionalConv {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let (h, k, g) = (
            cfg.hidden_size,
            cfg.num_conv_pos_embeddings,
            cfg.num_conv_pos_embedding_groups,
        );
        let cg = h / g;
        let dtype = vb.dtype();
        let vb32 = vb.to_dtype(DType::F32);
        // weight_norm(dim=2): w = g · v / ‖v‖, the norm over dims (0, 1) per kernel tap.
        let v = vb32.get((h, cg, k), "weight_v")?;
        let gain = vb32.get((1, 1, k), "weight_g")?;
        let norm = v.sqr()?.sum_keepdim((0, 1))?.sqrt()?;
        let w = v.broadcast_mul(&gain.broadcast_div(&norm)?)?;
        let weight = w
            .reshape((g, cg, cg, k))?
            .permute((0, 3, 2, 1))?
            .reshape((g, k * cg, cg))?
            .contiguous()?
            .to_dtype(dtype)?;
        Ok(Self {
            weight,
            bias: vb.get(h, "bias")?,
            kernel: k,
            groups: g,
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
        let y = tensor_ops::grouped_conv(&xg, &self.weight, &self.bias, k, t, CHUNK_ELEMS)?;
        tensor_ops::bias_act(&y, None, self.act)
    }
}

/// Which keys attention may see: the valid frame count of every utterance, and the same as
/// an additive [B, 1, 1, T] mask (0 on valid keys) for the tensor-op path (None: no padding).
struct KeyMask {
    valid: Vec<usize>,
    additive: Option<Tensor>,
}

/// Mirrors `Wav2Vec2Attention.forward` (eager; dropout is identity).
struct Attention {
    /// q_proj, k_proj and v_proj stacked into one `[H, 3H]` projection (one matmul).
    qkv_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Wav2Vec2Config, layout: LinearLayout) -> Result<Self> {
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        // transformers scales the projected queries by head_dim^-0.5; fold it into q_proj.
        let scale = ((h / heads) as f64).powf(-0.5);
        let (mut weights, mut biases) = (Vec::with_capacity(3), Vec::with_capacity(3));
        for name in ["q_proj", "k_proj", "v_proj"] {
            let (w, b) = (
                vb.get((h, h), &format!("{name}.weight"))?, // square: either layout
                vb.get(h, &format!("{name}.bias"))?,
            );
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
        let qkv_proj = Linear {
            weight: Tensor::cat(&weights, out_dim)?,
            bias: Tensor::cat(&biases, 0)?,
            layout,
        };
        Ok(Self {
            qkv_proj,
            out_proj: Linear::load(vb.pp("out_proj"), h, h, layout)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &KeyMask) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let dh = h / self.heads;
        let qkv = self
            .qkv_proj
            .forward(x)?
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
            let qb = q.narrow(2, q0, rows.min(t - q0))?;
            let scores = qb.matmul(&k_t)?;
            let probs = tensor_ops::masked_softmax(&scores, &mask.valid, mask.additive.as_ref())?;
            blocks.push(probs.matmul(&v)?);
        }
        let ctx = if blocks.len() == 1 {
            blocks.pop().unwrap_or(q)
        } else {
            Tensor::cat(&blocks, 2)?
        };
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, h))?;
        self.out_proj.forward(&ctx)
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.intermediate_dense.matmul(x)?;
        let y = tensor_ops::bias_act(&y, Some(&self.intermediate_dense.bias), self.act)?;
        self.output_dense.forward(&y)
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

    fn forward(&self, x: &Tensor, mask: &KeyMask) -> Result<Tensor> {
        if self.pre_ln {
            let a = self.attention.forward(&self.layer_norm.forward(x)?, mask)?;
            let x = (x + a)?;
            let f = self
                .feed_forward
                .forward(&self.final_layer_norm.forward(&x)?)?;
            x + f
        } else {
            let x = self
                .layer_norm
                .forward(&(x + self.attention.forward(x, mask)?)?)?;
            let f = self.feed_forward.forward(&x)?;
            self.final_layer_norm.forward(&(x + f)?)
        }
    }
}

/// Mirrors `Wav2Vec2Encoder` / `Wav2Vec2EncoderStableLayerNorm` with `output_hidden_states`.
struct Encoder {
    pos_conv_embed: PositionalConv,
    layer_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    pre_ln: bool,
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
            || PositionalConv::load(vb.pp("pos_conv_embed").pp("conv"), cfg),
        );
        let layers = layers?;
        Ok(Self {
            pos_conv_embed: pos_conv_embed?,
            layer_norm: LayerNorm::load(vb.pp("layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            layers,
            pre_ln: cfg.do_stable_layer_norm,
        })
    }

    /// Hidden states 0..=`last` (`x` has its padded frames zeroed).
    fn forward(
        &self,
        x: &Tensor,
        mask: &KeyMask,
        last: usize,
        prof: &mut Profiler,
    ) -> Result<Vec<Tensor>> {
        let pos = self.pos_conv_embed.forward(x)?;
        prof.lap("pos_conv", &pos)?;
        let mut x = (x + pos)?;
        if !self.pre_ln {
            x = self.layer_norm.forward(&x)?;
        }
        let mut states = Vec::with_capacity(last + 1);
        for (l, layer) in self.layers[..last].iter().enumerate() {
            let next = layer.forward(&x, mask)?;
            prof.lap(&format!("layer {l}"), &next)?;
            states.push(std::mem::replace(&mut x, next));
        }
        // The stable-LN encoder normalises only its final output.
        if self.pre_ln && last == self.layers.len() {
            x = self.layer_norm.forward(&x)?;
        }
        states.push(x);
        Ok(states)
    }
}

/// Wall time of each stage of one forward pass (only when asked for: it synchronises the device).
struct Profiler {
    laps: Option<Vec<(String, f64)>>,
    /// Run the candle tensor ops even where the CPU engine applies.
    tensor_ops: bool,
    start: std::time::Instant,
}

impl Profiler {
    fn new(enabled: bool) -> Self {
        Self {
            laps: enabled.then(Vec::new),
            tensor_ops: false,
            start: std::time::Instant::now(),
        }
    }

    fn lap(&mut self, name: &str, done: &Tensor) -> Result<()> {
        if let Some(laps) = self.laps.as_mut() {
            done.device().synchronize()?;
            laps.push((name.to_string(), self.start.elapsed().as_secs_f64()));
            self.start = std::time::Instant::now();
        }
        Ok(())
    }
}

/// transformers' `Wav2Vec2Model` / `HubertModel` (inference), returning every hidden state.
pub struct Wav2Vec2Model {
    cfg: Wav2Vec2Config,
    /// The CPU f32 engine over a copy of the weights, built on the first CPU f32 forward.
    cpu: std::sync::OnceLock<CpuEncoder>,
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
            cpu: std::sync::OnceLock::new(),
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
    /// Memory: besides the states (B·T·H each), attention holds B·heads·T² scores per layer,
    /// so batch long utterances by total frames. Errors: `lengths` not matching `wave`,
    /// `max_hidden_state > num_hidden_layers`, or a batch shorter than the receptive field
    /// (an utterance shorter than it inside a longer batch just gets 0 valid frames).
    pub fn forward(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        self.run(wave, lengths, max_hidden_state, &mut Profiler::new(false))
    }

    /// `forward` through candle's tensor ops (with the fused CPU kernels) even on CPU f32, where
    /// `forward` runs the CPU engine: the path CUDA and f16/bf16 take, for tests and comparisons.
    pub fn forward_tensor_ops(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let mut prof = Profiler::new(false);
        prof.tensor_ops = true;
        self.run(wave, lengths, max_hidden_state, &mut prof)
    }

    /// `forward` on a batch of waveforms of any lengths (zero-padded here into one
    /// [B, max length] tensor on the model's device). Normalise each one first with
    /// `normalize_waveform` when `preprocessor_config.json` says `do_normalize`.
    pub fn forward_waveforms(
        &self,
        waves: &[&[f32]],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let lengths: Vec<usize> = waves.iter().map(|w| w.len()).collect();
        let s = lengths.iter().copied().max().unwrap_or(0);
        let mut flat = vec![0f32; waves.len() * s];
        for (row, w) in flat.chunks_exact_mut(s.max(1)).zip(waves) {
            row[..w.len()].copy_from_slice(w);
        }
        let wave = Tensor::from_vec(flat, (waves.len(), s), &self.device)?;
        self.forward(&wave, &lengths, max_hidden_state)
    }

    /// `forward`, also returning the wall time in seconds of every stage (each conv layer,
    /// projection, positional conv, each Transformer layer), for benchmarks.
    #[allow(clippy::type_complexity)]
    pub fn forward_profiled(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>, Vec<(String, f64)>)> {
        let mut prof = Profiler::new(true);
        let (states, valid) = self.run(wave, lengths, max_hidden_state, &mut prof)?;
        Ok((states, valid, prof.laps.unwrap_or_default()))
    }

    /// Whether `forward` runs on the CPU engine (`CpuEncoder`): CPU f32, unless the
    /// environment sets `SPEECHCACHE_ENGINE=candle` (the tensor-op path CUDA and f16/bf16 use)
    /// or the CPU kernels are off (`SPEECHCACHE_CPU_KERNELS=off`, `device::force_tensor_ops`).
    pub fn uses_cpu_engine(&self) -> bool {
        Self::cpu_engine_applies(&self.device, self.dtype)
    }

    /// Whether a model on `device` computing in `dtype` runs on the CPU engine.
    pub fn cpu_engine_applies(device: &Device, dtype: DType) -> bool {
        crate::device::Backend::new(device.clone(), dtype).is_ok_and(|b| b.uses_cpu_engine())
    }

    /// The CPU engine over this model's weights (built once, on first use).
    pub fn cpu_engine(&self) -> Result<&CpuEncoder> {
        if let Some(engine) = self.cpu.get() {
            return Ok(engine);
        }
        let engine = CpuEncoder::new(self)?;
        Ok(self.cpu.get_or_init(|| engine))
    }

    /// `forward` on the CPU engine: every utterance alone (no padding), in parallel, then
    /// laid out as the padded `[B, T, H]` states of the tensor path (zeros past valid frames).
    fn run_cpu(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let engine = self.cpu_engine()?;
        let (b, s) = wave.dims2()?;
        let t = frames_for_samples(&self.cfg, s);
        let h = self.cfg.hidden_size;
        let rows = wave.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let valid: Vec<usize> = lengths
            .iter()
            .map(|&n| frames_for_samples(&self.cfg, n))
            .collect();
        let keep: Vec<usize> = (0..=max_hidden_state).collect();
        let runnable: Vec<usize> = (0..b).filter(|&i| valid[i] > 0).collect();
        let results = std::sync::Mutex::new((0..b).map(|_| None).collect::<Vec<_>>());
        engine.run_each(
            runnable.len(),
            &keep,
            |j| rows[runnable[j]][..lengths[runnable[j]]].to_vec(),
            |j, r| match results.lock() {
                Ok(mut slots) => {
                    slots[runnable[j]] = Some(r);
                    true
                }
                Err(_) => false,
            },
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
            .map(|v| Tensor::from_vec(v, (b, t, h), &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok((states, valid))
    }

    fn run(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
        prof: &mut Profiler,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let (b, s) = wave.dims2()?;
        if lengths.len() != b || lengths.iter().any(|&n| n > s) {
            candle_core::bail!(
                "lengths {lengths:?} do not match a batch of {b} waveforms of {s} samples"
            );
        }
        if max_hidden_state > self.cfg.num_hidden_layers {
            candle_core::bail!(
                "hidden state {max_hidden_state} asked of a model with {} layers (states 0..={})",
                self.cfg.num_hidden_layers,
                self.cfg.num_hidden_layers
            );
        }
        if frames_for_samples(&self.cfg, s) == 0 {
            candle_core::bail!(
                "a batch of {s} samples is shorter than the model's receptive field of {} samples",
                self.cfg.receptive_field()
            );
        }
        if prof.laps.is_none() && !prof.tensor_ops && self.uses_cpu_engine() {
            return self.run_cpu(wave, lengths, max_hidden_state);
        }
        let mut x = wave.to_dtype(self.dtype)?.reshape((b, s, 1))?;
        let mut valid = lengths.to_vec();
        for (i, conv) in self.conv_layers.iter().enumerate() {
            let (y, v) = conv.forward(&x, &valid)?;
            prof.lap(&format!("conv {i}"), &y)?;
            x = y;
            valid = v;
        }
        let x = self.feature_projection.forward(&x)?;
        prof.lap("projection", &x)?;
        let t = x.dim(1)?;
        let (x, additive) = if valid.iter().all(|&n| n == t) {
            (x, None)
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
            let mask = keep.affine(-neg, neg)?;
            let mask = mask.reshape((b, 1, 1, t))?.to_dtype(self.dtype)?;
            (x.broadcast_mul(&keep.to_dtype(self.dtype)?)?, Some(mask))
        };
        let mask = KeyMask {
            valid: valid.clone(),
            additive,
        };
        let states = self.encoder.forward(&x, &mask, max_hidden_state, prof)?;
        Ok((states, valid))
    }
}
