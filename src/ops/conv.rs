//! 3×3 convolutions (no padding, any stride) of one channels-last image `[rows, cols, C]`
//! through im2col and gemm, forward and backward, and the re-layouts between torch's weights
//! and the engine's. Stride 1 with many channels has a faster path in [`super::winograd`].
use super::gemm::{matmul_serial, Mat};

/// Output rows per im2col block when there are several input channels (bounds the im2col
/// buffer's memory: `rows × cols × 9 C`).
const ROW_BLOCK: usize = 48;

/// Shape of one 3×3 convolution over a channels-last image.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Input rows (time) and columns (frequency).
    pub rows: usize,
    pub cols: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
    /// Output rows to compute (`..=` [`Geometry::all_out_rows`]); later rows are left alone.
    pub out_rows: usize,
}

impl Geometry {
    pub fn out_cols(&self) -> usize {
        (self.cols - 3) / self.stride + 1
    }

    pub fn all_out_rows(&self) -> usize {
        (self.rows - 3) / self.stride + 1
    }

    /// im2col block height: one channel's im2col is small (9 columns), so one block.
    fn block(&self) -> usize {
        if self.c_in == 1 {
            self.out_rows.max(1)
        } else {
            ROW_BLOCK
        }
    }
}

/// Rows of im2col for output rows `row0..row0 + rows` (all output columns): `[rows × out_cols,
/// 9 C]`, column `(kt * 3 + kf) * C + c`.
pub fn im2col(x: &[f32], geo: &Geometry, (row0, rows): (usize, usize), col: &mut Vec<f32>) {
    let (c, oc, s) = (geo.c_in, geo.out_cols(), geo.stride);
    col.resize(rows * oc * 9 * c, 0.0);
    for ti in 0..rows {
        for fi in 0..oc {
            let o = &mut col[(ti * oc + fi) * 9 * c..][..9 * c];
            for kt in 0..3 {
                for kf in 0..3 {
                    let src = ((s * (row0 + ti) + kt) * geo.cols + s * fi + kf) * c;
                    if c == 1 {
                        // one channel: a plain store (a slice copy per tap costs a call)
                        o[kt * 3 + kf] = x[src];
                    } else {
                        o[(kt * 3 + kf) * c..][..c].copy_from_slice(&x[src..src + c]);
                    }
                }
            }
        }
    }
}

/// Scatter-add of an [`im2col`] block's gradient back into `dx` `[rows, cols, C]`.
pub fn col2im_add(dcol: &[f32], geo: &Geometry, (row0, rows): (usize, usize), dx: &mut [f32]) {
    let (c, oc, s) = (geo.c_in, geo.out_cols(), geo.stride);
    for ti in 0..rows {
        for fi in 0..oc {
            let g = &dcol[(ti * oc + fi) * 9 * c..][..9 * c];
            for kt in 0..3 {
                for kf in 0..3 {
                    let dst = ((s * (row0 + ti) + kt) * geo.cols + s * fi + kf) * c;
                    for (a, &v) in dx[dst..dst + c]
                        .iter_mut()
                        .zip(&g[(kt * 3 + kf) * c..][..c])
                    {
                        *a += v;
                    }
                }
            }
        }
    }
}

/// Every `[C]` row of `y` set to `bias`.
pub fn fill_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `y [out_rows, out_cols, C_out] = epilogue(bias + conv(x, w))` for the first `geo.out_rows`
/// output rows, with `w_taps` in [`weight_taps_last`] layout `[C_out, 9 C_in]`; `epilogue`
/// (an activation, or nothing) runs on each block while it is in cache.
pub fn forward(
    x: &[f32],
    geo: &Geometry,
    (w_taps, bias): (&[f32], &[f32]),
    y: &mut [f32],
    epilogue: impl Fn(&mut [f32]),
) {
    let (oc, co, k) = (geo.out_cols(), geo.c_out, 9 * geo.c_in);
    let mut col = Vec::new();
    for row0 in (0..geo.out_rows).step_by(geo.block()) {
        let rows = geo.block().min(geo.out_rows - row0);
        im2col(x, geo, (row0, rows), &mut col);
        let out = &mut y[row0 * oc * co..][..rows * oc * co];
        fill_bias(out, bias);
        let (a, w) = (Mat::rows(&col, k), Mat::rows(w_taps, k).t());
        matmul_serial(rows * oc, co, k, out, co, a, w, true);
        epilogue(out);
    }
}

/// Backward of [`forward`] over its first `geo.out_rows` output rows: `dw_taps += dyᵀ · col`
/// (`[C_out, 9 C_in]`, taps-last) and, when given, `dx += col2im(dy · w)`.
pub fn backward(
    x: &[f32],
    geo: &Geometry,
    w_taps: &[f32],
    dy: &[f32],
    dw_taps: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    let (oc, co, k) = (geo.out_cols(), geo.c_out, 9 * geo.c_in);
    let mut col = Vec::new();
    let mut dcol = Vec::new();
    for row0 in (0..geo.out_rows).step_by(geo.block()) {
        let rows = geo.block().min(geo.out_rows - row0);
        let n = rows * oc;
        im2col(x, geo, (row0, rows), &mut col);
        let g = &dy[row0 * oc * co..][..n * co];
        let (gt, c) = (Mat::rows(g, co).t(), Mat::rows(&col, k));
        matmul_serial(co, k, n, dw_taps, k, gt, c, true);
        if let Some(dx) = dx.as_deref_mut() {
            dcol.resize(n * k, 0.0);
            let (g, w) = (Mat::rows(g, co), Mat::rows(w_taps, k));
            matmul_serial(n, k, co, &mut dcol, k, g, w, false);
            col2im_add(&dcol, geo, (row0, rows), dx);
        }
    }
}

/// torch conv weight `[C_out, C_in, 3, 3]` → `[C_out, 9 C_in]` with column
/// `(kt * 3 + kf) * C_in + c` (the im2col column order).
pub fn weight_taps_last(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..c_out {
        for ci in 0..c_in {
            for tap in 0..9 {
                out[o * 9 * c_in + tap * c_in + ci] = w[(o * c_in + ci) * 9 + tap];
            }
        }
    }
    out
}

/// Adds a taps-last `[C_out, 9 C_in]` gradient into torch's `[C_out, C_in, 3, 3]` layout.
pub fn add_weight_grad_torch_layout(g: &[f32], c_out: usize, c_in: usize, acc: &mut [f32]) {
    for o in 0..c_out {
        for ci in 0..c_in {
            for tap in 0..9 {
                acc[(o * c_in + ci) * 9 + tap] += g[o * 9 * c_in + tap * c_in + ci];
            }
        }
    }
}

/// A Linear weight `[out, C F]` over torch's channel-major flattening of a `[C, F]` feature map
/// (ESPnet's `Conv2dSubsampling.out`) → `[out, F C]` for the channels-last map.
pub fn flatten_weight_freq_major(w: &[f32], odim: usize, c: usize, f: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..odim {
        for ci in 0..c {
            for fi in 0..f {
                out[o * f * c + fi * c + ci] = w[o * c * f + ci * f + fi];
            }
        }
    }
    out
}

/// Adds a `[out, F C]` gradient into the channel-major `[out, C F]` layout.
pub fn add_flatten_grad_channel_major(g: &[f32], odim: usize, c: usize, f: usize, acc: &mut [f32]) {
    for o in 0..odim {
        for ci in 0..c {
            for fi in 0..f {
                acc[o * c * f + ci * f + fi] += g[o * f * c + fi * c + ci];
            }
        }
    }
}
