//! `speechcache info` and `speechcache verify`.
use super::reader::check_sealed_shard;
use super::{read_index, read_jsonl, ErrorRow, IndexRow, StoreError, StoreKind, StoreMeta};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Store directory (audio or features).
    pub store: PathBuf,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Store directory (audio or features).
    pub store: PathBuf,
}

/// What `verify` found: counts checked and every problem.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub shards: u32,
    pub rows: usize,
    pub problems: Vec<String>,
}

/// Re-checks every shard (header, size) and every row (range, contiguity, checksum) and the
/// totals in meta.json.
pub fn verify_store(dir: &Path) -> Result<VerifyReport, StoreError> {
    let meta = StoreMeta::load(dir)?;
    let rows: Vec<IndexRow> = read_jsonl(&dir.join("index.jsonl"))?;
    let mut report = VerifyReport {
        shards: meta.totals.shards,
        rows: rows.len(),
        ..Default::default()
    };
    if !dir.join("index.jsonl").is_file() {
        report.problems.push("index.jsonl is missing".into());
    }
    // Every sealed shard holds a row: a larger count is damage, not 4 billion files to look for.
    let shard_bound = rows.len() as u64;
    if u64::from(meta.totals.shards) > shard_bound {
        report.problems.push(format!(
            "meta.json counts {} shards for {} utterances",
            meta.totals.shards, shard_bound
        ));
        return Ok(report);
    }
    let mut by_shard: BTreeMap<u32, Vec<IndexRow>> = BTreeMap::new();
    for row in &rows {
        by_shard.entry(row.shard).or_default().push(row.clone());
    }
    if let Some((&last, _)) = by_shard.iter().next_back() {
        if last >= meta.totals.shards {
            report.problems.push(format!(
                "index names shard {last}, meta.json lists {}",
                meta.totals.shards
            ));
        }
    }
    let mut total_length = 0;
    for shard in 0..meta.totals.shards {
        let shard_rows = by_shard.remove(&shard).unwrap_or_default();
        let length: u64 = shard_rows.iter().map(|r| r.length).sum();
        total_length += length;
        if let Err(e) = check_sealed_shard(
            dir,
            meta.kind,
            meta.dtype,
            &meta.layers,
            meta.dim,
            shard,
            length,
            &shard_rows,
        ) {
            report.problems.push(e.to_string());
        }
    }
    if total_length != meta.totals.length {
        report.problems.push(format!(
            "rows cover {total_length}, meta.json says {}",
            meta.totals.length
        ));
    }
    if rows.len() as u64 != meta.totals.items {
        report.problems.push(format!(
            "{} rows, meta.json says {}",
            rows.len(),
            meta.totals.items
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for row in &rows {
        if !seen.insert(&row.id) {
            report.problems.push(format!("duplicate id {}", row.id));
        }
    }
    Ok(report)
}

pub fn run_verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let report = verify_store(&args.store)?;
    if report.problems.is_empty() {
        println!(
            "{}: OK ({} shards, {} utterances, every checksum matches)",
            args.store.display(),
            report.shards,
            report.rows
        );
        Ok(())
    } else {
        for p in &report.problems {
            eprintln!("{}: {p}", args.store.display());
        }
        anyhow::bail!(
            "{}: {} problems found",
            args.store.display(),
            report.problems.len()
        )
    }
}

pub fn run_info(args: &InfoArgs) -> anyhow::Result<()> {
    let dir = &args.store;
    let meta = StoreMeta::load(dir)?;
    let rows: Vec<IndexRow> = read_index(dir, &meta)?;
    let errors: Vec<ErrorRow> = read_jsonl(&dir.join("errors.jsonl"))?;
    let durations: Vec<f64> = rows.iter().map(|r| r.duration).collect();
    let hours = meta.totals.seconds / 3600.0;
    let mut rates: BTreeMap<String, usize> = BTreeMap::new();
    let mut channels: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        *rates
            .entry(r.orig_rate.map_or("?".into(), |x| x.to_string()))
            .or_default() += 1;
        *channels
            .entry(r.orig_channels.map_or("?".into(), |x| x.to_string()))
            .or_default() += 1;
    }
    let speakers: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r.speaker.as_deref()).collect();
    let with_text = rows.iter().filter(|r| r.text.is_some()).count();
    let damaged = rows.iter().filter(|r| r.damaged.is_some()).count();
    let histogram = duration_histogram(&durations);
    if args.json {
        let summary = serde_json::json!({
            "store": dir, "kind": meta.kind, "dtype": meta.dtype, "items": rows.len(),
            "failed": errors.len(), "hours": hours, "bytes": meta.totals.bytes,
            "shards": meta.totals.shards, "sample_rate": meta.sample_rate, "frame_rate": meta.frame_rate,
            "layers": meta.layers, "dim": meta.dim, "speakers": speakers.len(), "with_text": with_text,
            "damaged": damaged, "original_rates": rates, "original_channels": channels,
            "duration_histogram": histogram.iter().map(|(label, n)| serde_json::json!({"bin": label, "count": n})).collect::<Vec<_>>(),
            "errors": errors,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let kind = match meta.kind {
        StoreKind::Audio => format!("audio store, {} Hz float32", meta.sample_rate.unwrap_or(0)),
        StoreKind::Features => format!(
            "feature store, {} dims × layers {:?}, {} at {} frames/s",
            meta.dim.unwrap_or(0),
            meta.layers,
            meta.dtype.name(),
            meta.frame_rate.unwrap_or(0.0)
        ),
        StoreKind::Units => format!(
            "units store, int16 unit ids at {} frames/s",
            meta.frame_rate.unwrap_or(0.0)
        ),
    };
    println!("{}: {kind} ({})", dir.display(), meta.tool);
    println!(
        "  utterances {}   hours {:.3}   shards {}   bytes {} ({:.1} MB/hour)",
        rows.len(),
        hours,
        meta.totals.shards,
        meta.totals.bytes,
        if hours > 0.0 {
            meta.totals.bytes as f64 / 1e6 / hours
        } else {
            0.0
        }
    );
    if !durations.is_empty() {
        let (min, max) = durations
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), d| (a.min(*d), b.max(*d)));
        println!(
            "  duration  min {min:.2} s   mean {:.2} s   max {max:.2} s",
            meta.totals.seconds / durations.len() as f64
        );
    }
    println!(
        "  speakers {}   with transcript {with_text}   damaged but kept {damaged}",
        speakers.len()
    );
    let list = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  original rates (Hz) {}", list(&rates));
    println!("  original channels   {}", list(&channels));
    println!("  duration histogram:");
    let peak = histogram.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    for (label, n) in &histogram {
        let bar = "#".repeat((n * 40).div_ceil(peak));
        println!("    {label:>12} {n:>8} {bar}");
    }
    println!("  failures {}", errors.len());
    for e in errors.iter().take(20) {
        println!("    {}: {}", e.path, e.reason);
    }
    if errors.len() > 20 {
        println!(
            "    ... {} more in {}",
            errors.len() - 20,
            dir.join("errors.jsonl").display()
        );
    }
    Ok(())
}

/// Counts per duration bin (seconds): 0–1, 1–2, 2–5, 5–10, 10–20, 20–30, 30–60, 60+.
fn duration_histogram(durations: &[f64]) -> Vec<(String, usize)> {
    const EDGES: [f64; 8] = [0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0];
    let mut counts = [0usize; 8];
    for d in durations {
        let bin = EDGES.iter().rposition(|e| d >= e).unwrap_or(0);
        counts[bin] += 1;
    }
    EDGES
        .iter()
        .enumerate()
        .map(|(i, lo)| {
            let label = match EDGES.get(i + 1) {
                Some(hi) => format!("{lo}-{hi} s"),
                None => format!("{lo}+ s"),
            };
            (label, counts[i])
        })
        .collect()
}
