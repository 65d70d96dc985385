//! C structs to Rust settings and back: `BridgeParams` to `BridgeOptions` (with the
//! defaults), a bridge to `BridgeInfo`, step stats to `BridgeStepStats`, and C strings to
//! paths.

use super::types::*;
use crate::bridge::{Bridge, BridgeOptions, ComputeDtype, StepStats};
use crate::config::BridgeConfig;
use crate::error::{Error, Result};
use crate::loss::LossWeights;
use crate::optim::OptimConfig;
use std::ffi::CStr;
use std::os::raw::c_char;
use std::path::PathBuf;

/// Smallest `BridgeParams` this library accepts: up to and including `seed`.
pub(super) const PARAMS_MIN_SIZE: usize = std::mem::offset_of!(BridgeParams, in_ch);
/// Smallest output struct: `struct_size` and one field.
pub(super) const OUT_MIN_SIZE: usize = 8;

/// The defaults: the published configuration, CPU, f32, fresh weights.
pub fn defaults() -> BridgeParams {
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
        w_gram: l.gram,
        spatial_norm_gamma: 0.0,
    }
}

fn dim(name: &str, v: i32) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("params.{name} = {v}: must be >= 0")))
}

/// The settings a caller's params describe (the config is checked by the bridge).
pub fn options_from(p: &BridgeParams) -> Result<BridgeOptions> {
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
            gram: p.w_gram,
        },
        spatial_norm_gamma: p.spatial_norm_gamma,
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

/// What `bridge_get_info` reports, with the caller's `struct_size`.
pub fn info_of(bridge: &Bridge, struct_size: usize) -> BridgeInfo {
    let c = bridge.config();
    BridgeInfo {
        struct_size: struct_size as u32,
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
        param_count: bridge.param_count() as i64,
        device: bridge.device_ordinal(),
        tokens: c.tokens() as i32,
        step: bridge.step(),
    }
}

/// What `bridge_train_step` reports, with the caller's `struct_size`.
pub fn stats_of(s: &StepStats, struct_size: usize) -> BridgeStepStats {
    BridgeStepStats {
        struct_size: struct_size as u32,
        loss: s.loss,
        grad_norm: s.grad_norm,
        lr: s.lr,
        step: s.step,
        skipped: s.skipped as i32,
    }
}

/// A path from a caller's C string: not NULL, not empty, UTF-8.
///
/// # Safety
/// `ptr` must be NULL or a NUL-terminated string.
pub unsafe fn path_arg(ptr: *const c_char, name: &str) -> Result<PathBuf> {
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

/// What `bridge_get_capabilities` reports, with the caller's `struct_size`.
pub fn capabilities(struct_size: usize) -> BridgeCapabilities {
    let bit = |code: i32| 1u32 << code;
    BridgeCapabilities {
        struct_size: struct_size as u32,
        abi_version: BRIDGE_ABI_VERSION,
        cuda: cfg!(feature = "cuda") as i32,
        cuda_devices: cuda_devices(),
        buffer_dtypes: bit(BRIDGE_DTYPE_F32) | bit(BRIDGE_DTYPE_F16) | bit(BRIDGE_DTYPE_BF16),
        compute_dtypes: bit(BRIDGE_DTYPE_F32)
            | if cfg!(feature = "cuda") {
                bit(BRIDGE_DTYPE_BF16)
            } else {
                0
            },
        dlpack_major: 1,
        dlpack_minor: 0,
        max_latent_side: crate::config::MAX_SIDE as i32,
    }
}

/// CUDA devices the driver reports; 0 without CUDA support or a working driver.
fn cuda_devices() -> i32 {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}
