//! Kaldi fbank against kaldi-native-fbank 1.23.0 (fixtures from tests/fixtures/gen_fbank.py).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array2;
use serde::Deserialize;
use speechcache::models::fbank::{Fbank, FbankError, FbankOptions, WindowType};

/// Max-abs tolerance on log-mel values against kaldi-native-fbank.
const TOLERANCE: f32 = 1e-3;
/// Against the float64 reference: our arithmetic is f64 inside, so it must be much closer.
const EXACT_TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    wave: String,
    fbank: String,
    /// "kaldi-native-fbank" (float32) or "float64-numpy" (exact arithmetic).
    reference: String,
    num_samples: usize,
    num_frames: usize,
    options: FbankOptions,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fbank")
}

fn load_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn read_npy<T: npyz::Deserialize>(name: &str) -> (Vec<u64>, Vec<T>) {
    let file = std::fs::File::open(fixture_dir().join(name)).unwrap();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<T>().unwrap())
}

fn load_wave(name: &str) -> Vec<f32> {
    let (_, samples) = read_npy::<i16>(name);
    samples.into_iter().map(f32::from).collect()
}

fn load_reference(name: &str) -> Array2<f32> {
    let (shape, data) = read_npy::<f32>(name);
    Array2::from_shape_vec((shape[0] as usize, shape[1] as usize), data).unwrap()
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn matches_kaldi_native_fbank_on_every_fixture() {
    let cases = load_cases();
    assert!(cases.len() >= 11, "fixture index lost cases");
    for case in &cases {
        let wave = load_wave(&case.wave);
        assert_eq!(wave.len(), case.num_samples, "{}", case.name);
        let expected = load_reference(&case.fbank);
        let fbank = Fbank::new(case.options.clone()).unwrap();
        let ours = fbank.compute(&wave);
        assert_eq!(ours.dim(), expected.dim(), "{}: shape", case.name);
        assert_eq!(ours.nrows(), case.num_frames, "{}", case.name);
        let diff = max_abs_diff(&ours, &expected);
        let tolerance = match case.reference.as_str() {
            "kaldi-native-fbank" => TOLERANCE,
            "float64-numpy" => EXACT_TOLERANCE,
            other => panic!("unknown reference {other}"),
        };
        println!(
            "{:28} frames {:4} max |ours - {}| = {diff:.2e}",
            case.name,
            ours.nrows(),
            case.reference
        );
        assert!(diff <= tolerance, "{}: max abs diff {diff}", case.name);
    }
}

#[test]
fn unit_scale_entry_point_equals_int16_scaled_input() {
    let fbank = Fbank::new(FbankOptions::default()).unwrap();
    let wave = load_wave("long2p3.wave.npy");
    let unit: Vec<f32> = wave.iter().map(|x| x / 32768.0).collect();
    let expected = load_reference("default_long2p3.fbank.npy");
    let ours = fbank.compute_from_unit_scale(&unit);
    assert_eq!(ours, fbank.compute(&wave));
    assert!(max_abs_diff(&ours, &expected) <= TOLERANCE);
}

#[test]
fn shorter_than_a_window_gives_zero_frames() {
    let fbank = Fbank::new(FbankOptions::default()).unwrap();
    let wave = load_wave("short300.wave.npy");
    assert_eq!(fbank.compute(&wave).dim(), (0, 80));
    assert_eq!(fbank.compute(&[]).dim(), (0, 80));
    let long = load_wave("long2p3.wave.npy");
    assert_eq!(fbank.compute(&long[..399]).dim(), (0, 80));
    assert_eq!(fbank.compute(&long[..400]).dim(), (1, 80));
    let no_snip = Fbank::new(FbankOptions {
        snip_edges: false,
        ..FbankOptions::default()
    })
    .unwrap();
    assert_eq!(no_snip.compute(&[]).dim(), (0, 80));
    assert_eq!(no_snip.compute(&wave[..10]).dim(), (0, 80));
    // 80 samples round to one frame: the waveform is reflected many times over.
    let tiny = no_snip.compute(&wave[..80]);
    assert_eq!(tiny.dim(), (1, 80));
    assert!(tiny.iter().all(|v| v.is_finite()));
}

#[test]
fn frame_count_formula() {
    let snip = Fbank::new(FbankOptions::default()).unwrap();
    let no_snip = Fbank::new(FbankOptions {
        snip_edges: false,
        ..FbankOptions::default()
    })
    .unwrap();
    for n in [
        0, 1, 79, 80, 239, 240, 399, 400, 559, 560, 16000, 36800, 160_000,
    ] {
        let snip_expected = if n < 400 { 0 } else { 1 + (n - 400) / 160 };
        assert_eq!(snip.frames_for_samples(n), snip_expected, "snip_edges, {n}");
        assert_eq!(
            no_snip.frames_for_samples(n),
            (n + 80) / 160,
            "no snip, {n}"
        );
    }
    assert_eq!(snip.frames_for_samples(16000), 98);
    assert_eq!(no_snip.frames_for_samples(16000), 100);
    assert_eq!(snip.frame_rate(), 100.0);
    // The formula agrees with the reference's frame counts for every fixture.
    for case in load_cases() {
        let fbank = Fbank::new(case.options.clone()).unwrap();
        assert_eq!(
            fbank.frames_for_samples(case.num_samples),
            case.num_frames,
            "{}",
            case.name
        );
    }
}

#[test]
fn bad_options_are_rejected() {
    let bad = |opts: FbankOptions| Fbank::new(opts).unwrap_err();
    let d = FbankOptions::default;
    assert!(matches!(
        bad(FbankOptions {
            num_mel_bins: 2,
            ..d()
        }),
        FbankError::TooFewBins(2)
    ));
    assert!(matches!(
        bad(FbankOptions {
            high_freq: 9000.0,
            ..d()
        }),
        FbankError::FrequencyRange { .. }
    ));
    assert!(matches!(
        bad(FbankOptions {
            low_freq: 5000.0,
            high_freq: 4000.0,
            ..d()
        }),
        FbankError::FrequencyRange { .. }
    ));
    assert!(matches!(
        bad(FbankOptions {
            num_mel_bins: 256,
            ..d()
        }),
        FbankError::EmptyMelBin { .. }
    ));
    assert!(matches!(
        bad(FbankOptions {
            frame_length_ms: 0.05,
            ..d()
        }),
        FbankError::FrameSize { .. }
    ));
    assert!(matches!(
        bad(FbankOptions {
            preemph_coeff: 1.5,
            ..d()
        }),
        FbankError::Preemphasis(_)
    ));
    assert!(matches!(
        bad(FbankOptions {
            sample_frequency: 0.0,
            ..d()
        }),
        FbankError::SampleFrequency(_)
    ));
}

#[test]
fn options_serde_defaults_and_names() {
    let opts: FbankOptions = serde_json::from_str(r#"{"window_type": "hamming"}"#).unwrap();
    assert_eq!(opts.window_type, WindowType::Hamming);
    assert_eq!(opts.num_mel_bins, 80);
    assert_eq!(opts.dither, 0.0);
    assert!(serde_json::from_str::<FbankOptions>(r#"{"num_mel_bin": 40}"#).is_err());
    let back: FbankOptions =
        serde_json::from_str(&serde_json::to_string(&FbankOptions::default()).unwrap()).unwrap();
    assert_eq!(back, FbankOptions::default());
}

/// x-real-time on 60 s of audio, one thread:
/// `cargo test --release --test fbank -- --ignored --nocapture speed`
#[test]
#[ignore]
fn speed_sixty_seconds_single_thread() {
    let fbank = Fbank::new(FbankOptions::default()).unwrap();
    let base = load_wave("long2p3.wave.npy");
    let seconds = 60.0;
    let wave: Vec<f32> = base.iter().copied().cycle().take(16000 * 60).collect();
    let _warm = fbank.compute(&wave[..16000]);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let feats = fbank.compute(&wave);
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(feats.nrows(), 5998);
    }
    println!(
        "fbank 80 bins, {seconds} s of audio: best of 5 {:.2} ms = {:.0} x real time",
        best * 1e3,
        seconds / best
    );
}
