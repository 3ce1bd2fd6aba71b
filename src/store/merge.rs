//! `speechcache merge`: joins the N part stores of a partitioned run (`--part K/N`) into one
//! store whose rows, in input order, are those of a single run over the whole input.
//!
//! Shards are hard-linked (or copied with `--copy`) and renumbered part after part; index rows
//! keep their offsets; `errors.jsonl` is concatenated; feature statistics are recomputed from
//! the parts' per-dim sums (`stats/layer_LL.sums.npy`), never averaged. The merged store's
//! fingerprint is the whole run's, so it resumes, refuses and feeds `extract` like one.
use super::lock::{StoreLock, LOCK_FILE};
use super::npy::MappedNpy;
use super::reader::check_sealed_shard;
use super::writer::{
    is_store_entry, remove_if_exists, remove_path, sync_dir, write_stats_files, IN_PROGRESS,
};
use super::{
    read_index, read_jsonl, shard_name, sums_file, to_jsonl, write_atomic, ErrorRow, IndexRow,
    StoreError, StoreKind, StoreMeta, Totals,
};
use crate::progress::human_bytes;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The part stores of one partitioned run (`prepare`/`extract --part K/N`), all N of them,
    /// in any order (e.g. `parts/*`).
    #[arg(required = true, value_name = "PART")]
    pub parts: Vec<PathBuf>,
    /// The merged store (a new or empty directory; a merge killed there is redone).
    #[arg(long, value_name = "STORE")]
    pub out: PathBuf,
    /// Copy the shards instead of hard-linking them (parts on another file system).
    #[arg(long)]
    pub copy: bool,
}

/// What `merge_parts` did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub parts: usize,
    pub totals: Totals,
    pub already_complete: bool,
}

pub fn run_merge(args: &MergeArgs) -> anyhow::Result<()> {
    let report = merge_parts(&args.parts, &args.out, args.copy)?;
    let verb = if report.already_complete {
        "is already complete"
    } else if args.copy {
        "merged (copied)"
    } else {
        "merged (hard-linked)"
    };
    println!(
        "{} {verb}: {} parts, {} items, {} failed, {:.3} h, {} shards, {}",
        args.out.display(),
        report.parts,
        report.totals.items,
        report.totals.failed,
        report.totals.seconds / 3600.0,
        report.totals.shards,
        human_bytes(report.totals.bytes)
    );
    Ok(())
}

/// Checks that `parts` are one complete set and writes their merged store at `out`.
pub fn merge_parts(parts: &[PathBuf], out: &Path, copy: bool) -> Result<MergeReport, StoreError> {
    let ordered = check_part_set(parts, out)?;
    let (_, first) = &ordered[0];
    let whole = first_part(first).whole_fingerprint.clone();
    let _lock = StoreLock::acquire(out, "merge")?;
    if out.join("meta.json").exists() {
        let meta = StoreMeta::read(out)?;
        if meta.fingerprint == whole {
            return Ok(MergeReport {
                parts: ordered.len(),
                totals: meta.totals,
                already_complete: true,
            });
        }
        return Err(StoreError::refused(
            out,
            "holds another store; choose a new or empty --out directory",
        ));
    }
    // every part's rows are read and checked (index against meta.json, every checksum)
    // before anything is written: a damaged part must not become a complete-looking store
    let mut part_rows: Vec<Vec<IndexRow>> = Vec::with_capacity(ordered.len());
    for (dir, meta) in &ordered {
        let rows = read_index(dir, meta)?;
        check_part_rows(dir, meta, &rows)?;
        part_rows.push(rows);
    }
    claim_output(out, &whole, &first.options)?;
    let mut rows: Vec<IndexRow> = Vec::new();
    let mut errors: Vec<ErrorRow> = Vec::new();
    let mut totals = Totals::default();
    for ((dir, meta), part_rows) in ordered.iter().zip(part_rows) {
        for shard in 0..meta.totals.shards {
            let number = totals.shards + shard;
            let from = dir.join(shard_name(meta.kind, shard));
            let to = out.join(shard_name(meta.kind, number));
            place_shard(&from, &to, copy)?;
        }
        rows.extend(part_rows.into_iter().map(|mut r| {
            r.shard += totals.shards;
            r
        }));
        errors.extend(read_jsonl::<ErrorRow>(&dir.join("errors.jsonl"))?);
        totals.shards += meta.totals.shards;
        totals.items += meta.totals.items;
        totals.failed += meta.totals.failed;
        totals.seconds += meta.totals.seconds;
        totals.length += meta.totals.length;
        totals.bytes += meta.totals.bytes;
    }
    sync_dir(&out.join("shards"));
    if first.kind == StoreKind::Features {
        merge_stats(&ordered, out, totals.length)?;
    }
    write_atomic(&out.join("index.jsonl"), &to_jsonl(&rows)?)?;
    write_atomic(&out.join("errors.jsonl"), &to_jsonl(&errors)?)?;
    let mut meta = first.clone();
    meta.fingerprint = whole;
    meta.part = None;
    meta.totals = totals.clone();
    if meta.kind == StoreKind::Units {
        // the merged store's export, as one run would have written it
        super::units_export::write_km(out, &meta, &rows)?;
    }
    meta.save(out)?;
    remove_if_exists(&out.join(IN_PROGRESS))?;
    sync_dir(out);
    Ok(MergeReport {
        parts: ordered.len(),
        totals,
        already_complete: false,
    })
}

/// Every shard of a part against its rows: sizes, contiguity and each row's checksum.
fn check_part_rows(dir: &Path, meta: &StoreMeta, rows: &[IndexRow]) -> Result<(), StoreError> {
    let mut by_shard: Vec<Vec<IndexRow>> = vec![Vec::new(); meta.totals.shards as usize];
    for row in rows {
        by_shard[row.shard as usize].push(row.clone());
    }
    for (shard, shard_rows) in by_shard.iter().enumerate() {
        let length = shard_rows.iter().map(|r| r.length).sum();
        check_sealed_shard(
            dir,
            meta.kind,
            meta.dtype,
            &meta.layers,
            meta.dim,
            shard as u32,
            length,
            shard_rows,
        )
        .map_err(|e| {
            StoreError::refused(
                dir,
                format!("part is damaged ({e}); nothing was merged: redo this part"),
            )
        })?;
    }
    Ok(())
}

fn first_part(meta: &StoreMeta) -> &super::PartInfo {
    // check_part_set only returns part stores
    meta.part.as_ref().unwrap_or_else(|| unreachable!())
}

/// Opens every part and checks they are all N parts of one run, each complete; returns them in
/// part order. Writes nothing.
fn check_part_set(parts: &[PathBuf], out: &Path) -> Result<Vec<(PathBuf, StoreMeta)>, StoreError> {
    let mut metas: Vec<(PathBuf, StoreMeta)> = Vec::new();
    let inputs: Vec<&Path> = parts.iter().map(PathBuf::as_path).collect();
    super::refuse_overlapping_out(out, &inputs)?;
    for dir in parts {
        let meta = StoreMeta::load(dir).map_err(|e| match e {
            StoreError::Refused { path, reason } => StoreError::Refused {
                path,
                reason: format!("cannot merge this part: {reason}"),
            },
            other => other,
        })?;
        if meta.part.is_none() {
            return Err(StoreError::refused(
                dir,
                "is not a part store (it was not made with --part K/N)",
            ));
        }
        metas.push((dir.clone(), meta));
    }
    let Some((first_dir, first)) = metas.first().cloned() else {
        return Err(StoreError::Format("merge needs at least one part".into()));
    };
    let reference = first_part(&first).clone();
    for (dir, meta) in &metas[1..] {
        let part = first_part(meta);
        if meta.kind != first.kind
            || part.whole_fingerprint != reference.whole_fingerprint
            || part.n != reference.n
        {
            return Err(StoreError::refused(
                dir,
                format!(
                    "is part {}/{} of a different input or options than {} (part {}/{}): {}; \
                     it does not belong to this set",
                    part.k,
                    part.n,
                    first_dir.display(),
                    reference.k,
                    reference.n,
                    foreign_reason(&first, meta)
                ),
            ));
        }
    }
    metas.sort_by_key(|(_, m)| first_part(m).k);
    for pair in metas.windows(2) {
        if first_part(&pair[0].1).k == first_part(&pair[1].1).k {
            return Err(StoreError::refused(
                &pair[1].0,
                format!(
                    "is part {}/{} again ({} is that part too)",
                    first_part(&pair[1].1).k,
                    reference.n,
                    pair[0].0.display()
                ),
            ));
        }
    }
    let have: Vec<usize> = metas.iter().map(|(_, m)| first_part(m).k).collect();
    let missing: Vec<String> = (1..=reference.n)
        .filter(|k| !have.contains(k))
        .map(|k| format!("{k}/{}", reference.n))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::refused(
            out,
            format!(
                "cannot merge: part {} missing (given: {}); run the missing part (Slurm: sbatch --array=K ...) and merge again",
                missing.join(", "),
                metas
                    .iter()
                    .map(|(d, m)| format!("{} = {}/{}", d.display(), first_part(m).k, reference.n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let mut next = 0;
    for (dir, meta) in &metas {
        let part = first_part(meta);
        if part.first_input != next || part.inputs != reference.inputs {
            return Err(StoreError::corrupt(
                dir,
                format!(
                    "part {}/{} covers inputs {}..{} of {}, expected to start at {next} of {}",
                    part.k, part.n, part.first_input, part.end_input, part.inputs, reference.inputs
                ),
            ));
        }
        next = part.end_input;
    }
    if next != reference.inputs {
        return Err(StoreError::corrupt(
            &metas[metas.len() - 1].0,
            format!("the parts end at input {next} of {}", reference.inputs),
        ));
    }
    Ok(metas)
}

/// Why two parts do not belong together, in the user's terms.
fn foreign_reason(a: &StoreMeta, b: &StoreMeta) -> String {
    if a.kind != b.kind {
        return format!("{:?} store vs {:?} store", a.kind, b.kind);
    }
    let (pa, pb) = (first_part(a), first_part(b));
    if pa.n != pb.n {
        return format!("split into {} parts vs {}", pa.n, pb.n);
    }
    if a.options != b.options {
        let (Some(x), Some(y)) = (a.options.as_object(), b.options.as_object()) else {
            return "different options".into();
        };
        let keys: Vec<&String> = x
            .keys()
            .chain(y.keys())
            .filter(|k| x.get(*k) != y.get(*k))
            .collect();
        if let Some(k) = keys.first() {
            return format!("option {k} differs");
        }
    }
    "same options, different inputs or model".into()
}

/// Makes `out` ready for a merge: empty, or the leftovers of a killed merge of the same set.
fn claim_output(out: &Path, whole: &str, options: &serde_json::Value) -> Result<(), StoreError> {
    let marker = out.join(IN_PROGRESS);
    let entries: Vec<_> = std::fs::read_dir(out)
        .map_err(|e| StoreError::io(out, e))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != LOCK_FILE)
        .collect();
    if !entries.is_empty() {
        let ours = crate::regular_file::read_regular_to_string(&marker)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["fingerprint"] == whole);
        if !ours {
            return Err(StoreError::refused(
                out,
                "exists, is not empty and is not an unfinished merge of these parts; choose a new or empty directory",
            ));
        }
        // only what a merge writes: anything else in the directory is the user's
        for entry in entries {
            if is_store_entry(&entry.file_name().to_string_lossy()) {
                remove_path(&entry.path())?;
            }
        }
    }
    let shards = out.join("shards");
    std::fs::create_dir_all(&shards).map_err(|e| StoreError::io(&shards, e))?;
    let text =
        serde_json::to_vec_pretty(&serde_json::json!({"fingerprint": whole, "options": options}))
            .map_err(|e| StoreError::Format(e.to_string()))?;
    write_atomic(&marker, &text)
}

/// Hard-links (or copies) one shard: an audio `.npy`, or a feature shard directory's files.
fn place_shard(from: &Path, to: &Path, copy: bool) -> Result<(), StoreError> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| StoreError::io(to, e))?;
        let entries = std::fs::read_dir(from).map_err(|e| StoreError::io(from, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(from, e))?;
            place_file(&entry.path(), &to.join(entry.file_name()), copy)?;
        }
        Ok(())
    } else {
        place_file(from, to, copy)
    }
}

fn place_file(from: &Path, to: &Path, copy: bool) -> Result<(), StoreError> {
    if copy {
        std::fs::copy(from, to).map_err(|e| StoreError::io(to, e))?;
        return Ok(());
    }
    std::fs::hard_link(from, to).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            StoreError::refused(
                to,
                format!(
                    "cannot hard-link {} here: the part is on another file system; merge with --copy",
                    from.display()
                ),
            )
        } else {
            StoreError::io(to, e)
        }
    })
}

/// `stats/` of the merged store from the parts' sums over `frames` frames in all.
fn merge_stats(parts: &[(PathBuf, StoreMeta)], out: &Path, frames: u64) -> Result<(), StoreError> {
    let stats_dir = out.join("stats");
    std::fs::create_dir_all(&stats_dir).map_err(|e| StoreError::io(&stats_dir, e))?;
    let layers = parts[0].1.layers.clone();
    let dim = parts[0].1.dim.unwrap_or(0);
    for layer in layers {
        let mut sum = vec![0.0f64; dim];
        let mut sumsq = vec![0.0f64; dim];
        for (dir, meta) in parts {
            if meta.totals.length == 0 {
                continue;
            }
            let path = dir.join("stats").join(sums_file(layer));
            let sums = MappedNpy::open(&path, "<f8")?;
            let values: &[f64] = sums.as_slice()?;
            if values.len() != 2 * dim {
                return Err(StoreError::corrupt(
                    &path,
                    format!("{} values, expected 2 x {dim}", values.len()),
                ));
            }
            sum.iter_mut()
                .zip(&values[..dim])
                .for_each(|(a, b)| *a += b);
            sumsq
                .iter_mut()
                .zip(&values[dim..])
                .for_each(|(a, b)| *a += b);
        }
        write_stats_files(&stats_dir, layer, &sum, &sumsq, frames)?;
    }
    Ok(())
}
