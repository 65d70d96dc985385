//! im2col for a 3x3, padding-1 convolution over a channels-last map, with its backward:
//! for f32 on the CPU one op (col2im its adjoint; both from `patches.rs`), elsewhere nine shifted views of the padded map, stacked. The composed
//! convolution of `conv.rs` (CPUs without a BLAS, and training off the CPU) multiplies it
//! with the weight rows; `conv.rs`'s own CPU op never builds the whole patch matrix.

use super::cpu::{SendPtr, on_cpu_f32, output_vec, slice};
use super::patches::{Dims, gather, scatter};
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
        let mut cols = output_vec(d.pixels() * 9 * d.c);
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

/// The 3x3 patches of a channels-last map `[B, H, W, C]` as rows `[B*H*W, 9*C]`,
/// column `(ky*3 + kx)*C + c`.
pub fn im2col_3x3(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        return Ok(x.contiguous()?.apply_op1(Im2Col)?);
    }
    let (b, h, wd, c) = x.dims4()?;
    let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for ky in 0..3 {
        for kx in 0..3 {
            taps.push(padded.narrow(1, ky, h)?.narrow(2, kx, wd)?);
        }
    }
    // [B, H, W, 9, C] -> rows of 9*C patch values, ordered as the weight rows.
    Ok(Tensor::stack(&taps, 3)?.reshape((b * h * wd, 9 * c))?)
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
        let ours = im2col_3x3(x.as_tensor()).unwrap();
        // The stacked views, as off the CPU (f64 here), cast back for the gradient.
        let theirs = im2col_3x3(&x.as_tensor().to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        assert_eq!(theirs.dims(), [40, 27]);
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let (d, _) = grad_gaps(&ours, &theirs, &[&x])[0];
        assert!(d < 1e-5, "{d}");
    }
}
