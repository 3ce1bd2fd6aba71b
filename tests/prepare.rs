//! `speechcache prepare` as a user runs it: every input format, mixed codecs and rates,
//! determinism across --jobs, kill -9 and resume, speed perturbation, bad input.
mod common;
use common::{bin, ok, s, tree_bytes};
use std::path::{Path, PathBuf};
use std::process::Output;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name)
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/demo")
}

fn prepare(args: &[&str]) -> Output {
    let out = bin()
        .arg("prepare")
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap();
    out
}

fn rows(store: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(store.join("index.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn errors(store: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(store.join("errors.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A corpus directory with one file of each codec (content-detected, any rate/channels).
fn mixed_dir(root: &Path) -> PathBuf {
    let dir = root.join("corpus");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for name in [
        "speech_16k.flac",
        "speech_16k.mp3",
        "speech_16k.ogg",
        "speech_16k.opus",
        "speech_16k.m4a",
        "tone_44k_stereo.mp3",
        "tone_48k_stereo.m4a",
        "wav_s24_22k_stereo.wav",
        "tone_22k_mono_alac.m4a",
    ] {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    std::fs::copy(
        fixture("wav_s16_8k_6ch.wav"),
        dir.join("sub/SIX_CHANNELS.WAV"),
    )
    .unwrap();
    std::fs::copy(fixture("flac_named.wav"), dir.join("sub/flac_named.wav")).unwrap();
    dir
}

#[test]
fn directory_of_mixed_codecs_becomes_16k_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = mixed_dir(tmp.path());
    let store = tmp.path().join("store");
    let text = ok(&prepare(&["--input", s(&dir), "--out", s(&store)]));
    let rows = rows(&store);
    assert_eq!(rows.len(), 11, "{text}");
    assert!(errors(&store).is_empty());
    for row in &rows {
        // duration as stored equals samples at 16 kHz; the original rate is recorded.
        let len = row["length"].as_u64().unwrap() as f64;
        assert!((row["duration"].as_f64().unwrap() - len / 16000.0).abs() < 1e-9);
        assert!(row["orig_rate"].as_u64().unwrap() >= 8000);
    }
    let six = rows
        .iter()
        .find(|r| r["source"].as_str().unwrap().ends_with("SIX_CHANNELS.WAV"))
        .unwrap();
    assert_eq!(six["orig_channels"], 6);
    assert_eq!(six["orig_rate"], 8000);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["sample_rate"], 16000);
    assert_eq!(meta["kind"], "audio");
    let verify = bin().arg("verify").arg(&store).output().unwrap();
    assert!(ok(&verify).contains("OK"));
    let info = bin().arg("info").arg(&store).output().unwrap();
    assert!(ok(&info).contains("utterances 11"));
}

#[test]
fn same_store_at_any_jobs_and_rerun_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let train = demo().join("train.jsonl");
    ok(&prepare(&[
        "--input",
        s(&train),
        "--out",
        s(&a),
        "--jobs",
        "1",
        "--shard-size",
        "1MiB",
    ]));
    ok(&prepare(&[
        "--input",
        s(&train),
        "--out",
        s(&b),
        "--jobs",
        "4",
        "--shard-size",
        "1MiB",
    ]));
    assert_eq!(tree_bytes(&a), tree_bytes(&b));
    assert!(rows(&a).len() > 100);
    // different --shard-size: the store is refused, not mixed
    let refused = prepare(&["--input", s(&train), "--out", s(&a), "--shard-size", "2MiB"]);
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("different options") && msg.contains("shard_size"),
        "{msg}"
    );
    let again = bin()
        .args([
            "prepare",
            "--input",
            s(&train),
            "--out",
            s(&a),
            "--shard-size",
            "1MiB",
        ])
        .output()
        .unwrap();
    assert!(ok(&again).contains("nothing to do"));
}

#[test]
fn killed_run_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let train = demo().join("train.jsonl");
    let full = tmp.path().join("full");
    let common = [
        "--shard-size",
        "64KiB",
        "--speed",
        "0.9,1.0,1.1",
        "--jobs",
        "2",
    ];
    ok(&prepare(
        &[&["--input", s(&train), "--out", s(&full)][..], &common[..]].concat(),
    ));
    let mut killed_mid_run = 0;
    for attempt in 0..3 {
        let out = tmp.path().join(format!("killed{attempt}"));
        let mut child = bin()
            .args(
                [
                    &["prepare", "--quiet", "--input", s(&train), "--out", s(&out)][..],
                    &common[..],
                ]
                .concat(),
            )
            .spawn()
            .unwrap();
        let want = out.join(format!("shards/{:05}.npy.seal.json", 2 + attempt * 5));
        let started = std::time::Instant::now();
        while !want.exists() && started.elapsed().as_secs() < 60 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if !out.join("meta.json").exists() {
            killed_mid_run += 1;
            assert!(out.join("in_progress.json").exists());
            let info = bin().arg("info").arg(&out).output().unwrap();
            assert!(
                !info.status.success(),
                "an unfinished store is not presented as complete"
            );
        }
        ok(&prepare(
            &[&["--input", s(&train), "--out", s(&out)][..], &common[..]].concat(),
        ));
        assert_eq!(tree_bytes(&out), tree_bytes(&full), "attempt {attempt}");
    }
    assert!(killed_mid_run > 0, "no run was caught mid-way");
}

#[test]
fn speed_perturbation_adds_prefixed_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("sp");
    let jsonl = tmp.path().join("one.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{{\"id\": \"u1\", \"path\": \"{}\", \"text\": \"hi\", \"speaker\": \"spk\"}}\n",
            s(&fixture("speech_16k.wav"))
        ),
    )
    .unwrap();
    ok(&prepare(&[
        "--input",
        s(&jsonl),
        "--out",
        s(&store),
        "--speed",
        "0.9,1.0,1.1",
    ]));
    let rows = rows(&store);
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["u1", "sp0.9-u1", "sp1.1-u1"]);
    let n = rows[0]["length"].as_f64().unwrap();
    for (row, f) in rows[1..].iter().zip([0.9, 1.1]) {
        let len = row["length"].as_f64().unwrap();
        assert!((len - n / f).abs() <= 2.0, "factor {f}: {len} vs {}", n / f);
        assert_eq!(row["speed"], f);
        assert_eq!(row["speaker"], format!("sp{f}-spk"));
        assert_eq!(row["text"], "hi");
    }
}

#[test]
fn kaldi_segments_cut_one_recording_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let wav = fixture("speech_16k.wav");
    std::fs::write(data.join("wav.scp"), format!("rec1 {}\n", s(&wav))).unwrap();
    std::fs::write(
        data.join("segments"),
        "a rec1 0.0 0.25\nb rec1 0.25 0.5\nc rec1 99 100\n",
    )
    .unwrap();
    std::fs::write(data.join("text"), "a hello\nb world\nc never\n").unwrap();
    std::fs::write(data.join("utt2spk"), "a s1\nb s1\nc s1\n").unwrap();
    let store = tmp.path().join("store");
    ok(&prepare(&[
        "--input",
        s(&data),
        "--out",
        s(&store),
        "--format",
        "kaldi",
    ]));
    let rows = rows(&store);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["length"], 4000);
    assert_eq!(rows[1]["length"], 4000);
    assert_eq!(rows[1]["start"], 0.25);
    assert_eq!(rows[0]["text"], "hello");
    let errs = errors(&store);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0]["reason"].as_str().unwrap().contains("past the end"),
        "{errs:?}"
    );
}

#[test]
fn fairseq_tsv_and_duration_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixture("x");
    let root = root.parent().unwrap();
    let tsv = tmp.path().join("train.tsv");
    std::fs::write(
        &tsv,
        format!(
            "{}\nspeech_16k.flac\t8000\ntone_44k_stereo.mp3\t44100\n",
            s(root)
        ),
    )
    .unwrap();
    std::fs::write(tmp.path().join("train.wrd"), "hello world\na tone\n").unwrap();
    let store = tmp.path().join("store");
    ok(&prepare(&[
        "--input",
        s(&tsv),
        "--out",
        s(&store),
        "--max-duration",
        "0.8",
    ]));
    let rows = rows(&store);
    let errs = errors(&store);
    assert_eq!(rows.len() + errs.len(), 2);
    assert!(
        errs.iter()
            .all(|e| e["reason"].as_str().unwrap().starts_with("skipped:")),
        "{errs:?}"
    );
    assert!(rows.iter().all(|r| r["duration"].as_f64().unwrap() <= 0.8));
}

#[test]
fn bad_files_are_listed_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "corrupt.flac",
        "empty.wav",
        "truncated.mp3",
        "truncated.flac",
        "zero_length.wav",
        "speech_16k.flac",
    ] {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    std::fs::copy(fixture("not_audio.txt"), dir.join("notes.wav")).unwrap();
    let store = tmp.path().join("store");
    let out = bin()
        .args(["prepare", "--input", s(&dir), "--out", s(&store)])
        .output()
        .unwrap();
    let text = ok(&out);
    assert_eq!(rows(&store).len(), 1, "{text}");
    let errs = errors(&store);
    assert_eq!(errs.len(), 6, "{errs:?}");
    for e in &errs {
        let reason = e["reason"].as_str().unwrap();
        assert!(!reason.is_empty() && e["path"].as_str().unwrap().starts_with(s(&dir)));
    }
    assert!(
        text.contains("notes.wav"),
        "summary names the failures: {text}"
    );
    // --strict turns failures into a non-zero exit, the store is still complete.
    let strict = tmp.path().join("strict");
    let out = bin()
        .args([
            "prepare",
            "--quiet",
            "--strict",
            "--input",
            s(&dir),
            "--out",
            s(&strict),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(strict.join("meta.json").exists());
    // --keep-damaged keeps the decodable part, flagged.
    let keep = tmp.path().join("keep");
    ok(&prepare(&[
        "--keep-damaged",
        "--input",
        s(&dir),
        "--out",
        s(&keep),
    ]));
    let kept = rows(&keep);
    assert!(kept.iter().any(|r| r["damaged"].is_string()), "{kept:?}");
}

#[test]
fn clear_errors_for_missing_input_unknown_format_and_unwritable_output() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = prepare(&[
        "--input",
        "/no/such/corpus",
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/corpus"));
    let odd = tmp.path().join("list.csv");
    std::fs::write(&odd, "a,b\n").unwrap();
    let unknown = prepare(&["--input", s(&odd), "--out", s(&tmp.path().join("y"))]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("list.csv"));
    let file_as_out = tmp.path().join("afile");
    std::fs::write(&file_as_out, b"x").unwrap();
    let train = demo().join("valid.jsonl");
    let bad_out = prepare(&["--input", s(&train), "--out", s(&file_as_out)]);
    assert!(!bad_out.status.success());
    let msg = String::from_utf8_lossy(&bad_out.stderr);
    assert!(msg.contains("afile") && msg.lines().count() == 1, "{msg}");
}
