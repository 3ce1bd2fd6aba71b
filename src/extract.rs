//! Stage 2: audio store → feature store. Runs a wav2vec2/HuBERT model (or Kaldi fbank) once
//! over every utterance and caches the chosen hidden states, layer-major.
//!
//! Utterances are taken in windows of store order; inside a window they are sorted by length
//! and batched by total audio seconds (little padding), and results are written back in store
//! order, so the store is identical whatever the batching and resumes like `prepare`.
use crate::collapse::Collapser;
use crate::device::Backend;
use crate::models::checkpoint::{load_checkpoint_then, LoadedCheckpoint};
use crate::models::fbank::{Fbank, FbankOptions};
use crate::models::ssl::chunk::Chunking;
use crate::models::ssl::config::Wav2Vec2Config;
use crate::models::ssl::cost::estimated_seconds;
use crate::models::ssl::{
    normalize_waveform, CpuEncoder, LinearLayout, SslEncoder, StateSink, Wav2Vec2Model, LONG_FRAMES,
};
use crate::progress::{human_bytes, parse_size, Progress};
use crate::store::partition::{in_fraction, PartSpec};
use crate::store::{
    AudioStore, Dtype, ErrorRow, FeatureEncoder, FeatureStore, IndexRow, InputResult, ItemData,
    LayerEncoder, PartSlice, StoreKind, StoreWriter, WriterSpec,
};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use ndarray::Array2;
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct ExtractArgs {
    /// Audio store made by `speechcache prepare`.
    #[arg(long, value_name = "AUDIO_STORE")]
    pub data: PathBuf,
    /// A wav2vec2/HuBERT/WavLM/data2vec-audio checkpoint (Hugging Face directory, model.safetensors,
    /// pytorch_model.bin or fairseq .pt), or `fbank` for Kaldi filterbanks.
    #[arg(long, value_name = "PATH|fbank")]
    pub model: String,
    /// Output feature store directory (an interrupted run there is resumed).
    #[arg(long, value_name = "FEATURE_STORE")]
    pub out: PathBuf,
    /// Hidden states to keep, numbered as transformers' `hidden_states` (0 = before the first
    /// Transformer layer): `all`, `0,6,12`, `4-12` or a mix. The model stops after the highest.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Storage dtype; int8 stores one float32 scale per frame beside the values.
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: Dtype,
    /// cpu, cuda or cuda:N (needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the model: auto = f32 on CPU, the storage dtype (f16/bf16) on CUDA.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub compute_dtype: String,
    /// Audio seconds per model batch (padding included).
    #[arg(long, default_value_t = 200.0)]
    pub batch_seconds: f64,
    /// Memory a model batch may use on the tensor-op path (CUDA, f16/bf16 compute); batches
    /// are cut by their estimated peak (conv outputs, hidden states) as well as by seconds.
    /// Default: half of the free memory on CPU, 8GiB on CUDA. An utterance that cannot fit
    /// alone is listed in errors.jsonl.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub batch_memory: Option<u64>,
    /// Utterances longer than this are listed in errors.jsonl instead of run.
    #[arg(long, value_name = "S", default_value_t = 120.0)]
    pub max_seconds_per_utterance: f64,
    /// Cut utterances longer than S seconds into fixed S-second windows, each run with
    /// --chunk-context seconds of context on either side that is computed but not kept, and
    /// stitch the kept frames: the same frame count as a whole-utterance run, bounded memory
    /// and time for long-form audio, but not the same values (attention sees one window;
    /// see the README for how far they drift). Off by default; CPU engine only.
    #[arg(long, value_name = "S")]
    pub chunk_seconds: Option<f64>,
    /// Seconds of context each side of a --chunk-seconds window.
    #[arg(long, value_name = "C", default_value_t = 2.0)]
    pub chunk_context: f64,
    /// Seal a shard before it grows past this size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Go on even when the estimated store size exceeds the free disk space.
    #[arg(long)]
    pub force: bool,
    /// Redo the store at --out from scratch (its own files only), whatever it holds: other
    /// options or model, a damaged meta.json, or a complete store.
    #[arg(long)]
    pub overwrite: bool,
    /// A config.json for a fairseq checkpoint whose stored config cannot be read.
    #[arg(long, value_name = "CONFIG_JSON", alias = "config")]
    pub model_config: Option<PathBuf>,
    /// Threads for fbank (default: all cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Extract only part K of N (1-based: 1/4 .. 4/4) into --out: an ordinary store of one
    /// contiguous slice of the audio store's rows, balanced by audio seconds and cut at the
    /// batch windows, so the parts joined with `speechcache merge` equal one run byte for
    /// byte. In a Slurm array submitted with --array=1-N:
    /// --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; on one node with several GPUs,
    /// one process per GPU: --part K/N --device cuda:(K-1).
    #[arg(long, value_name = "K/N", value_parser = crate::store::partition::parse_part)]
    pub part: Option<PartSpec>,
    /// Extract only a deterministic sample of about F of the utterances (0 < F <= 1), e.g. for
    /// a layer probe: an utterance is in when the first 8 bytes of SHA-256(its id), big-endian,
    /// are below F·2^64, so the same ids on every run, machine and --part. meta.json records F.
    #[arg(long, value_name = "F", value_parser = crate::store::partition::parse_fraction)]
    pub fraction: Option<f64>,
    /// Store one layer: the experiment EXP's featurizer output (Σ_l w_l · normalize_l(h_l), as
    /// `speechcache collapse` computes it from an all-layer store), computed while extracting.
    /// EXP must have been trained on features of this model.
    #[arg(long, value_name = "EXP")]
    pub collapse: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub fbank: FbankFlags,
}

/// Kaldi fbank options (used with `--model fbank`), with Kaldi's defaults.
#[derive(Args, Debug, Clone)]
pub struct FbankFlags {
    #[arg(long, default_value_t = 80, help_heading = "Fbank")]
    pub num_mel_bins: usize,
    /// Window length in milliseconds.
    #[arg(long, default_value_t = 25.0, help_heading = "Fbank")]
    pub frame_length: f32,
    /// Window shift in milliseconds.
    #[arg(long, default_value_t = 10.0, help_heading = "Fbank")]
    pub frame_shift: f32,
    /// Dither amount (0 = off; deterministic seed when on).
    #[arg(long, default_value_t = 0.0, help_heading = "Fbank")]
    pub dither: f32,
    #[arg(long, default_value_t = 0.97, help_heading = "Fbank")]
    pub preemphasis_coefficient: f32,
    /// povey, hamming, hanning, rectangular, sine, blackman.
    #[arg(long, default_value = "povey", help_heading = "Fbank")]
    pub window_type: String,
    #[arg(long, default_value_t = 20.0, help_heading = "Fbank")]
    pub low_freq: f32,
    /// 0 = Nyquist; negative = offset below Nyquist.
    #[arg(
        long,
        default_value_t = 0.0,
        allow_hyphen_values = true,
        help_heading = "Fbank"
    )]
    pub high_freq: f32,
    #[arg(long, default_value_t = 0.0, help_heading = "Fbank")]
    pub energy_floor: f32,
    /// Add log energy as an extra first dimension.
    #[arg(long, help_heading = "Fbank")]
    pub use_energy: bool,
    /// Kaldi --snip-edges (true: only frames that fit completely).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, help_heading = "Fbank")]
    pub snip_edges: bool,
}

impl FbankFlags {
    /// The options for audio at `sample_rate` (the audio store's rate).
    fn options(&self, sample_rate: u32) -> anyhow::Result<FbankOptions> {
        let mut value = serde_json::to_value(FbankOptions::default())?;
        let overrides = serde_json::json!({
            "sample_frequency": sample_rate,
            "num_mel_bins": self.num_mel_bins,
            "frame_length_ms": self.frame_length,
            "frame_shift_ms": self.frame_shift,
            "dither": self.dither,
            "preemph_coeff": self.preemphasis_coefficient,
            "window_type": self.window_type,
            "low_freq": self.low_freq,
            "high_freq": self.high_freq,
            "energy_floor": self.energy_floor,
            "use_energy": self.use_energy,
            "snip_edges": self.snip_edges,
        });
        if let (Some(map), Some(new)) = (value.as_object_mut(), overrides.as_object()) {
            for (k, v) in new {
                if map.contains_key(k) {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(value).context("invalid fbank options")
    }
}

#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Feature store to shrink in place.
    pub store: PathBuf,
    /// Hidden states to keep: `6-12`, `0,6,12`, ...
    #[arg(long, value_name = "LAYERS")]
    pub keep_layers: String,
}

/// Parses `all`, `0,6,12`, `4-12` (and mixes) against the available hidden states `0..=max`.
pub fn parse_layers(text: &str, max: usize) -> anyhow::Result<Vec<usize>> {
    if text.trim() == "all" {
        return Ok((0..=max).collect());
    }
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.parse::<usize>(), part.parse::<usize>()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            bail!("invalid layer list {text:?}: use all, 0,6,12 or 4-12");
        };
        if lo > hi || hi > max {
            bail!("layer range {part} is outside the model's hidden states 0-{max}");
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("no layers selected by {text:?}");
    }
    Ok(out)
}

/// What produces the features.
enum Extractor {
    Fbank(Box<Fbank>),
    /// An SSL encoder on the executor the backend chose: the CPU f32 engine runs one
    /// utterance per thread, written in store order as they finish; candle tensor ops (CUDA,
    /// f16/bf16, or `SPEECHCACHE_ENGINE=candle`) run padded batches.
    Ssl {
        encoder: Box<SslEncoder>,
        checkpoint: Box<LoadedCheckpoint>,
    },
}

impl Extractor {
    fn frames_for_samples(&self, n: usize) -> usize {
        match self {
            Extractor::Fbank(f) => f.frames_for_samples(n),
            Extractor::Ssl { checkpoint, .. } => {
                crate::models::ssl::frames_for_samples(&checkpoint.config, n)
            }
        }
    }

    /// The CPU engine and its checkpoint, when this extractor streams utterances through it.
    fn streaming_engine(&self) -> Option<(&CpuEncoder, &LoadedCheckpoint)> {
        match self {
            Extractor::Ssl {
                encoder,
                checkpoint,
            } => match &**encoder {
                SslEncoder::Cpu(engine) => Some((engine, checkpoint)),
                SslEncoder::TensorOps(_) => None,
            },
            Extractor::Fbank(_) => None,
        }
    }

    /// The candle model, when this extractor runs padded batches of it.
    fn batched_model(&self) -> Option<&Wav2Vec2Model> {
        match self {
            Extractor::Ssl { encoder, .. } => match &**encoder {
                SslEncoder::TensorOps(model) => Some(model),
                SslEncoder::Cpu(_) => None,
            },
            Extractor::Fbank(_) => None,
        }
    }
}

/// Totals of one extract run.
#[derive(Debug, Default, Clone)]
pub struct ExtractSummary {
    pub items: u64,
    pub failed: u64,
    pub frames: u64,
    pub audio_seconds: f64,
    pub bytes: u64,
    pub wall_seconds: f64,
    /// Opening the stores, reading and hashing the checkpoint, building the model.
    pub load_seconds: f64,
    /// From the first utterance started to the last one computed.
    pub model_seconds: f64,
    /// Time the writer was busy (encoding, checksums, shard writes); overlapped with the model
    /// on the CPU engine path.
    pub io_seconds: f64,
    /// Sealing the last shard and writing the index and metadata.
    pub finish_seconds: f64,
    /// CPU time of the process over the run (user + system).
    pub cpu_seconds: f64,
    pub threads: usize,
    /// Whether utterances were written in store order by the compute threads, as they finished
    /// (CPU engine): writing time is then part of the model time.
    pub streamed: bool,
    pub already_complete: bool,
}

pub fn run(args: &ExtractArgs) -> anyhow::Result<()> {
    let s = extract(args)?;
    if s.already_complete {
        println!(
            "{} is already complete ({} utterances); nothing to do",
            args.out.display(),
            s.items
        );
        return Ok(());
    }
    let hours = s.audio_seconds / 3600.0;
    println!(
        "extracted {}: {} utterances, {:.3} h audio, {} frames, {} failed, {} ({:.1} MB per audio hour), \
         {:.1}x real time",
        args.out.display(),
        s.items,
        hours,
        s.frames,
        s.failed,
        human_bytes(s.bytes),
        if hours > 0.0 { s.bytes as f64 / 1e6 / hours } else { 0.0 },
        if s.wall_seconds > 0.0 { s.audio_seconds / s.wall_seconds } else { 0.0 }
    );
    let written_apart = if s.streamed { 0.0 } else { s.io_seconds };
    let other =
        s.wall_seconds - s.load_seconds - s.model_seconds - written_apart - s.finish_seconds;
    println!(
        "  {:.2} s wall = {:.2} s loading (store, checkpoint read + hash, model) + {:.2} s model \
         {} {:.2} s writing{} + {:.2} s sealing + {:.2} s other; CPU {:.0}% of {}00%",
        s.wall_seconds,
        s.load_seconds,
        s.model_seconds,
        if s.streamed { "(of it" } else { "+" },
        s.io_seconds,
        if s.streamed {
            ", in store order on the compute threads)"
        } else {
            ""
        },
        s.finish_seconds,
        other.max(0.0),
        if s.wall_seconds > 0.0 {
            100.0 * s.cpu_seconds / s.wall_seconds
        } else {
            0.0
        },
        s.threads
    );
    if s.failed > 0 {
        eprintln!(
            "{} utterances failed; see {}",
            s.failed,
            args.out.join("errors.jsonl").display()
        );
    }
    Ok(())
}

pub fn extract(args: &ExtractArgs) -> anyhow::Result<ExtractSummary> {
    let started = Instant::now();
    let cpu_start = process_cpu_seconds();
    // Utterances allocate and free the same large buffers over and over: keep them mapped.
    crate::ops::gemm::reserve_freed_memory();
    crate::store::refuse_overlapping_out(&args.out, &[&args.data])?;
    let audio = AudioStore::open(&args.data)
        .with_context(|| format!("cannot open the audio store {}", args.data.display()))?;
    if args.batch_seconds <= 0.0 {
        bail!("--batch-seconds must be positive");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.unwrap_or(0))
        .build()
        .context("cannot start the thread pool")?;
    let (extractor, mut spec) = pool.install(|| build_extractor(args, &audio))?;
    if let Some(f) = args.fraction {
        spec.options["fraction"] = serde_json::json!(f);
    }
    let collapser = match &args.collapse {
        Some(exp) => Some(crate::collapse::Collapser::from_experiment(exp)?),
        None => None,
    };
    // The hidden states computed: the experiment's, when collapsing them into one stored layer.
    let layers = match (&collapser, &args.collapse) {
        (Some(c), Some(exp)) => c.for_extract(exp, &mut spec)?,
        _ => spec.layers.clone(),
    };
    let stored_layers = spec.layers.len();
    let dim = spec.dim.unwrap_or(0);
    let grid = window_grid(&audio, window_seconds(args));
    let opened = match args.part {
        Some(part) => {
            let owned = part_rows(&audio, &grid, &extractor, part);
            let slice = PartSlice::new(part, &owned, audio.len());
            StoreWriter::create_or_resume_part(&args.out, spec, slice).map(|w| (w, owned))
        }
        None => StoreWriter::create_or_resume(&args.out, spec).map(|w| (w, 0..audio.len())),
    };
    let (mut writer, owned) = opened
        .with_context(|| format!("cannot write the feature store at {}", args.out.display()))?;
    if let Some(meta) = writer.completed_meta() {
        return Ok(ExtractSummary {
            items: meta.totals.items,
            already_complete: true,
            ..Default::default()
        });
    }
    // Rows are numbered in the whole audio store; the writer counts from the part's start.
    let first = owned.start + writer.next_input();
    let todo = first..owned.end;
    check_disk_space(args, &audio, &extractor, stored_layers, dim, todo.clone())?;
    if writer.next_input() > 0 && !args.quiet {
        eprintln!(
            "resuming {}: continuing at utterance {first} of {}..{}",
            args.out.display(),
            owned.start,
            owned.end
        );
    }
    let mut summary = ExtractSummary {
        threads: pool.current_num_threads(),
        load_seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let mut progress = Progress::new("extract", todo.len() as u64, args.quiet);
    let max_layer = layers.iter().copied().max().unwrap_or(0);
    if let Some((engine, checkpoint)) = extractor.streaming_engine() {
        let job = EngineJob {
            args,
            audio: &audio,
            engine,
            normalize: checkpoint.preprocessor.do_normalize,
            layers: &layers,
            collapser: collapser.as_ref(),
            rows: todo.clone(),
            base: owned.start,
        };
        pool.install(|| job.run(&mut writer, &mut progress, &mut summary))?;
    } else {
        // The whole store's windows, cut to this run's rows: a window the run resumes inside
        // is computed whole (its batches are the same as in an uninterrupted run) and only
        // the rows not yet written are pushed.
        for window in &grid {
            let window = window.start.max(owned.start)..window.end.min(owned.end);
            if window.end <= first || window.is_empty() {
                continue;
            }
            let t = Instant::now();
            let results = pool.install(|| {
                let layers = (&layers[..], collapser.as_ref());
                extract_window(args, &audio, &extractor, window.clone(), layers, max_layer)
            })?;
            summary.model_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (offset, result) in results.into_iter().enumerate() {
                let row = window.start + offset;
                if row < first {
                    continue;
                }
                let secs: f64 = result.items.iter().map(|(r, _)| r.duration).sum();
                writer.push_input(row - owned.start, result)?;
                progress.advance(1, secs);
            }
            summary.io_seconds += t.elapsed().as_secs_f64();
        }
    }
    progress.finish();
    let t = Instant::now();
    let meta = writer.finish()?;
    summary.finish_seconds = t.elapsed().as_secs_f64();
    summary.items = meta.totals.items;
    summary.failed = meta.totals.failed;
    summary.frames = meta.totals.length;
    summary.audio_seconds = meta.totals.seconds;
    summary.bytes = meta.totals.bytes;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    summary.cpu_seconds = process_cpu_seconds() - cpu_start;
    Ok(summary)
}

/// Audio seconds per batch window on the tensor-op path.
fn window_seconds(args: &ExtractArgs) -> f64 {
    (args.batch_seconds * 2.0).max(30.0)
}

/// The store's batch windows: consecutive rows of at least `seconds` of audio, counted from
/// row 0 of the whole store. Batches are formed inside a window only, so a row's batch
/// neighbours depend on the store and the options, never on where a run (a resume, a part)
/// starts.
fn window_grid(audio: &AudioStore, seconds: f64) -> Vec<Range<usize>> {
    let rate = audio.sample_rate() as f64;
    let mut grid = Vec::new();
    let mut start = 0;
    while start < audio.len() {
        let (mut end, mut filled) = (start, 0.0);
        while end < audio.len() && (end == start || filled < seconds) {
            filled += audio.rows()[end].length as f64 / rate;
            end += 1;
        }
        grid.push(start..end);
        start = end;
    }
    grid
}

/// The rows part `part` owns: balanced by audio seconds; on the tensor-op path whole windows
/// (batches never straddle two parts), elsewhere single rows (each row is computed alone).
fn part_rows(
    audio: &AudioStore,
    grid: &[Range<usize>],
    extractor: &Extractor,
    part: PartSpec,
) -> Range<usize> {
    let seconds = |r: &IndexRow| r.duration;
    let units: Vec<Range<usize>> = if extractor.batched_model().is_some() {
        grid.to_vec()
    } else {
        (0..audio.len()).map(|i| i..i + 1).collect()
    };
    let weights: Vec<f64> = units
        .iter()
        .map(|u| audio.rows()[u.clone()].iter().map(seconds).sum())
        .collect();
    let cut = part.range_of(&weights);
    let row_at = |unit: usize| units.get(unit).map_or(audio.len(), |u| u.start);
    row_at(cut.start)..row_at(cut.end)
}

/// CPU time (user + system) of this process so far, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zero-initialised struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Memory the system can still hand out (`MemAvailable`), when the OS says.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU engine's states, encoded as the store keeps them as they are computed.
impl StateSink for LayerEncoder {
    fn rows(&mut self, k: usize, values: &[f32]) -> candle_core::Result<()> {
        self.push_rows(k, values);
        Ok(())
    }
}

/// Where the CPU engine's states of one utterance go as they are computed: encoded as the
/// store keeps them, or (`--collapse`) added into the experiment's weighted sum, layer by
/// layer in the order `collapse` adds them (the same bits).
enum ItemSink<'a> {
    Layers(LayerEncoder),
    Collapsed {
        collapser: &'a Collapser,
        /// Σ so far, `[frames, dim]`.
        acc: Vec<f32>,
        /// Frames of each kept state added so far (a chunked forward hands them in blocks).
        rows: Vec<usize>,
        dim: usize,
        encoder: FeatureEncoder,
    },
}

impl StateSink for ItemSink<'_> {
    fn rows(&mut self, k: usize, values: &[f32]) -> candle_core::Result<()> {
        match self {
            ItemSink::Layers(item) => item.push_rows(k, values),
            ItemSink::Collapsed {
                collapser,
                acc,
                rows,
                dim,
                ..
            } => {
                let d = (*dim).max(1);
                let (Some(start), true) = (rows.get(k).copied(), values.len() % d == 0) else {
                    candle_core::bail!(
                        "state {k} of {} values does not fit the collapse",
                        values.len()
                    );
                };
                let end = (start * d + values.len()).max(acc.len());
                acc.resize(end, 0.0);
                collapser.accumulate(k, values, &mut acc[start * d..start * d + values.len()], d);
                rows[k] += values.len() / d;
            }
        }
        Ok(())
    }
}

impl ItemSink<'_> {
    fn finish(self, frames: usize) -> Result<ItemData, crate::store::StoreError> {
        match self {
            ItemSink::Layers(item) => item.finish(frames),
            ItemSink::Collapsed { acc, encoder, .. } => encoder.encode(&[&acc], frames),
        }
    }
}

/// An extract run on the CPU engine: pool threads each take the next utterance (store order)
/// and run it alone; this thread writes the results in store order as they arrive, so
/// writing overlaps the model, and every row depends on its own utterance only (the same
/// bytes whether the run was resumed, or where it started).
struct EngineJob<'a> {
    args: &'a ExtractArgs,
    audio: &'a AudioStore,
    engine: &'a CpuEncoder,
    normalize: bool,
    layers: &'a [usize],
    collapser: Option<&'a crate::collapse::Collapser>,
    /// Rows of the whole store this run computes.
    rows: Range<usize>,
    /// The whole-store row the writer's input 0 is (the part's first row).
    base: usize,
}

impl EngineJob<'_> {
    fn run(
        &self,
        writer: &mut StoreWriter,
        progress: &mut Progress,
        summary: &mut ExtractSummary,
    ) -> anyhow::Result<()> {
        let (audio, rate) = (self.audio, self.audio.sample_rate() as f64);
        let threads = rayon::current_num_threads();
        let encoder = writer.feature_encoder();
        let available = available_memory();
        let mut ready: std::collections::BTreeMap<usize, InputResult> = Default::default();
        let mut runnable = Vec::new();
        let damaged = damaged_rows(audio, self.rows.clone());
        for i in self.rows.clone() {
            let row = &audio.rows()[i];
            let seconds = row.length as f64 / rate;
            let samples = row.length as usize;
            // A long utterance runs alone over every thread and may use the memory that is
            // free now; a short one runs beside the others, on its share of it.
            let long = self.engine.frames_for_samples(samples) >= LONG_FRAMES;
            let (budget, tasks) = if long {
                (available, threads)
            } else {
                (available.map(|m| m / threads.max(1) as u64), 1)
            };
            let need = self.engine.peak_bytes(
                samples,
                self.layers.len(),
                encoder.bytes_per_value(),
                tasks,
            );
            let reason = if !in_fraction(self.args.fraction, &row.id) {
                ready.insert(i, InputResult::default());
                continue;
            } else if let Some(damage) = &damaged[i - self.rows.start] {
                Some(damage.clone())
            } else if seconds > self.args.max_seconds_per_utterance {
                Some(too_long(
                    self.engine.config(),
                    need,
                    samples,
                    rate,
                    self.args.max_seconds_per_utterance,
                ))
            } else if self.engine.frames_for_samples(samples) == 0 {
                Some(format!("{seconds:.3} s is too short to give one frame"))
            } else if budget.is_some_and(|b| need > b) {
                Some(format!(
                    "{seconds:.1} s needs about {} of memory for {} hidden states, more than the {} \
                     it may use now; extract fewer --layers, use fewer --jobs, or cut it with \
                     --chunk-seconds",
                    human_bytes(need),
                    self.layers.len(),
                    human_bytes(budget.unwrap_or(0))
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    ready.insert(i, error_result(row, reason));
                }
                None => runnable.push(i),
            }
        }
        // No writer thread: the compute thread that finishes the next utterance in store
        // order appends it (and any finished ones after it) under a lock, so writing never
        // falls behind the model on a saturated machine and the run ends with its last
        // utterance, not with a writer's backlog.
        let flushed_cv = std::sync::Condvar::new();
        let sink = std::sync::Mutex::new(InOrder {
            writer,
            progress,
            ready,
            next: self.rows.start,
            base: self.base,
            io_seconds: 0.0,
            failed: None,
            ready_bytes: 0,
        });
        let flushed = sink
            .lock()
            .map_err(|_| anyhow::anyhow!("an extract thread panicked"))?
            .flush();
        flushed?;
        let t = Instant::now();
        self.engine.run_each_into(
            runnable.len(),
            self.layers,
            &|j| audio.rows()[runnable[j]].length as usize,
            |j| {
                let mut wave = audio.samples(runnable[j]).to_vec();
                if self.normalize {
                    normalize_waveform(&mut wave);
                }
                wave
            },
            // Each state is encoded as the model finishes it, on the thread that computed it;
            // the lock below is held only to append bytes.
            |_| match self.collapser {
                Some(collapser) => ItemSink::Collapsed {
                    collapser,
                    acc: Vec::new(),
                    rows: vec![0; self.layers.len()],
                    dim: self.engine.config().hidden_size,
                    encoder,
                },
                None => ItemSink::Layers(encoder.begin()),
            },
            |j, result| {
                let i = runnable[j];
                let row = &audio.rows()[i];
                let result = match result {
                    Ok((item, t)) => match item.finish(t) {
                        Ok(item) => item_result(row, item),
                        Err(e) => error_result(row, format!("model output: {e}")),
                    },
                    Err(e) => error_result(row, format!("model failed: {e}")),
                };
                let bytes: u64 = result.items.iter().map(|(_, d)| d.memory_bytes()).sum();
                let Ok(mut sink) = sink.lock() else {
                    return false;
                };
                // Bounded reordering: while one slow utterance holds up the store order, the
                // threads that finish later ones wait here (holding one result each) once the
                // waiting results fill the budget. The thread with the next row never waits,
                // so the run always moves on.
                while i != sink.next
                    && sink.ready_bytes > 0
                    && sink.ready_bytes + bytes > REORDER_BUDGET
                    && sink.failed.is_none()
                {
                    sink = match flushed_cv.wait(sink) {
                        Ok(s) => s,
                        Err(_) => return false,
                    };
                }
                if sink.failed.is_some() {
                    return false;
                }
                sink.ready_bytes += bytes;
                sink.ready.insert(i, result);
                let flushed = sink.flush();
                flushed_cv.notify_all();
                match flushed {
                    Ok(()) => true,
                    Err(e) => {
                        sink.failed = Some(e);
                        false
                    }
                }
            },
            None,
        );
        summary.model_seconds = t.elapsed().as_secs_f64();
        let sink = sink
            .into_inner()
            .map_err(|_| anyhow::anyhow!("an extract thread panicked"))?;
        summary.io_seconds = sink.io_seconds;
        if let Some(e) = sink.failed {
            return Err(e);
        }
        if sink.next != self.rows.end {
            bail!(
                "the model stopped after utterance {} of {}",
                sink.next,
                self.rows.end
            );
        }
        summary.streamed = true;
        Ok(())
    }
}

/// Finished utterances waiting for their turn, and the writer they go to in store order.
struct InOrder<'a> {
    writer: &'a mut StoreWriter,
    progress: &'a mut Progress,
    ready: std::collections::BTreeMap<usize, InputResult>,
    /// The next row to write (numbered in the whole audio store).
    next: usize,
    /// The first row of this run's part (the writer counts inputs from it).
    base: usize,
    io_seconds: f64,
    failed: Option<anyhow::Error>,
    /// Bytes of the results in `ready`.
    ready_bytes: u64,
}

/// Most bytes of finished utterances that may wait for an earlier, slower one.
const REORDER_BUDGET: u64 = 1 << 30;

impl InOrder<'_> {
    fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(result) = self.ready.remove(&self.next) {
            let bytes: u64 = result.items.iter().map(|(_, d)| d.memory_bytes()).sum();
            self.ready_bytes = self.ready_bytes.saturating_sub(bytes);
            let w = Instant::now();
            let secs: f64 = result.items.iter().map(|(r, _)| r.duration).sum();
            self.writer.push_input(self.next - self.base, result)?;
            self.progress.advance(1, secs);
            self.io_seconds += w.elapsed().as_secs_f64();
            self.next += 1;
        }
        Ok(())
    }
}

/// Estimated peak bytes per utterance of `samples` samples in a padded batch on the tensor-op
/// path: the widest pair of consecutive conv outputs, the kept hidden states and a layer's
/// activations (attention scores are computed in blocks of bounded size).
fn tensor_path_bytes(
    cfg: &crate::models::ssl::config::Wav2Vec2Config,
    samples: usize,
    states: usize,
    elem: usize,
) -> u64 {
    let (mut t, mut c, mut conv_peak) = (samples, 1usize, 0usize);
    for ((&k, &s), &d) in cfg
        .conv_kernel
        .iter()
        .zip(&cfg.conv_stride)
        .zip(&cfg.conv_dim)
    {
        let t_out = if t < k { 0 } else { (t - k) / s + 1 };
        // input, output, and the gathered frames of one chunk
        conv_peak = conv_peak.max(t * c + 2 * t_out * d);
        t = t_out;
        c = d;
    }
    let h = cfg.hidden_size;
    let layer = t * (8 * h + 2 * cfg.intermediate_size);
    (elem * (conv_peak.max(layer) + states * t * h)) as u64
}

/// Each row of `rows` checked against its checksum, in parallel: the reason it cannot be used
/// (an error row naming the shard and line), or None.
fn damaged_rows(audio: &AudioStore, rows: Range<usize>) -> Vec<Option<String>> {
    rows.into_par_iter()
        .map(|i| audio.check_row(i).err().map(|e| e.to_string()))
        .collect()
}

fn error_result(row: &IndexRow, reason: String) -> InputResult {
    InputResult {
        items: vec![],
        errors: vec![ErrorRow {
            path: row.source.clone(),
            id: Some(row.id.clone()),
            reason,
        }],
    }
}

/// `--chunk-seconds` / `--chunk-context`, checked.
fn chunking(args: &ExtractArgs) -> anyhow::Result<Option<Chunking>> {
    let Some(seconds) = args.chunk_seconds else {
        return Ok(None);
    };
    if !(seconds.is_finite() && seconds >= 1.0) {
        bail!("--chunk-seconds {seconds}: a window is at least 1 second");
    }
    if !(args.chunk_context.is_finite() && args.chunk_context >= 0.0) {
        bail!(
            "--chunk-context {}: give 0 or more seconds",
            args.chunk_context
        );
    }
    Ok(Some(Chunking {
        seconds,
        context: args.chunk_context,
    }))
}

/// The error row of an utterance over --max-seconds-per-utterance: the flag that lifts the
/// limit, the memory and time it would then take here (the time from the encoder's FLOPs at
/// the engine's measured rate, so it grows with attention's T² term), and the chunked way.
fn too_long(cfg: &Wav2Vec2Config, need: u64, samples: usize, rate: f64, limit: f64) -> String {
    let seconds = samples as f64 / rate;
    let threads = rayon::current_num_threads();
    let wall = estimated_seconds(cfg, samples, threads);
    format!(
        "{seconds:.1} s is longer than --max-seconds-per-utterance {limit}; \
         --max-seconds-per-utterance {} extracts it whole, which needs about {} of memory \
         besides the model's weights and about {wall:.0} s on {threads} threads ({:.1}x real time at this length), or \
         --chunk-seconds 30 extracts it in fixed 30 s windows",
        seconds.ceil(),
        human_bytes(need),
        seconds / wall.max(1e-9),
    )
}

fn build_extractor(
    args: &ExtractArgs,
    audio: &AudioStore,
) -> anyhow::Result<(Extractor, WriterSpec)> {
    let audio_identity = serde_json::json!({
        "store": crate::store::resolved(&args.data),
        "fingerprint": audio.meta().fingerprint,
        "items": audio.len(),
    });
    let common = serde_json::json!({
        "dtype": args.dtype,
        "max_seconds_per_utterance": args.max_seconds_per_utterance,
        "shard_size": args.shard_size,
    });
    if args.model == "fbank" {
        let opts = args.fbank.options(audio.sample_rate())?;
        let fbank =
            Fbank::new(opts.clone()).map_err(|e| anyhow::anyhow!("invalid fbank options: {e}"))?;
        let dim = args.fbank.num_mel_bins + usize::from(args.fbank.use_energy);
        let layers = parse_layers(&args.layers, 0)?;
        let spec = WriterSpec {
            kind: StoreKind::Features,
            dtype: args.dtype,
            sample_rate: Some(audio.sample_rate()),
            frame_rate: Some(fbank.frame_rate()),
            dim: Some(dim),
            layers: layers.clone(),
            options: serde_json::json!({"model": "fbank", "fbank": opts, "layers": layers, "common": common}),
            source: serde_json::json!({"audio": audio_identity, "model": {"family": "kaldi-fbank"}}),
            extra: serde_json::json!({"model": {"family": "kaldi-fbank", "options": opts}}),
            shard_bytes: args.shard_size,
            overwrite: args.overwrite,
        };
        return Ok((Extractor::Fbank(Box::new(fbank)), spec));
    }
    // The executor (and the device) are chosen once; the compute dtype follows the device.
    let backend = Backend::resolve(&args.device, DType::F32)?;
    let backend = backend.with_dtype(
        match (
            args.compute_dtype.as_str(),
            backend.device().is_cpu(),
            args.dtype,
        ) {
            ("f16", ..) => DType::F16,
            ("bf16", ..) => DType::BF16,
            ("auto", false, Dtype::F16) => DType::F16,
            ("auto", false, Dtype::Bf16) => DType::BF16,
            _ => DType::F32,
        },
    );
    let dtype = backend.dtype();
    // The encoder is built while the weights are hashed.
    let (checkpoint, encoder) = load_checkpoint_then(
        Path::new(&args.model),
        args.model_config.as_deref(),
        backend.device(),
        dtype,
        // the CPU engine's gemm reads `[in, out]`: transpose while reading the file
        if backend.uses_cpu_engine() {
            LinearLayout::InOut
        } else {
            LinearLayout::OutIn
        },
        |ckpt| -> anyhow::Result<SslEncoder> {
            if ckpt.preprocessor.sampling_rate != audio.sample_rate() {
                bail!(
                    "{} expects {} Hz audio but {} is {} Hz: prepare it with --sample-rate {}",
                    args.model,
                    ckpt.preprocessor.sampling_rate,
                    args.data.display(),
                    audio.sample_rate(),
                    ckpt.preprocessor.sampling_rate
                );
            }
            let encoder = SslEncoder::from_checkpoint(ckpt, &backend)
                .with_context(|| format!("cannot build the model from {}", args.model))?;
            // The encoder holds its own (re-laid-out or shared) weights; keep the description.
            ckpt.tensors.clear();
            Ok(encoder)
        },
    )
    .with_context(|| format!("cannot load the model {}", args.model))?;
    let mut encoder = encoder?;
    let layers = parse_layers(&args.layers, checkpoint.config.num_hidden_layers)?;
    let chunking = chunking(args)?;
    match (&mut encoder, chunking) {
        (SslEncoder::Cpu(engine), c) => engine.set_chunking(c),
        (SslEncoder::TensorOps(_), Some(_)) => bail!(
            "--chunk-seconds runs on the CPU engine (f32 on the CPU), not on {} with {:?} compute",
            args.device,
            dtype
        ),
        (SslEncoder::TensorOps(_), None) => {}
    }
    let cfg = &checkpoint.config;
    let samples_per_frame: usize = cfg.conv_stride.iter().product();
    let frame_rate = audio.sample_rate() as f64 / samples_per_frame as f64;
    let model_identity = serde_json::json!({
        "family": cfg.model_type,
        "config": cfg,
        "preprocessor": checkpoint.preprocessor,
        "weights_sha256": checkpoint.weights_sha256,
        "format": checkpoint.format,
    });
    let mut ssl_options = serde_json::json!({"model": "ssl", "layers": layers, "compute_dtype": format!("{dtype:?}"), "common": common});
    if let Some(c) = chunking {
        // The windows decide the values: a resume or part must use the same ones.
        ssl_options["chunking"] = serde_json::json!({"seconds": c.seconds, "context": c.context});
    }
    if matches!(encoder, SslEncoder::TensorOps(_)) {
        // Padded batches: a row's float rounding depends on its batch, so the batch plan is
        // part of what the store is (resumes and parts with another plan are refused).
        ssl_options["batching"] = serde_json::json!({
            "window_seconds": window_seconds(args),
            "batch_seconds": args.batch_seconds,
            "batch_memory": args.batch_memory.map_or("auto".to_string(), |m| m.to_string()),
        });
    }
    let spec = WriterSpec {
        kind: StoreKind::Features,
        dtype: args.dtype,
        sample_rate: Some(audio.sample_rate()),
        frame_rate: Some(frame_rate),
        dim: Some(cfg.hidden_size),
        layers: layers.clone(),
        options: ssl_options,
        source: serde_json::json!({"audio": audio_identity, "model": model_identity}),
        extra: serde_json::json!({"model": {"path": args.model, "family": cfg.model_type,
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size}}),
        shard_bytes: args.shard_size,
        overwrite: args.overwrite,
    };
    let extractor = Extractor::Ssl {
        encoder: Box::new(encoder),
        checkpoint: Box::new(checkpoint),
    };
    Ok((extractor, spec))
}

/// Estimates the store size from the index alone and refuses when the disk is too small.
fn check_disk_space(
    args: &ExtractArgs,
    audio: &AudioStore,
    extractor: &Extractor,
    layers: usize,
    dim: usize,
    rows: Range<usize>,
) -> anyhow::Result<()> {
    let frames: u64 = audio.rows()[rows]
        .iter()
        .filter(|r| in_fraction(args.fraction, &r.id))
        .map(|r| extractor.frames_for_samples(r.length as usize) as u64)
        .sum();
    let per_frame =
        (dim * args.dtype.bytes_per_value() + if args.dtype == Dtype::Int8 { 4 } else { 0 }) as u64;
    let estimate = frames * per_frame * layers as u64;
    let probe = nearest_existing(&args.out);
    let free = fs4::available_space(&probe).unwrap_or(u64::MAX);
    if !args.quiet {
        eprintln!(
            "estimated feature store size: {} ({} layers × {dim} dims × {} frames, {}); free: {}",
            human_bytes(estimate),
            layers,
            frames,
            args.dtype.name(),
            human_bytes(free)
        );
    }
    if estimate > free && !args.force {
        bail!(
            "{}: not enough free space (need about {}, {} free); free some space, choose fewer --layers or a smaller --dtype, or pass --force",
            args.out.display(),
            human_bytes(estimate),
            human_bytes(free)
        );
    }
    Ok(())
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent.to_path_buf(),
            _ => return PathBuf::from("."),
        }
    }
    p
}

/// Extracts utterances `range` (store order) and returns one result per utterance, in order.
fn extract_window(
    args: &ExtractArgs,
    audio: &AudioStore,
    extractor: &Extractor,
    range: std::ops::Range<usize>,
    (layers, collapser): (&[usize], Option<&crate::collapse::Collapser>),
    max_layer: usize,
) -> anyhow::Result<Vec<InputResult>> {
    let rate = audio.sample_rate() as f64;
    let mut results: Vec<Option<InputResult>> = (0..range.len()).map(|_| None).collect();
    let mut runnable: Vec<usize> = Vec::new();
    let damaged = damaged_rows(audio, range.clone());
    for i in range.clone() {
        let row = &audio.rows()[i];
        let seconds = row.length as f64 / rate;
        let reason = if !in_fraction(args.fraction, &row.id) {
            results[i - range.start] = Some(InputResult::default());
            continue;
        } else if let Some(damage) = &damaged[i - range.start] {
            Some(damage.clone())
        } else if seconds > args.max_seconds_per_utterance {
            Some(format!(
                "{seconds:.1} s is longer than --max-seconds-per-utterance {}; \
                 --max-seconds-per-utterance {} extracts it",
                args.max_seconds_per_utterance,
                seconds.ceil()
            ))
        } else if extractor.frames_for_samples(row.length as usize) == 0 {
            Some(format!("{seconds:.3} s is too short to give one frame"))
        } else {
            None
        };
        match reason {
            Some(reason) => {
                results[i - range.start] = Some(InputResult {
                    items: vec![],
                    errors: vec![ErrorRow {
                        path: row.source.clone(),
                        id: Some(row.id.clone()),
                        reason,
                    }],
                })
            }
            None => runnable.push(i),
        }
    }
    match extractor {
        Extractor::Fbank(fbank) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(args.jobs.unwrap_or(0))
                .build()
                .context("cannot start the thread pool")?;
            let computed: Vec<(usize, Array2<f32>)> = pool.install(|| {
                runnable
                    .par_iter()
                    .map(|&i| (i, fbank.compute_from_unit_scale(audio.samples(i))))
                    .collect()
            });
            for (i, feats) in computed {
                results[i - range.start] = Some(item_result(
                    &audio.rows()[i],
                    ItemData::Features(vec![feats]),
                ));
            }
        }
        Extractor::Ssl {
            encoder,
            checkpoint,
        } => {
            let SslEncoder::TensorOps(model) = &**encoder else {
                bail!("the CPU engine streams utterances (EngineJob)");
            };
            let (device, dtype) = (model.device(), model.dtype());
            runnable.sort_by_key(|&i| std::cmp::Reverse(audio.rows()[i].length));
            let budget = (args.batch_seconds * rate) as usize;
            let memory = args.batch_memory.unwrap_or_else(|| {
                if device.is_cpu() {
                    available_memory().map_or(u64::MAX, |m| m / 2)
                } else {
                    8 << 30
                }
            });
            let bytes = |samples: usize| {
                tensor_path_bytes(
                    &checkpoint.config,
                    samples,
                    max_layer + 1,
                    dtype.size_in_bytes(),
                )
            };
            // An utterance that cannot fit even alone is listed, not run.
            runnable.retain(|&i| {
                let row = &audio.rows()[i];
                let need = bytes(row.length as usize);
                if need <= memory {
                    return true;
                }
                results[i - range.start] = Some(error_result(
                    row,
                    format!(
                        "{:.1} s needs about {} for one model batch, more than --batch-memory {}; \
                         extract fewer --layers or cut the utterance",
                        row.length as f64 / rate,
                        human_bytes(need),
                        human_bytes(memory)
                    ),
                ));
                false
            });
            let mut batch_start = 0;
            while batch_start < runnable.len() {
                let longest = audio.rows()[runnable[batch_start]].length as usize;
                let by_memory = (memory / bytes(longest).max(1)).max(1) as usize;
                let per_batch = (budget / longest.max(1)).clamp(1, by_memory);
                let batch = &runnable[batch_start..(batch_start + per_batch).min(runnable.len())];
                let outputs = run_model_batch(model, checkpoint, audio, batch, layers, max_layer)?;
                for (&i, mut feats) in batch.iter().zip(outputs) {
                    if let Some(c) = collapser {
                        feats = vec![collapse_states(c, &feats)];
                    }
                    results[i - range.start] =
                        Some(item_result(&audio.rows()[i], ItemData::Features(feats)));
                }
                batch_start += batch.len();
            }
        }
    }
    Ok(results.into_iter().map(|r| r.unwrap_or_default()).collect())
}

/// `extract --collapse`: one utterance's hidden states (the experiment's layers, in order)
/// as its one collapsed layer.
fn collapse_states(collapser: &crate::collapse::Collapser, states: &[Array2<f32>]) -> Array2<f32> {
    let (t, d) = states.first().map_or((0, 0), |s| s.dim());
    let laid_out: Vec<_> = states.iter().map(|s| s.as_standard_layout()).collect();
    let views: Vec<&[f32]> = laid_out
        .iter()
        .map(|s| s.as_slice().unwrap_or(&[]))
        .collect();
    Array2::from_shape_vec((t, d), collapser.combine(&views, d)).unwrap_or_default()
}

fn item_result(row: &IndexRow, data: ItemData) -> InputResult {
    let out = IndexRow {
        id: row.id.clone(),
        text: row.text.clone(),
        speaker: row.speaker.clone(),
        source: row.source.clone(),
        start: row.start,
        duration: row.duration,
        orig_rate: row.orig_rate,
        orig_channels: row.orig_channels,
        damaged: row.damaged.clone(),
        speed: row.speed,
        ..Default::default()
    };
    InputResult {
        items: vec![(out, data)],
        errors: vec![],
    }
}

/// One padded batch through the model; returns, per utterance, its chosen layers `[frames, dim]`.
fn run_model_batch(
    model: &Wav2Vec2Model,
    checkpoint: &LoadedCheckpoint,
    audio: &AudioStore,
    batch: &[usize],
    layers: &[usize],
    max_layer: usize,
) -> anyhow::Result<Vec<Vec<Array2<f32>>>> {
    let lengths: Vec<usize> = batch
        .iter()
        .map(|&i| audio.rows()[i].length as usize)
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut wave = vec![0f32; batch.len() * longest];
    for (b, &i) in batch.iter().enumerate() {
        let dst = &mut wave[b * longest..b * longest + lengths[b]];
        dst.copy_from_slice(audio.samples(i));
        if checkpoint.preprocessor.do_normalize {
            normalize_waveform(dst);
        }
    }
    let input =
        Tensor::from_vec(wave, (batch.len(), longest), model.device())?.to_dtype(model.dtype())?;
    let (hidden, frames) = model.forward(&input, &lengths, max_layer)?;
    let mut out: Vec<Vec<Array2<f32>>> = vec![Vec::with_capacity(layers.len()); batch.len()];
    for &layer in layers {
        let h = hidden
            .get(layer)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the model returned {} hidden states, layer {layer} was asked",
                    hidden.len()
                )
            })?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let (_, t, d) = h.dims3()?;
        let flat: Vec<f32> = h.flatten_all()?.to_vec1()?;
        for (b, item) in out.iter_mut().enumerate() {
            let n = frames[b].min(t);
            let slice = &flat[b * t * d..(b * t + n) * d];
            item.push(Array2::from_shape_vec((n, d), slice.to_vec())?);
        }
    }
    Ok(out)
}

/// `speechcache prune`: drops layers from a feature store in place.
pub fn run_prune(args: &PruneArgs) -> anyhow::Result<()> {
    let store = FeatureStore::open(&args.store)?;
    let max = store.layers().iter().copied().max().unwrap_or(0);
    let keep = parse_layers(&args.keep_layers, max)?;
    drop(store);
    let report = crate::store::prune_layers(&args.store, &keep)?;
    println!(
        "{}: kept layers {:?}, removed {:?}, freed {}",
        args.store.display(),
        keep,
        report.removed,
        human_bytes(report.freed_bytes)
    );
    Ok(())
}
