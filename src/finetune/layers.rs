//! The learned layer weights of an experiment: `EXP/layer_weights.json`, written by `finetune`
//! after every epoch and when a run stops, and `speechcache layers EXP [--top K]`, which ranks
//! them (the probe step of probe → collapse, and a ready `--layers` list for `extract`/`prune`).
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::regular_file::{read_regular_to_string, write_atomic};

/// File name inside the experiment directory.
pub const LAYER_WEIGHTS: &str = "layer_weights.json";

/// The featurizer's softmaxed weights, one per store layer id, in the experiment's layer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerWeights {
    pub layers: Vec<usize>,
    pub weights: Vec<f32>,
}

impl LayerWeights {
    /// Checks the pairing: as many weights as layers, distinct layer ids, finite weights ≥ 0.
    pub fn new(layers: Vec<usize>, weights: Vec<f32>) -> Result<Self, String> {
        let lw = Self { layers, weights };
        lw.check()?;
        Ok(lw)
    }

    fn check(&self) -> Result<(), String> {
        if self.layers.is_empty() || self.layers.len() != self.weights.len() {
            return Err(format!(
                "{} layers but {} weights",
                self.layers.len(),
                self.weights.len()
            ));
        }
        let mut ids = self.layers.clone();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.layers.len() {
            return Err(format!("repeated layer ids in {:?}", self.layers));
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(format!("weight {w} is not a finite non-negative number"));
        }
        Ok(())
    }

    pub fn write(&self, exp_dir: &Path) -> Result<(), (PathBuf, std::io::Error)> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| {
            (
                exp_dir.join(LAYER_WEIGHTS),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        text.push('\n');
        write_atomic(&exp_dir.join(LAYER_WEIGHTS), text.as_bytes())
    }

    /// Reads `EXP/layer_weights.json`; the error names the file and the reason.
    pub fn read(exp_dir: &Path) -> anyhow::Result<Self> {
        let path = exp_dir.join(LAYER_WEIGHTS);
        let text = read_regular_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "{}: no layer weights (is {} a finetune experiment that finished an epoch \
                     or was stopped?)",
                    path.display(),
                    exp_dir.display()
                )
            } else {
                anyhow::anyhow!("{}: {e}", path.display())
            }
        })?;
        let lw: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a layer-weights file: {e}", path.display()))?;
        lw.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(lw)
    }

    /// `(layer id, weight)` heaviest first; ties keep the lower layer id first.
    pub fn ranking(&self) -> Vec<(usize, f32)> {
        let mut r: Vec<(usize, f32)> = self
            .layers
            .iter()
            .copied()
            .zip(self.weights.iter().copied())
            .collect();
        r.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        r
    }

    /// The ids of the `k` heaviest layers, ascending.
    pub fn top(&self, k: usize) -> Result<Vec<usize>, String> {
        if k == 0 || k > self.layers.len() {
            return Err(format!(
                "--top {k}: the experiment weighs {} layers (1 to {} allowed)",
                self.layers.len(),
                self.layers.len()
            ));
        }
        let mut ids: Vec<usize> = self.ranking().into_iter().take(k).map(|(l, _)| l).collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

/// Rank the layers an experiment's featurizer learned to weigh.
#[derive(Args, Debug)]
#[command(
    long_about = "Print the layer weights an experiment learned (its featurizer's softmaxed weighted \
sum over the store's layers), heaviest first, from EXP/layer_weights.json (written by finetune \
after every epoch and when a run stops).\n\nWith --top K, print only the comma-separated ids of \
the K heaviest layers in ascending order (e.g. 6,8,9), ready for `extract --layers` or \
`prune --keep-layers`."
)]
pub struct LayersArgs {
    /// Experiment directory (the --out of finetune).
    pub exp: PathBuf,
    /// Print just the K heaviest layer ids, ascending, comma-separated.
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,
    /// Print the weights as JSON (the layer_weights.json content).
    #[arg(long, conflicts_with = "top")]
    pub json: bool,
}

pub fn run_layers(args: &LayersArgs) -> anyhow::Result<()> {
    let lw = LayerWeights::read(&args.exp)?;
    if let Some(k) = args.top {
        let ids = lw
            .top(k)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.exp.display()))?;
        let text: Vec<String> = ids.iter().map(usize::to_string).collect();
        println!("{}", text.join(","));
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&lw)?);
        return Ok(());
    }
    let uniform = 1.0 / lw.layers.len() as f32;
    println!("rank  layer  weight   x uniform");
    for (rank, (layer, w)) in lw.ranking().into_iter().enumerate() {
        println!("{:>4}  {layer:>5}  {w:.4}   {:.2}", rank + 1, w / uniform);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_takes_the_heaviest_and_lists_them_ascending() {
        let lw = LayerWeights::new(
            vec![0, 3, 6, 8, 9, 12],
            vec![0.05, 0.1, 0.3, 0.2, 0.25, 0.1],
        )
        .unwrap();
        assert_eq!(lw.top(3).unwrap(), vec![6, 8, 9]);
        assert_eq!(lw.top(1).unwrap(), vec![6]);
        // a tie (3 and 12 at 0.1) goes to the lower id
        assert_eq!(lw.top(4).unwrap(), vec![3, 6, 8, 9]);
        assert!(lw.top(0).is_err() && lw.top(7).is_err());
        assert_eq!(lw.ranking()[0], (6, 0.3));
    }

    #[test]
    fn malformed_weights_are_refused_naming_the_file() {
        assert!(LayerWeights::new(vec![1, 2], vec![0.5]).is_err());
        assert!(LayerWeights::new(vec![1, 1], vec![0.5, 0.5]).is_err());
        assert!(LayerWeights::new(vec![1, 2], vec![f32::NAN, 0.5]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let err = LayerWeights::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("layer_weights.json") && err.contains("no layer weights"),
            "{err}"
        );
        std::fs::write(dir.path().join(LAYER_WEIGHTS), "{\"layers\": [1]}").unwrap();
        let err = LayerWeights::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a layer-weights file"), "{err}");
        let lw = LayerWeights::new(vec![4, 7], vec![0.25, 0.75]).unwrap();
        lw.write(dir.path()).unwrap();
        assert_eq!(LayerWeights::read(dir.path()).unwrap(), lw);
    }
}
