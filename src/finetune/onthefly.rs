//! On-the-fly features: an audio store run through a frozen wav2vec 2.0 / HuBERT model inside
//! every training step, as s3prl/ESPnet's `frontend: s3prl` does. It exists to measure what
//! the feature cache saves (`speechcache bench finetune --ssl-model --train-audio`).
use crate::device::Backend;
use crate::finetune::data::{DataError, FeatureSource};
use crate::models::checkpoint::load_checkpoint_then;
use crate::models::ssl::{frames_for_samples, normalize_waveform, LinearLayout, SslEncoder};
use crate::store::{AudioStore, IndexRow};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// An audio store plus a frozen SSL model; `batch` computes the hidden states.
pub struct OnTheFlySource {
    audio: AudioStore,
    path: PathBuf,
    model: SslEncoder,
    do_normalize: bool,
    layers: Vec<usize>,
    frames: Vec<usize>,
}

impl OnTheFlySource {
    /// Open `audio` and load the checkpoint at `model_path` for `backend`'s device and
    /// executor, in f32.
    pub fn open(audio: &Path, model_path: &Path, backend: &Backend) -> Result<Self, DataError> {
        let err = |p: &Path, reason: String| DataError::Source {
            path: p.to_path_buf(),
            reason,
        };
        let store = AudioStore::open(audio)
            .map_err(|e| err(audio, format!("cannot open audio store: {e}")))?;
        if store.meta().sample_rate != Some(16000) {
            return Err(err(
                audio,
                format!(
                    "the SSL model needs 16 kHz audio, the store is at {:?} Hz",
                    store.meta().sample_rate
                ),
            ));
        }
        let backend = backend.with_dtype(DType::F32);
        // the CPU engine's gemm reads `[in, out]`: transpose while reading the file
        let layout = if backend.uses_cpu_engine() {
            LinearLayout::InOut
        } else {
            LinearLayout::OutIn
        };
        let (ckpt, model) = load_checkpoint_then(
            model_path,
            None,
            backend.device(),
            DType::F32,
            layout,
            |ckpt| SslEncoder::from_checkpoint(ckpt, &backend),
        )
        .map_err(|e| err(model_path, e.to_string()))?;
        let model = model.map_err(|e| err(model_path, e.to_string()))?;
        let frames = (0..store.len())
            .map(|i| frames_for_samples(&ckpt.config, store.samples(i).len()))
            .collect();
        Ok(Self {
            layers: (0..=ckpt.config.num_hidden_layers).collect(),
            do_normalize: ckpt.preprocessor.do_normalize,
            audio: store,
            path: audio.to_path_buf(),
            model,
            frames,
        })
    }
}

impl FeatureSource for OnTheFlySource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> usize {
        self.audio.len()
    }
    fn rows(&self) -> &[IndexRow] {
        self.audio.rows()
    }
    fn frames(&self, i: usize) -> usize {
        self.frames[i]
    }
    fn dim(&self) -> usize {
        self.model.config().hidden_size
    }
    fn layers(&self) -> &[usize] {
        &self.layers
    }
    fn frame_rate(&self) -> f64 {
        let hop: usize = self.model.config().conv_stride.iter().product();
        16000.0 / hop.max(1) as f64
    }

    fn batch(
        &self,
        items: &[usize],
        layers: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>), DataError> {
        // the model costs far more than a CRC-32 of its input: check every read
        for &i in items {
            self.audio.check_row(i).map_err(|e| DataError::Source {
                path: self.path.clone(),
                reason: format!("cannot train on a damaged row: {e}"),
            })?;
        }
        let lengths: Vec<usize> = items.iter().map(|&i| self.audio.samples(i).len()).collect();
        let s = lengths.iter().copied().max().unwrap_or(0);
        let mut wave = vec![0f32; items.len() * s];
        for (b, &i) in items.iter().enumerate() {
            let dst = &mut wave[b * s..b * s + lengths[b]];
            dst.copy_from_slice(self.audio.samples(i));
            if self.do_normalize {
                normalize_waveform(dst);
            }
        }
        let wave = Tensor::from_vec(wave, (items.len(), s), self.model.device())?;
        let top = layers.iter().copied().max().unwrap_or(0);
        let (states, valid) = self.model.forward(&wave, &lengths, top)?;
        let picked = layers
            .iter()
            .map(|&l| states[l].detach())
            .collect::<Vec<_>>();
        // [B, T, D] per layer -> [B, L, T, D]; frames past `valid` are zeroed as in a store batch
        let feats = Tensor::stack(&picked, 1)?.to_dtype(DType::F32)?;
        let (b, _l, t, _d) = feats.dims4()?;
        let mut mask = vec![0f32; b * t];
        for (u, &n) in valid.iter().enumerate() {
            mask[u * t..u * t + n.min(t)].fill(1.0);
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, 1), feats.device())?;
        let feats = feats.broadcast_mul(&mask)?.to_device(device)?;
        Ok((feats, valid))
    }

    fn stats(&self, _layer: usize) -> Result<(Vec<f64>, Vec<f64>), DataError> {
        Err(DataError::Source {
            path: self.path.clone(),
            reason: "on-the-fly features have no precomputed stats: use \
                     [model.featurizer] normalize = \"utterance\" or \"none\""
                .into(),
        })
    }
}
