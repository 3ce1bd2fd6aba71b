//! `config.json` / `preprocessor_config.json` of wav2vec 2.0, HuBERT, WavLM and data2vec-audio
//! checkpoints. Serde defaults equal transformers' `Wav2Vec2Config` / `HubertConfig` /
//! `WavLMConfig` defaults; [`Wav2Vec2Config::from_json_str`] adds `Data2VecAudioConfig`'s.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A `config.json` / `preprocessor_config.json` that cannot be read or that describes a model
/// this encoder does not implement.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported model config: {0}")]
    Unsupported(String),
}

/// The encoder configuration shared by wav2vec 2.0, HuBERT, WavLM and data2vec-audio
/// (transformers' field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wav2Vec2Config {
    /// "wav2vec2", "hubert", "wavlm" or "data2vec-audio" (others are refused by the loader).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// "group" (GroupNorm on the first conv only) or "layer" (LayerNorm after every conv).
    #[serde(default = "default_group")]
    pub feat_extract_norm: String,
    #[serde(default = "default_gelu")]
    pub feat_extract_activation: String,
    #[serde(default = "default_conv_dim")]
    pub conv_dim: Vec<usize>,
    #[serde(default = "default_conv_stride")]
    pub conv_stride: Vec<usize>,
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    /// The positional conv's kernel; data2vec-audio: the number of positional conv layers.
    #[serde(default = "d_128")]
    pub num_conv_pos_embeddings: usize,
    #[serde(default = "d_16")]
    pub num_conv_pos_embedding_groups: usize,
    /// Pre-LN Transformer ("large" / stable layer norm variant).
    #[serde(default)]
    pub do_stable_layer_norm: bool,
    /// HuBERT only: LayerNorm inside the feature projection (transformers default true).
    #[serde(default = "d_true")]
    pub feat_proj_layer_norm: bool,
    /// Newer HuBERT variants: BatchNorm instead of weight norm on the positional conv.
    /// Not in transformers 4.46, so not implemented (refused by `validate`).
    #[serde(default)]
    pub conv_pos_batch_norm: bool,
    /// MMS attention adapters inside every layer change the hidden states: refused by `validate`.
    #[serde(default)]
    pub adapter_attn_dim: Option<usize>,
    /// WavLM: relative position buckets (both directions together) of the attention bias.
    #[serde(default = "d_320")]
    pub num_buckets: usize,
    /// WavLM: the distance the log-spaced buckets reach (farther ones share the last bucket).
    #[serde(default = "d_800")]
    pub max_bucket_distance: usize,
    /// data2vec-audio: the kernel of every positional conv layer.
    #[serde(default = "d_19")]
    pub conv_pos_kernel_size: usize,
}

/// The encoder families this definition implements (transformers' `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Wav2Vec2,
    Hubert,
    /// Gated relative position bias in every attention layer.
    WavLm,
    /// LayerNorm conv features, a stack of positional conv layers, post-LN.
    Data2VecAudio,
}

impl Family {
    pub fn of(model_type: &str) -> Option<Self> {
        match model_type {
            "wav2vec2" => Some(Self::Wav2Vec2),
            "hubert" => Some(Self::Hubert),
            "wavlm" => Some(Self::WavLm),
            "data2vec-audio" => Some(Self::Data2VecAudio),
            _ => None,
        }
    }

    /// How people name it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Wav2Vec2 => "wav2vec 2.0",
            Self::Hubert => "HuBERT",
            Self::WavLm => "WavLM",
            Self::Data2VecAudio => "data2vec-audio",
        }
    }
}

/// The `model_type`s the loader accepts, for error messages.
pub const MODEL_TYPES: &str = "\"wav2vec2\", \"hubert\", \"wavlm\" or \"data2vec-audio\"";

fn default_model_type() -> String {
    "wav2vec2".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_group() -> String {
    "group".into()
}
fn d_768() -> usize {
    768
}
fn d_12() -> usize {
    12
}
fn d_3072() -> usize {
    3072
}
fn d_128() -> usize {
    128
}
fn d_16() -> usize {
    16
}
fn d_320() -> usize {
    320
}
fn d_800() -> usize {
    800
}
fn d_19() -> usize {
    19
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn default_conv_dim() -> Vec<usize> {
    vec![512; 7]
}
fn default_conv_stride() -> Vec<usize> {
    vec![5, 2, 2, 2, 2, 2, 2]
}
fn default_conv_kernel() -> Vec<usize> {
    vec![10, 3, 3, 3, 3, 2, 2]
}

/// `preprocessor_config.json` (transformers' `Wav2Vec2FeatureExtractor`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    #[serde(default = "d_true")]
    pub return_attention_mask: bool,
    #[serde(default = "d_16000")]
    pub sampling_rate: u32,
    #[serde(default)]
    pub padding_value: f32,
}

fn d_16000() -> u32 {
    16000
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            do_normalize: true,
            return_attention_mask: true,
            sampling_rate: 16000,
            padding_value: 0.0,
        }
    }
}

impl Wav2Vec2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_json_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a `config.json` with the defaults of its family: data2vec-audio's config class
    /// has no `feat_extract_norm` or `do_stable_layer_norm` (its convs are always
    /// LayerNorm'd, its Transformer post-LN) and defaults to 5 positional conv layers.
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        let mut raw: serde_json::Value = serde_json::from_str(text)?;
        if let Some(obj) = raw.as_object_mut() {
            if obj.get("model_type").and_then(|v| v.as_str()) == Some("data2vec-audio") {
                obj.insert("feat_extract_norm".into(), "layer".into());
                obj.insert("do_stable_layer_norm".into(), false.into());
                obj.entry("num_conv_pos_embeddings").or_insert(5.into());
            }
        }
        serde_json::from_value(raw)
    }

    /// The family `model_type` names (None for one this encoder does not implement).
    pub fn family(&self) -> Option<Family> {
        Family::of(&self.model_type)
    }

    /// Whether this is a HuBERT checkpoint (differs only in the feature projection).
    pub fn is_hubert(&self) -> bool {
        self.model_type == "hubert"
    }

    /// Whether attention adds WavLM's gated relative position bias.
    pub fn is_wavlm(&self) -> bool {
        self.family() == Some(Family::WavLm)
    }

    /// Whether the positional embedding is data2vec-audio's stack of conv layers.
    pub fn is_data2vec_audio(&self) -> bool {
        self.family() == Some(Family::Data2VecAudio)
    }

    /// Whether the feature projection has its LayerNorm (always for wav2vec 2.0).
    pub fn has_feat_proj_layer_norm(&self) -> bool {
        !self.is_hubert() || self.feat_proj_layer_norm
    }

    /// Number of hidden states `forward` returns for the whole model (`num_hidden_layers + 1`).
    pub fn num_hidden_states(&self) -> usize {
        self.num_hidden_layers + 1
    }

    /// Waveform samples per output frame: the product of the conv strides (320 for every
    /// released wav2vec 2.0 / HuBERT model).
    pub fn samples_per_frame(&self) -> usize {
        self.conv_stride.iter().product()
    }

    /// Output frames per second at 16 kHz input (50 Hz for the default convs).
    pub fn frame_rate(&self) -> f64 {
        16000.0 / self.samples_per_frame() as f64
    }

    /// Samples seen by one output frame (400 for the default convs); shorter inputs give no frame.
    pub fn receptive_field(&self) -> usize {
        let mut field = 1;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride).rev() {
            field = (field - 1) * s + k;
        }
        field
    }

    /// Checks that this encoder implements the configuration exactly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Unsupported(m));
        if self.family().is_none() {
            return bad(format!(
                "model_type {:?} (only {MODEL_TYPES} are implemented)",
                self.model_type
            ));
        }
        if self.is_data2vec_audio() && (self.conv_pos_kernel_size == 0) {
            return bad("conv_pos_kernel_size is 0".into());
        }
        if self.is_wavlm() {
            // transformers' bucket function: num_buckets / 4 exact distances per direction,
            // then log-spaced up to max_bucket_distance.
            let max_exact = self.num_buckets / 4;
            if max_exact == 0 || self.max_bucket_distance <= max_exact {
                return bad(format!(
                    "num_buckets {} with max_bucket_distance {} (need num_buckets >= 4 and \
                     max_bucket_distance > num_buckets / 4)",
                    self.num_buckets, self.max_bucket_distance
                ));
            }
        }
        if self.feat_extract_norm != "group" && self.feat_extract_norm != "layer" {
            return bad(format!(
                "feat_extract_norm {:?} (expected \"group\" or \"layer\")",
                self.feat_extract_norm
            ));
        }
        let n = self.conv_dim.len();
        if n == 0 || self.conv_kernel.len() != n || self.conv_stride.len() != n {
            return bad(format!(
                "conv_dim, conv_kernel and conv_stride must have the same non-zero length (got {}, {}, {})",
                n,
                self.conv_kernel.len(),
                self.conv_stride.len()
            ));
        }
        if self.conv_kernel.contains(&0)
            || self.conv_stride.contains(&0)
            || self.conv_dim.contains(&0)
        {
            return bad("conv_dim, conv_kernel and conv_stride entries must be positive".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_conv_pos_embedding_groups == 0
            || self.hidden_size % self.num_conv_pos_embedding_groups != 0
            || self.num_conv_pos_embeddings == 0
        {
            return bad(format!(
                "hidden_size {} is not divisible by num_conv_pos_embedding_groups {} (or num_conv_pos_embeddings is 0)",
                self.hidden_size, self.num_conv_pos_embedding_groups
            ));
        }
        for (field, act) in [
            ("hidden_act", &self.hidden_act),
            ("feat_extract_activation", &self.feat_extract_activation),
        ] {
            if Activation::from_name(act).is_none() {
                return bad(format!(
                    "{field} {act:?} (expected gelu, gelu_new, gelu_pytorch_tanh, relu, silu or swish)"
                ));
            }
        }
        if self.conv_pos_batch_norm {
            return bad(
                "conv_pos_batch_norm = true (BatchNorm positional conv) is not implemented".into(),
            );
        }
        if self.adapter_attn_dim.is_some() {
            return bad(
                "adapter_attn_dim is set (MMS attention adapters) and is not implemented".into(),
            );
        }
        Ok(())
    }
}

/// The activation functions real checkpoints name (transformers' `ACT2FN` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU with erf (transformers' "gelu").
    Gelu,
    /// Tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }
}

/// Every tensor the encoder reads, with its shape, in the canonical naming: transformers'
/// `Wav2Vec2Model` / `HubertModel` state-dict keys without the `wav2vec2.` / `hubert.` prefix,
/// and the positional conv's weight norm as `weight_g` [1, 1, K] / `weight_v` [H, H/G, K].
/// Tensors the encoder does not need (`masked_spec_embed`, heads, quantizer) are not listed.
pub fn expected_tensors(cfg: &Wav2Vec2Config) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));
    let mut c_in = 1;
    for (i, ((&c, &k), _)) in cfg
        .conv_dim
        .iter()
        .zip(&cfg.conv_kernel)
        .zip(&cfg.conv_stride)
        .enumerate()
    {
        let p = format!("feature_extractor.conv_layers.{i}");
        add(format!("{p}.conv.weight"), vec![c, c_in, k]);
        if cfg.conv_bias {
            add(format!("{p}.conv.bias"), vec![c]);
        }
        if cfg.feat_extract_norm == "layer" || i == 0 {
            add(format!("{p}.layer_norm.weight"), vec![c]);
            add(format!("{p}.layer_norm.bias"), vec![c]);
        }
        c_in = c;
    }
    let h = cfg.hidden_size;
    if cfg.has_feat_proj_layer_norm() {
        add("feature_projection.layer_norm.weight".into(), vec![c_in]);
        add("feature_projection.layer_norm.bias".into(), vec![c_in]);
    }
    add("feature_projection.projection.weight".into(), vec![h, c_in]);
    add("feature_projection.projection.bias".into(), vec![h]);
    let g = cfg.num_conv_pos_embedding_groups.max(1);
    if cfg.is_data2vec_audio() {
        let k = cfg.conv_pos_kernel_size;
        for j in 0..cfg.num_conv_pos_embeddings {
            let p = format!("encoder.pos_conv_embed.layers.{j}.conv");
            add(format!("{p}.weight"), vec![h, h / g, k]);
            add(format!("{p}.bias"), vec![h]);
        }
    } else {
        let k = cfg.num_conv_pos_embeddings;
        add("encoder.pos_conv_embed.conv.weight_g".into(), vec![1, 1, k]);
        add(
            "encoder.pos_conv_embed.conv.weight_v".into(),
            vec![h, h / g, k],
        );
        add("encoder.pos_conv_embed.conv.bias".into(), vec![h]);
    }
    add("encoder.layer_norm.weight".into(), vec![h]);
    add("encoder.layer_norm.bias".into(), vec![h]);
    let f = cfg.intermediate_size;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{p}.attention.{proj}.weight"), vec![h, h]);
            add(format!("{p}.attention.{proj}.bias"), vec![h]);
        }
        for norm in ["layer_norm", "final_layer_norm"] {
            add(format!("{p}.{norm}.weight"), vec![h]);
            add(format!("{p}.{norm}.bias"), vec![h]);
        }
        add(
            format!("{p}.feed_forward.intermediate_dense.weight"),
            vec![f, h],
        );
        add(format!("{p}.feed_forward.intermediate_dense.bias"), vec![f]);
        add(format!("{p}.feed_forward.output_dense.weight"), vec![h, f]);
        add(format!("{p}.feed_forward.output_dense.bias"), vec![h]);
        if cfg.is_wavlm() {
            let (heads, a) = (cfg.num_attention_heads, format!("{p}.attention"));
            add(format!("{a}.gru_rel_pos_const"), vec![1, heads, 1, 1]);
            add(format!("{a}.gru_rel_pos_linear.weight"), vec![8, h / heads]);
            add(format!("{a}.gru_rel_pos_linear.bias"), vec![8]);
            if l == 0 {
                // computed in the first layer and passed on to the others
                add(
                    format!("{a}.rel_attn_embed.weight"),
                    vec![cfg.num_buckets, heads],
                );
            }
        }
    }
    out
}

/// Number of parameters the encoder reads (the sum over `expected_tensors`).
pub fn parameter_count(cfg: &Wav2Vec2Config) -> usize {
    expected_tensors(cfg)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

impl PreprocessorConfig {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl Default for Wav2Vec2Config {
    /// transformers' `Wav2Vec2Config()` (wav2vec2-base).
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_defaults_count_and_frames() {
        let cfg = Wav2Vec2Config::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.samples_per_frame(), 320);
        assert_eq!(cfg.frame_rate(), 50.0);
        assert_eq!(cfg.receptive_field(), 400);
        // facebook/wav2vec2-base: Wav2Vec2Model state dict size without masked_spec_embed (transformers 4.46).
        assert_eq!(parameter_count(&cfg), 94_370_944);
        // wav2vec2-large-lv60 shapes and a HuBERT without the projection LayerNorm (same source).
        let large: Wav2Vec2Config = serde_json::from_str(
            r#"{"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                "intermediate_size": 4096, "feat_extract_norm": "layer", "conv_bias": true,
                "do_stable_layer_norm": true}"#,
        )
        .unwrap();
        assert_eq!(parameter_count(&large), 315_437_696);
        let hubert: Wav2Vec2Config =
            serde_json::from_str(r#"{"model_type": "hubert", "feat_proj_layer_norm": false}"#)
                .unwrap();
        assert_eq!(parameter_count(&hubert), 94_369_920);
    }

    #[test]
    fn refuses_what_the_encoder_does_not_implement() {
        let parse = |json: &str| serde_json::from_str::<Wav2Vec2Config>(json).unwrap();
        assert!(parse(r#"{"model_type": "data2vec-text"}"#)
            .validate()
            .is_err());
        assert!(parse(r#"{"model_type": "wavlm", "num_buckets": 3}"#)
            .validate()
            .is_err());
        assert!(
            parse(r#"{"model_type": "wavlm", "num_buckets": 320, "max_bucket_distance": 80}"#)
                .validate()
                .is_err()
        );
        assert!(parse(r#"{"feat_extract_norm": "batch"}"#)
            .validate()
            .is_err());
        assert!(parse(r#"{"conv_dim": [512, 512], "conv_kernel": [10]}"#)
            .validate()
            .is_err());
        assert!(parse(r#"{"hidden_size": 100}"#).validate().is_err());
        assert!(parse(r#"{"adapter_attn_dim": 16}"#).validate().is_err());
        assert!(parse(r#"{"conv_pos_batch_norm": true}"#)
            .validate()
            .is_err());
        assert!(parse(r#"{"hidden_act": "mish"}"#).validate().is_err());
        let hubert = parse(r#"{"model_type": "hubert", "feat_proj_layer_norm": false}"#);
        hubert.validate().unwrap();
        assert!(!hubert.has_feat_proj_layer_norm());
        // wav2vec2 always has the projection LayerNorm, whatever the (HuBERT-only) flag says.
        assert!(parse(r#"{"feat_proj_layer_norm": false}"#).has_feat_proj_layer_norm());
    }

    /// Parameter counts of the released base checkpoints (transformers 4.46 state dicts
    /// without `masked_spec_embed`), and data2vec-audio's family defaults.
    #[test]
    fn wavlm_and_data2vec_audio_configs() {
        let wavlm = Wav2Vec2Config::from_json_str(r#"{"model_type": "wavlm"}"#).unwrap();
        wavlm.validate().unwrap();
        assert!(wavlm.is_wavlm());
        assert_eq!((wavlm.num_buckets, wavlm.max_bucket_distance), (320, 800));
        // microsoft/wavlm-base: wav2vec2-base + 12 × (gate 8·64 + 8 + 12) + 320 × 12 buckets
        assert_eq!(parameter_count(&wavlm), 94_370_944 + 12 * 532 + 3840);
        let d2v = Wav2Vec2Config::from_json_str(
            r#"{"model_type": "data2vec-audio", "feat_extract_norm": "group",
                "do_stable_layer_norm": true}"#,
        )
        .unwrap();
        d2v.validate().unwrap();
        assert!(d2v.is_data2vec_audio());
        assert_eq!(d2v.feat_extract_norm, "layer");
        assert!(!d2v.do_stable_layer_norm);
        assert_eq!(
            (d2v.num_conv_pos_embeddings, d2v.conv_pos_kernel_size),
            (5, 19)
        );
        // Data2VecAudioModel(Data2VecAudioConfig()) state dict, transformers 4.46.3
        assert_eq!(parameter_count(&d2v), 93_163_520);
    }
}
