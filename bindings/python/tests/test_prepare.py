"""dino_bridge.prepare end to end with small randomly initialised models (no download),
then bridge-train on what it wrote; other geometries, the DINOv2 tokens checked against an
independent forward pass, and the one-line errors."""

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
# facebook/dinov2-base's own image_size: a 37x37 position grid, so every input below makes
# Dinov2Model interpolate its position embeddings.
DINO_518 = {**DINO, "image_size": 518}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


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
    assert (meta["image_size"], meta["latent_shape"], meta["token_grid"], meta["grid"], meta["dino_input"]) == \
        ([256, 256], [4, 32, 32], [8, 8], "default", [112, 112])
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
    assert meta == {
        "count": 4,
        "vae": "random:" + str(vae),
        "dino": "random:" + str(dino),
        "scaling_factor": 0.5,
        "image_size": [128, 192],
        "latent_shape": [4, 16, 24],
        "token_grid": [8, 12],
        "grid": "repa",
        "dino_input": [112, 168],
        "images": ["img0.png", "img2.png", "sub/img1.png", "sub/img3.png"],
    }
    assert not list(out.glob("*.partial"))


def reference_tokens(model, pixels, grid):
    """DINOv2's patch tokens computed from its parts, not through Dinov2Model.forward: patch
    embedding, position embeddings resized here to `grid` (bicubic, as the DINOv2 code does),
    the encoder blocks and the final layer norm; tokens laid out explicitly as row*gw + col."""
    gh, gw = grid
    emb = model.embeddings
    patches = emb.patch_embeddings.projection(pixels)  # [B, D, gh, gw]
    assert tuple(patches.shape[2:]) == grid
    side = int(round((emb.position_embeddings.shape[1] - 1) ** 0.5))
    pos_map = emb.position_embeddings[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos_map = F.interpolate(pos_map, size=grid, mode="bicubic", align_corners=False)
    tokens = [patches[:, :, r, c] + pos_map[:, :, r, c] for r in range(gh) for c in range(gw)]
    cls = emb.cls_token[:, 0].expand(pixels.shape[0], -1) + emb.position_embeddings[:, 0]
    h = torch.stack([cls, *tokens], dim=1)
    for layer in model.encoder.layer:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    return model.layernorm(h)[:, 1:]


def test_dino_tokens_of_a_rectangular_crop_match_an_independent_forward(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**{**DINO, "num_hidden_layers": 2})).eval()
    model.save_pretrained(tmp_path / "dino")  # a local folder: the --dino PATH way in
    # 96 rows x 160 columns, default grid: 3x5 tokens (a transposed 5x3 layout would have the
    # same count but not the same values), DINOv2 at 42x70 against its 8x8 position grid.
    size, grid = (96, 160), (3, 5)
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
    vae = write_json(tmp_path / "vae.json", VAE)
    lat, tgt, meta = run_prepare(images, tmp_path / "data", "--size", "96x160",
                                 "--vae-config", str(vae), "--dino", str(tmp_path / "dino"))
    assert lat.shape == (3, 4, 12, 20) and tgt.shape == (3, 15, 768)
    assert meta["dino"] == str(tmp_path / "dino") and meta["token_grid"] == [3, 5] and meta["dino_input"] == [42, 70]

    crops = [
        np.asarray(Image.fromarray(arrays["a.png"]).resize((160, 96), Image.BICUBIC)),
        arrays["b.png"][:, 120:280],
        arrays["c.png"][102:198, :],
    ]
    x = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    assert tuple(x.shape[2:]) == size
    small = F.interpolate(x, size=(42, 70), mode="bicubic", align_corners=False, antialias=True)
    pixels = (small.clamp(0, 1) - MEAN) / STD
    with torch.no_grad():
        expected = reference_tokens(model, pixels, grid)
        # ...and the model's own forward agrees: transformers interpolated the positions itself.
        direct = model(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(direct, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(tgt.astype(np.float32), expected.numpy(), atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("flag", ["--vae", "--dino"])
@pytest.mark.parametrize("spec", ["no-such-org/no-such-model", "missing-folder"])
def test_a_model_that_does_not_load_is_a_one_line_error(tmp_path, flag, spec):
    images = write_images(tmp_path / "images", [(64, 64)])
    vae, dino = write_json(tmp_path / "vae.json", VAE), write_json(tmp_path / "dino.json", DINO)
    if spec == "missing-folder":
        spec = str(tmp_path / "no" / "such" / "folder")
    other = ["--dino-config", str(dino)] if flag == "--vae" else ["--vae-config", str(vae)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bindings" / "python"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "dino_bridge.prepare", "--images", str(images), "--out", str(out),
                          flag, spec, *other, "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert spec in lines[0] and f"{flag}-config" in lines[0] and f"{flag} PATH" in lines[0], lines[0]
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
