//! The CPU training engine: one hand-written forward and backward of the whole `AsrModel`
//! (featurizer → subsampling → Conformer blocks → CTC) on f32 slices, for CPU training.
//!
//! candle's autograd runs a Conformer step as thousands of small ops, each allocating a fresh
//! tensor, most of them single-threaded; on two cores most of a step went to page faults and
//! threads waiting on each other, not arithmetic. This engine computes the same function with
//! the same parameters, dropout draws and batch-norm updates as `AsrModel::forward` +
//! `ctc_loss`, but in a few dozen large, pool-parallel kernels (`crate::ops::kernels`): every
//! matmul is one gemm on strided views (no head split/merge copies), the subsampling convs are
//! im2col gemms per utterance, attention runs per utterance and head with its softmax fused.
//! Gradients come back as tensors for the optimiser, so checkpoints, resume and the candle
//! path (other devices and dtypes, `AsrModel::forward`) are unchanged; tests check both give
//! the same loss and gradients (`tests/engine.rs`) and against PyTorch.
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::finetune::optim::NamedVars;
use crate::models::asr::conformer::{
    rel_positional_table, CnnModuleNorm, ConformerConfig, InputLayer,
};
use crate::models::asr::{AsrModel, FeatureNormalize};
use crate::ops::activation::{
    self, residual_add, scale_mask, sigmoid, silu_backward, silu_forward,
};
use crate::ops::ctc::ctc_loss_from_logits;
use crate::ops::gemm::{
    self, add_col_sums, linear_backward, linear_forward, matmul_serial, row_block, Mat,
};
use crate::ops::norm::{layer_norm_backward, layer_norm_forward, LayerNormSaved};
use crate::ops::{correlate_rows, kernel_major, weight_grad, winograd, DropoutRng};

type Result<T> = candle_core::Result<T>;

/// Where a step's time goes, by op kind (seconds).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OpTimes {
    pub front: f64,
    pub subsampling: f64,
    pub attention: f64,
    pub feed_forward: f64,
    pub conv_module: f64,
    pub norms: f64,
    pub ctc: f64,
}

impl OpTimes {
    pub const KINDS: [&'static str; 7] = [
        "featurizer",
        "subsampling",
        "attention",
        "feed-forward",
        "conv module",
        "norms",
        "ctc + output",
    ];

    pub fn values(&self) -> [f64; 7] {
        [
            self.front,
            self.subsampling,
            self.attention,
            self.feed_forward,
            self.conv_module,
            self.norms,
            self.ctc,
        ]
    }

    pub fn add(&mut self, o: &OpTimes) {
        self.front += o.front;
        self.subsampling += o.subsampling;
        self.attention += o.attention;
        self.feed_forward += o.feed_forward;
        self.conv_module += o.conv_module;
        self.norms += o.norms;
        self.ctc += o.ctc;
    }
}

/// Forward and backward time per op kind of one or more steps.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepProfile {
    pub forward: OpTimes,
    pub backward: OpTimes,
    /// Reading batches and SpecAugment.
    pub data: f64,
    /// Gradient clipping and the optimiser update.
    pub optimizer: f64,
    /// Steps summed.
    pub steps: u64,
}

impl StepProfile {
    pub fn add(&mut self, o: &StepProfile) {
        self.forward.add(&o.forward);
        self.backward.add(&o.backward);
        self.data += o.data;
        self.optimizer += o.optimizer;
        self.steps += o.steps;
    }
}

/// One training step's result: per-utterance losses and one gradient per trainable variable.
pub struct StepOutput {
    pub losses: Vec<f64>,
    pub grads: Vec<Tensor>,
    pub out_lengths: Vec<usize>,
    pub profile: StepProfile,
}

/// The model's parameters copied out of its variables, as the engine reads them (taken once
/// per training step, once per validation pass).
pub struct Params {
    values: HashMap<String, Vec<f32>>,
}

impl Params {
    fn get(&self, name: &str) -> Result<&[f32]> {
        self.values
            .get(name)
            .map(|v| v.as_slice())
            .ok_or_else(|| candle_core::Error::Msg(format!("engine: no parameter {name}")))
    }
}

/// Gradient sums by parameter name (taken out and put back so several can be written at once).
struct Grads {
    map: HashMap<String, Vec<f32>>,
}

impl Grads {
    fn take(&mut self, name: &str, len: usize) -> Vec<f32> {
        self.map.remove(name).unwrap_or_else(|| vec![0f32; len])
    }

    fn put(&mut self, name: &str, g: Vec<f32>) {
        self.map.insert(name.to_string(), g);
    }
}

/// Per-utterance geometry of one batch.
#[derive(Clone)]
struct Batch {
    b: usize,
    /// Padded frames after subsampling.
    t: usize,
    out_lengths: Vec<usize>,
    /// `[B * T]`: 1 for valid frames.
    frame_mask: Vec<f32>,
    valid: usize,
}

/// The CPU training engine for one model; holds no state between steps.
pub struct CpuEngine {
    cfg: ConformerConfig,
    normalize: FeatureNormalize,
    global_stats: Option<(Vec<f32>, Vec<f32>)>,
    layers: usize,
    feat_dim: usize,
    preencoder: bool,
    vocab: usize,
    rng: DropoutRng,
    /// Every variable (running statistics included), by name.
    all_vars: HashMap<String, Var>,
    /// The optimiser's variables, in its order.
    trainable: NamedVars,
}

fn enc(i: usize, rest: &str) -> String {
    format!("encoder.encoders.{i}.{rest}")
}

/// Fixed number of reduction groups (independent of the thread count, so sums are
/// deterministic).
const GROUPS: usize = 8;

/// Runs `f(item, acc)` for every item, items dealt round-robin into `GROUPS` groups that run in
/// parallel, each summing into its own zeroed accumulator of `acc_len`; returns the sum of the
/// accumulators in group order.
fn grouped<T: Send>(items: Vec<T>, acc_len: usize, f: impl Fn(T, &mut [f32]) + Sync) -> Vec<f32> {
    let mut groups: Vec<Vec<T>> = (0..GROUPS).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        groups[i % GROUPS].push(item);
    }
    let partials: Vec<Vec<f32>> = groups
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![0f32; if group.is_empty() { 0 } else { acc_len }];
            for item in group {
                f(item, &mut acc);
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; acc_len];
    for p in partials.iter().filter(|p| !p.is_empty()) {
        for (s, &v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

fn dropout_mask(rng: &DropoutRng, n: usize, p: f64, train: bool) -> Result<Option<Vec<f32>>> {
    if !train || p <= 0.0 {
        return Ok(None);
    }
    Ok(Some(rng.keep_mask(n, p)?))
}

fn to_tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// Saved activations of each block.

struct FfnSaved {
    norm: LayerNormSaved,
    xn: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    inner_mask: Option<Vec<f32>>,
    out_mask: Option<Vec<f32>>,
}

struct AttnSaved {
    norm: LayerNormSaved,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[2T - 1, d]` projected positions.
    p: Vec<f32>,
    /// Softmax probabilities `[B, H, T, T]`.
    probs: Vec<f32>,
    att_mask: Option<Vec<f32>>,
    /// Heads merged, before `linear_out`: `[N, d]`.
    ctx: Vec<f32>,
    out_mask: Option<Vec<f32>>,
}

struct ConvSaved {
    norm: LayerNormSaved,
    xn: Vec<f32>,
    h: Vec<f32>,
    gm: Vec<f32>,
    /// Normalised depthwise output (batch norm's x-hat or layer norm's saved state).
    cn: Vec<f32>,
    rstd: Vec<f32>,
    ln: Option<LayerNormSaved>,
    bn_out: Vec<f32>,
    s: Vec<f32>,
    out_mask: Option<Vec<f32>>,
}

struct LayerSaved {
    macaron: Option<FfnSaved>,
    attn: AttnSaved,
    conv: Option<ConvSaved>,
    ffn: FfnSaved,
    final_norm: LayerNormSaved,
}

struct SubsampleSaved {
    /// `[B, T, F]` input (conv) or `[N, F]` (linear).
    x: Vec<f32>,
    t_in: usize,
    f_in: usize,
    r0: Vec<f32>,
    r1: Vec<f32>,
    dims: (usize, usize, usize, usize),
    ln: Option<LayerNormSaved>,
    /// The positional encoding's dropout mask (training only).
    pos_mask: Option<Vec<f32>>,
    mask: Option<Vec<f32>>,
}

struct FrontSaved {
    /// `[B, L, T, D]` input features (normalised by global stats when set).
    feats: Vec<f32>,
    t: usize,
    alpha: Vec<f32>,
    /// Utterance MVN: normalised output and 1/std per (utterance, dim).
    mvn: Option<(Vec<f32>, Vec<f32>)>,
    /// Pre-encoder input `[B * T, D]`.
    pre_in: Vec<f32>,
}

impl CpuEngine {
    /// Why the engine cannot run `model` (the trainer then uses candle tensor ops); the device
    /// and dtype are the [`crate::device::Backend`]'s to decide.
    pub fn unsupported_reason(model: &AsrModel) -> Option<String> {
        let cfg = model.encoder().config();
        if !cfg.normalize_before {
            return Some("normalize_before = false".into());
        }
        None
    }

    /// `vars`: every variable of the model's VarMap; `trainable`: the optimiser's list.
    pub fn new(model: &AsrModel, vars: &NamedVars, trainable: &NamedVars) -> Result<Self> {
        let (normalize, stats) = model.normalization();
        let (layers, feat_dim) = model.input_shape();
        let global_stats = match stats {
            Some((m, s)) => {
                let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let s = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Some((m, s))
            }
            None => None,
        };
        Ok(Self {
            cfg: model.encoder().config().clone(),
            normalize,
            global_stats,
            layers,
            feat_dim,
            preencoder: model.has_preencoder(),
            vocab: model.vocab(),
            rng: model.dropout_rng().clone(),
            all_vars: vars.iter().cloned().collect(),
            trainable: trainable.clone(),
        })
    }

    /// The current values of every variable (reread after each optimiser update).
    pub fn params(&self) -> Result<Params> {
        let mut values = HashMap::with_capacity(self.all_vars.len());
        for (name, var) in &self.all_vars {
            let v = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            values.insert(name.clone(), v);
        }
        Ok(Params { values })
    }

    /// One training forward + backward: per-utterance CTC losses (blank 0, zero_infinity) and
    /// the gradients of `loss_scale * Σ losses`, as `AsrModel::forward` + `ctc_loss` +
    /// `backward` would give them; batch-norm running statistics are updated as in training.
    pub fn train_step(
        &self,
        feats: &Tensor,
        lengths: &[usize],
        targets: &[Vec<u32>],
        loss_scale: f64,
    ) -> Result<StepOutput> {
        let params = self.params()?;
        let mut prof = StepProfile::default();
        let mut grads = Grads {
            map: HashMap::new(),
        };
        // ---- forward
        let t0 = Instant::now();
        let (front, x) = self.front_forward(&params, feats, lengths)?;
        prof.forward.front += t0.elapsed().as_secs_f64();
        let (batch, sub, x) =
            self.subsample_forward(&params, x, &front, lengths, true, &mut prof)?;
        let d = self.cfg.output_size;
        let pe = rel_positional_table(batch.t, d);
        let pe_mask = dropout_mask(&self.rng, pe.len(), self.cfg.positional_dropout_rate, true)?;
        let pe = apply_mask(pe, pe_mask.as_deref());
        let mut x = x;
        let mut saved = Vec::with_capacity(self.cfg.num_blocks);
        for i in 0..self.cfg.num_blocks {
            let (y, s) = self.layer_forward(&params, i, &x, &pe, &batch, true, &mut prof)?;
            saved.push(s);
            x = y;
        }
        let t0 = Instant::now();
        let mut h = vec![0f32; x.len()];
        let after = layer_norm_forward(
            &x,
            params.get("encoder.after_norm.weight")?,
            params.get("encoder.after_norm.bias")?,
            1e-12,
            &mut h,
        );
        prof.forward.norms += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let v = self.vocab;
        let mut logits = vec![0f32; batch.b * batch.t * v];
        linear_forward(
            &h,
            params.get("ctc.ctc_lo.weight")?,
            Some(params.get("ctc.ctc_lo.bias")?),
            d,
            &mut logits,
        );
        let logits = Var::from_tensor(&to_tensor(logits, &[batch.b, batch.t, v])?)?;
        let (per_utt, _) =
            ctc_loss_from_logits(logits.as_tensor(), targets, &batch.out_lengths, 0, true)?;
        let losses: Vec<f64> = per_utt.to_dtype(DType::F64)?.to_vec1()?;
        let store = (per_utt.sum_all()? * loss_scale)?.backward()?;
        let dlogits = store
            .get(logits.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("engine: CTC gave no gradient".into()))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        prof.forward.ctc += t0.elapsed().as_secs_f64();
        // ---- backward
        let t0 = Instant::now();
        let mut dh = vec![0f32; h.len()];
        self.linear_bwd(
            &params,
            &mut grads,
            "ctc.ctc_lo",
            &h,
            &dlogits,
            d,
            Some(&mut dh),
        )?;
        prof.backward.ctc += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut dx = vec![0f32; x.len()];
        self.ln_bwd(
            &params,
            &mut grads,
            "encoder.after_norm",
            &dh,
            &after,
            &mut dx,
            false,
        )?;
        prof.backward.norms += t0.elapsed().as_secs_f64();
        drop(dh);
        for i in (0..self.cfg.num_blocks).rev() {
            let s = saved
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("engine: a layer saved no state".into()))?;
            dx = self.layer_backward(&params, &mut grads, i, dx, s, &pe, &batch, &mut prof)?;
        }
        let dsub = self.subsample_backward(&params, &mut grads, dx, sub, &batch, &mut prof)?;
        let t0 = Instant::now();
        if let Some(dsub) = dsub {
            self.front_backward(&params, &mut grads, dsub, front, lengths)?;
        }
        prof.backward.front += t0.elapsed().as_secs_f64();
        let grads = self
            .trainable
            .iter()
            .map(|(name, var)| {
                let g = grads.take(name, var.elem_count());
                to_tensor(g, var.dims())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StepOutput {
            losses,
            grads,
            out_lengths: batch.out_lengths,
            profile: prof,
        })
    }

    /// Eval-mode logits `[B, T', vocab]` and output lengths (no dropout, running statistics),
    /// with `params` from [`CpuEngine::params`].
    pub fn forward_eval(
        &self,
        params: &Params,
        feats: &Tensor,
        lengths: &[usize],
    ) -> Result<(Tensor, Vec<usize>)> {
        let mut prof = StepProfile::default();
        let (front, x) = self.front_forward(params, feats, lengths)?;
        let (batch, _, x) = self.subsample_forward(params, x, &front, lengths, false, &mut prof)?;
        let d = self.cfg.output_size;
        let pe = rel_positional_table(batch.t, d);
        let mut x = x;
        for i in 0..self.cfg.num_blocks {
            x = self
                .layer_forward(params, i, &x, &pe, &batch, false, &mut prof)?
                .0;
        }
        let mut h = vec![0f32; x.len()];
        layer_norm_forward(
            &x,
            params.get("encoder.after_norm.weight")?,
            params.get("encoder.after_norm.bias")?,
            1e-12,
            &mut h,
        );
        let mut logits = vec![0f32; batch.b * batch.t * self.vocab];
        linear_forward(
            &h,
            params.get("ctc.ctc_lo.weight")?,
            Some(params.get("ctc.ctc_lo.bias")?),
            d,
            &mut logits,
        );
        Ok((
            to_tensor(logits, &[batch.b, batch.t, self.vocab])?,
            batch.out_lengths,
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Shared pieces

    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        params: &Params,
        grads: &mut Grads,
        prefix: &str,
        x: &[f32],
        dy: &[f32],
        d_in: usize,
        dx: Option<&mut [f32]>,
    ) -> Result<()> {
        let wn = format!("{prefix}.weight");
        let bn = format!("{prefix}.bias");
        let w = params.get(&wn)?;
        let mut dw = grads.take(&wn, w.len());
        let has_bias = params.values.contains_key(&bn);
        let mut db = has_bias.then(|| grads.take(&bn, w.len() / d_in));
        linear_backward(
            x,
            w,
            dy,
            d_in,
            &mut dw,
            db.as_deref_mut(),
            dx.map(|d| (d, false)),
        );
        grads.put(&wn, dw);
        if let Some(db) = db {
            grads.put(&bn, db);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ln_bwd(
        &self,
        params: &Params,
        grads: &mut Grads,
        prefix: &str,
        dy: &[f32],
        saved: &LayerNormSaved,
        dx: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let gn = format!("{prefix}.weight");
        let bn = format!("{prefix}.bias");
        let gamma = params.get(&gn)?;
        let mut dg = grads.take(&gn, gamma.len());
        let mut db = grads.take(&bn, gamma.len());
        layer_norm_backward(dy, saved, gamma, dx, accumulate, &mut dg, &mut db);
        grads.put(&gn, dg);
        grads.put(&bn, db);
        Ok(())
    }

    /// A block's output: `x + scale * dropout(linear(h))` with the `prefix` Linear (d_in → d);
    /// returns it and the dropout mask.
    #[allow(clippy::too_many_arguments)]
    fn residual_branch(
        &self,
        params: &Params,
        prefix: &str,
        x: &[f32],
        h: &[f32],
        d_in: usize,
        scale: f32,
        train: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut o = vec![0f32; x.len()];
        linear_forward(
            h,
            params.get(&format!("{prefix}.weight"))?,
            Some(params.get(&format!("{prefix}.bias"))?),
            d_in,
            &mut o,
        );
        let mask = dropout_mask(&self.rng, x.len(), self.cfg.dropout_rate, train)?;
        let mut y = vec![0f32; x.len()];
        residual_add(x, &o, mask.as_deref(), scale, &mut y);
        Ok((y, mask))
    }

    // -----------------------------------------------------------------------------------------
    // Featurizer: global normalisation, weighted sum of layers, utterance MVN, pre-encoder.

    fn front_forward(
        &self,
        params: &Params,
        feats: &Tensor,
        lengths: &[usize],
    ) -> Result<(FrontSaved, Vec<f32>)> {
        let (b, l, t, dim) = feats.dims4()?;
        if l != self.layers || dim != self.feat_dim || lengths.len() != b {
            candle_core::bail!(
                "engine: features [{b}, {l}, {t}, {dim}] with {} lengths do not fit the model",
                lengths.len()
            )
        }
        let mut f = feats
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        match (self.normalize, &self.global_stats) {
            (FeatureNormalize::Global, Some((mean, std))) => {
                let rows = mean.len() / dim;
                f.par_chunks_mut(t * dim)
                    .enumerate()
                    .for_each(|(bl, chunk)| {
                        let li = if rows == 1 { 0 } else { bl % l };
                        let (m, s) = (&mean[li * dim..][..dim], &std[li * dim..][..dim]);
                        for row in chunk.chunks_exact_mut(dim) {
                            for j in 0..dim {
                                row[j] = (row[j] - m[j]) / s[j];
                            }
                        }
                    });
            }
            (FeatureNormalize::Global, None) => {
                candle_core::bail!("normalize is \"global\" but no stats were set")
            }
            _ => {}
        }
        let alpha = if l > 1 {
            let w = params.get("frontend.featurizer.weights")?;
            let mx = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = w.iter().map(|&v| (v - mx).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        } else {
            vec![1.0]
        };
        let mut x = if l == 1 {
            f.clone()
        } else {
            let mut x = vec![0f32; b * t * dim];
            x.par_chunks_mut(t * dim).enumerate().for_each(|(bi, xb)| {
                for (li, &a) in alpha.iter().enumerate() {
                    let src = &f[(bi * l + li) * t * dim..][..t * dim];
                    for (o, &v) in xb.iter_mut().zip(src) {
                        *o += a * v;
                    }
                }
            });
            x
        };
        let mvn = if self.normalize == FeatureNormalize::Utterance {
            Some(utterance_mvn_forward(&mut x, lengths, t, dim))
        } else {
            None
        };
        let (pre_in, out) = if self.preencoder {
            let w = params.get("preencoder.linear_out.weight")?;
            let mut y = vec![0f32; b * t * (w.len() / dim)];
            linear_forward(
                &x,
                w,
                Some(params.get("preencoder.linear_out.bias")?),
                dim,
                &mut y,
            );
            (x, y)
        } else {
            (Vec::new(), x)
        };
        Ok((
            FrontSaved {
                feats: f,
                t,
                alpha,
                mvn,
                pre_in,
            },
            out,
        ))
    }

    fn front_needs_grad(&self) -> bool {
        self.preencoder || self.layers > 1
    }

    fn front_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        dz: Vec<f32>,
        front: FrontSaved,
        lengths: &[usize],
    ) -> Result<()> {
        let dim = self.feat_dim;
        let t = front.t;
        let mut dx = if self.preencoder {
            let need_dx = self.layers > 1;
            let mut dx = vec![0f32; if need_dx { front.pre_in.len() } else { 0 }];
            self.linear_bwd(
                params,
                grads,
                "preencoder.linear_out",
                &front.pre_in,
                &dz,
                dim,
                need_dx.then_some(dx.as_mut_slice()),
            )?;
            if !need_dx {
                return Ok(());
            }
            dx
        } else {
            dz
        };
        if self.layers == 1 {
            return Ok(());
        }
        if let Some((y, rstd)) = &front.mvn {
            utterance_mvn_backward(&mut dx, y, rstd, lengths, t, dim);
        }
        let l = self.layers;
        let b = lengths.len();
        // d alpha_l = Σ dx · feats_l, then through the softmax.
        let per_utt: Vec<Vec<f64>> = (0..b)
            .into_par_iter()
            .map(|bi| {
                let g = &dx[bi * t * dim..][..t * dim];
                (0..l)
                    .map(|li| {
                        let f = &front.feats[(bi * l + li) * t * dim..][..t * dim];
                        g.iter().zip(f).map(|(&a, &c)| (a * c) as f64).sum()
                    })
                    .collect()
            })
            .collect();
        let dalpha: Vec<f64> = (0..l)
            .map(|li| per_utt.iter().map(|u| u[li]).sum())
            .collect();
        let dot: f64 = dalpha
            .iter()
            .zip(&front.alpha)
            .map(|(&d, &a)| d * a as f64)
            .sum();
        let name = "frontend.featurizer.weights";
        let mut dw = grads.take(name, l);
        for li in 0..l {
            dw[li] += (front.alpha[li] as f64 * (dalpha[li] - dot)) as f32;
        }
        grads.put(name, dw);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Subsampling (+ the positional-encoding scale and dropout)

    #[allow(clippy::too_many_arguments)]
    fn subsample_forward(
        &self,
        params: &Params,
        x: Vec<f32>,
        front: &FrontSaved,
        lengths: &[usize],
        train: bool,
        prof: &mut StepProfile,
    ) -> Result<(Batch, SubsampleSaved, Vec<f32>)> {
        let t0 = Instant::now();
        let b = lengths.len();
        let t_in = front.t;
        let f_in = x.len() / (b * t_in).max(1);
        let d = self.cfg.output_size;
        let layer = self.cfg.input_layer;
        let t = layer.output_length(t_in);
        if t == 0 {
            candle_core::bail!("engine: {t_in} frames are too short for {}", layer.name())
        }
        let out_lengths: Vec<usize> = lengths.iter().map(|&n| layer.output_length(n)).collect();
        let mut frame_mask = vec![0f32; b * t];
        for (bi, &n) in out_lengths.iter().enumerate() {
            frame_mask[bi * t..bi * t + n.min(t)].fill(1.0);
        }
        let batch = Batch {
            b,
            t,
            valid: out_lengths.iter().map(|&n| n.min(t)).sum(),
            out_lengths,
            frame_mask,
        };
        let mut saved = SubsampleSaved {
            x: Vec::new(),
            t_in,
            f_in,
            r0: Vec::new(),
            r1: Vec::new(),
            dims: (0, 0, 0, 0),
            ln: None,
            pos_mask: None,
            mask: None,
        };
        let mut y = vec![0f32; b * t * d];
        if layer == InputLayer::Linear {
            let mut lin = vec![0f32; b * t * d];
            linear_forward(
                &x,
                params.get("encoder.embed.0.weight")?,
                Some(params.get("encoder.embed.0.bias")?),
                f_in,
                &mut lin,
            );
            let ln = layer_norm_forward(
                &lin,
                params.get("encoder.embed.1.weight")?,
                params.get("encoder.embed.1.bias")?,
                1e-5,
                &mut y,
            );
            let m = dropout_mask(&self.rng, y.len(), self.cfg.dropout_rate, train)?;
            y = apply_mask(y, m.as_deref());
            saved.ln = Some(ln);
            saved.mask = m;
            saved.x = x;
        } else {
            let s2 = if layer == InputLayer::Conv2d { 2 } else { 1 };
            let (t1, f1) = ((t_in - 3) / 2 + 1, (f_in - 3) / 2 + 1);
            let (t2, f2) = ((t1 - 3) / s2 + 1, (f1 - 3) / s2 + 1);
            debug_assert_eq!(t2, t);
            // conv0: 1 → d channels, per utterance: im2col [T1 F1, 9] · [9, d]
            let w0 = params.get("encoder.embed.conv.0.weight")?;
            let b0 = params.get("encoder.embed.conv.0.bias")?;
            // Rows past an utterance's last valid output frame are never read by a valid
            // frame (and get zero gradient): they are left at zero and skipped.
            let (valid1, valid2) = valid_conv_rows(&batch.out_lengths, t1, t2, s2);
            let mut r0 = vec![0f32; b * t1 * f1 * d];
            r0.par_chunks_mut(t1 * f1 * d)
                .enumerate()
                .for_each(|(bi, out)| {
                    let xb = &x[bi * t_in * f_in..][..t_in * f_in];
                    let rows1 = valid1[bi];
                    let col = im2col_single(xb, f_in, rows1, f1, 2);
                    let out = &mut out[..rows1 * f1 * d];
                    for row in out.chunks_exact_mut(d) {
                        row.copy_from_slice(b0);
                    }
                    matmul_serial(
                        rows1 * f1,
                        d,
                        9,
                        out,
                        d,
                        Mat::rows(&col, 9),
                        Mat::rows(w0, 9).t(),
                        true,
                    );
                    out.iter_mut().for_each(|v| *v = v.max(0.0));
                });
            // conv1: d → d channels, stride s2: im2col blocks [rows, 9 d] · [9 d, d]
            let b1 = params.get("encoder.embed.conv.2.bias")?;
            let mut r1 = vec![0f32; b * t2 * f2 * d];
            if s2 == 1 {
                // stride 1: Winograd F(2×2, 3×3), 2.25× fewer multiply-adds than im2col
                let u =
                    winograd::transform_filter(params.get("encoder.embed.conv.2.weight")?, d, d);
                r1.par_chunks_mut(t2 * f2 * d)
                    .enumerate()
                    .for_each(|(bi, out)| {
                        let src = &r0[bi * t1 * f1 * d..][..t1 * f1 * d];
                        let rows2 = valid2[bi];
                        let out = &mut out[..rows2 * f2 * d];
                        for row in out.chunks_exact_mut(d) {
                            row.copy_from_slice(b1);
                        }
                        let geo = winograd::Geometry {
                            rows: t1,
                            cols: f1,
                            c_in: d,
                            c_out: d,
                            out_rows: rows2,
                        };
                        winograd::forward(src, geo, &u, out);
                        out.iter_mut().for_each(|v| *v = v.max(0.0));
                    });
            } else {
                let w1 = conv_weight_taps_last(params.get("encoder.embed.conv.2.weight")?, d, d);
                r1.par_chunks_mut(t2 * f2 * d)
                    .enumerate()
                    .for_each(|(bi, out)| {
                        let src = &r0[bi * t1 * f1 * d..][..t1 * f1 * d];
                        let mut col = Vec::new();
                        let rows2 = valid2[bi];
                        for tb in (0..rows2).step_by(T_BLOCK) {
                            let rows_t = T_BLOCK.min(rows2 - tb);
                            im2col_channels(src, (f1, d), (tb, rows_t, f2), s2, &mut col);
                            let o = &mut out[tb * f2 * d..][..rows_t * f2 * d];
                            for row in o.chunks_exact_mut(d) {
                                row.copy_from_slice(b1);
                            }
                            matmul_serial(
                                rows_t * f2,
                                d,
                                9 * d,
                                o,
                                d,
                                Mat::rows(&col, 9 * d),
                                Mat::rows(&w1, 9 * d).t(),
                                true,
                            );
                            o.iter_mut().for_each(|v| *v = v.max(0.0));
                        }
                    });
            }
            // out: [B T2, F2 d] · W'ᵀ with W' the [d, F2 d] permutation of ESPnet's [d, d F2]
            let wo = out_weight_freq_major(params.get("encoder.embed.out.0.weight")?, d, d, f2);
            linear_forward(
                &r1,
                &wo,
                Some(params.get("encoder.embed.out.0.bias")?),
                f2 * d,
                &mut y,
            );
            saved.r0 = r0;
            saved.r1 = r1;
            saved.dims = (t1, f1, t2, f2);
            saved.x = x;
        }
        // RelPositionalEncoding: x * sqrt(d), dropout.
        let scale = (d as f32).sqrt();
        let m = dropout_mask(&self.rng, y.len(), self.cfg.positional_dropout_rate, train)?;
        let out = y
            .par_iter()
            .enumerate()
            .map(|(i, &v)| v * scale * m.as_ref().map_or(1.0, |m| m[i]))
            .collect();
        saved.pos_mask = m;
        prof.forward.subsampling += t0.elapsed().as_secs_f64();
        Ok((batch, saved, out))
    }

    fn subsample_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        mut dy: Vec<f32>,
        saved: SubsampleSaved,
        batch: &Batch,
        prof: &mut StepProfile,
    ) -> Result<Option<Vec<f32>>> {
        let t0 = Instant::now();
        let d = self.cfg.output_size;
        let scale = (d as f32).sqrt();
        scale_mask(&mut dy, saved.pos_mask.as_deref(), scale);
        let need_dx = self.front_needs_grad();
        let b = batch.b;
        let (t_in, f_in) = (saved.t_in, saved.f_in);
        let result = if self.cfg.input_layer == InputLayer::Linear {
            scale_mask(&mut dy, saved.mask.as_deref(), 1.0);
            let ln = saved.ln.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("engine: the linear embed saved no norm".into())
            })?;
            let mut dlin = vec![0f32; dy.len()];
            self.ln_bwd(params, grads, "encoder.embed.1", &dy, ln, &mut dlin, false)?;
            let mut dx = vec![0f32; if need_dx { saved.x.len() } else { 0 }];
            self.linear_bwd(
                params,
                grads,
                "encoder.embed.0",
                &saved.x,
                &dlin,
                f_in,
                need_dx.then_some(dx.as_mut_slice()),
            )?;
            need_dx.then_some(dx)
        } else {
            let (t1, f1, t2, f2) = saved.dims;
            let s2 = if self.cfg.input_layer == InputLayer::Conv2d {
                2
            } else {
                1
            };
            // out linear
            let won = "encoder.embed.out.0.weight";
            let wo = out_weight_freq_major(params.get(won)?, d, d, f2);
            let mut dwo = vec![0f32; wo.len()];
            let mut dbo = grads.take("encoder.embed.out.0.bias", d);
            let mut dr1 = vec![0f32; saved.r1.len()];
            linear_backward(
                &saved.r1,
                &wo,
                &dy,
                f2 * d,
                &mut dwo,
                Some(&mut dbo),
                Some((&mut dr1, false)),
            );
            grads.put("encoder.embed.out.0.bias", dbo);
            let mut g = grads.take(won, wo.len());
            out_weight_grad_channel_major(&dwo, d, d, f2, &mut g);
            grads.put(won, g);
            drop(dy);
            relu_bias_backward(grads, "encoder.embed.conv.2.bias", &mut dr1, &saved.r1, d);
            // conv1: dW' = Σ dy1ᵀ col, dr0 = col2im(dy1 · W')
            let w1n = "encoder.embed.conv.2.weight";
            let mut dr0 = vec![0f32; saved.r0.len()];
            let items: Vec<(usize, &mut [f32])> = dr0.chunks_mut(t1 * f1 * d).enumerate().collect();
            let r0 = &saved.r0;
            let (valid1, valid2) = valid_conv_rows(&batch.out_lengths, t1, t2, s2);
            if s2 == 1 {
                let u = winograd::transform_filter(params.get(w1n)?, d, d);
                let acc = grouped(items, 16 * d * d, |(bi, dsrc), acc| {
                    let geo = winograd::Geometry {
                        rows: t1,
                        cols: f1,
                        c_in: d,
                        c_out: d,
                        out_rows: valid2[bi],
                    };
                    let src = &r0[bi * t1 * f1 * d..][..t1 * f1 * d];
                    let dout = &dr1[bi * t2 * f2 * d..][..t2 * f2 * d];
                    winograd::backward(src, geo, &u, dout, acc, Some(dsrc));
                });
                let mut g = grads.take(w1n, d * d * 9);
                winograd::add_filter_grad(&acc, d, d, &mut g);
                grads.put(w1n, g);
            } else {
                let w1 = conv_weight_taps_last(params.get(w1n)?, d, d);
                let dw1 = grouped(items, w1.len(), |(bi, dsrc), acc| {
                    let src = &r0[bi * t1 * f1 * d..][..t1 * f1 * d];
                    let dout = &dr1[bi * t2 * f2 * d..][..t2 * f2 * d];
                    let mut col = Vec::new();
                    let mut dcol = Vec::new();
                    let rows2 = valid2[bi];
                    for tb in (0..rows2).step_by(T_BLOCK) {
                        let rows_t = T_BLOCK.min(rows2 - tb);
                        let rows = rows_t * f2;
                        im2col_channels(src, (f1, d), (tb, rows_t, f2), s2, &mut col);
                        let g = &dout[tb * f2 * d..][..rows * d];
                        matmul_serial(
                            d,
                            9 * d,
                            rows,
                            acc,
                            9 * d,
                            Mat::rows(g, d).t(),
                            Mat::rows(&col, 9 * d),
                            true,
                        );
                        dcol.resize(rows * 9 * d, 0.0);
                        matmul_serial(
                            rows,
                            9 * d,
                            d,
                            &mut dcol,
                            9 * d,
                            Mat::rows(g, d),
                            Mat::rows(&w1, 9 * d),
                            false,
                        );
                        col2im_channels_add(&dcol, (f1, d), (tb, rows_t, f2), s2, dsrc);
                    }
                });
                let mut g = grads.take(w1n, w1.len());
                conv_weight_grad_channels_first(&dw1, d, d, &mut g);
                grads.put(w1n, g);
            }
            drop(dr1);
            relu_bias_backward(grads, "encoder.embed.conv.0.bias", &mut dr0, &saved.r0, d);
            let w0n = "encoder.embed.conv.0.weight";
            let w0 = params.get(w0n)?;
            let x = &saved.x;
            let mut dx = vec![0f32; if need_dx { b * t_in * f_in } else { 0 }];
            let items: Vec<(usize, &mut [f32])> = if need_dx {
                dx.chunks_mut(t_in * f_in).enumerate().collect()
            } else {
                (0..b).map(|bi| (bi, &mut [][..])).collect()
            };
            let dr0 = &dr0;
            let dw0 = grouped(items, 9 * d, |(bi, dxb), acc| {
                let rows1 = valid1[bi];
                let g = &dr0[bi * t1 * f1 * d..][..rows1 * f1 * d];
                let col = im2col_single(&x[bi * t_in * f_in..][..t_in * f_in], f_in, rows1, f1, 2);
                matmul_serial(
                    d,
                    9,
                    rows1 * f1,
                    acc,
                    9,
                    Mat::rows(g, d).t(),
                    Mat::rows(&col, 9),
                    true,
                );
                if !dxb.is_empty() {
                    let mut dcol = vec![0f32; rows1 * f1 * 9];
                    matmul_serial(
                        rows1 * f1,
                        9,
                        d,
                        &mut dcol,
                        9,
                        Mat::rows(g, d),
                        Mat::rows(w0, 9),
                        false,
                    );
                    col2im_single_add(&dcol, f_in, rows1, f1, 2, dxb);
                }
            });
            let mut g = grads.take(w0n, 9 * d);
            for (a, v) in g.iter_mut().zip(&dw0) {
                *a += v;
            }
            grads.put(w0n, g);
            need_dx.then_some(dx)
        };
        prof.backward.subsampling += t0.elapsed().as_secs_f64();
        Ok(result)
    }

    // -----------------------------------------------------------------------------------------
    // Conformer blocks

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        params: &Params,
        i: usize,
        x: &[f32],
        pe: &[f32],
        batch: &Batch,
        train: bool,
        prof: &mut StepProfile,
    ) -> Result<(Vec<f32>, LayerSaved)> {
        let mut x = x.to_vec();
        let macaron = if self.cfg.macaron_style {
            let t0 = Instant::now();
            let (y, s) = self.ffn_forward(
                params,
                &enc(i, "feed_forward_macaron"),
                &enc(i, "norm_ff_macaron"),
                &x,
                0.5,
                train,
            )?;
            prof.forward.feed_forward += t0.elapsed().as_secs_f64();
            x = y;
            Some(s)
        } else {
            None
        };
        let t0 = Instant::now();
        let (y, attn) = self.attn_forward(params, i, &x, pe, batch, train)?;
        prof.forward.attention += t0.elapsed().as_secs_f64();
        x = y;
        let conv = if self.cfg.use_cnn_module {
            let t0 = Instant::now();
            let (y, s) = self.conv_forward(params, i, &x, batch, train)?;
            prof.forward.conv_module += t0.elapsed().as_secs_f64();
            x = y;
            Some(s)
        } else {
            None
        };
        let t0 = Instant::now();
        let scale = if self.cfg.macaron_style { 0.5 } else { 1.0 };
        let (y, ffn) = self.ffn_forward(
            params,
            &enc(i, "feed_forward"),
            &enc(i, "norm_ff"),
            &x,
            scale,
            train,
        )?;
        prof.forward.feed_forward += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (out, final_norm) = if self.cfg.use_cnn_module {
            let mut out = vec![0f32; y.len()];
            let s = layer_norm_forward(
                &y,
                params.get(&enc(i, "norm_final.weight"))?,
                params.get(&enc(i, "norm_final.bias"))?,
                1e-12,
                &mut out,
            );
            (out, s)
        } else {
            (y, LayerNormSaved::default())
        };
        prof.forward.norms += t0.elapsed().as_secs_f64();
        Ok((
            out,
            LayerSaved {
                macaron,
                attn,
                conv,
                ffn,
                final_norm,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        i: usize,
        dy: Vec<f32>,
        s: LayerSaved,
        pe: &[f32],
        batch: &Batch,
        prof: &mut StepProfile,
    ) -> Result<Vec<f32>> {
        let t0 = Instant::now();
        let mut dx = if self.cfg.use_cnn_module {
            let mut dx = vec![0f32; dy.len()];
            self.ln_bwd(
                params,
                grads,
                &enc(i, "norm_final"),
                &dy,
                &s.final_norm,
                &mut dx,
                false,
            )?;
            dx
        } else {
            dy
        };
        prof.backward.norms += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let scale = if self.cfg.macaron_style { 0.5 } else { 1.0 };
        self.ffn_backward(
            params,
            grads,
            &enc(i, "feed_forward"),
            &enc(i, "norm_ff"),
            &mut dx,
            s.ffn,
            scale,
        )?;
        prof.backward.feed_forward += t0.elapsed().as_secs_f64();
        if let Some(conv) = s.conv {
            let t0 = Instant::now();
            self.conv_backward(params, grads, i, &mut dx, conv, batch)?;
            prof.backward.conv_module += t0.elapsed().as_secs_f64();
        }
        let t0 = Instant::now();
        self.attn_backward(params, grads, i, &mut dx, s.attn, pe, batch)?;
        prof.backward.attention += t0.elapsed().as_secs_f64();
        if let Some(mac) = s.macaron {
            let t0 = Instant::now();
            self.ffn_backward(
                params,
                grads,
                &enc(i, "feed_forward_macaron"),
                &enc(i, "norm_ff_macaron"),
                &mut dx,
                mac,
                0.5,
            )?;
            prof.backward.feed_forward += t0.elapsed().as_secs_f64();
        }
        Ok(dx)
    }

    /// `x + scale * dropout(w_2(dropout(swish(w_1(LN(x))))))`.
    fn ffn_forward(
        &self,
        params: &Params,
        prefix: &str,
        norm: &str,
        x: &[f32],
        scale: f32,
        train: bool,
    ) -> Result<(Vec<f32>, FfnSaved)> {
        let d = self.cfg.output_size;
        let f = self.cfg.linear_units;
        let n = x.len() / d;
        let mut xn = vec![0f32; x.len()];
        let norm_s = layer_norm_forward(
            x,
            params.get(&format!("{norm}.weight"))?,
            params.get(&format!("{norm}.bias"))?,
            1e-12,
            &mut xn,
        );
        let mut h = vec![0f32; n * f];
        linear_forward(
            &xn,
            params.get(&format!("{prefix}.w_1.weight"))?,
            Some(params.get(&format!("{prefix}.w_1.bias"))?),
            d,
            &mut h,
        );
        let inner_mask = dropout_mask(&self.rng, n * f, self.cfg.dropout_rate, train)?;
        let mut a = vec![0f32; n * f];
        silu_forward(&h, inner_mask.as_deref(), &mut a);
        let (y, out_mask) =
            self.residual_branch(params, &format!("{prefix}.w_2"), x, &a, f, scale, train)?;
        Ok((
            y,
            FfnSaved {
                norm: norm_s,
                xn,
                h,
                a,
                inner_mask,
                out_mask,
            },
        ))
    }

    /// Adds the FFN branch's input gradient to `dx` (which holds the block output's gradient).
    #[allow(clippy::too_many_arguments)]
    fn ffn_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        prefix: &str,
        norm: &str,
        dx: &mut [f32],
        s: FfnSaved,
        scale: f32,
    ) -> Result<()> {
        let d = self.cfg.output_size;
        let f = self.cfg.linear_units;
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), scale);
        let mut da = vec![0f32; s.a.len()];
        self.linear_bwd(
            params,
            grads,
            &format!("{prefix}.w_2"),
            &s.a,
            &dout,
            f,
            Some(&mut da),
        )?;
        silu_backward(&s.h, s.inner_mask.as_deref(), &mut da);
        let mut dxn = dout;
        self.linear_bwd(
            params,
            grads,
            &format!("{prefix}.w_1"),
            &s.xn,
            &da,
            d,
            Some(&mut dxn),
        )?;
        self.ln_bwd(params, grads, norm, &dxn, &s.norm, dx, true)?;
        Ok(())
    }

    fn attn_forward(
        &self,
        params: &Params,
        i: usize,
        x: &[f32],
        pe: &[f32],
        batch: &Batch,
        train: bool,
    ) -> Result<(Vec<f32>, AttnSaved)> {
        let d = self.cfg.output_size;
        let heads = self.cfg.attention_heads;
        let dk = d / heads;
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let pn = 2 * t - 1;
        let get = |k: &str| params.get(&enc(i, k));
        let mut xn = vec![0f32; x.len()];
        let norm = layer_norm_forward(
            x,
            get("norm_mha.weight")?,
            get("norm_mha.bias")?,
            1e-12,
            &mut xn,
        );
        let proj = |name: &str| -> Result<Vec<f32>> {
            let mut y = vec![0f32; n * d];
            linear_forward(
                &xn,
                get(&format!("self_attn.{name}.weight"))?,
                Some(get(&format!("self_attn.{name}.bias"))?),
                d,
                &mut y,
            );
            Ok(y)
        };
        let (q, k, v) = (proj("linear_q")?, proj("linear_k")?, proj("linear_v")?);
        let mut p = vec![0f32; pn * d];
        linear_forward(pe, get("self_attn.linear_pos.weight")?, None, d, &mut p);
        let (bu, bv) = (get("self_attn.pos_bias_u")?, get("self_attn.pos_bias_v")?);
        let mut probs = vec![0f32; b * heads * t * t];
        let inv = 1.0 / (dk as f32).sqrt();
        probs
            .par_chunks_mut(t * t)
            .enumerate()
            .for_each(|(bh, pr)| {
                let (bi, h) = (bh / heads, bh % heads);
                attention_scores(
                    (&q, &k, &p),
                    (bu, bv),
                    (bi, h, t, d, dk),
                    &batch.frame_mask[bi * t..][..t],
                    inv,
                    pr,
                );
            });
        let att_mask = dropout_mask(
            &self.rng,
            probs.len(),
            self.cfg.attention_dropout_rate,
            train,
        )?;
        // ctx[b, :, h, :] = dropout(probs) · v[b, :, h, :]
        let mut ctx = vec![0f32; n * d];
        ctx.par_chunks_mut(t * d).enumerate().for_each(|(bi, cb)| {
            let mut pd = vec![0f32; t * t];
            for h in 0..heads {
                let pr = &probs[(bi * heads + h) * t * t..][..t * t];
                let a = match &att_mask {
                    Some(m) => {
                        let mm = &m[(bi * heads + h) * t * t..][..t * t];
                        for ((o, &x), &s) in pd.iter_mut().zip(pr).zip(mm) {
                            *o = x * s;
                        }
                        &pd[..]
                    }
                    None => pr,
                };
                matmul_serial(
                    t,
                    dk,
                    t,
                    &mut cb[h * dk..],
                    d,
                    Mat::rows(a, t),
                    Mat {
                        data: &v[bi * t * d + h * dk..],
                        rs: d,
                        cs: 1,
                    },
                    false,
                );
            }
        });
        let (y, out_mask) = self.residual_branch(
            params,
            &enc(i, "self_attn.linear_out"),
            x,
            &ctx,
            d,
            1.0,
            train,
        )?;
        Ok((
            y,
            AttnSaved {
                norm,
                xn,
                q,
                k,
                v,
                p,
                probs,
                att_mask,
                ctx,
                out_mask,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        i: usize,
        dx: &mut [f32],
        s: AttnSaved,
        pe: &[f32],
        batch: &Batch,
    ) -> Result<()> {
        let d = self.cfg.output_size;
        let heads = self.cfg.attention_heads;
        let dk = d / heads;
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let pn = 2 * t - 1;
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), 1.0);
        let mut dctx = vec![0f32; n * d];
        self.linear_bwd(
            params,
            grads,
            &enc(i, "self_attn.linear_out"),
            &s.ctx,
            &dout,
            d,
            Some(&mut dctx),
        )?;
        drop(dout);
        let (bu, bv) = (
            params.get(&enc(i, "self_attn.pos_bias_u"))?,
            params.get(&enc(i, "self_attn.pos_bias_v"))?,
        );
        let inv = 1.0 / (dk as f32).sqrt();
        let mut dq = vec![0f32; n * d];
        let mut dk_ = vec![0f32; n * d];
        let mut dv = vec![0f32; n * d];
        // per utterance: dq, dk, dv rows; accumulators: dp [pn, d], du [H, dk], dbv [H, dk]
        let acc_len = pn * d + 2 * d;
        let items: Vec<(usize, QkvRows)> = dq
            .chunks_mut(t * d)
            .zip(dk_.chunks_mut(t * d).zip(dv.chunks_mut(t * d)))
            .enumerate()
            .collect();
        let (q, k, v, p, probs) = (&s.q, &s.k, &s.v, &s.p, &s.probs);
        let att_mask = s.att_mask.as_deref();
        let dctx = &dctx;
        let acc = grouped(items, acc_len, |(bi, (dqb, (dkb, dvb))), acc| {
            let (dp, rest) = acc.split_at_mut(pn * d);
            let (du, dbv) = rest.split_at_mut(d);
            let mut da = vec![0f32; t * t];
            let mut dbd = vec![0f32; t * pn];
            let mut qu = vec![0f32; t * dk];
            let mut qv = vec![0f32; t * dk];
            let mut pd = vec![0f32; t * t];
            let mut dqv = vec![0f32; t * dk];
            for h in 0..heads {
                let off = (bi * heads + h) * t * t;
                let pr = &probs[off..][..t * t];
                let m = att_mask.map(|m| &m[off..][..t * t]);
                let a: &[f32] = match m {
                    Some(m) => {
                        for ((o, &x), &s) in pd.iter_mut().zip(pr).zip(m) {
                            *o = x * s;
                        }
                        &pd
                    }
                    None => pr,
                };
                let dch = Mat {
                    data: &dctx[bi * t * d + h * dk..],
                    rs: d,
                    cs: 1,
                };
                let vh = Mat {
                    data: &v[bi * t * d + h * dk..],
                    rs: d,
                    cs: 1,
                };
                // dv_h = aᵀ · dctx_h ; da = dctx_h · v_hᵀ
                matmul_serial(
                    t,
                    dk,
                    t,
                    &mut dvb[h * dk..],
                    d,
                    Mat::rows(a, t).t(),
                    dch,
                    false,
                );
                matmul_serial(t, t, dk, &mut da, t, dch, vh.t(), false);
                // through dropout and softmax, then 1/sqrt(dk)
                for r in 0..t {
                    let pr_r = &pr[r * t..][..t];
                    let da_r = &mut da[r * t..][..t];
                    if let Some(m) = m {
                        for (g, &s) in da_r.iter_mut().zip(&m[r * t..][..t]) {
                            *g *= s;
                        }
                    }
                    let dot: f32 = da_r.iter().zip(pr_r).map(|(&g, &p)| g * p).sum();
                    for (g, &p) in da_r.iter_mut().zip(pr_r) {
                        *g = p * (*g - dot) * inv;
                    }
                }
                // ds → matrix_bd gradient in the unshifted [T, 2T-1] layout
                dbd.fill(0.0);
                for r in 0..t {
                    let base = t - 1 - r;
                    dbd[r * pn + base..r * pn + base + t].copy_from_slice(&da[r * t..][..t]);
                }
                let (kh, ph) = head_views((q, k, p), (bu, bv), (bi, h, t, d, dk), &mut qu, &mut qv);
                // d(q+u) = ds · k ; dk = dsᵀ · (q+u)
                matmul_serial(
                    t,
                    dk,
                    t,
                    &mut dqb[h * dk..],
                    d,
                    Mat::rows(&da, t),
                    kh,
                    false,
                );
                matmul_serial(
                    t,
                    dk,
                    t,
                    &mut dkb[h * dk..],
                    d,
                    Mat::rows(&da, t).t(),
                    Mat::rows(&qu, dk),
                    false,
                );
                // d(q+v) = dbd · p ; dp += dbdᵀ · (q+v)
                matmul_serial(t, dk, pn, &mut dqv, dk, Mat::rows(&dbd, pn), ph, false);
                matmul_serial(
                    pn,
                    dk,
                    t,
                    &mut dp[h * dk..],
                    d,
                    Mat::rows(&dbd, pn).t(),
                    Mat::rows(&qv, dk),
                    true,
                );
                for r in 0..t {
                    let row = &mut dqb[r * d + h * dk..][..dk];
                    for j in 0..dk {
                        du[h * dk + j] += row[j];
                        dbv[h * dk + j] += dqv[r * dk + j];
                        row[j] += dqv[r * dk + j];
                    }
                }
            }
        });

        let (dp, rest) = acc.split_at(pn * d);
        let (du, dbv) = rest.split_at(d);
        for (name, g) in [("self_attn.pos_bias_u", du), ("self_attn.pos_bias_v", dbv)] {
            let key = enc(i, name);
            let mut acc = grads.take(&key, d);
            for (a, &v) in acc.iter_mut().zip(g) {
                *a += v;
            }
            grads.put(&key, acc);
        }
        // dW_pos += dpᵀ · pe
        let wpn = enc(i, "self_attn.linear_pos.weight");
        let mut dwp = grads.take(&wpn, d * d);
        gemm::matmul(
            d,
            d,
            pn,
            &mut dwp,
            d,
            Mat::rows(dp, d).t(),
            Mat::rows(pe, d),
            true,
        );
        grads.put(&wpn, dwp);
        let mut dxn = vec![0f32; n * d];
        self.linear_bwd(
            params,
            grads,
            &enc(i, "self_attn.linear_q"),
            &s.xn,
            &dq,
            d,
            Some(&mut dxn),
        )?;
        let mut tmp = vec![0f32; n * d];
        self.linear_bwd(
            params,
            grads,
            &enc(i, "self_attn.linear_k"),
            &s.xn,
            &dk_,
            d,
            Some(&mut tmp),
        )?;
        add_into(&mut dxn, &tmp);
        self.linear_bwd(
            params,
            grads,
            &enc(i, "self_attn.linear_v"),
            &s.xn,
            &dv,
            d,
            Some(&mut tmp),
        )?;
        add_into(&mut dxn, &tmp);
        self.ln_bwd(params, grads, &enc(i, "norm_mha"), &dxn, &s.norm, dx, true)?;
        Ok(())
    }

    fn conv_forward(
        &self,
        params: &Params,
        i: usize,
        x: &[f32],
        batch: &Batch,
        train: bool,
    ) -> Result<(Vec<f32>, ConvSaved)> {
        let d = self.cfg.output_size;
        let n = x.len() / d;
        let get = |k: &str| params.get(&enc(i, k));
        let mut xn = vec![0f32; x.len()];
        let norm = layer_norm_forward(
            x,
            get("norm_conv.weight")?,
            get("norm_conv.bias")?,
            1e-12,
            &mut xn,
        );
        let mut h = vec![0f32; n * 2 * d];
        linear_forward(
            &xn,
            get("conv_module.pointwise_conv1.weight")?,
            Some(get("conv_module.pointwise_conv1.bias")?),
            d,
            &mut h,
        );
        // GLU and the padding mask
        let mut gm = vec![0f32; n * d];
        let fm = &batch.frame_mask;
        gm.par_chunks_mut(d)
            .zip(h.par_chunks(2 * d))
            .enumerate()
            .for_each(|(r, (g, hr))| {
                let m = fm[r];
                for j in 0..d {
                    g[j] = hr[j] * sigmoid(hr[d + j]) * m;
                }
            });
        let k = self.cfg.cnn_module_kernel;
        let w_kc = kernel_major(get("conv_module.depthwise_conv.weight")?, d, k, false);
        let mut c = correlate_rows(&gm, &w_kc, (batch.b, batch.t, d, k), (k - 1) / 2);
        let bias = get("conv_module.depthwise_conv.bias")?;
        c.par_chunks_mut(d).for_each(|row| {
            for (v, &bb) in row.iter_mut().zip(bias) {
                *v += bb;
            }
        });
        let mut bn_out = vec![0f32; n * d];
        let (cn, rstd, ln) = match self.cfg.cnn_module_norm {
            CnnModuleNorm::LayerNorm => {
                let s = layer_norm_forward(
                    &c,
                    get("conv_module.norm.weight")?,
                    get("conv_module.norm.bias")?,
                    1e-5,
                    &mut bn_out,
                );
                (Vec::new(), Vec::new(), Some(s))
            }
            CnnModuleNorm::BatchNorm => {
                let gamma = get("conv_module.norm.weight")?;
                let beta = get("conv_module.norm.bias")?;
                // batch statistics of the valid frames in training, running ones in eval
                let (mean, var) = if train {
                    let (mean, var) = masked_moments(&c, fm, d, batch.valid);
                    self.update_running_stats(i, &mean, &var, batch.valid)?;
                    (mean, var)
                } else {
                    (
                        get("conv_module.norm.running_mean")?.to_vec(),
                        get("conv_module.norm.running_var")?.to_vec(),
                    )
                };
                let rstd: Vec<f32> = var.iter().map(|&v| 1.0 / (v + 1e-5).sqrt()).collect();
                let mut cn = vec![0f32; n * d];
                cn.par_chunks_mut(d)
                    .zip(c.par_chunks(d))
                    .for_each(|(o, row)| {
                        for j in 0..d {
                            o[j] = (row[j] - mean[j]) * rstd[j];
                        }
                    });
                bn_out
                    .par_chunks_mut(d)
                    .zip(cn.par_chunks(d))
                    .for_each(|(o, row)| {
                        for j in 0..d {
                            o[j] = row[j] * gamma[j] + beta[j];
                        }
                    });
                (cn, rstd, None)
            }
        };
        let mut sw = vec![0f32; n * d];
        silu_forward(&bn_out, None, &mut sw);
        let (y, out_mask) = self.residual_branch(
            params,
            &enc(i, "conv_module.pointwise_conv2"),
            x,
            &sw,
            d,
            1.0,
            train,
        )?;
        Ok((
            y,
            ConvSaved {
                norm,
                xn,
                h,
                gm,
                cn,
                rstd,
                ln,
                bn_out,
                s: sw,
                out_mask,
            },
        ))
    }

    /// torch's running update: `(1 - m) * running + m * batch` with the unbiased variance.
    fn update_running_stats(
        &self,
        i: usize,
        mean: &[f32],
        var: &[f32],
        valid: usize,
    ) -> Result<()> {
        let n = valid.max(1) as f64;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = 0.1f64;
        for (name, batch, factor) in [
            ("conv_module.norm.running_mean", mean, 1.0),
            ("conv_module.norm.running_var", var, unbiased),
        ] {
            let key = enc(i, name);
            let var = self
                .all_vars
                .get(&key)
                .ok_or_else(|| candle_core::Error::Msg(format!("engine: no variable {key}")))?;
            let old = var.as_tensor().to_vec1::<f32>()?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(&o, &b)| ((o as f64) * (1.0 - m) + (b as f64) * (m * factor)) as f32)
                .collect();
            let new = Tensor::from_vec(new, old.len(), &Device::Cpu)?;
            var.as_tensor().slice_set(&new, 0, 0)?;
        }
        Ok(())
    }

    fn conv_backward(
        &self,
        params: &Params,
        grads: &mut Grads,
        i: usize,
        dx: &mut [f32],
        s: ConvSaved,
        batch: &Batch,
    ) -> Result<()> {
        let d = self.cfg.output_size;
        let n = dx.len() / d;
        let get = |k: &str| params.get(&enc(i, k));
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), 1.0);
        let mut ds = vec![0f32; n * d];
        self.linear_bwd(
            params,
            grads,
            &enc(i, "conv_module.pointwise_conv2"),
            &s.s,
            &dout,
            d,
            Some(&mut ds),
        )?;
        silu_backward(&s.bn_out, None, &mut ds);
        let mut dc = dout;
        match (&s.ln, self.cfg.cnn_module_norm) {
            (Some(ln), _) => {
                self.ln_bwd(
                    params,
                    grads,
                    &enc(i, "conv_module.norm"),
                    &ds,
                    ln,
                    &mut dc,
                    false,
                )?;
            }
            _ => {
                let gamma = get("conv_module.norm.weight")?;
                let mut dg = grads.take(&enc(i, "conv_module.norm.weight"), d);
                let mut db = grads.take(&enc(i, "conv_module.norm.bias"), d);
                // Σ dy·x-hat and Σ dy over all rows (padded rows carry zero gradient)
                let (sg, sb) = col_dot_sums(&ds, &s.cn, d);
                for j in 0..d {
                    dg[j] += sg[j];
                    db[j] += sb[j];
                }
                grads.put(&enc(i, "conv_module.norm.weight"), dg);
                grads.put(&enc(i, "conv_module.norm.bias"), db);
                let nv = batch.valid.max(1) as f32;
                // dcn = dy·gamma; Σ dcn and Σ dcn·cn per channel
                let mut s1 = vec![0f32; d];
                let mut s2 = vec![0f32; d];
                for j in 0..d {
                    s1[j] = sb[j] * gamma[j];
                    s2[j] = sg[j] * gamma[j];
                }
                let fm = &batch.frame_mask;
                let rstd = &s.rstd;
                dc.par_chunks_mut(d)
                    .zip(ds.par_chunks(d).zip(s.cn.par_chunks(d)))
                    .enumerate()
                    .for_each(|(r, (o, (g, cn)))| {
                        let m = fm[r];
                        for j in 0..d {
                            o[j] = rstd[j] * (g[j] * gamma[j] - m * (s1[j] + cn[j] * s2[j]) / nv);
                        }
                    });
            }
        }
        drop(ds);
        // depthwise conv: bias, weight, input
        let k = self.cfg.cnn_module_kernel;
        let pad = (k - 1) / 2;
        let bn = enc(i, "conv_module.depthwise_conv.bias");
        let mut dbias = grads.take(&bn, d);
        add_col_sums(&dc, d, &mut dbias);
        grads.put(&bn, dbias);
        let wn = enc(i, "conv_module.depthwise_conv.weight");
        let dwk = weight_grad(&s.gm, &dc, (batch.b, batch.t, d, k), pad);
        let mut dw = grads.take(&wn, d * k);
        for (a, v) in dw.iter_mut().zip(&dwk) {
            *a += v;
        }
        grads.put(&wn, dw);
        let w_flip = kernel_major(get("conv_module.depthwise_conv.weight")?, d, k, true);
        let dgm = correlate_rows(&dc, &w_flip, (batch.b, batch.t, d, k), k - 1 - pad);
        drop(dc);
        // mask and GLU
        let mut dh = vec![0f32; n * 2 * d];
        let fm = &batch.frame_mask;
        dh.par_chunks_mut(2 * d)
            .zip(s.h.par_chunks(2 * d).zip(dgm.par_chunks(d)))
            .enumerate()
            .for_each(|(r, (o, (hr, g)))| {
                let m = fm[r];
                for j in 0..d {
                    let sg = sigmoid(hr[d + j]);
                    let gv = g[j] * m;
                    o[j] = gv * sg;
                    o[d + j] = gv * hr[j] * sg * (1.0 - sg);
                }
            });
        let mut dxn = vec![0f32; n * d];
        self.linear_bwd(
            params,
            grads,
            &enc(i, "conv_module.pointwise_conv1"),
            &s.xn,
            &dh,
            d,
            Some(&mut dxn),
        )?;
        self.ln_bwd(params, grads, &enc(i, "norm_conv"), &dxn, &s.norm, dx, true)?;
        Ok(())
    }
}

/// Per utterance, the conv0 output frames (`valid1`) and conv1 output frames (`valid2`) that
/// valid encoder frames depend on.
fn valid_conv_rows(
    out_lengths: &[usize],
    t1: usize,
    t2: usize,
    s2: usize,
) -> (Vec<usize>, Vec<usize>) {
    let valid2: Vec<usize> = out_lengths.iter().map(|&n| n.min(t2)).collect();
    let valid1 = valid2
        .iter()
        .map(|&n| {
            if n == 0 {
                0
            } else {
                (s2 * (n - 1) + 3).min(t1)
            }
        })
        .collect();
    (valid1, valid2)
}

/// One utterance's rows of the q, k and v gradients.
type QkvRows<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

/// Output time-block of the conv1 im2col (bounds its memory).
const T_BLOCK: usize = 48;

fn apply_mask(mut x: Vec<f32>, mask: Option<&[f32]>) -> Vec<f32> {
    if let Some(m) = mask {
        x.par_iter_mut().zip(m).for_each(|(v, &s)| *v *= s);
    }
    x
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    let per = row_block(acc.len() / 64 + 1) * 64;
    acc.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(a, b)| {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

/// Backward of `relu(conv + bias)`: zeroes `g` where the output was clipped, then adds its
/// column sums to the bias gradient `bias`.
fn relu_bias_backward(grads: &mut Grads, bias: &str, g: &mut [f32], out: &[f32], d: usize) {
    relu_backward(g, out);
    let mut db = grads.take(bias, d);
    add_col_sums(g, d, &mut db);
    grads.put(bias, db);
}

fn relu_backward(g: &mut [f32], out: &[f32]) {
    let per = row_block(g.len() / 64 + 1) * 64;
    g.par_chunks_mut(per)
        .zip(out.par_chunks(per))
        .for_each(|(g, o)| {
            for (g, &o) in g.iter_mut().zip(o) {
                if o <= 0.0 {
                    *g = 0.0;
                }
            }
        });
}

/// Per channel `(Σ_rows a·b, Σ_rows a)` of `[N, d]` matrices, reduced in a fixed order.
fn col_dot_sums(a: &[f32], b: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = a.len() / d;
    let per = row_block(rows);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = a
        .par_chunks(per * d)
        .zip(b.par_chunks(per * d))
        .map(|(ab, bb)| {
            let (mut s, mut t) = (vec![0f32; d], vec![0f32; d]);
            for (ar, br) in ab.chunks_exact(d).zip(bb.chunks_exact(d)) {
                for j in 0..d {
                    s[j] += ar[j] * br[j];
                    t[j] += ar[j];
                }
            }
            (s, t)
        })
        .collect();
    let (mut s, mut t) = (vec![0f32; d], vec![0f32; d]);
    for (ps, pt) in &parts {
        for j in 0..d {
            s[j] += ps[j];
            t[j] += pt[j];
        }
    }
    (s, t)
}

/// Mean and biased variance per channel over the valid rows of `[N, d]`.
fn masked_moments(x: &[f32], mask: &[f32], d: usize, valid: usize) -> (Vec<f32>, Vec<f32>) {
    let n = valid.max(1) as f32;
    let (sum, _) = col_dot_sums_masked(x, mask, d, None);
    let mean: Vec<f32> = sum.iter().map(|&s| s / n).collect();
    let (sq, _) = col_dot_sums_masked(x, mask, d, Some(&mean));
    (mean, sq.iter().map(|&s| s / n).collect())
}

/// Σ over valid rows of `x` (or of `(x - center)²` when `center` is given), per channel.
fn col_dot_sums_masked(
    x: &[f32],
    mask: &[f32],
    d: usize,
    center: Option<&[f32]>,
) -> (Vec<f32>, ()) {
    let rows = x.len() / d;
    let per = row_block(rows);
    let parts: Vec<Vec<f32>> = x
        .par_chunks(per * d)
        .zip(mask.par_chunks(per))
        .map(|(xb, mb)| {
            let mut s = vec![0f32; d];
            for (row, &m) in xb.chunks_exact(d).zip(mb) {
                if m == 0.0 {
                    continue;
                }
                match center {
                    None => s.iter_mut().zip(row).for_each(|(a, &v)| *a += v),
                    Some(c) => s
                        .iter_mut()
                        .zip(row.iter().zip(c))
                        .for_each(|(a, (&v, &cc))| *a += (v - cc) * (v - cc)),
                }
            }
            s
        })
        .collect();
    let mut s = vec![0f32; d];
    for p in &parts {
        for (a, &v) in s.iter_mut().zip(p) {
            *a += v;
        }
    }
    (s, ())
}

/// Utterance MVN in place over `[B, T, D]`; returns (normalised x, 1/std per (b, dim)).
fn utterance_mvn_forward(
    x: &mut [f32],
    lengths: &[usize],
    t: usize,
    dim: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut rstd = vec![0f32; lengths.len() * dim];
    x.par_chunks_mut(t * dim)
        .zip(rstd.par_chunks_mut(dim))
        .zip(lengths.par_iter())
        .for_each(|((xb, rb), &len)| {
            let n = len.min(t);
            let cnt = len.max(1) as f32;
            let mut mean = vec![0f32; dim];
            for row in xb[..n * dim].chunks_exact(dim) {
                mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v);
            }
            mean.iter_mut().for_each(|m| *m /= cnt);
            let mut var = vec![0f32; dim];
            for row in xb[..n * dim].chunks_exact(dim) {
                for j in 0..dim {
                    var[j] += (row[j] - mean[j]) * (row[j] - mean[j]);
                }
            }
            for j in 0..dim {
                rb[j] = 1.0 / (var[j] / cnt + 1e-6).sqrt();
            }
            for row in xb.chunks_exact_mut(dim) {
                for j in 0..dim {
                    row[j] = (row[j] - mean[j]) * rb[j];
                }
            }
        });
    (x.to_vec(), rstd)
}

/// Backward of `utterance_mvn_forward` in place of `dy`.
fn utterance_mvn_backward(
    dy: &mut [f32],
    y: &[f32],
    rstd: &[f32],
    lengths: &[usize],
    t: usize,
    dim: usize,
) {
    dy.par_chunks_mut(t * dim)
        .zip(y.par_chunks(t * dim))
        .zip(rstd.par_chunks(dim))
        .zip(lengths.par_iter())
        .for_each(|(((gb, yb), rb), &len)| {
            let n = len.min(t);
            let cnt = len.max(1) as f32;
            let (mut s1, mut s2) = (vec![0f32; dim], vec![0f32; dim]);
            for (gr, yr) in gb.chunks_exact(dim).zip(yb.chunks_exact(dim)) {
                for j in 0..dim {
                    s1[j] += gr[j];
                    s2[j] += gr[j] * yr[j];
                }
            }
            for (ti, (gr, yr)) in gb
                .chunks_exact_mut(dim)
                .zip(yb.chunks_exact(dim))
                .enumerate()
            {
                let m = if ti < n { 1.0 } else { 0.0 };
                for j in 0..dim {
                    gr[j] = rb[j] * (gr[j] - m * (s1[j] + yr[j] * s2[j]) / cnt);
                }
            }
        });
}

/// For utterance `bi` and head `h`: the query plus each positional bias (`q + u` into `qu`,
/// `q + v` into `qv`, `[T, dk]`), and strided views of the head's keys `[T, dk]` and projected
/// positions `[2T - 1, dk]` (no copies).
fn head_views<'a>(
    (q, k, p): (&[f32], &'a [f32], &'a [f32]),
    (bu, bv): (&[f32], &[f32]),
    (bi, h, t, d, dk): (usize, usize, usize, usize, usize),
    qu: &mut [f32],
    qv: &mut [f32],
) -> (Mat<'a>, Mat<'a>) {
    for r in 0..t {
        let qrow = &q[(bi * t + r) * d + h * dk..][..dk];
        for j in 0..dk {
            qu[r * dk + j] = qrow[j] + bu[h * dk + j];
            qv[r * dk + j] = qrow[j] + bv[h * dk + j];
        }
    }
    let head = |x: &'a [f32], row0: usize| Mat {
        data: &x[row0 * d + h * dk..],
        rs: d,
        cs: 1,
    };
    (head(k, bi * t), head(p, 0))
}

/// Softmax probabilities of one utterance and head: `((q+u)·kᵀ + shift((q+v)·pᵀ)) / sqrt(dk)`
/// with padded keys masked, into `out` `[T, T]`.
fn attention_scores(
    (q, k, p): (&[f32], &[f32], &[f32]),
    (bu, bv): (&[f32], &[f32]),
    (bi, h, t, d, dk): (usize, usize, usize, usize, usize),
    key_mask: &[f32],
    inv: f32,
    out: &mut [f32],
) {
    let pn = 2 * t - 1;
    let mut qu = vec![0f32; t * dk];
    let mut qv = vec![0f32; t * dk];
    let (kh, ph) = head_views((q, k, p), (bu, bv), (bi, h, t, d, dk), &mut qu, &mut qv);
    matmul_serial(t, t, dk, out, t, Mat::rows(&qu, dk), kh.t(), false);
    let mut bd = vec![0f32; t * pn];
    matmul_serial(t, pn, dk, &mut bd, pn, Mat::rows(&qv, dk), ph.t(), false);
    let key_mask = &key_mask[..t];
    activation::simd(|| {
        for r in 0..t {
            let row = &mut out[r * t..][..t];
            let shifted = &bd[r * pn + (t - 1 - r)..][..t];
            for ((v, &s), &m) in row.iter_mut().zip(shifted).zip(key_mask) {
                *v = (*v + s) * inv + (m - 1.0) * 1e9;
            }
            activation::softmax_in_place(row);
        }
    });
}

/// `[T, F]` single-channel input → im2col `[T1 F1, 9]` of 3x3 taps at `stride`.
fn im2col_single(x: &[f32], f: usize, t1: usize, f1: usize, stride: usize) -> Vec<f32> {
    let mut col = vec![0f32; t1 * f1 * 9];
    for ti in 0..t1 {
        for fi in 0..f1 {
            let o = &mut col[(ti * f1 + fi) * 9..][..9];
            for kt in 0..3 {
                for kf in 0..3 {
                    o[kt * 3 + kf] = x[(stride * ti + kt) * f + stride * fi + kf];
                }
            }
        }
    }
    col
}

/// Scatter-add of `im2col_single`'s gradient back into `dx` `[T, F]`.
fn col2im_single_add(dcol: &[f32], f: usize, t1: usize, f1: usize, stride: usize, dx: &mut [f32]) {
    for ti in 0..t1 {
        for fi in 0..f1 {
            let g = &dcol[(ti * f1 + fi) * 9..][..9];
            for kt in 0..3 {
                for kf in 0..3 {
                    dx[(stride * ti + kt) * f + stride * fi + kf] += g[kt * 3 + kf];
                }
            }
        }
    }
}

/// Channels-last `[T1, F1, C]` → im2col rows for output frames `tb..tb+rows_t` (all `f2`
/// frequencies): `[rows_t F2, 9 C]`, column `(kt*3 + kf) * C + c`.
fn im2col_channels(
    x: &[f32],
    (f1, c): (usize, usize),
    (tb, rows_t, f2): (usize, usize, usize),
    stride: usize,
    col: &mut Vec<f32>,
) {
    col.resize(rows_t * f2 * 9 * c, 0.0);
    for ti in 0..rows_t {
        let t_out = tb + ti;
        for fi in 0..f2 {
            let o = &mut col[(ti * f2 + fi) * 9 * c..][..9 * c];
            for kt in 0..3 {
                for kf in 0..3 {
                    let src = ((stride * t_out + kt) * f1 + stride * fi + kf) * c;
                    o[(kt * 3 + kf) * c..][..c].copy_from_slice(&x[src..src + c]);
                }
            }
        }
    }
}

/// Scatter-add of `im2col_channels`'s gradient back into `dx` `[T1, F1, C]`.
fn col2im_channels_add(
    dcol: &[f32],
    (f1, c): (usize, usize),
    (tb, rows_t, f2): (usize, usize, usize),
    stride: usize,
    dx: &mut [f32],
) {
    for ti in 0..rows_t {
        let t_out = tb + ti;
        for fi in 0..f2 {
            let g = &dcol[(ti * f2 + fi) * 9 * c..][..9 * c];
            for kt in 0..3 {
                for kf in 0..3 {
                    let dst = ((stride * t_out + kt) * f1 + stride * fi + kf) * c;
                    for (a, &v) in dx[dst..dst + c]
                        .iter_mut()
                        .zip(&g[(kt * 3 + kf) * c..][..c])
                    {
                        *a += v;
                    }
                }
            }
        }
    }
}

/// torch conv weight `[C_out, C_in, 3, 3]` → `[C_out, 9 C_in]` with column `(kt*3+kf)*C_in + c`.
fn conv_weight_taps_last(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..c_out {
        for ci in 0..c_in {
            for tap in 0..9 {
                out[o * 9 * c_in + tap * c_in + ci] = w[(o * c_in + ci) * 9 + tap];
            }
        }
    }
    out
}

/// Adds a `[C_out, 9 C_in]` (taps-last) gradient into torch's `[C_out, C_in, 3, 3]` layout.
fn conv_weight_grad_channels_first(g: &[f32], c_out: usize, c_in: usize, acc: &mut [f32]) {
    for o in 0..c_out {
        for ci in 0..c_in {
            for tap in 0..9 {
                acc[(o * c_in + ci) * 9 + tap] += g[o * 9 * c_in + tap * c_in + ci];
            }
        }
    }
}

/// ESPnet's `out.0` weight `[odim, C F2]` (channel-major) → `[odim, F2 C]`.
fn out_weight_freq_major(w: &[f32], odim: usize, c: usize, f2: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..odim {
        for ci in 0..c {
            for fi in 0..f2 {
                out[o * f2 * c + fi * c + ci] = w[o * c * f2 + ci * f2 + fi];
            }
        }
    }
    out
}

/// Adds a `[odim, F2 C]` gradient into the channel-major `[odim, C F2]` layout.
fn out_weight_grad_channel_major(g: &[f32], odim: usize, c: usize, f2: usize, acc: &mut [f32]) {
    for o in 0..odim {
        for ci in 0..c {
            for fi in 0..f2 {
                acc[o * c * f2 + ci * f2 + fi] += g[o * f2 * c + fi * c + ci];
            }
        }
    }
}
