//! `speechcache bench prepare`: where prepare's time goes on the user's own files (read, decode,
//! resample, write, measured one file at a time on one thread) and how the whole stage scales
//! with `--jobs`.
use crate::audio::{self, DecodeOptions};
use crate::manifest::{self, InputFormat};
use crate::prepare::{prepare_timed, PrepareArgs};
use crate::store::{Dtype, IndexRow, InputResult, ItemData, StoreKind, StoreWriter, WriterSpec};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct PrepareBenchArgs {
    /// Corpus to measure (any input `prepare` accepts); repeatable.
    #[arg(long = "input", required = true, value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: InputFormat,
    /// Thread counts for the end-to-end runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub jobs: Vec<usize>,
    #[arg(long, default_value_t = 16000)]
    pub sample_rate: u32,
    /// Scratch directory for the stores written (removed afterwards).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PrepareBenchArgs) -> anyhow::Result<()> {
    let scratch_holder;
    let scratch = match &args.scratch {
        Some(p) => {
            std::fs::create_dir_all(p)?;
            p.clone()
        }
        None => {
            scratch_holder = tempfile::Builder::new()
                .prefix("speechcache-bench")
                .tempdir()?;
            scratch_holder.path().to_path_buf()
        }
    };
    let utterances = manifest::load_inputs(&args.inputs, args.format)?;
    let mut sources: Vec<PathBuf> = utterances.iter().map(|u| u.source.clone()).collect();
    sources.dedup();

    // Per stage, one thread, one file at a time.
    let (mut read_s, mut decode_s, mut resample_s, mut write_s) = (0.0, 0.0, 0.0, 0.0);
    let mut audio_seconds = 0.0;
    let mut bytes_read = 0u64;
    let stage_dir = scratch.join("stages");
    let _ = std::fs::remove_dir_all(&stage_dir);
    let mut writer = StoreWriter::create_or_resume(
        &stage_dir,
        WriterSpec {
            kind: StoreKind::Audio,
            dtype: Dtype::F32,
            sample_rate: Some(args.sample_rate),
            frame_rate: None,
            dim: None,
            layers: vec![],
            options: serde_json::json!({"bench": true}),
            source: serde_json::json!({}),
            extra: serde_json::Value::Null,
            shard_bytes: 1 << 30,
            overwrite: true,
        },
    )?;
    let mut failed = 0;
    for (i, source) in sources.iter().enumerate() {
        let t = Instant::now();
        let raw =
            std::fs::read(source).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        read_s += t.elapsed().as_secs_f64();
        bytes_read += raw.len() as u64;
        drop(raw);
        let t = Instant::now();
        let decoded = match audio::decode_file(source, DecodeOptions::default()) {
            Ok(d) => d,
            Err(_) => {
                failed += 1;
                writer.push_input(i, InputResult::default())?;
                continue;
            }
        };
        decode_s += t.elapsed().as_secs_f64();
        audio_seconds += decoded.samples.len() as f64 / decoded.sample_rate as f64;
        let t = Instant::now();
        let resampled =
            audio::resample_to(&decoded.samples, decoded.sample_rate, args.sample_rate)?;
        resample_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let row = IndexRow {
            id: format!("b{i}"),
            source: source.display().to_string(),
            ..Default::default()
        };
        writer.push_input(
            i,
            InputResult {
                items: vec![(row, ItemData::Audio(resampled))],
                errors: vec![],
            },
        )?;
        write_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    writer.finish()?;
    write_s += t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&stage_dir);

    // End to end at each thread count.
    let mut runs = Vec::new();
    for &jobs in &args.jobs {
        let out = scratch.join(format!("jobs{jobs}"));
        let _ = std::fs::remove_dir_all(&out);
        let prepare_args = PrepareArgs {
            inputs: args.inputs.clone(),
            out: out.clone(),
            format: args.format,
            text_column: None,
            id_column: None,
            sample_rate: args.sample_rate,
            jobs: Some(jobs.max(1)),
            shard_size: 1 << 30,
            min_duration: None,
            max_duration: None,
            speed: vec![],
            keep_damaged: false,
            strict: false,
            overwrite: true,
            part: None,
            quiet: true,
        };
        let t = Instant::now();
        let (summary, _) = prepare_timed(&prepare_args)?;
        let wall = t.elapsed().as_secs_f64();
        runs.push((jobs, wall, summary.audio_seconds / wall));
        let _ = std::fs::remove_dir_all(&out);
    }
    let xrt = |s: f64| {
        if s > 0.0 {
            audio_seconds / s
        } else {
            f64::INFINITY
        }
    };
    if args.json {
        let value = serde_json::json!({
            "files": sources.len(), "failed": failed, "audio_seconds": audio_seconds, "bytes_read": bytes_read,
            "stages_one_thread": {
                "read": {"seconds": read_s, "x_realtime": xrt(read_s)},
                "decode": {"seconds": decode_s, "x_realtime": xrt(decode_s)},
                "resample": {"seconds": resample_s, "x_realtime": xrt(resample_s)},
                "write": {"seconds": write_s, "x_realtime": xrt(write_s)},
            },
            "end_to_end": runs.iter().map(|(j, w, x)| serde_json::json!({"jobs": j, "wall_seconds": w, "x_realtime": x})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "bench prepare: {} files ({} failed), {:.2} h of audio, {:.1} MB read",
        sources.len(),
        failed,
        audio_seconds / 3600.0,
        bytes_read as f64 / 1e6
    );
    println!("stage (1 thread, per file)   seconds   x-real-time");
    for (name, s) in [
        ("read", read_s),
        ("decode", decode_s),
        ("resample", resample_s),
        ("write", write_s),
    ] {
        println!("  {name:<26} {s:>8.2}   {:>10.0}", xrt(s));
    }
    println!("end to end                  seconds   x-real-time   speed-up vs first");
    let base = runs.first().map_or(1.0, |r| r.2);
    for (jobs, wall, x) in &runs {
        println!(
            "  --jobs {jobs:<19} {wall:>8.2}   {x:>10.0}   {:>6.2}x",
            x / base
        );
    }
    Ok(())
}
