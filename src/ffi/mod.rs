//! The C API: the entry points and their documentation, and nothing else
//! (`include/dino_bridge.h` is generated from this file and `types.rs` by cbindgen).
//!
//! Every entry point returns a status (`BRIDGE_OK` or a `BRIDGE_ERR_*` code), never
//! panics across the boundary (`guard::ffi_call`), checks every pointer and size before
//! use, and leaves a message for `bridge_last_error` on failure. One call path below
//! them: a compute call's arguments become the bridge, the call's shape checked once and
//! the caller's tensors as views (`call.rs`; the pointer calls build from their scalar
//! arguments the views the DLPack calls read from descriptors), and both families reach
//! one function per operation (`ops.rs`), which reads and writes through `io.rs`.

mod call;
pub mod dlpack;
pub mod guard;
mod io;
mod ops;
pub mod params;
pub mod types;
pub mod view;

use crate::bridge::Bridge;
use crate::error::Error;
use call::{
    Buffers, PointerCall, align_shape, check_loss, flat_call, loss_tensor, one_element,
    optional_tensor, tensor,
};
use dlpack::DLTensor;
use guard::{ffi_call, lookup, struct_size, write_versioned};
use io::Io;
use params::{OUT_MIN_SIZE, PARAMS_MIN_SIZE};
use std::ffi::c_void;
use std::os::raw::c_char;
use types::*;
#[cfg(not(feature = "cuda"))]
use view::BufDtype;

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::new(
        crate::error::ErrorKind::Unsupported,
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
        let call = PointerCall::new(handle, (batch, height, width), dtype, Buffers::Host)?;
        let (bridge, shape) = (&call.bridge, &call.shape);
        let x = call.view("latents", latents, &shape.latents());
        let y = call.view("out", out, &shape.token_shape());
        // SAFETY: host buffers of `batch` samples, per the contract above.
        unsafe { ops::forward(bridge, shape, &x, &y, Io::host(bridge)) }
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
        {
            let call = PointerCall::new(handle, (batch, height, width), dtype, Buffers::Bridge)?;
            let (bridge, shape) = (&call.bridge, &call.shape);
            if !bridge.device().is_cuda() {
                return Err(Error::invalid(
                    "this bridge runs on the CPU: use bridge_forward with host buffers",
                ));
            }
            let x = call.view("latents", latents, &shape.latents());
            let y = call.view("out", out, &shape.token_shape());
            // SAFETY: device pointers, checked with the driver before each copy.
            unsafe { ops::forward(bridge, shape, &x, &y, Io::for_bridge(bridge, stream)?) }
        }
    })
}

/// REPA alignment loss. The target is the frozen bridge's prediction for `latents`
/// `[batch, in_ch, height, width]`, on its token grid `(h, w)`; `pred` is the caller's
/// projection `[batch, pred_h*pred_w, target_dim]` on its grid `(pred_h, pred_w)`, which
/// must equal `(h, w)` or be `k` times it (then `pred` is average-pooled `k x k`) or `1/k`
/// of it (then the target is pooled), with the same `k` on both sides. With
/// `spatial_norm_gamma > 0` the (pooled) target is spatially normalised. The loss weighs
/// its terms with `BridgeParams.align_w_*` (ABI 4; REPA's `mean(1 - cos)` by default),
/// not with the training loss's `w_*`. Writes the loss to `*loss` and d loss / d pred
/// (same shape as `pred`) to `grad_pred`.
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
        let call = PointerCall::new(handle, (batch, height, width), dtype, Buffers::Bridge)?;
        let bridge = &call.bridge;
        let shape = bridge.align_shape(call.shape, (pred_h as i64, pred_w as i64))?;
        let p = call.view("pred", pred, &shape.pred_shape());
        let x = call.view("latents", latents, &call.shape.latents());
        let g = call.view("grad_pred", grad_pred, &shape.pred_shape());
        let l = call.loss_view(loss);
        let io = Io::for_bridge(bridge, stream)?;
        // SAFETY: buffers of `batch` samples where the bridge lives, per the contract.
        unsafe { ops::align(bridge, &shape, [&p, &x], [&g, &l], io) }
    })
}

/// Loss between bridge(`latents`) (`[batch, in_ch, height, width]`) and `target`
/// `[batch, h*w, target_dim]` on the token grid `(h, w)` of that latent size, and its
/// gradient with respect to the latents through the frozen bridge, written to
/// `grad_latents` (shape of `latents`). The loss weighs its terms with `align_w_*`, as
/// alignment does. Buffers, streams and ownership as in `bridge_loss_backward`; no
/// spatial normalisation.
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
        let call = PointerCall::new(handle, (batch, height, width), dtype, Buffers::Bridge)?;
        let (bridge, shape) = (&call.bridge, &call.shape);
        let x = call.view("latents", latents, &shape.latents());
        let t = call.view("target", target, &shape.token_shape());
        let g = call.view("grad_latents", grad_latents, &shape.latents());
        let l = call.loss_view(loss);
        let io = Io::for_bridge(bridge, stream)?;
        // SAFETY: as in `bridge_loss_backward`.
        unsafe { ops::latent_loss(bridge, shape, [&x, &t], [&g, &l], io) }
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
        let call = PointerCall::new(handle, (batch, height, width), dtype, Buffers::Bridge)?;
        let (bridge, shape) = (&call.bridge, &call.shape);
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(stats, "stats", "BridgeStepStats", OUT_MIN_SIZE)? };
        let x = call.view("latents", latents, &shape.latents());
        let t = call.view("targets", targets, &shape.token_shape());
        let io = Io::for_bridge(bridge, stream)?;
        // SAFETY: as in `bridge_loss_backward`.
        let s = unsafe { ops::train_step(bridge, shape, &x, &t, io)? };
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
                tensor(latents, "latents", &bridge)?,
                tensor(out, "out", &bridge)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        y.expect_shape(&shape.token_shape())?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::forward(&bridge, &shape, &x, &y, io) }
    })
}

/// (ABI 3) `bridge_loss_backward` on DLPack tensors. `pred` is `[B, T, target_dim]`, its
/// grid inferred (`T` tokens on the bridge's grid times or divided by one factor: at most
/// one fits), or `[B, pred_h, pred_w, target_dim]`; `grad_pred` has `pred`'s shape;
/// `loss` is one element (the mean over the batch) or, from ABI 4, `[B]` (each sample's
/// loss; `grad_pred` is the gradient of their mean either way), on the host (read back:
/// one sync, and a non-finite loss is `NON_FINITE` with nothing written) or on the
/// bridge's GPU (nothing syncs; a non-finite loss is written as NaN or Inf, with no
/// status, since no host saw it). Tensors, checks and streams as in
/// `bridge_forward_dlpack`.
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
                tensor(pred, "pred", &bridge)?,
                tensor(latents, "latents", &bridge)?,
                tensor(grad_pred, "grad_pred", &bridge)?,
                loss_tensor(loss, &bridge)?,
            )
        };
        let shape = align_shape(&bridge, bridge.latent_shape(&x.shape)?, &p)?;
        g.expect_shape(&p.shape)?;
        check_loss(&l, &shape.call)?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::align(&bridge, &shape, [&p, &x], [&g, &l], io) }
    })
}

/// (ABI 3) `bridge_latent_loss_backward` on DLPack tensors: `latents` `[B, in_ch, H, W]`,
/// `target` `[B, h*w, target_dim]`, `grad_latents` of `latents`' shape, `loss` one element
/// or `[B]` on the host or the bridge's GPU (as in `bridge_loss_backward_dlpack`).
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
                tensor(latents, "latents", &bridge)?,
                tensor(target, "target", &bridge)?,
                tensor(grad_latents, "grad_latents", &bridge)?,
                loss_tensor(loss, &bridge)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        t.expect_shape(&shape.token_shape())?;
        g.expect_shape(&x.shape)?;
        check_loss(&l, &shape)?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::latent_loss(&bridge, &shape, [&x, &t], [&g, &l], io) }
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
                tensor(latents, "latents", &bridge)?,
                tensor(targets, "targets", &bridge)?,
                struct_size(stats, "stats", "BridgeStepStats", OUT_MIN_SIZE)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        t.expect_shape(&shape.token_shape())?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        let s = unsafe { ops::train_step(&bridge, &shape, &x, &t, io)? };
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(stats, size, &params::stats_of(&s, size)) };
        Ok(())
    })
}

/// (ABI 5) The length of the flat parameter vector into `*count`: every model tensor in
/// f32, in the order `bridge_param_info` reports, each row-major.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL). Thread-safe.
///
/// # Safety
/// `count` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_param_count(handle: *const BridgeHandle, count: *mut i64) -> i32 {
    ffi_call("bridge_param_count", || {
        let bridge = lookup(handle)?;
        if count.is_null() {
            return Err(Error::invalid("count is NULL"));
        }
        // SAFETY: non-NULL and writable by the contract.
        unsafe { *count = bridge.flat_len() as i64 };
        Ok(())
    })
}

/// (ABI 5) Tensor `index` (0-based, below the count of tensors) of the flat vector: its
/// name (the checkpoint key), offset, element count, shape and whether the library's AdamW
/// decays it. Set `info->struct_size = sizeof(BridgeParamInfo)` first. Iterate from 0
/// until `BRIDGE_ERR_INVALID_ARGUMENT`, or until `offset + numel` reaches the count.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, index out of range), `ABI_MISMATCH`.
/// Thread-safe.
///
/// # Safety
/// `info` must be NULL or point to `info->struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_param_info(
    handle: *const BridgeHandle,
    index: i64,
    info: *mut BridgeParamInfo,
) -> i32 {
    ffi_call("bridge_param_info", || {
        let bridge = lookup(handle)?;
        // SAFETY: NULL or the caller's struct (its first field is always present).
        let size = unsafe { struct_size(info, "info", "BridgeParamInfo", OUT_MIN_SIZE)? };
        let layout = bridge.param_layout();
        let p = usize::try_from(index)
            .ok()
            .and_then(|i| layout.get(i))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "index = {index}: the bridge has {} tensors (0..{})",
                    layout.len(),
                    layout.len()
                ))
            })?;
        let value = params::param_info_of(p, size)?;
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(info, size, &value) };
        Ok(())
    })
}

/// (ABI 5) Copies the weights into `flat`, a float32 `[n]` tensor (`bridge_param_count`)
/// where the bridge lives, ordered on `stream` as the compute calls are.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, a dtype other than float32, memory
/// elsewhere), `SHAPE`, `DEVICE`, `INTERNAL`. Thread-safe; sees one weight version.
///
/// # Safety
/// As `bridge_forward_dlpack`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_get_params_dlpack(
    handle: *const BridgeHandle,
    flat: *const DLTensor,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_get_params_dlpack", || {
        // SAFETY: the contract above.
        unsafe { flat_call(handle, flat, stream, ops::get_params) }
    })
}

/// (ABI 5) Replaces every weight from `flat` (float32 `[n]`, where the bridge lives),
/// excluding other calls like a train step; the optimiser's moments and step are
/// untouched (a bf16 bridge's cached weights are refreshed).
///
/// Returns as `bridge_get_params_dlpack`, plus `NON_FINITE` (NaN/Inf anywhere; no weight
/// changed). Thread-safe.
///
/// # Safety
/// As `bridge_forward_dlpack`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_set_params_dlpack(
    handle: *const BridgeHandle,
    flat: *const DLTensor,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_set_params_dlpack", || {
        // SAFETY: the contract above.
        unsafe { flat_call(handle, flat, stream, ops::set_params) }
    })
}

/// (ABI 5) A training-mode forward of `latents` `[B, in_ch, H, W]` with dropout masks
/// drawn from `seed` (mix rank and step into it), the training loss (the bridge's `w_*`)
/// against `targets` `[B, h*w, target_dim]` into `loss` (one element, host or device),
/// and its gradient: the parameters' into `grad_params` (float32 `[n]`, overwritten) and,
/// unless `grad_latents` is NULL, the latents' (latents' shape). Nothing is updated. A
/// non-finite loss is no error: it and the gradients are written as they are (after an
/// all-reduce, `bridge_apply_grads_dlpack` skips the step on every rank alike).
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT`, `SHAPE`, `DEVICE`, `INTERNAL`. Thread-safe;
/// one weight version per call (on CUDA it excludes other calls: it seeds the device's
/// RNG).
///
/// # Safety
/// As `bridge_forward_dlpack`; `grad_latents` may be NULL.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)] // the C signature DESIGN.md gives
pub unsafe extern "C" fn bridge_loss_grads_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    targets: *const DLTensor,
    grad_params: *const DLTensor,
    grad_latents: *const DLTensor,
    loss: *const DLTensor,
    seed: u64,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_loss_grads_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (x, t, gp, gl, l) = unsafe {
            (
                tensor(latents, "latents", &bridge)?,
                tensor(targets, "targets", &bridge)?,
                tensor(grad_params, "grad_params", &bridge)?,
                optional_tensor(grad_latents, "grad_latents", &bridge)?,
                loss_tensor(loss, &bridge)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        t.expect_shape(&shape.token_shape())?;
        if let Some(g) = &gl {
            g.expect_shape(&x.shape)?;
        }
        one_element(&l)?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::loss_grads(&bridge, &shape, [&x, &t], (&gp, gl.as_ref()), &l, seed, io) }
    })
}

/// (ABI 5) Tokens `[B, h*w, target_dim]` of `latents` in training mode, with dropout
/// masks drawn from `seed` (the same seed gives `bridge_vjp_dlpack` the same masks).
///
/// Returns as `bridge_forward_dlpack`. Thread-safe (on CUDA it excludes other calls).
///
/// # Safety
/// As `bridge_forward_dlpack`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_forward_train_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    out: *const DLTensor,
    seed: u64,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_forward_train_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (x, y) = unsafe {
            (
                tensor(latents, "latents", &bridge)?,
                tensor(out, "out", &bridge)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        y.expect_shape(&shape.token_shape())?;
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::forward_train(&bridge, &shape, &x, &y, seed, io) }
    })
}

/// (ABI 5) The vector-Jacobian product of `bridge_forward_train_dlpack` (same `seed`,
/// same masks) with the cotangent `grad_out` `[B, h*w, target_dim]`, for a loss the host
/// computes itself: d sum(out * grad_out) / d params into `grad_params` (float32 `[n]`,
/// overwritten) and, unless `grad_latents` is NULL, / d latents. The forward is
/// recomputed (nothing is kept between calls).
///
/// Returns as `bridge_loss_grads_dlpack`, plus `NON_FINITE` (NaN/Inf in host inputs).
/// Thread-safe (on CUDA it excludes other calls).
///
/// # Safety
/// As `bridge_forward_dlpack`; `grad_latents` may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_vjp_dlpack(
    handle: *const BridgeHandle,
    latents: *const DLTensor,
    grad_out: *const DLTensor,
    grad_params: *const DLTensor,
    grad_latents: *const DLTensor,
    seed: u64,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_vjp_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: descriptors per the contract above.
        let (x, g, gp, gl) = unsafe {
            (
                tensor(latents, "latents", &bridge)?,
                tensor(grad_out, "grad_out", &bridge)?,
                tensor(grad_params, "grad_params", &bridge)?,
                optional_tensor(grad_latents, "grad_latents", &bridge)?,
            )
        };
        let shape = bridge.latent_shape(&x.shape)?;
        g.expect_shape(&shape.token_shape())?;
        if let Some(gl) = &gl {
            gl.expect_shape(&x.shape)?;
        }
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: checked views of the call's shapes.
        unsafe { ops::vjp(&bridge, &shape, [&x, &g], (&gp, gl.as_ref()), seed, io) }
    })
}

/// (ABI 5) One step of the handle's own AdamW (warmup + cosine schedule, clipping, weight
/// decay by `BridgeParamInfo.decays`) with the gradient `grad_params` (float32 `[n]`,
/// e.g. after the host's all-reduce); a non-finite gradient norm skips it. `*stats` as in
/// `bridge_train_step`, with `loss` 0 (the host has it). `bridge_loss_grads_dlpack` then
/// this call on one batch is `bridge_train_step` on it (with dropout 0, or the seed the
/// step draws).
///
/// Returns as `bridge_get_params_dlpack`. Thread-safe like `bridge_train_step`.
///
/// # Safety
/// As `bridge_forward_dlpack`; `stats` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bridge_apply_grads_dlpack(
    handle: *const BridgeHandle,
    grad_params: *const DLTensor,
    stats: *mut BridgeStepStats,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_apply_grads_dlpack", || {
        let bridge = lookup(handle)?;
        // SAFETY: a descriptor per the contract above; `stats` NULL or the caller's struct.
        let (g, size) = unsafe {
            (
                tensor(grad_params, "grad_params", &bridge)?,
                struct_size(stats, "stats", "BridgeStepStats", OUT_MIN_SIZE)?,
            )
        };
        let io = Io::for_bridge(&bridge, stream)?;
        // SAFETY: a checked view.
        let s = unsafe { ops::apply_grads(&bridge, &g, io)? };
        // SAFETY: `size` is the caller's struct_size, checked against ours.
        unsafe { write_versioned(stats, size, &params::stats_of(&s, size)) };
        Ok(())
    })
}

/// (ABI 3) Describes this build: ABI version, CUDA support and visible devices, the buffer
/// and compute dtypes, the DLPack layout read, the largest latent side, and (ABI 4) the
/// BLAS the CPU kernels use and why (the first call finds it, timing each library found
/// once: a fraction of a second). Set `caps->struct_size = sizeof(BridgeCapabilities)`
/// first.
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
