//! Gemm on strided views for the f32 CPU executors (the SSL encoder's and the Conformer
//! trainer's): matmuls through `gemm` on strided views (no transposing copies), linear layers
//! with their backward, column sums and transposes, each split over the rayon pool in coarse
//! row blocks so that two cores never hand work back and forth per op.
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

/// Fixed number of reduction groups of [`grouped_sum`] (independent of the thread count, so
/// sums are deterministic).
const GROUPS: usize = 8;

/// Runs `f(item, acc)` for every item, items dealt round-robin into a fixed number of groups
/// that run in parallel, each summing into its own zeroed accumulator of `acc_len`; returns the
/// sum of the accumulators in group order (the same bits at any thread count).
pub fn grouped_sum<T: Send>(
    items: Vec<T>,
    acc_len: usize,
    f: impl Fn(T, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut groups: Vec<Vec<T>> = (0..GROUPS).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        groups[i % GROUPS].push(item);
    }
    let partials: Vec<Vec<f32>> = groups
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![0f32; if group.is_empty() { 0 } else { acc_len }];
            for item in group {
                f(item, &mut acc);
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; acc_len];
    for p in partials.iter().filter(|p| !p.is_empty()) {
        for (s, &v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
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
