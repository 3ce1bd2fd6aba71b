//! Models: wav2vec 2.0 / HuBERT / WavLM / data2vec-audio encoders, checkpoint loading, Kaldi fbank, the Conformer.
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;

pub mod asr;
pub mod checkpoint;
pub mod fbank;
pub mod ssl;

/// Print what a wav2vec 2.0 / HuBERT / WavLM / data2vec-audio checkpoint is, after checking it
/// is complete.
#[derive(Args, Debug)]
#[command(
    long_about = "Print what a wav2vec 2.0 / HuBERT / WavLM / data2vec-audio checkpoint is: family, \
variant (group- or layer-norm conv features, post-LN or pre-LN Transformer, WavLM's relative \
position buckets, data2vec-audio's positional conv layers), sizes, frame rate, parameter count, weights format \
and sha256.\n\nPATH is a Hugging Face model directory (config.json + model.safetensors or \
pytorch_model.bin), one of those weights files, or a fairseq checkpoint (.pt) whose stored config \
is read. The command loads every tensor and fails, naming the tensor, if one the config implies \
is missing or has the wrong shape."
)]
pub struct ModelInfoArgs {
    /// Model directory, weights file (model.safetensors, pytorch_model.bin) or fairseq .pt file.
    pub path: PathBuf,
    /// transformers config.json to use instead of the one beside the weights or the one stored
    /// in a fairseq checkpoint.
    #[arg(long, value_name = "config.json")]
    pub config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_model_info(args: &ModelInfoArgs) -> anyhow::Result<()> {
    let ckpt = checkpoint::load_checkpoint_with_config(
        &args.path,
        args.config.as_deref(),
        &Device::Cpu,
        DType::F32,
    )?;
    let info = describe(&ckpt);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", render(&info));
    }
    Ok(())
}

/// The facts `model-info` reports, as JSON.
pub fn describe(ckpt: &checkpoint::LoadedCheckpoint) -> serde_json::Value {
    let c = &ckpt.config;
    let family = c.family().map_or("unknown", |f| f.display_name());
    let conv_norm = if c.feat_extract_norm == "layer" {
        "layer-norm conv features"
    } else {
        "group-norm conv features"
    };
    let transformer = if c.do_stable_layer_norm {
        "pre-LN Transformer (stable layer norm, \"large\" style)"
    } else {
        "post-LN Transformer (\"base\" style)"
    };
    let mut variant = format!("{conv_norm}, {transformer}");
    let (pos_kernel, pos_layers) = if c.is_data2vec_audio() {
        (c.conv_pos_kernel_size, c.num_conv_pos_embeddings)
    } else {
        (c.num_conv_pos_embeddings, 1)
    };
    if c.is_wavlm() {
        variant += &format!(
            ", gated relative position bias ({} buckets up to distance {})",
            c.num_buckets, c.max_bucket_distance
        );
    }
    if c.is_data2vec_audio() {
        variant += &format!(", {pos_layers} positional conv layers");
    }
    let conv: Vec<[usize; 3]> = c
        .conv_dim
        .iter()
        .zip(&c.conv_kernel)
        .zip(&c.conv_stride)
        .map(|((&d, &k), &s)| [d, k, s])
        .collect();
    serde_json::json!({
        "path": ckpt.path,
        "family": family,
        "model_type": c.model_type,
        "variant": variant,
        "feat_extract_norm": c.feat_extract_norm,
        "do_stable_layer_norm": c.do_stable_layer_norm,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_hidden_states": c.num_hidden_states(),
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act,
        "conv_layers": conv,
        "conv_bias": c.conv_bias,
        "pos_conv_kernel": pos_kernel,
        "pos_conv_layers": pos_layers,
        "pos_conv_groups": c.num_conv_pos_embedding_groups,
        "samples_per_frame": c.samples_per_frame(),
        "frame_rate": c.frame_rate(),
        "receptive_field": c.receptive_field(),
        "parameters": ckpt.parameter_count(),
        "format": ckpt.format,
        "stored_dtype": ckpt.stored_dtype,
        "weights_sha256": ckpt.weights_sha256,
        "config_source": ckpt.config_source,
        "preprocessor": ckpt.preprocessor,
    })
}

/// Human-readable form of [`describe`].
fn render(info: &serde_json::Value) -> String {
    let s = |k: &str| match &info[k] {
        serde_json::Value::String(v) => v.clone(),
        v => v.to_string(),
    };
    let conv = info["conv_layers"]
        .as_array()
        .map(|layers| compress_conv(layers))
        .unwrap_or_default();
    let params = info["parameters"].as_u64().unwrap_or(0);
    let pre = &info["preprocessor"];
    format!(
        "path:          {}\n\
         family:        {} (model_type \"{}\")\n\
         variant:       {}\n\
         sizes:         hidden {}, layers {}, heads {}, ffn {} ({})\n\
         conv stack:    {} (dim, kernel, stride){}\n\
         pos conv:      kernel {}, groups {}, layers {}\n\
         frame rate:    {} frames/s ({} samples per frame at 16 kHz, receptive field {} samples)\n\
         hidden states: {} (0 = projected conv features, {} = last layer)\n\
         parameters:    {} ({:.1} M)\n\
         weights:       {}, stored as {}\n\
         sha256:        {}\n\
         config from:   {}\n\
         preprocessing: normalize {}, sampling rate {}\n",
        s("path"),
        s("family"),
        s("model_type"),
        s("variant"),
        s("hidden_size"),
        s("num_hidden_layers"),
        s("num_attention_heads"),
        s("intermediate_size"),
        s("hidden_act"),
        conv,
        if info["conv_bias"] == true {
            ", with bias"
        } else {
            ""
        },
        s("pos_conv_kernel"),
        s("pos_conv_groups"),
        s("pos_conv_layers"),
        s("frame_rate"),
        s("samples_per_frame"),
        s("receptive_field"),
        s("num_hidden_states"),
        s("num_hidden_layers"),
        group_thousands(params),
        params as f64 / 1e6,
        s("format"),
        s("stored_dtype"),
        s("weights_sha256"),
        s("config_source"),
        pre["do_normalize"],
        pre["sampling_rate"],
    )
}

/// `[(512,10,5)] + [(512,3,2)] x4 + [(512,2,2)] x2`, fairseq's way of writing the stack.
fn compress_conv(layers: &[serde_json::Value]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[i] {
            j += 1;
        }
        let l = &layers[i];
        let n = j - i + 1;
        let one = format!("({}, {}, {})", l[0], l[1], l[2]);
        parts.push(if n > 1 { format!("{one} x{n}") } else { one });
        i = j + 1;
    }
    parts.join(" + ")
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
