//! Audio: decode any file to mono f32 at its own rate, resample, speed-perturb.
//!
//! Decoding goes by content (symphonia probes the bytes; the extension is only a hint), so a
//! FLAC file named `.wav` decodes. Ogg Opus, which symphonia cannot decode, goes through libopus
//! behind symphonia's Ogg demuxer. Damage that symphonia hides (silent resync, clean EOF on a
//! truncated MP3) is caught by counting decode errors and comparing the decoded length with the
//! length the container declares; see [`decode_file`].
//!
//! Gapless trimming: MP3 (LAME/Xing tag), Vorbis and Opus (granule positions, pre-skip) and
//! AAC/ALAC in MP4 (edit list, read by `mp4_edit`) decode to exactly the encoder's input
//! length. Known limits:
//! - MP3 without a LAME tag and raw ADTS `.aac` keep the encoder delay and padding (no
//!   container field says how much; ~1–2k samples), and their truncation is undetectable.
//! - A cut or corrupt Ogg file, and an MP4 cut before its `moov` index, fail at open:
//!   symphonia reads the end of an Ogg stream and the MP4 index up front, so nothing is kept.
//! - Opus with more than 2 channels (mapping family 1/255) is not supported.
//! - FLAC MD5 is not verified (it costs ~40 % of decode time); frames failing their CRC are
//!   dropped by the demuxer and caught by the length check.
use std::path::PathBuf;

mod decode;
mod mp4_edit;
mod ogg_opus;
mod resample;

pub use decode::{decode_file, decode_input, probe_info, AudioInfo, AudioInput};
pub use resample::{resample_to, speed_perturb};

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

impl DecodedAudio {
    /// Length in seconds at the source rate.
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate.max(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("cannot decode {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot resample: {0}")]
    Resample(String),
}

/// Source sample rates outside this range come from damaged or hostile headers, not from
/// recordings (telephony is 8 kHz, studio masters 384 kHz; 768 kHz DACs exist); resampling a
/// 1 Hz "recording" to 16 kHz would multiply its length 16,000 times.
pub const MIN_SOURCE_RATE: u32 = 1000;
pub const MAX_SOURCE_RATE: u32 = 768_000;

/// Refuses a declared sample rate no recording has (see `MIN_SOURCE_RATE`).
pub fn check_source_rate(rate: u32) -> Result<(), String> {
    if (MIN_SOURCE_RATE..=MAX_SOURCE_RATE).contains(&rate) {
        return Ok(());
    }
    Err(format!(
        "the header declares a sample rate of {rate} Hz, outside the {MIN_SOURCE_RATE}–{MAX_SOURCE_RATE} Hz \
         of any recording (a damaged or hostile header)"
    ))
}

/// Decoding policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Keep the decodable part of a damaged file instead of failing it.
    pub keep_damaged: bool,
}
