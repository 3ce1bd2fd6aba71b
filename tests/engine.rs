//! The CPU training engine (`finetune::engine`) against the candle path it replaces on CPU
//! (`AsrModel::forward` + `ctc_loss` + autograd, itself checked against ESPnet, PyTorch's
//! ctc_loss and finite differences): the same per-utterance losses, the same gradient for
//! every trainable variable, the same batch-norm running statistics and eval logits, on
//! padded batches, with and without dropout (both paths draw the same dropout masks).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use speechcache::finetune::optim::NamedVars;
use speechcache::models::asr::conformer::{CnnModuleNorm, ConformerConfig, InputLayer};
use speechcache::models::asr::cpu::CpuEngine;
use speechcache::models::asr::{trainable_vars, AsrModel, AsrModelConfig, FeatureNormalize};
use speechcache::ops::ctc::ctc_loss;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rand_tensor(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * scale) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn all_vars(varmap: &VarMap) -> NamedVars {
    let mut v: NamedVars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

struct Case {
    name: &'static str,
    cfg: AsrModelConfig,
    layers: usize,
    dim: usize,
    frames: usize,
    lengths: Vec<usize>,
}

fn encoder(input_layer: InputLayer, norm: CnnModuleNorm, dropout: f64) -> ConformerConfig {
    ConformerConfig {
        output_size: 16,
        attention_heads: 4,
        linear_units: 24,
        num_blocks: 2,
        dropout_rate: dropout,
        positional_dropout_rate: dropout,
        attention_dropout_rate: dropout,
        cnn_module_kernel: 7,
        cnn_module_norm: norm,
        input_layer,
        ..ConformerConfig::default()
    }
}

fn cases(dropout: f64) -> Vec<Case> {
    let mut c = vec![
        Case {
            name: "conv2d, global stats, batch norm, 1 layer",
            cfg: AsrModelConfig {
                encoder: encoder(InputLayer::Conv2d, CnnModuleNorm::BatchNorm, dropout),
                ..AsrModelConfig::default()
            },
            layers: 1,
            dim: 20,
            frames: 43,
            lengths: vec![43, 30, 37],
        },
        Case {
            name: "conv2d2, 3 layers weighted, utterance mvn, preencoder, layer norm",
            cfg: AsrModelConfig {
                preencoder_output: Some(14),
                encoder: encoder(InputLayer::Conv2d2, CnnModuleNorm::LayerNorm, dropout),
                ..AsrModelConfig::default()
            },
            layers: 3,
            dim: 12,
            frames: 40,
            lengths: vec![40, 29],
        },
        Case {
            name: "linear input, 2 layers, no normalisation, no macaron, no conv module",
            cfg: AsrModelConfig {
                encoder: ConformerConfig {
                    macaron_style: false,
                    use_cnn_module: false,
                    ..encoder(InputLayer::Linear, CnnModuleNorm::BatchNorm, dropout)
                },
                ..AsrModelConfig::default()
            },
            layers: 2,
            dim: 10,
            frames: 17,
            lengths: vec![12, 17],
        },
    ];
    c[0].cfg.featurizer.normalize = FeatureNormalize::Global;
    c[1].cfg.featurizer.normalize = FeatureNormalize::Utterance;
    c[2].cfg.featurizer.normalize = FeatureNormalize::None;
    c
}

fn build(case: &Case, vocab: usize) -> (VarMap, AsrModel) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut model = AsrModel::new(vb, &case.cfg, case.layers, case.dim, vocab).unwrap();
    // No parameter keeps its default (unit norms, zero biases, equal layer weights).
    for (i, (name, var)) in all_vars(&varmap).iter().enumerate() {
        let t = var.as_tensor();
        let noise = rand_tensor(t.dims(), 100 + i as u64, 0.2);
        let value = if name.ends_with("running_var") {
            (noise.abs().unwrap() + 0.5).unwrap()
        } else {
            (t + noise).unwrap()
        };
        var.set(&value).unwrap();
    }
    if case.cfg.featurizer.normalize == FeatureNormalize::Global {
        let mean = rand_tensor(&[case.layers, case.dim], 7, 0.5);
        let std = (rand_tensor(&[case.layers, case.dim], 8, 0.5).abs().unwrap() + 0.7).unwrap();
        model.set_global_stats(&mean, &std).unwrap();
    }
    (varmap, model)
}

fn targets(n: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    (0..n)
        .map(|_| (0..3).map(|_| rng.random_range(1..vocab as u32)).collect())
        .collect()
}

/// Max |a - b| over max(|b|, floor): a relative error for the whole tensor.
fn rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn check_case(case: &Case, dropout_seed: Option<u64>) {
    let vocab = 9;
    let (varmap, model) = build(case, vocab);
    let all = all_vars(&varmap);
    let trainable = trainable_vars(&varmap);
    let feats = rand_tensor(
        &[case.lengths.len(), case.layers, case.frames, case.dim],
        3,
        2.0,
    );
    let tg = targets(case.lengths.len(), vocab);
    let scale = 0.37;
    let snapshot: Vec<Tensor> = all
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();

    // candle path, as the trainer ran it
    model.seed_dropout(dropout_seed.unwrap_or(1)).unwrap();
    let (logits, out_lens) = model.forward(&feats, &case.lengths, true).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let (per_utt, _) = ctc_loss(&lp, &tg, &out_lens, 0, true).unwrap();
    let want_losses = flat(&per_utt);
    let store = (per_utt.sum_all().unwrap() * scale)
        .unwrap()
        .backward()
        .unwrap();
    let want_grads: HashMap<String, Vec<f32>> = trainable
        .iter()
        .map(|(n, v)| (n.clone(), flat(store.get(v.as_tensor()).unwrap())))
        .collect();
    let want_stats: Vec<Vec<f32>> = all.iter().map(|(_, v)| flat(v.as_tensor())).collect();

    // engine, from the same parameters and dropout seed
    for ((_, v), s) in all.iter().zip(&snapshot) {
        v.set(s).unwrap();
    }
    model.seed_dropout(dropout_seed.unwrap_or(1)).unwrap();
    let engine = CpuEngine::new(&model, &all, &trainable).unwrap();
    let out = engine
        .train_step(&feats, &case.lengths, &tg, scale)
        .unwrap();
    assert_eq!(out.out_lengths, out_lens, "{}", case.name);
    let got_losses: Vec<f32> = out.losses.iter().map(|&l| l as f32).collect();
    let e = rel_err(&got_losses, &want_losses, 1.0);
    assert!(
        e < 1e-4,
        "{}: losses {got_losses:?} vs {want_losses:?}",
        case.name
    );
    // A gradient that is zero in exact arithmetic (a bias feeding batch norm) is rounding noise
    // in both paths: errors are relative to at least 1e-3 of the largest gradient.
    let floor = want_grads
        .values()
        .flat_map(|g| g.iter())
        .fold(0f32, |m, v| m.max(v.abs()))
        * 1e-3;
    let mut worst = (0f32, String::new());
    for ((name, _), g) in trainable.iter().zip(&out.grads) {
        let e = rel_err(&flat(g), &want_grads[name], floor);
        assert!(
            e < 2e-3,
            "{}: gradient of {name} differs (rel {e:e})",
            case.name
        );
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    println!(
        "{} (dropout {dropout_seed:?}): worst gradient rel err {:e} ({})",
        case.name, worst.0, worst.1
    );
    for ((name, v), want) in all.iter().zip(&want_stats) {
        let e = rel_err(&flat(v.as_tensor()), want, 1e-3);
        assert!(
            e < 1e-4,
            "{}: {name} after the step differs (rel {e:e})",
            case.name
        );
    }

    // eval forward
    let (want_logits, _) = model.forward(&feats, &case.lengths, false).unwrap();
    let (got_logits, lens) = engine
        .forward_eval(&engine.params().unwrap(), &feats, &case.lengths)
        .unwrap();
    assert_eq!(lens, out_lens);
    // compare valid frames only (padded frames are unspecified)
    for (u, &n) in lens.iter().enumerate() {
        let w = flat(&want_logits.get(u).unwrap().narrow(0, 0, n).unwrap());
        let g = flat(&got_logits.get(u).unwrap().narrow(0, 0, n).unwrap());
        let e = rel_err(&g, &w, 1.0);
        assert!(
            e < 1e-4,
            "{}: eval logits of utterance {u} (rel {e:e})",
            case.name
        );
    }
}

#[test]
fn engine_matches_candle_path_without_dropout() {
    for case in cases(0.0) {
        check_case(&case, None);
    }
}

#[test]
fn engine_matches_candle_path_with_dropout() {
    for case in cases(0.2) {
        check_case(&case, Some(11));
    }
}
