//! `speechcache extract` and `prune` as a user runs them, checked against the model run on each
//! utterance alone (the model itself is checked against transformers in tests/models.rs) and
//! against the fbank computed directly.
mod common;
use candle_core::{DType, Device, Tensor};
use common::{assert_same_tree, bin, noise_wav, ok, s};
use speechcache::device::Backend;
use speechcache::models::checkpoint::load_checkpoint;
use speechcache::models::fbank::{Fbank, FbankOptions};
use speechcache::models::ssl::{normalize_waveform, SslEncoder};
use speechcache::store::{AudioStore, FeatureStore};
use std::path::{Path, PathBuf};
use std::process::Output;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An audio store of a few demo utterances of different lengths (plus one 3 ms clip).
fn audio_store(dir: &Path) -> PathBuf {
    let demo = root().join("manifests/demo");
    let lines: Vec<String> = std::fs::read_to_string(demo.join("valid.jsonl"))
        .unwrap()
        .lines()
        .take(7)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let path = demo.join(v["path"].as_str().unwrap());
            v["path"] = serde_json::json!(path);
            v.to_string()
        })
        .collect();
    let manifest = dir.join("utts.jsonl");
    let clip = format!(
        "{{\"id\": \"clip\", \"path\": \"{}\", \"start\": 0.0, \"duration\": 0.003}}",
        s(&root().join("tests/fixtures/audio/speech_16k.wav"))
    );
    std::fs::write(&manifest, format!("{}\n{clip}\n", lines.join("\n"))).unwrap();
    let store = dir.join("audio");
    ok(&bin()
        .args([
            "prepare",
            "--quiet",
            "--input",
            s(&manifest),
            "--out",
            s(&store),
        ])
        .output()
        .unwrap());
    store
}

fn extract(args: &[&str]) -> Output {
    bin()
        .arg("extract")
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap()
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

/// Hidden states of utterance `samples` run alone through the model.
fn alone(model: &SslEncoder, samples: &[f32], normalize: bool) -> Vec<Vec<f32>> {
    let mut wave = samples.to_vec();
    if normalize {
        normalize_waveform(&mut wave);
    }
    let n = wave.len();
    let input = Tensor::from_vec(wave, (1, n), &Device::Cpu).unwrap();
    let (hidden, frames) = model
        .forward(&input, &[n], model.config().num_hidden_layers)
        .unwrap();
    hidden
        .iter()
        .map(|h| {
            let h = h.squeeze(0).unwrap().narrow(0, 0, frames[0]).unwrap();
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn model_features_equal_each_utterance_run_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    for variant in ["w2v_base", "hubert_large", "wavlm_base", "d2v_odd"] {
        let out = tmp.path().join(format!("feats_{variant}"));
        let text = ok(&extract(&[
            "--data",
            s(&audio),
            "--model",
            s(&model_dir(variant)),
            "--out",
            s(&out),
            "--dtype",
            "f32",
            "--batch-seconds",
            "6",
        ]));
        let feats = FeatureStore::open(&out).unwrap();
        let audio_store = AudioStore::open(&audio).unwrap();
        let ckpt = load_checkpoint(&model_dir(variant), &Device::Cpu, DType::F32).unwrap();
        // the executor extract runs (the same choice from the environment)
        let backend = Backend::new(Device::Cpu, DType::F32).unwrap();
        let model = SslEncoder::from_checkpoint(&ckpt, &backend).unwrap();
        let all: Vec<usize> = (0..=ckpt.config.num_hidden_layers).collect();
        assert_eq!(feats.layers(), &all[..]);
        // the 0.01 s clip gives no frame: reported, not fatal, and the order is the audio store's
        assert_eq!(feats.len(), audio_store.len() - 1, "{text}");
        let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
        assert!(
            errors.contains("clip") && errors.contains("too short"),
            "{errors}"
        );
        for (i, row) in feats.rows().iter().enumerate() {
            assert_eq!(row.id, audio_store.rows()[i].id);
            assert_eq!(row.text, audio_store.rows()[i].text);
            let want = alone(
                &model,
                audio_store.samples(i),
                ckpt.preprocessor.do_normalize,
            );
            for &layer in &all {
                let got = feats.to_array(i, layer).unwrap();
                let got = got.as_slice().unwrap();
                assert_eq!(
                    got.len(),
                    want[layer].len(),
                    "{variant} utt {i} layer {layer}"
                );
                let diff = got
                    .iter()
                    .zip(&want[layer])
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-4, "{variant} utt {i} layer {layer}: {diff}");
            }
        }
    }
    // finetune and decode train on the WavLM and data2vec-audio features unchanged: the
    // learned weighted sum spans every stored state
    let conf = std::fs::read_to_string(root().join("manifests/conf/ssl_base_conformer.toml"))
        .unwrap()
        .replace("num_blocks = 12", "num_blocks = 2")
        .replace("output_size = 256", "output_size = 64")
        .replace("linear_units = 1024", "linear_units = 128")
        .replace("freq_mask_width = 27", "freq_mask_width = 4");
    let conf_path = tmp.path().join("conf.toml");
    std::fs::write(&conf_path, conf).unwrap();
    for variant in ["wavlm_base", "d2v_odd"] {
        let feats = tmp.path().join(format!("feats_{variant}"));
        let exp = tmp.path().join(format!("exp_{variant}"));
        ok(&bin()
            .args(["finetune", "--train", s(&feats), "--valid", s(&feats)])
            .args([
                "--config",
                s(&conf_path),
                "--out",
                s(&exp),
                "--max-steps",
                "2",
            ])
            .output()
            .unwrap());
        let weights: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exp.join("layer_weights.json")).unwrap())
                .unwrap();
        let layers = FeatureStore::open(&feats).unwrap().layers().len();
        assert_eq!(
            weights["layers"].as_array().unwrap().len(),
            layers,
            "{variant}"
        );
        let decoded = ok(&bin()
            .args(["decode", "--exp", s(&exp), "--data", s(&feats)])
            .output()
            .unwrap());
        assert!(
            decoded.contains("CER") || decoded.contains("cer"),
            "{variant}: {decoded}"
        );
    }
}

#[test]
fn layer_selection_dtypes_and_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    let model = model_dir("w2v_large");
    let full = tmp.path().join("full");
    ok(&extract(&[
        "--data",
        s(&audio),
        "--model",
        s(&model),
        "--out",
        s(&full),
        "--dtype",
        "f32",
    ]));
    let full = FeatureStore::open(&full).unwrap();
    for (dtype, rel_tol) in [("f16", 1e-3f32), ("bf16", 8e-3), ("int8", 1.0 / 127.0)] {
        let out = tmp.path().join(format!("sel_{dtype}"));
        ok(&extract(&[
            "--data",
            s(&audio),
            "--model",
            s(&model),
            "--out",
            s(&out),
            "--dtype",
            dtype,
            "--layers",
            "0,1-2",
        ]));
        let sel = FeatureStore::open(&out).unwrap();
        assert_eq!(sel.layers(), &[0, 1, 2]);
        for i in 0..sel.len() {
            for layer in [0, 1, 2] {
                let a = sel.to_array(i, layer).unwrap();
                let b = full.to_array(i, layer).unwrap();
                for (ra, rb) in a.rows().into_iter().zip(b.rows()) {
                    let peak = rb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (x, y) in ra.iter().zip(rb.iter()) {
                        let bound = if dtype == "int8" {
                            peak * rel_tol * 0.5 + 1e-6
                        } else {
                            y.abs() * rel_tol + 1e-6
                        };
                        assert!(
                            (x - y).abs() <= bound,
                            "{dtype} utt {i} layer {layer}: {x} vs {y}"
                        );
                    }
                }
            }
        }
        // prune drops files and keeps the rest intact and verifiable
        ok(&bin()
            .args(["prune", s(&out), "--keep-layers", "1-2"])
            .output()
            .unwrap());
        assert!(!out.join("shards/00000/layer_00.npy").exists());
        let pruned = FeatureStore::open(&out).unwrap();
        assert_eq!(pruned.layers(), &[1, 2]);
        assert_eq!(pruned.to_array(1, 2).unwrap(), sel.to_array(1, 2).unwrap());
        assert!(ok(&bin().args(["verify", s(&out)]).output().unwrap()).contains("OK"));
    }
}

#[test]
fn fbank_store_equals_the_fbank_of_each_utterance() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    let out = tmp.path().join("fbank");
    ok(&extract(&[
        "--data",
        s(&audio),
        "--model",
        "fbank",
        "--out",
        s(&out),
        "--dtype",
        "f32",
        "--num-mel-bins",
        "40",
    ]));
    let feats = FeatureStore::open(&out).unwrap();
    assert_eq!((feats.dim(), feats.frame_rate()), (40, 100.0));
    let audio = AudioStore::open(&audio).unwrap();
    let fbank = Fbank::new(FbankOptions {
        num_mel_bins: 40,
        ..Default::default()
    })
    .unwrap();
    for i in 0..feats.len() {
        let want = fbank.compute_from_unit_scale(audio.samples(i));
        assert_eq!(feats.to_array(i, 0).unwrap(), want);
    }
    let (mean, var) = feats.stats(0).unwrap();
    assert_eq!(mean.len(), 40);
    assert!(var.iter().all(|v| *v > 0.0));
}

#[test]
fn killed_extract_resumes_to_the_same_bytes_and_refuses_other_models() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = audio_store(tmp.path());
    let model = model_dir("hubert_base");
    let common = [
        "--dtype",
        "f16",
        "--shard-size",
        "20KiB",
        "--batch-seconds",
        "2",
    ];
    // the same command into `out`, as a user would type it again after a kill
    let args = |out: &Path| -> Vec<String> {
        ["--data", s(&audio), "--model", s(&model), "--out", s(out)]
            .iter()
            .chain(common.iter())
            .map(|a| a.to_string())
            .collect()
    };
    let full = tmp.path().join("full");
    ok(&bin()
        .arg("extract")
        .arg("--quiet")
        .args(args(&full))
        .output()
        .unwrap());
    let killed = tmp.path().join("killed");
    let mut child = bin()
        .arg("extract")
        .arg("--quiet")
        .args(args(&killed))
        .spawn()
        .unwrap();
    let seal = killed.join("shards/00001.seal.json");
    let started = std::time::Instant::now();
    while !seal.exists() && started.elapsed().as_secs() < 60 && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&bin()
        .arg("extract")
        .arg("--quiet")
        .args(args(&killed))
        .output()
        .unwrap());
    assert_same_tree(&killed, &full);
    assert!(
        full.join("shards/00002").exists(),
        "several shards were written"
    );
    // another model into the same store is refused
    let other = extract(
        &[
            &[
                "--data",
                s(&audio),
                "--model",
                s(&model_dir("w2v_base")),
                "--out",
                s(&full),
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("different"));
    // an unknown model path is a clear error
    let missing = extract(&[
        "--data",
        s(&audio),
        "--model",
        "/no/model",
        "--out",
        s(&tmp.path().join("m")),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/model"));
    // too-long utterances are reported, not fatal
    let capped = tmp.path().join("capped");
    ok(&extract(&[
        "--data",
        s(&audio),
        "--model",
        "fbank",
        "--out",
        s(&capped),
        "--max-seconds-per-utterance",
        "1.5",
    ]));
    let errors = std::fs::read_to_string(capped.join("errors.jsonl")).unwrap();
    assert!(
        errors.contains("longer than --max-seconds-per-utterance"),
        "{errors}"
    );
}

#[test]
fn fbank_follows_the_audio_store_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("one.jsonl");
    let wav = root().join("tests/fixtures/audio/speech_16k.wav");
    std::fs::write(
        &manifest,
        format!("{{\"id\": \"u\", \"path\": \"{}\"}}\n", s(&wav)),
    )
    .unwrap();
    let audio = tmp.path().join("audio8k");
    ok(&bin()
        .args([
            "prepare",
            "--quiet",
            "--input",
            s(&manifest),
            "--out",
            s(&audio),
            "--sample-rate",
            "8000",
        ])
        .output()
        .unwrap());
    let out = tmp.path().join("fbank8k");
    ok(&extract(&[
        "--data",
        s(&audio),
        "--model",
        "fbank",
        "--out",
        s(&out),
        "--dtype",
        "f32",
    ]));
    let feats = FeatureStore::open(&out).unwrap();
    let audio = AudioStore::open(&audio).unwrap();
    let fbank = Fbank::new(FbankOptions {
        sample_frequency: 8000.0,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        feats.to_array(0, 0).unwrap(),
        fbank.compute_from_unit_scale(audio.samples(0))
    );
}

/// The hubert_base fixture's shapes with a 20x conv stack (800 frames/s) and random weights.
fn fast_frame_model(dir: &Path) -> PathBuf {
    use speechcache::models::ssl::config::{expected_tensors, Wav2Vec2Config};
    let model = dir.join("model-800fps");
    std::fs::create_dir_all(&model).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir("hubert_base").join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["conv_dim"] = serde_json::json!([16, 16, 24]);
    cfg["conv_kernel"] = serde_json::json!([10, 3, 3]);
    cfg["conv_stride"] = serde_json::json!([5, 2, 2]);
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let parsed = Wav2Vec2Config::from_file(&model.join("config.json")).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = expected_tensors(&parsed)
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap();
            (format!("hubert.{name}"), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, model.join("model.safetensors")).unwrap();
    model
}

/// 16 s utterances through a model of 800 frames/s: 12,800 frames, whose full attention
/// scores (4 heads) would take 2.6 GB per utterance and 5 GB per batch of two. Under a 2 GiB
/// address-space limit, both the CPU engine and the tensor-op path (blocked attention, batches
/// cut by memory) finish, with the same rows.
#[test]
fn long_utterances_at_a_high_frame_rate_stay_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let wavs = tmp.path().join("wavs");
    std::fs::create_dir_all(&wavs).unwrap();
    for (i, secs) in [16.0, 15.5, 2.0].iter().enumerate() {
        noise_wav(&wavs.join(format!("u{i}.wav")), *secs, i as u32 + 1);
    }
    let audio = tmp.path().join("audio");
    ok(&bin()
        .args([
            "prepare",
            "--quiet",
            "--input",
            s(&wavs),
            "--out",
            s(&audio),
        ])
        .output()
        .unwrap());
    let model = fast_frame_model(tmp.path());
    let mut frames = Vec::new();
    for engine in ["cpu", "candle"] {
        let out = tmp.path().join(format!("features-{engine}"));
        let cmd = format!(
            "ulimit -v 2097152; exec '{}' extract --quiet --data '{}' --model '{}' --out '{}' --dtype f32",
            env!("CARGO_BIN_EXE_speechcache"),
            audio.display(),
            model.display(),
            out.display()
        );
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &cmd]);
        if engine == "candle" {
            c.env("SPEECHCACHE_ENGINE", "candle");
        }
        ok(&c.output().unwrap());
        let store = FeatureStore::open(&out).unwrap();
        assert_eq!(store.len(), 3, "{engine}");
        let lens: Vec<usize> = (0..3)
            .map(|i| store.to_array(i, 2).unwrap().nrows())
            .collect();
        assert_eq!(lens[0], 12_799, "{engine}: 16 s at 800 frames/s");
        frames.push((lens, store.to_array(1, 2).unwrap()));
    }
    assert_eq!(frames[0].0, frames[1].0);
    let d = (&frames[0].1 - &frames[1].1)
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(d < 1e-3, "engine and tensor path differ by {d}");
}
