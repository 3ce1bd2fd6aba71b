//! A directory of audio files, scanned recursively (symlinks followed, hidden entries
//! skipped) in sorted order of the relative path bytes, so the order never depends on the
//! file system.
//!
//! Ids are file stems (LibriSpeech- and AISHELL-style ids come out as the corpora spell
//! them). If two files share a stem, every id of the directory becomes the relative path
//! without extension, `/` replaced by `-`; if that still collides, it is an error. Whitespace
//! in derived ids becomes `_` so ids stay single tokens in `ID TEXT` files.
use super::layouts::{
    read_transcripts, speaker_in_tree, speaker_of, stem_of, transcript_layout, Layout,
};
use super::{is_audio_path, Located, ManifestError, Origin, Utterance, AUDIO_EXTENSIONS};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use walkdir::WalkDir;

/// What a scan found: audio files and layout transcript files, each sorted.
struct Scan {
    audio: Vec<PathBuf>,
    transcripts: Vec<(PathBuf, Layout)>,
}

pub(super) fn load(root: &Path) -> Result<Located, ManifestError> {
    let scan = scan(root)?;
    if scan.audio.is_empty() {
        return Err(ManifestError::invalid(
            root,
            format!(
                "no audio files found (looked for extensions: {})",
                AUDIO_EXTENSIONS.join(", ")
            ),
        ));
    }
    let transcripts = read_transcripts(&scan.transcripts)?;
    let mut layouts: Vec<Layout> = scan.transcripts.iter().map(|(_, l)| *l).collect();
    layouts.dedup();
    let relative: Vec<&Path> = scan
        .audio
        .iter()
        .map(|p| p.strip_prefix(root).unwrap_or(p))
        .collect();
    let ids = ids_from_paths(&relative).map_err(|(a, b)| {
        ManifestError::invalid(
            root,
            format!(
                "'{}' and '{}' map to the same utterance id; rename one of them",
                scan.audio[a].display(),
                scan.audio[b].display()
            ),
        )
    })?;
    let mut items = Vec::with_capacity(scan.audio.len());
    for (path, id) in scan.audio.iter().zip(ids) {
        let stem = stem_of(path);
        let (text, speaker) = match transcripts.get(&stem) {
            Some(t) => (Some(t.text.clone()), speaker_of(t.layout, &stem)),
            None => (None, speaker_in_tree(&layouts, &stem)),
        };
        let utt = Utterance {
            id,
            source: path.clone(),
            start: 0.0,
            duration: None,
            text,
            speaker,
        };
        items.push((utt, Origin::file(path)));
    }
    Ok(items)
}

fn scan(root: &Path) -> Result<Scan, ManifestError> {
    let mut audio = Vec::new();
    let mut transcripts = Vec::new();
    let walker = WalkDir::new(root)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let entry = entry.map_err(|e| walk_error(root, e))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy();
        if let Some(layout) = transcript_layout(&name) {
            transcripts.push((entry.into_path(), layout));
        } else if is_audio_path(entry.path()) {
            audio.push(entry.into_path());
        }
    }
    let key = |p: &PathBuf| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .as_os_str()
            .as_encoded_bytes()
            .to_vec()
    };
    audio.sort_by_cached_key(key);
    transcripts.sort_by_cached_key(|(p, _)| key(p));
    Ok(Scan { audio, transcripts })
}

fn walk_error(root: &Path, e: walkdir::Error) -> ManifestError {
    let path = e.path().unwrap_or(root).to_path_buf();
    if let Some(ancestor) = e.loop_ancestor() {
        let reason = format!("symbolic link loop back to {}", ancestor.display());
        return ManifestError::invalid(&path, reason);
    }
    match e.into_io_error() {
        Some(io) => ManifestError::io(&path, io),
        None => ManifestError::invalid(&path, "cannot read directory entry"),
    }
}

/// Utterance ids for audio files given by their paths relative to a corpus root: the stems,
/// or (when stems collide) the relative paths without extension with `/` → `-`.
/// `Err((a, b))` names two indexes that still map to the same id.
pub(crate) fn ids_from_paths(relative: &[&Path]) -> Result<Vec<String>, (usize, usize)> {
    let stems: Vec<String> = relative.iter().map(|p| clean_id(&stem_of(p))).collect();
    let unique: HashSet<&str> = stems.iter().map(String::as_str).collect();
    if unique.len() == stems.len() {
        return Ok(stems);
    }
    let path_id = |p: &Path| {
        let parts: Vec<String> = p
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        clean_id(&parts.join("-"))
    };
    let mut ids: Vec<String> = relative
        .iter()
        .map(|p| path_id(&p.with_extension("")))
        .collect();
    let unique: HashSet<&str> = ids.iter().map(String::as_str).collect();
    if unique.len() != ids.len() {
        // Same name in two codecs (a.flac, a.mp3): keep the extension in the id.
        ids = relative.iter().map(|p| path_id(p)).collect();
    }
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        if let Some(&j) = first.get(id.as_str()) {
            return Err((j, i));
        }
        first.insert(id, i);
    }
    Ok(ids)
}

/// Makes a derived id a single token: whitespace becomes `_`.
pub(crate) fn clean_id(raw: &str) -> String {
    raw.chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}
