//! Mutation fuzzing of the manifest importers (issue 18): valid seed inputs built here — a
//! small parquet file, an Arrow IPC `save_to_disk` directory, Lhotse JSON lines (plain and
//! gzipped), a Kaldi data directory, a fairseq manifest, JSON lines (ours and NeMo's) — have
//! bytes flipped, inserted, deleted and overwritten, or are replaced by arbitrary bytes, and go
//! through the public entry points (`load_corpus`, then `hf::read_audio_bytes` for every
//! embedded row). Each input must give items or an error, without a panic, within a time bound.
//!
//! Budget: `PROPTEST_CASES` cases per target (default sized so that the file runs in about
//! 20 s in release). Failures are not persisted by proptest; a failing input is saved under
//! `CARGO_TARGET_TMPDIR/fuzz_manifest/TARGET/`, to be copied into the regression corpus
//! `tests/fixtures/fuzz/manifest/TARGET/` (file name: `FILE--anything`, FILE being the seed
//! file it replaces), which `regression_corpus_replays` runs every time.
use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use proptest::prelude::*;
use proptest::sample::Index;
use speechcache::manifest::{hf, load_corpus, AudioRef, Columns, InputFormat};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Longest one importer call may take on an input of a few kB.
const TIME_BOUND: Duration = Duration::from_secs(10);

/// A target: the files of a valid input, which of them the mutations replace, and the format.
struct Seed {
    target: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    /// The path handed to the importer, relative to the seed's directory.
    input: &'static str,
    format: InputFormat,
}

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(n)
    }
}

/// A 16 kHz mono WAV of `n` samples.
fn wav(n: usize) -> Vec<u8> {
    let data = (n * 2) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&32000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    for i in 0..n {
        b.extend_from_slice(&((i as i16).wrapping_mul(97)).to_le_bytes());
    }
    b
}

/// Four rows as the datasets `Audio` feature stores them, plus text and id columns.
fn hf_batch() -> RecordBatch {
    let mut bytes = BinaryBuilder::new();
    let mut paths = StringBuilder::new();
    for i in 0..4 {
        if i == 2 {
            bytes.append_null();
        } else {
            bytes.append_value(wav(40 + i));
        }
        paths.append_value(format!("clip{i}.wav"));
    }
    let audio_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let audio = StructArray::new(
        audio_fields.clone(),
        vec![
            Arc::new(bytes.finish()) as ArrayRef,
            Arc::new(paths.finish()) as ArrayRef,
        ],
        None,
    );
    let text = StringArray::from(vec!["one", "two", "three", "four"]);
    let id = StringArray::from(vec!["u0", "u1", "u2", "u3"]);
    let schema = Schema::new(vec![
        Field::new("audio", DataType::Struct(audio_fields), true),
        Field::new("text", DataType::Utf8, true),
        Field::new("id", DataType::Utf8, true),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![Arc::new(audio), Arc::new(text), Arc::new(id)],
    )
    .unwrap()
}

fn parquet_seed() -> Seed {
    let batch = hf_batch();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut out = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    Seed {
        target: "parquet",
        files: vec![("train.parquet", out)],
        input: "train.parquet",
        format: InputFormat::Auto,
    }
}

fn arrow_seed() -> Seed {
    let batch = hf_batch();
    let mut out = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
    w.write(&batch.slice(0, 2)).unwrap();
    w.write(&batch.slice(2, 2)).unwrap();
    w.finish().unwrap();
    drop(w);
    let state = br#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}"#;
    Seed {
        target: "arrow",
        files: vec![
            ("data-00000-of-00001.arrow", out),
            ("state.json", state.to_vec()),
        ],
        input: ".",
        format: InputFormat::Auto,
    }
}

const RECORDINGS: &str = r#"{"id": "rec1", "sources": [{"type": "file", "channels": [0, 1], "source": "a.wav"}], "sampling_rate": 16000, "num_samples": 32000, "duration": 2.0, "channel_ids": [0, 1]}
{"id": "rec2", "sources": [{"type": "file", "channels": [0], "source": "b.flac"}], "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0, "channel_ids": [0]}
"#;
const SUPERVISIONS: &str = r#"{"id": "sup1", "recording_id": "rec1", "start": 0.0, "duration": 1.5, "channel": 1, "text": "HELLO", "speaker": "s1"}
{"id": "sup2", "recording_id": "rec2", "start": 0.25, "duration": 0.5, "channel": 0, "text": "WORLD"}
"#;
const CUTS: &str = r#"{"id": "cut1", "start": 0.0, "duration": 1.0, "channel": [0, 1], "supervisions": [{"id": "s", "recording_id": "rec1", "start": 0.0, "duration": 1.0, "text": "HI", "speaker": "x"}], "recording": {"id": "rec1", "sources": [{"type": "file", "channels": [0, 1], "source": "a.wav"}], "sampling_rate": 16000, "num_samples": 32000, "duration": 2.0}, "type": "MonoCut"}
{"id": "cut2", "start": 0.5, "duration": 0.5, "channel": 0, "supervisions": [], "recording": {"id": "rec2", "sources": [{"type": "file", "channels": [0], "source": "b.flac"}], "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0}, "type": "MonoCut"}
"#;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn lhotse_seed() -> Seed {
    Seed {
        target: "lhotse",
        files: vec![
            ("x_recordings.jsonl", RECORDINGS.into()),
            ("x_supervisions.jsonl", SUPERVISIONS.into()),
        ],
        input: "x_recordings.jsonl",
        format: InputFormat::Lhotse,
    }
}

fn lhotse_gz_seed() -> Seed {
    Seed {
        target: "lhotse_gz",
        files: vec![("x_cuts.jsonl.gz", gzip(CUTS.as_bytes()))],
        input: "x_cuts.jsonl.gz",
        format: InputFormat::Auto,
    }
}

fn kaldi_seed() -> Seed {
    Seed {
        target: "kaldi",
        files: vec![
            ("wav.scp", b"rec1 /data/a.wav\nrec2 b.flac\n".to_vec()),
            (
                "segments",
                b"rec1-0 rec1 0.0 1.5\nrec1-1 rec1 1.5 -1\nrec2-0 rec2 0.1 0.9\n".to_vec(),
            ),
            (
                "text",
                b"rec1-0 HELLO THERE\nrec1-1 BYE\nrec2-0 OK\n".to_vec(),
            ),
            ("utt2spk", b"rec1-0 s1\nrec1-1 s1\nrec2-0 s2\n".to_vec()),
        ],
        input: ".",
        format: InputFormat::Kaldi,
    }
}

fn tsv_seed() -> Seed {
    Seed {
        target: "tsv",
        files: vec![
            (
                "train.tsv",
                b"/data/audio\nspk1/a.flac\t16000\nspk2/b.flac\t8000\n".to_vec(),
            ),
            ("train.wrd", b"HELLO WORLD\nGOOD BYE\n".to_vec()),
            (
                "train.ltr",
                b"H E L L O | W O R L D |\nG O O D | B Y E |\n".to_vec(),
            ),
        ],
        input: "train.tsv",
        format: InputFormat::Auto,
    }
}

fn jsonl_seed() -> Seed {
    let ours = concat!(
        r#"{"id": "a", "path": "a.wav", "start": 0.5, "duration": 1.0, "text": "HI", "speaker": "s"}"#,
        "\n",
        r#"{"audio_filepath": "/data/b.wav", "duration": 2.5, "text": "nemo style", "offset": 0.25}"#,
        "\n",
    );
    Seed {
        target: "jsonl",
        files: vec![("m.jsonl", ours.into())],
        input: "m.jsonl",
        format: InputFormat::Auto,
    }
}

fn seed(target: &str) -> Seed {
    match target {
        "parquet" => parquet_seed(),
        "arrow" => arrow_seed(),
        "lhotse" => lhotse_seed(),
        "lhotse_gz" => lhotse_gz_seed(),
        "kaldi" => kaldi_seed(),
        "tsv" => tsv_seed(),
        "jsonl" => jsonl_seed(),
        _ => panic!("unknown fuzz target {target}"),
    }
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Overwrite(Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // bytes that matter to the formats: separators, quotes, digits, extreme integers
    let interesting = prop_oneof![
        any::<u8>(),
        Just(b'\n'),
        Just(b'\t'),
        Just(b' '),
        Just(b'"'),
        Just(b'{'),
        Just(0u8),
        Just(0xffu8),
        Just(0x7fu8),
    ];
    let bytes = prop::collection::vec(interesting, 1..9);
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), bytes.clone()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), bytes).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        if let Mutation::Insert(_, b) | Mutation::Overwrite(_, b) = m {
            data.extend_from_slice(b);
        }
        return;
    }
    match m {
        Mutation::Flip(i, bit) => {
            let at = i.index(data.len());
            data[at] ^= 1 << bit;
        }
        Mutation::Insert(i, b) => {
            let at = i.index(data.len() + 1);
            data.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let at = i.index(data.len());
            let end = (at + n).min(data.len());
            data.drain(at..end);
        }
        Mutation::Overwrite(i, b) => {
            let at = i.index(data.len());
            for (k, &v) in b.iter().enumerate() {
                if let Some(x) = data.get_mut(at + k) {
                    *x = v;
                }
            }
        }
    }
}

/// What replaces one file of a seed: the seed's bytes mutated, or arbitrary bytes.
#[derive(Debug, Clone)]
enum Input {
    Mutated(Vec<Mutation>),
    Arbitrary(Vec<u8>),
}

fn input() -> impl Strategy<Value = (Index, Input)> {
    let edits = prop::collection::vec(mutation(), 1..6).prop_map(Input::Mutated);
    let arbitrary = prop::collection::vec(any::<u8>(), 0..1024).prop_map(Input::Arbitrary);
    (any::<Index>(), prop_oneof![8 => edits, 1 => arbitrary])
}

/// Writes `seed` into `dir` with file `which` replaced by `bytes`, runs the importer and reads
/// the audio bytes of every embedded row; panics (the test failure) on a panic or a hang.
fn check(seed: &Seed, which: &str, bytes: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in &seed.files {
        let data = if *name == which { bytes } else { data };
        std::fs::write(tmp.path().join(name), data).unwrap();
    }
    let input = tmp.path().join(seed.input);
    let format = seed.format;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for format in [format, InputFormat::Auto] {
            if let Ok(items) =
                load_corpus(std::slice::from_ref(&input), format, &Columns::default())
            {
                for item in &items {
                    if let AudioRef::Embedded { group, row, .. } = item.audio {
                        let _ = hf::read_audio_bytes(&item.utt.source, group, &[row]);
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    let outcome = rx.recv_timeout(TIME_BOUND);
    if outcome.is_err() {
        let saved = save_failure(seed.target, which, bytes);
        match outcome {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
                "{}: the importer took more than {TIME_BOUND:?} on {} (saved as {})",
                seed.target,
                which,
                saved.display()
            ),
            _ => panic!(
                "{}: the importer panicked on {} (saved as {})",
                seed.target,
                which,
                saved.display()
            ),
        }
    }
}

/// Saves a failing input where the regression corpus can take it from.
fn save_failure(target: &str, which: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz_manifest")
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("{which}--{hash:016x}"));
    let _ = std::fs::write(&path, bytes);
    path
}

/// One fuzz case against `target`: pick a seed file, mutate it (or replace it), check.
fn fuzz_one(target: &Seed, (which, input): &(Index, Input)) {
    let (name, data) = &target.files[which.index(target.files.len())];
    let bytes = match input {
        Input::Arbitrary(b) => b.clone(),
        Input::Mutated(edits) => {
            let mut b = data.clone();
            for m in edits {
                apply(&mut b, m);
            }
            b
        }
    };
    check(target, name, &bytes);
}

macro_rules! fuzz_target {
    ($name:ident, $target:literal, $cases:expr) => {
        proptest! {
            #![proptest_config(cases($cases))]
            #[test]
            fn $name(case in input()) {
                thread_local! {
                    static SEED: Seed = seed($target);
                }
                SEED.with(|s| fuzz_one(s, &case));
            }
        }
    };
}

fuzz_target!(parquet_importer_survives_mutations, "parquet", 8000);
fuzz_target!(
    arrow_save_to_disk_importer_survives_mutations,
    "arrow",
    8000
);
fuzz_target!(lhotse_importer_survives_mutations, "lhotse", 8000);
fuzz_target!(lhotse_gzip_importer_survives_mutations, "lhotse_gz", 8000);
fuzz_target!(kaldi_importer_survives_mutations, "kaldi", 8000);
fuzz_target!(fairseq_tsv_importer_survives_mutations, "tsv", 8000);
fuzz_target!(jsonl_importer_survives_mutations, "jsonl", 8000);

/// Every input of the regression corpus (`tests/fixtures/fuzz/manifest/TARGET/FILE--*`) goes
/// through its target once more.
#[test]
fn regression_corpus_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/manifest");
    let mut replayed = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().to_string();
        let s = seed(&name);
        for entry in std::fs::read_dir(&target).unwrap() {
            let path = entry.unwrap().path();
            let file_name = path.file_name().unwrap().to_string_lossy().to_string();
            let (which, _) = file_name
                .split_once("--")
                .unwrap_or_else(|| panic!("{}: expected FILE--NAME", path.display()));
            let which = s
                .files
                .iter()
                .map(|(n, _)| *n)
                .find(|n| *n == which)
                .unwrap_or_else(|| panic!("{}: {which} is not a file of {name}", path.display()));
            check(&s, which, &std::fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "the regression corpus is empty");
}
