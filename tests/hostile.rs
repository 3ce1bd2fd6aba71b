//! Hostile and messy inputs (issue 18), each through the CLI as a user or another process
//! would meet it, under 3 GB of address space and 20 s: no panic, no signal, no hang, a clear
//! message naming the file, nothing lost or silently wrong.
mod common;
use common::{bin, run_limited, s};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 16-bit PCM mono WAV declaring `rate` Hz.
fn wav_bytes(rate: u32, samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut b = Vec::with_capacity(44 + samples.len() * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate.wrapping_mul(2)).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for x in samples {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// `seconds` of a tone at 16 kHz, different per `seed`.
fn tone(seconds: f64, seed: u32) -> Vec<i16> {
    let n = (seconds * 16000.0) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / 16000.0;
            (8000.0 * (t * (220.0 + 40.0 * seed as f64) * std::f64::consts::TAU).sin()) as i16
        })
        .collect()
}

/// A directory of `n` small 16 kHz WAVs named `u0.wav`, `u1.wav`, ...
fn corpus(root: &Path, n: u32) -> PathBuf {
    let dir = root.join("corpus");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(format!("u{i}.wav")),
            wav_bytes(16000, &tone(0.5, i)),
        )
        .unwrap();
    }
    dir
}

fn cmd(args: &[&str]) -> Command {
    let mut c = bin();
    c.args(args);
    c
}

fn prepare(input: &Path, out: &Path, extra: &[&str]) -> common::Limited {
    let mut args = vec!["prepare", "--quiet", "--input", s(input), "--out", s(out)];
    args.extend_from_slice(extra);
    run_limited(cmd(&args))
}

fn extract_fbank(data: &Path, out: &Path, extra: &[&str]) -> common::Limited {
    let mut args = vec![
        "extract",
        "--quiet",
        "--data",
        s(data),
        "--model",
        "fbank",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    run_limited(cmd(&args))
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audio_store(root: &Path, n: u32) -> PathBuf {
    let store = root.join("audio");
    prepare(&corpus(root, n), &store, &[]).exited(0);
    store
}

/// Case 1: a WAV declaring 1 Hz is one error row, not a 38 GB allocation; the run finishes.
#[test]
fn a_wav_declaring_1_hz_is_an_error_row() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let hostile: Vec<i16> = (0..600_000).map(|i| (i % 1000) as i16).collect();
    std::fs::write(dir.join("one_hz.wav"), wav_bytes(1, &hostile)).unwrap();
    let out = t.path().join("audio");
    prepare(&dir, &out, &[]).exited(0);
    let errors = jsonl(&out.join("errors.jsonl"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(errors[0]["path"].as_str().unwrap().ends_with("one_hz.wav"));
    assert!(reason.contains("1 Hz"), "{reason}");
    assert_eq!(jsonl(&out.join("index.jsonl")).len(), 2);
    // the rerun finds the store complete instead of dying on the same file
    let again = prepare(&dir, &out, &[]);
    assert!(again.exited(0).contains("already complete"));
}

/// Case 5: an index row whose offset + length wraps around u64 is a clear refusal.
#[test]
fn an_index_offset_near_2_pow_64_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 2);
    let index = store.join("index.jsonl");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows[1]["offset"] = serde_json::json!(u64::MAX - 3);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&index, text).unwrap();
    let run = extract_fbank(&store, &t.path().join("feats"), &[]);
    let text = run.exited(2);
    assert!(
        text.contains("index.jsonl") && text.contains("line 2"),
        "{text}"
    );
}

/// Case 7: absurd part counts are refused at parse time, without allocating.
#[test]
fn absurd_part_counts_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 1);
    for part in ["1/18446744073709551615", "1/100000000000"] {
        let run = prepare(&dir, &t.path().join("p"), &["--part", part]);
        let text = run.exited(2);
        assert!(text.contains("--part"), "{text}");
    }
}

/// Case 8: a FIFO named by a manifest is an error row, never a blocked open().
#[test]
fn a_fifo_in_a_manifest_is_an_error_row() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 1);
    let fifo = t.path().join("pipe.wav");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let manifest = t.path().join("list.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "{{\"id\": \"good\", \"path\": \"{}\"}}\n{{\"id\": \"pipe\", \"path\": \"{}\"}}\n",
            s(&dir.join("u0.wav")),
            s(&fifo)
        ),
    )
    .unwrap();
    let out = t.path().join("audio");
    prepare(&manifest, &out, &[]).exited(0);
    let errors = jsonl(&out.join("errors.jsonl"));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["reason"].as_str().unwrap().contains("FIFO"),
        "{errors:?}"
    );
    // and a FIFO given as --input is refused at once
    let run = prepare(&fifo, &t.path().join("audio2"), &[]);
    assert!(run.exited(2).contains("not a regular file"));
}

/// The child half of the SIGBUS test: maps a store, truncates its shard, touches it.
#[test]
fn sigbus_child_process() {
    let Ok(store) = std::env::var("SPEECHCACHE_TEST_SIGBUS_STORE") else {
        return;
    };
    let audio = speechcache::store::AudioStore::open(Path::new(&store)).unwrap();
    let shard = Path::new(&store).join("shards/00000.npy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(0)
        .unwrap();
    let last = audio.len() - 1;
    let sum: f32 = audio.samples(last).iter().sum();
    println!("read {sum} without a fault");
}

/// Case 9: a shard truncated under a reader gives a message naming it and exit 74, not a bare
/// "Bus error".
#[test]
fn a_shard_truncated_while_mapped_is_named() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 3);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigbus_child_process", "--nocapture"])
        .env("SPEECHCACHE_TEST_SIGBUS_STORE", &store)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(speechcache::store::sigbus::EXIT_CODE),
        "{text}"
    );
    assert!(
        text.contains("00000.npy") && text.contains("shrank"),
        "{text}"
    );
}

/// Case 9, the cooperative half: --overwrite cannot pull the files of a store a reader has
/// open (prune can run: it only unlinks dropped layers, which readers keep mapped).
#[test]
fn overwrite_waits_for_readers() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let store = t.path().join("audio");
    prepare(&dir, &store, &[]).exited(0);
    let reader = speechcache::store::AudioStore::open(&store).unwrap();
    let run = prepare(&dir, &store, &["--overwrite"]);
    assert!(run.exited(2).contains("being read"), "{}", run.text);
    drop(reader);
    prepare(&dir, &store, &["--overwrite"]).exited(0);
}

/// Case 10: a store that lost its index is damaged, not empty; merge refuses a part without one.
#[test]
fn a_missing_index_is_an_error_not_an_empty_store() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 2);
    std::fs::remove_file(store.join("index.jsonl")).unwrap();
    let run = extract_fbank(&store, &t.path().join("feats"), &[]);
    let text = run.exited(2);
    assert!(
        text.contains("index.jsonl is missing") || text.contains("is missing"),
        "{text}"
    );
    assert!(!t.path().join("feats/meta.json").exists());

    let dir = corpus(t.path(), 4);
    let parts: Vec<PathBuf> = (1..=2).map(|k| t.path().join(format!("p{k}"))).collect();
    for (k, p) in parts.iter().enumerate() {
        prepare(&dir, p, &["--part", &format!("{}/2", k + 1)]).exited(0);
    }
    std::fs::remove_file(parts[1].join("index.jsonl")).unwrap();
    let merged = t.path().join("merged");
    let run = run_limited(cmd(&[
        "merge",
        s(&parts[0]),
        s(&parts[1]),
        "--out",
        s(&merged),
    ]));
    assert!(run.exited(2).contains("index.jsonl"), "{}", run.text);
    assert!(!merged.join("meta.json").exists());
}

/// Flips the bits of one f32 in `store`'s first audio shard into a NaN.
fn plant_nan(store: &Path, sample: usize) {
    let shard = store.join("shards/00000.npy");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = 128 + sample * 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();
}

/// Case 11: a damaged audio row becomes an error row of extract (naming the shard and row),
/// not NaN features in a store that passes verify.
#[test]
fn a_damaged_audio_row_is_an_error_row_of_extract() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 3);
    plant_nan(&store, 100);
    let feats = t.path().join("feats");
    extract_fbank(&store, &feats, &[]).exited(0);
    let errors = jsonl(&feats.join("errors.jsonl"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("checksum") && reason.contains("00000.npy") && reason.contains("line 1"),
        "{reason}"
    );
    assert_eq!(jsonl(&feats.join("index.jsonl")).len(), 2);
    run_limited(cmd(&["verify", s(&feats)])).exited(0);
}

/// Case 11: prune refuses a damaged layer file instead of re-checksumming it into a pass.
#[test]
fn prune_refuses_a_damaged_store() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 2);
    let feats = t.path().join("feats");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/hubert_base");
    run_limited(cmd(&[
        "extract",
        "--quiet",
        "--data",
        s(&store),
        "--model",
        s(&model),
        "--out",
        s(&feats),
        "--dtype",
        "f32",
        "--layers",
        "0,1",
    ]))
    .exited(0);
    let layer = feats.join("shards/00000/layer_01.npy");
    let mut bytes = std::fs::read(&layer).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x40;
    std::fs::write(&layer, bytes).unwrap();
    let before = std::fs::read(feats.join("index.jsonl")).unwrap();
    let run = run_limited(cmd(&["prune", s(&feats), "--keep-layers", "0"]));
    let text = run.exited(2);
    assert!(text.contains("checksum"), "{text}");
    assert_eq!(std::fs::read(feats.join("index.jsonl")).unwrap(), before);
    assert_ne!(run_limited(cmd(&["verify", s(&feats)])).code, Some(0));
}

/// Case 12: --out equal to, inside or containing the input store is refused; nothing deleted.
#[test]
fn extract_never_writes_over_its_input() {
    let t = tempfile::tempdir().unwrap();
    let store = audio_store(t.path(), 2);
    let before = common::tree_bytes(&store);
    for out in [store.clone(), store.join("feats"), t.path().to_path_buf()] {
        let run = extract_fbank(&store, &out, &["--overwrite"]);
        let text = run.exited(2);
        assert!(text.contains("input store"), "{text}");
        assert_eq!(common::tree_bytes(&store), before);
    }
}

/// Case 13: names a store owns are never followed through a planted symlink.
#[test]
fn planted_symlinks_inside_a_store_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let out = t.path().join("audio");
    std::fs::create_dir_all(&out).unwrap();
    let victim = t.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("writer.lock")).unwrap();
    let run = prepare(&dir, &out, &[]);
    assert_ne!(run.code, Some(0));
    assert!(run.text.contains("symbolic link"), "{}", run.text);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    std::fs::remove_file(out.join("writer.lock")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("in_progress.json.tmp")).unwrap();
    prepare(&dir, &out, &[]).exited(0);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Case 15: a replaced input is noticed, and --overwrite always redoes the work.
#[test]
fn replaced_inputs_are_noticed_and_overwrite_redoes() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let out = t.path().join("audio");
    prepare(&dir, &out, &[]).exited(0);
    let first = std::fs::read(out.join("shards/00000.npy")).unwrap();
    // same name, same length, other content, another mtime
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(dir.join("u0.wav"), wav_bytes(16000, &tone(0.5, 7))).unwrap();
    let run = prepare(&dir, &out, &[]);
    assert!(run.exited(2).contains("different"), "{}", run.text);
    prepare(&dir, &out, &["--overwrite"]).exited(0);
    assert_ne!(std::fs::read(out.join("shards/00000.npy")).unwrap(), first);
    // --overwrite redoes even a complete store with identical inputs
    let run = prepare(&dir, &out, &["--overwrite"]);
    assert!(!run.exited(0).contains("already complete"));
}

/// Case 16: a speed copy that would take another file's id is refused before any work.
#[test]
fn speed_copies_never_duplicate_an_id() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 1);
    std::fs::copy(dir.join("u0.wav"), dir.join("sp0.9-u0.wav")).unwrap();
    let out = t.path().join("audio");
    let run = prepare(&dir, &out, &["--speed", "0.9,1.0"]);
    let text = run.exited(2);
    assert!(
        text.contains("sp0.9-u0") && text.contains("unique"),
        "{text}"
    );
    assert!(!out.join("meta.json").exists());
}

/// Case 17: a corrupt meta.json names the way out, and --overwrite takes it.
#[test]
fn a_corrupt_meta_json_does_not_block_overwrite() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let out = t.path().join("audio");
    prepare(&dir, &out, &[]).exited(0);
    std::fs::write(out.join("meta.json"), b"{\"kind\": \"aud").unwrap();
    let run = prepare(&dir, &out, &[]);
    assert!(run.exited(2).contains("--overwrite"), "{}", run.text);
    prepare(&dir, &out, &["--overwrite"]).exited(0);
    run_limited(cmd(&["verify", s(&out)])).exited(0);
}

/// Read-only finding: a symlinked shards/ is refused on resume, and nothing in its target goes.
#[test]
fn a_symlinked_shards_dir_is_refused_on_resume() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 2);
    let out = t.path().join("audio");
    prepare(&dir, &out, &[]).exited(0);
    // turn the complete store back into an interrupted run of the same fingerprint
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    for name in ["meta.json", "index.jsonl", "errors.jsonl"] {
        std::fs::remove_file(out.join(name)).unwrap();
    }
    let progress =
        serde_json::json!({"fingerprint": meta["fingerprint"], "options": meta["options"]});
    std::fs::write(out.join("in_progress.json"), progress.to_string()).unwrap();
    let elsewhere = t.path().join("elsewhere");
    std::fs::rename(out.join("shards"), &elsewhere).unwrap();
    std::fs::write(elsewhere.join("00001.npy.tmp"), b"keep me").unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("shards")).unwrap();
    let run = prepare(&dir, &out, &[]);
    assert!(run.exited(2).contains("symbolic link"), "{}", run.text);
    assert_eq!(
        std::fs::read(elsewhere.join("00001.npy.tmp")).unwrap(),
        b"keep me"
    );
    // --overwrite removes the link itself, never what it points to
    prepare(&dir, &out, &["--overwrite"]).exited(0);
    assert_eq!(
        std::fs::read(elsewhere.join("00001.npy.tmp")).unwrap(),
        b"keep me"
    );
    assert!(!std::fs::symlink_metadata(out.join("shards"))
        .unwrap()
        .is_symlink());
}

/// Read-only finding: the fingerprint holds canonical paths, so a run resumed (or rerun) from
/// another working directory is the same run.
#[test]
fn a_rerun_from_another_directory_is_the_same_run() {
    let t = tempfile::tempdir().unwrap();
    corpus(t.path(), 2);
    let sub = t.path().join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let first = run_limited({
        let mut c = cmd(&["prepare", "--quiet", "--input", "corpus", "--out", "audio"]);
        c.current_dir(t.path());
        c
    });
    first.exited(0);
    let again = run_limited({
        let mut c = cmd(&[
            "prepare",
            "--quiet",
            "--input",
            "../corpus",
            "--out",
            "../audio",
        ]);
        c.current_dir(&sub);
        c
    });
    assert!(
        again.exited(0).contains("already complete"),
        "{}",
        again.text
    );
}

/// A full disk (ENOSPC) stops the run with the file and the OS error; once there is room, the
/// same command resumes to the store an uninterrupted run writes. Needs `mount` (root); skipped
/// with a message where tmpfs cannot be mounted.
#[test]
fn a_full_disk_stops_the_run_and_the_same_command_resumes() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 24); // 24 x 0.5 s = 768 KB of float32
    let reference = t.path().join("reference");
    prepare(&dir, &reference, &["--shard-size", "128KiB"]).exited(0);
    let disk = t.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mount = |opts: &str| {
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", s(&disk)])
            .status()
            .is_ok_and(|st| st.success())
    };
    if !mount("size=400k") {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);
    let out = disk.join("audio");
    let run = prepare(&dir, &out, &["--shard-size", "128KiB"]);
    let text = run.exited(2);
    assert!(text.contains("No space left on device"), "{text}");
    assert!(
        out.join("shards/00000.npy").exists(),
        "a sealed shard stays"
    );
    let grown = Command::new("mount")
        .args(["-o", "remount,size=8m", s(&disk)])
        .status()
        .unwrap();
    assert!(grown.success());
    let again = prepare(&dir, &out, &["--shard-size", "128KiB"]);
    again.exited(0);
    let strip = |tree: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        tree.into_iter().filter(|(n, _)| n != "meta.json").collect()
    };
    assert_eq!(
        strip(common::tree_bytes(&out)),
        strip(common::tree_bytes(&reference))
    );
}

/// Case 11 for training: finetune checks each feature row the first time it reads it, and a
/// damaged one stops the run naming the shard and row instead of training on garbage.
#[test]
fn finetune_refuses_a_damaged_feature_row() {
    let t = tempfile::tempdir().unwrap();
    let dir = corpus(t.path(), 6);
    let manifest = t.path().join("list.jsonl");
    let lines: String = (0..6)
        .map(|i| {
            let path = dir.join(format!("u{i}.wav"));
            format!(
                "{{\"id\": \"u{i}\", \"path\": \"{}\", \"text\": \"a b\"}}\n",
                s(&path)
            )
        })
        .collect();
    std::fs::write(&manifest, lines).unwrap();
    let store = t.path().join("audio");
    prepare(&manifest, &store, &[]).exited(0);
    let feats = t.path().join("feats");
    extract_fbank(&store, &feats, &["--dtype", "f32"]).exited(0);
    let layer = feats.join("shards/00000/layer_00.npy");
    let mut bytes = std::fs::read(&layer).unwrap();
    let at = 128 + 4 * 80 * 3;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&layer, bytes).unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/conf/demo_fbank.toml");
    let text = std::fs::read_to_string(conf)
        .unwrap()
        .replace("max_epochs = 30", "max_epochs = 1");
    std::fs::write(t.path().join("conf.toml"), text).unwrap();
    let exp = t.path().join("exp");
    let mut c = cmd(&[
        "finetune",
        "--quiet",
        "--train",
        s(&feats),
        "--valid",
        s(&feats),
        "--config",
        s(&t.path().join("conf.toml")),
        "--out",
        s(&exp),
    ]);
    c.env("RAYON_NUM_THREADS", "2");
    let run = run_limited(c);
    let out = run.exited(2);
    assert!(
        out.contains("checksum") && out.contains("line 1") && out.contains("00000"),
        "{out}"
    );
}
