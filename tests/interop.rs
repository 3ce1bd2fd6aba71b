//! `prepare` on Lhotse manifests and Hugging Face parquet, as a user runs it, on fixtures the
//! real `lhotse` and `datasets` wrote (tests/fixtures/interop/gen_interop.py): the same corpus
//! in three forms gives the same samples; channels and segments match what Lhotse loads; bad
//! rows land in errors.jsonl with the manifest row and the reason.
mod common;
use common::{bin, ok, s};
use speechcache::store::AudioStore;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Fixture paths are relative to the repository root, as Lhotse wrote them; cargo runs
/// integration tests from there.
fn fixture(name: &str) -> PathBuf {
    Path::new("tests/fixtures/interop").join(name)
}

fn prepare(out: &Path, args: &[&str]) -> Output {
    bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["prepare", "--quiet", "--out", s(out)])
        .args(args)
        .output()
        .unwrap()
}

fn errors(store: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(store.join("errors.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn error_for<'a>(errors: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    errors
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("no error row for {id} in {errors:?}"))
}

fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

/// (id, text, speaker, samples) of a row.
type Row = (String, Option<String>, Option<String>, Vec<f32>);

/// Every row of an audio store.
fn contents(store: &Path) -> Vec<Row> {
    let store = AudioStore::open(store).unwrap();
    store
        .iter()
        .map(|(row, samples)| {
            (
                row.id.clone(),
                row.text.clone(),
                row.speaker.clone(),
                samples.to_vec(),
            )
        })
        .collect()
}

#[test]
fn a_corpus_as_directory_lhotse_and_parquet_gives_equal_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let forms: [(&str, PathBuf); 5] = [
        ("dir", fixture("librispeech")),
        (
            "supervisions",
            fixture("lhotse/librispeech_supervisions_dev-clean.jsonl.gz"),
        ),
        (
            "cuts",
            fixture("lhotse/librispeech_cuts_dev-clean.jsonl.gz"),
        ),
        ("parquet", fixture("hf/librispeech")),
        ("save_to_disk", fixture("hf/librispeech_saved")),
    ];
    let mut stores = Vec::new();
    for (name, input) in &forms {
        let out = tmp.path().join(name);
        ok(&prepare(&out, &["--input", s(input)]));
        assert!(errors(&out).is_empty(), "{name}: {:?}", errors(&out));
        stores.push((name, contents(&out)));
    }
    let (_, reference) = &stores[0];
    assert_eq!(reference.len(), 3);
    assert_eq!(reference[0].0, "1272-128104-0000");
    assert_eq!(
        reference[0].1.as_deref(),
        Some("THE CACHE KEEPS EVERY FEATURE")
    );
    assert!(reference.iter().all(|r| r.3.len() > 8000));
    for (name, rows) in &stores[1..] {
        // the same ids, texts, speakers and samples, bit for bit
        assert_eq!(rows.len(), reference.len(), "{name}");
        for (got, want) in rows.iter().zip(reference) {
            assert_eq!(got.0, want.0, "{name}");
            assert_eq!(got.1, want.1, "{name} {}", got.0);
            assert_eq!(got.2, want.2, "{name} {}", got.0);
            assert!(got.3 == want.3, "{name} {}: samples differ", got.0);
        }
    }
}

#[test]
fn lhotse_channels_and_segments_match_what_lhotse_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, input) in [
        ("sups", "lhotse/bad_supervisions.jsonl.gz"),
        // the recordings file finds its supervisions beside it; giving both reads them once
        ("recs", "lhotse/bad_recordings.jsonl.gz"),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec!["--input", input];
        if name == "recs" {
            args.extend([
                "--input",
                "lhotse/bad_supervisions.jsonl.gz",
                "--format",
                "lhotse",
            ]);
        }
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.starts_with("lhotse/") {
                true => fixture(a).display().to_string(),
                false => a.to_string(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&prepare(&out, &args));
        let rows = contents(&out);
        let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            ids,
            ["stereo-left", "stereo-right", "stereo-both"],
            "{name}"
        );
        for (id, text, _, samples) in &rows {
            let want = read_npy(&fixture(&format!("lhotse/expected_{id}.npy")));
            assert_eq!(samples.len(), want.len(), "{id}");
            let worst = samples
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "{id}: differs from Lhotse by {worst}");
            assert_eq!(
                text.as_deref(),
                Some(&id["stereo-".len()..].to_uppercase()[..])
            );
        }
        let errs = errors(&out);
        assert_eq!(errs.len(), 4, "{errs:?}");
        let bad_channel = error_for(&errs, "bad-channel");
        assert!(
            bad_channel["path"]
                .as_str()
                .unwrap()
                .ends_with("bad_supervisions.jsonl.gz:4"),
            "{bad_channel}"
        );
        assert!(bad_channel["reason"]
            .as_str()
            .unwrap()
            .contains("channel 5"));
        let past_end = error_for(&errs, "past-end");
        assert!(past_end["reason"]
            .as_str()
            .unwrap()
            .contains("past the end"));
        assert!(past_end["path"].as_str().unwrap().ends_with("stereo.wav"));
        let missing = error_for(&errs, "missing-file");
        assert!(missing["path"].as_str().unwrap().ends_with("missing.flac"));
        assert!(missing["reason"].as_str().unwrap().contains("cannot open"));
        let remote = error_for(&errs, "remote-source");
        assert!(
            remote["reason"].as_str().unwrap().contains("'url'"),
            "{remote}"
        );
        assert!(remote["path"]
            .as_str()
            .unwrap()
            .ends_with("bad_supervisions.jsonl.gz:7"));
    }
}

#[test]
fn lhotse_cuts_pick_their_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cuts");
    ok(&prepare(
        &out,
        &["--input", s(&fixture("lhotse/bad_cuts.jsonl.gz"))],
    ));
    let rows = contents(&out);
    assert_eq!(rows.len(), 2);
    for (id, _, speaker, samples) in &rows {
        let want = read_npy(&fixture(&format!("lhotse/expected_{id}.npy")));
        assert_eq!(speaker.as_deref(), Some("s1"));
        assert_eq!(samples.len(), want.len());
        assert!(samples.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}

#[test]
fn parquet_rows_decode_from_their_bytes_like_files_and_bad_rows_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let parquet = fixture("hf/commonvoice.parquet");
    let out = tmp.path().join("cv");
    let text = ok(&prepare(&out, &["--input", s(&parquet)]));
    assert!(text.contains("1 failed"), "{text}");
    let rows = contents(&out);
    // Common Voice columns: the id is the stem of `path`, text `sentence`, speaker `client_id`
    let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(ids, ["common_voice_en_1", "common_voice_en_2"]);
    assert_eq!(rows[1].1.as_deref(), Some("AN OGG VORBIS CLIP"));
    assert_eq!(rows[0].2.as_deref(), Some("c1"));
    let errs = errors(&out);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["id"], "common_voice_en_3");
    assert!(errs[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("commonvoice.parquet:3"));
    assert!(errs[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not a recognised audio format"));

    // The same bytes saved as files decode to the same samples.
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let bytes = speechcache::manifest::hf::read_audio_bytes(&parquet, 0, &[0, 1]).unwrap();
    for (i, name) in ["common_voice_en_1.mp3", "common_voice_en_2.ogg"]
        .iter()
        .enumerate()
    {
        std::fs::write(files.join(name), bytes[i].as_ref().unwrap()).unwrap();
    }
    let from_files = tmp.path().join("from_files");
    ok(&prepare(&from_files, &["--input", s(&files)]));
    let want = contents(&from_files);
    for (got, want) in rows.iter().zip(&want) {
        assert_eq!(got.0, want.0);
        assert!(got.3 == want.3, "{}: samples differ", got.0);
    }
}

#[test]
fn parquet_columns_can_be_named_and_wrong_names_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("hf/librispeech/data/dev-00000-of-00001.parquet");
    let out = tmp.path().join("named");
    ok(&prepare(
        &out,
        &[
            "--input",
            s(&input),
            "--format",
            "hf",
            "--id-column",
            "file",
            "--text-column",
            "text",
        ],
    ));
    let rows = contents(&out);
    assert_eq!(rows[2].0, "2428-83705-0000");
    assert_eq!(rows[2].2.as_deref(), Some("2428"));

    let bad = prepare(
        &tmp.path().join("bad"),
        &["--input", s(&input), "--text-column", "transcript"],
    );
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("dev-00000-of-00001.parquet")
            && msg.contains("--text-column 'transcript' is not a column")
            && msg.contains("speaker_id"),
        "{msg}"
    );

    let dup = prepare(
        &tmp.path().join("dup"),
        &["--input", s(&input), "--id-column", "chapter_id"],
    );
    assert!(!dup.status.success());
    let msg = String::from_utf8_lossy(&dup.stderr);
    assert!(
        msg.contains("duplicate utterance id '128104'") && msg.contains(".parquet:2"),
        "{msg}"
    );
}

#[test]
fn plain_lhotse_json_lines_are_detected_like_gzipped_ones() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let gz = fixture("lhotse/librispeech_cuts_dev-clean.jsonl.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let plain = tmp.path().join("cuts.jsonl");
    std::fs::write(&plain, text).unwrap();
    let (a, b) = (tmp.path().join("gz"), tmp.path().join("plain"));
    ok(&prepare(&a, &["--input", s(&gz)]));
    ok(&prepare(&b, &["--input", s(&plain)]));
    assert_eq!(contents(&a), contents(&b));
}

/// `prepare` under the hostile-input limits (3 GB address space, 20 s), from the repository
/// root so that the fixtures' relative paths resolve.
fn prepare_limited(out: &Path, args: &[&str]) -> common::Limited {
    let mut cmd = bin();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["prepare", "--quiet", "--out", s(out)])
        .args(args);
    common::run_limited(cmd)
}

/// Byte positions of the length fields of the buffers of the first record batch in an Arrow
/// IPC stream, with each buffer's length.
fn record_batch_buffer_lengths(stream: &[u8]) -> Vec<(usize, i64)> {
    let mut pos = 0usize;
    loop {
        if stream[pos..pos + 4] == [0xff; 4] {
            pos += 4;
        }
        let len = i32::from_le_bytes(stream[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4;
        assert!(len > 0, "no record batch in the stream");
        let meta = &stream[pos..pos + len];
        let message = arrow_ipc::root_as_message(meta).unwrap();
        if let Some(batch) = message.header_as_record_batch() {
            let buffers = batch.buffers().unwrap();
            let base = pos + (buffers.bytes().as_ptr() as usize - meta.as_ptr() as usize);
            return buffers
                .iter()
                .enumerate()
                .map(|(i, b)| (base + 16 * i + 8, b.length()))
                .collect();
        }
        pos += len + message.bodyLength() as usize;
    }
}

/// Issue 18 case 6: one bit flipped in a `save_to_disk` `.arrow` file (here in the length of
/// the audio column's data buffer) made arrow-ipc panic (exit 101). Now the damaged file is an
/// error row naming it and the row where reading stopped, the other input is prepared, and
/// the run exits 0.
#[test]
fn cli_bit_flipped_arrow_file_is_an_error_row_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    for name in [
        "state.json",
        "dataset_info.json",
        "data-00000-of-00001.arrow",
    ] {
        std::fs::copy(fixture("hf/librispeech_saved").join(name), saved.join(name)).unwrap();
    }
    let arrow = saved.join("data-00000-of-00001.arrow");
    let mut bytes = std::fs::read(&arrow).unwrap();
    let buffers = record_batch_buffer_lengths(&bytes);
    let (at, _) = *buffers.iter().max_by_key(|(_, len)| *len).unwrap();
    bytes[at + 5] ^= 0x40; // the length grows by 2^46
    std::fs::write(&arrow, &bytes).unwrap();

    let out = tmp.path().join("out");
    let cv = fixture("hf/commonvoice.parquet");
    let run = prepare_limited(&out, &["--input", s(&saved), "--input", s(&cv)]);
    let text = run.exited(0);
    assert!(
        text.contains("data-00000-of-00001.arrow:1") && text.contains("damaged"),
        "{text}"
    );
    let errs = errors(&out);
    let row = errs
        .iter()
        .find(|e| {
            e["path"]
                .as_str()
                .unwrap()
                .contains("data-00000-of-00001.arrow")
        })
        .unwrap_or_else(|| panic!("no error row for the arrow file: {errs:?}"));
    assert!(row["reason"].as_str().unwrap().contains("buffer"), "{row}");
    // the rest of the run went on: the Common Voice rows that decode are in the store
    let ids: Vec<String> = contents(&out).into_iter().map(|r| r.0).collect();
    assert_eq!(ids, ["common_voice_en_1", "common_voice_en_2"]);
}

/// Gzip members of `block` repeated `copies` times after `head`: a cheap way to write a file
/// that inflates to gigabytes (a gzip stream may hold many members).
fn gzip_bomb(path: &Path, head: &[u8], block: &[u8], copies: usize) {
    use std::io::Write;
    let member = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    file.write_all(&member(head)).unwrap();
    let block = member(block);
    for _ in 0..copies {
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
}

/// The read-only finding of issue 18: a gzipped Lhotse manifest had no bound on line length,
/// so a gzip bomb of one endless line (3 MB inflating to 3 GiB) exhausted memory. Now: one
/// clear error naming the file and line, at once. A bomb of many short junk lines stops at the
/// bound on unusable rows (or the inflation ratio) the same way.
#[test]
fn cli_gzip_bomb_lhotse_manifest_is_refused_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let endless = tmp.path().join("bomb_cuts.jsonl.gz");
    gzip_bomb(&endless, br#"{"id": ""#, &vec![b'a'; 1 << 20], 3072);
    let run = prepare_limited(&tmp.path().join("out1"), &["--input", s(&endless)]);
    let text = run.exited(2);
    assert!(
        text.contains("bomb_cuts.jsonl.gz:1") && text.contains("line longer than 64 MiB"),
        "{text}"
    );

    let junk = tmp.path().join("junk_cuts.jsonl.gz");
    let line = b"{\"recording\": 1}\n";
    let block: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() << 16)
        .collect();
    gzip_bomb(&junk, b"", &block, 3072);
    let run = prepare_limited(&tmp.path().join("out2"), &["--input", s(&junk)]);
    let text = run.exited(2);
    assert!(
        text.contains("junk_cuts.jsonl.gz:") && text.contains("unusable rows"),
        "{text}"
    );
}
