//! Layout changes as single parallel ops with a backward:
//! - convolution weights from PyTorch's `[O, C, kh, kw]` to the tap-major rows
//!   `[O, kh*kw*C]` the channels-last kernels multiply with. candle's
//!   `permute(..).contiguous()` copies this one float at a time on one thread: 3.7 ms per
//!   call for a 512-channel 3x3 weight, paid on every forward;
//! - a channels-last map into its 2x2 patches, one row each. As reshape, transpose,
//!   copy and reshape that is four graph nodes, and each costs training a zero-filled
//!   gradient buffer and an add over the whole map in candle's backward.

use super::cpu::{on_cpu_f32, output_vec, slice};
use crate::error::Result;
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

/// Rows of 2x2 patches: `[B, H, W, C]` <-> `[B*(H/2)*(W/2), 4C]`, patch row
/// `(ky, kx, c)`: the two runs of `2C` floats at `(2i + ky, 2j)`.
struct Patches2x2 {
    dims: (usize, usize, usize, usize),
    /// Map to rows (forward) or rows back to the map (its backward).
    to_rows: bool,
}

impl CustomOp1 for Patches2x2 {
    fn name(&self) -> &'static str {
        "patches-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = slice(s, l)?;
        let (b, h, w, c) = self.dims;
        let (h2, w2, run) = (h / 2, w / 2, 2 * c);
        if src.len() != b * h * w * c || h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("patches-2x2: {:?} for a [{b}, {h}, {w}, {c}] map", l.dims());
        }
        let mut dst = output_vec(src.len());
        // Items: one row of patches (i fixed), which holds exactly map rows 2i and 2i+1.
        let pair = 2 * w * c;
        dst.par_chunks_mut(pair)
            .zip(src.par_chunks(pair))
            .for_each(|(out, inp)| {
                for j in 0..w2 {
                    for ky in 0..2 {
                        let (in_map, in_rows) = (ky * w * c + j * run, j * 4 * c + ky * run);
                        if self.to_rows {
                            out[in_rows..in_rows + run].copy_from_slice(&inp[in_map..in_map + run]);
                        } else {
                            out[in_map..in_map + run].copy_from_slice(&inp[in_rows..in_rows + run]);
                        }
                    }
                }
            });
        let shape = if self.to_rows {
            Shape::from((b * h2 * w2, 4 * c))
        } else {
            Shape::from((b, h, w, c))
        };
        Ok((CpuStorage::F32(dst), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = Patches2x2 {
            dims: self.dims,
            to_rows: !self.to_rows,
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// The 2x2 stride-2 patches of a channels-last map `[B, H, W, C]` as rows
/// `[B*(H/2)*(W/2), 4C]`, each `(ky, kx, c)`.
pub fn patches_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if !on_cpu_f32(x) || h % 2 != 0 || w % 2 != 0 {
        return Ok(x
            .reshape(&[b, h / 2, 2, w / 2, 2 * c][..])?
            .transpose(2, 3)?
            .contiguous()?
            .reshape((b * (h / 2) * (w / 2), 4 * c))?);
    }
    let op = Patches2x2 {
        dims: (b, h, w, c),
        to_rows: true,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `w` `[O, C, kh, kw]` as rows `[O, kh*kw*C]`, column `(ky*kw + kx)*C + c`.
pub fn tap_major(w: &Tensor) -> Result<Tensor> {
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

    #[test]
    fn patches_match_the_reshape_chain_forward_and_backward() {
        let (b, h, w, c) = (3, 4, 6, 5);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, w, c), &Device::Cpu).unwrap())
            .unwrap();
        let ours = patches_2x2(x.as_tensor()).unwrap();
        let theirs = x
            .as_tensor()
            .reshape(&[b, h / 2, 2, w / 2, 2 * c][..])
            .unwrap()
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b * (h / 2) * (w / 2), 4 * c))
            .unwrap();
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let (d, _) = grad_gaps(&ours, &theirs, &[&x])[0];
        assert_eq!(d, 0.0);
    }
}
