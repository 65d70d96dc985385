"""The Python binding on numpy arrays against the PyTorch fixtures, and its argument
checks (which must fire before anything reaches C)."""

import numpy as np
import pytest
from conftest import assert_close, load

from dino_bridge import Bridge, BridgeError


@pytest.fixture
def bridge(fx):
    with Bridge(fx / "model.safetensors", lr=1e-3, warmup_steps=0) as b:
        yield b


def test_info_describes_the_fixture(bridge):
    info = bridge.info()
    assert (info["grid"], info["tokens"], info["target_dim"], info["device"]) == (4, 16, 48, -1)
    assert info["param_count"] > 100_000


def test_forward_matches_the_fixture_and_writes_in_place(bridge, fx):
    lat = load(fx, "latents.npy")
    out = bridge.forward(lat)
    assert_close(out, load(fx, "out.npy"), "forward")
    buf = np.zeros_like(out)
    assert bridge.forward(lat, out=buf) is buf
    assert_close(buf, out, "out=")
    half = bridge.forward(lat.astype(np.float16))
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), out, atol=2e-2 * np.abs(out).max())


def test_loss_gradients_match_the_fixture(bridge, fx, expected):
    loss, grad = bridge.loss_backward(load(fx, "pred_grid8.npy"), load(fx, "latents.npy"))
    assert abs(loss - expected["loss_grid8"]) <= 1e-5
    assert_close(grad, load(fx, "grad_pred_grid8.npy"), "grad_pred_grid8")
    loss, grad = bridge.latent_loss_backward(load(fx, "latents.npy"), load(fx, "target.npy"))
    assert abs(loss - expected["loss_latents"]) <= 1e-5
    assert_close(grad, load(fx, "grad_latents.npy"), "grad_latents")


def test_train_step_save_and_reload(bridge, fx, tmp_path):
    lat, tgt = load(fx, "latents.npy"), load(fx, "target.npy")
    first = bridge.train_step(lat, tgt)
    assert first["step"] == 1 and not first["skipped"] and first["grad_norm"] > 0
    for _ in range(20):
        last = bridge.train_step(lat, tgt)
    assert last["loss"] < first["loss"]
    path = tmp_path / "b.safetensors"
    bridge.save(path)
    with Bridge(path) as again:
        assert again.info()["step"] == 21
        np.testing.assert_array_equal(again.forward(lat), bridge.forward(lat))
    bad = tgt.copy()
    bad[0, 0, 0] = np.nan
    assert bridge.train_step(lat, bad)["skipped"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda lat: lat.astype(np.float64), "dtype float64"),
        (lambda lat: np.ascontiguousarray(lat[:, :, :8]), r"shape \[3, 4, 8, 16\]"),
        (lambda lat: np.asfortranarray(lat), "not C-contiguous"),
        (lambda lat: np.ascontiguousarray(lat.transpose(0, 1, 3, 2))[:, :, :, ::2], "not C-contiguous"),
        (lambda lat: lat[:0], r"shape \[0, 4, 16, 16\]"),
    ],
)
def test_bad_arrays_raise_value_error_before_c(bridge, fx, make, match):
    with pytest.raises(ValueError, match=match):
        bridge.forward(make(load(fx, "latents.npy")))


def test_mismatched_arguments(bridge, fx):
    lat = load(fx, "latents.npy")
    with pytest.raises(ValueError, match="differs"):
        bridge.loss_backward(load(fx, "pred_grid8.npy").astype(np.float16), lat)
    with pytest.raises(ValueError, match="not a g x g grid"):
        bridge.loss_backward(np.ascontiguousarray(load(fx, "pred_grid8.npy")[:, :60]), lat)
    with pytest.raises(ValueError, match=r"expected \[3, 16, 48\]"):
        bridge.latent_loss_backward(lat, load(fx, "target.npy")[:2])
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        bridge.forward(lat.tolist())
    with pytest.raises(ValueError, match="unknown setting"):
        Bridge(widht=3)


def test_library_errors_carry_status_and_message(fx, tmp_path):
    with pytest.raises(BridgeError) as e:
        Bridge(tmp_path / "missing.safetensors")
    assert e.value.status_name == "IO" and "missing.safetensors" in e.value.message
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(BridgeError) as e:
        Bridge(tmp_path / "junk.safetensors")
    assert e.value.status_name == "CHECKPOINT"
    with pytest.raises(BridgeError) as e:
        Bridge(device=0)
    assert e.value.status_name == "UNSUPPORTED" and "without CUDA" in e.value.message


def test_a_closed_bridge_raises_instead_of_crashing(fx):
    b = Bridge(fx / "model.pt")
    b.close()
    b.close()
    with pytest.raises(ValueError, match="closed"):
        b.forward(load(fx, "latents.npy"))
    with pytest.raises(ValueError, match="closed"):
        b.info()
