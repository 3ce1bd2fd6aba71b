//! Mutation fuzzing of the k-means model readers `units --kmeans` uses: the centroids `.npy`
//! header, `kmeans.json`, and scikit-learn k-means pickles (fairseq's joblib `km.bin`, plain
//! `pickle.dump`) through the unpickler and its joblib inline-array hook. Every input must
//! give Ok or an error, never a panic, and finish quickly.
//!
//! Seeds are the committed fixtures (tests/fixtures/kmeans/, made by gen_km_bin.py and the
//! CLI); edits as in tests/fuzz_checkpoint.rs. `PROPTEST_CASES` sets the cases per target. A
//! failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-units/` to be added to the
//! committed corpus tests/fixtures/fuzz/units/, which `units_corpus_replays_cleanly` replays.
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use speechcache::units::{parse_centroids, parse_kmeans_json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CASE_LIMIT: Duration = Duration::from_secs(5);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Overwrite 1, 2, 4 or 8 little-endian bytes with a boundary value.
    Boundary(usize, u8, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Set(a, b)),
        (any::<usize>(), 0u8..8).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), 0u8..4, 0u8..6).prop_map(|(a, w, v)| Edit::Boundary(a, w, v)),
    ]
}

fn apply(seed: &[u8], window: std::ops::Range<usize>, edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let end = window.end.min(b.len());
        let start = window.start.min(end);
        let span = end - start;
        let at = |p: usize| start + if span == 0 { 0 } else { p % span };
        match e {
            Edit::Set(p, v) if span > 0 => {
                let i = at(*p);
                b[i] = *v;
            }
            Edit::Flip(p, bit) if span > 0 => {
                let i = at(*p);
                b[i] ^= 1 << bit;
            }
            Edit::Insert(p, v) => {
                let i = at(*p);
                b.splice(i..i, v.iter().copied());
            }
            Edit::Delete(p, n) if span > 0 => {
                let i = at(*p);
                let j = (i + n).min(b.len());
                b.drain(i..j);
            }
            Edit::Boundary(p, w, v) if span > 0 => {
                let width = 1usize << w;
                let value: u64 = match v {
                    0 => 0,
                    1 => 1,
                    2 => u64::MAX,
                    3 => 1 << (8 * width - 1),
                    4 => (1 << (8 * width - 1)) - 1,
                    _ => 0xfffe,
                };
                let i = at(*p);
                let j = (i + width).min(b.len());
                b[i..j].copy_from_slice(&value.to_le_bytes()[..j - i]);
            }
            _ => {}
        }
    }
    b
}

/// Which parser an input is for; also its corpus file-name prefix.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// `parse_centroids` of a `.npy`.
    Npy,
    /// `parse_kmeans_json`.
    Json,
    /// `parse_centroids` of a pickled scikit-learn model.
    KmBin,
}

impl Target {
    fn prefix(self) -> &'static str {
        match self {
            Target::Npy => "npy",
            Target::Json => "json",
            Target::KmBin => "kmbin",
        }
    }
}

fn run_target(target: Target, bytes: &[u8]) {
    match target {
        Target::Npy | Target::KmBin => {
            if let Ok((values, k, d)) = parse_centroids(bytes) {
                assert_eq!(values.len(), k * d, "[K, D] and the values disagree");
            }
        }
        Target::Json => {
            let _ = parse_kmeans_json(&String::from_utf8_lossy(bytes));
        }
    }
}

/// Runs one input on its own thread; a panic or no answer within [`CASE_LIMIT`] fails, after
/// writing the input where it can be picked up for the corpus.
fn check(target: Target, bytes: &[u8]) -> Result<(), TestCaseError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let input = bytes.to_vec();
    let start = Instant::now();
    std::thread::spawn(move || {
        let run = std::panic::catch_unwind(|| run_target(target, &input));
        let _ = tx.send(run.is_ok());
    });
    let why = match rx.recv_timeout(CASE_LIMIT) {
        Ok(true) => return Ok(()),
        Ok(false) => "panicked",
        Err(_) => "did not finish",
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-units");
    let _ = std::fs::create_dir_all(&out);
    let name = format!("{}-{:08x}.bin", target.prefix(), crc32fast::hash(bytes));
    let _ = std::fs::write(out.join(&name), bytes);
    Err(TestCaseError::fail(format!(
        "{target:?} {why} (after {:?}); input saved as {}",
        start.elapsed(),
        out.join(name).display()
    )))
}

/// `cases` edited copies of `seed` (inside `window` 3 times in 4), then `cases / 4` arbitrary
/// inputs.
fn fuzz(target: Target, seed: &[u8], window: std::ops::Range<usize>, default_cases: u32) {
    let full = 0..seed.len();
    let strategy = (0u8..4, prop::collection::vec(edit(), 1..6));
    runner(default_cases)
        .run(&strategy, |(where_, edits)| {
            let w = if where_ < 3 {
                window.clone()
            } else {
                full.clone()
            };
            check(target, &apply(seed, w, &edits))
        })
        .unwrap();
    let noise = prop::collection::vec(any::<u8>(), 0..512);
    runner(default_cases / 4)
        .run(&noise, |bytes| check(target, &bytes))
        .unwrap();
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("kmeans").join(name)).unwrap()
}

#[test]
fn fuzz_centroids_npy_header() {
    for name in ["kmeans_f32.centers.npy", "mbk_f64.centers.npy"] {
        let seed = fixture(name);
        // the magic, version, header length and header dict
        let header = 10 + u16::from_le_bytes([seed[8], seed[9]]) as usize;
        fuzz(Target::Npy, &seed, 0..header, 2000);
    }
}

#[test]
fn fuzz_kmeans_json() {
    let seed = fixture("kmeans.json");
    fuzz(Target::Json, &seed, 0..seed.len(), 3000);
}

#[test]
fn fuzz_km_bin_pickles() {
    for name in [
        "mbk_f64.joblib.bin",
        "kmeans_f32.joblib.bin",
        "mbk_f64.pickle4.bin",
        "kmeans_f32.pickle5.bin",
    ] {
        let seed = fixture(name);
        fuzz(Target::KmBin, &seed, 0..seed.len(), 1500);
    }
}

/// Every file in tests/fixtures/fuzz/units/ (hostile inputs: truncated, absurd shapes,
/// self-references, deep nesting) runs through its parser without a panic, and is refused.
#[test]
fn units_corpus_replays_cleanly() {
    let corpus = fixtures().join("fuzz/units");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "empty corpus in {}", corpus.display());
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let target = [Target::Npy, Target::Json, Target::KmBin]
            .into_iter()
            .find(|t| name.starts_with(&format!("{}-", t.prefix())))
            .unwrap_or_else(|| panic!("{name}: name must start with npy-, json- or kmbin-"));
        let bytes = std::fs::read(&path).unwrap();
        if let Err(e) = check(target, &bytes) {
            panic!("{name}: {e}");
        }
        let refused = match target {
            Target::Json => parse_kmeans_json(&String::from_utf8_lossy(&bytes)).is_err(),
            _ => parse_centroids(&bytes).is_err(),
        };
        assert!(refused, "{name}: a hostile input was accepted");
    }
}
