//! GELU (exact, erf) and SiLU as CPU ops with a backward: parallel over threads, SIMD
//! within, where candle's unary maps run on one thread with scalar `erf`.

use super::cpu::{CHUNK, on_cpu_f32, output_vec, slice};
use super::simd::{erf, exp, simd_fn};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Silu,
}

simd_fn!(
    fn gelu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }
);

simd_fn!(
    fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            *d = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
        }
    }
);

simd_fn!(
    fn silu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x / (1.0 + exp(-x));
        }
    }
);

simd_fn!(
    fn silu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let s = 1.0 / (1.0 + exp(-x));
            *d = g * s * (1.0 + x * (1.0 - s));
        }
    }
);

struct ActFwd(Activation);
struct ActBwd(Activation);

impl CustomOp1 for ActFwd {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Gelu => "gelu-erf-fused",
            Activation::Silu => "silu-fused",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut y = output_vec(x.len());
        let f = match self.0 {
            Activation::Gelu => gelu_fwd,
            Activation::Silu => silu_fwd,
        };
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| f(x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2(&grad.contiguous()?, ActBwd(self.0))?))
    }
}

impl CustomOp2 for ActBwd {
    fn name(&self) -> &'static str {
        "activation-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut dx = output_vec(x.len());
        let f = match self.0 {
            Activation::Gelu => gelu_bwd,
            Activation::Silu => silu_bwd,
        };
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| f(x, g, d));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The in-place form of an activation, for kernels that apply it to their own output.
pub(crate) fn in_place(kind: Activation) -> fn(&mut [f32]) {
    match kind {
        Activation::Gelu => gelu_fwd_in_place,
        Activation::Silu => silu_fwd_in_place,
    }
}

/// The activation applied over a tensor's own storage (no output buffer).
struct ActInPlace(Activation);

impl InplaceOp1 for ActInPlace {
    fn name(&self) -> &'static str {
        "activation-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("in-place activation needs contiguous".into())
        })?;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("in-place activation needs f32");
        };
        v[start..end]
            .par_chunks_mut(CHUNK)
            .for_each(in_place(self.0));
        Ok(())
    }
}

simd_fn!(
    fn gelu_fwd_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * FRAC_1_SQRT_2));
        }
    }
);

simd_fn!(
    fn silu_fwd_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = *v / (1.0 + exp(-*v));
        }
    }
);

/// `activation(&x)`, computed over `x`'s own storage when nothing needs the input
/// afterwards: no gradient is tracked through it and the caller hands over the only
/// reference (a fresh layer output). Otherwise the same as `activation`.
pub fn activation_owned(x: Tensor, kind: Activation) -> Result<Tensor> {
    if on_cpu_f32(&x) && !x.track_op() && x.is_contiguous() {
        x.inplace_op1(&ActInPlace(kind))?;
        return Ok(x);
    }
    activation(&x, kind)
}

/// `gelu(x)` with the exact (erf) form, or `silu(x)`.
pub fn activation(x: &Tensor, kind: Activation) -> Result<Tensor> {
    if !on_cpu_f32(x) {
        return Ok(match kind {
            Activation::Gelu => x.gelu_erf()?,
            Activation::Silu => x.silu()?,
        });
    }
    Ok(x.contiguous()?.apply_op1(ActFwd(kind))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{grad_gaps, max_abs_diff};
    use candle_core::{Device, Var};

    #[test]
    fn match_candle_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 4099), &Device::Cpu).unwrap()).unwrap();
        for kind in [Activation::Gelu, Activation::Silu] {
            let ours = activation(x.as_tensor(), kind).unwrap();
            let theirs = match kind {
                Activation::Gelu => x.as_tensor().gelu_erf().unwrap(),
                Activation::Silu => x.as_tensor().silu().unwrap(),
            };
            assert!(max_abs_diff(&ours, &theirs) < 1e-5, "{kind:?} forward");
            let owned = activation_owned(x.as_tensor().detach().copy().unwrap(), kind).unwrap();
            assert_eq!(max_abs_diff(&owned, &ours), 0.0, "{kind:?} in place");
            let (d, _) = grad_gaps(&ours, &theirs, &[&x])[0];
            assert!(d < 1e-5, "{kind:?} backward {d}");
        }
    }
}
