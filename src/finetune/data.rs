//! Training data: where feature batches come from, length-bucketed batches, normalisation,
//! and CTC targets.
//!
//! Everything here works from the store's index (lengths, transcripts) and its stats/; no
//! feature byte is read before a batch needs it, so launch cost does not grow with the data.
use crate::finetune::tokenizer::Tokenizer;
use crate::store::{FeatureStore, IndexRow};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Source { path: PathBuf, reason: String },
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Where feature batches come from: a feature store (cached), or an audio store run through
/// a frozen SSL model at every step (`onthefly`).
pub trait FeatureSource: Send + Sync {
    /// Store path, for messages.
    fn path(&self) -> &Path;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The store's index rows (ids, transcripts), in store order.
    fn rows(&self) -> &[IndexRow];
    fn id(&self, i: usize) -> &str {
        &self.rows()[i].id
    }
    fn text(&self, i: usize) -> Option<&str> {
        self.rows()[i].text.as_deref()
    }
    /// Feature frames of item `i` (from the index: no data is read).
    fn frames(&self, i: usize) -> usize;
    fn dim(&self) -> usize;
    /// Hidden-state numbers available (fbank: [0]).
    fn layers(&self) -> &[usize];
    fn frame_rate(&self) -> f64;
    /// Padded batch `[B, L, T, D]` (zeros past each length) and the lengths.
    fn batch(
        &self,
        items: &[usize],
        layers: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>), DataError>;
    /// Per-dimension (mean, variance) of one layer over the whole store.
    fn stats(&self, layer: usize) -> Result<(Vec<f64>, Vec<f64>), DataError>;
}

/// A feature store opened for training or decoding.
pub struct StoreSource {
    store: FeatureStore,
    path: PathBuf,
    /// Rows whose checksum has been verified (each is checked the first time it is read).
    checked: Vec<std::sync::atomic::AtomicBool>,
}

impl StoreSource {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let store = FeatureStore::open(path).map_err(|e| DataError::Source {
            path: path.to_path_buf(),
            reason: format!("cannot open feature store: {e}"),
        })?;
        let checked = (0..store.len())
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect();
        Ok(Self {
            store,
            path: path.to_path_buf(),
            checked,
        })
    }

    pub fn store(&self) -> &FeatureStore {
        &self.store
    }

    /// Verifies the checksum of every item of `items` not read before (in parallel): a damaged
    /// store stops training with the shard and row named, instead of training on garbage.
    fn check_first_reads(&self, items: &[usize]) -> Result<(), DataError> {
        use rayon::prelude::*;
        use std::sync::atomic::Ordering;
        let fresh: Vec<usize> = items
            .iter()
            .copied()
            .filter(|&i| {
                self.checked
                    .get(i)
                    .is_some_and(|c| !c.load(Ordering::Relaxed))
            })
            .collect();
        fresh.par_iter().try_for_each(|&i| {
            self.store
                .check_row(i)
                .map_err(|e| self.err(format!("cannot train on a damaged row: {e}")))?;
            self.checked[i].store(true, Ordering::Relaxed);
            Ok(())
        })
    }

    fn err(&self, reason: String) -> DataError {
        DataError::Source {
            path: self.path.clone(),
            reason,
        }
    }
}

impl FeatureSource for StoreSource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> usize {
        self.store.len()
    }
    fn rows(&self) -> &[IndexRow] {
        self.store.rows()
    }
    fn frames(&self, i: usize) -> usize {
        self.store.rows()[i].length as usize
    }
    fn dim(&self) -> usize {
        self.store.dim()
    }
    fn layers(&self) -> &[usize] {
        self.store.layers()
    }
    fn frame_rate(&self) -> f64 {
        self.store.frame_rate()
    }
    fn batch(
        &self,
        items: &[usize],
        layers: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>), DataError> {
        self.check_first_reads(items)?;
        self.store
            .batch(items, layers, device)
            .map_err(|e| self.err(format!("cannot read a batch: {e}")))
    }
    fn stats(&self, layer: usize) -> Result<(Vec<f64>, Vec<f64>), DataError> {
        self.store
            .stats(layer)
            .map_err(|e| self.err(format!("cannot read stats of layer {layer}: {e}")))
    }
}

/// Group `items` into batches of at most `batch_frames` padded frames (batch size times the
/// longest item), after sorting by length so that padding stays small. The grouping is fixed;
/// only the order of batches changes per epoch (seeded by `seed` and `epoch`), as in ESPnet's
/// sorted batch bins. An item longer than `batch_frames` forms a batch of its own.
pub fn make_batches(
    frames: &[usize],
    items: &[usize],
    batch_frames: usize,
    shuffle: Option<(u64, usize)>,
) -> Vec<Vec<usize>> {
    let mut sorted: Vec<usize> = items.to_vec();
    sorted.sort_by_key(|&i| (frames[i], i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in sorted {
        // ascending order: the new item is the longest of the batch
        if !cur.is_empty() && (cur.len() + 1) * frames[i].max(1) > batch_frames {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    if let Some((seed, epoch)) = shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, &[0xBA7C, epoch as u64]));
        batches.shuffle(&mut rng);
    }
    batches
}

/// Derive an independent RNG seed from a base seed and a path of numbers (splitmix64), so
/// every epoch/step gets its own stream and a resumed run redraws exactly the same numbers.
pub fn mix_seed(seed: u64, path: &[u64]) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in path {
        h = splitmix(h ^ splitmix(p.wrapping_add(0x632B_E59B_D9B4_E019)));
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Global statistics as saved in the experiment (`EXP/global_stats.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalStats {
    /// Hidden-state numbers, in the order of the batch's layer axis.
    pub layers: Vec<usize>,
    /// `[layer][dim]`
    pub mean: Vec<Vec<f64>>,
    pub var: Vec<Vec<f64>>,
}

impl GlobalStats {
    pub fn from_source(source: &dyn FeatureSource, layers: &[usize]) -> Result<Self, DataError> {
        let mut mean = Vec::with_capacity(layers.len());
        let mut var = Vec::with_capacity(layers.len());
        for &l in layers {
            let (m, v) = source.stats(l)?;
            if m.len() != source.dim() || v.len() != source.dim() {
                return Err(DataError::Source {
                    path: source.path().to_path_buf(),
                    reason: format!(
                        "stats of layer {l} have {} values, features have dim {}",
                        m.len(),
                        source.dim()
                    ),
                });
            }
            mean.push(m);
            var.push(v);
        }
        Ok(Self {
            layers: layers.to_vec(),
            mean,
            var,
        })
    }
}

impl GlobalStats {
    /// `(mean, std)` as `[L, D]` tensors for `AsrModel::set_global_stats`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let l = self.layers.len();
        let d = self.mean.first().map(|m| m.len()).unwrap_or(0);
        let mean: Vec<f32> = self.mean.iter().flatten().map(|&m| m as f32).collect();
        let std: Vec<f32> = self
            .var
            .iter()
            .flatten()
            .map(|&v| v.max(0.0).sqrt() as f32)
            .collect();
        Ok((
            Tensor::from_vec(mean, (l, d), device)?,
            Tensor::from_vec(std, (l, d), device)?,
        ))
    }
}

/// CTC targets of one split, indexed like the source; items without usable text are left out.
pub struct Targets {
    /// Usable items (have a transcript with at least one known token), in store order.
    pub items: Vec<usize>,
    /// Token ids per store item (empty for unusable items).
    pub tokens: Vec<Vec<u32>>,
    /// Characters not in the vocabulary (mapped to `<unk>`).
    pub unknown_chars: usize,
    pub no_text: usize,
    pub no_known_chars: usize,
    /// Shorter than the model's subsampling needs, or longer than `train.max_frames`.
    pub out_of_range: usize,
}

impl Targets {
    /// Encode every transcript; items shorter than `min_frames` (the model's subsampling
    /// minimum) or, when `max_frames > 0`, longer than `max_frames` are left out.
    pub fn encode(
        source: &dyn FeatureSource,
        tok: &Tokenizer,
        min_frames: usize,
        max_frames: usize,
    ) -> Result<Self, DataError> {
        let mut t = Targets {
            items: Vec::with_capacity(source.len()),
            tokens: Vec::with_capacity(source.len()),
            unknown_chars: 0,
            no_text: 0,
            no_known_chars: 0,
            out_of_range: 0,
        };
        for i in 0..source.len() {
            let Some(text) = source.text(i) else {
                t.no_text += 1;
                t.tokens.push(Vec::new());
                continue;
            };
            let (ids, unk) = encode_text(tok, text);
            t.unknown_chars += unk;
            let known = ids.iter().any(|&id| id != Tokenizer::UNK_ID);
            if !known {
                t.no_known_chars += 1;
                t.tokens.push(Vec::new());
                continue;
            }
            let n = source.frames(i);
            if n < min_frames || (max_frames > 0 && n > max_frames) {
                t.out_of_range += 1;
                t.tokens.push(Vec::new());
                continue;
            }
            t.items.push(i);
            t.tokens.push(ids);
        }
        if source.is_empty() {
            return Err(DataError::Source {
                path: source.path().to_path_buf(),
                reason: "the store has no utterances".into(),
            });
        }
        if t.no_text == source.len() {
            return Err(DataError::Source {
                path: source.path().to_path_buf(),
                reason: "no utterance has a transcript (index.jsonl `text`); \
                         prepare the corpus from a manifest with transcripts"
                    .into(),
            });
        }
        if t.items.is_empty() {
            return Err(DataError::Source {
                path: source.path().to_path_buf(),
                reason: format!(
                    "no usable utterance: {} without transcript, {} whose transcript has no \
                     character known to the tokenizer, {} too short for the subsampling or longer than train.max_frames",
                    t.no_text, t.no_known_chars, t.out_of_range
                ),
            });
        }
        Ok(t)
    }

    /// One line for the log: what was left out and why.
    pub fn summary(&self) -> String {
        format!(
            "{} usable; left out: {} without transcript, {} with no known character, {} too short/long; \
             {} unknown characters mapped to <unk>",
            self.items.len(),
            self.no_text,
            self.no_known_chars,
            self.out_of_range,
            self.unknown_chars
        )
    }
}

/// Token ids of `text` and the number of characters that became `<unk>`.
pub fn encode_text(tok: &Tokenizer, text: &str) -> (Vec<u32>, usize) {
    tok.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_cover_everything() {
        let frames: Vec<usize> = (0..50).map(|i| 10 + (i * 37) % 90).collect();
        let items: Vec<usize> = (0..50).collect();
        let batches = make_batches(&frames, &items, 400, Some((3, 1)));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, items);
        for b in &batches {
            let max = b.iter().map(|&i| frames[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * max <= 400);
        }
        let again = make_batches(&frames, &items, 400, Some((3, 1)));
        assert_eq!(batches, again);
        let other = make_batches(&frames, &items, 400, Some((3, 2)));
        assert_ne!(batches, other);
    }
}
