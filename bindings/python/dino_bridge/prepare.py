"""Make a `bridge-train` data folder from a folder of images.

    python -m dino_bridge.prepare --images DIR --out DIR \
        [--vae stabilityai/sd-vae-ft-ema | PATH] [--dino facebook/dinov2-base | PATH]

Writes, for N images (sorted by path):
  latents.npy  [N, 4, 32, 32] float16: the VAE posterior mean at 256x256, times the VAE's
               scaling factor (recorded in meta.json), as diffusion trainers use them;
  targets.npy  [N, 64, 768] float16: DINOv2 patch tokens (final layer norm, no CLS) of the
               same 256x256 crop resized to 112x112 (an 8x8 grid of 14 px patches);
  meta.json    the models, the scaling factor, the sizes and the image list.

Images are resized (shorter side to 256, bicubic) and centre-cropped. Both models run in
batches with a progress bar; the arrays are written through memory maps as they fill, so
N may exceed memory. `--vae-config` / `--dino-config` build randomly initialised models
from JSON configs instead of loading weights (for tests; no download).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(root: Path) -> list[Path]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return images


def load_crop(path: Path, size: int):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def build_vae(spec: str | None, config: str | None, device):
    from diffusers import AutoencoderKL

    if config:
        vae = AutoencoderKL(**json.loads(Path(config).read_text()))
    else:
        vae = AutoencoderKL.from_pretrained(spec)
    return vae.to(device).eval()


def build_dino(spec: str | None, config: str | None, device):
    from transformers import Dinov2Config, Dinov2Model

    if config:
        model = Dinov2Model(Dinov2Config(**json.loads(Path(config).read_text())))
    else:
        model = Dinov2Model.from_pretrained(spec)
    return model.to(device).eval()


def progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="img", disable=not enabled)
    except ImportError:

        class Plain:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                if enabled:
                    print(f"\r{self.n}/{total} images", end="", file=sys.stderr, flush=True)

            def close(self):
                if enabled:
                    print(file=sys.stderr)

        return Plain()


def prepare(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    images = list_images(Path(args.images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    vae = build_vae(args.vae, args.vae_config, device)
    dino = build_dino(args.dino, args.dino_config, device)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    n, side = len(images), args.size // 8
    grid = args.dino_size // 14
    dim = dino.config.hidden_size
    # Written under temporary names and renamed at the end: a killed run leaves no
    # half-filled array that bridge-train would take for data.
    lat_tmp, tgt_tmp = out / "latents.npy.partial", out / "targets.npy.partial"
    latents = np.lib.format.open_memmap(lat_tmp, mode="w+", dtype=np.float16, shape=(n, vae.config.latent_channels, side, side))
    targets = np.lib.format.open_memmap(tgt_tmp, mode="w+", dtype=np.float16, shape=(n, grid * grid, dim))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    bar = progress(n, not args.quiet)
    with torch.no_grad():
        for start in range(0, n, args.batch):
            batch = images[start : start + args.batch]
            pixels = np.stack([np.asarray(load_crop(p, args.size), dtype=np.float32) / 255.0 for p in batch])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)  # [B, 3, S, S] in [0, 1]
            z = vae.encode(x * 2.0 - 1.0).latent_dist.mean * scaling
            small = F.interpolate(x, size=(args.dino_size, args.dino_size), mode="bicubic", align_corners=False)
            tokens = dino(pixel_values=((small.clamp(0, 1) - mean) / std)).last_hidden_state[:, 1:, :]
            if tokens.shape[1] != grid * grid:
                raise SystemExit(f"error: DINOv2 gave {tokens.shape[1]} patch tokens, expected {grid * grid}")
            latents[start : start + len(batch)] = z.float().cpu().numpy().astype(np.float16)
            targets[start : start + len(batch)] = tokens.float().cpu().numpy().astype(np.float16)
            bar.update(len(batch))
    bar.close()
    latents.flush()
    targets.flush()
    del latents, targets
    os.replace(lat_tmp, out / "latents.npy")
    os.replace(tgt_tmp, out / "targets.npy")
    meta = {
        "count": n,
        "vae": args.vae_config and "random:" + args.vae_config or args.vae,
        "dino": args.dino_config and "random:" + args.dino_config or args.dino,
        "scaling_factor": scaling,
        "image_size": args.size,
        "dino_size": args.dino_size,
        "images": [str(p.relative_to(args.images)) for p in images],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dino_bridge.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="data folder to write")
    ap.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: hub id or local path (SD or E2E-SD VAE)")
    ap.add_argument("--dino", default="facebook/dinov2-base", help="transformers Dinov2Model: hub id or local path")
    ap.add_argument("--vae-config", help="JSON config: a randomly initialised VAE instead of --vae")
    ap.add_argument("--dino-config", help="JSON config: a randomly initialised DINOv2 instead of --dino")
    ap.add_argument("--size", type=int, default=256, help="image side for the VAE (latents are size/8)")
    ap.add_argument("--dino-size", type=int, default=112, help="image side for DINOv2 (size/14 patches per side)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    meta = prepare(args)
    print(f"wrote {meta['count']} rows to {args.out} (VAE scaling factor {meta['scaling_factor']})")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
