//! The ASR model finetuned on cached SSL features, mirroring ESPnet's SSL recipe
//! (`frontend: s3prl` featurizer → `normalize` → `preencoder: linear` → Conformer → CTC):
//! feats `[B, L, T, D]` (L cached layers) → logits `[B, T', vocab]`.
pub mod conformer;
pub mod cpu;

use candle_core::{Tensor, Var, D};
use candle_nn::{Init, Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::models::asr::conformer::{ConformerConfig, ConformerEncoder, ConformerError};
use crate::ops::{utterance_mvn, DropoutRng, RUNNING_STAT_NAMES};

/// How features are normalised before the pre-encoder (ESPnet's `normalize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureNormalize {
    /// Per utterance and dimension: mean and variance over the valid frames of the weighted
    /// sum (ESPnet `utterance_mvn` with `norm_vars: true`).
    #[default]
    Utterance,
    /// Per input layer and dimension, with mean/std given by `AsrModel::set_global_stats`
    /// (e.g. the feature store's stats), applied before the weighted sum.
    Global,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FeaturizerConfig {
    #[serde(default)]
    pub normalize: FeatureNormalize,
}

/// The model section of a finetuning config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AsrModelConfig {
    #[serde(default)]
    pub featurizer: FeaturizerConfig,
    /// Output size of the linear pre-encoder (ESPnet `preencoder_conf.output_size`);
    /// none feeds the features to the encoder directly.
    #[serde(default)]
    pub preencoder_output: Option<usize>,
    #[serde(default)]
    pub encoder: ConformerConfig,
}

/// s3prl `Featurizer` weighted sum (key `frontend.featurizer.weights`, zeros at init): the
/// softmax of one learnable weight per layer. A single layer needs no weights.
#[derive(Debug, Clone)]
struct Featurizer {
    weights: Option<Tensor>,
}

impl Featurizer {
    fn load(vb: VarBuilder, layers: usize) -> candle_core::Result<Self> {
        let weights = if layers > 1 {
            Some(vb.get_with_hints(layers, "weights", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weights })
    }

    /// `[B, L, T, D]` → `[B, T, D]`.
    fn forward(&self, feats: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, t, d) = feats.dims4()?;
        match &self.weights {
            None => feats.reshape((b, t, d)),
            Some(w) => {
                let norm = candle_nn::ops::softmax(w, D::Minus1)?.reshape((1, 1, l))?;
                // One [1, L] x [L, T*D] matmul per utterance: no [B, L, T, D] temporary.
                let flat = feats.reshape((b, l, t * d))?;
                norm.broadcast_matmul(&flat)?.reshape((b, t, d))
            }
        }
    }
}

/// ESPnet's model for CTC finetuning on SSL features.
#[derive(Debug, Clone)]
pub struct AsrModel {
    featurizer: Featurizer,
    normalize: FeatureNormalize,
    /// `[1, L, 1, D]` mean and std for `FeatureNormalize::Global`.
    global_stats: Option<(Tensor, Tensor)>,
    preencoder: Option<Linear>,
    encoder: ConformerEncoder,
    ctc_lo: Linear,
    rng: DropoutRng,
    layers: usize,
    feat_dim: usize,
}

impl AsrModel {
    /// Keys: `frontend.featurizer.weights`, `preencoder.linear_out`, `encoder.*`, `ctc.ctc_lo`.
    /// `num_layers_in` cached layers of `feat_dim` dims each, `vocab` CTC outputs (blank included).
    pub fn new(
        vb: VarBuilder,
        cfg: &AsrModelConfig,
        num_layers_in: usize,
        feat_dim: usize,
        vocab: usize,
    ) -> Result<Self, ConformerError> {
        let bad = |field, reason: &str| ConformerError::Config {
            field,
            reason: reason.into(),
        };
        if num_layers_in == 0 {
            return Err(bad("num_layers_in", "must be positive"));
        }
        if feat_dim == 0 {
            return Err(bad("feat_dim", "must be positive"));
        }
        if vocab == 0 {
            return Err(bad("vocab", "must be positive"));
        }
        if cfg.preencoder_output == Some(0) {
            return Err(bad("preencoder_output", "must be positive"));
        }
        let rng = DropoutRng::new(0);
        let featurizer = Featurizer::load(vb.pp("frontend").pp("featurizer"), num_layers_in)?;
        let (preencoder, enc_in) = match cfg.preencoder_output {
            Some(n) => (
                Some(candle_nn::linear(
                    feat_dim,
                    n,
                    vb.pp("preencoder").pp("linear_out"),
                )?),
                n,
            ),
            None => (None, feat_dim),
        };
        let encoder = ConformerEncoder::new(vb.pp("encoder"), &cfg.encoder, enc_in, &rng)?;
        let ctc_lo = candle_nn::linear(encoder.output_size(), vocab, vb.pp("ctc").pp("ctc_lo"))?;
        Ok(Self {
            featurizer,
            normalize: cfg.featurizer.normalize,
            global_stats: None,
            preencoder,
            encoder,
            ctc_lo,
            rng,
            layers: num_layers_in,
            feat_dim,
        })
    }

    /// Reseeds every dropout of the model (CPU; on other devices use `Device::set_seed`).
    pub fn seed_dropout(&self, seed: u64) -> Result<(), ConformerError> {
        Ok(self.rng.reseed(seed)?)
    }

    /// Mean and std for `normalize: global`, shaped `[L, D]` (one row per input layer) or `[D]`
    /// (shared by all layers). Std values are floored at 1e-5.
    pub fn set_global_stats(&mut self, mean: &Tensor, std: &Tensor) -> Result<(), ConformerError> {
        let (l, d) = (self.layers, self.feat_dim);
        let shape_ok = |t: &Tensor| t.dims() == [l, d] || t.dims() == [d];
        if !shape_ok(mean) || !shape_ok(std) {
            return Err(ConformerError::Input(format!(
                "global stats must be [{l}, {d}] or [{d}], got mean {:?} and std {:?}",
                mean.dims(),
                std.dims()
            )));
        }
        let prep = |t: &Tensor| -> candle_core::Result<Tensor> {
            let rows = if t.rank() == 1 { 1 } else { l };
            t.reshape((1, rows, 1, d))?
                .detach()
                .to_dtype(self.ctc_dtype())
        };
        let std = prep(&std.maximum(1e-5f64)?)?;
        self.global_stats = Some((prep(mean)?, std));
        Ok(())
    }

    fn ctc_dtype(&self) -> candle_core::DType {
        self.ctc_lo.weight().dtype()
    }

    pub fn encoder(&self) -> &ConformerEncoder {
        &self.encoder
    }

    /// How features are normalised, and the `[1, L|1, 1, D]` global (mean, std) if set.
    pub fn normalization(&self) -> (FeatureNormalize, Option<&(Tensor, Tensor)>) {
        (self.normalize, self.global_stats.as_ref())
    }

    /// Input layers and dims per layer the model was built for.
    pub fn input_shape(&self) -> (usize, usize) {
        (self.layers, self.feat_dim)
    }

    pub fn has_preencoder(&self) -> bool {
        self.preencoder.is_some()
    }

    /// The random source of every dropout in the model.
    pub fn dropout_rng(&self) -> &DropoutRng {
        &self.rng
    }

    /// CTC output classes (blank included).
    pub fn vocab(&self) -> usize {
        self.ctc_lo.weight().dim(0).unwrap_or(0)
    }

    /// `feats`: `[B, L, T, D]`, `lengths[b]` valid frames. Returns CTC logits `[B, T', vocab]`
    /// (not log-softmaxed) and the output lengths. `train` enables dropout and batch statistics.
    pub fn forward(
        &self,
        feats: &Tensor,
        lengths: &[usize],
        train: bool,
    ) -> Result<(Tensor, Vec<usize>), ConformerError> {
        let (b, l, t, d) = feats.dims4()?;
        if l != self.layers || d != self.feat_dim {
            return Err(ConformerError::Input(format!(
                "features are [B, {l}, T, {d}], the model was built for {} layers of {} dims",
                self.layers, self.feat_dim
            )));
        }
        if lengths.len() != b || lengths.iter().any(|&n| n > t) {
            return Err(ConformerError::Input(format!(
                "lengths {lengths:?} do not fit a batch of {b} x {t} frames"
            )));
        }
        let feats = feats.to_dtype(self.ctc_dtype())?;
        let feats =
            match (self.normalize, &self.global_stats) {
                (FeatureNormalize::Global, Some((mean, std))) => {
                    feats.broadcast_sub(mean)?.broadcast_div(std)?
                }
                (FeatureNormalize::Global, None) => return Err(ConformerError::Input(
                    "normalize is \"global\" but no stats were set (AsrModel::set_global_stats)"
                        .into(),
                )),
                _ => feats,
            };
        let mut x = self.featurizer.forward(&feats)?;
        if self.normalize == FeatureNormalize::Utterance {
            x = utterance_mvn(&x, lengths)?;
        }
        if let Some(pre) = &self.preencoder {
            x = pre.forward(&x)?;
        }
        let (h, out_lengths) = self.encoder.forward(&x, lengths, train)?;
        Ok((self.ctc_lo.forward(&h)?, out_lengths))
    }

    /// The softmax-normalised featurizer weights, one per input layer (for plots).
    pub fn layer_weights(&self) -> Result<Vec<f32>, ConformerError> {
        match &self.featurizer.weights {
            None => Ok(vec![1.0]),
            Some(w) => Ok(candle_nn::ops::softmax(w, D::Minus1)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?),
        }
    }
}

/// The trainable variables of a `VarMap` holding an `AsrModel`, sorted by name: everything
/// except batch-norm running statistics (state updated in place, never by an optimiser).
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = match varmap.data().lock() {
        Ok(data) => data,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| {
            !RUNNING_STAT_NAMES
                .iter()
                .any(|stat| name.rsplit('.').next() == Some(stat))
        })
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}
