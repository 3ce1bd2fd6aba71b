//! Audio: decode any file to mono f32 at its own rate, resample, speed-perturb.
//! (Skeleton: the audio owner fills this in; the signatures below are the contract.)
use std::path::{Path, PathBuf};

/// A decoded file, downmixed to mono at the source rate.
#[derive(Debug, Clone)]
pub struct DecodedAudio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    pub channels: u16,
    /// Codec name as detected from content ("flac", "mp3", "pcm_s16le", "opus", ...).
    pub codec: String,
    /// Set when the file was damaged but kept (`keep_damaged`): what was wrong.
    pub damage: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("cannot decode {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot resample: {0}")]
    Resample(String),
}

/// Decoding policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Keep the decodable part of a damaged file instead of failing it.
    pub keep_damaged: bool,
}

pub fn decode_file(path: &Path, _opts: DecodeOptions) -> Result<DecodedAudio, AudioError> {
    Err(AudioError::Decode {
        path: path.to_path_buf(),
        reason: "audio decoding is not built yet".into(),
    })
}

/// Resamples mono audio from `from_hz` to `to_hz` (identity when equal).
pub fn resample_to(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == to_hz {
        return Ok(samples.to_vec());
    }
    Err(AudioError::Resample("resampling is not built yet".into()))
}

/// sox `speed FACTOR` at `rate_hz`: tempo and pitch change together; output has len/FACTOR samples.
pub fn speed_perturb(_samples: &[f32], _rate_hz: u32, _factor: f64) -> Result<Vec<f32>, AudioError> {
    Err(AudioError::Resample("speed perturbation is not built yet".into()))
}
