import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]

# Alignment's weights for the fixtures' alignment and latent losses, which were made with
# the composite loss (1, 0.25, 0.05): alignment's own default is REPA's cosine loss.
COMPOSITE = dict(align_w_cos=1.0, align_w_norm=0.25, align_w_raw=0.05)


def _fixtures(name: str) -> Path:
    base = Path(os.environ.get("DINO_BRIDGE_FIXTURES", ROOT.parent / "shared" / "fixtures"))
    path = base / name
    assert (path / "model.safetensors").is_file(), f"fixtures not found at {path}"
    return path


@pytest.fixture(scope="session")
def fx() -> Path:
    """The tiny bridge (16x16 latents, 4x4 tokens) and PyTorch's numbers for it."""
    return _fixtures("tiny")


@pytest.fixture(scope="session")
def expected(fx):
    import json

    return json.loads((fx / "expected.json").read_text())


@pytest.fixture(scope="session")
def shapes() -> Path:
    """One REPA-grid bridge (adapter_depth 1) at three latent sizes, and the alignment
    options (fixtures/README.md, `shapes/`)."""
    return _fixtures("shapes")


@pytest.fixture(scope="session")
def shapes_expected(shapes):
    import json

    return json.loads((shapes / "expected.json").read_text())


def load(fx: Path, name: str) -> np.ndarray:
    return np.load(fx / name)


def assert_close(got, want, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= 1e-4 * scale, f"{what}: max error {err} > 1e-4 * {scale}"
