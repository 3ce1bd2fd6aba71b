//! CTC loss and decoding against independent references: brute-force enumeration of every
//! alignment on tiny inputs, finite differences, and PyTorch's `ctc_loss`
//! (fixtures from tests/fixtures/gen_ctc.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use ndarray::Array2;
use speechcache::finetune::search::{greedy, prefix_beam_search};
use speechcache::ops::ctc::{ctc_loss, ctc_loss_from_logits, reduce, CtcStats, Reduction};

// ---------- independent references ----------

fn log_softmax_rows(logits: &[f64], classes: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|x| x - lse));
    }
    out
}

fn collapse(path: &[u32], blank: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = None;
    for &p in path {
        if Some(p) != prev && p != blank {
            out.push(p);
        }
        prev = Some(p);
    }
    out
}

/// Every path of `frames` labels over `classes`, with its probability under `lp` ([T, C] log).
fn all_paths(lp: &[f64], frames: usize, classes: usize) -> Vec<(Vec<u32>, f64)> {
    let total = classes.pow(frames as u32);
    (0..total)
        .map(|mut code| {
            let mut path = Vec::with_capacity(frames);
            let mut log_p = 0.0;
            for t in 0..frames {
                let k = code % classes;
                code /= classes;
                path.push(k as u32);
                log_p += lp[t * classes + k];
            }
            (path, log_p.exp())
        })
        .collect()
}

/// -ln sum over all alignments that collapse to `target` (first `frames` rows of `logits`).
fn brute_force_loss(logits: &[f64], frames: usize, classes: usize, target: &[u32]) -> f64 {
    let lp = log_softmax_rows(&logits[..frames * classes], classes);
    let p: f64 = all_paths(&lp, frames, classes)
        .into_iter()
        .filter(|(path, _)| collapse(path, 0) == target)
        .map(|(_, p)| p)
        .sum();
    -p.ln()
}

fn finite_difference_grad(
    logits: &[f64],
    frames: usize,
    classes: usize,
    target: &[u32],
) -> Vec<f64> {
    let h = 1e-5;
    let mut x = logits.to_vec();
    (0..logits.len())
        .map(|i| {
            let keep = x[i];
            x[i] = keep + h;
            let up = brute_force_loss(&x, frames, classes, target);
            x[i] = keep - h;
            let down = brute_force_loss(&x, frames, classes, target);
            x[i] = keep;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Our loss and d(reduced loss)/d(logits) through autograd: candle's log_softmax then
/// `ctc_loss`, or `ctc_loss_from_logits` when `fused`.
#[allow(clippy::too_many_arguments)]
fn ours(
    fused: bool,
    logits: &[f64],
    shape: (usize, usize, usize),
    dtype: DType,
    targets: &[Vec<u32>],
    lengths: &[usize],
    zero_infinity: bool,
    reduction: Reduction,
) -> (Vec<f64>, Vec<f64>, CtcStats) {
    let x = Tensor::from_vec(logits.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let (losses, stats) = if fused {
        ctc_loss_from_logits(x.as_tensor(), targets, lengths, 0, zero_infinity).unwrap()
    } else {
        let lp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        ctc_loss(&lp, targets, lengths, 0, zero_infinity).unwrap()
    };
    let objective = match reduction {
        Reduction::None => losses.sum_all().unwrap(),
        r => reduce(&losses, targets, r).unwrap(),
    };
    let grads = objective.backward().unwrap();
    let grad = grads.get(x.as_tensor()).expect("logits get a gradient");
    let to_vec = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (to_vec(&losses), to_vec(grad), stats)
}

fn random_logits(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    // Small xorshift so the test needs no RNG crate API.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

// ---------- brute force ----------

#[test]
fn loss_and_gradient_match_brute_force_enumeration() {
    for fused in [false, true] {
        let cases: &[(usize, usize, &[u32])] = &[
            (1, 2, &[]),
            (1, 2, &[1]),
            (3, 2, &[]),
            (4, 3, &[1]),
            (4, 3, &[1, 2]),
            (4, 3, &[2, 2]),
            (5, 3, &[1, 1]),
            (5, 3, &[2, 1, 2]),
            (5, 3, &[1, 1, 1]),
            (5, 2, &[1, 1, 1]),
            (5, 3, &[2, 1, 2, 1, 2]),
        ];
        for (i, &(frames, classes, target)) in cases.iter().enumerate() {
            let logits = random_logits(i as u64 + 1, frames * classes, 2.0);
            let expected = brute_force_loss(&logits, frames, classes, target);
            let fd = finite_difference_grad(&logits, frames, classes, target);
            let targets = vec![target.to_vec()];
            let (loss, grad, stats) = ours(
                fused,
                &logits,
                (1, frames, classes),
                DType::F64,
                &targets,
                &[frames],
                false,
                Reduction::Sum,
            );
            assert_eq!(stats.impossible, 0);
            assert!(
                (loss[0] - expected).abs() < 1e-10 * expected.abs().max(1.0),
                "case {i}: loss {} vs brute force {expected}",
                loss[0]
            );
            let err = max_abs_diff(&grad, &fd);
            assert!(err < 1e-7, "case {i}: f64 gradient off by {err}");

            let (loss32, grad32, _) = ours(
                fused,
                &logits,
                (1, frames, classes),
                DType::F32,
                &targets,
                &[frames],
                false,
                Reduction::Sum,
            );
            assert!((loss32[0] - expected).abs() < 1e-5 * expected.abs().max(1.0));
            assert!(max_abs_diff(&grad32, &fd) < 1e-5);
        }
    }
}

#[test]
fn padded_batch_matches_each_utterance_alone() {
    for fused in [false, true] {
        let (batch, frames, classes) = (4, 5, 3);
        let logits = random_logits(99, batch * frames * classes, 1.5);
        let targets = vec![vec![1, 2], vec![2, 2], vec![], vec![1]];
        let lengths = [5, 4, 2, 3];
        let (losses, grad, stats) = ours(
            fused,
            &logits,
            (batch, frames, classes),
            DType::F64,
            &targets,
            &lengths,
            false,
            Reduction::Sum,
        );
        assert_eq!(stats.impossible, 0);
        let stride = frames * classes;
        for b in 0..batch {
            let utt = &logits[b * stride..(b + 1) * stride];
            let expected = brute_force_loss(utt, lengths[b], classes, &targets[b]);
            assert!((losses[b] - expected).abs() < 1e-10, "utterance {b}");
            let mut fd = finite_difference_grad(
                &utt[..lengths[b] * classes],
                lengths[b],
                classes,
                &targets[b],
            );
            fd.resize(stride, 0.0); // padded frames: no gradient
            let err = max_abs_diff(&grad[b * stride..(b + 1) * stride], &fd);
            assert!(err < 1e-7, "utterance {b}: gradient off by {err}");
        }
    }
}

#[test]
fn impossible_alignment_is_infinite_or_zeroed_with_zero_gradient() {
    for fused in [false, true] {
        // [1, 1] needs 3 frames (a blank between the repeats); give it 2.
        let (frames, classes) = (2, 3);
        let logits = random_logits(7, 2 * frames * classes, 1.0);
        let targets = vec![vec![1, 1], vec![1, 2]];
        for zero_infinity in [false, true] {
            let (losses, grad, stats) = ours(
                fused,
                &logits,
                (2, frames, classes),
                DType::F32,
                &targets,
                &[2, 2],
                zero_infinity,
                Reduction::Mean,
            );
            assert_eq!(stats.impossible, 1);
            if zero_infinity {
                assert_eq!(losses[0], 0.0);
            } else {
                assert_eq!(losses[0], f64::INFINITY);
            }
            assert!(losses[1].is_finite() && losses[1] > 0.0);
            assert!(grad[..frames * classes].iter().all(|&g| g == 0.0));
            assert!(grad[frames * classes..].iter().any(|&g| g != 0.0));
            assert!(grad.iter().all(|g| g.is_finite()));
        }
    }
}

#[test]
fn gradient_wrt_log_probs_is_minus_the_occupancy() {
    // Fed straight into the op, the gradient is -gamma: it sums to -1 over each valid frame.
    let (frames, classes) = (6, 4);
    let logits = random_logits(3, frames * classes, 1.0);
    let lp = Var::from_tensor(
        &candle_nn::ops::log_softmax(
            &Tensor::from_vec(logits, (1, frames, classes), &Device::Cpu).unwrap(),
            D::Minus1,
        )
        .unwrap(),
    )
    .unwrap();
    let (loss, _) = ctc_loss(lp.as_tensor(), &[vec![1, 3, 3]], &[5], 0, false).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    let g: Vec<Vec<f64>> = grads
        .get(lp.as_tensor())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (t, row) in g.iter().enumerate() {
        let sum: f64 = row.iter().sum();
        let expected = if t < 5 { -1.0 } else { 0.0 };
        assert!((sum - expected).abs() < 1e-12, "frame {t}: sum {sum}");
        assert!(row.iter().all(|&x| x <= 0.0));
        assert_eq!(row[2], 0.0, "class 2 is not in the target");
    }
}

#[test]
fn half_precision_input_is_computed_in_f32() {
    let (batch, frames, classes) = (2, 6, 4);
    let logits = random_logits(11, batch * frames * classes, 2.0);
    let targets = vec![vec![1, 2, 2], vec![3]];
    let lengths = [6, 5];
    let (want, _, _) = ours(
        true,
        &logits,
        (batch, frames, classes),
        DType::F64,
        &targets,
        &lengths,
        false,
        Reduction::Sum,
    );
    let x = Tensor::from_vec(logits, (batch, frames, classes), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let (losses, _) = ctc_loss_from_logits(x.as_tensor(), &targets, &lengths, 0, false).unwrap();
    assert_eq!(losses.dtype(), DType::F32);
    let got: Vec<f32> = losses.to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() < 0.05 * w, "{g} vs {w}");
    }
    let grads = losses.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(x.as_tensor()).unwrap().dtype(), DType::BF16);
}

#[test]
fn invalid_arguments_are_errors() {
    let lp = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let two = [vec![1], vec![2]];
    assert!(ctc_loss(&lp, &two[..1], &[4, 4], 0, false).is_err());
    assert!(ctc_loss(&lp, &two, &[4], 0, false).is_err());
    assert!(ctc_loss(&lp, &two, &[4, 5], 0, false).is_err());
    assert!(ctc_loss(&lp, &[vec![1], vec![0]], &[4, 4], 0, false).is_err());
    assert!(ctc_loss(&lp, &[vec![1], vec![3]], &[4, 4], 0, false).is_err());
    assert!(ctc_loss(&lp, &two, &[4, 4], 3, false).is_err());
    assert!(ctc_loss(
        &lp.squeeze(0).unwrap().sum(0).unwrap(),
        &two,
        &[4, 4],
        0,
        false
    )
    .is_err());
    let message = ctc_loss(&lp, &[vec![1], vec![7]], &[4, 4], 0, false)
        .unwrap_err()
        .to_string();
    assert!(message.contains("utterance 1"), "{message}");
}

// ---------- PyTorch fixtures ----------

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ctc")
        .join(case)
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> (Vec<usize>, Vec<T>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).unwrap();
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    (shape, npy.into_vec().unwrap())
}

fn json_f64(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::String(s) if s == "inf" => f64::INFINITY,
        other => other.as_f64().unwrap(),
    }
}

struct Fixture {
    logits: Vec<f64>,
    shape: (usize, usize, usize),
    targets: Vec<Vec<u32>>,
    lengths: Vec<usize>,
    zero_infinity: bool,
    losses: Vec<f64>,
    dir: PathBuf,
}

fn load_fixture(case: &str) -> Fixture {
    let dir = fixture_dir(case);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert!(meta["torch"].as_str().unwrap().starts_with("2.5.1"));
    let (shape, logits) = read_npy::<f32>(&dir.join("logits.npy"));
    Fixture {
        logits: logits.into_iter().map(f64::from).collect(),
        shape: (shape[0], shape[1], shape[2]),
        targets: serde_json::from_value(meta["targets"].clone()).unwrap(),
        lengths: serde_json::from_value(meta["input_lengths"].clone()).unwrap(),
        zero_infinity: meta["zero_infinity"].as_bool().unwrap(),
        losses: meta["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(json_f64)
            .collect(),
        dir,
    }
}

/// Compares losses and logits gradients with PyTorch; returns (max loss err, max grad err).
fn compare_with_torch(
    fused: bool,
    case: &str,
    dtype: DType,
    skip_utterance: Option<usize>,
) -> (f64, f64) {
    let f = load_fixture(case);
    let stride = f.shape.1 * f.shape.2;
    let mut loss_err = 0.0f64;
    let mut grad_err = 0.0f64;
    for (reduction, file) in [
        (Reduction::Mean, "grad_logits_mean.npy"),
        (Reduction::Sum, "grad_logits_sum.npy"),
    ] {
        let (losses, grad, _) = ours(
            fused,
            &f.logits,
            f.shape,
            dtype,
            &f.targets,
            &f.lengths,
            f.zero_infinity,
            reduction,
        );
        let (_, expected) = read_npy::<f64>(&f.dir.join(file));
        for (b, (&got, &want)) in losses.iter().zip(&f.losses).enumerate() {
            if want.is_infinite() {
                assert_eq!(got, f64::INFINITY, "{case}: utterance {b}");
            } else {
                loss_err = loss_err.max((got - want).abs() / want.abs().max(1.0));
            }
            if Some(b) == skip_utterance {
                continue;
            }
            let range = b * stride..(b + 1) * stride;
            grad_err = grad_err.max(max_abs_diff(&grad[range.clone()], &expected[range]));
        }
    }
    (loss_err, grad_err)
}

#[test]
fn matches_pytorch_random_batch() {
    for fused in [false, true] {
        for case in ["random", "vocab"] {
            let (loss64, grad64) = compare_with_torch(fused, case, DType::F64, None);
            let (loss32, grad32) = compare_with_torch(fused, case, DType::F32, None);
            eprintln!("{case} fused={fused}: f64 rel loss err {loss64:.2e}, grad err {grad64:.2e}; f32 rel loss err {loss32:.2e}, grad err {grad32:.2e}");
            assert!(loss64 < 1e-12 && grad64 < 1e-12, "{case} f64");
            assert!(loss32 < 2e-6 && grad32 < 2e-6, "{case} f32");
        }
    }
}

#[test]
fn matches_pytorch_impossible_with_zero_infinity() {
    for fused in [false, true] {
        let (loss64, grad64) = compare_with_torch(fused, "impossible_zero_inf", DType::F64, None);
        let (loss32, grad32) = compare_with_torch(fused, "impossible_zero_inf", DType::F32, None);
        eprintln!("impossible_zero_inf fused={fused}: f64 {loss64:.2e}/{grad64:.2e}, f32 {loss32:.2e}/{grad32:.2e}");
        assert!(loss64 < 1e-12 && grad64 < 1e-12);
        assert!(loss32 < 2e-6 && grad32 < 2e-6);
        let f = load_fixture("impossible_zero_inf");
        let (losses, _, stats) = ours(
            fused,
            &f.logits,
            f.shape,
            DType::F32,
            &f.targets,
            &f.lengths,
            true,
            Reduction::Mean,
        );
        assert_eq!(stats.impossible, 1);
        assert_eq!(losses[1], 0.0);
    }
}

#[test]
fn matches_pytorch_impossible_without_zero_infinity() {
    for fused in [false, true] {
        // PyTorch's gradient for the impossible utterance is NaN; ours is zero (documented).
        let f = load_fixture("impossible_keep_inf");
        let (_, torch_grad) = read_npy::<f64>(&f.dir.join("grad_logits_mean.npy"));
        let stride = f.shape.1 * f.shape.2;
        assert!(torch_grad[stride..2 * stride].iter().all(|g| g.is_nan()));
        let (loss_err, grad_err) =
            compare_with_torch(fused, "impossible_keep_inf", DType::F64, Some(1));
        assert!(loss_err < 1e-12 && grad_err < 1e-12);
        let (losses, grad, stats) = ours(
            fused,
            &f.logits,
            f.shape,
            DType::F32,
            &f.targets,
            &f.lengths,
            false,
            Reduction::Mean,
        );
        assert_eq!(stats.impossible, 1);
        assert_eq!(losses[1], f64::INFINITY);
        assert!(grad[stride..2 * stride].iter().all(|&g| g == 0.0));
    }
}

#[test]
fn reductions_match_pytorch_scalars() {
    for case in ["random", "vocab", "impossible_zero_inf"] {
        let f = load_fixture(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f.dir.join("meta.json")).unwrap())
                .unwrap();
        let lp = candle_nn::ops::log_softmax(
            &Tensor::from_vec(f.logits.clone(), f.shape, &Device::Cpu).unwrap(),
            D::Minus1,
        )
        .unwrap();
        let (losses, _) = ctc_loss(&lp, &f.targets, &f.lengths, 0, f.zero_infinity).unwrap();
        for (reduction, key) in [(Reduction::Mean, "loss_mean"), (Reduction::Sum, "loss_sum")] {
            let got: f64 = reduce(&losses, &f.targets, reduction)
                .unwrap()
                .to_scalar()
                .unwrap();
            let want = json_f64(&meta[key]);
            assert!(
                (got - want).abs() < 1e-10 * want.abs().max(1.0),
                "{case} {key}: {got} vs {want}"
            );
        }
        let none = reduce(&losses, &f.targets, Reduction::None).unwrap();
        assert_eq!(none.dims(), &[f.shape.0]);
    }
}

#[test]
fn pytorch_log_probs_gradient_is_ours_plus_softmax() {
    // PyTorch's backward w.r.t. log_probs returns exp(log_probs) - gamma on valid frames, 0 after.
    let f = load_fixture("random");
    let (_, torch_lp_grad) = read_npy::<f64>(&f.dir.join("grad_log_probs_sum.npy"));
    let lp = Var::from_tensor(
        &candle_nn::ops::log_softmax(
            &Tensor::from_vec(f.logits.clone(), f.shape, &Device::Cpu).unwrap(),
            D::Minus1,
        )
        .unwrap(),
    )
    .unwrap();
    let (losses, _) = ctc_loss(lp.as_tensor(), &f.targets, &f.lengths, 0, false).unwrap();
    let grads = reduce(&losses, &f.targets, Reduction::Sum)
        .unwrap()
        .backward()
        .unwrap();
    let ours: Vec<f64> = grads
        .get(lp.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lp: Vec<f64> = lp.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let (_, frames, classes) = f.shape;
    let mut err = 0.0f64;
    for (i, (&g, &l)) in ours.iter().zip(&lp).enumerate() {
        let (b, t) = (i / (frames * classes), (i / classes) % frames);
        let torch_convention = if t < f.lengths[b] { g + l.exp() } else { 0.0 };
        err = err.max((torch_convention - torch_lp_grad[i]).abs());
    }
    assert!(err < 1e-12, "{err}");
}

// ---------- decoding ----------

/// Total probability of every labelling (sum over its alignments), by enumeration.
fn labelling_probabilities(lp: &[f64], frames: usize, classes: usize) -> Vec<(Vec<u32>, f64)> {
    let mut totals: Vec<(Vec<u32>, f64)> = Vec::new();
    for (path, p) in all_paths(lp, frames, classes) {
        let label = collapse(&path, 0);
        match totals.iter_mut().find(|(l, _)| *l == label) {
            Some(entry) => entry.1 += p,
            None => totals.push((label, p)),
        }
    }
    totals.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    totals
}

fn to_array(lp: &[f64], frames: usize, classes: usize) -> Array2<f32> {
    Array2::from_shape_vec((frames, classes), lp.iter().map(|&x| x as f32).collect()).unwrap()
}

#[test]
fn greedy_collapses_repeats_and_drops_blanks() {
    let best = [0u32, 3, 3, 0, 3, 1, 1, 2, 0, 0, 2];
    let mut lp = vec![-10.0f64; best.len() * 4];
    for (t, &k) in best.iter().enumerate() {
        lp[t * 4 + k as usize] = -0.01;
    }
    assert_eq!(
        greedy(to_array(&lp, best.len(), 4).view(), 0),
        vec![3, 3, 1, 2, 2]
    );
    assert!(greedy(Array2::<f32>::zeros((0, 4)).view(), 0).is_empty());
}

#[test]
fn beam_of_one_equals_greedy_on_peaked_inputs() {
    for seed in 0..20u64 {
        let (frames, classes) = (30, 6);
        let logits: Vec<f64> = random_logits(seed + 100, frames * classes, 6.0);
        let lp = log_softmax_rows(&logits, classes);
        let arr = to_array(&lp, frames, classes);
        let beam = prefix_beam_search(arr.view(), 1, 0);
        assert_eq!(beam.len(), 1);
        assert_eq!(beam[0].0, greedy(arr.view(), 0), "seed {seed}");
    }
}

#[test]
fn wide_beam_scores_equal_exact_labelling_probabilities() {
    for (seed, frames, classes) in [(1u64, 4usize, 3usize), (2, 5, 3), (3, 3, 4), (4, 5, 2)] {
        let logits = random_logits(seed + 500, frames * classes, 1.5);
        let lp = log_softmax_rows(&logits, classes);
        let exact = labelling_probabilities(&lp, frames, classes);
        let hyps = prefix_beam_search(to_array(&lp, frames, classes).view(), 1000, 0);
        assert_eq!(
            hyps.len(),
            exact.len(),
            "seed {seed}: every labelling is kept"
        );
        assert_eq!(
            hyps[0].0, exact[0].0,
            "seed {seed}: most probable labelling"
        );
        for (label, p) in &exact {
            let (_, score) = hyps
                .iter()
                .find(|(l, _)| l == label)
                .expect("labelling present");
            assert!(
                (score.exp() as f64 - p).abs() < 1e-5,
                "seed {seed} {label:?}"
            );
        }
        let total: f64 = hyps.iter().map(|(_, s)| (*s as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}

#[test]
fn beam_search_beats_greedy_when_alignments_add_up() {
    // Each frame: blank 0.6, "a" 0.4. Best path "--" gives "" (0.36), but "a" collects
    // aa + a- + -a = 0.16 + 0.24 + 0.24 = 0.64.
    let lp = [0.6f64.ln(), 0.4f64.ln(), 0.6f64.ln(), 0.4f64.ln()];
    let arr = to_array(&lp, 2, 2);
    assert_eq!(greedy(arr.view(), 0), Vec::<u32>::new());
    let hyps = prefix_beam_search(arr.view(), 4, 0);
    assert_eq!(hyps[0].0, vec![1]);
    assert!((hyps[0].1 - 0.64f32.ln()).abs() < 1e-6);
    assert_eq!(hyps[1].0, Vec::<u32>::new());
    assert!((hyps[1].1 - 0.36f32.ln()).abs() < 1e-6);
}

/// Speed on a realistic batch (run with `--ignored --nocapture`): 16 utterances of 500 frames,
/// 4 000 character classes, 30-label targets; candle's log_softmax + `ctc_loss` vs the fused
/// `ctc_loss_from_logits`, forward and backward down to the logits.
#[test]
#[ignore]
fn timing_realistic_batch() {
    let (batch, frames, classes) = (16, 500, 4000);
    let logits = Tensor::randn(0f32, 1.0, (batch, frames, classes), &Device::Cpu).unwrap();
    let x = Var::from_tensor(&logits).unwrap();
    let targets: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..30)
                .map(|i| 1 + ((b * 31 + i * 7) % (classes - 1)) as u32)
                .collect()
        })
        .collect();
    let lengths: Vec<usize> = (0..batch).map(|b| frames - b * 10).collect();
    for fused in [false, true, false, true] {
        let start = std::time::Instant::now();
        let (losses, _) = if fused {
            ctc_loss_from_logits(x.as_tensor(), &targets, &lengths, 0, true).unwrap()
        } else {
            let lp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
            ctc_loss(&lp, &targets, &lengths, 0, true).unwrap()
        };
        let loss = reduce(&losses, &targets, Reduction::Mean).unwrap();
        let forward = start.elapsed();
        let grads = loss.backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        eprintln!(
            "[{batch}, {frames}, {classes}] fused={fused}: forward {:.0} ms, forward+backward {:.0} ms",
            forward.as_secs_f64() * 1e3,
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Decoding speed (run with `--ignored --nocapture`): 500 frames, 4 000 classes.
#[test]
#[ignore]
fn timing_decoding() {
    let (frames, classes) = (500, 4000);
    let logits = Tensor::randn(0f32, 3.0, (frames, classes), &Device::Cpu).unwrap();
    let lp: Vec<f32> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lp = Array2::from_shape_vec((frames, classes), lp).unwrap();
    let start = std::time::Instant::now();
    let best = greedy(lp.view(), 0);
    eprintln!("greedy: {:.2} ms", start.elapsed().as_secs_f64() * 1e3);
    for beam in [1, 4, 10, 20] {
        let start = std::time::Instant::now();
        let hyps = prefix_beam_search(lp.view(), beam, 0);
        eprintln!(
            "prefix beam {beam}: {:.1} ms ({} labels)",
            start.elapsed().as_secs_f64() * 1e3,
            hyps[0].0.len()
        );
        if beam == 1 {
            assert_eq!(hyps[0].0, best);
        }
    }
}
