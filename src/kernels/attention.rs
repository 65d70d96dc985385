//! Multi-head self-attention straight from the fused qkv projection, for gradient-free
//! paths: per (sample, head), `softmax(q k^T / sqrt(d)) v` with two BLAS calls on strided
//! views of `qkv` and the softmax in a per-thread buffer. It skips the three head-split
//! copies, the score tensor and the five passes of a composed softmax.

use super::blas::{SendPtr, available, sgemm_raw};
use super::simd::{exp, simd_fn};
use super::{gradient_free, slice};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

struct FusedAttention {
    heads: usize,
}

simd_fn!(
    fn softmax_rows(s: &mut [f32], t: usize) {
        for row in s.chunks_exact_mut(t) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
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
        let (b, t, w3) = l.shape().dims3()?;
        let w = w3 / 3;
        let d = w / self.heads;
        let qkv = slice(s, l)?;
        let mut out: Vec<f32> = vec![0f32; b * t * w];
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
        Ok((CpuStorage::F32(out), Shape::from((b, t, w))))
    }
}

/// Attention output `[B, T, W]` (heads concatenated, before the output projection) from
/// `qkv` `[B, T, 3W]` read as `[B, T, 3, heads, W/heads]`; `None` where gradients are
/// needed or no BLAS is loaded (the caller then composes it from candle ops).
pub fn attention(qkv: &Tensor, heads: usize) -> crate::Result<Option<Tensor>> {
    if !gradient_free(&[qkv]) || !available() {
        return Ok(None);
    }
    Ok(Some(qkv.contiguous()?.apply_op1(FusedAttention { heads })?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_composed_attention() {
        if !crate::kernels::testing::blas_or_skip("the fused attention") {
            return;
        }
        let (b, t, heads, d) = (2, 9, 3, 8);
        let w = heads * d;
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * w), &Device::Cpu).unwrap();
        let ours = attention(&qkv, heads).unwrap().unwrap();
        let split = qkv
            .reshape((b, t, 3, heads, d))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i| split.get(i).unwrap().contiguous().unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let attn = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let theirs = attn
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, w))
            .unwrap();
        let diff = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
