//! The C API (`include/dino_bridge.h` is generated from this module by cbindgen).
//!
//! Every entry point returns a status (`BRIDGE_OK` or a `BRIDGE_ERR_*` code), never
//! panics across the boundary (`guard::ffi_call`), checks every pointer and size before
//! use, and leaves a message for `bridge_last_error` on failure.

pub mod buffers;
pub mod guard;
pub mod types;

use crate::bridge::{Bridge, BridgeOptions, ComputeDtype};
use crate::config::BridgeConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::loss::{LossWeights, check_pred_grid};
use crate::optim::OptimConfig;
use buffers::{BufDtype, check_finite, element_count, read_host, write_host};
use candle_core::Tensor;
use guard::{check_struct_size, ffi_call, lookup, read_versioned, write_versioned};
use std::ffi::{CStr, c_void};
use std::os::raw::c_char;
use std::path::PathBuf;
use types::*;

fn defaults() -> BridgeParams {
    let c = BridgeConfig::default();
    let l = LossWeights::default();
    let o = OptimConfig::default();
    BridgeParams {
        struct_size: std::mem::size_of::<BridgeParams>() as u32,
        checkpoint_path: std::ptr::null(),
        device: BRIDGE_DEVICE_CPU,
        compute_dtype: BRIDGE_DTYPE_F32,
        seed: 0,
        in_ch: c.in_ch as i32,
        latent_size: c.latent_size as i32,
        grid: c.grid as i32,
        target_dim: c.target_dim as i32,
        adapter_mid_channels: c.adapter_mid_channels as i32,
        adapter_out_channels: c.adapter_out_channels as i32,
        adapter_depth: c.adapter_depth as i32,
        width: c.width as i32,
        depth: c.depth as i32,
        heads: c.heads as i32,
        mlp_ratio: c.mlp_ratio,
        dropout: c.dropout,
        latent_shift: c.latent_shift,
        latent_scale: c.latent_scale,
        w_cos: l.cos,
        w_norm: l.norm,
        w_raw: l.raw,
        lr: o.lr,
        weight_decay: o.weight_decay,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        grad_clip: o.grad_clip,
        warmup_steps: o.warmup_steps,
        total_steps: o.total_steps,
    }
}

/// Smallest `BridgeParams` this library accepts: up to and including `seed`.
const PARAMS_MIN_SIZE: usize = std::mem::offset_of!(BridgeParams, in_ch);
/// Smallest output struct: `struct_size` and one field.
const OUT_MIN_SIZE: usize = 8;

fn dim(name: &str, v: i32) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("params.{name} = {v}: must be >= 0")))
}

fn options_from(p: &BridgeParams) -> Result<BridgeOptions> {
    let config = BridgeConfig {
        in_ch: dim("in_ch", p.in_ch)?,
        latent_size: dim("latent_size", p.latent_size)?,
        grid: dim("grid", p.grid)?,
        target_dim: dim("target_dim", p.target_dim)?,
        adapter_mid_channels: dim("adapter_mid_channels", p.adapter_mid_channels)?,
        adapter_out_channels: dim("adapter_out_channels", p.adapter_out_channels)?,
        adapter_depth: dim("adapter_depth", p.adapter_depth)?,
        width: dim("width", p.width)?,
        depth: dim("depth", p.depth)?,
        heads: dim("heads", p.heads)?,
        mlp_ratio: p.mlp_ratio,
        dropout: p.dropout,
        latent_shift: p.latent_shift,
        latent_scale: p.latent_scale,
    };
    let compute_dtype = match p.compute_dtype {
        BRIDGE_DTYPE_F32 => ComputeDtype::F32,
        BRIDGE_DTYPE_BF16 => ComputeDtype::Bf16,
        other => {
            return Err(Error::invalid(format!(
                "params.compute_dtype = {other}: use 0 (f32) or 2 (bf16)"
            )));
        }
    };
    Ok(BridgeOptions {
        config,
        loss: LossWeights {
            cos: p.w_cos,
            norm: p.w_norm,
            raw: p.w_raw,
        },
        optim: OptimConfig {
            lr: p.lr,
            weight_decay: p.weight_decay,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            grad_clip: p.grad_clip,
            warmup_steps: p.warmup_steps,
            total_steps: p.total_steps,
        },
        seed: p.seed,
        device: p.device,
        compute_dtype,
        frozen_prefixes: Vec::new(),
    })
}

/// # Safety
/// `ptr` must be NULL or a NUL-terminated string.
unsafe fn path_arg(ptr: *const c_char, name: &str) -> Result<PathBuf> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    // SAFETY: checked non-NULL; NUL termination is the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{name} is not valid UTF-8")))?;
    if s.is_empty() {
        return Err(Error::invalid(format!("{name} is empty")));
    }
    Ok(PathBuf::from(s))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "this library was built without CUDA support (rebuild with `--features cuda`)",
    )
}

/// Where the caller's buffers live for one call: host memory on a CPU bridge; on a CUDA
/// bridge, device memory of its GPU, with the work ordered after the caller's `stream`.
enum Io {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CallerStream),
}

impl Io {
    fn new(bridge: &Bridge, stream: *mut c_void) -> Result<Io> {
        #[cfg(feature = "cuda")]
        if bridge.device().is_cuda() {
            return Ok(Io::Cuda(crate::cuda::CallerStream::begin(
                bridge.device(),
                bridge.device_ordinal(),
                stream,
            )?));
        }
        let _ = (bridge, stream);
        Ok(Io::Host)
    }

    /// `batch` samples of `shape` from the caller's buffer, as f32 on the bridge's
    /// device. Host input is checked for NaN/Inf when `finite` is set; device input is
    /// not (that would need a host sync).
    ///
    /// # Safety
    /// `ptr` must be NULL or hold `batch * prod(shape)` elements of `dtype`, in host
    /// memory for `Io::Host`, in device memory for `Io::Cuda`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn read(
        &self,
        bridge: &Bridge,
        ptr: *const c_void,
        batch: i64,
        shape: &[usize],
        dtype: BufDtype,
        name: &str,
        finite: bool,
    ) -> Result<Tensor> {
        let n = element_count(batch, shape.iter().product(), dtype)?;
        let mut dims = vec![batch as usize];
        dims.extend_from_slice(shape);
        match self {
            Io::Host => {
                // SAFETY: extent per the caller's contract.
                let values = unsafe { read_host(ptr, n, dtype, name)? };
                if finite {
                    check_finite(&values, name)?;
                }
                Ok(Tensor::from_vec(values, dims, bridge.device())?)
            }
            #[cfg(feature = "cuda")]
            Io::Cuda(s) => {
                let t = s.read(bridge.device(), ptr, dims.into(), dtype.candle(), name)?;
                Ok(t.to_dtype(candle_core::DType::F32)?)
            }
        }
    }

    /// The caller's `latents` `[batch, in_ch, latent_size, latent_size]`.
    ///
    /// # Safety
    /// As `read`.
    unsafe fn latents(
        &self,
        bridge: &Bridge,
        ptr: *const c_void,
        batch: i64,
        dtype: BufDtype,
        finite: bool,
    ) -> Result<Tensor> {
        let c = bridge.config();
        let shape = [c.in_ch, c.latent_size, c.latent_size];
        unsafe { self.read(bridge, ptr, batch, &shape, dtype, "latents", finite) }
    }

    /// Writes `t` into the caller's output buffer in `dtype`.
    ///
    /// # Safety
    /// `ptr` must be NULL or hold `t`'s elements in `dtype`.
    unsafe fn write(
        &self,
        ptr: *mut c_void,
        t: &Tensor,
        dtype: BufDtype,
        name: &str,
    ) -> Result<()> {
        match self {
            Io::Host => unsafe { write_host(ptr, &tensor_values(t)?, dtype, name) },
            #[cfg(feature = "cuda")]
            Io::Cuda(s) => s.write(t, ptr, dtype.candle(), name),
        }
    }

    /// Checks an output buffer of `batch` samples of `per_sample` elements before any
    /// work: not NULL, a size that fits in memory and, on CUDA, device memory of the
    /// bridge's GPU at least that large.
    fn check_output(
        &self,
        ptr: *const c_void,
        batch: i64,
        per_sample: usize,
        dtype: BufDtype,
        name: &str,
    ) -> Result<()> {
        if ptr.is_null() {
            return Err(Error::invalid(format!("{name} is NULL")));
        }
        let bytes = element_count(batch, per_sample, dtype)? * dtype.size();
        #[cfg(feature = "cuda")]
        if let Io::Cuda(s) = self {
            return s.check_device_ptr(ptr, bytes, name);
        }
        let _ = bytes;
        Ok(())
    }

    /// Makes the caller's stream wait for the results (device buffers only); dropping
    /// the `Io` does the same on error paths.
    fn finish(&self) -> Result<()> {
        match self {
            Io::Host => Ok(()),
            #[cfg(feature = "cuda")]
            Io::Cuda(s) => s.finish(),
        }
    }
}

fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
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
        if params.is_null() {
            return Err(Error::invalid("params is NULL"));
        }
        // SAFETY: non-NULL; the first field is always present.
        let size = unsafe { std::ptr::read_unaligned(params as *const u32) };
        let size = check_struct_size::<BridgeParams>("BridgeParams", size, PARAMS_MIN_SIZE)?;
        let mut d = defaults();
        d.struct_size = size as u32;
        // SAFETY: size checked against ours; the caller guarantees it is writable.
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
        if params.is_null() {
            return Err(Error::invalid("params is NULL"));
        }
        if out.is_null() {
            return Err(Error::invalid("out (the handle pointer) is NULL"));
        }
        // SAFETY: non-NULL; struct_size is checked before more is read.
        let size = unsafe { std::ptr::read_unaligned(params as *const u32) };
        let size = check_struct_size::<BridgeParams>("BridgeParams", size, PARAMS_MIN_SIZE)?;
        let p = unsafe { read_versioned(params, size, defaults()) };
        let opts = options_from(&p)?;
        let bridge = if p.checkpoint_path.is_null() {
            Bridge::new(&opts)?
        } else {
            let path = unsafe { path_arg(p.checkpoint_path, "params.checkpoint_path")? };
            Bridge::open(&path, &opts)?
        };
        // SAFETY: checked non-NULL.
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
        if info.is_null() {
            return Err(Error::invalid("info is NULL"));
        }
        let size = unsafe { std::ptr::read_unaligned(info as *const u32) };
        let size = check_struct_size::<BridgeInfo>("BridgeInfo", size, OUT_MIN_SIZE)?;
        let c = bridge.config();
        let value = BridgeInfo {
            struct_size: size as u32,
            in_ch: c.in_ch as i32,
            latent_size: c.latent_size as i32,
            grid: c.grid as i32,
            target_dim: c.target_dim as i32,
            adapter_mid_channels: c.adapter_mid_channels as i32,
            adapter_out_channels: c.adapter_out_channels as i32,
            adapter_depth: c.adapter_depth as i32,
            width: c.width as i32,
            depth: c.depth as i32,
            heads: c.heads as i32,
            mlp_ratio: c.mlp_ratio,
            dropout: c.dropout,
            latent_shift: c.latent_shift,
            latent_scale: c.latent_scale,
            param_count: c.param_count() as i64,
            device: bridge.device_ordinal(),
            tokens: c.tokens() as i32,
            step: bridge.step(),
        };
        unsafe { write_versioned(info, size, &value) };
        Ok(())
    })
}

/// Predicts DINOv2 tokens: `latents` `[batch, in_ch, latent_size, latent_size]` in,
/// `out` `[batch, grid*grid, target_dim]` out, both host buffers of `dtype`
/// (`BRIDGE_DTYPE_*`). Evaluation mode (no dropout).
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch <= 0 or
/// overflowing, unknown dtype), `NON_FINITE` (NaN/Inf in `latents`; `out` untouched),
/// `INTERNAL`. Thread-safe: forward and loss calls on one handle run concurrently; a
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
    dtype: i32,
) -> i32 {
    ffi_call("bridge_forward", || {
        let bridge = lookup(handle)?;
        let dt = BufDtype::from_code(dtype)?;
        let c = bridge.config().clone();
        Io::Host.check_output(out, batch, c.output_numel(), dt, "out")?;
        let x = unsafe { Io::Host.latents(&bridge, latents, batch, dt, true)? };
        let y = tensor_values(&bridge.forward(&x)?)?;
        unsafe { write_host(out, &y, dt, "out") }
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
/// bridge), `UNSUPPORTED` (a build without CUDA; nothing touched), `INTERNAL` (a CUDA
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
    dtype: i32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_forward_cuda_ptr", || {
        let bridge = lookup(handle)?;
        let dt = BufDtype::from_code(dtype)?;
        #[cfg(feature = "cuda")]
        {
            if !bridge.device().is_cuda() {
                return Err(Error::invalid(
                    "this bridge runs on the CPU: use bridge_forward with host buffers",
                ));
            }
            let c = bridge.config().clone();
            let io = Io::new(&bridge, stream)?;
            io.check_output(out, batch, c.output_numel(), dt, "out")?;
            let x = unsafe { io.latents(&bridge, latents, batch, dt, false)? };
            unsafe { io.write(out, &bridge.forward(&x)?, dt, "out")? };
            io.finish()
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (bridge, dt, latents, out, batch, stream);
            Err(no_cuda())
        }
    })
}

/// REPA alignment loss. `pred` is the caller's projection `[batch, pred_grid^2,
/// target_dim]` (`pred_grid` a positive multiple of the bridge grid; it is average-pooled
/// to the bridge grid), the target is the frozen bridge's prediction for `latents`.
/// Writes the loss to `*loss` and d loss / d pred (same shape as `pred`) to `grad_pred`.
/// On a CPU bridge the buffers are host memory and `stream` is ignored; on a CUDA bridge
/// they are device memory of its GPU, ordered on `stream` as in
/// `bridge_forward_cuda_ptr`, and the loss value is read back to the host (one sync).
/// The caller owns every buffer; nothing is retained.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype, pred_grid),
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
    pred_grid: i32,
    dtype: i32,
    loss: *mut f32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_loss_backward", || {
        let bridge = lookup(handle)?;
        let dt = BufDtype::from_code(dtype)?;
        let c = bridge.config().clone();
        let g = check_pred_grid(pred_grid as i64, c.grid)?;
        if loss.is_null() {
            return Err(Error::invalid("loss is NULL"));
        }
        let pred_shape = [
            g.checked_mul(g)
                .ok_or_else(|| Error::invalid("pred_grid overflows"))?,
            c.target_dim,
        ];
        let io = Io::new(&bridge, stream)?;
        io.check_output(
            grad_pred,
            batch,
            pred_shape[0] * pred_shape[1],
            dt,
            "grad_pred",
        )?;
        let p = unsafe { io.read(&bridge, pred, batch, &pred_shape, dt, "pred", true)? };
        let x = unsafe { io.latents(&bridge, latents, batch, dt, true)? };
        // The loss value is read back to the host (one sync on a GPU): it is both the
        // output and the NaN check.
        let (value, grad) = bridge.loss_backward(&p, &x, g)?;
        let value = finite_loss(value)?;
        unsafe { io.write(grad_pred, &grad, dt, "grad_pred")? };
        io.finish()?;
        unsafe { *loss = value };
        Ok(())
    })
}

/// Loss between bridge(`latents`) and `target` `[batch, grid^2, target_dim]` and its
/// gradient with respect to the latents through the frozen bridge, written to
/// `grad_latents` (shape of `latents`). Buffers, streams and ownership as in
/// `bridge_loss_backward`.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype),
/// `NON_FINITE` (NaN/Inf input or loss; nothing written), `INTERNAL`. Thread-safe: runs
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
    dtype: i32,
    loss: *mut f32,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_latent_loss_backward", || {
        let bridge = lookup(handle)?;
        let dt = BufDtype::from_code(dtype)?;
        let c = bridge.config().clone();
        if loss.is_null() {
            return Err(Error::invalid("loss is NULL"));
        }
        let io = Io::new(&bridge, stream)?;
        io.check_output(grad_latents, batch, c.latent_numel(), dt, "grad_latents")?;
        let x = unsafe { io.latents(&bridge, latents, batch, dt, true)? };
        let t = unsafe {
            io.read(
                &bridge,
                target,
                batch,
                &[c.tokens(), c.target_dim],
                dt,
                "target",
                true,
            )?
        };
        let (value, grad) = bridge.latent_loss_backward(&x, &t)?;
        let value = finite_loss(value)?;
        unsafe { io.write(grad_latents, &grad, dt, "grad_latents")? };
        io.finish()?;
        unsafe { *loss = value };
        Ok(())
    })
}

/// One AdamW step on the bridge's own weights: `latents` `[batch, in_ch, L, L]`,
/// `targets` `[batch, grid^2, target_dim]` (DINOv2 tokens). Dropout is on. Fills
/// `*stats` (set `stats->struct_size` first). A non-finite loss or gradient skips the
/// update, leaves every weight and the step count unchanged, and returns `BRIDGE_OK`
/// with `stats->skipped = 1`.
///
/// Buffers are host memory on a CPU bridge, device memory on a CUDA bridge (ordered on
/// `stream` as in `bridge_forward_cuda_ptr`); the caller owns them, nothing is retained.
///
/// Returns `BRIDGE_OK`, `INVALID_ARGUMENT` (NULL, dead handle, batch, dtype),
/// `ABI_MISMATCH` (`stats->struct_size`), `INTERNAL`. Thread-safe: takes the handle's
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
    dtype: i32,
    stats: *mut BridgeStepStats,
    stream: *mut c_void,
) -> i32 {
    ffi_call("bridge_train_step", || {
        let bridge = lookup(handle)?;
        let dt = BufDtype::from_code(dtype)?;
        if stats.is_null() {
            return Err(Error::invalid("stats is NULL"));
        }
        let size = unsafe { std::ptr::read_unaligned(stats as *const u32) };
        let size = check_struct_size::<BridgeStepStats>("BridgeStepStats", size, OUT_MIN_SIZE)?;
        let c = bridge.config().clone();
        // Non-finite inputs are not an error here: they make a non-finite loss, which
        // skips the update like any other.
        let io = Io::new(&bridge, stream)?;
        let x = unsafe { io.latents(&bridge, latents, batch, dt, false)? };
        let t = unsafe {
            io.read(
                &bridge,
                targets,
                batch,
                &[c.tokens(), c.target_dim],
                dt,
                "targets",
                false,
            )?
        };
        let s = bridge.train_step(&x, &t)?;
        io.finish()?;
        let value = BridgeStepStats {
            struct_size: size as u32,
            loss: s.loss,
            grad_norm: s.grad_norm,
            lr: s.lr,
            step: s.step,
            skipped: s.skipped as i32,
        };
        unsafe { write_versioned(stats, size, &value) };
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
        let path = unsafe { path_arg(path, "path")? };
        bridge.save(&path)
    })
}
