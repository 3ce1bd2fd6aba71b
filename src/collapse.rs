//! `speechcache collapse`: a one-layer feature store whose every row is an experiment's
//! featurizer output, Σ_l w_l · normalize_l(h_l), so a corpus keeps one layer instead of 13
//! or 25 (the collapse step of probe → collapse; the weights come from
//! `EXP/layer_weights.json`).
//!
//! Normalisation as the experiment's `model.featurizer.normalize`: `global` standardises each
//! layer with the experiment's training-store statistics before the sum (so the collapsed rows
//! are already normalised: train on them with `normalize = "none"`); `utterance` and `none`
//! store the plain weighted sum (with `utterance` the new experiment applies the same
//! per-utterance MVN after it, exactly as the all-layer one did).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ndarray::Array2;

use crate::finetune::layers::LayerWeights;
use crate::finetune::train::Experiment;
use crate::models::asr::FeatureNormalize;
use crate::store::partition::PartSpec;
use crate::store::{Dtype, FeatureStore, ItemData, StoreKind, WriterSpec};

/// Collapse a feature store to an experiment's learned weighted sum of its layers.
#[derive(Args, Debug)]
#[command(
    long_about = "Write a one-layer feature store whose every row is the experiment's featurizer \
output: the sum over the experiment's layers of its learned (softmaxed) weight times the layer, \
each layer normalised as the experiment normalises it (global: with the training store's \
statistics). Same ids, texts and frame counts as STORE; the dtype of STORE unless --dtype. \
finetune trains on it as on any one-layer store (with normalize = \"none\" after a global \
experiment), and decode decodes it."
)]
pub struct CollapseArgs {
    /// Feature store holding (at least) the experiment's layers.
    pub store: PathBuf,
    /// The finetune experiment whose layer weights to use (EXP/layer_weights.json).
    #[arg(long)]
    pub exp: PathBuf,
    /// Output store.
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype (default: the source store's).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Process only part K of N (1-based) into --out; join the parts with `speechcache merge`.
    #[arg(long, value_name = "K/N", value_parser = crate::store::partition::parse_part)]
    pub part: Option<PartSpec>,
    /// Seal a shard before it grows past this size.
    #[arg(long, default_value = "1GiB", value_parser = crate::progress::parse_size)]
    pub shard_size: u64,
    /// Replace a store already at --out.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub jobs: Option<usize>,
    #[arg(long, short)]
    pub quiet: bool,
}

/// The layer id the collapsed store holds its one layer under.
pub const COLLAPSED_LAYER: usize = 0;

/// What one collapsed row is made of: per experiment layer, its weight and (global) stats.
pub struct Collapser {
    pub layers: Vec<usize>,
    pub weights: Vec<f32>,
    /// `[layer][dim]` (global normalisation only).
    pub mean: Option<Vec<Vec<f32>>>,
    pub inv_std: Option<Vec<Vec<f32>>>,
}

impl Collapser {
    /// From an experiment: its layer weights and, for `global`, its statistics. Errors name
    /// the experiment and why it cannot be collapsed.
    pub fn from_experiment(exp_dir: &std::path::Path) -> anyhow::Result<Self> {
        let exp = Experiment::load(exp_dir)
            .map_err(|e| anyhow::anyhow!("{}", e))
            .with_context(|| format!("cannot open the experiment {}", exp_dir.display()))?;
        if exp.meta.layers.len() < 2 {
            anyhow::bail!(
                "{}: the experiment reads one layer ({:?}), it has no featurizer to collapse with",
                exp_dir.display(),
                exp.meta.layers
            );
        }
        let lw = LayerWeights::read(exp_dir)?;
        if lw.layers != exp.meta.layers {
            anyhow::bail!(
                "{}: layer_weights.json is for layers {:?}, the experiment reads {:?}",
                exp_dir.display(),
                lw.layers,
                exp.meta.layers
            );
        }
        let (mean, inv_std) = match (exp.meta.normalize, &exp.stats) {
            (FeatureNormalize::Global, Some(stats)) => {
                if stats.layers != lw.layers {
                    anyhow::bail!(
                        "{}: global_stats.json is for layers {:?}, the experiment reads {:?}",
                        exp_dir.display(),
                        stats.layers,
                        lw.layers
                    );
                }
                let mean = stats
                    .mean
                    .iter()
                    .map(|m| m.iter().map(|&v| v as f32).collect())
                    .collect();
                // as the model: x / sqrt(var); a constant dimension (var 0) stays 0 here
                let inv = stats
                    .var
                    .iter()
                    .map(|v| {
                        v.iter()
                            .map(|&v| {
                                let s = v.max(0.0).sqrt() as f32;
                                if s > 0.0 {
                                    1.0 / s
                                } else {
                                    0.0
                                }
                            })
                            .collect()
                    })
                    .collect();
                (Some(mean), Some(inv))
            }
            (FeatureNormalize::Global, None) => anyhow::bail!(
                "{}: normalize is \"global\" but the experiment has no global_stats.json",
                exp_dir.display()
            ),
            _ => (None, None),
        };
        Ok(Self {
            layers: lw.layers,
            weights: lw.weights,
            mean,
            inv_std,
        })
    }

    /// Adds layer `li`'s term, w_l · normalize_l(h), to `acc` (`h` and `acc` are `[frames, d]`):
    /// the one computation behind `collapse` and `extract --collapse`.
    pub fn accumulate(&self, li: usize, h: &[f32], acc: &mut [f32], d: usize) {
        let w = self.weights[li];
        match (&self.mean, &self.inv_std) {
            (Some(mean), Some(inv)) => {
                let (m, s) = (&mean[li], &inv[li]);
                for (o, x) in acc.chunks_exact_mut(d).zip(h.chunks_exact(d)) {
                    for j in 0..d {
                        o[j] += w * ((x[j] - m[j]) * s[j]);
                    }
                }
            }
            _ => {
                for (o, &x) in acc.iter_mut().zip(h) {
                    *o += w * x;
                }
            }
        }
    }

    /// Σ_l w_l · normalize_l(h_l) of one utterance's hidden states, given in `self.layers`
    /// order, each `[frames, d]`.
    pub fn combine(&self, states: &[&[f32]], d: usize) -> Vec<f32> {
        let mut acc = vec![0f32; states.first().map_or(0, |s| s.len())];
        for (li, h) in states.iter().enumerate().take(self.layers.len()) {
            self.accumulate(li, h, &mut acc, d);
        }
        acc
    }

    /// Σ_l w_l · normalize_l(h_l) of utterance `i` (`[frames, dim]`).
    pub fn row(&self, store: &FeatureStore, i: usize) -> anyhow::Result<Array2<f32>> {
        let d = store.dim();
        let t = store.rows()[i].length as usize;
        let mut out = Array2::<f32>::zeros((t, d));
        let mut h = vec![0f32; t * d];
        let acc = out.as_slice_mut().unwrap_or(&mut []);
        for (li, &layer) in self.layers.iter().enumerate() {
            store.view(i, layer)?.write_f32(&mut h);
            self.accumulate(li, &h, acc, d);
        }
        Ok(out)
    }

    /// For `extract --collapse EXP`: checks that the experiment was trained on features of the
    /// model `spec` describes (its training store's model identity, its layers within the
    /// model's, its feature size) and turns `spec` into the one-layer collapsed store's.
    /// Returns the hidden states to compute, in the experiment's order.
    pub fn for_extract(&self, exp_dir: &Path, spec: &mut WriterSpec) -> anyhow::Result<Vec<usize>> {
        let exp = Experiment::load(exp_dir)
            .map_err(|e| anyhow::anyhow!("{}", e))
            .with_context(|| format!("cannot open the experiment {}", exp_dir.display()))?;
        let model = &spec.source["model"];
        let train = Path::new(&exp.meta.train_store);
        let trained_on = crate::store::StoreMeta::load(train).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot check which model the experiment was trained on: its training store {} \
                 is unreadable ({e})",
                exp_dir.display(),
                train.display()
            )
        })?;
        let same_model = trained_on.source["model"] == *model
            || (model["weights_sha256"].is_string()
                && trained_on.source["model"]["weights_sha256"] == model["weights_sha256"]
                && trained_on.source["model"]["config"] == model["config"]);
        if !same_model {
            anyhow::bail!(
                "{}: the experiment was trained on features of another model (its training store {} \
                 was extracted with {}), not of the model being extracted",
                exp_dir.display(),
                train.display(),
                trained_on.extra["model"]["path"]
                    .as_str()
                    .or(trained_on.source["model"]["family"].as_str())
                    .unwrap_or("an unknown model")
            );
        }
        let missing: Vec<usize> = self
            .layers
            .iter()
            .copied()
            .filter(|l| !spec.layers.contains(l))
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "{}: the experiment weighs hidden states {missing:?}, outside the --layers {:?} \
                 of the model being extracted",
                exp_dir.display(),
                spec.layers
            );
        }
        let dim = spec.dim.unwrap_or(0);
        if exp.meta.feat_dim != dim
            || self
                .mean
                .as_ref()
                .is_some_and(|m| m.iter().any(|m| m.len() != dim))
        {
            anyhow::bail!(
                "{}: the experiment reads {}-dimensional features, the model gives {dim}",
                exp_dir.display(),
                exp.meta.feat_dim
            );
        }
        spec.layers = vec![COLLAPSED_LAYER];
        spec.options["collapse"] = serde_json::json!({
            "layers": self.layers,
            "weights": self.weights,
            "normalized": self.mean.is_some(),
        });
        spec.source["experiment"] = serde_json::json!(
            std::fs::canonicalize(exp_dir).unwrap_or_else(|_| exp_dir.to_path_buf())
        );
        Ok(self.layers.clone())
    }
}

/// Rows collapsed per parallel round.
const ROWS_PER_ROUND: usize = 32;

pub fn run_collapse(args: &CollapseArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let collapser = Collapser::from_experiment(&args.exp)?;
    let store = crate::units::open_features(&args.store)?;
    let missing: Vec<usize> = collapser
        .layers
        .iter()
        .copied()
        .filter(|l| !store.layers().contains(l))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "{}: the experiment weighs layers {missing:?}, which the store does not hold (it holds {:?})",
            args.store.display(),
            store.layers()
        );
    }
    if let Some(m) = &collapser.mean {
        if m.first().map(Vec::len) != Some(store.dim()) {
            anyhow::bail!(
                "{}: the experiment's statistics are {}-dimensional, the store's features {}",
                args.store.display(),
                m.first().map(Vec::len).unwrap_or(0),
                store.dim()
            );
        }
    }
    crate::store::refuse_overlapping_out(&args.out, &[args.store.as_path()])?;
    let dtype = args.dtype.unwrap_or(store.dtype());
    let spec = WriterSpec {
        kind: StoreKind::Features,
        dtype,
        sample_rate: None,
        frame_rate: Some(store.frame_rate()),
        dim: Some(store.dim()),
        layers: vec![COLLAPSED_LAYER],
        options: serde_json::json!({
            "collapse": {
                "layers": collapser.layers,
                "weights": collapser.weights,
                "normalized": collapser.mean.is_some(),
            },
            "dtype": dtype,
        }),
        source: serde_json::json!({
            "features": store.meta().fingerprint,
            "experiment": std::fs::canonicalize(&args.exp).unwrap_or_else(|_| args.exp.clone()),
        }),
        extra: store.meta().extra.clone(),
        shard_bytes: args.shard_size,
        overwrite: args.overwrite,
    };
    let run = crate::store::mapped::write_mapped(
        &args.out,
        spec,
        store.rows(),
        args.part,
        args.jobs,
        ROWS_PER_ROUND,
        |i| {
            store.check_row(i).map_err(|e| e.to_string())?;
            let x = collapser.row(&store, i).map_err(|e| e.to_string())?;
            Ok(ItemData::Features(vec![x]))
        },
        || store.release_pages(),
    )?;
    let Some(run) = run else {
        if !args.quiet {
            eprintln!("collapse: {} is already complete", args.out.display());
        }
        return Ok(());
    };
    let meta = run.meta;
    if !args.quiet {
        let before: u64 = store.meta().totals.bytes;
        eprintln!(
            "collapse: {} utterances, {} layers → 1 ({} failed), {:.1} MB → {:.1} MB, {:.1} s; \
             written to {}",
            meta.totals.items,
            collapser.layers.len(),
            meta.totals.failed,
            before as f64 / 1e6,
            meta.totals.bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
    }
    Ok(())
}
