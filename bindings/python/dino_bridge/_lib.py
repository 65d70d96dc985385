"""ctypes declarations of the C API in include/dino_bridge.h, and finding the library."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ABI_VERSION = 1

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
_SIGNATURES = {
    "bridge_params_default": (ctypes.c_int32, [ctypes.POINTER(BridgeParams)]),
    "bridge_abi_version": (ctypes.c_uint32, []),
    "bridge_last_error": (ctypes.c_char_p, []),
    "bridge_create": (ctypes.c_int32, [ctypes.POINTER(BridgeParams), ctypes.POINTER(_P)]),
    "bridge_destroy": (ctypes.c_int32, [_P]),
    "bridge_get_info": (ctypes.c_int32, [_P, ctypes.POINTER(BridgeInfo)]),
    "bridge_forward": (ctypes.c_int32, [_P, _P, _P, ctypes.c_int64, ctypes.c_int32]),
    "bridge_forward_cuda_ptr": (ctypes.c_int32, [_P, _P, _P, ctypes.c_int64, ctypes.c_int32, _P]),
    "bridge_loss_backward": (
        ctypes.c_int32,
        [_P, _P, _P, _P, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), _P],
    ),
    "bridge_latent_loss_backward": (
        ctypes.c_int32,
        [_P, _P, _P, _P, ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), _P],
    ),
    "bridge_train_step": (
        ctypes.c_int32,
        [_P, _P, _P, ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(BridgeStepStats), _P],
    ),
    "bridge_save": (ctypes.c_int32, [_P, ctypes.c_char_p]),
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
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.restype, fn.argtypes = restype, argtypes
        version = cdll.bridge_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"{path} has ABI version {version}; this package speaks {ABI_VERSION}")
        _lib = cdll
    return _lib
