//! `config.json` / `preprocessor_config.json` of wav2vec 2.0 and HuBERT checkpoints.
//! Serde defaults equal transformers' `Wav2Vec2Config` / `HubertConfig` defaults.
use serde::{Deserialize, Serialize};

/// The encoder configuration shared by wav2vec 2.0 and HuBERT (transformers' field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wav2Vec2Config {
    /// "wav2vec2" or "hubert" (data2vec-audio and others are refused by the loader).
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
    /// wav2vec2 models always have the projection LayerNorm; HuBERT follows `feat_proj_layer_norm`.
    #[serde(default)]
    pub conv_pos_batch_norm: bool,
}

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
