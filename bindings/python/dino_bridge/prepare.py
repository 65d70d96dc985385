"""Make a `bridge-train` data folder from a folder of images.

    python -m dino_bridge.prepare --images DIR --out DIR [--size HxW] [--grid default|repa] \
        [--vae stabilityai/sd-vae-ft-ema | PATH] [--dino facebook/dinov2-base | PATH]

Writes, for N images (sorted by path) and `--size HxW` (default 256x256):
  latents.npy  [N, C, H/8, W/8] float16: the VAE posterior mean of the HxW crop, times the
               VAE's scaling factor (recorded in meta.json), as diffusion trainers use them;
  targets.npy  [N, gh*gw, 768] float16: DINOv2 patch tokens (final layer norm, no CLS) of the
               same crop resized to (gh*14, gw*14) pixels, so that DINOv2's patch grid is
               exactly the token grid (gh, gw); row-major, token t = row*gw + col;
  meta.json    the models, the scaling factor, the geometry (image_size, latent_shape,
               token_grid, grid, dino_input) and the image list.

The token grid is the latent grid divided by 2^adapter_depth of the bridge the data is for:
`--grid default` (the published bridge, adapter_depth 2) gives (H/32, W/32), e.g. 8x8 tokens
and DINOv2 at 112 px for 256x256; `--grid repa` (the `repa` preset, adapter_depth 1) gives
(H/16, W/16), REPA's own target: 16x16 tokens, DINOv2 at 224 px for 256x256. H and W must be
multiples of 32 (default) or 16 (repa). Non-square sizes make one aspect bucket per folder.

Images are resized to cover HxW (aspect kept, bicubic) and centre-cropped to exactly HxW.
Both models run in batches with a progress bar; the arrays are written through memory maps
as they fill, so N may exceed memory. `--vae-config` / `--dino-config` build randomly
initialised models from JSON configs instead of loading weights (for tests; no download).
A model that cannot be loaded ends the run with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The SD / SD3 / FLUX VAEs all downsample 8x; a VAE that does not is caught on the first batch.
VAE_FACTOR = 8
# adapter_depth of the bridge preset each grid is for (DESIGN.md, "Model"): tokens are the
# latent grid divided by 2^adapter_depth.
ADAPTER_DEPTH = {"default": 2, "repa": 1}
# Loggers whose output is held back while a model loads (see held_back_library_output).
LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")


def fail(message: str):
    """A user's mistake (bad argument, model not found), not a bug: one line on stderr and
    exit status 2, as argparse does for a bad argument, and no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def first_line(exc: BaseException, limit: int = 240) -> str:
    # The libraries' messages run to several lines (offline-mode advice, URLs); the first
    # says what went wrong.
    lines = str(exc).strip().splitlines()
    text = lines[0].strip().rstrip(".") if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_size(text: str, grid: str) -> tuple[int, int]:
    """`HxW` (or one number for a square) -> (H, W), checked against the grid: the latents
    (H/8, W/8) must split into whole 2^adapter_depth cells per token."""
    unit = VAE_FACTOR * 2 ** ADAPTER_DEPTH[grid]
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", str(text).strip().lower())
    if not m:
        fail(f"--size {text!r}: expected HxW in pixels (H rows, W columns), e.g. 256x256")
    h, w = int(m[1]), int(m[2] or m[1])
    if h <= 0 or w <= 0 or h % unit or w % unit:
        fail(f"--size {text}: both sides must be positive multiples of {unit} with --grid {grid} "
             f"(one token covers {unit}x{unit} pixels)")
    return h, w


def list_images(root: Path) -> list[Path]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return images


def load_crop(path: Path, height: int, width: int):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    # Cover: the larger of the two scales, so both sides reach the crop and only one is cut.
    scale = max(width / w, height / h)
    img = img.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


class _Hold(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def held_back_library_output():
    """Holds the libraries' log lines and warnings while a model loads. On failure they are
    dropped: they come before the exception (diffusers' note about `accelerate`, hub
    deprecation warnings) and would bury the one-line error. On success they are replayed,
    because some matter (weights missing from a checkpoint). Progress bars are not held."""
    hold = _Hold()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [hold], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
    for record in hold.records:
        logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def load_pretrained(what: str, flag: str, spec: str, loader):
    try:
        with held_back_library_output():
            return loader(spec)
    except Exception as e:  # OSError, HFValidationError, ValueError...: all mean "not loadable"
        fail(f"cannot load the {what} {spec!r} ({first_line(e)}); pass {flag} PATH, a local folder "
             f"with its weights, or {flag}-config JSON for a randomly initialised {what}")


def from_config(what: str, flag: str, config: str, build):
    try:
        return build(json.loads(Path(config).read_text()))
    except Exception as e:
        fail(f"cannot build a random {what} from {flag}-config {config} ({first_line(e)})")


def build_vae(spec: str | None, config: str | None, device):
    from diffusers import AutoencoderKL

    if config:
        vae = from_config("VAE", "--vae", config, lambda c: AutoencoderKL(**c))
    else:
        vae = load_pretrained("VAE", "--vae", spec, AutoencoderKL.from_pretrained)
    return vae.to(device).eval()


def build_dino(spec: str | None, config: str | None, device):
    from transformers import Dinov2Config, Dinov2Model

    if config:
        model = from_config("DINOv2", "--dino", config, lambda c: Dinov2Model(Dinov2Config(**c)))
    else:
        model = load_pretrained("DINOv2", "--dino", spec, Dinov2Model.from_pretrained)
    return model.to(device).eval()


def geometry(size: tuple[int, int], grid: str, vae, dino) -> dict:
    h, w = size
    depth = ADAPTER_DEPTH[grid]
    lh, lw = h // VAE_FACTOR, w // VAE_FACTOR
    gh, gw = lh >> depth, lw >> depth
    patch = dino.config.patch_size  # 14 for every DINOv2
    return {
        "image_size": [h, w],
        "latent_shape": [vae.config.latent_channels, lh, lw],
        "token_grid": [gh, gw],
        "grid": grid,
        "dino_input": [gh * patch, gw * patch],
    }


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

    size = parse_size(args.size, args.grid)
    images = list_images(Path(args.images))
    device = torch.device(args.device)
    vae = build_vae(args.vae, args.vae_config, device)
    dino = build_dino(args.dino, args.dino_config, device)
    # Only now: a model that does not load leaves no empty folder behind.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    geo = geometry(size, args.grid, vae, dino)
    n, (gh, gw), dino_hw = len(images), geo["token_grid"], tuple(geo["dino_input"])
    dim = dino.config.hidden_size
    # Written under temporary names and renamed at the end: a killed run leaves no
    # half-filled array that bridge-train would take for data.
    lat_tmp, tgt_tmp = out / "latents.npy.partial", out / "targets.npy.partial"
    latents = np.lib.format.open_memmap(lat_tmp, mode="w+", dtype=np.float16, shape=(n, *geo["latent_shape"]))
    targets = np.lib.format.open_memmap(tgt_tmp, mode="w+", dtype=np.float16, shape=(n, gh * gw, dim))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    bar = progress(n, not args.quiet)
    with torch.no_grad():
        for start in range(0, n, args.batch):
            batch = images[start : start + args.batch]
            pixels = np.stack([np.asarray(load_crop(p, *size), dtype=np.float32) / 255.0 for p in batch])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)  # [B, 3, H, W] in [0, 1]
            z = vae.encode(x * 2.0 - 1.0).latent_dist.mean * scaling
            if list(z.shape[1:]) != geo["latent_shape"]:
                fail(f"the VAE gave latents {list(z.shape[1:])} for {size[0]}x{size[1]} images, expected "
                     f"{geo['latent_shape']} (this tool assumes a VAE that downsamples {VAE_FACTOR}x)")
            small = F.interpolate(x, size=dino_hw, mode="bicubic", align_corners=False, antialias=True)
            # Dinov2Model resizes its position embeddings itself (bicubic, in
            # Dinov2Embeddings.interpolate_pos_encoding) whenever the patch grid differs from
            # config.image_size / patch_size or is not square; no flag is needed. The check
            # below is what proves it ran: a model that used its stored grid, or cropped,
            # would give a different token count.
            tokens = dino(pixel_values=((small.clamp(0, 1) - mean) / std)).last_hidden_state[:, 1:, :]
            if tokens.shape[1] != gh * gw:
                fail(f"DINOv2 gave {tokens.shape[1]} patch tokens for a {dino_hw[0]}x{dino_hw[1]} input, "
                     f"expected {gh}x{gw} = {gh * gw}")
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
        **geo,
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
    ap.add_argument("--size", default="256x256", help="crop size HxW in pixels (H rows, W columns); multiples of 32, or 16 with --grid repa")
    ap.add_argument("--grid", choices=sorted(ADAPTER_DEPTH), default="default",
                    help="token grid: default = latents/4 (H/32 x W/32, the published bridge), repa = latents/2 (H/16 x W/16, REPA's target)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    meta = prepare(args)
    (gh, gw), (dh, dw) = meta["token_grid"], meta["dino_input"]
    print(f"wrote {meta['count']} rows to {args.out}: latents {meta['latent_shape']}, {gh}x{gw} tokens "
          f"(DINOv2 at {dh}x{dw}), VAE scaling factor {meta['scaling_factor']}")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
