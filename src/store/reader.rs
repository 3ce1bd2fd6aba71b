//! Reading stores: memory-mapped shards, zero-copy utterances.
use super::lock::ReadLock;
use super::npy::MappedNpy;
use super::{
    layer_file, read_index, scale_file, shard_name, Dtype, IndexRow, StoreError, StoreKind,
    StoreMeta,
};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What a one-dimensional store holds: audio samples (f32) or unit ids (i16).
pub trait FlatValue: bytemuck::Pod {
    const KIND: StoreKind;
    const DTYPE: Dtype;
}

impl FlatValue for f32 {
    const KIND: StoreKind = StoreKind::Audio;
    const DTYPE: Dtype = Dtype::F32;
}

impl FlatValue for i16 {
    const KIND: StoreKind = StoreKind::Units;
    const DTYPE: Dtype = Dtype::Int16;
}

/// A one-dimensional store opened for reading (values of all utterances concatenated per
/// shard): `values(i)` is a slice of a memory-mapped shard.
pub struct FlatStore<T: FlatValue> {
    _read_lock: ReadLock,
    dir: PathBuf,
    meta: StoreMeta,
    rows: Vec<IndexRow>,
    shards: Vec<MappedNpy>,
    _values: std::marker::PhantomData<T>,
}

/// An audio store: `samples(i)` are utterance `i`'s 16 kHz (or `sample_rate()`) samples.
pub type AudioStore = FlatStore<f32>;
/// A units store (`speechcache units`): `values(i)` are utterance `i`'s unit ids per frame.
pub type UnitsStore = FlatStore<i16>;

impl<T: FlatValue> FlatStore<T> {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        StoreMeta::load(dir)?;
        // locked, then read again: the meta read is the one the lock protects
        let _read_lock = ReadLock::acquire(dir)?;
        let meta = StoreMeta::load(dir)?;
        if meta.kind != T::KIND {
            return Err(StoreError::refused(
                dir,
                format!(
                    "is a {} store, not {} {} store",
                    meta.kind.name(),
                    if T::KIND == StoreKind::Audio {
                        "an"
                    } else {
                        "a"
                    },
                    T::KIND.name()
                ),
            ));
        }
        let rows = read_index(dir, &meta)?;
        let shards = (0..meta.totals.shards)
            .map(|n| MappedNpy::open(&dir.join(shard_name(T::KIND, n)), T::DTYPE.npy_descr()))
            .collect::<Result<Vec<_>, _>>()?;
        for shard in &shards {
            shard.as_slice::<T>()?;
        }
        check_row_ranges(dir, &rows, |s| shards.get(s as usize).map(|m| m.shape[0]))?;
        Ok(Self {
            _read_lock,
            dir: dir.to_path_buf(),
            meta,
            rows,
            shards,
            _values: std::marker::PhantomData,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }
    pub fn rows(&self) -> &[IndexRow] {
        &self.rows
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Utterance `i`'s values, zero-copy (ranges were checked at open).
    pub fn values(&self, i: usize) -> &[T] {
        let row = &self.rows[i];
        let data: &[T] = bytemuck::cast_slice(self.shards[row.shard as usize].bytes());
        &data[row.offset as usize..(row.offset + row.length) as usize]
    }

    /// Checks utterance `i`'s values against its row's checksum (a damaged shard is an error
    /// naming the shard, the index line and the id).
    pub fn check_row(&self, i: usize) -> Result<(), StoreError> {
        let row = &self.rows[i];
        let found = super::crc32_hex(bytemuck::cast_slice(self.values(i)));
        if found == row.checksum {
            return Ok(());
        }
        Err(StoreError::corrupt(
            &self.shards[row.shard as usize].path,
            format!(
                "index line {}: {} fails its checksum (stored {}, found {found}): the {} store \
                 is damaged; `speechcache verify {}` lists every damaged row",
                i + 1,
                row.id,
                row.checksum,
                T::KIND.name(),
                self.dir.display()
            ),
        ))
    }

    /// Every utterance in store order.
    pub fn iter(&self) -> impl Iterator<Item = (&IndexRow, &[T])> {
        (0..self.len()).map(move |i| (&self.rows[i], self.values(i)))
    }
}

impl AudioStore {
    pub fn sample_rate(&self) -> u32 {
        self.meta.sample_rate.unwrap_or(16000)
    }

    /// Utterance `i`'s samples, zero-copy.
    pub fn samples(&self, i: usize) -> &[f32] {
        self.values(i)
    }
}

/// One utterance's frames of one layer, as stored.
pub enum FeatureView<'a> {
    F32(ArrayView2<'a, f32>),
    F16(ArrayView2<'a, f16>),
    Bf16(ArrayView2<'a, bf16>),
    /// value = q · scale[frame]
    Int8 {
        values: ArrayView2<'a, i8>,
        scale: &'a [f32],
    },
}

impl FeatureView<'_> {
    pub fn frames(&self) -> usize {
        match self {
            FeatureView::F32(v) => v.nrows(),
            FeatureView::F16(v) => v.nrows(),
            FeatureView::Bf16(v) => v.nrows(),
            FeatureView::Int8 { values, .. } => values.nrows(),
        }
    }

    /// Dequantised / widened copy as f32.
    pub fn to_f32(&self) -> Array2<f32> {
        match self {
            FeatureView::F32(v) => v.to_owned(),
            FeatureView::F16(v) => v.mapv(f32::from),
            FeatureView::Bf16(v) => v.mapv(f32::from),
            FeatureView::Int8 { values, scale } => {
                let mut out = values.mapv(|q| q as f32);
                for (mut row, s) in out.rows_mut().into_iter().zip(scale.iter()) {
                    row.mapv_inplace(|q| q * s);
                }
                out
            }
        }
    }

    /// Writes the frames as f32 into `out` (row-major `[frames, dim]`).
    pub fn write_f32(&self, out: &mut [f32]) {
        match self {
            FeatureView::F32(v) => copy_rows(v.iter().copied(), out),
            FeatureView::F16(v) => copy_rows(v.iter().map(|x| f32::from(*x)), out),
            FeatureView::Bf16(v) => copy_rows(v.iter().map(|x| f32::from(*x)), out),
            FeatureView::Int8 { values, scale } => {
                let dim = values.ncols().max(1);
                for (i, (o, q)) in out.iter_mut().zip(values.iter()).enumerate() {
                    *o = *q as f32 * scale[i / dim];
                }
            }
        }
    }
}

fn copy_rows(values: impl Iterator<Item = f32>, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = v;
    }
}

/// A feature shard: one mapped file per layer (plus scales for int8).
struct FeatureShard {
    layers: Vec<MappedNpy>,
    scales: Vec<Option<MappedNpy>>,
}

/// A feature store opened for reading.
pub struct FeatureStore {
    _read_lock: ReadLock,
    dir: PathBuf,
    meta: StoreMeta,
    rows: Vec<IndexRow>,
    shards: Vec<FeatureShard>,
    dim: usize,
}

impl FeatureStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        StoreMeta::load(dir)?;
        // locked, then read again: the meta read is the one the lock protects
        let _read_lock = ReadLock::acquire(dir)?;
        let meta = StoreMeta::load(dir)?;
        if meta.kind != StoreKind::Features {
            return Err(StoreError::refused(
                dir,
                "is an audio store, not a feature store",
            ));
        }
        let dim = meta.dim.ok_or_else(|| {
            StoreError::corrupt(&dir.join("meta.json"), "feature store without dim")
        })?;
        let rows = read_index(dir, &meta)?;
        let mut shards = Vec::new();
        for n in 0..meta.totals.shards {
            shards.push(open_feature_shard(dir, &meta, n)?);
        }
        check_row_ranges(dir, &rows, |s| {
            shards
                .get(s as usize)
                .and_then(|sh| sh.layers.first())
                .map(|m| m.shape[0])
        })?;
        Ok(Self {
            _read_lock,
            dir: dir.to_path_buf(),
            meta,
            rows,
            shards,
            dim,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }
    pub fn rows(&self) -> &[IndexRow] {
        &self.rows
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn layers(&self) -> &[usize] {
        &self.meta.layers
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn dtype(&self) -> Dtype {
        self.meta.dtype
    }
    pub fn frame_rate(&self) -> f64 {
        self.meta.frame_rate.unwrap_or(100.0)
    }

    fn layer_position(&self, layer: usize) -> Result<usize, StoreError> {
        self.meta
            .layers
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| {
                StoreError::refused(
                    &self.dir,
                    format!(
                        "layer {layer} is not in this store (it has {:?})",
                        self.meta.layers
                    ),
                )
            })
    }

    /// Drops the resident pages of every mapped shard (see [`MappedNpy::release_pages`]).
    pub fn release_pages(&self) {
        for shard in &self.shards {
            for m in shard.layers.iter().chain(shard.scales.iter().flatten()) {
                m.release_pages();
            }
        }
    }

    /// `release_pages` for one hidden state's files only (what a reader of one layer mapped).
    pub fn release_layer_pages(&self, layer: usize) {
        if let Ok(pos) = self.layer_position(layer) {
            for shard in &self.shards {
                let scales = shard.scales.get(pos).and_then(Option::as_ref);
                for m in shard.layers.get(pos).into_iter().chain(scales) {
                    m.release_pages();
                }
            }
        }
    }

    /// Utterance `i`, hidden state `layer` (a number from `layers()`), zero-copy.
    pub fn view(&self, i: usize, layer: usize) -> Result<FeatureView<'_>, StoreError> {
        let pos = self.layer_position(layer)?;
        let row = self
            .rows
            .get(i)
            .ok_or_else(|| StoreError::Format(format!("utterance {i} out of range")))?;
        let shard = &self.shards[row.shard as usize];
        let (start, len) = (row.offset as usize, row.length as usize);
        let dim = self.dim;
        let range = start * dim..(start + len) * dim;
        let file = &shard.layers[pos];
        let shape = (len, dim);
        let bad = |e: ndarray::ShapeError| StoreError::corrupt(&file.path, e.to_string());
        Ok(match self.meta.dtype {
            Dtype::F32 => FeatureView::F32(
                ArrayView2::from_shape(shape, &file.as_slice::<f32>()?[range]).map_err(bad)?,
            ),
            Dtype::F16 => FeatureView::F16(
                ArrayView2::from_shape(shape, &file.as_slice::<f16>()?[range]).map_err(bad)?,
            ),
            Dtype::Bf16 => FeatureView::Bf16(
                ArrayView2::from_shape(shape, &file.as_slice::<bf16>()?[range]).map_err(bad)?,
            ),
            Dtype::Int16 => {
                return Err(StoreError::corrupt(
                    &file.path,
                    "int16 is not a feature dtype",
                ))
            }
            Dtype::Int8 => {
                let scales = shard.scales[pos]
                    .as_ref()
                    .ok_or_else(|| StoreError::corrupt(&file.path, "int8 layer without scales"))?;
                FeatureView::Int8 {
                    values: ArrayView2::from_shape(shape, &file.as_slice::<i8>()?[range])
                        .map_err(bad)?,
                    scale: &scales.as_slice::<f32>()?[start..start + len],
                }
            }
        })
    }

    /// Checks utterance `i`'s stored bytes (every layer, in checksum order) against its row's
    /// checksum.
    pub fn check_row(&self, i: usize) -> Result<(), StoreError> {
        let row = self
            .rows
            .get(i)
            .ok_or_else(|| StoreError::Format(format!("utterance {i} out of range")))?;
        let shard = &self.shards[row.shard as usize];
        let files: Vec<(&MappedNpy, Option<&MappedNpy>)> = shard
            .layers
            .iter()
            .zip(shard.scales.iter().map(Option::as_ref))
            .collect();
        let found = row_checksum(StoreKind::Features, self.meta.dtype, self.dim, &files, row)?;
        if found == row.checksum {
            return Ok(());
        }
        Err(StoreError::corrupt(
            &self.dir.join(shard_name(StoreKind::Features, row.shard)),
            format!(
                "index line {}: {} fails its checksum (stored {}, found {found}): the feature \
                 store is damaged; `speechcache verify {}` lists every damaged row",
                i + 1,
                row.id,
                row.checksum,
                self.dir.display()
            ),
        ))
    }

    /// Utterance `i`, hidden state `layer`, as an owned f32 `[frames, dim]` array.
    pub fn to_array(&self, i: usize, layer: usize) -> Result<Array2<f32>, StoreError> {
        Ok(self.view(i, layer)?.to_f32())
    }

    /// Per-dim (mean, variance) of `layer` over the whole store.
    pub fn stats(&self, layer: usize) -> Result<(Vec<f64>, Vec<f64>), StoreError> {
        self.layer_position(layer)?;
        let path = self.dir.join("stats").join(layer_file(layer));
        let file = MappedNpy::open(&path, "<f8")?;
        if file.shape != [2, self.dim as u64] {
            return Err(StoreError::corrupt(
                &path,
                format!("shape {:?}, expected [2, {}]", file.shape, self.dim),
            ));
        }
        let data = file.as_slice::<f64>()?;
        Ok((data[..self.dim].to_vec(), data[self.dim..].to_vec()))
    }

    /// A padded batch: f32 `[B, L, T_max, D]` (zeros past each length) and the lengths.
    pub fn batch(
        &self,
        items: &[usize],
        layers: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>), StoreError> {
        let lengths: Vec<usize> = items
            .iter()
            .map(|&i| self.rows.get(i).map(|r| r.length as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| StoreError::Format("utterance index out of range".into()))?;
        let t_max = lengths.iter().copied().max().unwrap_or(0);
        let (b, l, d) = (items.len(), layers.len(), self.dim);
        let mut data = vec![0f32; b * l * t_max * d];
        // one (utterance, layer) block per task: decoding f16/bf16/int8 is most of a batch's cost
        data.par_chunks_mut((t_max * d).max(1))
            .enumerate()
            .try_for_each(|(block, out)| -> Result<(), StoreError> {
                let (bi, li) = (block / l, block % l);
                let view = self.view(items[bi], layers[li])?;
                view.write_f32(&mut out[..lengths[bi] * d]);
                Ok(())
            })?;
        let tensor = Tensor::from_vec(data, (b, l, t_max, d), device)?;
        Ok((tensor, lengths))
    }
}

fn open_feature_shard(dir: &Path, meta: &StoreMeta, n: u32) -> Result<FeatureShard, StoreError> {
    let shard_dir = dir.join(shard_name(StoreKind::Features, n));
    let mut layers = Vec::new();
    let mut scales = Vec::new();
    let dim = meta.dim.unwrap_or(0) as u64;
    for &layer in &meta.layers {
        let file = MappedNpy::open(&shard_dir.join(layer_file(layer)), meta.dtype.npy_descr())?;
        if file.shape.len() != 2 || file.shape[1] != dim {
            return Err(StoreError::corrupt(
                &file.path,
                format!("shape {:?}, expected [frames, {dim}]", file.shape),
            ));
        }
        if let Some(first) = layers.first() {
            let first: &MappedNpy = first;
            if first.shape[0] != file.shape[0] {
                return Err(StoreError::corrupt(
                    &file.path,
                    "layers of one shard differ in frame count",
                ));
            }
        }
        scales.push(if meta.dtype == Dtype::Int8 {
            let s = MappedNpy::open(&shard_dir.join(scale_file(layer)), "<f4")?;
            if s.shape != [file.shape[0]] {
                return Err(StoreError::corrupt(
                    &s.path,
                    "scale count differs from frame count",
                ));
            }
            Some(s)
        } else {
            None
        });
        layers.push(file);
    }
    Ok(FeatureShard { layers, scales })
}

/// Every row lies inside its shard.
fn check_row_ranges(
    dir: &Path,
    rows: &[IndexRow],
    shard_len: impl Fn(u32) -> Option<u64>,
) -> Result<(), StoreError> {
    let index = dir.join("index.jsonl");
    for (n, row) in rows.iter().enumerate() {
        let len = shard_len(row.shard).ok_or_else(|| {
            StoreError::corrupt(
                &index,
                format!("line {}: shard {} does not exist", n + 1, row.shard),
            )
        })?;
        if row
            .offset
            .checked_add(row.length)
            .is_none_or(|end| end > len)
        {
            return Err(StoreError::corrupt(
                &index,
                format!(
                    "line {}: {} ends past the end of shard {}",
                    n + 1,
                    row.id,
                    row.shard
                ),
            ));
        }
    }
    Ok(())
}

/// The stored bytes of one row, in checksum order (features: each layer, then its scales).
pub(crate) fn row_checksum(
    kind: StoreKind,
    dtype: Dtype,
    dim: usize,
    files: &[(&MappedNpy, Option<&MappedNpy>)],
    row: &IndexRow,
) -> Result<String, StoreError> {
    let mut crc = crc32fast::Hasher::new();
    let (start, len) = (row.offset as usize, row.length as usize);
    for (values, scales) in files {
        let item = match kind {
            StoreKind::Audio | StoreKind::Units => dtype.bytes_per_value(),
            StoreKind::Features => dtype.bytes_per_value().saturating_mul(dim),
        };
        let out_of_range =
            |path: &Path| StoreError::corrupt(path, format!("{} is out of range", row.id));
        // checked: offsets and dims come from files another process may have damaged
        let span = |item: usize| -> Option<std::ops::Range<usize>> {
            Some(start.checked_mul(item)?..start.checked_add(len)?.checked_mul(item)?)
        };
        let slice = span(item)
            .and_then(|r| values.bytes().get(r))
            .ok_or_else(|| out_of_range(&values.path))?;
        crc.update(slice);
        if let Some(scales) = scales {
            let s = span(4)
                .and_then(|r| scales.bytes().get(r))
                .ok_or_else(|| out_of_range(&scales.path))?;
            crc.update(s);
        }
    }
    Ok(format!("{:08x}", crc.finalize()))
}

/// Checks a sealed shard: headers, sizes, and every row's checksum.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_sealed_shard(
    dir: &Path,
    kind: StoreKind,
    dtype: Dtype,
    layers: &[usize],
    dim: Option<usize>,
    shard: u32,
    length: u64,
    rows: &[IndexRow],
) -> Result<(), StoreError> {
    let base = dir.join(shard_name(kind, shard));
    let (files, scales): (Vec<MappedNpy>, Vec<Option<MappedNpy>>) = match kind {
        StoreKind::Audio | StoreKind::Units => {
            (vec![MappedNpy::open(&base, dtype.npy_descr())?], vec![None])
        }
        StoreKind::Features => {
            let mut f = Vec::new();
            let mut s = Vec::new();
            for &layer in layers {
                f.push(MappedNpy::open(
                    &base.join(layer_file(layer)),
                    dtype.npy_descr(),
                )?);
                s.push(if dtype == Dtype::Int8 {
                    Some(MappedNpy::open(&base.join(scale_file(layer)), "<f4")?)
                } else {
                    None
                });
            }
            (f, s)
        }
    };
    for file in &files {
        if file.shape.first() != Some(&length) {
            return Err(StoreError::corrupt(
                &file.path,
                format!("{:?} rows, sealed with {length}", file.shape),
            ));
        }
    }
    let pairs: Vec<(&MappedNpy, Option<&MappedNpy>)> = files
        .iter()
        .zip(scales.iter().map(|s| s.as_ref()))
        .collect();
    let mut expected_offset = 0;
    for row in rows {
        if row.offset != expected_offset {
            return Err(StoreError::corrupt(
                &base,
                format!("{} does not follow the previous row", row.id),
            ));
        }
        expected_offset += row.length;
        let sum = row_checksum(kind, dtype, dim.unwrap_or(1), &pairs, row)?;
        if sum != row.checksum {
            return Err(StoreError::corrupt(
                &base,
                format!(
                    "checksum mismatch for {} (stored {}, found {sum})",
                    row.id, row.checksum
                ),
            ));
        }
    }
    if expected_offset != length {
        return Err(StoreError::corrupt(
            &base,
            format!("rows cover {expected_offset} of {length}"),
        ));
    }
    Ok(())
}
