//! `torch.save` files read without executing them: the zip format (torch ≥ 1.6, any pickle
//! protocol) and the legacy stream format (magic number, protocol and sys_info pickles, the
//! object pickle, the storage key list, then the raw storages back to back).
use super::pickle_vm::{unpickle, Node, Pickle, Value};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

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
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

enum StorageBytes {
    Mapped { start: usize, len: usize },
    Owned(Vec<u8>),
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
         sd = torch.load('{}', map_location='cpu'); sd = sd.get('model', sd); \
         save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, 'model.safetensors')\" \
         and pass the directory holding model.safetensors and config.json",
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

    fn open_zip(mmap: Mmap) -> Result<TorchFile, String> {
        let mut storages = HashMap::new();
        let mut pkl: Option<Vec<u8>> = None;
        let mut big_endian = false;
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
            for (i, name) in names.iter().enumerate() {
                let is_pkl = *name == pkl_name;
                let key = name.strip_prefix(&format!("{prefix}data/"));
                let is_byteorder = *name == format!("{prefix}byteorder");
                if !is_pkl && key.is_none() && !is_byteorder {
                    continue;
                }
                let mut entry = archive
                    .by_index(i)
                    .map_err(|e| format!("zip entry {name}: {e}"))?;
                let stored = entry.compression() == zip::CompressionMethod::Stored;
                let bytes = match (stored, entry.data_start()) {
                    (true, Some(start)) => StorageBytes::Mapped {
                        start: start as usize,
                        len: entry.size() as usize,
                    },
                    _ => {
                        // The header's size is untrusted: let the buffer grow as data arrives.
                        let mut buf = Vec::with_capacity((entry.size() as usize).min(1 << 26));
                        entry
                            .read_to_end(&mut buf)
                            .map_err(|e| format!("zip entry {name}: {e}"))?;
                        StorageBytes::Owned(buf)
                    }
                };
                let data =
                    slice_of(&mmap, &bytes).ok_or(format!("zip entry {name} out of file"))?;
                if is_pkl {
                    pkl = Some(data.to_vec());
                } else if is_byteorder {
                    big_endian = data.starts_with(b"big");
                } else if let Some(key) = key {
                    storages.insert(key.to_string(), bytes);
                }
            }
        }
        if big_endian {
            return Err("big-endian torch file is not supported".into());
        }
        let pkl = pkl.ok_or("zip archive has no data.pkl")?;
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
        if magic.root != Some(Value::BigInt(LEGACY_MAGIC.to_vec())) {
            return Err("not a PyTorch legacy file (wrong magic number)".into());
        }
        let protocol = next("protocol version")?;
        if protocol.root != Some(Value::Int(1001)) {
            return Err(format!(
                "unsupported legacy protocol version {:?}",
                protocol.root
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
            let key = key_string(key).ok_or("storage key is not a string")?;
            let dtype = dtypes
                .get(&key)
                .ok_or(format!("storage {key} is listed but never referenced"))?;
            let size = dtype
                .size()
                .ok_or(format!("storage {key} has unsupported type {dtype:?}"))?;
            // Each storage: its element count as little-endian i64, then the raw elements.
            let head = mmap
                .get(pos..pos + 8)
                .ok_or(format!("file ends before storage {key}"))?;
            let mut n = [0u8; 8];
            n.copy_from_slice(head);
            let numel = u64::from_le_bytes(n) as usize;
            let len = numel
                .checked_mul(size)
                .filter(|&l| l <= mmap.len() - (pos + 8))
                .ok_or(format!("file ends inside storage {key}"))?;
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
                Some(Ok(t)) => out.push((name.clone(), t)),
                Some(Err(e)) => return Err(format!("tensor {name}: {e}")),
                None => {}
            }
        }
        Ok(out)
    }

    /// `Some` when `v` is a tensor rebuild call (plain, Parameter, or subclass wrapper).
    pub fn tensor_ref(&self, v: &Value) -> Option<Result<TensorRef, String>> {
        let Node::Object { callable, args, .. } = self.pickle.node(v)? else {
            return None;
        };
        let (_, name) = self.pickle.global_name(callable)?;
        let args = self.pickle.seq(args)?;
        match name {
            "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(self.rebuild_tensor(args)),
            "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
                self.tensor_ref(args.first()?)
            }
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
        let (key, dtype) = storage_id(&self.pickle, pid).ok_or("unreadable storage id")?;
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
            offset: usize::try_from(*offset).map_err(|_| "negative storage offset")?,
            shape,
            stride,
        })
    }

    /// Copies a tensor's elements (any strides) into a tensor on `device`, in its stored dtype.
    pub fn materialize(&self, t: &TensorRef, device: &Device) -> Result<Tensor, String> {
        let bytes = self
            .storages
            .get(&t.storage)
            .and_then(|b| slice_of(&self.mmap, b))
            .ok_or(format!("storage {} is missing from the file", t.storage))?;
        let es = t
            .dtype
            .size()
            .ok_or(format!("unsupported storage type {:?}", t.dtype))?;
        let past = "tensor extends past its storage";
        let numel = checked_numel(&t.shape).ok_or(past)?;
        let gathered;
        let raw: &[u8] = if numel == 0 {
            &[]
        } else if is_row_major(&t.shape, &t.stride) {
            let start = t.offset.checked_mul(es).ok_or(past)?;
            let end = numel
                .checked_mul(es)
                .and_then(|n| n.checked_add(start))
                .ok_or(past)?;
            bytes.get(start..end).ok_or(past)?
        } else {
            gathered = gather(bytes, es, t)?;
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

fn slice_of<'m>(mmap: &'m Mmap, b: &'m StorageBytes) -> Option<&'m [u8]> {
    match b {
        StorageBytes::Mapped { start, len } => mmap.get(*start..start.checked_add(*len)?),
        StorageBytes::Owned(v) => Some(v),
    }
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `('storage', torch.XStorage, key, location, numel[, view_metadata])` → key and dtype.
fn storage_id(p: &Pickle, pid: &Value) -> Option<(String, StorageDtype)> {
    let items = p.seq(pid)?;
    if items.first() != Some(&Value::Str("storage".into())) {
        return None;
    }
    let (_, class) = p.global_name(items.get(1)?)?;
    Some((key_string(items.get(2)?)?, StorageDtype::from_class(class)))
}

fn storage_dtypes(p: &Pickle) -> HashMap<String, StorageDtype> {
    p.nodes
        .iter()
        .filter_map(|n| match n {
            Node::PersistentId(pid) => storage_id(p, pid),
            _ => None,
        })
        .collect()
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
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
    let mut out = Vec::with_capacity(numel * es);
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
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(gather(&bytes, 1, &t).unwrap(), vec![0, 3, 1, 4, 2, 5]);
    }
}
