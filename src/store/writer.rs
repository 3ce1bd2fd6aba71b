//! Writing a store with crash safety and resume (see the module docs in `store`).
use super::lock::{StoreLock, LOCK_FILE};
use super::npy::{header_bytes, HEADER_LEN};
use super::reader::check_sealed_shard;
use super::{
    json_sha256, layer_file, read_jsonl, scale_file, shard_name, sums_file, tmp_path, to_jsonl,
    write_atomic, Dtype, ErrorRow, IndexRow, PartInfo, StoreError, StoreKind, StoreMeta, Totals,
    FORMAT_VERSION,
};
use half::{bf16, f16};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Marks a store whose writer has not finished; holds the fingerprint it is being written with.
pub(crate) const IN_PROGRESS: &str = "in_progress.json";

/// What a writer produces; `options` and `source` define the content and are compared on resume.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    pub kind: StoreKind,
    pub dtype: Dtype,
    pub sample_rate: Option<u32>,
    pub frame_rate: Option<f64>,
    pub dim: Option<usize>,
    pub layers: Vec<usize>,
    pub options: serde_json::Value,
    pub source: serde_json::Value,
    pub extra: serde_json::Value,
    /// A shard is sealed before it would grow past this many bytes (one input never splits).
    pub shard_bytes: u64,
    /// Replace a store made with other options instead of refusing.
    pub overwrite: bool,
}

/// One item's samples (audio) or its layers, each `[frames, dim]` (features).
#[derive(Debug, Clone)]
pub enum ItemData {
    Audio(Vec<f32>),
    Features(Vec<Array2<f32>>),
    /// Unit ids, one per frame (units stores).
    Units(Vec<i16>),
    /// Features already encoded by [`FeatureEncoder`] on the thread that computed them.
    Encoded(EncodedFeatures),
}

impl ItemData {
    /// Bytes the item holds in memory (for bounding what waits to be written).
    pub fn memory_bytes(&self) -> u64 {
        match self {
            ItemData::Audio(s) => (s.len() * 4) as u64,
            ItemData::Units(u) => (u.len() * 2) as u64,
            ItemData::Features(layers) => layers.iter().map(|l| (l.len() * 4) as u64).sum(),
            ItemData::Encoded(e) => e.files.iter().map(|f| f.len() as u64).sum(),
        }
    }
}

/// Encodes an item's layers as a feature store stores them (dtype, int8 scales, checksum,
/// per-dim sums), on any thread: extract's compute threads do this work in parallel, so the
/// writer thread only appends bytes and the run does not end waiting for it.
#[derive(Debug, Clone, Copy)]
pub struct FeatureEncoder {
    dtype: Dtype,
    dim: usize,
    layers: usize,
}

/// One item's encoded layers (see [`FeatureEncoder`]).
#[derive(Debug, Clone)]
pub struct EncodedFeatures {
    frames: usize,
    dim: usize,
    /// Per store file of the item (a layer's values, then its int8 scales), in file order.
    files: Vec<Vec<u8>>,
    sums: Vec<(Vec<f64>, Vec<f64>)>,
    checksum: String,
}

impl FeatureEncoder {
    /// Encodes `layers` layers of `dim` values a frame as `dtype`.
    pub fn new(dtype: Dtype, dim: usize, layers: usize) -> Self {
        Self { dtype, dim, layers }
    }

    /// `layers[l]` holds `frames × dim` values, row-major.
    pub fn encode(&self, layers: &[&[f32]], frames: usize) -> Result<ItemData, StoreError> {
        let mut item = self.begin();
        for values in layers {
            item.push(values);
        }
        item.finish(frames)
    }

    /// Bytes an encoded value takes in memory (int8's per-frame scales not counted).
    pub fn bytes_per_value(&self) -> usize {
        match self.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::Int16 => 2,
            Dtype::Int8 => 1,
        }
    }

    /// Encodes an item as its layers are computed, a layer or a block of a layer's frames
    /// at a time, so an item's f32 layers never all exist at once (`push_rows`, then
    /// `finish`).
    pub fn begin(&self) -> LayerEncoder {
        LayerEncoder {
            encoder: *self,
            layers: (0..self.layers).map(|_| EncodedLayer::default()).collect(),
            error: None,
        }
    }
}

/// One layer of an item being encoded: its values' bytes, int8 scales, per-dim sums.
#[derive(Default)]
struct EncodedLayer {
    bytes: Vec<u8>,
    scales: Vec<u8>,
    sums: Option<(Vec<f64>, Vec<f64>)>,
    values: usize,
}

/// One item's layers being encoded (see [`FeatureEncoder::begin`]).
pub struct LayerEncoder {
    encoder: FeatureEncoder,
    layers: Vec<EncodedLayer>,
    error: Option<String>,
}

impl LayerEncoder {
    /// Appends `values` (whole `dim`-wide frames, row-major) to layer `layer`.
    pub fn push_rows(&mut self, layer: usize, values: &[f32]) {
        let (dtype, dim) = (self.encoder.dtype, self.encoder.dim);
        let Some(dst) = self.layers.get_mut(layer) else {
            self.error = Some(format!(
                "layer {layer} of an item with {} layers",
                self.layers.len()
            ));
            return;
        };
        if values.len() % dim.max(1) != 0 {
            self.error = Some(format!(
                "{} values are not whole frames of {dim}",
                values.len()
            ));
            return;
        }
        let sums = dst
            .sums
            .get_or_insert_with(|| (vec![0f64; dim], vec![0f64; dim]));
        accumulate_sums(sums, values, dim);
        let mut bytes = Vec::new();
        encode_values(dtype, values, dim, &mut bytes);
        if dst.bytes.is_empty() {
            dst.bytes = bytes;
        } else {
            dst.bytes.extend_from_slice(&bytes);
        }
        if dtype == Dtype::Int8 {
            let scales = frame_scales(values, dim);
            dst.scales.extend_from_slice(bytemuck::cast_slice(&scales));
        }
        dst.values += values.len();
    }

    /// Encodes the next whole layer.
    pub fn push(&mut self, values: &[f32]) {
        let next = self
            .layers
            .iter()
            .position(|l| l.values == 0)
            .unwrap_or(self.layers.len());
        self.push_rows(next, values);
    }

    /// The item, once every layer holds `frames × dim` values.
    pub fn finish(self, frames: usize) -> Result<ItemData, StoreError> {
        let dim = self.encoder.dim;
        let lengths: Vec<usize> = self.layers.iter().map(|l| l.values).collect();
        if let Some(e) = self.error {
            return Err(StoreError::Format(e));
        }
        if lengths.iter().any(|&n| n != frames * dim) {
            return Err(StoreError::Format(format!(
                "{} layers of {lengths:?} values, expected {} of {frames} × {dim}",
                lengths.len(),
                self.encoder.layers,
            )));
        }
        let int8 = self.encoder.dtype == Dtype::Int8;
        let mut crc = crc32fast::Hasher::new();
        let mut files = Vec::with_capacity(self.layers.len() * 2);
        let mut sums = Vec::with_capacity(self.layers.len());
        for layer in self.layers {
            sums.push(
                layer
                    .sums
                    .unwrap_or_else(|| (vec![0f64; dim], vec![0f64; dim])),
            );
            crc.update(&layer.bytes);
            files.push(layer.bytes);
            if int8 {
                crc.update(&layer.scales);
                files.push(layer.scales);
            }
        }
        Ok(ItemData::Encoded(EncodedFeatures {
            frames,
            dim,
            files,
            sums,
            checksum: crc32_hex_from(crc),
        }))
    }
}

/// What one input (a file, a recording with segments, an utterance) produced.
#[derive(Debug, Clone, Default)]
pub struct InputResult {
    /// Rows with id and metadata set; the writer fills shard, offset, length and checksum.
    pub items: Vec<(IndexRow, ItemData)>,
    /// Why this input (or some of its items) produced nothing.
    pub errors: Vec<ErrorRow>,
}

/// A sealed shard's committed rows, written after the shard itself is in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealRecord {
    shard: u32,
    /// Inputs before this index are fully covered by this and earlier shards.
    next_input: usize,
    length: u64,
    bytes: u64,
    rows: Vec<IndexRow>,
    errors: Vec<ErrorRow>,
    /// Features: per layer, per-dim sums and sums of squares over this shard's frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sums: Vec<(Vec<f64>, Vec<f64>)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct InProgress {
    fingerprint: String,
    options: serde_json::Value,
}

/// One `.npy` file being streamed; its header is patched with the final shape at seal time.
struct StreamedNpy {
    file: BufWriter<File>,
    path: PathBuf,
    descr: &'static str,
    row_len: Option<usize>,
    count: u64,
}

impl StreamedNpy {
    fn create(
        path: PathBuf,
        descr: &'static str,
        row_len: Option<usize>,
    ) -> Result<Self, StoreError> {
        let file =
            crate::regular_file::create_exclusive(&path).map_err(|e| StoreError::io(&path, e))?;
        let mut file = BufWriter::with_capacity(4 << 20, file);
        file.write_all(&[b' '; HEADER_LEN])
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(Self {
            file,
            path,
            descr,
            row_len,
            count: 0,
        })
    }

    /// Starts writing this file's dirty pages to disk without waiting (Linux
    /// `sync_file_range`), so the fsync at seal time finds most of them already written
    /// instead of flushing a whole shard at the end of a run. Best effort.
    fn start_writeback(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open descriptor; it only schedules writeback.
            unsafe {
                libc::sync_file_range(
                    self.file.get_ref().as_raw_fd(),
                    0,
                    0,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
    }

    fn append(&mut self, bytes: &[u8], rows: u64) -> Result<(), StoreError> {
        self.file
            .write_all(bytes)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.count += rows;
        Ok(())
    }

    /// Writes the real header, flushes and fsyncs.
    fn seal(mut self) -> Result<(), StoreError> {
        let shape: Vec<u64> = match self.row_len {
            Some(d) => vec![self.count, d as u64],
            None => vec![self.count],
        };
        let header = header_bytes(self.descr, &shape)?;
        let path = self.path.clone();
        let io = |e| StoreError::io(&path, e);
        self.file.flush().map_err(io)?;
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| StoreError::io(&path, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(())
    }
}

/// The shard being filled.
struct OpenShard {
    number: u32,
    files: Vec<StreamedNpy>,
    length: u64,
    bytes: u64,
    rows: Vec<IndexRow>,
    sums: Vec<(Vec<f64>, Vec<f64>)>,
}

/// Writes a store in input order; resumable after a kill at any point. Holds the store's
/// writer lock from open to finish.
pub struct StoreWriter {
    dir: PathBuf,
    spec: WriterSpec,
    fingerprint: String,
    /// Set when this store is one part of a partitioned run (`--part K/N`).
    part: Option<PartInfo>,
    /// Held until `finish`; released at once when the store is found complete (nothing to write).
    lock: Option<StoreLock>,
    complete: Option<StoreMeta>,
    sealed: Vec<SealRecord>,
    next_input: usize,
    current: Option<OpenShard>,
    /// Errors of inputs since the last seal.
    pending_errors: Vec<ErrorRow>,
    scratch: Vec<u8>,
}

impl StoreWriter {
    /// Opens `dir` for writing: a new store, a resume of an interrupted run with the same
    /// fingerprint, or a finished store (then `is_complete()` and nothing is written).
    pub fn create_or_resume(dir: &Path, spec: WriterSpec) -> Result<Self, StoreError> {
        Self::open(dir, spec, None)
    }

    /// Like `create_or_resume`, for the store of one part of the whole input that `spec`
    /// describes (`part.first_input..part.end_input` of its inputs; pushed as inputs 0, 1, ...).
    pub fn create_or_resume_part(
        dir: &Path,
        spec: WriterSpec,
        part: PartSlice,
    ) -> Result<Self, StoreError> {
        Self::open(dir, spec, Some(part))
    }

    fn open(dir: &Path, spec: WriterSpec, part: Option<PartSlice>) -> Result<Self, StoreError> {
        if spec.kind == StoreKind::Features && spec.dim.is_none() {
            return Err(StoreError::Format("a feature store needs its dim".into()));
        }
        let command = match spec.kind {
            StoreKind::Audio => "prepare",
            StoreKind::Features => "extract",
            StoreKind::Units => "units",
        };
        let dtype_fits = match spec.kind {
            StoreKind::Audio => spec.dtype == Dtype::F32,
            StoreKind::Units => spec.dtype == Dtype::Int16,
            StoreKind::Features => spec.dtype != Dtype::Int16,
        };
        if !dtype_fits {
            return Err(StoreError::Format(format!(
                "a {} store cannot hold {}",
                spec.kind.name(),
                spec.dtype.name()
            )));
        }
        let lock = StoreLock::acquire(dir, command)?;
        let whole = fingerprint_of(&spec);
        let part = part.map(|p| PartInfo {
            k: p.k,
            n: p.n,
            whole_fingerprint: whole.clone(),
            first_input: p.first_input,
            end_input: p.end_input,
            inputs: p.inputs,
        });
        let fingerprint = match &part {
            Some(p) => json_sha256(&serde_json::json!({"whole": whole, "part": p})),
            None => whole,
        };
        let mut writer = StoreWriter {
            dir: dir.to_path_buf(),
            spec,
            fingerprint,
            part,
            lock: Some(lock),
            complete: None,
            sealed: Vec::new(),
            next_input: 0,
            current: None,
            pending_errors: Vec::new(),
            scratch: Vec::new(),
        };
        writer.claim_directory()?;
        if writer.complete.is_none() {
            writer.load_sealed()?;
        } else {
            writer.lock = None;
        }
        Ok(writer)
    }

    /// The finished store's meta when a previous run with the same fingerprint completed.
    pub fn completed_meta(&self) -> Option<&StoreMeta> {
        self.complete.as_ref()
    }

    pub fn is_complete(&self) -> bool {
        self.complete.is_some()
    }

    /// The first input not covered by sealed shards (where a resumed run starts).
    pub fn next_input(&self) -> usize {
        self.next_input
    }

    /// Items already committed by an earlier, interrupted run.
    pub fn resumed_items(&self) -> usize {
        self.sealed.iter().map(|s| s.rows.len()).sum()
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Appends input `index` (which must be `next_input()`).
    pub fn push_input(&mut self, index: usize, result: InputResult) -> Result<(), StoreError> {
        if self.complete.is_some() {
            return Err(StoreError::refused(&self.dir, "store is already complete"));
        }
        if index != self.next_input {
            return Err(StoreError::Format(format!(
                "inputs must be pushed in order: got {index}, expected {}",
                self.next_input
            )));
        }
        let incoming: u64 = result.items.iter().map(|(_, d)| self.item_bytes(d)).sum();
        let full = self
            .current
            .as_ref()
            .is_some_and(|s| !s.rows.is_empty() && s.bytes + incoming > self.spec.shard_bytes);
        if full {
            self.seal_current(index)?;
        }
        for (row, data) in result.items {
            self.append_item(row, data)?;
        }
        self.pending_errors.extend(result.errors);
        self.next_input = index + 1;
        if let Some(shard) = &self.current {
            shard.files.iter().for_each(StreamedNpy::start_writeback);
        }
        Ok(())
    }

    /// Seals the last shard and writes `index.jsonl`, `errors.jsonl`, `stats/` and `meta.json`.
    pub fn finish(mut self) -> Result<StoreMeta, StoreError> {
        if let Some(meta) = self.complete.take() {
            return Ok(meta);
        }
        if self.current.as_ref().is_some_and(|s| !s.rows.is_empty()) {
            self.seal_current(self.next_input)?;
        }
        self.discard_current()?;
        let mut rows: Vec<IndexRow> = Vec::new();
        let mut errors: Vec<ErrorRow> = Vec::new();
        let mut totals = Totals::default();
        for seal in &self.sealed {
            totals.length += seal.length;
            totals.bytes += seal.bytes;
            totals.seconds += seal.rows.iter().map(|r| r.duration).sum::<f64>();
            rows.extend(seal.rows.iter().cloned());
            errors.extend(seal.errors.iter().cloned());
        }
        errors.append(&mut self.pending_errors);
        totals.items = rows.len() as u64;
        totals.failed = errors.len() as u64;
        totals.shards = self.sealed.len() as u32;
        if self.spec.kind == StoreKind::Features {
            self.write_stats(totals.length)?;
        }
        write_atomic(&self.dir.join("index.jsonl"), &to_jsonl(&rows)?)?;
        write_atomic(&self.dir.join("errors.jsonl"), &to_jsonl(&errors)?)?;
        let meta = StoreMeta {
            kind: self.spec.kind,
            format_version: FORMAT_VERSION,
            tool: format!("speechcache {}", env!("CARGO_PKG_VERSION")),
            dtype: self.spec.dtype,
            sample_rate: self.spec.sample_rate,
            frame_rate: self.spec.frame_rate,
            dim: self.spec.dim,
            layers: self.spec.layers.clone(),
            options: self.spec.options.clone(),
            source: self.spec.source.clone(),
            fingerprint: self.fingerprint.clone(),
            checksum: "crc32".into(),
            totals,
            extra: self.spec.extra.clone(),
            part: self.part.clone(),
        };
        if meta.kind == StoreKind::Units {
            super::units_export::write_km(&self.dir, &meta, &rows)?;
        }
        meta.save(&self.dir)?;
        for seal in &self.sealed {
            remove_if_exists(&self.seal_path(seal.shard))?;
        }
        remove_if_exists(&self.dir.join(IN_PROGRESS))?;
        sync_dir(&self.dir);
        Ok(meta)
    }

    fn claim_directory(&mut self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::refused(&dir, "exists and is not a directory"));
        }
        let has_store = dir.join("meta.json").exists() || dir.join(IN_PROGRESS).exists();
        if self.spec.overwrite && has_store {
            // --overwrite always redoes the work: a store "complete" with the same options may
            // hold audio of files replaced since, and a damaged meta.json must not block it.
            clear_store_dir(&dir)?;
        } else if dir.join("meta.json").exists() {
            let meta = StoreMeta::read(&dir).map_err(with_overwrite_hint)?;
            if meta.fingerprint == self.fingerprint {
                self.complete = Some(meta);
                return Ok(());
            }
            self.refuse_or_clear(&with_part(&meta.options, meta.part.as_ref()))?;
        } else if dir.join(IN_PROGRESS).exists() {
            let path = dir.join(IN_PROGRESS);
            let text = crate::regular_file::read_regular_to_string(&path)
                .map_err(|e| StoreError::io(&path, e))?;
            let progress: InProgress = serde_json::from_str(&text)
                .map_err(|e| with_overwrite_hint(StoreError::corrupt(&path, e.to_string())))?;
            if progress.fingerprint != self.fingerprint {
                self.refuse_or_clear(&progress.options)?;
            }
        } else if dir.is_dir() {
            let mut entries = std::fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
            if entries.any(|e| e.map_or(true, |e| !left_by_a_killed_claim(&e))) {
                return Err(StoreError::refused(
                    &dir,
                    "exists, is not empty and is not a speechcache store; choose a new or empty directory",
                ));
            }
        }
        // `in_progress.json` first: from then on a killed run leaves a store that resumes.
        let progress = InProgress {
            fingerprint: self.fingerprint.clone(),
            options: with_part(&self.spec.options, self.part.as_ref()),
        };
        let text =
            serde_json::to_vec_pretty(&progress).map_err(|e| StoreError::Format(e.to_string()))?;
        write_atomic(&dir.join(IN_PROGRESS), &text)?;
        let shards = dir.join("shards");
        std::fs::create_dir_all(&shards).map_err(|e| StoreError::io(&shards, e))
    }

    fn refuse_or_clear(&self, stored_options: &serde_json::Value) -> Result<(), StoreError> {
        if !self.spec.overwrite {
            let now = with_part(&self.spec.options, self.part.as_ref());
            let what = describe_difference(stored_options, &now);
            return Err(StoreError::refused(
                &self.dir,
                format!(
                    "this store was made with different options or inputs ({what}); \
                     use a new --out directory, or --overwrite to replace it"
                ),
            ));
        }
        clear_store_dir(&self.dir)
    }

    /// Finds the contiguous run of sealed shards, verifies them, and removes what is unsealed
    /// or proven damaged (a checksum or size mismatch, a missing file) — never what merely
    /// could not be read this time: that error ends the run with the store untouched.
    fn load_sealed(&mut self) -> Result<(), StoreError> {
        let shards_dir = self.dir.join("shards");
        refuse_unless_real_dir(&shards_dir)?;
        let mut number = 0u32;
        loop {
            let seal_path = self.seal_path(number);
            if !seal_path.exists() {
                break;
            }
            let mut records: Vec<SealRecord> = match read_jsonl(&seal_path) {
                Ok(records) => records,
                Err(StoreError::Corrupt { .. }) => break,
                Err(e) => return Err(e),
            };
            let Some(seal) = records.pop() else { break };
            let verified = check_sealed_shard(
                &self.dir,
                self.spec.kind,
                self.spec.dtype,
                &self.spec.layers,
                self.spec.dim,
                seal.shard,
                seal.length,
                &seal.rows,
            );
            match verified {
                Ok(()) => {}
                // A damaged sealed shard and everything after it is redone.
                Err(e) if proves_damage(&e) => break,
                Err(e) => {
                    return Err(StoreError::refused(
                        &self.dir,
                        format!(
                            "cannot check sealed shard {number} ({e}); nothing was deleted: \
                             rerun when the file system reads again"
                        ),
                    ))
                }
            }
            self.next_input = seal.next_input;
            self.sealed.push(seal);
            number += 1;
        }
        let keep: Vec<String> = (0..number)
            .flat_map(|n| {
                let base = shard_name(self.spec.kind, n);
                [base.clone(), format!("{base}.seal.json")]
            })
            .map(|name| name.trim_start_matches("shards/").to_string())
            .collect();
        let entries = std::fs::read_dir(&shards_dir).map_err(|e| StoreError::io(&shards_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(&shards_dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) && is_shard_name(&name) {
                let path = entry.path();
                remove_path(&path)?;
            }
        }
        Ok(())
    }

    fn seal_path(&self, shard: u32) -> PathBuf {
        self.dir
            .join(format!("{}.seal.json", shard_name(self.spec.kind, shard)))
    }

    /// The encoder for this feature store's items (see [`FeatureEncoder`]).
    pub fn feature_encoder(&self) -> FeatureEncoder {
        FeatureEncoder {
            dtype: self.spec.dtype,
            dim: self.spec.dim.unwrap_or(1),
            layers: self.spec.layers.len(),
        }
    }

    fn item_bytes(&self, data: &ItemData) -> u64 {
        match data {
            ItemData::Audio(s) => (s.len() * 4) as u64,
            ItemData::Units(u) => (u.len() * 2) as u64,
            ItemData::Encoded(e) => e.files.iter().map(|f| f.len() as u64).sum(),
            ItemData::Features(layers) => layers
                .iter()
                .map(|l| {
                    let values = (l.len() * self.spec.dtype.bytes_per_value()) as u64;
                    let scales = if self.spec.dtype == Dtype::Int8 {
                        l.nrows() as u64 * 4
                    } else {
                        0
                    };
                    values + scales
                })
                .sum(),
        }
    }

    fn open_shard(&mut self) -> Result<(), StoreError> {
        if self.current.is_some() {
            return Ok(());
        }
        let number = self.sealed.len() as u32;
        let final_path = self.dir.join(shard_name(self.spec.kind, number));
        let tmp = tmp_path(&final_path);
        let mut files = Vec::new();
        let layers = self.spec.layers.len();
        match self.spec.kind {
            StoreKind::Audio | StoreKind::Units => {
                files.push(StreamedNpy::create(tmp, self.spec.dtype.npy_descr(), None)?)
            }
            StoreKind::Features => {
                if tmp.exists() {
                    std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
                }
                std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
                for &layer in &self.spec.layers {
                    let dim = self.spec.dim;
                    let descr = self.spec.dtype.npy_descr();
                    files.push(StreamedNpy::create(
                        tmp.join(layer_file(layer)),
                        descr,
                        dim,
                    )?);
                    if self.spec.dtype == Dtype::Int8 {
                        files.push(StreamedNpy::create(
                            tmp.join(scale_file(layer)),
                            "<f4",
                            None,
                        )?);
                    }
                }
            }
        }
        let dim = self.spec.dim.unwrap_or(0);
        self.current = Some(OpenShard {
            number,
            files,
            length: 0,
            bytes: 0,
            rows: Vec::new(),
            sums: (0..layers)
                .map(|_| (vec![0.0; dim], vec![0.0; dim]))
                .collect(),
        });
        Ok(())
    }

    fn append_item(&mut self, mut row: IndexRow, data: ItemData) -> Result<(), StoreError> {
        self.open_shard()?;
        let dtype = self.spec.dtype;
        let kind = self.spec.kind;
        let expected_layers = self.spec.layers.len();
        let expected_dim = self.spec.dim;
        let bytes = self.item_bytes(&data);
        let Some(shard) = self.current.as_mut() else {
            return Err(StoreError::Format("no open shard".into()));
        };
        let mut crc = crc32fast::Hasher::new();
        let mut encoded_checksum = None;
        let length = match (kind, data) {
            (StoreKind::Audio, ItemData::Audio(samples)) => {
                let raw: &[u8] = bytemuck::cast_slice(&samples);
                crc.update(raw);
                shard.files[0].append(raw, samples.len() as u64)?;
                samples.len() as u64
            }
            (StoreKind::Units, ItemData::Units(units)) => {
                let raw: &[u8] = bytemuck::cast_slice(&units);
                crc.update(raw);
                shard.files[0].append(raw, units.len() as u64)?;
                units.len() as u64
            }
            (StoreKind::Features, ItemData::Features(layers)) => {
                if layers.len() != expected_layers {
                    return Err(StoreError::Format(format!(
                        "item {} has {} layers, store has {expected_layers}",
                        row.id,
                        layers.len()
                    )));
                }
                let frames = layers.first().map_or(0, |l| l.nrows());
                let per_layer_files = if dtype == Dtype::Int8 { 2 } else { 1 };
                for (li, values) in layers.iter().enumerate() {
                    if values.nrows() != frames || Some(values.ncols()) != expected_dim {
                        return Err(StoreError::Format(format!(
                            "item {}: layer shape {:?}, expected [{frames}, {}]",
                            row.id,
                            values.shape(),
                            expected_dim.unwrap_or(0)
                        )));
                    }
                    let values = values.as_standard_layout();
                    let flat = values.as_slice().unwrap_or(&[]);
                    accumulate_sums(&mut shard.sums[li], flat, expected_dim.unwrap_or(1));
                    let file = li * per_layer_files;
                    encode_values(dtype, flat, expected_dim.unwrap_or(1), &mut self.scratch);
                    crc.update(&self.scratch);
                    shard.files[file].append(&self.scratch, frames as u64)?;
                    if dtype == Dtype::Int8 {
                        let scales = frame_scales(flat, expected_dim.unwrap_or(1));
                        let raw: &[u8] = bytemuck::cast_slice(&scales);
                        crc.update(raw);
                        shard.files[file + 1].append(raw, frames as u64)?;
                    }
                }
                frames as u64
            }
            (StoreKind::Features, ItemData::Encoded(item)) => {
                let per_layer_files = if dtype == Dtype::Int8 { 2 } else { 1 };
                if item.sums.len() != expected_layers
                    || item.files.len() != expected_layers * per_layer_files
                    || Some(item.dim) != expected_dim
                {
                    return Err(StoreError::Format(format!(
                        "item {}: encoded for {} layers of dim {}, store has {expected_layers} \
                         of dim {}",
                        row.id,
                        item.sums.len(),
                        item.dim,
                        expected_dim.unwrap_or(0)
                    )));
                }
                for (total, add) in shard.sums.iter_mut().zip(&item.sums) {
                    for (t, a) in total.0.iter_mut().zip(&add.0) {
                        *t += a;
                    }
                    for (t, a) in total.1.iter_mut().zip(&add.1) {
                        *t += a;
                    }
                }
                for (file, bytes) in shard.files.iter_mut().zip(&item.files) {
                    file.append(bytes, item.frames as u64)?;
                }
                encoded_checksum = Some(item.checksum);
                item.frames as u64
            }
            _ => {
                return Err(StoreError::Format(format!(
                    "item {}: data kind does not match the store kind",
                    row.id
                )))
            }
        };
        row.shard = shard.number;
        row.offset = shard.length;
        row.length = length;
        row.checksum = encoded_checksum.unwrap_or_else(|| crc32_hex_from(crc));
        shard.length += length;
        shard.bytes += bytes;
        shard.rows.push(row);
        Ok(())
    }

    fn seal_current(&mut self, next_input: usize) -> Result<(), StoreError> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let final_path = self.dir.join(shard_name(self.spec.kind, shard.number));
        for file in shard.files {
            file.seal()?;
        }
        let tmp = tmp_path(&final_path);
        std::fs::rename(&tmp, &final_path).map_err(|e| StoreError::io(&final_path, e))?;
        sync_dir(&self.dir.join("shards"));
        let record = SealRecord {
            shard: shard.number,
            next_input,
            length: shard.length,
            bytes: shard.bytes,
            rows: shard.rows,
            errors: std::mem::take(&mut self.pending_errors),
            sums: shard.sums,
        };
        write_atomic(
            &self.seal_path(record.shard),
            &to_jsonl(std::slice::from_ref(&record))?,
        )?;
        sync_dir(&self.dir.join("shards"));
        self.sealed.push(record);
        Ok(())
    }

    /// Removes an open shard that received no rows (its inputs only produced errors).
    fn discard_current(&mut self) -> Result<(), StoreError> {
        if let Some(shard) = self.current.take() {
            let final_path = self.dir.join(shard_name(self.spec.kind, shard.number));
            drop(shard.files);
            let tmp = tmp_path(&final_path);
            if tmp.is_dir() {
                std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
            } else {
                remove_if_exists(&tmp)?;
            }
        }
        Ok(())
    }

    fn write_stats(&self, frames: u64) -> Result<(), StoreError> {
        let stats_dir = self.dir.join("stats");
        std::fs::create_dir_all(&stats_dir).map_err(|e| StoreError::io(&stats_dir, e))?;
        let dim = self.spec.dim.unwrap_or(0);
        for (li, &layer) in self.spec.layers.iter().enumerate() {
            let mut sum = vec![0.0f64; dim];
            let mut sumsq = vec![0.0f64; dim];
            for seal in &self.sealed {
                if let Some((s, q)) = seal.sums.get(li) {
                    sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                    sumsq.iter_mut().zip(q).for_each(|(a, b)| *a += b);
                }
            }
            write_stats_files(&stats_dir, layer, &sum, &sumsq, frames)?;
        }
        Ok(())
    }
}

/// `stats/layer_LL.npy` (per-dim mean and variance over `frames`) and `stats/layer_LL.sums.npy`
/// (the per-dim sums and sums of squares they come from, so that parts combine exactly).
pub(crate) fn write_stats_files(
    stats_dir: &Path,
    layer: usize,
    sum: &[f64],
    sumsq: &[f64],
    frames: u64,
) -> Result<(), StoreError> {
    let n = frames.max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let var: Vec<f64> = sumsq
        .iter()
        .zip(&mean)
        .map(|(q, m)| (q / n - m * m).max(0.0))
        .collect();
    let dim = sum.len() as u64;
    let mut bytes = header_bytes("<f8", &[2, dim])?;
    bytes.extend_from_slice(bytemuck::cast_slice(&mean));
    bytes.extend_from_slice(bytemuck::cast_slice(&var));
    write_atomic(&stats_dir.join(layer_file(layer)), &bytes)?;
    let mut bytes = header_bytes("<f8", &[2, dim])?;
    bytes.extend_from_slice(bytemuck::cast_slice(sum));
    bytes.extend_from_slice(bytemuck::cast_slice(sumsq));
    write_atomic(&stats_dir.join(sums_file(layer)), &bytes)
}

/// Removes a file or a whole directory; a symlink is removed itself, never its target.
pub(super) fn remove_path(path: &Path) -> Result<(), StoreError> {
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir());
    let removed = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(|e| StoreError::io(path, e))
}

/// Which part of the whole input a part store holds (`--part K/N`).
#[derive(Debug, Clone, Copy)]
pub struct PartSlice {
    pub k: usize,
    pub n: usize,
    pub first_input: usize,
    pub end_input: usize,
    /// Inputs of the whole run.
    pub inputs: usize,
}

impl PartSlice {
    /// Part `part`, owning inputs `owned` of the whole run's `inputs`.
    pub fn new(
        part: super::partition::PartSpec,
        owned: &std::ops::Range<usize>,
        inputs: usize,
    ) -> Self {
        Self {
            k: part.k,
            n: part.n,
            first_input: owned.start,
            end_input: owned.end,
            inputs,
        }
    }
}

/// The options as compared on resume: a part store's include its `part: "K/N"`.
fn with_part(options: &serde_json::Value, part: Option<&PartInfo>) -> serde_json::Value {
    let mut options = options.clone();
    if let (Some(p), Some(map)) = (part, options.as_object_mut()) {
        map.insert("part".into(), serde_json::json!(format!("{}/{}", p.k, p.n)));
    }
    options
}

/// Names a store writes at its top level (and their `.tmp` forms); `--overwrite` removes
/// these and nothing else, so files a user keeps beside a store survive it.
const STORE_ENTRIES: [&str; 8] = [
    "meta.json",
    super::units_export::UNITS_KM,
    super::units_export::UNITS_LENGTHS,
    "index.jsonl",
    "errors.jsonl",
    IN_PROGRESS,
    "shards",
    "stats",
];

/// Empties a store directory for `--overwrite`, keeping the lock file this writer holds and
/// anything the store did not write; refused while a reader has the store open.
fn clear_store_dir(dir: &Path) -> Result<(), StoreError> {
    let _readers_out = super::DestroyLock::acquire(dir, "--overwrite")?;
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        if is_store_entry(&entry.file_name().to_string_lossy()) {
            remove_path(&entry.path())?;
        }
    }
    Ok(())
}

/// A name a store writes at its top level (or its `.tmp`), other than the lock file.
pub(super) fn is_store_entry(name: &str) -> bool {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    name != LOCK_FILE && STORE_ENTRIES.contains(&base)
}

/// A shard, its seal or a temporary of either (`NNNNN.npy`, `NNNNN`, `NNNNN.npy.seal.json`,
/// `NNNNN.tmp`, ...): what a resume may remove from `shards/`.
fn is_shard_name(name: &str) -> bool {
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    digits == 5
        && matches!(
            &name[digits..],
            "" | ".npy"
                | ".tmp"
                | ".npy.tmp"
                | ".seal.json"
                | ".npy.seal.json"
                | ".seal.json.tmp"
                | ".npy.seal.json.tmp"
        )
}

/// Refuses a `shards/` that is a symlink or not a directory: a resume removes unsealed files
/// inside it, which must never be files elsewhere.
fn refuse_unless_real_dir(path: &Path) -> Result<(), StoreError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| StoreError::io(path, e))?;
    if !meta.file_type().is_dir() {
        return Err(StoreError::refused(
            path,
            "is a symbolic link or not a directory (refused: a resume removes unsealed files \
             inside shards/); move it aside or use a new --out",
        ));
    }
    Ok(())
}

/// Whether a check of a sealed shard proved it damaged (rather than failing to read it).
fn proves_damage(e: &StoreError) -> bool {
    match e {
        StoreError::Corrupt { .. } => true,
        StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Adds how to get past a damaged `meta.json`/`in_progress.json`.
fn with_overwrite_hint(e: StoreError) -> StoreError {
    match e {
        StoreError::Corrupt { path, reason } => StoreError::Corrupt {
            path,
            reason: format!("{reason}; --overwrite replaces the store"),
        },
        other => other,
    }
}

pub(crate) fn fingerprint_of(spec: &WriterSpec) -> String {
    json_sha256(&serde_json::json!({
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "dtype": spec.dtype,
        "sample_rate": spec.sample_rate,
        "frame_rate": spec.frame_rate,
        "dim": spec.dim,
        "layers": spec.layers,
        "options": spec.options,
        "source": spec.source,
    }))
}

/// "sample_rate: 16000 → 8000, speed: … " or "same options, different inputs".
fn describe_difference(stored: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (stored.as_object(), now.as_object()) else {
        return "different options".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show =
                |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.to_string());
            format!(
                "{k}: {} in the store, {} now",
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect();
    if diffs.is_empty() {
        "same options, different inputs or model".into()
    } else {
        diffs.join("; ")
    }
}

fn crc32_hex_from(hasher: crc32fast::Hasher) -> String {
    format!("{:08x}", hasher.finalize())
}

/// Converts f32 values to the stored representation (int8: per-frame symmetric scale).
fn encode_values(dtype: Dtype, values: &[f32], dim: usize, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend_from_slice(bytemuck::cast_slice(values)),
        Dtype::F16 => encode_half::<f16>(values, out),
        Dtype::Bf16 => encode_half::<bf16>(values, out),
        // unit ids arrive as `ItemData::Units`, never as features
        Dtype::Int16 => unreachable!("int16 is not a feature dtype (refused at open)"),
        Dtype::Int8 => {
            out.reserve(values.len());
            for frame in values.chunks(dim.max(1)) {
                let scale = frame_scale(frame);
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for v in frame {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    out.push(q as u8);
                }
            }
        }
    }
}

/// `values` as little-endian f16 or bf16 bytes, converted a slice at a time (F16C / AVX-512
/// where the CPU has them: a per-value loop took most of extract's writing time).
fn encode_half<H>(values: &[f32], out: &mut Vec<u8>)
where
    H: bytemuck::Pod + Default,
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    const CHUNK: usize = 4096;
    out.reserve(values.len() * 2);
    let mut halves = [H::default(); CHUNK];
    for part in values.chunks(CHUNK) {
        let halves = &mut halves[..part.len()];
        halves.convert_from_f32_slice(part);
        if cfg!(target_endian = "little") {
            out.extend_from_slice(bytemuck::cast_slice(halves));
        } else {
            for h in halves.iter() {
                let bits: u16 = bytemuck::cast(*h);
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
    }
}

/// Symmetric int8 scale of one frame: max |x| / 127.
fn frame_scale(frame: &[f32]) -> f32 {
    frame.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0
}

fn frame_scales(values: &[f32], dim: usize) -> Vec<f32> {
    values.chunks(dim.max(1)).map(frame_scale).collect()
}

fn accumulate_sums(sums: &mut (Vec<f64>, Vec<f64>), values: &[f32], dim: usize) {
    for frame in values.chunks(dim.max(1)) {
        for ((s, q), v) in sums.0.iter_mut().zip(sums.1.iter_mut()).zip(frame) {
            let v = *v as f64;
            *s += v;
            *q += v * v;
        }
    }
}

/// What a run killed while claiming an empty directory can leave behind: its lock file, a
/// half-written `in_progress.json.tmp`, an empty `shards/` (older versions made it first).
fn left_by_a_killed_claim(entry: &std::fs::DirEntry) -> bool {
    let name = entry.file_name();
    if name == LOCK_FILE || name == tmp_path(Path::new(IN_PROGRESS)).as_os_str() {
        return true;
    }
    name == "shards"
        && std::fs::read_dir(entry.path()).is_ok_and(|mut shards| shards.next().is_none())
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// fsync a directory so renames inside it survive a power cut (best effort).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
