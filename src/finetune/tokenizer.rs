//! Character units for CTC, built from the training transcripts and stored as an ESPnet-style
//! `tokens.txt` (one token per line, the line number is the id).
//!
//! Ids: `<blank>` = 0 (the CTC blank), `<unk>` = 1, then every character of the training text in
//! code point order, so the same transcripts always give the same ids. A word boundary is the
//! token `<space>` (ESPnet's name); Mandarin characters are tokens of their own. Text is kept as
//! written (no case folding, as ESPnet's char tokenizer), except that whitespace runs collapse to
//! one boundary and leading/trailing whitespace is dropped.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const BLANK: &str = "<blank>";
pub const UNK: &str = "<unk>";
pub const SPACE: &str = "<space>";
/// What [`Tokenizer::decode`] writes for `<unk>` or an id outside the vocabulary: one character
/// (as SentencePiece does), so a decoded unknown costs one CER error, not five.
pub const UNK_TEXT: char = '\u{2047}';

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read token list {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write token list {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (expected one token per line: <blank>, <unk>, then single characters or <space>)")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Character vocabulary: id ↔ token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenizer {
    tokens: Vec<String>,
    ids: HashMap<char, u32>,
}

impl Tokenizer {
    pub const BLANK_ID: u32 = 0;
    pub const UNK_ID: u32 = 1;

    /// Vocabulary of every character in `texts` (after [`normalize`]).
    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>) -> Tokenizer {
        let mut chars = BTreeSet::new();
        for text in texts {
            chars.extend(normalize(text).chars());
        }
        let mut tokens = vec![BLANK.to_string(), UNK.to_string()];
        tokens.extend(chars.into_iter().map(char_token));
        Self::from_tokens(tokens)
    }

    fn from_tokens(tokens: Vec<String>) -> Tokenizer {
        let ids = tokens
            .iter()
            .enumerate()
            .filter_map(|(id, token)| token_char(token).map(|c| (c, id as u32)))
            .collect();
        Tokenizer { tokens, ids }
    }

    /// Number of tokens, blank and unk included (the CTC output dimension).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// All tokens, index = id.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The token of `id`, if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Ids of the normalised text and how many of its characters were not in the vocabulary
    /// (each encoded as `<unk>`).
    pub fn encode(&self, text: &str) -> (Vec<u32>, usize) {
        let mut unknown = 0;
        let ids = normalize(text)
            .chars()
            .map(|c| match self.ids.get(&c) {
                Some(&id) => id,
                None => {
                    unknown += 1;
                    Self::UNK_ID
                }
            })
            .collect();
        (ids, unknown)
    }

    /// Text of `ids`: blanks are skipped, `<space>` is a space, `<unk>` and unknown ids are
    /// [`UNK_TEXT`], other special tokens (e.g. ESPnet's `<sos/eos>`) are dropped. The result is
    /// normalised (no leading, trailing or doubled spaces).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::with_capacity(ids.len());
        for &id in ids {
            match self.token(id) {
                Some(BLANK) => {}
                Some(UNK) | None => text.push(UNK_TEXT),
                Some(token) => {
                    if let Some(c) = token_char(token) {
                        text.push(c);
                    }
                }
            }
        }
        normalize(&text)
    }

    /// Writes `tokens.txt`: one token per line, line `i` (from 0) is id `i`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let mut text = String::new();
        for token in &self.tokens {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{token}");
        }
        crate::regular_file::write_atomic(path, text.as_bytes())
            .map_err(|(path, source)| TokenizerError::Write { path, source })
    }

    /// Reads a `tokens.txt` written by [`Tokenizer::save`] (or an ESPnet char token list).
    pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |line: usize, reason: String| TokenizerError::Invalid {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let tokens: Vec<String> = text.lines().map(str::to_string).collect();
        for (i, expected) in [BLANK, UNK].into_iter().enumerate() {
            if tokens.get(i).map(String::as_str) != Some(expected) {
                return Err(invalid(i + 1, format!("line {} must be {expected}", i + 1)));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, token) in tokens.iter().enumerate() {
            let special = token.len() > 2 && token.starts_with('<') && token.ends_with('>');
            if !special && token.chars().count() != 1 {
                return Err(invalid(i + 1, format!("{token:?} is not one character")));
            }
            if token.chars().any(char::is_whitespace) {
                return Err(invalid(
                    i + 1,
                    "whitespace must be written as <space>".into(),
                ));
            }
            if !seen.insert(token.as_str()) {
                return Err(invalid(i + 1, format!("duplicate token {token:?}")));
            }
        }
        Ok(Self::from_tokens(tokens))
    }
}

/// Collapses whitespace runs to one space and trims the ends; everything else is kept as is.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn char_token(c: char) -> String {
    if c == ' ' {
        SPACE.to_string()
    } else {
        c.to_string()
    }
}

/// The character a token stands for; `None` for `<blank>`, `<unk>` and other specials.
fn token_char(token: &str) -> Option<char> {
    if token == SPACE {
        return Some(' ');
    }
    let mut chars = token.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    }
}
