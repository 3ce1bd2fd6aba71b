//! Checkpoint loading: every format gives the same canonical tensors as torch computed them
//! (tests/fixtures/gen_checkpoints.py), configs from fairseq checkpoints equal the transformers
//! config.json, and broken checkpoints fail naming what is wrong.
mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use sha2::{Digest, Sha256};
use speechcache::models::checkpoint::{
    load_checkpoint, load_checkpoint_then, load_checkpoint_with_config, CheckpointError,
    LoadedCheckpoint,
};
use speechcache::models::wav2vec2::{LinearLayout, Wav2Vec2Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
}

fn load(p: &Path) -> LoadedCheckpoint {
    load_checkpoint(p, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// reference.json: canonical name -> (shape, sha256 of the float32 bytes), written by torch.
fn reference(family: &str) -> BTreeMap<String, (Vec<usize>, String)> {
    let text = std::fs::read_to_string(fixtures().join(family).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, e)| {
            let shape = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (
                k.clone(),
                (shape, e["sha256_f32"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

fn f32_sha256(t: &Tensor) -> String {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    hex::encode(Sha256::digest(&bytes))
}

const FAMILIES: [(&str, &[(&str, &str)]); 2] = [
    (
        "w2v_group",
        &[
            ("", "safetensors"),
            ("model.safetensors", "safetensors"),
            ("pytorch_model.bin", "pytorch"),
            ("pytorch_model_p4.bin", "pytorch"),
            ("pytorch_model_legacy.bin", "pytorch"),
            ("pytorch_model_ctc.bin", "pytorch"),
            ("fairseq.pt", "fairseq"),
            ("fairseq_legacy_args.pt", "fairseq"),
            ("fairseq_ctc_f16.pt", "fairseq"),
        ],
    ),
    (
        "hubert_layer",
        &[
            ("", "safetensors"),
            ("pytorch_model.bin", "pytorch"),
            ("pytorch_model_p4.bin", "pytorch"),
            ("pytorch_model_legacy.bin", "pytorch"),
            ("pytorch_model_ctc.bin", "pytorch"),
            ("fairseq.pt", "fairseq"),
        ],
    ),
];

#[test]
fn every_format_loads_the_torch_reference_tensors() {
    for (family, files) in FAMILIES {
        let reference = reference(family);
        let base = load(&fixtures().join(family));
        for (file, format) in files {
            if file.contains("f16") {
                continue;
            }
            let path = fixtures().join(family).join(file);
            let ck = load(&path);
            assert_eq!(ck.format, *format, "{}", path.display());
            let names: Vec<&String> = ck
                .tensors
                .keys()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let want: Vec<&String> = reference.keys().collect();
            assert_eq!(names, want, "{}: canonical tensor names", path.display());
            for (name, (shape, sha)) in &reference {
                let t = &ck.tensors[name];
                assert_eq!(t.dims(), shape.as_slice(), "{}: {name}", path.display());
                assert_eq!(t.dtype(), DType::F32);
                assert_eq!(
                    &f32_sha256(t),
                    sha,
                    "{}: {name} differs from torch",
                    path.display()
                );
                let diff = (t - &base.tensors[name])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(
                    diff,
                    0.0,
                    "{}: {name} differs from safetensors",
                    path.display()
                );
            }
            let params: usize = reference
                .values()
                .map(|(s, _)| s.iter().product::<usize>())
                .sum();
            assert_eq!(ck.parameter_count(), params);
        }
    }
}

#[test]
fn finetuned_float16_fairseq_loads_the_rounded_encoder() {
    // torch rounded the float32 weights to float16; candle's rounding must give the same bits.
    let base = load(&fixtures().join("w2v_group"));
    let ck = load(&fixtures().join("w2v_group/fairseq_ctc_f16.pt"));
    assert_eq!(ck.format, "fairseq");
    assert_eq!(ck.stored_dtype, "float16");
    assert_eq!(ck.config, base.config);
    assert_eq!(ck.tensors.len(), base.tensors.len());
    for (name, t) in &base.tensors {
        let rounded = t
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            f32_sha256(&ck.tensors[name]),
            f32_sha256(&rounded),
            "{name}"
        );
    }
    // Loading into float16 keeps the stored values.
    let half = load_checkpoint(
        &fixtures().join("w2v_group/fairseq_ctc_f16.pt"),
        &Device::Cpu,
        DType::F16,
    )
    .unwrap();
    assert_eq!(half.dtype, DType::F16);
    assert!(half.tensors.values().all(|t| t.dtype() == DType::F16));
}

#[test]
fn fairseq_config_equals_the_transformers_config() {
    for (family, files) in [
        (
            "w2v_group",
            &["fairseq.pt", "fairseq_legacy_args.pt", "fairseq_ctc_f16.pt"][..],
        ),
        ("hubert_layer", &["fairseq.pt"][..]),
    ] {
        let hf = load(&fixtures().join(family));
        for file in files {
            let fs = load(&fixtures().join(family).join(file));
            assert_eq!(fs.config, hf.config, "{family}/{file}");
            assert!(fs.config_source.contains("fairseq"));
        }
    }
}

#[test]
fn fairseq_preprocessing_comes_from_the_stored_task_when_alone() {
    // w2v: task.normalize False, group norm; hubert: task.normalize True, layer norm.
    for (family, normalize, mask) in [("w2v_group", false, false), ("hubert_layer", true, true)] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint_best.pt");
        std::fs::copy(fixtures().join(family).join("fairseq.pt"), &p).unwrap();
        let ck = load(dir.path());
        assert_eq!(ck.path, p);
        assert_eq!(ck.preprocessor.do_normalize, normalize, "{family}");
        assert_eq!(ck.preprocessor.return_attention_mask, mask, "{family}");
        assert_eq!(ck.preprocessor.sampling_rate, 16000);
    }
}

#[test]
fn fairseq_and_safetensors_give_the_same_hidden_states() {
    let n = 1200;
    let wave: Vec<f32> = (0..n)
        .map(|i| {
            let x = i as f32;
            0.5 * (x * 0.031).sin()
                + 0.2 * (x * 0.173).cos()
                + 0.05 * ((i * 7919 % 101) as f32 / 50.0 - 1.0)
        })
        .collect();
    let wave = Tensor::from_vec(wave, (1, n), &Device::Cpu).unwrap();
    for family in ["w2v_group", "hubert_layer"] {
        let run = |p: PathBuf| {
            let ck = load(&p);
            let model = Wav2Vec2Model::load(ck.var_builder(), &ck.config).unwrap();
            let layers = ck.config.num_hidden_layers;
            model.forward(&wave, &[n], layers).unwrap().0
        };
        let a = run(fixtures().join(family));
        let b = run(fixtures().join(family).join("fairseq.pt"));
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(max_abs_diff(x, y), 0.0, "{family} hidden state {i}");
            let norm = x.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(norm.to_scalar::<f32>().unwrap() > 0.0);
        }
    }
}

#[test]
fn linears_loaded_in_out_are_the_transposed_weights_and_give_the_same_model() {
    let n = 1200;
    let wave: Vec<f32> = (0..n).map(|i| (i as f32 * 0.037).sin() * 0.4).collect();
    let wave = Tensor::from_vec(wave, (1, n), &Device::Cpu).unwrap();
    // the mapped f32 safetensors path, and the load-then-transpose paths (torch, fairseq f16)
    for file in [
        "w2v_group/model.safetensors",
        "w2v_group/pytorch_model.bin",
        "w2v_group/fairseq_ctc_f16.pt",
        "hubert_layer/model.safetensors",
    ] {
        let path = fixtures().join(file);
        let plain = load(&path);
        let (in_out, ()) = load_checkpoint_then(
            &path,
            None,
            &Device::Cpu,
            DType::F32,
            LinearLayout::InOut,
            |_| (),
        )
        .unwrap();
        assert_eq!(plain.linear_layout, LinearLayout::OutIn);
        assert_eq!(in_out.linear_layout, LinearLayout::InOut, "{file}");
        let mut transposed = 0;
        for (name, t) in &plain.tensors {
            let u = &in_out.tensors[name];
            let linear = name.ends_with("_proj.weight")
                || name.ends_with("_dense.weight")
                || name.ends_with("projection.weight");
            let want = if linear {
                transposed += 1;
                t.t().unwrap().contiguous().unwrap()
            } else {
                t.clone()
            };
            assert_eq!(u.dims(), want.dims(), "{file} {name}");
            let (a, b) = (
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{file} {name}");
        }
        assert_eq!(transposed, 1 + 6 * plain.config.num_hidden_layers, "{file}");
        // both the tensor-op path and the CPU engine read either layout: the same states
        let run = |ck: &LoadedCheckpoint| {
            let model = Wav2Vec2Model::from_checkpoint(ck).unwrap();
            let layers = ck.config.num_hidden_layers;
            let mut states = model.forward(&wave, &[n], layers).unwrap().0;
            states.extend(model.forward_tensor_ops(&wave, &[n], layers).unwrap().0);
            states
        };
        let (a, b) = (run(&plain), run(&in_out));
        for (x, y) in a.iter().zip(&b) {
            assert!(max_abs_diff(x, y) < 1e-5, "{file}");
        }
    }
}

fn load_err(p: &Path) -> CheckpointError {
    match load_checkpoint(p, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded but should fail", p.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let e = load_err(&fixtures().join("broken/missing_tensor"));
    assert!(
        matches!(&e, CheckpointError::Missing { name, .. } if name == "encoder.layers.0.feed_forward.output_dense.weight"),
        "{e}"
    );
    assert!(e
        .to_string()
        .contains("encoder.layers.0.feed_forward.output_dense.weight"));

    let e = load_err(&fixtures().join("broken/wrong_shape"));
    match &e {
        CheckpointError::Shape {
            name,
            found,
            expected,
            ..
        } => {
            assert_eq!(name, "encoder.layers.0.attention.k_proj.weight");
            assert_eq!(found, &vec![8, 6]);
            assert_eq!(expected, &vec![8, 8]);
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(e.to_string().contains("[8, 6]"));
}

#[test]
fn unknown_model_types_are_refused() {
    let e = load_err(&fixtures().join("broken/whisper"));
    assert!(
        matches!(&e, CheckpointError::UnsupportedModel { model_type, .. } if model_type == "whisper"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("w2v_group/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixtures().join("w2v_group/config.json")).unwrap();
    let cfg = cfg.replace(
        "\"model_type\": \"wav2vec2\"",
        "\"model_type\": \"data2vec-audio\"",
    );
    assert!(cfg.contains("data2vec-audio"));
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("data2vec-audio"), "{e}");
}

#[test]
fn unusable_fairseq_configs_name_the_problem() {
    let e = load_err(&fixtures().join("broken/fairseq_missing_key.pt"));
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cfg.model.encoder_layers"), "{msg}");
    assert!(msg.contains("--config"), "{msg}");

    let e = load_err(&fixtures().join("broken/fairseq_data2vec.pt"));
    assert!(
        matches!(&e, CheckpointError::UnsupportedModel { model_type, .. } if model_type == "data2vec_audio"),
        "{e}"
    );
}

#[test]
fn a_config_that_does_not_match_the_weights_is_an_error() {
    // Fewer layers than the weights hold: the left-over layer is named.
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(fixtures().join("w2v_group/config.json")).unwrap();
    let cfg = cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, cfg).unwrap();
    let weights = fixtures().join("w2v_group/pytorch_model.bin");
    let e = load_checkpoint_with_config(&weights, Some(&cfg_path), &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Unexpected { name, .. } if name.starts_with("encoder.layers.1.")),
        "{e}"
    );
    // Another family's config: the first tensor it implies and the file lacks is named.
    let other = fixtures().join("hubert_layer/config.json");
    let e =
        load_checkpoint_with_config(&weights, Some(&other), &Device::Cpu, DType::F32).unwrap_err();
    assert!(
        e.to_string()
            .contains("feature_extractor.conv_layers.0.conv.bias"),
        "{e}"
    );
    // An explicit config also overrides a fairseq checkpoint's stored one.
    let fs = fixtures().join("w2v_group/fairseq.pt");
    let e = load_checkpoint_with_config(&fs, Some(&other), &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, CheckpointError::Missing { .. }), "{e}");
}

#[test]
fn weights_without_a_config_ask_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_model.bin");
    std::fs::copy(fixtures().join("hubert_layer/pytorch_model.bin"), &p).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
    assert!(e.to_string().contains("--config"), "{e}");
    let ck = load_checkpoint_with_config(
        &p,
        Some(&fixtures().join("hubert_layer/config.json")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(ck.config.model_type, "hubert");
    // The preprocessor config next to the explicit config.json is used.
    assert!(ck.preprocessor.do_normalize);
}

#[test]
fn truncated_and_foreign_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("w2v_group/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    for src in [
        "pytorch_model.bin",
        "pytorch_model_legacy.bin",
        "model.safetensors",
        "fairseq.pt",
    ] {
        let bytes = std::fs::read(fixtures().join("w2v_group").join(src)).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 7, 40] {
            let p = dir.path().join(format!("cut_{cut}_{src}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_err(&p);
            assert!(e.to_string().contains("cut_"), "{src} cut at {cut}: {e}");
        }
    }
    let p = dir.path().join("noise.bin");
    std::fs::write(&p, b"\x80\x02\x8a\x0aJUNKJUNKJUNKJUNK").unwrap();
    assert!(matches!(load_err(&p), CheckpointError::Unreadable { .. }));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_err(empty.path()),
        CheckpointError::NoWeights { .. }
    ));
}

#[test]
fn model_info_describes_the_checkpoint() {
    let p = fixtures().join("hubert_layer/fairseq.pt");
    let ck = load(&p);
    let info = speechcache::models::describe(&ck);
    assert_eq!(info["family"], "HuBERT");
    assert_eq!(info["format"], "fairseq");
    assert_eq!(info["feat_extract_norm"], "layer");
    assert_eq!(info["do_stable_layer_norm"], true);
    assert_eq!(info["hidden_size"], 16);
    assert_eq!(info["num_hidden_layers"], 2);
    assert_eq!(info["num_attention_heads"], 4);
    assert_eq!(
        info["conv_layers"],
        serde_json::json!([[8, 10, 5], [8, 3, 2], [8, 3, 2]])
    );
    assert_eq!(info["frame_rate"], 800.0);
    let params: usize = reference("hubert_layer")
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    assert_eq!(info["parameters"], params);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(info["weights_sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(info["stored_dtype"], "float32");
}

#[test]
fn corrupted_files_never_panic() {
    // Overwrite bytes across each file (pickle opcodes, zip headers, storage data): loading
    // must return Ok or an error, never panic.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("w2v_group/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for src in [
        "pytorch_model.bin",
        "pytorch_model_p4.bin",
        "pytorch_model_legacy.bin",
        "fairseq.pt",
        "fairseq_legacy_args.pt",
        "model.safetensors",
    ] {
        let bytes = std::fs::read(fixtures().join("w2v_group").join(src)).unwrap();
        for round in 0..60 {
            let mut b = bytes.clone();
            for _ in 0..1 + round % 4 {
                // Every other round hits the first 4 KB, where the pickles and headers are.
                let span = if round % 2 == 0 {
                    b.len().min(4096)
                } else {
                    b.len()
                };
                let at = (next() as usize) % span;
                b[at] = next() as u8;
            }
            let p = dir.path().join(format!("c{round}_{src}"));
            std::fs::write(&p, &b).unwrap();
            let r = std::panic::catch_unwind(|| load_checkpoint(&p, &Device::Cpu, DType::F32));
            assert!(r.is_ok(), "{src} round {round} panicked");
        }
    }
}

#[test]
fn loads_the_encoder_fixtures_of_every_variant() {
    // The wav2vec2 model's own fixtures (save_pretrained of base/large wav2vec2 and HuBERT).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("config.json").is_file() {
            continue;
        }
        let ck = load(&dir);
        assert_eq!(ck.format, "safetensors");
        assert_eq!(
            ck.parameter_count(),
            speechcache::models::config::parameter_count(&ck.config)
        );
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} model fixtures found");
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let src = fixtures().join("hubert_layer");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let (mut a, mut b) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    let mut weight_map = serde_json::Map::new();
    for (name, t) in all {
        let shard = if name.starts_with("encoder.layers.") {
            b.insert(name.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(name.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(name, shard.into());
    }
    let shard1 = dir.path().join("model-00001-of-00002.safetensors");
    let shard2 = dir.path().join("model-00002-of-00002.safetensors");
    candle_core::safetensors::save(&a, &shard1).unwrap();
    candle_core::safetensors::save(&b, &shard2).unwrap();
    // Index order: shard 1 is named first (serde_json keeps keys sorted: "encoder.layer_norm").
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ck = load(dir.path());
    let base = load(&src);
    assert_eq!(ck.format, "safetensors");
    for (name, t) in &base.tensors {
        assert_eq!(f32_sha256(&ck.tensors[name]), f32_sha256(t), "{name}");
    }
    let mut cat = std::fs::read(&shard1).unwrap();
    cat.extend(std::fs::read(&shard2).unwrap());
    assert_eq!(ck.weights_sha256, hex::encode(Sha256::digest(&cat)));
}

#[test]
fn weight_hashes_are_remembered_only_while_the_files_are_unchanged() {
    use speechcache::models::checkpoint::sha256_with_cache;
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache/weights-sha256.json");
    let file = dir.path().join("model.safetensors");
    let old = SystemTime::now() - Duration::from_secs(3600);
    let write = |bytes: &[u8]| {
        std::fs::write(&file, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
    };
    let files = [file.clone()];
    write(b"first weights");
    let first = sha256_with_cache(Some(&cache), &files).unwrap();
    assert_eq!(first, hex::encode(Sha256::digest(b"first weights")));
    assert!(cache.exists(), "a settled file's hash is remembered");
    // the remembered value is what a second run returns (planted to prove it is read)
    let text = std::fs::read_to_string(&cache).unwrap();
    std::fs::write(&cache, text.replace(&first, "planted")).unwrap();
    assert_eq!(sha256_with_cache(Some(&cache), &files).unwrap(), "planted");
    // same size, same mtime, new bytes: the ctime moved, so it is hashed again
    std::thread::sleep(Duration::from_millis(20));
    write(b"other weights");
    assert_eq!(
        sha256_with_cache(Some(&cache), &files).unwrap(),
        hex::encode(Sha256::digest(b"other weights"))
    );
    // a file modified just now is hashed but not remembered
    let fresh = dir.path().join("fresh.safetensors");
    std::fs::write(&fresh, b"fresh").unwrap();
    let fresh_cache = dir.path().join("fresh-cache.json");
    sha256_with_cache(Some(&fresh_cache), &[fresh]).unwrap();
    assert!(!fresh_cache.exists());
    // a cache that cannot be parsed is ignored
    std::fs::write(&cache, "not json").unwrap();
    assert_eq!(
        sha256_with_cache(Some(&cache), &files).unwrap(),
        hex::encode(Sha256::digest(b"other weights"))
    );
}
