//! One scoped profiler for every executor: `prof.time(Kind::Attention, || …)` adds the wall
//! time of the closure to its kind. A disabled profiler (the default) costs one branch.
//!
//! Kinds are the kernels of `src/ops/` plus the stage boundaries the benches report; both the
//! SSL encoder's executors and the Conformer trainer use the same kinds, so `bench extract`
//! and `bench finetune` print the same table.
use std::time::Instant;

/// What a timed span computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Front-end convolutions (the SSL feature encoder, the Conformer's subsampling).
    Conv,
    /// Linear projections and feed-forward gemms.
    Linear,
    /// Self-attention (scores, softmax, context).
    Attention,
    /// Layer, batch and group normalisation, and feature normalisation.
    Norm,
    /// The Conformer's convolution module (pointwise, GLU, depthwise).
    ConvModule,
    /// Element-wise work: activations, residuals, dropout, masks.
    Elementwise,
    /// The CTC loss and its gradient.
    Ctc,
    /// Anything else (copies, layouts, the optimiser).
    Other,
    /// Reading batches and augmenting them (SpecAugment).
    Data,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Conv,
        Kind::Linear,
        Kind::Attention,
        Kind::Norm,
        Kind::ConvModule,
        Kind::Elementwise,
        Kind::Ctc,
        Kind::Other,
        Kind::Data,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Conv => "conv",
            Kind::Linear => "linear",
            Kind::Attention => "attention",
            Kind::Norm => "norm",
            Kind::ConvModule => "conv module",
            Kind::Elementwise => "elementwise",
            Kind::Ctc => "ctc",
            Kind::Other => "other",
            Kind::Data => "data",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Wall seconds and call counts per [`Kind`], for the forward and the backward pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Profile {
    pub forward: [f64; Kind::ALL.len()],
    pub backward: [f64; Kind::ALL.len()],
    pub calls: [u64; Kind::ALL.len()],
}

impl Profile {
    pub fn add(&mut self, other: &Profile) {
        for i in 0..Kind::ALL.len() {
            self.forward[i] += other.forward[i];
            self.backward[i] += other.backward[i];
            self.calls[i] += other.calls[i];
        }
    }

    pub fn forward_total(&self) -> f64 {
        self.forward.iter().sum()
    }

    pub fn backward_total(&self) -> f64 {
        self.backward.iter().sum()
    }

    /// `(kind, forward s, backward s)` for every kind that ran.
    pub fn rows(&self) -> Vec<(Kind, f64, f64)> {
        Kind::ALL
            .iter()
            .filter(|k| self.calls[k.index()] > 0)
            .map(|&k| (k, self.forward[k.index()], self.backward[k.index()]))
            .collect()
    }
}

/// Which pass a span belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// The scoped profiler: disabled unless built with [`Profiler::enabled`].
#[derive(Debug, Default)]
pub struct Profiler {
    profile: Option<Profile>,
    pass: Option<Pass>,
}

impl Profiler {
    /// A profiler that records nothing (`time` just runs the closure).
    pub fn disabled() -> Self {
        Self::default()
    }

    pub fn enabled() -> Self {
        Self {
            profile: Some(Profile::default()),
            pass: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.profile.is_some()
    }

    /// Spans timed from now on count as `pass` (forward by default).
    pub fn set_pass(&mut self, pass: Pass) {
        self.pass = Some(pass);
    }

    /// Runs `f`, adding its wall time to `kind` when enabled.
    #[inline]
    pub fn time<R>(&mut self, kind: Kind, f: impl FnOnce() -> R) -> R {
        if self.profile.is_none() {
            return f();
        }
        let start = Instant::now();
        let out = f();
        self.record(kind, start.elapsed().as_secs_f64());
        out
    }

    /// Adds `secs` measured elsewhere to `kind` (one call), when enabled.
    pub fn record(&mut self, kind: Kind, secs: f64) {
        let pass = self.pass.unwrap_or(Pass::Forward);
        let Some(profile) = self.profile.as_mut() else {
            return;
        };
        let i = kind.index();
        match pass {
            Pass::Forward => profile.forward[i] += secs,
            Pass::Backward => profile.backward[i] += secs,
        }
        profile.calls[i] += 1;
    }

    /// What was recorded (empty when disabled).
    pub fn profile(&self) -> Profile {
        self.profile.clone().unwrap_or_default()
    }

    /// Takes what was recorded and starts again from zero.
    pub fn take(&mut self) -> Profile {
        match self.profile.as_mut() {
            Some(p) => std::mem::take(p),
            None => Profile::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_to_their_kind_and_pass() {
        let mut prof = Profiler::enabled();
        let v = prof.time(Kind::Attention, || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            7
        });
        assert_eq!(v, 7);
        prof.set_pass(Pass::Backward);
        prof.time(Kind::Attention, || {
            std::thread::sleep(std::time::Duration::from_millis(5))
        });
        let p = prof.take();
        let i = Kind::Attention as usize;
        assert!(p.forward[i] >= 0.004 && p.backward[i] >= 0.004, "{p:?}");
        assert_eq!(p.calls[i], 2);
        assert_eq!(p.rows().len(), 1);
        assert_eq!(prof.profile().calls[i], 0);
        let mut off = Profiler::disabled();
        assert_eq!(off.time(Kind::Conv, || 3), 3);
        assert!(off.profile().rows().is_empty());
    }
}
