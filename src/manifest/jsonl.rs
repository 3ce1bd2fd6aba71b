//! JSON lines: one object per utterance. Our fields are `id`, `path`, `start`, `duration`,
//! `text`, `speaker`; NeMo's `audio_filepath`, `offset`, `duration`, `text` are read too
//! (other keys are ignored). Relative paths are relative to the manifest file's directory.
//!
//! `duration` with `path` always bounds the utterance. NeMo writes `duration` for whole
//! files as well (the file's length, rounded), so with `audio_filepath` and no `offset` the
//! whole file is read rather than cutting it at a rounded length.
//!
//! A missing `id` is derived from the file stem; a segment (an entry with a start or a
//! duration) gets Kaldi-style `STEM-START-END` in centiseconds, e.g. `talk-0001250-0003000`.
use super::dir::clean_id;
use super::layouts::stem_of;
use super::text_file::read_lines;
use super::{parent_dir, resolve_relative, Located, ManifestError, Origin, Utterance};
use serde_json::{Map, Value};
use std::path::Path;

pub(super) fn load(path: &Path) -> Result<Located, ManifestError> {
    let base = parent_dir(path);
    let mut items = Vec::new();
    for line in read_lines(path, false)? {
        let bad = |reason: String| ManifestError::line(path, line.number, reason);
        let value: Value =
            serde_json::from_str(&line.text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let Value::Object(obj) = value else {
            return Err(bad(
                "expected one JSON object per line (JSON lines), found another JSON value".into(),
            ));
        };
        let utt = parse_object(&obj, &base).map_err(bad)?;
        items.push((utt, Origin::at_line(path, line.number)));
    }
    Ok(items)
}

fn parse_object(obj: &Map<String, Value>, base: &Path) -> Result<Utterance, String> {
    let nemo = obj.contains_key("audio_filepath");
    let audio = one_of(obj, "path", "audio_filepath")?
        .ok_or("missing the audio path ('path', or NeMo's 'audio_filepath')")?;
    let audio = audio
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("the audio path must be a non-empty string")?;
    let start_value = one_of(obj, "start", "offset")?;
    let start = match start_value {
        Some(v) => seconds(v, "start/offset")?,
        None => 0.0,
    };
    if start < 0.0 {
        return Err(format!("start {start} is negative"));
    }
    let duration = match obj.get("duration") {
        None | Some(Value::Null) => None,
        Some(_) if nemo && start_value.is_none() => None,
        Some(v) => {
            let d = seconds(v, "duration")?;
            if d <= 0.0 {
                return Err(format!("duration {d} is not positive"));
            }
            Some(d)
        }
    };
    let source = resolve_relative(base, audio);
    let id = match obj.get("id") {
        None | Some(Value::Null) => derived_id(&source, start, duration, start_value.is_some()),
        Some(v) => {
            let id = token(v).ok_or("'id' must be a string or an integer")?;
            if id.is_empty() || id.chars().any(char::is_whitespace) {
                return Err(format!(
                    "id '{id}' must be non-empty and contain no whitespace"
                ));
            }
            id
        }
    };
    let text = match obj.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("'text' must be a string".into()),
    };
    let speaker = match obj.get("speaker") {
        None | Some(Value::Null) => None,
        Some(v) => Some(token(v).ok_or("'speaker' must be a string or an integer")?),
    };
    Ok(Utterance {
        id,
        source,
        start,
        duration,
        text,
        speaker,
    })
}

/// The value of `ours` or `theirs`; both present is ambiguous unless they agree.
fn one_of<'a>(
    obj: &'a Map<String, Value>,
    ours: &str,
    theirs: &str,
) -> Result<Option<&'a Value>, String> {
    match (obj.get(ours), obj.get(theirs)) {
        (Some(a), Some(b)) if a != b => Err(format!(
            "both '{ours}' and '{theirs}' are given and differ; keep one"
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

fn seconds(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64()
        .filter(|s| s.is_finite())
        .ok_or_else(|| format!("'{what}' must be a number of seconds, found {v}"))
}

/// A string, or an integer written as its decimal digits (NeMo speaker ids are often ints).
fn token(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn derived_id(source: &Path, start: f64, duration: Option<f64>, has_start: bool) -> String {
    let stem = clean_id(&stem_of(source));
    let centis = |s: f64| (s * 100.0).round() as u64;
    match duration {
        Some(d) => format!("{stem}-{:07}-{:07}", centis(start), centis(start + d)),
        None if has_start || start > 0.0 => format!("{stem}-{:07}", centis(start)),
        None => stem,
    }
}
