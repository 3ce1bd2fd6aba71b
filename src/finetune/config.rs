//! The finetune configuration file (TOML): `[data]`, `[model]`, `[specaug]`, `[optim]`, `[train]`.
//!
//! Every table refuses unknown keys (`deny_unknown_fields`), so a typo is an error that names
//! the key and the file instead of a silently ignored setting. Defaults follow ESPnet's
//! Conformer-CTC recipes where one exists (noted per field).
use crate::models::asr::AsrModelConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config {path}: {reason}")]
    Value { path: PathBuf, reason: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Which stored layers to read.
    #[serde(default)]
    pub data: DataConfig,
    /// Featurizer (weighted sum, normalisation), pre-encoder and Conformer encoder.
    #[serde(default)]
    pub model: AsrModelConfig,
    #[serde(default)]
    pub specaug: SpecAugConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// What to read from the feature store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Hidden-state numbers to feed the featurizer's weighted sum (e.g. `[6, 9, 12]`); left
    /// out = every layer the training store holds. The experiment records the resolved list.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

/// Maximum width of a mask: a number of frames/bins, or a fraction of the utterance length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum MaskWidth {
    /// At most this many frames (ESPnet `time_mask_width_range: [0, N]`).
    Frames(usize),
    /// At most this fraction of the utterance's frames (ESPnet `time_mask_width_ratio_range`).
    Ratio(f64),
}

/// SpecAugment (ESPnet `SpecAug`): optional time warping, then time and frequency masks set
/// to zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecAugConfig {
    /// Turn SpecAugment on/off without deleting the table.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Time warping window in frames (ESPnet `time_warp_window`, 5 in its recipes); 0 = off.
    #[serde(default)]
    pub time_warp_window: usize,
    /// Number of time masks per utterance (ESPnet default 2).
    #[serde(default = "d_2")]
    pub num_time_masks: usize,
    /// Maximum time-mask width: `{ frames = 40 }` or `{ ratio = 0.05 }` (ESPnet 0-40 frames).
    #[serde(default = "d_time_width")]
    pub time_mask_width: MaskWidth,
    /// Number of frequency (feature-dimension) masks per utterance (ESPnet default 2).
    #[serde(default = "d_2")]
    pub num_freq_masks: usize,
    /// Maximum frequency-mask width in feature bins (ESPnet 0-30 for fbank; ~27 of 80 bins).
    #[serde(default = "d_freq_width")]
    pub freq_mask_width: usize,
}

impl Default for SpecAugConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            time_warp_window: 0,
            num_time_masks: 2,
            time_mask_width: d_time_width(),
            num_freq_masks: 2,
            freq_mask_width: d_freq_width(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// torch.optim.Adam: weight decay is added to the gradient (L2 penalty).
    Adam,
    /// torch.optim.AdamW: decoupled weight decay.
    Adamw,
}

/// Optimiser and learning-rate schedule (ESPnet `optim: adam` + `scheduler: warmuplr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// "adam" or "adamw".
    #[serde(default = "d_optimizer")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (reached at `warmup_steps`).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Adam betas (torch default, which ESPnet configs keep).
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// ESPnet Conformer recipes: 1e-6.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// ESPnet `warmuplr`: lr * w^0.5 * min(step^-0.5, step * w^-1.5); 0 = constant lr.
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value (ESPnet `grad_clip`); 0 or negative = off.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Batches accumulated per optimiser step (ESPnet `accum_grad`).
    #[serde(default = "d_1")]
    pub accum_grad: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: d_optimizer(),
            lr: d_lr(),
            betas: d_betas(),
            eps: d_eps(),
            weight_decay: d_wd(),
            warmup_steps: d_warmup(),
            grad_clip: d_clip(),
            accum_grad: 1,
        }
    }
}

/// Epochs, batching, checkpoint averaging, logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "d_epochs")]
    pub max_epochs: usize,
    /// Padded frames per batch (batch size x longest utterance); utterances are bucketed by
    /// length so padding stays small (ESPnet `batch_type: numel`-like).
    #[serde(default = "d_batch_frames")]
    pub batch_frames: usize,
    /// Shuffle batch order each epoch (deterministic from the seed and the epoch number).
    #[serde(default = "d_true")]
    pub shuffle: bool,
    /// Seed for initialisation, batch order and SpecAugment (the CLI `--seed` overrides it).
    #[serde(default)]
    pub seed: u64,
    /// Average the N best epochs by validation loss into avg.safetensors (ESPnet --keep_nbest_models).
    #[serde(default = "d_nbest")]
    pub keep_nbest: usize,
    /// Print a progress line (and flush the log) every N optimiser steps.
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Drop training utterances longer than this many frames (0 = keep all).
    #[serde(default)]
    pub max_frames: usize,
    /// Wall-clock budget in minutes, counted from the launch of each `finetune` invocation
    /// (a resumed run gets a fresh budget). When it runs out, the current optimiser step
    /// finishes and the epoch is closed early: validation, the epoch checkpoint, n-best
    /// averaging and `last` are written as at the end of any epoch, and `--resume` continues
    /// with the next epoch. `--max-minutes` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_epochs: d_epochs(),
            batch_frames: d_batch_frames(),
            shuffle: true,
            seed: 0,
            keep_nbest: d_nbest(),
            log_every: d_log_every(),
            max_frames: 0,
            max_minutes: None,
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_1() -> usize {
    1
}
fn d_2() -> usize {
    2
}
fn d_time_width() -> MaskWidth {
    MaskWidth::Frames(40)
}
fn d_freq_width() -> usize {
    27
}
fn d_optimizer() -> OptimizerKind {
    OptimizerKind::Adam
}
fn d_lr() -> f64 {
    0.002
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    1e-6
}
fn d_warmup() -> u64 {
    15000
}
fn d_clip() -> f64 {
    5.0
}
fn d_epochs() -> usize {
    35
}
fn d_batch_frames() -> usize {
    20000
}
fn d_nbest() -> usize {
    10
}
fn d_log_every() -> usize {
    50
}

impl FinetuneConfig {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: FinetuneConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The TOML text of this (resolved) config, as saved in the experiment directory.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Value {
            path: PathBuf::from("<config>"),
            reason: e.to_string(),
        })
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |reason: String| {
            Err(ConfigError::Value {
                path: path.to_path_buf(),
                reason,
            })
        };
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad(format!("optim.lr must be > 0 (got {})", o.lr));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad(format!("optim.betas must be in [0, 1) (got {:?})", o.betas));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return bad(format!("optim.eps must be > 0 (got {})", o.eps));
        }
        if o.weight_decay < 0.0 {
            return bad(format!(
                "optim.weight_decay must be >= 0 (got {})",
                o.weight_decay
            ));
        }
        if o.accum_grad == 0 {
            return bad("optim.accum_grad must be >= 1".into());
        }
        let t = &self.train;
        if t.max_epochs == 0 {
            return bad("train.max_epochs must be >= 1".into());
        }
        if t.batch_frames == 0 {
            return bad("train.batch_frames must be >= 1".into());
        }
        if t.log_every == 0 {
            return bad("train.log_every must be >= 1".into());
        }
        if let Some(m) = t.max_minutes {
            if !(m > 0.0 && m.is_finite()) {
                return bad(format!(
                    "train.max_minutes must be a positive number of minutes, got {m}"
                ));
            }
        }
        if t.keep_nbest == 0 {
            return bad("train.keep_nbest must be >= 1".into());
        }
        if let MaskWidth::Ratio(r) = self.specaug.time_mask_width {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!(
                    "specaug.time_mask_width.ratio must be in [0, 1] (got {r})"
                ));
            }
        }
        Ok(())
    }
}

/// ESPnet `WarmupLR`: lr * warmup^0.5 * min(step^-0.5, step * warmup^-1.5), steps counted
/// from 1; peaks at `lr` when step == warmup. `warmup == 0` gives a constant `lr`.
pub fn warmup_lr(lr: f64, warmup: u64, step: u64) -> f64 {
    if warmup == 0 {
        return lr;
    }
    let s = step.max(1) as f64;
    let w = warmup as f64;
    lr * w.sqrt() * (s.powf(-0.5)).min(s * w.powf(-1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peaks_at_warmup_steps() {
        let lr = 1e-3;
        assert!((warmup_lr(lr, 100, 100) - lr).abs() < 1e-12);
        assert!(warmup_lr(lr, 100, 50) < lr);
        assert!(warmup_lr(lr, 100, 400) < lr);
        assert!((warmup_lr(lr, 100, 400) - lr * 0.5).abs() < 1e-12);
        assert!((warmup_lr(lr, 100, 1) - lr / 100.0).abs() < 1e-12);
        assert_eq!(warmup_lr(lr, 0, 7), lr);
    }
}
