//! The residual branch with dropout, `x + dropout(h)`. Masks come from where the tensors
//! live: on the CPU from the bridge's own RNG (so runs repeat and resume bit for bit),
//! on a GPU from the device's RNG (seeded once per step by the bridge), so that no mask
//! is drawn on the host and uploaded. On the CPU, `x + h * mask` is one op: candle's
//! composed form makes a mask tensor that gets a gradient of its own (a product, a
//! zero-filled buffer and an add in the backward, all thrown away) and a separate add node.

use super::cpu::{CHUNK, on_cpu_f32, output_vec, slice};
use crate::error::Result;
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `x + h * mask` (mask: 0 or the inverse keep rate per element).
struct AddMasked(Arc<Vec<f32>>);

impl CustomOp2 for AddMasked {
    fn name(&self) -> &'static str {
        "add-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, h) = (slice(s1, l1)?, slice(s2, l2)?);
        if x.len() != h.len() || h.len() != self.0.len() {
            candle_core::bail!(
                "add-masked: {} + {} * mask of {}",
                x.len(),
                h.len(),
                self.0.len()
            );
        }
        let mut y = output_vec(x.len());
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(h.par_chunks(CHUNK)))
            .zip(self.0.par_chunks(CHUNK))
            .for_each(|((y, (x, h)), m)| {
                for i in 0..y.len() {
                    y[i] = x[i] + h[i] * m[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = grad.contiguous()?.apply_op1(Masked(self.0.clone()))?;
        Ok((Some(grad.clone()), Some(dh)))
    }
}

/// `g * mask`: the gradient of the dropped branch.
struct Masked(Arc<Vec<f32>>);

impl CustomOp1 for Masked {
    fn name(&self) -> &'static str {
        "masked"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l)?;
        if g.len() != self.0.len() {
            candle_core::bail!("masked: {} values, mask of {}", g.len(), self.0.len());
        }
        let mut y = output_vec(g.len());
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(self.0.par_chunks(CHUNK)))
            .for_each(|(y, (g, m))| {
                for i in 0..y.len() {
                    y[i] = g[i] * m[i];
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Masked(self.0.clone()))?))
    }
}

/// `x + dropout(h)` with drop probability `p` (inverted dropout: kept values are scaled
/// by `1 / (1 - p)`); on the CPU the mask is drawn from `rng`, on a GPU from the device's
/// RNG (`rng` is not advanced).
pub fn residual_dropout(x: &Tensor, h: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if !h.device().is_cpu() {
        return Ok((x + h.mul(&device_mask(h, p)?)?)?);
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..h.elem_count())
        .map(|_| if rng.uniform() >= p { scale } else { 0.0 })
        .collect();
    add_masked(x, h, mask)
}

/// A mask shaped and typed like `h`, drawn on `h`'s device: `1 / (1 - p)` where a
/// uniform draw is `>= p`, else 0.
fn device_mask(h: &Tensor, p: f32) -> Result<Tensor> {
    let keep = Tensor::rand(0f32, 1f32, h.shape(), h.device())?.ge(p as f64)?;
    Ok((keep.to_dtype(h.dtype())? * (1.0 / (1.0 - p as f64)))?)
}

/// `x + h * mask` for same-shaped `x` and `h`: one op on the CPU, candle's ops elsewhere.
fn add_masked(x: &Tensor, h: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    if !on_cpu_f32(x) || x.shape() != h.shape() {
        let mask = Tensor::from_vec(mask, h.shape(), h.device())?.to_dtype(h.dtype())?;
        return Ok((x + h.mul(&mask)?)?);
    }
    let op = AddMasked(Arc::new(mask));
    Ok(x.contiguous()?.apply_op2(&h.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{grad_gaps, max_abs_diff};
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_the_composed_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17; // several chunks and a short one
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &dev).unwrap()).unwrap();
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &dev).unwrap()).unwrap();
        let mask: Vec<f32> = (0..n)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.25 })
            .collect();
        let ours = add_masked(x.as_tensor(), h.as_tensor(), mask.clone()).unwrap();
        let m = Tensor::from_vec(mask, n, &dev).unwrap();
        let theirs = (x.as_tensor() + h.as_tensor().mul(&m).unwrap()).unwrap();
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        for (d, _) in grad_gaps(&ours, &theirs, &[&x, &h]) {
            assert_eq!(d, 0.0);
        }
    }

    /// The GPU's mask, drawn here by candle's CPU RNG: values 0 or 1 / (1 - p), a kept
    /// fraction within 1% of 1 - p, and the residual sum's gradient through it.
    #[test]
    fn device_masks_keep_one_minus_p_and_scale_the_rest() {
        let dev = Device::Cpu;
        let n = 200_000;
        let p = 0.1f32;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &dev).unwrap()).unwrap();
        let mask = device_mask(h.as_tensor(), p).unwrap();
        let values = mask.to_vec1::<f32>().unwrap();
        let scale = 1.0 / (1.0 - p);
        assert!(values.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
        let kept = values.iter().filter(|&&v| v > 0.0).count() as f32 / n as f32;
        assert!((kept - (1.0 - p)).abs() < 0.01, "kept {kept}");
        let x = Var::from_tensor(&Tensor::zeros(n, DType::F32, &dev).unwrap()).unwrap();
        let y = (x.as_tensor() + h.as_tensor().mul(&mask).unwrap()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gh = grads.get(h.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gh, values);
    }
}
