//! The position embedding on any token grid (DESIGN.md, Model step 3): `pos_embed` is
//! stored for the `grid x grid` the bridge was built for; another grid `h x w` gets it
//! resized as PyTorch's `F.interpolate(mode="bicubic", align_corners=False,
//! antialias=False)` does. That resize is linear, so it is two fixed matrices,
//! `pos = R_h P R_w^T` per channel, and the gradient flows back to `pos_embed` through
//! two matmuls.

use crate::error::Result;
use crate::kernels;
use candle_core::{Device, Tensor};

/// PyTorch's cubic convolution coefficient for bicubic interpolation.
const A: f64 = -0.75;

/// The `[out, inp]` matrix of a 1-D bicubic resize from `inp` to `out` samples: row `i`
/// holds the weights of source index `(i + 0.5) * inp / out - 0.5`'s four neighbours,
/// indices clamped at the border (weights of clamped neighbours add up).
pub fn bicubic_matrix(out: usize, inp: usize) -> Vec<f32> {
    // PyTorch's cubic_convolution1 (|x| <= 1) and cubic_convolution2 (1 < |x| < 2).
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f64 / out as f64;
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in weights.iter().enumerate() {
            let j = (x0 as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[i * inp + j] += *wk as f32;
        }
    }
    m
}

/// `pos_embed` `[1, grid*grid, W]` on the token grid `(h, w)`, as `[1, h*w, W]`: itself
/// on its own grid, else bicubic-resized (differentiable in `pos_embed`).
pub fn on_grid(pos_embed: &Tensor, grid: usize, (h, w): (usize, usize)) -> Result<Tensor> {
    if (h, w) == (grid, grid) {
        return Ok(pos_embed.clone());
    }
    let width = pos_embed.dim(2)?;
    let (dtype, device) = (pos_embed.dtype(), pos_embed.device());
    let matrix = |out: usize| -> Result<Tensor> {
        let m = Tensor::from_vec(bicubic_matrix(out, grid), (out, grid), &Device::Cpu)?;
        Ok(m.to_device(device)?.to_dtype(dtype)?)
    };
    // Rows: R_h [h, grid] @ P as [grid, grid*W] -> [h, grid*W], i.e. [h, grid, W].
    let p = pos_embed.reshape((grid, grid * width))?;
    let rows = kernels::matmul(&matrix(h)?, &p)?.reshape((h, grid, width))?;
    // Columns, per output row: R_w [w, grid] @ [grid, W] -> [w, W].
    let r_w = matrix(w)?
        .unsqueeze(0)?
        .broadcast_as((h, w, grid))?
        .contiguous()?;
    let pos = kernels::matmul(&r_w, &rows.contiguous()?)?;
    Ok(pos.reshape((1, h * w, width))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_the_identity_and_rows_sum_to_one() {
        let id = bicubic_matrix(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert!((id[i * 5 + j] - (i == j) as u8 as f32).abs() < 1e-6);
            }
        }
        for (out, inp) in [(6, 4), (2, 4), (3, 4), (10, 4), (1, 3)] {
            let m = bicubic_matrix(out, inp);
            for row in m.chunks(inp) {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{out}<-{inp}: row sums to {s}");
            }
        }
    }

    /// PyTorch 2.15's own `F.interpolate(mode="bicubic", align_corners=False)` outputs
    /// (float64) for 1-D rows, upsampled and downsampled, borders included.
    #[test]
    fn matches_pytorch_interpolate() {
        let cases: [(&[f32], &[f64]); 4] = [
            (
                &[0.0, 1.0, 2.0, 3.0],
                &[
                    -0.0868055555,
                    0.40625,
                    1.2129629630,
                    1.7870370370,
                    2.59375,
                    3.0868055556,
                ],
            ),
            (
                &[0.0, 0.0, 0.0, 1.0],
                &[0.0, 0.0, -0.0173611111, -0.0868055556, 0.5, 1.0868055556],
            ),
            (&[0.0, 1.0, 2.0, 3.0], &[0.1261574074, 1.5, 2.8738425926]),
            (&[1.0, -2.0, 0.5, 4.0], &[-0.734375, 2.484375]),
        ];
        for (x, want) in cases {
            let m = bicubic_matrix(want.len(), x.len());
            for (i, w) in want.iter().enumerate() {
                let y: f32 = (0..x.len()).map(|j| m[i * x.len() + j] * x[j]).sum();
                assert!(
                    (y as f64 - w).abs() < 1e-5,
                    "{x:?} -> {}: [{i}] {y} vs {w}",
                    want.len()
                );
            }
        }
    }
}
