//! The on-disk store, one format for audio and features (see README "Store format").
//!
//! ```text
//! STORE/meta.json      what the store is (kind, dtype, rate, layers, options, source identity, totals)
//!       index.jsonl    one row per utterance, in input order (IndexRow)
//!       errors.jsonl   inputs that failed, with the path and the reason (ErrorRow)
//!       shards/NNNNN.npy                 audio: 1-D <f4, utterances concatenated
//!       shards/NNNNN/layer_LL.npy        features: [frames, dim] per layer (+ layer_LL.scale.npy for int8)
//!       stats/layer_LL.npy             features: <f8 [2, dim], per-dim mean and variance
//! ```
//! A shard is written under a temporary name, fsynced and renamed; its rows are committed
//! (a `.seal.json` beside it) only after that, so a reader never sees an unsealed shard and a
//! killed writer resumes after its last sealed shard.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod inspect;
mod lock;
pub mod mapped;
mod merge;
pub mod npy;
pub mod partition;
mod prune;
mod reader;
pub mod sigbus;
pub mod units_export;
mod writer;

pub use inspect::{run_info, run_verify, verify_store, InfoArgs, VerifyArgs, VerifyReport};
pub use lock::{
    host_name, refuse_if_being_written, DestroyLock, Holder, HolderLock, LockRefusal, ReadLock,
    StoreLock, LOCK_FILE,
};
pub use merge::{merge_parts, run_merge, MergeArgs, MergeReport};
pub use prune::{prune_layers, PruneReport};
pub use reader::{AudioStore, FeatureStore, FeatureView, FlatStore, FlatValue, UnitsStore};
pub use writer::{
    EncodedFeatures, FeatureEncoder, InputResult, ItemData, LayerEncoder, PartSlice, StoreWriter,
    WriterSpec,
};

/// Version of the layout described above; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    pub fn refused(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Refused {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Audio,
    Features,
    /// Discrete unit ids (int16), one per frame, made by `speechcache units`.
    Units,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Audio => "audio",
            StoreKind::Features => "feature",
            StoreKind::Units => "units",
        }
    }
}

/// How values are stored. bf16 is stored as `<u2` (numpy has no bfloat16): shift left 16 bits
/// into a float32 to read it; int8 stores `q` with one float32 scale per frame (value = q·scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Int8,
    /// Unit ids of a units store (not a feature dtype).
    #[value(skip)]
    Int16,
}

impl Dtype {
    /// The numpy `descr` of the stored values.
    pub fn npy_descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F16 => "<f2",
            Dtype::Bf16 => "<u2",
            Dtype::Int8 => "|i1",
            Dtype::Int16 => "<i2",
        }
    }
    pub fn bytes_per_value(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::Int16 => 2,
            Dtype::Int8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
            Dtype::Int16 => "int16",
        }
    }
}

/// One line of `index.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct IndexRow {
    pub id: String,
    /// Shard number: `shards/NNNNN.npy` (audio) or `shards/NNNNN/` (features).
    pub shard: u32,
    /// Samples (audio) or frames (features) into the shard.
    pub offset: u64,
    /// Samples or frames.
    pub length: u64,
    /// zlib CRC-32 (hex) of the item's stored bytes (features: every layer in order, then scales).
    pub checksum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    /// The original audio file.
    pub source: String,
    /// Seconds into `source` where the utterance starts.
    pub start: f64,
    /// Seconds of audio the item covers (after speed perturbation, as stored).
    pub duration: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_channels: Option<u16>,
    /// Set when a damaged file was kept with `--keep-damaged`: what was wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    /// Speed-perturbation factor of this copy (absent for the original).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<f64>,
}

/// One line of `errors.jsonl`: an input that produced nothing, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRow {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub reason: String,
}

/// Totals recorded in `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Totals {
    pub items: u64,
    pub failed: u64,
    /// Seconds of audio covered by the items.
    pub seconds: f64,
    /// Samples (audio) or frames (features) over all items.
    pub length: u64,
    /// Bytes of shard data (all layers for features).
    pub bytes: u64,
    pub shards: u32,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreMeta {
    pub kind: StoreKind,
    pub format_version: u32,
    /// The tool and version that wrote the store.
    pub tool: String,
    pub dtype: Dtype,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
    /// Hidden-state numbers stored (features; fbank is `[0]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// Options that define the content (not speed knobs such as --jobs).
    pub options: serde_json::Value,
    /// Identity of the input: manifest hash, source store fingerprint, model hash.
    pub source: serde_json::Value,
    /// sha256 over format version, kind, dtype, rates, layers, options and source.
    pub fingerprint: String,
    /// zlib CRC-32 over each item's bytes, in `index.jsonl`.
    pub checksum: String,
    pub totals: Totals,
    /// Free-form details (model description, rates seen, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Set on the store of one part of a partitioned run (`--part K/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartInfo>,
}

/// Which slice of the whole input a part store holds, and of which whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartInfo {
    /// 1-based part number.
    pub k: usize,
    pub n: usize,
    /// The fingerprint a single run over the whole input with the same options would have.
    pub whole_fingerprint: String,
    /// Inputs (prepare: source files; extract: audio store rows) `first_input..end_input` of
    /// the whole run's `inputs`.
    pub first_input: usize,
    pub end_input: usize,
    pub inputs: usize,
}

impl StoreMeta {
    /// Reads `DIR/meta.json`; a missing file means the store is not complete, a held writer
    /// lock that it is being written (both refused).
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        if !dir.is_dir() {
            return Err(StoreError::refused(dir, "no such store directory"));
        }
        lock::refuse_if_being_written(dir)?;
        Self::read(dir)
    }

    /// `load` without the writer-lock check, for the writer that holds the lock.
    pub(crate) fn read(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("meta.json");
        if !dir.is_dir() {
            return Err(StoreError::refused(dir, "no such store directory"));
        }
        if !path.exists() {
            let hint = if dir.join(writer::IN_PROGRESS).exists() {
                "the run that writes this store has not finished: rerun the same command to resume it"
            } else {
                "not a speechcache store (no meta.json)"
            };
            return Err(StoreError::refused(dir, hint));
        }
        let text = crate::regular_file::read_regular_to_string(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let meta: StoreMeta = serde_json::from_str(&text)
            .map_err(|e| StoreError::corrupt(&path, format!("invalid meta.json: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(StoreError::refused(
                dir,
                format!(
                    "store format version {} (this speechcache reads version {FORMAT_VERSION})",
                    meta.format_version
                ),
            ));
        }
        let dtype_fits = match meta.kind {
            StoreKind::Audio => meta.dtype == Dtype::F32,
            StoreKind::Units => meta.dtype == Dtype::Int16,
            StoreKind::Features => meta.dtype != Dtype::Int16,
        };
        if !dtype_fits {
            return Err(StoreError::corrupt(
                &path,
                format!(
                    "a {} store cannot hold {}",
                    meta.kind.name(),
                    meta.dtype.name()
                ),
            ));
        }
        Ok(meta)
    }

    /// Writes `DIR/meta.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), StoreError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| StoreError::Format(format!("cannot serialise meta.json: {e}")))?;
        write_atomic(&dir.join("meta.json"), format!("{text}\n").as_bytes())
    }

    /// Audio sample rate or feature frame rate (items per second of audio).
    pub fn rate(&self) -> f64 {
        match self.kind {
            StoreKind::Audio => self.sample_rate.unwrap_or(16000) as f64,
            StoreKind::Features | StoreKind::Units => self.frame_rate.unwrap_or(100.0),
        }
    }
}

/// Refuses an output directory that is, lies inside, or contains one of the input stores:
/// `--overwrite` (or a resume's cleanup) there would delete the input being read.
pub fn refuse_overlapping_out(out: &Path, inputs: &[&Path]) -> Result<(), StoreError> {
    let out_real = resolved(out);
    for input in inputs {
        let input_real = resolved(input);
        let why = if out_real == input_real {
            "is also an input store"
        } else if out_real.starts_with(&input_real) {
            "lies inside the input store"
        } else if input_real.starts_with(&out_real) {
            "contains the input store"
        } else {
            continue;
        };
        return Err(StoreError::refused(
            out,
            format!(
                "{why} {} (writing there could delete what is being read); choose another --out",
                input.display()
            ),
        ));
    }
    Ok(())
}

/// `path` made absolute with symlinks resolved as far as it exists (the rest appended).
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Reads a JSON-lines file into records, naming the file and line on error.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StoreError> {
    let text = match crate::regular_file::read_regular_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .map_err(|e| StoreError::corrupt(path, format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// Reads a complete store's `index.jsonl`: it must exist and hold exactly the rows `meta.json`
/// counts (a lost or cut index would otherwise read as a smaller store), each inside a shard
/// the store has.
pub fn read_index(dir: &Path, meta: &StoreMeta) -> Result<Vec<IndexRow>, StoreError> {
    let path = dir.join("index.jsonl");
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(StoreError::corrupt(&path, "is not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::corrupt(
                &path,
                format!(
                    "is missing, but meta.json counts {} utterances: the store is damaged \
                     (`speechcache verify` says more; rerun the stage with --overwrite)",
                    meta.totals.items
                ),
            ))
        }
        Err(e) => return Err(StoreError::io(&path, e)),
    }
    if u64::from(meta.totals.shards) > meta.totals.items {
        // every sealed shard holds at least one row
        return Err(StoreError::corrupt(
            &dir.join("meta.json"),
            format!(
                "counts {} shards for {} utterances: the store is damaged",
                meta.totals.shards, meta.totals.items
            ),
        ));
    }
    let rows: Vec<IndexRow> = read_jsonl(&path)?;
    if rows.len() as u64 != meta.totals.items {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "holds {} rows, but meta.json counts {} utterances: the store is damaged",
                rows.len(),
                meta.totals.items
            ),
        ));
    }
    if let Some((n, row)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.shard >= meta.totals.shards)
    {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "line {}: {} is in shard {}, but the store has {} shards",
                n + 1,
                row.id,
                row.shard,
                meta.totals.shards
            ),
        ));
    }
    Ok(rows)
}

/// Serialises records as JSON lines.
pub fn to_jsonl<T: Serialize>(rows: &[T]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(rows.len() * 160);
    for row in rows {
        serde_json::to_writer(&mut out, row)
            .map_err(|e| StoreError::Format(format!("cannot serialise row: {e}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes a file under a temporary name, fsyncs it and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::regular_file::write_atomic(path, bytes).map_err(|(at, e)| StoreError::io(&at, e))
}

/// `name.tmp` beside `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Hex zlib CRC-32 of bytes (what `zlib.crc32` in Python gives).
pub fn crc32_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// sha256 hex of any serialisable value's canonical JSON.
pub fn json_sha256(value: &serde_json::Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(value.to_string().as_bytes()))
}

/// `shards/NNNNN` (features) or `shards/NNNNN.npy` (audio), relative to the store.
pub fn shard_name(kind: StoreKind, shard: u32) -> String {
    match kind {
        StoreKind::Audio | StoreKind::Units => format!("shards/{shard:05}.npy"),
        StoreKind::Features => format!("shards/{shard:05}"),
    }
}

/// `layer_LL.npy` within a feature shard directory or `stats/`.
pub fn layer_file(layer: usize) -> String {
    format!("layer_{layer:02}.npy")
}

/// `layer_LL.sums.npy` within `stats/`: per-dim sums and sums of squares.
pub fn sums_file(layer: usize) -> String {
    format!("layer_{layer:02}.sums.npy")
}

/// `layer_LL.scale.npy` within a feature shard (int8 only).
pub fn scale_file(layer: usize) -> String {
    format!("layer_{layer:02}.scale.npy")
}
