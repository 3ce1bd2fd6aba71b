//! SpecAugment masks on a feature batch `[B, L, T, D]` (time warping is not implemented).
//!
//! Masks are drawn from the caller's seeded RNG (one per step), so a resumed run draws the
//! same masks as an uninterrupted one. The same mask applies to every stored layer of an
//! utterance, which equals masking the layers' weighted sum.
use crate::finetune::config::{MaskWidth, SpecAugConfig};
use candle_core::{Result, Tensor};
use rand::Rng;

/// Multiply `feats [B, L, T, D]` by zero/one time and frequency masks.
// Mirrors ESPnet's MaskAlongAxis / MaskAlongAxisVariableMaxWidth (replace_with_zero=True),
// except that ratio widths are relative to each utterance's own length, not the padded one.
pub fn apply(
    cfg: &SpecAugConfig,
    feats: &Tensor,
    lengths: &[usize],
    rng: &mut impl Rng,
) -> Result<Tensor> {
    if !cfg.enabled || (cfg.num_time_masks == 0 && cfg.num_freq_masks == 0) {
        return Ok(feats.clone());
    }
    let (b, _l, t, d) = feats.dims4()?;
    let mut time = vec![1f32; b * t];
    let mut freq = vec![1f32; b * d];
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
    let dev = feats.device();
    let time = Tensor::from_vec(time, (b, 1, t, 1), dev)?;
    let freq = Tensor::from_vec(freq, (b, 1, 1, d), dev)?;
    feats.broadcast_mul(&time)?.broadcast_mul(&freq)
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
}
