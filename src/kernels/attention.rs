//! Multi-head self-attention straight from the fused qkv projection, and the softmax.
//!
//! `attention` picks one of two paths. f32 on the CPU (with a BLAS): one op with its
//! backward: per (sample, head), `softmax(q k^T / sqrt(d)) v` with BLAS calls on strided
//! views of `qkv` and the softmax in a per-thread buffer. It skips the three head-split
//! copies, the score tensor and the passes of a composed softmax, and its backward writes
//! the gradient of `qkv` directly (the composed version pads each of q, k, v's gradients
//! to the full width with zeros and adds them up). Elsewhere (CUDA, bf16): head split,
//! two batched matmuls and `softmax_last_dim`, which is candle-nn's fused kernel where no
//! gradient is tracked and differentiable ops where one is.

use super::blas::{available, matmul, sgemm_raw};
use super::cpu::{SendPtr, on_cpu_f32, output_vec, slice, tracked};
use super::simd::{dot, exp, max, simd_fn, sum};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct FusedAttention {
    heads: usize,
    /// Tokens per sample: `qkv` is `[B*T, 3W]` (or `[B, T, 3W]`).
    tokens: usize,
}

/// `(B, T, W)` of a `qkv` layout, and the output shape (the input's with `W` last).
fn dims(l: &Layout, tokens: usize) -> candle_core::Result<(usize, usize, usize, Shape)> {
    let w3 = *l.dims().last().unwrap_or(&0);
    if !w3.is_multiple_of(3) || tokens == 0 || !l.shape().elem_count().is_multiple_of(w3 * tokens) {
        candle_core::bail!("attention: qkv {:?} is not [B*{tokens}, 3W]", l.dims());
    }
    let b = l.shape().elem_count() / (w3 * tokens);
    let mut out = l.dims().to_vec();
    *out.last_mut().unwrap() = w3 / 3;
    Ok((b, tokens, w3 / 3, Shape::from(out)))
}

simd_fn!(
    fn softmax_rows(s: &mut [f32], t: usize) {
        for row in s.chunks_exact_mut(t) {
            let top = max(row);
            for v in row.iter_mut() {
                *v = exp(*v - top);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
);

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, w, out_shape) = dims(l, self.tokens)?;
        let w3 = 3 * w;
        let d = w / self.heads;
        let qkv = slice(s, l)?;
        let mut out = output_vec(b * t * w);
        let (src, dst) = (SendPtr(qkv.as_ptr() as *mut f32), SendPtr(out.as_mut_ptr()));
        let scale = 1.0 / (d as f32).sqrt();
        (0..b * self.heads).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |scores, item| {
                let (n, h) = (item / self.heads, item % self.heads);
                // SAFETY: q, k, v of (n, h) are [t, d] views with row stride 3w inside
                // `qkv`; each item writes its own [t, d] block of `out` (row stride w).
                unsafe {
                    let base = src.get().add(n * t * w3 + h * d);
                    let (q, k, v) = (base, base.add(w), base.add(2 * w));
                    sgemm_raw(
                        false,
                        true,
                        t,
                        t,
                        d,
                        scale,
                        q,
                        w3,
                        k,
                        w3,
                        0.0,
                        scores.as_mut_ptr(),
                        t,
                    );
                    softmax_rows(scores, t);
                    let o = dst.get().add(n * t * w + h * d);
                    sgemm_raw(
                        false,
                        false,
                        t,
                        d,
                        t,
                        1.0,
                        scores.as_ptr(),
                        t,
                        v,
                        w3,
                        0.0,
                        o,
                        w,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2(
            &grad.contiguous()?,
            AttentionBwd {
                heads: self.heads,
                tokens: self.tokens,
            },
        )?))
    }
}

/// d loss / d qkv from `qkv` `[B, T, 3W]` and d loss / d out `[B, T, W]`. Per (sample,
/// head), with P = softmax(S), S = scale q k^T recomputed:
///   dv = P^T dO,  dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),
///   dq = scale dS k,  dk = scale dS^T q.
struct AttentionBwd {
    heads: usize,
    tokens: usize,
}

// `ds = p * (dp - rowsum(dp * p))`, in place over `dp`, row by row.
simd_fn!(
    fn softmax_rows_bwd(p: &[f32], dp: &mut [f32], t: usize) {
        for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let pd = dot(pr, dr);
            for (a, b) in pr.iter().zip(dr.iter_mut()) {
                *b = a * (*b - pd);
            }
        }
    }
);

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, w, _) = dims(l1, self.tokens)?;
        let w3 = 3 * w;
        let d = w / self.heads;
        let (qkv, dout) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut dqkv = output_vec(b * t * w3);
        let (src, gsrc, dst) = (
            SendPtr(qkv.as_ptr() as *mut f32),
            SendPtr(dout.as_ptr() as *mut f32),
            SendPtr(dqkv.as_mut_ptr()),
        );
        let scale = 1.0 / (d as f32).sqrt();
        (0..b * self.heads).into_par_iter().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t]),
            |(p, dp), item| {
                let (n, h) = (item / self.heads, item % self.heads);
                // SAFETY: as in the forward; each item writes only its head's columns of
                // q, k and v in its sample's rows of dqkv.
                unsafe {
                    let base = src.get().add(n * t * w3 + h * d);
                    let (q, k, v) = (base, base.add(w), base.add(2 * w));
                    let go = gsrc.get().add(n * t * w + h * d);
                    let gbase = dst.get().add(n * t * w3 + h * d);
                    let (dq, dk, dv) = (gbase, gbase.add(w), gbase.add(2 * w));
                    let gemm = |ta, tb, m, nn, kk, alpha, a, lda, bm, ldb, c, ldc| {
                        sgemm_raw(ta, tb, m, nn, kk, alpha, a, lda, bm, ldb, 0.0, c, ldc)
                    };
                    gemm(false, true, t, t, d, scale, q, w3, k, w3, p.as_mut_ptr(), t);
                    softmax_rows(p, t);
                    gemm(true, false, t, d, t, 1.0, p.as_ptr(), t, go, w, dv, w3);
                    gemm(false, true, t, t, d, 1.0, go, w, v, w3, dp.as_mut_ptr(), t);
                    softmax_rows_bwd(p, dp, t);
                    gemm(false, false, t, d, t, scale, dp.as_ptr(), t, k, w3, dq, w3);
                    gemm(true, false, t, d, t, scale, dp.as_ptr(), t, q, w3, dk, w3);
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// Attention output `[B*T, W]` (heads concatenated, before the output projection) from
/// `qkv` `[B*T, 3W]` read as `[B, T, 3, heads, W/heads]` (a `[B, T, 3W]` input gives
/// `[B, T, W]`).
pub fn attention(qkv: &Tensor, tokens: usize, heads: usize) -> Result<Tensor> {
    if on_cpu_f32(qkv) && available() {
        let op = FusedAttention { heads, tokens };
        return Ok(qkv.contiguous()?.apply_op1(op)?);
    }
    let dims = qkv.dims().to_vec();
    let three_w = dims[dims.len() - 1];
    let rows = qkv.elem_count() / three_w;
    let (b, t, w) = (rows / tokens, tokens, three_w / 3);
    let d = w / heads;
    let split = qkv.reshape((b, t, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| -> Result<Tensor> {
        Ok(split.get(i)?.contiguous()?.reshape((b * heads, t, d))?)
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let scores = (matmul(&q, &k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let out = matmul(&softmax_last_dim(&scores)?, &v)?.reshape((b, heads, t, d))?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w;
    Ok(out.transpose(1, 2)?.reshape(out_dims)?)
}

/// Softmax over the last dimension, in f32 also for bf16 inputs (as autocast does):
/// candle-nn's fused kernel where no gradient is tracked (it has no backward), else
/// differentiable ops (with the max detached: the result does not depend on it).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    if !tracked(&[&x]) {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?.to_dtype(dtype)?);
    }
    let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(candle_core::D::Minus1)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{blas_or_skip, grad_gaps, max_abs_diff};
    use candle_core::{DType, Device, Var};

    /// The fused CPU op against the composed path of the same function (taken for f64, as
    /// on a GPU), forward and backward, in both input layouts.
    #[test]
    fn the_fused_op_matches_the_composed_path() {
        if !blas_or_skip("the fused attention") {
            return;
        }
        let (b, t, heads, d) = (2, 9, 3, 8);
        let w = heads * d;
        let var = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * w), &Device::Cpu).unwrap())
            .unwrap();
        let qkv = var.as_tensor();
        let ours = attention(qkv, t, heads).unwrap();
        // Token rows `[B*T, 3W]` give the same values as `[B*T, W]`.
        let rows = attention(&qkv.reshape((b * t, 3 * w)).unwrap(), t, heads).unwrap();
        assert_eq!(rows.dims(), [b * t, w]);
        assert_eq!(max_abs_diff(&rows.reshape((b, t, w)).unwrap(), &ours), 0.0);
        // The composed path, differentiable: f64 in, cast back to f32 for the gradient.
        let composed = attention(&qkv.to_dtype(DType::F64).unwrap(), t, heads)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(composed.dims(), ours.dims());
        let diff = max_abs_diff(&ours, &composed);
        assert!(diff < 1e-5, "{diff}");
        let (gap, scale) = grad_gaps(&ours, &composed, &[&var])[0];
        assert!(
            gap < 1e-5 * scale.max(1.0),
            "d qkv off by {gap} (scale {scale})"
        );
    }

    /// Both softmax paths: the fused kernel (untracked) and the differentiable ops.
    #[test]
    fn softmax_paths_agree_and_the_tracked_one_has_a_gradient() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 5, 33), &Device::Cpu).unwrap()).unwrap();
        let fused = softmax_last_dim(&x.as_tensor().detach()).unwrap();
        let composed = softmax_last_dim(x.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let sums = fused
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        let probe = Tensor::randn(0f32, 1.0, (4, 5, 33), &Device::Cpu).unwrap();
        let grads = (composed * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(x.as_tensor()).expect("a gradient reaches x");
        assert!(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
