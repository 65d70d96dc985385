//! The forward of the 3x3, padding-1 convolution (`conv::conv3x3`) by Winograd's
//! F(2x2, 3x3): each 2x2 block of output pixels comes from its 4x4 input tile with 16
//! products per channel pair instead of 36, so the 16 GEMMs (one per tile position,
//! `[tiles, C] @ [C, O]`) do 2.25x less work than the patch-matrix product. The
//! convolution's backward does not depend on how the forward was computed, so it stays
//! the patch kernel's.
//!
//! With `d` a 4x4 input tile and `g` a 3x3 filter, `Y = A^T [(G g G^T) * (B^T d B)] A`:
//! ```text
//! B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//! G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//! A^T = [1 1 1 0; 0 1 -1 -1]
//! ```
//! Every transform runs across channels (channels-last), so its loops vectorise.

use super::blas::sgemm_raw;
use super::cpu::{SendPtr, output_vec, per_item};
use super::simd::simd_fn;
use rayon::prelude::*;

/// Floats of transformed input per work item (8 MiB), as for the patch-matrix kernel.
const BUFFER: usize = 2 << 20;

/// `U[p][o][c]` = `(G g G^T)[p]` for the filter `g` of `(o, c)`, `p = 4*row + col`: 16
/// `[O, C]` matrices (used transposed). From tap-major rows `[O, 9C]`, whose row `o` holds
/// tap `k`'s channels at `k*C..`: the transform runs across channels as it reads them.
fn filter_transform(rows: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = output_vec(16 * o * c);
    let pu = SendPtr(u.as_mut_ptr());
    rows.par_chunks_exact(9 * c)
        .enumerate()
        .for_each(|(oi, taps)| {
            // SAFETY: rows (p, oi) of U lie inside it, and only this item (output
            // channel oi) touches them.
            let mut out: [&mut [f32]; 16] = std::array::from_fn(|p| unsafe {
                std::slice::from_raw_parts_mut(pu.get().add((p * o + oi) * c), c)
            });
            filter_rows(taps, &mut out, c);
        });
    u
}

simd_fn!(
    // `G g G^T` for each input channel: `taps[k*c + ci]` in, `rows[p][ci]` out.
    fn filter_rows(taps: &[f32], rows: &mut [&mut [f32]; 16], c: usize) {
        assert!(taps.len() >= 9 * c && rows.iter().all(|r| r.len() == c));
        for ci in 0..c {
            // SAFETY: k*c + ci < 9*c <= taps.len().
            let g = |k: usize| unsafe { *taps.get_unchecked(k * c + ci) };
            // G g: 4 rows of 3.
            let mut gg = [[0f32; 3]; 4];
            // The transform's matrices written out: indices read as the math does.
            #[allow(clippy::needless_range_loop)]
            for k in 0..3 {
                let (g0, g1, g2) = (g(k), g(3 + k), g(6 + k));
                gg[0][k] = g0;
                gg[1][k] = 0.5 * (g0 + g1 + g2);
                gg[2][k] = 0.5 * (g0 - g1 + g2);
                gg[3][k] = g2;
            }
            // (G g) G^T.
            for (r, row) in gg.iter().enumerate() {
                let (a, b, d) = (row[0], row[1], row[2]);
                let vals = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (col, v) in vals.into_iter().enumerate() {
                    // SAFETY: ci < c, every row's length (checked above).
                    unsafe { *rows[4 * r + col].get_unchecked_mut(ci) = v };
                }
            }
        }
    }
);

/// `V[p][t][c]` for tiles `t0..t0+n` (flat over `B * H/2 * W/2`) into `v` (`16 * n * C`).
fn input_transform(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    t0: usize,
    n: usize,
    v: &mut [f32],
) {
    let (_, h, w, c) = dims;
    let (th, tw) = (h / 2, w / 2);
    let zeros = vec![0f32; c];
    for t in 0..n {
        let tile = t0 + t;
        let (b, ty, tx) = (tile / (th * tw), (tile / tw) % th, tile % tw);
        // The 16 channel vectors of the tile (rows 2ty-1.., cols 2tx-1..; zero outside).
        let d: [&[f32]; 16] = std::array::from_fn(|k| {
            let (y, xx) = ((2 * ty + k / 4) as isize - 1, (2 * tx + k % 4) as isize - 1);
            if y < 0 || y >= h as isize || xx < 0 || xx >= w as isize {
                &zeros[..]
            } else {
                let at = ((b * h + y as usize) * w + xx as usize) * c;
                &x[at..at + c]
            }
        });
        transform_tile(&d, v, t, n, c);
    }
}

simd_fn!(
    fn transform_tile(d: &[&[f32]; 16], v: &mut [f32], t: usize, n: usize, c: usize) {
        assert!(d.iter().all(|s| s.len() == c) && v.len() >= 16 * n * c && t < n);
        let base = v.as_mut_ptr();
        for ci in 0..c {
            // SAFETY: ci < c = every slice's length (checked above).
            let e = |k: usize| unsafe { *d[k].get_unchecked(ci) };
            // B^T d, column by column.
            let mut r = [[0f32; 4]; 4];
            #[allow(clippy::needless_range_loop)]
            for j in 0..4 {
                let (d0, d1, d2, d3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                r[0][j] = d0 - d2;
                r[1][j] = d1 + d2;
                r[2][j] = d2 - d1;
                r[3][j] = d1 - d3;
            }
            // (B^T d) B, into V[p][t][ci].
            for (i, row) in r.iter().enumerate() {
                let vals = [
                    row[0] - row[2],
                    row[1] + row[2],
                    row[2] - row[1],
                    row[1] - row[3],
                ];
                for (j, val) in vals.into_iter().enumerate() {
                    // SAFETY: ((4i+j)*n + t)*c + ci < 16*n*c <= v.len() (checked above).
                    unsafe { *base.add(((4 * i + j) * n + t) * c + ci) = val };
                }
            }
        }
    }
);

simd_fn!(
    // `Y = A^T M A + bias` for each tile of the block, written to its 2x2 output pixels.
    fn output_transform(
        m: &[f32],
        bias: &[f32],
        dims: (usize, usize, usize, usize),
        t0: usize,
        n: usize,
        y: SendPtr,
    ) {
        let (_, h, w, _) = dims;
        let o = bias.len();
        let (th, tw) = (h / 2, w / 2);
        for t in 0..n {
            let tile = t0 + t;
            let (b, ty, tx) = (tile / (th * tw), (tile / tw) % th, tile % tw);
            let px = |a: usize, bb: usize| ((b * h + 2 * ty + a) * w + 2 * tx + bb) * o;
            // SAFETY: the four pixels of this tile are written by this call alone.
            let out: [&mut [f32]; 4] = std::array::from_fn(|k| unsafe {
                std::slice::from_raw_parts_mut(y.get().add(px(k / 2, k % 2)), o)
            });
            let [y00, y01, y10, y11] = out;
            let rows: [&[f32]; 16] = std::array::from_fn(|p| &m[(p * n + t) * o..][..o]);
            for oi in 0..o {
                // SAFETY: oi < o, every row's length.
                let e = |p: usize| unsafe { *rows[p].get_unchecked(oi) };
                // A^T M: two rows of four.
                let mut s = [[0f32; 4]; 2];
                #[allow(clippy::needless_range_loop)]
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                    s[0][j] = m0 + m1 + m2;
                    s[1][j] = m1 - m2 - m3;
                }
                let bo = bias[oi];
                y00[oi] = s[0][0] + s[0][1] + s[0][2] + bo;
                y01[oi] = s[0][1] - s[0][2] - s[0][3] + bo;
                y10[oi] = s[1][0] + s[1][1] + s[1][2] + bo;
                y11[oi] = s[1][1] - s[1][2] - s[1][3] + bo;
            }
        }
    }
);

/// Whether Winograd serves a map of `h x w` pixels and `c` channels: even sizes, and at
/// least 64 channels (measured at 256 and 512: a conv in half the time; the 4-channel
/// stem is left to the patch kernel, where the transforms would cost more than they save).
pub(super) fn applies(h: usize, w: usize, c: usize) -> bool {
    h.is_multiple_of(2) && w.is_multiple_of(2) && c >= 64
}

/// `conv3x3(x) + bias` for `x` `[B, H, W, C]` (dims as given, `applies`), tap-major rows
/// `[O, 9C]` and `bias` `[O]`; the output `[B, H, W, O]`.
pub(super) fn conv3x3(
    dims: (usize, usize, usize, usize),
    x: &[f32],
    rows: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    let (b, h, w, c) = dims;
    let o = bias.len();
    let u = filter_transform(rows, o, c);
    let tiles = b * (h / 2) * (w / 2);
    let per = per_item(tiles, (BUFFER / (16 * c.max(o))).clamp(16, 1024));
    let mut y = output_vec(b * h * w * o);
    let py = SendPtr(y.as_mut_ptr());
    (0..tiles.div_ceil(per)).into_par_iter().for_each_init(
        || (output_vec(16 * per * c), output_vec(16 * per * o)),
        |(v, m), item| {
            let t0 = item * per;
            let n = per.min(tiles - t0);
            input_transform(x, dims, t0, n, v);
            for p in 0..16 {
                // SAFETY: V_p is [n, c] at p*n*c, U_p [o, c] at p*o*c, M_p [n, o] at
                // p*n*o, all inside their buffers.
                unsafe {
                    sgemm_raw(
                        false,
                        true,
                        n,
                        o,
                        c,
                        1.0,
                        v.as_ptr().add(p * n * c),
                        c,
                        u.as_ptr().add(p * o * c),
                        c,
                        0.0,
                        m.as_mut_ptr().add(p * n * o),
                        o,
                    )
                };
            }
            output_transform(m, bias, dims, t0, n, py);
        },
    );
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{blas_or_skip, max_abs_diff};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_candle_conv2d() {
        if !blas_or_skip("the Winograd convolution") {
            return;
        }
        let dev = &Device::Cpu;
        // Several work items, tiles on every border, channels in and out unequal.
        for (b, h, w, c, o) in [(3, 6, 10, 64, 72), (2, 16, 16, 96, 64)] {
            let x = Tensor::randn(0f32, 1.0, (b, h, w, c), dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (o, c, 3, 3), dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, o, dev).unwrap();
            let rows = wt.permute((0, 2, 3, 1)).unwrap().flatten_from(1).unwrap();
            let vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ours = conv3x3((b, h, w, c), &vec(&x), &vec(&rows), &vec(&bias));
            let ours = Tensor::from_vec(ours, (b, h, w, o), dev).unwrap();
            let theirs = x
                .permute((0, 3, 1, 2))
                .unwrap()
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap();
            let scale = theirs
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(&ours, &theirs);
            assert!(
                d < 2e-5 * scale,
                "{b}x{h}x{w}x{c}->{o}: off by {d} (scale {scale})"
            );
        }
    }
}
