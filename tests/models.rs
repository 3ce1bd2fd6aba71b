//! wav2vec 2.0 / HuBERT / WavLM / data2vec-audio encoders against transformers 4.46.3 (fixtures:
//! tests/fixtures/gen_models.py and gen_models_families.py).
mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use common::max_abs_diff;
use speechcache::models::ssl::config::{expected_tensors, Wav2Vec2Config};
use speechcache::models::ssl::{
    frames_for_samples, normalize_waveform, CpuEncoder, LinearLayout, SslEncoder, Wav2Vec2Model,
};
use std::collections::HashMap;
use std::path::PathBuf;

const VARIANTS: [&str; 10] = [
    "w2v_base",
    "w2v_large",
    "hubert_base",
    "hubert_large",
    "wavlm_base",
    "wavlm_large",
    "wavlm_odd",
    "wavlm_large_odd",
    "d2v_base",
    "d2v_odd",
];
const N_UTTS: usize = 3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// The checkpoint as save_pretrained wrote it, with the positional conv's weight-norm
/// parametrisation renamed to the canonical `weight_g` / `weight_v`.
fn checkpoint(variant: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(variant).join("model.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v");
            (k, v)
        })
        .collect()
}

fn config(variant: &str) -> Wav2Vec2Config {
    Wav2Vec2Config::from_file(&fixtures().join(variant).join("config.json")).unwrap()
}

/// The tensor-op executor (candle) computing in `dtype` on the CPU.
fn load(variant: &str, dtype: DType) -> (Wav2Vec2Config, Wav2Vec2Model) {
    let cfg = config(variant);
    let vb = VarBuilder::from_tensors(checkpoint(variant), dtype, &Device::Cpu);
    let model = Wav2Vec2Model::load(vb, &cfg).unwrap();
    (cfg, model)
}

/// The CPU engine.
fn engine(variant: &str) -> CpuEncoder {
    let vb = VarBuilder::from_tensors(checkpoint(variant), DType::F32, &Device::Cpu);
    CpuEncoder::load(vb, &config(variant), LinearLayout::OutIn).unwrap()
}

/// Both f32 executors, built explicitly (whatever the environment asks for).
fn f32_encoders(variant: &str) -> [(&'static str, SslEncoder); 2] {
    [
        ("cpu engine", SslEncoder::Cpu(engine(variant))),
        (
            "tensor ops",
            SslEncoder::TensorOps(load(variant, DType::F32).1),
        ),
    ]
}

fn inputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("inputs.safetensors"), &Device::Cpu).unwrap()
}

fn refs(variant: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(variant).join("refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs each utterance alone and returns the worst difference to transformers over all states.
fn worst_single(variant: &str, model: &SslEncoder) -> f32 {
    let cfg = model.config();
    let (inputs, refs) = (inputs(), refs(variant));
    let mut worst = 0f32;
    for i in 0..N_UTTS {
        let wave = inputs[&format!("norm_{i}")].unsqueeze(0).unwrap();
        let n = wave.dim(1).unwrap();
        let (states, valid) = model.forward(&wave, &[n], cfg.num_hidden_layers).unwrap();
        assert_eq!(states.len(), cfg.num_hidden_layers + 1);
        let expect_t = refs[&format!("utt{i}.hidden0")].dim(0).unwrap();
        assert_eq!(valid, vec![expect_t]);
        assert_eq!(frames_for_samples(cfg, n), expect_t);
        for (j, s) in states.iter().enumerate() {
            assert_eq!(s.dims(), &[1, expect_t, cfg.hidden_size]);
            let d = max_abs_diff(&s.i(0).unwrap(), &refs[&format!("utt{i}.hidden{j}")]);
            worst = worst.max(d);
        }
    }
    worst
}

/// Both f32 executors: the CPU engine and candle tensor ops.
#[test]
fn every_hidden_state_matches_transformers() {
    for variant in VARIANTS {
        for (name, model) in f32_encoders(variant) {
            let worst = worst_single(variant, &model);
            println!("{variant} {name}: max |ours - transformers| = {worst:.2e}");
            assert!(worst < 1e-4, "{variant} {name}: {worst}");
        }
    }
}

/// The tensor-op path in f64 (statistics in f32, as for every dtype).
#[test]
fn f64_tensor_ops_match_transformers() {
    for variant in VARIANTS {
        let model = SslEncoder::TensorOps(load(variant, DType::F64).1);
        let worst = worst_single(variant, &model);
        assert!(worst < 1e-4, "{variant} f64: {worst}");
    }
}

#[test]
fn half_precision_runs_close() {
    for (variant, dtype) in [
        ("w2v_base", DType::BF16),
        ("hubert_large", DType::BF16),
        ("w2v_large", DType::F16),
        ("hubert_base", DType::F16),
        ("wavlm_base", DType::F16),
        ("wavlm_large", DType::BF16),
        ("d2v_odd", DType::F16),
        ("d2v_base", DType::BF16),
    ] {
        let worst = worst_single(variant, &SslEncoder::TensorOps(load(variant, dtype).1));
        let scale = max_abs(&refs(variant)["utt1.hidden2"]);
        println!("{variant} {dtype:?}: max diff {worst:.3} (max |ref| {scale:.1})");
        assert!(worst < 0.1 * scale.max(1.0), "{variant} {dtype:?}: {worst}");
    }
}

/// A padded batch (padding filled with a loud signal, not zeros) gives every utterance the
/// hidden states it has alone: for group-norm models too.
#[test]
fn padded_batch_equals_each_utterance_alone() {
    let inputs = inputs();
    let waves: Vec<Vec<f32>> = (0..N_UTTS)
        .map(|i| inputs[&format!("norm_{i}")].to_vec1::<f32>().unwrap())
        .collect();
    let lengths: Vec<usize> = waves.iter().map(Vec::len).collect();
    let s = *lengths.iter().max().unwrap() + 123;
    let mut flat = Vec::with_capacity(N_UTTS * s);
    for w in &waves {
        flat.extend_from_slice(w);
        flat.extend((w.len()..s).map(|j| 3.0 * (j as f32 * 0.37).sin()));
    }
    let batch = Tensor::from_vec(flat, (N_UTTS, s), &Device::Cpu).unwrap();
    for (variant, (name, model)) in VARIANTS
        .into_iter()
        .flat_map(|v| f32_encoders(v).map(|e| (v, e)))
    {
        let refs = refs(variant);
        let (states, valid) = model
            .forward(&batch, &lengths, model.config().num_hidden_layers)
            .unwrap();
        let mut worst = 0f32;
        for (b, &t) in valid.iter().enumerate() {
            assert_eq!(t, refs[&format!("utt{b}.hidden0")].dim(0).unwrap());
            for (j, st) in states.iter().enumerate() {
                let ours = st.i(b).unwrap().narrow(0, 0, t).unwrap();
                worst = worst.max(max_abs_diff(&ours, &refs[&format!("utt{b}.hidden{j}")]));
            }
        }
        println!("{variant} {name}: batch vs alone max diff {worst:.2e}");
        assert!(worst < 1e-4, "{variant} {name}: {worst}");
    }
}

#[test]
fn forward_waveforms_pads_for_the_caller() {
    let inputs = inputs();
    let waves: Vec<Vec<f32>> = (0..N_UTTS)
        .map(|i| inputs[&format!("norm_{i}")].to_vec1::<f32>().unwrap())
        .collect();
    let slices: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
    let refs = refs("hubert_base");
    for (name, model) in f32_encoders("hubert_base") {
        let (states, valid) = model.forward_waveforms(&slices, 1).unwrap();
        assert_eq!(states.len(), 2);
        for (b, &t) in valid.iter().enumerate() {
            assert_eq!(t, frames_for_samples(model.config(), waves[b].len()));
            let ours = states[1].i(b).unwrap().narrow(0, 0, t).unwrap();
            let d = max_abs_diff(&ours, &refs[&format!("utt{b}.hidden1")]);
            assert!(d < 1e-4, "{name}: {d}");
        }
    }
}

#[test]
fn early_stop_returns_the_first_states_of_the_full_run() {
    let wave = inputs()["norm_1"].unsqueeze(0).unwrap();
    let n = wave.dim(1).unwrap();
    let variants = ["w2v_base", "w2v_large", "wavlm_odd", "d2v_odd"];
    for (name, model) in variants.into_iter().flat_map(f32_encoders) {
        let cfg = model.config();
        let (full, _) = model.forward(&wave, &[n], cfg.num_hidden_layers).unwrap();
        for last in 0..cfg.num_hidden_layers {
            let (part, valid) = model.forward(&wave, &[n], last).unwrap();
            assert_eq!(part.len(), last + 1);
            assert_eq!(valid[0], full[0].dim(1).unwrap());
            for (a, b) in part.iter().zip(&full) {
                assert_eq!(max_abs_diff(a, b), 0.0, "{name}");
            }
        }
        assert!(model
            .forward(&wave, &[n], cfg.num_hidden_layers + 1)
            .is_err());
    }
}

#[test]
fn normalize_waveform_matches_feature_extractor() {
    let inputs = inputs();
    for i in 0..N_UTTS {
        let mut raw = inputs[&format!("raw_{i}")].to_vec1::<f32>().unwrap();
        let expect = inputs[&format!("norm_{i}")].to_vec1::<f32>().unwrap();
        normalize_waveform(&mut raw);
        let worst = raw
            .iter()
            .zip(&expect)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "utterance {i}: {worst}");
    }
    let cfg = speechcache::models::ssl::config::PreprocessorConfig::from_file(
        &fixtures().join("w2v_base/preprocessor_config.json"),
    )
    .unwrap();
    assert!(cfg.do_normalize);
    assert_eq!(cfg.sampling_rate, 16000);
}

/// `expected_tensors` names exactly the checkpoint's tensors (minus what the encoder never
/// reads), with their shapes.
#[test]
fn expected_tensors_match_the_checkpoints() {
    for variant in VARIANTS {
        let cfg = Wav2Vec2Config::from_file(&fixtures().join(variant).join("config.json")).unwrap();
        let ckpt = checkpoint(variant);
        let mut have: Vec<(String, Vec<usize>)> = ckpt
            .iter()
            .filter(|(k, _)| k.as_str() != "masked_spec_embed")
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        let mut want = expected_tensors(&cfg);
        have.sort();
        want.sort();
        assert_eq!(have, want, "{variant}");
    }
}

#[test]
fn too_short_or_mismatched_input_is_an_error() {
    for (_, model) in f32_encoders("w2v_base") {
        too_short_or_mismatched_input_fails(&model);
    }
}

fn too_short_or_mismatched_input_fails(model: &SslEncoder) {
    let cfg = model.config();
    let short = Tensor::zeros((1, cfg.receptive_field() - 1), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .forward(&short, &[cfg.receptive_field() - 1], 0)
        .is_err());
    let ok = Tensor::zeros((2, 1000), DType::F32, &Device::Cpu).unwrap();
    assert!(model.forward(&ok, &[1000], 0).is_err());
    assert!(model.forward(&ok, &[1000, 1001], 0).is_err());
    // A utterance shorter than the receptive field inside a batch has 0 valid frames.
    let (_, valid) = model.forward(&ok, &[1000, 10], 0).unwrap();
    assert_eq!(valid, vec![frames_for_samples(cfg, 1000), 0]);
}

/// Speed of a base-size model (wav2vec2-base shapes, random weights) on 10 s of audio, on the
/// executor the environment picks (`SPEECHCACHE_ENGINE=candle`: tensor ops).
/// `cargo test --release --test models bench_base -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_base_model_10s() {
    let cfg = Wav2Vec2Config::default();
    let dev = Device::Cpu;
    let tensors: HashMap<String, Tensor> = expected_tensors(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let t = if name.ends_with("weight_g")
                || name.contains("norm") && name.ends_with("weight")
            {
                Tensor::ones(shape, DType::F32, &dev).unwrap()
            } else {
                Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), shape, &dev).unwrap()
            };
            (name, t)
        })
        .collect();
    let backend = speechcache::device::Backend::new(dev.clone(), DType::F32).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let model = SslEncoder::load(vb, &cfg, LinearLayout::OutIn, &backend).unwrap();
    let seconds = std::env::var("W2V_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let n = (16000.0 * seconds) as usize;
    let wave = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
    let _ = model.forward(&wave, &[n], 1).unwrap();
    let mut best: Option<speechcache::ops::profile::Profile> = None;
    let mut cpu_best = f64::MAX;
    for _ in 0..3 {
        let cpu0 = process_cpu_seconds();
        let (_, _, profile) = model
            .forward_profiled(&wave, &[n], cfg.num_hidden_layers)
            .unwrap();
        cpu_best = cpu_best.min(process_cpu_seconds() - cpu0);
        if best
            .as_ref()
            .is_none_or(|b| profile.forward_total() < b.forward_total())
        {
            best = Some(profile);
        }
    }
    let profile = best.unwrap();
    let total = profile.forward_total();
    for (kind, secs, _) in profile.rows() {
        println!("{:>12}: {:7.1} ms", kind.name(), secs * 1e3);
    }
    println!(
        "{seconds} s audio on {}: total {total:.3} s = {:.1}x real time",
        model.executor().name(),
        seconds / total
    );
    println!(
        "process CPU time {cpu_best:.3} s on {} rayon threads (the machine's load inflates wall time)",
        rayon::current_num_threads()
    );
}

/// User + system CPU time of this process (Linux /proc; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

/// Attention in blocks of a few queries gives the states of one block per utterance.
#[test]
fn blocked_attention_matches_whole_attention() {
    let inputs = inputs();
    for variant in VARIANTS {
        let mut engine = engine(variant);
        let keep: Vec<usize> = (0..=engine.config().num_hidden_layers).collect();
        let wave = inputs["norm_1"].to_vec1::<f32>().unwrap();
        let (whole, t) = engine.forward(&wave, &keep, false).unwrap();
        assert!(t > 3, "{variant}: {t} frames is too short to split");
        // 3 query rows per task, 4 keys per tile: the last of each shorter, the online
        // softmax rescaling many times per row
        engine.set_attention_blocks(3, 4);
        let (blocked, t2) = engine.forward(&wave, &keep, false).unwrap();
        assert_eq!(t, t2);
        for (a, b) in whole.iter().zip(&blocked) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{variant}: {d}");
        }
        // Spread over the pool, an utterance gets the same bits as on one thread (resumed
        // runs and parts of a run must write the same bytes as one run).
        for block in [(3, 4), (128, 512)] {
            engine.set_attention_blocks(block.0, block.1);
            let (serial, _) = engine.forward(&wave, &keep, false).unwrap();
            let (parallel, _) = engine.forward(&wave, &keep, true).unwrap();
            assert!(serial == parallel, "{variant}: parallel run differs");
        }
    }
}

/// The CPU engine (one utterance at a time, blocked attention) and the tensor-op path give the
/// same states on a padded batch, including early stops.
#[test]
fn cpu_engine_equals_tensor_op_path() {
    let inputs = inputs();
    for variant in VARIANTS {
        let [(_, engine), (_, tensor_ops)] = f32_encoders(variant);
        let cfg = engine.config();
        let waves: Vec<Vec<f32>> = (0..N_UTTS)
            .map(|i| inputs[&format!("norm_{i}")].to_vec1::<f32>().unwrap())
            .collect();
        let lengths: Vec<usize> = waves.iter().map(|w| w.len()).collect();
        let s = *lengths.iter().max().unwrap();
        let flat: Vec<f32> = waves
            .iter()
            .flat_map(|w| {
                w.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.7, s - w.len()))
            })
            .collect();
        let batch = Tensor::from_vec(flat, (N_UTTS, s), &Device::Cpu).unwrap();
        for last in [1, cfg.num_hidden_layers] {
            let (a, va) = engine.forward(&batch, &lengths, last).unwrap();
            let (b, vb) = tensor_ops.forward(&batch, &lengths, last).unwrap();
            assert_eq!(va, vb);
            assert_eq!(a.len(), last + 1);
            for (x, y) in a.iter().zip(&b) {
                for (i, &n) in va.iter().enumerate() {
                    let d = max_abs_diff(
                        &x.i(i).unwrap().narrow(0, 0, n).unwrap(),
                        &y.i(i).unwrap().narrow(0, 0, n).unwrap(),
                    );
                    assert!(d < 1e-5, "{variant} state up to {last}, utterance {i}: {d}");
                }
            }
        }
    }
}

/// The parity above can fail: without WavLM's relative position bias, with its gate constants
/// changed, or with one of data2vec-audio's positional conv layers dropped, both executors are
/// far from transformers.
#[test]
fn wavlm_bias_and_data2vec_pos_stack_matter() {
    type Edit = fn(&str, &Tensor) -> Option<Tensor>;
    let edits: [(&str, &str, Edit); 3] = [
        ("wavlm_base", "no relative position bias", |name, t| {
            name.ends_with("rel_attn_embed.weight")
                .then(|| t.zeros_like().unwrap())
        }),
        ("wavlm_large_odd", "gate constants 1", |name, t| {
            name.ends_with("gru_rel_pos_const")
                .then(|| t.ones_like().unwrap())
        }),
        (
            "d2v_odd",
            "second pos-conv layer as the first",
            |name, _| {
                let first = name.replace("pos_conv_embed.layers.1.", "pos_conv_embed.layers.0.");
                (first != name).then(|| checkpoint("d2v_odd")[&first].clone())
            },
        ),
    ];
    for (variant, what, edit) in edits {
        let tensors: HashMap<String, Tensor> = checkpoint(variant)
            .into_iter()
            .map(|(name, t)| {
                let t = edit(&name, &t).unwrap_or(t);
                (name, t)
            })
            .collect();
        let cfg = config(variant);
        let vb = || VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        let encoders = [
            SslEncoder::Cpu(CpuEncoder::load(vb(), &cfg, LinearLayout::OutIn).unwrap()),
            SslEncoder::TensorOps(Wav2Vec2Model::load(vb(), &cfg).unwrap()),
        ];
        for model in encoders {
            let worst = worst_single(variant, &model);
            assert!(worst > 1e-2, "{variant} {what}: {worst}");
        }
    }
}
