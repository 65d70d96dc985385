"""`Bridge`: a loaded dino-bridge model, used from any array with `__dlpack__`.

Latents are `[B, C, H, W]` with `H, W` any positive multiples of `2^adapter_depth`; tokens
come out `[B, h*w, D]` on the token grid `(h, w) = (H, W) / 2^adapter_depth` (row-major).

Arrays reach the library through DLPack (ABI 3's `bridge_*_dlpack` calls): numpy arrays,
torch tensors, JAX and CuPy arrays, anything with `__dlpack__` / `__dlpack_device__`. Each
one is exported by its producer (`__dlpack__(stream=..., max_version=(1, 0))`), the capsule
is taken over (renamed `used_dltensor[_versioned]`) and its managed tensor handed back to
the producer's deleter when the call returns; the library gets a `DLTensor` of the
binding's own pointing at the producer's memory, never a copy. Each array keeps its own
dtype (float32, float16 or bfloat16): a bf16 `pred` does not round f32 latents. Every
array is checked (dtype, shape, compact row-major layout, device, writability of outputs)
before anything reaches C. Errors from the library raise `BridgeError` with the status name
and the library's message.

On CUDA, the library's work is ordered on the caller's current stream (torch's, or
CuPy's for CuPy arrays): that stream is passed to the library and, as the DLPack protocol
defines it, to every `__dlpack__` call (the legacy default stream as 1), so the producer
makes it wait for pending work on the array. Nothing syncs the host except a loss read back
to a Python float: pass `loss_out=` (a one-element array on the bridge's device) to keep it
on the device.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import numbers
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

from . import _lib as L

# The keyword arguments of Bridge(): every BridgeParams field but those it takes by name
# (the ctypes mirror is checked against the header in tests/test_bridge.py).
_SETTINGS = tuple(name for name, _ in L.BridgeParams._fields_
                  if name not in ("struct_size", "checkpoint_path", "device", "compute_dtype", "seed"))


class BridgeError(RuntimeError):
    """A failed library call: `status` (int), `status_name` (e.g. "SHAPE"), `message`."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.status_name = L.STATUS_NAMES.get(status, f"UNKNOWN_{status}")
        self.message = message
        super().__init__(f"[{self.status_name}] {message}")


def _check(status: int) -> None:
    if status != L.OK:
        raise BridgeError(status, (L.lib().bridge_last_error() or b"").decode("utf-8", "replace"))


# -- DLPack: reading a producer's capsule ------------------------------------------------------

_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype, _capsule_is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype, _capsule_get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.restype, _capsule_set_name.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
# PyCapsule_SetName keeps the pointer: these module constants outlive every capsule renamed.
_VERSIONED, _USED_VERSIONED = b"dltensor_versioned", b"used_dltensor_versioned"
_LEGACY, _USED_LEGACY = b"dltensor", b"used_dltensor"

_DTYPES = {(L.DL_FLOAT, 32, 1): L.DTYPE_F32, (L.DL_FLOAT, 16, 1): L.DTYPE_F16, (L.DL_BFLOAT, 16, 1): L.DTYPE_BF16}
_HOST = (L.DL_CPU, L.DL_CUDA_HOST)
_GPU = (L.DL_CUDA, L.DL_CUDA_MANAGED)


def _kind(obj) -> str:
    mod = type(obj).__module__.split(".")[0]
    if mod == "numpy" and hasattr(obj, "__dlpack__"):
        return "numpy"
    if mod == "torch" and hasattr(obj, "__dlpack__"):
        return "torch"
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return "dlpack"
    return ""


def _device_name(device_type: int, device_id: int) -> str:
    return {L.DL_CPU: "cpu", L.DL_CUDA: f"cuda:{device_id}", L.DL_CUDA_HOST: "cuda_host",
            L.DL_CUDA_MANAGED: f"cuda_managed:{device_id}"}.get(device_type,
                                                                f"DLPack device ({device_type}, {device_id})")


def _dlpack_stream(handle: int) -> int:
    """The `stream` argument of `__dlpack__` for a CUDA stream handle: 1 for the legacy
    default stream (handle 0, which the protocol forbids as ambiguous), 2 is the
    per-thread default stream, any other value the `cudaStream_t` itself."""
    return 1 if handle == 0 else handle


def _consumer_stream(obj, ordinal: int) -> int:
    """The `cudaStream_t` (an integer, 0 = the legacy default stream) the library's work
    is ordered on: the current stream of CuPy for a CuPy array, else torch's current stream
    on the bridge's device when torch is loaded, else the legacy default stream."""
    if type(obj).__module__.split(".")[0] == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.current_stream(ordinal).cuda_stream)
    return 0


class _Tensor:
    """A caller array as the library sees it: `ref` is a `DLTensor` of the binding's own
    (its shape array owned here, strides NULL once the layout was checked compact) pointing
    at the producer's memory. The producer's managed tensor stays alive (and so its memory)
    until `release()` hands it to the producer's deleter."""

    __slots__ = ("obj", "name", "kind", "code", "shape", "device", "host", "dl", "ref", "_shape_arr", "_managed",
                 "_deleter", "__weakref__")

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name
        self._managed, self._deleter, self._shape_arr = None, None, None
        self.dl = L.DLTensor()
        self.ref = ctypes.pointer(self.dl)

    @classmethod
    def host_scalar(cls, name: str) -> "_Tensor":
        """A 0-d float32 in host memory owned here (`value()` reads it)."""
        t = cls(ctypes.c_float(float("nan")), name)
        t.kind, t.code, t.shape, t.device, t.host = "scalar", L.DTYPE_F32, (), "cpu", True
        t.dl.data = ctypes.addressof(t.obj)
        t.dl.device = L.DLDevice(L.DL_CPU, 0)
        t.dl.dtype = L.DLDataType(L.DL_FLOAT, 32, 1)
        t.dl.ndim = 0
        return t

    def value(self) -> float:
        return float(self.obj.value)

    def reshape(self, shape) -> None:
        """Describes the same compact memory with another shape (same element count)."""
        shape = tuple(int(s) for s in shape)
        assert math.prod(shape) == math.prod(self.shape), (shape, self.shape)
        self._set_shape(shape)

    def _set_shape(self, shape: tuple) -> None:
        self.shape = shape
        self._shape_arr = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.dl.ndim = len(shape)
        self.dl.shape = ctypes.cast(self._shape_arr, ctypes.POINTER(ctypes.c_int64))

    def release(self) -> None:
        """Hands the producer's managed tensor to its deleter (once)."""
        managed, deleter = self._managed, self._deleter
        self._managed = self._deleter = None
        if managed and deleter:
            L.DLPACK_DELETER(deleter)(managed)

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    # -- import ------------------------------------------------------------------------
    def take(self, capsule) -> tuple:
        """Takes over a `__dlpack__` capsule: reads its managed tensor, marks the capsule
        used (its destructor then leaves the tensor alone: the deleter is ours to call), and
        copies the descriptor. Returns the producer's flags and strides."""
        if _capsule_is_valid(capsule, _VERSIONED):
            ptr = _capsule_get_pointer(capsule, _VERSIONED)
            _capsule_set_name(capsule, _USED_VERSIONED)
            managed = L.DLManagedTensorVersioned.from_address(ptr)
            self._managed, self._deleter = ptr, managed.deleter
            if managed.version.major != L.DLPACK_MAX_VERSION[0]:
                version = (managed.version.major, managed.version.minor)
                self.release()
                raise BufferError(f"{self.name}: the producer exported DLPack {version[0]}.{version[1]}, "
                                  f"but this binding reads DLPack {L.DLPACK_MAX_VERSION[0]}.x")
            flags = int(managed.flags)
        elif _capsule_is_valid(capsule, _LEGACY):
            ptr = _capsule_get_pointer(capsule, _LEGACY)
            _capsule_set_name(capsule, _USED_LEGACY)
            managed = L.DLManagedTensor.from_address(ptr)
            self._managed, self._deleter = ptr, managed.deleter
            flags = 0
        else:
            raise BufferError(f"{self.name}: __dlpack__ returned {capsule!r}, not an unused DLPack capsule")
        src = managed.dl_tensor
        ndim = int(src.ndim)
        shape = tuple(int(src.shape[i]) for i in range(ndim))
        strides = None if not src.strides else tuple(int(src.strides[i]) for i in range(ndim))
        self.dl.data = src.data
        self.dl.device = L.DLDevice(src.device.device_type, src.device.device_id)
        self.dl.dtype = L.DLDataType(src.dtype.code, src.dtype.bits, src.dtype.lanes)
        self.dl.byte_offset = src.byte_offset
        self.dl.strides = None
        self._set_shape(shape)
        return flags, strides


def _dtype_name(obj, dl: L.DLDataType) -> str:
    dt = getattr(obj, "dtype", None)
    return str(dt) if dt is not None else f"(DLPack code {dl.code}, {dl.bits} bits, {dl.lanes} lanes)"


def _not_compact(t: _Tensor, strides) -> str:
    if t.kind == "torch":
        return f"{t.name}: tensor is not contiguous (call .contiguous())"
    if t.kind == "numpy":
        return f"{t.name}: array is not C-contiguous (use numpy.ascontiguousarray)"
    return f"{t.name}: strides {list(strides)} for shape {list(t.shape)} are not compact row-major"


def _compact(shape, strides) -> bool:
    if strides is None:
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class _Call:
    """The arrays of one library call: imported on the bridge's device with one stream,
    released (their managed tensors handed back) when the call is over."""

    def __init__(self, bridge: "Bridge"):
        self.ordinal = bridge._info["device"]
        self.bridge_device = bridge.device
        self.tensors = []
        self.stream = None  # the cudaStream_t handle (int) on a CUDA bridge, once known

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tensors:
            t.release()

    def stream_arg(self):
        return ctypes.c_void_p(self.stream or None)

    def arg(self, obj, name: str, *, writable: bool = False, host_ok: bool = False) -> _Tensor:
        kind = _kind(obj)
        if not kind:
            raise TypeError(f"{name}: expected an array with __dlpack__ (numpy, torch, JAX, CuPy, ...), got "
                            f"{type(obj).__name__}")
        if kind == "torch":
            if obj.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name}: device {obj.device} is not supported (cpu or cuda)")
            obj = obj.detach()  # __dlpack__ refuses a tensor that requires grad
        t = _Tensor(obj, name)
        t.kind = kind
        device_type, device_id = (int(x) for x in obj.__dlpack_device__())
        t.device, t.host = _device_name(device_type, device_id), device_type in _HOST
        if device_type not in _HOST + _GPU:
            raise ValueError(f"{name}: {t.device} is not supported (host memory or CUDA)")
        on_bridge = (t.host if self.ordinal < 0 else
                     (t.host and host_ok) or (device_type in _GPU and device_id == self.ordinal))
        if not on_bridge:
            raise ValueError(f"{name} is on {t.device} but the bridge is on {self.bridge_device}")
        kwargs = {}
        if device_type in _GPU:
            if self.stream is None:
                self.stream = _consumer_stream(obj, self.ordinal)
            kwargs["stream"] = _dlpack_stream(self.stream)
        self.tensors.append(t)
        try:
            capsule = self._export(obj, kind, device_type, device_id, kwargs, writable)
        except BufferError as e:
            raise ValueError(f"{name}: its producer cannot export it through DLPack: {e}") from e
        flags, strides = t.take(capsule)
        del capsule
        code = _DTYPES.get((t.dl.dtype.code, t.dl.dtype.bits, t.dl.dtype.lanes))
        if code is None:
            raise ValueError(f"{name}: dtype {_dtype_name(obj, t.dl.dtype)} is not supported "
                             f"(float32, float16 or bfloat16)")
        t.code = code
        if not _compact(t.shape, strides):
            raise ValueError(_not_compact(t, strides))
        if writable and flags & L.DLPACK_FLAG_READ_ONLY:
            raise ValueError(f"{name} is read-only, but the library writes it")
        if writable and flags & L.DLPACK_FLAG_IS_COPIED:
            raise ValueError(f"{name}: its producer exported a copy, so what the library writes would not reach it")
        return t

    @staticmethod
    def _export(obj, kind, device_type, device_id, kwargs, writable):
        if kind == "torch" and device_type == L.DL_CUDA:
            import torch

            if device_id != torch.cuda.current_device():  # torch exports from the current device only
                with torch.cuda.device(device_id):
                    return _Call._dlpack(obj, kwargs, writable)
        return _Call._dlpack(obj, kwargs, writable)

    @staticmethod
    def _dlpack(obj, kwargs, writable):
        versioned = dict(kwargs, max_version=L.DLPACK_MAX_VERSION)
        if writable:
            versioned["copy"] = False
        try:
            return obj.__dlpack__(**versioned)
        except TypeError:  # a producer that predates DLPack 1.0's Python protocol
            return obj.__dlpack__(**kwargs)

    def empty(self, like: _Tensor, shape):
        """A new output of `like`'s kind, dtype and device. For other producers: numpy for
        float32/float16 host memory, else torch (bfloat16, CUDA); `result` converts it to the
        producer's kind."""
        obj = like.obj
        if like.kind == "torch":
            import torch

            return torch.empty(shape, dtype=obj.dtype, device=obj.device)
        if like.kind == "numpy" or (like.host and like.code != L.DTYPE_BF16):
            import numpy as np

            return np.empty(shape, dtype=np.float32 if like.code == L.DTYPE_F32 else np.float16)
        try:
            import torch
        except ImportError:
            raise ValueError(f"{like.name}: cannot allocate a {L.DTYPE_NAMES[like.code]} output on {like.device} "
                             f"without torch; pass the output array") from None
        dtype = {L.DTYPE_F32: torch.float32, L.DTYPE_F16: torch.float16, L.DTYPE_BF16: torch.bfloat16}[like.code]
        device = "cpu" if like.host else f"cuda:{like.dl.device.device_id}"
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def result(buf, like: _Tensor):
        """`buf` (made by `empty`) as an array of `like`'s producer: its namespace's
        `from_dlpack` (the array API), when it has one."""
        if like.kind != "dlpack":
            return buf
        ns = getattr(like.obj, "__array_namespace__", None)
        xp = ns() if ns is not None else None
        if xp is not None and hasattr(xp, "from_dlpack"):
            return xp.from_dlpack(buf)
        return buf


# -- the caller grid ---------------------------------------------------------------------------


def grid_match(caller: Tuple[int, int], bridge: Tuple[int, int]) -> Optional[Tuple[str, int]]:
    """How the library meets a caller token grid `(ph, pw)` with the bridge's `(h, w)`
    (DESIGN.md, REPA alignment): `("same", 1)`, `("pool_pred", k)` when the caller's grid
    is `k` times the bridge's, `("pool_target", k)` when the bridge's is `k` times the
    caller's (the same `k` on both sides), or None when the library would refuse it."""
    (ph, pw), (h, w) = caller, bridge
    if ph <= 0 or pw <= 0:
        return None
    if (ph, pw) == (h, w):
        return ("same", 1)
    if ph % h == 0 and pw % w == 0 and ph // h == pw // w:
        return ("pool_pred", ph // h)
    if h % ph == 0 and w % pw == 0 and h // ph == w // pw:
        return ("pool_target", h // ph)
    return None


def _valid_token_counts(bridge: Tuple[int, int], finer: int = 3) -> list:
    """A few caller grids the library accepts for the bridge grid, coarsest first."""
    h, w = bridge
    coarse = [(h // k, w // k) for k in range(math.gcd(h, w), 1, -1) if h % k == 0 and w % k == 0]
    return coarse + [(h * k, w * k) for k in range(1, finer + 1)]


def infer_caller_grid(tokens: int, bridge: Tuple[int, int]) -> Tuple[int, int]:
    """The caller grid `(ph, pw)` with `ph * pw == tokens` that the library accepts for the
    bridge grid `(h, w)` (the latents' aspect, scaled by an integer factor either way).
    Raises ValueError when none fits, or when more than one would (then pass it)."""
    h, w = bridge
    found = []
    for ph in range(1, math.isqrt(max(tokens, 0)) + 1):
        if tokens % ph == 0:
            for cand in {(ph, tokens // ph), (tokens // ph, ph)}:
                if grid_match(cand, bridge) is not None:
                    found.append(cand)
    found = sorted(set(found))
    if len(found) == 1:
        return found[0]
    if not found:
        options = ", ".join(f"{a * b} ({a}x{b})" for a, b in _valid_token_counts(bridge))
        raise ValueError(
            f"pred: {tokens} tokens fit no caller grid for the bridge's token grid {h}x{w}: a caller grid "
            f"must equal it or be k times it or 1/k of it on both sides, so pred needs one of {options}, ... "
            f"tokens"
        )
    raise ValueError(
        f"pred: {tokens} tokens fit more than one caller grid for the bridge's token grid {h}x{w} "
        f"({', '.join(f'{a}x{b}' for a, b in found)}): pass grid=(ph, pw)"
    )


# -- capabilities and logs ---------------------------------------------------------------------


_told_blas = False


def _say_if_no_fast_blas() -> None:
    """Once per process, on stderr: what the CPU's matrix products run on when it is not a
    fast BLAS, and how to get one."""
    global _told_blas
    if _told_blas:
        return
    _told_blas = True
    blas = capabilities()["blas"]
    if blas.startswith("none"):
        print(f"dino_bridge: BLAS: {blas}", file=sys.stderr)


def capabilities() -> dict:
    """What the loaded library can do (`bridge_get_capabilities`): `abi_version`, `cuda`
    (built with CUDA), `cuda_devices` (devices the driver reports), `buffer_dtypes` and
    `compute_dtypes` (names), `dlpack_version` (the `DLTensor` layout read, `(major,
    minor)`), `max_latent_side`, and `blas`: what the CPU kernels multiply with and why (the
    BLAS in use and its GEMM speed over candle's own matmul, or "none ..." with the reasons
    and the fix; finding it times each library once, on the first call)."""
    caps = L.BridgeCapabilities()
    caps.struct_size = ctypes.sizeof(L.BridgeCapabilities)
    _check(L.lib().bridge_get_capabilities(ctypes.byref(caps)))

    def names(bits):
        return [L.DTYPE_NAMES[c] for c in sorted(L.DTYPE_NAMES) if bits >> c & 1]

    return {
        "abi_version": int(caps.abi_version),
        "cuda": bool(caps.cuda),
        "cuda_devices": int(caps.cuda_devices),
        "buffer_dtypes": names(caps.buffer_dtypes),
        "compute_dtypes": names(caps.compute_dtypes),
        "dlpack_version": (int(caps.dlpack_major), int(caps.dlpack_minor)),
        "max_latent_side": int(caps.max_latent_side),
        "blas": (caps.blas or b"").decode("utf-8", "replace"),
    }


_LOG_LEVELS = {L.LOG_DEBUG: logging.DEBUG, L.LOG_INFO: logging.INFO, L.LOG_WARN: logging.WARNING,
               L.LOG_ERROR: logging.ERROR}
_log_lock = threading.Lock()
_log_callback = None  # the installed ctypes function: kept alive while the library may call it
_log_atexit = False


def set_log_callback(fn: Optional[Callable[[int, str], None]]) -> None:
    """Sends the library's messages to `fn(level, message)` (`level` a `logging` level:
    DEBUG, INFO, WARNING or ERROR), or nowhere with None. Process-wide. `fn` runs on
    whichever thread the library emits from (with the GIL taken); its exceptions are
    swallowed, since they cannot cross into the library."""
    global _log_callback, _log_atexit

    def deliver(level, message, _user_data):
        try:
            fn(_LOG_LEVELS.get(level, logging.WARNING), (message or b"").decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 (nothing may propagate into C)
            pass

    cb = None if fn is None else L.BridgeLogCallback(deliver)
    with _log_lock:
        # The library lets a message being delivered finish before the call returns, so the
        # previous callback may be dropped afterwards.
        _check(L.lib().bridge_set_log_callback(cb if cb is not None else L.BridgeLogCallback(), None))
        _log_callback = cb
        if cb is not None and not _log_atexit:
            atexit.register(_remove_log_callback)
            _log_atexit = True


def _remove_log_callback() -> None:
    # At exit, before Python tears down what a callback would need.
    if _log_callback is not None and L._lib is not None:
        set_log_callback(None)


def enable_logging(logger: "logging.Logger | str" = "dino_bridge") -> logging.Logger:
    """Routes the library's messages (which BLAS or device path was taken, fallbacks,
    train steps skipped for a non-finite loss) into Python's `logging`, to `logger` (a name
    or a Logger; default "dino_bridge"). Returns the logger. `disable_logging()` undoes it."""
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    set_log_callback(lambda level, message: log.log(level, "%s", message))
    return log


def disable_logging() -> None:
    """The library's messages go nowhere again (the default)."""
    set_log_callback(None)


# -- the bridge -----------------------------------------------------------------------------


class Bridge:
    """A dino-bridge model: `Bridge(checkpoint)` loads a `.safetensors`/`.pt` file,
    `Bridge()` makes fresh weights (config fields as keyword arguments, e.g. the `repa`
    preset's `Bridge(adapter_depth=1, grid=16)`: 16x16 tokens from 32x32 latents).

    Settings (keyword arguments, also for a checkpoint): loss weights `w_cos, w_norm,
    w_raw, w_gram` (`w_gram` > 0 adds the token self-similarity term), alignment's
    `spatial_norm_gamma` (iREPA's spatial normalisation of the target in `loss_backward`,
    0 = off), and the optimiser's `lr, weight_decay, beta1, beta2, eps, grad_clip,
    warmup_steps, total_steps`."""

    def __init__(self, checkpoint: str | Path | None = None, *, device: int = -1, compute_dtype: str = "f32",
                 seed: int = 0, **settings):
        lib = L.lib()
        p = L.BridgeParams()
        p.struct_size = ctypes.sizeof(L.BridgeParams)
        _check(lib.bridge_params_default(ctypes.byref(p)))
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(_SETTINGS)}")
            setattr(p, key, value)
        if compute_dtype not in ("f32", "bf16"):
            raise ValueError(f"compute_dtype {compute_dtype!r}: use 'f32' or 'bf16'")
        p.device, p.seed = int(device), int(seed)
        p.compute_dtype = L.DTYPE_F32 if compute_dtype == "f32" else L.DTYPE_BF16
        path = None if checkpoint is None else str(Path(checkpoint)).encode()
        p.checkpoint_path = path
        handle = ctypes.c_void_p()
        _check(lib.bridge_create(ctypes.byref(p), ctypes.byref(handle)))
        self._h = handle
        self._info = self._read_info()
        self._settings = {name: getattr(p, name) for name in _SETTINGS}
        self._made_with = {"compute_dtype": compute_dtype, "seed": int(seed)}
        if p.device < 0:
            _say_if_no_fast_blas()

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Frees the model. Further calls raise ValueError; closing twice is fine."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            _check(L.lib().bridge_destroy(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _handle(self):
        if not getattr(self, "_h", None):
            raise ValueError("this Bridge is closed")
        return self._h

    # -- description -----------------------------------------------------------------
    def _read_info(self) -> dict:
        info = L.BridgeInfo()
        info.struct_size = ctypes.sizeof(L.BridgeInfo)
        _check(L.lib().bridge_get_info(self._handle(), ctypes.byref(info)))
        return {name: getattr(info, name) for name, _ in L.BridgeInfo._fields_ if name != "struct_size"}

    def info(self) -> dict:
        """Config, param_count, device (-1 = CPU), tokens and the optimiser step."""
        return self._read_info()

    def settings(self) -> dict:
        """The settings this bridge was made with (the `BridgeParams` fields besides the
        checkpoint, device, dtype and seed; a checkpoint's config fields are in `info()`):
        the training loss's `w_*`, alignment's `align_w_*`, the optimiser's."""
        return dict(self._settings)

    @property
    def device(self) -> str:
        d = self._info["device"]
        return "cpu" if d < 0 else f"cuda:{d}"

    @property
    def multiple(self) -> int:
        """Latent sides must be positive multiples of this (`2^adapter_depth`)."""
        return 1 << self._info["adapter_depth"]

    def token_grid(self, height: int, width: int) -> Tuple[int, int]:
        """The token grid `(h, w)` of latents of sides `height x width`; ValueError for a
        size this bridge cannot take."""
        m = self.multiple
        if height < 1 or width < 1 or height % m or width % m:
            def up(x):
                return max(m, -(-x // m) * m)

            raise ValueError(
                f"latents: sides {height}x{width} must be positive multiples of {m} (2^adapter_depth, "
                f"adapter_depth = {self._info['adapter_depth']}) for this bridge, e.g. {up(height)}x{up(width)}"
            )
        return (height // m, width // m)

    # -- argument checks -------------------------------------------------------------
    def _call(self) -> _Call:
        self._handle()
        return _Call(self)

    def _expect(self, buf: _Tensor, name: str, tail: tuple, batch: int | None = None, why: str = "") -> int:
        """Checks `buf` is `[batch, *tail]`; the message says where each size comes from
        (`why`, e.g. "batch 4 from the latents, 16x16 tokens, target_dim 768")."""
        shape = buf.shape
        if len(shape) != len(tail) + 1 or shape[1:] != tail or shape[0] < 1 or (batch is not None and shape[0] != batch):
            want = f"[{batch if batch is not None else 'B'}, {', '.join(map(str, tail))}]"
            raise ValueError(f"{name}: shape {list(shape)}, expected {want}" + (f" ({why})" if why else ""))
        return shape[0]

    def _tokens_why(self, b: int, grid: Tuple[int, int], whose: str) -> str:
        """Where the sizes of a `[B, T, D]` token tensor come from, for messages."""
        return (f"batch {b} from the latents, {grid[0] * grid[1]} tokens of {whose} {grid[0]}x{grid[1]}, "
                f"target_dim {self._info['target_dim']}")

    def _latents(self, buf: _Tensor, name: str = "latents", batch: int | None = None):
        """(batch, token grid) of latents `[B, in_ch, H, W]`."""
        shape, c = buf.shape, self._info["in_ch"]
        if len(shape) != 4 or shape[1] != c or shape[0] < 1 or (batch is not None and shape[0] != batch):
            b = batch if batch is not None else "B"
            raise ValueError(f"{name}: shape {list(shape)}, expected [{b}, {c}, H, W]")
        b, _, height, width = shape
        return b, self.token_grid(height, width)

    def _latents_shape(self, latents) -> Tuple[int, Tuple[int, int]]:
        """(batch, token grid) of an array of latents `[B, in_ch, H, W]` by its shape."""
        shape, c = tuple(latents.shape), self._info["in_ch"]
        if len(shape) != 4 or shape[1] != c or shape[0] < 1:
            raise ValueError(f"latents: shape {list(shape)}, expected [B, {c}, H, W]")
        return shape[0], self.token_grid(shape[2], shape[3])

    def _tokens(self, grid: Tuple[int, int]) -> tuple:
        return (grid[0] * grid[1], self._info["target_dim"])

    def _caller_grid(self, pred: _Tensor, grid, bridge_grid: Tuple[int, int]) -> Tuple[int, int]:
        """The caller grid of `pred` (`[B, ph*pw, D]`, or `[B, ph, pw, D]`, which names it):
        `grid` checked against the bridge grid, or inferred."""
        d = self._info["target_dim"]
        if len(pred.shape) == 4:
            own = tuple(pred.shape[1:3])
            if grid is not None and _grid_pair(grid) != own:
                raise ValueError(f"grid={grid!r} differs from pred's own grid {own} (pred {list(pred.shape)})")
            grid = own
        elif len(pred.shape) != 3:
            raise ValueError(f"pred: shape {list(pred.shape)}, expected [B, ph*pw, {d}] or [B, ph, pw, {d}]")
        if grid is None:
            return infer_caller_grid(pred.shape[1], bridge_grid)
        ph, pw = _grid_pair(grid)
        if grid_match((ph, pw), bridge_grid) is None:
            h, w = bridge_grid
            raise ValueError(
                f"grid=({ph}, {pw}): the caller grid must equal the bridge's token grid {h}x{w} for these "
                f"latents, or be k times it or 1/k of it with the same k on both sides"
            )
        return (ph, pw)

    def _loss(self, call: _Call, loss_out, batch: int):
        if loss_out is None:
            return _Tensor.host_scalar("loss")
        t = call.arg(loss_out, "loss_out", writable=True, host_ok=True)
        if math.prod(t.shape) != 1 and t.shape != (batch,):
            raise ValueError(f"loss_out: shape {list(t.shape)}, expected one element (the mean) or [{batch}] (each "
                             f"sample's loss; batch {batch} from the latents)")
        return t

    # -- compute ---------------------------------------------------------------------
    def forward(self, latents, out=None):
        """DINOv2 tokens `[B, h*w, target_dim]` for latents `[B, C, H, W]`, on the token grid
        `(h, w) = (H, W) / 2^adapter_depth` (same kind, dtype and device as `latents`;
        written into `out`, of any float dtype, when given)."""
        with self._call() as call:
            lat = call.arg(latents, "latents")
            b, grid = self._latents(lat)
            made = out is None
            if made:
                out = call.empty(lat, (b,) + self._tokens(grid))
            o = call.arg(out, "out", writable=True)
            self._expect(o, "out", self._tokens(grid), b, self._tokens_why(b, grid, "the latents' token grid"))
            _check(L.lib().bridge_forward_dlpack(self._handle(), lat.ref, o.ref, call.stream_arg()))
        return call.result(out, lat) if made else out

    def loss_backward(self, pred, latents, grid=None, *, grad_out=None, loss_out=None):
        """REPA alignment against the frozen bridge. `pred` `[B, ph*pw, target_dim]` is the
        caller's projection on its token grid `grid = (ph, pw)` (or `[B, ph, pw, target_dim]`,
        which names it); the bridge's grid for `latents` `[B, C, H, W]` is `(h, w) = (H, W) /
        2^adapter_depth`, and `(ph, pw)` must equal it, or be `k` times it (pred pooled
        `k x k`), or `1/k` of it (target pooled). Without `grid` it is inferred from the
        token count (the one grid that fits; e.g. 240 tokens on a 6x10 bridge grid are
        12x20). `pred` and `latents` may differ in dtype: each is read in its own.

        The loss weighs its terms with alignment's weights (`align_w_*`: REPA's cosine loss
        `mean(1 - cos)` by default; REPA logs `-cos`, one less), not the training loss's.

        Returns `(loss, d loss / d pred)`, the gradient (of the mean over the batch) in
        pred's kind, dtype and device (or written into `grad_out`). The loss is a float
        (read back: one sync on a GPU), or, with `loss_out` (on the host or the bridge's
        device: one element for the mean, or `[B]` for each sample's loss), written there
        and `loss_out` returned: on the device nothing syncs, and a non-finite loss is
        written as NaN or Inf instead of raising. On the host, NaN or Inf in the inputs or
        the loss raise `BridgeError` (`NON_FINITE`) with nothing written."""
        with self._call() as call:
            p = call.arg(pred, "pred")
            lat = call.arg(latents, "latents")
            b, bridge_grid = self._latents(lat)
            ph, pw = self._caller_grid(p, grid, bridge_grid)
            tokens = self._tokens((ph, pw))
            if len(p.shape) == 4:
                if p.shape != (b, ph, pw, tokens[1]):
                    raise ValueError(f"pred: shape {list(p.shape)}, expected [{b}, {ph}, {pw}, {tokens[1]}] (batch {b} "
                                     f"from the latents, the caller grid {ph}x{pw}, target_dim {tokens[1]})")
            else:
                self._expect(p, "pred", tokens, b, self._tokens_why(b, (ph, pw), "the caller grid"))
            made = grad_out is None
            if made:
                grad_out = call.empty(p, p.shape)
            go = call.arg(grad_out, "grad_out", writable=True)
            if go.shape != p.shape:
                raise ValueError(f"grad_out: shape {list(go.shape)}, expected pred's {list(p.shape)}")
            loss = self._loss(call, loss_out, b)
            # The caller grid made explicit: [B, ph, pw, D] descriptors of the same memory.
            for t in (p, go):
                t.reshape((b, ph, pw, tokens[1]))
            _check(L.lib().bridge_loss_backward_dlpack(self._handle(), p.ref, lat.ref, go.ref, loss.ref,
                                                       call.stream_arg()))
        return (loss.value() if loss_out is None else loss_out), (call.result(grad_out, p) if made else grad_out)

    def latent_loss_backward(self, latents, target, grad_out=None, *, loss_out=None):
        """Loss between bridge(latents) and `target` `[B, h*w, target_dim]` (the token grid
        of the latents' size), with alignment's weights, and its gradient with respect to
        the latents. Returns `(loss, grad_latents)`; the loss as in `loss_backward` (a
        float, or `loss_out`: one element or `[B]`)."""
        with self._call() as call:
            lat = call.arg(latents, "latents")
            tgt = call.arg(target, "target")
            b, grid = self._latents(lat)
            self._expect(tgt, "target", self._tokens(grid), b, self._tokens_why(b, grid, "the latents' token grid"))
            made = grad_out is None
            if made:
                grad_out = call.empty(lat, lat.shape)
            go = call.arg(grad_out, "grad_out", writable=True)
            self._expect(go, "grad_out", lat.shape[1:], b, "the latents' shape")
            loss = self._loss(call, loss_out, b)
            _check(L.lib().bridge_latent_loss_backward_dlpack(self._handle(), lat.ref, tgt.ref, go.ref, loss.ref,
                                                              call.stream_arg()))
        return (loss.value() if loss_out is None else loss_out), (call.result(grad_out, lat) if made else grad_out)

    def train_step(self, latents, targets) -> dict:
        """One AdamW step on the bridge's weights: latents `[B, C, H, W]`, targets
        `[B, h*w, target_dim]` on their token grid. Returns loss, grad_norm, lr, step and
        skipped (True when a non-finite loss or gradient skipped the update)."""
        with self._call() as call:
            lat = call.arg(latents, "latents")
            tgt = call.arg(targets, "targets")
            b, grid = self._latents(lat)
            self._expect(tgt, "targets", self._tokens(grid), b, self._tokens_why(b, grid, "the latents' token grid"))
            stats = L.BridgeStepStats()
            stats.struct_size = ctypes.sizeof(L.BridgeStepStats)
            _check(L.lib().bridge_train_step_dlpack(self._handle(), lat.ref, tgt.ref, ctypes.byref(stats),
                                                    call.stream_arg()))
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr, "step": stats.step,
                "skipped": bool(stats.skipped)}

    # -- the flat parameter vector (ABI 5): training in the host's own stack -----------
    def param_count(self) -> int:
        """The length of the flat parameter vector (every model tensor in f32, in
        `param_info()` order, each row-major)."""
        n = ctypes.c_int64()
        _check(L.lib().bridge_param_count(self._handle(), ctypes.byref(n)))
        return n.value

    def param_info(self) -> list:
        """The flat vector's tensors, in order: dicts with `name` (the checkpoint key),
        `offset`, `numel`, `shape` and `decays` (whether the library's AdamW applies weight
        decay to it)."""
        if getattr(self, "_param_info", None) is None:
            out, i = [], 0
            total = self.param_count()
            while not out or out[-1]["offset"] + out[-1]["numel"] < total:
                info = L.BridgeParamInfo()
                info.struct_size = ctypes.sizeof(L.BridgeParamInfo)
                _check(L.lib().bridge_param_info(self._handle(), i, ctypes.byref(info)))
                out.append({"name": info.name.decode(), "offset": info.offset, "numel": info.numel,
                            "shape": tuple(info.shape[:info.ndim]), "decays": bool(info.decays)})
                i += 1
            self._param_info = out
        return self._param_info

    def _flat(self, call: _Call, flat, name: str, like=None, writable: bool = True):
        """A float32 `[n]` argument (an output made where the bridge lives when `flat` is
        None)."""
        n = self._info["param_count"]  # the flat vector's length (bridge_param_count)
        if flat is None:
            flat = self._empty_f32(call, like, (n,))
        t = call.arg(flat, name, writable=writable)
        if t.shape != (n,) or t.code != L.DTYPE_F32:
            raise ValueError(f"{name}: {L.DTYPE_NAMES[t.code]} {list(t.shape)}, expected float32 [{n}] (the flat "
                             f"parameter vector, param_count())")
        return flat, t

    def _empty_f32(self, call: _Call, like, shape):
        """A new float32 output: like `like`'s kind and device (torch), else numpy on the
        host; a CUDA bridge's outputs need torch."""
        if like is not None and like.kind == "torch":
            import torch

            return torch.empty(shape, dtype=torch.float32, device=like.obj.device)
        if self._info["device"] < 0:
            import numpy as np

            return np.empty(shape, dtype=np.float32)
        import torch

        return torch.empty(shape, dtype=torch.float32, device=f"cuda:{self._info['device']}")

    def get_params(self, out=None):
        """The weights as the flat float32 vector `[n]` (written into `out` when given;
        else numpy on a CPU bridge, torch on a CUDA one)."""
        with self._call() as call:
            out, t = self._flat(call, out, "out")
            _check(L.lib().bridge_get_params_dlpack(self._handle(), t.ref, call.stream_arg()))
        return out

    def set_params(self, flat) -> None:
        """Replaces every weight from the flat float32 vector `[n]` (optimiser moments and
        step untouched). NaN or Inf anywhere raises `BridgeError` with nothing changed."""
        with self._call() as call:
            _, t = self._flat(call, flat, "params", writable=False)
            _check(L.lib().bridge_set_params_dlpack(self._handle(), t.ref, call.stream_arg()))

    def loss_grads(self, latents, targets, seed: int, *, grad_params=None, grad_latents=None,
                   want_latents: bool = False, loss_out=None):
        """A training-mode forward (dropout masks from `seed`), the training loss (the
        bridge's `w_*`) against `targets` and its gradient; nothing is updated. Returns
        `(loss, grad_params, grad_latents)`: the loss a float (or `loss_out`, one element,
        written in place), the flat float32 gradient `[n]` (into `grad_params` when given),
        the latents' gradient (into `grad_latents`, or made when `want_latents`; else
        None). A non-finite loss is returned as it is (no error)."""
        with self._call() as call:
            lat, tgt, (grad_params, gp), (grad_latents, gl) = self._gradient_args(
                call, latents, targets, "targets", grad_params, grad_latents, want_latents)
            loss = _Tensor.host_scalar("loss") if loss_out is None else call.arg(loss_out, "loss_out", writable=True,
                                                                                  host_ok=True)
            if math.prod(loss.shape) != 1:
                raise ValueError(f"loss_out: shape {list(loss.shape)}, expected one element")
            _check(L.lib().bridge_loss_grads_dlpack(self._handle(), lat.ref, tgt.ref, gp.ref,
                                                    gl.ref if gl is not None else None, loss.ref,
                                                    ctypes.c_uint64(seed % 2**64), call.stream_arg()))
        return (loss.value() if loss_out is None else loss_out), grad_params, grad_latents

    def _gradient_args(self, call: _Call, latents, tokens, name: str, grad_params, grad_latents, want: bool):
        """What `loss_grads` and `vjp` take: the latents, a token tensor on their grid
        (`name`: targets or grad_out), the flat gradient output and the latents' (or
        None), each as (array, descriptor)."""
        lat = call.arg(latents, "latents")
        tok = call.arg(tokens, name)
        b, grid = self._latents(lat)
        self._expect(tok, name, self._tokens(grid), b, self._tokens_why(b, grid, "the latents' token grid"))
        return (lat, tok, self._flat(call, grad_params, "grad_params", lat),
                self._latent_grad(call, lat, grad_latents, want))

    def _latent_grad(self, call: _Call, lat: _Tensor, grad_latents, want: bool):
        if grad_latents is None and not want:
            return None, None
        if grad_latents is None:
            grad_latents = self._empty_f32(call, lat, lat.shape)
        g = call.arg(grad_latents, "grad_latents", writable=True)
        if g.shape != lat.shape:
            raise ValueError(f"grad_latents: shape {list(g.shape)}, expected the latents' {list(lat.shape)}")
        return grad_latents, g

    def forward_train(self, latents, seed: int, out=None):
        """Tokens `[B, h*w, target_dim]` in training mode, dropout masks from `seed` (the
        same seed gives `vjp` the same masks)."""
        with self._call() as call:
            lat = call.arg(latents, "latents")
            b, grid = self._latents(lat)
            if out is None:
                out = self._empty_f32(call, lat, (b,) + self._tokens(grid))
            o = call.arg(out, "out", writable=True)
            self._expect(o, "out", self._tokens(grid), b, self._tokens_why(b, grid, "the latents' token grid"))
            _check(L.lib().bridge_forward_train_dlpack(self._handle(), lat.ref, o.ref, ctypes.c_uint64(seed % 2**64),
                                                       call.stream_arg()))
        return out

    def vjp(self, latents, grad_out, seed: int, *, grad_params=None, grad_latents=None, want_latents: bool = False):
        """The vector-Jacobian product of `forward_train(latents, seed)` with the cotangent
        `grad_out` `[B, h*w, target_dim]`: `(grad_params, grad_latents)` as in
        `loss_grads`."""
        with self._call() as call:
            lat, g, (grad_params, gp), (grad_latents, gl) = self._gradient_args(
                call, latents, grad_out, "grad_out", grad_params, grad_latents, want_latents)
            _check(L.lib().bridge_vjp_dlpack(self._handle(), lat.ref, g.ref, gp.ref, gl.ref if gl is not None else None,
                                             ctypes.c_uint64(seed % 2**64), call.stream_arg()))
        return grad_params, grad_latents

    def apply_grads(self, grad_params) -> dict:
        """One step of the bridge's AdamW (schedule, clipping; a non-finite gradient skips
        it) with the flat gradient `[n]` (e.g. after the host's all-reduce). Returns the
        stats of `train_step` (`loss` is 0: the host has it)."""
        with self._call() as call:
            _, g = self._flat(call, grad_params, "grad_params", writable=False)
            stats = L.BridgeStepStats()
            stats.struct_size = ctypes.sizeof(L.BridgeStepStats)
            _check(L.lib().bridge_apply_grads_dlpack(self._handle(), g.ref, ctypes.byref(stats), call.stream_arg()))
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr, "step": stats.step,
                "skipped": bool(stats.skipped)}

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint write (weights, optimiser state, train state)."""
        _check(L.lib().bridge_save(self._handle(), str(path).encode()))


def _grid_pair(grid) -> Tuple[int, int]:
    """A caller grid: an integer (square) or a pair of integers (ph, pw). Nothing else is
    taken (a string or floats would turn into a grid silently)."""
    if isinstance(grid, numbers.Integral):
        return (int(grid), int(grid))
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, numbers.Integral) for g in grid):
        return (int(grid[0]), int(grid[1]))
    raise ValueError(f"grid={grid!r}: expected (ph, pw), the caller's token grid")
