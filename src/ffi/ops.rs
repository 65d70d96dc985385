//! One function per operation of the C API, shared by its pointer and its DLPack entry
//! points: each takes the bridge, the call's checked shape (made once, at the entry point)
//! and the caller's tensors as views, checks the outputs before any work, reads the
//! inputs, computes, and writes the results. Nothing here checks a shape again.

use super::io::Io;
use super::view::View;
use crate::bridge::shape::{AlignShape, CallShape};
use crate::bridge::{Bridge, StepStats};
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
