//! C structs to Rust settings and back: `BridgeParams` to `BridgeOptions` (with the
//! defaults), a bridge to `BridgeInfo`, step stats to `BridgeStepStats`, and C strings to
//! paths.

use super::types::*;
use crate::bridge::{Bridge, BridgeOptions, ComputeDtype, StepStats};
use crate::config::{BridgeConfig, config_fields};
use crate::error::{Error, Result};
use crate::loss::LossWeights;
use crate::optim::{OptimConfig, optim_fields};
use std::ffi::CStr;
use std::os::raw::c_char;
use std::path::PathBuf;

/// Smallest `BridgeParams` this library accepts: up to and including `seed`.
pub(super) const PARAMS_MIN_SIZE: usize = std::mem::offset_of!(BridgeParams, in_ch);
/// Smallest output struct: `struct_size` and one field.
pub(super) const OUT_MIN_SIZE: usize = 8;

/// A setting's C value and back: integers cross as `int32_t` / `int64_t` (a negative C
/// value of a size is refused), floats as they are.
trait CValue: Sized {
    type C;
    fn to_c(self) -> Self::C;
    fn from_c(v: Self::C, name: &str) -> Result<Self>;
}

impl CValue for usize {
    type C = i32;
    /// Sizes are at most `config::MAX_DIM`: they fit.
    fn to_c(self) -> i32 {
        self as i32
    }
    fn from_c(v: i32, name: &str) -> Result<usize> {
        usize::try_from(v).map_err(|_| Error::invalid(format!("params.{name} = {v}: must be >= 0")))
    }
}

impl CValue for f32 {
    type C = f32;
    fn to_c(self) -> f32 {
        self
    }
    fn from_c(v: f32, _: &str) -> Result<f32> {
        Ok(v)
    }
}

impl CValue for i64 {
    type C = i64;
    fn to_c(self) -> i64 {
        self
    }
    fn from_c(v: i64, _: &str) -> Result<i64> {
        Ok(v)
    }
}

/// The conversions between the C structs and the Rust settings, from the config's and the
/// optimiser's field lists (`config::config_fields`, `optim::optim_fields`). Every struct
/// is built as a literal, so a field that one side has and the other lacks does not
/// compile.
macro_rules! conversions {
    (
        [$($(#[$cdoc:meta])* $cf:ident: $cty:ty = $cdefault:expr,)*]
        [$($(#[$odoc:meta])* $of:ident: $oty:ty = $odefault:expr,)*]
    ) => {
        /// The C params of `opts`, with no checkpoint.
        fn params_of(opts: &BridgeOptions) -> BridgeParams {
            let (c, l, a, o) = (&opts.config, &opts.loss, &opts.align_loss, &opts.optim);
            BridgeParams {
                struct_size: std::mem::size_of::<BridgeParams>() as u32,
                checkpoint_path: std::ptr::null(),
                device: opts.device,
                compute_dtype: match opts.compute_dtype {
                    ComputeDtype::F32 => BRIDGE_DTYPE_F32,
                    ComputeDtype::Bf16 => BRIDGE_DTYPE_BF16,
                },
                seed: opts.seed,
                $($cf: c.$cf.to_c(),)*
                w_cos: l.cos,
                w_norm: l.norm,
                w_raw: l.raw,
                w_gram: l.gram,
                spatial_norm_gamma: opts.spatial_norm_gamma,
                align_w_cos: a.cos,
                align_w_norm: a.norm,
                align_w_raw: a.raw,
                align_w_gram: a.gram,
                $($of: o.$of.to_c(),)*
            }
        }

        /// The settings a caller's params describe (the config is checked by the bridge).
        pub fn options_from(p: &BridgeParams) -> Result<BridgeOptions> {
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
                config: BridgeConfig {
                    $($cf: CValue::from_c(p.$cf, stringify!($cf))?,)*
                },
                loss: LossWeights {
                    cos: p.w_cos,
                    norm: p.w_norm,
                    raw: p.w_raw,
                    gram: p.w_gram,
                },
                align_loss: LossWeights {
                    cos: p.align_w_cos,
                    norm: p.align_w_norm,
                    raw: p.align_w_raw,
                    gram: p.align_w_gram,
                },
                spatial_norm_gamma: p.spatial_norm_gamma,
                optim: OptimConfig {
                    $($of: CValue::from_c(p.$of, stringify!($of))?,)*
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
                $($cf: c.$cf.to_c(),)*
                param_count: bridge.param_count() as i64,
                device: bridge.device_ordinal(),
                tokens: c.tokens() as i32,
                step: bridge.step(),
            }
        }
    };
}
config_fields!(optim_fields! { conversions! {} });

/// The defaults: the published configuration, CPU, f32, fresh weights.
pub fn defaults() -> BridgeParams {
    params_of(&BridgeOptions::default())
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
        blas: blas_description().as_ptr(),
    }
}

/// The BLAS description as a C string, made once (it points into it for the process).
fn blas_description() -> &'static std::ffi::CStr {
    static TEXT: once_cell::sync::Lazy<std::ffi::CString> = once_cell::sync::Lazy::new(|| {
        std::ffi::CString::new(crate::kernels::blas::blas_description().replace('\0', " "))
            .unwrap_or_default()
    });
    &TEXT
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

/// (ABI 5) `bridge_param_info`'s struct for one tensor of the flat vector.
pub fn param_info_of(p: &crate::bridge::ParamInfo, struct_size: usize) -> Result<BridgeParamInfo> {
    let bytes = p.name.as_bytes();
    if bytes.len() >= BRIDGE_PARAM_NAME_BYTES || p.shape.len() > BRIDGE_PARAM_MAX_DIMS {
        return Err(Error::internal(format!(
            "tensor `{}` of shape {:?} does not fit BridgeParamInfo",
            p.name, p.shape
        )));
    }
    let mut name = [0 as c_char; BRIDGE_PARAM_NAME_BYTES];
    for (dst, &b) in name.iter_mut().zip(bytes) {
        *dst = b as c_char;
    }
    let mut shape = [0i64; BRIDGE_PARAM_MAX_DIMS];
    for (dst, &d) in shape.iter_mut().zip(&p.shape) {
        *dst = d as i64;
    }
    Ok(BridgeParamInfo {
        struct_size: struct_size as u32,
        name,
        offset: p.offset as i64,
        numel: p.numel() as i64,
        ndim: p.shape.len() as i32,
        shape,
        decays: p.decays as i32,
    })
}
