//! `torch.save` files read without executing them: the zip format (torch ≥ 1.6, any pickle
//! protocol) and the legacy stream format (magic number, protocol and sys_info pickles, the
//! object pickle, the storage key list, then the raw storages back to back).
//!
//! Every size, offset, shape and stride in a file is untrusted: each is checked (with checked
//! arithmetic) against the bytes that hold it before anything is sliced or allocated, and a
//! compressed zip entry is inflated only when a tensor needs it, and only as far as it needs.
use super::pickle::{unpickle, Node, Pickle, Value};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Largest `data.pkl` read; real ones are kilobytes to a few MB (tensors live in separate
/// entries), so more is a decompression bomb or a hostile file, not a checkpoint.
const MAX_PICKLE: usize = 256 << 20;

/// How many `_rebuild_parameter` wrappers may enclose a tensor (torch writes one).
const MAX_REBUILD_NESTING: usize = 8;

/// Longest tensor name or storage key taken from a pickle (real ones are under 200 bytes).
/// Names are copied out of the pickle, and one shared string may be referenced any number of
/// times, so an unbounded length would let a small file ask for unbounded copies.
const MAX_NAME_BYTES: usize = 4096;

/// `0x1950a86a20f9469cfc6c`, the first pickle of a legacy file, as LONG1 little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Element type of a storage, from the class in its persistent id (`torch.FloatStorage`...).
#[derive(Debug, Clone, PartialEq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    Other(String),
}

impl StorageDtype {
    fn from_class(name: &str) -> Self {
        match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            other => Self::Other(other.to_string()),
        }
    }

    fn size(&self) -> Option<usize> {
        Some(match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
            Self::Other(_) => return None,
        })
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Self::F32 | Self::F64 | Self::F16 | Self::BF16)
    }
}

/// Where a tensor's elements are: a storage plus offset, shape and strides (in elements).
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: String,
    pub dtype: StorageDtype,
    /// The storage's element count as its persistent id declares it (untrusted; `None` when
    /// the id does not say).
    pub storage_numel: Option<usize>,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// Where a storage's bytes are in the mapped file.
enum StorageBytes {
    /// Stored as is (an uncompressed zip entry, or a legacy file's storage).
    Mapped { start: usize, len: usize },
    /// A deflated zip entry: `compressed_len` bytes from `start`, inflated on demand.
    Deflated {
        name: String,
        start: usize,
        compressed_len: usize,
    },
    /// A zip entry compressed in a way this reader cannot inflate; an error only if used.
    Unsupported { name: String, method: String },
}

/// An opened `torch.save` file: its object pickle and where each storage's bytes are.
pub struct TorchFile {
    mmap: Mmap,
    pub pickle: Pickle,
    pub root: Value,
    storages: HashMap<String, StorageBytes>,
}

/// How to turn an unreadable file into safetensors, for error messages.
pub fn conversion_hint(path: &Path) -> String {
    format!(
        "convert it once with: python -c \"import torch; from safetensors.torch import save_file; \
         sd = torch.load('{}', map_location='cpu', weights_only=True); sd = sd.get('model', sd); \
         save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, 'model.safetensors')\" \
         and pass the directory holding model.safetensors and config.json (weights_only=True refuses \
         to run code a hostile file carries; never load a file you do not trust without it)",
        path.display()
    )
}

impl TorchFile {
    /// Opens a zip or legacy `torch.save` file. The error is a reason without the path.
    pub fn open(path: &Path) -> Result<TorchFile, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        // SAFETY: the checkpoint is opened read-only; like every reader of mmapped model files,
        // we rely on nobody truncating it while we read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?;
        if mmap.starts_with(b"PK\x03\x04") {
            Self::open_zip(mmap)
        } else if mmap.len() > 12 && mmap[0] == 0x80 && mmap[2] == 0x8a && mmap[3] == 10 {
            Self::open_legacy(mmap)
        } else {
            Err("not a PyTorch zip or legacy pickle file".into())
        }
    }

    /// Lists the archive and runs `data.pkl`; storages are only located here (never inflated),
    /// so an entry no tensor uses costs nothing, whatever it claims or holds.
    fn open_zip(mmap: Mmap) -> Result<TorchFile, String> {
        let mut storages = HashMap::new();
        let mut pkl: Option<StorageBytes> = None;
        let mut byteorder: Option<StorageBytes> = None;
        {
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&mmap[..]))
                .map_err(|e| format!("invalid zip archive: {e}"))?;
            let names: Vec<String> = archive
                .file_names()
                .map(|s| s.map(|s| s.to_string()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("invalid zip archive: {e}"))?;
            let pkl_name = names
                .iter()
                .filter(|n| n.ends_with("data.pkl"))
                .min_by_key(|n| n.len())
                .ok_or("zip archive has no data.pkl (not a torch.save file)")?
                .clone();
            let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
            let data_dir = format!("{prefix}data/");
            let byteorder_name = format!("{prefix}byteorder");
            for (i, name) in names.iter().enumerate() {
                let is_pkl = *name == pkl_name;
                let key = name.strip_prefix(&data_dir);
                let is_byteorder = *name == byteorder_name;
                if !is_pkl && key.is_none() && !is_byteorder {
                    continue;
                }
                // Raw: only the local header is read, to find where the entry's bytes start.
                let entry = archive
                    .by_index_raw(i)
                    .map_err(|e| format!("zip entry {name}: {e}"))?;
                let bytes = locate_entry(name, &entry, mmap.len())?;
                if is_pkl {
                    pkl = Some(bytes);
                } else if is_byteorder {
                    byteorder = Some(bytes);
                } else if let Some(key) = key {
                    storages.insert(key.to_string(), bytes);
                }
            }
        }
        if let Some(b) = &byteorder {
            if read_entry(&mmap, b, 16)?.starts_with(b"big") {
                return Err("big-endian torch file is not supported".into());
            }
        }
        let pkl = pkl.ok_or("zip archive has no data.pkl")?;
        let pkl = read_entry(&mmap, &pkl, MAX_PICKLE)?;
        if pkl.len() > MAX_PICKLE {
            return Err(format!(
                "data.pkl is larger than {} MiB (a decompression bomb?)",
                MAX_PICKLE >> 20
            ));
        }
        let (pickle, _) = unpickle(&pkl).map_err(|e| format!("data.pkl: {e}"))?;
        let root = pickle.root.clone().ok_or("empty pickle")?;
        Ok(TorchFile {
            mmap,
            pickle,
            root,
            storages,
        })
    }

    fn open_legacy(mmap: Mmap) -> Result<TorchFile, String> {
        let mut pos = 0;
        let mut next = |what: &str| -> Result<Pickle, String> {
            let (p, used) = unpickle(&mmap[pos..]).map_err(|e| format!("{what} pickle: {e}"))?;
            pos += used;
            Ok(p)
        };
        let magic = next("magic number")?;
        if magic.root != Some(Value::BigInt(LEGACY_MAGIC[..].into())) {
            return Err("not a PyTorch legacy file (wrong magic number)".into());
        }
        let protocol = next("protocol version")?;
        if protocol.root != Some(Value::Int(1001)) {
            return Err(format!(
                "unsupported legacy protocol version {}",
                protocol.root.as_ref().map_or("(none)".into(), Value::brief)
            ));
        }
        let sys_info = next("sys_info")?;
        if let Some(root) = &sys_info.root {
            if sys_info.get(root, "little_endian") == Some(&Value::Bool(false)) {
                return Err("big-endian torch file is not supported".into());
            }
        }
        let pickle = next("object")?;
        let keys = next("storage keys")?;
        let root = pickle.root.clone().ok_or("empty pickle")?;
        let key_list = keys
            .root
            .as_ref()
            .and_then(|r| keys.seq(r))
            .ok_or("storage key list is not a list")?;
        let dtypes = storage_dtypes(&pickle);
        let mut storages = HashMap::new();
        for key in key_list {
            let key = key_string(key).ok_or("storage key is not a string of at most 4096 bytes")?;
            let dtype = dtypes
                .get(&key)
                .ok_or(format!("storage {key} is listed but never referenced"))?;
            let size = dtype
                .size()
                .ok_or(format!("storage {key} has unsupported type {dtype:?}"))?;
            // Each storage: its element count as little-endian i64, then the raw elements.
            let head = pos
                .checked_add(8)
                .and_then(|end| mmap.get(pos..end))
                .ok_or(format!("file ends before storage {key}"))?;
            let mut n = [0u8; 8];
            n.copy_from_slice(head);
            let left = mmap.len() - (pos + 8);
            let len = usize::try_from(u64::from_le_bytes(n))
                .ok()
                .and_then(|numel| numel.checked_mul(size))
                .filter(|&l| l <= left)
                .ok_or(format!(
                    "storage {key} declares more bytes than the {left} left in the file"
                ))?;
            storages.insert(
                key,
                StorageBytes::Mapped {
                    start: pos + 8,
                    len,
                },
            );
            pos += 8 + len;
        }
        Ok(TorchFile {
            mmap,
            pickle,
            root,
            storages,
        })
    }

    /// The tensors directly under a dict-like value, in file order; other values are skipped.
    pub fn tensor_entries(&self, dict: &Value) -> Result<Vec<(String, TensorRef)>, String> {
        let mut out = Vec::new();
        for (k, v) in self.pickle.entries(dict).unwrap_or(&[]) {
            let Value::Str(name) = k else { continue };
            match self.tensor_ref(v) {
                Some(Ok(_)) if name.len() > MAX_NAME_BYTES => {
                    return Err(format!(
                        "a tensor name of {} bytes (names are at most {MAX_NAME_BYTES})",
                        name.len()
                    ))
                }
                Some(Ok(t)) => out.push((name.to_string(), t)),
                Some(Err(e)) => return Err(format!("tensor {name}: {e}")),
                None => {}
            }
        }
        Ok(out)
    }

    /// `Some` when `v` is a tensor rebuild call (plain, Parameter, or subclass wrapper).
    pub fn tensor_ref(&self, v: &Value) -> Option<Result<TensorRef, String>> {
        self.tensor_ref_within(v, MAX_REBUILD_NESTING)
    }

    /// [`TensorRef`] of `v`, unwrapping at most `wrappers` Parameter rebuilds: a Parameter whose
    /// arguments hold itself would otherwise unwrap forever.
    fn tensor_ref_within(&self, v: &Value, wrappers: usize) -> Option<Result<TensorRef, String>> {
        let Node::Object { callable, args, .. } = self.pickle.node(v)? else {
            return None;
        };
        let (_, name) = self.pickle.global_name(callable)?;
        let args = self.pickle.seq(args)?;
        match name {
            "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(self.rebuild_tensor(args)),
            "_rebuild_parameter" | "_rebuild_parameter_with_state" => match wrappers {
                0 => Some(Err(format!(
                    "{name} calls nest more than {MAX_REBUILD_NESTING} deep \
                     (its arguments contain itself?)"
                ))),
                _ => self.tensor_ref_within(args.first()?, wrappers - 1),
            },
            "_rebuild_from_type_v2" => {
                // (func, new_type, args, state): the tensor is func(*args).
                let inner = self.pickle.seq(args.get(2)?)?;
                let (_, fname) = self.pickle.global_name(args.first()?)?;
                match fname {
                    "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(self.rebuild_tensor(inner)),
                    _ => Some(Err(format!("unsupported tensor rebuild {fname}"))),
                }
            }
            n if n.starts_with("_rebuild") => Some(Err(format!("unsupported tensor kind ({n})"))),
            _ => None,
        }
    }

    fn rebuild_tensor(&self, args: &[Value]) -> Result<TensorRef, String> {
        let [storage, offset, size, stride, ..] = args else {
            return Err("short _rebuild_tensor arguments".into());
        };
        let Some(Node::PersistentId(pid)) = self.pickle.node(storage) else {
            return Err("tensor storage is not a persistent id".into());
        };
        let (key, dtype, storage_numel) =
            storage_id(&self.pickle, pid).ok_or("unreadable storage id")?;
        let ints = |v: &Value| -> Option<Vec<usize>> {
            self.pickle
                .seq(v)?
                .iter()
                .map(|x| match x {
                    Value::Int(i) => usize::try_from(*i).ok(),
                    _ => None,
                })
                .collect()
        };
        let Value::Int(offset) = offset else {
            return Err("storage offset is not an int".into());
        };
        let shape = ints(size).ok_or("tensor size is not a tuple of ints")?;
        let stride = ints(stride).ok_or("tensor stride is not a tuple of ints")?;
        if shape.len() != stride.len() {
            return Err("size and stride differ in length".into());
        }
        Ok(TensorRef {
            storage: key,
            dtype,
            storage_numel,
            offset: usize::try_from(*offset).map_err(|_| "negative storage offset")?,
            shape,
            stride,
        })
    }

    /// Copies a tensor's elements (any strides) into a tensor on `device`, in its stored dtype.
    /// Reads (or inflates) only the bytes the view spans, after checking it fits its storage.
    pub fn materialize(&self, t: &TensorRef, device: &Device) -> Result<Tensor, String> {
        let storage = self
            .storages
            .get(&t.storage)
            .ok_or(format!("storage {} is missing from the file", t.storage))?;
        let es = t
            .dtype
            .size()
            .ok_or(format!("unsupported storage type {:?}", t.dtype))?;
        let (numel, end) = view_extent(t, es)?;
        let bytes = read_entry(&self.mmap, storage, end)?;
        if bytes.len() < end {
            return Err(format!(
                "tensor needs {end} bytes of storage {}, which holds only {}",
                t.storage,
                bytes.len()
            ));
        }
        // A compressed storage that inflates past the size its id declares is a bomb posing as
        // a storage (checked when this view spans it all, the usual case).
        let declared = t.storage_numel.and_then(|n| n.checked_mul(es));
        if let StorageBytes::Deflated { name, .. } = storage {
            if declared == Some(end) && bytes.len() > end {
                return Err(format!(
                    "zip entry {name} inflates past the {end} bytes its storage declares \
                     (a decompression bomb?)"
                ));
            }
        }
        let gathered;
        let raw: &[u8] = if numel == 0 {
            &[]
        } else if is_row_major(&t.shape, &t.stride) {
            let start = t.offset * es; // ≤ end, which view_extent computed without overflow
            bytes
                .get(start..end)
                .ok_or("tensor extends past its storage")?
        } else {
            gathered = gather(&bytes, es, t)?;
            &gathered
        };
        let (dtype, converted);
        let raw = match t.dtype {
            StorageDtype::F32 => {
                dtype = DType::F32;
                raw
            }
            StorageDtype::F64 => {
                dtype = DType::F64;
                raw
            }
            StorageDtype::F16 => {
                dtype = DType::F16;
                raw
            }
            StorageDtype::BF16 => {
                dtype = DType::BF16;
                raw
            }
            StorageDtype::I64 => {
                dtype = DType::I64;
                raw
            }
            StorageDtype::I32 => {
                dtype = DType::I32;
                raw
            }
            StorageDtype::I16 => {
                dtype = DType::I16;
                raw
            }
            StorageDtype::U8 | StorageDtype::Bool => {
                dtype = DType::U8;
                raw
            }
            StorageDtype::I8 => {
                // candle has no i8: widen to i16.
                dtype = DType::I16;
                converted = raw
                    .iter()
                    .flat_map(|&b| (b as i8 as i16).to_le_bytes())
                    .collect::<Vec<u8>>();
                &converted
            }
            StorageDtype::Other(ref n) => return Err(format!("unsupported storage type {n}")),
        };
        Tensor::from_raw_buffer(raw, dtype, &t.shape, device).map_err(|e| e.to_string())
    }
}

/// Where a zip entry's bytes are, from its (untrusted) headers checked against the file size.
fn locate_entry<R: Read>(
    name: &str,
    entry: &zip::read::ZipFile<'_, R>,
    file_len: usize,
) -> Result<StorageBytes, String> {
    if entry.encrypted() {
        return Err(format!("zip entry {name} is encrypted"));
    }
    let start = entry
        .data_start()
        .and_then(|s| usize::try_from(s).ok())
        .ok_or(format!("zip entry {name}: no data offset"))?;
    let len = usize::try_from(entry.compressed_size())
        .ok()
        .filter(|&l| start.checked_add(l).is_some_and(|end| end <= file_len))
        .ok_or(format!("zip entry {name} extends past the end of the file"))?;
    Ok(match entry.compression() {
        zip::CompressionMethod::Stored => StorageBytes::Mapped { start, len },
        zip::CompressionMethod::Deflated => StorageBytes::Deflated {
            name: name.to_string(),
            start,
            compressed_len: len,
        },
        other => StorageBytes::Unsupported {
            name: name.to_string(),
            method: format!("{other:?}"),
        },
    })
}

/// The first `limit + 1` bytes of an entry, or all of it if shorter: one byte past the limit
/// tells a caller "exactly `limit`" from "more". An entry's headers' sizes are untrusted, so a
/// deflated entry is inflated only that far, whatever it claims or would inflate to.
fn read_entry<'m>(
    mmap: &'m Mmap,
    b: &StorageBytes,
    limit: usize,
) -> Result<std::borrow::Cow<'m, [u8]>, String> {
    use std::borrow::Cow;
    let want = limit.saturating_add(1);
    match b {
        StorageBytes::Mapped { start, len } => {
            let all = start
                .checked_add(*len)
                .and_then(|end| mmap.get(*start..end))
                .ok_or("storage extends past the end of the file")?;
            Ok(Cow::Borrowed(&all[..want.min(all.len())]))
        }
        StorageBytes::Deflated {
            name,
            start,
            compressed_len,
        } => {
            let compressed = start
                .checked_add(*compressed_len)
                .and_then(|end| mmap.get(*start..end))
                .ok_or(format!("zip entry {name} extends past the end of the file"))?;
            // Deflate inflates at most ~1032:1: reserve no more than the input can justify.
            let mut out = Vec::with_capacity(want.min(compressed.len().saturating_mul(1032)));
            flate2::read::DeflateDecoder::new(compressed)
                .take(want as u64)
                .read_to_end(&mut out)
                .map_err(|e| format!("zip entry {name}: cannot inflate: {e}"))?;
            Ok(Cow::Owned(out))
        }
        StorageBytes::Unsupported { name, method } => Err(format!(
            "zip entry {name} uses compression method {method}, which this reader cannot inflate"
        )),
    }
}

/// Elements in a view and the byte just past the furthest element it touches, checked against
/// overflow; a view with more elements than the span it covers repeats elements (stride 0 or
/// overlapping strides), which no saved checkpoint needs and which could otherwise ask for an
/// allocation far larger than the file.
fn view_extent(t: &TensorRef, es: usize) -> Result<(usize, usize), String> {
    let past = "tensor view extends past any possible storage (overflowing size or stride)";
    if t.shape.len() != t.stride.len() {
        return Err("size and stride differ in length".into());
    }
    let numel = checked_numel(&t.shape).ok_or(past)?;
    if numel == 0 {
        return Ok((0, 0));
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        let span = (d - 1).checked_mul(s).ok_or(past)?;
        last = last.checked_add(span).ok_or(past)?;
    }
    let end = last
        .checked_add(1)
        .and_then(|n| n.checked_mul(es))
        .ok_or(past)?;
    let span = end - t.offset.checked_mul(es).ok_or(past)?;
    if numel.checked_mul(es).is_none_or(|bytes| bytes > span) {
        return Err(format!(
            "tensor view of shape {:?} with strides {:?} repeats storage elements \
             (overlapping strides are not supported)",
            t.shape, t.stride
        ));
    }
    Ok((numel, end))
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) if s.len() <= MAX_NAME_BYTES => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `('storage', torch.XStorage, key, location, numel[, view_metadata])` → key, dtype, numel.
fn storage_id(p: &Pickle, pid: &Value) -> Option<(String, StorageDtype, Option<usize>)> {
    let items = p.seq(pid)?;
    if !matches!(items.first(), Some(Value::Str(s)) if &**s == "storage") {
        return None;
    }
    let (_, class) = p.global_name(items.get(1)?)?;
    let numel = match items.get(4) {
        Some(Value::Int(n)) => usize::try_from(*n).ok(),
        _ => None,
    };
    Some((
        key_string(items.get(2)?)?,
        StorageDtype::from_class(class),
        numel,
    ))
}

fn storage_dtypes(p: &Pickle) -> HashMap<String, StorageDtype> {
    p.nodes()
        .iter()
        .filter_map(|n| match n {
            Node::PersistentId(pid) => storage_id(p, pid).map(|(k, d, _)| (k, d)),
            _ => None,
        })
        .collect()
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        let Some(next) = expected.checked_mul(d) else {
            return false;
        };
        expected = next;
    }
    true
}

/// Strided element copy for views that are not row-major (e.g. saved transposes).
fn gather(bytes: &[u8], es: usize, t: &TensorRef) -> Result<Vec<u8>, String> {
    let past = "tensor view extends past its storage";
    // The furthest element the view touches; every other index is below it.
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        let span = d.saturating_sub(1).checked_mul(s).ok_or(past)?;
        last = last.checked_add(span).ok_or(past)?;
    }
    let end = last.checked_add(1).and_then(|n| n.checked_mul(es));
    if end.is_none_or(|e| e > bytes.len()) {
        return Err(past.into());
    }
    let numel = checked_numel(&t.shape).ok_or(past)?;
    let mut out = Vec::with_capacity(numel.checked_mul(es).ok_or(past)?);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&bytes[at * es..(at + 1) * es]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_detection_ignores_unit_dims() {
        assert!(is_row_major(&[2, 3], &[3, 1]));
        assert!(is_row_major(&[1, 3], &[7, 1]));
        assert!(!is_row_major(&[2, 3], &[1, 2]));
    }

    #[test]
    fn gather_reads_a_transposed_view() {
        // storage 0..6 as [2,3]; the view is its transpose [3,2] with strides [1,3].
        let bytes: Vec<u8> = (0u8..6).collect();
        let t = TensorRef {
            storage: "0".into(),
            dtype: StorageDtype::U8,
            storage_numel: Some(6),
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(gather(&bytes, 1, &t).unwrap(), vec![0, 3, 1, 4, 2, 5]);
    }
}
