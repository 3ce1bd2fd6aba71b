//! Slice-level f32 CPU kernels with hand-written backwards, for the training engine
//! (`finetune::engine`): matmuls through `gemm` on strided views (no transposing copies),
//! layer norm, SiLU, dropout masks and column sums, each split over the rayon pool in
//! coarse row blocks so that two cores never hand work back and forth per op.
use rayon::prelude::*;

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn offset(self, rows: usize, cols: usize) -> Self {
        Self {
            data: &self.data[rows * self.rs + cols * self.cs..],
            rs: self.rs,
            cs: self.cs,
        }
    }

    fn fits(self, m: usize, n: usize) -> bool {
        m == 0 || n == 0 || (m - 1) * self.rs + (n - 1) * self.cs < self.data.len()
    }
}

/// Raw destination pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: every task writes a disjoint block of the destination (see `matmul`).
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer `offset` elements further (the caller keeps it in bounds).
    fn at(self, offset: usize) -> DstPtr {
        DstPtr(self.0.wrapping_add(offset))
    }
}

/// Below this many multiply-adds a matmul runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `dst[m, n] (row stride dst_rs) (+)= a[m, k] · b[k, n]`, accumulating when `accumulate`.
/// Large products are split in row (or column) blocks over the rayon pool; each block is one
/// single-threaded gemm, so the pool never waits on gemm's internal barriers.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    matmul_on(m, n, k, dst, dst_rs, a, b, accumulate, true)
}

#[allow(clippy::too_many_arguments)]
fn matmul_on(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "matmul: operand view out of bounds"
    );
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "matmul: destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let ptr = DstPtr(dst.as_mut_ptr());
    if !parallel || m * n * k < PARALLEL_MIN_MACS || threads == 1 {
        // SAFETY: bounds checked above.
        unsafe { gemm_block(m, n, k, ptr, dst_rs, a, b, accumulate) };
        return;
    }
    let blocks = (threads * 2).min(m.max(n));
    if m >= n {
        let per = m.div_ceil(blocks);
        (0..m.div_ceil(per)).into_par_iter().for_each(|blk| {
            let i0 = blk * per;
            let rows = per.min(m - i0);
            let dst = ptr.at(i0 * dst_rs);
            // SAFETY: row blocks are disjoint and inside the checked destination.
            unsafe { gemm_block(rows, n, k, dst, dst_rs, a.offset(i0, 0), b, accumulate) };
        });
    } else {
        let per = n.div_ceil(blocks);
        (0..n.div_ceil(per)).into_par_iter().for_each(|blk| {
            let j0 = blk * per;
            let cols = per.min(n - j0);
            let dst = ptr.at(j0);
            // SAFETY: column blocks are disjoint and inside the checked destination.
            unsafe { gemm_block(m, cols, k, dst, dst_rs, a, b.offset(0, j0), accumulate) };
        });
    }
}

/// One single-threaded gemm; the caller guarantees the views and `dst` are in bounds.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    m: usize,
    n: usize,
    k: usize,
    dst: DstPtr,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Single-threaded `dst (+)= a · b` for work that is already split over the pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    matmul_on(m, n, k, dst, dst_rs, a, b, accumulate, false)
}

/// Rows per rayon task for row-wise element work: a few tasks per thread, at least 16 rows.
pub fn row_block(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads() * 4).max(16)
}

/// `y[N, out] = x[N, in] · wᵀ + b` for a torch `Linear` weight `w` `[out, in]`.
pub fn linear_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, d_in: usize, y: &mut [f32]) {
    let d_out = w.len() / d_in;
    let n = x.len() / d_in;
    if let Some(b) = b {
        y.par_chunks_mut(row_block(n) * d_out).for_each(|rows| {
            for row in rows.chunks_exact_mut(d_out) {
                row.copy_from_slice(b);
            }
        });
    }
    matmul(
        n,
        d_out,
        d_in,
        y,
        d_out,
        Mat::rows(x, d_in),
        Mat::rows(w, d_in).t(),
        b.is_some(),
    );
}

/// Backward of `linear_forward`: `dw += dyᵀ · x`, `db += Σ dy`, and `dx (+)= dy · w` when asked.
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d_in: usize,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dx: Option<(&mut [f32], bool)>,
) {
    let d_out = w.len() / d_in;
    let n = x.len() / d_in;
    matmul(
        d_out,
        d_in,
        n,
        dw,
        d_in,
        Mat::rows(dy, d_out).t(),
        Mat::rows(x, d_in),
        true,
    );
    if let Some(db) = db {
        add_col_sums(dy, d_out, db);
    }
    if let Some((dx, accumulate)) = dx {
        matmul(
            n,
            d_in,
            d_out,
            dx,
            d_in,
            Mat::rows(dy, d_out),
            Mat::rows(w, d_in),
            accumulate,
        );
    }
}

/// `acc[j] += Σ_i x[i, j]` over the rows of `x` `[N, cols]`, reduced in a fixed order.
pub fn add_col_sums(x: &[f32], cols: usize, acc: &mut [f32]) {
    let rows = x.len() / cols;
    let per = row_block(rows);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(per * cols)
        .map(|block| {
            let mut s = vec![0f32; cols];
            for row in block.chunks_exact(cols) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    for p in &partials {
        for (a, &v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// What layer norm keeps for its backward: the normalised input and `1 / std` per row.
#[derive(Default)]
pub struct LayerNormSaved {
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per row of `dim` (biased variance, as
/// `torch.nn.LayerNorm`).
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
) -> LayerNormSaved {
    let dim = gamma.len();
    let rows = x.len() / dim;
    let mut saved = LayerNormSaved {
        xhat: vec![0f32; x.len()],
        rstd: vec![0f32; rows],
    };
    let per = row_block(rows);
    x.par_chunks(per * dim)
        .zip(y.par_chunks_mut(per * dim))
        .zip(saved.xhat.par_chunks_mut(per * dim))
        .zip(saved.rstd.par_chunks_mut(per))
        .for_each(|(((xb, yb), hb), rb)| {
            for (((xr, yr), hr), r) in xb
                .chunks_exact(dim)
                .zip(yb.chunks_exact_mut(dim))
                .zip(hb.chunks_exact_mut(dim))
                .zip(rb.iter_mut())
            {
                let mean = xr.iter().sum::<f32>() / dim as f32;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                *r = rstd;
                for ((h, o), (&v, (&g, &b))) in hr
                    .iter_mut()
                    .zip(yr.iter_mut())
                    .zip(xr.iter().zip(gamma.iter().zip(beta)))
                {
                    *h = (v - mean) * rstd;
                    *o = *h * g + b;
                }
            }
        });
    saved
}

/// Backward of `layer_norm_forward`: `dx (+)= ...`, `dgamma += Σ dy·xhat`, `dbeta += Σ dy`.
pub fn layer_norm_backward(
    dy: &[f32],
    saved: &LayerNormSaved,
    gamma: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let dim = gamma.len();
    let rows = dy.len() / dim;
    let per = row_block(rows);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dy
        .par_chunks(per * dim)
        .zip(dx.par_chunks_mut(per * dim))
        .zip(saved.xhat.par_chunks(per * dim))
        .zip(saved.rstd.par_chunks(per))
        .map(|(((gb, xb), hb), rb)| {
            let mut dg = vec![0f32; dim];
            let mut dbt = vec![0f32; dim];
            for (((gr, xr), hr), &rstd) in gb
                .chunks_exact(dim)
                .zip(xb.chunks_exact_mut(dim))
                .zip(hb.chunks_exact(dim))
                .zip(rb)
            {
                let (mut s1, mut s2) = (0f32, 0f32);
                for j in 0..dim {
                    let dh = gr[j] * gamma[j];
                    s1 += dh;
                    s2 += dh * hr[j];
                    dg[j] += gr[j] * hr[j];
                    dbt[j] += gr[j];
                }
                let (m1, m2) = (s1 / dim as f32, s2 / dim as f32);
                for j in 0..dim {
                    let v = rstd * (gr[j] * gamma[j] - m1 - hr[j] * m2);
                    if accumulate {
                        xr[j] += v;
                    } else {
                        xr[j] = v;
                    }
                }
            }
            (dg, dbt)
        })
        .collect();
    for (dg, dbt) in &partials {
        for j in 0..dim {
            dgamma[j] += dg[j];
            dbeta[j] += dbt[j];
        }
    }
}

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
            simd(|| match mask {
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
            })
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

/// Keep freed memory in the process for the next step instead of handing it back to the OS:
/// a training step (or an utterance of extract) frees and reallocates the same large
/// activation buffers every time, and
/// glibc's defaults (mmap for blocks over 128 KiB, trimming the heap top) made the kernel zero
/// fresh pages for every buffer of every step (a quarter of step time in page faults).
pub fn reserve_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator thresholds; called before the hot loop.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // one arena: a thread arena's heaps are capped at 64 MiB, so large buffers allocated
        // on pool threads would fall back to mmap (and fresh zeroed pages) every time
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `src` `[rows, cols]` → `[cols, rows]`: 16×16 tiles through a local buffer (whole-row reads
/// and writes), output rows spread over the pool.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut dst = vec![0f32; rows * cols];
    if rows * cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(bi, out)| {
            let c0 = bi * T;
            let tc = out.len() / rows;
            let mut tile = [[0f32; T]; T];
            for r0 in (0..rows).step_by(T) {
                let tr = T.min(rows - r0);
                for (i, line) in tile.iter_mut().enumerate().take(tr) {
                    let at = (r0 + i) * cols + c0;
                    line[..tc].copy_from_slice(&src[at..at + tc]);
                }
                for j in 0..tc {
                    for (i, o) in out[j * rows + r0..j * rows + r0 + tr]
                        .iter_mut()
                        .enumerate()
                    {
                        *o = tile[i][j];
                    }
                }
            }
        });
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_on_strided_views() {
        for &(m, n, k) in &[(3, 5, 7), (130, 70, 90), (20, 300, 65)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
            // a as stored transposed, b row-major
            let at = Mat::rows(&a, m).t();
            let want = naive(m, n, k, at, Mat::rows(&b, n));
            let mut got = vec![1f32; m * n];
            matmul(m, n, k, &mut got, n, at, Mat::rows(&b, n), false);
            assert_eq!(got, want);
            matmul(m, n, k, &mut got, n, at, Mat::rows(&b, n), true);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(*g, 2.0 * w);
            }
        }
    }

    #[test]
    fn transpose_moves_every_value_on_ragged_shapes() {
        for (rows, cols) in [
            (1, 1),
            (1, 5),
            (5, 1),
            (16, 16),
            (37, 21),
            (100, 33),
            (33, 100),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let dst = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
