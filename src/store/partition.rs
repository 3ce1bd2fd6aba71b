//! `--part K/N`: which contiguous slice of the whole input a part run owns.
//!
//! Parts are numbered 1..=N (Slurm: `sbatch --array=1-N`, then
//! `--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`). The cut depends only on the whole
//! input and N: units (source files, store rows or batch windows) stay in input order and each
//! part gets about 1/N of their total weight (audio seconds where known).
use std::ops::Range;
use std::str::FromStr;

/// The largest N accepted: Slurm's own MaxArraySize tops out at 4,000,001, and a part per
/// utterance of a 10,000-hour corpus is already ~10^7; past this a typo costs memory, not work.
pub const MAX_PARTS: usize = 1_000_000;

/// Part K of N, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSpec {
    pub k: usize,
    pub n: usize,
}

impl FromStr for PartSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = "use K/N with 1 <= K <= N, e.g. --part 2/8 \
                     (in a Slurm array --array=1-N: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)";
        let (k, n) = text
            .split_once('/')
            .ok_or_else(|| format!("--part {text:?} is not K/N: {usage}"))?;
        let (Ok(k), Ok(n)) = (k.trim().parse::<usize>(), n.trim().parse::<usize>()) else {
            return Err(format!("--part {text:?} is not K/N: {usage}"));
        };
        if n == 0 {
            return Err(format!("--part {text}: N must be at least 1; {usage}"));
        }
        if k == 0 {
            return Err(format!(
                "--part {text}: parts are numbered from 1, not 0 (an array --array=0-{} gives \
                 0-based ids: submit --array=1-{n} instead); {usage}",
                n.saturating_sub(1)
            ));
        }
        if k > n {
            return Err(format!("--part {text}: K is larger than N; {usage}"));
        }
        if n > MAX_PARTS {
            return Err(format!(
                "--part {text}: N is larger than {MAX_PARTS} (no cluster runs more array tasks); {usage}"
            ));
        }
        Ok(PartSpec { k, n })
    }
}

impl std::fmt::Display for PartSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl PartSpec {
    /// This part's units of `weights` (see `split_balanced`), without building every part's range.
    pub fn range_of(&self, weights: &[f64]) -> Range<usize> {
        balanced_ranges(weights, self.n)
            .nth(self.k - 1)
            .unwrap_or(weights.len()..weights.len())
    }
}

/// clap value parser for `--part`.
pub fn parse_part(text: &str) -> Result<PartSpec, String> {
    text.parse()
}

/// `--fraction F`: a number with 0 < F <= 1.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "--fraction {text:?} is not a number in (0, 1], e.g. --fraction 0.1"
        )),
    }
}

/// Whether utterance `id` is in the `fraction` sample (`None`: everything). An utterance is in
/// when the first 8 bytes of SHA-256 of its id (UTF-8), read as a big-endian integer, are
/// below F · 2^64: a function of the id alone, so the same utterances on every run, machine and
/// `--part`. In Python: `int.from_bytes(hashlib.sha256(id.encode()).digest()[:8], "big") < F * 2**64`.
pub fn in_fraction(fraction: Option<f64>, id: &str) -> bool {
    use sha2::Digest;
    let Some(f) = fraction else { return true };
    // F · 2^64 is exact in f64; for an integer h, h < t exactly when h < ceil(t)
    let threshold = f * 18_446_744_073_709_551_616.0;
    if threshold >= 18_446_744_073_709_551_616.0 {
        return true;
    }
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head) < threshold.ceil() as u64
}

/// Cuts units `0..weights.len()` into `n` contiguous ranges of about equal total weight: a
/// unit belongs to the first part whose share its midpoint falls in. All-zero weights count
/// units instead.
pub fn split_balanced(weights: &[f64], n: usize) -> Vec<Range<usize>> {
    balanced_ranges(weights, n).collect()
}

/// The ranges of `split_balanced`, one at a time (no allocation in N).
fn balanced_ranges(weights: &[f64], n: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let n = n.max(1);
    let total: f64 = weights.iter().sum();
    let uniform = !total.is_finite() || total <= 0.0;
    let weight = move |w: f64| if uniform { 1.0 } else { w.max(0.0) };
    let total = if uniform { weights.len() as f64 } else { total };
    let (mut start, mut before, mut unit) = (0usize, 0.0f64, 0usize);
    (1..=n).map(move |k| {
        let share_end = total * k as f64 / n as f64;
        while unit < weights.len() && (k == n || before + weight(weights[unit]) / 2.0 < share_end) {
            before += weight(weights[unit]);
            unit += 1;
        }
        let range = start..unit;
        start = unit;
        range
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_input_in_order_and_balance_weight() {
        let w = [1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0];
        let r = split_balanced(&w, 3);
        assert_eq!(r, vec![0..3, 3..5, 5..7]);
        assert_eq!(split_balanced(&[0.0; 5], 2), vec![0..2, 2..5]);
        assert_eq!(split_balanced(&[1.0; 2], 4), vec![0..0, 0..1, 1..1, 1..2]);
        assert_eq!(split_balanced(&[], 2), vec![0..0, 0..0]);
        for k in 1..=3 {
            assert_eq!(PartSpec { k, n: 3 }.range_of(&w), r[k - 1]);
        }
    }

    #[test]
    fn part_specs_are_one_based() {
        assert_eq!("2/3".parse::<PartSpec>(), Ok(PartSpec { k: 2, n: 3 }));
        for bad in [
            "0/0",
            "4/3",
            "0/3",
            "x",
            "1/x",
            "1/0",
            "1/18446744073709551615",
            "1/100000000000",
            "1/1000001",
        ] {
            assert!(bad.parse::<PartSpec>().is_err(), "{bad}");
        }
    }
}
