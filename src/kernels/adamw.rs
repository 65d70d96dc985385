//! AdamW's arithmetic: one parameter's update and the global gradient norm. On contiguous
//! f32 CPU tensors each is one parallel pass over memory (candle's ops make about fourteen
//! for the update); elsewhere (CUDA, bf16) the same math from candle ops.

use super::cpu::{CHUNK, output_vec};
use crate::error::Result;
use candle_core::Tensor;
use rayon::prelude::*;

/// The scalars of one AdamW update.
pub struct Constants {
    pub b1: f64,
    pub b2: f64,
    /// Bias corrections `1 - beta^t`.
    pub bc1: f64,
    pub bc2: f64,
    pub lr: f64,
    pub eps: f64,
    /// Multiplies the parameter first (decoupled weight decay; 1 = none).
    pub decay: f64,
    /// Applied to the gradient first (clipping).
    pub grad_scale: f64,
}

/// `f` on the values of a contiguous f32 CPU tensor, read in place; `None` for other
/// devices, dtypes and layouts.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    use candle_core::{DType, Storage};
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (guard, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*guard, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
}

/// `(p', m', v')` of one AdamW update: `m' = b1 m + (1 - b1) g`, `v' = b2 v + (1 - b2) g^2`,
/// `p' = decay p - lr / bc1 * m' / (sqrt(v' / bc2) + eps)`, with `g` scaled first.
pub fn update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Constants,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(done) = fused_update(p, g, m, v, k)? {
        return Ok(done);
    }
    let g = if k.grad_scale != 1.0 {
        (g * k.grad_scale)?
    } else {
        g.clone()
    };
    let m = ((m * k.b1)? + (&g * (1.0 - k.b1))?)?;
    let v = ((v * k.b2)? + (g.sqr()? * (1.0 - k.b2))?)?;
    let denom = ((&v / k.bc2)?.sqrt()? + k.eps)?;
    let step = ((&m / denom)? * (k.lr / k.bc1))?;
    let decayed = if k.decay != 1.0 {
        (p * k.decay)?
    } else {
        p.clone()
    };
    Ok(((decayed - step)?, m, v))
}

/// The single pass over CPU f32 memory, or `None` off that path.
fn fused_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Constants,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use candle_core::{DType, Storage};
    let all = [p, g, m, v];
    if !all
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
    {
        return Ok(None);
    }
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(4);
    for (guard, layout) in &guards {
        let Storage::Cpu(cpu) = &**guard else {
            return Ok(None);
        };
        let (start, end) = layout.contiguous_offsets().expect("checked contiguous");
        slices.push(&cpu.as_slice::<f32>()?[start..end]);
    }
    let (ps, gs, ms, vs) = (slices[0], slices[1], slices[2], slices[3]);
    let n = ps.len();
    let out = output_vec;
    let (mut np, mut nm, mut nv) = (out(n), out(n), out(n));
    let (b1, b2, scale) = (k.b1 as f32, k.b2 as f32, k.grad_scale as f32);
    let (c1, c2) = ((1.0 - k.b1) as f32, (1.0 - k.b2) as f32);
    let (inv_bc2, step, eps, decay) = (
        (1.0 / k.bc2) as f32,
        (k.lr / k.bc1) as f32,
        k.eps as f32,
        k.decay as f32,
    );
    np.par_chunks_mut(CHUNK)
        .zip(nm.par_chunks_mut(CHUNK))
        .zip(nv.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((np, nm), nv))| {
            let lo = c * CHUNK;
            for j in 0..np.len() {
                let (pj, gj) = (ps[lo + j], gs[lo + j] * scale);
                let mj = b1 * ms[lo + j] + c1 * gj;
                let vj = b2 * vs[lo + j] + c2 * (gj * gj);
                nm[j] = mj;
                nv[j] = vj;
                np[j] = pj * decay - step * (mj / ((vj * inv_bc2).sqrt() + eps));
            }
        });
    drop(guards);
    let shape = p.shape();
    Ok(Some((
        Tensor::from_vec(np, shape, p.device())?,
        Tensor::from_vec(nm, shape, p.device())?,
        Tensor::from_vec(nv, shape, p.device())?,
    )))
}

/// Global L2 norm of all gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f32> {
    let mut total = 0f64;
    let mut on_device = Vec::new();
    for g in grads {
        // One pass, where candle's sqr + sum make two. Chunks are summed in order:
        // the result does not depend on thread scheduling.
        let fast = with_cpu_f32(g, |v| {
            v.par_chunks(CHUNK)
                .map(super::simd::sum_sq_f64)
                .collect::<Vec<f64>>()
                .into_iter()
                .sum::<f64>()
        })?;
        match fast {
            Some(sq) => total += sq,
            None => on_device.push(g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F32)?),
        }
    }
    if !on_device.is_empty() {
        // One read back for all device tensors instead of one per parameter.
        total += Tensor::stack(&on_device, 0)?
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff;
    use candle_core::{DType, Device};

    /// Both paths of `update`: the one pass over CPU f32, and the composed ops (taken here
    /// for f64, as on a GPU for every tensor), with decay, gradient scaling and a tensor
    /// past one chunk.
    #[test]
    fn the_one_pass_update_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let n = 40_000;
        let rand = |s: f32| Tensor::randn(0f32, s, (n / 100, 100), &dev).unwrap();
        let (p, g, m) = (rand(1.0), rand(1.0), rand(0.1));
        let v = rand(0.1).sqr().unwrap();
        let k = Constants {
            b1: 0.9,
            b2: 0.999,
            bc1: 1.0 - 0.9f64.powi(3),
            bc2: 1.0 - 0.999f64.powi(3),
            lr: 0.01,
            eps: 1e-8,
            decay: 1.0 - 0.01 * 0.05,
            grad_scale: 0.5,
        };
        let fused = update(&p, &g, &m, &v, &k).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let composed = update(&f64s(&p), &f64s(&g), &f64s(&m), &f64s(&v), &k).unwrap();
        let gap = max_abs_diff;
        assert!(gap(&fused.0, &composed.0) < 1e-5, "parameters");
        assert!(gap(&fused.1, &composed.1) < 1e-6, "first moments");
        assert!(gap(&fused.2, &composed.2) < 1e-6, "second moments");
        // The update moved the parameters (a test that cannot pass by doing nothing).
        assert!(gap(&p, &composed.0) > 1e-3);
    }
}
