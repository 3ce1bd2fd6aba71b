//! ESPnet's Conformer encoder (`espnet2/asr/encoder/conformer_encoder.py`, rel_pos "latest",
//! rel_selfattn, swish, macaron FF) in candle, trainable end to end.
//!
//! Activations stay time-major `[B, T, C]` throughout (the convolution module's pointwise convs
//! are matmuls and its depthwise conv is `ops::depthwise_conv1d`), and every op used
//! here has a backward (see `crate::ops`). The `VarBuilder` paths spell ESPnet's
//! state-dict keys (`embed.conv.0.weight`, `encoders.0.self_attn.pos_bias_u`, ...).
//!
//! Padding never changes an utterance's output: subsampled lengths follow the conv length
//! formula per utterance, attention masks padded keys, the convolution module zeroes padded
//! frames before its depthwise conv, and batch-norm statistics count valid frames only.
//! (ESPnet itself derives padded utterances' lengths from a strided mask, which can count up
//! to two frames more; those frames depend on padding, so we do not.)
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::{
    frame_mask, softmax_last, DepthwiseConv1d, Dropout, DropoutRng, LayerNorm, MaskedBatchNorm,
    PointwiseConv1d, TORCH_LAYER_NORM_EPS,
};

/// Errors from building or running the Conformer / ASR model.
#[derive(Debug, thiserror::Error)]
pub enum ConformerError {
    #[error("invalid model config: `{field}` {reason}")]
    Config { field: &'static str, reason: String },
    #[error(
        "input of {frames} frames is too short for `{layer}` subsampling \
         (it needs at least {min} frames)"
    )]
    TooShort {
        frames: usize,
        layer: &'static str,
        min: usize,
    },
    #[error("invalid model input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `input_layer` of ESPnet's ConformerEncoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputLayer {
    /// `Conv2dSubsampling`: two 3x3 stride-2 convs, time / 4.
    #[serde(rename = "conv2d")]
    Conv2d,
    /// `Conv2dSubsampling2`: 3x3 stride 2 then 3x3 stride 1, time / 2.
    #[serde(rename = "conv2d2")]
    Conv2d2,
    /// Linear → LayerNorm → Dropout, no subsampling.
    #[serde(rename = "linear")]
    Linear,
}

impl InputLayer {
    pub fn name(self) -> &'static str {
        match self {
            InputLayer::Conv2d => "conv2d",
            InputLayer::Conv2d2 => "conv2d2",
            InputLayer::Linear => "linear",
        }
    }

    /// Output frames for `frames` input frames: the conv length formulas of ESPnet's
    /// subsampling classes, `((T - 1) // 2 - 1) // 2` (conv2d), `(T - 1) // 2 - 2` (conv2d2),
    /// `T` (linear); 0 where the input is too short.
    pub fn output_length(self, frames: usize) -> usize {
        let half = frames.saturating_sub(1) / 2;
        match self {
            InputLayer::Conv2d => half.saturating_sub(1) / 2,
            InputLayer::Conv2d2 => half.saturating_sub(2),
            InputLayer::Linear => frames,
        }
    }

    /// The fewest input frames that give one output frame (ESPnet's `check_short_utt`).
    pub fn min_input_length(self) -> usize {
        match self {
            InputLayer::Conv2d => 7,
            InputLayer::Conv2d2 => 7,
            InputLayer::Linear => 1,
        }
    }
}

/// `cnn_module_norm`: ESPnet's ConvolutionModule uses BatchNorm1d; layer norm is the
/// batch-independent alternative (as in WeNet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CnnModuleNorm {
    BatchNorm,
    LayerNorm,
}

/// `encoder_conf` of an ESPnet Conformer: ESPnet's argument names. Defaults are ESPnet's,
/// except `macaron_style` (true, as in every ESPnet Conformer recipe). The fixed-choice fields
/// accept only what this implementation builds, so an ESPnet config can be pasted as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConformerConfig {
    #[serde(default = "d_256")]
    pub output_size: usize,
    #[serde(default = "d_4")]
    pub attention_heads: usize,
    #[serde(default = "d_2048")]
    pub linear_units: usize,
    #[serde(default = "d_6")]
    pub num_blocks: usize,
    #[serde(default = "d_01")]
    pub dropout_rate: f64,
    #[serde(default = "d_01")]
    pub positional_dropout_rate: f64,
    #[serde(default)]
    pub attention_dropout_rate: f64,
    #[serde(default = "d_conv2d")]
    pub input_layer: InputLayer,
    #[serde(default = "d_true")]
    pub normalize_before: bool,
    #[serde(default = "d_true")]
    pub macaron_style: bool,
    #[serde(default = "d_true")]
    pub use_cnn_module: bool,
    #[serde(default = "d_31")]
    pub cnn_module_kernel: usize,
    #[serde(default = "d_batch_norm")]
    pub cnn_module_norm: CnnModuleNorm,
    /// Only `false` (x + att(x)).
    #[serde(default)]
    pub concat_after: bool,
    /// Only "linear".
    #[serde(default = "d_linear")]
    pub positionwise_layer_type: String,
    /// Only "latest".
    #[serde(default = "d_latest")]
    pub rel_pos_type: String,
    /// Only "rel_pos".
    #[serde(default = "d_rel_pos")]
    pub pos_enc_layer_type: String,
    /// Only "rel_selfattn".
    #[serde(default = "d_rel_selfattn")]
    pub selfattention_layer_type: String,
    /// Only "swish".
    #[serde(default = "d_swish")]
    pub activation_type: String,
    /// Only `false`.
    #[serde(default)]
    pub zero_triu: bool,
}

fn d_256() -> usize {
    256
}
fn d_4() -> usize {
    4
}
fn d_2048() -> usize {
    2048
}
fn d_6() -> usize {
    6
}
fn d_31() -> usize {
    31
}
fn d_01() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_conv2d() -> InputLayer {
    InputLayer::Conv2d
}
fn d_batch_norm() -> CnnModuleNorm {
    CnnModuleNorm::BatchNorm
}
fn d_linear() -> String {
    "linear".into()
}
fn d_latest() -> String {
    "latest".into()
}
fn d_rel_pos() -> String {
    "rel_pos".into()
}
fn d_rel_selfattn() -> String {
    "rel_selfattn".into()
}
fn d_swish() -> String {
    "swish".into()
}

impl Default for ConformerConfig {
    fn default() -> Self {
        Self {
            output_size: 256,
            attention_heads: 4,
            linear_units: 2048,
            num_blocks: 6,
            dropout_rate: 0.1,
            positional_dropout_rate: 0.1,
            attention_dropout_rate: 0.0,
            input_layer: InputLayer::Conv2d,
            normalize_before: true,
            macaron_style: true,
            use_cnn_module: true,
            cnn_module_kernel: 31,
            cnn_module_norm: CnnModuleNorm::BatchNorm,
            concat_after: false,
            positionwise_layer_type: d_linear(),
            rel_pos_type: d_latest(),
            pos_enc_layer_type: d_rel_pos(),
            selfattention_layer_type: d_rel_selfattn(),
            activation_type: d_swish(),
            zero_triu: false,
        }
    }
}

fn config_error(field: &'static str, reason: impl Into<String>) -> ConformerError {
    ConformerError::Config {
        field,
        reason: reason.into(),
    }
}

impl ConformerConfig {
    /// Checks the config against what this implementation builds, for `input_size` features.
    pub fn validate(&self, input_size: usize) -> Result<(), ConformerError> {
        let fixed = [
            (
                "positionwise_layer_type",
                &self.positionwise_layer_type,
                "linear",
            ),
            ("rel_pos_type", &self.rel_pos_type, "latest"),
            ("pos_enc_layer_type", &self.pos_enc_layer_type, "rel_pos"),
            (
                "selfattention_layer_type",
                &self.selfattention_layer_type,
                "rel_selfattn",
            ),
            ("activation_type", &self.activation_type, "swish"),
        ];
        for (field, value, only) in fixed {
            if value != only {
                return Err(config_error(
                    field,
                    format!("is {value:?}; only {only:?} is supported"),
                ));
            }
        }
        if self.concat_after {
            return Err(config_error("concat_after", "true is not supported"));
        }
        if self.zero_triu {
            return Err(config_error("zero_triu", "true is not supported"));
        }
        if self.output_size == 0 || self.output_size % 2 != 0 {
            return Err(config_error(
                "output_size",
                format!("is {}; it must be even and positive", self.output_size),
            ));
        }
        if self.attention_heads == 0 || self.output_size % self.attention_heads != 0 {
            return Err(config_error(
                "attention_heads",
                format!(
                    "is {}; it must divide output_size {}",
                    self.attention_heads, self.output_size
                ),
            ));
        }
        if self.linear_units == 0 {
            return Err(config_error("linear_units", "must be positive"));
        }
        if self.cnn_module_kernel % 2 != 1 {
            return Err(config_error(
                "cnn_module_kernel",
                format!("is {}; it must be odd", self.cnn_module_kernel),
            ));
        }
        for (field, p) in [
            ("dropout_rate", self.dropout_rate),
            ("positional_dropout_rate", self.positional_dropout_rate),
            ("attention_dropout_rate", self.attention_dropout_rate),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(config_error(field, format!("is {p}; it must be in [0, 1)")));
            }
        }
        if input_size == 0 {
            return Err(config_error("input_size", "must be positive"));
        }
        if self.input_layer != InputLayer::Linear && self.input_layer.output_length(input_size) == 0
        {
            return Err(config_error(
                "input_layer",
                format!(
                    "{} needs input features of at least 7 dims, got {input_size}",
                    self.input_layer.name()
                ),
            ));
        }
        Ok(())
    }
}

/// ESPnet `RelPositionalEncoding.extend_pe` + the slice taken in `forward`: `[1, 2T - 1, d]`,
/// row `r` encodes relative position `T - 1 - r` (from `T - 1` down to `-(T - 1)`), with
/// `sin` in even and `cos` in odd columns.
pub fn rel_positional_encoding(
    frames: usize,
    d_model: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let rows = (2 * frames).saturating_sub(1);
    Tensor::from_vec(
        rel_positional_table(frames, d_model),
        (1, rows, d_model),
        device,
    )?
    .to_dtype(dtype)
}

/// The values of `rel_positional_encoding` as a row-major `[2T - 1, d]` f32 table.
pub fn rel_positional_table(frames: usize, d_model: usize) -> Vec<f32> {
    let rows = (2 * frames).saturating_sub(1);
    let mut pe = vec![0f32; rows * d_model];
    let log_base = (10000f64).ln() / d_model as f64;
    for (r, row) in pe.chunks_exact_mut(d_model).enumerate() {
        let pos = frames as f64 - 1.0 - r as f64;
        for (i, pair) in row.chunks_mut(2).enumerate() {
            // Same float32 div_term as torch: exp(2i * -(ln 10000 / d)).
            let div = ((2 * i) as f32 * -(log_base as f32)).exp() as f64;
            let angle = (pos * div) as f32;
            pair[0] = angle.sin();
            if pair.len() > 1 {
                pair[1] = angle.cos();
            }
        }
    }
    pe
}

/// ESPnet `RelPositionMultiHeadedAttention.rel_shift`: `[B, H, T, 2T - 1]` → `[B, H, T, T]`
/// with `out[.., i, j] = x[.., i, T - 1 - i + j]` (the score for relative position `i - j`),
/// via the same zero-pad / reshape trick, so its backward is candle's.
pub fn rel_shift(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, n) = x.dims4()?;
    if n != 2 * t - 1 {
        candle_core::bail!("rel_shift: expected last dim 2T-1 = {}, got {n}", 2 * t - 1)
    }
    let zero = Tensor::zeros((b, h, t, 1), x.dtype(), x.device())?;
    let padded = Tensor::cat(&[&zero, x], 3)?; // [B, H, T, 2T]
    padded
        .reshape((b, h, 2 * t, t))?
        .narrow(2, 1, 2 * t - 1)?
        .reshape((b, h, t, 2 * t - 1))?
        .narrow(3, 0, t)
}

/// Masks for one batch after subsampling.
struct Masks {
    /// `[B, 1, 1, T]`: 0 for valid keys, a large negative number for padded keys.
    attention: Tensor,
    /// `[B, T, 1]`: 1 for valid frames, 0 for padding.
    frames: Tensor,
    valid: usize,
}

impl Masks {
    fn new(
        lengths: &[usize],
        frames: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let frame = frame_mask(lengths, frames, dtype, device)?;
        // Large but finite, so a fully padded row stays finite; exp underflows to exactly 0.
        let attention = ((frame.reshape((lengths.len(), 1, 1, frames))? - 1.0)? * 1e9)?;
        Ok(Self {
            attention,
            frames: frame,
            valid: lengths.iter().map(|&l| l.min(frames)).sum(),
        })
    }
}

fn linear(vb: VarBuilder, d_in: usize, d_out: usize) -> candle_core::Result<Linear> {
    candle_nn::linear(d_in, d_out, vb)
}

/// A 3x3 `torch.nn.Conv2d` (keys `weight` `[C_out, C_in, 3, 3]`, `bias`) on channels-last
/// `[B, T, F, C_in]` input, computed as nine gathered taps times `[C_in, C_out]` matmuls.
/// candle's CPU conv2d backward (conv_transpose2d, and a kernel gradient with a whole-image
/// kernel) took most of a training step; these matmuls and gathers have fast backwards.
#[derive(Debug, Clone)]
struct TapConv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

impl TapConv2d {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> candle_core::Result<Self> {
        let bound = 1.0 / ((c_in * 9) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            weight: vb.get_with_hints((c_out, c_in, 3, 3), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
            stride,
        })
    }

    /// Positions `k, k + stride, ...` of one tap along `dim` (`out` of them).
    fn tap(&self, x: &Tensor, dim: usize, k: usize, out: usize) -> candle_core::Result<Tensor> {
        if self.stride == 1 {
            return x.narrow(dim, k, out);
        }
        let end = (k + self.stride * (out - 1) + 1) as u32;
        let idx = Tensor::arange_step(k as u32, end, self.stride as u32, x.device())?;
        x.index_select(&idx, dim)
    }

    /// `[B, T, F, C_in]` → `[B, T', F', C_out]` (no padding, like ESPnet's subsampling convs).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, f, c_in) = x.dims4()?;
        let c_out = self.weight.dim(0)?;
        let (t_out, f_out) = ((t - 3) / self.stride + 1, (f - 3) / self.stride + 1);
        let rows = b * t_out * f_out;
        let mut taps = Vec::with_capacity(9);
        for kt in 0..3 {
            let xt = self.tap(x, 1, kt, t_out)?;
            for kf in 0..3 {
                taps.push(self.tap(&xt, 2, kf, f_out)?.contiguous()?);
            }
        }
        let y = if c_in * 9 <= SMALL_IM2COL {
            // Few input channels: one [rows, 9 C_in] x [9 C_in, C_out] matmul (im2col).
            let cols = Tensor::cat(&taps, 3)?.reshape((rows, 9 * c_in))?;
            let w = self
                .weight
                .permute((0, 2, 3, 1))?
                .reshape((c_out, 9 * c_in))?;
            cols.matmul(&w.t()?)?
        } else {
            // Many input channels: accumulate nine matmuls instead of a 9x larger im2col copy.
            let mut acc: Option<Tensor> = None;
            for (i, patch) in taps.iter().enumerate() {
                let w = self.weight.narrow(2, i / 3, 1)?.narrow(3, i % 3, 1)?;
                let w = w.reshape((c_out, c_in))?.t()?;
                let y = patch.reshape((rows, c_in))?.matmul(&w)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            match acc {
                Some(y) => y,
                None => candle_core::bail!("conv2d: empty kernel"),
            }
        };
        y.broadcast_add(&self.bias)?
            .reshape((b, t_out, f_out, c_out))
    }
}

/// Largest im2col width (9 x input channels) built as one matrix.
const SMALL_IM2COL: usize = 72;

/// ESPnet `Conv2dSubsampling` / `Conv2dSubsampling2` (keys `conv.0`, `conv.2`, `out.0`) without
/// the positional encoding, which the encoder applies. Runs channels-last; `out.0` keeps
/// ESPnet's channel-major `[odim, C * F']` layout and is permuted to `[odim, F' * C]` on use.
#[derive(Debug, Clone)]
struct Conv2dSubsampling {
    conv0: TapConv2d,
    conv1: TapConv2d,
    out_weight: Tensor,
    out_bias: Tensor,
}

impl Conv2dSubsampling {
    fn load(
        vb: VarBuilder,
        layer: InputLayer,
        idim: usize,
        odim: usize,
    ) -> candle_core::Result<Self> {
        let stride2 = if layer == InputLayer::Conv2d { 2 } else { 1 };
        let conv = vb.pp("conv");
        let freq = layer.output_length(idim);
        let out = linear(vb.pp("out").pp("0"), odim * freq, odim)?;
        Ok(Self {
            conv0: TapConv2d::load(conv.pp("0"), 1, odim, 2)?,
            conv1: TapConv2d::load(conv.pp("2"), odim, odim, stride2)?,
            out_weight: out.weight().clone(),
            out_bias: out
                .bias()
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("embed.out.0 has no bias".into()))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.unsqueeze(3)?; // [B, T, F, 1]
        let x = self.conv0.forward(&x)?.relu()?;
        let x = self.conv1.forward(&x)?.relu()?; // [B, T', F', C]
        let (b, t, f, c) = x.dims4()?;
        let odim = self.out_weight.dim(0)?;
        let w = self
            .out_weight
            .reshape((odim, c, f))?
            .transpose(1, 2)?
            .reshape((odim, f * c))?;
        x.reshape((b, t, f * c))?
            .broadcast_matmul(&w.t()?)?
            .broadcast_add(&self.out_bias)
    }
}

/// The `input_layer` of ConformerEncoder (`self.embed` without its positional encoding).
#[derive(Debug, Clone)]
enum Embed {
    Conv(Conv2dSubsampling),
    /// `torch.nn.Sequential(Linear, LayerNorm, Dropout)`: keys `embed.0`, `embed.1`.
    Linear {
        linear: Linear,
        norm: LayerNorm,
        dropout: Dropout,
    },
}

/// ESPnet `RelPositionMultiHeadedAttention` (keys `linear_q/k/v/out`, `linear_pos`,
/// `pos_bias_u`, `pos_bias_v`).
#[derive(Debug, Clone)]
struct RelPositionMultiHeadedAttention {
    linear_q: Linear,
    linear_k: Linear,
    linear_v: Linear,
    linear_out: Linear,
    linear_pos: Linear,
    pos_bias_u: Tensor,
    pos_bias_v: Tensor,
    heads: usize,
    d_k: usize,
    dropout: Dropout,
}

impl RelPositionMultiHeadedAttention {
    fn load(vb: VarBuilder, cfg: &ConformerConfig, rng: &DropoutRng) -> candle_core::Result<Self> {
        let d = cfg.output_size;
        let heads = cfg.attention_heads;
        let d_k = d / heads;
        // xavier_uniform over [H, d_k], as ESPnet initialises the biases.
        let bound = (6.0 / (heads + d_k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            linear_q: linear(vb.pp("linear_q"), d, d)?,
            linear_k: linear(vb.pp("linear_k"), d, d)?,
            linear_v: linear(vb.pp("linear_v"), d, d)?,
            linear_out: linear(vb.pp("linear_out"), d, d)?,
            linear_pos: candle_nn::linear_no_bias(d, d, vb.pp("linear_pos"))?,
            pos_bias_u: vb.get_with_hints((heads, d_k), "pos_bias_u", init)?,
            pos_bias_v: vb.get_with_hints((heads, d_k), "pos_bias_v", init)?,
            heads,
            d_k,
            dropout: Dropout::new(cfg.attention_dropout_rate, rng.clone()),
        })
    }

    /// `[B, T, d]` → `[B, T, H, d_k]`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.d_k))
    }

    fn forward(
        &self,
        x: &Tensor,
        pos_emb: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let q = self.split_heads(&self.linear_q.forward(x)?)?;
        let k = self
            .split_heads(&self.linear_k.forward(x)?)?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .split_heads(&self.linear_v.forward(x)?)?
            .transpose(1, 2)?
            .contiguous()?;
        let p = self
            .linear_pos
            .forward(pos_emb)?
            .reshape((1, 2 * t - 1, self.heads, self.d_k))?
            .transpose(1, 2)?
            .contiguous()?; // [1, H, 2T-1, d_k]
        let q_u = q
            .broadcast_add(&self.pos_bias_u)?
            .transpose(1, 2)?
            .contiguous()?;
        let q_v = q
            .broadcast_add(&self.pos_bias_v)?
            .transpose(1, 2)?
            .contiguous()?;
        let ac = q_u.matmul(&k.t()?)?; // [B, H, T, T]
        let bd = q_v.broadcast_matmul(&p.t()?)?; // [B, H, T, 2T-1]
        let bd = rel_shift(&bd)?;
        let scores = ((ac + bd)? / (self.d_k as f64).sqrt())?.broadcast_add(mask)?;
        let attn = self.dropout.forward(&softmax_last(&scores)?, train)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.linear_out.forward(&out)
    }
}

/// ESPnet `PositionwiseFeedForward` (keys `w_1`, `w_2`) with swish.
#[derive(Debug, Clone)]
struct PositionwiseFeedForward {
    w_1: Linear,
    w_2: Linear,
    dropout: Dropout,
}

impl PositionwiseFeedForward {
    fn load(vb: VarBuilder, cfg: &ConformerConfig, rng: &DropoutRng) -> candle_core::Result<Self> {
        Ok(Self {
            w_1: linear(vb.pp("w_1"), cfg.output_size, cfg.linear_units)?,
            w_2: linear(vb.pp("w_2"), cfg.linear_units, cfg.output_size)?,
            dropout: Dropout::new(cfg.dropout_rate, rng.clone()),
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.w_1.forward(x)?.silu()?;
        self.w_2.forward(&self.dropout.forward(&h, train)?)
    }
}

#[derive(Debug, Clone)]
enum ConvNorm {
    Batch(MaskedBatchNorm),
    Layer(LayerNorm),
}

/// ESPnet `ConvolutionModule` (keys `pointwise_conv1`, `depthwise_conv`, `norm`,
/// `pointwise_conv2`), time-major, with padded frames zeroed before the depthwise conv.
#[derive(Debug, Clone)]
struct ConvolutionModule {
    pointwise_conv1: PointwiseConv1d,
    depthwise_conv: DepthwiseConv1d,
    norm: ConvNorm,
    pointwise_conv2: PointwiseConv1d,
}

impl ConvolutionModule {
    fn load(vb: VarBuilder, cfg: &ConformerConfig) -> candle_core::Result<Self> {
        let c = cfg.output_size;
        let norm = match cfg.cnn_module_norm {
            CnnModuleNorm::BatchNorm => ConvNorm::Batch(MaskedBatchNorm::load(vb.pp("norm"), c)?),
            CnnModuleNorm::LayerNorm => ConvNorm::Layer(LayerNorm::load_with_eps(
                vb.pp("norm"),
                c,
                TORCH_LAYER_NORM_EPS,
            )?),
        };
        Ok(Self {
            pointwise_conv1: PointwiseConv1d::load(vb.pp("pointwise_conv1"), c, 2 * c)?,
            depthwise_conv: DepthwiseConv1d::load(
                vb.pp("depthwise_conv"),
                c,
                cfg.cnn_module_kernel,
            )?,
            norm,
            pointwise_conv2: PointwiseConv1d::load(vb.pp("pointwise_conv2"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor, masks: &Masks, train: bool) -> candle_core::Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let h = self.pointwise_conv1.forward(x)?; // [B, T, 2C]
                                                  // GLU over channels: first half gated by the sigmoid of the second half.
        let h = h
            .narrow(2, 0, c)?
            .mul(&candle_nn::ops::sigmoid(&h.narrow(2, c, c)?)?)?;
        let h = h.broadcast_mul(&masks.frames)?;
        let h = self.depthwise_conv.forward(&h)?;
        let h = match &self.norm {
            ConvNorm::Batch(bn) => bn.forward(&h, &masks.frames, masks.valid, train)?,
            ConvNorm::Layer(ln) => ln.forward(&h)?,
        };
        self.pointwise_conv2.forward(&h.silu()?)
    }
}

/// ESPnet conformer `EncoderLayer` (keys `self_attn`, `feed_forward`, `feed_forward_macaron`,
/// `conv_module`, `norm_ff`, `norm_mha`, `norm_ff_macaron`, `norm_conv`, `norm_final`).
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: RelPositionMultiHeadedAttention,
    feed_forward: PositionwiseFeedForward,
    feed_forward_macaron: Option<(PositionwiseFeedForward, LayerNorm)>,
    conv_module: Option<(ConvolutionModule, LayerNorm)>,
    norm_ff: LayerNorm,
    norm_mha: LayerNorm,
    norm_final: Option<LayerNorm>,
    ff_scale: f64,
    normalize_before: bool,
    dropout: Dropout,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &ConformerConfig, rng: &DropoutRng) -> candle_core::Result<Self> {
        let d = cfg.output_size;
        let feed_forward_macaron = if cfg.macaron_style {
            Some((
                PositionwiseFeedForward::load(vb.pp("feed_forward_macaron"), cfg, rng)?,
                LayerNorm::load(vb.pp("norm_ff_macaron"), d)?,
            ))
        } else {
            None
        };
        let conv_module = if cfg.use_cnn_module {
            Some((
                ConvolutionModule::load(vb.pp("conv_module"), cfg)?,
                LayerNorm::load(vb.pp("norm_conv"), d)?,
            ))
        } else {
            None
        };
        let norm_final = if cfg.use_cnn_module {
            Some(LayerNorm::load(vb.pp("norm_final"), d)?)
        } else {
            None
        };
        Ok(Self {
            self_attn: RelPositionMultiHeadedAttention::load(vb.pp("self_attn"), cfg, rng)?,
            feed_forward: PositionwiseFeedForward::load(vb.pp("feed_forward"), cfg, rng)?,
            feed_forward_macaron,
            conv_module,
            norm_ff: LayerNorm::load(vb.pp("norm_ff"), d)?,
            norm_mha: LayerNorm::load(vb.pp("norm_mha"), d)?,
            norm_final,
            ff_scale: if cfg.macaron_style { 0.5 } else { 1.0 },
            normalize_before: cfg.normalize_before,
            dropout: Dropout::new(cfg.dropout_rate, rng.clone()),
        })
    }

    /// One residual sub-block: pre-norm (or post-norm), `x + scale * dropout(f(norm(x)))`.
    fn residual(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        scale: f64,
        train: bool,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let input = if self.normalize_before {
            norm.forward(x)?
        } else {
            x.clone()
        };
        let mut y = self.dropout.forward(&f(&input)?, train)?;
        if scale != 1.0 {
            y = (y * scale)?;
        }
        let out = (x + y)?;
        if self.normalize_before {
            Ok(out)
        } else {
            norm.forward(&out)
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        pos_emb: &Tensor,
        masks: &Masks,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        if let Some((ff, norm)) = &self.feed_forward_macaron {
            x = self.residual(&x, norm, self.ff_scale, train, |h| ff.forward(h, train))?;
        }
        x = self.residual(&x, &self.norm_mha, 1.0, train, |h| {
            self.self_attn.forward(h, pos_emb, &masks.attention, train)
        })?;
        if let Some((conv, norm)) = &self.conv_module {
            x = self.residual(&x, norm, 1.0, train, |h| conv.forward(h, masks, train))?;
        }
        x = self.residual(&x, &self.norm_ff, self.ff_scale, train, |h| {
            self.feed_forward.forward(h, train)
        })?;
        match &self.norm_final {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }
}

/// ESPnet `ConformerEncoder`: `embed` (subsampling + RelPositionalEncoding), `encoders.N`,
/// `after_norm`.
#[derive(Debug, Clone)]
pub struct ConformerEncoder {
    embed: Embed,
    encoders: Vec<EncoderLayer>,
    after_norm: Option<LayerNorm>,
    pos_dropout: Dropout,
    cfg: ConformerConfig,
}

impl ConformerEncoder {
    /// Builds the encoder for `input_size`-dim input; `rng` drives every dropout inside it.
    pub fn new(
        vb: VarBuilder,
        cfg: &ConformerConfig,
        input_size: usize,
        rng: &DropoutRng,
    ) -> Result<Self, ConformerError> {
        cfg.validate(input_size)?;
        let d = cfg.output_size;
        let embed_vb = vb.pp("embed");
        let embed = match cfg.input_layer {
            InputLayer::Linear => Embed::Linear {
                linear: linear(embed_vb.pp("0"), input_size, d)?,
                norm: LayerNorm::load_with_eps(embed_vb.pp("1"), d, TORCH_LAYER_NORM_EPS)?,
                dropout: Dropout::new(cfg.dropout_rate, rng.clone()),
            },
            layer => Embed::Conv(Conv2dSubsampling::load(embed_vb, layer, input_size, d)?),
        };
        let encoders = (0..cfg.num_blocks)
            .map(|i| EncoderLayer::load(vb.pp("encoders").pp(i.to_string()), cfg, rng))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let after_norm = if cfg.normalize_before {
            Some(LayerNorm::load(vb.pp("after_norm"), d)?)
        } else {
            None
        };
        Ok(Self {
            embed,
            encoders,
            after_norm,
            pos_dropout: Dropout::new(cfg.positional_dropout_rate, rng.clone()),
            cfg: cfg.clone(),
        })
    }

    pub fn output_size(&self) -> usize {
        self.cfg.output_size
    }

    pub fn config(&self) -> &ConformerConfig {
        &self.cfg
    }

    /// `xs`: `[B, T, input_size]`, `lengths[b] <= T` valid frames. Returns `[B, T', output_size]`
    /// and the output lengths (`InputLayer::output_length` of each input length). Frames past an
    /// utterance's output length hold unspecified values.
    pub fn forward(
        &self,
        xs: &Tensor,
        lengths: &[usize],
        train: bool,
    ) -> Result<(Tensor, Vec<usize>), ConformerError> {
        let (b, t, _) = xs.dims3()?;
        if lengths.len() != b {
            return Err(ConformerError::Input(format!(
                "{} lengths for a batch of {b}",
                lengths.len()
            )));
        }
        if let Some(&bad) = lengths.iter().find(|&&l| l > t) {
            return Err(ConformerError::Input(format!(
                "length {bad} exceeds the {t} padded frames"
            )));
        }
        let layer = self.cfg.input_layer;
        if layer.output_length(t) == 0 {
            return Err(ConformerError::TooShort {
                frames: t,
                layer: layer.name(),
                min: layer.min_input_length(),
            });
        }
        let x = match &self.embed {
            Embed::Conv(sub) => sub.forward(xs)?,
            Embed::Linear {
                linear,
                norm,
                dropout,
            } => dropout.forward(&norm.forward(&linear.forward(xs)?)?, train)?,
        };
        let out_lengths: Vec<usize> = lengths.iter().map(|&l| layer.output_length(l)).collect();
        let frames = x.dim(1)?;
        let d = self.cfg.output_size;
        // RelPositionalEncoding.forward: scale by sqrt(d), dropout on both outputs.
        let x = self.pos_dropout.forward(&(x * (d as f64).sqrt())?, train)?;
        let pos_emb = rel_positional_encoding(frames, d, x.dtype(), x.device())?;
        let pos_emb = self.pos_dropout.forward(&pos_emb, train)?;
        let masks = Masks::new(&out_lengths, frames, x.dtype(), x.device())?;
        let mut x = x;
        for layer in &self.encoders {
            x = layer.forward(&x, &pos_emb, &masks, train)?;
        }
        if let Some(norm) = &self.after_norm {
            x = norm.forward(&x)?;
        }
        Ok((x, out_lengths))
    }
}
