//! The probe's sample (`extract --fraction`) and collapsing while extracting
//! (`extract --collapse EXP`), as a user runs them, checked against an independent
//! recomputation: the SHA-256 rule recomputed here, and `collapse` of an all-layer store.
mod common;
use common::{bin, ok, s};
use sha2::Digest;
use speechcache::store::FeatureStore;
use std::path::{Path, PathBuf};
use std::process::Output;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hubert() -> String {
    s(&root().join("tests/fixtures/models/hubert_base")).to_string()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn run_env(args: &[&str], engine: &str) -> Output {
    bin()
        .args(args)
        .env("SPEECHCACHE_ENGINE", engine)
        .output()
        .unwrap()
}

/// The first `n` utterances of a demo manifest as an audio store.
fn audio_store(dir: &Path, manifest: &str, n: usize, name: &str) -> PathBuf {
    let demo = root().join("manifests/demo");
    let lines: Vec<String> = std::fs::read_to_string(demo.join(manifest))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["path"] = serde_json::json!(demo.join(v["path"].as_str().unwrap()));
            v.to_string()
        })
        .collect();
    let list = dir.join(format!("{name}.jsonl"));
    std::fs::write(&list, lines.join("\n") + "\n").unwrap();
    let store = dir.join(name);
    ok(&run(&[
        "prepare",
        "--quiet",
        "--input",
        s(&list),
        "--out",
        s(&store),
    ]));
    store
}

/// Each stored row: id and its values' bits (every layer).
fn rows(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let store = FeatureStore::open(dir).unwrap();
    (0..store.len())
        .map(|i| {
            let bits = store
                .layers()
                .iter()
                .flat_map(|&l| {
                    store
                        .to_array(i, l)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                })
                .collect();
            (store.rows()[i].id.clone(), bits)
        })
        .collect()
}

/// The README's rule, written out again: SHA-256 of the id, first 8 bytes big-endian < F·2^64.
fn expected_in(id: &str, f: f64) -> bool {
    let d = sha2::Sha256::digest(id.as_bytes());
    let h = u64::from_be_bytes(d[..8].try_into().unwrap());
    (h as u128) < (f * 2f64.powi(64)).ceil() as u128
}

#[test]
fn fraction_picks_the_same_ids_by_hash_and_parts_union_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path(), "train.jsonl", 120, "audio");
    let all_ids: Vec<String> = speechcache::store::AudioStore::open(&audio)
        .unwrap()
        .rows()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    let want: Vec<String> = all_ids
        .iter()
        .filter(|id| expected_in(id, 0.3))
        .cloned()
        .collect();
    let extract = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "extract",
            "--quiet",
            "--data",
            s(&audio),
            "--model",
            "fbank",
            "--out",
            s(out),
            "--fraction",
            "0.3",
            "--shard-size",
            "64KiB",
        ];
        a.extend_from_slice(extra);
        ok(&run(&a));
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    extract(&one, &[]);
    extract(&two, &["--jobs", "1"]);
    let (r1, r2) = (rows(&one), rows(&two));
    let ids: Vec<String> = r1.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ids, want, "the sampled ids are not the SHA-256 rule's");
    assert_eq!(r1, r2, "a second run sampled or computed differently");
    // roughly F of them (binomial: 120 · 0.3 = 36 ± 5)
    assert!(
        (20..=52).contains(&ids.len()),
        "{} of 120 sampled at 0.3",
        ids.len()
    );
    let meta = FeatureStore::open(&one).unwrap().meta().clone();
    assert_eq!(meta.options["fraction"], serde_json::json!(0.3));
    // three parts merged equal the unpartitioned run, rows and fingerprint
    let parts: Vec<PathBuf> = (1..=3).map(|k| tmp.path().join(format!("p{k}"))).collect();
    for (k, part) in parts.iter().enumerate() {
        extract(part, &["--part", &format!("{}/3", k + 1)]);
    }
    let merged = tmp.path().join("merged");
    let mut merge = vec!["merge"];
    merge.extend(parts.iter().map(|p| s(p)));
    merge.extend(["--out", s(&merged)]);
    ok(&run(&merge));
    assert_eq!(rows(&merged), r1);
    assert_eq!(
        FeatureStore::open(&merged).unwrap().meta().fingerprint,
        meta.fingerprint
    );
    // the model paths (CPU engine and tensor ops) sample the same ids
    let small = audio_store(tmp.path(), "valid.jsonl", 30, "small");
    let small_ids: Vec<String> = speechcache::store::AudioStore::open(&small)
        .unwrap()
        .rows()
        .iter()
        .map(|r| r.id.clone())
        .filter(|id| expected_in(id, 0.5))
        .collect();
    for engine in ["cpu-engine", "candle"] {
        let out = tmp.path().join(format!("h-{engine}"));
        ok(&run_env(
            &[
                "extract",
                "--quiet",
                "--data",
                s(&small),
                "--model",
                &hubert(),
                "--out",
                s(&out),
                "--fraction",
                "0.5",
                "--layers",
                "1",
            ],
            engine,
        ));
        let got: Vec<String> = rows(&out).into_iter().map(|r| r.0).collect();
        assert_eq!(got, small_ids, "{engine}");
    }
    for bad in ["0", "1.5", "-0.1", "x"] {
        let flag = format!("--fraction={bad}");
        let out = run(&[
            "extract",
            "--data",
            s(&audio),
            "--model",
            "fbank",
            "--out",
            s(&tmp.path().join("bad")),
            &flag,
        ]);
        assert!(!out.status.success(), "--fraction {bad} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--fraction"));
    }
}

const CONFIG: &str = r#"
[model.featurizer]
normalize = "NORMALIZE"

[model.encoder]
output_size = 32
attention_heads = 2
linear_units = 64
num_blocks = 1
cnn_module_kernel = 5
input_layer = "conv2d2"

[optim]
optimizer = "adamw"
lr = 0.004
warmup_steps = 10

[train]
max_epochs = 1
batch_frames = 600
log_every = 1000
"#;

fn finetune(train: &Path, valid: &Path, conf: &Path, normalize: &str, out: &Path) {
    std::fs::write(conf, CONFIG.replace("NORMALIZE", normalize)).unwrap();
    ok(&run(&[
        "finetune",
        "--quiet",
        "--train",
        s(train),
        "--valid",
        s(valid),
        "--config",
        s(conf),
        "--out",
        s(out),
    ]));
}

/// `extract --collapse EXP` equals `collapse --exp EXP` of the all-layer extract of the same
/// audio (f32, both executors), trains, and refuses another model's experiment.
#[test]
fn extract_collapse_equals_collapse_of_the_all_layer_store() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let train_audio = audio_store(t, "train.jsonl", 24, "train-audio");
    let valid_audio = audio_store(t, "valid.jsonl", 8, "valid-audio");
    let all = |audio: &Path, out: &Path| {
        ok(&run(&[
            "extract",
            "--quiet",
            "--data",
            s(audio),
            "--model",
            &hubert(),
            "--out",
            s(out),
            "--dtype",
            "f32",
        ]));
    };
    let (train, valid) = (t.join("train"), t.join("valid"));
    all(&train_audio, &train);
    all(&valid_audio, &valid);
    assert!(FeatureStore::open(&train).unwrap().layers().len() >= 3);
    let exp = t.join("exp");
    finetune(&train, &valid, &t.join("conf.toml"), "global", &exp);
    let by_collapse = t.join("valid-collapsed");
    ok(&run(&[
        "collapse",
        "--quiet",
        s(&valid),
        "--exp",
        s(&exp),
        "--out",
        s(&by_collapse),
    ]));
    let want = FeatureStore::open(&by_collapse).unwrap();
    for engine in ["cpu-engine", "candle"] {
        let out = t.join(format!("valid-{engine}"));
        ok(&run_env(
            &[
                "extract",
                "--quiet",
                "--data",
                s(&valid_audio),
                "--model",
                &hubert(),
                "--out",
                s(&out),
                "--dtype",
                "f32",
                "--collapse",
                s(&exp),
            ],
            engine,
        ));
        let got = FeatureStore::open(&out).unwrap();
        assert_eq!(got.layers(), &[0]);
        assert_eq!(got.len(), want.len());
        assert!(got.meta().options["collapse"]["layers"].is_array());
        let mut worst = 0f64;
        for i in 0..want.len() {
            assert_eq!(got.rows()[i].id, want.rows()[i].id);
            let (g, w) = (got.to_array(i, 0).unwrap(), want.to_array(i, 0).unwrap());
            assert_eq!(g.dim(), w.dim());
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
            for (a, b) in g.iter().zip(w.iter()) {
                worst = worst.max((*a as f64 - *b as f64).abs() / scale);
            }
        }
        assert!(
            worst < 1e-3,
            "{engine}: extract --collapse differs by {worst:e}"
        );
    }
    // a one-layer experiment trains on the collapsed extract
    let train_c = t.join("train-c");
    ok(&run(&[
        "extract",
        "--quiet",
        "--data",
        s(&train_audio),
        "--model",
        &hubert(),
        "--out",
        s(&train_c),
        "--collapse",
        s(&exp),
    ]));
    finetune(
        &train_c,
        &t.join("valid-cpu-engine"),
        &t.join("conf-c.toml"),
        "none",
        &t.join("exp-c"),
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("exp-c/experiment.json")).unwrap())
            .unwrap();
    assert_eq!(meta["layers"], serde_json::json!([0]));
    // another model, or layers the extract does not compute: one clear error line
    let refused_out = t.join("refused");
    let refused = |extra: &[&str], model: &str, needle: &str| {
        let mut a = vec![
            "extract",
            "--data",
            s(&valid_audio),
            "--model",
            model,
            "--out",
            s(&refused_out),
            "--collapse",
            s(&exp),
        ];
        a.extend_from_slice(extra);
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert_eq!(
            err.trim()
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1,
            "{err}"
        );
    };
    let other = root().join("tests/fixtures/models/w2v_base");
    refused(&[], s(&other), "trained on features of another model");
    refused(&["--layers", "0"], &hubert(), "outside the --layers");
}
