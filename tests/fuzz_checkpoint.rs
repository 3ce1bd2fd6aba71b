//! Mutation fuzzing of the checkpoint readers (issue 18): the non-executing unpickler, the
//! `torch.save` zip and legacy readers, the safetensors loader and the fairseq config reader
//! must return Ok or an error for any bytes, never panic, and finish quickly.
//!
//! Seeds are small valid files built here (tests/fixtures/checkpoints/hostile.rs) and the
//! checked-in fixtures; each case applies a few edits (bit flips, overwrites with boundary
//! values, inserts, deletes) or is arbitrary bytes. `PROPTEST_CASES` sets the cases per target
//! (default: about 20 s for the whole file in release). proptest's own failure files are off:
//! a failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-checkpoint/` so that it can be
//! added to the committed corpus, tests/fixtures/fuzz/checkpoint/, which
//! `regression_corpus_replays_cleanly` replays on every run.
mod common;

#[path = "fixtures/checkpoints/hostile.rs"]
mod hostile;

use candle_core::{DType, Device};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use speechcache::models::checkpoint::load_checkpoint;
use speechcache::models::checkpoint::parsers::{config_from_fairseq, unpickle, TorchFile};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Slowest a single input may take; real work on these tiny files takes milliseconds.
/// (A stack overflow aborts the whole test binary: that fails the run too, just less politely.)
const CASE_LIMIT: Duration = Duration::from_secs(5);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(cases(default_cases))
    })
}

/// One edit of a seed; positions are taken modulo the edited window.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Overwrite 1, 2, 4 or 8 little-endian bytes with a boundary value (0, 1, max, sign bit...).
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

/// Edits applied to bytes `window` of `seed` (the header or pickle, where parsing happens).
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
                let bytes = value.to_le_bytes();
                b[i..j].copy_from_slice(&bytes[..j - i]);
            }
            _ => {}
        }
    }
    b
}

/// Which reader an input is for; also the file-name prefix of its regression corpus entries.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// `unpickle`, then the queries and the fairseq config reader on what it returned.
    Pickle,
    /// `TorchFile::open` (zip or legacy), its tensor list, and every tensor's bytes.
    Torch,
    /// `load_checkpoint` of the file beside the tiny w2v_group config: the whole path.
    Load,
}

impl Target {
    fn prefix(self) -> &'static str {
        match self {
            Target::Pickle => "pickle",
            Target::Torch => "torch",
            Target::Load => "load",
        }
    }
}

/// Runs one input through `target` in `dir` on its own thread; a panic, or no answer within
/// [`CASE_LIMIT`] (a hang: the thread is abandoned), fails, after writing the input where it
/// can be picked up for the corpus.
fn check(target: Target, dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let (dir_owned, input) = (dir.to_path_buf(), bytes.to_vec());
    std::thread::spawn(move || {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_target(target, &dir_owned, &input)
        }));
        let _ = tx.send(run.is_ok());
    });
    let why = match rx.recv_timeout(CASE_LIMIT) {
        Ok(true) => return Ok(()),
        Ok(false) => "panicked",
        Err(_) => "did not finish",
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-checkpoint");
    let _ = std::fs::create_dir_all(&out);
    let name = format!("{}-{:08x}.bin", target.prefix(), crc32fast::hash(bytes));
    let _ = std::fs::write(out.join(&name), bytes);
    Err(TestCaseError::fail(format!(
        "{target:?} {why} (after {:?}); input saved as {}",
        start.elapsed(),
        out.join(name).display()
    )))
}

fn run_target(target: Target, dir: &Path, bytes: &[u8]) {
    match target {
        Target::Pickle => {
            if let Ok((p, _)) = unpickle(bytes) {
                if let Some(root) = &p.root {
                    for key in ["model", "cfg", "args", "state_dict"] {
                        if let Some(v) = p.get(root, key) {
                            let _ = p.entries(v);
                        }
                    }
                    let _ = config_from_fairseq(&p, root);
                }
            }
        }
        Target::Torch => {
            let path = dir.join("weights.bin");
            std::fs::write(&path, bytes).unwrap();
            if let Ok(tf) = TorchFile::open(&path) {
                for key in ["model", "state_dict"] {
                    if let Some(v) = tf.pickle.get(&tf.root, key) {
                        let _ = tf.tensor_entries(v);
                    }
                }
                if let Ok(refs) = tf.tensor_entries(&tf.root) {
                    for (_, t) in refs {
                        let _ = tf.materialize(&t, &Device::Cpu);
                    }
                }
            }
        }
        Target::Load => {
            let cfg = dir.join("config.json");
            if !cfg.exists() {
                std::fs::copy(fixtures().join("checkpoints/w2v_group/config.json"), &cfg).unwrap();
            }
            let path = dir.join("weights.bin");
            std::fs::write(&path, bytes).unwrap();
            let _ = load_checkpoint(&path, &Device::Cpu, DType::F32);
        }
    }
}

/// Fuzzes `target` from `seed`: `cases` edited copies (edits inside `window` 3 times in 4,
/// anywhere otherwise), then `cases / 4` arbitrary inputs.
fn fuzz(target: Target, seed: &[u8], window: std::ops::Range<usize>, default_cases: u32) {
    // Hash caching would write to the user's cache dir; these files change every case.
    std::env::set_var("SPEECHCACHE_CACHE_DIR", "off");
    let dir = tempfile::tempdir().unwrap();
    let full = 0..seed.len();
    let strategy = (0u8..4, prop::collection::vec(edit(), 1..6));
    runner(default_cases)
        .run(&strategy, |(where_, edits)| {
            let w = if where_ < 3 {
                window.clone()
            } else {
                full.clone()
            };
            check(target, dir.path(), &apply(seed, w, &edits))
        })
        .unwrap();
    let noise = prop::collection::vec(any::<u8>(), 0..512);
    runner(default_cases / 4)
        .run(&noise, |bytes| check(target, dir.path(), &bytes))
        .unwrap();
}

/// The `data.pkl` entry of a fixture zip.
fn data_pkl(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let name = z
        .file_names()
        .map(|n| n.unwrap().to_string())
        .find(|n| n.ends_with("data.pkl"))
        .unwrap();
    let mut out = Vec::new();
    z.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// Where a fixture zip's `data.pkl` bytes are, to aim edits at the pickle.
fn data_pkl_range(path: &Path) -> std::ops::Range<usize> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let name = z
        .file_names()
        .map(|n| n.unwrap().to_string())
        .find(|n| n.ends_with("data.pkl"))
        .unwrap();
    let e = z.by_name(&name).unwrap();
    let start = e.data_start().unwrap() as usize;
    start..start + e.compressed_size() as usize
}

#[test]
fn fuzz_unpickle_state_dict() {
    let seed = hostile::tiny_state_dict_pickle();
    fuzz(Target::Pickle, &seed, 0..seed.len(), 5000);
}

#[test]
fn fuzz_unpickle_fairseq_config() {
    // A real omegaconf DictConfig (cfg.model, cfg.task) as fairseq stores it.
    let seed = data_pkl(&fixtures().join("checkpoints/w2v_group/fairseq.pt"));
    fuzz(Target::Pickle, &seed, 0..seed.len(), 4000);
}

#[test]
fn fuzz_torch_zip() {
    let seed = hostile::tiny_torch_zip();
    fuzz(Target::Torch, &seed, 0..seed.len(), 2500);
}

#[test]
fn fuzz_torch_legacy() {
    let seed = hostile::tiny_legacy();
    fuzz(Target::Torch, &seed, 0..seed.len(), 2500);
}

#[test]
fn fuzz_load_safetensors() {
    let tiny = hostile::tiny_safetensors();
    fuzz(Target::Load, &tiny, 0..tiny.len(), 800);
    // The fixture model: edits aimed at its header, then the whole load path.
    let seed = std::fs::read(fixtures().join("checkpoints/w2v_group/model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    fuzz(Target::Load, &seed, 0..header, 600);
}

#[test]
fn fuzz_load_fairseq_and_torch_fixtures() {
    for file in ["fairseq.pt", "pytorch_model.bin"] {
        let path = fixtures().join("checkpoints/w2v_group").join(file);
        let seed = std::fs::read(&path).unwrap();
        fuzz(Target::Load, &seed, data_pkl_range(&path), 400);
    }
    let seed =
        std::fs::read(fixtures().join("checkpoints/w2v_group/fairseq_legacy_args.pt")).unwrap();
    fuzz(Target::Load, &seed, 0..seed.len().min(8192), 400);
}

/// Every file in tests/fixtures/fuzz/checkpoint/ (inputs that once crashed, hung or blew up
/// a reader, and the hostile files of issue 18) runs through its reader without a panic.
#[test]
fn regression_corpus_replays_cleanly() {
    std::env::set_var("SPEECHCACHE_CACHE_DIR", "off");
    let corpus = fixtures().join("fuzz/checkpoint");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let target = [Target::Pickle, Target::Torch, Target::Load]
            .into_iter()
            .find(|t| name.starts_with(&format!("{}-", t.prefix())))
            .unwrap_or_else(|| panic!("{name}: name must start with pickle-, torch- or load-"));
        let bytes = std::fs::read(&path).unwrap();
        if let Err(e) = check(target, dir.path(), &bytes) {
            panic!("{name}: {e}");
        }
        seen += 1;
    }
    assert!(seen > 0, "empty corpus in {}", corpus.display());
}
