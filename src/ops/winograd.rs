//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016),
//! forward and backward, on channels-last images `[rows, cols, C]`.
//!
//! Each 2×2 output tile reads a 4×4 input tile; in the transformed domain the 3×3 filter
//! becomes 16 independent `[tiles, C_in] · [C_in, C_out]` products, 16 multiply-adds per tile
//! and channel pair instead of 36, so the three passes of a training step (output, input
//! gradient, filter gradient) each do 2.25× fewer multiply-adds than im2col + gemm. The
//! backward passes follow from the trilinear form `Σ y*·y = Σ_k (A y*)_k (G g)_k (Bᵀ d)_k`:
//! the filter gradient is `Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ (Bᵀ d B)] G` and the input gradient
//! overlap-adds `B [(A dy Aᵀ) ⊙ U] Bᵀ` per tile, with the same transformed `dy` for both.
//!
//! Used for ESPnet's `Conv2dSubsampling2` second convolution (C → C, stride 1) by the CPU
//! training engine; everything is single-threaded per image (callers split images over the
//! pool), so results do not depend on the thread count.
use crate::ops::gemm::{matmul_serial, Mat};

/// Transformed positions per tile (4 × 4).
const K: usize = 16;

/// Tiles transformed and multiplied together (bounds the scratch to ~16 × 512 × C floats).
const TILES_PER_BLOCK: usize = 512;

/// The filter transform `U_k = (G g Gᵀ)_k` of a torch conv weight `[C_out, C_in, 3, 3]`,
/// laid out `[16, C_in, C_out]` (one `C_in × C_out` matrix per transformed position).
pub fn transform_filter(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        c_out * c_in * 9,
        "winograd: filter is not [C_out, C_in, 3, 3]"
    );
    let mut u = vec![0f32; K * c_in * c_out];
    for o in 0..c_out {
        for c in 0..c_in {
            let g = &w[(o * c_in + c) * 9..][..9];
            // rows: G g (4 × 3), then columns: (G g) Gᵀ (4 × 4)
            let mut gg = [[0f32; 3]; 4];
            for col in 0..3 {
                let x = [g[col], g[3 + col], g[6 + col]];
                let y = g_apply(x);
                for r in 0..4 {
                    gg[r][col] = y[r];
                }
            }
            for (r, row) in gg.iter().enumerate() {
                let y = g_apply(*row);
                for (q, &v) in y.iter().enumerate() {
                    u[((r * 4 + q) * c_in + c) * c_out + o] = v;
                }
            }
        }
    }
    u
}

/// `G x` for `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn g_apply(x: [f32; 3]) -> [f32; 4] {
    [
        x[0],
        0.5 * (x[0] + x[1] + x[2]),
        0.5 * (x[0] - x[1] + x[2]),
        x[2],
    ]
}

/// `Gᵀ x` (4 → 3).
fn gt_apply(x: [f32; 4]) -> [f32; 3] {
    [
        x[0] + 0.5 * (x[1] + x[2]),
        0.5 * (x[1] - x[2]),
        0.5 * (x[1] + x[2]) + x[3],
    ]
}

/// Adds the filter gradient held in the transformed domain (`acc` `[16, C_out, C_in]`, as
/// summed by [`backward`]) to `dw` in torch's `[C_out, C_in, 3, 3]` layout: `Gᵀ acc G`.
pub fn add_filter_grad(acc: &[f32], c_out: usize, c_in: usize, dw: &mut [f32]) {
    assert_eq!(acc.len(), K * c_out * c_in, "winograd: accumulator size");
    assert_eq!(dw.len(), c_out * c_in * 9, "winograd: gradient size");
    for o in 0..c_out {
        for c in 0..c_in {
            let m = |k: usize| acc[(k * c_out + o) * c_in + c];
            // columns first: each row r of the 4 × 4 → 3 values
            let mut rows = [[0f32; 3]; 4];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = gt_apply([m(r * 4), m(r * 4 + 1), m(r * 4 + 2), m(r * 4 + 3)]);
            }
            let g = &mut dw[(o * c_in + c) * 9..][..9];
            for q in 0..3 {
                let y = gt_apply([rows[0][q], rows[1][q], rows[2][q], rows[3][q]]);
                for a in 0..3 {
                    g[a * 3 + q] += y[a];
                }
            }
        }
    }
}

/// Transformed position `k` of a `[tiles, 16, width]` buffer, as a `[tiles, width]` view.
fn position(buf: &[f32], k: usize, width: usize) -> Mat<'_> {
    Mat {
        data: &buf[k * width..],
        rs: K * width,
        cs: 1,
    }
}

/// One channels-last image and the part of the output that is wanted.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Input rows present in the buffer (`[rows, cols, c_in]`); rows past it read as zero.
    pub rows: usize,
    /// Input columns; the output has `cols - 2`.
    pub cols: usize,
    pub c_in: usize,
    pub c_out: usize,
    /// Output rows computed (at most `rows - 2`); later rows are not touched (forward) or
    /// hold no gradient (backward).
    pub out_rows: usize,
}

impl Geometry {
    fn out_cols(&self) -> usize {
        self.cols - 2
    }
    fn tile_cols(&self) -> usize {
        self.out_cols().div_ceil(2)
    }
    fn tile_rows(&self) -> usize {
        self.out_rows.div_ceil(2)
    }
    /// Panics unless there is a 3 × 3 output and the buffers (`x`, and the output or its
    /// gradient) hold the geometry.
    fn check(&self, x_len: usize, out_len: usize, out_what: &str) {
        assert!(
            self.cols >= 3 && self.out_rows + 2 <= self.rows,
            "winograd: {self:?} has no 3 × 3 output"
        );
        assert!(
            x_len >= self.rows * self.cols * self.c_in,
            "winograd: input size"
        );
        let out = self.out_rows * self.out_cols() * self.c_out;
        assert!(out_len >= out, "winograd: {out_what} size");
    }
    /// Tile rows per block.
    fn block_rows(&self) -> usize {
        (TILES_PER_BLOCK / self.tile_cols().max(1)).max(1)
    }
}

/// `y[r, c, o] += Σ_{a, b, i} x[r + a, c + b, i] · w[o, i, a, b]` for `r < out_rows`, all
/// `cols - 2` output columns; `y` is `[out_rows.., cols - 2, c_out]` (rows past `out_rows`
/// untouched) and `u` is [`transform_filter`] of `w`.
pub fn forward(x: &[f32], geo: Geometry, u: &[f32], y: &mut [f32]) {
    geo.check(x.len(), y.len(), "output");
    let (c_in, c_out, oc) = (geo.c_in, geo.c_out, geo.out_cols());
    assert_eq!(u.len(), K * c_in * c_out, "winograd: filter size");
    let tc = geo.tile_cols();
    let mut v = Vec::new();
    let mut m = Vec::new();
    for tr0 in (0..geo.tile_rows()).step_by(geo.block_rows()) {
        let tr1 = (tr0 + geo.block_rows()).min(geo.tile_rows());
        let tiles = (tr1 - tr0) * tc;
        input_transform(x, &geo, tr0..tr1, &mut v);
        m.resize(tiles * K * c_out, 0.0);
        for k in 0..K {
            matmul_serial(
                tiles,
                c_out,
                c_in,
                &mut m[k * c_out..],
                K * c_out,
                position(&v, k, c_in),
                Mat::rows(&u[k * c_in * c_out..][..c_in * c_out], c_out),
                false,
            );
        }
        let mut s = vec![0f32; 8 * c_out];
        let mut out4 = vec![0f32; 4 * c_out];
        for t in 0..tiles {
            let (ti, tj) = (tr0 + t / tc, t % tc);
            let mt = &m[t * K * c_out..][..K * c_out];
            let row = |k: usize| &mt[k * c_out..][..c_out];
            // Y = Aᵀ M A with Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]: rows, then columns
            for q in 0..4 {
                let (s0, s1) = s.split_at_mut(4 * c_out);
                add3(
                    &mut s0[q * c_out..][..c_out],
                    row(q),
                    row(4 + q),
                    row(8 + q),
                );
                sub3(
                    &mut s1[q * c_out..][..c_out],
                    row(4 + q),
                    row(8 + q),
                    row(12 + q),
                );
            }
            for r in 0..2 {
                let sr = &s[r * 4 * c_out..][..4 * c_out];
                let sq = |q: usize| &sr[q * c_out..][..c_out];
                let (y0, y1) = out4[2 * r * c_out..][..2 * c_out].split_at_mut(c_out);
                add3(y0, sq(0), sq(1), sq(2));
                sub3(y1, sq(1), sq(2), sq(3));
            }
            for dr in 0..2 {
                let r = 2 * ti + dr;
                if r >= geo.out_rows {
                    break;
                }
                for dc in 0..2 {
                    let col = 2 * tj + dc;
                    if col >= oc {
                        break;
                    }
                    let out = &mut y[(r * oc + col) * c_out..][..c_out];
                    let src = &out4[(dr * 2 + dc) * c_out..][..c_out];
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o += v;
                    }
                }
            }
        }
    }
}

/// `out = a + b + c`.
fn add3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    let n = out.len();
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    for i in 0..n {
        out[i] = a[i] + b[i] + c[i];
    }
}

/// `out = a - b - c`.
fn sub3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    let n = out.len();
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    for i in 0..n {
        out[i] = a[i] - b[i] - c[i];
    }
}

/// `Bᵀ d B` of every 4 × 4 input tile of tile rows `tiles`, into `v` `[tiles, 16, c_in]`;
/// input outside the image reads as zero.
fn input_transform(x: &[f32], geo: &Geometry, tile_rows: std::ops::Range<usize>, v: &mut Vec<f32>) {
    let (c, tc) = (geo.c_in, geo.tile_cols());
    let tiles = tile_rows.len() * tc;
    v.resize(tiles * K * c, 0.0);
    let zero = vec![0f32; c];
    let mut t_buf = vec![0f32; 16 * c];
    for (t, vt) in v.chunks_exact_mut(K * c).enumerate() {
        let (ti, tj) = (tile_rows.start + t / tc, t % tc);
        let d = |r: usize, q: usize| -> &[f32] {
            let (row, col) = (2 * ti + r, 2 * tj + q);
            if row < geo.rows && col < geo.cols {
                &x[(row * geo.cols + col) * c..][..c]
            } else {
                &zero
            }
        };
        // rows: t = Bᵀ d, Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        for q in 0..4 {
            let (d0, d1, d2, d3) = (d(0, q), d(1, q), d(2, q), d(3, q));
            let (t01, t23) = t_buf.split_at_mut(8 * c);
            let (t0, t1) = t01.split_at_mut(4 * c);
            let (t2, t3) = t23.split_at_mut(4 * c);
            let (t0, t1, t2, t3) = (
                &mut t0[q * c..][..c],
                &mut t1[q * c..][..c],
                &mut t2[q * c..][..c],
                &mut t3[q * c..][..c],
            );
            for i in 0..c {
                t0[i] = d0[i] - d2[i];
                t1[i] = d1[i] + d2[i];
                t2[i] = d2[i] - d1[i];
                t3[i] = d1[i] - d3[i];
            }
        }
        // columns: V = t B
        for p in 0..4 {
            let tp = &t_buf[p * 4 * c..][..4 * c];
            let (s0, s1, s2, s3) = (&tp[..c], &tp[c..2 * c], &tp[2 * c..3 * c], &tp[3 * c..]);
            let out = &mut vt[p * 4 * c..][..4 * c];
            let (o01, o23) = out.split_at_mut(2 * c);
            let (o0, o1) = o01.split_at_mut(c);
            let (o2, o3) = o23.split_at_mut(c);
            for i in 0..c {
                o0[i] = s0[i] - s2[i];
                o1[i] = s1[i] + s2[i];
                o2[i] = s2[i] - s1[i];
                o3[i] = s1[i] - s3[i];
            }
        }
    }
}

/// Backward of [`forward`] for the output gradient `dy` (`[out_rows.., cols - 2, c_out]`, rows
/// past `out_rows` ignored): adds the filter gradient, in the transformed domain, to `acc`
/// `[16, c_out, c_in]` (finish with [`add_filter_grad`]) and, when given, the input gradient to
/// `dx` `[rows, cols, c_in]`.
pub fn backward(
    x: &[f32],
    geo: Geometry,
    u: &[f32],
    dy: &[f32],
    acc: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    geo.check(x.len(), dy.len(), "gradient");
    let (c_in, c_out, oc) = (geo.c_in, geo.c_out, geo.out_cols());
    assert_eq!(acc.len(), K * c_out * c_in, "winograd: accumulator size");
    if let Some(dx) = dx.as_deref() {
        assert!(
            dx.len() >= geo.rows * geo.cols * c_in,
            "winograd: input gradient size"
        );
    }
    let tc = geo.tile_cols();
    let (mut v, mut z, mut p) = (Vec::new(), Vec::new(), Vec::new());
    let zero = vec![0f32; c_out];
    for tr0 in (0..geo.tile_rows()).step_by(geo.block_rows()) {
        let tr1 = (tr0 + geo.block_rows()).min(geo.tile_rows());
        let tiles = (tr1 - tr0) * tc;
        input_transform(x, &geo, tr0..tr1, &mut v);
        // Z = A dy Aᵀ with A = [[1, 0], [1, 1], [1, -1], [0, -1]]
        z.resize(tiles * K * c_out, 0.0);
        for (t, zt) in z.chunks_exact_mut(K * c_out).enumerate() {
            let (ti, tj) = (tr0 + t / tc, t % tc);
            let g = |dr: usize, dc: usize| -> &[f32] {
                let (r, col) = (2 * ti + dr, 2 * tj + dc);
                if r < geo.out_rows && col < oc {
                    &dy[(r * oc + col) * c_out..][..c_out]
                } else {
                    &zero
                }
            };
            let (g00, g01, g10, g11) = (g(0, 0), g(0, 1), g(1, 0), g(1, 1));
            // rows of A·dy: [y0, y0 + y1, y0 - y1, -y1] for each column
            for (kr, (w0, w1)) in [(1f32, 0f32), (1.0, 1.0), (1.0, -1.0), (0.0, -1.0)]
                .into_iter()
                .enumerate()
            {
                for (kc, (e0, e1)) in [(1f32, 0f32), (1.0, 1.0), (1.0, -1.0), (0.0, -1.0)]
                    .into_iter()
                    .enumerate()
                {
                    let (a, b, cc, d) = (w0 * e0, w0 * e1, w1 * e0, w1 * e1);
                    let out = &mut zt[(kr * 4 + kc) * c_out..][..c_out];
                    for i in 0..c_out {
                        out[i] = a * g00[i] + b * g01[i] + cc * g10[i] + d * g11[i];
                    }
                }
            }
        }
        for k in 0..K {
            // acc_k[o, c] += Σ_tiles Z_k[tile, o] V_k[tile, c]
            matmul_serial(
                c_out,
                c_in,
                tiles,
                &mut acc[k * c_out * c_in..][..c_out * c_in],
                c_in,
                position(&z, k, c_out).t(),
                position(&v, k, c_in),
                true,
            );
        }
        let Some(dx) = dx.as_deref_mut() else {
            continue;
        };
        p.resize(tiles * K * c_in, 0.0);
        for k in 0..K {
            // P_k[tile, c] = Σ_o Z_k[tile, o] U_k[c, o]
            matmul_serial(
                tiles,
                c_in,
                c_out,
                &mut p[k * c_in..],
                K * c_in,
                position(&z, k, c_out),
                Mat::rows(&u[k * c_in * c_out..][..c_in * c_out], c_out).t(),
                false,
            );
        }
        // dx tile += B P Bᵀ with B x = [x0, x1 - x2 + x3, -x0 + x1 + x2, -x3]: rows, columns
        let mut w = vec![0f32; K * c_in];
        for t in 0..tiles {
            let (ti, tj) = (tr0 + t / tc, t % tc);
            let pt = &p[t * K * c_in..][..K * c_in];
            for q in 0..4 {
                let pk = |r: usize| &pt[(r * 4 + q) * c_in..][..c_in];
                b_apply(&mut w, q, 4, c_in, [pk(0), pk(1), pk(2), pk(3)]);
            }
            for r in 0..4 {
                let row = 2 * ti + r;
                if row >= geo.rows {
                    break;
                }
                let wr = |q: usize| &w[(r * 4 + q) * c_in..][..c_in];
                let (w0, w1, w2, w3) = (wr(0), wr(1), wr(2), wr(3));
                for q in 0..4 {
                    let col = 2 * tj + q;
                    if col >= geo.cols {
                        break;
                    }
                    let out = &mut dx[(row * geo.cols + col) * c_in..][..c_in];
                    match q {
                        0 => out.iter_mut().zip(w0).for_each(|(o, &a)| *o += a),
                        1 => {
                            for i in 0..c_in {
                                out[i] += w1[i] - w2[i] + w3[i];
                            }
                        }
                        2 => {
                            for i in 0..c_in {
                                out[i] += w1[i] + w2[i] - w0[i];
                            }
                        }
                        _ => out.iter_mut().zip(w3).for_each(|(o, &a)| *o -= a),
                    }
                }
            }
        }
    }
}

/// Column `q` of `B x` for the four rows `x` (each `c` long), into `w` `[4, stride, c]`
/// at `(r, q)`: `B x = [x0, x1 - x2 + x3, -x0 + x1 + x2, -x3]`.
fn b_apply(w: &mut [f32], q: usize, stride: usize, c: usize, x: [&[f32]; 4]) {
    let [x0, x1, x2, x3] = x.map(|s| &s[..c]);
    let at = |r: usize| (r * stride + q) * c;
    w[at(0)..][..c].copy_from_slice(x0);
    let o = &mut w[at(1)..][..c];
    for i in 0..c {
        o[i] = x1[i] - x2[i] + x3[i];
    }
    let o = &mut w[at(2)..][..c];
    for i in 0..c {
        o[i] = x1[i] + x2[i] - x0[i];
    }
    let o = &mut w[at(3)..][..c];
    for i in 0..c {
        o[i] = -x3[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Direct convolution and its gradients in f64, by the definition.
    fn direct(x: &[f32], w: &[f32], dy: &[f32], geo: Geometry) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (ci, co, oc) = (geo.c_in, geo.c_out, geo.cols - 2);
        let mut y = vec![0f64; geo.out_rows * oc * co];
        let mut dw = vec![0f64; w.len()];
        let mut dx = vec![0f64; geo.rows * geo.cols * ci];
        for r in 0..geo.out_rows {
            for c in 0..oc {
                for o in 0..co {
                    let g = dy[(r * oc + c) * co + o] as f64;
                    for i in 0..ci {
                        for a in 0..3 {
                            for b in 0..3 {
                                let xi = ((r + a) * geo.cols + c + b) * ci + i;
                                let wi = (o * ci + i) * 9 + a * 3 + b;
                                y[(r * oc + c) * co + o] += x[xi] as f64 * w[wi] as f64;
                                dw[wi] += g * x[xi] as f64;
                                dx[xi] += g * w[wi] as f64;
                            }
                        }
                    }
                }
            }
        }
        (y, dw, dx)
    }

    fn max_err(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn equals_the_direct_convolution_on_ragged_images() {
        // odd and even sizes, tiles cut by the block size, rows past out_rows left alone
        for (rows, cols, ci, co, out_rows) in [
            (9, 7, 3, 5, 7),
            (8, 8, 4, 2, 6),
            (12, 5, 2, 3, 5),
            (3, 3, 1, 1, 1),
            (70, 41, 6, 4, 61),
        ] {
            let geo = Geometry {
                rows,
                cols,
                c_in: ci,
                c_out: co,
                out_rows,
            };
            let x = random(rows * cols * ci, 1);
            let w = random(co * ci * 9, 2);
            let oc = cols - 2;
            let mut dy = random((rows - 2) * oc * co, 3);
            dy[out_rows * oc * co..].fill(0.0);
            let (y_ref, dw_ref, dx_ref) = direct(&x, &w, &dy, geo);
            let u = transform_filter(&w, co, ci);
            let mut y = vec![7f32; (rows - 2) * oc * co];
            y[..out_rows * oc * co].fill(0.0);
            forward(&x, geo, &u, &mut y);
            assert!(
                max_err(&y[..out_rows * oc * co], &y_ref) < 1e-5,
                "forward {geo:?}"
            );
            assert!(
                y[out_rows * oc * co..].iter().all(|&v| v == 7.0),
                "rows past out_rows"
            );
            // garbage past out_rows in dy must not leak in
            let mut dy_dirty = dy.clone();
            dy_dirty[out_rows * oc * co..].fill(1e3);
            let mut acc = vec![0f32; 16 * co * ci];
            let mut dx = vec![0f32; rows * cols * ci];
            backward(&x, geo, &u, &dy_dirty, &mut acc, Some(&mut dx));
            let mut dw = vec![0f32; w.len()];
            add_filter_grad(&acc, co, ci, &mut dw);
            assert!(max_err(&dw, &dw_ref) < 1e-4, "filter gradient {geo:?}");
            assert!(max_err(&dx, &dx_ref) < 1e-5, "input gradient {geo:?}");
        }
    }
}
