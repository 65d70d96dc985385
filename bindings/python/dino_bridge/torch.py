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

The losses are the custom ops `torch.ops.dino_bridge.align_loss` and
`torch.ops.dino_bridge.latent_loss` (`torch.library.custom_op`, with `register_fake` and
`register_autograd`), so `torch.compile(fullgraph=True)` traces a training step through
them without a graph break. Each op computes the loss and its gradient in one library call
and saves the gradient for backward. Each tensor reaches the library in its own dtype:
under `torch.autocast` a bf16 `pred` is read as bf16 and f32 latents as f32 (the bridge's
target is not rounded). The loss is a 0-d float32 tensor on pred's device, written by the
library there (on a GPU with no host sync).
"""

import itertools
import threading
import weakref
from typing import List, Tuple

import torch

from .bridge import Bridge, _grid_pair

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


@torch.library.custom_op("dino_bridge::align_loss", mutates_args=())
def align_loss(pred: torch.Tensor, latents: torch.Tensor, bridge: int, grid: List[int]) -> Tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """REPA alignment of `pred` `[B, ph*pw, D]` to the frozen bridge's tokens for `latents`:
    `(loss, d loss / d pred)`, the loss a 0-d float32 tensor on pred's device, the gradient
    of pred's shape and dtype. `grid` is `[ph, pw]`, or `[]` to infer it."""
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    _, grad = _bridge(bridge).loss_backward(pred.detach().contiguous(), latents.detach().contiguous(),
                                            grid=tuple(grid) if grid else None, loss_out=loss)
    return loss, grad


@align_loss.register_fake
def _(pred, latents, bridge, grid):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape)


@torch.library.custom_op("dino_bridge::latent_loss", mutates_args=())
def latent_loss(latents: torch.Tensor, target: torch.Tensor, bridge: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss between bridge(`latents`) and `target` `[B, h*w, D]`, and its gradient with
    respect to the latents: `(loss, grad_latents)`."""
    loss = torch.empty((), dtype=torch.float32, device=latents.device)
    _, grad = _bridge(bridge).latent_loss_backward(latents.detach().contiguous(), target.detach().contiguous(),
                                                   loss_out=loss)
    return loss, grad


@latent_loss.register_fake
def _(latents, target, bridge):
    return latents.new_empty((), dtype=torch.float32), latents.new_empty(latents.shape)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _align_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The bridge is frozen and its target a constant: no gradient for latents.
    return grad * grad_loss.to(grad.dtype), None, None, None


def _latent_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The library gives no gradient for the target (a constant in DESIGN.md's use).
    return grad * grad_loss.to(grad.dtype), None, None


align_loss.register_autograd(_align_backward, setup_context=_setup_context)
latent_loss.register_autograd(_latent_backward, setup_context=_setup_context)


# -- the modules -------------------------------------------------------------------------------


class AlignLoss(torch.nn.Module):
    """`loss = AlignLoss(bridge)(pred, latents)`: REPA alignment of `pred` `[B, ph*pw, D]`
    to the frozen bridge's tokens for `latents` `[B, C, H, W]`; differentiable in `pred`.

    `pred_grid=(ph, pw)` fixes the caller's token grid for every call (a call's own
    `grid=` overrides it); without either, it is inferred per call from the token count
    and the latents' size. Other keyword arguments go to `Bridge(...)` when `bridge` is a
    path (e.g. `w_gram`, `spatial_norm_gamma`, or the loss weights)."""

    def __init__(self, bridge, pred_grid=None, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)
        self.pred_grid = pred_grid
        self._key = bridge_key(self.bridge)

    def forward(self, pred: torch.Tensor, latents: torch.Tensor, grid=None) -> torch.Tensor:
        grid = self.pred_grid if grid is None else grid
        loss, _ = torch.ops.dino_bridge.align_loss(pred, latents, self._key, _grid_list(grid))
        return loss


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents `[B, C, H, W]` against `target` `[B, h*w, D]` on their token grid,
    differentiable in `latents` through the frozen bridge."""

    def __init__(self, bridge, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)
        self._key = bridge_key(self.bridge)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, _ = torch.ops.dino_bridge.latent_loss(latents, target, self._key)
        return loss
