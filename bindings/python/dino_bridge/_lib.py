"""ctypes declarations of the C API in include/dino_bridge.h (ABI version 2), and finding
the library. `lib()` refuses a library whose `bridge_abi_version()` differs from
`ABI_VERSION`: the structs and signatures below are only right for that version."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ABI_VERSION = 2

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


_P = ctypes.c_void_p
_I32, _I64, _F32P = ctypes.c_int32, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
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
}

_lib = None


def library_path() -> Path:
    """`$DINO_BRIDGE_LIB`, else `libdino_bridge.so` next to this package."""
    env = os.environ.get("DINO_BRIDGE_LIB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "libdino_bridge.so"


def _prefer_environment_mkl() -> None:
    """Points the library at MKL installed in this Python environment (`pip install mkl`)
    unless `DINO_BRIDGE_BLAS` already names a BLAS: on the machines we measured, MKL's
    f32 GEMM ran 15-20% faster than Debian's OpenBLAS, and the bridge is mostly GEMMs."""
    if os.environ.get("DINO_BRIDGE_BLAS"):
        return
    for name in ("libmkl_rt.so.3", "libmkl_rt.so.2"):
        candidate = Path(sys.prefix) / "lib" / name
        if candidate.is_file():
            os.environ["DINO_BRIDGE_BLAS"] = str(candidate)
            return


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
        _prefer_environment_mkl()
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
