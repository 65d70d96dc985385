"""REPA with dino-bridge: a small DiT-style denoiser trained on synthetic latents with the
diffusion loss plus alignment of its middle hidden tokens to the bridge's DINOv2 tokens.
No VAE decode, no DINOv2: the bridge predicts the targets from the latents.

    cargo build --release
    DINO_BRIDGE_LIB=target/release/libdino_bridge.so PYTHONPATH=bindings/python \\
        python examples/repa_train.py [--checkpoint bridge.safetensors] [--steps 60] \\
            [--bf16] [--compile [BACKEND]]

The projector makes 16x16 tokens for 32x32 latents (SiT/2's patch grid), and the bridge is
a `repa`-grid one (`adapter_depth = 1, grid = 16`: 16x16 tokens from 32x32 latents, REPA's
own DINOv2-B-at-224-px target), so the two grids meet with no pooling. Without
--checkpoint the bridge is a fresh `repa`-grid bridge with small widths (no trained `repa`
checkpoint is published yet; its target is then arbitrary but fixed, which is enough to
see the mechanics work). A checkpoint of another grid works too: with the published 8x8
bridge the library pools the 16x16 prediction 2x2 to meet it.

The alignment is REPA's own loss, `mean(1 - cos)` (AlignLoss's default; REPA logs
`mean(-cos)`, printed here as `repa proj_loss`), computed against the bridge's tokens for
the clean latents `x0`, never the noisy model input: the bridge stands for DINOv2 on the
clean image.

`--bf16` runs the model under `torch.autocast` (bf16): the projector's output reaches the
bridge in bf16, the latents in f32 (each tensor keeps its dtype through DLPack).
`--compile` compiles the loss computation with `torch.compile(fullgraph=True)`: AlignLoss
is a `torch.library` custom op, so the DiT, the projector and the alignment make one graph.
"""

import argparse
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_bridge import Bridge
from dino_bridge.torch import AlignLoss


class TinyDiT(nn.Module):
    """Patchify 2x2 -> transformer blocks -> unpatchify; returns the noise prediction and
    the hidden tokens after `align_depth` blocks (what REPA aligns)."""

    def __init__(self, channels=4, size=32, width=128, depth=4, align_depth=2):
        super().__init__()
        self.grid = size // 2
        self.patch = nn.Linear(channels * 4, width)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.out = nn.Linear(width, channels * 4)
        self.align_depth = align_depth

    def forward(self, x, t):
        b, c, h, w = x.shape
        g = self.grid
        tokens = x.reshape(b, c, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * 4)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32) / 32)
        temb = torch.cat([torch.sin(t[:, None] * freqs * 1000), torch.cos(t[:, None] * freqs * 1000)], dim=1)
        h_ = self.patch(tokens) + self.pos + self.time(temb)[:, None, :]
        hidden = None
        for i, block in enumerate(self.blocks):
            h_ = block(h_)
            if i + 1 == self.align_depth:
                hidden = h_
        eps = self.out(h_).reshape(b, g, g, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return eps, hidden


def smooth_latents(n, generator):
    coarse = torch.randn(n, 4, 5, 5, generator=generator)
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lam", type=float, default=0.5, help="weight of the alignment loss")
    ap.add_argument("--bf16", action="store_true", help="autocast the model to bf16")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile(fullgraph=True) the losses (default backend: inductor)")
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    if args.checkpoint:
        bridge = Bridge(args.checkpoint)
    else:
        # The `repa` preset's grid (one adapter stage: 32x32 latents -> 16x16 tokens) with
        # the `small` preset's widths, so that the example runs in seconds on a CPU.
        bridge = Bridge(adapter_depth=1, grid=16, adapter_mid_channels=32, adapter_out_channels=64, width=128,
                        depth=2, heads=4, dropout=0.0, seed=1)
    model = TinyDiT()
    # The caller's token grid: the DiT's 2x2 patches of the 32x32 latents.
    align = AlignLoss(bridge, pred_grid=(model.grid, model.grid))
    bridge_grid = bridge.token_grid(32, 32)
    target_dim = bridge.info()["target_dim"]
    print(f"caller grid {model.grid}x{model.grid}, bridge grid {bridge_grid[0]}x{bridge_grid[1]}"
          + ("" if bridge_grid == (model.grid, model.grid) else " (the prediction is pooled to it)"))
    projector = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, target_dim))
    opt = torch.optim.AdamW(list(model.parameters()) + list(projector.parameters()), lr=1e-3)
    data = smooth_latents(64, gen)

    def losses(x0, t, noise):
        xt = torch.sqrt(1 - t)[:, None, None, None] * x0 + torch.sqrt(t)[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            eps, hidden = model(xt, t)
            diffusion = F.mse_loss(eps.float(), noise)
            # The clean latents x0 (REPA's `x`), not the noisy input xt: 16x16 tokens
            # against the bridge's 16x16.
            alignment = align(projector(hidden), x0)
        return diffusion, alignment

    if args.compile:
        losses = torch.compile(losses, fullgraph=True, backend=args.compile)
    history = []
    for step in range(args.steps):
        x0 = data[torch.randint(0, len(data), (args.batch,), generator=gen)]
        t = torch.rand(args.batch, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        diffusion, alignment = losses(x0, t, noise)
        loss = diffusion + args.lam * alignment
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(alignment.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  diffusion {diffusion.item():.4f}  alignment {alignment.item():.4f}  "
                  f"repa proj_loss {align.repa_logged(alignment).item():.4f}")
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(json.dumps({"align_first": first, "align_last": last}))
    bridge.close()


if __name__ == "__main__":
    main()
