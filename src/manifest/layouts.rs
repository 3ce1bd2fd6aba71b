//! Corpus layouts recognised inside a scanned directory, so transcripts and speakers come
//! along with the audio:
//!
//! - LibriSpeech: `SPK/CHAPTER/SPK-CHAPTER.trans.txt`, lines `ID TEXT`; the speaker is the
//!   first dash-separated field of the id (`103-1240-0000` → `103`).
//! - AISHELL-1: `transcript/aishell_transcript_v0.8.txt`, lines `ID 字 字 ...` (word-segmented
//!   with spaces). As ESPnet's aishell recipe does (`local/data.sh`, "remove space in text"),
//!   the spaces are removed, so the text is the plain character string. The speaker is the
//!   `S0002`-style field of the id (`BAC009S0002W0122` → `S0002`), which is also the name of
//!   the directory holding the audio.
use super::text_file::{read_lines, split_key};
use super::{ManifestError, Origin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    LibriSpeech,
    Aishell,
}

/// A transcript line of a layout: its text and where it was read.
pub(crate) struct Transcript {
    pub text: String,
    pub origin: Origin,
    pub layout: Layout,
}

/// Which layout a transcript file belongs to, by its file name.
pub(crate) fn transcript_layout(file_name: &str) -> Option<Layout> {
    if file_name.ends_with(".trans.txt") {
        Some(Layout::LibriSpeech)
    } else if file_name.starts_with("aishell_transcript") && file_name.ends_with(".txt") {
        Some(Layout::Aishell)
    } else {
        None
    }
}

/// Reads transcript files (already in a deterministic order) into one map keyed by the
/// utterance id (the audio file stem). An id given twice is an error naming both lines.
pub(crate) fn read_transcripts(
    files: &[(PathBuf, Layout)],
) -> Result<HashMap<String, Transcript>, ManifestError> {
    let mut map: HashMap<String, Transcript> = HashMap::new();
    for (path, layout) in files {
        for line in read_lines(path, false)? {
            let (id, rest) = split_key(&line.text);
            let text = match layout {
                Layout::LibriSpeech => rest.to_string(),
                Layout::Aishell => rest.split_whitespace().collect::<String>(),
            };
            let origin = Origin::at_line(path, line.number);
            if let Some(first) = map.get(id) {
                return Err(ManifestError::line(
                    path,
                    line.number,
                    format!(
                        "transcript for '{id}' given twice (first at {})",
                        first.origin
                    ),
                ));
            }
            map.insert(
                id.to_string(),
                Transcript {
                    text,
                    origin,
                    layout: *layout,
                },
            );
        }
    }
    Ok(map)
}

/// The speaker of an utterance id under a layout, when the id has that layout's shape.
pub(crate) fn speaker_of(layout: Layout, id: &str) -> Option<String> {
    match layout {
        Layout::LibriSpeech => {
            let fields: Vec<&str> = id.split('-').collect();
            let shaped = fields.len() == 3
                && fields
                    .iter()
                    .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
            shaped.then(|| fields[0].to_string())
        }
        Layout::Aishell => {
            let b = id.as_bytes();
            let shaped = b.len() >= 16
                && id.is_ascii()
                && b[6] == b'S'
                && b[11] == b'W'
                && b[7..11].iter().all(u8::is_ascii_digit);
            shaped.then(|| id[6..11].to_string())
        }
    }
}

/// The speaker of an audio file found in a tree holding `layouts`: the first layout whose id
/// shape matches the file stem.
pub(crate) fn speaker_in_tree(layouts: &[Layout], stem: &str) -> Option<String> {
    layouts.iter().find_map(|&layout| speaker_of(layout, stem))
}

/// The stem (file name without extension) of a path, as text.
pub(crate) fn stem_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
