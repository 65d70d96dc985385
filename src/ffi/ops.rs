//! One function per operation of the C API, shared by its pointer and its DLPack entry
//! points: each takes the bridge, the call's checked shape (made once, at the entry point)
//! and the caller's tensors as views, checks the outputs before any work, reads the
//! inputs, computes, and writes the results. Nothing here checks a shape again.

use super::io::Io;
use super::view::BufDtype;
use super::view::View;
use crate::bridge::shape::{AlignShape, CallShape};
use crate::bridge::{Bridge, FlatGrads, StepStats};
use crate::error::{Error, ErrorKind, Result};
use candle_core::Tensor;

/// Predicted tokens of `latents` into `out` (shapes: `shape.latents()`, `shape.token_shape()`).
///
/// # Safety
/// Each view holds what it describes (`Io::read`).
pub unsafe fn forward(
    bridge: &Bridge,
    shape: &CallShape,
    latents: &View,
    out: &View,
    io: Io,
) -> Result<()> {
    io.check_output(out)?;
    // SAFETY: the views' contract. (Device input is not scanned for NaN/Inf.)
    let x = unsafe { io.read(latents, true)? };
    let tokens = bridge.forward_at(shape, &x)?;
    // SAFETY: as above.
    unsafe { io.write(out, &tokens)? };
    io.finish()
}

/// REPA alignment: the loss between `pred` (the caller's grid, `[B, T, D]` or
/// `[B, ph, pw, D]`) and the frozen bridge's prediction for `latents`, with d loss / d
/// pred into `grad_pred` (pred's shape) and the loss into `loss` (the mean, or each
/// sample's).
///
/// # Safety
/// As `forward`.
pub unsafe fn align(
    bridge: &Bridge,
    shape: &AlignShape,
    [pred, latents]: [&View; 2],
    [grad_pred, loss]: [&View; 2],
    io: Io,
) -> Result<()> {
    io.check_output(grad_pred)?;
    io.check_output(loss)?;
    // SAFETY: the views' contract.
    let (p, x) = unsafe { (io.read(pred, true)?, io.read(latents, true)?) };
    let p = p.reshape(shape.pred_shape().as_slice())?;
    let (per_sample, grad) = bridge.align_at(shape, &p, &x)?;
    // SAFETY: as above.
    unsafe { write_grad_and_loss(&io, (grad_pred, &grad), loss, &per_sample)? };
    io.finish()
}

/// The loss between bridge(`latents`) and `target`, with its gradient with respect to the
/// latents into `grad_latents` and the loss into `loss`.
///
/// # Safety
/// As `forward`.
pub unsafe fn latent_loss(
    bridge: &Bridge,
    shape: &CallShape,
    [latents, target]: [&View; 2],
    [grad_latents, loss]: [&View; 2],
    io: Io,
) -> Result<()> {
    io.check_output(grad_latents)?;
    io.check_output(loss)?;
    // SAFETY: the views' contract.
    let (x, t) = unsafe { (io.read(latents, true)?, io.read(target, true)?) };
    let (per_sample, grad) = bridge.latent_loss_at(shape, &x, &t)?;
    // SAFETY: as above.
    unsafe { write_grad_and_loss(&io, (grad_latents, &grad), loss, &per_sample)? };
    io.finish()
}

/// One AdamW step on `latents` and `targets`. Non-finite inputs are not an error here:
/// they make a non-finite loss, which skips the update like any other.
///
/// # Safety
/// As `forward`.
pub unsafe fn train_step(
    bridge: &Bridge,
    shape: &CallShape,
    latents: &View,
    targets: &View,
    io: Io,
) -> Result<StepStats> {
    // SAFETY: the views' contract.
    let (x, t) = unsafe { (io.read(latents, false)?, io.read(targets, false)?) };
    let stats = bridge.train_step_at(shape, &x, &t)?;
    io.finish()?;
    Ok(stats)
}

/// (ABI 5) The flat parameter vector into `flat` (f32 `[n]`).
///
/// # Safety
/// As `forward`.
pub unsafe fn get_params(bridge: &Bridge, flat: &View, io: Io) -> Result<()> {
    check_flat(bridge, flat)?;
    io.check_output(flat)?;
    let params = bridge.get_params()?;
    // SAFETY: the views' contract.
    unsafe { io.write(flat, &params)? };
    io.finish()
}

/// (ABI 5) Every weight from `flat` (f32 `[n]`, finite).
///
/// # Safety
/// As `forward`.
pub unsafe fn set_params(bridge: &Bridge, flat: &View, io: Io) -> Result<()> {
    check_flat(bridge, flat)?;
    // SAFETY: the views' contract. (`Bridge::set_params` checks the values, on any device.)
    let params = unsafe { io.read(flat, false)? };
    bridge.set_params(&params)?;
    io.finish()
}

/// (ABI 5) The training loss with the masks of `seed` into `loss` (one element), its
/// gradient into `grads[0]` (the flat vector) and, when given, `grads[1]` (the latents').
///
/// # Safety
/// As `forward`.
pub unsafe fn loss_grads(
    bridge: &Bridge,
    shape: &CallShape,
    [latents, targets]: [&View; 2],
    (grad_params, grad_latents): (&View, Option<&View>),
    loss: &View,
    seed: u64,
    io: Io,
) -> Result<()> {
    check_grad_outputs(bridge, &io, grad_params, grad_latents)?;
    io.check_output(loss)?;
    // SAFETY: the views' contract. (A non-finite input makes a non-finite loss: no error.)
    let (x, t) = unsafe { (io.read(latents, false)?, io.read(targets, false)?) };
    let (value, grads) = bridge.loss_grads_at(shape, &x, &t, seed, grad_latents.is_some())?;
    // SAFETY: as above.
    unsafe { write_grads(&io, &grads, grad_params, grad_latents)? };
    // SAFETY: as above.
    unsafe { io.write(loss, &value)? };
    io.finish()
}

/// (ABI 5) Tokens in training mode with the masks of `seed` into `out`.
///
/// # Safety
/// As `forward`.
pub unsafe fn forward_train(
    bridge: &Bridge,
    shape: &CallShape,
    latents: &View,
    out: &View,
    seed: u64,
    io: Io,
) -> Result<()> {
    io.check_output(out)?;
    // SAFETY: the views' contract.
    let x = unsafe { io.read(latents, true)? };
    let tokens = bridge.forward_train_at(shape, &x, seed)?;
    // SAFETY: as above.
    unsafe { io.write(out, &tokens)? };
    io.finish()
}

/// (ABI 5) The vector-Jacobian product of the training-mode forward with the masks of
/// `seed` and the cotangent `grad_out`: into `grad_params` and, when given, `grad_latents`.
///
/// # Safety
/// As `forward`.
pub unsafe fn vjp(
    bridge: &Bridge,
    shape: &CallShape,
    [latents, grad_out]: [&View; 2],
    (grad_params, grad_latents): (&View, Option<&View>),
    seed: u64,
    io: Io,
) -> Result<()> {
    check_grad_outputs(bridge, &io, grad_params, grad_latents)?;
    // SAFETY: the views' contract.
    let (x, g) = unsafe { (io.read(latents, true)?, io.read(grad_out, true)?) };
    let grads = bridge.vjp_at(shape, &x, &g, seed, grad_latents.is_some())?;
    // SAFETY: as above.
    unsafe { write_grads(&io, &grads, grad_params, grad_latents)? };
    io.finish()
}

/// (ABI 5) One step of the bridge's AdamW with the flat gradient `grad_params`.
///
/// # Safety
/// As `forward`.
pub unsafe fn apply_grads(bridge: &Bridge, grad_params: &View, io: Io) -> Result<StepStats> {
    check_flat(bridge, grad_params)?;
    // SAFETY: the views' contract. (A non-finite gradient skips the step: no error.)
    let g = unsafe { io.read(grad_params, false)? };
    let stats = bridge.apply_grads(&g)?;
    io.finish()?;
    Ok(stats)
}

/// A flat parameter vector (or its gradient) is f32 `[n]`.
fn check_flat(bridge: &Bridge, v: &View) -> Result<()> {
    if v.dtype != BufDtype::F32 {
        return Err(Error::invalid(format!(
            "{} is {}; the flat parameter vector is float32",
            v.name,
            v.dtype.name()
        )));
    }
    v.expect_shape(&[bridge.flat_len()])
}

/// The gradient outputs of `loss_grads` and `vjp`, checked before any work.
fn check_grad_outputs(
    bridge: &Bridge,
    io: &Io,
    grad_params: &View,
    grad_latents: Option<&View>,
) -> Result<()> {
    check_flat(bridge, grad_params)?;
    io.check_output(grad_params)?;
    grad_latents.map_or(Ok(()), |g| io.check_output(g))
}

/// Writes flat gradients: the parameters', and the latents' where asked for.
///
/// # Safety
/// The views hold what they describe.
unsafe fn write_grads(
    io: &Io,
    grads: &FlatGrads,
    params: &View,
    latents: Option<&View>,
) -> Result<()> {
    // SAFETY: the contract above.
    unsafe { io.write(params, &grads.params)? };
    if let (Some(view), Some(g)) = (latents, &grads.latents) {
        // SAFETY: the contract above.
        unsafe { io.write(view, g)? };
    }
    Ok(())
}

/// Writes a gradient and the loss: the mean of `per_sample` (`[B]`) into a one-element
/// `loss_view`, or each sample's into a `[B]` one. Into a device loss tensor without
/// waiting for it (a non-finite loss is written as it is: no host saw it), or read back
/// into a host one, checked finite first (then nothing is written on a non-finite loss).
///
/// # Safety
/// The views hold what they describe; `loss_view` holds one element or `B`.
unsafe fn write_grad_and_loss(
    io: &Io,
    (grad_view, grad): (&View, &Tensor),
    loss_view: &View,
    per_sample: &Tensor,
) -> Result<()> {
    let loss = if loss_view.numel() == Some(1) {
        per_sample.mean_all()?
    } else {
        per_sample.clone()
    };
    if loss_view.host {
        // One sync on a GPU: the values are both the output and the NaN check.
        let values = loss.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("the loss is {bad}; nothing was written"),
            ));
        }
        // SAFETY: the contract above.
        unsafe {
            io.write(grad_view, grad)?;
            io.write(loss_view, &Tensor::new(values, &candle_core::Device::Cpu)?)
        }
    } else {
        // SAFETY: the contract above.
        unsafe {
            io.write(grad_view, grad)?;
            io.write(loss_view, &loss)
        }
    }
}
