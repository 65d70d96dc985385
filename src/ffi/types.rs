//! The C-visible types and constants. Plain integers and `#[repr(C)]` structs only: no
//! Rust enum crosses the boundary.

use std::ffi::c_void;
use std::os::raw::c_char;

/// ABI version: bumped when a struct or function signature changes incompatibly.
pub const BRIDGE_ABI_VERSION: u32 = 5;

/// Success.
pub const BRIDGE_OK: i32 = 0;
/// An argument is NULL, out of range, or otherwise malformed (dtype code, batch, grid, path).
pub const BRIDGE_ERR_INVALID_ARGUMENT: i32 = 1;
/// A shape does not fit the model: a latent side that is not a positive multiple of
/// `2^adapter_depth` (or too large), or a call too large for the device's memory.
pub const BRIDGE_ERR_SHAPE: i32 = 2;
/// A file could not be read or written.
pub const BRIDGE_ERR_IO: i32 = 3;
/// A checkpoint is missing, truncated, corrupt, or does not fit its config.
pub const BRIDGE_ERR_CHECKPOINT: i32 = 4;
/// The operation is not available in this build (e.g. CUDA in a CPU-only build).
pub const BRIDGE_ERR_UNSUPPORTED: i32 = 5;
/// A device (CUDA) error, or a pointer that is not device memory of the bridge's GPU.
pub const BRIDGE_ERR_DEVICE: i32 = 6;
/// Inputs or the loss were NaN or infinite; nothing was written.
pub const BRIDGE_ERR_NON_FINITE: i32 = 7;
/// A bug or resource failure inside the library (including a caught panic).
pub const BRIDGE_ERR_INTERNAL: i32 = 8;
/// A struct's `struct_size` does not fit this library's ABI.
pub const BRIDGE_ERR_ABI_MISMATCH: i32 = 9;

/// Buffer element type codes.
pub const BRIDGE_DTYPE_F32: i32 = 0;
pub const BRIDGE_DTYPE_F16: i32 = 1;
pub const BRIDGE_DTYPE_BF16: i32 = 2;

/// `BridgeParams.device` for the CPU.
pub const BRIDGE_DEVICE_CPU: i32 = -1;

/// Opaque handle to a loaded bridge. Create with `bridge_create`, free with `bridge_destroy`.
pub struct BridgeHandle {
    _private: [u8; 0],
}

/// How to create a bridge. Set `struct_size = sizeof(BridgeParams)`, then fill with
/// `bridge_params_default` and change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BridgeParams {
    pub struct_size: u32,
    /// Checkpoint to load (`.safetensors` or PyTorch `.pt`), UTF-8; NULL = fresh weights
    /// from the config fields below.
    pub checkpoint_path: *const c_char,
    /// -1 = CPU, n >= 0 = CUDA device ordinal.
    pub device: i32,
    /// `BRIDGE_DTYPE_F32` or `BRIDGE_DTYPE_BF16` (bf16 needs a CUDA device).
    pub compute_dtype: i32,
    /// Seed of fresh weights and of dropout in training.
    pub seed: u64,
    pub in_ch: i32,
    pub latent_size: i32,
    pub grid: i32,
    pub target_dim: i32,
    pub adapter_mid_channels: i32,
    pub adapter_out_channels: i32,
    pub adapter_depth: i32,
    pub width: i32,
    pub depth: i32,
    pub heads: i32,
    pub mlp_ratio: f32,
    pub dropout: f32,
    pub latent_shift: f32,
    pub latent_scale: f32,
    /// The training loss's weights (`bridge_train_step`): cosine, normalised MSE, raw MSE.
    /// Alignment has its own (`align_w_*`, ABI 4).
    pub w_cos: f32,
    pub w_norm: f32,
    pub w_raw: f32,
    /// AdamW settings for `bridge_train_step`.
    pub lr: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global-norm gradient clip; 0 disables.
    pub grad_clip: f32,
    pub warmup_steps: i64,
    /// Length of the cosine schedule; 0 = constant rate after warmup.
    pub total_steps: i64,
    /// (ABI 2) Weight of the spatial-structure loss term (token self-similarity); 0 = off.
    pub w_gram: f32,
    /// (ABI 2) iREPA's spatial normalisation of the alignment target in
    /// `bridge_loss_backward` (0 = off).
    pub spatial_norm_gamma: f32,
    /// (ABI 4) The loss weights of alignment (`bridge_loss_backward*`) and of the latent
    /// loss (`bridge_latent_loss_backward*`), the calls a diffusion trainer makes: REPA's
    /// cosine loss `mean(1 - cos)` by default (1, 0, 0, 0; REPA logs `-cos`, one less).
    /// `w_cos`, `w_norm`, `w_raw` and `w_gram` above weigh the bridge's own training.
    pub align_w_cos: f32,
    pub align_w_norm: f32,
    pub align_w_raw: f32,
    pub align_w_gram: f32,
}

/// What a handle holds (`bridge_get_info`). Set `struct_size` before the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BridgeInfo {
    pub struct_size: u32,
    pub in_ch: i32,
    pub latent_size: i32,
    pub grid: i32,
    pub target_dim: i32,
    pub adapter_mid_channels: i32,
    pub adapter_out_channels: i32,
    pub adapter_depth: i32,
    pub width: i32,
    pub depth: i32,
    pub heads: i32,
    pub mlp_ratio: f32,
    pub dropout: f32,
    pub latent_shift: f32,
    pub latent_scale: f32,
    pub param_count: i64,
    /// -1 = CPU, else the CUDA ordinal.
    pub device: i32,
    /// grid * grid: tokens per sample at the stored latent size. Other latent sizes give
    /// the token grid `(height, width) / 2^adapter_depth`.
    pub tokens: i32,
    /// Optimiser updates applied so far.
    pub step: i64,
}

/// What `bridge_train_step` did. Set `struct_size` before the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BridgeStepStats {
    pub struct_size: u32,
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used for this step.
    pub lr: f32,
    /// Updates applied so far, this one included.
    pub step: i64,
    /// 1 when a non-finite loss or gradient skipped the update (weights unchanged).
    pub skipped: i32,
}

/// Bytes of `BridgeParamInfo.name`, its NUL included.
pub const BRIDGE_PARAM_NAME_BYTES: usize = 96;
/// Dimensions `BridgeParamInfo.shape` holds.
pub const BRIDGE_PARAM_MAX_DIMS: usize = 4;

/// (ABI 5) One tensor of the flat parameter vector (`bridge_param_info`). Set
/// `struct_size` before the call. Self-contained: nothing in it points into the library.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BridgeParamInfo {
    pub struct_size: u32,
    /// The checkpoint key, NUL-terminated.
    pub name: [c_char; BRIDGE_PARAM_NAME_BYTES],
    /// Its first element's index in the flat vector.
    pub offset: i64,
    /// Its element count.
    pub numel: i64,
    pub ndim: i32,
    /// The first `ndim` entries are its shape, the rest 0.
    pub shape: [i64; BRIDGE_PARAM_MAX_DIMS],
    /// 1 when the library's AdamW applies weight decay to it (`bridge_apply_grads_dlpack`,
    /// `bridge_train_step`); a host's optimiser should do the same.
    pub decays: i32,
}

/// Message levels of the log callback.
pub const BRIDGE_LOG_DEBUG: i32 = 1;
pub const BRIDGE_LOG_INFO: i32 = 2;
pub const BRIDGE_LOG_WARN: i32 = 3;
pub const BRIDGE_LOG_ERROR: i32 = 4;

/// (ABI 3) Receives the library's messages: `level` (`BRIDGE_LOG_*`), the message
/// (valid during the call only) and the `user_data` given to `bridge_set_log_callback`.
/// Called from whichever thread the library runs on, never while that thread holds a
/// handle's lock (a slow callback stalls no other call); it must be thread-safe, may call
/// the library's other functions, but not `bridge_set_log_callback`, which waits for
/// callbacks in flight.
pub type BridgeLogCallback =
    Option<unsafe extern "C" fn(level: i32, message: *const c_char, user_data: *mut c_void)>;

/// (ABI 3) What this build of the library can do (`bridge_get_capabilities`). Set
/// `struct_size` before the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BridgeCapabilities {
    pub struct_size: u32,
    /// `BRIDGE_ABI_VERSION` of the library.
    pub abi_version: u32,
    /// 1 when built with CUDA support.
    pub cuda: i32,
    /// CUDA devices the driver reports (0 without CUDA support or without a driver).
    pub cuda_devices: i32,
    /// Buffer dtypes the compute calls take: bit `1 << BRIDGE_DTYPE_*`.
    pub buffer_dtypes: u32,
    /// Compute dtypes `BridgeParams.compute_dtype` may name: bit `1 << BRIDGE_DTYPE_*`.
    pub compute_dtypes: u32,
    /// The DLPack version whose `DLTensor` layout the `*_dlpack` calls read.
    pub dlpack_major: i32,
    pub dlpack_minor: i32,
    /// The largest latent side the compute calls accept.
    pub max_latent_side: i32,
    /// (ABI 4) What the CPU kernels multiply with, and why: the BLAS in use with its GEMM
    /// speed over candle's own matmul (measured when it was loaded), or "none" with the
    /// reasons each library found was passed over and how to get a fast one. A static
    /// NUL-terminated string, valid for the life of the process; do not free it.
    pub blas: *const c_char,
}
