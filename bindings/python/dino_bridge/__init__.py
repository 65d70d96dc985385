"""dino-bridge: DINOv2-base patch tokens predicted from Stable Diffusion VAE latents.

    from dino_bridge import Bridge
    with Bridge("bridge.safetensors") as bridge:
        tokens = bridge.forward(latents)                 # numpy or torch, [B, 64, 768]
        loss, grad = bridge.loss_backward(pred, latents) # REPA alignment

`dino_bridge.torch` wraps the loss calls as autograd functions (`AlignLoss`,
`LatentLoss`); `dino_bridge.prepare` builds training data from images.
The shared library is found through `$DINO_BRIDGE_LIB` or next to this package.
"""

from .bridge import Bridge, BridgeError

__all__ = ["Bridge", "BridgeError"]
__version__ = "0.1.0"
