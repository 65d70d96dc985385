//! An entry point's arguments made into what the operations take: the bridge, the call's
//! shape checked once (`Bridge::call_shape` / `latent_shape` / `align_shape`) and the
//! caller's tensors as views. The pointer calls build their views from their scalar
//! arguments and that shape; the DLPack calls read theirs from the descriptors and derive
//! the shape from them.

use super::dlpack::{self, DLTensor};
use super::guard::lookup;
use super::io::Io;
use super::types::BridgeHandle;
use super::view::{BufDtype, View, positive_batch};
use crate::bridge::Bridge;
use crate::bridge::shape::{AlignShape, CallShape};
use crate::error::{Error, Result};
use std::ffi::c_void;
use std::sync::Arc;

/// A pointer call's bridge, buffers and checked shape.
pub struct PointerCall {
    pub bridge: Arc<Bridge>,
    pub shape: CallShape,
    dtype: BufDtype,
    /// Whether the buffers are host memory (else device memory of the bridge's GPU).
    host: bool,
}

/// Where a pointer call's buffers live.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// Host memory, whatever the bridge's device (`bridge_forward`).
    Host,
    /// Where the bridge lives: host memory for a CPU bridge, its GPU's for a CUDA bridge.
    Bridge,
}

impl PointerCall {
    /// The handle, the dtype code and the batch and latent size of a pointer call, checked.
    pub fn new(
        handle: *const BridgeHandle,
        (batch, height, width): (i64, i32, i32),
        dtype: i32,
        buffers: Buffers,
    ) -> Result<Self> {
        let bridge = lookup(handle)?;
        let dtype = BufDtype::from_code(dtype)?;
        let batch = positive_batch(batch)?;
        let shape = bridge.call_shape(batch, height as i64, width as i64)?;
        let host = buffers == Buffers::Host || !bridge.device().is_cuda();
        Ok(PointerCall {
            bridge,
            shape,
            dtype,
            host,
        })
    }

    /// The caller's buffer `name` at `ptr`, of `shape`.
    pub fn view(&self, name: &'static str, ptr: *const c_void, shape: &[usize]) -> View {
        View::raw(name, ptr, self.dtype, shape, self.host)
    }

    /// The caller's `float` loss, in host memory.
    pub fn loss_view(&self, loss: *mut f32) -> View {
        View::raw("loss", loss as *const c_void, BufDtype::F32, &[1], true)
    }
}

/// A DLPack call's tensor `name`, checked to live where the bridge does.
///
/// # Safety
/// As `dlpack::view`.
pub unsafe fn tensor(t: *const DLTensor, name: &'static str, bridge: &Bridge) -> Result<View> {
    // SAFETY: forwarded contract.
    unsafe { dlpack::view(t, name, bridge, false) }
}

/// A DLPack call's loss tensor, on the host or the bridge's device (its shape is checked
/// by `check_loss` once the batch is known).
///
/// # Safety
/// As `dlpack::view`.
pub unsafe fn loss_tensor(t: *const DLTensor, bridge: &Bridge) -> Result<View> {
    // SAFETY: forwarded contract.
    unsafe { dlpack::view(t, "loss", bridge, true) }
}

/// A call on the flat parameter vector `flat` alone (`bridge_get/set_params_dlpack`):
/// the bridge, the view and the caller's stream, handed to `op`.
///
/// # Safety
/// As `dlpack::view`, and `op`'s contract for a checked view.
pub unsafe fn flat_call(
    handle: *const BridgeHandle,
    flat: *const DLTensor,
    stream: *mut c_void,
    op: unsafe fn(&Bridge, &View, Io) -> Result<()>,
) -> Result<()> {
    let bridge = lookup(handle)?;
    // SAFETY: forwarded contract.
    let v = unsafe { tensor(flat, "params", &bridge)? };
    let io = Io::for_bridge(&bridge, stream)?;
    // SAFETY: a checked view, per the contract.
    unsafe { op(&bridge, &v, io) }
}

/// An optional tensor: `None` for NULL, else as `tensor`.
///
/// # Safety
/// As `dlpack::view`.
pub unsafe fn optional_tensor(
    t: *const DLTensor,
    name: &'static str,
    bridge: &Bridge,
) -> Result<Option<View>> {
    if t.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { tensor(t, name, bridge).map(Some) }
}

/// A loss tensor of one element (the calls that give no per-sample loss).
pub fn one_element(loss: &View) -> Result<()> {
    if loss.numel() == Some(1) {
        return Ok(());
    }
    Err(Error::shape(format!(
        "loss has shape {:?}; expected one element",
        loss.shape
    )))
}

/// A loss tensor holds one element (the mean) or `[B]` (each sample's loss, ABI 4).
pub fn check_loss(loss: &View, call: &CallShape) -> Result<()> {
    let batch = call.batch();
    // A checked count: a shape whose product wraps to 1 is no one-element tensor.
    if loss.numel() == Some(1) || loss.shape == [batch] {
        return Ok(());
    }
    Err(Error::shape(format!(
        "loss has shape {:?}; expected one element (the mean), or [{batch}] (each sample's \
         loss; {batch} is the latents' batch)",
        loss.shape
    )))
}

/// The alignment shape of a DLPack call: `pred` is `[B, T, D]` (its grid inferred from
/// `T`) or `[B, pred_h, pred_w, D]`, with the call's batch and the bridge's `target_dim`.
pub fn align_shape(bridge: &Bridge, call: CallShape, pred: &View) -> Result<AlignShape> {
    let [batch, _, d] = call.token_shape();
    match pred.shape[..] {
        [b, t, pd] if b == batch && pd == d => bridge.align_shape_of_tokens(call, t),
        [b, ph, pw, pd] if b == batch && pd == d => {
            bridge.align_shape(call, (ph as i64, pw as i64))
        }
        _ => Err(Error::shape(format!(
            "pred has shape {:?}; expected [{batch}, T, {d}] or [{batch}, pred_h, pred_w, {d}]",
            pred.shape
        ))),
    }
}
