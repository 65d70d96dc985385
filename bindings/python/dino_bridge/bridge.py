"""`Bridge`: a loaded dino-bridge model, used from numpy arrays or torch tensors.

Every array is checked (container, dtype, shape, C-contiguity, device) before anything
reaches C, and is passed by pointer without a copy when it already fits. Errors from the
library raise `BridgeError` with the status name and the library's message.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

from . import _lib as L

_CONFIG_FIELDS = (
    "in_ch", "latent_size", "grid", "target_dim", "adapter_mid_channels", "adapter_out_channels",
    "adapter_depth", "width", "depth", "heads", "mlp_ratio", "dropout", "latent_shift", "latent_scale",
)
_SETTINGS = ("w_cos", "w_norm", "w_raw", "lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
             "warmup_steps", "total_steps")


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


class _Buffer:
    """A caller array as the C API sees it: pointer, dtype code, shape, device."""

    __slots__ = ("obj", "ptr", "code", "shape", "kind", "device")

    def __init__(self, obj, name: str):
        self.obj = obj
        mod = type(obj).__module__.split(".")[0]
        if mod == "numpy":
            import numpy as np

            codes = {np.dtype(np.float32): L.DTYPE_F32, np.dtype(np.float16): L.DTYPE_F16}
            if obj.dtype not in codes:
                raise ValueError(f"{name}: dtype {obj.dtype} is not supported (float32 or float16; bfloat16 via torch)")
            if not obj.flags["C_CONTIGUOUS"]:
                raise ValueError(f"{name}: array is not C-contiguous (use numpy.ascontiguousarray)")
            self.ptr, self.code, self.kind, self.device = obj.ctypes.data, codes[obj.dtype], "numpy", "cpu"
        elif mod == "torch":
            import torch

            codes = {torch.float32: L.DTYPE_F32, torch.float16: L.DTYPE_F16, torch.bfloat16: L.DTYPE_BF16}
            if obj.dtype not in codes:
                raise ValueError(f"{name}: dtype {obj.dtype} is not supported (float32, float16 or bfloat16)")
            if obj.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name}: device {obj.device} is not supported (cpu or cuda)")
            if not obj.is_contiguous():
                raise ValueError(f"{name}: tensor is not contiguous (call .contiguous())")
            self.ptr, self.code, self.kind = obj.data_ptr(), codes[obj.dtype], "torch"
            self.device = "cpu" if obj.device.type == "cpu" else f"cuda:{obj.device.index or 0}"
        else:
            raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(obj).__name__}")
        self.shape = tuple(obj.shape)

    def empty(self, shape):
        """A new output array of the same kind, dtype and device."""
        if self.kind == "numpy":
            import numpy as np

            return np.empty(shape, dtype=self.obj.dtype)
        import torch

        return torch.empty(shape, dtype=self.obj.dtype, device=self.obj.device)


class Bridge:
    """A dino-bridge model: `Bridge(checkpoint)` loads a `.safetensors`/`.pt` file,
    `Bridge()` makes fresh weights (config fields as keyword arguments)."""

    def __init__(self, checkpoint: str | Path | None = None, *, device: int = -1, compute_dtype: str = "f32",
                 seed: int = 0, **settings):
        lib = L.lib()
        p = L.BridgeParams()
        p.struct_size = ctypes.sizeof(L.BridgeParams)
        _check(lib.bridge_params_default(ctypes.byref(p)))
        for key, value in settings.items():
            if key not in _CONFIG_FIELDS and key not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(_CONFIG_FIELDS + _SETTINGS)}")
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

    @property
    def device(self) -> str:
        d = self._info["device"]
        return "cpu" if d < 0 else f"cuda:{d}"

    # -- argument checks -------------------------------------------------------------
    def _args(self, **arrays):
        bufs = {name: _Buffer(a, name) for name, a in arrays.items()}
        first = next(iter(bufs.values()))
        for name, b in bufs.items():
            if b.code != first.code or b.kind != first.kind:
                raise ValueError(f"{name}: dtype {b.obj.dtype} differs from the other inputs' {first.obj.dtype}")
            if b.device != self.device:
                raise ValueError(f"{name} is on {b.device} but the bridge is on {self.device}")
        return bufs

    def _expect(self, buf: _Buffer, name: str, tail: tuple, batch: int | None = None) -> int:
        shape = buf.shape
        if len(shape) != len(tail) + 1 or shape[1:] != tail or shape[0] < 1 or (batch is not None and shape[0] != batch):
            want = f"[{batch if batch is not None else 'B'}, {', '.join(map(str, tail))}]"
            raise ValueError(f"{name}: shape {list(shape)}, expected {want}")
        return shape[0]

    def _latent_shape(self):
        i = self._info
        return (i["in_ch"], i["latent_size"], i["latent_size"])

    def _token_shape(self, grid=None):
        g = grid or self._info["grid"]
        return (g * g, self._info["target_dim"])

    def _stream(self, buf: _Buffer):
        if buf.device == "cpu":
            return None
        import torch

        return ctypes.c_void_p(torch.cuda.current_stream(buf.obj.device).cuda_stream)

    # -- compute ---------------------------------------------------------------------
    def forward(self, latents, out=None):
        """DINOv2 tokens [B, grid^2, target_dim] for latents [B, C, L, L] (same kind, dtype
        and device as `latents`; written into `out` when given)."""
        bufs = self._args(latents=latents, **({} if out is None else {"out": out}))
        lat = bufs["latents"]
        b = self._expect(lat, "latents", self._latent_shape())
        if out is None:
            out = lat.empty((b,) + self._token_shape())
            o = _Buffer(out, "out")
        else:
            o = bufs["out"]
            self._expect(o, "out", self._token_shape(), b)
        lib = L.lib()
        if lat.device == "cpu":
            _check(lib.bridge_forward(self._handle(), lat.ptr, o.ptr, b, lat.code))
        else:
            _check(lib.bridge_forward_cuda_ptr(self._handle(), lat.ptr, o.ptr, b, lat.code, self._stream(lat)))
        return out

    def loss_backward(self, pred, latents, grad_out=None):
        """REPA alignment against the frozen bridge: `pred` [B, g*g, target_dim] with g a
        multiple of the bridge grid (pooled to it). Returns (loss, d loss / d pred)."""
        arrays = {"pred": pred, "latents": latents}
        if grad_out is not None:
            arrays["grad_out"] = grad_out
        bufs = self._args(**arrays)
        b = self._expect(bufs["latents"], "latents", self._latent_shape())
        p = bufs["pred"]
        tokens = p.shape[1] if len(p.shape) == 3 else 0
        g = math.isqrt(tokens)
        grid = self._info["grid"]
        if g * g != tokens or g == 0 or g % grid:
            raise ValueError(f"pred: {tokens} tokens is not a g x g grid with g a multiple of {grid}")
        self._expect(p, "pred", self._token_shape(g), b)
        if grad_out is None:
            grad_out = p.empty(p.shape)
            go = _Buffer(grad_out, "grad_out")
        else:
            go = bufs["grad_out"]
            self._expect(go, "grad_out", self._token_shape(g), b)
        loss = ctypes.c_float()
        _check(L.lib().bridge_loss_backward(self._handle(), p.ptr, bufs["latents"].ptr, go.ptr, b, g, p.code,
                                            ctypes.byref(loss), self._stream(p)))
        return loss.value, grad_out

    def latent_loss_backward(self, latents, target, grad_out=None):
        """Loss between bridge(latents) and `target` [B, grid^2, target_dim], and its
        gradient with respect to the latents. Returns (loss, grad_latents)."""
        arrays = {"latents": latents, "target": target}
        if grad_out is not None:
            arrays["grad_out"] = grad_out
        bufs = self._args(**arrays)
        lat = bufs["latents"]
        b = self._expect(lat, "latents", self._latent_shape())
        self._expect(bufs["target"], "target", self._token_shape(), b)
        if grad_out is None:
            grad_out = lat.empty(lat.shape)
            go = _Buffer(grad_out, "grad_out")
        else:
            go = bufs["grad_out"]
            self._expect(go, "grad_out", self._latent_shape(), b)
        loss = ctypes.c_float()
        _check(L.lib().bridge_latent_loss_backward(self._handle(), lat.ptr, bufs["target"].ptr, go.ptr, b, lat.code,
                                                   ctypes.byref(loss), self._stream(lat)))
        return loss.value, grad_out

    def train_step(self, latents, targets) -> dict:
        """One AdamW step on the bridge's weights. Returns loss, grad_norm, lr, step and
        skipped (True when a non-finite loss or gradient skipped the update)."""
        bufs = self._args(latents=latents, targets=targets)
        lat = bufs["latents"]
        b = self._expect(lat, "latents", self._latent_shape())
        self._expect(bufs["targets"], "targets", self._token_shape(), b)
        stats = L.BridgeStepStats()
        stats.struct_size = ctypes.sizeof(L.BridgeStepStats)
        _check(L.lib().bridge_train_step(self._handle(), lat.ptr, bufs["targets"].ptr, b, lat.code,
                                         ctypes.byref(stats), self._stream(lat)))
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr, "step": stats.step,
                "skipped": bool(stats.skipped)}

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint write (weights, optimiser state, train state)."""
        _check(L.lib().bridge_save(self._handle(), str(path).encode()))
