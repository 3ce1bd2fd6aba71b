//! Finetune/decode end to end on small synthetic feature stores: the loss falls and decode
//! scores; a run stopped and resumed equals an uninterrupted one; averaging; bad input.
mod common;

use candle_core::Device;
use common::max_abs_diff;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use speechcache::finetune::checkpoint::{self, avg_path, epoch_path, last_path};
use speechcache::finetune::config::FinetuneConfig;
use speechcache::finetune::data::StoreSource;
use speechcache::finetune::decode::{self, CheckpointChoice, DecodeOptions};
use speechcache::finetune::train::{self, read_log, StepLog, TrainOptions};
use speechcache::store::{
    Dtype, IndexRow, InputResult, ItemData, StoreKind, StoreWriter, WriterSpec,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DIM: usize = 12;
const FRAMES_PER_CHAR: usize = 8;
const ALPHABET: &[char] = &['a', 'b', 'c', 'd', ' '];

/// Each character is `FRAMES_PER_CHAR` frames near its own prototype vector (layer 0); layer 1
/// is a noisier copy. Transcripts are random strings over a 5-character alphabet.
fn write_store(dir: &Path, n: usize, seed: u64, with_text: bool, dim: usize) {
    let mut proto_rng = ChaCha8Rng::seed_from_u64(99);
    let protos: Vec<Vec<f32>> = ALPHABET
        .iter()
        .map(|_| {
            (0..dim)
                .map(|_| proto_rng.random_range(-2.0..2.0))
                .collect()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let spec = WriterSpec {
        kind: StoreKind::Features,
        dtype: Dtype::F32,
        sample_rate: None,
        frame_rate: Some(100.0),
        dim: Some(dim),
        layers: vec![0, 1],
        options: serde_json::json!({"synthetic": seed}),
        source: serde_json::json!({}),
        extra: serde_json::Value::Null,
        shard_bytes: 1 << 20,
        overwrite: false,
    };
    let mut w = StoreWriter::create_or_resume(dir, spec).unwrap();
    for i in 0..n {
        let len = rng.random_range(3..7);
        let text: String = (0..len)
            .map(|k| {
                // no leading/trailing/double spaces: the tokenizer normalises them away
                let c = ALPHABET[rng.random_range(0..ALPHABET.len())];
                if c == ' ' && (k == 0 || k == len - 1) {
                    'a'
                } else {
                    c
                }
            })
            .collect::<String>()
            .replace("  ", " a");
        let t = text.chars().count() * FRAMES_PER_CHAR;
        let mut l0 = Array2::<f32>::zeros((t, dim));
        let mut l1 = Array2::<f32>::zeros((t, dim));
        for (k, c) in text.chars().enumerate() {
            let p = &protos[ALPHABET.iter().position(|&a| a == c).unwrap()];
            for f in 0..FRAMES_PER_CHAR {
                for d in 0..dim {
                    let v = p[d] + rng.random_range(-0.3..0.3);
                    l0[[k * FRAMES_PER_CHAR + f, d]] = v;
                    l1[[k * FRAMES_PER_CHAR + f, d]] = 0.5 * v + rng.random_range(-1.0..1.0);
                }
            }
        }
        let row = IndexRow {
            id: format!("utt{i:03}"),
            text: with_text.then_some(text),
            source: format!("synthetic{i}.wav"),
            duration: t as f64 / 100.0,
            ..Default::default()
        };
        w.push_input(
            i,
            InputResult {
                items: vec![(row, ItemData::Features(vec![l0, l1]))],
                errors: vec![],
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
}

const CONFIG: &str = r#"
[model.featurizer]
normalize = "global"

[model.encoder]
output_size = 32
attention_heads = 2
linear_units = 64
num_blocks = 1
cnn_module_kernel = 5
dropout_rate = 0.1
positional_dropout_rate = 0.1
input_layer = "conv2d2"

[specaug]
time_warp_window = 3
num_time_masks = 1
time_mask_width = { frames = 4 }
num_freq_masks = 1
freq_mask_width = 2

[optim]
optimizer = "adamw"
lr = 0.004
warmup_steps = 10
weight_decay = 0.01
grad_clip = 5.0
accum_grad = 2

[train]
max_epochs = 4
batch_frames = 600
keep_nbest = 2
log_every = 1000
"#;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        write_store(&root.join("train"), 48, 1, true, DIM);
        write_store(&root.join("valid"), 10, 2, true, DIM);
        std::fs::write(root.join("conf.toml"), CONFIG).unwrap();
        Self { _tmp: tmp, root }
    }

    fn opts(&self, out: &str, resume: bool, max_steps: Option<u64>) -> TrainOptions {
        TrainOptions {
            config: self.root.join("conf.toml"),
            out: self.root.join(out),
            resume,
            backend: cpu_backend(),
            seed: Some(7),
            max_steps,
            max_epochs: None,
            max_minutes: None,
            verbose: std::env::var_os("FINETUNE_TEST_VERBOSE").is_some(),
        }
    }

    fn train(&self, opts: &TrainOptions) -> Result<train::TrainSummary, train::TrainError> {
        let t = StoreSource::open(&self.root.join("train")).unwrap();
        let v = StoreSource::open(&self.root.join("valid")).unwrap();
        train::train(opts, &t, &v, Instant::now())
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn trains_resumes_exactly_averages_and_decodes() {
    let fx = Fixture::new();

    // uninterrupted run
    let full = fx.opts("exp_full", false, None);
    let s = fx.train(&full).unwrap();
    assert_eq!(s.final_epoch, 4);
    let exp = fx.root.join("exp_full");
    let epochs: Vec<checkpoint::EpochResult> = read_log(&exp.join("epoch_log.jsonl")).unwrap();
    assert_eq!(epochs.len(), 4);
    let steps: Vec<StepLog> = read_log(&exp.join("train_log.jsonl")).unwrap();
    let first: f64 = steps[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last: f64 = steps[steps.len() - 3..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(
        last < 0.6 * first,
        "train loss did not fall: {first} -> {last}"
    );
    assert!(
        epochs[3].valid_loss < epochs[0].valid_loss,
        "valid loss did not fall: {:?}",
        epochs.iter().map(|e| e.valid_loss).collect::<Vec<_>>()
    );
    assert!(steps.iter().all(|s| s.grad_norm.is_finite() && s.lr > 0.0));
    assert!(exp.join("plots/loss.png").is_file());
    assert!(exp.join("plots/layer_weights.png").is_file());

    // run stopped mid-epoch 1, resumed, stopped after epoch 2's first steps, resumed again
    let steps_epoch1 = epochs[0].step;
    let part = fx.opts("exp_resumed", false, Some(steps_epoch1 - 1));
    let s1 = fx.train(&part).unwrap();
    assert!(s1.stopped_early);
    // a run stopped by --max-steps (before any epoch closed) leaves its layer weights too
    let lw =
        speechcache::finetune::layers::LayerWeights::read(&fx.root.join("exp_resumed")).unwrap();
    assert_eq!(lw.layers, vec![0, 1]);
    assert!(
        (lw.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5,
        "{lw:?}"
    );
    // starting again without --resume is refused
    let err = fx.train(&fx.opts("exp_resumed", false, None)).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    fx.train(&fx.opts("exp_resumed", true, Some(steps_epoch1 + 2)))
        .unwrap();
    fx.train(&fx.opts("exp_resumed", true, None)).unwrap();
    let res = fx.root.join("exp_resumed");
    let kept = checkpoint::nbest(&epochs, 2);
    for e in &kept {
        assert_eq!(
            bytes(&epoch_path(&exp, *e)),
            bytes(&epoch_path(&res, *e)),
            "epoch {e} differs"
        );
    }
    assert_eq!(
        bytes(&last_path(&exp)),
        bytes(&last_path(&res)),
        "last checkpoint differs"
    );
    assert_eq!(
        bytes(&avg_path(&exp)),
        bytes(&avg_path(&res)),
        "average differs"
    );
    let res_steps: Vec<StepLog> = read_log(&res.join("train_log.jsonl")).unwrap();
    assert_eq!(res_steps.len(), steps.len());
    for (a, b) in steps.iter().zip(&res_steps) {
        assert_eq!(
            (a.step, a.loss.to_bits(), a.grad_norm.to_bits()),
            (b.step, b.loss.to_bits(), b.grad_norm.to_bits())
        );
    }

    // a run of 1 epoch continued with more epochs (train.max_epochs may grow on --resume)
    let mut one = fx.opts("exp_more", false, None);
    one.max_epochs = Some(1);
    fx.train(&one).unwrap();
    let mut again = fx.opts("exp_more", true, None);
    again.seed = None; // resuming takes the experiment's seed
    fx.train(&again).unwrap();
    let more = fx.root.join("exp_more");
    assert_eq!(
        bytes(&last_path(&exp)),
        bytes(&last_path(&more)),
        "continued run differs"
    );

    // averaging: avg = element-wise mean of the kept epochs; dropped epochs are deleted
    assert_eq!(kept.len(), 2);
    for e in 1..=4 {
        assert_eq!(epoch_path(&exp, e).is_file(), kept.contains(&e));
    }
    let dev = Device::Cpu;
    let a = checkpoint::load_tensors(&epoch_path(&exp, kept[0]), &dev).unwrap();
    let b = checkpoint::load_tensors(&epoch_path(&exp, kept[1]), &dev).unwrap();
    let avg = checkpoint::load_tensors(&avg_path(&exp), &dev).unwrap();
    assert_eq!(avg.len(), a.len());
    for (k, v) in &avg {
        let want = ((&a[k] + &b[k]).unwrap() / 2.0).unwrap();
        assert!(max_abs_diff(v, &want) < 1e-6, "{k}");
    }

    // decode: greedy and beam, files and scores
    let data = StoreSource::open(&fx.root.join("valid")).unwrap();
    for (beam, ck) in [(1, CheckpointChoice::Average), (4, CheckpointChoice::Last)] {
        let out = fx.root.join(format!("dec{beam}"));
        let r = decode::decode(
            &DecodeOptions {
                exp: exp.clone(),
                checkpoint: ck.clone(),
                beam,
                out: Some(out.clone()),
                backend: cpu_backend(),
                verbose: false,
            },
            &data,
        )
        .unwrap();
        assert_eq!(r.utterances, 10);
        let cer = r.cer.as_ref().unwrap();
        assert!(cer.rate < 0.9, "CER {}", cer.rate);
        for f in [
            "hyp.trn",
            "ref.trn",
            "hyp.txt",
            "ref.txt",
            "result.txt",
            "result.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let ref_trn = std::fs::read_to_string(out.join("ref.trn")).unwrap();
        assert!(ref_trn.lines().next().unwrap().ends_with("(utt000)"));

        // on the CPU decode runs the CPU engine, as validation does; candle tensor ops (what
        // CUDA runs) give the same hypotheses
        let candle_out = fx.root.join(format!("dec{beam}-candle"));
        let candle = decode::decode(
            &DecodeOptions {
                exp: exp.clone(),
                checkpoint: ck,
                beam,
                out: Some(candle_out.clone()),
                backend: speechcache::device::Backend::tensor_ops(
                    Device::Cpu,
                    candle_core::DType::F32,
                ),
                verbose: false,
            },
            &data,
        )
        .unwrap();
        assert_eq!(candle.cer.as_ref().unwrap().rate, cer.rate);
        assert_eq!(
            std::fs::read_to_string(candle_out.join("hyp.trn")).unwrap(),
            std::fs::read_to_string(out.join("hyp.trn")).unwrap(),
            "beam {beam}: engine and candle hypotheses differ"
        );
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let conf = root.join("bad.toml");

    std::fs::write(&conf, format!("{CONFIG}\n[train.extra]\nx = 1\n")).unwrap();
    let e = FinetuneConfig::load(&conf).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("extra"), "{e}");

    std::fs::write(&conf, CONFIG.replace("lr = 0.004", "lr = \"fast\"")).unwrap();
    let e = FinetuneConfig::load(&conf).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("lr"), "{e}");

    std::fs::write(&conf, CONFIG.replace("num_blocks = 1", "num_blockz = 1")).unwrap();
    let e = FinetuneConfig::load(&conf).unwrap_err().to_string();
    assert!(e.contains("num_blockz"), "{e}");

    // stores: no transcripts; empty; another dim at decode
    write_store(&root.join("notext"), 4, 3, false, DIM);
    write_store(&root.join("empty"), 0, 3, true, DIM);
    write_store(&root.join("ok"), 6, 4, true, DIM);
    write_store(&root.join("wide"), 3, 5, true, DIM + 4);
    std::fs::write(
        root.join("conf.toml"),
        CONFIG.replace("max_epochs = 4", "max_epochs = 1"),
    )
    .unwrap();
    let opts = |out: &str| TrainOptions {
        config: root.join("conf.toml"),
        out: root.join(out),
        resume: false,
        backend: cpu_backend(),
        seed: None,
        max_steps: None,
        max_epochs: None,
        max_minutes: None,
        verbose: false,
    };
    let open = |n: &str| StoreSource::open(&root.join(n)).unwrap();
    let e = train::train(&opts("e1"), &open("notext"), &open("ok"), Instant::now())
        .unwrap_err()
        .to_string();
    assert!(e.contains("transcript"), "{e}");
    let e = train::train(&opts("e2"), &open("empty"), &open("ok"), Instant::now())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no utterances") || e.contains("empty"), "{e}");
    let e = train::train(&opts("e3"), &open("ok"), &open("wide"), Instant::now())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dim"), "{e}");

    train::train(&opts("e4"), &open("ok"), &open("ok"), Instant::now()).unwrap();
    let dec = |data: &str| {
        decode::decode(
            &DecodeOptions {
                exp: root.join("e4"),
                checkpoint: CheckpointChoice::Last,
                beam: 1,
                out: Some(root.join("d")),
                backend: cpu_backend(),
                verbose: false,
            },
            &open(data),
        )
    };
    let e = dec("wide").unwrap_err().to_string();
    assert!(e.contains("dim 16") && e.contains("dim 12"), "{e}");
    let e = dec("empty").unwrap_err().to_string();
    assert!(e.contains("no utterances"), "{e}");
    let r = dec("notext").unwrap();
    assert!(r.cer.is_none() && r.utterances == 4);
}

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/conf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            FinetuneConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// Launch cost on a 10-hour store (3600 utterances of 10 s, 80-dim fbank-like features at
/// 100 frames/s, f16): opening stores, tokenizer, stats and model must take well under 1 s.
/// `cargo test --release --test finetune -- --ignored --nocapture launch_cost`
#[test]
#[ignore]
fn launch_cost_on_ten_hours() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let spec = |dim| WriterSpec {
        kind: StoreKind::Features,
        dtype: Dtype::F16,
        sample_rate: None,
        frame_rate: Some(100.0),
        dim: Some(dim),
        layers: vec![0],
        options: serde_json::json!({}),
        source: serde_json::json!({}),
        extra: serde_json::Value::Null,
        shard_bytes: 256 << 20,
        overwrite: false,
    };
    let t0 = Instant::now();
    let mut w = StoreWriter::create_or_resume(&root.join("big"), spec(80)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for i in 0..3600 {
        let x = Array2::from_shape_fn((1000, 80), |_| rng.random_range(-1.0f32..1.0));
        let row = IndexRow {
            id: format!("u{i:05}"),
            text: Some("the quick brown fox jumps over the lazy dog".into()),
            source: "x".into(),
            duration: 10.0,
            ..Default::default()
        };
        w.push_input(
            i,
            InputResult {
                items: vec![(row, ItemData::Features(vec![x]))],
                errors: vec![],
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
    eprintln!("wrote 10 h store in {:.1} s", t0.elapsed().as_secs_f64());
    write_store(&root.join("valid"), 4, 2, true, 80);
    // the finetune issue's config (Conformer 4 x 144 on 80-dim fbank)
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/conf/fbank_vs_peer.toml");
    let started = Instant::now();
    let t = StoreSource::open(&root.join("big")).unwrap();
    let v = StoreSource::open(&root.join("valid")).unwrap();
    let s = train::train(
        &TrainOptions {
            config: conf,
            out: root.join("exp"),
            resume: false,
            backend: cpu_backend(),
            seed: None,
            max_steps: Some(3),
            max_epochs: None,
            max_minutes: None,
            verbose: true,
        },
        &t,
        &v,
        started,
    )
    .unwrap();
    eprintln!(
        "setup {:.3} s, first optimizer step done at {:.3} s",
        s.setup_s, s.first_step_s
    );
    assert!(s.setup_s < 1.0);
}

/// On-the-fly mode: a tiny HuBERT fixture runs inside every step on an audio store.
#[test]
fn onthefly_features_train() {
    use speechcache::finetune::data::FeatureSource;
    use speechcache::finetune::onthefly::OnTheFlySource;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let spec = common::audio_writer_spec(1 << 20, serde_json::json!({}));
    let mut w = StoreWriter::create_or_resume(&root.join("audio"), spec).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for i in 0..8 {
        let n = 1600 + 400 * (i % 4);
        let f = 200.0 + 50.0 * i as f32;
        let x: Vec<f32> = (0..n)
            .map(|k| {
                0.3 * (k as f32 * f * std::f32::consts::TAU / 16000.0).sin()
                    + rng.random_range(-0.01..0.01)
            })
            .collect();
        let row = IndexRow {
            id: format!("a{i}"),
            text: Some(["ab", "ba", "abc", "cab"][i % 4].into()),
            source: "x".into(),
            duration: n as f64 / 16000.0,
            ..Default::default()
        };
        w.push_input(
            i,
            InputResult {
                items: vec![(row, ItemData::Audio(x))],
                errors: vec![],
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints/hubert_layer");
    let cpu = speechcache::device::Backend::new(Device::Cpu, candle_core::DType::F32).unwrap();
    let src = OnTheFlySource::open(&root.join("audio"), &model, &cpu).unwrap();
    assert_eq!(
        (src.dim(), src.layers().len(), src.frame_rate()),
        (16, 3, 800.0)
    );
    let (x, lens) = src.batch(&[0, 3], &[0, 2], &Device::Cpu).unwrap();
    assert_eq!(x.dims()[..2], [2, 2]);
    assert_eq!(lens, vec![src.frames(0), src.frames(3)]);
    let (alone, _) = src.batch(&[0], &[0, 2], &Device::Cpu).unwrap();
    let first = x.narrow(0, 0, 1).unwrap().narrow(2, 0, lens[0]).unwrap();
    let diff = (first - alone)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);

    let conf = root.join("conf.toml");
    let text = CONFIG
        .replace("normalize = \"global\"", "normalize = \"utterance\"")
        .replace("max_epochs = 4", "max_epochs = 1");
    std::fs::write(&conf, text).unwrap();
    let s = train::train(
        &TrainOptions {
            config: conf,
            out: root.join("exp"),
            resume: false,
            backend: cpu_backend(),
            seed: None,
            max_steps: None,
            max_epochs: None,
            max_minutes: None,
            verbose: false,
        },
        &src,
        &src,
        Instant::now(),
    )
    .unwrap();
    assert_eq!(s.final_epoch, 1);
    let steps: Vec<StepLog> = read_log(&root.join("exp/train_log.jsonl")).unwrap();
    assert!(!steps.is_empty() && steps.iter().all(|s| s.loss.is_finite()));
}

/// Our Adam/AdamW + clipping + warmuplr against torch 2.5.1 (tests/fixtures/gen_optim.py).
#[test]
fn optimizer_matches_torch() {
    use candle_core::{Tensor, Var};
    use speechcache::finetune::config::{warmup_lr, OptimConfig, OptimizerKind};
    use speechcache::finetune::optim::{clip_by_global_norm, Adam};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim/adam.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vec = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let dev = Device::Cpu;
    for case in fx["cases"].as_array().unwrap() {
        let kind = if case["kind"] == "adam" {
            OptimizerKind::Adam
        } else {
            OptimizerKind::Adamw
        };
        let cfg = OptimConfig {
            optimizer: kind,
            lr: case["lr"].as_f64().unwrap(),
            betas: [0.9, 0.98],
            eps: 1e-8,
            weight_decay: case["weight_decay"].as_f64().unwrap(),
            warmup_steps: case["warmup"].as_u64().unwrap(),
            grad_clip: case["clip"].as_f64().unwrap(),
            accum_grad: 1,
        };
        let p =
            Var::from_tensor(&Tensor::from_vec(vec(&case["p0"]), (3, 4), &dev).unwrap()).unwrap();
        let q = Var::from_tensor(&Tensor::from_vec(vec(&case["q0"]), 5, &dev).unwrap()).unwrap();
        let mut opt = Adam::new(
            vec![("p".into(), p.clone()), ("q".into(), q.clone())],
            &cfg,
            speechcache::device::Executor::CpuEngine,
        )
        .unwrap();
        for (i, g) in case["grads"].as_array().unwrap().iter().enumerate() {
            let mut grads = vec![
                Tensor::from_vec(vec(&g[0]), (3, 4), &dev).unwrap(),
                Tensor::from_vec(vec(&g[1]), 5, &dev).unwrap(),
            ];
            let norm = clip_by_global_norm(&mut grads, cfg.grad_clip).unwrap();
            assert!((norm - case["norms"][i].as_f64().unwrap()).abs() < 1e-9);
            let lr = warmup_lr(cfg.lr, cfg.warmup_steps, opt.step_count() + 1);
            opt.step(&grads, lr).unwrap();
        }
        let got_p = p.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let got_q = q.to_vec1::<f64>().unwrap();
        for (a, b) in got_p
            .iter()
            .chain(&got_q)
            .zip(vec(&case["p"]).iter().chain(&vec(&case["q"])))
        {
            assert!((a - b).abs() < 1e-9, "{:?}: {a} vs {b}", case["kind"]);
        }
    }
}

/// The command line: finetune, decode, and a bad config's exit status and message.
#[test]
fn cli_finetune_and_decode() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_store(&root.join("train"), 12, 1, true, DIM);
    write_store(&root.join("valid"), 4, 2, true, DIM);
    std::fs::write(
        root.join("conf.toml"),
        CONFIG.replace("max_epochs = 4", "max_epochs = 1"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_speechcache");
    let out = Command::new(bin)
        .args(["finetune", "--quiet", "--train"])
        .arg(root.join("train"))
        .arg("--valid")
        .arg(root.join("valid"))
        .arg("--config")
        .arg(root.join("conf.toml"))
        .arg("--out")
        .arg(root.join("exp"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin)
        .args(["decode", "--quiet", "--beam", "3", "--exp"])
        .arg(root.join("exp"))
        .arg("--data")
        .arg(root.join("valid"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CER") && stdout.contains("WER"), "{stdout}");
    assert!(root
        .join("exp/decode_valid_avg_beam3/result.json")
        .is_file());

    // layer_weights.json: the softmax of the featurizer weights in `last`, against the store's
    // layer ids; `layers --top K` lists the heaviest
    let lw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("exp/layer_weights.json")).unwrap(),
    )
    .unwrap();
    let last =
        candle_core::safetensors::load(root.join("exp/checkpoints/last.safetensors"), &Device::Cpu)
            .unwrap();
    let raw: Vec<f32> = last["frontend.featurizer.weights"].to_vec1().unwrap();
    let z: f32 = raw.iter().map(|w| w.exp()).sum();
    let want: Vec<f32> = raw.iter().map(|w| w.exp() / z).collect();
    assert_eq!(lw["layers"], serde_json::json!([0, 1]));
    let got: Vec<f32> = lw["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-6,
            "layer weights {got:?} vs softmax {want:?}"
        );
    }
    let heaviest = if want[1] > want[0] { "1" } else { "0" };
    let top = |k: &str| {
        Command::new(bin)
            .args(["layers", "--top", k])
            .arg(root.join("exp"))
            .output()
            .unwrap()
    };
    let out = top("1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), heaviest);
    assert_eq!(String::from_utf8_lossy(&top("2").stdout).trim(), "0,1");
    let out = top("3");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top 3"));

    // collapse: every row is Σ_l w_l (h_l - mean_l) / std_l with the experiment's weights and
    // training statistics, recomputed here in f64 from the files; finetune and decode take it
    let collapsed = root.join("valid-collapsed");
    let out = Command::new(bin)
        .args(["collapse", "--quiet"])
        .arg(root.join("valid"))
        .arg("--exp")
        .arg(root.join("exp"))
        .arg("--out")
        .arg(&collapsed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("exp/global_stats.json")).unwrap())
            .unwrap();
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    let src = speechcache::store::FeatureStore::open(&root.join("valid")).unwrap();
    let dst = speechcache::store::FeatureStore::open(&collapsed).unwrap();
    assert_eq!(dst.layers(), &[0]);
    assert_eq!(dst.len(), src.len());
    let mut worst = 0f64;
    for i in 0..src.len() {
        assert_eq!(dst.rows()[i].id, src.rows()[i].id);
        assert_eq!(dst.rows()[i].text, src.rows()[i].text);
        let got = dst.to_array(i, 0).unwrap();
        let mut want = Array2::<f64>::zeros(got.dim());
        for (li, layer) in [0usize, 1].into_iter().enumerate() {
            let h = src.to_array(i, layer).unwrap();
            for ((t, d), v) in h.indexed_iter() {
                let mean = num(&stats["mean"][li][d]);
                let std = num(&stats["var"][li][d]).sqrt();
                want[[t, d]] += got_weight(&lw, li) * (*v as f64 - mean) / std;
            }
        }
        for (g, w) in got.iter().zip(want.iter()) {
            worst = worst.max((*g as f64 - w).abs() / w.abs().max(1.0));
        }
    }
    assert!(
        worst < 1e-3,
        "collapsed rows differ from the weighted sum by {worst:e}"
    );
    let err = Command::new(bin)
        .args(["collapse", "--quiet"])
        .arg(&collapsed)
        .arg("--exp")
        .arg(root.join("exp"))
        .arg("--out")
        .arg(root.join("twice"))
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("which the store does not hold"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    // a one-layer experiment on the collapsed stores trains and decodes
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let os = |p: &Path| p.as_os_str().to_owned();
    let train_c = root.join("train-collapsed");
    run(&[
        "collapse".as_ref(),
        "--quiet".as_ref(),
        &os(&root.join("train")),
        "--exp".as_ref(),
        &os(&root.join("exp")),
        "--out".as_ref(),
        &os(&train_c),
    ]);
    std::fs::write(
        root.join("conf-collapsed.toml"),
        CONFIG
            .replace("max_epochs = 4", "max_epochs = 1")
            .replace("normalize = \"global\"", "normalize = \"none\""),
    )
    .unwrap();
    run(&[
        "finetune".as_ref(),
        "--quiet".as_ref(),
        "--train".as_ref(),
        &os(&train_c),
        "--valid".as_ref(),
        &os(&collapsed),
        "--config".as_ref(),
        &os(&root.join("conf-collapsed.toml")),
        "--out".as_ref(),
        &os(&root.join("exp-collapsed")),
    ]);
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("exp-collapsed/experiment.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["layers"], serde_json::json!([0]));
    let stdout = run(&[
        "decode".as_ref(),
        "--quiet".as_ref(),
        "--exp".as_ref(),
        &os(&root.join("exp-collapsed")),
        "--data".as_ref(),
        &os(&collapsed),
    ]);
    assert!(stdout.contains("CER"), "{stdout}");

    std::fs::write(root.join("bad.toml"), "[optim]\nlearning_rate = 1\n").unwrap();
    let out = Command::new(bin)
        .args(["finetune", "--train"])
        .arg(root.join("train"))
        .arg("--valid")
        .arg(root.join("valid"))
        .arg("--config")
        .arg(root.join("bad.toml"))
        .arg("--out")
        .arg(root.join("exp_bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("learning_rate"),
        "{stderr}"
    );
    assert!(!root.join("exp_bad").exists());
}

/// `--max-minutes`: a budget that runs out at the first step closes the epoch early with
/// validation, checkpoints and averaging (a decodable experiment); `--resume` continues with the
/// next epoch, and a budget that does not run out trains to `max_epochs`.
#[test]
fn time_budget_ends_cleanly_and_resumes() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_store(&root.join("train"), 12, 1, true, DIM);
    write_store(&root.join("valid"), 4, 2, true, DIM);
    std::fs::write(
        root.join("conf.toml"),
        CONFIG.replace("max_epochs = 4", "max_epochs = 3"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_speechcache");
    let finetune = |extra: &[&str]| {
        let out = Command::new(bin)
            .args(["finetune", "--train"])
            .arg(root.join("train"))
            .arg("--valid")
            .arg(root.join("valid"))
            .arg("--config")
            .arg(root.join("conf.toml"))
            .arg("--out")
            .arg(root.join("exp"))
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let epochs = || {
        std::fs::read_to_string(root.join("exp/epoch_log.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    let stderr = finetune(&["--max-minutes", "0.00001"]);
    assert!(stderr.contains("time budget"), "{stderr}");
    assert!(stderr.contains("1 steps in this run"), "{stderr}");
    assert_eq!(
        epochs(),
        1,
        "the early-closed epoch is validated and logged"
    );
    let out = Command::new(bin)
        .args(["decode", "--quiet", "--exp"])
        .arg(root.join("exp"))
        .arg("--data")
        .arg(root.join("valid"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stderr = finetune(&["--resume", "--max-minutes", "0.00001"]);
    assert!(stderr.contains("resuming at epoch 2"), "{stderr}");
    assert_eq!(epochs(), 2);
    let stderr = finetune(&["--resume", "--max-minutes", "60"]);
    assert!(!stderr.contains("time budget"), "{stderr}");
    assert_eq!(
        epochs(),
        3,
        "a budget that does not run out trains to max_epochs"
    );

    let bad = Command::new(bin)
        .args(["finetune", "--max-minutes=0", "--train"])
        .arg(root.join("train"))
        .arg("--valid")
        .arg(root.join("valid"))
        .arg("--config")
        .arg(root.join("conf.toml"))
        .arg("--out")
        .arg(root.join("exp_bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("max_minutes"), "{stderr}");
}

/// A fixture for the command-line reliability tests: stores, a config with short epochs.
fn cli_fixture(max_epochs: usize) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_store(&root.join("train"), 24, 1, true, DIM);
    write_store(&root.join("valid"), 4, 2, true, DIM);
    let conf = CONFIG
        .replace("max_epochs = 4", &format!("max_epochs = {max_epochs}"))
        .replace("batch_frames = 600", "batch_frames = 150")
        .replace("dropout_rate = 0.1", "dropout_rate = 0.0")
        .replace(
            "positional_dropout_rate = 0.1",
            "positional_dropout_rate = 0.0",
        );
    std::fs::write(root.join("conf.toml"), conf).unwrap();
    tmp
}

/// `speechcache finetune` on the fixture into `root/exp`, with `extra` arguments.
fn finetune_cmd(root: &Path, exp: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = common::bin();
    cmd.args(["finetune", "--train"])
        .arg(root.join("train"))
        .arg("--valid")
        .arg(root.join("valid"))
        .arg("--config")
        .arg(root.join("conf.toml"))
        .arg("--out")
        .arg(root.join(exp))
        .args(extra);
    cmd
}

/// Kills a background run when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ready` for up to 20 s.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Issue 18 case 14: a second `finetune --resume` on an experiment being trained is refused at
/// once, naming the holder (pid, host, command), and writes nothing; `decode` beside it is
/// allowed (checkpoints are replaced atomically) and says who is training. After the holder is
/// killed with SIGKILL, its lock is gone with it and `--resume` continues.
#[test]
fn cli_second_run_on_one_experiment_is_refused_naming_the_holder() {
    let tmp = cli_fixture(100_000);
    let root = tmp.path();
    let exp = root.join("exp");
    let mut first = finetune_cmd(root, "exp", &["--quiet"]);
    first
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = KillOnDrop(first.spawn().unwrap());
    let pid = first.0.id();
    wait_for("the first run's first epoch", || avg_path(&exp).is_file());

    let before = bytes(&last_path(&exp).with_file_name("last.json"));
    let second = common::run_limited(finetune_cmd(root, "exp", &["--resume"]));
    let text = second.exited(2);
    assert!(
        text.contains("is being trained by")
            && text.contains(&format!("pid {pid}"))
            && text.contains("finetune")
            && text.contains(&exp.display().to_string()),
        "{text}"
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the first run died");
    // the refused run wrote nothing: the holder's checkpoint is still its own
    let after = bytes(&last_path(&exp).with_file_name("last.json"));
    let meta = |b: &[u8]| serde_json::from_slice::<checkpoint::CheckpointMeta>(b).unwrap();
    assert!(meta(&after).step >= meta(&before).step);

    let mut decode = common::bin();
    decode
        .args(["decode", "--exp"])
        .arg(&exp)
        .arg("--data")
        .arg(root.join("valid"))
        .arg("--out")
        .arg(root.join("dec"));
    let decoded = common::run_limited(decode);
    let text = decoded.exited(0);
    assert!(
        text.contains("is being trained by") && text.contains("CER"),
        "{text}"
    );

    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let resumed = common::run_limited(finetune_cmd(
        root,
        "exp",
        &["--resume", "--quiet", "--max-steps", "1"],
    ));
    resumed.exited(0);
    assert!(
        !exp.join(train::LOCK_FILE).exists(),
        "the lock file outlived its run"
    );
}

/// Issue 18 case 13 for experiments: a symlink planted at the lock's name, or at the name of a
/// temporary checkpoint file, is never followed; the victim file is left as it was.
#[test]
fn cli_planted_symlinks_in_an_experiment_are_not_followed() {
    let tmp = cli_fixture(1);
    let root = tmp.path();
    let exp = root.join("exp");
    let victim = root.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::create_dir_all(exp.join("checkpoints")).unwrap();
    std::os::unix::fs::symlink(&victim, exp.join(train::LOCK_FILE)).unwrap();
    let refused = common::run_limited(finetune_cmd(root, "exp", &["--quiet"]));
    let text = refused.exited(2);
    assert!(
        text.contains(train::LOCK_FILE) && text.contains("symbolic link"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    std::fs::remove_file(exp.join(train::LOCK_FILE)).unwrap();
    for name in [
        "checkpoints/last.tmp",
        "checkpoints/last.safetensors.tmp",
        "checkpoints/last.json.tmp",
        "epoch_log.tmp",
        "epoch_log.jsonl.tmp",
        "avg.tmp",
        "avg.safetensors.tmp",
    ] {
        std::os::unix::fs::symlink(&victim, exp.join(name)).unwrap();
    }
    let trained = common::run_limited(finetune_cmd(root, "exp", &["--quiet"]));
    trained.exited(0);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(last_path(&exp).is_file());

    // decode only looks at the lock to name a holder: a planted link does not stop it
    std::os::unix::fs::symlink(&victim, exp.join(train::LOCK_FILE)).unwrap();
    let mut decode = common::bin();
    decode
        .args(["decode", "--quiet", "--exp"])
        .arg(&exp)
        .arg("--data")
        .arg(root.join("valid"));
    common::run_limited(decode).exited(0);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

/// The read-only finding of issue 18: `last.safetensors` was renamed before `last.json`, so a
/// kill between the two renames resumed new weights with the old position. Simulated here by
/// putting the older sidecar back beside the newer tensors: the resumed run must still equal
/// an uninterrupted one byte for byte, and the sidecar is repaired. A leftover temporary file
/// from a kill before the first rename is ignored.
#[test]
fn cli_kill_between_checkpoint_renames_resumes_consistently() {
    let tmp = cli_fixture(3);
    let root = tmp.path();
    let run = |exp: &str, extra: &[&str]| {
        let mut args = vec!["--quiet"];
        args.extend_from_slice(extra);
        common::run_limited(finetune_cmd(root, exp, &args)).exited(0);
    };
    run("full", &[]);

    let exp = root.join("cut");
    let last = last_path(&exp);
    let side = checkpoint::sidecar(&last);
    run("cut", &["--max-steps", "2"]);
    let old_side = bytes(&side);
    run("cut", &["--resume", "--max-steps", "4"]);
    let meta: checkpoint::CheckpointMeta = serde_json::from_slice(&bytes(&side)).unwrap();
    assert_eq!(meta.step, 4);
    // the kill: new tensors renamed into place, the sidecar still the old one
    std::fs::write(&side, &old_side).unwrap();
    // and a half-written temporary of a later save
    std::fs::write(last.with_file_name("last.safetensors.tmp"), b"half").unwrap();
    let text = common::run_limited(finetune_cmd(root, "cut", &["--resume"]))
        .exited(0)
        .to_string();
    assert!(
        text.contains("step 4"),
        "resumed from the old sidecar: {text}"
    );

    let full = root.join("full");
    assert_eq!(
        bytes(&last_path(&full)),
        bytes(&last),
        "the resumed run differs from the uninterrupted one"
    );
    assert_eq!(bytes(&avg_path(&full)), bytes(&avg_path(&exp)));
    assert_eq!(bytes(&checkpoint::sidecar(&last_path(&full))), bytes(&side));
    let meta = checkpoint::load_meta::<checkpoint::CheckpointMeta>(&last).unwrap();
    assert!(meta.epoch_complete && meta.epoch == 3);
}

/// A kill after `last` but before the n-best pruning and the average: the resumed run (with
/// nothing left to train) finishes them, so `avg` matches the checkpointed history.
#[test]
fn resume_finishes_an_interrupted_average() {
    let tmp = cli_fixture(2);
    let root = tmp.path();
    common::run_limited(finetune_cmd(root, "exp", &["--quiet"])).exited(0);
    let exp = root.join("exp");
    let want = bytes(&avg_path(&exp));
    // as if killed before averaging: an older average (here: none at all)
    std::fs::remove_file(avg_path(&exp)).unwrap();
    std::fs::remove_file(checkpoint::sidecar(&avg_path(&exp))).unwrap();
    let text = common::run_limited(finetune_cmd(root, "exp", &["--resume"]))
        .exited(0)
        .to_string();
    assert!(text.contains("nothing to do"), "{text}");
    assert_eq!(bytes(&avg_path(&exp)), want);
}

/// f32 on the CPU: the CPU engine, unless the environment asks for candle tensor ops.
fn cpu_backend() -> speechcache::device::Backend {
    speechcache::device::Backend::new(Device::Cpu, candle_core::DType::F32).unwrap()
}

/// Weight `li` of a layer_weights.json value.
fn got_weight(lw: &serde_json::Value, li: usize) -> f64 {
    lw["weights"][li].as_f64().unwrap()
}
