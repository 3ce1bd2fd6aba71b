//! Resampling (rubato) and sox-style speed perturbation.
//!
//! Integer rate pairs with a small reduced ratio use rubato's synchronous FFT resampler (fixed
//! input chunks of 1024): measured in crates-spike.md §5 as the fastest option with ~-140 dB
//! aliasing. Other ratios (odd rates, a speed factor whose rate is not an integer) use the
//! asynchronous windowed-sinc resampler with rubato's default 256-tap filter.
use std::cell::RefCell;
use std::collections::HashMap;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Async, Fft, FixedAsync, FixedSync, Resampler, SincInterpolationParameters};

use super::AudioError;

/// Largest up- or down-sampling ratio resampled (8 kHz → 384 kHz is 48x; 1 kHz → 768 kHz 768x).
const MAX_RATIO: f64 = 768.0;

/// FFT resampler input chunk (frames).
const FFT_CHUNK: usize = 1024;
/// Largest reduced ratio term (rate / gcd) for the FFT resampler; beyond it FFT sizes blow up.
const FFT_MAX_RATIO_TERM: u32 = 2048;

thread_local! {
    /// Building an FFT resampler plans its FFTs; reuse one per rate pair and thread.
    static FFT_RESAMPLERS: RefCell<HashMap<(u32, u32), Fft<f32>>> = RefCell::new(HashMap::new());
}

/// Resamples mono audio from `from_hz` to `to_hz` (identity when equal).
///
/// The output has `ceil(len * to_hz / from_hz)` samples, aligned with the input (the filter
/// delay is removed).
pub fn resample_to(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == 0 || to_hz == 0 {
        return Err(AudioError::Resample(format!(
            "sample rates must be positive (got {from_hz} Hz to {to_hz} Hz)"
        )));
    }
    if from_hz == to_hz {
        return Ok(samples.to_vec());
    }
    // The output length follows from the input's and the ratio; a ratio no real pair of rates
    // has (a 1 Hz header) would turn a small file into gigabytes.
    let ratio = f64::from(to_hz) / f64::from(from_hz);
    if !(1.0 / MAX_RATIO..=MAX_RATIO).contains(&ratio) {
        return Err(AudioError::Resample(format!(
            "{from_hz} Hz to {to_hz} Hz is a ratio of {ratio:.3e}, beyond the {MAX_RATIO}x any \
             real pair of sample rates needs"
        )));
    }
    if samples.is_empty() {
        return Ok(Vec::new());
    }
    let g = gcd(from_hz, to_hz);
    if from_hz / g <= FFT_MAX_RATIO_TERM && to_hz / g <= FFT_MAX_RATIO_TERM {
        resample_fft(samples, from_hz, to_hz)
    } else {
        resample_sinc(samples, f64::from(to_hz) / f64::from(from_hz))
    }
}

/// sox `speed FACTOR` at `rate_hz`: tempo and pitch change together; output has len/FACTOR samples.
///
/// Like sox, this plays the input as if it were recorded at `rate_hz * factor` and resamples
/// that to `rate_hz`.
pub fn speed_perturb(samples: &[f32], rate_hz: u32, factor: f64) -> Result<Vec<f32>, AudioError> {
    if !(factor.is_finite() && factor > 0.0) {
        return Err(AudioError::Resample(format!(
            "speed factor must be a positive number (got {factor})"
        )));
    }
    if rate_hz == 0 {
        return Err(AudioError::Resample("sample rate must be positive".into()));
    }
    if factor == 1.0 || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let virtual_rate = f64::from(rate_hz) * factor;
    let rounded = virtual_rate.round();
    if (virtual_rate - rounded).abs() < 1e-6 && rounded >= 1.0 && rounded <= f64::from(u32::MAX) {
        resample_to(samples, rounded as u32, rate_hz)
    } else {
        resample_sinc(samples, 1.0 / factor)
    }
}

fn resample_fft(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    let input = InterleavedSlice::new(samples, 1, samples.len())
        .map_err(|e| AudioError::Resample(e.to_string()))?;
    FFT_RESAMPLERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let resampler = match cache.entry((from_hz, to_hz)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                Fft::<f32>::new(
                    from_hz as usize,
                    to_hz as usize,
                    FFT_CHUNK,
                    1,
                    FixedSync::Input,
                )
                .map_err(|e| AudioError::Resample(format!("{from_hz} Hz to {to_hz} Hz: {e}")))?,
            ),
        };
        let out = resampler
            .process_all(&input, samples.len(), None)
            .map_err(|e| AudioError::Resample(format!("{from_hz} Hz to {to_hz} Hz: {e}")))?;
        Ok(out.take_data())
    })
}

fn resample_sinc(samples: &[f32], ratio: f64) -> Result<Vec<f32>, AudioError> {
    let input = InterleavedSlice::new(samples, 1, samples.len())
        .map_err(|e| AudioError::Resample(e.to_string()))?;
    let mut resampler = Async::<f32>::new_sinc(
        ratio,
        1.0,
        &SincInterpolationParameters::default(),
        FFT_CHUNK,
        1,
        FixedAsync::Input,
    )
    .map_err(|e| AudioError::Resample(format!("ratio {ratio}: {e}")))?;
    let out = resampler
        .process_all(&input, samples.len(), None)
        .map_err(|e| AudioError::Resample(format!("ratio {ratio}: {e}")))?;
    Ok(out.take_data())
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
