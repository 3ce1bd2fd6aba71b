//! Stores made row for row from another store (`units`, `collapse`): one output item per
//! source row, computed in parallel rounds and written in store order, with `--part K/N`
//! (rows balanced by length) and resume exactly as the other stages.
use std::path::Path;

use anyhow::Context;
use rayon::prelude::*;

use super::partition::PartSpec;
use super::{
    ErrorRow, IndexRow, InputResult, ItemData, PartSlice, StoreMeta, StoreWriter, WriterSpec,
};

/// What a mapped run did: `None` when the store at `out` was already complete.
pub struct MappedRun {
    pub meta: StoreMeta,
    /// Source rows computed by this run (a resume skips the sealed ones).
    pub rows_done: usize,
}

/// Writes the store at `out` (`spec`) with one item per row of `rows`: `item(i)` is row `i`'s
/// data, or the reason it failed (an error row; the run goes on). `after_round` runs between
/// rounds of `round` rows (to release mapped pages, say).
#[allow(clippy::too_many_arguments)]
pub fn write_mapped(
    out: &Path,
    spec: WriterSpec,
    rows: &[IndexRow],
    part: Option<PartSpec>,
    jobs: Option<usize>,
    round: usize,
    item: impl Fn(usize) -> Result<ItemData, String> + Sync,
    after_round: impl Fn(),
) -> anyhow::Result<Option<MappedRun>> {
    let n = rows.len();
    let opened = match part {
        Some(part) => {
            let weights: Vec<f64> = rows.iter().map(|r| r.length as f64).collect();
            let owned = part.range_of(&weights);
            let slice = PartSlice::new(part, &owned, n);
            StoreWriter::create_or_resume_part(out, spec, slice).map(|w| (w, owned))
        }
        None => StoreWriter::create_or_resume(out, spec).map(|w| (w, 0..n)),
    };
    let (mut writer, owned) =
        opened.with_context(|| format!("cannot write the store at {}", out.display()))?;
    if writer.is_complete() {
        return Ok(None);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.unwrap_or(0))
        .build()
        .context("cannot start the thread pool")?;
    let todo: Vec<usize> = (owned.start + writer.next_input()..owned.end).collect();
    for chunk in todo.chunks(round.max(1)) {
        let results: Vec<InputResult> = pool.install(|| {
            chunk
                .par_iter()
                .map(|&i| {
                    let row = &rows[i];
                    match item(i) {
                        Ok(data) => {
                            let mut out = row.clone();
                            out.checksum = String::new();
                            InputResult {
                                items: vec![(out, data)],
                                errors: vec![],
                            }
                        }
                        Err(reason) => InputResult {
                            items: vec![],
                            errors: vec![ErrorRow {
                                path: row.source.clone(),
                                id: Some(row.id.clone()),
                                reason,
                            }],
                        },
                    }
                })
                .collect()
        });
        for (&i, result) in chunk.iter().zip(results) {
            writer
                .push_input(i - owned.start, result)
                .with_context(|| format!("cannot write the store at {}", out.display()))?;
        }
        after_round();
    }
    let meta = writer
        .finish()
        .with_context(|| format!("cannot finish the store at {}", out.display()))?;
    Ok(Some(MappedRun {
        meta,
        rows_done: todo.len(),
    }))
}
