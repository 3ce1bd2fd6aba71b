//! Error rates (CER, WER) from a Levenshtein alignment of reference and hypothesis tokens, with
//! the substitution / deletion / insertion breakdown that sclite and ESPnet's RESULTS.md report.
//!
//! Alignment: the total number of edits is minimal (it equals `editdistance.eval`, the count
//! ESPnet's validation CER/WER uses). Among alignments with that minimum, the one with the fewest
//! substitutions (so the most correct tokens) is reported, which is the alignment sclite's default
//! weights (substitution 4, insertion 3, deletion 3) prefer among them. sclite itself minimises the
//! weighted cost, so in rare cases it reports one more edit than the minimum (e.g. 4 deletions +
//! 4 insertions where 7 substitutions would do); we always report the minimum.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

/// Edit counts of one alignment, or of a whole test set when summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    pub sub: usize,
    pub del: usize,
    pub ins: usize,
    /// Number of reference tokens (the denominator of the error rate).
    pub ref_len: usize,
}

impl ErrorCounts {
    /// Substitutions + deletions + insertions.
    pub fn errors(&self) -> usize {
        self.sub + self.del + self.ins
    }

    /// Reference tokens the hypothesis got right.
    pub fn correct(&self) -> usize {
        self.ref_len - self.sub - self.del
    }

    /// Errors per reference token (a fraction; multiply by 100 for %). An empty reference gives 0
    /// with no errors and infinity with insertions.
    pub fn rate(&self) -> f64 {
        match (self.errors(), self.ref_len) {
            (0, _) => 0.0,
            (_, 0) => f64::INFINITY,
            (errors, len) => errors as f64 / len as f64,
        }
    }
}

impl Add for ErrorCounts {
    type Output = ErrorCounts;
    fn add(self, o: ErrorCounts) -> ErrorCounts {
        ErrorCounts {
            sub: self.sub + o.sub,
            del: self.del + o.del,
            ins: self.ins + o.ins,
            ref_len: self.ref_len + o.ref_len,
        }
    }
}

impl AddAssign for ErrorCounts {
    fn add_assign(&mut self, o: ErrorCounts) {
        *self = *self + o;
    }
}

impl Sum for ErrorCounts {
    fn sum<I: Iterator<Item = ErrorCounts>>(iter: I) -> Self {
        iter.fold(ErrorCounts::default(), Add::add)
    }
}

/// Aligns `hyp` to `reference` with a minimal number of edits (fewest substitutions among ties)
/// and counts the edits.
pub fn align<T: PartialEq>(reference: &[T], hyp: &[T]) -> ErrorCounts {
    // Cost of aligning reference[..i] with hyp[..j] as (edits, substitutions), compared
    // lexicographically; deletions and insertions follow from it and the lengths
    // (del - ins = i - j, del + ins = edits - subs). Two rolling rows over j.
    let mut prev: Vec<(usize, usize)> = (0..=hyp.len()).map(|j| (j, 0)).collect();
    let mut cur = prev.clone();
    for (i, r) in reference.iter().enumerate() {
        cur[0] = (i + 1, 0);
        for (j, h) in hyp.iter().enumerate() {
            let (e, s) = prev[j];
            let diagonal = if r == h { (e, s) } else { (e + 1, s + 1) };
            let deletion = (prev[j + 1].0 + 1, prev[j + 1].1);
            let insertion = (cur[j].0 + 1, cur[j].1);
            cur[j + 1] = diagonal.min(deletion).min(insertion);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let (edits, sub) = prev[hyp.len()];
    let (n, m) = (reference.len(), hyp.len());
    // del + ins = edits - sub and del - ins = n - m hold exactly for the optimal alignment.
    let unmatched = (edits - sub) as isize;
    let del = ((unmatched + n as isize - m as isize) / 2) as usize;
    let ins = edits - sub - del;
    ErrorCounts {
        sub,
        del,
        ins,
        ref_len: n,
    }
}

/// Character tokens as ESPnet's asr.sh scores CER: whitespace runs become one word-boundary token
/// (its `<space>`), leading and trailing whitespace are dropped, every other character is a token.
pub fn char_tokens(text: &str) -> Vec<char> {
    let mut out = Vec::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars());
    }
    out
}

/// Character error rate counts as ESPnet's final scoring reports them (sclite over character
/// tokens, word boundaries counted as `<space>` tokens). For text without spaces (Mandarin) this
/// equals [`cer_without_spaces`].
pub fn cer(reference: &str, hyp: &str) -> ErrorCounts {
    align(&char_tokens(reference), &char_tokens(hyp))
}

/// Character error rate counts over non-whitespace characters only, as ESPnet's training-time
/// `ErrorCalculator.calculate_cer` computes it (spaces removed before `editdistance`).
pub fn cer_without_spaces(reference: &str, hyp: &str) -> ErrorCounts {
    let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<Vec<_>>();
    align(&strip(reference), &strip(hyp))
}

/// Word error rate counts over whitespace-separated words. Text written without spaces (Mandarin)
/// is one "word" per unspaced run, so report CER for such languages.
pub fn wer(reference: &str, hyp: &str) -> ErrorCounts {
    let reference: Vec<&str> = reference.split_whitespace().collect();
    let hyp: Vec<&str> = hyp.split_whitespace().collect();
    align(&reference, &hyp)
}
