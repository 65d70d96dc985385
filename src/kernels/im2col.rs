//! im2col for a 3x3, padding-1 convolution over a channels-last map, with its backward
//! (col2im), from `conv.rs`'s patch gather and scatter: the path for CPUs without a
//! BLAS, where the product is candle's. `conv.rs` never builds the whole patch matrix.

use super::SendPtr;
use super::conv::{Dims, gather, scatter};
use super::{on_cpu_f32, slice};
use crate::error::Result;
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
        let d = Dims::of(l)?;
        let x = slice(s, l)?;
        let per_image = d.h * d.w;
        // `gather` writes every value, the zeros of the padding included.
        let mut cols = super::output_vec(d.pixels() * 9 * d.c);
        cols.par_chunks_mut(per_image * 9 * d.c)
            .enumerate()
            .for_each(|(n, out)| gather(x, d, n * per_image, (n + 1) * per_image, out));
        Ok((CpuStorage::F32(cols), Shape::from((d.pixels(), 9 * d.c))))
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
        let d = Dims { b, h, w, c };
        let cols = slice(s, l)?;
        let mut dx = vec![0f32; d.pixels() * c];
        let pdx = SendPtr(dx.as_mut_ptr());
        // One image per item: a patch only reaches pixels of its own image.
        let per_image = h * w;
        (0..b).into_par_iter().for_each(|n| {
            let rows = &cols[n * per_image * 9 * c..(n + 1) * per_image * 9 * c];
            scatter(rows, d, n * per_image, (n + 1) * per_image, pdx);
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// The 3x3 patches of a channels-last map as rows `[B*H*W, C*9]`, or `None` where the
/// caller should build them from candle ops (not CPU f32).
pub fn im2col_3x3(x: &Tensor) -> Result<Option<Tensor>> {
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
