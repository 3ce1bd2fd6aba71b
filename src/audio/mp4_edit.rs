//! The MP4 edit list of the first audio track (ISO/IEC 14496-12 §8.6.6 `elst`).
//!
//! AAC encoders prime the decoder with silence (ffmpeg: 1024 frames) and pad the last frame;
//! MP4 marks the playable range with an edit list, which symphonia 0.6 reads but does not apply.
//! Only the simple, common case is honoured: one non-empty edit at normal rate. Leading empty
//! edits (a presentation delay) are ignored, as is any other layout (no trimming then).
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The playable range of the audio track, in frames at the codec's sample rate.
pub(super) struct AudioEdit {
    /// Leading frames to drop (encoder priming).
    pub skip_frames: u64,
    /// Frames to keep after the skip, when the edit states a duration.
    pub keep_frames: Option<u64>,
    /// How coarse `keep_frames` is: one movie-timescale tick in frames, plus one.
    pub rounding_frames: u64,
}

impl AudioEdit {
    /// Frames to keep after the skip. symphonia's `num_frames` (`stts_frames`) is the sum of
    /// sample durations, priming included; when it agrees with the edit's coarser
    /// (movie-timescale) length it gives the exact count. `decoded` is the fallback.
    pub fn playable_frames(&self, stts_frames: Option<u64>, decoded: Option<u64>) -> u64 {
        let skip = self.skip_frames;
        match (stts_frames, self.keep_frames) {
            (Some(n), Some(k)) if n > skip && (n - skip).abs_diff(k) <= self.rounding_frames => {
                n - skip
            }
            (_, Some(k)) => k,
            (Some(n), None) => n.saturating_sub(skip),
            (None, None) => decoded.unwrap_or(0).saturating_sub(skip),
        }
    }
}

/// The largest `moov` we read into memory (sample tables of a multi-hour file fit easily).
const MAX_MOOV_BYTES: u64 = 256 << 20;

pub(super) fn read_audio_edit(path: &Path, sample_rate: u32) -> Option<AudioEdit> {
    let mut file = crate::regular_file::open_regular(path).ok()?;
    let moov = read_top_level_box(&mut file, b"moov")?;
    let movie_timescale = timescale(child(&moov, b"mvhd")?)?;
    let trak = boxes(&moov)
        .filter(|(kind, _)| kind == b"trak")
        .map(|(_, body)| body)
        .find(|trak| is_audio(trak))?;
    let mdia = child(trak, b"mdia")?;
    let media_timescale = timescale(child(mdia, b"mdhd")?)?;
    let elst = child(child(trak, b"edts")?, b"elst")?;
    let (segment_duration, media_time) = single_edit(elst)?;
    let rate = u64::from(sample_rate);
    let skip_frames = media_time.checked_mul(rate)? / media_timescale;
    let keep_frames = match segment_duration {
        0 => None,
        d => Some(d.checked_mul(rate)? / movie_timescale),
    };
    Some(AudioEdit {
        skip_frames,
        keep_frames,
        rounding_frames: rate.div_ceil(movie_timescale) + 1,
    })
}

/// Scans the file's top-level boxes for `kind` and returns its body.
fn read_top_level_box(file: &mut File, kind: &[u8; 4]) -> Option<Vec<u8>> {
    let file_len = file.metadata().ok()?.len();
    let mut pos = 0u64;
    while pos + 8 <= file_len {
        file.seek(SeekFrom::Start(pos)).ok()?;
        let mut header = [0u8; 16];
        file.read_exact(&mut header[..8]).ok()?;
        let size32 = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let (size, header_len) = match size32 {
            0 => (file_len - pos, 8),
            1 => {
                file.read_exact(&mut header[8..16]).ok()?;
                (u64::from_be_bytes(header[8..16].try_into().ok()?), 16)
            }
            n => (u64::from(n), 8),
        };
        if size < header_len || pos + size > file_len {
            return None;
        }
        if &header[4..8] == kind {
            let body_len = size - header_len;
            if body_len > MAX_MOOV_BYTES {
                return None;
            }
            let mut body = vec![0u8; body_len as usize];
            file.read_exact(&mut body).ok()?;
            return Some(body);
        }
        pos += size;
    }
    None
}

/// Iterates the boxes inside a container body: (type, body).
fn boxes(mut data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 8 {
            return None;
        }
        let size32 = u32::from_be_bytes(data[0..4].try_into().ok()?) as u64;
        let kind: [u8; 4] = data[4..8].try_into().ok()?;
        let (size, header_len) = match size32 {
            0 => (data.len() as u64, 8),
            1 if data.len() >= 16 => (u64::from_be_bytes(data[8..16].try_into().ok()?), 16),
            1 => return None,
            n => (n, 8),
        };
        if size < header_len || size > data.len() as u64 {
            return None;
        }
        let body = &data[header_len as usize..size as usize];
        data = &data[size as usize..];
        Some((kind, body))
    })
}

fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes(data).find(|(k, _)| k == kind).map(|(_, body)| body)
}

fn is_audio(trak: &[u8]) -> bool {
    // hdlr body: version+flags (4), pre_defined (4), handler_type (4).
    child(trak, b"mdia")
        .and_then(|mdia| child(mdia, b"hdlr"))
        .is_some_and(|hdlr| hdlr.get(8..12) == Some(b"soun"))
}

/// Timescale of an `mvhd` or `mdhd` body (same layout up to the timescale).
fn timescale(full_box: &[u8]) -> Option<u64> {
    let offset = match full_box.first()? {
        1 => 4 + 8 + 8,
        _ => 4 + 4 + 4,
    };
    let ts = u32::from_be_bytes(full_box.get(offset..offset + 4)?.try_into().ok()?);
    (ts > 0).then_some(u64::from(ts))
}

/// The one non-empty edit at rate 1: (segment duration in movie ticks, media time in media ticks).
fn single_edit(elst: &[u8]) -> Option<(u64, u64)> {
    let version = *elst.first()?;
    let count = u32::from_be_bytes(elst.get(4..8)?.try_into().ok()?) as usize;
    let entry_len = if version == 1 { 20 } else { 12 };
    let mut found = None;
    for i in 0..count {
        let e = elst.get(8 + i * entry_len..8 + (i + 1) * entry_len)?;
        let (duration, media_time, rate) = if version == 1 {
            (
                u64::from_be_bytes(e[0..8].try_into().ok()?),
                i64::from_be_bytes(e[8..16].try_into().ok()?),
                i16::from_be_bytes(e[16..18].try_into().ok()?),
            )
        } else {
            (
                u64::from(u32::from_be_bytes(e[0..4].try_into().ok()?)),
                i64::from(i32::from_be_bytes(e[4..8].try_into().ok()?)),
                i16::from_be_bytes(e[8..10].try_into().ok()?),
            )
        };
        if media_time < 0 {
            continue; // an empty edit: presentation delay, no media
        }
        if found.is_some() || rate != 1 {
            return None;
        }
        found = Some((duration, media_time as u64));
    }
    found
}
