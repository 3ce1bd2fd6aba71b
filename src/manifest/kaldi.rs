//! A Kaldi data directory: `wav.scp` (`REC PATH`) plus optional `text` (`UTT TEXT`),
//! `utt2spk` (`UTT SPK`) and `segments` (`UTT REC START END`, seconds; END `-1` means to the
//! end of the recording). With `segments` the utterances are its lines, in order; without it,
//! each recording is one utterance, in `wav.scp` order.
//!
//! Relative paths in `wav.scp` are relative to the current directory, as in Kaldi (whose
//! tools open them from the recipe directory). Piped entries (`cmd |`) and extended file
//! names (`file.ark:123`, ranges `[...]`) are refused: speechcache runs no shell and reads no
//! archives. Entries of `text` or `utt2spk` for utterances that do not exist are ignored,
//! as after Kaldi's `fix_data_dir.sh`.
use super::text_file::{read_lines, split_key, NumberedLine};
use super::{Located, ManifestError, Origin, Utterance};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A value read from a `KEY VALUE` file, with the line it came from.
struct Keyed {
    value: String,
    line: usize,
}

pub(super) fn load(input: &Path) -> Result<Located, ManifestError> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        super::parent_dir(input)
    };
    let wav_scp = dir.join("wav.scp");
    let recordings = read_keyed(&wav_scp, false)?;
    let mut sources: HashMap<&str, PathBuf> = HashMap::with_capacity(recordings.len());
    for (rec, entry) in &recordings {
        sources.insert(rec.as_str(), recording_path(&wav_scp, entry)?);
    }
    let texts = read_optional(&dir.join("text"), true)?;
    let speakers = read_optional(&dir.join("utt2spk"), false)?;
    let label = |utt: Utterance| Utterance {
        text: texts.get(&utt.id).map(|k| k.value.clone()),
        speaker: speakers.get(&utt.id).map(|k| k.value.clone()),
        ..utt
    };
    let segments_path = dir.join("segments");
    let mut items = Vec::new();
    if segments_path.is_file() {
        for line in read_lines(&segments_path, false)? {
            let utt = parse_segment(&segments_path, &line, &sources)?;
            items.push((label(utt), Origin::at_line(&segments_path, line.number)));
        }
    } else {
        for (rec, entry) in &recordings {
            let utt = Utterance {
                id: rec.clone(),
                source: sources.get(rec.as_str()).cloned().unwrap_or_default(),
                start: 0.0,
                duration: None,
                text: None,
                speaker: None,
            };
            items.push((label(utt), Origin::at_line(&wav_scp, entry.line)));
        }
    }
    Ok(items)
}

/// Reads a `KEY VALUE` file in order; a key given twice is an error naming both lines.
/// `allow_empty` admits lines with a key only (an empty transcript in `text`).
fn read_keyed(path: &Path, allow_empty: bool) -> Result<Vec<(String, Keyed)>, ManifestError> {
    let mut entries: Vec<(String, Keyed)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in read_lines(path, false)? {
        let (key, value) = split_key(&line.text);
        if value.is_empty() && !allow_empty {
            return Err(ManifestError::line(
                path,
                line.number,
                format!("expected 'KEY VALUE', found only '{key}'"),
            ));
        }
        if let Some(first) = seen.insert(key.to_string(), line.number) {
            return Err(ManifestError::line(
                path,
                line.number,
                format!("'{key}' given twice (first on line {first})"),
            ));
        }
        entries.push((
            key.to_string(),
            Keyed {
                value: value.to_string(),
                line: line.number,
            },
        ));
    }
    Ok(entries)
}

/// Like `read_keyed`, for an optional file: an absent file gives an empty map.
fn read_optional(path: &Path, allow_empty: bool) -> Result<HashMap<String, Keyed>, ManifestError> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    Ok(read_keyed(path, allow_empty)?.into_iter().collect())
}

/// The audio file of one `wav.scp` entry; refuses what only a shell or archive reader could
/// open.
fn recording_path(wav_scp: &Path, entry: &Keyed) -> Result<PathBuf, ManifestError> {
    let value = entry.value.as_str();
    let refuse = |what: &str| {
        ManifestError::line(
            wav_scp,
            entry.line,
            format!(
                "{what} '{value}' is not supported: speechcache reads audio files directly; \
                 convert the entry to a plain file path (e.g. run the command once and save its output)"
            ),
        )
    };
    if value.ends_with('|') {
        return Err(refuse("piped command"));
    }
    if value == "-" {
        return Err(refuse("standard input"));
    }
    if is_extended_filename(value) {
        return Err(refuse("extended file name with an offset or range"));
    }
    Ok(PathBuf::from(value))
}

/// Kaldi's `file.ark:123` (byte offset) and `file[...]` (range) forms.
fn is_extended_filename(value: &str) -> bool {
    if value.ends_with(']') && value.contains('[') {
        return true;
    }
    match value.rsplit_once(':') {
        Some((_, offset)) => !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

fn parse_segment(
    path: &Path,
    line: &NumberedLine,
    sources: &HashMap<&str, PathBuf>,
) -> Result<Utterance, ManifestError> {
    let bad = |reason: String| ManifestError::line(path, line.number, reason);
    let fields: Vec<&str> = line.text.split_whitespace().collect();
    let [utt, rec, start, end] = fields[..] else {
        return Err(bad(format!(
            "expected 'UTT REC START END', found '{}'",
            line.text.trim()
        )));
    };
    let number = |s: &str, what: &str| {
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(format!("{what} '{s}' is not a number of seconds")))
    };
    let start_s = number(start, "start")?;
    let end_s = number(end, "end")?;
    if start_s < 0.0 {
        return Err(bad(format!("start {start} is negative")));
    }
    let duration = if end_s == -1.0 {
        None
    } else if end_s > start_s {
        // Rounded to microseconds so `1.2 - 0.9` reads back as 0.3, not 0.29999999999999993.
        Some(((end_s - start_s) * 1e6).round() / 1e6)
    } else {
        return Err(bad(format!(
            "end {end} is not after start {start} (use -1 for the end of the recording)"
        )));
    };
    let source = sources
        .get(rec)
        .cloned()
        .ok_or_else(|| bad(format!("recording '{rec}' is not in wav.scp")))?;
    Ok(Utterance {
        id: utt.to_string(),
        source,
        start: start_s,
        duration,
        text: None,
        speaker: None,
    })
}
