"""dino-bridge: DINOv2-base patch tokens predicted from Stable Diffusion VAE latents.

    from dino_bridge import Bridge
    with Bridge("bridge.safetensors") as bridge:
        tokens = bridge.forward(latents)                 # numpy or torch, [B, h*w, 768]
        loss, grad = bridge.loss_backward(pred, latents) # REPA alignment (grid=(ph, pw) or inferred)

Latents are `[B, C, H, W]`, `H, W` multiples of `2^adapter_depth`; tokens come on the grid
`(h, w) = (H, W) / 2^adapter_depth`: 8x8 for 32x32 latents on the published bridge, 16x16
on a `repa` one (`Bridge(adapter_depth=1, grid=16)` for fresh weights).

`dino_bridge.torch` wraps the loss calls as autograd functions (`AlignLoss`,
`LatentLoss`); `dino_bridge.prepare` builds training data from images.
The shared library is found through `$DINO_BRIDGE_LIB` or next to this package.
"""

from ._lib import ABI_VERSION, AbiMismatchError
from .bridge import Bridge, BridgeError, infer_caller_grid

__all__ = ["ABI_VERSION", "AbiMismatchError", "Bridge", "BridgeError", "infer_caller_grid"]
__version__ = "0.1.0"
