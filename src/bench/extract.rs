//! `speechcache bench extract`: model forward (all hidden states) or fbank throughput in
//! x-real-time on this machine, with where the time goes, on the executor extract would run
//! (the CPU engine for f32 on the CPU, candle tensor ops otherwise). Random weights from a real
//! config (wav2vec2-base / -large shapes) unless a checkpoint is given, so no download is
//! needed; the same shapes as ../shared/peers/peer_extract.py measures for transformers.
use crate::device::Backend;
use crate::models::checkpoint::load_checkpoint;
use crate::models::fbank::{Fbank, FbankOptions};
use crate::models::ssl::config::{expected_tensors, Wav2Vec2Config};
use crate::models::ssl::{CpuEncoder, LinearLayout, SslEncoder, Wav2Vec2Model};
use crate::ops::profile::{Kind, Profile, Profiler};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
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
    /// Instead of --seconds/--chunk: one utterance of each of these lengths (seconds, e.g.
    /// `10,60,300`), run alone as extract runs it (CPU engine, every state encoded to f16 as
    /// it is computed), with its x-real-time, CPU use and peak memory.
    #[arg(long, value_delimiter = ',', value_name = "S,S,..")]
    pub lengths: Option<Vec<f64>>,
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
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => anyhow::bail!("--dtype {other}: use f32, f16 or bf16"),
    };
    let backend = Backend::resolve(&args.device, dtype)?;
    match load_encoder(&args.model, &backend)? {
        SslEncoder::Cpu(engine) => match &args.lengths {
            Some(lengths) => bench_lengths(args, &engine, lengths),
            None => bench_cpu_engine(args, &engine, chunks, chunk_samples),
        },
        SslEncoder::TensorOps(_) if args.lengths.is_some() => {
            anyhow::bail!("--lengths measures the CPU engine (f32 on the CPU)")
        }
        SslEncoder::TensorOps(model) => bench_tensor_ops(args, &model, chunks, chunk_samples),
    }
}

/// candle tensor ops as extract runs them: padded batches of `--batch` chunks, every hidden
/// state copied to the host as f16.
fn bench_tensor_ops(
    args: &ExtractBenchArgs,
    model: &Wav2Vec2Model,
    chunks: usize,
    chunk_samples: usize,
) -> anyhow::Result<()> {
    let (cfg, device, dtype) = (model.config(), model.device(), model.dtype());
    // warm-up on one chunk
    let warm = Tensor::from_vec(noise(chunk_samples, 99), (1, chunk_samples), device)?;
    model.forward(&warm, &[chunk_samples], 1)?;
    let mut prof = Profiler::enabled();
    let t = Instant::now();
    let mut c = 0;
    while c < chunks {
        let b = args.batch.min(chunks - c).max(1);
        let data: Vec<f32> = (0..b)
            .flat_map(|i| noise(chunk_samples, (c + i) as u64))
            .collect();
        let wave = Tensor::from_vec(data, (b, chunk_samples), device)?.to_dtype(dtype)?;
        let lengths = vec![chunk_samples; b];
        let (states, _) =
            model.forward_profiled(&wave, &lengths, cfg.num_hidden_layers, &mut prof)?;
        // what a cache writes: every hidden state, converted to f16 on the host
        prof.time(Kind::Other, || -> anyhow::Result<()> {
            for s in &states {
                std::hint::black_box(s.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
            }
            Ok(())
        })?;
        c += b;
    }
    let wall = t.elapsed().as_secs_f64();
    let audio_seconds = chunks as f64 * chunk_samples as f64 / 16000.0;
    println!(
        "model={} layers={} hidden={} device={} dtype={} engine=candle threads={} audio_s={audio_seconds:.0} wall_s={wall:.2} x_realtime={:.2}",
        args.model,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        args.device,
        args.dtype,
        rayon::current_num_threads(),
        audio_seconds / wall
    );
    print_profile(&prof.take(), wall, "wall s", "other (batching, copies)");
    Ok(())
}

/// The CPU engine as extract runs it: one utterance per thread, every hidden state converted
/// to f16 as it is done; the profile sums the time of every thread.
fn bench_cpu_engine(
    args: &ExtractBenchArgs,
    engine: &CpuEncoder,
    chunks: usize,
    chunk_samples: usize,
) -> anyhow::Result<()> {
    crate::ops::gemm::reserve_freed_memory();
    let cfg = engine.config();
    let keep: Vec<usize> = (0..=cfg.num_hidden_layers).collect();
    let waves: Vec<Vec<f32>> = (0..chunks)
        .map(|c| noise(chunk_samples, c as u64))
        .collect();
    // warm-up on one chunk (first-touch of the weights and buffers)
    engine.forward(&noise(chunk_samples, 99), &keep[..2], false)?;
    let failed = Mutex::new(None);
    let profile = Mutex::new(Profile::default());
    let cpu0 = crate::extract::process_cpu_seconds();
    let t = Instant::now();
    engine.run_each_into(
        chunks,
        &keep,
        &|i| waves[i].len(),
        |i| waves[i].clone(),
        |_| Vec::new(),
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
        Some(&profile),
    );
    let wall = t.elapsed().as_secs_f64();
    let cpu = crate::extract::process_cpu_seconds() - cpu0;
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e.into());
    }
    let audio_seconds = chunks as f64 * chunk_samples as f64 / 16000.0;
    println!(
        "model={} layers={} hidden={} device=cpu dtype=f32 engine=cpu-engine threads={} audio_s={audio_seconds:.0} wall_s={wall:.2} x_realtime={:.2} cpu_s={cpu:.2} x_realtime_per_cpu_s={:.2}",
        args.model,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        rayon::current_num_threads(),
        audio_seconds / wall,
        audio_seconds / cpu.max(1e-9)
    );
    let profile = profile
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a CPU engine thread panicked"))?;
    print_profile(
        &profile,
        cpu,
        "thread s",
        "other (f16 output, threads, allocation; of CPU s)",
    );
    Ok(())
}

/// Per utterance length: one utterance of noise run alone, as extract runs it (every state
/// encoded to f16 as the engine hands it over), its x-real-time, CPU use (of all threads) and
/// peak resident memory (reset before each length).
fn bench_lengths(
    args: &ExtractBenchArgs,
    engine: &CpuEncoder,
    lengths: &[f64],
) -> anyhow::Result<()> {
    crate::ops::gemm::reserve_freed_memory();
    let cfg = engine.config();
    let keep: Vec<usize> = (0..=cfg.num_hidden_layers).collect();
    let encoder =
        crate::store::FeatureEncoder::new(crate::store::Dtype::F16, cfg.hidden_size, keep.len());
    engine.forward(&noise(16000, 99), &keep[..2], false)?;
    let threads = rayon::current_num_threads();
    for &seconds in lengths {
        if !(seconds.is_finite() && seconds > 0.0) {
            anyhow::bail!("--lengths: {seconds} is not a length in seconds");
        }
        let wave = noise((seconds * 16000.0) as usize, 7);
        // peak RSS from here (Linux: writing 5 to clear_refs resets VmHWM)
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let cpu0 = crate::extract::process_cpu_seconds();
        let t = Instant::now();
        let failed = Mutex::new(None);
        let done = Mutex::new(None);
        let profile = Mutex::new(Profile::default());
        engine.run_each_into(
            1,
            &keep,
            &|_| wave.len(),
            |_| wave.clone(),
            |_| encoder.begin(),
            |_, r| {
                let item = r
                    .map_err(anyhow::Error::from)
                    .and_then(|(item, t)| Ok(item.finish(t)?));
                match item {
                    Ok(item) => *done.lock().unwrap_or_else(|e| e.into_inner()) = Some(item),
                    Err(e) => *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
                }
                true
            },
            Some(&profile),
        );
        let wall = t.elapsed().as_secs_f64();
        let cpu = crate::extract::process_cpu_seconds() - cpu0;
        if let Some(e) = failed.into_inner().ok().flatten() {
            return Err(e);
        }
        drop(done);
        println!(
            "model={} length_s={seconds} frames={} threads={threads} wall_s={wall:.2} x_realtime={:.2} cpu_pct={:.0} peak_rss_mb={:.0} planned_mb={:.0}",
            args.model,
            engine.frames_for_samples(wave.len()),
            seconds / wall,
            100.0 * cpu / wall.max(1e-9),
            peak_rss_bytes() as f64 / 1e6,
            engine.peak_bytes(wave.len(), keep.len(), 2, threads) as f64 / 1e6,
        );
        // a lone long utterance spreads each op over the pool: these are wall seconds
        let profile = profile
            .into_inner()
            .map_err(|_| anyhow::anyhow!("a CPU engine thread panicked"))?;
        print_profile(
            &profile,
            wall,
            "wall s",
            "other (state encoding, allocation)",
        );
    }
    Ok(())
}

/// This process's peak resident set (VmHWM), 0 where unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Seconds per kind of work, their share, and what `total` leaves unaccounted.
fn print_profile(profile: &Profile, total: f64, unit: &str, other: &str) {
    let profiled = profile.forward_total();
    for (kind, secs, _) in profile.rows() {
        println!(
            "  {:<24} {secs:>7.2} {unit}  {:>5.1}%",
            kind.name(),
            100.0 * secs / profiled.max(1e-9)
        );
    }
    println!("  {other}: {:.2} s", (total - profiled).max(0.0));
}

/// A real-config encoder with random weights (`base`, `large`) or a checkpoint, on the
/// executor `backend` names.
fn load_encoder(name: &str, backend: &Backend) -> anyhow::Result<SslEncoder> {
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
            let ckpt = load_checkpoint(Path::new(path), backend.device(), backend.dtype())?;
            return Ok(SslEncoder::from_checkpoint(&ckpt, backend)?);
        }
    };
    let device = backend.device();
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
    let vb = VarBuilder::from_tensors(tensors, backend.dtype(), device);
    Ok(SslEncoder::load(vb, &cfg, LinearLayout::OutIn, backend)?)
}

/// Deterministic noise at speech-like level (0.1 rms), as the peer uses.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.35).collect()
}
