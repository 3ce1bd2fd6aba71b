//! Loading wav2vec 2.0 / HuBERT checkpoints into one canonical naming.
//!
//! Reads Hugging Face directories (`config.json` + `model.safetensors`, sharded safetensors with
//! `model.safetensors.index.json`, or `pytorch_model.bin`),
//! bare `torch.save` state dicts (zip format with any pickle protocol, or the legacy pre-1.6
//! stream format; never executing the pickle), and fairseq `.pt` checkpoints (config taken from
//! the stored `cfg`/`args`). Every tensor is renamed to transformers' `Wav2Vec2Model` /
//! `HubertModel` state-dict key without the `wav2vec2.`/`hubert.` prefix, the positional conv's
//! weight norm always as `encoder.pos_conv_embed.conv.weight_g`/`weight_v`. Heads and
//! pretraining extras (CTC `lm_head`, quantizer, `project_q`, `final_proj`, `label_embs_concat`,
//! `mask_emb`/`masked_spec_embed`) are dropped. Every tensor the config implies must be present
//! with its shape, and no encoder tensor may be left over, so a config that disagrees with the
//! weights is an error, never a silently wrong model.
pub(crate) mod fairseq;
pub(crate) mod pickle;
pub(crate) mod torch;

use self::fairseq::{config_from_fairseq, fairseq_to_canonical, StoredConfigError};
use self::torch::{conversion_hint, StorageDtype, TensorRef, TorchFile};
use crate::models::ssl::config::{
    expected_tensors, PreprocessorConfig, Wav2Vec2Config, MODEL_TYPES,
};
use crate::models::ssl::LinearLayout;
use crate::ops::gemm::transpose;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The parsers behind [`load_checkpoint`], public so that they can be fuzzed and inspected on
/// their own: the non-executing unpickler, the `torch.save` reader and the fairseq config reader.
pub mod parsers {
    pub use super::fairseq::{config_from_fairseq, StoredConfigError};
    pub use super::pickle::{
        lookup, unpickle, unpickle_with_inline_data, InlineData, Node, Pickle, PickleError, Value,
        MAX_NESTING, MAX_NODES, MAX_VALUES,
    };
    pub use super::torch::{StorageDtype, TensorRef, TorchFile};
}

/// Largest `config.json` read: real ones are a few KB.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no weights found (looked for model.safetensors, pytorch_model.bin, or a single .pt/.ckpt/.bin file); pass the weights file itself")]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: model_type \"{model_type}\" is not an encoder speechcache implements (it loads model_type \"wav2vec2\", \"hubert\", \"wavlm\" or \"data2vec-audio\")")]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: no wav2vec2/HuBERT/WavLM/data2vec-audio encoder tensors found among its {count} tensors{example}")]
    NoEncoder {
        path: PathBuf,
        count: usize,
        example: String,
    },
    #[error("{path}: missing tensor {name} (shape {shape:?}) that the config implies; the checkpoint is incomplete or the config does not belong to it")]
    Missing {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
    },
    #[error("{path}: tensor {name} ({stored}) has shape {found:?}, but the config implies {expected:?}; the config does not belong to these weights")]
    Shape {
        path: PathBuf,
        name: String,
        stored: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name} ({stored}) is not part of the model the config describes; the config does not belong to these weights")]
    Unexpected {
        path: PathBuf,
        name: String,
        stored: String,
    },
    #[error("{path}: tensors {first} and {second} both map to {name}")]
    Duplicate {
        path: PathBuf,
        name: String,
        first: String,
        second: String,
    },
    #[error("{path}: cannot load tensor {name}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// A validated checkpoint: canonical tensors plus the configs they go with.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub config: Wav2Vec2Config,
    pub preprocessor: PreprocessorConfig,
    /// Exactly `config::expected_tensors(&config)`, in `dtype` on `device`.
    pub tensors: HashMap<String, Tensor>,
    /// "safetensors", "pytorch" or "fairseq".
    pub format: String,
    /// sha256 of the weights file's bytes (what `sha256sum` prints).
    pub weights_sha256: String,
    /// The weights file that was read.
    pub path: PathBuf,
    /// Where the config came from (a config.json path, or the checkpoint's stored cfg/args).
    pub config_source: String,
    /// The element type the weights are stored in (e.g. "float32", "float16").
    pub stored_dtype: String,
    pub dtype: DType,
    pub device: Device,
    /// How the `nn.Linear` weights in `tensors` are laid out (`[in, out]` when asked for on
    /// a CPU f32 load; see [`load_checkpoint_then`]).
    pub linear_layout: LinearLayout,
}

impl LoadedCheckpoint {
    /// A `VarBuilder` over the canonical tensors, for `Wav2Vec2Model::load`.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device)
    }

    /// Number of encoder parameters, counted from the loaded tensors.
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}

/// Loads a checkpoint directory or file; the config comes from beside it (or from a fairseq
/// checkpoint's stored cfg/args).
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<LoadedCheckpoint, CheckpointError> {
    load_checkpoint_with_config(path, None, device, dtype)
}

/// As [`load_checkpoint`], with an explicit `config.json` that takes precedence over any other.
pub fn load_checkpoint_with_config(
    path: &Path,
    config: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<LoadedCheckpoint, CheckpointError> {
    load_checkpoint_then(path, config, device, dtype, LinearLayout::OutIn, |_| ())
        .map(|(ckpt, ())| ckpt)
}

/// As [`load_checkpoint_with_config`], then runs `then` on the checkpoint (e.g. building the
/// model from it) while the weights are still being hashed on another thread: the hash (part
/// of a feature store's identity) costs no wall time of its own. `then` sees an empty
/// `weights_sha256`; the returned checkpoint has it.
///
/// `linears`: `LinearLayout::InOut` reads the `nn.Linear` weights transposed (`[in, out]`,
/// what the CPU engine's gemm wants) when loading f32 on the CPU, straight out of a mapped
/// f32 safetensors file (one pass instead of a copy and then a transpose); elsewhere the
/// checkpoint's own layout is kept. `LoadedCheckpoint::linear_layout` says which it got.
pub fn load_checkpoint_then<R>(
    path: &Path,
    config: Option<&Path>,
    device: &Device,
    dtype: DType,
    linears: LinearLayout,
    then: impl FnOnce(&mut LoadedCheckpoint) -> R,
) -> Result<(LoadedCheckpoint, R), CheckpointError> {
    let weights = find_weights(path)?;
    let (source, files) = Source::open(&weights)?;
    std::thread::scope(|scope| {
        let hash = scope.spawn(|| cached_sha256(&files));
        let layout = match linears {
            LinearLayout::InOut if device.is_cpu() && dtype == DType::F32 => LinearLayout::InOut,
            _ => LinearLayout::OutIn,
        };
        let opened = load_opened(path, config, device, dtype, layout, &weights, &source);
        let loaded = opened.map(|mut ckpt| {
            let r = then(&mut ckpt);
            (ckpt, r)
        });
        let weights_sha256 = hash.join().map_err(|_| CheckpointError::Unreadable {
            path: weights.clone(),
            reason: "hashing the weights panicked".into(),
        })??;
        loaded.map(|(ckpt, r)| {
            (
                LoadedCheckpoint {
                    weights_sha256,
                    ..ckpt
                },
                r,
            )
        })
    })
}

/// The checkpoint from an opened source; `weights_sha256` is left empty for the caller.
fn load_opened(
    _path: &Path,
    config: Option<&Path>,
    device: &Device,
    dtype: DType,
    layout: LinearLayout,
    weights: &Path,
    source: &Source,
) -> Result<LoadedCheckpoint, CheckpointError> {
    let weights = weights.to_path_buf();
    let (entries, is_fairseq) = source.entries(&weights)?;
    let (cfg, pre, config_source) = resolve_config(&weights, config, source, is_fairseq)?;

    let canonical = canonicalize(&weights, entries)?;
    // Every layer has tensors of its own: a config claiming more layers than the file holds
    // tensors is wrong, and listing its tensors first could take unbounded time and memory.
    if cfg.num_hidden_layers > canonical.len() {
        return Err(CheckpointError::Config {
            path: weights.clone(),
            reason: format!(
                "the config's {} hidden layers cannot fit in the {} encoder tensors of the weights",
                cfg.num_hidden_layers,
                canonical.len()
            ),
        });
    }
    let expected = expected_tensors(&cfg);
    validate(&weights, &canonical, &expected)?;

    let mut stored: HashMap<String, usize> = HashMap::new();
    for (name, _) in &expected {
        *stored.entry(canonical[name].dtype.clone()).or_default() += 1;
    }
    // tensors are read (copied out of the mapped file, converted) in parallel
    let tensors = expected
        .par_iter()
        .map(|(name, shape)| {
            let entry = &canonical[name];
            let transposed = layout == LinearLayout::InOut && is_linear_weight(name, shape);
            let loaded = if transposed {
                source.load_transposed(entry, shape, device)
            } else {
                source.load(entry, device)
            };
            loaded
                .and_then(|t| {
                    if !entry.is_float {
                        return Err(format!("stored as {}, not floating point", entry.dtype));
                    }
                    t.to_dtype(dtype).map_err(|e| e.to_string())
                })
                .map(|t| (name.clone(), t))
                .map_err(|reason| CheckpointError::Tensor {
                    path: weights.clone(),
                    name: format!("{name} (stored as {})", entry.original),
                    reason,
                })
        })
        .collect::<Result<HashMap<_, _>, _>>()?;
    let stored_dtype = stored
        .into_iter()
        .max_by_key(|(d, n)| (*n, d.clone()))
        .map(|(d, _)| d)
        .unwrap_or_default();
    Ok(LoadedCheckpoint {
        config: cfg,
        preprocessor: pre,
        tensors,
        format: if is_fairseq {
            "fairseq".into()
        } else {
            source.format_name().into()
        },
        weights_sha256: String::new(),
        path: weights,
        config_source,
        stored_dtype,
        dtype,
        device: device.clone(),
        linear_layout: layout,
    })
}

/// The weights file for a path: the file itself, or the preferred file in a directory.
fn find_weights(path: &Path) -> Result<PathBuf, CheckpointError> {
    let meta = std::fs::metadata(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        // Opening a FIFO or device would block or read forever: only regular files are weights.
        if !meta.is_file() {
            return Err(CheckpointError::Unreadable {
                path: path.to_path_buf(),
                reason: "not a regular file (weights must be a file or a model directory)".into(),
            });
        }
        return Ok(path.to_path_buf());
    }
    for name in [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ] {
        let p = path.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let listing = std::fs::read_dir(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut candidates: Vec<PathBuf> = listing
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("pt" | "ckpt" | "bin" | "safetensors")
                )
        })
        .collect();
    candidates.sort();
    match candidates.len() {
        1 => Ok(candidates.remove(0)),
        _ => Err(CheckpointError::NoWeights {
            dir: path.to_path_buf(),
        }),
    }
}

/// A tensor as listed in the file, before loading.
struct Entry {
    original: String,
    shape: Vec<usize>,
    dtype: String,
    is_float: bool,
    handle: Handle,
}

enum Handle {
    Safetensors(String),
    Torch(TensorRef),
}

enum Source {
    Safetensors(MmapedSafetensors),
    Torch(TorchFile),
}

impl Source {
    /// Opens the weights and lists the files whose bytes they are.
    fn open(path: &Path) -> Result<(Source, Vec<PathBuf>), CheckpointError> {
        let unreadable = |reason: String| CheckpointError::Unreadable {
            path: path.to_path_buf(),
            reason,
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors.index.json") {
            let shards = safetensors_shards(path)?;
            // SAFETY: read-only mappings of model files nobody rewrites while we load them.
            let st = unsafe { MmapedSafetensors::multi(&shards) }
                .map_err(|e| unreadable(format!("invalid safetensors shard: {e}")))?;
            return Ok((Source::Safetensors(st), shards));
        }
        if name.ends_with(".bin.index.json") {
            return Err(unreadable(
                "sharded pytorch_model.bin checkpoints are not supported; convert them with \
                 transformers: AutoModel.from_pretrained(DIR).save_pretrained(OUT, \
                 safe_serialization=True, max_shard_size='100GB')"
                    .into(),
            ));
        }
        let files = vec![path.to_path_buf()];
        let mut head = [0u8; 512];
        let n = std::fs::File::open(path)
            .and_then(|mut f| read_up_to(&mut f, &mut head))
            .map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let head = &head[..n];
        if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
            return TorchFile::open(path)
                .map(|t| (Source::Torch(t), files))
                .map_err(|r| unreadable(format!("{r}; {}", conversion_hint(path))));
        }
        if head.len() > 262 && &head[257..262] == b"ustar" {
            return Err(unreadable(format!(
                "a tar-format torch file (PyTorch < 0.4) is not supported; {}",
                conversion_hint(path)
            )));
        }
        if head.len() > 8 && head[8] == b'{' {
            // SAFETY: read-only mapping of a model file nobody rewrites while we load it.
            return unsafe { MmapedSafetensors::new(path) }
                .map(|st| (Source::Safetensors(st), files))
                .map_err(|e| unreadable(format!("invalid safetensors file: {e}")));
        }
        Err(unreadable(
            "neither a safetensors file nor a PyTorch/fairseq checkpoint".into(),
        ))
    }

    fn format_name(&self) -> &'static str {
        match self {
            Source::Safetensors(_) => "safetensors",
            Source::Torch(_) => "pytorch",
        }
    }

    /// The tensors of the state dict, and whether the file is a fairseq training checkpoint.
    fn entries(&self, path: &Path) -> Result<(Vec<Entry>, bool), CheckpointError> {
        match self {
            Source::Safetensors(st) => {
                let mut out = Vec::new();
                for (name, view) in st.tensors() {
                    let dtype = format!("{:?}", view.dtype()).to_lowercase();
                    let is_float = matches!(
                        view.dtype(),
                        safetensors::Dtype::F16
                            | safetensors::Dtype::BF16
                            | safetensors::Dtype::F32
                            | safetensors::Dtype::F64
                    );
                    out.push(Entry {
                        original: name.clone(),
                        shape: view.shape().to_vec(),
                        dtype: float_name(&dtype),
                        is_float,
                        handle: Handle::Safetensors(name),
                    });
                }
                out.sort_by(|a, b| a.original.cmp(&b.original));
                Ok((out, false))
            }
            Source::Torch(tf) => {
                let p = &tf.pickle;
                let root = &tf.root;
                let has = |k: &str| p.get(root, k).is_some();
                let (dict, fairseq) = match p.get(root, "model") {
                    Some(model) if p.entries(model).is_some() => (model, has("cfg") || has("args")),
                    _ => match p.get(root, "state_dict") {
                        Some(sd) if p.entries(sd).is_some() => (sd, false),
                        _ => (root, false),
                    },
                };
                let refs =
                    tf.tensor_entries(dict)
                        .map_err(|reason| CheckpointError::Unreadable {
                            path: path.to_path_buf(),
                            reason,
                        })?;
                let out = refs
                    .into_iter()
                    .map(|(name, t)| Entry {
                        original: name,
                        shape: t.shape.clone(),
                        dtype: torch_dtype_name(&t.dtype),
                        is_float: t.dtype.is_float(),
                        handle: Handle::Torch(t),
                    })
                    .collect();
                Ok((out, fairseq))
            }
        }
    }

    /// A 2-D `[rows, cols]` float tensor as f32 `[cols, rows]` on the CPU: transposed straight
    /// out of the mapped file when it stores aligned little-endian f32, else loaded, converted
    /// and then transposed.
    fn load_transposed(
        &self,
        e: &Entry,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, String> {
        let (rows, cols) = (shape[0], shape[1]);
        let data = match (self, &e.handle) {
            (Source::Safetensors(st), Handle::Safetensors(name)) => {
                let view = st.get(name).map_err(|e| e.to_string())?;
                let bytes = view.data();
                let aligned = bytes.as_ptr() as usize % std::mem::align_of::<f32>() == 0;
                if view.dtype() == safetensors::Dtype::F32
                    && aligned
                    && cfg!(target_endian = "little")
                    && rows
                        .checked_mul(cols)
                        .and_then(|n| n.checked_mul(4))
                        .is_some_and(|n| n == bytes.len())
                {
                    populate_mapped(bytes);
                    Some(transpose(bytemuck::cast_slice(bytes), rows, cols))
                } else {
                    None
                }
            }
            _ => None,
        };
        let data = match data {
            Some(d) => d,
            None => {
                let t = self.load(e, device)?;
                if !e.is_float {
                    return Err(format!("stored as {}, not floating point", e.dtype));
                }
                let v = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?;
                transpose(&v, rows, cols)
            }
        };
        Tensor::from_vec(data, (cols, rows), device).map_err(|e| e.to_string())
    }

    fn load(&self, e: &Entry, device: &Device) -> Result<Tensor, String> {
        match (self, &e.handle) {
            (Source::Safetensors(st), Handle::Safetensors(name)) => {
                st.load(name, device).map_err(|e| e.to_string())
            }
            (Source::Torch(tf), Handle::Torch(t)) => tf.materialize(t, device),
            _ => Err("internal: tensor handle from another file".into()),
        }
    }
}

/// Maps a mapped file's pages for `bytes` in one call (`MADV_POPULATE_READ`, Linux 5.14+)
/// before a transpose reads them out of order: one fault per page, taken column by column,
/// cost more than the transpose itself. Best effort: older kernels refuse it, harmlessly.
fn populate_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_READ: libc::c_int = 22;
        let page = 4096usize;
        let start = bytes.as_ptr() as usize & !(page - 1);
        let end = bytes.as_ptr() as usize + bytes.len();
        // SAFETY: the range covers pages of a live read-only mapping (the bytes' own pages);
        // MADV_POPULATE_READ only faults them in, it never changes their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_READ);
        }
    }
}

/// The canonical names of the `nn.Linear` weights (`[out, in]` in every checkpoint format).
fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && (name.ends_with("_proj.weight")
            || name.ends_with("_dense.weight")
            || name == "feature_projection.projection.weight")
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn float_name(safetensors_dtype: &str) -> String {
    match safetensors_dtype {
        "f32" => "float32".into(),
        "f16" => "float16".into(),
        "bf16" => "bfloat16".into(),
        "f64" => "float64".into(),
        other => other.into(),
    }
}

fn torch_dtype_name(d: &StorageDtype) -> String {
    match d {
        StorageDtype::F32 => "float32".into(),
        StorageDtype::F64 => "float64".into(),
        StorageDtype::F16 => "float16".into(),
        StorageDtype::BF16 => "bfloat16".into(),
        StorageDtype::I64 => "int64".into(),
        StorageDtype::I32 => "int32".into(),
        StorageDtype::I16 => "int16".into(),
        StorageDtype::I8 => "int8".into(),
        StorageDtype::U8 => "uint8".into(),
        StorageDtype::Bool => "bool".into(),
        StorageDtype::Other(n) => n.clone(),
    }
}

/// Picks the config: an explicit file, else a fairseq checkpoint's stored cfg/args, else the
/// `config.json` beside the weights.
fn resolve_config(
    weights: &Path,
    explicit: Option<&Path>,
    source: &Source,
    is_fairseq: bool,
) -> Result<(Wav2Vec2Config, PreprocessorConfig, String), CheckpointError> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let beside_pre = || -> Result<Option<PreprocessorConfig>, CheckpointError> {
        let p = dir.join("preprocessor_config.json");
        if !p.is_file() {
            return Ok(None);
        }
        PreprocessorConfig::from_file(&p)
            .map(Some)
            .map_err(|e| CheckpointError::Config {
                path: p.clone(),
                reason: e.to_string(),
            })
    };
    if let Some(cfg_path) = explicit {
        let cfg = read_config_json(cfg_path)?;
        let pre_next_to_cfg = cfg_path
            .parent()
            .map(|d| d.join("preprocessor_config.json"))
            .filter(|p| p.is_file());
        let pre = match pre_next_to_cfg {
            Some(p) => PreprocessorConfig::from_file(&p).map_err(|e| CheckpointError::Config {
                path: p.clone(),
                reason: e.to_string(),
            })?,
            None => beside_pre()?.unwrap_or_default(),
        };
        return Ok((cfg, pre, cfg_path.display().to_string()));
    }
    let beside = dir.join("config.json");
    if is_fairseq {
        if let Source::Torch(tf) = source {
            match config_from_fairseq(&tf.pickle, &tf.root) {
                Ok((cfg, stored_pre)) => {
                    check_model_type(weights, &cfg)?;
                    cfg.validate().map_err(|e| CheckpointError::Config {
                        path: weights.to_path_buf(),
                        reason: format!("stored fairseq config: {e}"),
                    })?;
                    let pre = beside_pre()?.unwrap_or(stored_pre);
                    return Ok((cfg, pre, "fairseq checkpoint (stored cfg/args)".into()));
                }
                Err(StoredConfigError::UnsupportedModel(name)) => {
                    return Err(CheckpointError::UnsupportedModel {
                        path: weights.to_path_buf(),
                        model_type: name,
                    })
                }
                Err(StoredConfigError::NotImplemented(reason)) => {
                    return Err(CheckpointError::Config {
                        path: weights.to_path_buf(),
                        reason: format!("not implemented: {reason}"),
                    })
                }
                Err(StoredConfigError::Unreadable(reason)) if !beside.is_file() => {
                    return Err(CheckpointError::Config {
                        path: weights.to_path_buf(),
                        reason: format!(
                            "cannot read the model config stored in this fairseq checkpoint: {reason}; \
                             pass --config with a transformers config.json for it"
                        ),
                    })
                }
                Err(_) => {}
            }
        }
    }
    if !beside.is_file() {
        return Err(CheckpointError::Config {
            path: weights.to_path_buf(),
            reason: format!(
                "no config.json beside the weights (looked for {}); pass --config config.json",
                beside.display()
            ),
        });
    }
    let cfg = read_config_json(&beside)?;
    let pre = beside_pre()?.unwrap_or_default();
    Ok((cfg, pre, beside.display().to_string()))
}

fn read_config_json(path: &Path) -> Result<Wav2Vec2Config, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return Err(CheckpointError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "not a config.json: {}",
                if meta.is_file() {
                    format!("{} bytes, more than any config", meta.len())
                } else {
                    "not a regular file".into()
                }
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let cfg = Wav2Vec2Config::from_json_str(&text).map_err(|e| CheckpointError::Config {
        path: path.to_path_buf(),
        reason: format!("invalid config.json: {e}"),
    })?;
    // A config without model_type is not a transformers model config at all.
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if raw.get("model_type").is_none() {
        return Err(CheckpointError::Config {
            path: path.to_path_buf(),
            reason: format!("config.json has no model_type (expected {MODEL_TYPES})"),
        });
    }
    check_model_type(path, &cfg)?;
    cfg.validate().map_err(|e| CheckpointError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(cfg)
}

fn check_model_type(path: &Path, cfg: &Wav2Vec2Config) -> Result<(), CheckpointError> {
    match cfg.model_type.as_str() {
        "wav2vec2" | "hubert" | "wavlm" | "data2vec-audio" => Ok(()),
        other => Err(CheckpointError::UnsupportedModel {
            path: path.to_path_buf(),
            model_type: other.to_string(),
        }),
    }
}

/// Prefixes of the encoder's own tensors; anything else (heads, quantizer...) is dropped.
const ENCODER_PREFIXES: [&str; 3] = ["feature_extractor.", "feature_projection.", "encoder."];

/// Canonical name of a stored tensor name (HF with or without model prefix, or fairseq).
pub fn canonical_name(name: &str) -> String {
    let mut n = name;
    loop {
        let before = n;
        for prefix in [
            "module.",
            "wav2vec2.",
            "hubert.",
            "wavlm.",
            "data2vec_audio.",
            "w2v_encoder.w2v_model.",
            "w2v_model.",
        ] {
            n = n.strip_prefix(prefix).unwrap_or(n);
        }
        if n == before {
            break;
        }
    }
    let n = n
        .replace("parametrizations.weight.original0", "weight_g")
        .replace("parametrizations.weight.original1", "weight_v");
    fairseq_to_canonical(&n)
}

fn canonicalize(
    path: &Path,
    entries: Vec<Entry>,
) -> Result<HashMap<String, Entry>, CheckpointError> {
    let total = entries.len();
    let example = entries
        .iter()
        .take(3)
        .map(|e| e.original.clone())
        .collect::<Vec<_>>();
    let mut out: HashMap<String, Entry> = HashMap::new();
    for e in entries {
        let name = canonical_name(&e.original);
        if !ENCODER_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if let Some(prev) = out.get(&name) {
            return Err(CheckpointError::Duplicate {
                path: path.to_path_buf(),
                name,
                first: prev.original.clone(),
                second: e.original,
            });
        }
        out.insert(name, e);
    }
    if out.is_empty() {
        return Err(CheckpointError::NoEncoder {
            path: path.to_path_buf(),
            count: total,
            example: if example.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", example.join(", "))
            },
        });
    }
    Ok(out)
}

fn validate(
    path: &Path,
    found: &HashMap<String, Entry>,
    expected: &[(String, Vec<usize>)],
) -> Result<(), CheckpointError> {
    for (name, shape) in expected {
        let Some(e) = found.get(name) else {
            return Err(CheckpointError::Missing {
                path: path.to_path_buf(),
                name: name.clone(),
                shape: shape.clone(),
            });
        };
        if &e.shape != shape {
            return Err(CheckpointError::Shape {
                path: path.to_path_buf(),
                name: name.clone(),
                stored: stored_as(name, e),
                found: e.shape.clone(),
                expected: shape.clone(),
            });
        }
    }
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<(&String, &Entry)> = found
        .iter()
        .filter(|(n, _)| !wanted.contains(n.as_str()))
        .collect();
    extra.sort_by(|a, b| a.0.cmp(b.0));
    if let Some((name, e)) = extra.first() {
        return Err(CheckpointError::Unexpected {
            path: path.to_path_buf(),
            name: (*name).clone(),
            stored: stored_as(name, e),
        });
    }
    Ok(())
}

fn stored_as(name: &str, e: &Entry) -> String {
    if e.original == name {
        "stored under that name".into()
    } else {
        format!("stored as {}", e.original)
    }
}

/// [`sha256_files`], remembered across runs: a checkpoint is hashed once, and later runs read
/// the hash back while every file's device, inode, size, mtime and ctime are unchanged (as
/// git's index and DVC's state do). Files modified within the last 2 s are not remembered
/// (their mtime could still change within the same tick). The cache is
/// `$SPEECHCACHE_CACHE_DIR` or `$XDG_CACHE_HOME/speechcache` (`~/.cache/speechcache`);
/// `SPEECHCACHE_CACHE_DIR=off` turns it off. A cache that cannot be read or written is ignored.
pub fn cached_sha256(paths: &[PathBuf]) -> Result<String, CheckpointError> {
    sha256_with_cache(hash_cache_file().as_deref(), paths)
}

/// [`cached_sha256`] with the cache file given (`None`: no cache).
pub fn sha256_with_cache(
    cache: Option<&Path>,
    paths: &[PathBuf],
) -> Result<String, CheckpointError> {
    let Some((cache, key)) = cache.zip(files_identity(paths)) else {
        return sha256_files(paths);
    };
    let mut known: HashMap<String, String> = std::fs::read_to_string(cache)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if let Some(hash) = known.get(&key) {
        return Ok(hash.clone());
    }
    let hash = sha256_files(paths)?;
    // unchanged while we read, and not modified within the last 2 s
    let settled = files_identity(paths).as_deref() == Some(key.as_str())
        && paths.iter().all(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs_f64() > 2.0)
        });
    if settled {
        known.insert(key, hash.clone());
        if let (Some(dir), Ok(text)) = (cache.parent(), serde_json::to_string(&known)) {
            let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
            let written = std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&tmp, text))
                .and_then(|_| std::fs::rename(&tmp, cache));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(hash)
}

fn hash_cache_file() -> Option<PathBuf> {
    let dir = match std::env::var_os("SPEECHCACHE_CACHE_DIR") {
        Some(d) if d == "off" => return None,
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
            .join("speechcache"),
    };
    Some(dir.join("weights-sha256.json"))
}

/// One string naming the exact state of `paths`: canonical path, device, inode, size, mtime
/// and ctime (ns) of each.
fn files_identity(paths: &[PathBuf]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut parts = Vec::with_capacity(paths.len());
    for p in paths {
        let m = std::fs::metadata(p).ok()?;
        let path = std::fs::canonicalize(p).ok()?;
        parts.push(format!(
            "{}|{}:{}|{}|{}.{}|{}.{}",
            path.display(),
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ));
    }
    Some(parts.join("\n"))
}

/// sha256 of the weights bytes; for a sharded checkpoint, of its shards concatenated in index
/// order (`cat shard1 shard2 ... | sha256sum`).
pub fn sha256_files(paths: &[PathBuf]) -> Result<String, CheckpointError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The shard files a `model.safetensors.index.json` names, in first-mention order.
fn safetensors_shards(index: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let unreadable = |reason: String| CheckpointError::Unreadable {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|source| CheckpointError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| unreadable(format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| unreadable("no weight_map object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| unreadable("weight_map values must be file names".into()))?;
        // Shards sit beside their index: a path elsewhere (absolute, `..`) is refused.
        let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file);
        if !plain || file == ".." {
            return Err(unreadable(format!(
                "weight_map names {file:?}, which is not a file name in {}",
                dir.display()
            )));
        }
        let p = dir.join(file);
        if !p.is_file() {
            return Err(unreadable(format!(
                "shard {} is missing or not a regular file",
                p.display()
            )));
        }
        if !files.contains(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(unreadable("weight_map is empty".into()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_of_every_flavour() {
        for (stored, canonical) in [
            (
                "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0",
                "encoder.pos_conv_embed.conv.weight_g",
            ),
            (
                "hubert.encoder.pos_conv_embed.conv.weight_v",
                "encoder.pos_conv_embed.conv.weight_v",
            ),
            (
                "w2v_encoder.w2v_model.encoder.pos_conv.0.weight_v",
                "encoder.pos_conv_embed.conv.weight_v",
            ),
            (
                "w2v_encoder.w2v_model.layer_norm.weight",
                "feature_projection.layer_norm.weight",
            ),
            (
                "encoder.layers.0.attention.q_proj.weight",
                "encoder.layers.0.attention.q_proj.weight",
            ),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(canonical_name(stored), canonical, "{stored}");
        }
    }
}
