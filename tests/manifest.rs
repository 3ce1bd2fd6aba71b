//! Manifest importers: each format on small fixtures or trees built in temporary directories,
//! auto detection, and every error case. Audio files are fake bytes: importers never decode.
use speechcache::manifest::{load_inputs, manifest_hash, InputFormat, ManifestError, Utterance};
use std::fs;
use std::path::{Path, PathBuf};

const FIX: &str = "tests/fixtures/manifest";

fn fix(rel: &str) -> PathBuf {
    Path::new(FIX).join(rel)
}

fn load(path: &Path, format: InputFormat) -> Vec<Utterance> {
    load_inputs(&[path.to_path_buf()], format).unwrap()
}

fn load_err(paths: &[PathBuf], format: InputFormat) -> String {
    match load_inputs(paths, format) {
        Ok(utts) => panic!("expected an error, loaded {} utterances", utts.len()),
        Err(e) => {
            eprintln!("error: {e}");
            e.to_string()
        }
    }
}

fn touch(path: &Path, contents: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

fn ids(utts: &[Utterance]) -> Vec<&str> {
    utts.iter().map(|u| u.id.as_str()).collect()
}

fn utt(id: &str, source: PathBuf, start: f64, duration: Option<f64>) -> Utterance {
    Utterance {
        id: id.into(),
        source,
        start,
        duration,
        text: None,
        speaker: None,
    }
}

// ---------------------------------------------------------------- Kaldi

#[test]
fn kaldi_with_segments_text_and_speakers() {
    let utts = load(&fix("kaldi"), InputFormat::Kaldi);
    let rec1 = PathBuf::from("tests/fixtures/manifest/audio/rec1.wav");
    let rec2 = PathBuf::from("tests/fixtures/manifest/audio/rec2.flac");
    let expected = vec![
        Utterance {
            text: Some("HELLO WORLD".into()),
            speaker: Some("alice".into()),
            ..utt("rec1-0000000-0000120", rec1.clone(), 0.0, Some(1.2))
        },
        Utterance {
            text: Some("GOOD  MORNING".into()),
            speaker: Some("alice".into()),
            ..utt("rec1-0000090-0000210", rec1, 0.9, Some(1.2))
        },
        // End -1: to the end of the recording; a text line with only the id: empty text.
        Utterance {
            text: Some(String::new()),
            speaker: Some("bob".into()),
            ..utt("rec2-0000000-end", rec2, 0.0, None)
        },
    ];
    assert_eq!(utts, expected);
}

#[test]
fn kaldi_without_segments_one_utterance_per_recording() {
    // wav.scp has CRLF endings; the text file covers only rec2.
    let utts = load(&fix("kaldi_nosegments"), InputFormat::Auto);
    assert_eq!(ids(&utts), ["rec1", "rec2"]);
    assert_eq!(
        utts[0].source,
        PathBuf::from("tests/fixtures/manifest/audio/rec1.wav")
    );
    assert_eq!(utts[0].text, None);
    assert_eq!(utts[1].text.as_deref(), Some("ZWEI"));
    assert_eq!((utts[1].start, utts[1].duration), (0.0, None));
}

#[test]
fn kaldi_wav_scp_file_stands_for_its_directory() {
    let by_file = load(&fix("kaldi/wav.scp"), InputFormat::Auto);
    assert_eq!(by_file, load(&fix("kaldi"), InputFormat::Auto));
}

fn kaldi_dir(wav_scp: &str, segments: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    touch(&dir.path().join("wav.scp"), wav_scp);
    if let Some(s) = segments {
        touch(&dir.path().join("segments"), s);
    }
    dir
}

#[test]
fn kaldi_piped_entry_is_refused_with_file_and_line() {
    let dir = kaldi_dir("a /x/a.wav\nb sox /x/b.wav -t wav - |\n", None);
    let msg = load_err(&[dir.path().to_path_buf()], InputFormat::Auto);
    let expected_prefix = format!("{}:2:", dir.path().join("wav.scp").display());
    assert!(msg.starts_with(&expected_prefix), "{msg}");
    assert!(msg.contains("piped command"), "{msg}");
}

#[test]
fn kaldi_extended_filenames_are_refused() {
    for entry in ["a feats.ark:123", "a /x/a.wav[0:100]", "a -"] {
        let dir = kaldi_dir(&format!("{entry}\n"), None);
        let msg = load_err(&[dir.path().to_path_buf()], InputFormat::Kaldi);
        assert!(msg.contains("wav.scp:1:"), "{entry}: {msg}");
        assert!(msg.contains("not supported"), "{entry}: {msg}");
    }
}

#[test]
fn kaldi_bad_lines_name_file_and_line() {
    let cases = [
        ("a /x/a.wav\nb\n", None, "wav.scp:2:"),
        ("a /x/a.wav\na /x/b.wav\n", None, "wav.scp:2:"),
        ("a /x/a.wav\n", Some("u1 a 0 1\nu2 a 0\n"), "segments:2:"),
        ("a /x/a.wav\n", Some("u1 a zero 1\n"), "segments:1:"),
        ("a /x/a.wav\n", Some("u1 a 2 1\n"), "segments:1:"),
        ("a /x/a.wav\n", Some("u1 a -1 1\n"), "segments:1:"),
        ("a /x/a.wav\n", Some("u1 nope 0 1\n"), "segments:1:"),
    ];
    for (wav_scp, segments, expected) in cases {
        let dir = kaldi_dir(wav_scp, segments);
        let msg = load_err(&[dir.path().to_path_buf()], InputFormat::Kaldi);
        assert!(msg.contains(expected), "expected {expected} in: {msg}");
    }
}

#[test]
fn kaldi_duplicate_segment_id_is_an_error() {
    let dir = kaldi_dir("a /x/a.wav\n", Some("u1 a 0 1\n\nu1 a 1 2\n"));
    let msg = load_err(&[dir.path().to_path_buf()], InputFormat::Kaldi);
    assert!(msg.contains("segments:3:"), "{msg}");
    assert!(msg.contains("duplicate utterance id 'u1'"), "{msg}");
    assert!(msg.contains("segments:1"), "{msg}");
}

#[test]
fn kaldi_missing_wav_scp_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let msg = load_err(&[dir.path().to_path_buf()], InputFormat::Kaldi);
    assert!(msg.contains("wav.scp"), "{msg}");
}

// ---------------------------------------------------------------- fairseq

#[test]
fn fairseq_tsv_with_letter_labels() {
    let utts = load(&fix("fairseq/train.tsv"), InputFormat::Auto);
    let root = fix("fairseq").join("../audio");
    assert_eq!(ids(&utts), ["one", "two", "three"]);
    assert_eq!(utts[0].source, root.join("one.wav"));
    assert_eq!(utts[2].source, root.join("three.ogg"));
    let texts: Vec<_> = utts.iter().map(|u| u.text.as_deref().unwrap()).collect();
    assert_eq!(texts, ["HELLO WORLD", "ONE", "TWO THREE"]);
    assert!(utts.iter().all(|u| u.start == 0.0 && u.duration.is_none()));
}

#[test]
fn fairseq_tsv_with_word_labels() {
    let utts = load(&fix("fairseq/valid.tsv"), InputFormat::Tsv);
    assert_eq!(utts[0].source, fix("fairseq").join("audio/one.wav"));
    assert_eq!(utts[0].text.as_deref(), Some("hello world"));
    assert_eq!(utts[1].text.as_deref(), Some("one two"));
}

#[test]
fn fairseq_absolute_root_and_no_labels() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("x.tsv");
    touch(&tsv, "/data/corpus\nspk1/a.flac\t100\nspk2/a.flac\t200\n");
    let utts = load(&tsv, InputFormat::Auto);
    // Stems collide, so ids fall back to the relative paths.
    assert_eq!(ids(&utts), ["spk1-a", "spk2-a"]);
    assert_eq!(utts[1].source, PathBuf::from("/data/corpus/spk2/a.flac"));
    assert_eq!(utts[0].text, None);
}

#[test]
fn fairseq_label_count_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("train.tsv");
    touch(&tsv, "/r\na.wav\t1\nb.wav\t2\n");
    touch(&dir.path().join("train.wrd"), "only one\n");
    let msg = load_err(std::slice::from_ref(&tsv), InputFormat::Auto);
    assert!(msg.contains("train.wrd"), "{msg}");
    assert!(msg.contains(&tsv.display().to_string()), "{msg}");
    assert!(
        msg.contains("1 lines") && msg.contains("2 entries"),
        "{msg}"
    );
}

#[test]
fn fairseq_bad_lines_name_file_and_line() {
    for body in ["/r\na.wav\t1\nb.wav\n", "/r\na.wav\t1\nb.wav\tmany\n"] {
        let dir = tempfile::tempdir().unwrap();
        let tsv = dir.path().join("t.tsv");
        touch(&tsv, body);
        let msg = load_err(&[tsv], InputFormat::Tsv);
        assert!(
            msg.contains("t.tsv:3:") || msg.contains("t.tsv:4:"),
            "{msg}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("empty.tsv");
    touch(&tsv, "\n\n");
    assert!(load_err(&[tsv], InputFormat::Tsv).contains("empty fairseq manifest"));
}

// ---------------------------------------------------------------- JSON lines

#[test]
fn jsonl_nemo_fields() {
    let utts = load(&fix("nemo.json"), InputFormat::Auto);
    let expected = vec![
        // NeMo's duration of a whole file is metadata: the whole file is read.
        Utterance {
            text: Some("one".into()),
            ..utt("one", fix("audio/one.wav"), 0.0, None)
        },
        Utterance {
            text: Some("seg".into()),
            ..utt(
                "rec1-0000050-0000150",
                fix("audio/rec1.wav"),
                0.5,
                Some(1.0),
            )
        },
        Utterance {
            text: Some("abs".into()),
            speaker: Some("7".into()),
            ..utt("x", PathBuf::from("/abs/elsewhere/x.flac"), 0.0, None)
        },
    ];
    assert_eq!(utts, expected);
}

#[test]
fn jsonl_our_fields() {
    let utts = load(&fix("ours.jsonl"), InputFormat::Jsonl);
    let expected = vec![
        Utterance {
            text: Some("two".into()),
            speaker: Some("s1".into()),
            ..utt("u1", fix("audio/two.mp3"), 0.0, None)
        },
        Utterance {
            text: Some("part".into()),
            speaker: Some("s2".into()),
            ..utt("u2", fix("audio/rec2.flac"), 1.5, Some(2.25))
        },
        utt("three", fix("audio/three.ogg"), 0.0, None),
    ];
    assert_eq!(utts, expected);
}

#[test]
fn jsonl_bad_lines_name_file_and_line() {
    let cases = [
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\"\n",
        "{\"path\": \"a.wav\"}\n[1, 2]\n",
        "{\"path\": \"a.wav\"}\n{\"text\": \"no audio\"}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"duration\": \"long\"}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"audio_filepath\": \"c.wav\"}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"id\": \"has space\"}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"start\": -1}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"duration\": 0}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"b.wav\", \"text\": 3}\n",
        "{\"path\": \"a.wav\"}\n{\"path\": \"sub/a.flac\"}\n",
    ];
    for body in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        touch(&path, body);
        let msg = load_err(&[path], InputFormat::Auto);
        assert!(msg.contains("m.jsonl:2:"), "{body}: {msg}");
    }
}

// ---------------------------------------------------------------- directories

fn fake_tree(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        touch(&dir.path().join(f), "fake");
    }
    dir
}

#[test]
fn dir_scan_is_sorted_recursive_and_case_insensitive() {
    let tree = fake_tree(&[
        "b/z.WAV",
        "a/y.flac",
        "a/c/x.Mp3",
        "m.opus",
        "notes.txt",
        "a/.hidden.wav",
        ".cache/q.wav",
        "k.m4a",
    ]);
    let utts = load(tree.path(), InputFormat::Auto);
    // Sorted by relative path bytes: "a/c/x" < "a/y" < "b/z" < "k" < "m".
    assert_eq!(ids(&utts), ["x", "y", "z", "k", "m"]);
    assert_eq!(utts[0].source, tree.path().join("a/c/x.Mp3"));
    assert!(utts.iter().all(|u| u.text.is_none() && u.speaker.is_none()));
}

#[test]
fn dir_colliding_stems_fall_back_to_relative_paths() {
    let tree = fake_tree(&["s1/a.wav", "s2/a.wav", "s2/b.flac"]);
    let utts = load(tree.path(), InputFormat::Dir);
    assert_eq!(ids(&utts), ["s1-a", "s2-a", "s2-b"]);
}

#[test]
fn dir_same_name_in_two_codecs_keeps_the_extension_in_ids() {
    let tree = fake_tree(&["a.wav", "a.flac", "b.mp3"]);
    let utts = load(tree.path(), InputFormat::Dir);
    assert_eq!(ids(&utts), ["a.flac", "a.wav", "b.mp3"]);
}

#[cfg(unix)]
#[test]
fn dir_follows_symlinks() {
    let tree = fake_tree(&["real/one.wav"]);
    let other = fake_tree(&["two.flac"]);
    std::os::unix::fs::symlink(other.path(), tree.path().join("linked")).unwrap();
    let utts = load(tree.path(), InputFormat::Dir);
    assert_eq!(ids(&utts), ["two", "one"]);
    assert_eq!(utts[0].source, tree.path().join("linked/two.flac"));
}

#[test]
fn dir_without_audio_is_an_error() {
    let tree = fake_tree(&["readme.txt"]);
    let msg = load_err(&[tree.path().to_path_buf()], InputFormat::Auto);
    assert!(msg.contains("no audio files found"), "{msg}");
}

#[test]
fn librispeech_layout_attaches_transcripts_and_speakers() {
    let tree = fake_tree(&[
        "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac",
        "LibriSpeech/dev-clean/84/121123/84-121123-0001.flac",
        "LibriSpeech/dev-clean/174/50561/174-50561-0000.flac",
        "LibriSpeech/dev-clean/174/50561/extra.flac",
    ]);
    let root = tree.path().join("LibriSpeech");
    touch(
        &root.join("dev-clean/84/121123/84-121123.trans.txt"),
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n",
    );
    touch(
        &root.join("dev-clean/174/50561/174-50561.trans.txt"),
        "174-50561-0000 FORGOTTEN TOO THE NAME OF GILLIAN\n174-50561-0099 NOT ON DISK\n",
    );
    let utts = load(&root, InputFormat::Auto);
    assert_eq!(
        ids(&utts),
        [
            "174-50561-0000",
            "extra",
            "84-121123-0000",
            "84-121123-0001"
        ]
    );
    let expected_0 = Utterance {
        text: Some("FORGOTTEN TOO THE NAME OF GILLIAN".into()),
        speaker: Some("174".into()),
        ..utt(
            "174-50561-0000",
            root.join("dev-clean/174/50561/174-50561-0000.flac"),
            0.0,
            None,
        )
    };
    assert_eq!(utts[0], expected_0);
    assert_eq!(
        (utts[1].text.as_deref(), utts[1].speaker.as_deref()),
        (None, None)
    );
    assert_eq!(
        utts[3].text.as_deref(),
        Some("BUT IN LESS THAN FIVE MINUTES")
    );
    assert_eq!(utts[3].speaker.as_deref(), Some("84"));
}

#[test]
fn aishell_layout_removes_spaces_and_finds_speakers() {
    let tree = fake_tree(&[
        "data_aishell/wav/train/S0002/BAC009S0002W0122.wav",
        "data_aishell/wav/train/S0002/BAC009S0002W0123.wav",
        "data_aishell/wav/dev/S0724/BAC009S0724W0121.wav",
    ]);
    let root = tree.path().join("data_aishell");
    touch(
        &root.join("transcript/aishell_transcript_v0.8.txt"),
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n\
         BAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况\n",
    );
    let utts = load(&root, InputFormat::Auto);
    assert_eq!(
        ids(&utts),
        ["BAC009S0724W0121", "BAC009S0002W0122", "BAC009S0002W0123"]
    );
    assert_eq!(utts[0].text.as_deref(), Some("甚至出现交易几乎停滞的情况"));
    assert_eq!(utts[0].speaker.as_deref(), Some("S0724"));
    assert_eq!(
        utts[1].text.as_deref(),
        Some("而对楼市成交抑制作用最大的限购")
    );
    // No transcript line: text stays None, the speaker still comes from the id.
    assert_eq!(utts[2].text, None);
    assert_eq!(utts[2].speaker.as_deref(), Some("S0002"));
}

#[test]
fn layout_transcript_given_twice_is_an_error() {
    let tree = fake_tree(&["1-2-3.flac"]);
    touch(&tree.path().join("1-2.trans.txt"), "1-2-3 A\n1-2-3 B\n");
    let msg = load_err(&[tree.path().to_path_buf()], InputFormat::Dir);
    assert!(msg.contains("1-2.trans.txt:2:"), "{msg}");
}

// ---------------------------------------------------------------- inputs together

#[test]
fn auto_detection_and_format_mismatch() {
    assert_eq!(
        load(&fix("kaldi"), InputFormat::Auto),
        load(&fix("kaldi"), InputFormat::Kaldi)
    );
    assert_eq!(
        load(&fix("ours.jsonl"), InputFormat::Auto),
        load(&fix("ours.jsonl"), InputFormat::Jsonl)
    );
    let msg = load_err(&[fix("ours.jsonl")], InputFormat::Dir);
    assert!(msg.contains("needs a directory"), "{msg}");
    let msg = load_err(&[fix("audio")], InputFormat::Tsv);
    assert!(msg.contains("needs a manifest file"), "{msg}");
}

#[test]
fn unknown_format_names_path_and_accepted_formats() {
    let msg = load_err(&[fix("kaldi/text")], InputFormat::Auto);
    assert!(
        msg.starts_with("tests/fixtures/manifest/kaldi/text:"),
        "{msg}"
    );
    assert!(msg.contains("*.tsv") && msg.contains("*.jsonl") && msg.contains("Kaldi"));
}

#[test]
fn missing_input_is_an_error_naming_it() {
    let missing = fix("no/such/manifest.jsonl");
    let err = load_inputs(std::slice::from_ref(&missing), InputFormat::Auto).unwrap_err();
    assert!(matches!(&err, ManifestError::Io { path, .. } if *path == missing));
    assert!(err.to_string().contains("no/such/manifest.jsonl"));
}

#[test]
fn inputs_are_concatenated_in_order() {
    let both = load_inputs(&[fix("ours.jsonl"), fix("kaldi")], InputFormat::Auto).unwrap();
    let mut expected = load(&fix("ours.jsonl"), InputFormat::Auto);
    expected.extend(load(&fix("kaldi"), InputFormat::Auto));
    assert_eq!(both, expected);
}

#[test]
fn duplicate_ids_across_inputs_name_both_places() {
    let msg = load_err(
        &[fix("fairseq/valid.tsv"), fix("fairseq/train.tsv")],
        InputFormat::Auto,
    );
    assert!(
        msg.starts_with("tests/fixtures/manifest/fairseq/train.tsv:2:"),
        "{msg}"
    );
    assert!(msg.contains("duplicate utterance id 'one'"), "{msg}");
    assert!(msg.contains("valid.tsv:2"), "{msg}");
}

#[test]
fn manifest_hash_is_stable_and_sensitive() {
    let utts = load(&fix("kaldi"), InputFormat::Auto);
    let h = manifest_hash(&utts);
    assert_eq!(h.len(), 64);
    assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(h, manifest_hash(&load(&fix("kaldi"), InputFormat::Auto)));
    let mut changed = utts.clone();
    changed[1].text = Some("GOOD MORNING".into());
    assert_ne!(h, manifest_hash(&changed));
    let mut reordered = utts.clone();
    reordered.swap(0, 1);
    assert_ne!(h, manifest_hash(&reordered));
    let mut shifted = utts;
    shifted[0].start = 0.001;
    assert_ne!(h, manifest_hash(&shifted));
    // Independent reference (Python: sha256 of the header line, then one compact JSON array
    // per utterance): [id, source, start, duration, text, speaker].
    assert_eq!(
        manifest_hash(&[]),
        "c22a314818161d62d1cd3bb8f0831c9b00062328dcb82a91a5c38eef6be02402"
    );
    let two = [
        utt("a", PathBuf::from("x/a.wav"), 0.0, None),
        Utterance {
            text: Some("HI there".into()),
            speaker: Some("s1".into()),
            ..utt("b", PathBuf::from("/y/b.flac"), 1.5, Some(2.25))
        },
    ];
    assert_eq!(
        manifest_hash(&two),
        "2cfb1cf8711f3923fcf009259c3214572473127f3748e49dfad629e36c25a22d"
    );
}

// ---------------------------------------------------------------- bundled demo corpus

#[test]
fn demo_corpus_loads_and_is_well_formed() {
    let train = load(Path::new("manifests/demo/train.jsonl"), InputFormat::Auto);
    let valid = load(Path::new("manifests/demo/valid.jsonl"), InputFormat::Auto);
    assert_eq!((train.len(), valid.len()), (120, 30));
    // Disjoint ids: loading both inputs together succeeds.
    let both = [
        PathBuf::from("manifests/demo/train.jsonl"),
        PathBuf::from("manifests/demo/valid.jsonl"),
    ];
    assert_eq!(load_inputs(&both, InputFormat::Auto).unwrap().len(), 150);
    let mut bytes = 0;
    for u in train.iter().chain(&valid) {
        assert!(
            u.source.starts_with("manifests/demo/audio"),
            "{:?}",
            u.source
        );
        bytes += fs::metadata(&u.source).unwrap().len();
        assert!(!u.text.as_deref().unwrap().is_empty());
        assert_eq!((u.start, u.duration), (0.0, None));
    }
    assert!(bytes < 3_000_000, "demo audio is {bytes} bytes");
    for u in &valid {
        assert!(train.iter().any(|t| t.speaker == u.speaker), "{}", u.id);
    }
}
