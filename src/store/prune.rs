//! Dropping layers from a feature store in place (`speechcache prune`).
use super::npy::MappedNpy;
use super::reader::row_checksum;
use super::writer::{fingerprint_of, remove_if_exists};
use super::{
    layer_file, read_index, scale_file, shard_name, sums_file, to_jsonl, write_atomic, Dtype,
    IndexRow, StoreError, StoreKind, StoreLock, StoreMeta, WriterSpec,
};
use std::path::Path;

/// What `prune_layers` removed.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    pub removed: Vec<usize>,
    pub freed_bytes: u64,
}

/// Keeps only `keep` (hidden-state numbers present in the store): recomputes the row checksums
/// over the kept layers, rewrites index and meta atomically, then deletes the dropped files.
pub fn prune_layers(dir: &Path, keep: &[usize]) -> Result<PruneReport, StoreError> {
    StoreMeta::load(dir)?;
    // No reader lock needed: prune only unlinks the dropped layers' files (a reader's
    // mappings stay valid) and replaces index.jsonl and meta.json by rename.
    let _lock = StoreLock::acquire(dir, "prune")?;
    let mut meta = StoreMeta::read(dir)?;
    if let Some(part) = &meta.part {
        return Err(StoreError::refused(
            dir,
            format!(
                "is part {}/{} of a partitioned run: merge the parts first, then prune",
                part.k, part.n
            ),
        ));
    }
    if meta.kind != StoreKind::Features {
        return Err(StoreError::refused(
            dir,
            "prune works on feature stores only",
        ));
    }
    if keep.is_empty() {
        return Err(StoreError::refused(
            dir,
            "keeping no layers would empty the store",
        ));
    }
    if let Some(missing) = keep.iter().find(|l| !meta.layers.contains(l)) {
        return Err(StoreError::refused(
            dir,
            format!(
                "layer {missing} is not in this store (it has {:?})",
                meta.layers
            ),
        ));
    }
    let kept: Vec<usize> = meta
        .layers
        .iter()
        .copied()
        .filter(|l| keep.contains(l))
        .collect();
    let removed: Vec<usize> = meta
        .layers
        .iter()
        .copied()
        .filter(|l| !keep.contains(l))
        .collect();
    if removed.is_empty() {
        return Ok(PruneReport::default());
    }
    let mut rows: Vec<IndexRow> = read_index(dir, &meta)?;
    let dim = meta.dim.unwrap_or(0);
    for shard in 0..meta.totals.shards {
        let base = dir.join(shard_name(StoreKind::Features, shard));
        let mut files = Vec::new();
        for &layer in &meta.layers {
            let values = MappedNpy::open(&base.join(layer_file(layer)), meta.dtype.npy_descr())?;
            let scales = if meta.dtype == Dtype::Int8 {
                Some(MappedNpy::open(&base.join(scale_file(layer)), "<f4")?)
            } else {
                None
            };
            files.push((values, scales));
        }
        let all: Vec<(&MappedNpy, Option<&MappedNpy>)> =
            files.iter().map(|(v, s)| (v, s.as_ref())).collect();
        let kept_files: Vec<(&MappedNpy, Option<&MappedNpy>)> = meta
            .layers
            .iter()
            .zip(&all)
            .filter(|(l, _)| kept.contains(l))
            .map(|(_, f)| *f)
            .collect();
        for (line, row) in rows
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.shard == shard)
        {
            // a damaged row must not be re-checksummed into one that passes `verify`
            let stored = row_checksum(StoreKind::Features, meta.dtype, dim, &all, row)?;
            if stored != row.checksum {
                return Err(StoreError::corrupt(
                    &base,
                    format!(
                        "index line {}: {} fails its checksum (stored {}, found {stored}); \
                         prune changed nothing: re-extract the store",
                        line + 1,
                        row.id,
                        row.checksum
                    ),
                ));
            }
            row.checksum = row_checksum(StoreKind::Features, meta.dtype, dim, &kept_files, row)?;
        }
    }
    let per_layer = meta.totals.bytes / meta.layers.len().max(1) as u64;
    let freed = per_layer * removed.len() as u64;
    meta.layers = kept.clone();
    if let Some(obj) = meta.options.as_object_mut() {
        obj.insert("layers".into(), serde_json::json!(kept));
    }
    meta.totals.bytes -= freed;
    meta.fingerprint = fingerprint_of(&WriterSpec {
        kind: meta.kind,
        dtype: meta.dtype,
        sample_rate: meta.sample_rate,
        frame_rate: meta.frame_rate,
        dim: meta.dim,
        layers: meta.layers.clone(),
        options: meta.options.clone(),
        source: meta.source.clone(),
        extra: serde_json::Value::Null,
        shard_bytes: 0,
        overwrite: false,
    });
    write_atomic(&dir.join("index.jsonl"), &to_jsonl(&rows)?)?;
    meta.save(dir)?;
    for shard in 0..meta.totals.shards {
        let base = dir.join(shard_name(StoreKind::Features, shard));
        for &layer in &removed {
            remove_if_exists(&base.join(layer_file(layer)))?;
            remove_if_exists(&base.join(scale_file(layer)))?;
        }
    }
    for &layer in &removed {
        remove_if_exists(&dir.join("stats").join(layer_file(layer)))?;
        remove_if_exists(&dir.join("stats").join(sums_file(layer)))?;
    }
    Ok(PruneReport {
        removed,
        freed_bytes: freed,
    })
}
