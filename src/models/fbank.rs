//! Kaldi-compatible log-mel filterbank ("fbank"), the baseline feature of the ESPnet/WeNet
//! result tables.
//!
//! Mirrors `compute-fbank-feats` as implemented by kaldi-native-fbank
//! (`FbankComputer::Compute`, `ExtractWindow`/`ProcessWindow`, `MelBanks::InitKaldiMelBanks`):
//! same frame layout, window functions, DC removal, pre-emphasis, power spectrum, triangular
//! bins on the 1127·ln(1 + f/700) mel scale, and `ln(max(e, f32::EPSILON))`.
//!
//! Input scale: like Kaldi, WeNet and ESPnet, [`Fbank::compute`] expects samples in the int16
//! range (16 kHz float audio in [-1, 1) multiplied by 32768). [`Fbank::compute_from_unit_scale`]
//! takes [-1, 1) audio and does the scaling itself. Log-mel values differ by 2·ln(32768) ≈ 20.8
//! between the two scales, so mixing them silently breaks recipes trained on Kaldi features.
//!
//! One [`Fbank`] is immutable after [`Fbank::new`] and can be shared across threads; each call
//! allocates its scratch once per utterance, never per frame. Parallelism is the caller's.
//!
//! Precision: the window and mel filters are made in f32 exactly as Kaldi makes them (they
//! define the feature); the signal path (DC removal, pre-emphasis, FFT, filters) runs in f64.
//! Where a mel bin holds ~1e-9 of a frame's energy, float32 FFTs (Kaldi's included) are only
//! good to ~1e-3 in log units; ours stays within ~4e-5 of an all-f64 computation.
//! Dither (off by default) uses our own seeded generator, so dithered features are
//! reproducible run to run but not sample-identical to Kaldi's.

use std::sync::Arc;

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

/// Scale from unit-range float audio to the int16 range Kaldi features are defined on.
pub const INT16_SCALE: f32 = 32768.0;

/// Window applied to each frame (Kaldi's `--window-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowType {
    /// (0.5 − 0.5·cos(2πn/(N−1)))^0.85: Hamming-like, but reaches zero at the edges.
    #[default]
    Povey,
    Hamming,
    Hanning,
    Rectangular,
    Sine,
    /// Generalised Blackman with `blackman_coeff`.
    Blackman,
}

/// Options of Kaldi's `compute-fbank-feats` (frame, mel and fbank options in one struct);
/// defaults are Kaldi's except `num_mel_bins` (80, as ESPnet/WeNet use) and `dither` (0: off,
/// so features are reproducible).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FbankOptions {
    /// Sample rate of the waveform in Hz.
    pub sample_frequency: f32,
    /// Frame length in milliseconds.
    pub frame_length_ms: f32,
    /// Frame shift in milliseconds.
    pub frame_shift_ms: f32,
    /// Standard deviation of Gaussian noise added to each sample (int16 scale); 0 = off.
    pub dither: f32,
    /// Seed of the dither noise; every `compute` call restarts from it, so results do not
    /// depend on call order or threads.
    pub dither_seed: u64,
    /// Pre-emphasis coefficient in [0, 1]; 0 = off.
    pub preemph_coeff: f32,
    /// Subtract each frame's mean before windowing.
    pub remove_dc_offset: bool,
    pub window_type: WindowType,
    /// Constant of the generalised Blackman window.
    pub blackman_coeff: f32,
    /// Zero-pad each frame to a power of two before the FFT (400 → 512 samples).
    pub round_to_power_of_two: bool,
    /// Only frames that fit entirely in the waveform (true), or one frame per shift with the
    /// waveform reflected at its ends (false).
    pub snip_edges: bool,
    /// Number of triangular mel bins (at least 3).
    pub num_mel_bins: usize,
    /// Lowest frequency covered by the mel bins, in Hz.
    pub low_freq: f32,
    /// Highest frequency in Hz; 0 means Nyquist, a negative value is an offset from Nyquist.
    pub high_freq: f32,
    /// Add the frame's log energy as an extra coefficient (first, or last with `htk_compat`).
    pub use_energy: bool,
    /// Floor on the energy (absolute, not log); 0 = no floor.
    pub energy_floor: f32,
    /// Take the energy before pre-emphasis and windowing (true) or after (false).
    pub raw_energy: bool,
    /// Put the energy coefficient last instead of first.
    pub htk_compat: bool,
    /// Log of the mel energies (true) or the mel energies themselves (false).
    pub use_log_fbank: bool,
    /// Power spectrum (true) or magnitude spectrum (false).
    pub use_power: bool,
}

impl Default for FbankOptions {
    fn default() -> Self {
        Self {
            sample_frequency: 16000.0,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            dither: 0.0,
            dither_seed: 0,
            preemph_coeff: 0.97,
            remove_dc_offset: true,
            window_type: WindowType::Povey,
            blackman_coeff: 0.42,
            round_to_power_of_two: true,
            snip_edges: true,
            num_mel_bins: 80,
            low_freq: 20.0,
            high_freq: 0.0,
            use_energy: false,
            energy_floor: 0.0,
            raw_energy: true,
            htk_compat: false,
            use_log_fbank: true,
            use_power: true,
        }
    }
}

/// Why a set of [`FbankOptions`] cannot make a filterbank.
#[derive(Debug, thiserror::Error)]
pub enum FbankError {
    #[error("fbank: sample_frequency must be positive, got {0}")]
    SampleFrequency(f32),
    #[error("fbank: frame_length_ms {length_ms} and frame_shift_ms {shift_ms} give a window of {window} and a shift of {shift} samples; need a window of at least 2 and a shift of at least 1")]
    FrameSize {
        length_ms: f32,
        shift_ms: f32,
        window: i64,
        shift: i64,
    },
    #[error("fbank: the FFT length {0} is odd; use an even window or round_to_power_of_two")]
    OddFftLength(usize),
    #[error("fbank: preemph_coeff must be in [0, 1], got {0}")]
    Preemphasis(f32),
    #[error("fbank: dither must be finite and >= 0, got {0}")]
    Dither(f32),
    #[error("fbank: num_mel_bins must be at least 3, got {0}")]
    TooFewBins(usize),
    #[error("fbank: bad frequency range: low_freq {low} Hz and high_freq {high} Hz (after resolving 0/negative) vs Nyquist {nyquist} Hz")]
    FrequencyRange { low: f32, high: f32, nyquist: f32 },
    #[error("fbank: mel bin {bin} of {num_bins} covers no FFT bin; use fewer mel bins or a longer window")]
    EmptyMelBin { bin: usize, num_bins: usize },
}

/// One triangular mel filter: weights for FFT bins `first..first + len`, stored at
/// `offset..offset + len` in [`Fbank::mel_weights`].
#[derive(Clone, Copy, Debug)]
struct MelBin {
    first: usize,
    offset: usize,
    len: usize,
}

/// A configured Kaldi fbank: window, mel filters and FFT plan, computed once.
pub struct Fbank {
    opts: FbankOptions,
    window_size: usize,
    window_shift: usize,
    padded_size: usize,
    window: Vec<f64>,
    mel_bins: Vec<MelBin>,
    mel_weights: Vec<f32>,
    fft: Arc<dyn RealToComplex<f64>>,
    log_energy_floor: Option<f32>,
}

impl std::fmt::Debug for Fbank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fbank")
            .field("opts", &self.opts)
            .field("window_size", &self.window_size)
            .field("window_shift", &self.window_shift)
            .field("padded_size", &self.padded_size)
            .finish_non_exhaustive()
    }
}

/// Per-call buffers, allocated once per utterance and reused for every frame.
struct Scratch {
    /// The frame's `window_size` samples, before pre-emphasis and windowing.
    samples: Vec<f64>,
    /// Pre-emphasised, windowed, zero-padded frame; the FFT overwrites it.
    fft_in: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    fft_scratch: Vec<Complex<f64>>,
    power: Vec<f64>,
    rng: Option<ChaCha8Rng>,
}

/// Mirrors kaldi-native-fbank `MelBanks::MelScale` (HTK mel, in f32 like the reference).
fn mel_scale(freq: f32) -> f32 {
    1127.0f32 * (1.0f32 + freq / 700.0f32).ln()
}

/// Mirrors kaldi-native-fbank `FeatureWindowFunction` (computed in f64, stored as f32).
fn window_function(kind: WindowType, blackman_coeff: f32, size: usize) -> Vec<f64> {
    let a = 2.0 * std::f64::consts::PI / (size as f64 - 1.0);
    (0..size)
        .map(|i| {
            let x = a * i as f64;
            let w = match kind {
                WindowType::Hanning => 0.5 - 0.5 * x.cos(),
                WindowType::Sine => (0.5 * x).sin(),
                WindowType::Hamming => 0.54 - 0.46 * x.cos(),
                WindowType::Povey => (0.5 - 0.5 * x.cos()).powf(0.85),
                WindowType::Rectangular => 1.0,
                WindowType::Blackman => {
                    let c = blackman_coeff as f64;
                    c - 0.5 * x.cos() + (0.5 - c) * (2.0 * x).cos()
                }
            };
            // Rounded through f32 so the window equals the reference's.
            w as f32 as f64
        })
        .collect()
}

/// Mirrors kaldi-native-fbank `MelBanks::InitKaldiMelBanks` without VTLN: triangles in the mel
/// domain over FFT bins 0..n/2 (the Nyquist bin is never used), kept sparse.
fn mel_banks(
    opts: &FbankOptions,
    padded_size: usize,
) -> Result<(Vec<MelBin>, Vec<f32>), FbankError> {
    let num_bins = opts.num_mel_bins;
    if num_bins < 3 {
        return Err(FbankError::TooFewBins(num_bins));
    }
    let num_fft_bins = padded_size / 2;
    let nyquist = 0.5f32 * opts.sample_frequency;
    let low = opts.low_freq;
    let high = if opts.high_freq > 0.0 {
        opts.high_freq
    } else {
        nyquist + opts.high_freq
    };
    let range_ok = low >= 0.0 && low < nyquist && high > 0.0 && high <= nyquist && high > low;
    if !range_ok {
        return Err(FbankError::FrequencyRange { low, high, nyquist });
    }
    let fft_bin_width = opts.sample_frequency / padded_size as f32;
    let mel_low = mel_scale(low);
    let mel_high = mel_scale(high);
    let mel_delta = (mel_high - mel_low) / (num_bins as f32 + 1.0);

    let mut bins = Vec::with_capacity(num_bins);
    let mut weights = Vec::new();
    for bin in 0..num_bins {
        let left = mel_low + bin as f32 * mel_delta;
        let center = mel_low + (bin as f32 + 1.0) * mel_delta;
        let right = mel_low + (bin as f32 + 2.0) * mel_delta;
        let offset = weights.len();
        let mut first = None;
        for i in 0..num_fft_bins {
            let mel = mel_scale(fft_bin_width * i as f32);
            if mel > left && mel < right {
                let w = if mel <= center {
                    (mel - left) / (center - left)
                } else {
                    (right - mel) / (right - center)
                };
                // Kaldi keeps the span first..=last nonzero; a triangle is contiguous.
                first.get_or_insert(i);
                weights.push(w);
            }
        }
        let first = first.ok_or(FbankError::EmptyMelBin { bin, num_bins })?;
        bins.push(MelBin {
            first,
            offset,
            len: weights.len() - offset,
        });
    }
    Ok((bins, weights))
}

impl Fbank {
    /// Checks the options and precomputes the window, the sparse mel filters and the FFT plan.
    pub fn new(opts: FbankOptions) -> Result<Self, FbankError> {
        let sf = opts.sample_frequency;
        if !(sf.is_finite() && sf > 0.0) {
            return Err(FbankError::SampleFrequency(sf));
        }
        // Kaldi's FrameExtractionOptions::WindowSize/WindowShift: f32 product, truncated.
        let window = (sf * 0.001f32 * opts.frame_length_ms) as i64;
        let shift = (sf * 0.001f32 * opts.frame_shift_ms) as i64;
        if window < 2 || shift < 1 {
            return Err(FbankError::FrameSize {
                length_ms: opts.frame_length_ms,
                shift_ms: opts.frame_shift_ms,
                window,
                shift,
            });
        }
        let window_size = window as usize;
        let window_shift = shift as usize;
        let padded_size = if opts.round_to_power_of_two {
            window_size.next_power_of_two()
        } else {
            window_size
        };
        if padded_size % 2 != 0 {
            return Err(FbankError::OddFftLength(padded_size));
        }
        if !(0.0..=1.0).contains(&opts.preemph_coeff) {
            return Err(FbankError::Preemphasis(opts.preemph_coeff));
        }
        if !(opts.dither.is_finite() && opts.dither >= 0.0) {
            return Err(FbankError::Dither(opts.dither));
        }
        let (mel_bins, mel_weights) = mel_banks(&opts, padded_size)?;
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(padded_size);
        let log_energy_floor = (opts.energy_floor > 0.0).then(|| opts.energy_floor.ln());
        Ok(Self {
            window: window_function(opts.window_type, opts.blackman_coeff, window_size),
            opts,
            window_size,
            window_shift,
            padded_size,
            mel_bins,
            mel_weights,
            fft,
            log_energy_floor,
        })
    }

    pub fn options(&self) -> &FbankOptions {
        &self.opts
    }

    /// Coefficients per frame: `num_mel_bins`, plus one with `use_energy`.
    pub fn dim(&self) -> usize {
        self.opts.num_mel_bins + usize::from(self.opts.use_energy)
    }

    /// Frame length in samples (400 at the defaults).
    pub fn window_size(&self) -> usize {
        self.window_size
    }

    /// Frame shift in samples (160 at the defaults).
    pub fn window_shift(&self) -> usize {
        self.window_shift
    }

    /// Frames per second of audio (100.0 at the defaults).
    pub fn frame_rate(&self) -> f64 {
        self.opts.sample_frequency as f64 / self.window_shift as f64
    }

    /// Mirrors Kaldi `NumFrames(num_samples, opts, flush = true)`.
    pub fn frames_for_samples(&self, num_samples: usize) -> usize {
        if self.opts.snip_edges {
            if num_samples < self.window_size {
                0
            } else {
                1 + (num_samples - self.window_size) / self.window_shift
            }
        } else {
            (num_samples + self.window_shift / 2) / self.window_shift
        }
    }

    /// Features `[frames, dim]` of a waveform in the int16 range (see the module docs).
    /// A waveform shorter than one window gives 0 frames with `snip_edges`.
    pub fn compute(&self, wave: &[f32]) -> Array2<f32> {
        self.compute_scaled(wave, 1.0)
    }

    /// Features of a waveform in [-1, 1): scaled by 32768 on the fly, exactly as
    /// `compute(wave * 32768)` but without a copy of the waveform.
    pub fn compute_from_unit_scale(&self, wave: &[f32]) -> Array2<f32> {
        self.compute_scaled(wave, INT16_SCALE)
    }

    fn compute_scaled(&self, wave: &[f32], scale: f32) -> Array2<f32> {
        let num_frames = self.frames_for_samples(wave.len());
        let dim = self.dim();
        let mut out = Array2::<f32>::zeros((num_frames, dim));
        if num_frames == 0 {
            return out;
        }
        let mut scratch = Scratch {
            samples: vec![0.0; self.window_size],
            fft_in: vec![0.0; self.padded_size],
            spectrum: self.fft.make_output_vec(),
            fft_scratch: self.fft.make_scratch_vec(),
            power: vec![0.0; self.padded_size / 2],
            rng: (self.opts.dither > 0.0).then(|| ChaCha8Rng::seed_from_u64(self.opts.dither_seed)),
        };
        // A freshly allocated array is in standard layout, so the slice always exists.
        if let Some(data) = out.as_slice_mut() {
            for (index, row) in data.chunks_exact_mut(dim).enumerate() {
                self.extract_frame(wave, scale, index, &mut scratch.samples);
                self.compute_frame(&mut scratch, row);
            }
        }
        out
    }

    /// Mirrors Kaldi `FirstSampleOfFrame`.
    fn first_sample_of_frame(&self, index: usize) -> i64 {
        let shift = self.window_shift as i64;
        if self.opts.snip_edges {
            index as i64 * shift
        } else {
            shift * index as i64 + shift / 2 - self.window_size as i64 / 2
        }
    }

    /// Mirrors Kaldi `ExtractWindow` (the copy): the frame's samples, reflected at the
    /// waveform's ends when it overhangs them (only with `snip_edges = false`).
    fn extract_frame(&self, wave: &[f32], scale: f32, index: usize, samples: &mut [f64]) {
        let start = self.first_sample_of_frame(index);
        let n = self.window_size;
        let len = wave.len() as i64;
        if start >= 0 && start + n as i64 <= len {
            let src = &wave[start as usize..start as usize + n];
            for (d, &s) in samples.iter_mut().zip(src) {
                *d = (s * scale) as f64;
            }
            return;
        }
        for (s, d) in samples.iter_mut().enumerate() {
            let mut i = start + s as i64;
            // Repeated reflection only matters for waveforms shorter than half a window.
            while i < 0 || i >= len {
                i = if i < 0 { -i - 1 } else { 2 * len - 1 - i };
            }
            *d = (wave[i as usize] * scale) as f64;
        }
    }

    /// Mirrors Kaldi `ProcessWindow` and `FbankComputer::Compute` for one extracted frame.
    fn compute_frame(&self, scratch: &mut Scratch, row: &mut [f32]) {
        let opts = &self.opts;
        let n = self.window_size;
        let samples = &mut scratch.samples[..];

        if let Some(rng) = scratch.rng.as_mut() {
            add_gaussian_noise(samples, opts.dither, rng);
        }
        if opts.remove_dc_offset {
            let mean = sum(samples) / n as f64;
            samples.iter_mut().for_each(|x| *x -= mean);
        }
        let mut log_energy = 0.0f32;
        if opts.use_energy && opts.raw_energy {
            log_energy = log_floored(sum_of_squares(samples));
        }
        // Pre-emphasis (x[i] - c·x[i-1], and x[0] - c·x[0]) and the window in one pass from
        // `samples` into `fft_in`, so the loop vectorises; c = 0 leaves the samples unchanged.
        let c = opts.preemph_coeff as f64;
        let (head, padding) = scratch.fft_in.split_at_mut(n);
        padding.fill(0.0);
        head[0] = (samples[0] - c * samples[0]) * self.window[0];
        let pairs = samples[1..].iter().zip(&samples[..n - 1]);
        for ((out, (&cur, &prev)), &w) in head[1..].iter_mut().zip(pairs).zip(&self.window[1..]) {
            *out = (cur - c * prev) * w;
        }
        if opts.use_energy && !opts.raw_energy {
            log_energy = log_floored(sum_of_squares(head));
        }

        // The plan's length always equals the buffers made from it, so this cannot fail.
        let fft_ok = self
            .fft
            .process_with_scratch(
                &mut scratch.fft_in,
                &mut scratch.spectrum,
                &mut scratch.fft_scratch,
            )
            .is_ok();
        debug_assert!(fft_ok);
        for (p, c) in scratch.power.iter_mut().zip(&scratch.spectrum) {
            *p = c.re * c.re + c.im * c.im;
        }
        if !opts.use_power {
            scratch.power.iter_mut().for_each(|p| *p = p.sqrt());
        }

        let mel_start = usize::from(opts.use_energy && !opts.htk_compat);
        let mel_out = &mut row[mel_start..mel_start + opts.num_mel_bins];
        for (out, bin) in mel_out.iter_mut().zip(&self.mel_bins) {
            let w = &self.mel_weights[bin.offset..bin.offset + bin.len];
            let p = &scratch.power[bin.first..bin.first + bin.len];
            let energy = dot(w, p);
            *out = if opts.use_log_fbank {
                log_floored(energy)
            } else {
                energy as f32
            };
        }
        if opts.use_energy {
            if let Some(floor) = self.log_energy_floor {
                log_energy = log_energy.max(floor);
            }
            let at = if opts.htk_compat {
                opts.num_mel_bins
            } else {
                0
            };
            row[at] = log_energy;
        }
    }
}

// The reductions below keep four partial sums so they vectorise (a strict left-to-right
// float sum cannot); in f64 the reordering is far below the f32 output precision.

fn sum(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..4 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

fn sum_of_squares(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for k in 0..4 {
            acc[k] += c[k] * c[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

fn dot(weights: &[f32], power: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let w_chunks = weights.chunks_exact(4);
    let p_chunks = power.chunks_exact(4);
    let tail: f64 = (w_chunks.remainder().iter())
        .zip(p_chunks.remainder())
        .map(|(&w, p)| w as f64 * p)
        .sum();
    for (w, p) in w_chunks.zip(p_chunks) {
        for k in 0..4 {
            acc[k] += w[k] as f64 * p[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Kaldi's `log(max(x, FLT_EPSILON))`.
/// The f32 log is a third of the f64 one's cost, and rounding to f32 first changes the result
/// by at most ~1e-7.
fn log_floored(x: f64) -> f32 {
    (x as f32).max(f32::EPSILON).ln()
}

/// Kaldi `Dither`: adds N(0, dither²) noise, from a seeded generator (Box–Muller).
fn add_gaussian_noise(samples: &mut [f64], dither: f32, rng: &mut ChaCha8Rng) {
    for pair in samples.chunks_mut(2) {
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        let dither = dither as f64;
        pair[0] += radius * angle.cos() * dither;
        if let Some(x) = pair.get_mut(1) {
            *x += radius * angle.sin() * dither;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_kaldi() {
        let fb = Fbank::new(FbankOptions::default()).unwrap();
        assert_eq!(
            (fb.window_size(), fb.window_shift(), fb.dim()),
            (400, 160, 80)
        );
        assert_eq!(fb.padded_size, 512);
        assert_eq!(fb.frame_rate(), 100.0);
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Fbank>();
    }

    #[test]
    fn dither_is_deterministic() {
        let opts = FbankOptions {
            dither: 1.0,
            dither_seed: 7,
            ..FbankOptions::default()
        };
        let fb = Fbank::new(opts).unwrap();
        let wave: Vec<f32> = (0..4000)
            .map(|i| (i as f32 * 0.05).sin() * 1000.0)
            .collect();
        let a = fb.compute(&wave);
        let b = fb.compute(&wave);
        assert_eq!(a, b);
        let plain = Fbank::new(FbankOptions::default()).unwrap().compute(&wave);
        assert_ne!(a, plain);
    }
}
