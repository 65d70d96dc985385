//! AdamW with decoupled weight decay, linear warmup then cosine decay, and global-norm
//! gradient clipping. Written here (not `candle_nn::AdamW`) so that its moments can be
//! saved in a checkpoint and a resumed run continues exactly.

use crate::error::{Error, Result};
use crate::kernels::adamw;
use candle_core::{Tensor, Var};

/// The optimiser's settings, written once (see `config::config_fields`, which this
/// follows): name, type, default.
macro_rules! optim_fields {
    ($m:ident! { $($pass:tt)* } $($more:tt)*) => {
        $m! { $($pass)* $($more)* [
            lr: f32 = 2e-4,
            weight_decay: f32 = 0.05,
            beta1: f32 = 0.9,
            beta2: f32 = 0.999,
            eps: f32 = 1e-8,
            /// Global-norm clip; 0 disables clipping.
            grad_clip: f32 = 1.0,
            warmup_steps: i64 = 500,
            /// Steps of the whole schedule; 0 keeps the rate constant after warmup.
            total_steps: i64 = 0,
        ] }
    };
}
pub(crate) use optim_fields;

/// `OptimConfig` and its defaults, from the field list.
macro_rules! define_optim_config {
    ([$($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,)*]) => {
        /// AdamW's settings, the warmup + cosine schedule and the gradient clip.
        #[derive(Clone, Debug, PartialEq)]
        pub struct OptimConfig {
            $($(#[$doc])* pub $name: $ty,)*
        }

        impl Default for OptimConfig {
            fn default() -> Self {
                OptimConfig { $($name: $default,)* }
            }
        }
    };
}
optim_fields!(define_optim_config! {});

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
        adamw::global_norm(grads)
    }

    /// One update with 1-based count `t`. Every new value is computed before any is
    /// written, so an error leaves parameters and moments as they were.
    #[allow(clippy::too_many_arguments)] // the step's scalars, each used once
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
            let k = adamw::Constants {
                b1,
                b2,
                bc1,
                bc2,
                lr,
                eps: cfg.eps as f64,
                decay,
                grad_scale: grad_scale as f64,
            };
            let (new_p, m, v) = adamw::update(p, g, &self.m[i], &self.v[i], &k)?;
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
