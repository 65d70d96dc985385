"""dino-bridge: DINOv2-base patch tokens predicted from Stable Diffusion VAE latents.

`dino_bridge.prepare` builds training data (VAE latents + DINOv2 tokens) from images for
`bridge-train`.
"""

__version__ = "0.1.0"
