"""`Bridge`: a loaded dino-bridge model, used from numpy arrays or torch tensors.

Latents are `[B, C, H, W]` with `H, W` any positive multiples of `2^adapter_depth`; tokens
come out `[B, h*w, D]` on the token grid `(h, w) = (H, W) / 2^adapter_depth` (row-major).
Every array is checked (container, dtype, shape, C-contiguity, device) before anything
reaches C, and is passed by pointer without a copy when it already fits. Errors from the
library raise `BridgeError` with the status name and the library's message.
"""

from __future__ import annotations

import ctypes
import math
import numbers
from pathlib import Path
from typing import Optional, Tuple

from . import _lib as L

_CONFIG_FIELDS = (
    "in_ch", "latent_size", "grid", "target_dim", "adapter_mid_channels", "adapter_out_channels",
    "adapter_depth", "width", "depth", "heads", "mlp_ratio", "dropout", "latent_shift", "latent_scale",
)
_SETTINGS = ("w_cos", "w_norm", "w_raw", "w_gram", "spatial_norm_gamma", "lr", "weight_decay", "beta1", "beta2",
             "eps", "grad_clip", "warmup_steps", "total_steps")


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

    def _latents(self, buf: _Buffer, name: str = "latents", batch: int | None = None):
        """(batch, height, width, token grid) of latents `[B, in_ch, H, W]`."""
        shape, c = buf.shape, self._info["in_ch"]
        if len(shape) != 4 or shape[1] != c or shape[0] < 1 or (batch is not None and shape[0] != batch):
            b = batch if batch is not None else "B"
            raise ValueError(f"{name}: shape {list(shape)}, expected [{b}, {c}, H, W]")
        b, _, height, width = shape
        return b, height, width, self.token_grid(height, width)

    def _tokens(self, grid: Tuple[int, int]) -> tuple:
        return (grid[0] * grid[1], self._info["target_dim"])

    def _caller_grid(self, pred: _Buffer, grid, bridge_grid: Tuple[int, int]) -> Tuple[int, int]:
        """The caller grid of `pred`: `grid` checked against the bridge grid, or inferred."""
        if len(pred.shape) != 3:
            raise ValueError(f"pred: shape {list(pred.shape)}, expected [B, ph*pw, {self._info['target_dim']}]")
        if grid is None:
            return infer_caller_grid(pred.shape[1], bridge_grid)
        if isinstance(grid, numbers.Integral):
            grid = (grid, grid)
        try:
            ph, pw = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid={grid!r}: expected (ph, pw), the caller's token grid") from None
        if grid_match((ph, pw), bridge_grid) is None:
            h, w = bridge_grid
            raise ValueError(
                f"grid=({ph}, {pw}): the caller grid must equal the bridge's token grid {h}x{w} for these "
                f"latents, or be k times it or 1/k of it with the same k on both sides"
            )
        return (ph, pw)

    def _stream(self, buf: _Buffer):
        if buf.device == "cpu":
            return None
        import torch

        return ctypes.c_void_p(torch.cuda.current_stream(buf.obj.device).cuda_stream)

    # -- compute ---------------------------------------------------------------------
    def forward(self, latents, out=None):
        """DINOv2 tokens `[B, h*w, target_dim]` for latents `[B, C, H, W]`, on the token grid
        `(h, w) = (H, W) / 2^adapter_depth` (same kind, dtype and device as `latents`;
        written into `out` when given)."""
        bufs = self._args(latents=latents, **({} if out is None else {"out": out}))
        lat = bufs["latents"]
        b, height, width, grid = self._latents(lat)
        if out is None:
            out = lat.empty((b,) + self._tokens(grid))
            o = _Buffer(out, "out")
        else:
            o = bufs["out"]
            self._expect(o, "out", self._tokens(grid), b)
        lib = L.lib()
        if lat.device == "cpu":
            _check(lib.bridge_forward(self._handle(), lat.ptr, o.ptr, b, height, width, lat.code))
        else:
            _check(lib.bridge_forward_cuda_ptr(self._handle(), lat.ptr, o.ptr, b, height, width, lat.code,
                                               self._stream(lat)))
        return out

    def loss_backward(self, pred, latents, grid=None, *, grad_out=None):
        """REPA alignment against the frozen bridge. `pred` `[B, ph*pw, target_dim]` is the
        caller's projection on its token grid `grid = (ph, pw)`; the bridge's grid for
        `latents` `[B, C, H, W]` is `(h, w) = (H, W) / 2^adapter_depth`, and `(ph, pw)` must
        equal it, or be `k` times it (pred pooled `k x k`), or `1/k` of it (target pooled).
        Without `grid` it is inferred from the token count (the one grid that fits; e.g.
        240 tokens on a 6x10 bridge grid are 12x20). Returns `(loss, d loss / d pred)`."""
        arrays = {"pred": pred, "latents": latents}
        if grad_out is not None:
            arrays["grad_out"] = grad_out
        bufs = self._args(**arrays)
        p = bufs["pred"]
        b, height, width, bridge_grid = self._latents(bufs["latents"])
        ph, pw = self._caller_grid(p, grid, bridge_grid)
        self._expect(p, "pred", self._tokens((ph, pw)), b)
        if grad_out is None:
            grad_out = p.empty(p.shape)
            go = _Buffer(grad_out, "grad_out")
        else:
            go = bufs["grad_out"]
            self._expect(go, "grad_out", self._tokens((ph, pw)), b)
        loss = ctypes.c_float()
        _check(L.lib().bridge_loss_backward(self._handle(), p.ptr, bufs["latents"].ptr, go.ptr, b, height, width,
                                            ph, pw, p.code, ctypes.byref(loss), self._stream(p)))
        return loss.value, grad_out

    def latent_loss_backward(self, latents, target, grad_out=None):
        """Loss between bridge(latents) and `target` `[B, h*w, target_dim]` (the token grid
        of the latents' size), and its gradient with respect to the latents. Returns
        `(loss, grad_latents)`."""
        arrays = {"latents": latents, "target": target}
        if grad_out is not None:
            arrays["grad_out"] = grad_out
        bufs = self._args(**arrays)
        lat = bufs["latents"]
        b, height, width, grid = self._latents(lat)
        self._expect(bufs["target"], "target", self._tokens(grid), b)
        if grad_out is None:
            grad_out = lat.empty(lat.shape)
            go = _Buffer(grad_out, "grad_out")
        else:
            go = bufs["grad_out"]
            self._expect(go, "grad_out", lat.shape[1:], b)
        loss = ctypes.c_float()
        _check(L.lib().bridge_latent_loss_backward(self._handle(), lat.ptr, bufs["target"].ptr, go.ptr, b, height,
                                                   width, lat.code, ctypes.byref(loss), self._stream(lat)))
        return loss.value, grad_out

    def train_step(self, latents, targets) -> dict:
        """One AdamW step on the bridge's weights: latents `[B, C, H, W]`, targets
        `[B, h*w, target_dim]` on their token grid. Returns loss, grad_norm, lr, step and
        skipped (True when a non-finite loss or gradient skipped the update)."""
        bufs = self._args(latents=latents, targets=targets)
        lat = bufs["latents"]
        b, height, width, grid = self._latents(lat)
        self._expect(bufs["targets"], "targets", self._tokens(grid), b)
        stats = L.BridgeStepStats()
        stats.struct_size = ctypes.sizeof(L.BridgeStepStats)
        _check(L.lib().bridge_train_step(self._handle(), lat.ptr, bufs["targets"].ptr, b, height, width, lat.code,
                                         ctypes.byref(stats), self._stream(lat)))
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr, "step": stats.step,
                "skipped": bool(stats.skipped)}

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint write (weights, optimiser state, train state)."""
        _check(L.lib().bridge_save(self._handle(), str(path).encode()))
