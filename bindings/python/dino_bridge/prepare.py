"""Make a `bridge-train` data folder from a folder of images.

    python -m dino_bridge.prepare --images DIR --out DIR [--size HxW] [--grid default|repa] \
        [--vae stabilityai/sd-vae-ft-ema | PATH] \
        [--teacher dinov2|dinov2-reg|dinov3|siglip2] [--teacher-model ID | PATH] [--cls]

Writes, for N images (sorted by path) and `--size HxW` (default 256x256):
  latents.npy  [N, C, H/8, W/8] float16: the VAE posterior mean of the HxW crop, times the
               VAE's scaling factor (recorded in meta.json), as diffusion trainers use them;
  targets.npy  [N, gh*gw, D] float16: the teacher's final patch tokens (CLS and registers
               left out) of the same crop at (gh*patch, gw*patch) pixels, so that its patch
               grid is exactly the token grid (gh, gw); row-major, token t = row*gw + col;
               D is the teacher's width (the bridge's target_dim);
  cls.npy      [N, D] float16, with --cls: the teacher's class token (SigLIP: its
               attention-pool output);
  meta.json    the VAE, the scaling factor, the geometry (image_size, latent_shape,
               token_grid, grid, teacher_input), the teacher and everything needed to make
               the same targets again (family, model, patch, registers dropped, mean and
               std and where they came from, preprocessing, position handling), the image
               list.

Teachers (`--teacher`, see dino_bridge/teachers.py): `dinov2` (default,
facebook/dinov2-base), `dinov2-reg`, `dinov3` (ViTs), `siglip2` (fixed-resolution
checkpoints), from a hub id or a local `save_pretrained` folder (`--teacher-model`; `--dino`
is its old name). Pixels and positions follow REPA: `x / 255`, normalised, resized
bicubically without antialiasing; a DINOv2's position embedding resampled once to the grid.

The token grid is the latent grid divided by 2^adapter_depth of the bridge the data is for:
`--grid default` (the published bridge, adapter_depth 2) gives (H/32, W/32), e.g. 8x8 tokens
and DINOv2 at 112 px for 256x256; `--grid repa` (the `repa` preset, adapter_depth 1) gives
(H/16, W/16), REPA's own target: 16x16 tokens, DINOv2 at 224 px for 256x256. H and W must be
multiples of 32 (default) or 16 (repa). Non-square sizes make one aspect bucket per folder.

Images are resized to cover HxW (aspect kept, bicubic) and centre-cropped to exactly HxW.
Both models run in batches with a progress bar; the arrays are written through memory maps
as they fill, so N may exceed memory. `--vae-config` / `--teacher-config` build randomly
initialised models from JSON configs instead of loading weights (for tests; no download).
A model that cannot be loaded, an unknown family or a model of another family ends the run
with a one-line error and exit status 2.
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


def build_teacher(family: str, spec: str | None, config: str | None, device):
    """The teacher of `family`: loaded from `spec`, or random from a JSON config."""
    from . import teachers

    if family not in teachers.FAMILIES:
        fail(f"--teacher {family!r}: unknown family; known: {', '.join(teachers.FAMILIES)}")
    fam = teachers.FAMILIES[family]
    if config:
        import transformers

        config_class = getattr(transformers, fam.model_class.replace("Model", "Config"))
        model = from_config("teacher", "--teacher", config,
                            lambda c: getattr(transformers, fam.model_class)(config_class(**c)))
        return teachers.Teacher(fam, "random:" + config, model.to(device).eval(), fam.mean, fam.std,
                                f"the published values of {family}")
    try:
        with held_back_library_output():
            return teachers.load_teacher(family, spec, device)
    except teachers.TeacherError as e:
        message = str(e)
        if message.startswith("cannot load"):
            message += (f"; pass --teacher-model PATH, a local folder with its weights, or --teacher-config JSON "
                        f"for a randomly initialised teacher")
        fail(message)


def geometry(size: tuple[int, int], grid: str, vae, teacher) -> dict:
    h, w = size
    depth = ADAPTER_DEPTH[grid]
    lh, lw = h // VAE_FACTOR, w // VAE_FACTOR
    gh, gw = lh >> depth, lw >> depth
    return {
        "image_size": [h, w],
        "latent_shape": [vae.config.latent_channels, lh, lw],
        "token_grid": [gh, gw],
        "grid": grid,
        "teacher_input": list(teacher.input_size(gh, gw)),
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
    teacher = build_teacher(args.teacher, args.teacher_model, args.teacher_config, device)
    # Only now: a model that does not load leaves no empty folder behind.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    geo = geometry(size, args.grid, vae, teacher)
    n, (gh, gw), dim = len(images), geo["token_grid"], teacher.width
    teacher.fit_grid(gh, gw)
    # Written under temporary names and renamed at the end: a killed run leaves no
    # half-filled array that bridge-train would take for data.
    names = ["latents", "targets"] + (["cls"] if args.cls else [])
    shapes = {"latents": (n, *geo["latent_shape"]), "targets": (n, gh * gw, dim), "cls": (n, dim)}
    arrays = {k: np.lib.format.open_memmap(out / f"{k}.npy.partial", mode="w+", dtype=np.float16, shape=shapes[k])
              for k in names}
    bar = progress(n, not args.quiet)
    with torch.no_grad():
        for start in range(0, n, args.batch):
            batch = images[start : start + args.batch]
            pixels = np.stack([np.asarray(load_crop(p, *size), dtype=np.float32) for p in batch])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)  # [B, 3, H, W] in 0..255
            z = vae.encode(x / 127.5 - 1.0).latent_dist.mean * scaling
            if list(z.shape[1:]) != geo["latent_shape"]:
                fail(f"the VAE gave latents {list(z.shape[1:])} for {size[0]}x{size[1]} images, expected "
                     f"{geo['latent_shape']} (this tool assumes a VAE that downsamples {VAE_FACTOR}x)")
            try:
                tokens, cls = teacher.tokens(x)
            except ValueError as e:  # TeacherError: a token count that does not fit the grid
                fail(str(e))
            rows = slice(start, start + len(batch))
            arrays["latents"][rows] = z.float().cpu().numpy().astype(np.float16)
            arrays["targets"][rows] = tokens.float().cpu().numpy().astype(np.float16)
            if args.cls:
                arrays["cls"][rows] = cls.float().cpu().numpy().astype(np.float16)
            bar.update(len(batch))
    bar.close()
    for k in names:
        arrays[k].flush()
    del arrays
    for k in names:
        os.replace(out / f"{k}.npy.partial", out / f"{k}.npy")
    meta = {
        "count": n,
        "vae": args.vae_config and "random:" + args.vae_config or args.vae,
        "scaling_factor": scaling,
        **geo,
        "target_dim": dim,
        "cls": bool(args.cls),
        "teacher": teacher.describe(),
        "images": [str(p.relative_to(args.images)) for p in images],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dino_bridge.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="data folder to write")
    ap.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: hub id or local path (SD or E2E-SD VAE)")
    ap.add_argument("--teacher", default="dinov2", help="teacher family: dinov2, dinov2-reg, dinov3, siglip2")
    ap.add_argument("--teacher-model", "--dino", dest="teacher_model", default=None,
                    help="the teacher: hub id or local save_pretrained folder (default: facebook/dinov2-base for "
                         "--teacher dinov2; required for the others)")
    ap.add_argument("--cls", action="store_true", help="also write cls.npy, the teacher's class token")
    ap.add_argument("--vae-config", help="JSON config: a randomly initialised VAE instead of --vae")
    ap.add_argument("--teacher-config", "--dino-config", dest="teacher_config",
                    help="JSON config: a randomly initialised teacher of --teacher instead of --teacher-model")
    ap.add_argument("--size", default="256x256", help="crop size HxW in pixels (H rows, W columns); multiples of 32, or 16 with --grid repa")
    ap.add_argument("--grid", choices=sorted(ADAPTER_DEPTH), default="default",
                    help="token grid: default = latents/4 (H/32 x W/32, the published bridge), repa = latents/2 (H/16 x W/16, REPA's target)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.teacher_model is None and args.teacher_config is None:
        if args.teacher != "dinov2":
            fail(f"--teacher {args.teacher} needs --teacher-model (a hub id or a local folder)")
        args.teacher_model = "facebook/dinov2-base"
    meta = prepare(args)
    (gh, gw), (th, tw) = meta["token_grid"], meta["teacher_input"]
    print(f"wrote {meta['count']} rows to {args.out}: latents {meta['latent_shape']}, {gh}x{gw} tokens of "
          f"{meta['target_dim']} ({meta['teacher']['family']} at {th}x{tw}){', cls.npy' if args.cls else ''}, "
          f"VAE scaling factor {meta['scaling_factor']}")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
