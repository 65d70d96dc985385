"""dino-bridge: DINOv2-base patch tokens predicted from Stable Diffusion VAE latents.

    from dino_bridge import Bridge
    with Bridge("bridge.safetensors") as bridge:
        tokens = bridge.forward(latents)                 # numpy, torch, JAX, ...: [B, h*w, 768]
        loss, grad = bridge.loss_backward(pred, latents) # REPA alignment (grid=(ph, pw) or inferred)

Latents are `[B, C, H, W]`, `H, W` multiples of `2^adapter_depth`; tokens come on the grid
`(h, w) = (H, W) / 2^adapter_depth`: 8x8 for 32x32 latents on the published bridge, 16x16
on a `repa` one (`Bridge(adapter_depth=1, grid=16)` for fresh weights). Arrays reach the
library through DLPack (anything with `__dlpack__`), each in its own dtype.

`dino_bridge.torch` wraps the loss calls as `torch.library` custom ops with autograd
(`AlignLoss`, `LatentLoss`: no graph break under `torch.compile`); `dino_bridge.prepare`
builds training data from images. `capabilities()` describes the library;
`enable_logging()` routes its messages into Python's `logging`.
The shared library is found through `$DINO_BRIDGE_LIB` or next to this package.
"""

from ._lib import ABI_VERSION, AbiMismatchError
from .bridge import (Bridge, BridgeError, capabilities, disable_logging, enable_logging, infer_caller_grid,
                     set_log_callback)

__all__ = ["ABI_VERSION", "AbiMismatchError", "Bridge", "BridgeError", "capabilities", "disable_logging",
           "enable_logging", "infer_caller_grid", "set_log_callback"]
__version__ = "0.1.0"
