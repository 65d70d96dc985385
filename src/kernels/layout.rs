//! Convolution weights from PyTorch's `[O, C, kh, kw]` to the tap-major rows `[O, kh*kw*C]`
//! the channels-last kernels multiply with, as one parallel op with a backward. candle's
//! `permute(..).contiguous()` copies this one float at a time on one thread: 3.7 ms per
//! call for a 512-channel 3x3 weight, paid on every forward.

use super::{on_cpu_f32, output_vec, slice};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Per leading index `o`, the `[a, b]` matrix at `o` transposed to `[b, a]`.
struct InnerTranspose {
    a: usize,
    b: usize,
}

impl CustomOp1 for InnerTranspose {
    fn name(&self) -> &'static str {
        "inner-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (a, b) = (self.a, self.b);
        let mut y = output_vec(x.len());
        y.par_chunks_mut(a * b)
            .zip(x.par_chunks(a * b))
            .for_each(|(dst, src)| {
                for (i, run) in src.chunks_exact(b).enumerate() {
                    for (j, v) in run.iter().enumerate() {
                        dst[j * a + i] = *v;
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((x.len() / (a * b), a * b))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = InnerTranspose {
            a: self.b,
            b: self.a,
        };
        Ok(Some(
            grad.contiguous()?.apply_op1(back)?.reshape(x.shape())?,
        ))
    }
}

/// `w` `[O, C, kh, kw]` as rows `[O, kh*kw*C]`, column `(ky*kw + kx)*C + c`.
pub fn tap_major(w: &Tensor) -> crate::Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    if !on_cpu_f32(w) {
        return Ok(w.permute((0, 2, 3, 1))?.reshape((o, kh * kw * c))?);
    }
    let rows = w
        .contiguous()?
        .apply_op1(InnerTranspose { a: c, b: kh * kw })?;
    Ok(rows.reshape((o, kh * kw * c))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{grad_gaps, max_abs_diff};
    use candle_core::{Device, Var};

    #[test]
    fn matches_permute_forward_and_backward() {
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7, 3, 2), &Device::Cpu).unwrap())
            .unwrap();
        let ours = tap_major(w.as_tensor()).unwrap();
        let theirs = w
            .as_tensor()
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((5, 42))
            .unwrap();
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let (d, _) = grad_gaps(&ours, &theirs, &[&w])[0];
        assert_eq!(d, 0.0);
    }
}
