//! A fairseq audio manifest: the first line is the root directory (relative to the manifest's
//! directory when not absolute), then one `relpath<TAB>num_samples` line per utterance.
//! Labels come from a sibling file with the same stem: `.wrd` (words, preferred) or `.ltr`
//! (letters separated by spaces, `|` ending each word; converted to words). A label file is
//! line-aligned with the entries: each of its lines counts, an empty line being an empty
//! transcript. Ids are derived from the relative paths as for a directory.
use super::dir::ids_from_paths;
use super::text_file::{read_lines, NumberedLine};
use super::{parent_dir, resolve_relative, Located, ManifestError, Origin, Utterance};
use std::path::{Path, PathBuf};

struct Entry {
    relpath: String,
    line: usize,
}

pub(super) fn load(path: &Path) -> Result<Located, ManifestError> {
    let lines = read_lines(path, false)?;
    let Some((root_line, entry_lines)) = lines.split_first() else {
        return Err(ManifestError::invalid(
            path,
            "empty fairseq manifest: expected the root directory on the first line",
        ));
    };
    let root = resolve_relative(&parent_dir(path), root_line.text.trim());
    let entries = entry_lines
        .iter()
        .map(|l| parse_entry(path, l))
        .collect::<Result<Vec<_>, _>>()?;
    let labels = read_labels(path, entries.len())?;
    let relative: Vec<&Path> = entries.iter().map(|e| Path::new(&e.relpath)).collect();
    let ids =
        ids_from_paths(&relative).map_err(|(a, b)| duplicate_path_error(path, &entries, a, b))?;
    let mut items = Vec::with_capacity(entries.len());
    for (i, (entry, id)) in entries.iter().zip(ids).enumerate() {
        let utt = Utterance {
            id,
            source: resolve_relative(&root, &entry.relpath),
            start: 0.0,
            duration: None,
            text: labels.as_ref().map(|l| l[i].clone()),
            speaker: None,
        };
        items.push((utt, Origin::at_line(path, entry.line)));
    }
    Ok(items)
}

fn parse_entry(path: &Path, line: &NumberedLine) -> Result<Entry, ManifestError> {
    let mut fields = line.text.split('\t');
    let relpath = fields.next().unwrap_or("").trim();
    let samples = fields.next().map(str::trim);
    match samples {
        Some(n) if !relpath.is_empty() && n.parse::<u64>().is_ok() => Ok(Entry {
            relpath: relpath.to_string(),
            line: line.number,
        }),
        _ => Err(ManifestError::line(
            path,
            line.number,
            format!(
                "expected 'relpath<TAB>num_samples', found '{}'",
                line.text.trim()
            ),
        )),
    }
}

/// Names two entries whose derived ids collide.
fn duplicate_path_error(path: &Path, entries: &[Entry], a: usize, b: usize) -> ManifestError {
    ManifestError::line(
        path,
        entries[b].line,
        format!(
            "'{}' gives the same utterance id as '{}' on line {}",
            entries[b].relpath, entries[a].relpath, entries[a].line
        ),
    )
}

/// The sibling label file's transcripts, one per entry, or `None` when there is none.
fn read_labels(tsv: &Path, count: usize) -> Result<Option<Vec<String>>, ManifestError> {
    let wrd = tsv.with_extension("wrd");
    let ltr = tsv.with_extension("ltr");
    let (label_path, letters): (PathBuf, bool) = if wrd.is_file() {
        (wrd, false)
    } else if ltr.is_file() {
        (ltr, true)
    } else {
        return Ok(None);
    };
    let lines = read_lines(&label_path, true)?;
    if lines.len() != count {
        return Err(ManifestError::invalid(
            &label_path,
            format!(
                "has {} lines but {} has {} entries; the label file must be line-aligned with the manifest",
                lines.len(),
                tsv.display(),
                count
            ),
        ));
    }
    let texts = lines
        .iter()
        .map(|l| {
            if letters {
                letters_to_words(&l.text)
            } else {
                l.text.split_whitespace().collect::<Vec<_>>().join(" ")
            }
        })
        .collect();
    Ok(Some(texts))
}

/// fairseq letter labels to words: `H E L L O | W O R L D |` → `HELLO WORLD`.
pub(crate) fn letters_to_words(line: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    for token in line.split_whitespace() {
        if token == "|" {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push_str(token);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words.join(" ")
}
