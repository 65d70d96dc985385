"""PyTorch autograd wrappers: REPA alignment as a loss module.

    align = AlignLoss("bridge.safetensors")
    loss = diffusion_loss + lam * align(projector(h), latents)
    loss.backward()                      # the bridge's gradient flows into the projector

`pred` is the projector's output [B, g*g, 768] on the caller's token grid (16x16 for
SiT/2 on 32x32 latents); it is average-pooled to the bridge's 8x8 grid inside the
library, and the gradient is spread back to all g*g tokens. The bridge itself is frozen.
"""

from __future__ import annotations

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
    """`loss = AlignLoss(bridge)(pred, latents)`: REPA alignment of `pred` [B, g*g, D]
    to the frozen bridge's tokens for `latents` [B, C, L, L]; differentiable in `pred`."""

    def __init__(self, bridge, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)

    def forward(self, pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return _BridgeLoss.apply(pred, latents, self.bridge.loss_backward)


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents, differentiable in `latents` through the frozen bridge."""

    def __init__(self, bridge, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _BridgeLoss.apply(latents, target, self.bridge.latent_loss_backward)
