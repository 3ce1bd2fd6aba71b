//! fairseq wav2vec 2.0 / HuBERT / data2vec-audio checkpoints and the official (unilm) WavLM
//! checkpoints: the stored model configuration (`cfg.model`, an omegaconf DictConfig or plain
//! dict, the legacy argparse `args`, or unilm's flat `cfg` dict of `WavLMConfig` fields) mapped
//! onto transformers' config fields, the way transformers'
//! `convert_*_original_pytorch_checkpoint_to_pytorch.py` would build the config for it.
use super::pickle::{Pickle, Value};
use crate::models::ssl::config::{PreprocessorConfig, Wav2Vec2Config};
use serde_json::json;

/// Where a fairseq checkpoint keeps its model settings.
struct ModelSettings<'p> {
    pickle: &'p Pickle,
    model: &'p Value,
    /// `cfg.task` (or the Namespace itself for legacy `args`).
    task: Option<&'p Value>,
    /// How error messages name the settings, e.g. "cfg.model" or "args".
    origin: String,
    family: String,
}

/// Why a fairseq checkpoint's stored config cannot be used.
#[derive(Debug)]
pub enum StoredConfigError {
    /// The checkpoint is another model family (its fairseq `_name`/`arch`).
    UnsupportedModel(String),
    /// A key is missing or unreadable; the message names it.
    Unreadable(String),
    /// A variant of a supported family that the encoder does not implement (no config.json
    /// can make it loadable); the message names the setting.
    NotImplemented(String),
}

impl From<String> for StoredConfigError {
    fn from(s: String) -> Self {
        Self::Unreadable(s)
    }
}

impl From<&str> for StoredConfigError {
    fn from(s: &str) -> Self {
        Self::Unreadable(s.to_string())
    }
}

/// The encoder config and audio preprocessing stored in a fairseq checkpoint.
/// Errors name the missing or unreadable key.
pub fn config_from_fairseq(
    p: &Pickle,
    root: &Value,
) -> Result<(Wav2Vec2Config, PreprocessorConfig), StoredConfigError> {
    let s = locate(p, root)?;
    check_implemented(&s).map_err(StoredConfigError::NotImplemented)?;
    let cfg = encoder_config(&s)?;
    let pre = preprocessor(&s, &cfg);
    Ok((cfg, pre))
}

/// The fine-tuned wrappers (`wav2vec_ctc`, `hubert_ctc`, seq2seq) keep the pretrained encoder's
/// settings in `w2v_args`.
fn is_finetuned(name: &str) -> bool {
    name.ends_with("_ctc") || name.ends_with("_seq2seq")
}

fn locate<'p>(p: &'p Pickle, root: &'p Value) -> Result<ModelSettings<'p>, StoredConfigError> {
    let cfg = p.get(root, "cfg").filter(|v| p.entries(v).is_some());
    let args = p.get(root, "args").filter(|v| p.entries(v).is_some());
    match (cfg, args) {
        (Some(cfg), args) => match from_cfg(p, cfg) {
            Ok(s) => Ok(s),
            Err(e @ StoredConfigError::UnsupportedModel(_)) => Err(e),
            // Some converted checkpoints keep an empty cfg next to the real args.
            Err(e) => args.map_or(Err(e), |a| from_args(p, a)),
        },
        (None, Some(args)) => from_args(p, args),
        (None, None) => Err("the checkpoint stores neither cfg nor args".into()),
    }
}

fn from_cfg<'p>(p: &'p Pickle, cfg: &'p Value) -> Result<ModelSettings<'p>, StoredConfigError> {
    // unilm's WavLM.pt: `cfg` is the flat WavLMConfig, with the relative position settings.
    if p.get(cfg, "model").is_none() && p.get(cfg, "relative_position_embedding").is_some() {
        return Ok(ModelSettings {
            pickle: p,
            model: cfg,
            task: Some(cfg),
            origin: "cfg".into(),
            family: "wavlm".into(),
        });
    }
    let model = p
        .get(cfg, "model")
        .filter(|v| p.entries(v).is_some())
        .ok_or("the checkpoint's cfg has no model section (cfg.model)")?;
    let name = str_of(p, model, "_name").unwrap_or_default();
    if is_finetuned(&name) {
        let w2v = p
            .get(model, "w2v_args")
            .filter(|v| p.entries(v).is_some())
            .ok_or(format!(
                "cfg.model is a fine-tuned {name} model without cfg.model.w2v_args"
            ))?;
        let inner = p
            .get(w2v, "model")
            .ok_or("cfg.model.w2v_args has no model section")?;
        let family = family(&str_of(p, inner, "_name").unwrap_or_default())?;
        return Ok(ModelSettings {
            pickle: p,
            model: inner,
            task: p.get(w2v, "task"),
            origin: "cfg.model.w2v_args.model".into(),
            family,
        });
    }
    Ok(ModelSettings {
        pickle: p,
        model,
        task: p.get(cfg, "task"),
        origin: "cfg.model".into(),
        family: family(&name)?,
    })
}

fn from_args<'p>(p: &'p Pickle, args: &'p Value) -> Result<ModelSettings<'p>, StoredConfigError> {
    let arch = str_of(p, args, "arch").ok_or("args has no arch")?;
    if is_finetuned(&arch) {
        let inner = p
            .get(args, "w2v_args")
            .filter(|v| p.entries(v).is_some())
            .ok_or(format!(
                "args is a fine-tuned {arch} model without args.w2v_args"
            ))?;
        let inner_arch = str_of(p, inner, "arch").unwrap_or_default();
        return Ok(ModelSettings {
            pickle: p,
            model: inner,
            task: Some(inner),
            origin: "args.w2v_args".into(),
            family: family(&inner_arch)?,
        });
    }
    Ok(ModelSettings {
        pickle: p,
        model: args,
        task: Some(args),
        origin: "args".into(),
        family: family(&arch)?,
    })
}

fn family(name: &str) -> Result<String, StoredConfigError> {
    match name {
        "wav2vec2" => Ok("wav2vec2".into()),
        "hubert" => Ok("hubert".into()),
        "data2vec_audio" => Ok("data2vec-audio".into()),
        "" => Err(
            "the stored model config has no _name/arch (cannot tell wav2vec2 from hubert)".into(),
        ),
        other => Err(StoredConfigError::UnsupportedModel(other.to_string())),
    }
}

fn str_of(p: &Pickle, v: &Value, key: &str) -> Option<String> {
    match p.get(v, key)? {
        Value::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

impl ModelSettings<'_> {
    fn raw(&self, key: &str) -> Option<&Value> {
        self.pickle
            .get(self.model, key)
            .filter(|v| **v != Value::None)
    }

    fn usize_req(&self, key: &str) -> Result<usize, String> {
        match self.raw(key) {
            Some(Value::Int(i)) if *i > 0 => Ok(*i as usize),
            Some(other) => Err(format!(
                "{}.{key} is not a positive integer: {}",
                self.origin,
                other.brief()
            )),
            None => Err(format!(
                "{}.{key} is missing from the checkpoint",
                self.origin
            )),
        }
    }

    /// fairseq fills absent fields with its dataclass defaults; so do we.
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.raw(key) {
            None => Ok(default),
            Some(_) => self.usize_req(key),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Int(i)) => Ok(*i != 0),
            Some(other) => Err(format!(
                "{}.{key} is not a boolean: {}",
                self.origin,
                other.brief()
            )),
        }
    }

    fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        match self.raw(key) {
            None => Ok(default.to_string()),
            Some(Value::Str(s)) => Ok(s.to_string()),
            Some(other) => Err(format!(
                "{}.{key} is not a string: {}",
                self.origin,
                other.brief()
            )),
        }
    }
}

/// fairseq's default `conv_feature_layers` (wav2vec2 and HuBERT alike).
const DEFAULT_CONV_LAYERS: &str = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2";

/// Refuses the stored variants of a supported family that the encoder does not implement.
fn check_implemented(s: &ModelSettings) -> Result<(), String> {
    let o = &s.origin;
    let pos_depth = s.usize_or("pos_conv_depth", 1)?;
    let data2vec = s.family == "data2vec-audio";
    if data2vec && pos_depth == 1 {
        return Err(format!(
            "{o}.pos_conv_depth is 1 (one weight-normed positional conv); data2vec-audio is \
             supported with its stack of positional conv layers (pos_conv_depth > 1)"
        ));
    }
    if !data2vec && pos_depth != 1 {
        return Err(format!(
            "{o}.pos_conv_depth > 1 is not supported for {}",
            s.family
        ));
    }
    if s.family == "wavlm"
        && !(s.bool_or("relative_position_embedding", false)? && s.bool_or("gru_rel_pos", false)?)
    {
        return Err(format!(
            "{o}: WavLM without the gated relative position bias (relative_position_embedding \
             and gru_rel_pos both true) is not supported"
        ));
    }
    Ok(())
}

fn encoder_config(s: &ModelSettings) -> Result<Wav2Vec2Config, String> {
    let o = &s.origin;
    let layer_type = s.str_or("layer_type", "transformer")?;
    if layer_type != "transformer" {
        return Err(format!(
            "{o}.layer_type is \"{layer_type}\"; only the Transformer encoder is supported"
        ));
    }
    let pos_depth = s.usize_or("pos_conv_depth", 1)?;
    let data2vec = s.family == "data2vec-audio";
    let mode = s.str_or("extractor_mode", "default")?;
    let feat_extract_norm = match mode.as_str() {
        "default" => "group",
        "layer_norm" => "layer",
        other => return Err(format!("{o}.extractor_mode \"{other}\" is unknown")),
    };
    let conv_spec = s.str_or("conv_feature_layers", DEFAULT_CONV_LAYERS)?;
    let conv = parse_conv_feature_layers(&conv_spec).map_err(|e| {
        let shown = Value::Str(conv_spec.as_str().into()).brief();
        format!("{o}.conv_feature_layers {shown}: {e}")
    })?;
    let activation = s.str_or("activation_fn", "gelu")?;
    let conv_pos = s.usize_or("conv_pos", 128)?;
    let mut cfg = json!({
        "model_type": s.family,
        "hidden_size": s.usize_req("encoder_embed_dim")?,
        "num_hidden_layers": s.usize_req("encoder_layers")?,
        "num_attention_heads": s.usize_req("encoder_attention_heads")?,
        "intermediate_size": s.usize_req("encoder_ffn_embed_dim")?,
        "hidden_act": activation,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": feat_extract_norm,
        "feat_extract_activation": "gelu",
        "conv_dim": conv.iter().map(|c| c.0).collect::<Vec<_>>(),
        "conv_kernel": conv.iter().map(|c| c.1).collect::<Vec<_>>(),
        "conv_stride": conv.iter().map(|c| c.2).collect::<Vec<_>>(),
        "conv_bias": s.bool_or("conv_bias", false)?,
        "num_conv_pos_embeddings": conv_pos,
        "num_conv_pos_embedding_groups": s.usize_or("conv_pos_groups", 16)?,
        "do_stable_layer_norm": s.bool_or("layer_norm_first", false)?,
        "feat_proj_layer_norm": true,
        "conv_pos_batch_norm": false,
    });
    if data2vec {
        // fairseq's stack: pos_conv_depth layers of kernel max(3, conv_pos / depth).
        cfg["num_conv_pos_embeddings"] = pos_depth.into();
        cfg["conv_pos_kernel_size"] = (conv_pos / pos_depth).max(3).into();
    }
    if s.family == "wavlm" {
        // unilm WavLMConfig's defaults
        cfg["num_buckets"] = s.usize_or("num_buckets", 320)?.into();
        cfg["max_bucket_distance"] = s.usize_or("max_distance", 1280)?.into();
    }
    // Fields we do not set take the config's serde defaults (transformers' defaults).
    serde_json::from_value(cfg).map_err(|e| format!("cannot build a config from {o}: {e}"))
}

/// Mirrors transformers' converter: attention masks for layer-norm extractors; fairseq's
/// `task.normalize` decides input normalisation.
fn preprocessor(s: &ModelSettings, cfg: &Wav2Vec2Config) -> PreprocessorConfig {
    let p = s.pickle;
    let task = s.task;
    let normalize = task
        .and_then(|t| p.get(t, "normalize"))
        .and_then(|v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
        .unwrap_or(false);
    let rate = task
        .and_then(|t| p.get(t, "sample_rate"))
        .and_then(|v| match v {
            Value::Int(i) => u32::try_from(*i).ok(),
            Value::Float(f) => Some(*f as u32),
            _ => None,
        })
        .unwrap_or(16000);
    PreprocessorConfig {
        do_normalize: normalize,
        return_attention_mask: cfg.feat_extract_norm == "layer",
        sampling_rate: rate,
        ..PreprocessorConfig::default()
    }
}

/// More conv layers than any released model has (7) by far; guards against a corrupt string.
const MAX_CONV_LAYERS: usize = 64;

/// Parses fairseq's `conv_feature_layers`, a Python expression such as
/// `"[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"`, into (dim, kernel, stride) triples.
pub fn parse_conv_feature_layers(spec: &str) -> Result<Vec<(usize, usize, usize)>, String> {
    let mut p = ExprParser {
        s: spec.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        let mut term = p.list()?;
        if p.eat(b'*') {
            let n = p.int()?;
            if n > MAX_CONV_LAYERS {
                return Err(format!("repeat count {n} is implausible"));
            }
            let one = term.clone();
            for _ in 1..n {
                term.extend_from_slice(&one);
            }
            if n == 0 {
                term.clear();
            }
        }
        out.extend(term);
        if out.len() > MAX_CONV_LAYERS {
            return Err(format!("more than {MAX_CONV_LAYERS} conv layers"));
        }
        if !p.eat(b'+') {
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text at character {}", p.i));
    }
    if out.is_empty() {
        return Err("no conv layers".into());
    }
    Ok(out)
}

struct ExprParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl ExprParser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at character {}", c as char, self.i))
        }
    }

    fn int(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or(format!("expected an integer at character {start}"))
    }

    fn list(&mut self) -> Result<Vec<(usize, usize, usize)>, String> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        while self.eat(b'(') {
            let d = self.int()?;
            self.expect(b',')?;
            let k = self.int()?;
            self.expect(b',')?;
            let st = self.int()?;
            self.eat(b',');
            self.expect(b')')?;
            out.push((d, k, st));
            if !self.eat(b',') {
                break;
            }
        }
        self.expect(b']')?;
        Ok(out)
    }
}

/// fairseq parameter names → canonical (transformers) names; other names pass through.
/// Mirrors the MAPPING tables of transformers' fairseq converters.
pub fn fairseq_to_canonical(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["feature_extractor", "conv_layers", i, "0", leaf] => {
            format!("feature_extractor.conv_layers.{i}.conv.{leaf}")
        }
        // GroupNorm (`.2`) or Sequential(TransposeLast, LayerNorm, TransposeLast) (`.2.1`).
        ["feature_extractor", "conv_layers", i, "2", leaf]
        | ["feature_extractor", "conv_layers", i, "2", "1", leaf] => {
            format!("feature_extractor.conv_layers.{i}.layer_norm.{leaf}")
        }
        ["post_extract_proj", leaf] => format!("feature_projection.projection.{leaf}"),
        ["layer_norm", leaf] => format!("feature_projection.layer_norm.{leaf}"),
        ["encoder", "pos_conv", "0", leaf] => format!("encoder.pos_conv_embed.conv.{leaf}"),
        // data2vec-audio's stack: Sequential(Conv1d, SamePad, TransposeLast, LayerNorm, ...)
        ["encoder", "pos_conv", j, "0", leaf] => {
            format!("encoder.pos_conv_embed.layers.{j}.conv.{leaf}")
        }
        // unilm WavLM's gate and relative position embedding
        ["encoder", "layers", i, "self_attn", "grep_linear", leaf] => {
            format!("encoder.layers.{i}.attention.gru_rel_pos_linear.{leaf}")
        }
        ["encoder", "layers", i, "self_attn", "grep_a"] => {
            format!("encoder.layers.{i}.attention.gru_rel_pos_const")
        }
        ["encoder", "layers", i, "self_attn", "relative_attention_bias", leaf] => {
            format!("encoder.layers.{i}.attention.rel_attn_embed.{leaf}")
        }
        ["encoder", "layers", i, "self_attn", proj, leaf] => {
            format!("encoder.layers.{i}.attention.{proj}.{leaf}")
        }
        ["encoder", "layers", i, "self_attn_layer_norm", leaf] => {
            format!("encoder.layers.{i}.layer_norm.{leaf}")
        }
        ["encoder", "layers", i, "fc1", leaf] => {
            format!("encoder.layers.{i}.feed_forward.intermediate_dense.{leaf}")
        }
        ["encoder", "layers", i, "fc2", leaf] => {
            format!("encoder.layers.{i}.feed_forward.output_dense.{leaf}")
        }
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fairseq_default_conv_stack() {
        let c = parse_conv_feature_layers(DEFAULT_CONV_LAYERS).unwrap();
        let dims: Vec<_> = c.iter().map(|x| x.0).collect();
        let kernels: Vec<_> = c.iter().map(|x| x.1).collect();
        let strides: Vec<_> = c.iter().map(|x| x.2).collect();
        assert_eq!(dims, vec![512; 7]);
        assert_eq!(kernels, vec![10, 3, 3, 3, 3, 2, 2]);
        assert_eq!(strides, vec![5, 2, 2, 2, 2, 2, 2]);
        let c = parse_conv_feature_layers("[(8,10,5), (8, 3, 2)]*1+[(8,2,2)]").unwrap();
        assert_eq!(c, vec![(8, 10, 5), (8, 3, 2), (8, 2, 2)]);
        assert!(parse_conv_feature_layers("[(512, 10)]").is_err());
        assert!(parse_conv_feature_layers("[(512, 10, 5)] - 1").is_err());
    }

    #[test]
    fn maps_fairseq_names() {
        for (f, c) in [
            (
                "feature_extractor.conv_layers.0.0.weight",
                "feature_extractor.conv_layers.0.conv.weight",
            ),
            (
                "feature_extractor.conv_layers.3.2.1.bias",
                "feature_extractor.conv_layers.3.layer_norm.bias",
            ),
            (
                "post_extract_proj.weight",
                "feature_projection.projection.weight",
            ),
            ("layer_norm.bias", "feature_projection.layer_norm.bias"),
            (
                "encoder.pos_conv.0.weight_g",
                "encoder.pos_conv_embed.conv.weight_g",
            ),
            (
                "encoder.layers.11.self_attn.k_proj.bias",
                "encoder.layers.11.attention.k_proj.bias",
            ),
            (
                "encoder.layers.2.self_attn_layer_norm.weight",
                "encoder.layers.2.layer_norm.weight",
            ),
            (
                "encoder.layers.0.fc2.weight",
                "encoder.layers.0.feed_forward.output_dense.weight",
            ),
            ("encoder.layer_norm.weight", "encoder.layer_norm.weight"),
            (
                "encoder.pos_conv.2.0.bias",
                "encoder.pos_conv_embed.layers.2.conv.bias",
            ),
            (
                "encoder.layers.3.self_attn.grep_linear.weight",
                "encoder.layers.3.attention.gru_rel_pos_linear.weight",
            ),
            (
                "encoder.layers.3.self_attn.grep_a",
                "encoder.layers.3.attention.gru_rel_pos_const",
            ),
            (
                "encoder.layers.0.self_attn.relative_attention_bias.weight",
                "encoder.layers.0.attention.rel_attn_embed.weight",
            ),
        ] {
            assert_eq!(fairseq_to_canonical(f), c);
        }
    }
}
