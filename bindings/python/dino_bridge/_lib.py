"""ctypes declarations of the C API in include/dino_bridge.h (ABI version 5), and finding
the library. `lib()` refuses a library whose `bridge_abi_version()` differs from
`ABI_VERSION`: the structs and signatures below are only right for that version.

ABI 3 adds the DLPack entry points (`bridge_*_dlpack`, taking `DLTensor` descriptors in the
DLPack 1.x layout, mirrored below with the managed wrappers a `__dlpack__` capsule holds),
`bridge_get_capabilities` and `bridge_set_log_callback`. ABI 4 gives alignment and the
latent loss weights of their own (`align_w_*` in `BridgeParams`, REPA's loss by default)
and lets the DLPack loss calls write each sample's loss."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ABI_VERSION = 5

OK = 0
STATUS_NAMES = {
    1: "INVALID_ARGUMENT",
    2: "SHAPE",
    3: "IO",
    4: "CHECKPOINT",
    5: "UNSUPPORTED",
    6: "DEVICE",
    7: "NON_FINITE",
    8: "INTERNAL",
    9: "ABI_MISMATCH",
}
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
DTYPE_NAMES = {DTYPE_F32: "float32", DTYPE_F16: "float16", DTYPE_BF16: "bfloat16"}
LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR = 1, 2, 3, 4

# DLPack (https://dmlc.github.io/dlpack/latest/c_api.html): the device types the library
# reads, the type codes of the dtypes it takes, and the flags of a versioned tensor.
DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
DL_FLOAT, DL_BFLOAT = 2, 4
DLPACK_FLAG_READ_ONLY = 1 << 0
DLPACK_FLAG_IS_COPIED = 1 << 1
# What the `*_dlpack` calls read: the DLPack major version requested from producers.
DLPACK_MAX_VERSION = (1, 0)


class BridgeParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("checkpoint_path", ctypes.c_char_p),
        ("device", ctypes.c_int32),
        ("compute_dtype", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("in_ch", ctypes.c_int32),
        ("latent_size", ctypes.c_int32),
        ("grid", ctypes.c_int32),
        ("target_dim", ctypes.c_int32),
        ("adapter_mid_channels", ctypes.c_int32),
        ("adapter_out_channels", ctypes.c_int32),
        ("adapter_depth", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("depth", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("mlp_ratio", ctypes.c_float),
        ("dropout", ctypes.c_float),
        ("latent_shift", ctypes.c_float),
        ("latent_scale", ctypes.c_float),
        ("w_cos", ctypes.c_float),
        ("w_norm", ctypes.c_float),
        ("w_raw", ctypes.c_float),
        ("lr", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("grad_clip", ctypes.c_float),
        ("warmup_steps", ctypes.c_int64),
        ("total_steps", ctypes.c_int64),
        # ABI 2
        ("w_gram", ctypes.c_float),
        ("spatial_norm_gamma", ctypes.c_float),
        # ABI 4: alignment's and the latent loss's weights
        ("align_w_cos", ctypes.c_float),
        ("align_w_norm", ctypes.c_float),
        ("align_w_raw", ctypes.c_float),
        ("align_w_gram", ctypes.c_float),
    ]


class BridgeInfo(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("in_ch", ctypes.c_int32),
        ("latent_size", ctypes.c_int32),
        ("grid", ctypes.c_int32),
        ("target_dim", ctypes.c_int32),
        ("adapter_mid_channels", ctypes.c_int32),
        ("adapter_out_channels", ctypes.c_int32),
        ("adapter_depth", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("depth", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("mlp_ratio", ctypes.c_float),
        ("dropout", ctypes.c_float),
        ("latent_shift", ctypes.c_float),
        ("latent_scale", ctypes.c_float),
        ("param_count", ctypes.c_int64),
        ("device", ctypes.c_int32),
        ("tokens", ctypes.c_int32),
        ("step", ctypes.c_int64),
    ]


class BridgeStepStats(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("loss", ctypes.c_float),
        ("grad_norm", ctypes.c_float),
        ("lr", ctypes.c_float),
        ("step", ctypes.c_int64),
        ("skipped", ctypes.c_int32),
    ]


PARAM_NAME_BYTES = 96
PARAM_MAX_DIMS = 4


class BridgeParamInfo(ctypes.Structure):
    """(ABI 5) `bridge_param_info`: one tensor of the flat parameter vector."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("name", ctypes.c_char * PARAM_NAME_BYTES),
        ("offset", ctypes.c_int64),
        ("numel", ctypes.c_int64),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * PARAM_MAX_DIMS),
        ("decays", ctypes.c_int32),
    ]


class BridgeCapabilities(ctypes.Structure):
    """(ABI 3) `bridge_get_capabilities`: what this build of the library can do."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("abi_version", ctypes.c_uint32),
        ("cuda", ctypes.c_int32),
        ("cuda_devices", ctypes.c_int32),
        ("buffer_dtypes", ctypes.c_uint32),  # bit 1 << DTYPE_*
        ("compute_dtypes", ctypes.c_uint32),  # bit 1 << DTYPE_*
        ("dlpack_major", ctypes.c_int32),
        ("dlpack_minor", ctypes.c_int32),
        ("max_latent_side", ctypes.c_int32),
        # ABI 4: what the CPU kernels multiply with, and why (a static string)
        ("blas", ctypes.c_char_p),
    ]


# -- DLPack 1.x (the header declares the first three under dlpack.h's guard) -------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # in elements; NULL = compact row-major
        ("byte_offset", ctypes.c_uint64),
    ]


# What a `__dlpack__` capsule points to (dlpack.h; not part of this library's header: the
# binding reads them to build the DLTensor it passes, then hands them back to their deleter).
class DLManagedTensor(ctypes.Structure):
    """The pre-1.0 (unversioned) capsule, named "dltensor"."""

    _fields_ = [
        ("dl_tensor", DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # void (*)(DLManagedTensor *)
    ]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    """The DLPack >= 1.0 capsule, named "dltensor_versioned"."""

    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # void (*)(DLManagedTensorVersioned *)
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


# `void (*)(DLManagedTensor[Versioned] *)`, called with the GIL held (the deleters of numpy,
# torch, JAX and CuPy take it themselves where they need it; holding it is safe either way).
DLPACK_DELETER = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)

# (ABI 3) `typedef void (*BridgeLogCallback)(int32_t level, const char *message, void *user_data)`.
BridgeLogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_char_p, ctypes.c_void_p)

_P = ctypes.c_void_p
_I32, _I64, _F32P = ctypes.c_int32, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
_DLT = ctypes.POINTER(DLTensor)
_SIGNATURES = {
    "bridge_params_default": (_I32, [ctypes.POINTER(BridgeParams)]),
    "bridge_abi_version": (ctypes.c_uint32, []),
    "bridge_last_error": (ctypes.c_char_p, []),
    "bridge_create": (_I32, [ctypes.POINTER(BridgeParams), ctypes.POINTER(_P)]),
    "bridge_destroy": (_I32, [_P]),
    "bridge_get_info": (_I32, [_P, ctypes.POINTER(BridgeInfo)]),
    # handle, latents, out, batch, height, width, dtype
    "bridge_forward": (_I32, [_P, _P, _P, _I64, _I32, _I32, _I32]),
    # ... then the caller's cudaStream_t
    "bridge_forward_cuda_ptr": (_I32, [_P, _P, _P, _I64, _I32, _I32, _I32, _P]),
    # handle, pred, latents, grad_pred, batch, height, width, pred_h, pred_w, dtype, &loss, stream
    "bridge_loss_backward": (_I32, [_P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I32, _F32P, _P]),
    # handle, latents, target, grad_latents, batch, height, width, dtype, &loss, stream
    "bridge_latent_loss_backward": (_I32, [_P, _P, _P, _P, _I64, _I32, _I32, _I32, _F32P, _P]),
    # handle, latents, targets, batch, height, width, dtype, &stats, stream
    "bridge_train_step": (_I32, [_P, _P, _P, _I64, _I32, _I32, _I32, ctypes.POINTER(BridgeStepStats), _P]),
    "bridge_save": (_I32, [_P, ctypes.c_char_p]),
    # ABI 3. handle, latents, out, stream
    "bridge_forward_dlpack": (_I32, [_P, _DLT, _DLT, _P]),
    # handle, pred, latents, grad_pred, loss, stream
    "bridge_loss_backward_dlpack": (_I32, [_P, _DLT, _DLT, _DLT, _DLT, _P]),
    # handle, latents, target, grad_latents, loss, stream
    "bridge_latent_loss_backward_dlpack": (_I32, [_P, _DLT, _DLT, _DLT, _DLT, _P]),
    # handle, latents, targets, &stats, stream
    "bridge_train_step_dlpack": (_I32, [_P, _DLT, _DLT, ctypes.POINTER(BridgeStepStats), _P]),
    "bridge_get_capabilities": (_I32, [ctypes.POINTER(BridgeCapabilities)]),
    # ABI 5: the flat parameter vector. handle, &count / handle, index, &info
    "bridge_param_count": (_I32, [_P, ctypes.POINTER(_I64)]),
    "bridge_param_info": (_I32, [_P, _I64, ctypes.POINTER(BridgeParamInfo)]),
    # handle, flat, stream
    "bridge_get_params_dlpack": (_I32, [_P, _DLT, _P]),
    "bridge_set_params_dlpack": (_I32, [_P, _DLT, _P]),
    # handle, latents, targets, grad_params, grad_latents (or NULL), loss, seed, stream
    "bridge_loss_grads_dlpack": (_I32, [_P, _DLT, _DLT, _DLT, _DLT, _DLT, ctypes.c_uint64, _P]),
    # handle, latents, out, seed, stream
    "bridge_forward_train_dlpack": (_I32, [_P, _DLT, _DLT, ctypes.c_uint64, _P]),
    # handle, latents, grad_out, grad_params, grad_latents (or NULL), seed, stream
    "bridge_vjp_dlpack": (_I32, [_P, _DLT, _DLT, _DLT, _DLT, ctypes.c_uint64, _P]),
    # handle, grad_params, &stats, stream
    "bridge_apply_grads_dlpack": (_I32, [_P, _DLT, ctypes.POINTER(BridgeStepStats), _P]),
    "bridge_set_log_callback": (_I32, [BridgeLogCallback, _P]),
}

_lib = None


def library_path() -> Path:
    """`$DINO_BRIDGE_LIB` if set, else `libdino_bridge.so` next to this package: where
    `pip install ./bindings/python` puts the library it builds (or copy one there)."""
    env = os.environ.get("DINO_BRIDGE_LIB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "libdino_bridge.so"


def environment_blas() -> list:
    """The BLAS libraries this Python environment holds, in the order the library tries
    them: MKL (`pip install mkl`), then the OpenBLAS of the `scipy-openblas32` wheel (a
    dependency of this package)."""
    found = []
    for name in ("libmkl_rt.so.3", "libmkl_rt.so.2"):
        candidate = Path(sys.prefix) / "lib" / name
        if candidate.is_file():
            found.append(str(candidate))
    try:
        import scipy_openblas32

        path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
        if path.is_file():
            found.append(str(path))
    except ImportError:
        pass
    return found


def _offer_environment_blas() -> None:
    """Unless `DINO_BRIDGE_BLAS` is set, offers the library this environment's BLAS
    libraries before its own search (`auto`): it checks each one it finds against candle's
    own matmul, in order, and uses the first fast enough (or none)."""
    if os.environ.get("DINO_BRIDGE_BLAS"):
        return
    libs = environment_blas()
    if libs:
        os.environ["DINO_BRIDGE_BLAS"] = ":".join(libs + ["auto"])


class AbiMismatchError(OSError):
    """The library at `path` speaks ABI `library_version`; this package `expected`."""

    def __init__(self, path, library_version: int, expected: int):
        self.path, self.library_version, self.expected = path, library_version, expected
        super().__init__(
            f"{path} has ABI version {library_version}, but this dino_bridge package was written for ABI "
            f"version {expected}: their structs and calls differ, so it will not use it. Build the library "
            f"from the same checkout as the package (cargo build --release --lib) and point DINO_BRIDGE_LIB "
            f"at it, or install the package that matches the library"
        )


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _offer_environment_blas()
        path = library_path()
        if not path.is_file():
            raise OSError(
                f"dino-bridge library not found at {path}: build it (cargo build --release) and set "
                "DINO_BRIDGE_LIB=/path/to/libdino_bridge.so, or copy it next to the dino_bridge package"
            )
        cdll = ctypes.CDLL(str(path))
        # The version first: nothing else is declared (or called) on a library of another ABI.
        try:
            abi = cdll.bridge_abi_version
        except AttributeError:
            raise OSError(f"{path} has no bridge_abi_version(): not a dino-bridge library") from None
        abi.restype, abi.argtypes = ctypes.c_uint32, []
        version = int(abi())
        if version != ABI_VERSION:
            raise AbiMismatchError(path, version, ABI_VERSION)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.restype, fn.argtypes = restype, argtypes
        _lib = cdll
    return _lib
