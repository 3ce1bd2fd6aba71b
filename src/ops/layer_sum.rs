//! The softmax-weighted sum of hidden-state layers (s3prl's `Featurizer`, ESPnet's
//! `frontend: s3prl`), forward and backward on f32 slices.
use rayon::prelude::*;

/// `softmax(weights)`: the layer mixing coefficients.
pub fn layer_coefficients(weights: &[f32]) -> Vec<f32> {
    let mx = weights.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = weights.iter().map(|&v| (v - mx).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `x [B, T, D] = Σ_l alpha_l · feats[:, l]` for `feats` `[B, L, T, D]`, `alpha` `[L]`.
pub fn forward(feats: &[f32], alpha: &[f32], frame_len: usize, x: &mut [f32]) {
    let l = alpha.len();
    x.par_chunks_mut(frame_len)
        .enumerate()
        .for_each(|(bi, xb)| {
            xb.fill(0.0);
            for (li, &a) in alpha.iter().enumerate() {
                let src = &feats[(bi * l + li) * frame_len..][..frame_len];
                for (o, &v) in xb.iter_mut().zip(src) {
                    *o += a * v;
                }
            }
        });
}

/// Backward of [`forward`] through the softmax: `dweights += alpha ⊙ (dalpha - alpha·dalpha)`
/// with `dalpha_l = Σ dx · feats_l` (summed in f64, utterances in order).
pub fn backward(dx: &[f32], feats: &[f32], alpha: &[f32], frame_len: usize, dweights: &mut [f32]) {
    let l = alpha.len();
    let b = dx.len() / frame_len.max(1);
    let per_utt: Vec<Vec<f64>> = (0..b)
        .into_par_iter()
        .map(|bi| {
            let g = &dx[bi * frame_len..][..frame_len];
            (0..l)
                .map(|li| {
                    let f = &feats[(bi * l + li) * frame_len..][..frame_len];
                    g.iter().zip(f).map(|(&a, &c)| (a * c) as f64).sum()
                })
                .collect()
        })
        .collect();
    let dalpha: Vec<f64> = (0..l)
        .map(|li| per_utt.iter().map(|u| u[li]).sum())
        .collect();
    let dot: f64 = dalpha.iter().zip(alpha).map(|(&d, &a)| d * a as f64).sum();
    for li in 0..l {
        dweights[li] += (alpha[li] as f64 * (dalpha[li] - dot)) as f32;
    }
}
