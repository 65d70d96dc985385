//! The C API: the entry points, and nothing else (`include/dino_bridge.h` is generated
//! from this file and `types.rs` by cbindgen).
//!
//! Every entry point returns a status (`BRIDGE_OK` or a `BRIDGE_ERR_*` code), never
//! panics across the boundary (`guard::ffi_call`), checks every pointer and size before
//! use, and leaves a message for `bridge_last_error` on failure. The caller's buffers are
//! read and written through `io::Io`; params and info structs convert in `params.rs`.

pub mod dlpack;
pub mod guard;
pub mod io;
pub mod params;
pub mod types;

use crate::bridge::Bridge;
use crate::error::{Error, ErrorKind, Result};
use crate::loss::GridMatch;
use candle_core::Tensor;
use dlpack::{DLTensor, View};
use guard::{ffi_call, lookup, struct_size, write_versioned};
use io::{BufDtype, CallShape, Io};
use params::{OUT_MIN_SIZE, PARAMS_MIN_SIZE};
use std::ffi::c_void;
use std::os::raw::c_char;
use types::*;

/// Where a compute call's buffers live.
enum Buffers {
    /// Host memory, whatever the bridge's device (`bridge_forward`).
    Host,
    /// Where the bridge lives (device memory of its GPU ordered on this stream, or host
    /// memory for a CPU bridge).
    Bridge(*mut c_void),
}

/// What every compute entry point shares: the handle and dtype code resolved, the
/// caller's buffers set up (`Io`), `body` run, and the caller's stream joined after it
/// (dropping the `Io` joins it on error paths too). `R` is what the entry point writes
/// to its host-side outputs (loss, stats) once everything else succeeded.
fn compute<R>(
    handle: *const BridgeHandle,
    (batch, height, width): (i64, i32, i32),
    dtype: i32,
    buffers: Buffers,
    body: impl FnOnce(&Bridge, &Io, BufDtype) -> Result<R>,
) -> Result<R> {
    let bridge = lookup(handle)?;
    let dt = BufDtype::from_code(dtype)?;
    let shape = CallShape::of(&bridge, height as i64, width as i64)?;
    bridge.check_fits(batch, shape.grid)?;
    let io = match buffers {
        Buffers::Host => Io::host(&bridge, batch, shape),
        Buffers::Bridge(stream) => Io::for_bridge(&bridge, batch, shape, stream)?,
    };
    run_io(io, |io| body(&bridge, io, dt))
}

/// `body` on the call's buffers, then the caller's stream joined (on error paths the
/// `Io`'s drop joins it).
fn run_io<R>(io: Io, body: impl FnOnce(&Io) -> Result<R>) -> Result<R> {
    let r = body(&io)?;
    io.finish()?;
    Ok(r)
}

/// The forward of `bridge_forward` and `bridge_forward_cuda_ptr`.
///
/// # Safety
/// As the entry points: buffers NULL or holding `batch` samples.
unsafe fn forward_into(
    bridge: &Bridge,
    io: &Io,
    dt: BufDtype,
    latents: *const c_void,
    out: *mut c_void,
) -> Result<()> {
    io.check_output(
        out,
        bridge.config().output_numel(io.shape().grid),
        dt,
        "out",
    )?;
    // SAFETY: the entry points' contracts. (Device input is not scanned for NaN/Inf.)
    let x = unsafe { io.latents(latents, dt, true)? };
    let y = bridge.forward(&x)?;
    // SAFETY: `out` was checked to hold `batch` output samples (and is caller memory).
    unsafe { io.write(out, &y, dt, "out") }
}

fn finite_loss(loss: f32) -> Result<f32> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(Error::new(
            ErrorKind::NonFinite,
            format!("the loss is {loss}; nothing was written"),
        ))
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "this library was built without CUDA support (rebuild with `--features cuda`)",
    )
}

/// Fills `*params` with the defaults (the published configuration, CPU, f32, fresh
/// weights). Set `params->struct_size = sizeof(BridgeParams)` first: exactly that many
/// bytes are written, so a caller built against an older header stays safe.
///
/// Returns `BRIDGE_OK`, `BRIDGE_ERR_INVALID_ARGUMENT` (NULL) or `BRIDGE_ERR_ABI_MISMATCH`.
/// Thread-safe.
///
/// # Safety
/// `params` must be NULL or point to `params->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_params_default(params: *mut BridgeParams) -> i32 {
    ffi_call("bridge_params_default", || {
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(params, "params", "BridgeParams", PARAMS_MIN_SIZE)? };
        let mut d = params::defaults();
        d.struct_size = size as u32;
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(params, size, &d) };
        Ok(())
    })
}

/// The ABI version of this library (`BRIDGE_ABI_VERSION` of the header it was built
/// with). Compare it with the header's at start-up. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn bridge_abi_version() -> u32 {
    BRIDGE_ABI_VERSION
}

/// The message of the last failed call on this thread ("" if none). The pointer stays
/// valid until the next failing call on the same thread; do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn bridge_last_error() -> *const c_char {
    guard::last_error_ptr()
}

/// Creates a bridge: loads `params->checkpoint_path` (safetensors or PyTorch `.pt`; the
/// model config comes from the file) or initialises fresh weights from the config fields.
/// On success `*out` owns the handle; free it with `bridge_destroy`.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, bad config or settings, non-UTF-8
/// path), `ABI_MISMATCH` (`struct_size`), `IO` (file missing or unreadable),
/// `CHECKPOINT` (truncated, corrupt, or tensors that do not fit the config),
/// `UNSUPPORTED` (CUDA device or bf16 compute in a CPU-only build), `DEVICE` (no such
/// CUDA device, or its driver failed). Thread-safe. `params` and its path are only read
/// during the call. A CUDA bridge gets a non-blocking stream of its own on its device.
///
/// # Safety
/// `params` must be NULL or a valid `BridgeParams` of `struct_size` bytes; `out` must be
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_create(
    params: *const BridgeParams,
    out: *mut *mut BridgeHandle,
) -> i32 {
    ffi_call("bridge_create", || {
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(params, "params", "BridgeParams", PARAMS_MIN_SIZE)? };
        if out.is_null() {
            return Err(Error::invalid("out (the handle pointer) is NULL"));
        }
        // SAFETY: `size` readable bytes, checked above; older callers' missing fields
        // keep their defaults.
        let p = unsafe { guard::read_versioned(params, size, params::defaults()) };
        let opts = params::options_from(&p)?;
        let bridge = if p.checkpoint_path.is_null() {
            Bridge::new(&opts)?
        } else {
            // SAFETY: a non-NULL path is a NUL-terminated string by contract.
            let path = unsafe { params::path_arg(p.checkpoint_path, "params.checkpoint_path")? };
            Bridge::open(&path, &opts)?
        };
        // SAFETY: checked non-NULL; the caller provides a writable handle slot.
        unsafe { *out = guard::register(bridge) };
        Ok(())
    })
}

/// Frees a bridge. NULL is a no-op. A call still running on another thread finishes
/// first (it holds its own reference); the handle must not be used afterwards (doing so
/// returns `BRIDGE_ERR_INVALID_ARGUMENT`). A CUDA bridge's stream is drained before its
/// weights are freed (a host wait for the bridge's own work, not the caller's).
///
/// Returns `BRIDGE_OK` or `INVALID_ARGUMENT` (not a live handle). Thread-safe.
///
/// # Safety
/// `handle` is an opaque token; any value is safe to pass.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_destroy(handle: *mut BridgeHandle) -> i32 {
    ffi_call("bridge_destroy", || {
        if handle.is_null() {
            return Ok(());
        }
        guard::unregister(handle).map(drop).ok_or_else(|| {
            Error::invalid(format!(
                "handle {handle:p} is not a live bridge (destroyed twice?)"
            ))
        })
    })
}

/// Describes the loaded bridge. Set `info->struct_size = sizeof(BridgeInfo)` first.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL or dead handle), `ABI_MISMATCH`.
/// Thread-safe.
///
/// # Safety
/// `info` must be NULL or point to `info->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_get_info(
    handle: *const BridgeHandle,
    info: *mut BridgeInfo,
) -> i32 {
    ffi_call("bridge_get_info", || {
        let bridge = lookup(handle)?;
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(info, "info", "BridgeInfo", OUT_MIN_SIZE)? };
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(info, size, &params::info_of(&bridge, size)) };
        Ok(())
    })
}

/// Predicts DINOv2 tokens: `latents` `[batch, in_ch, height, width]` in, `out`
/// `[batch, h*w, target_dim]` out on the token grid `(h, w) = (height, width) /
/// 2^adapter_depth` (row-major), both host buffers of `dtype` (`BRIDGE_DTYPE_*`).
/// Evaluation mode (no dropout). Any latent size whose sides are multiples of
/// `2^adapter_depth` runs on the same weights (the position embedding is resized).
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch <= 0, unknown
/// dtype), `SHAPE` (a side zero, negative, not a multiple of `2^adapter_depth` or too
/// large; a call, batch included, larger than the device's memory),
/// `NON_FINITE` (NaN/Inf in `latents`; `out` untouched), `INTERNAL`. Thread-safe: forward and loss calls on one handle run concurrently; a
/// train step or save waits for them.
///
/// # Safety
/// Buffers must be NULL or hold `batch` samples of `dtype`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_forward(
    handle: *const BridgeHandle,
    latents: *const c_void,
    out: *mut c_void,
    batch: i64,
    height: i32,
    width: i32,
    dtype: i32,
) -> i32 {
    ffi_call("bridge_forward", || {
        compute(
            handle,
            (batch, height, width),
            dtype,
            Buffers::Host,
            |bridge, io, dt| {
                // SAFETY: host buffers of `batch` samples, per the contract above.
                unsafe { forward_into(bridge, io, dt, latents, out) }
            },
        )
    })
}

/// `bridge_forward` on caller-owned CUDA device pointers of the bridge's GPU, ordered on
/// the caller's `cudaStream_t` `stream` (NULL: the legacy default stream). The bridge
/// waits for the work already queued on `stream` (an event, no host sync), copies
/// `latents` device-to-device, computes on its own stream, copies into `out` and makes
/// `stream` wait for that copy: `out` is ready for work queued on `stream` afterwards.
/// The caller keeps ownership of both buffers; nothing is retained after the call.
/// Device input is not scanned for NaN/Inf (that would need a host sync).
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype, a host
/// pointer or another device's memory, a buffer smaller than `batch` samples, a CPU
/// bridge), `SHAPE` (as `bridge_forward`), `UNSUPPORTED` (a build without CUDA, before
/// any other check of the buffers; nothing touched), `INTERNAL` (a CUDA
/// driver error, named in the message). Thread-safe like `bridge_forward`.
///
/// # Safety
/// Pointers must be NULL or device addresses; sizes are checked against the driver's
/// record of the allocation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_forward_cuda_ptr(
    handle: *const BridgeHandle,
    latents: *const c_void,
    out: *mut c_void,
    batch: i64,
    height: i32,
    width: i32,
    dtype: i32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_forward_cuda_ptr", || {
        #[cfg(not(feature = "cuda"))]
        {
            lookup(handle)?;
            BufDtype::from_code(dtype)?;
            let _ = (latents, out, batch, height, width, stream);
            Err(no_cuda())
        }
        #[cfg(feature = "cuda")]
        compute(
            handle,
            (batch, height, width),
            dtype,
            Buffers::Bridge(stream),
            |bridge, io, dt| {
                if !bridge.device().is_cuda() {
                    return Err(Error::invalid(
                        "this bridge runs on the CPU: use bridge_forward with host buffers",
                    ));
                }
                // SAFETY: device pointers, checked with the driver before each copy.
                unsafe { forward_into(bridge, io, dt, latents, out) }
            },
        )
    })
}

/// REPA alignment loss. The target is the frozen bridge's prediction for `latents`
/// `[batch, in_ch, height, width]`, on its token grid `(h, w)`; `pred` is the caller's
/// projection `[batch, pred_h*pred_w, target_dim]` on its grid `(pred_h, pred_w)`, which
/// must equal `(h, w)` or be `k` times it (then `pred` is average-pooled `k x k`) or `1/k`
/// of it (then the target is pooled), with the same `k` on both sides. With
/// `spatial_norm_gamma > 0` the (pooled) target is spatially normalised. Writes the loss
/// to `*loss` and d loss / d pred (same shape as `pred`) to `grad_pred`.
/// On a CPU bridge the buffers are host memory and `stream` is ignored; on a CUDA bridge
/// they are device memory of its GPU, ordered on `stream` as in
/// `bridge_forward_cuda_ptr`, and the loss value is read back to the host (one sync).
/// The caller owns every buffer; nothing is retained.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype, a caller
/// grid that is no integer multiple or divisor of the bridge's, spatial normalisation on
/// a one-token loss grid), `SHAPE` (the latent size, as in `bridge_forward`),
/// `NON_FINITE` (NaN/Inf input or loss; nothing written), `INTERNAL`. Thread-safe.
///
/// # Safety
/// Buffers must be NULL or hold `batch` samples of `dtype`; `loss` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_loss_backward(
    handle: *const BridgeHandle,
    pred: *const c_void,
    latents: *const c_void,
    grad_pred: *mut c_void,
    batch: i64,
    height: i32,
    width: i32,
    pred_h: i32,
    pred_w: i32,
    dtype: i32,
    loss: *mut f32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_loss_backward", || {
        let value = compute(
            handle,
            (batch, height, width),
            dtype,
            Buffers::Bridge(stream),
            |bridge, io, dt| {
                let c = bridge.config();
                GridMatch::of((pred_h as i64, pred_w as i64), io.shape().grid)?;
                if loss.is_null() {
                    return Err(Error::invalid("loss is NULL"));
                }
                let pred_grid = (pred_h as usize, pred_w as usize);
                let pred_shape = [pred_grid.0 * pred_grid.1, c.target_dim];
                io.check_output(grad_pred, pred_shape[0] * pred_shape[1], dt, "grad_pred")?;
                // SAFETY: buffers of `batch` samples by the contract above; device pointers
                // are checked with the driver.
                let p = unsafe { io.read(pred, dt, &pred_shape, "pred", true)? };
                let x = unsafe { io.latents(latents, dt, true)? };
                // The loss value is read back to the host (one sync on a GPU): it is both the
                // output and the NaN check.
                let (value, grad) = bridge.loss_backward(&p, &x, pred_grid)?;
                let value = finite_loss(value)?;
                // SAFETY: `grad_pred` was checked to hold `batch` samples of `pred`'s shape.
                unsafe { io.write(grad_pred, &grad, dt, "grad_pred")? };
                Ok(value)
            },
        )?;
        // SAFETY: checked non-NULL above; the caller provides a writable float.
        unsafe { *loss = value };
        Ok(())
    })
}

/// Loss between bridge(`latents`) (`[batch, in_ch, height, width]`) and `target`
/// `[batch, h*w, target_dim]` on the token grid `(h, w)` of that latent size, and its
/// gradient with respect to the latents through the frozen bridge, written to
/// `grad_latents` (shape of `latents`). Buffers, streams and ownership as in
/// `bridge_loss_backward`; no spatial normalisation.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype), `SHAPE`
/// (the latent size, as in `bridge_forward`), `NON_FINITE` (NaN/Inf input or loss; nothing written), `INTERNAL`. Thread-safe: runs
/// alongside forward and loss calls.
///
/// # Safety
/// Buffers must be NULL or hold `batch` samples of `dtype`; `loss` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_latent_loss_backward(
    handle: *const BridgeHandle,
    latents: *const c_void,
    target: *const c_void,
    grad_latents: *mut c_void,
    batch: i64,
    height: i32,
    width: i32,
    dtype: i32,
    loss: *mut f32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_latent_loss_backward", || {
        let value = compute(
            handle,
            (batch, height, width),
            dtype,
            Buffers::Bridge(stream),
            |bridge, io, dt| {
                let c = bridge.config();
                if loss.is_null() {
                    return Err(Error::invalid("loss is NULL"));
                }
                io.check_output(grad_latents, io.latent_numel(), dt, "grad_latents")?;
                // SAFETY: as in `bridge_loss_backward`.
                let x = unsafe { io.latents(latents, dt, true)? };
                let t = unsafe {
                    io.read(
                        target,
                        dt,
                        &[io.shape().tokens(), c.target_dim],
                        "target",
                        true,
                    )?
                };
                let (value, grad) = bridge.latent_loss_backward(&x, &t)?;
                let value = finite_loss(value)?;
                // SAFETY: `grad_latents` was checked to hold `batch` latent samples.
                unsafe { io.write(grad_latents, &grad, dt, "grad_latents")? };
                Ok(value)
            },
        )?;
        // SAFETY: checked non-NULL above; the caller provides a writable float.
        unsafe { *loss = value };
        Ok(())
    })
}

/// One AdamW step on the bridge's own weights: `latents` `[batch, in_ch, height, width]`,
/// `targets` `[batch, h*w, target_dim]` (DINOv2 tokens on the token grid `(h, w)` of that
/// latent size). Dropout is on. Fills
/// `*stats` (set `stats->struct_size` first). A non-finite loss or gradient skips the
/// update, leaves every weight and the step count unchanged, and returns `BRIDGE_OK`
/// with `stats->skipped = 1`.
///
/// Buffers are host memory on a CPU bridge, device memory on a CUDA bridge (ordered on
/// `stream` as in `bridge_forward_cuda_ptr`); the caller owns them, nothing is retained.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype), `SHAPE`
/// (the latent size, as in `bridge_forward`), `ABI_MISMATCH` (`stats->struct_size`),
/// `INTERNAL`. Thread-safe: takes the handle's
/// write lock, so concurrent forward/loss calls wait and never see a half-applied update.
///
/// # Safety
/// Buffers must be NULL or hold `batch` samples of `dtype`; `stats` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_train_step(
    handle: *const BridgeHandle,
    latents: *const c_void,
    targets: *const c_void,
    batch: i64,
    height: i32,
    width: i32,
    dtype: i32,
    stats: *mut BridgeStepStats,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_train_step", || {
        let (s, size) = compute(
            handle,
            (batch, height, width),
            dtype,
            Buffers::Bridge(stream),
            |bridge, io, dt| {
                // SAFETY: NULL or the caller's struct (its first field is always present).
                let size = unsafe { struct_size(stats, "stats", "BridgeStepStats", OUT_MIN_SIZE)? };
                let c = bridge.config();
                // Non-finite inputs are not an error here: they make a non-finite loss, which
                // skips the update like any other.
                // SAFETY: as in `bridge_loss_backward`.
                let x = unsafe { io.latents(latents, dt, false)? };
                let t = unsafe {
                    io.read(
                        targets,
                        dt,
                        &[io.shape().tokens(), c.target_dim],
                        "targets",
                        false,
                    )?
                };
                Ok((bridge.train_step(&x, &t)?, size))
            },
        )?;
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(stats, size, &params::stats_of(&s, size)) };
        Ok(())
    })
}

/// Writes a training checkpoint (weights, optimiser state, train state) to `path`
/// atomically: a crash mid-save leaves the previous file intact.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, empty or non-UTF-8 path), `IO`
/// (folder missing or not writable, path is a directory), `INTERNAL`. Thread-safe: runs
/// alongside forward calls and excludes train steps, so the file holds one step's
/// weights and optimiser state. `path` is only read during the call.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_save(handle: *const BridgeHandle, path: *const c_char) -> i32 {
    ffi_call("bridge_save", || {
        let bridge = lookup(handle)?;
        // SAFETY: NULL or a NUL-terminated string, by the contract above.
        let path = unsafe { params::path_arg(path, "path")? };
        bridge.save(&path)
    })
}

// ---- ABI 3: DLPack tensors, capabilities, the log callback -------------------------

/// The batch and latent size of a DLPack call, from `latents` `[B, in_ch, H, W]`.
fn latent_call_shape(bridge: &Bridge, x: &View) -> Result<(i64, CallShape)> {
    let c = bridge.config();
    match x.shape[..] {
        [b, ch, h, w] if b > 0 && ch == c.in_ch => {
            let shape = CallShape::of(bridge, h as i64, w as i64)?;
            bridge.check_fits(b as i64, shape.grid)?;
            Ok((b as i64, shape))
        }
        _ => Err(Error::shape(format!(
            "latents has shape {:?}; expected [B, {}, H, W] with B > 0",
            x.shape, c.in_ch
        ))),
    }
}

/// A DLPack call's buffers where the bridge lives, `body`, and the caller's stream joined
/// after it. Every tensor is checked before this.
fn with_io<R>(
    bridge: &Bridge,
    (batch, shape): (i64, CallShape),
    stream: *mut c_void,
    body: impl FnOnce(&Io) -> Result<R>,
) -> Result<R> {
    run_io(Io::for_bridge(bridge, batch, shape, stream)?, body)
}

/// Checks a loss tensor: one element, host or the bridge's device.
///
/// # Safety
/// As `dlpack::view`.
unsafe fn loss_view(loss: *const DLTensor, bridge: &Bridge) -> Result<View> {
    // SAFETY: forwarded contract.
    let v = unsafe { dlpack::view(loss, "loss", bridge, true)? };
    if v.numel() != 1 {
        return Err(Error::shape(format!(
            "loss has shape {:?}; expected one element",
            v.shape
        )));
    }
    Ok(v)
}

/// Writes `grad` and the loss: into a device loss tensor without waiting for it (a
/// non-finite loss is written as it is: no host saw it), or read back into a host one,
/// checked finite first (then nothing is written on a non-finite loss).
///
/// # Safety
/// The views are checked caller tensors of the call's shapes.
unsafe fn write_grad_and_loss(
    io: &Io,
    (grad_view, grad, grad_name): (&View, &Tensor, &str),
    loss_view: &View,
    loss: &Tensor,
) -> Result<()> {
    if loss_view.host {
        // One sync on a GPU: the value is both the output and the NaN check.
        let value = finite_loss(loss.to_scalar::<f32>()?)?;
        // SAFETY: checked views of the right shapes (the contract).
        unsafe {
            io.write(grad_view.ptr, grad, grad_view.dtype, grad_name)?;
            Io::write_host_value(loss_view.ptr, value, loss_view.dtype, "loss")
        }
    } else {
        // SAFETY: as above; the loss tensor holds one element of device memory.
        unsafe {
            io.write(grad_view.ptr, grad, grad_view.dtype, grad_name)?;
            io.write(loss_view.ptr, loss, loss_view.dtype, "loss")
        }
    }
}

/// (ABI 3) `bridge_forward` on DLPack tensors: `latents` `[B, in_ch, H, W]` in, `out`
/// `[B, h*w, target_dim]` written, `(h, w) = (H, W) / 2^adapter_depth`. Shapes, dtypes
/// (f32, f16 or bf16, each tensor its own), strides (compact row-major; a size-1
/// dimension's stride is free), byte offsets and devices are read from the descriptors
/// and all checked before any work. The tensors live where the bridge does: host memory
/// (`kDLCPU`, `kDLCUDAHost`) for a CPU bridge, its GPU (`kDLCUDA`, `kDLCUDAManaged`,
/// `device_id` = the bridge's ordinal) for a CUDA bridge, with the work ordered on
/// `stream` as in `bridge_forward_cuda_ptr`. The caller keeps ownership; nothing is
/// retained.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL descriptor or data, dtype, strides,
/// device, dead handle), `SHAPE` (shapes that do not fit the model or each other, as in
/// `bridge_forward`), `NON_FINITE` (NaN/Inf in host latents; nothing written),
/// `INTERNAL`. Thread-safe like `bridge_forward`.
///
/// # Safety
/// Each descriptor must be NULL or a valid `DLTensor` whose memory holds what it
/// describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_forward_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    out: *const DLTensor,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_forward_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (x, y) = unsafe {
            (
                dlpack::view(latents, "latents", &bridge, false)?,
                dlpack::view(out, "out", &bridge, false)?,
            )
        };
        let (batch, shape) = latent_call_shape(&bridge, &x)?;
        let d = bridge.config().target_dim;
        dlpack::expect_shape(&y, "out", &[batch as usize, shape.tokens(), d])?;
        with_io(&bridge, (batch, shape), stream, |io| {
            io.check_output(y.ptr, shape.tokens() * d, y.dtype, "out")?;
            // SAFETY: checked views of the call's shapes.
            let lat = unsafe { io.latents(x.ptr, x.dtype, true)? };
            let tokens = bridge.forward(&lat)?;
            // SAFETY: as above.
            unsafe { io.write(y.ptr, &tokens, y.dtype, "out") }
        })
    })
}

/// (ABI 3) `bridge_loss_backward` on DLPack tensors. `pred` is `[B, T, target_dim]`, its
/// grid inferred (`T` tokens on the bridge's grid times or divided by one factor: at most
/// one fits), or `[B, pred_h, pred_w, target_dim]`; `grad_pred` has `pred`'s shape;
/// `loss` is one element, on the host (read back: one sync, and a non-finite loss is
/// `NON_FINITE` with nothing written) or on the bridge's GPU (nothing syncs; a non-finite
/// loss is written as NaN or Inf, with no status, since no host saw it). Tensors,
/// checks and streams as in `bridge_forward_dlpack`.
///
/// Returns as `bridge_loss_backward`, plus the descriptor errors of
/// `bridge_forward_dlpack`. Thread-safe.
///
/// # Safety
/// As `bridge_forward_dlpack`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_loss_backward_dlpack(
    handle: *const BridgeHandle,
    pred: *const DLTensor,
    latents: *const DLTensor,
    grad_pred: *const DLTensor,
    loss: *const DLTensor,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_loss_backward_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (p, x, g, l) = unsafe {
            (
                dlpack::view(pred, "pred", &bridge, false)?,
                dlpack::view(latents, "latents", &bridge, false)?,
                dlpack::view(grad_pred, "grad_pred", &bridge, false)?,
                loss_view(loss, &bridge)?,
            )
        };
        let (batch, shape) = latent_call_shape(&bridge, &x)?;
        let d = bridge.config().target_dim;
        let pred_grid = match p.shape[..] {
            [b, t, pd] if b == batch as usize && pd == d => GridMatch::infer(t, shape.grid)?,
            [b, ph, pw, pd] if b == batch as usize && pd == d => {
                GridMatch::of((ph as i64, pw as i64), shape.grid)?;
                (ph, pw)
            }
            _ => {
                return Err(Error::shape(format!(
                    "pred has shape {:?}; expected [{batch}, T, {d}] or [{batch}, pred_h, pred_w, {d}]",
                    p.shape
                )));
            }
        };
        dlpack::expect_shape(&g, "grad_pred", &p.shape)?;
        let tokens = pred_grid.0 * pred_grid.1;
        with_io(&bridge, (batch, shape), stream, |io| {
            io.check_output(g.ptr, tokens * d, g.dtype, "grad_pred")?;
            // SAFETY: checked views of the call's shapes.
            let pt = unsafe { io.read(p.ptr, p.dtype, &[tokens, d], "pred", true)? };
            let lat = unsafe { io.latents(x.ptr, x.dtype, true)? };
            let (value, grad) = bridge.loss_backward_on_device(&pt, &lat, pred_grid)?;
            let grad = grad.reshape(p.shape.as_slice())?;
            // SAFETY: as above.
            unsafe { write_grad_and_loss(io, (&g, &grad, "grad_pred"), &l, &value) }
        })
    })
}

/// (ABI 3) `bridge_latent_loss_backward` on DLPack tensors: `latents` `[B, in_ch, H, W]`,
/// `target` `[B, h*w, target_dim]`, `grad_latents` of `latents`' shape, `loss` one element
/// on the host or the bridge's GPU (as in `bridge_loss_backward_dlpack`).
///
/// Returns as `bridge_latent_loss_backward`, plus the descriptor errors of
/// `bridge_forward_dlpack`. Thread-safe.
///
/// # Safety
/// As `bridge_forward_dlpack`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_latent_loss_backward_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    target: *const DLTensor,
    grad_latents: *const DLTensor,
    loss: *const DLTensor,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_latent_loss_backward_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (x, t, g, l) = unsafe {
            (
                dlpack::view(latents, "latents", &bridge, false)?,
                dlpack::view(target, "target", &bridge, false)?,
                dlpack::view(grad_latents, "grad_latents", &bridge, false)?,
                loss_view(loss, &bridge)?,
            )
        };
        let (batch, shape) = latent_call_shape(&bridge, &x)?;
        let d = bridge.config().target_dim;
        dlpack::expect_shape(&t, "target", &[batch as usize, shape.tokens(), d])?;
        dlpack::expect_shape(&g, "grad_latents", &x.shape)?;
        with_io(&bridge, (batch, shape), stream, |io| {
            io.check_output(g.ptr, io.latent_numel(), g.dtype, "grad_latents")?;
            // SAFETY: checked views of the call's shapes.
            let lat = unsafe { io.latents(x.ptr, x.dtype, true)? };
            let tt = unsafe { io.read(t.ptr, t.dtype, &[shape.tokens(), d], "target", true)? };
            let (value, grad) = bridge.latent_loss_backward_on_device(&lat, &tt)?;
            // SAFETY: as above.
            unsafe { write_grad_and_loss(io, (&g, &grad, "grad_latents"), &l, &value) }
        })
    })
}

/// (ABI 3) `bridge_train_step` on DLPack tensors: `latents` `[B, in_ch, H, W]`,
/// `targets` `[B, h*w, target_dim]`; `*stats` as in `bridge_train_step` (host memory;
/// the step reads its loss and gradient norm back to decide on the update).
///
/// Returns as `bridge_train_step`, plus the descriptor errors of `bridge_forward_dlpack`.
/// Thread-safe like `bridge_train_step`.
///
/// # Safety
/// As `bridge_forward_dlpack`; `stats` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_train_step_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    targets: *const DLTensor,
    stats: *mut BridgeStepStats,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_train_step_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above; `stats` NULL or the caller's struct.
        let (x, t, size) = unsafe {
            (
                dlpack::view(latents, "latents", &bridge, false)?,
                dlpack::view(targets, "targets", &bridge, false)?,
                struct_size(stats, "stats", "BridgeStepStats", OUT_MIN_SIZE)?,
            )
        };
        let (batch, shape) = latent_call_shape(&bridge, &x)?;
        let d = bridge.config().target_dim;
        dlpack::expect_shape(&t, "targets", &[batch as usize, shape.tokens(), d])?;
        let s = with_io(&bridge, (batch, shape), stream, |io| {
            // Non-finite inputs skip the update, as in `bridge_train_step`.
            // SAFETY: checked views of the call's shapes.
            let lat = unsafe { io.latents(x.ptr, x.dtype, false)? };
            let tt = unsafe { io.read(t.ptr, t.dtype, &[shape.tokens(), d], "targets", false)? };
            bridge.train_step(&lat, &tt)
        })?;
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(stats, size, &params::stats_of(&s, size)) };
        Ok(())
    })
}

/// (ABI 3) Describes this build: ABI version, CUDA support and visible devices, the buffer
/// and compute dtypes, the DLPack layout read, the largest latent side. Set
/// `caps->struct_size = sizeof(BridgeCapabilities)` first.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL), `ABI_MISMATCH`. Thread-safe.
///
/// # Safety
/// `caps` must be NULL or point to `caps->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_get_capabilities(caps: *mut BridgeCapabilities) -> i32 {
    ffi_call("bridge_get_capabilities", || {
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(caps, "caps", "BridgeCapabilities", OUT_MIN_SIZE)? };
        let value = params::capabilities(size);
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(caps, size, &value) };
        Ok(())
    })
}

/// (ABI 3) Sends the library's messages to `callback` (NULL: nowhere, the default):
/// which BLAS or device path was taken (`BRIDGE_LOG_INFO`), fallbacks and train steps
/// skipped for a non-finite loss or gradient (`BRIDGE_LOG_WARN`). `user_data` is handed
/// back untouched. Process-wide; safe to call at any time from any thread (a message
/// being delivered finishes first).
///
/// Returns `BRIDGE_OK`.
///
/// # Safety
/// `callback` must be NULL or a function of the `BridgeLogCallback` signature that stays
/// callable, with `user_data` valid, until the callback is replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_set_log_callback(
    callback: BridgeLogCallback,
    user_data: *mut c_void,
) -> i32 {
    ffi_call("bridge_set_log_callback", || {
        crate::log::set(callback, user_data);
        Ok(())
    })
}
