//! SpecAugment on a feature batch `[B, L, T, D]`: time warping, time masks, frequency masks.
//!
//! Everything is drawn from the caller's seeded RNG (one per batch), so a resumed run draws
//! the same augmentation as an uninterrupted one. The same warp and masks apply to every
//! stored layer of an utterance, which equals augmenting the layers' weighted sum.
use crate::finetune::config::{MaskWidth, SpecAugConfig};
use candle_core::{Result, Tensor};
use rand::Rng;
use rayon::prelude::*;

/// Multiply `feats [B, L, T, D]` by zero/one time and frequency masks.
// Mirrors ESPnet's MaskAlongAxis / MaskAlongAxisVariableMaxWidth (replace_with_zero=True),
// except that ratio widths are relative to each utterance's own length, not the padded one.
pub fn apply(
    cfg: &SpecAugConfig,
    feats: &Tensor,
    lengths: &[usize],
    rng: &mut impl Rng,
) -> Result<Tensor> {
    if !cfg.enabled
        || (cfg.time_warp_window == 0 && cfg.num_time_masks == 0 && cfg.num_freq_masks == 0)
    {
        return Ok(feats.clone());
    }
    let (b, l, t, d) = feats.dims4()?;
    let dev = feats.device().clone();
    let mut x = feats
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    apply_in_place(cfg, &mut x, (b, l, t, d), lengths, rng);
    Tensor::from_vec(x, (b, l, t, d), &dev)
}

/// [`apply`] on the batch's values `x` `[B, L, T, D]` in place. All random draws come first,
/// in a fixed order (the warps of every utterance, then its masks), and the (utterance, layer)
/// blocks are then augmented in parallel.
pub fn apply_in_place(
    cfg: &SpecAugConfig,
    x: &mut [f32],
    (b, l, t, d): (usize, usize, usize, usize),
    lengths: &[usize],
    rng: &mut impl Rng,
) {
    if !cfg.enabled {
        return;
    }
    // time warp: (centre, new centre) per utterance, drawn as ESPnet does
    let mut warps: Vec<Option<(usize, usize)>> = vec![None; b];
    let window = cfg.time_warp_window;
    if window > 0 {
        for (u, &len) in lengths.iter().enumerate().take(b) {
            let len = len.min(t);
            if len <= 2 * window {
                continue;
            }
            let centre = rng.random_range(window..len - window);
            let new_centre = rng.random_range(centre - window..centre + window) + 1;
            warps[u] = Some((centre, new_centre));
        }
    }
    let masked = cfg.num_time_masks > 0 || cfg.num_freq_masks > 0;
    let mut time = vec![1f32; b * t];
    let mut freq = vec![1f32; b * d];
    if masked {
        for (u, &len) in lengths.iter().enumerate().take(b) {
            let len = len.min(t);
            let max_w = match cfg.time_mask_width {
                MaskWidth::Frames(n) => n,
                MaskWidth::Ratio(r) => (r * len as f64).floor() as usize,
            };
            let row = &mut time[u * t..u * t + len];
            for _ in 0..cfg.num_time_masks {
                mask_span(row, max_w, rng);
            }
            let row = &mut freq[u * d..(u + 1) * d];
            for _ in 0..cfg.num_freq_masks {
                mask_span(row, cfg.freq_mask_width, rng);
            }
        }
    }
    x.par_chunks_mut((t * d).max(1))
        .enumerate()
        .for_each_init(Vec::new, |src, (block, utt)| {
            let u = block / l.max(1);
            if let Some((centre, new_centre)) = warps[u] {
                let len = lengths[u].min(t);
                let utt = &mut utt[..len * d];
                src.clear();
                src.extend_from_slice(utt);
                resample_cubic(&src[..centre * d], d, &mut utt[..new_centre * d]);
                resample_cubic(&src[centre * d..], d, &mut utt[new_centre * d..]);
            }
            if masked {
                // the products `x · time · freq` in this order, as the tensor ops gave them
                let (tm, fm) = (&time[u * t..][..t], &freq[u * d..][..d]);
                for (row, &a) in utt.chunks_exact_mut(d).zip(tm) {
                    for (v, &f) in row.iter_mut().zip(fm) {
                        *v = *v * a * f;
                    }
                }
            }
        });
}

/// Resample `src` (rows of `d` values) to `dst.len() / d` rows along time, as torch's
/// `interpolate(mode="bicubic", align_corners=False)` does along one axis (A = -0.75).
fn resample_cubic(src: &[f32], d: usize, dst: &mut [f32]) {
    let (n_in, n_out) = (src.len() / d, dst.len() / d);
    if n_in == 0 || n_out == 0 {
        return;
    }
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = n_in as f64 / n_out as f64;
    for i in 0..n_out {
        let real = scale * (i as f64 + 0.5) - 0.5;
        let base = real.floor();
        let frac = real - base;
        let w = [
            far(frac + 1.0),
            near(frac),
            near(1.0 - frac),
            far(2.0 - frac),
        ];
        let out = &mut dst[i * d..(i + 1) * d];
        out.fill(0.0);
        for (k, &wk) in w.iter().enumerate() {
            let row = (base as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            let r = &src[row * d..(row + 1) * d];
            for (o, &v) in out.iter_mut().zip(r) {
                *o += (wk * v as f64) as f32;
            }
        }
    }
}

/// Zero one span of width uniform in [0, max_w] at a uniform start inside `row`.
fn mask_span(row: &mut [f32], max_w: usize, rng: &mut impl Rng) {
    let n = row.len();
    if n == 0 {
        return;
    }
    let w = rng.random_range(0..=max_w.min(n));
    if w == 0 {
        return;
    }
    let start = rng.random_range(0..=(n - w));
    row[start..start + w].fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn masks_stay_inside_lengths_and_are_seeded() {
        let cfg = SpecAugConfig {
            enabled: true,
            time_warp_window: 0,
            num_time_masks: 2,
            time_mask_width: MaskWidth::Frames(5),
            num_freq_masks: 1,
            freq_mask_width: 3,
        };
        let x = Tensor::ones((2, 3, 20, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let lengths = [20, 12];
        let a = apply(&cfg, &x, &lengths, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        let b = apply(&cfg, &x, &lengths, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(av, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let zeros = av.iter().filter(|v| **v == 0.0).count();
        assert!(zeros > 0 && zeros < av.len() / 2);
        // padding frames of utterance 1 (12..20) are never masked
        let u1 = a.get(1).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        for row in &u1[12..] {
            let masked = row.iter().filter(|v| **v == 0.0).count();
            assert!(masked <= 3);
        }
    }

    #[test]
    fn cubic_resampling_matches_torch_bicubic() {
        // tests/fixtures/gen_specaug.py: torch 2.5.1 interpolate(mode="bicubic") along time
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/specaug/bicubic.json"
        );
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let d = fx["d"].as_u64().unwrap() as usize;
        let x = floats(&fx["x"]);
        for case in fx["cases"].as_array().unwrap() {
            let n = case["n_out"].as_u64().unwrap() as usize;
            let mut y = vec![0f32; n * d];
            resample_cubic(&x, d, &mut y);
            for (a, b) in y.iter().zip(floats(&case["y"])) {
                assert!((a - b).abs() < 1e-5, "n_out {n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn time_warp_only_moves_frames_inside_lengths() {
        let t = 30;
        let x: Vec<f32> = (0..2 * t).map(|i| (i % t) as f32).collect();
        let x = Tensor::from_vec(x, (2, 1, t, 1), &Device::Cpu).unwrap();
        let cfg = SpecAugConfig {
            enabled: true,
            time_warp_window: 5,
            num_time_masks: 0,
            time_mask_width: MaskWidth::Frames(0),
            num_freq_masks: 0,
            freq_mask_width: 0,
        };
        let y = apply(&cfg, &x, &[30, 20], &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            &v[t + 20..],
            &(20..30).map(|i| i as f32).collect::<Vec<_>>()[..]
        );
        assert_ne!(v[..t], (0..t).map(|i| i as f32).collect::<Vec<_>>()[..]);
        // the endpoints stay near the original ones and values stay monotone-ish
        assert!(v[0].abs() < 1.0 && (v[t - 1] - 29.0).abs() < 1.0);
    }
}
