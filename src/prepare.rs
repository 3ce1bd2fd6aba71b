//! Stage 1: corpus → audio store. Decoding and resampling run on all cores; the store is
//! written in input order by one writer, so the result is byte-identical at any `--jobs`.
use crate::audio::{self, AudioInput, DecodeOptions, DecodedAudio};
use crate::manifest::{self, AudioRef, Columns, CorpusItem, InputFormat, Origin, Utterance};
use crate::progress::{human_bytes, parse_size, Progress};
use crate::store::partition::PartSpec;
use crate::store::{
    json_sha256, Dtype, ErrorRow, IndexRow, InputResult, ItemData, PartSlice, StoreKind,
    StoreWriter, WriterSpec,
};
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct PrepareArgs {
    /// A corpus directory, fairseq .tsv, Kaldi data dir (or its wav.scp), .jsonl manifest, Lhotse
    /// manifest (recordings/supervisions/cuts .jsonl.gz) or Hugging Face dataset (parquet file or directory, save_to_disk directory); repeatable.
    #[arg(long = "input", required = true, value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// Output audio store directory (created; an interrupted run there is resumed).
    #[arg(long, value_name = "STORE")]
    pub out: PathBuf,
    /// How to read the inputs; `auto` detects each from its shape.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: InputFormat,
    /// Hugging Face datasets: the transcript column (default: the first of text, sentence,
    /// transcription, normalized_text).
    #[arg(long, value_name = "NAME")]
    pub text_column: Option<String>,
    /// Hugging Face datasets: the utterance id column (default: the first of id, segment_id,
    /// path; an audio file name gives its stem; none: the audio path's stem).
    #[arg(long, value_name = "NAME")]
    pub id_column: Option<String>,
    /// Output sample rate in Hz.
    #[arg(long, default_value_t = 16000)]
    pub sample_rate: u32,
    /// Decoding threads (default: all cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Seal a shard before it grows past this size (e.g. 1GiB, 256MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Skip utterances shorter than this many seconds (listed in errors.jsonl as skipped).
    #[arg(long, value_name = "S")]
    pub min_duration: Option<f64>,
    /// Skip utterances longer than this many seconds (listed in errors.jsonl as skipped).
    #[arg(long, value_name = "S")]
    pub max_duration: Option<f64>,
    /// Speed perturbation factors (sox `speed`), e.g. 0.9,1.0,1.1: adds copies with ids `sp0.9-...`.
    #[arg(long, value_delimiter = ',', value_name = "F,F,...")]
    pub speed: Vec<f64>,
    /// Keep the decodable part of damaged files (flagged in their index row) instead of failing them.
    #[arg(long)]
    pub keep_damaged: bool,
    /// Exit non-zero when any file failed.
    #[arg(long)]
    pub strict: bool,
    /// Redo the store at --out from scratch (its own files only), whatever it holds: other
    /// options, replaced inputs, a damaged meta.json, or a complete store.
    #[arg(long)]
    pub overwrite: bool,
    /// Prepare only part K of N (1-based: 1/4 .. 4/4) into --out, an ordinary store of one
    /// contiguous slice of the inputs (balanced by the manifest's durations when every
    /// utterance has one, else by utterance count); join the N part stores with `speechcache
    /// merge`. In a Slurm array submitted with --array=1-N:
    /// --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_name = "K/N", value_parser = crate::store::partition::parse_part)]
    pub part: Option<PartSpec>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// One unit of parallel work, in input order: a source file and the utterances cut from it
/// (`audio[i]` says how utterance `i` is read), a few rows of one parquet row group, or one
/// manifest row that cannot be used.
struct Job {
    source: PathBuf,
    utterances: Vec<Utterance>,
    audio: Vec<AudioRef>,
    origins: Vec<Origin>,
}

/// What `prepare` did.
#[derive(Debug, Clone, Default)]
pub struct PrepareSummary {
    pub items: u64,
    pub failed: u64,
    pub skipped: u64,
    pub audio_seconds: f64,
    pub bytes: u64,
    pub wall_seconds: f64,
    pub resumed_items: usize,
    pub already_complete: bool,
}

/// Time spent per stage, summed over jobs (for `bench prepare`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub decode: f64,
    pub resample: f64,
    pub write: f64,
}

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    let summary = prepare(args)?;
    if summary.already_complete {
        println!(
            "{} is already complete ({} utterances, {:.2} h); nothing to do",
            args.out.display(),
            summary.items,
            summary.audio_seconds / 3600.0
        );
        return Ok(());
    }
    print_summary(args, &summary)?;
    let real_failures = summary.failed - summary.skipped;
    if args.strict && real_failures > 0 {
        anyhow::bail!(
            "{real_failures} inputs failed (--strict); see {}",
            args.out.join("errors.jsonl").display()
        );
    }
    Ok(())
}

/// Runs the stage and returns its summary (the CLI prints it).
pub fn prepare(args: &PrepareArgs) -> anyhow::Result<PrepareSummary> {
    prepare_timed(args).map(|(s, _)| s)
}

/// `prepare` plus per-stage times.
pub fn prepare_timed(args: &PrepareArgs) -> anyhow::Result<(PrepareSummary, StageTimes)> {
    let started = Instant::now();
    validate(args)?;
    let columns = Columns {
        text: args.text_column.clone(),
        id: args.id_column.clone(),
    };
    // Canonical paths: the fingerprint (and each row's source) is the same whatever directory
    // the run, or its resume on another node, starts from.
    let inputs = canonical_inputs(&args.inputs)?;
    let items = manifest::load_corpus(&inputs, args.format, &columns)?;
    check_speed_ids(&items, &speed_copies(&args.speed))?;
    let all_jobs = group_jobs(items);
    let spec = writer_spec(args, &inputs, &all_jobs);
    let opened = match args.part {
        Some(part) => {
            let owned = part_range(&all_jobs, part);
            let slice = PartSlice::new(part, &owned, all_jobs.len());
            StoreWriter::create_or_resume_part(&args.out, spec, slice).map(|w| (w, owned))
        }
        None => StoreWriter::create_or_resume(&args.out, spec).map(|w| (w, 0..all_jobs.len())),
    };
    let (mut writer, owned) =
        opened.with_context(|| format!("cannot write the store at {}", args.out.display()))?;
    // A part run's writer numbers its inputs from 0 within its slice.
    let jobs = &all_jobs[owned];
    if let Some(meta) = writer.completed_meta() {
        return Ok((
            PrepareSummary {
                items: meta.totals.items,
                failed: meta.totals.failed,
                audio_seconds: meta.totals.seconds,
                bytes: meta.totals.bytes,
                already_complete: true,
                ..Default::default()
            },
            StageTimes::default(),
        ));
    }
    let first = writer.next_input();
    let resumed_items = writer.resumed_items();
    if first > 0 && !args.quiet {
        eprintln!(
            "resuming {}: {resumed_items} utterances in sealed shards, continuing at input {first} of {}",
            args.out.display(),
            jobs.len()
        );
    }
    let threads = args.jobs.unwrap_or_else(default_jobs).max(1);
    let total_utts: usize = jobs[first.min(jobs.len())..]
        .iter()
        .map(|j| j.utterances.len())
        .sum();
    let mut progress = Progress::new("prepare", total_utts as u64, args.quiet);
    let mut times = StageTimes::default();
    let options = ProcessOptions {
        rate: args.sample_rate,
        speeds: speed_copies(&args.speed),
        min_duration: args.min_duration,
        max_duration: args.max_duration,
        decode: DecodeOptions {
            keep_damaged: args.keep_damaged,
        },
    };
    let window = threads * 4;
    ordered_parallel(
        &jobs[first.min(jobs.len())..],
        threads,
        window,
        |job| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| process_job(job, &options)))
                .unwrap_or_else(|panic| {
                    let reason = format!("crashed while processing: {}", panic_message(&panic));
                    (
                        fail_all(job, &job.source.display().to_string(), &reason),
                        StageTimes::default(),
                    )
                })
        },
        |offset, (result, job_times)| {
            let t = Instant::now();
            let seconds: f64 = result.items.iter().map(|(r, _)| r.duration).sum();
            let n = jobs[first + offset].utterances.len() as u64;
            writer.push_input(first + offset, result)?;
            times.decode += job_times.decode;
            times.resample += job_times.resample;
            times.write += t.elapsed().as_secs_f64();
            progress.advance(n, seconds);
            Ok(())
        },
    )?;
    progress.finish();
    let t = Instant::now();
    let meta = writer.finish()?;
    times.write += t.elapsed().as_secs_f64();
    let errors: Vec<ErrorRow> = crate::store::read_jsonl(&args.out.join("errors.jsonl"))?;
    let skipped = errors
        .iter()
        .filter(|e| e.reason.starts_with(SKIPPED))
        .count() as u64;
    Ok((
        PrepareSummary {
            items: meta.totals.items,
            failed: meta.totals.failed,
            skipped,
            audio_seconds: meta.totals.seconds,
            bytes: meta.totals.bytes,
            wall_seconds: started.elapsed().as_secs_f64(),
            resumed_items,
            already_complete: false,
        },
        times,
    ))
}

const SKIPPED: &str = "skipped:";

/// The source-file jobs part `part` owns: contiguous, balanced by the manifest's durations
/// when every utterance has one, else by utterance count.
fn part_range(jobs: &[Job], part: PartSpec) -> std::ops::Range<usize> {
    let known = jobs
        .iter()
        .all(|j| j.utterances.iter().all(|u| u.duration.is_some()));
    let weights: Vec<f64> = jobs
        .iter()
        .map(|j| match known {
            true => j.utterances.iter().filter_map(|u| u.duration).sum(),
            false => j.utterances.len() as f64,
        })
        .collect();
    part.range_of(&weights)
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn validate(args: &PrepareArgs) -> anyhow::Result<()> {
    if args.sample_rate < 1000 || args.sample_rate > 384_000 {
        anyhow::bail!(
            "--sample-rate {} is out of range (1000–384000 Hz)",
            args.sample_rate
        );
    }
    for &f in &args.speed {
        if !(0.5..=2.0).contains(&f) {
            anyhow::bail!("--speed factor {f} is out of range (0.5–2.0)");
        }
    }
    if let (Some(lo), Some(hi)) = (args.min_duration, args.max_duration) {
        if lo > hi {
            anyhow::bail!("--min-duration {lo} is larger than --max-duration {hi}");
        }
    }
    for input in &args.inputs {
        if !input.exists() {
            anyhow::bail!("{}: no such file or directory", input.display());
        }
        if !input.is_dir() && !crate::regular_file::is_regular(input) {
            anyhow::bail!(
                "{}: is not a regular file or directory (a FIFO, socket or device is never read)",
                input.display()
            );
        }
    }
    Ok(())
}

fn canonical_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    inputs
        .iter()
        .map(|p| {
            p.canonicalize()
                .with_context(|| format!("{}: cannot resolve the path", p.display()))
        })
        .collect()
}

/// Refuses a run whose speed copies (`sp0.9-ID`) would take the id of another utterance (a
/// file `sp0.9-a.wav` beside `a.wav`): two rows with one id break every later stage.
fn check_speed_ids(items: &[CorpusItem], speeds: &[f64]) -> anyhow::Result<()> {
    if speeds.is_empty() {
        return Ok(());
    }
    let by_id: std::collections::HashMap<&str, &Utterance> =
        items.iter().map(|i| (i.utt.id.as_str(), &i.utt)).collect();
    let mut clashes = Vec::new();
    for item in items {
        for &factor in speeds {
            let copy = speed_id(&item.utt.id, factor);
            if let Some(other) = by_id.get(copy.as_str()) {
                clashes.push(format!(
                    "the {factor} speed copy of {} ({}) would have the id {copy} of {}",
                    item.utt.id,
                    item.utt.source.display(),
                    other.source.display()
                ));
            }
        }
    }
    if let Some(first) = clashes.first() {
        anyhow::bail!(
            "utterance ids would not be unique: {first}{}; rename those inputs, or drop --speed",
            match clashes.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        );
    }
    Ok(())
}

/// The id of a speed-perturbed copy.
fn speed_id(id: &str, factor: f64) -> String {
    format!("sp{factor}-{id}")
}

/// Identity of the input files' contents as the file system states it (path, size, mtime) —
/// the manifest files given as --input and every audio source — so a file replaced since the
/// last run changes the fingerprint.
fn inputs_stat_sha256(inputs: &[PathBuf], jobs: &[Job]) -> String {
    use rayon::prelude::*;
    use std::os::unix::fs::MetadataExt;
    let mut paths: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    paths.extend(jobs.iter().map(|j| j.source.as_path()));
    paths.dedup();
    let stats: Vec<serde_json::Value> = paths
        .par_iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) if m.is_file() => {
                serde_json::json!([p, m.len(), m.mtime(), m.mtime_nsec()])
            }
            Ok(_) => serde_json::json!([p]),
            Err(_) => serde_json::json!([p, null]),
        })
        .collect();
    json_sha256(&serde_json::Value::Array(stats))
}

/// Consecutive utterances of one source file become one job, so a recording is decoded once
/// (once per channel choice); parquet rows group by row group, a few at a time; an unusable
/// row is a job of its own.
fn group_jobs(items: Vec<CorpusItem>) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for item in items {
        let joins = jobs.last().is_some_and(|job| {
            job.source == item.utt.source
                && match (&job.audio[0], &item.audio) {
                    (
                        AudioRef::File | AudioRef::Channels(_),
                        AudioRef::File | AudioRef::Channels(_),
                    ) => true,
                    (AudioRef::Embedded { group: a, .. }, AudioRef::Embedded { group: b, .. }) => {
                        a == b && job.utterances.len() < manifest::hf::ROWS_PER_JOB
                    }
                    _ => false,
                }
        });
        match jobs.last_mut() {
            Some(job) if joins => {
                job.utterances.push(item.utt);
                job.audio.push(item.audio);
                job.origins.push(item.origin);
            }
            _ => jobs.push(Job {
                source: item.utt.source.clone(),
                utterances: vec![item.utt],
                audio: vec![item.audio],
                origins: vec![item.origin],
            }),
        }
    }
    jobs
}

/// The factors that add copies (1.0 is the original itself), in the order given.
fn speed_copies(speeds: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for &f in speeds {
        if (f - 1.0).abs() > 1e-9 && !out.iter().any(|g| (g - f).abs() < 1e-9) {
            out.push(f);
        }
    }
    out
}

fn writer_spec(args: &PrepareArgs, inputs: &[PathBuf], jobs: &[Job]) -> WriterSpec {
    let items: Vec<CorpusItem> = jobs
        .iter()
        .flat_map(|j| {
            (0..j.utterances.len()).map(|i| CorpusItem {
                utt: j.utterances[i].clone(),
                audio: j.audio[i].clone(),
                origin: j.origins[i].clone(),
            })
        })
        .collect();
    let utterances = &items;
    let manifest_hash = json_sha256(&manifest::corpus_json(&items));
    WriterSpec {
        kind: StoreKind::Audio,
        dtype: Dtype::F32,
        sample_rate: Some(args.sample_rate),
        frame_rate: None,
        dim: None,
        layers: Vec::new(),
        options: serde_json::json!({
            "sample_rate": args.sample_rate,
            "shard_size": args.shard_size,
            "min_duration": args.min_duration,
            "max_duration": args.max_duration,
            "speed": speed_copies(&args.speed),
            "keep_damaged": args.keep_damaged,
            "resampler": "rubato-fft",
        }),
        source: serde_json::json!({
            "inputs": inputs,
            "format": args.format,
            "utterances": utterances.len(),
            "manifest_sha256": manifest_hash,
            "files_sha256": inputs_stat_sha256(inputs, jobs),
        }),
        extra: serde_json::Value::Null,
        shard_bytes: args.shard_size,
        overwrite: args.overwrite,
    }
}

struct ProcessOptions {
    rate: u32,
    speeds: Vec<f64>,
    min_duration: Option<f64>,
    max_duration: Option<f64>,
    decode: DecodeOptions,
}

/// Decodes a source once (per channel choice) and cuts, filters, resamples and perturbs each
/// of its utterances.
fn process_job(job: &Job, opts: &ProcessOptions) -> (InputResult, StageTimes) {
    match &job.audio[0] {
        AudioRef::Invalid(_) => (invalid_rows(job), StageTimes::default()),
        AudioRef::Embedded { .. } => process_embedded(job, opts),
        AudioRef::File | AudioRef::Channels(_) => process_file(job, opts),
    }
}

type Decoded = Result<DecodedAudio, String>;

fn process_file(job: &Job, opts: &ProcessOptions) -> (InputResult, StageTimes) {
    let mut times = StageTimes::default();
    let path = job.source.display().to_string();
    // one decode per channel choice among the job's utterances
    let mut decoded: Vec<(Option<&[usize]>, Decoded)> = Vec::new();
    let mut result = InputResult::default();
    for (utt, audio_ref) in job.utterances.iter().zip(&job.audio) {
        let channels = match audio_ref {
            AudioRef::Channels(c) => Some(c.as_slice()),
            _ => None,
        };
        let at = match decoded.iter().position(|(c, _)| *c == channels) {
            Some(at) => at,
            None => {
                let t = Instant::now();
                let audio = decode_guarded(AudioInput::File(&job.source), channels, opts, &path);
                times.decode += t.elapsed().as_secs_f64();
                decoded.push((channels, audio));
                decoded.len() - 1
            }
        };
        let outcome = match &decoded[at].1 {
            Ok(audio) => cut_utterance(utt, audio, &path, opts, &mut times),
            Err(reason) => Err(reason.clone()),
        };
        match outcome {
            Ok(items) => result.items.extend(items),
            Err(reason) => result.errors.push(ErrorRow {
                path: path.clone(),
                id: Some(utt.id.clone()),
                reason,
            }),
        }
    }
    (result, times)
}

/// Rows of one parquet row group: their encoded bytes are read together, then each decoded
/// from memory.
fn process_embedded(job: &Job, opts: &ProcessOptions) -> (InputResult, StageTimes) {
    let mut times = StageTimes::default();
    let rows: Vec<(usize, usize, Option<&PathBuf>)> = job
        .audio
        .iter()
        .filter_map(|a| match a {
            AudioRef::Embedded {
                group,
                row,
                fallback,
                ..
            } => Some((*group, *row, fallback.as_ref())),
            _ => None,
        })
        .collect();
    let group = rows.first().map_or(0, |r| r.0);
    let in_group: Vec<usize> = rows.iter().map(|r| r.1).collect();
    let t = Instant::now();
    let bytes = match manifest::hf::read_audio_bytes(&job.source, group, &in_group) {
        Ok(bytes) => bytes,
        Err(reason) => {
            let path = job.source.display().to_string();
            return (fail_all(job, &path, &reason), times);
        }
    };
    times.decode += t.elapsed().as_secs_f64();
    let mut result = InputResult::default();
    for (i, utt) in job.utterances.iter().enumerate() {
        let name = job.origins[i].to_string();
        let t = Instant::now();
        let fallback = rows.get(i).and_then(|r| r.2).filter(|p| p.is_file());
        let decoded = match (&bytes[i], fallback) {
            (Some(b), _) => decode_guarded(
                AudioInput::Bytes {
                    bytes: b,
                    name: Path::new(&name),
                },
                None,
                opts,
                &name,
            ),
            (None, Some(file)) => decode_guarded(
                AudioInput::File(file),
                None,
                opts,
                &file.display().to_string(),
            ),
            (None, None) => {
                Err("the row has no audio bytes (and no audio.path file to read)".into())
            }
        };
        times.decode += t.elapsed().as_secs_f64();
        let outcome = decoded.and_then(|audio| cut_utterance(utt, &audio, &name, opts, &mut times));
        match outcome {
            Ok(items) => result.items.extend(items),
            Err(reason) => result.errors.push(ErrorRow {
                path: name,
                id: Some(utt.id.clone()),
                reason,
            }),
        }
    }
    (result, times)
}

/// Decodes, turning an error or a decoder panic into the reason (without the path prefix).
fn decode_guarded(
    input: AudioInput<'_>,
    channels: Option<&[usize]>,
    opts: &ProcessOptions,
    name: &str,
) -> Result<DecodedAudio, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        audio::decode_input(input, channels, opts.decode)
    })) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(error_reason(&e.to_string(), name)),
        Err(panic) => Err(format!("decoder crashed: {}", panic_message(&panic))),
    }
}

/// Manifest rows that cannot be used: each is an error row naming the manifest and row.
fn invalid_rows(job: &Job) -> InputResult {
    let errors = job
        .utterances
        .iter()
        .zip(&job.audio)
        .zip(&job.origins)
        .map(|((utt, audio), origin)| ErrorRow {
            path: origin.to_string(),
            id: Some(utt.id.clone()),
            reason: match audio {
                AudioRef::Invalid(reason) => reason.clone(),
                _ => "unusable row".into(),
            },
        })
        .collect();
    InputResult {
        items: Vec::new(),
        errors,
    }
}

fn fail_all(job: &Job, path: &str, reason: &str) -> InputResult {
    InputResult {
        items: Vec::new(),
        errors: job
            .utterances
            .iter()
            .map(|u| ErrorRow {
                path: path.to_string(),
                id: Some(u.id.clone()),
                reason: reason.to_string(),
            })
            .collect(),
    }
}

/// The decoder's message without a repeated "cannot decode PATH:" prefix.
fn error_reason(message: &str, path: &str) -> String {
    let prefix = format!("cannot decode {path}: ");
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn cut_utterance(
    utt: &Utterance,
    audio: &DecodedAudio,
    source: &str,
    opts: &ProcessOptions,
    times: &mut StageTimes,
) -> Result<Vec<(IndexRow, ItemData)>, String> {
    let sr = audio.sample_rate as f64;
    let total = audio.samples.len();
    let begin = (utt.start * sr).round() as usize;
    if begin >= total && !(begin == 0 && total == 0) {
        return Err(format!(
            "segment starts at {:.2} s, past the end of the recording ({:.2} s)",
            utt.start,
            total as f64 / sr
        ));
    }
    let end = match utt.duration {
        Some(d) => {
            let end = ((utt.start + d) * sr).round() as usize;
            // Kaldi's extract-segments tolerates a small overrun of the recording's end.
            if end > total + (0.1 * sr) as usize {
                return Err(format!(
                    "segment ends at {:.2} s, past the end of the recording ({:.2} s)",
                    utt.start + d,
                    total as f64 / sr
                ));
            }
            end.min(total)
        }
        None => total,
    };
    if end <= begin {
        return Err("no audio (0 samples)".into());
    }
    let seconds = (end - begin) as f64 / sr;
    if let Some(min) = opts.min_duration {
        if seconds < min {
            return Err(format!(
                "{SKIPPED} {seconds:.2} s is shorter than --min-duration {min} s"
            ));
        }
    }
    if let Some(max) = opts.max_duration {
        if seconds > max {
            return Err(format!(
                "{SKIPPED} {seconds:.2} s is longer than --max-duration {max} s"
            ));
        }
    }
    let t = Instant::now();
    let resampled = audio::resample_to(&audio.samples[begin..end], audio.sample_rate, opts.rate)
        .map_err(|e| e.to_string())?;
    let mut items = Vec::with_capacity(1 + opts.speeds.len());
    for &factor in &opts.speeds {
        let perturbed =
            audio::speed_perturb(&resampled, opts.rate, factor).map_err(|e| e.to_string())?;
        items.push((
            row_for(utt, audio, source, opts.rate, perturbed.len(), Some(factor)),
            ItemData::Audio(perturbed),
        ));
    }
    times.resample += t.elapsed().as_secs_f64();
    let original = (
        row_for(utt, audio, source, opts.rate, resampled.len(), None),
        ItemData::Audio(resampled),
    );
    items.insert(0, original);
    Ok(items)
}

fn row_for(
    utt: &Utterance,
    audio: &DecodedAudio,
    source: &str,
    rate: u32,
    samples: usize,
    speed: Option<f64>,
) -> IndexRow {
    let prefix = speed.map(|f| format!("sp{f}-")).unwrap_or_default();
    IndexRow {
        id: speed.map_or_else(|| utt.id.clone(), |f| speed_id(&utt.id, f)),
        text: utt.text.clone(),
        speaker: utt.speaker.as_ref().map(|s| format!("{prefix}{s}")),
        source: source.to_string(),
        start: utt.start,
        duration: samples as f64 / rate as f64,
        orig_rate: Some(audio.sample_rate),
        orig_channels: Some(audio.channels),
        damaged: audio.damage.clone(),
        speed,
        ..Default::default()
    }
}

/// Maps `work` over `items` on `threads` threads and hands results to `consume` in input order,
/// keeping at most `window` results in flight so memory stays bounded.
pub fn ordered_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    window: usize,
    work: impl Fn(&T) -> R + Sync,
    mut consume: impl FnMut(usize, R) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    struct Shared<R> {
        ready: std::collections::BTreeMap<usize, R>,
        consumed: usize,
    }
    let shared = Mutex::new(Shared {
        ready: Default::default(),
        consumed: 0,
    });
    let changed = Condvar::new();
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= items.len() {
                    break;
                }
                {
                    let mut state = lock();
                    while i >= state.consumed + window && !abort.load(Ordering::SeqCst) {
                        state = changed.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                }
                if abort.load(Ordering::SeqCst) {
                    break;
                }
                let result = work(&items[i]);
                lock().ready.insert(i, result);
                changed.notify_all();
            });
        }
        let mut outcome = Ok(());
        for i in 0..items.len() {
            let result = {
                let mut state = lock();
                loop {
                    if let Some(r) = state.ready.remove(&i) {
                        break r;
                    }
                    state = changed
                        .wait_timeout(state, Duration::from_millis(200))
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            };
            if let Err(e) = consume(i, result) {
                outcome = Err(e);
                abort.store(true, Ordering::SeqCst);
                changed.notify_all();
                break;
            }
            lock().consumed = i + 1;
            changed.notify_all();
        }
        outcome
    })
}

fn print_summary(args: &PrepareArgs, s: &PrepareSummary) -> anyhow::Result<()> {
    let errors: Vec<ErrorRow> = crate::store::read_jsonl(&args.out.join("errors.jsonl"))?;
    let failed: Vec<&ErrorRow> = errors
        .iter()
        .filter(|e| !e.reason.starts_with(SKIPPED))
        .collect();
    for e in failed.iter().take(10) {
        eprintln!(
            "cannot decode {}: {} (skipped; see {})",
            e.path,
            e.reason,
            args.out.join("errors.jsonl").display()
        );
    }
    if failed.len() > 10 {
        eprintln!(
            "... and {} more failures in {}",
            failed.len() - 10,
            args.out.join("errors.jsonl").display()
        );
    }
    let xrt = if s.wall_seconds > 0.0 {
        s.audio_seconds / s.wall_seconds
    } else {
        0.0
    };
    println!(
        "prepared {}: {} utterances, {:.3} h of audio, {} failed, {} skipped by duration, {} in shards, {:.1} s wall, {:.0}x real time{}",
        args.out.display(),
        s.items,
        s.audio_seconds / 3600.0,
        failed.len(),
        s.skipped,
        human_bytes(s.bytes),
        s.wall_seconds,
        xrt,
        if s.resumed_items > 0 { format!(" (resumed after {} utterances)", s.resumed_items) } else { String::new() }
    );
    Ok(())
}
