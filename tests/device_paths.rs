//! Every code path that runs only off the CPU, run here: the encoder's tensor-op fallbacks,
//! f16/bf16 compute, the finetune model on candle autograd with the shift-and-add depthwise conv
//! and the tensor-op Adam, CTC's device copies, device dropout. On a machine without a GPU they
//! run on the CPU with the fused kernels turned off (`device::force_tensor_ops`, the same switch
//! as `SPEECHCACHE_CPU_KERNELS=off`); with `SPEECHCACHE_TEST_DEVICE=cuda:0` (benches/gpu_check.sh)
//! they run on that GPU. Each result is compared with the fused CPU path and, for the encoder,
//! with transformers 4.46.3 (fixtures: tests/fixtures/gen_models.py).
//! The encoder's conv gathers in small chunks are checked in `src/models/ssl/mod.rs`.
mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use common::{bin, ok, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use speechcache::device::Executor;
use speechcache::finetune::config::{OptimConfig, OptimizerKind};
use speechcache::finetune::optim::{Adam, NamedVars};
use speechcache::models::asr::conformer::{CnnModuleNorm, ConformerConfig, InputLayer};
use speechcache::models::asr::cpu::CpuEngine;
use speechcache::models::asr::{trainable_vars, AsrModel, AsrModelConfig, FeatureNormalize};
use speechcache::models::ssl::config::Wav2Vec2Config;
use speechcache::models::ssl::{CpuEncoder, LinearLayout, SslEncoder, Wav2Vec2Model};
use speechcache::ops::ctc::ctc_loss;
use speechcache::ops::{Dropout, DropoutRng};
use speechcache::store::FeatureStore;

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

/// The device under test: `SPEECHCACHE_TEST_DEVICE` (cpu, cuda:N), the CPU by default.
fn test_device_name() -> String {
    std::env::var("SPEECHCACHE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn test_device() -> Device {
    speechcache::device::open(&test_device_name()).unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/models")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max(|b|, floor) over the whole slice.
fn rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / scale
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------- wav2vec 2.0 / HuBERT encoder

/// The fixture's config and tensors (canonical names).
fn encoder_checkpoint(variant: &str) -> (Wav2Vec2Config, HashMap<String, Tensor>) {
    let cfg = Wav2Vec2Config::from_file(&fixtures().join(variant).join("config.json")).unwrap();
    let path = fixtures().join(variant).join("model.safetensors");
    let ckpt: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v");
            (k, v)
        })
        .collect();
    (cfg, ckpt)
}

/// The encoder on candle tensor ops, computing in `dtype` on `dev`.
fn load_encoder(variant: &str, dtype: DType, dev: &Device) -> (Wav2Vec2Config, SslEncoder) {
    let (cfg, ckpt) = encoder_checkpoint(variant);
    let model = Wav2Vec2Model::load(VarBuilder::from_tensors(ckpt, dtype, dev), &cfg).unwrap();
    (cfg, SslEncoder::TensorOps(model))
}

/// The encoder on the CPU engine.
fn load_cpu_engine(variant: &str) -> (Wav2Vec2Config, SslEncoder) {
    let (cfg, ckpt) = encoder_checkpoint(variant);
    let vb = VarBuilder::from_tensors(ckpt, DType::F32, &Device::Cpu);
    let engine = CpuEncoder::load(vb, &cfg, LinearLayout::OutIn).unwrap();
    (cfg, SslEncoder::Cpu(engine))
}

fn waveforms() -> Vec<Vec<f32>> {
    let inputs =
        candle_core::safetensors::load(fixtures().join("inputs.safetensors"), &Device::Cpu)
            .unwrap();
    (0..3)
        .map(|i| inputs[&format!("norm_{i}")].to_vec1::<f32>().unwrap())
        .collect()
}

/// transformers' hidden states, `[utterance][layer]`, each `[T, H]` flattened.
fn transformers_states(variant: &str, layers: usize) -> Vec<Vec<Vec<f32>>> {
    let refs = candle_core::safetensors::load(
        fixtures().join(variant).join("refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (0..3)
        .map(|u| {
            (0..=layers)
                .map(|j| flat(&refs[&format!("utt{u}.hidden{j}")]))
                .collect()
        })
        .collect()
}

/// Hidden states `[utterance][layer]`, each the valid frames as f32.
type States = Vec<Vec<Vec<f32>>>;

/// [`States`] of each waveform run alone, then of all of them in one batch padded with a loud
/// signal.
fn encoder_states(model: &SslEncoder, layers: usize, waves: &[Vec<f32>]) -> (States, States) {
    let states = |batch: Tensor, lengths: &[usize]| -> States {
        let batch = batch
            .to_device(model.device())
            .unwrap()
            .to_dtype(model.dtype())
            .unwrap();
        let (hidden, valid) = model.forward(&batch, lengths, layers).unwrap();
        (0..lengths.len())
            .map(|b| {
                hidden
                    .iter()
                    .map(|h| flat(&h.i(b).unwrap().narrow(0, 0, valid[b]).unwrap()))
                    .collect()
            })
            .collect()
    };
    let alone = waves
        .iter()
        .flat_map(|w| {
            let t = Tensor::from_vec(w.clone(), (1, w.len()), &Device::Cpu).unwrap();
            states(t, &[w.len()])
        })
        .collect();
    let lengths: Vec<usize> = waves.iter().map(Vec::len).collect();
    let s = *lengths.iter().max().unwrap() + 123;
    let mut padded = Vec::with_capacity(waves.len() * s);
    for w in waves {
        padded.extend_from_slice(w);
        padded.extend((w.len()..s).map(|j| 3.0 * (j as f32 * 0.37).sin()));
    }
    let batch = Tensor::from_vec(padded, (waves.len(), s), &Device::Cpu).unwrap();
    (alone, states(batch, &lengths))
}

/// The worst of `f` over every utterance and layer.
fn worst(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], f: impl Fn(&[f32], &[f32]) -> f32) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(ua, ub)| ua.iter().zip(ub).map(|(x, y)| f(x, y)))
        .fold(0.0, f32::max)
}

/// f32 on the tensor-op path (what CUDA runs at `--compute-dtype f32`): within 1e-4 of
/// transformers and of the CPU engine, alone and in a padded batch.
#[test]
fn encoder_f32_tensor_ops_match_transformers_and_the_cpu_engine() {
    let dev = test_device();
    let waves = waveforms();
    for variant in VARIANTS {
        let (cfg, engine) = load_cpu_engine(variant);
        let layers = cfg.num_hidden_layers;
        let (fused, _) = encoder_states(&engine, layers, &waves);
        let (alone, batched) = {
            let (_, model) = load_encoder(variant, DType::F32, &dev);
            encoder_states(&model, layers, &waves)
        };
        let refs = transformers_states(variant, layers);
        let vs_ref = worst(&alone, &refs, max_abs_diff);
        let vs_batch = worst(&batched, &refs, max_abs_diff);
        let vs_fused = worst(&alone, &fused, max_abs_diff);
        println!(
            "{variant} f32 tensor ops: vs transformers {vs_ref:.1e} (padded batch {vs_batch:.1e}), vs CPU engine {vs_fused:.1e}"
        );
        assert!(vs_ref < 1e-4, "{variant}: {vs_ref}");
        assert!(vs_batch < 1e-4, "{variant} padded batch: {vs_batch}");
        assert!(vs_fused < 1e-4, "{variant} vs CPU engine: {vs_fused}");
    }
}

/// f16 and bf16 compute (`--compute-dtype f16|bf16`): the error of every hidden state relative
/// to its layer's largest value, against transformers in f32, alone and in a padded batch.
/// Measured on the CPU (worst of the 4 fixture models): f16 5.4e-3, bf16 3.7e-2, as large as
/// transformers' own f16/bf16 error here (4.1e-3, 3.7e-2); the tolerances are about twice that.
const F16_TOL: f32 = 1e-2;
const BF16_TOL: f32 = 6e-2;
#[test]
fn encoder_half_precision_stays_within_stated_tolerances() {
    let dev = test_device();
    let waves = waveforms();
    let mut failures = Vec::new();
    for (dtype, tol) in [(DType::F16, F16_TOL), (DType::BF16, BF16_TOL)] {
        for variant in VARIANTS {
            let (cfg, model) = load_encoder(variant, dtype, &dev);
            let layers = cfg.num_hidden_layers;
            let (alone, batched) = encoder_states(&model, layers, &waves);
            let refs = transformers_states(variant, layers);
            let rel = |a: &[f32], b: &[f32]| rel_err(a, b, 1.0);
            let e_alone = worst(&alone, &refs, rel);
            let e_batch = worst(&batched, &refs, rel);
            println!("{variant} {dtype:?}: relative error alone {e_alone:.2e}, padded batch {e_batch:.2e}");
            failures.extend((e_alone.max(e_batch) >= tol).then(|| format!("{variant} {dtype:?}")));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:?}");
}

// ---------------------------------------------------------------- finetune: candle autograd

fn rand_tensor(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * scale) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn named_vars(varmap: &VarMap) -> NamedVars {
    let mut v: NamedVars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn asr_config(input_layer: InputLayer, norm: CnnModuleNorm) -> AsrModelConfig {
    AsrModelConfig {
        encoder: ConformerConfig {
            output_size: 16,
            attention_heads: 4,
            linear_units: 24,
            num_blocks: 2,
            dropout_rate: 0.0,
            positional_dropout_rate: 0.0,
            attention_dropout_rate: 0.0,
            cnn_module_kernel: 7,
            cnn_module_norm: norm,
            input_layer,
            ..ConformerConfig::default()
        },
        ..AsrModelConfig::default()
    }
}

/// An ASR model on the CPU whose every parameter is moved off its default (none stays at unit
/// norms, zero biases, equal layer weights), and the same model on `dev`.
fn asr_models(
    cfg: &AsrModelConfig,
    layers: usize,
    dim: usize,
    dev: &Device,
) -> ((VarMap, AsrModel), (VarMap, AsrModel)) {
    let build = |d: &Device| {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, d);
        let model = AsrModel::new(vb, cfg, layers, dim, 9).unwrap();
        (varmap, model)
    };
    let (cpu, off) = (build(&Device::Cpu), build(dev));
    let off_vars = named_vars(&off.0);
    for (i, ((name, var), (off_name, off_var))) in
        named_vars(&cpu.0).iter().zip(&off_vars).enumerate()
    {
        assert_eq!(name, off_name);
        let noise = rand_tensor(var.as_tensor().dims(), 100 + i as u64, 0.2);
        let value = if name.ends_with("running_var") {
            (noise.abs().unwrap() + 0.5).unwrap()
        } else {
            (var.as_tensor() + noise).unwrap()
        };
        var.set(&value).unwrap();
        off_var.set(&value.to_device(dev).unwrap()).unwrap();
    }
    (cpu, off)
}

/// What the trainer computes off the CPU (candle autograd with the shift-and-add depthwise
/// conv, CTC through a host copy) equals the CPU engine: per-utterance losses, every gradient,
/// the batch-norm statistics after the step, and the eval logits.
#[test]
fn finetune_off_cpu_path_equals_the_cpu_engine() {
    let dev = test_device();
    let cases = [
        (
            InputLayer::Conv2d,
            CnnModuleNorm::BatchNorm,
            FeatureNormalize::Utterance,
            1,
            20,
            43,
            vec![43, 30, 37],
        ),
        (
            InputLayer::Conv2d2,
            CnnModuleNorm::LayerNorm,
            FeatureNormalize::None,
            3,
            12,
            40,
            vec![40, 29],
        ),
    ];
    for (input_layer, norm, normalize, layers, dim, frames, lengths) in cases {
        let mut cfg = asr_config(input_layer, norm);
        cfg.featurizer.normalize = normalize;
        let name = format!("{input_layer:?}/{norm:?}");
        let feats = rand_tensor(&[lengths.len(), layers, frames, dim], 3, 2.0);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let targets: Vec<Vec<u32>> = (0..lengths.len())
            .map(|_| (0..3).map(|_| rng.random_range(1..9u32)).collect())
            .collect();
        let scale = 0.37;

        // the CPU engine (fused kernels)
        let ((cpu_map, cpu_model), (map, model)) = asr_models(&cfg, layers, dim, &dev);
        let cpu_all = named_vars(&cpu_map);
        let cpu_trainable = trainable_vars(&cpu_map);
        let engine = CpuEngine::new(&cpu_model, &cpu_all, &cpu_trainable).unwrap();
        let (eval_logits, _) = engine
            .forward_eval(&engine.params().unwrap(), &feats, &lengths)
            .unwrap();
        let out = engine
            .train_step(&feats, &lengths, &targets, scale)
            .unwrap();

        // candle autograd on the device under test
        let feats_dev = feats.to_device(&dev).unwrap();
        let (want_eval, _) = model.forward(&feats_dev, &lengths, false).unwrap();
        let (logits, out_lens) = model.forward(&feats_dev, &lengths, true).unwrap();
        assert_eq!(out_lens, out.out_lengths, "{name}");
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let (losses, _) = ctc_loss(&lp, &targets, &out_lens, 0, true).unwrap();
        assert!(
            losses.device().same_device(&dev),
            "{name}: CTC returns on the input's device"
        );
        let grads = (losses.sum_all().unwrap() * scale)
            .unwrap()
            .backward()
            .unwrap();

        let got: Vec<f32> = out.losses.iter().map(|&l| l as f32).collect();
        let e = rel_err(&flat(&losses), &got, 1.0);
        assert!(e < 1e-4, "{name}: losses {e}");
        let cpu_grads: HashMap<&str, Vec<f32>> = cpu_trainable
            .iter()
            .zip(&out.grads)
            .map(|((n, _), g)| (n.as_str(), flat(g)))
            .collect();
        let floor = cpu_grads
            .values()
            .flatten()
            .fold(0f32, |m, v| m.max(v.abs()))
            * 1e-3;
        let mut worst_grad = 0f32;
        for (n, v) in trainable_vars(&map) {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            if norm == CnnModuleNorm::BatchNorm && n.ends_with("depthwise_conv.bias") {
                // A bias followed by batch norm has a zero gradient (the norm subtracts the
                // batch mean); both sides hold rounding noise there, which differs from run to
                // run with the summation order, so check it is noise, not that noises agree.
                let largest = flat(g)
                    .iter()
                    .chain(&cpu_grads[n.as_str()])
                    .fold(0f32, |m, x| m.max(x.abs()));
                assert!(
                    largest < floor,
                    "{name}: gradient of {n} should vanish under batch norm (largest {largest:e}, \
                     1e-3 of the largest gradient is {floor:e})"
                );
                continue;
            }
            let e = rel_err(&flat(g), &cpu_grads[n.as_str()], floor);
            assert!(e < 2e-3, "{name}: gradient of {n} differs (rel {e:e})");
            worst_grad = worst_grad.max(e);
        }
        for ((n, v), (_, cpu_v)) in named_vars(&map).iter().zip(&cpu_all) {
            let e = rel_err(&flat(v.as_tensor()), &flat(cpu_v.as_tensor()), 1e-3);
            assert!(e < 1e-4, "{name}: {n} after the step (rel {e:e})");
        }
        let mut worst_eval = 0f32;
        for (u, &n) in out_lens.iter().enumerate() {
            let w = flat(&want_eval.i(u).unwrap().narrow(0, 0, n).unwrap());
            let g = flat(&eval_logits.i(u).unwrap().narrow(0, 0, n).unwrap());
            worst_eval = worst_eval.max(rel_err(&w, &g, 1.0));
        }
        assert!(worst_eval < 1e-4, "{name}: eval logits {worst_eval}");
        println!("{name}: worst gradient rel err {worst_grad:.1e}, eval logits {worst_eval:.1e}");
    }
}

/// The tensor-op Adam/AdamW (every device but the CPU) equals the fused CPU update.
#[test]
fn adam_off_cpu_equals_the_fused_cpu_step() {
    let dev = test_device();
    for kind in [OptimizerKind::Adam, OptimizerKind::Adamw] {
        let cfg = OptimConfig {
            optimizer: kind,
            weight_decay: 0.01,
            ..OptimConfig::default()
        };
        let params = |d: &Device| -> NamedVars {
            (0..3)
                .map(|i| {
                    let t = rand_tensor(&[5 + i, 7], 40 + i as u64, 1.0)
                        .to_device(d)
                        .unwrap();
                    (format!("p{i}"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let (cpu, off) = (params(&Device::Cpu), params(&dev));
        let mut cpu_opt = Adam::new(cpu.clone(), &cfg, Executor::CpuEngine).unwrap();
        let mut off_opt = Adam::new(off.clone(), &cfg, Executor::TensorOps).unwrap();
        for step in 0..4u64 {
            let grads: Vec<Tensor> = (0..3)
                .map(|i| rand_tensor(&[5 + i, 7], 1000 * step + i as u64, 0.5))
                .collect();
            cpu_opt.step(&grads, 1e-2).unwrap();
            let on_dev: Vec<Tensor> = grads.iter().map(|g| g.to_device(&dev).unwrap()).collect();
            off_opt.step(&on_dev, 1e-2).unwrap();
        }
        for ((n, a), (_, b)) in off.iter().zip(&cpu) {
            let e = max_abs_diff(&flat(a.as_tensor()), &flat(b.as_tensor()));
            assert!(e < 1e-6, "{kind:?} {n}: {e}");
        }
    }
}

/// Off the CPU dropout draws from the device RNG: it drops the asked fraction and scales the
/// kept values by 1 / (1 - p), like the seeded CPU masks.
#[test]
fn dropout_off_cpu_drops_the_asked_fraction() {
    let dev = test_device();
    let p = 0.2;
    let x = Tensor::ones((400, 500), DType::F32, &dev).unwrap();
    let y = flat(
        &Dropout::new(p, DropoutRng::new(1))
            .forward(&x, true)
            .unwrap(),
    );
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    assert!((dropped - p).abs() < 0.01, "dropped {dropped}");
    let kept = (1.0 / (1.0 - p)) as f32;
    assert!(y.iter().all(|&v| v == 0.0 || (v - kept).abs() < 1e-6));
    let eval = flat(
        &Dropout::new(p, DropoutRng::new(1))
            .forward(&x, false)
            .unwrap(),
    );
    assert!(eval.iter().all(|&v| v == 1.0));
}

// ---------------------------------------------------------------- the CLI

/// A small audio store of three demo utterances.
fn audio_store(dir: &Path) -> PathBuf {
    let demo = root().join("manifests/demo");
    let lines: Vec<String> = std::fs::read_to_string(demo.join("valid.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let path = demo.join(v["path"].as_str().unwrap());
            v["path"] = serde_json::json!(path);
            v.to_string()
        })
        .collect();
    let manifest = dir.join("utts.jsonl");
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    let store = dir.join("audio");
    ok(&bin()
        .args([
            "prepare",
            "--quiet",
            "--input",
            s(&manifest),
            "--out",
            s(&store),
        ])
        .output()
        .unwrap());
    store
}

/// `--device cuda:N` where no GPU is usable (a CPU-only build, or a CUDA build on a machine
/// with only the driver stub): one line naming the reason, a non-zero exit, nothing written.
#[test]
fn device_cuda_without_a_usable_gpu_fails_in_one_line() {
    if speechcache::device::open("cuda:0").is_ok() {
        println!("a GPU is usable here: nothing to check");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    let feats = tmp.path().join("feats");
    let exp = tmp.path().join("exp");
    let model = fixtures().join("w2v_base");
    let conf = root().join("manifests/conf/demo_fbank.toml");
    let runs: [Vec<&str>; 4] = [
        vec![
            "extract",
            "--data",
            s(&audio),
            "--model",
            s(&model),
            "--out",
            s(&feats),
            "--device",
            "cuda:0",
        ],
        vec![
            "extract",
            "--data",
            s(&audio),
            "--model",
            s(&model),
            "--out",
            s(&feats),
            "--device",
            "cuda",
        ],
        vec![
            "finetune",
            "--train",
            s(&audio),
            "--valid",
            s(&audio),
            "--config",
            s(&conf),
            "--out",
            s(&exp),
            "--device",
            "cuda:1",
        ],
        vec!["bench", "extract", "--model", "base", "--device", "cuda:0"],
    ];
    for args in runs {
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: --device cuda") && err.contains("no usable GPU: "),
            "{args:?}: {err}"
        );
        assert!(
            !feats.exists() && !exp.exists(),
            "{args:?} wrote its output"
        );
    }
    let out = bin()
        .args([
            "extract",
            "--data",
            s(&audio),
            "--model",
            s(&model),
            "--out",
            s(&feats),
            "--device",
            "gpu0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid --device \"gpu0\""),
        "{err}"
    );
    assert!(!feats.exists());
}

/// A feature store as a user makes it with `--device`, the CPU engine turned off and f16/bf16
/// compute holds what the default CPU run (the CPU engine) stores (f32 stores, every layer;
/// f16/bf16 errors relative to each layer's largest value, as above; measured on the CPU: f32 5.0e-5 absolute,
/// f16 3.0e-3, bf16 2.0e-2).
#[test]
fn extract_off_cpu_paths_store_what_the_cpu_kernels_store() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    let model = fixtures().join("hubert_base");
    let device = test_device_name();
    let run = |name: &str, extra: &[&str], kernels_off: bool| -> FeatureStore {
        let out = tmp.path().join(name);
        let mut cmd = bin();
        cmd.args([
            "extract",
            "--quiet",
            "--data",
            s(&audio),
            "--model",
            s(&model),
        ])
        .args(["--out", s(&out), "--dtype", "f32", "--batch-seconds", "8"])
        .args(extra);
        if kernels_off {
            cmd.env("SPEECHCACHE_CPU_KERNELS", "off");
        }
        ok(&cmd.output().unwrap());
        FeatureStore::open(&out).unwrap()
    };
    let fused = run("fused", &[], false);
    let mut failures = Vec::new();
    let cases: [(&str, Vec<&str>, f32); 3] = [
        (
            "tensor_ops",
            vec!["--device", &device, "--compute-dtype", "f32"],
            1e-4,
        ),
        (
            "f16",
            vec!["--device", &device, "--compute-dtype", "f16"],
            F16_TOL,
        ),
        (
            "bf16",
            vec!["--device", &device, "--compute-dtype", "bf16"],
            BF16_TOL,
        ),
    ];
    for (name, extra, tol) in cases {
        let store = run(name, &extra, true);
        assert_eq!(store.len(), fused.len());
        let mut worst_err = 0f32;
        for i in 0..fused.len() {
            assert_eq!(store.rows()[i].id, fused.rows()[i].id);
            for &layer in fused.layers() {
                let want = fused.to_array(i, layer).unwrap();
                let got = store.to_array(i, layer).unwrap();
                let (want, got) = (want.as_slice().unwrap(), got.as_slice().unwrap());
                let e = if name == "tensor_ops" {
                    max_abs_diff(got, want)
                } else {
                    rel_err(got, want, 1.0)
                };
                worst_err = worst_err.max(e);
            }
        }
        println!("extract {name} on {device}: worst error {worst_err:.2e} (tolerance {tol:.0e})");
        failures.extend((worst_err >= tol).then_some(name));
    }
    assert!(failures.is_empty(), "over tolerance: {failures:?}");
}
