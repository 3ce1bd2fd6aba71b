//! Conformer encoder, its trainable ops and the ASR model: gradients against central finite
//! differences (f64 on CPU), gradient coverage of every trainable variable, padding
//! invariance, ESPnet length formulas, rel_shift and positional-encoding semantics.
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use speechcache::models::asr::conformer::{
    rel_positional_encoding, rel_shift, CnnModuleNorm, ConformerConfig, ConformerEncoder,
    ConformerError, InputLayer,
};
use speechcache::models::asr::{trainable_vars, AsrModel, AsrModelConfig, FeatureNormalize};
use speechcache::ops::{depthwise_conv1d, depthwise_conv1d_shift_add, layer_norm, DropoutRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
}

fn rand_tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rand_vec(n, seed), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Central finite differences of `loss` w.r.t. chosen elements of `var`, compared with the
/// analytic gradient; returns the largest error relative to max(1, |grad|).
fn check_var_grad(
    name: &str,
    var: &Var,
    analytic: &Tensor,
    loss: &dyn Fn() -> f64,
    max_elems: usize,
) -> f64 {
    let base = flat(var.as_tensor());
    let grad = flat(analytic);
    assert_eq!(base.len(), grad.len(), "{name}: gradient shape");
    let step = (base.len() / max_elems).max(1);
    let eps = 1e-6;
    let mut worst = 0f64;
    for i in (0..base.len()).step_by(step) {
        let mut v = base.clone();
        v[i] = base[i] + eps;
        var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let plus = loss();
        v[i] = base[i] - eps;
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let minus = loss();
        let numeric = (plus - minus) / (2.0 * eps);
        let err = (numeric - grad[i]).abs() / grad[i].abs().max(1.0);
        assert!(
            err < 1e-5,
            "{name}[{i}]: analytic {} vs numeric {numeric} (rel err {err:e})",
            grad[i]
        );
        worst = worst.max(err);
    }
    var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
    worst
}

fn weighted_sum(out: &Tensor, weights: &Tensor) -> Tensor {
    (out * weights).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn layer_norm_gradient_matches_finite_differences() {
    let x = Var::from_tensor(&rand_tensor(&[2, 3, 6], 1, DType::F64)).unwrap();
    let w = Var::from_tensor(&(rand_tensor(&[6], 2, DType::F64) + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&rand_tensor(&[6], 3, DType::F64)).unwrap();
    let r = rand_tensor(&[2, 3, 6], 4, DType::F64);
    let loss = || {
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        weighted_sum(&y, &r)
    };
    let grads = loss().backward().unwrap();
    let f = || scalar(&loss());
    for (name, var) in [("x", &x), ("weight", &w), ("bias", &b)] {
        let g = grads
            .get(var.as_tensor())
            .expect("gradient reaches every input");
        check_var_grad(name, var, g, &f, 64);
    }
    // Forward against a direct computation: row mean 0, biased variance 1 before the affine.
    let y = layer_norm(
        x.as_tensor(),
        &Tensor::ones(6, DType::F64, &Device::Cpu).unwrap(),
        &Tensor::zeros(6, DType::F64, &Device::Cpu).unwrap(),
        0.0,
    )
    .unwrap();
    for row in flat(&y).chunks(6) {
        let mean: f64 = row.iter().sum::<f64>() / 6.0;
        let var: f64 = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-10);
    }
}

/// Direct triple loop: y[b, t, c] = sum_k w[c, 0, k] * x[b, t + k - (K-1)/2, c].
fn depthwise_reference(
    x: &[f64],
    w: &[f64],
    (b, t, c, k): (usize, usize, usize, usize),
) -> Vec<f64> {
    let pad = (k - 1) / 2;
    let mut y = vec![0.0; b * t * c];
    for bi in 0..b {
        for ti in 0..t {
            for ci in 0..c {
                for kk in 0..k {
                    let src = ti as isize + kk as isize - pad as isize;
                    if src >= 0 && (src as usize) < t {
                        y[(bi * t + ti) * c + ci] +=
                            w[ci * k + kk] * x[(bi * t + src as usize) * c + ci];
                    }
                }
            }
        }
    }
    y
}

#[test]
fn depthwise_conv_forward_and_gradients() {
    // Includes a kernel longer than the sequence and an even kernel (asymmetric padding).
    for (case, &(b, t, c, k)) in [(2, 7, 5, 5), (1, 3, 4, 9), (3, 20, 3, 4), (2, 40, 17, 31)]
        .iter()
        .enumerate()
    {
        let seed = 10 * case as u64;
        let x = Var::from_tensor(&rand_tensor(&[b, t, c], seed, DType::F64)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[c, 1, k], seed + 1, DType::F64)).unwrap();
        let r = rand_tensor(&[b, t, c], seed + 2, DType::F64);

        let y = depthwise_conv1d(x.as_tensor(), w.as_tensor()).unwrap();
        let expected =
            depthwise_reference(&flat(x.as_tensor()), &flat(w.as_tensor()), (b, t, c, k));
        let composite = flat(&depthwise_conv1d_shift_add(x.as_tensor(), w.as_tensor()).unwrap());
        for ((a, e), s) in flat(&y).iter().zip(&expected).zip(&composite) {
            assert!(
                (a - e).abs() < 1e-12 && (s - e).abs() < 1e-12,
                "forward {a} {e} {s}"
            );
        }

        let loss = || weighted_sum(&depthwise_conv1d(x.as_tensor(), w.as_tensor()).unwrap(), &r);
        let grads = loss().backward().unwrap();
        let f = || scalar(&loss());
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        let gw = grads.get(w.as_tensor()).unwrap().clone();
        check_var_grad("dw-conv x", &x, &gx, &f, 200);
        check_var_grad("dw-conv weight", &w, &gw, &f, 200);

        // Same gradients as candle's autograd through the composite version.
        let ref_grads = weighted_sum(
            &depthwise_conv1d_shift_add(x.as_tensor(), w.as_tensor()).unwrap(),
            &r,
        )
        .backward()
        .unwrap();
        for (ours, theirs) in [(&gx, x.as_tensor()), (&gw, w.as_tensor())] {
            let theirs = ref_grads.get(theirs).unwrap();
            for (a, e) in flat(ours).iter().zip(flat(theirs)) {
                assert!((a - e).abs() < 1e-10);
            }
        }
    }
}

#[test]
fn depthwise_conv_f32_matches_f64() {
    let x = rand_tensor(&[2, 50, 33], 5, DType::F64);
    let w = rand_tensor(&[33, 1, 31], 6, DType::F64);
    let y64 = flat(&depthwise_conv1d(&x, &w).unwrap());
    let y32 = depthwise_conv1d(
        &x.to_dtype(DType::F32).unwrap(),
        &w.to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    for (a, e) in flat(&y32).iter().zip(&y64) {
        assert!((a - e).abs() < 1e-4);
    }
}

fn tiny_config(input_layer: InputLayer, norm: CnnModuleNorm, dropout: f64) -> ConformerConfig {
    ConformerConfig {
        output_size: 8,
        attention_heads: 2,
        linear_units: 12,
        num_blocks: 2,
        dropout_rate: dropout,
        positional_dropout_rate: dropout,
        attention_dropout_rate: dropout,
        input_layer,
        cnn_module_kernel: 5,
        cnn_module_norm: norm,
        ..ConformerConfig::default()
    }
}

/// A tiny Conformer (2 blocks) in f64, training mode without dropout (so batch statistics are
/// exercised), padded batch: gradients of the input and of sampled elements of every variable.
#[test]
fn conformer_gradient_matches_finite_differences() {
    let cases = [
        (
            InputLayer::Linear,
            CnnModuleNorm::BatchNorm,
            6usize,
            vec![6usize, 4],
        ),
        (
            InputLayer::Conv2d2,
            CnnModuleNorm::LayerNorm,
            13,
            vec![13, 10],
        ),
    ];
    for (layer, norm, frames, lengths) in cases {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        let cfg = tiny_config(layer, norm, 0.0);
        let input_size = 9;
        let enc = ConformerEncoder::new(vb, &cfg, input_size, &DropoutRng::new(1)).unwrap();
        let x = Var::from_tensor(&rand_tensor(&[2, frames, input_size], 7, DType::F64)).unwrap();
        let out_frames = layer.output_length(frames);
        let out_lengths: Vec<usize> = lengths.iter().map(|&l| layer.output_length(l)).collect();
        // Weights only on valid output frames: padded outputs are unspecified.
        let mut r = rand_vec(2 * out_frames * 8, 8);
        for (bi, &len) in out_lengths.iter().enumerate() {
            for v in &mut r[(bi * out_frames + len) * 8..(bi + 1) * out_frames * 8] {
                *v = 0.0;
            }
        }
        let r = Tensor::from_vec(r, (2, out_frames, 8), &dev).unwrap();
        let loss = || {
            let (y, lens) = enc.forward(x.as_tensor(), &lengths, true).unwrap();
            assert_eq!(lens, out_lengths);
            weighted_sum(&y, &r)
        };
        let grads = loss().backward().unwrap();
        let f = || scalar(&loss());
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        check_var_grad("input", &x, &gx, &f, 40);
        // Padded input frames do not influence valid outputs.
        for (bi, &len) in lengths.iter().enumerate() {
            let pad = gx.get(bi).unwrap().narrow(0, len, frames - len).unwrap();
            assert!(
                flat(&pad).iter().all(|v| v.abs() < 1e-12),
                "{layer:?}: padding leaks"
            );
        }
        let mut checked = 0;
        for (name, var) in trainable_vars(&varmap) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .clone();
            check_var_grad(&name, &var, &g, &f, 6);
            checked += 1;
        }
        assert!(checked > 40, "{layer:?}: only {checked} variables");
    }
}

/// ESPnet's own ConformerEncoder (espnet 202511, torch 2.5.1, float64, eval mode) on each
/// utterance alone, against our encoder on the padded batch: same weights (ESPnet's keys),
/// config parsed from ESPnet's encoder_conf names. See tests/fixtures/conformer/.
#[test]
fn matches_espnet_conformer_encoder() {
    for name in ["conv2d", "conv2d2", "linear_plain"] {
        let path = format!(
            "{}/tests/fixtures/conformer/espnet_{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let cfg: ConformerConfig = serde_json::from_str(&meta["config"]).unwrap();
        let input_size: usize = meta["input_size"].parse().unwrap();
        let lengths: Vec<usize> = serde_json::from_str(&meta["lengths"]).unwrap();
        let dev = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F64, &dev).unwrap();
        let x = vb
            .get((lengths.len(), lengths[0], input_size), "test.x")
            .unwrap();
        let enc = ConformerEncoder::new(vb.clone(), &cfg, input_size, &DropoutRng::new(0)).unwrap();
        let (y, lens) = enc.forward(&x, &lengths, false).unwrap();
        for (n, &len) in lens.iter().enumerate() {
            let want = vb
                .get((len, cfg.output_size), &format!("test.out.{n}"))
                .unwrap();
            let got = y.get(n).unwrap().narrow(0, 0, len).unwrap();
            let worst = flat(&got)
                .iter()
                .zip(flat(&want))
                .map(|(a, e)| (a - e).abs())
                .fold(0.0, f64::max);
            println!("{name} utterance {n}: max abs diff vs ESPnet {worst:e}");
            assert!(worst < 1e-6, "{name} utterance {n}: max diff {worst}");
        }
    }
}

fn asr_config(norm: CnnModuleNorm, dropout: f64) -> AsrModelConfig {
    AsrModelConfig {
        preencoder_output: Some(20),
        encoder: ConformerConfig {
            output_size: 16,
            attention_heads: 4,
            linear_units: 24,
            num_blocks: 2,
            dropout_rate: dropout,
            positional_dropout_rate: dropout,
            attention_dropout_rate: dropout,
            cnn_module_kernel: 7,
            cnn_module_norm: norm,
            ..ConformerConfig::default()
        },
        ..AsrModelConfig::default()
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = AsrModel::new(vb, &asr_config(CnnModuleNorm::BatchNorm, 0.1), 3, 12, 10).unwrap();
    model.seed_dropout(3).unwrap();
    let feats = rand_tensor(&[2, 3, 40, 12], 11, DType::F32);
    let running_before: Vec<(String, Vec<f64>)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.ends_with("running_mean"))
        .map(|(n, v)| (n.clone(), flat(v.as_tensor())))
        .collect();
    let (logits, lens) = model.forward(&feats, &[40, 29], true).unwrap();
    assert_eq!(logits.dims(), &[2, 9, 10]);
    assert_eq!(lens, vec![9, 6]);
    let loss = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .mul(&rand_tensor(&[2, 9, 10], 12, DType::F32))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = trainable_vars(&varmap);
    let total = varmap.all_vars().len();
    assert_eq!(
        total - vars.len(),
        4,
        "2 blocks x (running_mean, running_var)"
    );
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient (graph cut)"));
        let norm = scalar(&g.abs().unwrap().sum_all().unwrap());
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
    for needed in [
        "frontend.featurizer.weights",
        "preencoder.linear_out.weight",
        "encoder.embed.conv.0.weight",
        "encoder.embed.out.0.weight",
        "encoder.encoders.1.self_attn.pos_bias_u",
        "encoder.encoders.1.self_attn.linear_pos.weight",
        "encoder.encoders.0.conv_module.depthwise_conv.weight",
        "encoder.encoders.0.conv_module.norm.weight",
        "encoder.encoders.0.norm_ff_macaron.weight",
        "encoder.after_norm.bias",
        "ctc.ctc_lo.weight",
    ] {
        assert!(vars.iter().any(|(n, _)| n == needed), "missing {needed}");
    }
    // Training forwards update the batch-norm running statistics in place.
    let data = varmap.data().lock().unwrap();
    for (name, before) in running_before {
        assert_ne!(flat(data[&name].as_tensor()), before, "{name} not updated");
    }
    drop(data);
    let w = model.layer_weights().unwrap();
    assert_eq!(w.len(), 3);
    assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

/// AdamW on the trainable variables fits a tiny batch: the optimiser's in-place updates reach
/// every weight the forward uses (including reshaped and permuted views of variables).
#[test]
fn adamw_training_reduces_loss() {
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = asr_config(CnnModuleNorm::BatchNorm, 0.1);
    cfg.encoder.num_blocks = 1;
    let model = AsrModel::new(vb, &cfg, 2, 12, 5).unwrap();
    model.seed_dropout(7).unwrap();
    let feats = rand_tensor(&[2, 2, 30, 12], 70, DType::F32);
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let labels: Vec<u32> = (0..2 * 6).map(|_| rng.random_range(0..5)).collect();
    let labels = Tensor::from_vec(labels, 2 * 6, &dev).unwrap();
    let vars: Vec<Var> = trainable_vars(&varmap)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let params = candle_nn::ParamsAdamW {
        lr: 3e-3,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vars, params).unwrap();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (logits, lens) = model.forward(&feats, &[30, 30], true).unwrap();
        assert_eq!(lens, vec![6, 6]);
        let loss =
            candle_nn::loss::cross_entropy(&logits.reshape((12, 5)).unwrap(), &labels).unwrap();
        losses.push(scalar(&loss));
        opt.backward_step(&loss).unwrap();
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < 0.3 * first, "loss {first} -> {last}: {losses:?}");
}

/// A VarMap saved after training forwards (running statistics included) and loaded into a
/// fresh model through safetensors gives the same eval outputs.
#[test]
fn checkpoint_round_trip_keeps_outputs() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = asr_config(CnnModuleNorm::BatchNorm, 0.1);
    let model = AsrModel::new(vb, &cfg, 2, 12, 7).unwrap();
    let feats = rand_tensor(&[2, 2, 30, 12], 60, DType::F32);
    for _ in 0..3 {
        model.forward(&feats, &[30, 21], true).unwrap();
    }
    let (expected, _) = model.forward(&feats, &[30, 21], false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    varmap.save(&path).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev).unwrap() };
    let loaded = AsrModel::new(vb, &cfg, 2, 12, 7).unwrap();
    let (got, _) = loaded.forward(&feats, &[30, 21], false).unwrap();
    assert_eq!(flat(&got), flat(&expected));
}

/// An utterance alone and inside a longer padded batch (padding filled with noise) gives the
/// same logits on its valid frames.
#[test]
fn padding_does_not_change_outputs() {
    let dev = Device::Cpu;
    for (norm, normalize, train) in [
        (CnnModuleNorm::BatchNorm, FeatureNormalize::Utterance, false),
        (CnnModuleNorm::LayerNorm, FeatureNormalize::Utterance, true),
        (CnnModuleNorm::LayerNorm, FeatureNormalize::Global, false),
    ] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let mut cfg = asr_config(norm, 0.0);
        cfg.featurizer.normalize = normalize;
        let mut model = AsrModel::new(vb, &cfg, 2, 12, 7).unwrap();
        if normalize == FeatureNormalize::Global {
            let mean = rand_tensor(&[2, 12], 30, DType::F32);
            let std = (rand_tensor(&[2, 12], 31, DType::F32).abs().unwrap() + 0.5).unwrap();
            model.set_global_stats(&mean, &std).unwrap();
        }
        let (len_a, len_b) = (37, 61);
        let a = rand_tensor(&[1, 2, len_a, 12], 20, DType::F32);
        let b = rand_tensor(&[1, 2, len_b, 12], 21, DType::F32);
        let noise = (rand_tensor(&[1, 2, len_b - len_a, 12], 22, DType::F32) * 5.0).unwrap();
        let batch = Tensor::cat(&[&Tensor::cat(&[&a, &noise], 2).unwrap(), &b], 0).unwrap();
        let (alone, lens_alone) = model.forward(&a, &[len_a], train).unwrap();
        let (batched, lens) = model.forward(&batch, &[len_a, len_b], train).unwrap();
        assert_eq!(lens_alone, vec![8]);
        assert_eq!(lens, vec![8, 14]);
        let alone = flat(&alone);
        let batched = flat(&batched.get(0).unwrap().narrow(0, 0, 8).unwrap());
        let worst = alone
            .iter()
            .zip(&batched)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "{norm:?}/{normalize:?}: max diff {worst}");
    }
}

#[test]
fn subsampling_length_formulas() {
    // ESPnet: conv2d ((T-1)//2 - 1)//2, conv2d2 (T-1)//2 - 2, linear T.
    let cases = [
        (7, 1, 1),
        (8, 1, 1),
        (10, 1, 2),
        (11, 2, 3),
        (100, 24, 47),
        (101, 24, 48),
        (6, 0, 0),
        (0, 0, 0),
    ];
    for (t, conv2d, conv2d2) in cases {
        assert_eq!(InputLayer::Conv2d.output_length(t), conv2d, "conv2d T={t}");
        assert_eq!(
            InputLayer::Conv2d2.output_length(t),
            conv2d2,
            "conv2d2 T={t}"
        );
        assert_eq!(InputLayer::Linear.output_length(t), t);
    }
    // The tensors the encoder produces have exactly these lengths.
    let dev = Device::Cpu;
    for layer in [InputLayer::Conv2d, InputLayer::Conv2d2, InputLayer::Linear] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let enc = ConformerEncoder::new(
            vb,
            &tiny_config(layer, CnnModuleNorm::BatchNorm, 0.0),
            10,
            &DropoutRng::new(0),
        )
        .unwrap();
        for (t, lengths) in [(23usize, vec![23usize, 17, 9]), (9, vec![9, 7, 8])] {
            let x = rand_tensor(&[3, t, 10], 40, DType::F32);
            let (y, lens) = enc.forward(&x, &lengths, false).unwrap();
            assert_eq!(y.dims(), &[3, layer.output_length(t), 8], "{layer:?}");
            let expected: Vec<usize> = lengths.iter().map(|&l| layer.output_length(l)).collect();
            assert_eq!(lens, expected);
        }
        let short = rand_tensor(&[1, 6, 10], 41, DType::F32);
        let res = enc.forward(&short, &[6], false);
        if layer == InputLayer::Linear {
            assert!(res.is_ok());
        } else {
            assert!(matches!(
                res,
                Err(ConformerError::TooShort { frames: 6, .. })
            ));
        }
    }
}

#[test]
fn rel_shift_matches_espnet_semantics() {
    // x[0, 0, i, k] = 10 i + k for T = 3 (2T - 1 = 5 relative positions 2, 1, 0, -1, -2).
    // ESPnet's rel_shift picks out[i, j] = x[i, T - 1 - i + j], the score for position i - j.
    let x: Vec<f32> = (0..3)
        .flat_map(|i| (0..5).map(move |k| (10 * i + k) as f32))
        .collect();
    let x = Tensor::from_vec(x, (1, 1, 3, 5), &Device::Cpu).unwrap();
    let y: Vec<Vec<f32>> = rel_shift(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(
        y,
        vec![
            vec![2.0, 3.0, 4.0],
            vec![11.0, 12.0, 13.0],
            vec![20.0, 21.0, 22.0]
        ]
    );

    // Several batch/head slices, a longer sequence, against the index formula.
    let (b, h, t) = (2, 3, 6);
    let x = rand_tensor(&[b, h, t, 2 * t - 1], 50, DType::F64);
    let y = rel_shift(&x).unwrap();
    assert_eq!(y.dims(), &[b, h, t, t]);
    let (xv, yv) = (flat(&x), flat(&y));
    for s in 0..b * h {
        for i in 0..t {
            for j in 0..t {
                let want = xv[(s * t + i) * (2 * t - 1) + t - 1 - i + j];
                assert_eq!(yv[(s * t + i) * t + j], want);
            }
        }
    }
}

#[test]
fn rel_positional_encoding_matches_espnet_layout() {
    // T = 2, d = 4: rows are relative positions 1, 0, -1; div_term = [1, 10000^-0.5 = 0.01].
    let pe: Vec<Vec<f32>> = rel_positional_encoding(2, 4, DType::F32, &Device::Cpu)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let expected = [
        [1f64.sin(), 1f64.cos(), 0.01f64.sin(), 0.01f64.cos()],
        [0.0, 1.0, 0.0, 1.0],
        [(-1f64).sin(), 1f64.cos(), (-0.01f64).sin(), 0.01f64.cos()],
    ];
    for (row, want) in pe.iter().zip(expected) {
        for (a, e) in row.iter().zip(want) {
            assert!((*a as f64 - e).abs() < 1e-6, "{row:?} vs {want:?}");
        }
    }
}

#[test]
fn config_uses_espnet_names_and_rejects_unknown_fields() {
    let cfg: AsrModelConfig = serde_json::from_str(
        r#"{"featurizer": {"normalize": "global"}, "preencoder_output": 80,
            "encoder": {"output_size": 144, "attention_heads": 4, "linear_units": 1024,
                        "num_blocks": 12, "input_layer": "conv2d2", "macaron_style": true,
                        "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn",
                        "activation_type": "swish", "rel_pos_type": "latest",
                        "cnn_module_norm": "layer_norm"}}"#,
    )
    .unwrap();
    assert_eq!(cfg.encoder.input_layer, InputLayer::Conv2d2);
    assert_eq!(cfg.encoder.cnn_module_kernel, 31);
    assert_eq!(cfg.encoder.dropout_rate, 0.1);
    assert_eq!(cfg.featurizer.normalize, FeatureNormalize::Global);
    let defaults: ConformerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(defaults, ConformerConfig::default());
    assert!(serde_json::from_str::<ConformerConfig>(r#"{"outputsize": 3}"#).is_err());
    assert!(serde_json::from_str::<ConformerConfig>(r#"{"input_layer": "conv2d8"}"#).is_err());
    let bad = ConformerConfig {
        activation_type: "relu".into(),
        ..ConformerConfig::default()
    };
    assert!(matches!(
        bad.validate(80),
        Err(ConformerError::Config {
            field: "activation_type",
            ..
        })
    ));
    let bad = ConformerConfig {
        attention_heads: 3,
        ..ConformerConfig::default()
    };
    assert!(bad.validate(80).is_err());
}

/// Timing of the depthwise conv on the Conformer shape B8·C256·T500·k31 (run with
/// `cargo test --release --test conformer -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_depthwise_conv() {
    use std::time::Instant;
    let (b, t, c, k) = (8, 500, 256, 31);
    let x = Var::from_tensor(&rand_tensor(&[b, t, c], 1, DType::F32)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[c, 1, k], 2, DType::F32)).unwrap();
    let reps = 10;
    let time = |label: &str, f: &dyn Fn() -> Tensor, backward: bool| {
        let _ = f();
        let start = Instant::now();
        for _ in 0..reps {
            let y = f();
            if backward {
                y.sum_all().unwrap().backward().unwrap();
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0 / reps as f64;
        println!("{label}: {ms:.1} ms");
    };
    let custom = || depthwise_conv1d(x.as_tensor(), w.as_tensor()).unwrap();
    let shift_add = || depthwise_conv1d_shift_add(x.as_tensor(), w.as_tensor()).unwrap();
    // candle's grouped conv needs channel-major input.
    let grouped = || {
        x.as_tensor()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .conv1d(w.as_tensor(), (k - 1) / 2, 1, 1, c)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    time("custom op fwd", &custom, false);
    time("custom op fwd+bwd", &custom, true);
    time("shift-add fwd", &shift_add, false);
    time("shift-add fwd+bwd", &shift_add, true);
    time(
        "candle grouped conv fwd (incl. transposes)",
        &grouped,
        false,
    );
    time(
        "candle grouped conv fwd+bwd (incl. transposes)",
        &grouped,
        true,
    );
}

/// One training step's forward and backward of the default ESPnet SSL-recipe-sized model
/// (6 blocks, d 256, 2048 FF units, conv2d2, linear pre-encoder 768 → 80) on B8 x 10 s of
/// 50 Hz features from 4 layers (run with `-- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_asr_model_step() {
    use std::time::Instant;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = AsrModelConfig {
        preencoder_output: Some(80),
        encoder: ConformerConfig {
            input_layer: InputLayer::Conv2d2,
            ..ConformerConfig::default()
        },
        ..AsrModelConfig::default()
    };
    let model = AsrModel::new(vb, &cfg, 4, 768, 32).unwrap();
    let feats = rand_tensor(&[8, 4, 500, 768], 1, DType::F32);
    let lengths = [500, 480, 460, 440, 420, 400, 380, 360];
    for rep in 0..3 {
        let start = Instant::now();
        let (logits, _) = model.forward(&feats, &lengths, true).unwrap();
        let fwd = start.elapsed().as_secs_f64();
        let grads = logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        let total = start.elapsed().as_secs_f64();
        assert!(grads.get(varmap.all_vars()[0].as_tensor()).is_some());
        println!(
            "rep {rep}: forward {:.0} ms, forward+backward {:.0} ms",
            fwd * 1e3,
            total * 1e3
        );
    }
}
