//! The trainable kernels of `src/ops/` against PyTorch, op by op, forward and backward
//! (fixtures from `tests/fixtures/ops/gen_*.py`, torch 2.5.1): each test runs the f32-slice
//! kernel of the CPU executors and, where the candle tensor-op path has its own version of the
//! kernel (CUDA, f16), that version too, against the same torch values.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use speechcache::ops::activation::{
    glu_backward, glu_forward, relu_backward, relu_in_place, silu_backward, silu_forward,
};
use speechcache::ops::attention::{self, Geometry, RelPosInputs, RelShift};
use speechcache::ops::conv::{correlate_rows, kernel_major, weight_grad};
use speechcache::ops::ctc::ctc_loss_from_logits;
use speechcache::ops::gemm::Mat;
use speechcache::ops::norm::{
    batch_norm_backward, batch_norm_forward, batch_norm_update_running, layer_norm_backward,
    layer_norm_forward, masked_moments, utterance_mvn_backward, utterance_mvn_forward,
    BATCH_NORM_EPS, BATCH_NORM_MOMENTUM,
};
use speechcache::ops::{
    conv, depthwise_conv1d, layer_norm, layer_sum, utterance_mvn, winograd, MaskedBatchNorm,
};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ops")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture loads")
}

/// A fixture tensor as f32 values (references are stored in f64).
fn vec(t: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    let x = t.get(key).unwrap_or_else(|| panic!("fixture has no {key}"));
    x.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn ints(t: &HashMap<String, Tensor>, key: &str) -> Vec<usize> {
    let x = t.get(key).unwrap_or_else(|| panic!("fixture has no {key}"));
    let v = x.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    v.into_iter().map(|n| n as usize).collect()
}

fn tensor(t: &HashMap<String, Tensor>, key: &str) -> Tensor {
    t[key].to_dtype(DType::F32).unwrap()
}

fn values(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `[B T]` of 1 for frames below each length.
fn frame_mask(lengths: &[usize], t: usize) -> Vec<f32> {
    let mut m = vec![0f32; lengths.len() * t];
    for (row, &n) in m.chunks_mut(t).zip(lengths) {
        row[..n].fill(1.0);
    }
    m
}

/// Largest error relative to the largest reference magnitude.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    err / scale.max(1e-30)
}

/// Largest relative error allowed: f32 arithmetic against float64 references.
const TOL: f64 = 1e-5;

/// Checks each `(key, got)` against the fixture's `{prefix}.{key}` within [`TOL`].
fn check(t: &HashMap<String, Tensor>, (prefix, label): (&str, &str), got: &[(&str, &[f32])]) {
    for &(key, got) in got {
        let e = rel_err(got, &vec(t, &format!("{prefix}.{key}")));
        println!("{label} {key}: {e:.2e} of the largest value");
        assert!(e < TOL, "{label} {key}: {e:.2e} >= {TOL:.0e}");
    }
}

/// `Σ y · dy` for tensor-op backwards (the fixtures' gradients are its vector-Jacobian product).
fn vjp_loss(y: &Tensor, dy: &Tensor) -> Tensor {
    (y * dy).unwrap().sum_all().unwrap()
}

fn grad(store: &candle_core::backprop::GradStore, v: &Var) -> Vec<f32> {
    values(store.get(v.as_tensor()).expect("a gradient"))
}

#[test]
fn rel_pos_attention_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    let lengths = ints(&t, "attention.lengths");
    let (b, heads, frames, _) = t["attention.probs"].dims4().unwrap();
    let [q, k, v, p, bu, bv, keep, dctx] = ["q", "k", "v", "p", "bias_u", "bias_v", "keep", "dctx"]
        .map(|n| vec(&t, &format!("attention.{n}")));
    let geo = Geometry {
        batch: b,
        frames,
        dim: q.len() / (b * frames),
        heads,
    };
    let inp = RelPosInputs {
        q: &q,
        k: &k,
        v: &v,
        p: &p,
        bias_u: &bu,
        bias_v: &bv,
    };
    let fm = frame_mask(&lengths, frames);
    let mut probs = vec![0f32; b * heads * frames * frames];
    attention::rel_pos_probs(&inp, geo, &fm, &mut probs);
    let mut ctx = vec![0f32; q.len()];
    attention::rel_pos_context(&probs, Some(&keep), &v, geo, &mut ctx);
    let g = attention::rel_pos_backward(&inp, &probs, Some(&keep), &dctx, geo);
    check(
        &t,
        ("attention", "rel-pos attention"),
        &[
            ("probs", &probs),
            ("ctx", &ctx),
            ("dq", &g.dq),
            ("dk", &g.dk),
            ("dv", &g.dv),
            ("dp", &g.dp),
            ("dbias_u", &g.du),
            ("dbias_v", &g.dbv),
        ],
    );
}

/// The building blocks on a block of query rows (as an inference caller without saved state
/// runs them) give the same probabilities.
#[test]
fn attention_blocks_of_query_rows_match_torch() {
    let t = fixture("ops.safetensors");
    let lengths = ints(&t, "attention.lengths");
    let (b, heads, frames, _) = t["attention.probs"].dims4().unwrap();
    let [q, k, p, bu, bv] =
        ["q", "k", "p", "bias_u", "bias_v"].map(|n| vec(&t, &format!("attention.{n}")));
    let geo = Geometry {
        batch: b,
        frames,
        dim: q.len() / (b * frames),
        heads,
    };
    let (dk, pn) = (geo.head_dim(), geo.positions());
    let want = vec(&t, "attention.probs");
    let fm = frame_mask(&lengths, frames);
    let (bi, h, row0, rows) = (1, 1, 3, 4);
    let biased = |bias: &[f32]| -> Vec<f32> {
        (0..rows * dk)
            .map(|i| {
                q[(bi * frames + row0 + i / dk) * geo.dim + h * dk + i % dk] + bias[h * dk + i % dk]
            })
            .collect()
    };
    let (qu, qv) = (biased(&bu), biased(&bv));
    let mut s = vec![0f32; rows * frames];
    attention::scores(
        Mat::rows(&qu, dk),
        geo.head(&k, bi * frames, h),
        (rows, frames, dk),
        &mut s,
    );
    let mut bd = vec![0f32; rows * pn];
    attention::scores(
        Mat::rows(&qv, dk),
        geo.head(&p, 0, h),
        (rows, pn, dk),
        &mut bd,
    );
    let rel = RelShift { bd: &bd, row0 };
    attention::masked_softmax(&mut s, frames, geo.scale(), &fm[bi * frames..], Some(rel));
    let off = ((bi * heads + h) * frames + row0) * frames;
    let e = rel_err(&s, &want[off..off + rows * frames]);
    println!("query rows {row0}..{}: {e:.2e}", row0 + rows);
    assert!(e < 1e-5, "{e:.2e}");
}

#[test]
fn layer_norm_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    for (case, eps) in [("espnet", 1e-12), ("torch", 1e-5)] {
        let key = |n: &str| format!("layer_norm.{case}.{n}");
        let [x, gamma, beta, dy] = ["x", "gamma", "beta", "dy"].map(|n| vec(&t, &key(n)));
        let mut y = vec![0f32; x.len()];
        let saved = layer_norm_forward(&x, &gamma, &beta, eps as f32, &mut y);
        let (mut dx, mut dg, mut db) = (
            vec![0f32; x.len()],
            vec![0f32; gamma.len()],
            vec![0f32; gamma.len()],
        );
        layer_norm_backward(&dy, &saved, &gamma, &mut dx, false, &mut dg, &mut db);
        let prefix = format!("layer_norm.{case}");
        let got = [("y", &y[..]), ("dx", &dx), ("dgamma", &dg), ("dbeta", &db)];
        check(&t, (&prefix, &format!("layer norm {case} (slices)")), &got);
        // the tensor-op version
        let [xv, gv, bv] =
            ["x", "gamma", "beta"].map(|n| Var::from_tensor(&tensor(&t, &key(n))).unwrap());
        let y = layer_norm(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), eps).unwrap();
        let store = vjp_loss(&y, &tensor(&t, &key("dy"))).backward().unwrap();
        let (y, dx, dg, db) = (
            values(&y),
            grad(&store, &xv),
            grad(&store, &gv),
            grad(&store, &bv),
        );
        let got = [("y", &y[..]), ("dx", &dx), ("dgamma", &dg), ("dbeta", &db)];
        check(
            &t,
            (&prefix, &format!("layer norm {case} (tensor ops)")),
            &got,
        );
    }
}

#[test]
fn masked_batch_norm_matches_torch_with_padding_and_running_stats() {
    let t = fixture("ops.safetensors");
    let lengths = ints(&t, "batch_norm.lengths");
    let [x, gamma, beta, dy, rm0, rv0] =
        ["x", "gamma", "beta", "dy", "running_mean", "running_var"]
            .map(|n| vec(&t, &format!("batch_norm.{n}")));
    let c = gamma.len();
    let frames = x.len() / c / lengths.len();
    let fm = frame_mask(&lengths, frames);
    let valid: usize = lengths.iter().sum();
    let eps = BATCH_NORM_EPS as f32;
    // training: batch statistics of the valid rows, running update, backward
    let (mean, var) = masked_moments(&x, &fm, c, valid);
    let mut y = vec![0f32; x.len()];
    let saved = batch_norm_forward(&x, (&mean, &var), (&gamma, &beta), eps, &mut y);
    let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
    batch_norm_update_running(
        (&mut rm, &mut rv),
        (&mean, &var),
        valid,
        BATCH_NORM_MOMENTUM,
    );
    let (mut dx, mut dg, mut db) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
    batch_norm_backward(
        &dy,
        &saved,
        &gamma,
        (&fm, valid),
        &mut dx,
        (&mut dg, &mut db),
    );
    // eval: running statistics
    let mut y_eval = vec![0f32; x.len()];
    batch_norm_forward(&x, (&rm0, &rv0), (&gamma, &beta), eps, &mut y_eval);
    check(
        &t,
        ("batch_norm", "batch norm (slices)"),
        &[
            ("y", &y),
            ("new_running_mean", &rm),
            ("new_running_var", &rv),
            ("dx", &dx),
            ("dgamma", &dg),
            ("dbeta", &db),
            ("y_eval", &y_eval),
        ],
    );
    // the tensor-op version (`MaskedBatchNorm`), on [B, T, C]
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = MaskedBatchNorm::load(vb.pp("bn"), c).unwrap();
    for (name, key) in [
        ("weight", "gamma"),
        ("bias", "beta"),
        ("running_mean", "running_mean"),
        ("running_var", "running_var"),
    ] {
        varmap
            .set_one(
                format!("bn.{name}"),
                tensor(&t, &format!("batch_norm.{key}")),
            )
            .unwrap();
    }
    let shape = (lengths.len(), frames, c);
    let xv = Var::from_tensor(&tensor(&t, "batch_norm.x").reshape(shape).unwrap()).unwrap();
    let mask = Tensor::from_vec(fm.clone(), (lengths.len(), frames, 1), &Device::Cpu).unwrap();
    let y_eval = values(&bn.forward(xv.as_tensor(), &mask, valid, false).unwrap());
    let y = bn.forward(xv.as_tensor(), &mask, valid, true).unwrap();
    let dy = tensor(&t, "batch_norm.dy").reshape(shape).unwrap();
    let store = vjp_loss(&y, &dy).backward().unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    let var = |n: &str| values(vars[&format!("bn.{n}")].as_tensor());
    let (y, dx) = (values(&y), grad(&store, &xv));
    let (dg, db) = (
        grad(&store, &vars["bn.weight"]),
        grad(&store, &vars["bn.bias"]),
    );
    check(
        &t,
        ("batch_norm", "batch norm (tensor ops)"),
        &[
            ("y", &y),
            ("new_running_mean", &var("running_mean")),
            ("new_running_var", &var("running_var")),
            ("dx", &dx),
            ("dgamma", &dg),
            ("dbeta", &db),
            ("y_eval", &y_eval),
        ],
    );
}

#[test]
fn utterance_mvn_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    let lengths = ints(&t, "mvn.lengths");
    let (_, frames, dim) = t["mvn.x"].dims3().unwrap();
    let mut x = vec(&t, "mvn.x");
    let (y, rstd) = utterance_mvn_forward(&mut x, &lengths, frames, dim);
    let mut dx = vec(&t, "mvn.dy");
    utterance_mvn_backward(&mut dx, (&y, &rstd), &lengths, frames, dim);
    check(
        &t,
        ("mvn", "utterance MVN (slices)"),
        &[("y", &y), ("dx", &dx)],
    );
    let xv = Var::from_tensor(&tensor(&t, "mvn.x")).unwrap();
    let y = utterance_mvn(xv.as_tensor(), &lengths).unwrap();
    let store = vjp_loss(&y, &tensor(&t, "mvn.dy")).backward().unwrap();
    let (y, dx) = (values(&y), grad(&store, &xv));
    check(
        &t,
        ("mvn", "utterance MVN (tensor ops)"),
        &[("y", &y), ("dx", &dx)],
    );
}

#[test]
fn im2col_conv3x3_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    for case in ["one_channel", "channels", "long", "partial"] {
        let key = |n: &str| format!("conv.{case}.{n}");
        let (rows, cols, c_in) = t[&key("x")].dims3().unwrap();
        let (out_rows, _, c_out) = t[&key("y")].dims3().unwrap();
        let geo = conv::Geometry {
            rows,
            cols,
            c_in,
            c_out,
            stride: ints(&t, &key("stride"))[0],
            out_rows,
        };
        let [x, w, bias, dy] = ["x", "w", "bias", "dy"].map(|n| vec(&t, &key(n)));
        let w_taps = conv::weight_taps_last(&w, c_out, c_in);
        let mut y = vec![0f32; out_rows * geo.out_cols() * c_out];
        conv::forward(&x, &geo, (&w_taps, &bias), &mut y, |_| {});
        let mut dw_taps = vec![0f32; w.len()];
        let mut dx = vec![0f32; x.len()];
        conv::backward(&x, &geo, &w_taps, &dy, &mut dw_taps, Some(&mut dx));
        let mut dw = vec![0f32; w.len()];
        conv::add_weight_grad_torch_layout(&dw_taps, c_out, c_in, &mut dw);
        let got = [("y", &y[..]), ("dx", &dx), ("dw", &dw)];
        check(
            &t,
            (&format!("conv.{case}"), &format!("conv3x3 {case}")),
            &got,
        );
    }
}

#[test]
fn depthwise_conv1d_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    for case in ["odd", "even"] {
        let prefix = format!("depthwise.{case}");
        let key = |n: &str| format!("{prefix}.{n}");
        let (b, frames, c) = t[&key("x")].dims3().unwrap();
        let k = t[&key("w")].dims()[2];
        let (dims, pad) = ((b, frames, c, k), (k - 1) / 2);
        let [x, w, dy] = ["x", "w", "dy"].map(|n| vec(&t, &key(n)));
        let y = correlate_rows(&x, &kernel_major(&w, c, k, false), dims, pad);
        let dx = correlate_rows(&dy, &kernel_major(&w, c, k, true), dims, k - 1 - pad);
        let dw = weight_grad(&x, &dy, dims, pad);
        let got = [("y", &y[..]), ("dx", &dx), ("dw", &dw)];
        check(&t, (&prefix, &format!("depthwise {case} (slices)")), &got);
        let [xv, wv] = ["x", "w"].map(|n| Var::from_tensor(&tensor(&t, &key(n))).unwrap());
        let y = depthwise_conv1d(xv.as_tensor(), wv.as_tensor()).unwrap();
        let store = vjp_loss(&y, &tensor(&t, &key("dy"))).backward().unwrap();
        let (y, dx, dw) = (values(&y), grad(&store, &xv), grad(&store, &wv));
        let got = [("y", &y[..]), ("dx", &dx), ("dw", &dw)];
        check(
            &t,
            (&prefix, &format!("depthwise {case} (tensor op)")),
            &got,
        );
        // the shift-and-add composite that devices other than the CPU run
        let y =
            speechcache::ops::depthwise_conv1d_shift_add(xv.as_tensor(), wv.as_tensor()).unwrap();
        let store = vjp_loss(&y, &tensor(&t, &key("dy"))).backward().unwrap();
        let (y, dx, dw) = (values(&y), grad(&store, &xv), grad(&store, &wv));
        let got = [("y", &y[..]), ("dx", &dx), ("dw", &dw)];
        check(
            &t,
            (&prefix, &format!("depthwise {case} (shift-add)")),
            &got,
        );
    }
}

#[test]
fn silu_relu_glu_match_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    let [h, keep, dy] = ["h", "keep", "dy"].map(|n| vec(&t, &format!("silu.{n}")));
    let mut y = vec![0f32; h.len()];
    silu_forward(&h, Some(&keep), &mut y);
    let mut dh = dy.clone();
    silu_backward(&h, Some(&keep), &mut dh);
    check(&t, ("silu", "silu + dropout"), &[("y", &y), ("dh", &dh)]);

    let (mut y, mut dh) = (vec(&t, "relu.h"), vec(&t, "relu.dy"));
    relu_in_place(&mut y);
    relu_backward(&y, &mut dh);
    check(&t, ("relu", "relu"), &[("y", &y), ("dh", &dh)]);

    let [h, mask, dy] = ["h", "row_mask", "dy"].map(|n| vec(&t, &format!("glu.{n}")));
    let dim = dy.len() / mask.len();
    let mut y = vec![0f32; dy.len()];
    glu_forward(&h, dim, Some(&mask), &mut y);
    let mut dh = vec![0f32; h.len()];
    glu_backward(&h, &dy, dim, Some(&mask), &mut dh);
    check(&t, ("glu", "glu + row mask"), &[("y", &y), ("dh", &dh)]);
}

#[test]
fn softmax_weighted_layer_sum_matches_torch_forward_and_gradients() {
    let t = fixture("ops.safetensors");
    let (b, _, frames, dim) = t["layer_sum.feats"].dims4().unwrap();
    let [feats, weights, dy] =
        ["feats", "weights", "dy"].map(|n| vec(&t, &format!("layer_sum.{n}")));
    let alpha = layer_sum::layer_coefficients(&weights);
    let mut y = vec![0f32; b * frames * dim];
    layer_sum::forward(&feats, &alpha, frames * dim, &mut y);
    let mut dw = vec![0f32; weights.len()];
    layer_sum::backward(&dy, &feats, &alpha, frames * dim, &mut dw);
    check(
        &t,
        ("layer_sum", "layer sum"),
        &[("y", &y), ("dweights", &dw)],
    );
}

#[test]
fn ctc_loss_matches_torch_loss_and_gradient() {
    let t = fixture("ops.safetensors");
    let lens = ints(&t, "ctc.target_lengths");
    let padded = ints(&t, "ctc.targets");
    let width = padded.len() / lens.len();
    let targets: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            padded[i * width..i * width + n]
                .iter()
                .map(|&c| c as u32)
                .collect()
        })
        .collect();
    let logits = Var::from_tensor(&tensor(&t, "ctc.logits")).unwrap();
    let (losses, _) = ctc_loss_from_logits(
        logits.as_tensor(),
        &targets,
        &ints(&t, "ctc.input_lengths"),
        0,
        true,
    )
    .unwrap();
    let store = losses.sum_all().unwrap().backward().unwrap();
    let (losses, dlogits) = (values(&losses), grad(&store, &logits));
    check(
        &t,
        ("ctc", "ctc"),
        &[("losses", &losses), ("dlogits", &dlogits)],
    );
}

#[test]
fn winograd_conv3x3_matches_torch_forward_and_gradients() {
    let t = fixture("conv3x3.safetensors");
    for name in ["small", "even", "ssl"] {
        let x = &t[&format!("{name}.x")];
        let (rows, cols, c_in) = x.dims3().unwrap();
        let c_out = t[&format!("{name}.w")].dims()[0];
        let geo = winograd::Geometry {
            rows,
            cols,
            c_in,
            c_out,
            out_rows: rows - 2,
        };
        let (x, w) = (vec(&t, &format!("{name}.x")), vec(&t, &format!("{name}.w")));
        let u = winograd::transform_filter(&w, c_out, c_in);
        let mut y = vec![0f32; (rows - 2) * (cols - 2) * c_out];
        winograd::forward(&x, geo, &u, &mut y);
        let dy = vec(&t, &format!("{name}.dy"));
        let mut acc = vec![0f32; 16 * c_out * c_in];
        let mut dx = vec![0f32; x.len()];
        winograd::backward(&x, geo, &u, &dy, &mut acc, Some(&mut dx));
        let mut dw = vec![0f32; w.len()];
        winograd::add_filter_grad(&acc, c_out, c_in, &mut dw);
        for (what, got, want) in [
            ("output", &y, vec(&t, &format!("{name}.y"))),
            ("input gradient", &dx, vec(&t, &format!("{name}.dx"))),
            ("weight gradient", &dw, vec(&t, &format!("{name}.dw"))),
        ] {
            let e = rel_err(got, &want);
            println!("{name} {what}: {e:.2e} of the largest value");
            assert!(e < 1e-5, "{name} {what}: {e:.2e}");
        }
    }
}
