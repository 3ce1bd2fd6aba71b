//! Ogg Opus: symphonia's Ogg demuxer hands out the packets, libopus (the `opus` crate) decodes
//! them at 48 kHz. Pre-skip comes from the OpusHead; the end trim comes from the demuxer, which
//! marks the samples past the final granule position in the last packet's `trim_end`.
use symphonia::core::codecs::audio::AudioCodecParameters;
use symphonia::core::formats::{FormatReader, Track};

use super::decode::{reserve_frames, AudioInfo, Collected, PacketReader};

/// Opus always decodes at 48 kHz (RFC 7845 §4: the granule position counts 48 kHz samples).
const OPUS_RATE: u32 = 48_000;
/// The longest Opus packet: 120 ms at 48 kHz.
const MAX_PACKET_FRAMES: usize = 5_760;

/// The fields of the OpusHead identification header (RFC 7845 §5.1) that decoding needs.
struct OpusHead {
    channels: u8,
    pre_skip: u16,
    /// Output gain in Q7.8 dB, applied by the decoder.
    gain: i16,
    mapping_family: u8,
}

fn parse_head(params: &AudioCodecParameters) -> Result<OpusHead, String> {
    let head = params
        .extra_data
        .as_deref()
        .filter(|h| h.len() >= 19 && h.starts_with(b"OpusHead"))
        .ok_or_else(|| "Opus stream without a valid OpusHead header".to_string())?;
    Ok(OpusHead {
        channels: head[9],
        pre_skip: u16::from_le_bytes([head[10], head[11]]),
        gain: i16::from_le_bytes([head[16], head[17]]),
        mapping_family: head[18],
    })
}

/// Playable length: the final granule position (symphonia's num_frames) less the pre-skip.
fn playable_frames(track: &Track, head: &OpusHead) -> Option<u64> {
    track
        .num_frames
        .map(|n| n.saturating_sub(u64::from(head.pre_skip)))
}

pub(super) fn info(track: &Track, params: &AudioCodecParameters) -> Result<AudioInfo, String> {
    let head = parse_head(params)?;
    Ok(AudioInfo {
        sample_rate: OPUS_RATE,
        channels: u16::from(head.channels),
        num_frames: playable_frames(track, &head),
        codec: "opus".into(),
    })
}

pub(super) fn decode(
    fmt: &mut dyn FormatReader,
    track: &Track,
    params: &AudioCodecParameters,
) -> Result<Collected, String> {
    let head = parse_head(params)?;
    let channels = match (head.mapping_family, head.channels) {
        (0, 1) => opus::Channels::Mono,
        (0, 2) => opus::Channels::Stereo,
        (family, n) => {
            return Err(format!(
                "unsupported codec (multichannel Opus: {n} channels, mapping family {family})"
            ))
        }
    };
    let n_ch = usize::from(head.channels);
    let mut decoder = opus::Decoder::new(OPUS_RATE, channels)
        .map_err(|e| format!("cannot start the opus decoder: {e}"))?;
    if head.gain != 0 {
        decoder
            .set_gain(i32::from(head.gain))
            .map_err(|e| format!("cannot set the Opus output gain: {e}"))?;
    }
    let declared = playable_frames(track, &head);
    let pre_skip = usize::from(head.pre_skip);
    let slack = u64::from(head.pre_skip) + MAX_PACKET_FRAMES as u64;
    let mut samples: Vec<f32> = Vec::with_capacity(reserve_frames(declared, slack));
    let mut pcm = vec![0f32; MAX_PACKET_FRAMES * n_ch];
    let mut reader = PacketReader::default();
    let mut last_packet_end = None;
    while let Some(packet) = reader.next(fmt, track.id) {
        let frames = match decoder.decode_float(&packet.data, &mut pcm, false) {
            Ok(frames) => frames,
            Err(e) => {
                reader.count_corrupt(&e);
                continue;
            }
        };
        // Ogg Opus timestamps count 48 kHz frames from the start of the pre-skip.
        let end = packet.pts.get().saturating_add_unsigned(packet.dur.get());
        last_packet_end = Some((end.max(0) as u64).saturating_sub(u64::from(head.pre_skip)));
        let start = (packet.trim_start.get() as usize).min(frames);
        let end = frames - (packet.trim_end.get() as usize).min(frames - start);
        let pcm = &pcm[start * n_ch..end * n_ch];
        if n_ch == 2 {
            samples.extend(pcm.chunks_exact(2).map(|lr| (lr[0] + lr[1]) * 0.5));
        } else {
            samples.extend_from_slice(pcm);
        }
    }
    // Pre-skip is decoder warm-up output, not audio (RFC 7845 §4.2).
    let skip = pre_skip.min(samples.len());
    samples.drain(..skip);
    Ok(Collected {
        samples,
        sample_rate: OPUS_RATE,
        channels: u16::from(head.channels),
        codec: "opus".into(),
        declared,
        // The final granule position makes the length exact; 0.1 s is tolerance enough.
        max_packet_frames: 0,
        corrupt_packets: reader.corrupt_packets,
        first_corrupt: reader.first_corrupt,
        stream_error: reader.stream_error,
        last_packet_end,
    })
}
