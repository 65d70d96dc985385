//! im2col for a 3x3, padding-1 convolution over a channels-last map, with its backward
//! (col2im): one pass that writes each patch row as nine contiguous runs of channels,
//! instead of nine strided views stacked and copied by candle. The path for CPUs without
//! a BLAS; `conv.rs` never builds the whole patch matrix.

use super::{on_cpu_f32, slice};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `[B, H, W, C]` -> `[B*H*W, 9*C]`, column `(ky*3 + kx)*C + c` (tap-major).
struct Im2Col;
/// The adjoint: `[B*H*W, C*9]` -> `[B, H, W, C]`, summing each patch entry back.
struct Col2Im {
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-3x3-nhwc"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let x = slice(s, l)?;
        let mut cols = vec![0f32; b * h * w * c * 9];
        cols.par_chunks_mut(w * c * 9)
            .enumerate()
            .for_each(|(row, out)| {
                let (n, y) = (row / h, row % h);
                let img = &x[n * h * w * c..(n + 1) * h * w * c];
                for xx in 0..w {
                    let dst = &mut out[xx * c * 9..(xx + 1) * c * 9];
                    for (k, tap) in dst.chunks_exact_mut(c).enumerate() {
                        let (yy, xs) = (
                            y as isize + (k / 3) as isize - 1,
                            xx as isize + (k % 3) as isize - 1,
                        );
                        if yy >= 0 && yy < h as isize && xs >= 0 && xs < w as isize {
                            let at = (yy as usize * w + xs as usize) * c;
                            tap.copy_from_slice(&img[at..at + c]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((b * h * w, c * 9))))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1(Col2Im { dims: arg.dims4()? })?,
        ))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-3x3-nhwc"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = self.dims;
        let cols = slice(s, l)?;
        let mut dx = vec![0f32; b * h * w * c];
        dx.par_chunks_mut(w * c).enumerate().for_each(|(row, out)| {
            let (n, y) = (row / h, row % h);
            for xx in 0..w {
                let dst = &mut out[xx * c..(xx + 1) * c];
                // Pixel (y, xx) is tap k of the patch centred at (y - ky + 1, xx - kx + 1).
                for k in 0..9 {
                    let (yy, xs) = (
                        y as isize - (k / 3) as isize + 1,
                        xx as isize - (k % 3) as isize + 1,
                    );
                    if yy < 0 || yy >= h as isize || xs < 0 || xs >= w as isize {
                        continue;
                    }
                    let p = (n * h + yy as usize) * w + xs as usize;
                    let src = &cols[(p * 9 + k) * c..(p * 9 + k + 1) * c];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// The 3x3 patches of a channels-last map as rows `[B*H*W, C*9]`, or `None` where the
/// caller should build them from candle ops (not CPU f32).
pub fn im2col_3x3(x: &Tensor) -> crate::Result<Option<Tensor>> {
    if !on_cpu_f32(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Im2Col)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{grad_gaps, max_abs_diff};
    use candle_core::{Device, Var};

    #[test]
    fn matches_stacked_views_forward_and_backward() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 4, 3), &Device::Cpu).unwrap())
            .unwrap();
        let ours = im2col_3x3(x.as_tensor()).unwrap().unwrap();
        let p = x
            .as_tensor()
            .pad_with_zeros(1, 1, 1)
            .unwrap()
            .pad_with_zeros(2, 1, 1)
            .unwrap();
        let taps: Vec<Tensor> = (0..9)
            .map(|k| p.narrow(1, k / 3, 5).unwrap().narrow(2, k % 3, 4).unwrap())
            .collect();
        let theirs = Tensor::stack(&taps, 3).unwrap().reshape((40, 27)).unwrap();
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let (d, _) = grad_gaps(&ours, &theirs, &[&x])[0];
        assert!(d < 1e-5, "{d}");
    }
}
