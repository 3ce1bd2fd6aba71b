//! A units store's text export, fairseq's `dump_km_label` format: `UNITS/units.km` holds one
//! line per utterance in index order, its unit ids separated by spaces. With `dedup` (the
//! store's `options.dedup`), repeats are collapsed there and `UNITS/units.lengths` holds, line
//! for line, how many frames each kept unit stood for. Written atomically when a `units` run (or
//! a `merge` of units parts) finishes, before `meta.json`, so a complete store has its export.
use std::fmt::Write as _;
use std::path::Path;

use super::npy::MappedNpy;
use super::{shard_name, IndexRow, StoreError, StoreKind, StoreMeta};
use crate::regular_file::write_atomic;

pub const UNITS_KM: &str = "units.km";
pub const UNITS_LENGTHS: &str = "units.lengths";

/// Consecutive repeats collapsed: `(kept ids, run lengths)`.
pub fn dedup(units: &[i16]) -> (Vec<i16>, Vec<u32>) {
    let (mut ids, mut runs) = (Vec::new(), Vec::<u32>::new());
    for &u in units {
        match (ids.last(), runs.last_mut()) {
            (Some(&last), Some(run)) if last == u => *run += 1,
            _ => {
                ids.push(u);
                runs.push(1);
            }
        }
    }
    (ids, runs)
}

/// Writes `units.km` (and `units.lengths` when the store dedups) from the store's sealed
/// shards; `meta` and `rows` are the store's (about to be) committed ones.
pub fn write_km(dir: &Path, meta: &StoreMeta, rows: &[IndexRow]) -> Result<(), StoreError> {
    let dedup_runs = meta.options["dedup"].as_bool().unwrap_or(false);
    let shards = (0..meta.totals.shards)
        .map(|n| MappedNpy::open(&dir.join(shard_name(StoreKind::Units, n)), "<i2"))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut km, mut lengths) = (String::new(), String::new());
    for row in rows {
        let shard = shards.get(row.shard as usize).ok_or_else(|| {
            StoreError::Format(format!("{}: shard {} missing", row.id, row.shard))
        })?;
        let all = shard.as_slice::<i16>()?;
        let units = all
            .get(row.offset as usize..row.offset.saturating_add(row.length) as usize)
            .ok_or_else(|| {
                StoreError::corrupt(&shard.path, format!("{} is out of range", row.id))
            })?;
        let (ids, runs) = if dedup_runs {
            dedup(units)
        } else {
            (units.to_vec(), Vec::new())
        };
        join_line(&mut km, &ids);
        if dedup_runs {
            join_line(&mut lengths, &runs);
        }
    }
    write_atomic(&dir.join(UNITS_KM), km.as_bytes()).map_err(|(p, e)| StoreError::io(&p, e))?;
    if dedup_runs {
        write_atomic(&dir.join(UNITS_LENGTHS), lengths.as_bytes())
            .map_err(|(p, e)| StoreError::io(&p, e))?;
    }
    Ok(())
}

fn join_line<T: std::fmt::Display>(out: &mut String, values: &[T]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{v}");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_first_of_each_run_and_counts_it() {
        assert_eq!(
            dedup(&[3, 3, 5, 5, 5, 3, 7]),
            (vec![3, 5, 3, 7], vec![2, 3, 1, 1])
        );
        assert_eq!(dedup(&[]), (vec![], vec![]));
        let mut s = String::new();
        join_line(&mut s, &[1i16, 22, 3]);
        join_line::<i16>(&mut s, &[]);
        assert_eq!(s, "1 22 3\n\n");
    }
}
