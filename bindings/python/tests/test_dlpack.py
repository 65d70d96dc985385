"""ABI 3 from Python: arrays handed over through DLPack (the capsule protocol: versioned and
legacy capsules, the capsule marked used and its deleter called once, read-only outputs
refused, the CUDA stream argument), producers other than numpy and torch (JAX when it is
installed), the loss written into a caller's tensor, the capabilities query, and the
library's log messages routed into Python's `logging`."""

import ctypes
import gc
import logging
import sys

import numpy as np
import pytest
from conftest import COMPOSITE, assert_close, load

import dino_bridge
import dino_bridge.bridge as B
from dino_bridge import Bridge
from dino_bridge import _lib as L


@pytest.fixture
def bridge(fx):
    with Bridge(fx / "model.safetensors", lr=1e-3, warmup_steps=0, **COMPOSITE) as b:
        yield b


_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype, _is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]


class Producer:
    """A DLPack producer that is neither numpy nor torch: it forwards to a numpy array and
    records how it was asked (`calls`) and what it gave (`capsules`)."""

    def __init__(self, array, legacy=False, device=None):
        self.array, self.legacy, self.device = array, legacy, device
        self.calls, self.capsules = [], []

    def __dlpack_device__(self):
        return self.device or self.array.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        self.calls.append(dict(kwargs))
        if self.legacy and "max_version" in kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        kwargs.pop("stream", None)  # numpy takes no stream; a CUDA producer would wait on it
        capsule = self.array.__dlpack__(**kwargs)
        self.capsules.append(capsule)
        return capsule


@pytest.mark.parametrize("legacy", [False, True])
def test_a_capsule_is_taken_over_and_its_deleter_called_once(bridge, fx, legacy):
    """The consumer's side of the protocol: the capsule renamed `used_dltensor[_versioned]`
    (so that its destructor leaves the tensor alone) and the producer's deleter called once
    the call is over, which here drops the reference numpy's managed tensor holds."""
    lat = load(fx, "latents.npy")
    producer = Producer(lat, legacy=legacy)
    before = sys.getrefcount(lat)
    out = bridge.forward(producer)
    assert_close(out, load(fx, "out.npy"), "forward through a third producer")
    assert isinstance(out, np.ndarray)  # no array namespace: the f32 host buffer as it is (numpy)
    want = [{"max_version": (1, 0)}] + ([{}] if legacy else [])
    assert producer.calls == want
    (capsule,) = producer.capsules
    used = b"used_dltensor" if legacy else b"used_dltensor_versioned"
    assert _is_valid(capsule, used) == 1
    del capsule
    producer.capsules.clear()
    gc.collect()
    assert sys.getrefcount(lat) == before, "the deleter must have released numpy's reference, once"


def test_an_output_is_exported_writable_and_a_read_only_one_refused(bridge, fx):
    lat = load(fx, "latents.npy")
    out = Producer(np.zeros((3, 16, 48), np.float32))
    assert bridge.forward(lat, out=out) is out
    assert out.calls == [{"max_version": (1, 0), "copy": False}]
    assert_close(out.array, load(fx, "out.npy"), "out= through a third producer")
    frozen = np.zeros((3, 16, 48), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only, but the library writes it"):
        bridge.forward(lat, out=frozen)
    assert not frozen.any()
    # Inputs may be read-only (numpy exports them flagged, through the versioned protocol).
    ro = lat.copy()
    ro.flags.writeable = False
    assert_close(bridge.forward(ro), load(fx, "out.npy"), "read-only latents")


def test_layouts_dtypes_and_devices_are_checked_from_the_descriptor(bridge, fx):
    lat = load(fx, "latents.npy")
    with pytest.raises(ValueError, match=r"latents: strides \[1024, 1, 64, 4\] for shape \[3, 4, 16, 16\] are not compact row-major"):
        bridge.forward(Producer(np.ascontiguousarray(lat.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"dtype int32 is not supported \(float32, float16 or bfloat16\)"):
        bridge.forward(lat.astype(np.int32))
    with pytest.raises(ValueError, match="latents is on cuda:0 but the bridge is on cpu"):
        bridge.forward(Producer(lat, device=(L.DL_CUDA, 0)))
    with pytest.raises(ValueError, match=r"latents: DLPack device \(7, 0\) is not supported"):
        bridge.forward(Producer(lat, device=(7, 0)))
    # A size-1 dimension's stride is free (as in the library).
    one = np.ascontiguousarray(lat[:1])
    odd = np.lib.stride_tricks.as_strided(one, strides=(12345 * 4,) + one.strides[1:])
    assert_close(bridge.forward(odd), bridge.forward(one), "free stride of a size-1 dimension")


def test_a_gpu_producer_is_asked_on_the_consumer_stream(monkeypatch):
    """No GPU here: the stream argument is checked on a CUDA-bridge call with a producer
    that says it lives on CUDA device 0 (the library is not called). The DLPack protocol:
    1 is the legacy default stream (its handle 0 is forbidden as ambiguous), 2 the
    per-thread default, any other value the cudaStream_t; the library gets the handle."""
    assert [B._dlpack_stream(h) for h in (0, 2, 0x5A5A00)] == [1, 2, 0x5A5A00]

    class CudaBridge:
        _info = {"device": 0}
        device = "cuda:0"

    def run(handle):
        monkeypatch.setattr(B, "_consumer_stream", lambda obj, ordinal: handle)
        producer = Producer(np.zeros((1, 4, 16, 16), np.float32), device=(L.DL_CUDA, 0))
        with B._Call(CudaBridge()) as call:
            call.arg(producer, "latents")
            call.arg(Producer(np.zeros(1, np.float32), device=(L.DL_CUDA, 0)), "loss", writable=True)
            return producer.calls, call.stream_arg().value

    calls, passed = run(0)
    assert calls == [{"stream": 1, "max_version": (1, 0)}] and passed is None  # NULL: the legacy default
    calls, passed = run(0x5A5A00)
    assert calls == [{"stream": 0x5A5A00, "max_version": (1, 0)}] and passed == 0x5A5A00
    # Host memory on a CUDA bridge: only where the library reads it back (the loss).
    with pytest.raises(ValueError, match="latents is on cpu but the bridge is on cuda:0"):
        with B._Call(CudaBridge()) as call:
            call.arg(np.zeros(1, np.float32), "latents")
    with B._Call(CudaBridge()) as call:
        assert call.arg(np.zeros((), np.float32), "loss", writable=True, host_ok=True).host
        assert call.stream is None  # no GPU array: no stream needed


def test_a_loss_written_into_a_caller_array_and_a_named_pred_grid(bridge, fx, expected):
    lat, pred = load(fx, "latents.npy"), load(fx, "pred_grid8.npy")
    out = np.full((1,), np.nan, np.float32)
    loss, grad = bridge.loss_backward(pred, lat, loss_out=out)
    assert loss is out and abs(out[0] - expected["loss_grid8"]) <= 1e-5
    # [B, ph, pw, D] names the caller grid; the gradient keeps that shape.
    loss4, grad4 = bridge.loss_backward(pred.reshape(3, 8, 8, 48), lat)
    assert grad4.shape == (3, 8, 8, 48) and abs(loss4 - expected["loss_grid8"]) <= 1e-5
    assert_close(grad4.reshape(3, 64, 48), load(fx, "grad_pred_grid8.npy"), "grad of a 4-D pred")
    with pytest.raises(ValueError, match=r"grid=\(4, 16\) differs from pred's own grid \(8, 8\)"):
        bridge.loss_backward(pred.reshape(3, 8, 8, 48), lat, grid=(4, 16))
    lloss = np.zeros((), np.float16)
    got, _ = bridge.latent_loss_backward(lat, load(fx, "target.npy"), loss_out=lloss)
    assert got is lloss and abs(float(lloss) - expected["loss_latents"]) <= 1e-3 * expected["loss_latents"]


def test_a_non_finite_host_loss_is_the_librarys_status_and_nothing_is_written(bridge, fx):
    lat, pred = load(fx, "latents.npy"), load(fx, "pred_grid8.npy").copy()
    pred[0, 0, 0] = np.nan
    grad, out = np.zeros_like(pred), np.zeros((), np.float32)
    with pytest.raises(dino_bridge.BridgeError) as e:
        bridge.loss_backward(pred, lat, grad_out=grad, loss_out=out)
    assert e.value.status_name == "NON_FINITE"
    assert not grad.any() and out == 0


# -- JAX ---------------------------------------------------------------------------------------


def test_jax_arrays_in_and_out(bridge, fx, expected):
    jnp = pytest.importorskip("jax.numpy")
    lat, pred, tgt = load(fx, "latents.npy"), load(fx, "pred_grid8.npy"), load(fx, "target.npy")
    out = bridge.forward(jnp.asarray(lat))
    assert type(out).__module__.startswith("jax") and out.dtype == jnp.float32
    assert_close(np.asarray(out), load(fx, "out.npy"), "JAX forward")
    loss, grad = bridge.loss_backward(jnp.asarray(pred), jnp.asarray(lat))
    assert abs(loss - expected["loss_grid8"]) <= 1e-5 and type(grad).__module__.startswith("jax")
    assert_close(np.asarray(grad), load(fx, "grad_pred_grid8.npy"), "JAX grad_pred")
    # bf16 (which numpy cannot hold) next to f32 latents: each in its own dtype.
    half = jnp.asarray(pred, dtype=jnp.bfloat16)
    loss16, grad16 = bridge.loss_backward(half, jnp.asarray(lat))
    assert grad16.dtype == jnp.bfloat16
    ref, _ = bridge.loss_backward(np.asarray(half.astype(jnp.float32)), lat)
    assert abs(loss16 - ref) <= 1e-6
    lloss, lgrad = bridge.latent_loss_backward(jnp.asarray(lat), jnp.asarray(tgt))
    assert abs(lloss - expected["loss_latents"]) <= 1e-5
    assert_close(np.asarray(lgrad), load(fx, "grad_latents.npy"), "JAX grad_latents")
    assert not bridge.train_step(jnp.asarray(lat), jnp.asarray(tgt))["skipped"]


# -- capabilities and logs ---------------------------------------------------------------------


def test_capabilities_describe_this_build():
    caps = dino_bridge.capabilities()
    assert caps["abi_version"] == L.ABI_VERSION == 5
    assert caps["buffer_dtypes"] == ["float32", "float16", "bfloat16"]
    assert "float32" in caps["compute_dtypes"]
    assert caps["dlpack_version"] == (1, 0)
    assert caps["max_latent_side"] >= 64
    if not caps["cuda"]:
        assert caps["cuda_devices"] == 0 and caps["compute_dtypes"] == ["float32"]


def test_a_skipped_train_step_logs_a_warning_through_logging(bridge, fx, caplog):
    lat, tgt = load(fx, "latents.npy"), load(fx, "target.npy").copy()
    tgt[0, 0, 0] = np.nan
    logger = dino_bridge.enable_logging()
    try:
        assert logger.name == "dino_bridge"
        with caplog.at_level(logging.DEBUG, logger="dino_bridge"):
            assert bridge.train_step(lat, tgt)["skipped"]
            assert not bridge.train_step(lat, load(fx, "target.npy"))["skipped"]
    finally:
        dino_bridge.disable_logging()
    warnings = [r for r in caplog.records if r.name == "dino_bridge" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "train step 1: the loss is NaN; the update was skipped" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dino_bridge"):
        assert bridge.train_step(lat, tgt)["skipped"]
    assert not [r for r in caplog.records if r.name == "dino_bridge"], "disabled: nothing more arrives"


def test_a_log_callback_gets_levels_and_its_exceptions_stay_in_python(bridge, fx):
    lat, tgt = load(fx, "latents.npy"), load(fx, "target.npy").copy()
    tgt[:] = np.inf
    got = []

    def callback(level, message):
        got.append((level, message))
        raise RuntimeError("a callback that fails must not reach the library")

    dino_bridge.set_log_callback(callback)
    try:
        assert bridge.train_step(lat, tgt)["skipped"]
    finally:
        dino_bridge.set_log_callback(None)
    assert got and got[0][0] == logging.WARNING and "update was skipped" in got[0][1]
    assert B._log_callback is None
