//! The bridge as a differentiable function of one flat parameter vector (ABI 5), for
//! hosts that train it in their own stack: the vector's layout, reading and writing it,
//! the training loss's gradient and a vector-Jacobian product as flat vectors, and one
//! step of the bridge's AdamW with a gradient the host gives (after its all-reduce).
//!
//! The vector is every model tensor in f32, in parameter order, each row-major.
//! Training-mode calls draw their dropout masks from a caller's seed: on the CPU from
//! `Rng::new(seed)`, on a GPU from the device's RNG seeded with it, so one seed gives one
//! set of masks (a forward and its VJP; a train step and `loss_grads` with
//! `Bridge::step_seed`).

use super::autograd::{dropout_seed, grad_of};
use super::shape::{CallShape, expect_dims};
use super::vector::{FlatGrads, ParamInfo, flatten};
use super::{Bridge, State, StepStats};
use crate::error::{Error, Result};
use crate::loss::alignment_loss;
use crate::rng::Rng;
use candle_core::{DType, Tensor, Var};

impl Bridge {
    /// The flat vector's tensors, in order.
    pub fn param_layout(&self) -> &[ParamInfo] {
        &self.layout
    }

    /// The flat vector's length.
    pub fn flat_len(&self) -> usize {
        self.layout.last().map_or(0, |p| p.offset + p.numel())
    }

    /// The seed of the dropout masks of the next `train_step`: `loss_grads` with it, then
    /// `apply_grads`, is that train step.
    pub fn step_seed(&self) -> u64 {
        let st = self.read();
        dropout_seed(st.train.seed, st.train.step)
    }

    /// The weights as one `[n]` f32 vector on the bridge's device.
    pub fn get_params(&self) -> Result<Tensor> {
        let st = self.read();
        flatten(st.params.iter().map(|(_, v)| v.as_tensor()))
    }

    /// Replaces every weight from the `[n]` vector `flat` (any float dtype, on the
    /// bridge's device), excluding other calls; the optimiser's moments and step are
    /// untouched. Nothing is written unless the whole vector is finite.
    pub fn set_params(&self, flat: &Tensor) -> Result<()> {
        expect_dims("params", flat, &[self.flat_len()])?;
        let flat = flat.to_dtype(DType::F32)?;
        // Checked before the lock is taken and any weight changes.
        if let Some((i, v)) = first_non_finite(&flat)? {
            return Err(Error::new(
                crate::error::ErrorKind::NonFinite,
                format!("params[{i}] = {v}; no weight was changed"),
            ));
        }
        let parts = self.split(&flat)?;
        let mut st = self.write();
        for ((_, var), part) in st.params.iter().zip(&parts) {
            var.set(part)?;
        }
        self.refresh_eval_model(&mut st)
    }

    /// `flat` cut into the parameters' tensors (views, contiguous).
    fn split(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        self.layout
            .iter()
            .map(|p| {
                Ok(flat
                    .narrow(0, p.offset, p.numel())?
                    .reshape(p.shape.as_slice())?)
            })
            .collect()
    }

    /// `loss_grads_at` with the tensors' shapes checked.
    pub fn loss_grads(
        &self,
        latents: &Tensor,
        targets: &Tensor,
        seed: u64,
        want_latents: bool,
    ) -> Result<(f32, FlatGrads)> {
        let shape = self.latent_shape(latents.dims())?;
        expect_dims("targets", targets, &shape.token_shape())?;
        let (loss, grads) = self.loss_grads_at(&shape, latents, targets, seed, want_latents)?;
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    /// `forward_train_at` with the latents' shape checked.
    pub fn forward_train(&self, latents: &Tensor, seed: u64) -> Result<Tensor> {
        let shape = self.latent_shape(latents.dims())?;
        self.forward_train_at(&shape, latents, seed)
    }

    /// `vjp_at` with the tensors' shapes checked.
    pub fn vjp(
        &self,
        latents: &Tensor,
        grad_out: &Tensor,
        seed: u64,
        want_latents: bool,
    ) -> Result<FlatGrads> {
        let shape = self.latent_shape(latents.dims())?;
        expect_dims("grad_out", grad_out, &shape.token_shape())?;
        self.vjp_at(&shape, latents, grad_out, seed, want_latents)
    }

    /// The training loss (the bridge's `w_*`) of `latents` against `targets` in training
    /// mode with the masks of `seed`, and its gradient: the parameters' as one flat vector,
    /// the latents' when `want_latents`. A non-finite loss is not an error: the loss and
    /// the gradients are what they are (a host's all-reduce then carries them to every
    /// rank, and `apply_grads` skips the step on all of them).
    pub fn loss_grads_at(
        &self,
        shape: &CallShape,
        latents: &Tensor,
        targets: &Tensor,
        seed: u64,
        want_latents: bool,
    ) -> Result<(Tensor, FlatGrads)> {
        debug_assert_eq!(targets.dims(), shape.token_shape());
        let targets = targets.to_dtype(DType::F32)?;
        self.seeded(seed, latents, want_latents, |pred| {
            alignment_loss(pred, &targets, &self.loss)
        })
    }

    /// Predicted tokens in training mode (dropout on, the masks of `seed`).
    pub fn forward_train_at(
        &self,
        shape: &CallShape,
        latents: &Tensor,
        seed: u64,
    ) -> Result<Tensor> {
        debug_assert_eq!(latents.dims(), shape.latents());
        let st = self.lock_for_masks(seed)?;
        let mut rng = Rng::new(seed);
        Ok(self.run(&st, true, latents, Some(&mut rng))?.detach())
    }

    /// The vector-Jacobian product of the training-mode forward with the masks of `seed`:
    /// d sum(forward(latents) * grad_out) / d params (flat) and, when `want_latents`,
    /// / d latents.
    pub fn vjp_at(
        &self,
        shape: &CallShape,
        latents: &Tensor,
        grad_out: &Tensor,
        seed: u64,
        want_latents: bool,
    ) -> Result<FlatGrads> {
        debug_assert_eq!(grad_out.dims(), shape.token_shape());
        let grad_out = grad_out.to_dtype(DType::F32)?;
        let (_, grads) = self.seeded(seed, latents, want_latents, |pred| {
            Ok((pred * &grad_out)?.sum_all()?)
        })?;
        Ok(grads)
    }

    /// `objective(pred)` of the training-mode forward with the masks of `seed`, and its
    /// gradients, under one weight version.
    fn seeded(
        &self,
        seed: u64,
        latents: &Tensor,
        want_latents: bool,
        objective: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, FlatGrads)> {
        // A variable only when its gradient is wanted: the backward then stops at the first
        // convolution's weights instead of going on to its input.
        let latents = latents.to_dtype(DType::F32)?;
        let var = want_latents
            .then(|| Var::from_tensor(&latents))
            .transpose()?;
        let input = var.as_ref().map_or(&latents, |v| v.as_tensor());
        let st = self.lock_for_masks(seed)?;
        let mut rng = Rng::new(seed);
        let pred = self.run(&st, true, input, Some(&mut rng))?;
        let value = objective(&pred)?;
        let grads = value.backward()?;
        let params = st
            .params
            .iter()
            .map(|(name, v)| grad_of(&grads, v.as_tensor(), name))
            .collect::<Result<Vec<_>>>()?;
        let latents = var
            .map(|v| grad_of(&grads, v.as_tensor(), "the latents"))
            .transpose()?;
        Ok((
            value.detach(),
            FlatGrads {
                params: flatten(params.iter())?,
                latents,
            },
        ))
    }

    /// The state for a training-mode call with the masks of `seed`. On a GPU the masks come
    /// from the device's RNG, which the call seeds: the write lock keeps another call from
    /// seeding it between. On the CPU each call has an RNG of its own: the read lock.
    fn lock_for_masks(&self, seed: u64) -> Result<Locked<'_>> {
        if self.device.is_cuda() {
            let st = self.write();
            self.device.set_seed(seed)?;
            Ok(Locked::Write(st))
        } else {
            Ok(Locked::Read(self.read()))
        }
    }

    /// One step of the bridge's AdamW (schedule, clipping, a non-finite gradient skips it)
    /// with the flat gradient `grad` (`[n]`, e.g. a host's all-reduced mean). With the
    /// gradient `loss_grads` gives for `step_seed()`, it is `train_step` on that batch.
    /// `StepStats.loss` is 0: the host has the loss.
    pub fn apply_grads(&self, grad: &Tensor) -> Result<StepStats> {
        expect_dims("grad_params", grad, &[self.flat_len()])?;
        let grads = self.split(&grad.to_dtype(DType::F32)?)?;
        let mut st = self.write();
        self.update(&mut st, 0.0, &grads)
    }
}

/// The state under a read or a write lock.
enum Locked<'a> {
    Read(super::Reading<'a>),
    Write(super::Writing<'a>),
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        match self {
            Locked::Read(r) => r,
            Locked::Write(w) => w,
        }
    }
}

/// The index and value of `flat`'s first NaN or Inf, if any. One reduction on the usual
/// path (0 * x is 0 for every finite x and NaN otherwise, so the sum is 0 exactly when all
/// are finite); the values are read back only to name the bad one.
fn first_non_finite(flat: &Tensor) -> Result<Option<(usize, f32)>> {
    if flat.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? == 0.0 {
        return Ok(None);
    }
    let values = flat.flatten_all()?.to_vec1::<f32>()?;
    Ok(values
        .iter()
        .position(|v| !v.is_finite())
        .map(|i| (i, values[i])))
}
