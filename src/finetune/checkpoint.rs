//! Parameters and checkpoints: seeded initialisation, safetensors files with a JSON sidecar,
//! n-best averaging.
//!
//! Layout under `EXP/checkpoints/`:
//! - `last.safetensors` + `last.json`: model and optimiser state where training stopped
//!   (end of an epoch, or `--max-steps`); `--resume` continues from it.
//! - `epoch_NNNN.safetensors` + `epoch_NNNN.json`: model weights after epoch N, kept while the
//!   epoch is among the `keep_nbest` best by validation loss.
//!
//! `EXP/avg.safetensors` (+ `avg.json`) is the mean of the kept epochs' weights.
//!
//! Each `.json` is a copy of the description held in its tensor file's header, which is the
//! one read back: one rename replaces both, so a `kill -9` while saving leaves either the old
//! or the new checkpoint, never new tensors described by an old sidecar.
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::finetune::data::mix_seed;
use crate::finetune::optim::NamedVars;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A `VarBuilder` backend that creates trainable vars like `VarMap`, but draws their initial
/// values from a ChaCha stream seeded by (seed, var name): candle's CPU RNG cannot be seeded,
/// and a reproducible run needs a reproducible initialisation.
#[derive(Clone)]
pub struct SeededVars {
    vars: Arc<Mutex<HashMap<String, Var>>>,
    seed: u64,
}

impl SeededVars {
    pub fn new(seed: u64) -> Self {
        Self {
            vars: Arc::new(Mutex::new(HashMap::new())),
            seed,
        }
    }

    /// All vars sorted by name (the optimiser's and the checkpoint's order).
    pub fn named_vars(&self) -> NamedVars {
        let map = match self.vars.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut v: NamedVars = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn init_tensor(&self, shape: &Shape, name: &str, init: Init, dev: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.seed, &[0x1417, name_hash]));
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, n, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan.for_shape(shape);
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, n, -bound, bound)
                    }
                    candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
                }
            }
        };
        Tensor::from_vec(values, shape.clone(), dev)
    }
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
        .collect()
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    // Box-Muller; rand_distr is not a dependency
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mean + std * z) as f32
        })
        .collect()
}

impl SimpleBackend for SeededVars {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut map = match self.vars.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(v) = map.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let t = self.init_tensor(&s, name, h, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        map.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: every parameter needs a shape at creation")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.vars.lock() {
            Ok(m) => m.contains_key(name),
            Err(p) => p.into_inner().contains_key(name),
        }
    }
}

/// Where training stood when a checkpoint was written (the JSON sidecar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The epoch this checkpoint belongs to (1-based).
    pub epoch: usize,
    /// Batches of `epoch` already consumed; equals the epoch's batch count when it is complete.
    pub batches_done: usize,
    pub epoch_complete: bool,
    /// Optimiser steps taken so far.
    pub step: u64,
    /// Base seed. All randomness (init, batch order, SpecAugment) is drawn from ChaCha8
    /// streams seeded by (seed, epoch, batch), so this plus the position is the RNG state.
    pub seed: u64,
    pub rng: String,
    /// Validation results per completed epoch so far (n-best selection needs them all).
    pub history: Vec<EpochResult>,
    /// Sum of per-utterance training losses and utterance count over the batches of
    /// `epoch` done so far (so a resumed epoch reports the same mean train loss).
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub epoch_utts: usize,
}

/// One epoch's summary (also a line of `EXP/epoch_log.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochResult {
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_cer: f64,
    pub valid_utts: usize,
}

pub const RNG_SCHEME: &str =
    "chacha8(splitmix(seed, epoch, batch)); dropout masks: splitmix64(key, position)";

pub fn checkpoint_dir(exp: &Path) -> PathBuf {
    exp.join("checkpoints")
}

pub fn epoch_path(exp: &Path, epoch: usize) -> PathBuf {
    checkpoint_dir(exp).join(format!("epoch_{epoch:04}.safetensors"))
}

pub fn last_path(exp: &Path) -> PathBuf {
    checkpoint_dir(exp).join("last.safetensors")
}

pub fn avg_path(exp: &Path) -> PathBuf {
    exp.join("avg.safetensors")
}

/// The sidecar next to a `.safetensors` file.
pub fn sidecar(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Key of the checkpoint's own description in the safetensors header's `__metadata__`.
pub const META_KEY: &str = "speechcache.meta";

/// Largest safetensors header read for its metadata (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Write tensors and an optional description atomically (temporary name, fsync, rename).
///
/// The description is stored inside the tensor file's header (`__metadata__`), so tensors and
/// description change together in one rename and a kill at any point leaves a matching pair;
/// the `.json` sidecar written after it is a readable copy, which `load_meta` never prefers.
pub fn save<T: Serialize>(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: Option<&T>,
) -> std::result::Result<(), CheckpointError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let side = sidecar(path);
    let text = meta
        .map(serde_json::to_string_pretty)
        .transpose()
        .map_err(|e| file_err(&side, e))?;
    let header = text
        .as_ref()
        .map(|t| HashMap::from([(META_KEY.to_string(), t.clone())]));
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let bytes = safetensors::serialize(map.iter().map(|(k, v)| (k.as_str(), v)), header)
        .map_err(|e| file_err(path, e))?;
    write_atomic(path, &bytes)?;
    if let Some(text) = text {
        write_atomic(&side, text.as_bytes())?;
    }
    Ok(())
}

/// Replace `path` atomically: write `NAME.tmp` beside it (created anew, never through a
/// symlink someone planted there), fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::result::Result<(), CheckpointError> {
    crate::regular_file::write_atomic(path, bytes).map_err(|(at, e)| file_err(&at, e))
}

/// Read every tensor of a safetensors file onto `device`.
pub fn load_tensors(
    path: &Path,
    device: &Device,
) -> std::result::Result<HashMap<String, Tensor>, CheckpointError> {
    if !path.is_file() {
        return Err(file_err(path, "checkpoint not found"));
    }
    candle_core::safetensors::load(path, device).map_err(|e| file_err(path, e))
}

/// The description stored in a safetensors file's header by `save` (None for files written
/// before descriptions were embedded, or without one).
pub fn embedded_meta(path: &Path) -> std::result::Result<Option<String>, CheckpointError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let size = f.metadata().map_err(|e| file_err(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| file_err(path, format!("not a safetensors file ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES || len > size.saturating_sub(8) {
        return Err(file_err(
            path,
            format!("not a safetensors file: header of {len} bytes in a file of {size}"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| file_err(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| file_err(path, format!("safetensors header is not JSON ({e})")))?;
    Ok(header["__metadata__"][META_KEY].as_str().map(String::from))
}

/// The description of a checkpoint: the one inside the tensor file, else (older files) the
/// sidecar.
pub fn load_meta<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> std::result::Result<T, CheckpointError> {
    if let Some(text) = embedded_meta(path)? {
        return serde_json::from_str(&text)
            .map_err(|e| file_err(path, format!("checkpoint description: {e}")));
    }
    let side = sidecar(path);
    let text = std::fs::read_to_string(&side).map_err(|e| file_err(&side, e))?;
    serde_json::from_str(&text).map_err(|e| file_err(&side, e))
}

/// Rewrite the sidecar of `path` from the description inside it when the two differ (a run
/// killed between writing the tensor file and its sidecar). True when it was rewritten.
pub fn repair_sidecar(path: &Path) -> std::result::Result<bool, CheckpointError> {
    let Some(text) = embedded_meta(path)? else {
        return Ok(false);
    };
    let side = sidecar(path);
    match std::fs::read_to_string(&side) {
        Ok(current) if current == text => Ok(false),
        _ => write_atomic(&side, text.as_bytes()).map(|()| true),
    }
}

/// The model tensors to save, by parameter name.
pub fn model_tensors(vars: &NamedVars) -> Vec<(String, Tensor)> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// Set every var from `tensors` (all must be present with the same shape).
pub fn assign(
    vars: &NamedVars,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> std::result::Result<(), CheckpointError> {
    for (name, var) in vars {
        let t = tensors.get(name).ok_or_else(|| {
            file_err(
                path,
                format!("has no parameter {name}: was it written by another model config?"),
            )
        })?;
        if t.dims() != var.dims() {
            return Err(file_err(
                path,
                format!(
                    "parameter {name} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        let t = t
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .map_err(|e| file_err(path, e))?;
        var.set(&t).map_err(|e| file_err(path, e))?;
    }
    Ok(())
}

/// The epochs to keep: the `n` lowest validation losses (ties: earlier epoch first).
pub fn nbest(history: &[EpochResult], n: usize) -> Vec<usize> {
    let mut h: Vec<&EpochResult> = history
        .iter()
        .filter(|r| r.valid_loss.is_finite())
        .collect();
    h.sort_by(|a, b| {
        a.valid_loss
            .total_cmp(&b.valid_loss)
            .then(a.epoch.cmp(&b.epoch))
    });
    let mut epochs: Vec<usize> = h.iter().take(n).map(|r| r.epoch).collect();
    epochs.sort_unstable();
    epochs
}

/// Element-wise mean of the model weights of `epochs` (ESPnet average_nbest_models).
pub fn average(
    exp: &Path,
    epochs: &[usize],
    device: &Device,
) -> std::result::Result<Vec<(String, Tensor)>, CheckpointError> {
    let mut sum: Option<HashMap<String, Tensor>> = None;
    for &e in epochs {
        let path = epoch_path(exp, e);
        let t = load_tensors(&path, device)?;
        sum = Some(match sum {
            None => t
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(DType::F64)?)))
                .collect::<Result<_>>()
                .map_err(|e| file_err(&path, e))?,
            Some(mut acc) => {
                for (k, a) in acc.iter_mut() {
                    let v = t
                        .get(k)
                        .ok_or_else(|| file_err(&path, format!("has no parameter {k}")))?;
                    *a = v
                        .to_dtype(DType::F64)
                        .and_then(|v| a.add(&v))
                        .map_err(|e| file_err(&path, e))?;
                }
                acc
            }
        });
    }
    let sum = sum.ok_or_else(|| file_err(exp, "no epoch checkpoint to average"))?;
    let n = epochs.len() as f64;
    let mut out: Vec<(String, Tensor)> = sum
        .into_iter()
        .map(|(k, v)| Ok((k, v.affine(1.0 / n, 0.0)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()
        .map_err(|e| file_err(exp, e))?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Description of avg.safetensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AverageMeta {
    pub epochs: Vec<usize>,
    pub valid_losses: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    #[test]
    fn seeded_init_is_reproducible_and_name_dependent() {
        let make = |seed| {
            let vars = SeededVars::new(seed);
            let vb = VarBuilder::from_backend(Box::new(vars.clone()), DType::F32, Device::Cpu);
            let _ = candle_nn::linear(4, 3, vb.pp("a")).unwrap();
            let _ = candle_nn::linear(4, 3, vb.pp("b")).unwrap();
            vars.named_vars()
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = make(1);
        assert_eq!(a, make(1));
        assert_ne!(a, make(2));
        assert_eq!(a[0].0, "a.bias");
        assert_ne!(a[1].1, a[3].1); // a.weight vs b.weight
    }

    #[test]
    fn nbest_picks_lowest_losses() {
        let h: Vec<EpochResult> = [5.0, 3.0, 4.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, &l)| EpochResult {
                epoch: i + 1,
                step: 0,
                train_loss: 0.0,
                valid_loss: l,
                valid_cer: 0.0,
                valid_utts: 1,
            })
            .collect();
        assert_eq!(nbest(&h, 2), vec![2, 4]);
        assert_eq!(nbest(&h, 10), vec![1, 2, 3, 4]);
    }
}
