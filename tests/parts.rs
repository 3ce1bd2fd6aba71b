//! Partitioned runs (`--part K/N` + `merge`), resumes and the one-writer lock, as a user runs
//! them, checked against an independent single-process run of the same command.
mod common;
use common::{assert_same_tree, bin, ok, s};
use speechcache::store::{AudioStore, FeatureStore};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo(name: &str) -> String {
    s(&root().join("manifests/demo").join(name)).to_string()
}

fn hubert() -> String {
    s(&root().join("tests/fixtures/models/hubert_base")).to_string()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn run_with(args: &[String], engine: Option<&str>) -> Output {
    let mut cmd = bin();
    cmd.args(args);
    if let Some(engine) = engine {
        cmd.env("SPEECHCACHE_ENGINE", engine);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a refusal: non-zero exit and one `error:` line containing `needle`.
fn refused(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a refusal, got success: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// Every audio row (id, text, samples) in store order.
fn audio_rows(dir: &Path) -> Vec<(String, Option<String>, Vec<f32>)> {
    let store = AudioStore::open(dir).unwrap();
    store
        .iter()
        .map(|(r, x)| (r.id.clone(), r.text.clone(), x.to_vec()))
        .collect()
}

/// Every feature row: id, checksum of the stored bytes, and each layer as stored (widened).
fn feature_rows(dir: &Path) -> Vec<(String, String, Vec<Vec<u32>>)> {
    let store = FeatureStore::open(dir).unwrap();
    (0..store.len())
        .map(|i| {
            let layers = store
                .layers()
                .iter()
                .map(|&l| {
                    let a = store.to_array(i, l).unwrap();
                    a.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            let row = &store.rows()[i];
            (row.id.clone(), row.checksum.clone(), layers)
        })
        .collect()
}

fn errors(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("errors.jsonl")).unwrap()
}

/// Waits until `path` exists (or the child ended); then kills the child.
fn kill_when(child: &mut Child, path: &Path) -> bool {
    let started = Instant::now();
    while !path.exists() && started.elapsed() < Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// A manifest of the demo train set with one missing file, so errors.jsonl has a row.
fn train_manifest_with_a_failure(dir: &Path) -> PathBuf {
    let demo_dir = root().join("manifests/demo");
    let mut lines: Vec<String> = std::fs::read_to_string(demo_dir.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["path"] = serde_json::json!(demo_dir.join(v["path"].as_str().unwrap()));
            v.to_string()
        })
        .collect();
    lines.insert(
        50,
        r#"{"id": "gone", "path": "/no/such/file.wav", "text": "x", "duration": 1.0}"#.into(),
    );
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn prepare_parts_merge_to_the_rows_of_one_run_and_bad_sets_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = train_manifest_with_a_failure(tmp.path());
    let common = |out: &Path| -> Vec<String> {
        [
            "prepare",
            "--quiet",
            "--input",
            s(&manifest),
            "--out",
            s(out),
            "--shard-size",
            "300KiB",
            "--speed",
            "0.9,1.0,1.1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    ok(&run_with(&common(&full), None));
    let parts: Vec<PathBuf> = (1..=3).map(|k| tmp.path().join(format!("p{k}"))).collect();
    for (k, part) in parts.iter().enumerate() {
        let mut args = common(part);
        args.extend(["--part".into(), format!("{}/3", k + 1)]);
        ok(&run_with(&args, None));
    }
    // a killed part is resumed by the same command
    let killed = tmp.path().join("p2-killed");
    let mut killed_args = common(&killed);
    killed_args.extend(["--part".into(), "2/3".into()]);
    let mut child = bin().args(&killed_args).spawn().unwrap();
    assert!(kill_when(
        &mut child,
        &killed.join("shards/00001.npy.seal.json")
    ));
    // a part still in progress cannot be merged
    let merged = tmp.path().join("merged");
    let out = run(&[
        "merge",
        s(&parts[0]),
        s(&killed),
        s(&parts[2]),
        "--out",
        s(&merged),
    ]);
    refused(&out, "has not finished");
    assert!(!merged.exists(), "a refused merge writes nothing");
    ok(&run_with(&killed_args, None));
    assert_same_tree(&killed, &parts[1]);

    let sizes: Vec<usize> = parts.iter().map(|p| audio_rows(p).len()).collect();
    assert!(sizes.iter().all(|&n| n > 60), "balanced parts: {sizes:?}");
    // missing part, foreign part, bad K/N: one line each, nothing written
    refused(
        &run(&["merge", s(&parts[0]), s(&parts[2]), "--out", s(&merged)]),
        "part 2/3 missing",
    );
    let foreign = tmp.path().join("foreign");
    let mut args = common(&foreign);
    args.extend([
        "--part".into(),
        "2/3".into(),
        "--sample-rate".into(),
        "8000".into(),
    ]);
    ok(&run_with(&args, None));
    refused(
        &run(&[
            "merge",
            s(&parts[0]),
            s(&foreign),
            s(&parts[2]),
            "--out",
            s(&merged),
        ]),
        "different input or options",
    );
    refused(
        &run(&["merge", s(&parts[0]), s(&full), "--out", s(&merged)]),
        "not a part store",
    );
    for bad in ["0/0", "4/3", "0/3"] {
        let mut args = common(&tmp.path().join("bad"));
        args.extend(["--part".into(), bad.into()]);
        let out = run_with(&args, None);
        assert!(!out.status.success(), "--part {bad} accepted");
        assert!(stderr(&out).contains("--part"), "{}", stderr(&out));
        assert!(!tmp.path().join("bad").exists());
    }
    assert!(!merged.exists(), "refused merges write nothing");

    let out = ok(&run(&[
        "merge",
        s(&parts[2]),
        s(&parts[0]),
        s(&parts[1]),
        "--out",
        s(&merged),
    ]));
    assert!(out.contains("hard-linked"), "{out}");
    assert_eq!(audio_rows(&merged), audio_rows(&full));
    assert_eq!(errors(&merged), errors(&full));
    assert!(errors(&full).contains("/no/such/file.wav"));
    let meta = |d: &Path| AudioStore::open(d).unwrap().meta().clone();
    let (m, f) = (meta(&merged), meta(&full));
    assert_eq!(
        m.fingerprint, f.fingerprint,
        "the merged store is the whole run's"
    );
    assert_eq!(
        (
            m.totals.items,
            m.totals.failed,
            m.totals.length,
            m.totals.bytes
        ),
        (
            f.totals.items,
            f.totals.failed,
            f.totals.length,
            f.totals.bytes
        )
    );
    ok(&run(&["verify", s(&merged)]));
    // the same command over a merged store finds it complete
    assert!(ok(&run_with(&common(&merged), None)).contains("already complete"));
    // and a merge repeated is a no-op
    assert!(ok(&run(&[
        "merge",
        s(&parts[0]),
        s(&parts[1]),
        s(&parts[2]),
        "--out",
        s(&merged)
    ]))
    .contains("already complete"));
}

/// The demo train set (120 utterances, 4 minutes: 8 batch windows) as an audio store.
fn train_audio(dir: &Path) -> PathBuf {
    let audio = dir.join("audio");
    ok(&run(&[
        "prepare",
        "--quiet",
        "--input",
        &demo("train.jsonl"),
        "--out",
        s(&audio),
    ]));
    audio
}

/// Extract parts merged, and a run killed at several points and resumed, equal one
/// uninterrupted run byte for byte, on the batched tensor path and on the CPU engine.
#[test]
fn extract_parts_and_resumes_give_the_bytes_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = train_audio(tmp.path());
    for (engine, dtype) in [("candle", "f32"), ("cpu-engine", "f32")] {
        let name = format!("{engine}-{dtype}");
        let args = |out: &Path, extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = [
                "extract",
                "--quiet",
                "--data",
                s(&audio),
                "--model",
                &hubert(),
                "--out",
                s(out),
                "--dtype",
                dtype,
                "--shard-size",
                "48KiB",
                "--batch-seconds",
                "3",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            a.extend(extra.iter().map(|x| x.to_string()));
            a
        };
        let env = Some(engine);
        let full = tmp.path().join(format!("{name}-full"));
        ok(&run_with(&args(&full, &[]), env));
        // killed after the 3rd, 20th and 50th sealed shard, resumed each time
        let resumed = tmp.path().join(format!("{name}-resumed"));
        for seal in [3, 20, 50] {
            let marker = resumed.join(format!("shards/{seal:05}.seal.json"));
            let mut cmd = bin();
            cmd.args(args(&resumed, &[]))
                .env("SPEECHCACHE_ENGINE", engine);
            let mut child = cmd.spawn().unwrap();
            kill_when(&mut child, &marker);
        }
        ok(&run_with(&args(&resumed, &[]), env));
        assert_same_tree(&resumed, &full);
        // three parts, the middle one killed once, merged
        let parts: Vec<PathBuf> = (1..=3)
            .map(|k| tmp.path().join(format!("{name}-p{k}")))
            .collect();
        for (k, part) in parts.iter().enumerate() {
            let spec = format!("{}/3", k + 1);
            if k == 1 {
                let mut cmd = bin();
                cmd.args(args(part, &["--part", &spec]))
                    .env("SPEECHCACHE_ENGINE", engine);
                let mut child = cmd.spawn().unwrap();
                kill_when(&mut child, &part.join("shards/00002.seal.json"));
            }
            ok(&run_with(&args(part, &["--part", &spec]), env));
        }
        for part in &parts {
            let rows = FeatureStore::open(part).unwrap().len();
            assert!(rows > 20, "{name}: {} has {rows} rows", part.display());
        }
        let merged = tmp.path().join(format!("{name}-merged"));
        let mut merge: Vec<String> = vec!["merge".into()];
        merge.extend(parts.iter().map(|p| s(p).to_string()));
        merge.extend(["--out".into(), s(&merged).into()]);
        ok(&run_with(&merge, None));
        let (m, f) = (feature_rows(&merged), feature_rows(&full));
        assert_eq!(m.len(), f.len(), "{name}");
        for (a, b) in m.iter().zip(&f) {
            assert!(a == b, "{name}: row {} differs from the single run", a.0);
        }
        let (ms, fs) = (
            FeatureStore::open(&merged).unwrap(),
            FeatureStore::open(&full).unwrap(),
        );
        assert_eq!(ms.meta().fingerprint, fs.meta().fingerprint, "{name}");
        for &layer in fs.layers() {
            let ((mm, mv), (fm, fv)) = (ms.stats(layer).unwrap(), fs.stats(layer).unwrap());
            for (a, b) in mm.iter().chain(&mv).zip(fm.iter().chain(&fv)) {
                assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "{name} stats {a} {b}"
                );
            }
        }
    }
}

/// WavLM and data2vec-audio stores: parts merged equal one run byte for byte, on both
/// executors, with a layer selection and f16.
#[test]
fn wavlm_and_data2vec_audio_parts_merge_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = train_audio(tmp.path());
    for (engine, variant) in [("candle", "wavlm_base"), ("cpu-engine", "d2v_odd")] {
        let name = format!("{engine}-{variant}");
        let model = root().join("tests/fixtures/models").join(variant);
        let args = |out: &Path, extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = [
                "extract",
                "--quiet",
                "--data",
                s(&audio),
                "--model",
                s(&model),
                "--out",
                s(out),
                "--dtype",
                "f16",
                "--layers",
                "0,2",
                "--shard-size",
                "48KiB",
                "--batch-seconds",
                "3",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            a.extend(extra.iter().map(|x| x.to_string()));
            a
        };
        let env = Some(engine);
        let full = tmp.path().join(format!("{name}-full"));
        ok(&run_with(&args(&full, &[]), env));
        let parts: Vec<PathBuf> = (1..=2)
            .map(|k| tmp.path().join(format!("{name}-p{k}")))
            .collect();
        for (k, part) in parts.iter().enumerate() {
            let spec = format!("{}/2", k + 1);
            ok(&run_with(&args(part, &["--part", &spec]), env));
        }
        let merged = tmp.path().join(format!("{name}-merged"));
        let mut merge: Vec<String> = vec!["merge".into()];
        merge.extend(parts.iter().map(|p| s(p).to_string()));
        merge.extend(["--out".into(), s(&merged).into()]);
        ok(&run_with(&merge, None));
        let (m, f) = (feature_rows(&merged), feature_rows(&full));
        assert!(f.len() > 20, "{name}: {} rows", f.len());
        assert_eq!(m.len(), f.len(), "{name}");
        for (a, b) in m.iter().zip(&f) {
            assert!(a == b, "{name}: row {} differs from the single run", a.0);
        }
        assert_eq!(FeatureStore::open(&full).unwrap().layers(), &[0, 2]);
    }
}

/// A second writer on a store that is being written is refused at once, naming the holder;
/// readers refuse it too; the first writer finishes unharmed.
#[test]
fn a_second_writer_is_refused_while_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = tmp.path().join("audio");
    let train = [
        "prepare",
        "--quiet",
        "--input",
        &demo("train.jsonl"),
        "--out",
        s(&audio),
        "--speed",
        "0.9,1.0,1.1",
    ];
    ok(&run(&train));
    let features = tmp.path().join("features");
    let extract = [
        "extract",
        "--quiet",
        "--data",
        s(&audio),
        "--model",
        &hubert(),
        "--out",
        s(&features),
        "--dtype",
        "f32",
    ];
    let mut first = bin()
        .args(extract)
        .env("SPEECHCACHE_ENGINE", "candle")
        .spawn()
        .unwrap();
    let lock = features.join("writer.lock");
    let started = Instant::now();
    while !lock.exists() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let second = bin()
        .args(extract)
        .env("SPEECHCACHE_ENGINE", "candle")
        .output()
        .unwrap();
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first writer finished too early for this test"
    );
    refused(&second, "is being written by speechcache extract (pid ");
    assert!(stderr(&second).contains(&format!("pid {}", first.id())));
    assert_eq!(stderr(&second).lines().count(), 1, "{}", stderr(&second));
    assert!(t.elapsed() < Duration::from_secs(10), "refused at once");
    refused(&run(&["info", s(&features)]), "is being written");
    assert!(first.wait().unwrap().success(), "the first writer survived");
    assert!(!lock.exists(), "the lock file goes with the writer");
    let one = FeatureStore::open(&features).unwrap().len();
    assert_eq!(one, AudioStore::open(&audio).unwrap().len());

    // prepare: a second writer on the same --out while the first runs
    let again = tmp.path().join("audio2");
    let slow = [
        "prepare",
        "--quiet",
        "--input",
        &demo("train.jsonl"),
        "--out",
        s(&again),
        "--speed",
        "0.9,1.0,1.1",
        "--jobs",
        "1",
        "--shard-size",
        "100KiB",
    ];
    let mut first = bin().args(slow).spawn().unwrap();
    while !again.join("writer.lock").exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = run(&slow);
    let first_running = first.try_wait().unwrap().is_none();
    if first_running {
        refused(&second, "is being written by speechcache prepare (pid ");
        // a kill -9 leaves no stale lock: the same command resumes
        first.kill().unwrap();
        first.wait().unwrap();
        ok(&run(&slow));
    } else {
        // the first finished before the second started (a fast machine): nothing to refuse
        first.wait().unwrap();
    }
    assert_eq!(audio_rows(&again), audio_rows(&audio));
}
