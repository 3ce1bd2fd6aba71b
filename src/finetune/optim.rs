//! Adam / AdamW with saveable state, global-norm gradient clipping, gradient accumulation.
//!
//! candle_nn's AdamW keeps its moments private (no exact resume) and silently skips vars
//! without a gradient; this optimiser owns its state (m, v, step) by parameter name so a
//! checkpoint can hold it, and it refuses a step where a parameter has no gradient.
use crate::device::Executor;
use crate::finetune::config::{OptimConfig, OptimizerKind};
use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use std::collections::HashMap;

/// Named trainable parameters in a fixed (sorted by name) order.
pub type NamedVars = Vec<(String, Var)>;

/// torch.optim.Adam / torch.optim.AdamW (amsgrad = false), same update formulas.
pub struct Adam {
    kind: OptimizerKind,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    params: NamedVars,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied (bias correction counts these).
    step: u64,
    /// Steps skipped for a non-finite gradient (the lr schedule counts these too).
    skipped: u64,
    /// The fused f32 CPU update (the CPU engine's), else tensor ops.
    fused: bool,
}

impl Adam {
    /// The update runs on `executor`: the fused f32 kernel (CPU engine) or candle tensor ops
    /// (any device; what `SPEECHCACHE_ENGINE=candle` and CUDA use).
    pub fn new(params: NamedVars, cfg: &OptimConfig, executor: Executor) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            kind: cfg.optimizer,
            betas: cfg.betas,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            params,
            m,
            v,
            step: 0,
            skipped: 0,
            fused: executor == Executor::CpuEngine,
        })
    }

    /// Optimiser steps taken so far (applied or skipped).
    pub fn step_count(&self) -> u64 {
        self.step + self.skipped
    }

    /// Count a step whose update was skipped (non-finite gradient), as ESPnet's trainer does:
    /// the schedule moves on, the moments and bias correction do not.
    pub fn skip_step(&mut self) {
        self.skipped += 1;
    }

    pub fn params(&self) -> &NamedVars {
        &self.params
    }

    /// One update with `grads[i]` for `params[i]` at learning rate `lr`.
    // Mirrors torch.optim.adam._single_tensor_adam (and adamw's decoupled decay).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "optimizer got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let [b1, b2] = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (i, g) in grads.iter().enumerate() {
            let p = &self.params[i].1;
            if self.fused
                && p.device().is_cpu()
                && p.dtype() == DType::F32
                && g.dtype() == DType::F32
            {
                self.step_cpu_f32(i, g, lr, (step_size, bc2_sqrt))?;
                continue;
            }
            // detached: the moments must not keep this step's autograd graph alive (each
            // m_t would otherwise hold m_{t-1}'s graph and memory would grow every step)
            let mut g = g.detach();
            let mut theta = p.as_tensor().detach();
            if self.weight_decay > 0.0 {
                match self.kind {
                    OptimizerKind::Adam => g = (g + theta.affine(self.weight_decay, 0.0)?)?,
                    OptimizerKind::Adamw => {
                        theta = theta.affine(1.0 - lr * self.weight_decay, 0.0)?
                    }
                }
            }
            let m = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, self.eps)?;
            let update = (m.div(&denom)?).affine(step_size, 0.0)?;
            p.set(&(theta - update)?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// The same update for a CPU f32 parameter in one fused, multi-threaded pass (the
    /// tensor-op path above runs a dozen single-threaded ops, each allocating, per parameter).
    fn step_cpu_f32(
        &mut self,
        i: usize,
        g: &Tensor,
        lr: f64,
        (step_size, bc2_sqrt): (f64, f64),
    ) -> Result<()> {
        use rayon::prelude::*;
        let p = &self.params[i].1;
        let shape = p.shape().clone();
        let mut theta = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let mut m = self.m[i].flatten_all()?.to_vec1::<f32>()?;
        let mut v = self.v[i].flatten_all()?.to_vec1::<f32>()?;
        let [b1, b2] = self.betas;
        let (b1, b2, eps) = (b1 as f32, b2 as f32, self.eps as f32);
        let (wd, adamw) = (self.weight_decay as f32, self.kind == OptimizerKind::Adamw);
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (step_size, inv_bc2) = (step_size as f32, (1.0 / bc2_sqrt) as f32);
        const CHUNK: usize = 1 << 14;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((th, m), v), g)| {
                for j in 0..th.len() {
                    let mut gj = g[j];
                    let mut t = th[j];
                    if wd > 0.0 {
                        if adamw {
                            t *= decay;
                        } else {
                            gj += wd * t;
                        }
                    }
                    m[j] = b1 * m[j] + (1.0 - b1) * gj;
                    v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
                    th[j] = t - step_size * (m[j] / (v[j].sqrt() * inv_bc2 + eps));
                }
            });
        let dev = p.device().clone();
        p.set(&Tensor::from_vec(theta, shape.clone(), &dev)?)?;
        self.m[i] = Tensor::from_vec(m, shape.clone(), &dev)?;
        self.v[i] = Tensor::from_vec(v, shape, &dev)?;
        Ok(())
    }

    /// The state as named tensors for a checkpoint: `optim.m.<param>`, `optim.v.<param>` and
    /// `optim.counts` = [updates applied, steps skipped] (f64).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        let counts = [self.step as f64, self.skipped as f64];
        out.push((
            "optim.counts".to_string(),
            Tensor::new(&counts, &candle_core::Device::Cpu)?,
        ));
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("optim.m.{name}"), self.m[i].clone()));
            out.push((format!("optim.v.{name}"), self.v[i].clone()));
        }
        Ok(out)
    }

    /// Restore state saved by `state_tensors` (every parameter must be present).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let counts = tensors
            .get("optim.counts")
            .ok_or_else(|| candle_core::Error::Msg("checkpoint has no optim.counts".into()))?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let [step, skipped] = counts[..] else {
            candle_core::bail!("optim.counts must hold 2 values, found {}", counts.len())
        };
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("optim.{which}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("checkpoint has no optimizer state {key}"))
                })?;
                if t.dims() != p.dims() {
                    candle_core::bail!(
                        "optimizer state {key} has shape {:?}, parameter has {:?}",
                        t.dims(),
                        p.dims()
                    );
                }
                *slot = t.to_device(p.device())?.to_dtype(p.dtype())?;
            }
        }
        self.step = step as u64;
        self.skipped = skipped as u64;
        Ok(())
    }
}

/// Sums gradients over the micro-batches of one optimiser step.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self {
            sums: vec![None; n],
        }
    }

    /// Add this backward pass's gradients (missing ones are left as they are).
    pub fn add(&mut self, params: &NamedVars, grads: &GradStore) -> Result<()> {
        for (slot, (_, p)) in self.sums.iter_mut().zip(params) {
            if let Some(g) = grads.get(p.as_tensor()) {
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Add one gradient per parameter, in the parameters' order (the CPU engine's output).
    pub fn add_tensors(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.sums.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.sums.len()
            );
        }
        for (slot, g) in self.sums.iter_mut().zip(grads) {
            *slot = Some(match slot.take() {
                Some(s) => (s + g)?,
                None => g.clone(),
            });
        }
        Ok(())
    }

    /// Names of parameters that received no gradient at all.
    pub fn missing(&self, params: &NamedVars) -> Vec<String> {
        self.sums
            .iter()
            .zip(params)
            .filter(|(s, _)| s.is_none())
            .map(|(_, (n, _))| n.clone())
            .collect()
    }

    /// Take the sums (zeros for parameters without gradient) and reset.
    pub fn take(&mut self, params: &NamedVars) -> Result<Vec<Tensor>> {
        self.sums
            .iter_mut()
            .zip(params)
            .map(|(s, (_, p))| match s.take() {
                Some(g) => Ok(g),
                None => p.as_tensor().zeros_like(),
            })
            .collect()
    }
}

/// L2 norm over all gradients together (torch.nn.utils.clip_grad_norm_'s total norm).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Clip to `max_norm` like clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above it.
/// Returns the norm before clipping.
pub fn clip_by_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn cfg(kind: OptimizerKind, wd: f64) -> OptimConfig {
        OptimConfig {
            optimizer: kind,
            lr: 0.1,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: wd,
            warmup_steps: 0,
            grad_clip: 0.0,
            accum_grad: 1,
        }
    }

    // Reference values worked out by hand from torch's Adam formulas for 2 steps.
    fn reference(kind: OptimizerKind, wd: f64, p0: f64, g: [f64; 2]) -> f64 {
        let (lr, b1, b2, eps) = (0.1, 0.9f64, 0.999f64, 1e-8);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, &gt) in g.iter().enumerate() {
            let t = t as i32 + 1;
            let mut gt = gt;
            match kind {
                OptimizerKind::Adam => gt += wd * p,
                OptimizerKind::Adamw => p *= 1.0 - lr * wd,
            }
            m = b1 * m + (1.0 - b1) * gt;
            v = b2 * v + (1.0 - b2) * gt * gt;
            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn adam_and_adamw_match_torch_formulas() {
        for kind in [OptimizerKind::Adam, OptimizerKind::Adamw] {
            let dev = Device::Cpu;
            let p = Var::from_tensor(&Tensor::new(&[1.5f32], &dev).unwrap()).unwrap();
            let mut opt = Adam::new(
                vec![("p".into(), p.clone())],
                &cfg(kind, 0.01),
                Executor::CpuEngine,
            )
            .unwrap();
            for g in [0.3f32, -0.7] {
                opt.step(&[Tensor::new(&[g], &dev).unwrap()], 0.1).unwrap();
            }
            let got = p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            let want = reference(kind, 0.01, 1.5, [0.3, -0.7]);
            assert!((got - want).abs() < 1e-5, "{kind:?}: {got} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3f32], &dev).unwrap(),
            Tensor::new(&[4f32], &dev).unwrap(),
        ];
        let n = clip_by_global_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let after = global_norm(&g).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
