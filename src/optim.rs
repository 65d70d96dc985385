//! AdamW with decoupled weight decay, linear warmup then cosine decay, and global-norm
//! gradient clipping. Written here (not `candle_nn::AdamW`) so that its moments can be
//! saved in a checkpoint and a resumed run continues exactly.

use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    pub lr: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    pub warmup_steps: i64,
    /// Steps of the whole schedule; 0 keeps the rate constant after warmup.
    pub total_steps: i64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 2e-4,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            warmup_steps: 500,
            total_steps: 0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.grad_clip.is_finite()
            && self.grad_clip >= 0.0
            && self.warmup_steps >= 0
            && self.total_steps >= 0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "optimiser settings out of range: {self:?}"
            )))
        }
    }

    /// Learning rate for the update with 0-based index `step`.
    pub fn lr_at(&self, step: i64) -> f32 {
        let lr = self.lr as f64;
        let warmup = self.warmup_steps;
        if step < warmup {
            return (lr * (step + 1) as f64 / warmup as f64) as f32;
        }
        if self.total_steps <= warmup {
            return self.lr;
        }
        let progress =
            ((step - warmup) as f64 / (self.total_steps - warmup) as f64).clamp(0.0, 1.0);
        (lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

/// Whether a parameter gets weight decay: matrices and convolution kernels do; biases,
/// norm scales and the position embedding do not (the usual ViT recipe).
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.ends_with("pos_embed")
}

/// The first and second moments, one pair per parameter, in the parameters' order.
pub struct AdamW {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(AdamW {
            m: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Global L2 norm of all gradients.
    pub fn global_norm(grads: &[Tensor]) -> Result<f32> {
        let mut total = 0f64;
        let mut on_device = Vec::new();
        for g in grads {
            // One pass, where candle's sqr + sum make two. Chunks are summed in order:
            // the result does not depend on thread scheduling.
            let fast = with_cpu_f32(g, |v| {
                v.par_chunks(1 << 14)
                    .map(crate::kernels::simd::sum_sq_f64)
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

    /// One update with 1-based count `t`. Every new value is computed before any is
    /// written, so an error leaves parameters and moments as they were.
    pub fn step(
        &mut self,
        cfg: &OptimConfig,
        params: &[(String, Var)],
        trainable: &[bool],
        grads: &[Tensor],
        lr: f32,
        grad_scale: f32,
        t: i64,
    ) -> Result<()> {
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let lr = lr as f64;
        let mut updates = Vec::with_capacity(params.len());
        for (i, ((name, p), g)) in params.iter().zip(grads).enumerate() {
            if !trainable[i] {
                continue;
            }
            let p = p.as_tensor();
            let decay = if cfg.weight_decay > 0.0 && decays(name, p.dims()) {
                1.0 - lr * cfg.weight_decay as f64
            } else {
                1.0
            };
            let k = Constants {
                b1,
                b2,
                bc1,
                bc2,
                lr,
                eps: cfg.eps as f64,
                decay,
                grad_scale: grad_scale as f64,
            };
            let (new_p, m, v) = match fused_update(p, g, &self.m[i], &self.v[i], &k)? {
                Some(done) => done,
                None => {
                    let g = if grad_scale != 1.0 {
                        (g * k.grad_scale)?
                    } else {
                        g.clone()
                    };
                    let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let denom = ((&v / bc2)?.sqrt()? + k.eps)?;
                    let step = ((&m / denom)? * (lr / bc1))?;
                    let decayed = if decay != 1.0 {
                        (p * decay)?
                    } else {
                        p.clone()
                    };
                    ((decayed - step)?, m, v)
                }
            };
            updates.push((i, new_p, m, v));
        }
        for (i, new_p, m, v) in updates {
            params[i].1.set(&new_p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The scalars of one AdamW update.
struct Constants {
    b1: f64,
    b2: f64,
    bc1: f64,
    bc2: f64,
    lr: f64,
    eps: f64,
    decay: f64,
    /// Applied to the gradient first (clipping).
    grad_scale: f64,
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

/// `(p', m', v')` of one AdamW update in a single pass over CPU f32 memory (candle's ops
/// make about fourteen), or `None` where the caller should compose it.
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
    let out = crate::kernels::output_vec;
    let (mut np, mut nm, mut nv) = (out(n), out(n), out(n));
    let (b1, b2, scale) = (k.b1 as f32, k.b2 as f32, k.grad_scale as f32);
    let (c1, c2) = ((1.0 - k.b1) as f32, (1.0 - k.b2) as f32);
    let (inv_bc2, step, eps, decay) = (
        (1.0 / k.bc2) as f32,
        (k.lr / k.bc1) as f32,
        k.eps as f32,
        k.decay as f32,
    );
    const CHUNK: usize = 1 << 14;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let cfg = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            ..Default::default()
        };
        assert!((cfg.lr_at(0) - 0.1).abs() < 1e-6);
        assert!((cfg.lr_at(9) - 1.0).abs() < 1e-6);
        assert!((cfg.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((cfg.lr_at(60) - 0.5).abs() < 1e-6);
        assert!(cfg.lr_at(110).abs() < 1e-6);
        let constant = OptimConfig {
            lr: 1.0,
            warmup_steps: 0,
            total_steps: 0,
            ..Default::default()
        };
        assert_eq!(constant.lr_at(12345), 1.0);
    }

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let dev = candle_core::Device::Cpu;
        let p = Var::from_slice(&[1.0f32, -2.0, 0.5, 0.0], (2, 2), &dev).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let g = Tensor::from_slice(&[0.5f32, 0.1, -0.3, 0.0], (2, 2), &dev).unwrap();
        let cfg = OptimConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params).unwrap();
        opt.step(&cfg, &params, &[true], &[g], 0.01, 1.0, 1)
            .unwrap();
        let got = p
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // t = 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
        let expect = [
            1.0 * (1.0 - 0.001) - 0.01,
            -2.0 * 0.999 - 0.01,
            0.5 * 0.999 + 0.01,
            0.0,
        ];
        for (a, b) in got.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    /// The one-pass CPU update against the composed candle ops, over several steps with
    /// decay, gradient scaling and a tensor past one chunk.
    #[test]
    fn fused_update_matches_the_composed_ops() {
        let dev = candle_core::Device::Cpu;
        let n = 40_000;
        let p0 = Tensor::randn(0f32, 1.0, (n / 100, 100), &dev).unwrap();
        let cfg = OptimConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let fused = Var::from_tensor(&p0).unwrap();
        let params = vec![("w".to_string(), fused.clone())];
        let mut opt = AdamW::new(&params).unwrap();
        let (mut pc, mut mc, mut vc) = (
            p0.clone(),
            p0.zeros_like().unwrap(),
            p0.zeros_like().unwrap(),
        );
        for t in 1..=4i64 {
            let g = Tensor::randn(0f32, 1.0, (n / 100, 100), &dev).unwrap();
            opt.step(&cfg, &params, &[true], &[g.clone()], 0.01, 0.5, t)
                .unwrap();
            // The same update from candle ops.
            let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
            let g = (g * 0.5).unwrap();
            mc = ((&mc * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
            vc = ((&vc * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let denom = ((&vc / (1.0 - b2.powi(t as i32))).unwrap().sqrt().unwrap()
                + cfg.eps as f64)
                .unwrap();
            let step = ((&mc / denom).unwrap() * (0.01 / (1.0 - b1.powi(t as i32)))).unwrap();
            pc = ((&pc * (1.0 - 0.01 * 0.05)).unwrap() - step).unwrap();
        }
        let diff = (fused.as_tensor() - &pc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "fused and composed AdamW differ by {diff}");
        let mdiff = (&opt.m[0] - &mc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(mdiff < 1e-6, "first moments differ by {mdiff}");
    }

    /// Both paths of the norm: read in place (contiguous CPU f32) and through tensor ops
    /// (here a transposed view; on a GPU every gradient).
    #[test]
    fn global_norm_of_mixed_layouts() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_slice(&[3.0f32, 4.0], 2, &dev).unwrap();
        let b = Tensor::from_slice(&[1.0f32, 2.0, 2.0, 4.0], (2, 2), &dev)
            .unwrap()
            .t()
            .unwrap();
        let n = AdamW::global_norm(&[a, b]).unwrap();
        assert!((n - (25.0f32 + 25.0).sqrt()).abs() < 1e-5, "{n}");
    }
}
