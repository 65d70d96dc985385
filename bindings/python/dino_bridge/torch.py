"""PyTorch autograd wrappers: REPA alignment as a loss module.

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
"""

from __future__ import annotations

import functools

import torch

from .bridge import Bridge


def _as_bridge(bridge_or_path, **kwargs) -> Bridge:
    return bridge_or_path if isinstance(bridge_or_path, Bridge) else Bridge(bridge_or_path, **kwargs)


class _BridgeLoss(torch.autograd.Function):
    """A loss the library computes together with its gradient for the first input:
    `call(x, other) -> (loss, grad_x)`. The library reads every buffer in one dtype, so
    `other` follows `x`'s."""

    @staticmethod
    def forward(ctx, x, other, call):
        xc = x.detach().contiguous()
        loss, grad = call(xc, other.detach().to(dtype=xc.dtype).contiguous())
        ctx.save_for_backward(grad)
        return torch.tensor(loss, dtype=torch.float32, device=x.device)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


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

    def forward(self, pred: torch.Tensor, latents: torch.Tensor, grid=None) -> torch.Tensor:
        grid = self.pred_grid if grid is None else grid
        return _BridgeLoss.apply(pred, latents, functools.partial(self.bridge.loss_backward, grid=grid))


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents `[B, C, H, W]` against `target` `[B, h*w, D]` on their token grid,
    differentiable in `latents` through the frozen bridge."""

    def __init__(self, bridge, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _BridgeLoss.apply(latents, target, self.bridge.latent_loss_backward)
