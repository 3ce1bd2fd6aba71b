//! One whole finetuning step against PyTorch, parameter by parameter.
//!
//! The reference (tests/fixtures/conformer/make_espnet_grads.py, torch 2.5.1 + ESPnet 202511,
//! float64) is our `AsrModel` built from ESPnet's own ConformerEncoder with the normalisation,
//! s3prl featurizer, linear pre-encoder and `ctc.ctc_lo` in plain torch. It runs one
//! training-mode forward (dropout 0, batch-norm batch statistics) on a batch of equal-length
//! utterances, takes the mean over utterances of the per-utterance CTC loss (blank 0,
//! zero_infinity) and backpropagates. Each fixture holds the weights before the step, the
//! inputs, the loss, `grad.<name>` for every trainable parameter and `after.<name>` for the
//! batch-norm running statistics after the step.
//!
//! Plugging in a training engine:
//! - write `fn my_engine(model, varmap, feats, lengths, targets) -> (loss, grads)` with the
//!   [`Engine`] signature: from the model (fixture weights loaded, CPU, f64), its `VarMap`, the
//!   features `[B, L, T, D]`, the lengths and the targets, run one training step's forward and
//!   backward; return the loss and the gradient of every trainable variable by `VarMap` name,
//!   and leave the batch-norm running statistics in the `VarMap` updated as a training forward
//!   does;
//! - add one line `("my engine", my_engine),` to [`ENGINES`].
//!
//! [`check_against_torch`] then checks it on every fixture, like [`candle_autograd`] (the path
//! the trainer runs today). Run with `-- --nocapture` to see the measured errors.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use speechcache::finetune::tokenizer::Tokenizer;
use speechcache::models::asr::{trainable_vars, AsrModel, AsrModelConfig, FeatureNormalize};
use speechcache::ops::ctc::ctc_loss;

/// What a training step returns: the loss and each trainable variable's gradient by name.
type Step = (f64, HashMap<String, Tensor>);

/// One training step: `(model, varmap, feats, lengths, targets) -> (loss, grads by name)`.
type Engine = fn(&AsrModel, &VarMap, &Tensor, &[usize], &[Vec<u32>]) -> Step;

/// How close an engine must come to torch (see the constants below for f64).
#[derive(Clone, Copy)]
struct Tolerance {
    /// The dtype the model is built in.
    dtype: DType,
    loss: f64,
    grad: f64,
    /// Smallest gradient scale: max(this, `grad_floor_rel` x the largest gradient of the step).
    grad_floor: f64,
    grad_floor_rel: f64,
    stat: f64,
}

/// candle's autograd in f64: f64 roundoff.
const F64_TOL: Tolerance = Tolerance {
    dtype: DType::F64,
    loss: LOSS_TOL,
    grad: GRAD_TOL,
    grad_floor: GRAD_SCALE_FLOOR,
    grad_floor_rel: 0.0,
    stat: STAT_TOL,
};

/// The CPU engine computes in f32 (float32 roundoff, ~1e-7 per op, over a few hundred ops);
/// gradients that are zero in exact arithmetic hold f32 noise, hence the relative floor.
const F32_TOL: Tolerance = Tolerance {
    dtype: DType::F32,
    loss: 1e-5,
    grad: 1e-3,
    grad_floor: GRAD_SCALE_FLOOR,
    grad_floor_rel: 5e-3,
    stat: 1e-5,
};

/// Every engine checked against every fixture.
const ENGINES: &[(&str, Engine, Tolerance)] = &[
    ("candle autograd", candle_autograd, F64_TOL),
    ("cpu engine (f32)", cpu_engine, F32_TOL),
];

/// The trainer's CPU path (`models::asr::cpu::CpuEngine::train_step`): hand-written forward
/// and backward in f32.
fn cpu_engine(
    model: &AsrModel,
    varmap: &VarMap,
    feats: &Tensor,
    lengths: &[usize],
    targets: &[Vec<u32>],
) -> Step {
    let mut all: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let trainable = trainable_vars(varmap);
    let engine = speechcache::models::asr::cpu::CpuEngine::new(model, &all, &trainable).unwrap();
    let n = targets.len() as f64;
    let out = engine.train_step(feats, lengths, targets, 1.0 / n).unwrap();
    let loss = out.losses.iter().sum::<f64>() / n;
    let by_name = trainable
        .iter()
        .zip(out.grads)
        .map(|((name, _), g)| (name.clone(), g))
        .collect();
    (loss, by_name)
}

/// conv2d + global normalisation + 1 layer; conv2d2 + utterance MVN + 3 layers + pre-encoder;
/// linear input layer without macaron or normalisation, 2 layers.
const FIXTURES: &[&str] = &["conv2d_global", "conv2d2_utterance", "linear_none"];

// Tolerances. candle's autograd agrees with torch to f64 roundoff (~1e-13) given the same
// float32 positional table; the table's sin/cos/exp differ from torch's by an ulp in a few
// entries (see the fixture script), which moves the loss by ~1e-11 and the gradients by up to
// ~1e-8 of their size. A weight changed by one part in a million fails the loss check.

/// |loss - torch| / |torch|.
const LOSS_TOL: f64 = 1e-9;
/// max |grad - torch| / max |torch grad|, per parameter.
const GRAD_TOL: f64 = 1e-7;
/// Smallest max |torch grad| the gradient error is divided by: some gradients are zero in exact
/// arithmetic (`linear_k.bias`, by softmax's shift invariance; `depthwise_conv.bias`, before a
/// training-mode batch norm) and hold only roundoff (~1e-16) in both.
const GRAD_SCALE_FLOOR: f64 = 1e-5;
/// max |stat - torch| / max |torch stat|, running statistics after the step.
const STAT_TOL: f64 = 1e-9;

/// The trainer's step (`train.rs` `utterance_losses` and `Stepper::run`): training forward,
/// log_softmax, per-utterance CTC, mean over utterances, candle's autograd backward.
fn candle_autograd(
    model: &AsrModel,
    varmap: &VarMap,
    feats: &Tensor,
    lengths: &[usize],
    targets: &[Vec<u32>],
) -> Step {
    let (logits, out_lengths) = model.forward(feats, lengths, true).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let (per_utt, _) =
        ctc_loss(&log_probs, targets, &out_lengths, Tokenizer::BLANK_ID, true).unwrap();
    let loss = (per_utt.sum_all().unwrap() / targets.len() as f64).unwrap();
    let grads = loss.backward().unwrap();
    let by_name = trainable_vars(varmap)
        .into_iter()
        .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
        .collect();
    (loss.to_scalar::<f64>().unwrap(), by_name)
}

#[test]
fn training_step_matches_torch() {
    for (engine, run, tol) in ENGINES {
        for fixture in FIXTURES {
            println!("{engine} / {fixture}:");
            check_against_torch(fixture, *tol, run);
        }
    }
}

/// The check is tight enough to see a gradient that is off by one part in a million.
#[test]
#[should_panic(expected = "encoder.encoders.1.feed_forward.w_2.weight: gradient")]
fn check_detects_a_slightly_wrong_gradient() {
    fn off_by_1e6(
        model: &AsrModel,
        varmap: &VarMap,
        feats: &Tensor,
        lengths: &[usize],
        targets: &[Vec<u32>],
    ) -> Step {
        let (loss, mut grads) = candle_autograd(model, varmap, feats, lengths, targets);
        let name = "encoder.encoders.1.feed_forward.w_2.weight";
        let g = (&grads[name] * (1.0 + 1e-6)).unwrap();
        grads.insert(name.to_string(), g);
        (loss, grads)
    }
    check_against_torch("linear_none", F64_TOL, off_by_1e6);
}

/// A fixture's inputs, weights and expected results.
struct Fixture {
    config: AsrModelConfig,
    layers: usize,
    feat_dim: usize,
    vocab: usize,
    lengths: Vec<usize>,
    targets: Vec<Vec<u32>>,
    out_lengths: Vec<usize>,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &str) -> Self {
        let path = format!(
            "{}/tests/fixtures/conformer/grads_{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let json = |key: &str| meta[key].as_str();
        Self {
            config: serde_json::from_str(json("config")).unwrap(),
            layers: json("num_layers_in").parse().unwrap(),
            feat_dim: json("feat_dim").parse().unwrap(),
            vocab: json("vocab").parse().unwrap(),
            lengths: serde_json::from_str(json("lengths")).unwrap(),
            targets: serde_json::from_str(json("targets")).unwrap(),
            out_lengths: serde_json::from_str(json("out_lengths")).unwrap(),
            tensors: candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no `{key}`"))
    }

    /// Model weights and running statistics: every key that is not an input or a result.
    fn weight_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| {
                !(k.starts_with("grad.")
                    || k.starts_with("after.")
                    || k.starts_with("global.")
                    || *k == "x"
                    || *k == "loss")
            })
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect();
        names.sort();
        names
    }
}

/// Builds our model in f64 with the fixture's weights, runs `run` (one training step) and checks
/// its loss, every trainable parameter's gradient and the running statistics after the step.
fn check_against_torch(
    fixture: &str,
    tol: Tolerance,
    run: impl Fn(&AsrModel, &VarMap, &Tensor, &[usize], &[Vec<u32>]) -> Step,
) {
    let fx = Fixture::load(fixture);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, tol.dtype, &dev);
    let mut model = AsrModel::new(vb, &fx.config, fx.layers, fx.feat_dim, fx.vocab).unwrap();
    if fx.config.featurizer.normalize == FeatureNormalize::Global {
        model
            .set_global_stats(fx.get("global.mean"), fx.get("global.std"))
            .unwrap();
    }
    load_weights(fixture, &fx, &varmap);
    let trainable: Vec<String> = trainable_vars(&varmap)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        trainable,
        fx.with_prefix("grad."),
        "{fixture}: our trainable variables vs torch's parameters"
    );
    let input_layer = fx.config.encoder.input_layer;
    let out_lengths: Vec<usize> = fx
        .lengths
        .iter()
        .map(|&n| input_layer.output_length(n))
        .collect();
    assert_eq!(
        out_lengths, fx.out_lengths,
        "{fixture}: encoder output lengths"
    );

    let (loss, grads) = run(&model, &varmap, fx.get("x"), &fx.lengths, &fx.targets);

    let want = fx.get("loss").to_scalar::<f64>().unwrap();
    let loss_err = (loss - want).abs() / want.abs();
    println!("  loss {loss:.12} (torch {want:.12}), rel err {loss_err:.1e}");
    assert!(
        loss_err <= tol.loss,
        "{fixture}: loss {loss} vs torch {want} (rel err {loss_err:e} > {:e})",
        tol.loss
    );
    let largest = trainable
        .iter()
        .map(|n| max_abs(fx.get(&format!("grad.{n}"))))
        .fold(0.0, f64::max);
    let floor = tol.grad_floor.max(tol.grad_floor_rel * largest);

    let mut errors: Vec<(f64, &str)> = Vec::new();
    let mut failures = Vec::new();
    for name in &trainable {
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("{fixture}: {name}: no gradient"));
        let want = fx.get(&format!("grad.{name}"));
        assert_eq!(got.dims(), want.dims(), "{fixture}: {name}: gradient shape");
        let scale = max_abs(want).max(floor);
        let err = max_abs_diff(got, want) / scale;
        if err > tol.grad {
            failures.push(format!(
                "{name}: gradient differs from torch by {err:.2e} of max |grad| {scale:.3e}"
            ));
        }
        errors.push((err, name));
    }
    errors.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "  {} gradients, worst {:.1e} ({})",
        errors.len(),
        errors[0].0,
        errors[0].1
    );
    assert!(
        failures.is_empty(),
        "{fixture}: {} of {} gradients beyond {:e}:\n{}",
        failures.len(),
        trainable.len(),
        tol.grad,
        failures.join("\n")
    );

    let stats = fx.with_prefix("after.");
    assert!(!stats.is_empty(), "{fixture}: no running statistics");
    let vars = varmap.data().lock().unwrap();
    let mut worst_stat = 0f64;
    for name in &stats {
        let want = fx.get(&format!("after.{name}"));
        let err = max_abs_diff(vars[name].as_tensor(), want) / max_abs(want);
        assert!(
            err <= tol.stat,
            "{fixture}: {name} after the step differs from torch by {err:.2e} of its max"
        );
        worst_stat = worst_stat.max(err);
    }
    println!(
        "  {} running statistics after the step, worst {worst_stat:.1e}",
        stats.len()
    );
}

/// Sets every variable of `varmap` from the fixture, which must hold exactly these names.
fn load_weights(fixture: &str, fx: &Fixture, varmap: &VarMap) {
    let vars = varmap.data().lock().unwrap();
    let mut ours: Vec<String> = vars.keys().cloned().collect();
    ours.sort();
    assert_eq!(
        ours,
        fx.weight_names(),
        "{fixture}: our variables vs torch's state dict"
    );
    for (name, var) in vars.iter() {
        var.set(&fx.get(name).to_dtype(var.dtype()).unwrap())
            .unwrap_or_else(|e| panic!("{fixture}: {name}: {e}"));
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b).unwrap())
}
