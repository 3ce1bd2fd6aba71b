//! Line-oriented reading shared by the manifest importers: UTF-8 checked per line so that
//! errors name the line, `\r\n` endings and a leading byte-order mark tolerated.
use super::ManifestError;
use std::path::Path;

/// One line of a manifest file with its 1-based number.
pub(crate) struct NumberedLine {
    pub number: usize,
    pub text: String,
}

/// Reads `path` as lines; blank (whitespace-only) lines are dropped unless `keep_blank`.
/// With `keep_blank`, the empty piece after a final newline is still not a line.
pub(crate) fn read_lines(
    path: &Path,
    keep_blank: bool,
) -> Result<Vec<NumberedLine>, ManifestError> {
    let bytes = crate::regular_file::read_regular(path).map_err(|e| ManifestError::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut lines = Vec::new();
    let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if pieces.last().is_some_and(|p| p.is_empty()) {
        pieces.pop();
    }
    for (index, raw) in pieces.into_iter().enumerate() {
        let number = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw)
            .map_err(|e| ManifestError::line(path, number, format!("not valid UTF-8 ({e})")))?;
        if !keep_blank && text.trim().is_empty() {
            continue;
        }
        lines.push(NumberedLine {
            number,
            text: text.to_string(),
        });
    }
    Ok(lines)
}

/// Splits `KEY REST` at the first run of whitespace; `REST` is trimmed and may be empty.
pub(crate) fn split_key(line: &str) -> (&str, &str) {
    let line = line.trim();
    match line.find(char::is_whitespace) {
        Some(pos) => (&line[..pos], line[pos..].trim()),
        None => (line, ""),
    }
}
