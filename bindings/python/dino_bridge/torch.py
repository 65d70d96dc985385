"""PyTorch: REPA alignment as a loss module, built on `torch.library` custom ops.

    align = AlignLoss(Bridge(adapter_depth=1, grid=16))     # or AlignLoss("bridge.safetensors")
    loss = diffusion_loss + lam * align(projector(h), latents)
    loss.backward()                      # the bridge's gradient flows into the projector

`pred` is the projector's output `[B, ph*pw, D]` on the caller's token grid `(ph, pw)`
(16x16 for SiT/2 on 32x32 latents); `latents` `[B, C, H, W]` give the bridge's grid
`(h, w) = (H, W) / 2^adapter_depth` (8x8 for the published bridge, 16x16 for `repa`).
The caller grid must equal the bridge's, or be `k` times it (pred is average-pooled to it
inside the library and the gradient spread back to all `ph*pw` tokens), or `1/k` of it
(the bridge's target is pooled instead). Pass it as `grid=(ph, pw)`, or leave it out: it
is inferred from the token count when exactly one grid fits. The bridge itself is frozen.

The loss is alignment's (`align_w_*` of the Bridge): REPA's cosine loss `mean(1 - cos)`
by default, so `AlignLoss` is REPA's projection loss (REPA logs `mean(-cos)`, one less:
`AlignLoss.repa_logged(loss)`). The bridge's own training loss (`w_*`) is another.
`reduction="mean" | "sum" | "none"` as in torch (`"none"`: each sample's loss, `[B]`, for
timestep weighting or masking, each with its gradient).

Non-finite input: on the CPU the library checks pred, latents and the loss and raises
`BridgeError` (`NON_FINITE`) by default (`nonfinite="raise"`); `nonfinite="propagate"`
returns a NaN loss and a NaN gradient instead, so that a `GradScaler`, which checks the
gradients of the optimiser's parameters, skips the step as it would in pure torch. On a
GPU nothing is checked (that would need a host sync): a non-finite input propagates. Loss
scaling cures an overflow in the backward, not one in the forward (an `inf` in `pred`).

The losses are the custom ops `torch.ops.dino_bridge.align_loss` and
`torch.ops.dino_bridge.latent_loss` (`torch.library.custom_op`, with `register_fake` and
`register_autograd`), so `torch.compile(fullgraph=True)` traces a training step through
them without a graph break. Each op computes the loss and its gradient in one library call
and saves the gradient for backward. Each tensor reaches the library in its own dtype:
under `torch.autocast` a bf16 `pred` is read as bf16 and f32 latents as f32 (the bridge's
target is not rounded). The loss is a float32 tensor on pred's device, written by the
library there (on a GPU with no host sync).
"""

import itertools
import threading
import weakref
from typing import List, Tuple

import torch

from .bridge import Bridge, BridgeError, _grid_pair

# The ops take a bridge as an integer key (custom ops take tensors and plain values only);
# the registry holds the Bridge weakly: an AlignLoss/LatentLoss keeps its own reference.
_BRIDGES: "weakref.WeakValueDictionary[int, Bridge]" = weakref.WeakValueDictionary()
_KEYS: "weakref.WeakKeyDictionary[Bridge, int]" = weakref.WeakKeyDictionary()
_NEXT = itertools.count(1)
_LOCK = threading.Lock()


def bridge_key(bridge: Bridge) -> int:
    """The integer the custom ops name `bridge` by (the same for the life of the Bridge)."""
    with _LOCK:
        key = _KEYS.get(bridge)
        if key is None:
            key = next(_NEXT)
            _KEYS[bridge], _BRIDGES[key] = key, bridge
        return key


def _bridge(key: int) -> Bridge:
    b = _BRIDGES.get(key)
    if b is None:
        raise ValueError(f"dino_bridge: no live Bridge has key {key} (it was garbage-collected)")
    return b


def _as_bridge(bridge_or_path, **kwargs) -> Bridge:
    return bridge_or_path if isinstance(bridge_or_path, Bridge) else Bridge(bridge_or_path, **kwargs)


def _grid_list(grid) -> List[int]:
    """`grid` as the op's `int[]`: [] (inferred), or [ph, pw]."""
    return [] if grid is None else list(_grid_pair(grid))


# -- the ops -----------------------------------------------------------------------------------


def _loss_buffer(like: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Where the library writes the loss: 0-d (the mean) or `[B]` (each sample's)."""
    shape = (like.shape[0],) if per_sample else ()
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _non_finite(e: Exception, propagate: bool) -> bool:
    """Whether `e` is the library's NON_FINITE and the caller asked for NaN instead."""
    return propagate and isinstance(e, BridgeError) and e.status_name == "NON_FINITE"


@torch.library.custom_op("dino_bridge::align_loss", mutates_args=())
def align_loss(pred: torch.Tensor, latents: torch.Tensor, bridge: int, grid: List[int], per_sample: bool,
               propagate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """REPA alignment of `pred` `[B, ph*pw, D]` to the frozen bridge's tokens for `latents`:
    `(loss, d mean-loss / d pred)`, the loss a float32 tensor on pred's device (0-d, or
    `[B]` with `per_sample`), the gradient of pred's shape and dtype. `grid` is `[ph, pw]`,
    or `[]` to infer it. `propagate`: a non-finite input or loss gives NaN, not an error."""
    loss = _loss_buffer(pred, per_sample)
    try:
        _, grad = _bridge(bridge).loss_backward(pred.detach().contiguous(), latents.detach().contiguous(),
                                                grid=tuple(grid) if grid else None, loss_out=loss)
    except BridgeError as e:
        if not _non_finite(e, propagate):
            raise
        return loss.fill_(float("nan")), torch.full_like(pred, float("nan"))
    return loss, grad


@align_loss.register_fake
def _(pred, latents, bridge, grid, per_sample, propagate):
    shape = (pred.shape[0],) if per_sample else ()
    return pred.new_empty(shape, dtype=torch.float32), pred.new_empty(pred.shape)


@torch.library.custom_op("dino_bridge::latent_loss", mutates_args=())
def latent_loss(latents: torch.Tensor, target: torch.Tensor, bridge: int, per_sample: bool,
                propagate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss between bridge(`latents`) and `target` `[B, h*w, D]`, and the gradient of
    its mean with respect to the latents: `(loss, grad_latents)`, as in `align_loss`."""
    loss = _loss_buffer(latents, per_sample)
    try:
        _, grad = _bridge(bridge).latent_loss_backward(latents.detach().contiguous(), target.detach().contiguous(),
                                                       loss_out=loss)
    except BridgeError as e:
        if not _non_finite(e, propagate):
            raise
        return loss.fill_(float("nan")), torch.full_like(latents, float("nan"))
    return loss, grad


@latent_loss.register_fake
def _(latents, target, bridge, per_sample, propagate):
    shape = (latents.shape[0],) if per_sample else ()
    return latents.new_empty(shape, dtype=torch.float32), latents.new_empty(latents.shape)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The gradient of `sum(grad_loss * loss)` from the gradient of the mean loss: a 0-d
    loss scales it; a per-sample loss `[B]` weighs each sample's part, `B * grad[b]` (each
    sample's loss reaches only its own slice of the input)."""
    grad_loss = grad_loss.to(grad.dtype)
    if grad_loss.dim() == 0:
        return grad * grad_loss
    weights = grad_loss * grad.shape[0]
    return grad * weights.reshape((-1,) + (1,) * (grad.dim() - 1))


def _align_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The bridge is frozen and its target a constant: no gradient for latents.
    return _scaled(grad, grad_loss), None, None, None, None, None


def _latent_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The library gives no gradient for the target (a constant in DESIGN.md's use).
    return _scaled(grad, grad_loss), None, None, None, None


align_loss.register_autograd(_align_backward, setup_context=_setup_context)
latent_loss.register_autograd(_latent_backward, setup_context=_setup_context)


# -- the modules -------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")
_NONFINITE = ("raise", "propagate")


def _choice(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")
    return value


def _tensor(name: str, x, module: str) -> torch.Tensor:
    """`x` as the torch tensor a module takes; anything else is a one-line TypeError (no
    dump of the values). A list of one projection (REPA keeps one per encoder in
    `zs_tilde`) is taken as that projection."""
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], torch.Tensor):
            return x[0]
        kinds = ", ".join(type(v).__name__ for v in x[:4]) + (", ..." if len(x) > 4 else "")
        raise TypeError(f"{module}: {name} is a {type(x).__name__} of {len(x)} ({kinds}); a bridge stands for one "
                        f"encoder: pass one tensor (e.g. zs_tilde[0]), or one {module} per encoder")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: {name} is a {type(x).__module__}.{type(x).__name__}; it takes torch tensors "
                        f"(Bridge.loss_backward and latent_loss_backward take numpy and other DLPack arrays)")
    return x


def _reduce(loss: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    """The library's mean (0-d) or per-sample loss (`[B]`) as `reduction` asks."""
    return loss * batch if reduction == "sum" else loss


class AlignLoss(torch.nn.Module):
    """`loss = AlignLoss(bridge)(pred, latents)`: REPA alignment of `pred` `[B, ph*pw, D]`
    to the frozen bridge's tokens for `latents` `[B, C, H, W]` (the clean latents, as the
    diffusion model's target sees them); differentiable in `pred`.

    The loss is alignment's (`align_w_*` of the Bridge): REPA's `mean(1 - cos)` by default
    (`repa_logged(loss)` gives what REPA logs, `mean(-cos)`). `reduction` = "mean" (the
    default), "sum" or "none" (each sample's loss, `[B]`). `nonfinite` = "raise" (the
    default: NaN or Inf in the inputs or the loss raise `BridgeError` on the CPU) or
    "propagate" (a NaN loss and gradient, for `GradScaler` to skip the step).

    `pred_grid=(ph, pw)` fixes the caller's token grid for every call (a call's own
    `grid=` overrides it); without either, it is inferred per call from the token count
    and the latents' size. Other keyword arguments go to `Bridge(...)` when `bridge` is a
    path (e.g. `align_w_gram`, `spatial_norm_gamma`)."""

    def __init__(self, bridge, pred_grid=None, *, reduction: str = "mean", nonfinite: str = "raise", **kwargs):
        super().__init__()
        self.reduction = _choice("reduction", reduction, _REDUCTIONS)
        self.nonfinite = _choice("nonfinite", nonfinite, _NONFINITE)
        self.bridge = _as_bridge(bridge, **kwargs)
        self.pred_grid = pred_grid
        self._key = bridge_key(self.bridge)

    def forward(self, pred: torch.Tensor, latents: torch.Tensor, grid=None) -> torch.Tensor:
        pred = _tensor("pred", pred, "AlignLoss")
        latents = _tensor("latents", latents, "AlignLoss")
        grid = self.pred_grid if grid is None else grid
        loss, _ = torch.ops.dino_bridge.align_loss(pred, latents, self._key, _grid_list(grid),
                                                   self.reduction == "none", self.nonfinite == "propagate")
        return _reduce(loss, self.reduction, pred.shape[0])

    def repa_logged(self, loss: torch.Tensor) -> torch.Tensor:
        """What REPA logs as `proj_loss` for a loss of this module: `mean(-cos)`, which is
        `loss - 1` (for "mean", and per sample for "none"). Only for REPA's weights (the
        default) and those two reductions."""
        w = self.bridge.settings()
        if (w["align_w_cos"], w["align_w_norm"], w["align_w_raw"], w["align_w_gram"]) != (1.0, 0.0, 0.0, 0.0):
            raise ValueError("repa_logged: this bridge's alignment is not REPA's cosine loss (align_w_* are not "
                             "1, 0, 0, 0)")
        if self.reduction == "sum":
            raise ValueError("repa_logged: REPA logs a mean; use reduction 'mean' or 'none'")
        return loss - 1.0


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents `[B, C, H, W]` against `target` `[B, h*w, D]` on their token grid,
    differentiable in `latents` through the frozen bridge, with alignment's weights.
    `reduction` and `nonfinite` as in `AlignLoss`."""

    def __init__(self, bridge, *, reduction: str = "mean", nonfinite: str = "raise", **kwargs):
        super().__init__()
        self.reduction = _choice("reduction", reduction, _REDUCTIONS)
        self.nonfinite = _choice("nonfinite", nonfinite, _NONFINITE)
        self.bridge = _as_bridge(bridge, **kwargs)
        self._key = bridge_key(self.bridge)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        latents = _tensor("latents", latents, "LatentLoss")
        target = _tensor("target", target, "LatentLoss")
        loss, _ = torch.ops.dino_bridge.latent_loss(latents, target, self._key, self.reduction == "none",
                                                    self.nonfinite == "propagate")
        return _reduce(loss, self.reduction, latents.shape[0])
