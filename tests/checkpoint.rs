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
use speechcache::models::ssl::{CpuEncoder, LinearLayout, SslEncoder, Wav2Vec2Model};
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
        // every state of both executors
        let run = |p: PathBuf| {
            let ck = load(&p);
            let layers = ck.config.num_hidden_layers;
            executors(&ck)
                .iter()
                .flat_map(|model| model.forward(&wave, &[n], layers).unwrap().0)
                .collect::<Vec<_>>()
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
            let layers = ck.config.num_hidden_layers;
            executors(ck)
                .iter()
                .flat_map(|model| model.forward(&wave, &[n], layers).unwrap().0)
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(&plain), run(&in_out));
        for (x, y) in a.iter().zip(&b) {
            assert!(max_abs_diff(x, y) < 1e-5, "{file}");
        }
    }
}

/// The CPU engine and the tensor-op model of a checkpoint, in the layout it was loaded with.
fn executors(ck: &LoadedCheckpoint) -> [SslEncoder; 2] {
    let engine = CpuEncoder::load(ck.var_builder(), &ck.config, ck.linear_layout).unwrap();
    [
        SslEncoder::Cpu(engine),
        SslEncoder::TensorOps(Wav2Vec2Model::from_checkpoint(ck).unwrap()),
    ]
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
    let with_type = |model_type: &str| {
        let c = cfg.replace(
            "\"model_type\": \"wav2vec2\"",
            &format!("\"model_type\": \"{model_type}\""),
        );
        assert!(c.contains(model_type));
        std::fs::write(dir.path().join("config.json"), c).unwrap();
        load_err(dir.path())
    };
    let e = with_type("data2vec-text");
    assert!(
        matches!(&e, CheckpointError::UnsupportedModel { model_type, .. } if model_type == "data2vec-text"),
        "{e}"
    );
    // a family it implements, over weights of another: the first missing tensor is named
    // (data2vec-audio's convs are always LayerNorm'd: the first one that is not here)
    let e = with_type("data2vec-audio");
    assert!(
        e.to_string()
            .contains("missing tensor feature_extractor.conv_layers.1.layer_norm.weight"),
        "{e}"
    );
    let e = with_type("wavlm");
    assert!(
        e.to_string()
            .contains("encoder.layers.0.attention.gru_rel_pos_const"),
        "{e}"
    );
}

/// The WavLM and data2vec-audio fixtures of tests/models.rs (tests/fixtures/models) saved in
/// the other formats by gen_models_families.py: every hidden state of both executors equals
/// transformers' within 1e-4.
#[test]
fn wavlm_and_data2vec_audio_load_from_every_format() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let inputs =
        candle_core::safetensors::load(models.join("inputs.safetensors"), &Device::Cpu).unwrap();
    for (file, variant, format, family) in [
        ("wavlm_bin", "wavlm_odd", "pytorch", "WavLM"),
        ("d2v_legacy", "d2v_odd", "pytorch", "data2vec-audio"),
        ("wavlm_unilm.pt", "wavlm_large", "fairseq", "WavLM"),
        ("d2v_fairseq.pt", "d2v_base", "fairseq", "data2vec-audio"),
    ] {
        let ck = load(&fixtures().join("families").join(file));
        assert_eq!(ck.format, format, "{file}");
        let info = speechcache::models::describe(&ck);
        assert_eq!(info["family"], family, "{file}");
        let reference = speechcache::models::ssl::config::Wav2Vec2Config::from_file(
            &models.join(variant).join("config.json"),
        )
        .unwrap();
        let cfg = &ck.config;
        assert_eq!(
            speechcache::models::ssl::config::expected_tensors(cfg),
            speechcache::models::ssl::config::expected_tensors(&reference),
            "{file}"
        );
        let refs = candle_core::safetensors::load(
            models.join(variant).join("refs.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let wave = inputs["norm_1"].unsqueeze(0).unwrap();
        let n = wave.dim(1).unwrap();
        for model in executors(&ck) {
            let (states, _) = model.forward(&wave, &[n], cfg.num_hidden_layers).unwrap();
            for (j, st) in states.iter().enumerate() {
                let d = max_abs_diff(&st.get(0).unwrap(), &refs[&format!("utt1.hidden{j}")]);
                assert!(d < 1e-4, "{file} state {j}: {d}");
            }
        }
    }
}

#[test]
fn unusable_fairseq_configs_name_the_problem() {
    let e = load_err(&fixtures().join("broken/fairseq_missing_key.pt"));
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cfg.model.encoder_layers"), "{msg}");
    assert!(msg.contains("--config"), "{msg}");

    // data2vec_audio with one weight-normed positional conv (not the released layout)
    let e = load_err(&fixtures().join("broken/fairseq_data2vec.pt"));
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
    assert!(e.to_string().contains("cfg.model.pos_conv_depth"), "{e}");

    let e = load_err(&fixtures().join("families/broken_wavlm_no_gate.pt"));
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("broken_wavlm_no_gate.pt") && msg.contains("gru_rel_pos"),
        "{msg}"
    );
    // the binary: exit 2 and one error line naming the file and the reason
    let p = fixtures().join("families/broken_wavlm_no_gate.pt");
    let out = common::bin().arg("model-info").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains(common::s(&p)) && lines[0].contains("gru_rel_pos"),
        "{err}"
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
            speechcache::models::ssl::config::parameter_count(&ck.config)
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

// ---- Hostile checkpoints (issue 18, cases 2-4): each is built byte by byte in a temp dir,
// run through the release binary under 3 GB of address space and 20 s, and must end with one
// clear error naming the file and the reason (or load, when the hostile part is unused).

#[path = "fixtures/checkpoints/hostile.rs"]
mod hostile;

use hostile::{torch_zip, zeros_bomb, Pickler, ZipData};
use speechcache::models::checkpoint::parsers::{unpickle, PickleError, TorchFile, Value};

/// A model directory: the w2v_group config beside `pytorch_model.bin` holding `bytes`.
fn model_dir_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("w2v_group/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let weights = dir.path().join("pytorch_model.bin");
    std::fs::write(&weights, bytes).unwrap();
    (dir, weights)
}

/// Peak resident memory of the largest child this test process has waited for, in MB.
fn children_peak_rss_mb() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss as f64 / 1024.0
}

/// `speechcache model-info DIR` under the hostile-input limits; returns (exit code, output).
fn model_info_limited(dir: &Path, what: &str) -> common::Limited {
    let mut cmd = common::bin();
    cmd.args(["model-info", common::s(dir)])
        .env("SPEECHCACHE_CACHE_DIR", "off");
    let start = std::time::Instant::now();
    let r = common::run_limited(cmd);
    eprintln!(
        "{what}: exit {:?} in {:.2} s, children's peak RSS so far {:.0} MB",
        r.code,
        start.elapsed().as_secs_f64(),
        children_peak_rss_mb()
    );
    r
}

/// The zip entries of a fixture `torch.save` file, stored uncompressed, in order.
fn fixture_zip_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            (e.name().unwrap().to_string(), b)
        })
        .collect()
}

/// An object whose BUILD state is itself: `obj = Thing(); obj.__setstate__(obj)`.
fn self_build_pickle() -> Vec<u8> {
    let mut p = Pickler::new();
    p.global("__main__", "Thing").op(b')').op(0x81); // NEWOBJ
    p.op(b'2').op(b'b'); // DUP, BUILD
    p.stop()
}

/// `{"w": P}` where `P = _rebuild_parameter(L)` and `L = [P]`: a parameter wrapping itself.
fn self_parameter_pickle() -> Vec<u8> {
    let mut p = Pickler::new();
    p.op(b'}').str("encoder.layer_norm.weight");
    p.global("torch._utils", "_rebuild_parameter");
    p.op(b']').put(0).op(b'R').put(1).op(b's'); // root["w"] = P = call(L)
    p.get(0).get(1).op(b'a').op(b'0'); // L.append(P)
    p.stop()
}

/// One `len`-byte BINBYTES then `dups` DUPs (and as many memo GETs): a few MB of pickle that
/// a copying VM turns into gigabytes.
fn dup_bomb_pickle(len: usize, dups: usize) -> Vec<u8> {
    let mut p = Pickler::new();
    p.op(b'(').bytes(&vec![7u8; len]).put(0);
    for _ in 0..dups {
        p.op(b'2');
    }
    for _ in 0..dups {
        p.get(0);
    }
    p.op(b'l'); // all of them in one list
    p.stop()
}

#[test]
fn a_pickle_object_built_into_itself_is_a_clear_error() {
    // unit: the VM names the object and the cycle instead of recursing forever
    let e = unpickle(&self_build_pickle()).unwrap_err();
    assert!(matches!(e, PickleError::Graph { .. }), "{e}");
    assert!(e.to_string().contains("refers back to itself"), "{e}");
    // a longer cycle: A's state is B, B's state is A
    let mut p = Pickler::new();
    p.global("__main__", "A").op(b')').op(0x81).put(0);
    p.global("__main__", "B").op(b')').op(0x81).put(1);
    p.op(b'0').op(b'0'); // pop both
    p.get(0).get(1).op(b'b').op(b'0'); // A.state = B
    p.get(1).get(0).op(b'b'); // B.state = A; B is the root
    let e = unpickle(&p.stop()).unwrap_err();
    assert!(e.to_string().contains("refers back to itself"), "{e}");
    // a chain of object states deeper than any config: an error, not a deep recursion.
    // The objects are made first and chained afterwards (object i's state is object i+1).
    let mut p = Pickler::new();
    let n = 5000u32;
    for i in 0..n {
        p.global("__main__", "T").op(b')').op(0x81).op(b'r');
        p.0.extend_from_slice(&i.to_le_bytes()); // LONG_BINPUT i
        p.op(b'0');
    }
    let get = |p: &mut Pickler, i: u32| {
        p.op(b'j');
        p.0.extend_from_slice(&i.to_le_bytes()); // LONG_BINGET i
    };
    for i in 0..n - 1 {
        get(&mut p, i);
        get(&mut p, i + 1);
        p.op(b'b').op(b'0'); // BUILD, POP
    }
    get(&mut p, 0);
    let e = unpickle(&p.stop()).unwrap_err();
    assert!(e.to_string().contains("nest more than"), "{e}");

    // CLI: a pytorch_model.bin whose pickle does this (stack overflow before the fix)
    let bytes = torch_zip(self_build_pickle(), vec![]);
    let (dir, weights) = model_dir_with(&bytes);
    let r = model_info_limited(dir.path(), "self-BUILD pickle");
    let text = r.exited(2);
    assert!(text.contains(common::s(&weights)), "{text}");
    assert!(text.contains("data.pkl"), "{text}");
    assert!(text.contains("refers back to itself"), "{text}");
}

#[test]
fn a_parameter_that_wraps_itself_is_a_clear_error() {
    // unit: tensor_ref stops unwrapping instead of spinning
    let bytes = torch_zip(self_parameter_pickle(), vec![]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.bin");
    std::fs::write(&p, &bytes).unwrap();
    let tf = TorchFile::open(&p).unwrap();
    let e = tf.tensor_entries(&tf.root).unwrap_err();
    assert!(e.contains("encoder.layer_norm.weight"), "{e}");
    assert!(e.contains("nest more than"), "{e}");

    // CLI (100% CPU forever before the fix)
    let (dir, weights) = model_dir_with(&bytes);
    let r = model_info_limited(dir.path(), "self-wrapping _rebuild_parameter");
    let text = r.exited(2);
    assert!(text.contains(common::s(&weights)), "{text}");
    assert!(
        text.contains("_rebuild_parameter calls nest more than"),
        "{text}"
    );
}

#[test]
fn dup_and_memo_get_share_bytes_instead_of_copying_them() {
    // unit: 20,000 DUPs and 20,000 GETs of 1 MiB are 40,001 pointers to one buffer
    let pkl = dup_bomb_pickle(1 << 20, 20_000);
    let start = std::time::Instant::now();
    let (p, used) = unpickle(&pkl).unwrap();
    assert_eq!(used, pkl.len());
    let items = p.seq(p.root.as_ref().unwrap()).unwrap();
    assert_eq!(items.len(), 40_001);
    let Value::Bytes(first) = &items[0] else {
        panic!("not bytes")
    };
    for v in items {
        assert!(matches!(v, Value::Bytes(b) if std::sync::Arc::ptr_eq(b, first)));
    }
    eprintln!(
        "DUP/GET bomb ({} bytes) unpickled in {:.3} s",
        pkl.len(),
        start.elapsed().as_secs_f64()
    );

    // unit: STACK_GLOBAL of DUPed strings shares them too (2 MiB copied per 4 bytes before)
    let mut p = Pickler::new();
    p.op(b'X').0.extend_from_slice(&(1u32 << 20).to_le_bytes());
    p.0.resize(p.0.len() + (1 << 20), b'm');
    for _ in 0..20_000 {
        p.op(b'2').op(b'2').op(0x93).op(b'0'); // DUP, DUP, STACK_GLOBAL, POP
    }
    let start = std::time::Instant::now();
    unpickle(&p.stop()).unwrap();
    assert!(start.elapsed().as_secs_f64() < 2.0);
    // a 1 MiB tensor name referenced 20,000 times is refused, not copied 20,000 times
    let mut p = Pickler::new();
    p.op(b'}').op(b'(').op(b'X');
    p.0.extend_from_slice(&(1u32 << 20).to_le_bytes());
    p.0.resize(p.0.len() + (1 << 20), b'n');
    p.put(0).tensor("0", 4, 0, &[4], &[1]).put(1);
    for _ in 0..20_000 {
        p.get(0).get(1);
    }
    p.op(b'u');
    let bytes = torch_zip(p.stop(), vec![("0".into(), ZipData::Stored(vec![0u8; 16]))]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.bin");
    std::fs::write(&path, &bytes).unwrap();
    let tf = TorchFile::open(&path).unwrap();
    let e = tf.tensor_entries(&tf.root).unwrap_err();
    assert!(e.contains("a tensor name of 1048576 bytes"), "{e}");

    // unit: the VM's totals are capped, whatever the program
    let mut many = Pickler::new();
    many.op(b'(');
    many.0.resize(many.0.len() + (1 << 23) + 10, b'N');
    let e = unpickle(&many.stop()).unwrap_err();
    assert!(matches!(e, PickleError::TooLarge { .. }), "{e}");
    let mut lists = Pickler::new();
    lists.0.resize(lists.0.len() + (1 << 21) + 10, b']');
    let e = unpickle(&lists.stop()).unwrap_err();
    assert!(e.to_string().contains("containers"), "{e}");

    // CLI: the file of issue 18 (gigabytes and an abort before the fix)
    let bytes = torch_zip(dup_bomb_pickle(1 << 20, 20_000), vec![]);
    let (dir, weights) = model_dir_with(&bytes);
    let r = model_info_limited(dir.path(), "DUP/GET bomb");
    let text = r.exited(2);
    assert!(text.contains(common::s(&weights)), "{text}");
    assert!(
        text.contains("no wav2vec2/HuBERT/WavLM/data2vec-audio encoder tensors"),
        "{text}"
    );
}

/// The w2v_group `pytorch_model.bin` rebuilt with `extra` entries, or with entry `replace`'s
/// bytes replaced by a deflate bomb.
fn fixture_zip_with(extra: Vec<(String, ZipData)>, replace: Option<&str>) -> Vec<u8> {
    let mut entries: Vec<(String, ZipData)> = Vec::new();
    let fixture = fixture_zip_entries(&fixtures().join("w2v_group/pytorch_model.bin"));
    if let Some(r) = replace {
        assert!(
            fixture.iter().any(|(n, _)| n == r),
            "{r} is not in the fixture"
        );
    }
    for (name, bytes) in fixture {
        if Some(name.as_str()) == replace {
            let (stream, crc) = zeros_bomb(64);
            entries.push((
                name,
                ZipData::Deflated {
                    stream,
                    crc,
                    size: bytes.len() as u32,
                },
            ));
        } else {
            entries.push((name, ZipData::Stored(bytes)));
        }
    }
    entries.extend(extra);
    hostile::zip_archive(&entries)
}

#[test]
fn a_deflate_bomb_in_an_unused_entry_is_never_inflated() {
    // 4095 MiB of zeros in ~4 MB, declared as 4095 MiB with its true CRC, beside a good model
    let (stream, crc) = zeros_bomb(4095);
    eprintln!("bomb: {} bytes inflating to 4095 MiB", stream.len());
    let bomb = ZipData::Deflated {
        stream,
        crc,
        size: 4095 << 20,
    };
    let bytes = fixture_zip_with(vec![("pytorch_model/data/bomb".into(), bomb)], None);
    let (dir, weights) = model_dir_with(&bytes);
    // unit: opening lists the entry and never inflates it
    let start = std::time::Instant::now();
    let tf = TorchFile::open(&weights).unwrap();
    assert!(!tf.tensor_entries(&tf.root).unwrap().is_empty());
    assert!(start.elapsed().as_secs_f64() < 2.0);
    // CLI: the model loads as if the entry were absent (4 GB inflated up front before the fix)
    let r = model_info_limited(dir.path(), "deflate bomb in an unused entry");
    let text = r.exited(0);
    assert!(text.contains("wav2vec 2.0"), "{text}");
}

#[test]
fn a_deflate_bomb_posing_as_a_storage_is_a_clear_error() {
    // the storage of a tensor the model needs, replaced by 64 MiB of zeros in ~64 KB
    let tf = TorchFile::open(&fixtures().join("w2v_group/pytorch_model.bin")).unwrap();
    let refs = tf.tensor_entries(&tf.root).unwrap();
    let (_, t) = refs
        .iter()
        .find(|(n, _)| n.ends_with("feature_extractor.conv_layers.0.conv.weight"))
        .unwrap();
    let entry = format!("pytorch_model/data/{}", t.storage);
    let bytes = fixture_zip_with(vec![], Some(&entry));
    let (dir, weights) = model_dir_with(&bytes);
    let r = model_info_limited(dir.path(), "deflate bomb as a used storage");
    let text = r.exited(2);
    assert!(text.contains(common::s(&weights)), "{text}");
    assert!(text.contains(&entry), "{text}");
    assert!(text.contains("decompression bomb"), "{text}");
    // a compressed data.pkl that inflates past any real pickle
    let (stream, crc) = zeros_bomb(300);
    let bytes = hostile::zip_archive(&[(
        "archive/data.pkl".into(),
        ZipData::Deflated {
            stream,
            crc,
            size: 300 << 20,
        },
    )]);
    let (dir, _) = model_dir_with(&bytes);
    let r = model_info_limited(dir.path(), "deflate bomb as data.pkl");
    let text = r.exited(2);
    assert!(text.contains("data.pkl is larger than 256 MiB"), "{text}");
}

#[test]
fn hostile_sizes_offsets_and_strides_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let open_err = |name: &str, bytes: &[u8]| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        match TorchFile::open(&p) {
            Err(e) => e,
            Ok(tf) => match tf.tensor_entries(&tf.root) {
                Err(e) => e,
                Ok(refs) => refs
                    .iter()
                    .find_map(|(_, t)| tf.materialize(t, &Device::Cpu).err())
                    .unwrap_or_else(|| panic!("{name} loaded")),
            },
        }
    };
    let storage = || vec![("0".to_string(), ZipData::Stored(vec![0u8; 16]))];
    let one = |numel: i64, offset: i64, shape: &[i64], stride: &[i64]| {
        let mut p = Pickler::new();
        p.op(b'}')
            .str("w")
            .tensor("0", numel, offset, shape, stride)
            .op(b's');
        torch_zip(p.stop(), storage())
    };
    // a broadcast view of 2^40 elements over 4 bytes: no 4 TB allocation, an error
    let e = open_err("broadcast.bin", &one(4, 0, &[1 << 40], &[0]));
    assert!(e.contains("repeats storage elements"), "{e}");
    // sizes whose product overflows
    let e = open_err(
        "overflow.bin",
        &one(4, 0, &[1 << 40, 1 << 40], &[1 << 40, 1]),
    );
    assert!(e.contains("overflowing"), "{e}");
    // an offset past the storage
    let e = open_err("offset.bin", &one(4, 1 << 50, &[2], &[1]));
    assert!(e.contains("storage"), "{e}");
    let e = open_err("short.bin", &one(4, 2, &[4], &[1]));
    assert!(e.contains("holds only 16"), "{e}");
    // negative offset
    let e = open_err("negative.bin", &one(4, -1, &[2], &[1]));
    assert!(e.contains("negative"), "{e}");

    // legacy: a storage declaring 2^61 elements
    let mut legacy = hostile::tiny_legacy();
    let n = legacy.len();
    let at = n - 24 - 8; // the last storage: 6 floats after an 8-byte count
    legacy[at..at + 8].copy_from_slice(&(1u64 << 61).to_le_bytes());
    let e = open_err("legacy.bin", &legacy);
    assert!(e.contains("declares more bytes"), "{e}");

    // safetensors: a header length near 2^64, and offsets past the data
    let cfg = fixtures().join("w2v_group/config.json");
    for (name, bytes) in [
        ("huge_header.safetensors", {
            let mut b = hostile::tiny_safetensors();
            b[..8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
            b
        }),
        ("past_data.safetensors", {
            let mut h =
                br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,99999999999]}}"#.to_vec();
            h.resize(h.len().div_ceil(8) * 8, b' ');
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(&h);
            b.extend_from_slice(&[0u8; 16]);
            b
        }),
    ] {
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(&cfg, d.path().join("config.json")).unwrap();
        let p = d.path().join("model.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let r = model_info_limited(d.path(), name);
        let text = r.exited(2);
        assert!(text.contains(common::s(&p)), "{name}: {text}");
        assert!(text.contains("invalid safetensors"), "{name}: {text}");
    }
}

#[test]
fn a_fifo_or_a_shard_outside_the_model_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pytorch_model.bin");
    let c = std::ffi::CString::new(common::s(&fifo)).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let r = model_info_limited(&fifo, "FIFO as weights");
    let text = r.exited(2);
    assert!(text.contains("not a regular file"), "{text}");

    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"encoder.layer_norm.weight": "../elsewhere.safetensors"}}"#,
    )
    .unwrap();
    let e = load_err(&index);
    assert!(e.to_string().contains("not a file name"), "{e}");
}
