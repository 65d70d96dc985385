"""The teachers whose tokens a bridge learns (DESIGN.md, "Teachers and the CLS token"):
DINOv2 (with and without registers), DINOv3 ViTs and fixed-resolution SigLIP2, each from a
hub id or a local folder written by `save_pretrained`, run the way REPA runs its encoders.

    teacher = load_teacher("dinov2", "facebook/dinov2-base", device)
    teacher.fit_grid(16, 16)              # REPA's position handling, once
    patches, cls = teacher.tokens(pixels)  # pixels: [B, 3, H, W] in 0..255 (float)

What each family gives: the final patch tokens (after the model's last norm; CLS and
registers left out, their counts read from the config, never assumed) and the class
target (`last_hidden_state[:, 0]`; SigLIP's attention-pool output, having no CLS). The
teacher sees the image at `patch * h` by `patch * w` pixels, `patch` from its config.

Pixels follow REPA's `preprocess_raw_image`: `x / 255`, normalised with the teacher's
mean and std (the folder's `preprocessor_config.json`, else the family's published
values), then resized bicubically without antialiasing. Positions follow REPA too: a
DINOv2's learned `pos_embed` is resampled once to the token grid as timm's
`resample_abs_pos_embed` does (bicubic, antialiased) and the forward uses it as it is
(transformers would interpolate on every call, differently); DINOv3's RoPE needs nothing;
SigLIP interpolates its embedding when the size is not its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """One teacher family: the transformers config `model_type`s it takes (and those of its
    relatives it refuses, with why), its model class, its published normalisation."""

    name: str
    model_types: tuple
    refused: dict
    model_class: str
    mean: tuple
    std: tuple
    has_cls: bool
    learned_positions: bool


FAMILIES = {
    "dinov2": Family("dinov2", ("dinov2",), {"dinov2_with_registers": "it has registers: use --teacher dinov2-reg"},
                     "Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, True, True),
    "dinov2-reg": Family("dinov2-reg", ("dinov2_with_registers",),
                         {"dinov2": "it has no registers: use --teacher dinov2"},
                         "Dinov2WithRegistersModel", IMAGENET_MEAN, IMAGENET_STD, True, True),
    "dinov3": Family("dinov3", ("dinov3_vit",),
                     {"dinov3_convnext": "a ConvNeXt has no patch tokens; use a DINOv3 ViT (e.g. "
                                         "facebook/dinov3-vitb16-pretrain-lvd1689m)"},
                     "DINOv3ViTModel", IMAGENET_MEAN, IMAGENET_STD, True, False),
    "siglip2": Family("siglip2", ("siglip", "siglip_vision_model"),
                      {"siglip2": "a NaFlex checkpoint (variable patches per image) has no fixed grid; use a "
                                  "fixed-resolution SigLIP2 (e.g. google/siglip2-base-patch16-256)",
                       "siglip2_vision_model": "a NaFlex checkpoint (variable patches per image) has no fixed "
                                               "grid; use a fixed-resolution SigLIP2"},
                      "SiglipVisionModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False, True),
}


class TeacherError(ValueError):
    """A teacher that cannot be used: unknown family, a model of another family, a
    variant the family refuses, or one that cannot be loaded."""


def _read_config(spec: str) -> dict:
    """The model's config.json as a dict, from a local folder or the hub."""
    folder = Path(spec)
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise TeacherError(f"{spec}: a folder without config.json (save it with save_pretrained)")
        return json.loads(path.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec).to_dict()
    except Exception as e:  # OSError, HFValidationError, ...: all mean "not loadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TeacherError(f"cannot load the teacher {spec!r} ({first})") from None


def _normalisation(spec: str, family: Family) -> tuple:
    """(mean, std, where they came from): the folder's preprocessor_config.json, else the
    family's published values."""
    path = Path(spec) / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"]), str(path)
    return family.mean, family.std, f"the published values of {family.name}"


class Teacher:
    """A loaded teacher on a device, in evaluation mode (see the module's docstring)."""

    def __init__(self, family: Family, spec: str, model, mean, std, norm_source: str):
        import torch

        self.family, self.spec, self.model = family, spec, model
        cfg = model.config
        patch = cfg.patch_size
        self.patch = int(patch if isinstance(patch, int) else patch[0])
        self.registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.width = int(cfg.hidden_size)
        self.image_size = int(getattr(cfg, "image_size", 0) or 0)
        self.mean, self.std, self.norm_source = tuple(mean), tuple(std), norm_source
        device = next(model.parameters()).device
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        self.grid = None

    @property
    def dropped(self) -> int:
        """Leading tokens that are not patch tokens (CLS and registers)."""
        return (1 if self.family.has_cls else 0) + self.registers

    def input_size(self, gh: int, gw: int) -> tuple:
        return (self.patch * gh, self.patch * gw)

    def fit_grid(self, gh: int, gw: int) -> None:
        """Sets the token grid. A DINOv2's position embedding is resampled to it once, as
        timm's resample_abs_pos_embed does, and used as it is by every forward."""
        import torch
        import torch.nn.functional as F

        self.grid = (gh, gw)
        if self.family.name not in ("dinov2", "dinov2-reg"):
            return
        emb = self.model.embeddings
        stored = emb.position_embeddings.detach()
        prefix, grid_pos = stored[:, :1], stored[:, 1:]
        side = int(round(grid_pos.shape[1] ** 0.5))
        if side * side != grid_pos.shape[1]:
            raise TeacherError(f"{self.spec}: {grid_pos.shape[1]} stored positions are no square grid")
        dim = grid_pos.shape[-1]
        m = grid_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        m = F.interpolate(m, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        fixed = torch.cat([prefix.float(), m.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)
        fixed = fixed.to(stored.dtype)
        want = self.input_size(gh, gw)

        def resampled_once(embeddings, height, width):
            if (height, width) != want:
                raise TeacherError(f"the teacher was fitted to {want[0]}x{want[1]} pixels, got {height}x{width}")
            return fixed

        emb.interpolate_pos_encoding = resampled_once

    def pixels(self, images):
        """REPA's preprocessing of `images` `[B, 3, H, W]` in 0..255 for the fitted grid."""
        import torch.nn.functional as F

        x = (images / 255.0 - self._mean) / self._std
        return F.interpolate(x, size=self.input_size(*self.grid), mode="bicubic", align_corners=False,
                             antialias=False)

    def tokens(self, images):
        """(patch tokens `[B, gh*gw, width]`, class target `[B, width]`) for `images`
        `[B, 3, H, W]` in 0..255."""
        if self.grid is None:
            raise TeacherError("call fit_grid(gh, gw) first")
        x = self.pixels(images)
        if self.family.name == "siglip2":
            own = (self.image_size, self.image_size)
            out = self.model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != own)
            patches, cls = out.last_hidden_state, out.pooler_output
        else:
            out = self.model(pixel_values=x)
            patches, cls = out.last_hidden_state[:, self.dropped:], out.last_hidden_state[:, 0]
        gh, gw = self.grid
        if patches.shape[1] != gh * gw:
            raise TeacherError(f"{self.spec} gave {patches.shape[1]} patch tokens for a {x.shape[-2]}x{x.shape[-1]} "
                               f"input, expected {gh}x{gw} = {gh * gw}")
        return patches, cls

    def describe(self) -> dict:
        """What meta.json records to make the same targets again."""
        return {
            "family": self.family.name,
            "model": self.spec,
            "model_class": self.family.model_class,
            "patch_size": self.patch,
            "registers": self.registers,
            "tokens_dropped": self.dropped,
            "target_dim": self.width,
            "input": list(self.input_size(*self.grid)) if self.grid else None,
            "mean": list(self.mean),
            "std": list(self.std),
            "normalisation_from": self.norm_source,
            "preprocessing": "x/255, normalise, bicubic resize without antialiasing (REPA)",
            "positions": {"dinov2": "pos_embed resampled once (bicubic, antialiased, as timm)",
                          "dinov2-reg": "pos_embed resampled once (bicubic, antialiased, as timm)",
                          "dinov3": "RoPE", "siglip2": "interpolated when the size is not its own"}[
                self.family.name],
            "cls": "last_hidden_state[:, 0]" if self.family.has_cls else "pooler_output (attention pool)",
        }


def load_teacher(family: str, spec: str, device="cpu") -> Teacher:
    """The teacher `spec` (hub id or `save_pretrained` folder) of `family`, on `device`.
    An unknown family, a model of another family or a refused variant is a `TeacherError`
    naming both."""
    if family not in FAMILIES:
        raise TeacherError(f"--teacher {family!r}: unknown family; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    cfg = _read_config(spec)
    kind = cfg.get("model_type")
    if kind in fam.refused:
        raise TeacherError(f"--teacher {family} --teacher-model {spec}: model_type {kind!r} is refused: "
                           f"{fam.refused[kind]}")
    if kind not in fam.model_types:
        raise TeacherError(f"--teacher {family} --teacher-model {spec}: its model_type is {kind!r}, not one of "
                           f"{family}'s ({', '.join(fam.model_types)})")
    import transformers

    cls = getattr(transformers, fam.model_class)
    try:
        model = cls.from_pretrained(spec)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TeacherError(f"cannot load the teacher {spec!r} as {fam.model_class} ({first})") from None
    mean, std, source = _normalisation(spec, fam)
    return Teacher(fam, spec, model.to(device).eval(), mean, std, source)
