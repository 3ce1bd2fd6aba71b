//! Long utterances (#22): the CPU engine's blockwise attention and windowed conv front end
//! against transformers 4.46.3 on a 2,099-frame input (fixtures: tests/fixtures/gen_long.py),
//! the same bits on one thread or the pool, `--chunk-seconds` stitching, and extract's
//! schedule of a long utterance among short ones.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{assert_same_tree, bin, noise_wav, ok, s};
use speechcache::models::ssl::chunk::Chunking;
use speechcache::models::ssl::config::Wav2Vec2Config;
use speechcache::models::ssl::{CpuEncoder, LinearLayout, Wav2Vec2Model};
use speechcache::store::FeatureStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/long")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn checkpoint(variant: &str) -> HashMap<String, Tensor> {
    load(&fixtures().join(variant).join("model.safetensors"))
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v");
            (k, v)
        })
        .collect()
}

fn config(variant: &str) -> Wav2Vec2Config {
    Wav2Vec2Config::from_file(&fixtures().join(variant).join("config.json")).unwrap()
}

fn engine(variant: &str) -> CpuEncoder {
    let vb = VarBuilder::from_tensors(checkpoint(variant), DType::F32, &Device::Cpu);
    CpuEncoder::load(vb, &config(variant), LinearLayout::OutIn).unwrap()
}

fn wave() -> Vec<f32> {
    load(&fixtures().join("input.safetensors"))["wave"]
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// (variant, kept states) as the generator wrote them.
const VARIANTS: [(&str, &[usize]); 2] = [("base", &[0, 2]), ("large", &[2])];

#[test]
fn long_input_matches_transformers_on_both_executors() {
    let wave = wave();
    for (variant, keep) in VARIANTS {
        let refs = load(&fixtures().join(variant).join("refs.safetensors"));
        let engine = engine(variant);
        let (serial, t) = engine.forward(&wave, keep, false).unwrap();
        assert!(t >= 2000, "{variant}: {t} frames");
        // many query blocks, key tiles and front-end windows; the pool gives the same bits
        let (parallel, _) = engine.forward(&wave, keep, true).unwrap();
        assert!(serial == parallel, "{variant}: the pool changed the bits");
        let vb = VarBuilder::from_tensors(checkpoint(variant), DType::F32, &Device::Cpu);
        let tensor_ops = Wav2Vec2Model::load(vb, &config(variant)).unwrap();
        let input = Tensor::from_vec(wave.clone(), (1, wave.len()), &Device::Cpu).unwrap();
        let (states, _) = tensor_ops.forward(&input, &[wave.len()], 2).unwrap();
        for (k, &j) in keep.iter().enumerate() {
            let want = refs[&format!("hidden{j}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = max_diff(&serial[k], &want);
            assert!(d < 1e-4, "{variant} state {j}: CPU engine {d}");
            let got = states[j].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{variant} state {j}: tensor ops {d}");
        }
    }
}

#[test]
fn attention_tiles_change_only_the_rounding() {
    let wave = wave();
    for (variant, keep) in VARIANTS {
        let mut engine = engine(variant);
        let (default, _) = engine.forward(&wave, keep, false).unwrap();
        engine.set_attention_blocks(7, 33);
        let (odd, _) = engine.forward(&wave, keep, true).unwrap();
        for (a, b) in default.iter().zip(&odd) {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "{variant}: {d}");
        }
    }
}

#[test]
fn chunked_forward_stitches_the_windows() {
    let wave = wave();
    let keep = [0, 1, 2];
    let mut engine = engine("base");
    let cfg = config("base");
    let (whole, t) = engine.forward(&wave, &keep, false).unwrap();
    // 1 s windows (400 frames) with 0.25 s of context each side
    let chunking = Chunking {
        seconds: 1.0,
        context: 0.25,
    };
    engine.set_chunking(Some(chunking));
    let (chunked, t2) = engine.forward(&wave, &keep, true).unwrap();
    assert_eq!(t, t2, "chunking changed the frame count");
    // every window's kept frames are that window run alone, whole
    let windows = chunking.windows(&cfg, wave.len()).unwrap();
    assert!(windows.len() >= 5);
    let h = cfg.hidden_size;
    engine.set_chunking(None);
    let mut at = 0;
    for w in &windows {
        let (alone, _) = engine
            .forward(&wave[w.samples.clone()], &keep, false)
            .unwrap();
        for (k, state) in alone.iter().enumerate() {
            let want = &state[w.keep.start * h..w.keep.end * h];
            let got = &chunked[k][at * h..(at + w.keep.len()) * h];
            assert!(want == got, "window {w:?} state {k}");
        }
        at += w.keep.len();
    }
    assert_eq!(at, t);
    // and the values drift from the whole-utterance run, but not wildly
    let last = |v: &Vec<Vec<f32>>| v[2].clone();
    let (a, b) = (last(&whole), last(&chunked));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let rel = max_diff(&a, &b) / scale;
    let mean_abs = a.iter().map(|v| v.abs()).sum::<f32>() / a.len() as f32;
    let mean_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    println!(
        "chunked vs whole, last state: max diff {rel:.3} of the max |value|, mean diff {:.4} of the mean |value|",
        mean_diff / mean_abs
    );
    assert!(rel > 0.0 && rel < 1.0, "{rel}");
    // with context past both ends every window sees the whole utterance: the same bits
    engine.set_chunking(Some(Chunking {
        seconds: 1.0,
        context: 10.0,
    }));
    let (everything, _) = engine.forward(&wave, &keep, false).unwrap();
    assert!(
        everything == whole,
        "full-context windows differ from the whole run"
    );
}

/// A long utterance (6 s: 2,399 frames at 400 frames/s, past the engine's long threshold)
/// among short ones: one thread or two write the same bytes, resumable as any run; over the
/// limit it gets an error row that says what lifting the limit takes; chunked, the same
/// frame counts.
#[test]
fn extract_schedules_a_long_utterance_among_short_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let wavs = tmp.path().join("wavs");
    std::fs::create_dir_all(&wavs).unwrap();
    for (i, secs) in [1.0, 1.5, 6.0, 0.8, 1.2, 0.9].iter().enumerate() {
        noise_wav(&wavs.join(format!("u{i}.wav")), *secs, i as u32 + 7);
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
    let model = fixtures().join("base");
    let extract = |out: &Path, threads: &str, extra: &[&str]| {
        let out = bin()
            .env("RAYON_NUM_THREADS", threads)
            .env("SPEECHCACHE_ENGINE", "cpu-engine")
            .args([
                "extract",
                "--quiet",
                "--data",
                s(&audio),
                "--model",
                s(&model),
            ])
            .args(["--out", s(out)])
            .args(extra)
            .output()
            .unwrap();
        ok(&out);
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    extract(&one, "1", &[]);
    extract(&two, "2", &[]);
    assert_same_tree(&one, &two);
    let store = FeatureStore::open(&two).unwrap();
    let frames: Vec<usize> = (0..store.len())
        .map(|i| store.to_array(i, 0).unwrap().nrows())
        .collect();
    assert_eq!(frames.len(), 6);
    assert!(frames[2] >= 2000, "{frames:?}");

    let capped = tmp.path().join("capped");
    extract(&capped, "2", &["--max-seconds-per-utterance", "5"]);
    let errors = std::fs::read_to_string(capped.join("errors.jsonl")).unwrap();
    for needle in [
        "6.0 s is longer than",
        "--max-seconds-per-utterance 6 extracts it",
        "of memory",
        "--chunk-seconds",
    ] {
        assert!(errors.contains(needle), "{needle}: {errors}");
    }
    assert_eq!(FeatureStore::open(&capped).unwrap().len(), 5);

    let chunked = tmp.path().join("chunked");
    extract(
        &chunked,
        "2",
        &["--chunk-seconds", "2", "--chunk-context", "0.5"],
    );
    let store = FeatureStore::open(&chunked).unwrap();
    let chunked_frames: Vec<usize> = (0..store.len())
        .map(|i| store.to_array(i, 0).unwrap().nrows())
        .collect();
    assert_eq!(chunked_frames, frames);
    let meta = std::fs::read_to_string(chunked.join("meta.json")).unwrap();
    assert!(meta.contains("chunking"), "{meta}");
}
