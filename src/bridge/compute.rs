//! What a bridge computes: predicted tokens, REPA alignment (loss and d loss / d pred), the
//! latent loss (its gradient through the frozen bridge to the latents), parameter
//! gradients, and a train step. Each comes twice: a Rust API method that checks its
//! tensors' shapes, and an `_at` method that takes the call's checked shape and checks
//! nothing again (the C boundary's path).

use super::autograd::{dropout_seed, grad_of};
use super::shape::{AlignShape, CallShape, expect_dims};
use super::{Bridge, State, StepStats, eval_model};
use crate::error::Result;
use crate::log::{Level, emit};
use crate::loss::{
    GridMatch, alignment_loss, alignment_loss_per_sample, pool_tokens, spatial_norm,
};
use crate::model::BridgeModel;
use crate::optim::AdamW;
use crate::rng::Rng;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

impl Bridge {
    /// Predicted tokens `[B, h*w, D]` for latents `[B, C, H, W]` (evaluation mode), on the
    /// token grid `(h, w) = (H, W) / 2^adapter_depth`.
    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let shape = self.latent_shape(latents.dims())?;
        self.forward_at(&shape, latents)
    }

    /// `forward` on latents of the checked shape `shape`.
    pub fn forward_at(&self, shape: &CallShape, latents: &Tensor) -> Result<Tensor> {
        debug_assert_eq!(latents.dims(), shape.latents());
        self.run(&self.read(), false, latents, None)
    }

    /// The model on `latents` in the compute dtype, f32 out: the eval model, or in
    /// training the model over the variables (in bf16, over differentiable casts of them,
    /// so that the gradient reaches the f32 masters).
    pub(super) fn run(
        &self,
        st: &State,
        train: bool,
        latents: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let x = latents.to_dtype(self.compute)?;
        let y = match (train, self.compute) {
            (false, _) => st.eval_model.forward(&x, None)?,
            (true, DType::F32) => st.train_model.forward(&x, rng)?,
            (true, dtype) => {
                let cast: HashMap<String, Tensor> = st
                    .params
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?)))
                    .collect::<Result<_>>()?;
                BridgeModel::load(&cast, &self.config)?.forward(&x, rng)?
            }
        };
        Ok(y.to_dtype(DType::F32)?)
    }

    /// REPA alignment: the loss between the caller's `pred` `[B, ph*pw, D]` on its grid
    /// `(ph, pw)` and the frozen bridge's prediction for `latents`, and d loss / d pred.
    /// The finer of the two grids is average-pooled onto the coarser (DESIGN.md), then
    /// the target is spatially normalised when `spatial_norm_gamma > 0`.
    pub fn loss_backward(
        &self,
        pred: &Tensor,
        latents: &Tensor,
        pred_grid: (usize, usize),
    ) -> Result<(f32, Tensor)> {
        let call = self.latent_shape(latents.dims())?;
        let shape = self.align_shape(call, (pred_grid.0 as i64, pred_grid.1 as i64))?;
        expect_dims("pred", pred, &shape.pred_shape())?;
        let (per_sample, grad) = self.align_at(&shape, pred, latents)?;
        Ok((per_sample.mean_all()?.to_scalar::<f32>()?, grad))
    }

    /// `loss_backward` on tensors of the checked shape `shape`: the loss of each sample
    /// (`[B]` f32, left where it was computed: on a GPU, nothing waits) and the gradient of
    /// their mean. Alignment's own weights (`align_weights`, REPA's by default).
    pub fn align_at(
        &self,
        shape: &AlignShape,
        pred: &Tensor,
        latents: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        debug_assert_eq!(pred.dims(), shape.pred_shape());
        // The target needs the weights only until it is computed: the gradient is pred's.
        let target = self.forward_at(&shape.call, latents)?;
        let pred = Var::from_tensor(&pred.to_dtype(DType::F32)?)?;
        let (p, target) = match shape.matched {
            GridMatch::Same => (pred.as_tensor().clone(), target),
            GridMatch::PoolPred(k) => (pool_tokens(pred.as_tensor(), shape.pred_grid, k)?, target),
            GridMatch::PoolTarget(k) => (
                pred.as_tensor().clone(),
                pool_tokens(&target, shape.call.grid(), k)?,
            ),
        };
        let target = if self.spatial_norm_gamma > 0.0 {
            spatial_norm(&target, self.spatial_norm_gamma)?
        } else {
            target
        };
        let per_sample = alignment_loss_per_sample(&p, &target, &self.align)?;
        let grads = per_sample.mean_all()?.backward()?;
        let grad = grad_of(&grads, pred.as_tensor(), "pred")?;
        Ok((per_sample.detach(), grad))
    }

    /// The loss between bridge(latents) and `target` (`[B, h*w, D]`), with alignment's
    /// weights, and its gradient with respect to the latents through the frozen bridge.
    pub fn latent_loss_backward(&self, latents: &Tensor, target: &Tensor) -> Result<(f32, Tensor)> {
        let shape = self.latent_shape(latents.dims())?;
        expect_dims("target", target, &shape.token_shape())?;
        let (per_sample, grad) = self.latent_loss_at(&shape, latents, target)?;
        Ok((per_sample.mean_all()?.to_scalar::<f32>()?, grad))
    }

    /// `latent_loss_backward` on tensors of the checked shape `shape`: each sample's loss
    /// (`[B]`, on the bridge's device) and the gradient of their mean, with alignment's
    /// weights. The read lock is held through the backward: the eval model's weights are
    /// views of the variables' storage, so an update landing mid-backward would mix two
    /// weight versions in one gradient.
    pub fn latent_loss_at(
        &self,
        shape: &CallShape,
        latents: &Tensor,
        target: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        debug_assert_eq!(target.dims(), shape.token_shape());
        let latents = Var::from_tensor(&latents.to_dtype(DType::F32)?)?;
        let st = self.read();
        let pred = self.run(&st, false, latents.as_tensor(), None)?;
        let target = target.to_dtype(DType::F32)?;
        let per_sample = alignment_loss_per_sample(&pred, &target, &self.align)?;
        let grads = per_sample.mean_all()?.backward()?;
        let grad = grad_of(&grads, latents.as_tensor(), "the latents")?;
        drop(st);
        Ok((per_sample.detach(), grad))
    }

    /// The training loss on a batch and the gradient of every parameter, by name, without
    /// updating anything (dropout on, with the masks the next train step would draw). It
    /// takes the write lock like a train step: on a GPU the masks come from the device's
    /// RNG, which it seeds.
    pub fn param_grads(
        &self,
        latents: &Tensor,
        targets: &Tensor,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        let shape = self.latent_shape(latents.dims())?;
        expect_dims("targets", targets, &shape.token_shape())?;
        let st = self.write();
        let (loss, grads) = self.loss_and_grads(&st, latents, targets)?;
        let named = st
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .zip(grads)
            .collect();
        Ok((loss, named))
    }

    /// The training loss and every parameter's gradient, with the dropout masks of the
    /// next step: drawn from `dropout_seed(seed, step)` (on a GPU by the device's RNG
    /// seeded with it), so that a resumed run and `loss_grads` with `step_seed` draw the
    /// same ones.
    fn loss_and_grads(
        &self,
        st: &State,
        latents: &Tensor,
        targets: &Tensor,
    ) -> Result<(f32, Vec<Tensor>)> {
        let seed = dropout_seed(st.train.seed, st.train.step);
        if self.device.is_cuda() {
            self.device.set_seed(seed)?;
        }
        let pred = self.run(st, true, latents, Some(&mut Rng::new(seed)))?;
        let loss = alignment_loss(&pred, &targets.to_dtype(DType::F32)?, &self.loss)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Ok((loss_value, Vec::new()));
        }
        let grads = loss.backward()?;
        let grads = st
            .params
            .iter()
            .map(|(name, v)| grad_of(&grads, v.as_tensor(), name))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss_value, grads))
    }

    /// One AdamW step on `latents` `[B, C, H, W]` and `targets` `[B, h*w, D]`. A non-finite
    /// loss or gradient norm skips the update and leaves every weight untouched.
    pub fn train_step(&self, latents: &Tensor, targets: &Tensor) -> Result<StepStats> {
        let shape = self.latent_shape(latents.dims())?;
        expect_dims("targets", targets, &shape.token_shape())?;
        self.train_step_at(&shape, latents, targets)
    }

    /// `train_step` on tensors of the checked shape `shape`.
    pub fn train_step_at(
        &self,
        shape: &CallShape,
        latents: &Tensor,
        targets: &Tensor,
    ) -> Result<StepStats> {
        debug_assert_eq!(targets.dims(), shape.token_shape());
        let mut st = self.write();
        let (loss, grads) = self.loss_and_grads(&st, latents, targets)?;
        if !loss.is_finite() {
            // (The warning reaches the host's callback once the lock is released.)
            emit(
                Level::Warn,
                format!(
                    "train step {}: the loss is {loss}; the update was skipped",
                    st.train.step + 1
                ),
            );
            return Ok(StepStats {
                loss,
                grad_norm: f32::NAN,
                lr: self.optim_cfg.lr_at(st.train.step),
                step: st.train.step,
                skipped: true,
            });
        }
        self.update(&mut st, loss, &grads)
    }

    /// One AdamW update with `grads` (every parameter's, in order; frozen ones are not
    /// updated and not in the norm): clipped to the global norm, skipped when that norm is
    /// not finite. `loss` is only reported.
    pub(super) fn update(&self, st: &mut State, loss: f32, grads: &[Tensor]) -> Result<StepStats> {
        let lr = self.optim_cfg.lr_at(st.train.step);
        let trained: Vec<Tensor> = grads
            .iter()
            .zip(&st.trainable)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.clone())
            .collect();
        let grad_norm = AdamW::global_norm(&trained)?;
        if !grad_norm.is_finite() {
            emit(
                Level::Warn,
                format!(
                    "train step {}: the gradient norm is {grad_norm}; the update was skipped",
                    st.train.step + 1
                ),
            );
            return Ok(StepStats {
                loss,
                grad_norm,
                lr,
                step: st.train.step,
                skipped: true,
            });
        }
        let clip = self.optim_cfg.grad_clip;
        let scale = if clip > 0.0 && grad_norm > clip {
            clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let t = st.train.step + 1;
        let State {
            optim,
            params,
            trainable,
            ..
        } = st;
        optim.step(&self.optim_cfg, params, trainable, grads, lr, scale, t)?;
        self.refresh_eval_model(st)?;
        st.train.step = t;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            step: t,
            skipped: false,
        })
    }

    /// After the weights changed: bf16 compute rebuilds its eval model's copies (f32's
    /// views see the change).
    pub(super) fn refresh_eval_model(&self, st: &mut State) -> Result<()> {
        if self.compute != DType::F32 {
            st.eval_model = eval_model(&st.params, &self.config, self.compute)?;
        }
        Ok(())
    }
}
