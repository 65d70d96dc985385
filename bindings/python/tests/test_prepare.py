"""dino_bridge.prepare end to end with small randomly initialised models (no download),
then bridge-train on what it wrote."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
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


def test_prepare_writes_latents_and_tokens_that_bridge_train_reads(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 256), (256, 400), (512, 512), (260, 270), (640, 300)]):
        where = images / "sub" if i % 2 else images
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(where / f"img{i}.png")
    (tmp_path / "vae.json").write_text(json.dumps(VAE))
    (tmp_path / "dino.json").write_text(json.dumps(DINO))
    out = tmp_path / "data"
    prepare.main(["--images", str(images), "--out", str(out), "--vae-config", str(tmp_path / "vae.json"),
                  "--dino-config", str(tmp_path / "dino.json"), "--batch", "2", "--device", "cpu", "--quiet"])
    lat, tgt = np.load(out / "latents.npy"), np.load(out / "targets.npy")
    assert lat.shape == (5, 4, 32, 32) and lat.dtype == np.float16
    assert tgt.shape == (5, 64, 768) and tgt.dtype == np.float16
    assert np.isfinite(lat).all() and np.isfinite(tgt).all() and lat.astype(np.float32).std() > 0 and tgt.astype(np.float32).std() > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scaling_factor"] == 0.5 and meta["count"] == 5 and len(meta["images"]) == 5
    assert not list(out.glob("*.partial"))

    exe = Path(os.environ.get("BRIDGE_TRAIN", ROOT / "target" / "release" / "bridge-train"))
    run = subprocess.run([str(exe), "train", "--data", str(out), "--out", str(tmp_path / "run"), "--config", "small",
                          "--epochs", "1", "--batch", "2", "--val-count", "2", "--pool", "2", "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "run" / "latest.safetensors").is_file()


def test_prepare_says_when_there_are_no_images(tmp_path):
    with pytest.raises(SystemExit, match="no images"):
        prepare.main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--vae-config", "x", "--dino-config", "y"])
