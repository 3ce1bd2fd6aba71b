//! What a corpus holds: one `Utterance` per item, from any supported input format.
//! (Skeleton: the manifest owner fills in the importers; the types below are the contract.)
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One utterance of a corpus: a whole file, or a segment of one (`start`, `duration`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Utterance {
    /// Unique key across all stages.
    pub id: String,
    /// Audio file to decode.
    pub source: PathBuf,
    /// Offset into the source in seconds (0 for a whole file).
    pub start: f64,
    /// Length in seconds; `None` means to the end of the file.
    pub duration: Option<f64>,
    pub text: Option<String>,
    pub speaker: Option<String>,
}

/// How `--input` paths are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Auto,
    Dir,
    Tsv,
    Kaldi,
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads every input (in the order given) into one list of utterances, in deterministic order.
pub fn load_inputs(
    _inputs: &[PathBuf],
    _format: InputFormat,
) -> Result<Vec<Utterance>, ManifestError> {
    Err(ManifestError::Invalid {
        path: PathBuf::new(),
        reason: "manifest importers are not built yet".into(),
    })
}
