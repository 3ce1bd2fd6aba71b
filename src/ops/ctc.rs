//! Connectionist Temporal Classification loss (Graves et al., 2006) as a candle op with an
//! exact, hand-written gradient.
//!
//! Semantics follow `torch.nn.functional.ctc_loss` (blank index, per-utterance input and target
//! lengths, `zero_infinity`, reductions 'none' / 'mean' / 'sum'). The alpha-beta recursions run in
//! log space with f64 accumulation whatever the input dtype, one utterance per rayon task.
//!
//! Two entry points:
//! - [`ctc_loss`] takes log-probabilities and returns the true derivative with respect to them,
//!   `-γ[t, k]` (minus the posterior occupancy of class `k` at frame `t`). PyTorch's CTC backward
//!   instead returns `softmax - γ`, i.e. the gradient with respect to the logits, on the
//!   assumption that `log_probs` came from `log_softmax`. After `candle_nn::ops::log_softmax` both
//!   give the same gradient on the logits (`γ` sums to one over a frame's classes), so training
//!   matches PyTorch; ours stays correct if `log_probs` is not normalised.
//! - [`ctc_loss_from_logits`] fuses the log_softmax: same losses, and the gradient on the logits
//!   (`softmax - γ`, PyTorch's) straight from the op. Prefer it in training: candle's composite
//!   log_softmax backward costs several extra passes over `[B, T, C]`.
//!
//! Device: the op runs on the CPU. Inputs on another device are copied to the CPU inside the
//! entry points (a differentiable `to_device`) and the losses are copied back, so the op composes
//! with a CUDA model at the cost of one `[B, T, C]` transfer each way per step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

const NEG_INF: f64 = f64::NEG_INFINITY;

/// What the forward pass saw besides the losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtcStats {
    /// Utterances whose loss was infinite: the target cannot be aligned to the input (too long
    /// once the blanks needed between repeated labels are counted). With `zero_infinity` their
    /// loss was set to 0.
    pub impossible: usize,
}

/// How per-utterance losses become the training objective (PyTorch's `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Per-utterance losses, unchanged.
    None,
    /// Each loss divided by its target length (at least 1), then the mean over the batch.
    Mean,
    /// Sum over the batch.
    Sum,
}

/// Invalid arguments to [`ctc_loss`].
#[derive(Debug, thiserror::Error)]
pub enum CtcError {
    #[error("ctc_loss: the input must be [batch, frames, classes], got shape {0:?}")]
    Shape(Vec<usize>),
    #[error("ctc_loss: the input has {batch} utterances but {what} has {len} entries")]
    BatchMismatch {
        batch: usize,
        what: &'static str,
        len: usize,
    },
    #[error("ctc_loss: utterance {index} has input length {length} but the input has only {frames} frames")]
    InputLength {
        index: usize,
        length: usize,
        frames: usize,
    },
    #[error("ctc_loss: blank index {blank} is not below the {classes} classes")]
    Blank { blank: u32, classes: usize },
    #[error("ctc_loss: utterance {index}, target position {position}: label {label} is the blank or not below the {classes} classes")]
    Label {
        index: usize,
        position: usize,
        label: u32,
        classes: usize,
    },
    #[error("ctc_loss: the input must be contiguous in the op (got a strided layout)")]
    Layout,
    #[error("ctc_loss: the op runs on the CPU; call ctc_loss, which moves its input there")]
    Device,
}

impl From<CtcError> for candle_core::Error {
    fn from(e: CtcError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// CTC loss of each utterance, `-ln p(target | log_probs)`, as a differentiable `[B]` tensor.
///
/// `log_probs` is `[B, T, C]` (batch-first, unlike PyTorch's `[T, B, C]`), normally the output of
/// `log_softmax` over the last dimension. Frames at or after `input_lengths[b]` are ignored and get
/// a zero gradient. Targets hold label ids other than `blank`; repeats are allowed.
/// An utterance whose target cannot be aligned has an infinite loss and a zero gradient (PyTorch
/// gives NaN there); with `zero_infinity` its loss is 0. Either way it is counted in [`CtcStats`].
/// f32 and f64 inputs keep their dtype; f16/bf16 are computed and returned as f32.
pub fn ctc_loss(
    log_probs: &Tensor,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
    zero_infinity: bool,
) -> candle_core::Result<(Tensor, CtcStats)> {
    apply(
        Input::LogProbs,
        log_probs,
        targets,
        input_lengths,
        blank,
        zero_infinity,
    )
}

/// [`ctc_loss`] of `log_softmax(logits)` with the softmax fused into the op: the same losses, and
/// the gradient with respect to the logits (`softmax - γ`, what PyTorch's CTC backward computes)
/// in one pass. Cheaper in training than `candle_nn::ops::log_softmax` followed by [`ctc_loss`],
/// whose composite log_softmax backward makes several full `[B, T, C]` passes.
pub fn ctc_loss_from_logits(
    logits: &Tensor,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
    zero_infinity: bool,
) -> candle_core::Result<(Tensor, CtcStats)> {
    apply(
        Input::Logits,
        logits,
        targets,
        input_lengths,
        blank,
        zero_infinity,
    )
}

fn apply(
    kind: Input,
    input: &Tensor,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
    zero_infinity: bool,
) -> candle_core::Result<(Tensor, CtcStats)> {
    let (batch, frames, classes) = match input.dims() {
        &[b, t, c] => (b, t, c),
        other => return Err(CtcError::Shape(other.to_vec()).into()),
    };
    validate(batch, frames, classes, targets, input_lengths, blank)?;

    let device = input.device().clone();
    let mut x = if device.is_cpu() {
        input.clone()
    } else {
        input.to_device(&Device::Cpu)?
    };
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        x = x.to_dtype(DType::F32)?;
    }
    let x = x.contiguous()?;

    let impossible = Arc::new(AtomicUsize::new(0));
    let op = CtcOp {
        input: kind,
        targets: targets
            .iter()
            .map(|target| Lattice::new(target, blank))
            .collect(),
        input_lengths: input_lengths.to_vec(),
        zero_infinity,
        impossible: Arc::clone(&impossible),
    };
    let losses = x.apply_op1(op)?.to_device(&device)?;
    let stats = CtcStats {
        impossible: impossible.load(Ordering::Relaxed),
    };
    Ok((losses, stats))
}

/// Reduces per-utterance losses `[B]` like PyTorch's `ctc_loss(reduction=...)`: 'mean' divides
/// each loss by its target length (clamped to at least 1) and averages over the batch; 'sum' adds
/// them. Differentiable; the result of 'mean' and 'sum' is a scalar tensor.
pub fn reduce(
    losses: &Tensor,
    targets: &[Vec<u32>],
    reduction: Reduction,
) -> candle_core::Result<Tensor> {
    let batch = losses.dims1()?;
    if batch != targets.len() {
        return Err(CtcError::BatchMismatch {
            batch,
            what: "targets",
            len: targets.len(),
        }
        .into());
    }
    match reduction {
        Reduction::None => Ok(losses.clone()),
        Reduction::Sum => losses.sum_all(),
        Reduction::Mean => {
            let lengths: Vec<f64> = targets.iter().map(|t| t.len().max(1) as f64).collect();
            let lengths =
                Tensor::from_vec(lengths, batch, losses.device())?.to_dtype(losses.dtype())?;
            losses.div(&lengths)?.mean_all()
        }
    }
}

fn validate(
    batch: usize,
    frames: usize,
    classes: usize,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
) -> Result<(), CtcError> {
    if targets.len() != batch {
        return Err(CtcError::BatchMismatch {
            batch,
            what: "targets",
            len: targets.len(),
        });
    }
    if input_lengths.len() != batch {
        return Err(CtcError::BatchMismatch {
            batch,
            what: "input_lengths",
            len: input_lengths.len(),
        });
    }
    if blank as usize >= classes {
        return Err(CtcError::Blank { blank, classes });
    }
    for (index, (&length, target)) in input_lengths.iter().zip(targets).enumerate() {
        if length > frames {
            return Err(CtcError::InputLength {
                index,
                length,
                frames,
            });
        }
        if let Some((position, &label)) = target
            .iter()
            .enumerate()
            .find(|&(_, &l)| l == blank || l as usize >= classes)
        {
            return Err(CtcError::Label {
                index,
                position,
                label,
                classes,
            });
        }
    }
    Ok(())
}

/// `log(exp(a) + exp(b))` that treats `-inf` as probability zero without producing NaN.
#[inline]
pub fn log_add(a: f64, b: f64) -> f64 {
    if a == NEG_INF {
        return b;
    }
    if b == NEG_INF {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// One target expanded to the CTC state sequence `blank l1 blank l2 ... lL blank`.
struct Lattice {
    /// Label of each state.
    labels: Vec<u32>,
    /// Whether state `s` may be entered from `s - 2` (a label differing from the previous label).
    skip: Vec<bool>,
    /// Distinct labels of the lattice (blank included) and, per state, its index in that list.
    classes: Vec<u32>,
    class_slot: Vec<usize>,
}

impl Lattice {
    fn new(target: &[u32], blank: u32) -> Self {
        let mut labels = Vec::with_capacity(2 * target.len() + 1);
        labels.push(blank);
        for &label in target {
            labels.push(label);
            labels.push(blank);
        }
        let skip = (0..labels.len())
            .map(|s| s >= 2 && labels[s] != blank && labels[s] != labels[s - 2])
            .collect();
        let mut classes: Vec<u32> = Vec::new();
        let class_slot = labels
            .iter()
            .map(|&label| match classes.iter().position(|&c| c == label) {
                Some(slot) => slot,
                None => {
                    classes.push(label);
                    classes.len() - 1
                }
            })
            .collect();
        Self {
            labels,
            skip,
            classes,
            class_slot,
        }
    }

    fn states(&self) -> usize {
        self.labels.len()
    }

    /// Forward variables `alpha[t * S + s]` (log prob of all prefixes of `frames` frames ending in
    /// state `s` at frame `t`, frame `t` included). Returns `ln p(target)`.
    // Mirrors ctc_loss_cpu_template's log_alpha recursion (aten/src/ATen/native/LossCTC.cpp).
    fn alpha<F: WithDType>(&self, emit: &Emissions<F>, frames: usize, alpha: &mut [f64]) -> f64 {
        let states = self.states();
        if frames == 0 {
            return if states == 1 { 0.0 } else { NEG_INF };
        }
        alpha[..frames * states].fill(NEG_INF);
        alpha[0] = emit.get(0, self.labels[0]);
        if states > 1 {
            alpha[1] = emit.get(0, self.labels[1]);
        }
        for t in 1..frames {
            let (done, rest) = alpha.split_at_mut(t * states);
            let prev = &done[(t - 1) * states..];
            for (s, cur) in rest[..states].iter_mut().enumerate() {
                let mut a = prev[s];
                if s >= 1 {
                    a = log_add(a, prev[s - 1]);
                }
                if self.skip[s] {
                    a = log_add(a, prev[s - 2]);
                }
                *cur = if a == NEG_INF {
                    NEG_INF
                } else {
                    a + emit.get(t, self.labels[s])
                };
            }
        }
        let last = &alpha[(frames - 1) * states..frames * states];
        if states > 1 {
            log_add(last[states - 1], last[states - 2])
        } else {
            last[0]
        }
    }

    /// Backward variables `beta[t * S + s]` (log prob of all suffixes from state `s` at frame `t`
    /// to the end, frame `t` included).
    // Mirrors ctc_loss_backward_cpu_template's log_beta recursion.
    fn beta<F: WithDType>(&self, emit: &Emissions<F>, frames: usize, beta: &mut [f64]) {
        let states = self.states();
        if frames == 0 {
            return;
        }
        beta[..frames * states].fill(NEG_INF);
        let last = (frames - 1) * states;
        beta[last + states - 1] = emit.get(frames - 1, self.labels[states - 1]);
        if states > 1 {
            beta[last + states - 2] = emit.get(frames - 1, self.labels[states - 2]);
        }
        for t in (0..frames - 1).rev() {
            let (head, done) = beta.split_at_mut((t + 1) * states);
            let next = &done[..states];
            for (s, cur) in head[t * states..].iter_mut().enumerate() {
                let mut b = next[s];
                if s + 1 < states {
                    b = log_add(b, next[s + 1]);
                }
                if s + 2 < states && self.skip[s + 2] {
                    b = log_add(b, next[s + 2]);
                }
                *cur = if b == NEG_INF {
                    NEG_INF
                } else {
                    b + emit.get(t, self.labels[s])
                };
            }
        }
    }
}

/// What the op's input holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Log-probabilities; the gradient is taken with respect to them.
    LogProbs,
    /// Unnormalised scores; the op applies log_softmax itself and differentiates through it.
    Logits,
}

/// One utterance's log-probabilities `x[t * C + k] - norm[t]`: `norm` is 0 for log-prob input
/// and each frame's log-sum-exp for logits.
struct Emissions<'a, F> {
    x: &'a [F],
    classes: usize,
    norm: Vec<f64>,
}

impl<'a, F: WithDType> Emissions<'a, F> {
    fn new(x: &'a [F], classes: usize, frames: usize, input: Input) -> Self {
        let norm = match input {
            Input::LogProbs => vec![0.0; frames],
            Input::Logits => x[..frames * classes]
                .chunks_exact(classes)
                .map(log_sum_exp)
                .collect(),
        };
        Emissions { x, classes, norm }
    }

    #[inline]
    fn get(&self, t: usize, k: u32) -> f64 {
        self.x[t * self.classes + k as usize].to_f64() - self.norm[t]
    }
}

fn log_sum_exp<F: WithDType>(row: &[F]) -> f64 {
    let max = row.iter().map(|v| v.to_f64()).fold(NEG_INF, f64::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = if F::DTYPE == DType::F32 {
        // f32 exp (about 3x cheaper) is exact enough for f32 input; the sum stays f64.
        row.iter()
            .map(|v| ((v.to_f64() - max) as f32).exp())
            .map(f64::from)
            .sum()
    } else {
        row.iter().map(|v| (v.to_f64() - max).exp()).sum()
    };
    max + sum.ln()
}

/// `out[k] = softmax(row)[k] * scale`, given the row's log-sum-exp `norm`.
fn scaled_softmax<F: WithDType>(row: &[F], norm: f64, scale: f64, out: &mut [F]) {
    if F::DTYPE == DType::F32 {
        let scale = scale as f32;
        for (o, &v) in out.iter_mut().zip(row) {
            *o = F::from_f64(f64::from(((v.to_f64() - norm) as f32).exp() * scale));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = F::from_f64((v.to_f64() - norm).exp() * scale);
        }
    }
}

/// Per-utterance scratch space, allocated once per utterance (not per frame).
struct Scratch {
    alpha: Vec<f64>,
    beta: Vec<f64>,
    occupancy: Vec<f64>,
}

struct CtcOp {
    input: Input,
    targets: Vec<Lattice>,
    input_lengths: Vec<usize>,
    zero_infinity: bool,
    impossible: Arc<AtomicUsize>,
}

impl CtcOp {
    fn losses<F: WithDType>(&self, x: &[F], frames: usize, classes: usize) -> Vec<F> {
        let stride = frames * classes;
        (0..self.targets.len())
            .into_par_iter()
            .map(|b| {
                let lattice = &self.targets[b];
                let length = self.input_lengths[b];
                let emit = Emissions::new(
                    &x[b * stride..(b + 1) * stride],
                    classes,
                    length,
                    self.input,
                );
                let mut alpha = vec![NEG_INF; length * lattice.states()];
                let nll = -lattice.alpha(&emit, length, &mut alpha);
                if nll == f64::INFINITY {
                    self.impossible.fetch_add(1, Ordering::Relaxed);
                    if self.zero_infinity {
                        return F::from_f64(0.0);
                    }
                }
                F::from_f64(nll)
            })
            .collect()
    }

    /// `d loss_b / d input[b, t, k] * grad_out[b]` for every utterance: `-γ` for log-prob input,
    /// `softmax - γ` for logits, zero on padded frames and for impossible alignments.
    // Mirrors ctc_loss_backward_cpu_template (minus its `exp(log_probs)` term for log-prob input;
    // see the module docs).
    fn gradient<F: WithDType>(
        &self,
        x: &[F],
        frames: usize,
        classes: usize,
        grad_out: &[f64],
    ) -> Vec<F> {
        let stride = frames * classes;
        let mut grad = vec![F::from_f64(0.0); x.len()];
        grad.par_chunks_mut(stride.max(1))
            .take(self.targets.len())
            .enumerate()
            .for_each(|(b, grad)| {
                let lattice = &self.targets[b];
                let length = self.input_lengths[b];
                let scale = grad_out[b];
                if scale == 0.0 || length == 0 {
                    return;
                }
                let emit = Emissions::new(
                    &x[b * stride..(b + 1) * stride],
                    classes,
                    length,
                    self.input,
                );
                let states = lattice.states();
                let mut scratch = Scratch {
                    alpha: vec![NEG_INF; length * states],
                    beta: vec![NEG_INF; length * states],
                    occupancy: vec![NEG_INF; lattice.classes.len()],
                };
                let log_p = lattice.alpha(&emit, length, &mut scratch.alpha);
                if !log_p.is_finite() {
                    // Impossible alignment: the loss is +inf (or zeroed); its gradient is zero.
                    return;
                }
                lattice.beta(&emit, length, &mut scratch.beta);
                for t in 0..length {
                    scratch.occupancy.fill(NEG_INF);
                    let alpha = &scratch.alpha[t * states..(t + 1) * states];
                    let beta = &scratch.beta[t * states..(t + 1) * states];
                    for s in 0..states {
                        let slot = lattice.class_slot[s];
                        scratch.occupancy[slot] =
                            log_add(scratch.occupancy[slot], alpha[s] + beta[s]);
                    }
                    let out = &mut grad[t * classes..(t + 1) * classes];
                    if self.input == Input::Logits {
                        // d/dlogits of log_softmax folds in each class's softmax probability.
                        let row = &emit.x[t * classes..(t + 1) * classes];
                        scaled_softmax(row, emit.norm[t], scale, out);
                    }
                    for (&class, &log_ab) in lattice.classes.iter().zip(&scratch.occupancy) {
                        if log_ab == NEG_INF {
                            continue;
                        }
                        // alpha and beta both include frame t's emission, so divide it out once.
                        let gamma = (log_ab - emit.get(t, class) - log_p).exp();
                        let o = &mut out[class as usize];
                        *o = F::from_f64(o.to_f64() - gamma * scale);
                    }
                }
            });
        grad
    }

    fn fwd_typed<F: WithDType>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or(CtcError::Layout)?;
        let (batch, frames, classes) = layout.shape().dims3()?;
        let x = &F::cpu_storage_as_slice(storage)?[start..end];
        let losses = self.losses(x, frames, classes);
        Ok((F::to_cpu_storage_owned(losses), Shape::from(batch)))
    }

    fn bwd_typed<F: WithDType>(
        &self,
        arg: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (batch, frames, classes) = arg.dims3()?;
        let grad_out: Vec<f64> = grad_res.to_dtype(DType::F64)?.to_vec1()?;
        // Read the saved input in place rather than copying [B, T, C] out of it.
        let (storage, layout) = arg.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            return Err(CtcError::Device.into());
        };
        let (start, end) = layout.contiguous_offsets().ok_or(CtcError::Layout)?;
        let x = &F::cpu_storage_as_slice(storage)?[start..end];
        let grad = self.gradient(x, frames, classes, &grad_out);
        Tensor::from_vec(grad, (batch, frames, classes), arg.device())
    }
}

impl CustomOp1 for CtcOp {
    fn name(&self) -> &'static str {
        "ctc_loss"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(_) => self.fwd_typed::<f32>(storage, layout),
            CpuStorage::F64(_) => self.fwd_typed::<f64>(storage, layout),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other.dtype(),
                "ctc_loss",
            )),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = match arg.dtype() {
            DType::F32 => self.bwd_typed::<f32>(arg, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(arg, grad_res)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "ctc_loss")),
        };
        Ok(Some(grad))
    }
}
