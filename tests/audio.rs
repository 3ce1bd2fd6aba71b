//! Audio decoding, resampling and speed perturbation against independent truth: the lengths,
//! rates and channel counts the encoders were asked for in
//! tests/fixtures/audio/make_audio_fixtures.sh, the tone frequency sox synthesised, and the
//! source WAV (parsed here, not by the code under test) for speech and the 6-channel mean.
use std::f64::consts::PI;
use std::path::PathBuf;

use speechcache::audio::{
    decode_file, probe_info, resample_to, speed_perturb, AudioError, DecodeOptions, DecodedAudio,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name)
}

fn decode(name: &str) -> DecodedAudio {
    match decode_file(&fixture(name), DecodeOptions::default()) {
        Ok(a) => a,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn decode_err(name: &str) -> String {
    match decode_file(&fixture(name), DecodeOptions::default()) {
        Ok(a) => panic!(
            "{name}: expected an error, decoded {} samples (damage {:?})",
            a.samples.len(),
            a.damage
        ),
        Err(e @ AudioError::Decode { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(name), "error names the file: {msg}");
            msg
        }
        Err(e) => panic!("{name}: wrong error kind {e}"),
    }
}

/// Least-squares fit of `a sin + b cos + c` at `freq` over `x[skip..len-skip]`:
/// returns (amplitude, SNR in dB of the fit against the residual).
fn tone_fit(x: &[f32], rate: f64, freq: f64, skip: usize) -> (f64, f64) {
    assert!(x.len() > 2 * skip + 16, "signal too short for a fit");
    let seg = &x[skip..x.len() - skip];
    let w = 2.0 * PI * freq / rate;
    // Normal equations for the 3 basis functions.
    let mut ata = [[0f64; 3]; 3];
    let mut aty = [0f64; 3];
    for (i, &y) in seg.iter().enumerate() {
        let t = (i + skip) as f64;
        let basis = [(w * t).sin(), (w * t).cos(), 1.0];
        for r in 0..3 {
            aty[r] += basis[r] * f64::from(y);
            for (cell, b) in ata[r].iter_mut().zip(basis) {
                *cell += basis[r] * b;
            }
        }
    }
    let coef = solve3(ata, aty);
    let mut sig = 0f64;
    let mut res = 0f64;
    for (i, &y) in seg.iter().enumerate() {
        let t = (i + skip) as f64;
        let fit = coef[0] * (w * t).sin() + coef[1] * (w * t).cos() + coef[2];
        sig += fit * fit;
        res += (f64::from(y) - fit).powi(2);
    }
    let amp = (coef[0].powi(2) + coef[1].powi(2)).sqrt();
    (amp, 10.0 * (sig / res.max(1e-300)).log10())
}

fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> [f64; 3] {
    for col in 0..3 {
        let piv = (col..3)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, piv);
        b.swap(col, piv);
        for row in 0..3 {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col];
                for (x, p) in a[row].iter_mut().zip(pivot_row) {
                    *x -= f * p;
                }
                b[row] -= f * b[col];
            }
        }
    }
    [b[0] / a[0][0], b[1] / a[1][1], b[2] / a[2][2]]
}

/// Minimal PCM s16 WAV reader (walks RIFF chunks), independent of the code under test:
/// returns (rate, channels, interleaved samples scaled to [-1, 1)).
fn read_wav_s16(name: &str) -> (u32, usize, Vec<f32>) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    assert_eq!(&bytes[0..4], b"RIFF");
    let mut pos = 12;
    let (mut rate, mut channels, mut data) = (0u32, 0usize, Vec::new());
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let body = &bytes[pos + 8..(pos + 8 + len).min(bytes.len())];
        if id == b"fmt " {
            channels = u16::from_le_bytes([body[2], body[3]]) as usize;
            rate = u32::from_le_bytes(body[4..8].try_into().unwrap());
            assert_eq!(u16::from_le_bytes([body[14], body[15]]), 16, "s16 only");
        } else if id == b"data" {
            data = body
                .chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                .collect();
        }
        pos += 8 + len + (len & 1);
    }
    (rate, channels, data)
}

/// Normalised cross-correlation of `a` and `b` shifted by `lag` (b[i + lag] against a[i]).
fn correlation(a: &[f32], b: &[f32], lag: isize) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (i, &x) in a.iter().enumerate() {
        let j = i as isize + lag;
        if j < 0 || j as usize >= b.len() {
            continue;
        }
        let y = b[j as usize];
        ab += f64::from(x) * f64::from(y);
        aa += f64::from(x) * f64::from(x);
        bb += f64::from(y) * f64::from(y);
    }
    ab / (aa * bb).sqrt().max(1e-300)
}

/// (best lag in -max..=max, correlation at lag 0)
fn best_lag(reference: &[f32], x: &[f32], max: isize) -> (isize, f64) {
    let best = (-max..=max)
        .max_by(|&l, &m| correlation(reference, x, l).total_cmp(&correlation(reference, x, m)))
        .unwrap();
    (best, correlation(reference, x, 0))
}

struct Expect {
    name: &'static str,
    codec: &'static str,
    rate: u32,
    channels: u16,
    frames: usize,
    /// Minimum SNR of a 1 kHz fit (None: speech, checked against the source instead).
    tone_snr_db: Option<f64>,
}

const TONE_AMP: f64 = 0.5;

fn check(e: &Expect) {
    let a = decode(e.name);
    println!(
        "{:28} codec {:10} rate {:6} ch {} frames {:6} damage {:?}",
        e.name,
        a.codec,
        a.sample_rate,
        a.channels,
        a.samples.len(),
        a.damage
    );
    assert_eq!(a.codec, e.codec, "{}", e.name);
    assert_eq!(a.sample_rate, e.rate, "{}", e.name);
    assert_eq!(a.channels, e.channels, "{}", e.name);
    assert_eq!(a.samples.len(), e.frames, "{}: length", e.name);
    assert!(a.damage.is_none());
    if let Some(min_snr) = e.tone_snr_db {
        let (amp, snr) = tone_fit(&a.samples, f64::from(a.sample_rate), 1000.0, 256);
        println!("    1 kHz fit: amplitude {amp:.4}, SNR {snr:.1} dB");
        assert!((amp - TONE_AMP).abs() < 0.03, "{}: amplitude {amp}", e.name);
        assert!(snr > min_snr, "{}: SNR {snr:.1} dB < {min_snr}", e.name);
    }
    let info = probe_info(&fixture(e.name)).unwrap();
    assert_eq!(info.sample_rate, e.rate);
    assert_eq!(info.channels, e.channels);
    assert_eq!(info.codec, e.codec);
    let declared = (!e.name.contains("unknown_length")).then_some(e.frames as u64);
    assert_eq!(info.num_frames, declared, "{}: declared length", e.name);
}

#[test]
fn wav_every_sample_format() {
    // sox synth lengths: 0.5 s at 16k = 8000, 0.25 s at 22.05k = 5512 (sox rounds half to even).
    for e in [
        Expect {
            name: "wav_s16_16k_mono.wav",
            codec: "pcm_s16le",
            rate: 16000,
            channels: 1,
            frames: 8000,
            tone_snr_db: Some(80.0),
        },
        Expect {
            name: "wav_u8_8k_mono.wav",
            codec: "pcm_u8",
            rate: 8000,
            channels: 1,
            frames: 4000,
            tone_snr_db: Some(35.0),
        },
        Expect {
            name: "wav_s24_22k_stereo.wav",
            codec: "pcm_s24le",
            rate: 22050,
            channels: 2,
            frames: 5512,
            tone_snr_db: Some(120.0),
        },
        Expect {
            name: "wav_s32_8k_mono.wav",
            codec: "pcm_s32le",
            rate: 8000,
            channels: 1,
            frames: 4000,
            tone_snr_db: Some(120.0),
        },
        Expect {
            name: "wav_f32_16k_mono.wav",
            codec: "pcm_f32le",
            rate: 16000,
            channels: 1,
            frames: 4000,
            tone_snr_db: Some(120.0),
        },
        // Length unknown to the header (streamed WAV): runs to the end of the file, no damage.
        Expect {
            name: "wav_piped_unknown_length.wav",
            codec: "pcm_s16le",
            rate: 16000,
            channels: 1,
            frames: 4000,
            tone_snr_db: Some(80.0),
        },
        Expect {
            name: "wav_f64_8k_mono.wav",
            codec: "pcm_f64le",
            rate: 8000,
            channels: 1,
            frames: 4000,
            tone_snr_db: Some(120.0),
        },
    ] {
        check(&e);
    }
}

#[test]
fn six_channel_wav_downmix_is_the_mean() {
    let a = decode("wav_s16_8k_6ch.wav");
    let (rate, ch, interleaved) = read_wav_s16("wav_s16_8k_6ch.wav");
    assert_eq!((a.sample_rate, a.channels as usize), (rate, ch));
    assert_eq!(ch, 6);
    assert_eq!(a.samples.len(), 2000);
    assert_eq!(interleaved.len(), 2000 * 6);
    let max_err = interleaved
        .chunks_exact(6)
        .zip(&a.samples)
        .map(|(frame, &m)| (frame.iter().sum::<f32>() / 6.0 - m).abs())
        .fold(0f32, f32::max);
    assert!(
        max_err < 1e-6,
        "downmix differs from the channel mean by {max_err}"
    );
}

#[test]
fn lossless_and_lossy_codecs_decode_tones() {
    for e in [
        Expect {
            name: "tone_44k_stereo_24bit.flac",
            codec: "flac",
            rate: 44100,
            channels: 2,
            frames: 11025,
            tone_snr_db: Some(120.0),
        },
        Expect {
            name: "tone_22k_mono_alac.m4a",
            codec: "alac",
            rate: 22050,
            channels: 1,
            frames: 11025,
            tone_snr_db: Some(80.0),
        },
        Expect {
            name: "tone_44k_stereo.mp3",
            codec: "mp3",
            rate: 44100,
            channels: 2,
            frames: 22050,
            tone_snr_db: Some(25.0),
        },
        Expect {
            name: "tone_22k_stereo.ogg",
            codec: "vorbis",
            rate: 22050,
            channels: 2,
            frames: 16538,
            tone_snr_db: Some(25.0),
        },
        Expect {
            name: "tone_48k_stereo.m4a",
            codec: "aac",
            rate: 48000,
            channels: 2,
            frames: 24000,
            tone_snr_db: Some(25.0),
        },
        // Opus decodes at 48 kHz whatever the input rate: 1 s at 8 kHz = 48000 frames.
        Expect {
            name: "tone_8k_mono.opus",
            codec: "opus",
            rate: 48000,
            channels: 1,
            frames: 48000,
            tone_snr_db: Some(25.0),
        },
        Expect {
            name: "tone_48k_stereo.opus",
            codec: "opus",
            rate: 48000,
            channels: 2,
            frames: 24000,
            tone_snr_db: Some(25.0),
        },
        // A FLAC file named .wav: content decides.
        Expect {
            name: "flac_named.wav",
            codec: "flac",
            rate: 16000,
            channels: 1,
            frames: 8000,
            tone_snr_db: Some(80.0),
        },
    ] {
        check(&e);
    }
}

#[test]
fn speech_in_every_codec_matches_the_source() {
    let (rate, ch, source) = read_wav_s16("speech_16k.wav");
    assert_eq!((rate, ch, source.len()), (16000, 1, 16000));
    // (file, codec, minimum correlation with the source at lag 0)
    for (name, codec, min_corr) in [
        ("speech_16k.wav", "pcm_s16le", 0.999_999),
        ("speech_16k.flac", "flac", 0.999_999),
        ("speech_16k.mp3", "mp3", 0.9),
        ("speech_16k.ogg", "vorbis", 0.9),
        ("speech_16k.m4a", "aac", 0.9),
        ("speech_16k.opus", "opus", 0.9),
    ] {
        let a = decode(name);
        assert_eq!(a.codec, codec);
        assert_eq!(a.channels, 1);
        let samples = if a.sample_rate == 16000 {
            a.samples
        } else {
            assert_eq!((codec, a.sample_rate), ("opus", 48000));
            assert_eq!(a.samples.len(), 48000, "{name}: 1 s at 48 kHz");
            resample_to(&a.samples, 48000, 16000).unwrap()
        };
        assert_eq!(samples.len(), 16000, "{name}: 1 s at 16 kHz");
        // Aligned: the best lag is 0 (encoder delay and priming removed), and the shapes agree.
        let (lag, corr) = best_lag(&source, &samples, 64);
        println!("{name:20} lag {lag:3} correlation {corr:.6}");
        assert!(lag.abs() <= 1, "{name}: misaligned by {lag} samples");
        assert!(corr >= min_corr, "{name}: correlation {corr}");
    }
}

#[test]
fn damaged_files_fail_with_reasons() {
    let corrupt = decode_err("corrupt.flac");
    println!("{corrupt}");
    assert!(corrupt.contains("corrupt: decoded"), "{corrupt}");
    let mp3 = decode_err("corrupt.mp3");
    println!("{mp3}");
    assert!(mp3.contains("2 corrupt packets"), "{mp3}");
    let truncated = decode_err("truncated.flac");
    println!("{truncated}");
    assert!(truncated.contains("truncated"), "{truncated}");
    let mp3 = decode_err("truncated.mp3");
    println!("{mp3}");
    assert!(mp3.contains("truncated: decoded"), "{mp3}");
    assert!(mp3.contains("of 2.00 s declared"), "{mp3}");
    // symphonia's Ogg reader reads the last pages when it opens a file, so a cut or corrupt
    // Ogg Opus file fails at open (nothing to keep).
    let opus = decode_err("truncated.opus");
    println!("{opus}");
    assert!(opus.contains("truncated: the Ogg file ends"), "{opus}");
    let opus = decode_err("corrupt.opus");
    println!("{opus}");
    assert!(opus.contains("crc mismatch"), "{opus}");
}

#[test]
fn keep_damaged_keeps_the_decodable_part() {
    let keep = DecodeOptions { keep_damaged: true };
    for (name, max_s) in [
        ("truncated.flac", 1.5),
        ("truncated.mp3", 1.5),
        ("corrupt.flac", 2.0),
    ] {
        let a = decode_file(&fixture(name), keep).unwrap();
        println!(
            "{name}: kept {:.2} s, damage {:?}",
            a.duration_s(),
            a.damage
        );
        assert!(a.damage.is_some(), "{name}");
        assert!(a.duration_s() > 0.4 && a.duration_s() < max_s, "{name}");
        assert_eq!(a.sample_rate, 8000);
    }
}

#[test]
fn invalid_inputs_fail_with_reasons() {
    for (name, needle) in [
        ("empty.wav", "empty file"),
        ("not_audio.txt", "not a recognised audio format"),
        ("zero_length.wav", "no audio"),
        ("unsupported_gsm.wav", "unsupported"),
    ] {
        let msg = decode_err(name);
        println!("{msg}");
        assert!(msg.contains(needle), "{msg}");
    }
    let missing = decode_file(&fixture("no_such_file.wav"), DecodeOptions::default());
    assert!(missing.unwrap_err().to_string().contains("cannot open"));
}

/// Every fixture cut at 12 points and overwritten with random bytes at 12 seeds: decoding
/// and probing must return (audio or an error), never panic or hang.
#[test]
fn damaged_variants_never_panic() {
    let dir = fixture("");
    let tmp = tempfile::tempdir().unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    let mut cases = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().unwrap().to_str().unwrap().to_string();
        let data = std::fs::read(&path).unwrap();
        if ext == "sh" || data.is_empty() {
            continue;
        }
        for k in 0..24 {
            let mut bytes = data.clone();
            if k < 12 {
                bytes.truncate(data.len() * k / 12);
            } else {
                for _ in 0..1 + k % 4 {
                    let at = rnd() % bytes.len();
                    let end = (at + 1 + rnd() % 64).min(bytes.len());
                    bytes[at..end].iter_mut().for_each(|b| *b = rnd() as u8);
                }
            }
            let variant = tmp.path().join(format!("v{cases}.{ext}"));
            std::fs::write(&variant, &bytes).unwrap();
            cases += 1;
            for result in [
                decode_file(&variant, DecodeOptions { keep_damaged: true }).map(|_| ()),
                probe_info(&variant).map(|_| ()),
            ] {
                if let Err(e) = result {
                    assert!(
                        !e.to_string().contains("panicked"),
                        "{}: {e}",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(cases > 500);
}

fn sine(rate: u32, freq: f64, secs: f64) -> Vec<f32> {
    let n = (f64::from(rate) * secs) as usize;
    (0..n)
        .map(|i| (TONE_AMP * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()) as f32)
        .collect()
}

fn rms_db(x: &[f32]) -> f64 {
    let p = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64;
    10.0 * p.max(1e-300).log10()
}

#[test]
fn resampler_keeps_in_band_tones_and_removes_aliases() {
    for from in [44_100u32, 48_000, 22_050, 8_000, 32_000] {
        let x = sine(from, 1000.0, 2.0);
        let y = resample_to(&x, from, 16_000).unwrap();
        assert_eq!(
            y.len(),
            (x.len() as u64 * 16_000).div_ceil(u64::from(from)) as usize
        );
        let (amp, snr) = tone_fit(&y, 16_000.0, 1000.0, 1600);
        println!("1 kHz {from} -> 16000: amplitude {amp:.6}, SNR {snr:.1} dB");
        assert!((amp - TONE_AMP).abs() < 1e-3, "{from}: amplitude {amp}");
        assert!(snr >= 100.0, "{from}: SNR {snr:.1} dB");
    }
    for (from, freq) in [(48_000u32, 9_500.0), (44_100, 9_500.0), (22_050, 10_000.0)] {
        let x = sine(from, freq, 2.0);
        let y = resample_to(&x, from, 16_000).unwrap();
        let attenuation = rms_db(&x) - rms_db(&y[1600..y.len() - 1600]);
        println!("{freq} Hz {from} -> 16000: attenuated by {attenuation:.1} dB");
        assert!(
            attenuation >= 100.0,
            "{from}: alias only {attenuation:.1} dB down"
        );
    }
    let x = sine(16_000, 1000.0, 0.1);
    assert_eq!(resample_to(&x, 16_000, 16_000).unwrap(), x);
    assert!(resample_to(&x, 0, 16_000).is_err());
}

#[test]
fn speed_perturbation_changes_pitch_and_length() {
    let x = sine(16_000, 1000.0, 2.0);
    for factor in [1.1, 0.9, 0.95, 1.05] {
        let y = speed_perturb(&x, 16_000, factor).unwrap();
        let expected_len = x.len() as f64 / factor;
        assert!(
            (y.len() as f64 - expected_len).abs() <= 1.0,
            "{factor}: len {}",
            y.len()
        );
        let (amp, snr) = tone_fit(&y, 16_000.0, 1000.0 * factor, 1600);
        println!("speed {factor}: len {} (expected {expected_len:.1}), {:.0} Hz fit amplitude {amp:.5} SNR {snr:.1} dB", y.len(), 1000.0 * factor);
        assert!(
            (amp - TONE_AMP).abs() < 1e-3 && snr > 90.0,
            "{factor}: {amp} {snr}"
        );
    }
    // A rate * factor that is not an integer goes through the sinc resampler.
    let y = speed_perturb(&x, 16_000, 1.0 / 0.9).unwrap();
    let (amp, snr) = tone_fit(&y, 16_000.0, 1000.0 / 0.9, 1600);
    println!("speed 1/0.9: len {} SNR {snr:.1} dB", y.len());
    assert!((y.len() as f64 - x.len() as f64 * 0.9).abs() <= 1.0);
    assert!((amp - TONE_AMP).abs() < 1e-3 && snr > 90.0);
    assert!(speed_perturb(&x, 16_000, 0.0).is_err());
    assert_eq!(speed_perturb(&x, 16_000, 1.0).unwrap(), x);
}

/// Single-thread decode and resample speed on ~60 s files made with sox/flac/lame/opusenc.
/// Run: `cargo test --release --test audio -- --ignored --nocapture bench`
/// (`BENCH_DIR=dir` keeps the files there, e.g. to time other tools on the same input).
#[test]
#[ignore]
fn bench_decode_and_resample_speed() {
    use std::process::Command;
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var("BENCH_DIR").map_or(tmp.path().to_path_buf(), PathBuf::from);
    let run = |cmd: &str| {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "{cmd}");
    };
    run(
        "espeak-ng -w speech.wav 'Speech corpora are decoded once, cached as float32 shards, \
         and read many times by feature extraction and finetuning. This sentence is long enough \
         to loop into a minute of test audio without sounding like a pure tone.'",
    );
    run("sox -R speech.wav -r 16000 -c 1 -b 16 s16k.wav repeat 12 trim 0 60");
    run("sox -R s16k.wav -r 44100 -c 2 -b 16 s44k.wav");
    for (src, tag) in [("s16k", "16k mono"), ("s44k", "44.1k stereo")] {
        run(&format!("flac -s -f -o {src}.flac {src}.wav"));
        run(&format!("lame --silent -b 128 {src}.wav {src}.mp3"));
        run(&format!(
            "opusenc --quiet --bitrate 32 {src}.wav {src}.opus"
        ));
        run(&format!("oggenc -Q -q 4 -o {src}.ogg {src}.wav"));
        for ext in ["wav", "flac", "mp3", "ogg", "opus"] {
            let path = dir.join(format!("{src}.{ext}"));
            decode_file(&path, DecodeOptions::default()).unwrap(); // warm the page cache
            let reps = 5;
            let t = Instant::now();
            let mut secs = 0.0;
            for _ in 0..reps {
                secs += decode_file(&path, DecodeOptions::default())
                    .unwrap()
                    .duration_s();
            }
            let wall = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..reps {
                let a = decode_file(&path, DecodeOptions::default()).unwrap();
                resample_to(&a.samples, a.sample_rate, 16_000).unwrap();
            }
            let wall_16k = t.elapsed().as_secs_f64();
            println!(
                "{tag:12} {ext:5}: decode {:6.0}x real time, decode + resample to 16 kHz {:6.0}x",
                secs / wall,
                secs / wall_16k
            );
        }
    }
    for from in [44_100u32, 48_000, 22_050, 8_000] {
        let x = sine(from, 440.0, 60.0);
        resample_to(&x, from, 16_000).unwrap();
        let t = Instant::now();
        for _ in 0..5 {
            resample_to(&x, from, 16_000).unwrap();
        }
        let rt = 5.0 * 60.0 / t.elapsed().as_secs_f64();
        println!("resample {from} -> 16000: {rt:7.0}x real time");
    }
    let x = sine(16_000, 440.0, 60.0);
    for factor in [0.9, 1.1, 1.0 / 0.9] {
        let t = Instant::now();
        speed_perturb(&x, 16_000, factor).unwrap();
        let rt = 60.0 / t.elapsed().as_secs_f64();
        println!("speed_perturb 16 kHz x{factor:.4}: {rt:7.0}x real time");
    }
}
