//! Lhotse manifests (icefall/k2, ESPnet): JSON lines, plain or gzipped (told by content).
//!
//! - `*recordings*.jsonl[.gz]` with its sibling `*supervisions*.jsonl[.gz]` (the same name with
//!   `recordings` ↔ `supervisions`): one utterance per supervision, in its file's order, cut
//!   from its recording (`start`, `duration`, `channel`). Either file may be given. Recordings
//!   without a supervisions file give one utterance per recording.
//! - `*cuts*.jsonl[.gz]` (`MonoCut`/`MultiCut`): one utterance per cut, the text of its
//!   supervisions joined by spaces, the speaker when they all share one.
//!
//! Audio comes from a recording's `sources` of type `file`; a path that is relative is
//! relative to the current directory, as when Lhotse opens it. `channel` (an index or a list)
//! picks the channels of the source that holds them (averaged when several); none given means
//! all channels, averaged. Rows that cannot be used (a URL or command source, a channel the
//! recording does not have, a mixed cut, invalid JSON) become error rows of the run, naming
//! the manifest file and line, and the rest of the manifest is read.
//!
//! Reading is bounded, so that a damaged or hostile file (a gzip bomb) fails with its file and
//! line instead of exhausting memory: lines up to `MAX_LINE_BYTES`, a gzipped file inflating to
//! at most `MAX_GZIP_RATIO` times its size (`MIN_GZIP_LIMIT` at least), and at most
//! `MAX_UNUSABLE_ROWS` error rows per file.
use super::{AudioRef, CorpusItem, ManifestError, Origin, Utterance};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// What one Lhotse manifest file holds, told from its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Recordings,
    Supervisions,
    Cuts,
    /// The first line is past a read bound (see `Lines`).
    Unreadable,
}

/// The files one input stands for: recordings (+ supervisions), or cuts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ManifestSet {
    Recordings {
        recordings: PathBuf,
        supervisions: Option<PathBuf>,
    },
    Cuts(PathBuf),
}

/// Longest manifest line read (a cut with many supervisions is a few kB; a longer "line" is
/// a damaged or hostile file, and reading it whole would exhaust memory).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// A gzipped manifest may inflate to at most this many times its compressed size (JSON lines
/// compress 5-15x; a deflate bomb, about 1000x) ...
pub const MAX_GZIP_RATIO: u64 = 100;
/// ... or to this many bytes, whichever is more.
pub const MIN_GZIP_LIMIT: u64 = 64 << 20;

/// Why a manifest file could not be read as lines.
#[derive(Debug)]
enum ReadError {
    /// Past a bound: not a manifest to guess the format of.
    Bound(String),
    Io(std::io::Error),
}

/// A manifest file's lines, gunzipped when it starts with the gzip magic bytes, each line and
/// the whole inflated text bounded.
struct Lines {
    reader: Box<dyn BufRead>,
    /// Inflated bytes still allowed (u64::MAX for a plain file, whose size is its bound).
    budget: u64,
    gzip_limit: Option<u64>,
    number: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self, ManifestError> {
        let mut file =
            crate::regular_file::open_regular(path).map_err(|e| ManifestError::io(path, e))?;
        let size = file
            .metadata()
            .map_err(|e| ManifestError::io(path, e))?
            .len();
        let mut magic = [0u8; 2];
        let n = file
            .read(&mut magic)
            .map_err(|e| ManifestError::io(path, e))?;
        let head = std::io::Cursor::new(magic[..n].to_vec());
        let whole = head.chain(file);
        let (reader, gzip_limit): (Box<dyn BufRead>, _) = if magic[..n] == [0x1f, 0x8b] {
            let limit = size.saturating_mul(MAX_GZIP_RATIO).max(MIN_GZIP_LIMIT);
            let inflate = flate2::read::MultiGzDecoder::new(whole);
            (Box::new(BufReader::new(inflate)), Some(limit))
        } else {
            (Box::new(BufReader::new(whole)), None)
        };
        Ok(Lines {
            reader,
            budget: gzip_limit.unwrap_or(u64::MAX),
            gzip_limit,
            number: 0,
            buf: Vec::new(),
        })
    }

    /// The next line (without its `\n` / `\r\n`) and its 1-based number; None at the end.
    fn next_line(&mut self) -> Result<Option<(usize, &str)>, ReadError> {
        self.buf.clear();
        self.number += 1;
        let cap = (MAX_LINE_BYTES as u64 + 1).min(self.budget.saturating_add(1));
        let n = (&mut self.reader)
            .take(cap)
            .read_until(b'\n', &mut self.buf)
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        if n as u64 > self.budget {
            let limit = self.gzip_limit.unwrap_or(u64::MAX);
            return Err(ReadError::Bound(format!(
                "inflates to more than {limit} bytes ({MAX_GZIP_RATIO}x its compressed size; \
                 a gzip bomb?); if the manifest is genuine, gunzip it and pass the plain .jsonl"
            )));
        }
        self.budget -= n as u64;
        if n > MAX_LINE_BYTES && self.buf.last() != Some(&b'\n') {
            return Err(ReadError::Bound(format!(
                "line longer than {} MiB (a damaged file, or not JSON lines)",
                MAX_LINE_BYTES >> 20
            )));
        }
        let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line).map_err(|e| {
            ReadError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not valid UTF-8 ({e})"),
            ))
        })?;
        Ok(Some((self.number, line)))
    }
}

/// Most unusable rows one manifest may give: each becomes an error row in memory, so a
/// file of millions of tiny junk lines (or a gzip bomb of them) would otherwise exhaust it.
pub const MAX_UNUSABLE_ROWS: usize = 100_000;

/// Calls `each` with every non-blank line and its 1-based number; `each` says whether the row
/// was usable.
fn for_each_line(
    path: &Path,
    mut each: impl FnMut(usize, &str) -> bool,
) -> Result<(), ManifestError> {
    let mut lines = Lines::open(path)?;
    let mut unusable = 0usize;
    loop {
        match lines.next_line() {
            Ok(Some((number, line))) => {
                if !line.trim().is_empty() && !each(number, line) {
                    unusable += 1;
                    if unusable > MAX_UNUSABLE_ROWS {
                        return Err(ManifestError::line(
                            path,
                            number,
                            format!(
                                "more than {MAX_UNUSABLE_ROWS} unusable rows; stopped reading \
                                 (is this a Lhotse manifest?)"
                            ),
                        ));
                    }
                }
            }
            Ok(None) => return Ok(()),
            Err(ReadError::Bound(reason)) => {
                return Err(ManifestError::line(path, lines.number, reason))
            }
            Err(ReadError::Io(e)) => {
                return Err(ManifestError::line(path, lines.number, e.to_string()))
            }
        }
    }
}

/// The kind of Lhotse manifest `path` is, from its first record; None if it is not one.
/// A file whose first line is past a read bound counts as `Unreadable`, so that the Lhotse
/// reader reports the bound (file and line) instead of the format going unrecognised.
pub(super) fn sniff(path: &Path) -> Option<Kind> {
    let mut lines = Lines::open(path).ok()?;
    let first = loop {
        match lines.next_line() {
            Ok(Some((_, line))) if line.trim().is_empty() => continue,
            Ok(Some((_, line))) => break line,
            Ok(None) | Err(ReadError::Io(_)) => return None,
            Err(ReadError::Bound(_)) => return Some(Kind::Unreadable),
        }
    };
    let Value::Object(obj) = serde_json::from_str(first).ok()? else {
        return None;
    };
    if obj.contains_key("recording_id") {
        Some(Kind::Supervisions)
    } else if obj.contains_key("sources") {
        Some(Kind::Recordings)
    } else if obj.contains_key("recording") || obj.contains_key("tracks") {
        Some(Kind::Cuts)
    } else {
        None
    }
}

/// Resolves an input to the manifests it stands for.
pub(super) fn manifest_set(input: &Path) -> Result<ManifestSet, ManifestError> {
    let kind = sniff(input).ok_or_else(|| {
        ManifestError::invalid(
            input,
            "not a Lhotse manifest: the first record has none of 'sources' (recordings), \
             'recording_id' (supervisions) or 'recording' (cuts)",
        )
    })?;
    let sibling = |from: &str, to: &str| {
        let name = input.file_name()?.to_str()?;
        name.contains(from)
            .then(|| input.with_file_name(name.replacen(from, to, 1)))
    };
    match kind {
        Kind::Unreadable => for_each_line(input, |_, _| true).and_then(|()| {
            Err(ManifestError::invalid(
                input,
                "cannot read the first record",
            ))
        }),
        Kind::Cuts => Ok(ManifestSet::Cuts(input.to_path_buf())),
        Kind::Recordings => Ok(ManifestSet::Recordings {
            recordings: input.to_path_buf(),
            supervisions: sibling("recordings", "supervisions").filter(|p| p.is_file()),
        }),
        Kind::Supervisions => {
            let recordings = sibling("supervisions", "recordings")
                .filter(|p| p.is_file())
                .ok_or_else(|| {
                    ManifestError::invalid(
                        input,
                        "a supervisions manifest needs its recordings: expected a file named \
                         like this one with 'recordings' for 'supervisions' beside it",
                    )
                })?;
            Ok(ManifestSet::Recordings {
                recordings,
                supervisions: Some(input.to_path_buf()),
            })
        }
    }
}

pub(super) fn load(set: &ManifestSet) -> Result<Vec<CorpusItem>, ManifestError> {
    match set {
        ManifestSet::Cuts(path) => load_cuts(path),
        ManifestSet::Recordings {
            recordings,
            supervisions,
        } => {
            let recs = load_recordings(recordings)?;
            match supervisions {
                Some(sups) => load_supervisions(sups, &recs),
                None => Ok(recs.in_order()),
            }
        }
    }
}

/// One file of a recording's `sources` and the recording channels it holds.
#[derive(Debug, Clone)]
struct FileSource {
    channels: Vec<usize>,
    path: PathBuf,
}

/// A recording, or why it cannot be read.
#[derive(Debug, Clone)]
struct Recording {
    id: String,
    sources: Result<Vec<FileSource>, String>,
}

struct Recordings {
    path: PathBuf,
    order: Vec<(Recording, usize)>,
    by_id: HashMap<String, usize>,
}

impl Recordings {
    fn get(&self, id: &str) -> Option<&Recording> {
        self.by_id.get(id).map(|&i| &self.order[i].0)
    }

    /// One utterance per recording, all its channels.
    fn in_order(&self) -> Vec<CorpusItem> {
        self.order
            .iter()
            .map(|(rec, line)| {
                let base = Utterance {
                    id: rec.id.clone(),
                    source: PathBuf::new(),
                    start: 0.0,
                    duration: None,
                    text: None,
                    speaker: None,
                };
                with_audio(base, rec, None, origin(&self.path, *line))
            })
            .collect()
    }
}

fn origin(path: &Path, line: usize) -> Origin {
    Origin::at_line(path, line)
}

fn load_recordings(path: &Path) -> Result<Recordings, ManifestError> {
    let mut recs = Recordings {
        path: path.to_path_buf(),
        order: Vec::new(),
        by_id: HashMap::new(),
    };
    let mut duplicate = None;
    for_each_line(path, |line, text| {
        let rec = match parse_object(text) {
            Ok(obj) => match parse_recording(&obj) {
                Ok(rec) => rec,
                Err(reason) => Recording {
                    id: id_or_line(&obj, path, line),
                    sources: Err(reason),
                },
            },
            Err(reason) => Recording {
                id: format!("{}:{line}", file_stem(path)),
                sources: Err(reason),
            },
        };
        if let Some(&first) = recs.by_id.get(&rec.id) {
            duplicate.get_or_insert((line, rec.id.clone(), recs.order[first].1));
            return true;
        }
        let usable = rec.sources.is_ok();
        recs.by_id.insert(rec.id.clone(), recs.order.len());
        recs.order.push((rec, line));
        usable
    })?;
    if let Some((line, id, first)) = duplicate {
        return Err(ManifestError::line(
            path,
            line,
            format!("duplicate recording id '{id}' (first on line {first})"),
        ));
    }
    Ok(recs)
}

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err("expected one JSON object per line".into()),
        Err(e) => Err(format!("not valid JSON ({e})")),
    }
}

fn file_stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let name = name.unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

/// The row's `id`, or `MANIFEST:LINE` when it has none (only for error rows).
fn id_or_line(obj: &Map<String, Value>, path: &Path, line: usize) -> String {
    match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => format!("{}:{line}", file_stem(path)),
    }
}

fn parse_recording(obj: &Map<String, Value>) -> Result<Recording, String> {
    let id = string_field(obj, "id")?;
    if let Some(Value::Array(t)) = obj.get("transforms") {
        if !t.is_empty() {
            return Ok(Recording {
                id,
                sources: Err(
                    "recording transforms (speed, resample, ...) are not supported; \
                              prepare the original recordings and use --speed"
                        .into(),
                ),
            });
        }
    }
    let sources = match obj.get("sources") {
        Some(Value::Array(list)) if !list.is_empty() => {
            list.iter().map(parse_source).collect::<Result<Vec<_>, _>>()
        }
        _ => Err("'sources' must be a non-empty list".into()),
    };
    Ok(Recording { id, sources })
}

fn parse_source(value: &Value) -> Result<FileSource, String> {
    let Value::Object(obj) = value else {
        return Err("a source must be an object".into());
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("file");
    if kind != "file" {
        return Err(format!(
            "source type '{kind}' is not supported (only 'file'; speechcache reads local files)"
        ));
    }
    let path = string_field(obj, "source")?;
    let channels = match obj.get("channels") {
        Some(v) => channel_list(v).ok_or("a source's 'channels' must be a list of indices")?,
        None => vec![0],
    };
    Ok(FileSource {
        channels,
        path: PathBuf::from(path),
    })
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        _ => Err(format!("'{key}' must be a non-empty string")),
    }
}

/// An index or a list of them.
fn channel_list(value: &Value) -> Option<Vec<usize>> {
    match value {
        Value::Number(n) => Some(vec![usize::try_from(n.as_u64()?).ok()?]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_u64().and_then(|c| usize::try_from(c).ok()))
            .collect(),
        _ => None,
    }
}

fn seconds(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(s)),
            _ => Err(format!(
                "'{key}' must be a non-negative number of seconds, found {v}"
            )),
        },
    }
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Completes `utt` with its recording's file and the channels to read, or marks it invalid.
fn with_audio(
    mut utt: Utterance,
    rec: &Recording,
    channel: Option<&[usize]>,
    origin: Origin,
) -> CorpusItem {
    let audio = match &rec.sources {
        Err(reason) => Err(format!("recording '{}': {reason}", rec.id)),
        Ok(sources) => pick_source(sources, channel, &rec.id),
    };
    let audio = match audio {
        Ok((path, audio)) => {
            utt.source = path;
            audio
        }
        Err(reason) => AudioRef::Invalid(reason),
    };
    CorpusItem { utt, audio, origin }
}

/// The file holding `channel` (all channels when None) and the channels to keep in it.
fn pick_source(
    sources: &[FileSource],
    channel: Option<&[usize]>,
    rec: &str,
) -> Result<(PathBuf, AudioRef), String> {
    let Some(wanted) = channel else {
        return match sources {
            [only] => Ok((only.path.clone(), AudioRef::File)),
            _ => Err(format!(
                "recording '{rec}' has {} source files; give each supervision or cut a 'channel'",
                sources.len()
            )),
        };
    };
    let all: Vec<usize> = sources.iter().flat_map(|s| s.channels.clone()).collect();
    let holder = sources
        .iter()
        .find(|s| wanted.iter().all(|c| s.channels.contains(c)))
        .ok_or_else(|| {
            if let Some(missing) = wanted.iter().find(|c| !all.contains(c)) {
                format!(
                    "channel {missing} is not in recording '{rec}' (its channels: {})",
                    join(&all)
                )
            } else {
                format!(
                    "channels {} of recording '{rec}' are in different files",
                    join(wanted)
                )
            }
        })?;
    let local: Vec<usize> = wanted
        .iter()
        .filter_map(|c| holder.channels.iter().position(|h| h == c))
        .collect();
    let every: Vec<usize> = (0..holder.channels.len()).collect();
    let mut sorted = local.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let audio = if sorted == every {
        AudioRef::File
    } else {
        AudioRef::Channels(local)
    };
    Ok((holder.path.clone(), audio))
}

fn join(channels: &[usize]) -> String {
    channels
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn invalid(id: String, origin: Origin, reason: String) -> CorpusItem {
    CorpusItem {
        utt: Utterance {
            id,
            source: PathBuf::new(),
            start: 0.0,
            duration: None,
            text: None,
            speaker: None,
        },
        audio: AudioRef::Invalid(reason),
        origin,
    }
}

fn load_supervisions(path: &Path, recs: &Recordings) -> Result<Vec<CorpusItem>, ManifestError> {
    let mut items = Vec::new();
    for_each_line(path, |line, text| {
        let here = origin(path, line);
        let obj = match parse_object(text) {
            Ok(obj) => obj,
            Err(reason) => {
                items.push(invalid(format!("{}:{line}", file_stem(path)), here, reason));
                return false;
            }
        };
        let id = id_or_line(&obj, path, line);
        match parse_supervision(&obj, recs) {
            Ok((utt, rec, channel)) => items.push(with_audio(utt, rec, channel.as_deref(), here)),
            Err(reason) => items.push(invalid(id, here, reason)),
        }
        items
            .last()
            .is_some_and(|item| !matches!(item.audio, AudioRef::Invalid(_)))
    })?;
    Ok(items)
}

type Parsed<'a> = (Utterance, &'a Recording, Option<Vec<usize>>);

fn parse_supervision<'a>(
    obj: &Map<String, Value>,
    recs: &'a Recordings,
) -> Result<Parsed<'a>, String> {
    let id = string_field(obj, "id")?;
    let rec_id = string_field(obj, "recording_id")?;
    let rec = recs
        .get(&rec_id)
        .ok_or_else(|| format!("recording '{rec_id}' is not in {}", recs.path.display()))?;
    let utt = segment(obj, id)?;
    let channel = channel_of(obj)?;
    Ok((
        Utterance {
            text: optional_string(obj, "text"),
            speaker: optional_string(obj, "speaker"),
            ..utt
        },
        rec,
        channel,
    ))
}

/// `start` and `duration` of a supervision or cut (the source is filled in later).
fn segment(obj: &Map<String, Value>, id: String) -> Result<Utterance, String> {
    if id.chars().any(char::is_whitespace) {
        return Err(format!("id '{id}' contains whitespace"));
    }
    let start = seconds(obj, "start")?.unwrap_or(0.0);
    let duration = seconds(obj, "duration")?
        .filter(|d| *d > 0.0)
        .ok_or("'duration' must be a positive number of seconds")?;
    Ok(Utterance {
        id,
        source: PathBuf::new(),
        start,
        duration: Some(duration),
        text: None,
        speaker: None,
    })
}

fn channel_of(obj: &Map<String, Value>) -> Result<Option<Vec<usize>>, String> {
    match obj.get("channel") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => channel_list(v)
            .map(Some)
            .ok_or_else(|| format!("'channel' must be an index or a list of indices, found {v}")),
    }
}

fn load_cuts(path: &Path) -> Result<Vec<CorpusItem>, ManifestError> {
    let mut items = Vec::new();
    for_each_line(path, |line, text| {
        let here = origin(path, line);
        let obj = match parse_object(text) {
            Ok(obj) => obj,
            Err(reason) => {
                items.push(invalid(format!("{}:{line}", file_stem(path)), here, reason));
                return false;
            }
        };
        let id = id_or_line(&obj, path, line);
        match parse_cut(&obj) {
            Ok((utt, rec, channel)) => items.push(with_audio(utt, &rec, channel.as_deref(), here)),
            Err(reason) => items.push(invalid(id, here, reason)),
        }
        items
            .last()
            .is_some_and(|item| !matches!(item.audio, AudioRef::Invalid(_)))
    })?;
    Ok(items)
}

fn parse_cut(
    obj: &Map<String, Value>,
) -> Result<(Utterance, Recording, Option<Vec<usize>>), String> {
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("MonoCut");
    if kind != "MonoCut" && kind != "MultiCut" {
        return Err(format!(
            "cut type '{kind}' is not supported (only MonoCut and MultiCut; mixed and padding \
             cuts have no single recording)"
        ));
    }
    let id = string_field(obj, "id")?;
    let Some(Value::Object(rec)) = obj.get("recording") else {
        return Err("the cut has no 'recording' (a features-only cut cannot be prepared)".into());
    };
    let rec = parse_recording(rec)?;
    let utt = segment(obj, id)?;
    let channel = channel_of(obj)?;
    let sups: Vec<&Map<String, Value>> = match obj.get("supervisions") {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_object).collect(),
        _ => Vec::new(),
    };
    let texts: Vec<String> = sups
        .iter()
        .filter_map(|s| optional_string(s, "text"))
        .collect();
    let speakers: Vec<Option<String>> =
        sups.iter().map(|s| optional_string(s, "speaker")).collect();
    let speaker = match speakers.first() {
        Some(first) if speakers.iter().all(|s| s == first) => first.clone(),
        _ => None,
    };
    Ok((
        Utterance {
            text: (!texts.is_empty()).then(|| texts.join(" ")),
            speaker,
            ..utt
        },
        rec,
        channel,
    ))
}
