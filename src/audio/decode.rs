//! File → mono f32 at the source rate, with damage detection.
//!
//! symphonia 0.6 picks the container by content (its probe scans for format markers and does
//! not consult the hint), so the extension never decides the codec.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use symphonia::core::audio::conv::FromSample;
use symphonia::core::audio::sample::Sample;
use symphonia::core::audio::{Audio, AudioBuffer, GenericAudioBufferRef};
use symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS;
use symphonia::core::codecs::audio::{AudioCodecId, AudioCodecParameters, AudioDecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, Track, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::packet::Packet;

use super::{mp4_edit, ogg_opus, AudioError, DecodeOptions, DecodedAudio};

/// What `probe_info` reads from the container header, without decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioInfo {
    pub sample_rate: u32,
    pub channels: u16,
    /// Playable frames the container declares (delay and padding excluded), when it says.
    pub num_frames: Option<u64>,
    pub codec: String,
}

/// Everything one decode pass gathers; [`judge`] turns it into a result or a damage report.
pub(super) struct Collected {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    pub channels: u16,
    pub codec: String,
    /// Playable frames the container declares.
    pub declared: Option<u64>,
    /// The most frames one packet can hold (sets the length tolerance).
    pub max_packet_frames: u64,
    pub corrupt_packets: u64,
    pub first_corrupt: Option<String>,
    /// Why reading stopped before a clean end of stream (I/O error, reset).
    pub stream_error: Option<String>,
    /// End of the last decoded packet in frames (when the track's timestamps count frames):
    /// tells audio lost inside the stream (end reached) from a cut stream (end missing).
    pub last_packet_end: Option<u64>,
}

/// What to decode: a file, or an encoded file held in memory (a row of a parquet dataset).
#[derive(Debug, Clone, Copy)]
pub enum AudioInput<'a> {
    File(&'a Path),
    /// Encoded bytes (WAV, FLAC, MP3, Ogg...) and the name errors give them, e.g.
    /// `train.parquet:12`. No temporary file: the decoder reads the bytes in place.
    Bytes {
        bytes: &'a [u8],
        name: &'a Path,
    },
}

impl AudioInput<'_> {
    fn name(&self) -> &Path {
        match self {
            AudioInput::File(path) => path,
            AudioInput::Bytes { name, .. } => name,
        }
    }
}

/// Decodes any supported file to mono f32 at its own rate.
///
/// Fails (or, with `keep_damaged`, keeps the decodable part and sets `damage`) when packets fail
/// to decode or the stream ends short of the length its header declares.
/// Empty, zero-length, non-audio and unsupported inputs fail with the reason. Never panics:
/// a panic inside a decoder becomes an error.
pub fn decode_file(path: &Path, opts: DecodeOptions) -> Result<DecodedAudio, AudioError> {
    decode_input(AudioInput::File(path), None, opts)
}

/// Like [`decode_file`], for a file or in-memory bytes; `channels` keeps only those channels
/// (0-based, averaged to mono; Lhotse's `channel`) instead of all of them. A channel the
/// stream does not have is an error.
pub fn decode_input(
    input: AudioInput<'_>,
    channels: Option<&[usize]>,
    opts: DecodeOptions,
) -> Result<DecodedAudio, AudioError> {
    guarded(input.name(), || {
        decode_collect(input, channels).and_then(|c| judge(c, opts))
    })
}

/// Reads rate, channels, declared length and codec from the header (no decoding).
pub fn probe_info(path: &Path) -> Result<AudioInfo, AudioError> {
    guarded(path, || {
        let fmt = open_format(AudioInput::File(path))?;
        let (track, params) = audio_track(fmt.as_ref())?;
        let codec = codec_name(params.codec);
        if params.codec == CODEC_ID_OPUS {
            return ogg_opus::info(&track, &params);
        }
        let sample_rate = params.sample_rate.unwrap_or(0);
        let mut num_frames = track.num_frames;
        if fmt.format_info().short_name == "isomp4" {
            if let Some(edit) = mp4_edit::read_audio_edit(path, sample_rate) {
                num_frames = Some(edit.playable_frames(num_frames, None));
            }
        }
        Ok(AudioInfo {
            sample_rate,
            channels: params.channels.as_ref().map_or(0, |c| c.count() as u16),
            num_frames,
            codec,
        })
    })
}

/// Runs `work` on `path`, turning its error text, or a panic inside symphonia or libopus,
/// into an [`AudioError::Decode`] that names the file.
fn guarded<T>(path: &Path, work: impl FnOnce() -> Result<T, String>) -> Result<T, AudioError> {
    let reason = match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(reason)) => reason,
        Err(panic) => format!("decoder panicked: {}", panic_text(panic.as_ref())),
    };
    Err(AudioError::Decode {
        path: path.to_path_buf(),
        reason,
    })
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

fn open_format(input: AudioInput<'_>) -> Result<Box<dyn FormatReader + '_>, String> {
    let source: Box<dyn symphonia::core::io::MediaSource + '_> = match input {
        AudioInput::File(path) => {
            let file =
                crate::regular_file::open_regular(path).map_err(|e| format!("cannot open: {e}"))?;
            let len = file
                .metadata()
                .map_err(|e| format!("cannot stat: {e}"))?
                .len();
            if len == 0 {
                return Err("empty file (0 bytes)".into());
            }
            Box::new(file)
        }
        AudioInput::Bytes { bytes: [], .. } => return Err("empty audio bytes (0 bytes)".into()),
        AudioInput::Bytes { bytes, .. } => Box::new(std::io::Cursor::new(bytes)),
    };
    let mss = MediaSourceStream::new(source, MediaSourceStreamOptions::default());
    let mut hint = Hint::new();
    if let Some(ext) = input.name().extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymError::Unsupported(what) if what.contains("no suitable format reader") => {
                "not a recognised audio format (no known container or codec signature)".to_string()
            }
            // e.g. "isomp4: missing moov atom": an MP4 cut before its index at the end.
            SymError::Unsupported(what) if what.contains("missing") => {
                format!("truncated or damaged container ({what})")
            }
            SymError::Unsupported(what) => format!("unsupported format or codec ({what})"),
            SymError::IoError(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                match sniff_container(input) {
                    Some(kind) => format!(
                        "truncated: the {kind} file ends before its header or index is complete \
                         (unexpected end of file)"
                    ),
                    None => "not a recognised audio format (unexpected end of file while probing)"
                        .to_string(),
                }
            }
            other => format!("damaged or unreadable container ({other})"),
        })
}

/// Names the container from its magic bytes, to word a probe failure; None if unknown.
fn sniff_container(input: AudioInput<'_>) -> Option<&'static str> {
    use std::io::Read;
    let mut buf = [0u8; 12];
    let head = match input {
        AudioInput::File(path) => {
            let n = crate::regular_file::open_regular(path)
                .ok()?
                .read(&mut buf)
                .ok()?;
            &buf[..n]
        }
        AudioInput::Bytes { bytes, .. } => &bytes[..bytes.len().min(12)],
    };
    if head.starts_with(b"OggS") {
        Some("Ogg")
    } else if head.starts_with(b"fLaC") {
        Some("FLAC")
    } else if head.starts_with(b"RIFF") || head.starts_with(b"RF64") {
        Some("WAV")
    } else if head.get(4..8) == Some(b"ftyp") {
        Some("MP4")
    } else if head.starts_with(b"ID3") || (head.len() >= 2 && head[0] == 0xFF && head[1] >= 0xE0) {
        Some("MP3")
    } else {
        None
    }
}

fn audio_track(fmt: &dyn FormatReader) -> Result<(Track, AudioCodecParameters), String> {
    let track = fmt
        .default_track(TrackType::Audio)
        .ok_or_else(|| "no audio track".to_string())?;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| "the audio track has no codec parameters".to_string())?
        .clone();
    Ok((track.clone(), params))
}

/// Codec name as ffmpeg-like short text ("flac", "mp3", "pcm_s16le", "opus", ...).
fn codec_name(id: AudioCodecId) -> String {
    if id == CODEC_ID_OPUS {
        return "opus".into();
    }
    match symphonia::default::get_codecs().get_audio_decoder(id) {
        Some(reg) => reg.codec.info.short_name.to_string(),
        None => format!("unknown codec {id}"),
    }
}

fn decode_collect(input: AudioInput<'_>, channels: Option<&[usize]>) -> Result<Collected, String> {
    let mut fmt = open_format(input)?;
    let (track, params) = audio_track(fmt.as_ref())?;
    if params.codec == CODEC_ID_OPUS {
        if channels.is_some() {
            return Err("choosing channels of an Opus stream is not supported".into());
        }
        return ogg_opus::decode(fmt.as_mut(), &track, &params);
    }
    let mut collected = decode_packets(fmt.as_mut(), &track, &params, channels)?;
    // The edit list is read from the file; MP4 bytes in memory keep the encoder delay.
    if let (AudioInput::File(path), "isomp4") = (input, fmt.format_info().short_name) {
        apply_mp4_edit(path, &mut collected);
    }
    Ok(collected)
}

fn decode_packets(
    fmt: &mut dyn FormatReader,
    track: &Track,
    params: &AudioCodecParameters,
    keep: Option<&[usize]>,
) -> Result<Collected, String> {
    let codec = codec_name(params.codec);
    // No FLAC MD5 verification: it costs ~40 % of FLAC decode time, and the damage it would
    // catch is already caught: frames failing their CRC are dropped by the demuxer, which
    // the length check then reports.
    let dec_opts = AudioDecoderOptions::default();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(params, &dec_opts)
        .map_err(|e| match e {
            SymError::Unsupported(_) => format!("unsupported codec ({codec})"),
            other => format!("cannot start the {codec} decoder: {other}"),
        })?;
    let sample_rate = params
        .sample_rate
        .ok_or_else(|| "the stream does not state its sample rate".to_string())?;
    super::check_source_rate(sample_rate)?;
    let max_packet_frames = params.max_frames_per_packet.unwrap_or(0);
    let declared = track.num_frames;
    let mut samples: Vec<f32> = Vec::with_capacity(reserve_frames(declared, max_packet_frames));
    let mut channels = params.channels.as_ref().map_or(0, |c| c.count() as u16);
    let mut reader = PacketReader::default();
    let mut last_packet_end = None;
    let ts_counts_frames = track
        .time_base
        .is_none_or(|tb| tb.numer.get() == 1 && tb.denom.get() == sample_rate);
    while let Some(packet) = reader.next(fmt, track.id) {
        match decoder.decode(&packet) {
            Ok(buf) => {
                if channels == 0 {
                    channels = buf.num_planes() as u16;
                }
                if let Some(&missing) = keep
                    .unwrap_or_default()
                    .iter()
                    .find(|&&c| c >= buf.num_planes())
                {
                    return Err(format!(
                        "channel {missing} was asked for, but the stream has {} channel{} (0-based)",
                        buf.num_planes(),
                        if buf.num_planes() == 1 { "" } else { "s" }
                    ));
                }
                append_mono(&buf, &mut samples, keep);
                if ts_counts_frames {
                    let end = packet.pts.get().saturating_add_unsigned(packet.dur.get());
                    last_packet_end = Some(end.max(0) as u64);
                }
            }
            Err(e) => reader.count_corrupt(&e),
        }
    }
    // A PCM stream of unknown length (a WAV written to a pipe: data size 0 or 0xFFFFFFFF)
    // always ends in an unexpected EOF; all its samples were read, so that is its normal end.
    if declared.is_none() && reader.stream_hit_eof && codec.starts_with("pcm_") {
        reader.stream_error = None;
    }
    Ok(Collected {
        samples,
        sample_rate,
        channels,
        codec,
        declared,
        max_packet_frames,
        corrupt_packets: reader.corrupt_packets,
        first_corrupt: reader.first_corrupt,
        stream_error: reader.stream_error,
        last_packet_end,
    })
}

/// Frames to reserve up front: the declared length plus a packet, so the output Vec never
/// reallocates; capped so a damaged header cannot ask for gigabytes (longer audio still fits,
/// the Vec just grows).
pub(super) fn reserve_frames(declared: Option<u64>, slack: u64) -> usize {
    const MAX_RESERVE_FRAMES: u64 = 1 << 26;
    declared
        .unwrap_or(0)
        .saturating_add(slack)
        .min(MAX_RESERVE_FRAMES) as usize
}

/// Reads a track's packets and keeps the damage accounts both decoders (symphonia, libopus)
/// share: corrupt packets are counted and skipped, an I/O error ends the stream.
#[derive(Default)]
pub(super) struct PacketReader {
    pub corrupt_packets: u64,
    pub first_corrupt: Option<String>,
    /// Why reading stopped before a clean end of stream.
    pub stream_error: Option<String>,
    /// The stream error was an unexpected end of file.
    pub stream_hit_eof: bool,
    errors_in_a_row: u32,
}

impl PacketReader {
    /// A demuxer that fails this many times in a row is not going to resynchronise.
    const MAX_ERRORS_IN_A_ROW: u32 = 64;

    /// The next packet of `track_id`; None at the end of the stream, clean or not.
    pub fn next(&mut self, fmt: &mut dyn FormatReader, track_id: u32) -> Option<Packet> {
        loop {
            match fmt.next_packet() {
                Ok(Some(packet)) => {
                    self.errors_in_a_row = 0;
                    if packet.track_id == track_id {
                        return Some(packet);
                    }
                }
                Ok(None) => return None,
                Err(SymError::IoError(e)) => {
                    self.stream_hit_eof = e.kind() == std::io::ErrorKind::UnexpectedEof;
                    self.stream_error = Some(e.to_string());
                    return None;
                }
                Err(SymError::ResetRequired) => {
                    self.stream_error = Some("the stream changes its parameters mid-file".into());
                    return None;
                }
                Err(e) => {
                    // A demuxer error (bad CRC, lost sync) usually resyncs at the next packet.
                    self.count_corrupt(&e);
                    self.errors_in_a_row += 1;
                    if self.errors_in_a_row > Self::MAX_ERRORS_IN_A_ROW {
                        self.stream_error = Some(format!("the demuxer cannot resynchronise ({e})"));
                        return None;
                    }
                }
            }
        }
    }

    pub fn count_corrupt(&mut self, error: &dyn std::fmt::Display) {
        self.corrupt_packets += 1;
        if self.first_corrupt.is_none() {
            self.first_corrupt = Some(error.to_string());
        }
    }
}

/// Drops the encoder delay (AAC priming) and end padding that an MP4 edit list marks, which
/// symphonia 0.6 does not apply; the declared length becomes the edit's length.
fn apply_mp4_edit(path: &Path, c: &mut Collected) {
    let Some(edit) = mp4_edit::read_audio_edit(path, c.sample_rate) else {
        return;
    };
    let skip = edit.skip_frames;
    // symphonia's num_frames is the sum of sample durations (priming included); when it agrees
    // with the edit's (coarser, movie-timescale) length, it gives the exact sample count.
    let keep = match (c.declared, edit.keep_frames) {
        (Some(n), Some(k)) if n > skip && (n - skip).abs_diff(k) <= edit.rounding_frames => {
            n - skip
        }
        (_, Some(k)) => k,
        (Some(n), None) => n.saturating_sub(skip),
        (None, None) => (c.samples.len() as u64).saturating_sub(skip),
    };
    let skip = (skip as usize).min(c.samples.len());
    c.samples.drain(..skip);
    c.samples.truncate(keep as usize);
    c.declared = Some(keep);
}

/// Averages the channels of one decoded buffer (or the `keep` ones) onto the end of `out`.
fn append_mono(buf: &GenericAudioBufferRef<'_>, out: &mut Vec<f32>, keep: Option<&[usize]>) {
    match buf {
        GenericAudioBufferRef::U8(b) => mix(b, out, keep),
        GenericAudioBufferRef::U16(b) => mix(b, out, keep),
        GenericAudioBufferRef::U24(b) => mix(b, out, keep),
        GenericAudioBufferRef::U32(b) => mix(b, out, keep),
        GenericAudioBufferRef::S8(b) => mix(b, out, keep),
        GenericAudioBufferRef::S16(b) => mix(b, out, keep),
        GenericAudioBufferRef::S24(b) => mix(b, out, keep),
        GenericAudioBufferRef::S32(b) => mix(b, out, keep),
        GenericAudioBufferRef::F32(b) => mix(b, out, keep),
        GenericAudioBufferRef::F64(b) => mix(b, out, keep),
    }
}

fn mix<S>(buf: &AudioBuffer<S>, out: &mut Vec<f32>, keep: Option<&[usize]>)
where
    S: Sample,
    f32: FromSample<S>,
{
    match keep {
        Some(channels) => mix_selected(buf, out, channels),
        None => mix_down(buf, out),
    }
}

/// Averages the listed planes (all present: the caller checked) onto the end of `out`.
fn mix_selected<S>(buf: &AudioBuffer<S>, out: &mut Vec<f32>, channels: &[usize])
where
    S: Sample,
    f32: FromSample<S>,
{
    let start = out.len();
    out.resize(start + buf.frames(), 0.0);
    for &c in channels {
        if let Some(plane) = buf.plane(c) {
            for (o, &s) in out[start..].iter_mut().zip(plane) {
                *o += f32::from_sample(s);
            }
        }
    }
    if channels.len() > 1 {
        let scale = 1.0 / channels.len() as f32;
        for o in &mut out[start..] {
            *o *= scale;
        }
    }
}

fn mix_down<S>(buf: &AudioBuffer<S>, out: &mut Vec<f32>)
where
    S: Sample,
    f32: FromSample<S>,
{
    let planes = buf.num_planes();
    if planes == 0 || buf.frames() == 0 {
        return;
    }
    if planes == 2 {
        if let Some((l, r)) = buf.plane_pair(0, 1) {
            out.extend(
                l.iter()
                    .zip(r)
                    .map(|(&a, &b)| (f32::from_sample(a) + f32::from_sample(b)) * 0.5),
            );
        }
        return;
    }
    let start = out.len();
    if let Some(first) = buf.plane(0) {
        out.extend(first.iter().map(|&s| f32::from_sample(s)));
    }
    for idx in 1..planes {
        if let Some(plane) = buf.plane(idx) {
            for (o, &s) in out[start..].iter_mut().zip(plane) {
                *o += f32::from_sample(s);
            }
        }
    }
    if planes > 1 {
        let scale = 1.0 / planes as f32;
        for o in &mut out[start..] {
            *o *= scale;
        }
    }
}

/// Turns a decode pass into audio, or into the reason the file is damaged.
pub(super) fn judge(c: Collected, opts: DecodeOptions) -> Result<DecodedAudio, String> {
    let rate = f64::from(c.sample_rate.max(1));
    let secs = |frames: u64| frames as f64 / rate;
    let got = c.samples.len() as u64;
    // Legit files differ from their header by at most a packet of codec padding; damage
    // (a lost FLAC frame, a cut MP3) loses far more than 0.1 s or two packets.
    let tolerance = (u64::from(c.sample_rate) / 10).max(2 * c.max_packet_frames);
    let mut reasons = Vec::new();
    match c.declared {
        Some(declared) if got + tolerance < declared => {
            // The last packet ends where the header says the stream ends: the audio went
            // missing inside the stream (a corrupt frame the decoder skipped), not at its end.
            // So is a stream that ended cleanly after packets failed to decode.
            let end_reached = c
                .last_packet_end
                .is_some_and(|end| end + tolerance >= declared)
                || (c.stream_error.is_none() && c.corrupt_packets > 0);
            reasons.push(format!(
                "{}: decoded {:.2} s of {:.2} s declared",
                if end_reached { "corrupt" } else { "truncated" },
                secs(got),
                secs(declared)
            ))
        }
        Some(declared) if got > declared + tolerance => reasons.push(format!(
            "length mismatch: decoded {:.2} s but the header declares {:.2} s",
            secs(got),
            secs(declared)
        )),
        // A read error after the declared length was reached cut nothing that mattered.
        Some(_) => {}
        None => {
            if let Some(err) = &c.stream_error {
                reasons.push(format!(
                    "truncated: the stream ends early after {:.2} s ({err})",
                    secs(got)
                ));
            }
        }
    }
    if c.corrupt_packets > 0 {
        reasons.push(format!(
            "{} corrupt packet{} (first: {})",
            c.corrupt_packets,
            if c.corrupt_packets == 1 { "" } else { "s" },
            c.first_corrupt.as_deref().unwrap_or("decode error")
        ));
    }
    if c.samples.is_empty() {
        let mut reason = String::from("no audio: the stream holds zero samples");
        if !reasons.is_empty() {
            reason = format!("{reason} ({})", reasons.join("; "));
        }
        return Err(reason);
    }
    let damage = if reasons.is_empty() {
        None
    } else if opts.keep_damaged {
        Some(reasons.join("; "))
    } else {
        return Err(reasons.join("; "));
    };
    Ok(DecodedAudio {
        samples: c.samples,
        sample_rate: c.sample_rate,
        channels: c.channels,
        codec: c.codec,
        damage,
    })
}
