//! The SSL encoder as a stage runs it: one of its two executors, chosen once from the
//! [`Backend`] (the CPU engine for f32 on the CPU, candle tensor ops for everything else).
use super::config::Wav2Vec2Config;
use super::{CpuEncoder, LinearLayout, Wav2Vec2Model};
use crate::device::{Backend, Executor};
use crate::models::checkpoint::LoadedCheckpoint;
use crate::ops::profile::{Profile, Profiler};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Mutex;

/// The wav2vec 2.0 / HuBERT encoder on the executor its [`Backend`] names.
pub enum SslEncoder {
    /// [`CpuEncoder`]: f32 on the CPU, one utterance per thread.
    Cpu(CpuEncoder),
    /// [`Wav2Vec2Model`]: candle tensor ops on the backend's device and dtype.
    TensorOps(Wav2Vec2Model),
}

impl SslEncoder {
    /// Loads from a `VarBuilder` over the canonical names of `config::expected_tensors`, with
    /// the `nn.Linear` weights in `layout`, for `backend` (its device and dtype for tensor
    /// ops; f32 on the CPU for the CPU engine).
    pub fn load(
        vb: VarBuilder,
        cfg: &Wav2Vec2Config,
        layout: LinearLayout,
        backend: &Backend,
    ) -> Result<Self> {
        Ok(match backend.executor() {
            Executor::CpuEngine => Self::Cpu(CpuEncoder::load(vb, cfg, layout)?),
            Executor::TensorOps => {
                let vb = vb
                    .set_dtype(backend.dtype())
                    .set_device(backend.device().clone());
                Self::TensorOps(Wav2Vec2Model::load_with_layout(vb, cfg, layout)?)
            }
        })
    }

    /// The encoder of a loaded checkpoint (load it on the backend's device and dtype, with
    /// `LinearLayout::InOut` when the backend runs the CPU engine: no transposing copies).
    pub fn from_checkpoint(ckpt: &LoadedCheckpoint, backend: &Backend) -> Result<Self> {
        Self::load(
            ckpt.var_builder(),
            &ckpt.config,
            ckpt.linear_layout,
            backend,
        )
    }

    pub fn config(&self) -> &Wav2Vec2Config {
        match self {
            Self::Cpu(e) => e.config(),
            Self::TensorOps(m) => m.config(),
        }
    }

    pub fn executor(&self) -> Executor {
        match self {
            Self::Cpu(_) => Executor::CpuEngine,
            Self::TensorOps(_) => Executor::TensorOps,
        }
    }

    /// Where the states `forward` returns live.
    pub fn device(&self) -> &Device {
        match self {
            Self::Cpu(_) => &Device::Cpu,
            Self::TensorOps(m) => m.device(),
        }
    }

    /// The dtype of the states `forward` returns.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Cpu(_) => DType::F32,
            Self::TensorOps(m) => m.dtype(),
        }
    }

    /// Hidden states `0..=max_hidden_state` of `wave` [B, S] (utterance `b` valid on its
    /// first `lengths[b]` samples), each [B, T, H], and the valid frames of every utterance:
    /// see [`Wav2Vec2Model::forward`]. The CPU engine runs every utterance alone and pads its
    /// states with zeros.
    pub fn forward(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        match self {
            Self::Cpu(e) => e.forward_padded(wave, lengths, max_hidden_state, None),
            Self::TensorOps(m) => m.forward(wave, lengths, max_hidden_state),
        }
    }

    /// `forward`, with where the time went (for the CPU engine, summed over its threads).
    #[allow(clippy::type_complexity)]
    pub fn forward_profiled(
        &self,
        wave: &Tensor,
        lengths: &[usize],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>, Profile)> {
        let (states, valid, profile) = match self {
            Self::Cpu(e) => {
                let profile = Mutex::new(Profile::default());
                let (s, v) = e.forward_padded(wave, lengths, max_hidden_state, Some(&profile))?;
                let profile = profile
                    .into_inner()
                    .map_err(|_| candle_core::Error::Msg("a CPU engine thread panicked".into()))?;
                (s, v, profile)
            }
            Self::TensorOps(m) => {
                let mut prof = Profiler::enabled();
                let (s, v) = m.forward_profiled(wave, lengths, max_hidden_state, &mut prof)?;
                (s, v, prof.take())
            }
        };
        Ok((states, valid, profile))
    }

    /// `forward` on waveforms of any lengths (zero-padded here into one batch). Normalise
    /// each one first with `normalize_waveform` when `preprocessor_config.json` says
    /// `do_normalize`.
    pub fn forward_waveforms(
        &self,
        waves: &[&[f32]],
        max_hidden_state: usize,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let lengths: Vec<usize> = waves.iter().map(|w| w.len()).collect();
        let s = lengths.iter().copied().max().unwrap_or(0);
        let mut flat = vec![0f32; waves.len() * s];
        for (row, w) in flat.chunks_exact_mut(s.max(1)).zip(waves) {
            row[..w.len()].copy_from_slice(w);
        }
        let wave = Tensor::from_vec(flat, (waves.len(), s), self.device())?;
        self.forward(&wave, &lengths, max_hidden_state)
    }
}
