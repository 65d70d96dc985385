"""dino_bridge.prepare end to end with small randomly initialised models (no download),
then bridge-train on what it wrote; other geometries, each teacher family's tokens checked
against an independent computation along REPA's path, and the one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from dino_bridge import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 256, "scaling_factor": 0.5,
}
DINO = {
    "hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 256,
    "image_size": 112, "patch_size": 14,
}
# facebook/dinov2-base's own image_size: a 37x37 position grid, which prepare resamples once
# to each token grid below.
DINO_518 = {**DINO, "image_size": 518}


def write_images(root, sizes, seed=0):
    """Random images of the given (width, height), every other one in a subfolder."""
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        where = root / "sub" if i % 2 else root
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(where / f"img{i}.png")
    return root


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def run_prepare(images, out, *extra):
    prepare.main(["--images", str(images), "--out", str(out), "--batch", "2", "--device", "cpu", "--quiet", *extra])
    return np.load(out / "latents.npy"), np.load(out / "targets.npy"), json.loads((out / "meta.json").read_text())


def test_prepare_writes_latents_and_tokens_that_bridge_train_reads(tmp_path):
    images = write_images(tmp_path / "images", [(300, 256), (256, 400), (512, 512), (260, 270), (640, 300)])
    vae, dino = write_json(tmp_path / "vae.json", VAE), write_json(tmp_path / "dino.json", DINO)
    out = tmp_path / "data"
    lat, tgt, meta = run_prepare(images, out, "--vae-config", str(vae), "--dino-config", str(dino))
    assert lat.shape == (5, 4, 32, 32) and lat.dtype == np.float16
    assert tgt.shape == (5, 64, 768) and tgt.dtype == np.float16
    assert np.isfinite(lat).all() and np.isfinite(tgt).all() and lat.astype(np.float32).std() > 0 and tgt.astype(np.float32).std() > 0
    assert meta["scaling_factor"] == 0.5 and meta["count"] == 5 and len(meta["images"]) == 5
    assert (meta["image_size"], meta["latent_shape"], meta["token_grid"], meta["grid"], meta["teacher_input"]) == \
        ([256, 256], [4, 32, 32], [8, 8], "default", [112, 112])
    assert meta["target_dim"] == 768 and meta["teacher"]["family"] == "dinov2" and not (out / "cls.npy").exists()
    assert not list(out.glob("*.partial"))

    exe = Path(os.environ.get("BRIDGE_TRAIN", ROOT / "target" / "release" / "bridge-train"))
    run = subprocess.run([str(exe), "train", "--data", str(out), "--out", str(tmp_path / "run"), "--config", "small",
                          "--epochs", "1", "--batch", "2", "--val-count", "2", "--pool", "2", "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "run" / "latest.safetensors").is_file()


def test_prepare_repa_grid_on_a_rectangular_size(tmp_path):
    # 128 rows x 192 columns: latents 16x24, REPA's grid (latents / 2) 8x12, DINOv2 at 112x168
    # while its config was built for 518x518.
    images = write_images(tmp_path / "images", [(300, 256), (256, 400), (192, 128), (640, 300)])
    vae, dino = write_json(tmp_path / "vae.json", VAE), write_json(tmp_path / "dino.json", DINO_518)
    out = tmp_path / "data"
    lat, tgt, meta = run_prepare(images, out, "--grid", "repa", "--size", "128x192",
                                 "--vae-config", str(vae), "--dino-config", str(dino))
    assert lat.shape == (4, 4, 16, 24) and lat.dtype == np.float16
    assert tgt.shape == (4, 8 * 12, 768) and tgt.dtype == np.float16
    assert np.isfinite(lat).all() and np.isfinite(tgt).all()
    assert lat.astype(np.float32).std() > 0 and tgt.astype(np.float32).std() > 0
    teacher = meta.pop("teacher")
    assert meta == {
        "count": 4,
        "vae": "random:" + str(vae),
        "scaling_factor": 0.5,
        "image_size": [128, 192],
        "latent_shape": [4, 16, 24],
        "token_grid": [8, 12],
        "grid": "repa",
        "teacher_input": [112, 168],
        "target_dim": 768,
        "cls": False,
        "images": ["img0.png", "img2.png", "sub/img1.png", "sub/img3.png"],
    }
    assert teacher["model"] == "random:" + str(dino) and teacher["patch_size"] == 14 and teacher["tokens_dropped"] == 1
    assert teacher["mean"] == [0.485, 0.456, 0.406] and "REPA" in teacher["preprocessing"]
    assert not list(out.glob("*.partial"))


def repa_pixels(crops, size, mean, std):
    """REPA's preprocess_raw_image, written out: x / 255, normalise, bicubic resize without
    antialiasing."""
    x = torch.from_numpy(np.stack(crops).astype(np.float32)).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)


def timm_resample(pos, grid, prefix=1):
    """timm's resample_abs_pos_embed: the grid part of `pos` resized bicubically with
    antialiasing, the prefix (CLS) kept."""
    side = int(round((pos.shape[1] - prefix) ** 0.5))
    m = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    m = F.interpolate(m, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :prefix], m.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def reference_tokens(model, pixels, pos, registers=0):
    """A DINOv2's patch tokens and CLS computed from its parts, not through its forward:
    patch embedding, the position embedding `pos` as given (no interpolation), registers
    after the CLS, the encoder blocks and the final layer norm; tokens laid out explicitly
    as row*gw + col."""
    emb = model.embeddings
    patches = emb.patch_embeddings.projection(pixels)  # [B, D, gh, gw]
    gh, gw = patches.shape[2:]
    tokens = [patches[:, :, r, c] + pos[:, 1 + r * gw + c] for r in range(gh) for c in range(gw)]
    b = pixels.shape[0]
    cls = emb.cls_token[:, 0].expand(b, -1) + pos[:, 0]
    regs = [emb.register_tokens[:, i].expand(b, -1) for i in range(registers)]
    h = torch.stack([cls, *regs, *tokens], dim=1)
    for layer in model.encoder.layer:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    h = model.layernorm(h)
    return h[:, 1 + registers:], h[:, 0]


RECT_SIZE = (96, 160)  # rows x columns: latents 12x20, default grid 3x5 tokens


def rect_images(tmp_path):
    """Three images whose 96x160 crops are known: resized 2x, columns cut, rows cut."""
    rng = np.random.default_rng(1)
    arrays = {
        "a.png": rng.integers(0, 255, (192, 320, 3), dtype=np.uint8),  # 2x: resized, nothing cut
        "b.png": rng.integers(0, 255, (96, 400, 3), dtype=np.uint8),   # wide: columns cut
        "c.png": rng.integers(0, 255, (300, 160, 3), dtype=np.uint8),  # tall: rows cut
    }
    images = tmp_path / "images"
    images.mkdir()
    for name, a in arrays.items():
        Image.fromarray(a).save(images / name)
    crops = [
        np.asarray(Image.fromarray(arrays["a.png"]).resize((160, 96), Image.BICUBIC)),
        arrays["b.png"][:, 120:280],
        arrays["c.png"][102:198, :],
    ]
    return images, crops


def test_dino_tokens_of_a_rectangular_crop_match_an_independent_forward(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**{**DINO, "num_hidden_layers": 2})).eval()
    model.save_pretrained(tmp_path / "dino")  # a local folder: the --teacher-model PATH way in
    # Default grid: 3x5 tokens (a transposed 5x3 layout would have the same count but not the
    # same values), DINOv2 at 42x70 against its 8x8 position grid.
    images, crops = rect_images(tmp_path)
    vae = write_json(tmp_path / "vae.json", VAE)
    lat, tgt, meta = run_prepare(images, tmp_path / "data", "--size", "96x160", "--cls",
                                 "--vae-config", str(vae), "--teacher-model", str(tmp_path / "dino"))
    assert lat.shape == (3, 4, 12, 20) and tgt.shape == (3, 15, 768)
    assert meta["teacher"]["model"] == str(tmp_path / "dino") and meta["token_grid"] == [3, 5]
    assert meta["teacher_input"] == [42, 70]
    pixels = repa_pixels(crops, (42, 70), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        pos = timm_resample(model.embeddings.position_embeddings, (3, 5))
        expected, cls = reference_tokens(model, pixels, pos)
        # transformers' own per-forward interpolation (no antialiasing) gives other targets:
        # the position handling is REPA's, not the library default.
        theirs = model(pixel_values=pixels).last_hidden_state[:, 1:]
    np.testing.assert_allclose(tgt.astype(np.float32), expected.numpy(), atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(np.load(tmp_path / "data" / "cls.npy").astype(np.float32), cls.numpy(), atol=5e-3,
                               rtol=5e-3)
    assert (theirs - expected).abs().max() > 1e-2


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def family_teacher(family, folder):
    """A random teacher of `family` set like the released models (patch sizes, registers,
    image sizes), saved with save_pretrained; its class and what a check needs."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "dinov2-reg":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(patch_size=14, image_size=518,
                                                                          num_register_tokens=4, **SMALL))
    elif family == "dinov3":
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **SMALL))
    elif family == "siglip2":  # google/siglip2-base-patch16-256's geometry
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(patch_size=16, image_size=256, **SMALL))
    else:
        raise AssertionError(family)
    model.eval().save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["dinov2-reg", "dinov3", "siglip2"])
def test_each_teacher_familys_targets_match_repas_path(tmp_path, family):
    model = family_teacher(family, tmp_path / "teacher")
    images, crops = rect_images(tmp_path)
    vae = write_json(tmp_path / "vae.json", VAE)
    lat, tgt, meta = run_prepare(images, tmp_path / "data", "--size", "96x160", "--grid", "repa", "--cls",
                                 "--vae-config", str(vae), "--teacher", family,
                                 "--teacher-model", str(tmp_path / "teacher"))
    grid = (6, 10)  # repa grid: latents 12x20 / 2
    patch = 14 if family == "dinov2-reg" else 16
    assert tgt.shape == (3, 60, 64) and meta["target_dim"] == 64
    assert meta["teacher_input"] == [patch * 6, patch * 10] and meta["teacher"]["patch_size"] == patch
    mean, std = ((0.5,) * 3, (0.5,) * 3) if family == "siglip2" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert meta["teacher"]["mean"] == list(mean) and meta["teacher"]["std"] == list(std)
    pixels = repa_pixels(crops, (patch * 6, patch * 10), mean, std)
    with torch.no_grad():
        if family == "dinov2-reg":
            assert meta["teacher"]["tokens_dropped"] == 5
            expected, cls = reference_tokens(model, pixels, timm_resample(model.embeddings.position_embeddings, grid),
                                             registers=4)
        elif family == "dinov3":  # RoPE: the plain forward, CLS and 4 registers dropped
            assert meta["teacher"]["tokens_dropped"] == 5
            out = model(pixel_values=pixels).last_hidden_state
            expected, cls = out[:, 5:], out[:, 0]
        else:  # SigLIP: no CLS; its position embedding interpolated at 96x160 (not its 256x256)
            assert meta["teacher"]["tokens_dropped"] == 0
            out = model(pixel_values=pixels, interpolate_pos_encoding=True)
            expected, cls = out.last_hidden_state, out.pooler_output
    np.testing.assert_allclose(tgt.astype(np.float32), expected.numpy(), atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(np.load(tmp_path / "data" / "cls.npy").astype(np.float32), cls.numpy(), atol=5e-3,
                               rtol=5e-3)


@pytest.mark.parametrize("family, kind, says", [
    ("dinov3", "convnext", "'dinov3_convnext' is refused: a ConvNeXt has no patch tokens"),
    ("siglip2", "naflex", "'siglip2_vision_model' is refused: a NaFlex checkpoint"),
    ("dinov3", "dinov2", "its model_type is 'dinov2', not one of dinov3's"),
    ("clip", "dinov2", "--teacher 'clip': unknown family"),
])
def test_a_teacher_that_does_not_fit_its_family_is_a_one_line_error(tmp_path, family, kind, says):
    import transformers as tf

    folder = tmp_path / kind
    if kind == "convnext":
        tf.DINOv3ConvNextModel(tf.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])) \
            .save_pretrained(folder)
    elif kind == "naflex":
        tf.Siglip2VisionModel(tf.Siglip2VisionConfig(patch_size=16, num_patches=64, **SMALL)).save_pretrained(folder)
    else:
        tf.Dinov2Model(tf.Dinov2Config(**SMALL)).save_pretrained(folder)
    images = write_images(tmp_path / "images", [(64, 64)])
    vae = write_json(tmp_path / "vae.json", VAE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "bindings" / "python")}
    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "dino_bridge.prepare", "--images", str(images), "--out", str(out),
                          "--vae-config", str(vae), "--teacher", family, "--teacher-model", str(folder),
                          "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env)
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert says in lines[0] and (family == "clip" or str(folder) in lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("flag, config_flag", [("--vae", "--vae-config"), ("--teacher-model", "--teacher-config")])
@pytest.mark.parametrize("spec", ["no-such-org/no-such-model", "missing-folder"])
def test_a_model_that_does_not_load_is_a_one_line_error(tmp_path, flag, config_flag, spec):
    images = write_images(tmp_path / "images", [(64, 64)])
    vae, dino = write_json(tmp_path / "vae.json", VAE), write_json(tmp_path / "dino.json", DINO)
    if spec == "missing-folder":
        spec = str(tmp_path / "no" / "such" / "folder")
    other = ["--teacher-config", str(dino)] if flag == "--vae" else ["--vae-config", str(vae)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bindings" / "python"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "dino_bridge.prepare", "--images", str(images), "--out", str(out),
                          flag, spec, *other, "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert spec in lines[0] and config_flag in lines[0] and f"{flag} PATH" in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("grid, size, says", [
    ("default", "100x100", "multiples of 32"),
    ("default", "256x240", "multiples of 32"),  # 240 is a multiple of 16 but not of 32
    ("repa", "100x100", "multiples of 16"),
    ("default", "256x", "expected HxW"),
    ("default", "big", "expected HxW"),
])
def test_a_bad_size_is_a_one_line_error(tmp_path, capsys, grid, size, says):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--grid", grid, "--size", size,
                      "--vae-config", "x", "--dino-config", "y"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and size in err[0] and says in err[0], err


def test_prepare_says_when_there_are_no_images(tmp_path):
    with pytest.raises(SystemExit, match="no images"):
        prepare.main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--vae-config", "x", "--dino-config", "y"])
