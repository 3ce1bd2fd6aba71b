//! `speechcache bench extract`: model forward (all hidden states) or fbank throughput in
//! x-real-time on this machine, with where the model's time goes. Random weights from a real
//! config (wav2vec2-base / -large shapes) unless a checkpoint is given, so no download is needed;
//! the same shapes as ../shared/peers/peer_extract.py measures for transformers.
use crate::extract::parse_device;
use crate::models::checkpoint::load_checkpoint;
use crate::models::fbank::{Fbank, FbankOptions};
use crate::models::ssl::config::{expected_tensors, Wav2Vec2Config};
use crate::models::ssl::{CpuEncoder, Wav2Vec2Model};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ExtractBenchArgs {
    /// `base` or `large` (wav2vec2 shapes, random weights), a checkpoint path, or `fbank`.
    #[arg(long, default_value = "base")]
    pub model: String,
    /// Seconds of audio to run (split into chunks).
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Chunk length in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub chunk: f64,
    /// Chunks per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16 compute.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: &ExtractBenchArgs) -> anyhow::Result<()> {
    let chunks = ((args.seconds / args.chunk).floor() as usize).max(1);
    let chunk_samples = (args.chunk * 16000.0) as usize;
    let audio_seconds = chunks as f64 * args.chunk;
    if args.model == "fbank" {
        let fbank = Fbank::new(FbankOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let waves: Vec<Vec<f32>> = (0..chunks)
            .map(|c| noise(chunk_samples, c as u64))
            .collect();
        let t = Instant::now();
        for w in &waves {
            std::hint::black_box(fbank.compute_from_unit_scale(w));
        }
        let wall = t.elapsed().as_secs_f64();
        println!(
            "model=fbank threads=1 audio_s={audio_seconds:.0} wall_s={wall:.3} x_realtime={:.1}",
            audio_seconds / wall
        );
        return Ok(());
    }
    let device = parse_device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => anyhow::bail!("--dtype {other}: use f32, f16 or bf16"),
    };
    let (cfg, model) = load_model(&args.model, &device, dtype)?;
    let threads = rayon::current_num_threads();
    if model.uses_cpu_engine() {
        return bench_cpu_engine(args, &cfg, &model, chunks, chunk_samples);
    }
    // warm-up on one chunk
    let warm = Tensor::from_vec(noise(chunk_samples, 99), (1, chunk_samples), &device)?;
    model.forward(&warm, &[chunk_samples], 1)?;
    let mut stages: BTreeMap<String, f64> = BTreeMap::new();
    let t = Instant::now();
    let mut c = 0;
    while c < chunks {
        let b = args.batch.min(chunks - c).max(1);
        let data: Vec<f32> = (0..b)
            .flat_map(|i| noise(chunk_samples, (c + i) as u64))
            .collect();
        let wave = Tensor::from_vec(data, (b, chunk_samples), &device)?.to_dtype(dtype)?;
        let lengths = vec![chunk_samples; b];
        // The CPU engine (what extract runs on CPU f32) has no per-stage laps.
        let (states, _, laps) = if model.uses_cpu_engine() {
            let (states, valid) = model.forward(&wave, &lengths, cfg.num_hidden_layers)?;
            (states, valid, Vec::new())
        } else {
            model.forward_profiled(&wave, &lengths, cfg.num_hidden_layers)?
        };
        // what a cache writes: every hidden state, converted to f16 on the host
        for s in &states {
            std::hint::black_box(s.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
        }
        for (name, secs) in laps {
            let group = if name.starts_with("conv") {
                "feature encoder convs"
            } else if name.starts_with("pos") {
                "positional conv"
            } else if name.starts_with("projection") {
                "feature projection"
            } else {
                "transformer layers"
            };
            *stages.entry(group.to_string()).or_default() += secs;
        }
        c += b;
    }
    let wall = t.elapsed().as_secs_f64();
    println!(
        "model={} layers={} hidden={} device={} dtype={} threads={threads} audio_s={audio_seconds:.0} wall_s={wall:.2} x_realtime={:.2}",
        args.model, cfg.num_hidden_layers, cfg.hidden_size, args.device, args.dtype, audio_seconds / wall
    );
    let profiled: f64 = stages.values().sum();
    for (name, secs) in &stages {
        println!(
            "  {name:<24} {secs:>7.2} s  {:>5.1}%",
            100.0 * secs / profiled.max(1e-9)
        );
    }
    println!(
        "  {:<24} {:>7.2} s",
        "other (copies, f16 output)",
        (wall - profiled).max(0.0)
    );
    Ok(())
}

/// The CPU engine as extract runs it: one utterance per thread, every hidden state converted
/// to f16 as it is done; per-stage CPU time from the engine's own accounting.
fn bench_cpu_engine(
    args: &ExtractBenchArgs,
    cfg: &Wav2Vec2Config,
    model: &Wav2Vec2Model,
    chunks: usize,
    chunk_samples: usize,
) -> anyhow::Result<()> {
    crate::ops::gemm::reserve_freed_memory();
    let mut engine = CpuEncoder::new(model)?;
    let keep: Vec<usize> = (0..=cfg.num_hidden_layers).collect();
    let waves: Vec<Vec<f32>> = (0..chunks)
        .map(|c| noise(chunk_samples, c as u64))
        .collect();
    // warm-up on one chunk (first-touch of the weights and buffers)
    engine.forward(&noise(chunk_samples, 99), &keep[..2], false)?;
    engine.enable_profile();
    let failed = std::sync::Mutex::new(None);
    let cpu0 = crate::extract::process_cpu_seconds();
    let t = Instant::now();
    engine.run_each(
        chunks,
        &keep,
        |i| waves[i].clone(),
        |_, r| match r {
            Ok((states, _)) => {
                for s in states {
                    let half: Vec<half::f16> = s.iter().map(|&v| half::f16::from_f32(v)).collect();
                    std::hint::black_box(half);
                }
                true
            }
            Err(e) => {
                if let Ok(mut f) = failed.lock() {
                    *f = Some(e);
                }
                false
            }
        },
    );
    let wall = t.elapsed().as_secs_f64();
    let cpu = crate::extract::process_cpu_seconds() - cpu0;
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e.into());
    }
    let audio_seconds = chunks as f64 * chunk_samples as f64 / 16000.0;
    println!(
        "model={} layers={} hidden={} device=cpu dtype=f32 engine=cpu threads={} audio_s={audio_seconds:.0} wall_s={wall:.2} x_realtime={:.2} cpu_s={cpu:.2} x_realtime_per_cpu_s={:.2}",
        args.model,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        rayon::current_num_threads(),
        audio_seconds / wall,
        audio_seconds / cpu.max(1e-9)
    );
    let stages = engine.profile();
    let profiled: f64 = stages.iter().map(|(_, s)| s).sum();
    for (name, secs) in &stages {
        println!(
            "  {name:<38} {secs:>7.2} CPU s  {:>5.1}%",
            100.0 * secs / profiled.max(1e-9)
        );
    }
    println!(
        "  {:<38} {:>7.2} CPU s",
        "other (f16 output, threads, allocation)",
        (cpu - profiled).max(0.0)
    );
    Ok(())
}

/// A real-config model with random weights (`base`, `large`) or a checkpoint.
fn load_model(
    name: &str,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<(Wav2Vec2Config, Wav2Vec2Model)> {
    let cfg = match name {
        "base" => Wav2Vec2Config::default(),
        "large" => Wav2Vec2Config {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            feat_extract_norm: "layer".into(),
            do_stable_layer_norm: true,
            conv_bias: true,
            ..Wav2Vec2Config::default()
        },
        path => {
            let ckpt = load_checkpoint(Path::new(path), device, dtype)?;
            let model = Wav2Vec2Model::load(ckpt.var_builder(), &ckpt.config)?;
            return Ok((ckpt.config, model));
        }
    };
    let tensors: HashMap<String, Tensor> = expected_tensors(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let is_scale =
                name.ends_with("weight_g") || (name.contains("norm") && name.ends_with("weight"));
            let t = if is_scale {
                Tensor::ones(shape, DType::F32, device)
            } else {
                Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), shape, device)
            };
            t.map(|t| (name, t))
        })
        .collect::<candle_core::Result<_>>()?;
    let model = Wav2Vec2Model::load(VarBuilder::from_tensors(tensors, dtype, device), &cfg)?;
    Ok((cfg, model))
}

/// Deterministic noise at speech-like level (0.1 rms), as the peer uses.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.35).collect()
}
