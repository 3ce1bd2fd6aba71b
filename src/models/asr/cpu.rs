//! The CPU training engine: one hand-written forward and backward of the whole `AsrModel`
//! (featurizer → subsampling → Conformer blocks → CTC) on f32 slices, for CPU training.
//!
//! candle's autograd runs a Conformer step as thousands of small ops, each allocating a fresh
//! tensor, most of them single-threaded; on two cores most of a step went to page faults and
//! threads waiting on each other, not arithmetic. This engine computes the same function with
//! the same parameters, dropout draws and batch-norm updates as `AsrModel::forward` +
//! `ctc_loss`, as a composition of the pool-parallel kernels of `crate::ops` (each with its
//! backward and its own test against PyTorch): every matmul is one gemm on strided views (no
//! head split/merge copies), the subsampling convs are im2col (or Winograd) gemms per
//! utterance, attention runs per utterance and head with its softmax fused.
//!
//! The parameters are resolved from the model's variable names once, when the engine is built,
//! into a typed tree ([`Weights`], as llm.c's `ParameterTensors`); a step reads their values
//! into that tree and writes gradients into a tree of the same shape. Gradients come back as
//! tensors for the optimiser, so checkpoints, resume and the candle path (other devices and
//! dtypes, `AsrModel::forward`) are unchanged; tests check both give the same loss and
//! gradients (`tests/engine.rs`) and against PyTorch.
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
    add_in_place, glu_backward, glu_forward, relu_backward, relu_in_place, residual_add,
    scale_mask, silu_backward, silu_forward,
};
use crate::ops::attention::{self, RelPosInputs};
use crate::ops::conv::{correlate_rows, kernel_major, weight_grad};
use crate::ops::ctc::ctc_loss_from_logits;
use crate::ops::gemm::{self, add_col_sums, grouped_sum, linear_backward, linear_forward, Mat};
use crate::ops::norm::{
    batch_norm_backward, batch_norm_forward, batch_norm_update_running, global_normalize,
    layer_norm_backward, layer_norm_forward, masked_moments, utterance_mvn_backward,
    utterance_mvn_forward, BatchNormSaved, LayerNormSaved, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM,
};
use crate::ops::profile::{Kind, Pass, Profiler};
use crate::ops::{conv, layer_sum, winograd, DropoutRng};

type Result<T> = candle_core::Result<T>;

/// ESPnet's `LayerNorm` eps (every Conformer norm but the two below).
const ESPNET_EPS: f32 = 1e-12;
/// `torch.nn.LayerNorm`'s default eps (the linear embed's norm, the conv module's layer norm).
const TORCH_EPS: f32 = 1e-5;

// ---------------------------------------------------------------------------------------------
// The typed parameter tree. `Weights<usize>` holds variable indices (resolved once from the
// names), `Weights<Vec<f32>>` a step's values or its gradients.

/// A tree whose leaves are parameters: mapped to a tree of the same shape, or flattened (in
/// one fixed order).
trait Node<T> {
    type Of<U>;
    fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> Self::Of<U>;
    fn into_leaves(self, out: &mut Vec<T>);
}

impl<T, N: Node<T>> Node<T> for Option<N> {
    type Of<U> = Option<N::Of<U>>;
    fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> Self::Of<U> {
        self.as_ref().map(|n| Node::map(n, f))
    }
    fn into_leaves(self, out: &mut Vec<T>) {
        if let Some(n) = self {
            n.into_leaves(out)
        }
    }
}

impl<T, N: Node<T>> Node<T> for Vec<N> {
    type Of<U> = Vec<N::Of<U>>;
    fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> Self::Of<U> {
        self.iter().map(|n| Node::map(n, f)).collect()
    }
    fn into_leaves(self, out: &mut Vec<T>) {
        for n in self {
            n.into_leaves(out)
        }
    }
}

/// `Node` for a struct of leaves (`T`), optional leaves (`Option<T>`) and nodes.
macro_rules! node {
    ($name:ident { leaves: [$($l:ident),*], optional: [$($o:ident),*], nodes: [$($n:ident),*] }) => {
        impl<T> Node<T> for $name<T> {
            type Of<U> = $name<U>;
            fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> $name<U> {
                $name {
                    $($l: f(&self.$l),)*
                    $($o: self.$o.as_ref().map(|v| f(v)),)*
                    $($n: Node::map(&self.$n, f),)*
                }
            }
            fn into_leaves(self, out: &mut Vec<T>) {
                $(out.push(self.$l);)*
                $(out.extend(self.$o);)*
                $(self.$n.into_leaves(out);)*
            }
        }
    };
}

/// `torch.nn.Linear` (or a 1×1 / depthwise conv): `weight` `[out, in…]`, optional `bias`.
struct Linear<T> {
    weight: T,
    bias: Option<T>,
}
node!(Linear {
    leaves: [weight],
    optional: [bias],
    nodes: []
});

/// A layer norm's (or batch norm's) affine parameters.
struct Norm<T> {
    weight: T,
    bias: T,
}
node!(Norm {
    leaves: [weight, bias],
    optional: [],
    nodes: []
});

/// Batch norm's running statistics (state: updated in training forwards, never by gradients).
struct Running<T> {
    mean: T,
    var: T,
}
node!(Running {
    leaves: [mean, var],
    optional: [],
    nodes: []
});

/// ESPnet's `PositionwiseFeedForward` with its pre-norm.
struct FeedForward<T> {
    norm: Norm<T>,
    w_1: Linear<T>,
    w_2: Linear<T>,
}
node!(FeedForward {
    leaves: [],
    optional: [],
    nodes: [norm, w_1, w_2]
});

/// ESPnet's `RelPositionMultiHeadedAttention` with its pre-norm.
struct Attention<T> {
    norm: Norm<T>,
    q: Linear<T>,
    k: Linear<T>,
    v: Linear<T>,
    out: Linear<T>,
    pos: Linear<T>,
    bias_u: T,
    bias_v: T,
}
node!(Attention {
    leaves: [bias_u, bias_v],
    optional: [],
    nodes: [norm, q, k, v, out, pos]
});

/// ESPnet's `ConvolutionModule` with its pre-norm.
struct ConvModule<T> {
    norm: Norm<T>,
    pointwise1: Linear<T>,
    depthwise: Linear<T>,
    conv_norm: Norm<T>,
    /// Batch norm only.
    running: Option<Running<T>>,
    pointwise2: Linear<T>,
}
node!(ConvModule {
    leaves: [],
    optional: [],
    nodes: [norm, pointwise1, depthwise, conv_norm, running, pointwise2]
});

/// ESPnet's `EncoderLayer` of a Conformer.
struct Layer<T> {
    macaron: Option<FeedForward<T>>,
    attn: Attention<T>,
    conv: Option<ConvModule<T>>,
    ffn: FeedForward<T>,
    /// With the conv module only.
    final_norm: Option<Norm<T>>,
}
node!(Layer {
    leaves: [],
    optional: [],
    nodes: [macaron, attn, conv, ffn, final_norm]
});

/// ESPnet's input layer: `Linear` + layer norm, or `Conv2dSubsampling` (two 3×3 convs and a
/// Linear over the flattened channels × frequencies).
enum Embed<T> {
    Linear {
        linear: Linear<T>,
        norm: Norm<T>,
    },
    Conv {
        conv0: Linear<T>,
        conv1: Linear<T>,
        out: Linear<T>,
    },
}

impl<T> Node<T> for Embed<T> {
    type Of<U> = Embed<U>;
    fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> Embed<U> {
        match self {
            Embed::Linear { linear, norm } => Embed::Linear {
                linear: Node::map(linear, f),
                norm: Node::map(norm, f),
            },
            Embed::Conv { conv0, conv1, out } => Embed::Conv {
                conv0: Node::map(conv0, f),
                conv1: Node::map(conv1, f),
                out: Node::map(out, f),
            },
        }
    }
    fn into_leaves(self, out: &mut Vec<T>) {
        match self {
            Embed::Linear { linear, norm } => {
                linear.into_leaves(out);
                norm.into_leaves(out);
            }
            Embed::Conv {
                conv0,
                conv1,
                out: o,
            } => {
                conv0.into_leaves(out);
                conv1.into_leaves(out);
                o.into_leaves(out);
            }
        }
    }
}

/// s3prl's `Featurizer` layer weights (several input layers only) and ESPnet's linear
/// pre-encoder.
struct Front<T> {
    layer_weights: Option<T>,
    preencoder: Option<Linear<T>>,
}

impl<T> Node<T> for Front<T> {
    type Of<U> = Front<U>;
    fn map<U>(&self, f: &mut dyn FnMut(&T) -> U) -> Front<U> {
        Front {
            layer_weights: self.layer_weights.as_ref().map(&mut *f),
            preencoder: Node::map(&self.preencoder, f),
        }
    }
    fn into_leaves(self, out: &mut Vec<T>) {
        out.extend(self.layer_weights);
        self.preencoder.into_leaves(out);
    }
}

/// Every parameter of an `AsrModel`, by block.
struct Weights<T> {
    front: Front<T>,
    embed: Embed<T>,
    layers: Vec<Layer<T>>,
    after_norm: Norm<T>,
    ctc: Linear<T>,
}
node!(Weights {
    leaves: [],
    optional: [],
    nodes: [front, embed, layers, after_norm, ctc]
});

impl Weights<usize> {
    /// Resolves every parameter the engine reads from the model's variable names (the only
    /// place they are spelled), as indices into `names`.
    fn resolve(
        names: &HashMap<&str, usize>,
        cfg: &ConformerConfig,
        layers_in: usize,
        preencoder: bool,
    ) -> Result<Self> {
        let get = |name: String| -> Result<usize> {
            names
                .get(name.as_str())
                .copied()
                .ok_or_else(|| candle_core::Error::Msg(format!("engine: no parameter {name}")))
        };
        let linear = |p: &str, bias: bool| -> Result<Linear<usize>> {
            Ok(Linear {
                weight: get(format!("{p}.weight"))?,
                bias: if bias {
                    Some(get(format!("{p}.bias"))?)
                } else {
                    None
                },
            })
        };
        let norm = |p: &str| -> Result<Norm<usize>> {
            Ok(Norm {
                weight: get(format!("{p}.weight"))?,
                bias: get(format!("{p}.bias"))?,
            })
        };
        let ffn = |p: &str, n: &str| -> Result<FeedForward<usize>> {
            Ok(FeedForward {
                norm: norm(n)?,
                w_1: linear(&format!("{p}.w_1"), true)?,
                w_2: linear(&format!("{p}.w_2"), true)?,
            })
        };
        let layer = |i: usize| -> Result<Layer<usize>> {
            let e = format!("encoder.encoders.{i}");
            let a = format!("{e}.self_attn");
            let c = format!("{e}.conv_module");
            let conv = if cfg.use_cnn_module {
                Some(ConvModule {
                    norm: norm(&format!("{e}.norm_conv"))?,
                    pointwise1: linear(&format!("{c}.pointwise_conv1"), true)?,
                    depthwise: linear(&format!("{c}.depthwise_conv"), true)?,
                    conv_norm: norm(&format!("{c}.norm"))?,
                    running: match cfg.cnn_module_norm {
                        CnnModuleNorm::BatchNorm => Some(Running {
                            mean: get(format!("{c}.norm.running_mean"))?,
                            var: get(format!("{c}.norm.running_var"))?,
                        }),
                        CnnModuleNorm::LayerNorm => None,
                    },
                    pointwise2: linear(&format!("{c}.pointwise_conv2"), true)?,
                })
            } else {
                None
            };
            Ok(Layer {
                macaron: if cfg.macaron_style {
                    let (p, n) = (
                        format!("{e}.feed_forward_macaron"),
                        format!("{e}.norm_ff_macaron"),
                    );
                    Some(ffn(&p, &n)?)
                } else {
                    None
                },
                attn: Attention {
                    norm: norm(&format!("{e}.norm_mha"))?,
                    q: linear(&format!("{a}.linear_q"), true)?,
                    k: linear(&format!("{a}.linear_k"), true)?,
                    v: linear(&format!("{a}.linear_v"), true)?,
                    out: linear(&format!("{a}.linear_out"), true)?,
                    pos: linear(&format!("{a}.linear_pos"), false)?,
                    bias_u: get(format!("{a}.pos_bias_u"))?,
                    bias_v: get(format!("{a}.pos_bias_v"))?,
                },
                conv,
                ffn: ffn(&format!("{e}.feed_forward"), &format!("{e}.norm_ff"))?,
                final_norm: if cfg.use_cnn_module {
                    Some(norm(&format!("{e}.norm_final"))?)
                } else {
                    None
                },
            })
        };
        Ok(Weights {
            front: Front {
                layer_weights: if layers_in > 1 {
                    Some(get("frontend.featurizer.weights".into())?)
                } else {
                    None
                },
                preencoder: if preencoder {
                    Some(linear("preencoder.linear_out", true)?)
                } else {
                    None
                },
            },
            embed: match cfg.input_layer {
                InputLayer::Linear => Embed::Linear {
                    linear: linear("encoder.embed.0", true)?,
                    norm: norm("encoder.embed.1")?,
                },
                _ => Embed::Conv {
                    conv0: linear("encoder.embed.conv.0", true)?,
                    conv1: linear("encoder.embed.conv.2", true)?,
                    out: linear("encoder.embed.out.0", true)?,
                },
            },
            layers: (0..cfg.num_blocks).map(layer).collect::<Result<_>>()?,
            after_norm: norm("encoder.after_norm")?,
            ctc: linear("ctc.ctc_lo", true)?,
        })
    }
}

impl Linear<Vec<f32>> {
    /// `y = x · weightᵀ + bias` over rows of `d_in`.
    fn forward(&self, x: &[f32], d_in: usize, y: &mut [f32]) {
        linear_forward(x, &self.weight, self.bias.as_deref(), d_in, y);
    }

    /// Adds this layer's gradients into `grad`; writes `dx` when given.
    fn backward(
        &self,
        grad: &mut Self,
        x: &[f32],
        dy: &[f32],
        d_in: usize,
        dx: Option<&mut [f32]>,
    ) {
        let (dw, db) = (&mut grad.weight, grad.bias.as_deref_mut());
        linear_backward(x, &self.weight, dy, d_in, dw, db, dx.map(|d| (d, false)));
    }
}

impl Norm<Vec<f32>> {
    fn layer_norm(&self, x: &[f32], eps: f32, y: &mut [f32]) -> LayerNormSaved {
        layer_norm_forward(x, &self.weight, &self.bias, eps, y)
    }

    /// Adds this norm's gradients into `grad`; writes (or adds to) `dx`.
    fn layer_norm_backward(
        &self,
        grad: &mut Self,
        dy: &[f32],
        saved: &LayerNormSaved,
        dx: &mut [f32],
        accumulate: bool,
    ) {
        let (dg, db) = (&mut grad.weight, &mut grad.bias);
        layer_norm_backward(dy, saved, &self.weight, dx, accumulate, dg, db);
    }
}

/// The model's parameter values, as the engine reads them (taken once per training step, once
/// per validation pass).
pub struct Params(Weights<Vec<f32>>);

/// Gradient sums, in the shape of the parameters.
type Grads = Weights<Vec<f32>>;

// ---------------------------------------------------------------------------------------------
// The engine

/// One training step's result: per-utterance losses and one gradient per trainable variable.
pub struct StepOutput {
    pub losses: Vec<f64>,
    pub grads: Vec<Tensor>,
    pub out_lengths: Vec<usize>,
    /// Wall seconds of the forward (parameters read through the CTC loss).
    pub forward_s: f64,
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
    vocab: usize,
    rng: DropoutRng,
    /// Every variable (running statistics included).
    vars: Vec<Var>,
    /// Where each parameter lives in `vars`.
    ids: Weights<usize>,
    /// The optimiser's variables, in its order, with their index in `vars`.
    trainable: Vec<(usize, Var)>,
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

/// What the conv module's norm keeps for its backward.
enum ConvNormSaved {
    Layer(LayerNormSaved),
    Batch(BatchNormSaved),
}

struct ConvSaved {
    norm: LayerNormSaved,
    xn: Vec<f32>,
    h: Vec<f32>,
    gm: Vec<f32>,
    conv_norm: ConvNormSaved,
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
        let cfg = model.encoder().config().clone();
        let names: HashMap<&str, usize> = vars
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.as_str(), i))
            .collect();
        let ids = Weights::resolve(&names, &cfg, layers, model.has_preencoder())?;
        let trainable = trainable
            .iter()
            .map(|(name, var)| {
                names
                    .get(name.as_str())
                    .map(|&i| (i, var.clone()))
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!("engine: {name} is not a model variable"))
                    })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            normalize,
            global_stats,
            layers,
            feat_dim,
            vocab: model.vocab(),
            rng: model.dropout_rng().clone(),
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            ids,
            trainable,
        })
    }

    /// The current values of every parameter (reread after each optimiser update).
    pub fn params(&self) -> Result<Params> {
        let mut values = self
            .vars
            .iter()
            .map(|var| var.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Params(
            self.ids.map(&mut |&i| std::mem::take(&mut values[i])),
        ))
    }

    /// Zeroed gradients in the shape of the parameters.
    fn zero_grads(&self) -> Grads {
        self.ids
            .map(&mut |&i| vec![0f32; self.vars[i].elem_count()])
    }

    /// The optimiser's gradients, in its order, from a step's gradient tree.
    fn trainable_grads(&self, grads: Grads) -> Result<Vec<Tensor>> {
        let (mut ids, mut values) = (Vec::new(), Vec::new());
        self.ids.map(&mut |&i| i).into_leaves(&mut ids);
        grads.into_leaves(&mut values);
        let mut by_var: Vec<Option<Vec<f32>>> = vec![None; self.vars.len()];
        for (i, g) in ids.into_iter().zip(values) {
            by_var[i] = Some(g);
        }
        self.trainable
            .iter()
            .map(|(i, var)| {
                let g = by_var[*i]
                    .take()
                    .unwrap_or_else(|| vec![0f32; var.elem_count()]);
                to_tensor(g, var.dims())
            })
            .collect()
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
        let mut prof = Profiler::disabled();
        self.train_step_profiled(feats, lengths, targets, loss_scale, &mut prof)
    }

    /// [`CpuEngine::train_step`], timing each block's forward and backward into `prof`.
    pub fn train_step_profiled(
        &self,
        feats: &Tensor,
        lengths: &[usize],
        targets: &[Vec<u32>],
        loss_scale: f64,
        prof: &mut Profiler,
    ) -> Result<StepOutput> {
        let started = Instant::now();
        let Params(p) = self.params()?;
        let mut g = self.zero_grads();
        // ---- forward
        prof.set_pass(Pass::Forward);
        let (front, x) = self.front_forward(&p, feats, lengths, prof)?;
        let (batch, sub, x) = prof.time(Kind::Conv, || {
            self.subsample_forward(&p, x, front.t, lengths, true)
        })?;
        let d = self.cfg.output_size;
        let pe = prof.time(Kind::Attention, || -> Result<Vec<f32>> {
            let mut pe = rel_positional_table(batch.t, d);
            let rate = self.cfg.positional_dropout_rate;
            let pe_mask = dropout_mask(&self.rng, pe.len(), rate, true)?;
            scale_mask(&mut pe, pe_mask.as_deref(), 1.0);
            Ok(pe)
        })?;
        let mut x = x;
        let mut saved = Vec::with_capacity(self.cfg.num_blocks);
        for (i, layer) in p.layers.iter().enumerate() {
            let (y, s) = self.layer_forward(layer, i, &x, &pe, &batch, true, prof)?;
            saved.push(s);
            x = y;
        }
        let mut h = vec![0f32; x.len()];
        let after = prof.time(Kind::Norm, || {
            p.after_norm.layer_norm(&x, ESPNET_EPS, &mut h)
        });
        let (losses, dlogits) = prof.time(Kind::Ctc, || {
            self.ctc_forward(&p.ctc, &h, &batch, targets, loss_scale)
        })?;
        let forward_s = started.elapsed().as_secs_f64();
        // ---- backward
        prof.set_pass(Pass::Backward);
        let mut dh = vec![0f32; h.len()];
        prof.time(Kind::Ctc, || {
            p.ctc.backward(&mut g.ctc, &h, &dlogits, d, Some(&mut dh))
        });
        let mut dx = vec![0f32; x.len()];
        prof.time(Kind::Norm, || {
            p.after_norm
                .layer_norm_backward(&mut g.after_norm, &dh, &after, &mut dx, false)
        });
        drop(dh);
        for (layer, grad) in p.layers.iter().zip(g.layers.iter_mut()).rev() {
            let s = saved
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("engine: a layer saved no state".into()))?;
            dx = self.layer_backward((layer, grad), dx, s, &pe, &batch, prof)?;
        }
        let dsub = prof.time(Kind::Conv, || {
            self.subsample_backward((&p.embed, &mut g.embed), dx, sub, &batch)
        })?;
        if let Some(dsub) = dsub {
            self.front_backward((&p.front, &mut g.front), dsub, front, lengths, prof);
        }
        Ok(StepOutput {
            losses,
            grads: self.trainable_grads(g)?,
            out_lengths: batch.out_lengths,
            forward_s,
        })
    }

    /// Logits, per-utterance CTC losses and the gradient of `loss_scale * Σ losses` with
    /// respect to the logits.
    fn ctc_forward(
        &self,
        ctc: &Linear<Vec<f32>>,
        h: &[f32],
        batch: &Batch,
        targets: &[Vec<u32>],
        loss_scale: f64,
    ) -> Result<(Vec<f64>, Vec<f32>)> {
        let v = self.vocab;
        let mut logits = vec![0f32; batch.b * batch.t * v];
        ctc.forward(h, self.cfg.output_size, &mut logits);
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
        Ok((losses, dlogits))
    }

    /// Eval-mode logits `[B, T', vocab]` and output lengths (no dropout, running statistics),
    /// with `params` from [`CpuEngine::params`].
    pub fn forward_eval(
        &self,
        params: &Params,
        feats: &Tensor,
        lengths: &[usize],
    ) -> Result<(Tensor, Vec<usize>)> {
        let p = &params.0;
        let mut prof = Profiler::disabled();
        let (front, x) = self.front_forward(p, feats, lengths, &mut prof)?;
        let (batch, _, x) = self.subsample_forward(p, x, front.t, lengths, false)?;
        let d = self.cfg.output_size;
        let pe = rel_positional_table(batch.t, d);
        let mut x = x;
        for (i, layer) in p.layers.iter().enumerate() {
            x = self
                .layer_forward(layer, i, &x, &pe, &batch, false, &mut prof)?
                .0;
        }
        let mut h = vec![0f32; x.len()];
        p.after_norm.layer_norm(&x, ESPNET_EPS, &mut h);
        let mut logits = vec![0f32; batch.b * batch.t * self.vocab];
        p.ctc.forward(&h, d, &mut logits);
        Ok((
            to_tensor(logits, &[batch.b, batch.t, self.vocab])?,
            batch.out_lengths,
        ))
    }

    /// A block's output: `x + scale * dropout(linear(h))` (`linear`: d_in → d); returns it
    /// and the dropout mask.
    fn residual_branch(
        &self,
        linear: &Linear<Vec<f32>>,
        (x, h): (&[f32], &[f32]),
        d_in: usize,
        scale: f32,
        train: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut o = vec![0f32; x.len()];
        linear.forward(h, d_in, &mut o);
        let mask = dropout_mask(&self.rng, x.len(), self.cfg.dropout_rate, train)?;
        let mut y = vec![0f32; x.len()];
        residual_add(x, &o, mask.as_deref(), scale, &mut y);
        Ok((y, mask))
    }

    // -----------------------------------------------------------------------------------------
    // Featurizer: global normalisation, weighted sum of layers, utterance MVN, pre-encoder.

    fn front_forward(
        &self,
        p: &Weights<Vec<f32>>,
        feats: &Tensor,
        lengths: &[usize],
        prof: &mut Profiler,
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
            (FeatureNormalize::Global, Some((mean, std))) => prof.time(Kind::Norm, || {
                global_normalize(&mut f, (mean, std), (l, t, dim))
            }),
            (FeatureNormalize::Global, None) => {
                candle_core::bail!("normalize is \"global\" but no stats were set")
            }
            _ => {}
        }
        let (alpha, mut x) = match &p.front.layer_weights {
            Some(w) if l > 1 => prof.time(Kind::Elementwise, || {
                let alpha = layer_sum::layer_coefficients(w);
                let mut x = vec![0f32; b * t * dim];
                layer_sum::forward(&f, &alpha, t * dim, &mut x);
                (alpha, x)
            }),
            _ => (vec![1.0], f.clone()),
        };
        let mvn = (self.normalize == FeatureNormalize::Utterance).then(|| {
            prof.time(Kind::Norm, || {
                utterance_mvn_forward(&mut x, lengths, t, dim)
            })
        });
        let (pre_in, out) = match &p.front.preencoder {
            Some(pre) => prof.time(Kind::Linear, || {
                let mut y = vec![0f32; b * t * (pre.weight.len() / dim)];
                pre.forward(&x, dim, &mut y);
                (x, y)
            }),
            None => (Vec::new(), x),
        };
        let saved = FrontSaved {
            feats: f,
            t,
            alpha,
            mvn,
            pre_in,
        };
        Ok((saved, out))
    }

    fn front_needs_grad(&self) -> bool {
        self.ids.front.preencoder.is_some() || self.layers > 1
    }

    fn front_backward(
        &self,
        (p, g): (&Front<Vec<f32>>, &mut Front<Vec<f32>>),
        dz: Vec<f32>,
        front: FrontSaved,
        lengths: &[usize],
        prof: &mut Profiler,
    ) {
        let (dim, t) = (self.feat_dim, front.t);
        let need_dx = self.layers > 1;
        let mut dx = match (&p.preencoder, &mut g.preencoder) {
            (Some(pre), Some(grad)) => {
                let mut dx = vec![0f32; if need_dx { front.pre_in.len() } else { 0 }];
                let dxo = need_dx.then_some(dx.as_mut_slice());
                prof.time(Kind::Linear, || {
                    pre.backward(grad, &front.pre_in, &dz, dim, dxo)
                });
                dx
            }
            _ => dz,
        };
        let (Some(_), Some(dw)) = (&p.layer_weights, &mut g.layer_weights) else {
            return;
        };
        if !need_dx {
            return;
        }
        if let Some((y, rstd)) = &front.mvn {
            prof.time(Kind::Norm, || {
                utterance_mvn_backward(&mut dx, (y, rstd), lengths, t, dim)
            });
        }
        prof.time(Kind::Elementwise, || {
            layer_sum::backward(&dx, &front.feats, &front.alpha, t * dim, dw)
        });
    }

    // -----------------------------------------------------------------------------------------
    // Subsampling (+ the positional-encoding scale and dropout)

    fn subsample_forward(
        &self,
        p: &Weights<Vec<f32>>,
        x: Vec<f32>,
        t_in: usize,
        lengths: &[usize],
        train: bool,
    ) -> Result<(Batch, SubsampleSaved, Vec<f32>)> {
        let b = lengths.len();
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
        match &p.embed {
            Embed::Linear { linear, norm } => {
                let mut lin = vec![0f32; b * t * d];
                linear.forward(&x, f_in, &mut lin);
                let ln = norm.layer_norm(&lin, TORCH_EPS, &mut y);
                let m = dropout_mask(&self.rng, y.len(), self.cfg.dropout_rate, train)?;
                scale_mask(&mut y, m.as_deref(), 1.0);
                saved.ln = Some(ln);
                saved.mask = m;
            }
            Embed::Conv { conv0, conv1, out } => {
                let (g0, g1) = subsampling_geometry(layer, (t_in, f_in), d);
                let (t1, f1) = (g0.all_out_rows(), g0.out_cols());
                let (t2, f2) = (g1.all_out_rows(), g1.out_cols());
                debug_assert_eq!(t2, t);
                // Rows past an utterance's last valid output frame are never read by a valid
                // frame (and get zero gradient): they are left at zero and skipped.
                let (valid1, valid2) = valid_conv_rows(&batch.out_lengths, t1, t2, g1.stride);
                let r0 = conv_relu_forward(conv0, &x, g0, &valid1)?;
                let r1 = if g1.stride == 1 {
                    // stride 1: Winograd F(2×2, 3×3), 2.25× fewer multiply-adds than im2col
                    let u = winograd::transform_filter(&conv1.weight, d, d);
                    let bias = bias_of(conv1)?;
                    let mut r1 = vec![0f32; b * t2 * f2 * d];
                    r1.par_chunks_mut(t2 * f2 * d)
                        .enumerate()
                        .for_each(|(bi, out)| {
                            let src = &r0[bi * t1 * f1 * d..][..t1 * f1 * d];
                            let out = &mut out[..valid2[bi] * f2 * d];
                            conv::fill_bias(out, bias);
                            winograd::forward(src, winograd_geometry(&g1, valid2[bi]), &u, out);
                            relu_in_place(out);
                        });
                    r1
                } else {
                    conv_relu_forward(conv1, &r0, g1, &valid2)?
                };
                // out: [B T2, F2 d] · W'ᵀ with W' the [d, F2 d] permutation of ESPnet's [d, d F2]
                let wo = conv::flatten_weight_freq_major(&out.weight, d, d, f2);
                linear_forward(&r1, &wo, out.bias.as_deref(), f2 * d, &mut y);
                saved.r0 = r0;
                saved.r1 = r1;
                saved.dims = (t1, f1, t2, f2);
            }
        }
        saved.x = x;
        // RelPositionalEncoding: x * sqrt(d), dropout.
        let scale = (d as f32).sqrt();
        let m = dropout_mask(&self.rng, y.len(), self.cfg.positional_dropout_rate, train)?;
        let out = y
            .par_iter()
            .enumerate()
            .map(|(i, &v)| v * scale * m.as_ref().map_or(1.0, |m| m[i]))
            .collect();
        saved.pos_mask = m;
        Ok((batch, saved, out))
    }

    fn subsample_backward(
        &self,
        (p, g): (&Embed<Vec<f32>>, &mut Embed<Vec<f32>>),
        mut dy: Vec<f32>,
        saved: SubsampleSaved,
        batch: &Batch,
    ) -> Result<Option<Vec<f32>>> {
        let d = self.cfg.output_size;
        let scale = (d as f32).sqrt();
        scale_mask(&mut dy, saved.pos_mask.as_deref(), scale);
        let need_dx = self.front_needs_grad();
        let (t_in, f_in) = (saved.t_in, saved.f_in);
        match (p, g) {
            (
                Embed::Linear { linear, norm },
                Embed::Linear {
                    linear: gl,
                    norm: gn,
                },
            ) => {
                scale_mask(&mut dy, saved.mask.as_deref(), 1.0);
                let ln = saved.ln.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("engine: the linear embed saved no norm".into())
                })?;
                let mut dlin = vec![0f32; dy.len()];
                norm.layer_norm_backward(gn, &dy, ln, &mut dlin, false);
                let mut dx = vec![0f32; if need_dx { saved.x.len() } else { 0 }];
                linear.backward(
                    gl,
                    &saved.x,
                    &dlin,
                    f_in,
                    need_dx.then_some(dx.as_mut_slice()),
                );
                Ok(need_dx.then_some(dx))
            }
            (
                Embed::Conv { conv0, conv1, out },
                Embed::Conv {
                    conv0: g0w,
                    conv1: g1w,
                    out: gout,
                },
            ) => {
                let (t1, f1, t2, f2) = saved.dims;
                let (g0, g1) = subsampling_geometry(self.cfg.input_layer, (t_in, f_in), d);
                // out linear
                let wo = conv::flatten_weight_freq_major(&out.weight, d, d, f2);
                let mut dwo = vec![0f32; wo.len()];
                let mut dr1 = vec![0f32; saved.r1.len()];
                let (db, dr) = (gout.bias.as_deref_mut(), Some((dr1.as_mut_slice(), false)));
                linear_backward(&saved.r1, &wo, &dy, f2 * d, &mut dwo, db, dr);
                conv::add_flatten_grad_channel_major(&dwo, d, d, f2, &mut gout.weight);
                drop(dy);
                relu_bias_backward(&saved.r1, &mut dr1, g1w);
                // conv1: dW' = Σ dy1ᵀ col, dr0 = col2im(dy1 · W')
                let mut dr0 = vec![0f32; saved.r0.len()];
                let items: Vec<(usize, &mut [f32])> =
                    dr0.chunks_mut(t1 * f1 * d).enumerate().collect();
                let r0 = &saved.r0;
                let (valid1, valid2) = valid_conv_rows(&batch.out_lengths, t1, t2, g1.stride);
                if g1.stride == 1 {
                    let u = winograd::transform_filter(&conv1.weight, d, d);
                    let acc = grouped_sum(items, 16 * d * d, |(bi, dsrc), acc| {
                        let src = utterance(r0, bi, t1 * f1 * d);
                        let dout = utterance(&dr1, bi, t2 * f2 * d);
                        let geo = winograd_geometry(&g1, valid2[bi]);
                        winograd::backward(src, geo, &u, dout, acc, Some(dsrc));
                    });
                    winograd::add_filter_grad(&acc, d, d, &mut g1w.weight);
                } else {
                    let w1 = conv::weight_taps_last(&conv1.weight, d, d);
                    let dw1 = grouped_sum(items, w1.len(), |(bi, dsrc), acc| {
                        let geo = conv::Geometry {
                            out_rows: valid2[bi],
                            ..g1
                        };
                        let (src, dout) = (
                            utterance(r0, bi, t1 * f1 * d),
                            utterance(&dr1, bi, t2 * f2 * d),
                        );
                        conv::backward(src, &geo, &w1, dout, acc, Some(dsrc));
                    });
                    conv::add_weight_grad_torch_layout(&dw1, d, d, &mut g1w.weight);
                }
                drop(dr1);
                relu_bias_backward(&saved.r0, &mut dr0, g0w);
                let w0 = conv::weight_taps_last(&conv0.weight, d, 1);
                let x = &saved.x;
                let mut dx = vec![0f32; if need_dx { batch.b * t_in * f_in } else { 0 }];
                let items: Vec<(usize, &mut [f32])> = if need_dx {
                    dx.chunks_mut(t_in * f_in).enumerate().collect()
                } else {
                    (0..batch.b).map(|bi| (bi, &mut [][..])).collect()
                };
                let dr0 = &dr0;
                let dw0 = grouped_sum(items, 9 * d, |(bi, dxb), acc| {
                    let geo = conv::Geometry {
                        out_rows: valid1[bi],
                        ..g0
                    };
                    let (xb, g) = (
                        utterance(x, bi, t_in * f_in),
                        utterance(dr0, bi, t1 * f1 * d),
                    );
                    let dxb = (!dxb.is_empty()).then_some(dxb);
                    conv::backward(xb, &geo, &w0, g, acc, dxb);
                });
                conv::add_weight_grad_torch_layout(&dw0, d, 1, &mut g0w.weight);
                Ok(need_dx.then_some(dx))
            }
            _ => candle_core::bail!("engine: gradients do not have the parameters' shape"),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Conformer blocks

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        p: &Layer<Vec<f32>>,
        i: usize,
        x: &[f32],
        pe: &[f32],
        batch: &Batch,
        train: bool,
        prof: &mut Profiler,
    ) -> Result<(Vec<f32>, LayerSaved)> {
        let mut x = x.to_vec();
        let macaron = match &p.macaron {
            Some(ffn) => {
                let (y, s) = prof.time(Kind::Linear, || self.ffn_forward(ffn, &x, 0.5, train))?;
                x = y;
                Some(s)
            }
            None => None,
        };
        let (y, attn) = prof.time(Kind::Attention, || {
            self.attn_forward(&p.attn, &x, pe, batch, train)
        })?;
        x = y;
        let conv = match &p.conv {
            Some(cm) => {
                let (y, s) = prof.time(Kind::ConvModule, || {
                    self.conv_forward(cm, i, &x, batch, train)
                })?;
                x = y;
                Some(s)
            }
            None => None,
        };
        let scale = if p.macaron.is_some() { 0.5 } else { 1.0 };
        let (y, ffn) = prof.time(Kind::Linear, || self.ffn_forward(&p.ffn, &x, scale, train))?;
        let (out, final_norm) = match &p.final_norm {
            Some(norm) => prof.time(Kind::Norm, || {
                let mut out = vec![0f32; y.len()];
                let s = norm.layer_norm(&y, ESPNET_EPS, &mut out);
                (out, s)
            }),
            None => (y, LayerNormSaved::default()),
        };
        let saved = LayerSaved {
            macaron,
            attn,
            conv,
            ffn,
            final_norm,
        };
        Ok((out, saved))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        (p, g): (&Layer<Vec<f32>>, &mut Layer<Vec<f32>>),
        dy: Vec<f32>,
        s: LayerSaved,
        pe: &[f32],
        batch: &Batch,
        prof: &mut Profiler,
    ) -> Result<Vec<f32>> {
        let mut dx = match (&p.final_norm, &mut g.final_norm) {
            (Some(norm), Some(grad)) => prof.time(Kind::Norm, || {
                let mut dx = vec![0f32; dy.len()];
                norm.layer_norm_backward(grad, &dy, &s.final_norm, &mut dx, false);
                dx
            }),
            _ => dy,
        };
        let scale = if p.macaron.is_some() { 0.5 } else { 1.0 };
        prof.time(Kind::Linear, || {
            self.ffn_backward((&p.ffn, &mut g.ffn), &mut dx, s.ffn, scale)
        });
        if let (Some(conv), Some(cm), Some(grad)) = (s.conv, &p.conv, &mut g.conv) {
            prof.time(Kind::ConvModule, || {
                self.conv_backward((cm, grad), &mut dx, conv, batch)
            });
        }
        prof.time(Kind::Attention, || {
            self.attn_backward((&p.attn, &mut g.attn), &mut dx, s.attn, pe, batch)
        });
        if let (Some(mac), Some(ffn), Some(grad)) = (s.macaron, &p.macaron, &mut g.macaron) {
            prof.time(Kind::Linear, || {
                self.ffn_backward((ffn, grad), &mut dx, mac, 0.5)
            });
        }
        Ok(dx)
    }

    /// `x + scale * dropout(w_2(dropout(swish(w_1(LN(x))))))`.
    fn ffn_forward(
        &self,
        p: &FeedForward<Vec<f32>>,
        x: &[f32],
        scale: f32,
        train: bool,
    ) -> Result<(Vec<f32>, FfnSaved)> {
        let d = self.cfg.output_size;
        let f = self.cfg.linear_units;
        let n = x.len() / d;
        let mut xn = vec![0f32; x.len()];
        let norm = p.norm.layer_norm(x, ESPNET_EPS, &mut xn);
        let mut h = vec![0f32; n * f];
        p.w_1.forward(&xn, d, &mut h);
        let inner_mask = dropout_mask(&self.rng, n * f, self.cfg.dropout_rate, train)?;
        let mut a = vec![0f32; n * f];
        silu_forward(&h, inner_mask.as_deref(), &mut a);
        let (y, out_mask) = self.residual_branch(&p.w_2, (x, &a), f, scale, train)?;
        let saved = FfnSaved {
            norm,
            xn,
            h,
            a,
            inner_mask,
            out_mask,
        };
        Ok((y, saved))
    }

    /// Adds the FFN branch's input gradient to `dx` (which holds the block output's gradient).
    fn ffn_backward(
        &self,
        (p, g): (&FeedForward<Vec<f32>>, &mut FeedForward<Vec<f32>>),
        dx: &mut [f32],
        s: FfnSaved,
        scale: f32,
    ) {
        let d = self.cfg.output_size;
        let f = self.cfg.linear_units;
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), scale);
        let mut da = vec![0f32; s.a.len()];
        p.w_2.backward(&mut g.w_2, &s.a, &dout, f, Some(&mut da));
        silu_backward(&s.h, s.inner_mask.as_deref(), &mut da);
        let mut dxn = dout;
        p.w_1.backward(&mut g.w_1, &s.xn, &da, d, Some(&mut dxn));
        p.norm
            .layer_norm_backward(&mut g.norm, &dxn, &s.norm, dx, true);
    }

    fn attention_geometry(&self, batch: &Batch) -> attention::Geometry {
        attention::Geometry {
            batch: batch.b,
            frames: batch.t,
            dim: self.cfg.output_size,
            heads: self.cfg.attention_heads,
        }
    }

    fn attn_forward(
        &self,
        p: &Attention<Vec<f32>>,
        x: &[f32],
        pe: &[f32],
        batch: &Batch,
        train: bool,
    ) -> Result<(Vec<f32>, AttnSaved)> {
        let d = self.cfg.output_size;
        let geo = self.attention_geometry(batch);
        let n = batch.b * batch.t;
        let mut xn = vec![0f32; x.len()];
        let norm = p.norm.layer_norm(x, ESPNET_EPS, &mut xn);
        let proj = |lin: &Linear<Vec<f32>>, x: &[f32], rows: usize| {
            let mut y = vec![0f32; rows * d];
            lin.forward(x, d, &mut y);
            y
        };
        let (q, k, v) = (proj(&p.q, &xn, n), proj(&p.k, &xn, n), proj(&p.v, &xn, n));
        let pp = proj(&p.pos, pe, geo.positions());
        let inp = RelPosInputs {
            q: &q,
            k: &k,
            v: &v,
            p: &pp,
            bias_u: &p.bias_u,
            bias_v: &p.bias_v,
        };
        let mut probs = vec![0f32; batch.b * geo.heads * batch.t * batch.t];
        attention::rel_pos_probs(&inp, geo, &batch.frame_mask, &mut probs);
        let rate = self.cfg.attention_dropout_rate;
        let att_mask = dropout_mask(&self.rng, probs.len(), rate, train)?;
        let mut ctx = vec![0f32; n * d];
        attention::rel_pos_context(&probs, att_mask.as_deref(), &v, geo, &mut ctx);
        let (y, out_mask) = self.residual_branch(&p.out, (x, &ctx), d, 1.0, train)?;
        let saved = AttnSaved {
            norm,
            xn,
            q,
            k,
            v,
            p: pp,
            probs,
            att_mask,
            ctx,
            out_mask,
        };
        Ok((y, saved))
    }

    fn attn_backward(
        &self,
        (p, g): (&Attention<Vec<f32>>, &mut Attention<Vec<f32>>),
        dx: &mut [f32],
        s: AttnSaved,
        pe: &[f32],
        batch: &Batch,
    ) {
        let d = self.cfg.output_size;
        let geo = self.attention_geometry(batch);
        let n = batch.b * batch.t;
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), 1.0);
        let mut dctx = vec![0f32; n * d];
        p.out
            .backward(&mut g.out, &s.ctx, &dout, d, Some(&mut dctx));
        drop(dout);
        let inp = RelPosInputs {
            q: &s.q,
            k: &s.k,
            v: &s.v,
            p: &s.p,
            bias_u: &p.bias_u,
            bias_v: &p.bias_v,
        };
        let rg = attention::rel_pos_backward(&inp, &s.probs, s.att_mask.as_deref(), &dctx, geo);
        add_in_place(&mut g.bias_u, &rg.du);
        add_in_place(&mut g.bias_v, &rg.dbv);
        // dW_pos += dpᵀ · pe
        let (dp, pe) = (Mat::rows(&rg.dp, d).t(), Mat::rows(pe, d));
        gemm::matmul(d, d, geo.positions(), &mut g.pos.weight, d, dp, pe, true);
        let mut dxn = vec![0f32; n * d];
        p.q.backward(&mut g.q, &s.xn, &rg.dq, d, Some(&mut dxn));
        let mut tmp = vec![0f32; n * d];
        p.k.backward(&mut g.k, &s.xn, &rg.dk, d, Some(&mut tmp));
        add_in_place(&mut dxn, &tmp);
        p.v.backward(&mut g.v, &s.xn, &rg.dv, d, Some(&mut tmp));
        add_in_place(&mut dxn, &tmp);
        p.norm
            .layer_norm_backward(&mut g.norm, &dxn, &s.norm, dx, true);
    }

    fn conv_forward(
        &self,
        p: &ConvModule<Vec<f32>>,
        i: usize,
        x: &[f32],
        batch: &Batch,
        train: bool,
    ) -> Result<(Vec<f32>, ConvSaved)> {
        let d = self.cfg.output_size;
        let n = x.len() / d;
        let mut xn = vec![0f32; x.len()];
        let norm = p.norm.layer_norm(x, ESPNET_EPS, &mut xn);
        let mut h = vec![0f32; n * 2 * d];
        p.pointwise1.forward(&xn, d, &mut h);
        // GLU and the padding mask
        let fm = &batch.frame_mask;
        let mut gm = vec![0f32; n * d];
        glu_forward(&h, d, Some(fm), &mut gm);
        let k = self.cfg.cnn_module_kernel;
        let w_kc = kernel_major(&p.depthwise.weight, d, k, false);
        let mut c = correlate_rows(&gm, &w_kc, (batch.b, batch.t, d, k), (k - 1) / 2);
        let bias = bias_of(&p.depthwise)?;
        c.par_chunks_mut(d).for_each(|row| {
            for (v, &bb) in row.iter_mut().zip(bias) {
                *v += bb;
            }
        });
        let mut bn_out = vec![0f32; n * d];
        let affine = (p.conv_norm.weight.as_slice(), p.conv_norm.bias.as_slice());
        let conv_norm = match (&p.running, self.cfg.cnn_module_norm) {
            (_, CnnModuleNorm::LayerNorm) => {
                ConvNormSaved::Layer(p.conv_norm.layer_norm(&c, TORCH_EPS, &mut bn_out))
            }
            (Some(running), CnnModuleNorm::BatchNorm) => {
                // batch statistics of the valid frames in training, running ones in eval
                let (mean, var) = if train {
                    let (mean, var) = masked_moments(&c, fm, d, batch.valid);
                    self.update_running_stats(i, (&mean, &var), batch.valid)?;
                    (mean, var)
                } else {
                    (running.mean.clone(), running.var.clone())
                };
                let eps = BATCH_NORM_EPS as f32;
                let bn = batch_norm_forward(&c, (&mean, &var), affine, eps, &mut bn_out);
                ConvNormSaved::Batch(bn)
            }
            (None, CnnModuleNorm::BatchNorm) => {
                candle_core::bail!("engine: batch norm without running statistics")
            }
        };
        let mut sw = vec![0f32; n * d];
        silu_forward(&bn_out, None, &mut sw);
        let (y, out_mask) = self.residual_branch(&p.pointwise2, (x, &sw), d, 1.0, train)?;
        let saved = ConvSaved {
            norm,
            xn,
            h,
            gm,
            conv_norm,
            bn_out,
            s: sw,
            out_mask,
        };
        Ok((y, saved))
    }

    /// torch's running update of layer `i`'s conv-module batch norm, in its variables.
    fn update_running_stats(&self, i: usize, batch: (&[f32], &[f32]), valid: usize) -> Result<()> {
        let running = self.ids.layers[i]
            .conv
            .as_ref()
            .and_then(|c| c.running.as_ref())
            .ok_or_else(|| candle_core::Error::Msg("engine: no running statistics".into()))?;
        let (mean_var, var_var) = (&self.vars[running.mean], &self.vars[running.var]);
        let mut mean = mean_var.as_tensor().to_vec1::<f32>()?;
        let mut var = var_var.as_tensor().to_vec1::<f32>()?;
        batch_norm_update_running((&mut mean, &mut var), batch, valid, BATCH_NORM_MOMENTUM);
        for (v, new) in [(mean_var, mean), (var_var, var)] {
            let new = Tensor::from_vec(new, v.elem_count(), &Device::Cpu)?;
            v.as_tensor().slice_set(&new, 0, 0)?;
        }
        Ok(())
    }

    fn conv_backward(
        &self,
        (p, g): (&ConvModule<Vec<f32>>, &mut ConvModule<Vec<f32>>),
        dx: &mut [f32],
        s: ConvSaved,
        batch: &Batch,
    ) {
        let d = self.cfg.output_size;
        let n = dx.len() / d;
        let fm = &batch.frame_mask;
        let mut dout = dx.to_vec();
        scale_mask(&mut dout, s.out_mask.as_deref(), 1.0);
        let mut ds = vec![0f32; n * d];
        p.pointwise2
            .backward(&mut g.pointwise2, &s.s, &dout, d, Some(&mut ds));
        silu_backward(&s.bn_out, None, &mut ds);
        let mut dc = dout;
        match &s.conv_norm {
            ConvNormSaved::Layer(ln) => {
                p.conv_norm
                    .layer_norm_backward(&mut g.conv_norm, &ds, ln, &mut dc, false)
            }
            ConvNormSaved::Batch(bn) => {
                let dgb = (
                    g.conv_norm.weight.as_mut_slice(),
                    g.conv_norm.bias.as_mut_slice(),
                );
                let gamma = &p.conv_norm.weight;
                batch_norm_backward(&ds, bn, gamma, (fm, batch.valid), &mut dc, dgb);
            }
        }
        drop(ds);
        // depthwise conv: bias, weight, input
        let k = self.cfg.cnn_module_kernel;
        let pad = (k - 1) / 2;
        let geo = (batch.b, batch.t, d, k);
        if let Some(db) = g.depthwise.bias.as_deref_mut() {
            add_col_sums(&dc, d, db);
        }
        add_in_place(&mut g.depthwise.weight, &weight_grad(&s.gm, &dc, geo, pad));
        let w_flip = kernel_major(&p.depthwise.weight, d, k, true);
        let dgm = correlate_rows(&dc, &w_flip, geo, k - 1 - pad);
        drop(dc);
        // mask and GLU
        let mut dh = vec![0f32; n * 2 * d];
        glu_backward(&s.h, &dgm, d, Some(fm), &mut dh);
        let mut dxn = vec![0f32; n * d];
        p.pointwise1
            .backward(&mut g.pointwise1, &s.xn, &dh, d, Some(&mut dxn));
        p.norm
            .layer_norm_backward(&mut g.norm, &dxn, &s.norm, dx, true);
    }
}

/// Utterance `bi`'s `len` values of a batch buffer.
fn utterance(buf: &[f32], bi: usize, len: usize) -> &[f32] {
    &buf[bi * len..][..len]
}

fn bias_of(linear: &Linear<Vec<f32>>) -> Result<&[f32]> {
    linear
        .bias
        .as_deref()
        .ok_or_else(|| candle_core::Error::Msg("engine: a convolution has no bias".into()))
}

/// The two 3×3 convolutions of `Conv2dSubsampling` over `[T, F]` input: 1 → d channels at
/// stride 2, then d → d at stride 2 (`conv2d`) or 1 (`conv2d2`).
fn subsampling_geometry(
    layer: InputLayer,
    (t_in, f_in): (usize, usize),
    d: usize,
) -> (conv::Geometry, conv::Geometry) {
    let g0 = conv::Geometry {
        rows: t_in,
        cols: f_in,
        c_in: 1,
        c_out: d,
        stride: 2,
        out_rows: 0,
    };
    let g1 = conv::Geometry {
        rows: g0.all_out_rows(),
        cols: g0.out_cols(),
        c_in: d,
        c_out: d,
        stride: if layer == InputLayer::Conv2d { 2 } else { 1 },
        out_rows: 0,
    };
    (g0, g1)
}

fn winograd_geometry(g: &conv::Geometry, out_rows: usize) -> winograd::Geometry {
    winograd::Geometry {
        rows: g.rows,
        cols: g.cols,
        c_in: g.c_in,
        c_out: g.c_out,
        out_rows,
    }
}

/// `relu(conv(x) + bias)` per utterance of `x` `[B, rows, cols, C_in]`, computing the first
/// `valid[b]` output rows of each (the rest stay zero).
fn conv_relu_forward(
    lin: &Linear<Vec<f32>>,
    x: &[f32],
    geo: conv::Geometry,
    valid: &[usize],
) -> Result<Vec<f32>> {
    let (c_in, c_out) = (geo.c_in, geo.c_out);
    let w = conv::weight_taps_last(&lin.weight, c_out, c_in);
    let bias = bias_of(lin)?;
    let in_len = geo.rows * geo.cols * c_in;
    let out_len = geo.all_out_rows() * geo.out_cols() * c_out;
    let mut y = vec![0f32; valid.len() * out_len];
    y.par_chunks_mut(out_len).enumerate().for_each(|(bi, out)| {
        let g = conv::Geometry {
            out_rows: valid[bi],
            ..geo
        };
        conv::forward(
            &x[bi * in_len..][..in_len],
            &g,
            (&w, bias),
            out,
            relu_in_place,
        );
    });
    Ok(y)
}

/// Backward of `relu(conv + bias)` in place of `g`: zero where the output `y` was clipped,
/// then the bias gradient.
fn relu_bias_backward(y: &[f32], g: &mut [f32], grad: &mut Linear<Vec<f32>>) {
    relu_backward(y, g);
    if let Some(db) = grad.bias.as_deref_mut() {
        add_col_sums(g, db.len(), db);
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
