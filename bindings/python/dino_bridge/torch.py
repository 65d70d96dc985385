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


class _AlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, latents, bridge):
        # The library reads every buffer in one dtype: the latents follow the prediction.
        p = pred.detach().contiguous()
        lat = latents.detach().to(dtype=p.dtype).contiguous()
        loss, grad = bridge.loss_backward(p, lat)
        ctx.save_for_backward(grad)
        return torch.tensor(loss, dtype=torch.float32, device=pred.device)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


class _LatentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, target, bridge):
        lat = latents.detach().contiguous()
        tgt = target.detach().to(dtype=lat.dtype).contiguous()
        loss, grad = bridge.latent_loss_backward(lat, tgt)
        ctx.save_for_backward(grad)
        return torch.tensor(loss, dtype=torch.float32, device=latents.device)

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
        return _AlignFunction.apply(pred, latents, self.bridge)


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents, differentiable in `latents` through the frozen bridge."""

    def __init__(self, bridge, **kwargs):
        super().__init__()
        self.bridge = _as_bridge(bridge, **kwargs)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _LatentFunction.apply(latents, target, self.bridge)
