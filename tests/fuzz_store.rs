//! Mutation fuzzing of the parsers that read what a disk or another process controls: audio
//! headers and streams (WAV, FLAC, MP3, Ogg, M4A through `audio::decode_input`), `.npy` shard
//! headers, and a store's `meta.json` / `index.jsonl` / shards through the store reader and
//! `verify`. Every input must give Ok or an error, never a panic, a hang or a runaway
//! allocation.
//!
//! Budget: `PROPTEST_CASES` cases per target (default 1000, about 20 s on 2 cores). Inputs
//! that once broke a parser are kept under tests/fixtures/fuzz/ and replayed every run.
mod common;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use speechcache::audio::{decode_input, AudioInput, DecodeOptions};
use speechcache::store::{
    verify_store, AudioStore, ErrorRow, FeatureStore, IndexRow, InputResult, ItemData, StoreWriter,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// One edit of a seed: flip bits, overwrite, insert or delete bytes, or truncate.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// Writes a little-endian integer (lengths, rates, offsets are where parsers break).
    Int(usize, u64, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Set(a, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Edit::Delete(a, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u64),
                Just(1),
                Just(u32::MAX as u64),
                Just(u64::MAX),
                Just(u64::MAX - 3),
                any::<u64>()
            ],
            prop_oneof![Just(2u8), Just(4), Just(8)]
        )
            .prop_map(|(a, v, w)| Edit::Int(a, v, w)),
    ]
}

/// Applies edits, weighted to the first 256 bytes (the headers) half of the time.
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |a: usize, len: usize| {
            if len == 0 {
                0
            } else if a % 2 == 0 {
                (a / 2) % len.min(256)
            } else {
                (a / 2) % len
            }
        };
        match e {
            Edit::Flip(a, m) if !b.is_empty() => {
                let i = at(*a, b.len());
                b[i] ^= m;
            }
            Edit::Set(a, v) if !b.is_empty() => {
                let i = at(*a, b.len());
                b[i] = *v;
            }
            Edit::Insert(a, bytes) => {
                let i = at(*a, b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(a, n) if !b.is_empty() => {
                let i = at(*a, b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Truncate(a) => {
                let n = if b.is_empty() { 0 } else { a % b.len() };
                b.truncate(n);
            }
            Edit::Int(a, v, w) if b.len() >= *w as usize => {
                let i = at(*a, b.len() - *w as usize + 1);
                let bytes = v.to_le_bytes();
                b[i..i + *w as usize].copy_from_slice(&bytes[..*w as usize]);
            }
            _ => {}
        }
    }
    b
}

/// Seeds: one small file of each container the decoder meets.
fn audio_seeds() -> &'static [(String, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        [
            "wav_s16_16k_mono.wav",
            "wav_s24_22k_stereo.wav",
            "wav_f32_16k_mono.wav",
            "wav_piped_unknown_length.wav",
            "speech_16k.flac",
            "speech_16k.mp3",
            "speech_16k.ogg",
            "speech_16k.opus",
            "speech_16k.m4a",
        ]
        .iter()
        .map(|n| {
            let bytes = std::fs::read(root().join("tests/fixtures/audio").join(n)).unwrap();
            (n.to_string(), bytes)
        })
        .collect()
    })
}

/// Decodes bytes as a file of that name would be; Ok or an error, never a panic.
fn decode_bytes(name: &str, bytes: &[u8]) {
    for keep_damaged in [false, true] {
        let _ = decode_input(
            AudioInput::Bytes {
                bytes,
                name: Path::new(name),
            },
            None,
            DecodeOptions { keep_damaged },
        );
    }
}

fn replay(dir: &str, check: impl Fn(&str, &[u8])) {
    let dir = root().join("tests/fixtures/fuzz").join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        check(&name, &std::fs::read(&path).unwrap());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn audio_headers_and_streams_never_panic(
        seed in 0usize..9,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let (name, bytes) = &audio_seeds()[seed];
        decode_bytes(name, &mutate(bytes, &edits));
    }

    #[test]
    fn npy_headers_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        std::fs::write(&path, mutate(npy_seed(), &edits)).unwrap();
        if let Ok(m) = speechcache::store::npy::MappedNpy::open(&path, "<f4") {
            let _ = m.as_slice::<f32>().map(|s| s.iter().map(|x| x.to_bits() as u64).sum::<u64>());
        }
    }

    #[test]
    fn store_files_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        copy_dir(seed_store(), &store);
        let name = ["meta.json", "index.jsonl", "shards/00000.npy"][which];
        let bytes = std::fs::read(store.join(name)).unwrap();
        std::fs::write(store.join(name), mutate(&bytes, &edits)).unwrap();
        read_everything(&store);
    }

    #[test]
    fn index_rows_with_hostile_numbers_never_panic(
        line in 0usize..4,
        field in 0usize..3,
        value in prop_oneof![Just(u64::MAX), Just(u64::MAX - 1), Just(1u64 << 63), Just(u32::MAX as u64 + 1), any::<u64>()],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        copy_dir(seed_store(), &store);
        let index = store.join("index.jsonl");
        let mut rows: Vec<serde_json::Value> = std::fs::read_to_string(&index)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let n = rows.len();
        rows[line % n][["offset", "length", "shard"][field]] = serde_json::json!(value);
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&index, text).unwrap();
        read_everything(&store);
    }
}

#[test]
fn the_fuzz_regression_corpus_still_parses() {
    replay("audio", decode_bytes);
    replay("npy", |_, bytes| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        std::fs::write(&path, bytes).unwrap();
        let _ = speechcache::store::npy::MappedNpy::open(&path, "<f4");
    });
    replay("index", |_, bytes| {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        copy_dir(seed_store(), &store);
        std::fs::write(store.join("index.jsonl"), bytes).unwrap();
        read_everything(&store);
    });
    replay("meta", |_, bytes| {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        copy_dir(seed_store(), &store);
        std::fs::write(store.join("meta.json"), bytes).unwrap();
        read_everything(&store);
    });
}

/// Opens, checks and reads every row of a (possibly damaged) audio store, and verifies it.
fn read_everything(store: &Path) {
    if let Ok(audio) = AudioStore::open(store) {
        for i in 0..audio.len() {
            if audio.check_row(i).is_ok() {
                let _ = audio
                    .samples(i)
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .sum::<u64>();
            }
        }
    }
    if let Ok(features) = FeatureStore::open(store) {
        for i in 0..features.len() {
            let _ = features.check_row(i);
        }
    }
    let _ = verify_store(store);
}

fn npy_seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| std::fs::read(seed_store().join("shards/00000.npy")).unwrap())
}

/// A small complete audio store: 4 rows in 2 shards, one failed input.
fn seed_store() -> &'static Path {
    static STORE: OnceLock<tempfile::TempDir> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let spec = common::audio_writer_spec(6000, serde_json::json!({"fuzz": 1}));
            let mut w = StoreWriter::create_or_resume(dir.path(), spec).unwrap();
            for i in 0..5 {
                let result = if i == 2 {
                    InputResult {
                        items: vec![],
                        errors: vec![ErrorRow {
                            path: "bad.wav".into(),
                            id: Some("bad".into()),
                            reason: "corrupt".into(),
                        }],
                    }
                } else {
                    let samples: Vec<f32> = (0..700 + 100 * i)
                        .map(|k| (k as f32 * 0.01).sin())
                        .collect();
                    let row = IndexRow {
                        id: format!("u{i}"),
                        source: format!("u{i}.wav"),
                        duration: samples.len() as f64 / 16000.0,
                        ..Default::default()
                    };
                    InputResult {
                        items: vec![(row, ItemData::Audio(samples))],
                        errors: vec![],
                    }
                };
                w.push_input(i, result).unwrap();
            }
            w.finish().unwrap();
            dir
        })
        .path()
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(from).unwrap();
        let dest = to.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}
