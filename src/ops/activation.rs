//! Element-wise f32 kernels and their backwards: exp, softmax, the activations, residual
//! branches with dropout masks; vectorised through [`simd`].
use rayon::prelude::*;

use super::gemm::row_block;

/// e^v for v in [-87, 88] (clamped outside), vectorisable: 2^round(v·log2 e) times a degree-6
/// polynomial of the remainder (relative error ~1e-7).
#[inline(always)]
pub fn fast_exp(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits
    let a = v.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E;
    let shifted = a + MAGIC;
    let n = shifted - MAGIC;
    let f = (a - n) * std::f32::consts::LN_2;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // n as a two's-complement integer straight from the bits (no saturating float→int cast).
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Runs `f` compiled for AVX-512 (or AVX2 + FMA) when the CPU has it: element-wise loops in
/// `f` (and the `#[inline(always)]` helpers they call) are then vectorised 16 (8) wide.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx512(f) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `row = softmax(row)`, with lane-wise max and sum (so the loops vectorise) and `fast_exp`;
/// values more than 87 below the row's max (masked keys) give exactly 0. Call it inside
/// [`simd`] for AVX-512/AVX2 code.
#[inline(always)]
pub fn softmax_in_place(row: &mut [f32]) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mx = chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    // masked keys sit ~1e9 below the max: exactly 0, as exp underflows to in torch
    let e = |x: f32| if x < -87.0 { 0.0 } else { fast_exp(x) };
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = e(*v - mx);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = e(*v - mx);
        sum += *v;
    }
    let r_sum = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= r_sum);
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `y = silu(h) * mask` (mask: dropout scales, or none).
pub fn silu_forward(h: &[f32], mask: Option<&[f32]>, y: &mut [f32]) {
    masked_elementwise(y, h, mask, |o, v, k| *o = v * sigmoid(v) * k);
}

/// `dh = dy * mask * silu'(h)` in place of `dy`.
pub fn silu_backward(h: &[f32], mask: Option<&[f32]>, dy: &mut [f32]) {
    masked_elementwise(dy, h, mask, |g, v, k| {
        let s = sigmoid(v);
        *g *= s * (1.0 + v * (1.0 - s)) * k;
    });
}

/// `f(dst[i], h[i], mask[i])` over the pool, vectorised where the CPU allows; without a mask
/// the scale is 1 (an exact product, so the same bits as leaving it out).
fn masked_elementwise(
    dst: &mut [f32],
    h: &[f32],
    mask: Option<&[f32]>,
    f: impl Fn(&mut f32, f32, f32) + Sync,
) {
    let per = row_block(h.len() / 64 + 1) * 64;
    dst.par_chunks_mut(per)
        .zip(h.par_chunks(per))
        .enumerate()
        .for_each(|(blk, (db, hb))| {
            let off = blk * per;
            simd(
                #[inline(always)]
                || match mask {
                    Some(m) => {
                        let m = &m[off..off + db.len()];
                        for ((o, &v), &k) in db.iter_mut().zip(hb).zip(m) {
                            f(o, v, k);
                        }
                    }
                    None => {
                        for (o, &v) in db.iter_mut().zip(hb) {
                            f(o, v, 1.0);
                        }
                    }
                },
            )
        });
}

/// `out = x + scale * f * mask` (a residual branch with dropout), in place of `f`'s buffer.
pub fn residual_add(x: &[f32], f: &[f32], mask: Option<&[f32]>, scale: f32, out: &mut [f32]) {
    let per = row_block(x.len() / 64 + 1) * 64;
    out.par_chunks_mut(per).enumerate().for_each(|(blk, ob)| {
        let off = blk * per;
        for (i, o) in ob.iter_mut().enumerate() {
            let j = off + i;
            let m = mask.map_or(1.0, |m| m[j]);
            *o = x[j] + scale * f[j] * m;
        }
    });
}

/// `g *= scale * mask` elementwise (the backward of a scaled dropout branch).
pub fn scale_mask(g: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    if mask.is_none() && scale == 1.0 {
        return;
    }
    let per = row_block(g.len() / 64 + 1) * 64;
    g.par_chunks_mut(per).enumerate().for_each(|(blk, gb)| {
        let off = blk * per;
        for (i, v) in gb.iter_mut().enumerate() {
            *v *= scale * mask.map_or(1.0, |m| m[off + i]);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// ReLU and GLU (the Conformer's subsampling and convolution module), their backwards, and
// in-place sums.

/// Backward of `y = relu(x)` in place of `dy`, from the output `y`: zero where it was clipped.
pub fn relu_backward(y: &[f32], dy: &mut [f32]) {
    let per = row_block(dy.len() / 64 + 1) * 64;
    dy.par_chunks_mut(per)
        .zip(y.par_chunks(per))
        .for_each(|(g, o)| {
            for (g, &o) in g.iter_mut().zip(o) {
                if o <= 0.0 {
                    *g = 0.0;
                }
            }
        });
}

/// `y [N, dim] = a * sigmoid(b) * mask` for rows `h = [a | b]` `[N, 2 dim]` (torch's
/// `glu(dim=-1)`), `row_mask` `[N]` zeroing padded rows.
pub fn glu_forward(h: &[f32], dim: usize, row_mask: Option<&[f32]>, y: &mut [f32]) {
    y.par_chunks_mut(dim)
        .zip(h.par_chunks(2 * dim))
        .enumerate()
        .for_each(|(r, (g, hr))| {
            let m = row_mask.map_or(1.0, |m| m[r]);
            for j in 0..dim {
                g[j] = hr[j] * sigmoid(hr[dim + j]) * m;
            }
        });
}

/// Backward of [`glu_forward`]: `dh [N, 2 dim]` from `dy [N, dim]`.
pub fn glu_backward(h: &[f32], dy: &[f32], dim: usize, row_mask: Option<&[f32]>, dh: &mut [f32]) {
    dh.par_chunks_mut(2 * dim)
        .zip(h.par_chunks(2 * dim).zip(dy.par_chunks(dim)))
        .enumerate()
        .for_each(|(r, (o, (hr, g)))| {
            let m = row_mask.map_or(1.0, |m| m[r]);
            for j in 0..dim {
                let sg = sigmoid(hr[dim + j]);
                let gv = g[j] * m;
                o[j] = gv * sg;
                o[dim + j] = gv * hr[j] * sg * (1.0 - sg);
            }
        });
}

/// `acc += x` elementwise over the pool.
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    let per = row_block(acc.len() / 64 + 1) * 64;
    acc.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(a, b)| {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

// ---------------------------------------------------------------- GELU and the other inference
// activations, in place (the SSL encoder's CPU executor; appended for issue #19)

/// Exact GELU 0.5·x·(1 + erf(x/√2)), erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * fast_exp(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

/// GELU's tanh approximation (transformers' `gelu_new`, `gelu_pytorch_tanh`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// `xs = gelu(xs)` (exact, erf) on this thread, vectorised through [`simd`].
pub fn gelu_in_place(xs: &mut [f32]) {
    simd(
        #[inline(always)]
        || xs.iter_mut().for_each(|x| *x = gelu_erf(*x)),
    );
}

/// `xs = gelu_tanh(xs)` on this thread.
pub fn gelu_tanh_in_place(xs: &mut [f32]) {
    simd(
        #[inline(always)]
        || xs.iter_mut().for_each(|x| *x = gelu_tanh(*x)),
    );
}

/// `xs = max(xs, 0)` on this thread.
pub fn relu_in_place(xs: &mut [f32]) {
    simd(
        #[inline(always)]
        || xs.iter_mut().for_each(|x| *x = x.max(0.0)),
    );
}

/// `xs = silu(xs)` on this thread.
pub fn silu_in_place(xs: &mut [f32]) {
    simd(
        #[inline(always)]
        || xs.iter_mut().for_each(|x| *x *= sigmoid(*x)),
    );
}

#[cfg(test)]
mod gelu_tests {
    use super::*;

    #[test]
    fn gelu_matches_the_erf_definition() {
        let xs: Vec<f32> = (-20000..20000).map(|i| i as f32 * 0.001).collect();
        // reference erf: candle's f64 `erf` (libm)
        let scaled: Vec<f64> = xs
            .iter()
            .map(|&x| x as f64 / std::f64::consts::SQRT_2)
            .collect();
        let erf = candle_core::Tensor::new(scaled.as_slice(), &candle_core::Device::Cpu)
            .and_then(|t| t.erf())
            .and_then(|t| t.to_vec1::<f64>())
            .unwrap();
        let worst = xs
            .iter()
            .zip(&erf)
            .map(|(&x, &e)| (gelu_erf(x) as f64 - 0.5 * x as f64 * (1.0 + e)).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-6, "{worst}");
        let mut ys = xs.clone();
        gelu_in_place(&mut ys);
        let want: Vec<f32> = xs.iter().map(|&x| gelu_erf(x)).collect();
        assert_eq!(ys, want, "the vectorised loop computes the scalar kernel");
    }
}
