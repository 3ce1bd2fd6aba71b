//! What a corpus holds: one `Utterance` per item, from any supported input format.
//!
//! Formats (one importer module each):
//! - `dir`: a directory scanned recursively for audio files, with the LibriSpeech and
//!   AISHELL-1 layouts recognised (`layouts`) so transcripts and speakers come along;
//! - `tsv`: a fairseq manifest with an optional `.wrd` / `.ltr` label file;
//! - `kaldi`: a Kaldi data directory (`wav.scp`, `text`, `utt2spk`, `segments`);
//! - `jsonl`: JSON lines, our fields or NeMo's;
//! - `lhotse`: Lhotse recordings + supervisions, or cuts (JSON lines, gzipped or not);
//! - `hf`: Hugging Face datasets as parquet, audio embedded as encoded bytes.
//!
//! `load_corpus` gives each utterance with how its audio is reached (`AudioRef`): a whole
//! file, some channels of it (Lhotse), a row of a parquet file (HF), or a row that cannot be
//! used, which `prepare` lists in `errors.jsonl` with the manifest row and the reason.
//!
//! Every importer returns utterances in a deterministic order together with where each one
//! was defined, so that errors (duplicate ids across inputs included) name the file and line.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod dir;
pub mod hf;
mod jsonl;
mod kaldi;
mod layouts;
mod lhotse;
mod text_file;
mod tsv;

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
    /// Decide from the path: a directory holding `wav.scp` is a Kaldi data dir, one holding
    /// `state.json` or `*.parquet` files a Hugging Face dataset, any other directory is scanned
    /// for audio; `*.tsv` is fairseq; `*.parquet`/`*.arrow` is HF; `*.jsonl[.gz]`/`*.json` is
    /// Lhotse when its first record is a Lhotse recording, supervision or cut, else our JSON
    /// lines; a file named `wav.scp` stands for its Kaldi data dir.
    Auto,
    /// A directory of audio files (LibriSpeech and AISHELL-1 layouts recognised).
    Dir,
    /// A fairseq manifest (`.tsv`), labels from a sibling `.wrd` or `.ltr`.
    Tsv,
    /// A Kaldi data directory (or its `wav.scp`).
    Kaldi,
    /// JSON lines: `id`, `path`, `start`, `duration`, `text`, `speaker` (or NeMo's fields).
    Jsonl,
    /// Lhotse manifests: recordings (+ supervisions beside them) or cuts, `.jsonl[.gz]`.
    Lhotse,
    /// Hugging Face datasets: a `.parquet` file or a directory of them (one split), or a
    /// `save_to_disk` directory (or one of its `.arrow` files).
    Hf,
}

/// How an utterance's audio is reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioRef {
    /// `source`, all channels averaged.
    File,
    /// These channels (0-based) of `source`, averaged.
    Channels(Vec<usize>),
    /// Encoded audio in a parquet file (`source`): row `row` of row group `group`, which is
    /// row `file_row` (0-based) of the file. `fallback` is the row's `audio.path`, read when
    /// its bytes are null.
    Embedded {
        group: usize,
        row: usize,
        file_row: usize,
        fallback: Option<PathBuf>,
    },
    /// A manifest row that cannot be used, and why.
    Invalid(String),
}

/// One utterance as `prepare` reads it: the record, its audio and where it was defined
/// (a manifest file and 1-based row, or an audio file).
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusItem {
    pub utt: Utterance,
    pub audio: AudioRef,
    pub origin: Origin,
}

/// Column choices for tabular inputs (HF); `None` picks the common defaults.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub text: Option<String>,
    pub id: Option<String>,
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
    /// A problem on one line of a manifest file (1-based line number).
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl ManifestError {
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        ManifestError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ManifestError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn line(path: &Path, line: usize, reason: impl Into<String>) -> Self {
        ManifestError::Line {
            path: path.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
}

/// Where an utterance was defined: a manifest line, or an audio file found in a directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub path: PathBuf,
    pub line: Option<usize>,
}

impl Origin {
    pub fn at_line(path: &Path, line: usize) -> Self {
        Origin {
            path: path.to_path_buf(),
            line: Some(line),
        }
    }

    pub(crate) fn file(path: &Path) -> Self {
        Origin {
            path: path.to_path_buf(),
            line: None,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}", self.path.display(), line),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// What an importer yields: each utterance with where it was defined.
pub(crate) type Located = Vec<(Utterance, Origin)>;

const ACCEPTED: &str = "a directory of audio files, a Kaldi data directory (or its wav.scp), \
                        a fairseq manifest (*.tsv), JSON lines (*.jsonl, *.json), Lhotse \
                        manifests (*.jsonl.gz) or Hugging Face parquet (*.parquet, or a \
                        directory of them)";

/// Reads every input (in the order given) into one list of utterances, in deterministic order.
///
/// Inputs are concatenated in the order given; an id defined twice (within one input or
/// across inputs) is an error naming both places.
pub fn load_inputs(
    inputs: &[PathBuf],
    format: InputFormat,
) -> Result<Vec<Utterance>, ManifestError> {
    let items = load_corpus(inputs, format, &Columns::default())?;
    Ok(items.into_iter().map(|item| item.utt).collect())
}

/// Like `load_inputs`, with how each utterance's audio is reached and where it was defined.
/// Unusable rows of Lhotse and HF inputs come back as `AudioRef::Invalid` instead of
/// stopping the run. A Lhotse recordings/supervisions pair given as two inputs is read once.
pub fn load_corpus(
    inputs: &[PathBuf],
    format: InputFormat,
    columns: &Columns,
) -> Result<Vec<CorpusItem>, ManifestError> {
    let mut all: Vec<CorpusItem> = Vec::new();
    let mut lhotse_sets = Vec::new();
    for input in inputs {
        let format = resolve_format(input, format)?;
        let located = match format {
            InputFormat::Dir => dir::load(input)?,
            InputFormat::Tsv => tsv::load(input)?,
            InputFormat::Kaldi => kaldi::load(input)?,
            InputFormat::Jsonl => jsonl::load(input)?,
            InputFormat::Lhotse => {
                let set = lhotse::manifest_set(input)?;
                if !lhotse_sets.contains(&set) {
                    all.extend(lhotse::load(&set)?);
                    lhotse_sets.push(set);
                }
                continue;
            }
            InputFormat::Hf => {
                all.extend(hf::load(input, columns)?);
                continue;
            }
            InputFormat::Auto => return Err(ManifestError::invalid(input, "format unresolved")),
        };
        all.extend(located.into_iter().map(|(utt, origin)| CorpusItem {
            utt,
            audio: AudioRef::File,
            origin,
        }));
    }
    check_unique_ids(&all)?;
    Ok(all)
}

/// The identity of the corpus as `prepare` records it: each utterance's JSON (exactly
/// `Utterance`'s for whole files, so stores of the older formats keep their hash), with
/// `audio` added for the other ways audio is reached.
pub fn corpus_json(items: &[CorpusItem]) -> serde_json::Value {
    let rows = items.iter().map(|item| {
        let mut row = serde_json::to_value(&item.utt).unwrap_or_default();
        if item.audio != AudioRef::File {
            if let (Some(obj), Ok(audio)) = (row.as_object_mut(), serde_json::to_value(&item.audio))
            {
                obj.insert("audio".into(), audio);
            }
        }
        row
    });
    serde_json::Value::Array(rows.collect())
}

/// Detects (for `Auto`) or checks (otherwise) the format of one input path.
fn resolve_format(input: &Path, format: InputFormat) -> Result<InputFormat, ManifestError> {
    let meta = std::fs::metadata(input).map_err(|e| ManifestError::io(input, e))?;
    if format != InputFormat::Auto {
        let expects_dir = match format {
            InputFormat::Dir => Some(true),
            InputFormat::Tsv | InputFormat::Jsonl | InputFormat::Lhotse => Some(false),
            _ => None,
        };
        return match expects_dir {
            Some(true) if !meta.is_dir() => Err(ManifestError::invalid(
                input,
                "--format dir needs a directory, this is a file",
            )),
            Some(false) if meta.is_dir() => Err(ManifestError::invalid(
                input,
                "this format needs a manifest file, this is a directory",
            )),
            _ => Ok(format),
        };
    }
    if meta.is_dir() {
        return Ok(if input.join("wav.scp").is_file() {
            InputFormat::Kaldi
        } else if hf::is_dataset_dir(input) {
            InputFormat::Hf
        } else {
            InputFormat::Dir
        });
    }
    if hf::has_parquet_extension(input) || hf::has_arrow_extension(input) {
        return Ok(InputFormat::Hf);
    }
    let name = input.to_string_lossy().to_ascii_lowercase();
    if (name.ends_with(".jsonl.gz") || name.ends_with(".jsonl") || name.ends_with(".json"))
        && lhotse::sniff(input).is_some()
    {
        return Ok(InputFormat::Lhotse);
    }
    if input.file_name().is_some_and(|n| n == "wav.scp") {
        return Ok(InputFormat::Kaldi);
    }
    let ext = input
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("tsv") => Ok(InputFormat::Tsv),
        Some("jsonl") | Some("json") => Ok(InputFormat::Jsonl),
        _ => Err(ManifestError::invalid(
            input,
            format!("cannot tell the input format from this path; accepted: {ACCEPTED} (or pass --format)"),
        )),
    }
}

fn check_unique_ids(items: &[CorpusItem]) -> Result<(), ManifestError> {
    let mut seen: HashMap<&str, &Origin> = HashMap::with_capacity(items.len());
    for item in items {
        if let Some(first) = seen.insert(item.utt.id.as_str(), &item.origin) {
            return Err(duplicate_id_error(&item.utt.id, first, &item.origin));
        }
    }
    Ok(())
}

pub(crate) fn duplicate_id_error(id: &str, first: &Origin, again: &Origin) -> ManifestError {
    let reason = format!("duplicate utterance id '{id}' (first defined at {first})");
    match again.line {
        Some(line) => ManifestError::line(&again.path, line, reason),
        None => ManifestError::invalid(&again.path, reason),
    }
}

/// SHA-256 (hex) of a canonical serialisation of the utterance list: the identity of a
/// store's source. Any change of order, id, source, span, text or speaker changes it.
pub fn manifest_hash(utts: &[Utterance]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"speechcache-manifest-v1\n");
    for utt in utts {
        let source = match utt.source.to_str() {
            Some(s) => s.to_string(),
            None => format!(
                "bytes:{}",
                hex::encode(utt.source.as_os_str().as_encoded_bytes())
            ),
        };
        let row = serde_json::json!([
            utt.id,
            source,
            utt.start,
            utt.duration,
            utt.text,
            utt.speaker
        ]);
        hasher.update(row.to_string().as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// Audio file extensions picked up when scanning a directory (compared case-insensitively).
pub const AUDIO_EXTENSIONS: &[&str] = &[
    "wav", "flac", "mp3", "ogg", "oga", "opus", "m4a", "mp4", "aac", "caf", "aiff", "aif",
];

pub(crate) fn is_audio_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO_EXTENSIONS.iter().any(|a| a.eq_ignore_ascii_case(e)))
}

/// Resolves a path found inside a manifest: absolute paths stay, relative ones are joined to
/// `base`.
pub(crate) fn resolve_relative(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The directory a manifest file lives in (`""` when given as a bare file name, which joins
/// as the current directory).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}
