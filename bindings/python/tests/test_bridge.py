"""The Python binding on numpy arrays against the PyTorch fixtures (the tiny bridge, and
the `shapes` bridge at three latent sizes with every alignment option), its argument
checks (which must fire before anything reaches C), the caller-grid inference, and the
ABI: ctypes declarations against the header (ABI 3's DLPack structs, capabilities and log
callback included), and a library of another version refused."""

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import COMPOSITE, ROOT, assert_close, load

import dino_bridge.bridge as B
from dino_bridge import AbiMismatchError, Bridge, BridgeError, infer_caller_grid
from dino_bridge import _lib as L

HEADER = (ROOT / "include" / "dino_bridge.h").read_text()


@pytest.fixture
def bridge(fx):
    with Bridge(fx / "model.safetensors", lr=1e-3, warmup_steps=0, **COMPOSITE) as b:
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
        (lambda lat: np.ascontiguousarray(lat[:, :, :6]), r"sides 6x16 must be positive multiples of 4"),
        (lambda lat: np.ascontiguousarray(lat[:, :, :, :10]), r"sides 16x10 .* e\.g\. 16x12"),
        (lambda lat: np.ascontiguousarray(lat[:, :3]), r"shape \[3, 3, 16, 16\], expected \[B, 4, H, W\]"),
        (lambda lat: np.ascontiguousarray(lat[0]), r"shape \[4, 16, 16\], expected \[B, 4, H, W\]"),
        (lambda lat: np.asfortranarray(lat), "not C-contiguous"),
        (lambda lat: np.ascontiguousarray(lat.transpose(0, 1, 3, 2))[:, :, :, ::2], "not C-contiguous"),
        (lambda lat: lat[:0], r"shape \[0, 4, 16, 16\]"),
    ],
)
def test_bad_arrays_raise_value_error_before_c(bridge, fx, make, match):
    with pytest.raises(ValueError, match=match):
        bridge.forward(make(load(fx, "latents.npy")))


def test_each_array_keeps_its_own_dtype(bridge, fx, expected):
    """ABI 3: a float16 pred with float32 latents is read as it is (no conversion of
    either to the other's dtype); the gradient comes back in pred's dtype."""
    lat, pred = load(fx, "latents.npy"), load(fx, "pred_grid8.npy")
    half = pred.astype(np.float16)
    loss, grad = bridge.loss_backward(half, lat)
    assert grad.dtype == np.float16
    want_loss, want_grad = bridge.loss_backward(half.astype(np.float32), lat)  # the same values, all f32
    assert abs(loss - want_loss) <= 1e-6
    np.testing.assert_array_equal(grad, want_grad.astype(np.float16))
    out = np.zeros((3, 16, 48), np.float16)
    assert bridge.forward(lat, out=out) is out
    np.testing.assert_array_equal(out, bridge.forward(lat).astype(np.float16))


def test_mismatched_arguments(bridge, fx):
    lat = load(fx, "latents.npy")
    with pytest.raises(ValueError, match="60 tokens fit no caller grid for the bridge's token grid 4x4"):
        bridge.loss_backward(np.ascontiguousarray(load(fx, "pred_grid8.npy")[:, :60]), lat)
    with pytest.raises(ValueError, match=r"grid=\(8, 4\): the caller grid must equal .* 4x4"):
        bridge.loss_backward(load(fx, "pred_grid8.npy"), lat, grid=(8, 4))
    with pytest.raises(ValueError, match=r"pred: shape \[3, 64, 48\], expected \[3, 16, 48\]"):
        bridge.loss_backward(load(fx, "pred_grid8.npy"), lat, grid=(4, 4))
    with pytest.raises(ValueError, match=r"grid='8x8': expected \(ph, pw\)"):
        bridge.loss_backward(load(fx, "pred_grid8.npy"), lat, grid="8x8")
    with pytest.raises(ValueError, match=r"expected \[3, 16, 48\]"):
        bridge.latent_loss_backward(lat, load(fx, "target.npy")[:2])
    with pytest.raises(TypeError, match=r"expected an array with __dlpack__ \(numpy, torch, JAX, CuPy, ...\), got list"):
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


def test_explicit_caller_grids_equal_the_inferred_one(bridge, fx, expected):
    lat, pred = load(fx, "latents.npy"), load(fx, "pred_grid8.npy")
    for grid in ((8, 8), 8, np.int64(8)):
        loss, grad = bridge.loss_backward(pred, lat, grid)
        assert abs(loss - expected["loss_grid8"]) <= 1e-5
        assert_close(grad, load(fx, "grad_pred_grid8.npy"), f"grid={grid!r}")
    buf = np.zeros_like(pred)
    assert bridge.loss_backward(pred, lat, grad_out=buf)[1] is buf


# -- the caller grid ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bridge_grid, tokens, want",
    [
        ((6, 10), 240, (12, 20)),  # finer: pred pooled 2x2
        ((6, 10), 540, (18, 30)),
        ((6, 10), 60, (6, 10)),
        ((6, 10), 15, (3, 5)),  # coarser: the target pooled 2x2
        ((10, 6), 240, (20, 12)),  # the aspect decides the orientation
        ((8, 8), 256, (16, 16)),
        ((16, 16), 64, (8, 8)),
        ((4, 4), 1, (1, 1)),
        ((1, 3), 12, (2, 6)),
    ],
)
def test_the_caller_grid_is_inferred_when_one_fits(bridge_grid, tokens, want):
    assert infer_caller_grid(tokens, bridge_grid) == want


@pytest.mark.parametrize("tokens", [0, 50, 120, 61, 180, 23999])
def test_a_token_count_no_grid_fits_is_refused_with_the_counts_that_would(tokens):
    with pytest.raises(ValueError) as e:
        infer_caller_grid(tokens, (6, 10))
    msg = str(e.value)
    assert f"{tokens} tokens fit no caller grid for the bridge's token grid 6x10" in msg
    assert "15 (3x5), 60 (6x10), 240 (12x20)" in msg


def test_the_same_factor_rule_never_leaves_two_grids():
    """A caller grid the library accepts is (k*h, k*w) or (h/k, w/k), so its token count
    fixes k: inference can never be ambiguous under that rule. Checked exhaustively over
    small grids, since the ambiguity error below relies on it being unreachable."""
    for h in range(1, 13):
        for w in range(1, 13):
            fits = [t for t in range(1, 4 * h * w * 4 + 1)
                    if sum(B.grid_match((a, t // a), (h, w)) is not None for a in range(1, t + 1) if t % a == 0) > 1]
            assert not fits, ((h, w), fits)


def test_an_ambiguous_token_count_asks_for_the_grid(monkeypatch):
    """Under a looser rule (any multiple per side), 240 tokens on a 6x10 grid could be
    6x40, 12x20 or 24x10: the error must list them and ask for `grid=`."""
    def any_multiple(c, b):
        return ("pool_pred", 0) if c[0] % b[0] == 0 and c[1] % b[1] == 0 else None

    monkeypatch.setattr(B, "grid_match", any_multiple)
    with pytest.raises(ValueError, match=r"240 tokens fit more than one caller grid .* 6x10 \(6x40, 12x20, 24x10\): "
                                         r"pass grid=\(ph, pw\)"):
        infer_caller_grid(240, (6, 10))


# -- the shapes fixtures: one bridge at any latent size ------------------------------------


def _close_loss(got, want, what):
    assert abs(got - want) <= 1e-5, f"{what}: loss {got} vs {want}"


@pytest.mark.parametrize("size", ["base", "rect", "small"])
def test_forward_at_every_latent_size_matches_pytorch(shapes, shapes_expected, size):
    lat = load(shapes, f"latents_{size}.npy")
    with Bridge(shapes / "model.safetensors") as b:
        grid = b.token_grid(*lat.shape[2:])
        assert list(grid) == shapes_expected[f"grid_{size}"]
        out = b.forward(lat)
        assert out.shape == (lat.shape[0], grid[0] * grid[1], 48)
        assert_close(out, load(shapes, f"out_{size}.npy"), f"out_{size}")
        buf = np.zeros_like(out)
        assert b.forward(lat, out=buf) is buf
        half = b.forward(lat.astype(np.float16))
        np.testing.assert_allclose(half.astype(np.float32), out, atol=2e-2 * np.abs(out).max())
        with pytest.raises(ValueError, match=r"out: shape .* expected \[2, %d, 48\]" % (grid[0] * grid[1])):
            b.forward(lat, out=np.zeros((2, grid[0] * grid[1] + 1, 48), np.float32))


@pytest.mark.parametrize(
    "pred, grid, weights, name",
    [
        ("pred_fine", (12, 20), {}, "fine_repa"),  # alignment's default: REPA's loss
        ("pred_fine", (12, 20), COMPOSITE, "fine_default"),
        ("pred_coarse", (3, 5), {}, "coarse_repa"),
    ],
)
def test_alignment_at_a_finer_and_a_coarser_caller_grid_matches_pytorch(shapes, shapes_expected, pred, grid, weights,
                                                                       name):
    lat, p = load(shapes, "latents_rect.npy"), load(shapes, f"{pred}.npy")
    with Bridge(shapes / "model.safetensors", **weights) as b:
        assert b.token_grid(12, 20) == (6, 10)
        for g in (None, grid):  # inferred from the token count, then given
            loss, grad = b.loss_backward(p, lat, grid=g)
            _close_loss(loss, shapes_expected[f"loss_{name}"], f"{name} grid={g}")
            assert_close(grad, load(shapes, f"grad_pred_{name}.npy"), f"grad_pred_{name} grid={g}")


@pytest.mark.parametrize("case, pred", [("same", "pred_same"), ("fine", "pred_fine"), ("coarse", "pred_coarse")])
def test_w_gram_and_spatial_norm_gamma_reach_the_library(shapes, shapes_expected, case, pred):
    lat, p = load(shapes, "latents_rect.npy"), load(shapes, f"{pred}.npy")
    gamma, gram = shapes_expected["spatial_norm_gamma"], shapes_expected["w_gram"]
    want = shapes_expected[f"loss_{case}_spatialnorm0.6_gram0.5"]
    with Bridge(shapes / "model.safetensors", **COMPOSITE) as plain:
        before, _ = plain.loss_backward(p, lat)
    assert abs(before - want) > 1e-2, "the options must change the loss for this check to mean anything"
    with Bridge(shapes / "model.safetensors", align_w_gram=gram, spatial_norm_gamma=gamma, **COMPOSITE) as b:
        loss, grad = b.loss_backward(p, lat)
        _close_loss(loss, want, f"{case} with spatial_norm_gamma {gamma}, w_gram {gram}")
        assert_close(grad, load(shapes, f"grad_pred_{case}_spatialnorm0.6_gram0.5.npy"), case)
    with Bridge(shapes / "model.safetensors", align_w_gram=gram, **COMPOSITE) as gram_only:
        only, _ = gram_only.loss_backward(p, lat)
    assert abs(only - before) > 1e-4 and abs(only - want) > 1e-4, "each option changes the loss on its own"


def test_a_one_token_loss_grid_with_spatial_norm_is_the_librarys_invalid_argument(shapes):
    lat = np.ascontiguousarray(load(shapes, "latents_small.npy")[:, :, :2, :2])  # a 1x1 token grid
    with Bridge(shapes / "model.safetensors", spatial_norm_gamma=0.6) as b:
        with pytest.raises(BridgeError) as e:
            b.loss_backward(np.ones((2, 1, 48), np.float32), lat)
        assert e.value.status_name == "INVALID_ARGUMENT" and "spatial_norm_gamma" in e.value.message


def test_latent_loss_and_train_step_on_rectangular_latents_match_pytorch(shapes, shapes_expected, tmp_path):
    lat, tgt = load(shapes, "latents_rect.npy"), load(shapes, "target_rect.npy")
    want = shapes_expected["loss_rect_train_gram0.5"]
    # spatial_norm_gamma applies to alignment only: the latent loss and training ignore it.
    # The latent loss weighs with alignment's weights, a train step with training's.
    gram = shapes_expected["w_gram"]
    settings = dict(w_gram=gram, align_w_gram=gram, spatial_norm_gamma=0.6, lr=1e-3, warmup_steps=0, **COMPOSITE)
    with Bridge(shapes / "model.safetensors", **settings) as b:
        loss, grad = b.latent_loss_backward(lat, tgt)
        _close_loss(loss, want, "latent loss, rect, w_gram 0.5")
        assert_close(grad, load(shapes, "grad_latents_rect.npy"), "grad_latents_rect")
        first = b.train_step(lat, tgt)  # dropout 0: the loss before the update is the same one
        _close_loss(first["loss"], want, "first train step, rect, w_gram 0.5")
        assert first["step"] == 1 and not first["skipped"] and first["grad_norm"] > 0
        for _ in range(10):
            last = b.train_step(lat, tgt)
        assert last["loss"] < first["loss"]
        # Another size in the same run (aspect buckets): the same weights.
        small = b.train_step(load(shapes, "latents_small.npy"), load(shapes, "out_small.npy"))
        assert small["step"] == 12 and not small["skipped"]
        path = tmp_path / "rect.safetensors"
        b.save(path)
        with Bridge(path) as again:
            np.testing.assert_array_equal(again.forward(lat), b.forward(lat))
        with pytest.raises(ValueError, match=r"target: shape \[2, 16, 48\], expected \[2, 60, 48\]"):
            b.latent_loss_backward(lat, load(shapes, "out_base.npy"))
        with pytest.raises(ValueError, match=r"targets: shape \[2, 60, 48\], expected \[2, 6, 48\]"):
            b.train_step(load(shapes, "latents_small.npy"), tgt)
        with pytest.raises(ValueError, match="sides 12x19 must be positive multiples of 2"):
            b.latent_loss_backward(np.ascontiguousarray(lat[..., :19]), tgt)


def test_rectangular_alignment_checks_run_before_c(shapes):
    lat, fine = load(shapes, "latents_rect.npy"), load(shapes, "pred_fine.npy")
    with Bridge(shapes / "model.safetensors") as b:
        with pytest.raises(ValueError, match="120 tokens fit no caller grid for the bridge's token grid 6x10"):
            b.loss_backward(np.ascontiguousarray(fine[:, :120]), lat)
        with pytest.raises(ValueError, match=r"grid=\(24, 10\)"):
            b.loss_backward(fine, lat, grid=(24, 10))
        with pytest.raises(ValueError, match=r"grid=\(20, 12\)"):  # the transposed grid
            b.loss_backward(fine, lat, grid=(20, 12))
        with pytest.raises(ValueError, match="sides 13x20"):
            b.loss_backward(fine, np.zeros((2, 4, 13, 20), np.float32))


# -- the ABI --------------------------------------------------------------------------------


def test_the_library_speaks_the_headers_abi():
    header = int(re.search(r"#define BRIDGE_ABI_VERSION (\d+)", HEADER).group(1))
    assert L.ABI_VERSION == header == L.lib().bridge_abi_version() == 5


@pytest.mark.parametrize("package_version", [4, 6])
def test_a_library_of_another_abi_is_refused_naming_both_versions(monkeypatch, package_version):
    monkeypatch.setattr(L, "_lib", None)
    monkeypatch.setattr(L, "ABI_VERSION", package_version)
    for attempt in (L.lib, Bridge):
        with pytest.raises(AbiMismatchError) as e:
            attempt()
        msg = str(e.value)
        assert f"has ABI version 5, but this dino_bridge package was written for ABI version {package_version}" in msg
        assert str(L.library_path()) in msg
        assert (e.value.library_version, e.value.expected) == (5, package_version)
        assert isinstance(e.value, OSError)
        assert L._lib is None, "a refused library must not be kept"


_CTYPES = {ctypes.c_uint32: "uint32_t", ctypes.c_int32: "int32_t", ctypes.c_int64: "int64_t",
           ctypes.c_uint64: "uint64_t", ctypes.c_float: "float", ctypes.c_char_p: "char*", ctypes.c_void_p: "void*",
           ctypes.c_uint8: "uint8_t", ctypes.c_uint16: "uint16_t", ctypes.c_char: "char"}


def _c_type(t: str) -> str:
    t = re.sub(r"\b(const|struct)\b", " ", t)
    return re.sub(r"\s+", "", t)


def _py_type(t) -> set:
    if t is L.BridgeLogCallback:
        return {"BridgeLogCallback"}
    if isinstance(t, type) and issubclass(t, ctypes.Structure):  # a struct by value (DLTensor.device)
        return {t.__name__}
    if t in _CTYPES:
        c = _CTYPES[t]
        return {c, "BridgeHandle*"} if c == "void*" else {c}
    if hasattr(t, "_type_"):  # POINTER(x)
        inner = t._type_
        return {x + "*" for x in _py_type(inner)} if inner in _CTYPES else {inner.__name__ + "*"}
    raise AssertionError(f"unmapped ctypes type {t}")


@pytest.mark.parametrize("struct", ["BridgeParams", "BridgeInfo", "BridgeStepStats", "BridgeCapabilities",
                                    "BridgeParamInfo", "DLDevice", "DLDataType", "DLTensor"])
def test_ctypes_structs_mirror_the_header(struct):
    # BridgeX is `typedef struct BridgeX {...} BridgeX;`, the DLPack ones `typedef struct {...} DLX;`.
    body = re.search(r"typedef struct (?:%s )?\{([^{}]*)\} %s;" % (struct, struct), HEADER).group(1)
    body = re.sub(r"/\*.*?\*/", "", body)
    c_fields = [(m.group(2), _c_type(m.group(1)), m.group(3))
                for m in re.finditer(r"^\s*([\w][\w *]*?)(\w+)(?:\[(\w+)\])?;\s*$", body, re.M)]
    assert c_fields, struct
    py_fields = getattr(L, struct)._fields_
    assert [n for n, _ in py_fields] == [n for n, _, _ in c_fields]
    for (name, pt), (_, ct, length) in zip(py_fields, c_fields):
        if length is not None:  # an array: `T name[LEN]`, LEN a #define of the header
            n = int(re.search(r"#define %s (\d+)" % length, HEADER).group(1)) if not length.isdigit() else int(length)
            assert getattr(pt, "_length_", None) == n, f"{struct}.{name}: C [{length}] = {n}, ctypes {pt}"
            pt = pt._type_
        assert ct in _py_type(pt), f"{struct}.{name}: C {ct}, ctypes {pt}"
    if struct == "BridgeParams":
        assert [n for n, _ in py_fields[-6:]] == ["w_gram", "spatial_norm_gamma", "align_w_cos", "align_w_norm",
                                                  "align_w_raw", "align_w_gram"]


def test_the_dlpack_constants_and_the_log_callback_mirror_the_header():
    for name in ("DL_CPU", "DL_CUDA", "DL_CUDA_HOST", "DL_CUDA_MANAGED", "BRIDGE_LOG_DEBUG", "BRIDGE_LOG_INFO",
                 "BRIDGE_LOG_WARN", "BRIDGE_LOG_ERROR"):
        value = int(re.search(r"#define %s (-?\d+)" % name, HEADER).group(1))
        assert getattr(L, name.replace("BRIDGE_", "")) == value, name
    m = re.search(r"typedef (\w+) \(\*BridgeLogCallback\)\((.*?)\);", HEADER)
    ret, args = m.group(1), [_c_type(re.match(r"(.*?)(\w+)$", a.strip()).group(1)) for a in m.group(2).split(",")]
    assert ret == "void" and L.BridgeLogCallback._restype_ is None
    assert [c in _py_type(t) for c, t in zip(args, L.BridgeLogCallback._argtypes_)] == [True] * 3, args
    # The DLPack managed tensors (dlpack.h, not this header): the layout DLPack 1.x defines.
    P = ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(L.DLTensor) == 48 if P == 8 else True
    assert L.DLManagedTensor.dl_tensor.offset == 0 and L.DLManagedTensor.deleter.offset == ctypes.sizeof(L.DLTensor) + P
    assert (L.DLManagedTensorVersioned.manager_ctx.offset, L.DLManagedTensorVersioned.deleter.offset,
            L.DLManagedTensorVersioned.flags.offset, L.DLManagedTensorVersioned.dl_tensor.offset) == (8, 8 + P, 8 + 2 * P,
                                                                                                      16 + 2 * P)


def test_ctypes_signatures_mirror_the_header():
    funcs = {}
    for ret, name, args in re.findall(r"^([\w ][\w *]*?)(bridge_\w+)\((.*?)\);$", HEADER, re.M):
        types = [] if args.strip() == "void" else [_c_type(re.match(r"(.*?)(\w+)$", a.strip()).group(1))
                                                   for a in args.split(",")]
        funcs[name] = (_c_type(ret), types)
    assert set(funcs) == set(L._SIGNATURES)
    for name, (restype, argtypes) in L._SIGNATURES.items():
        c_ret, c_args = funcs[name]
        assert c_ret in _py_type(restype), name
        assert len(argtypes) == len(c_args), f"{name}: {len(argtypes)} ctypes arguments, {len(c_args)} in C"
        for i, (pt, ct) in enumerate(zip(argtypes, c_args)):
            assert ct in _py_type(pt), f"{name} argument {i}: C {ct}, ctypes {pt}"


@pytest.mark.parametrize("struct", ["DLPackVersion", "DLManagedTensor", "DLManagedTensorVersioned", "DLTensor"])
def test_the_managed_tensor_mirrors_follow_the_real_dlpack_h(struct):
    """The capsule's structs are not in our header: check them against the dlpack.h the
    torch wheel ships (field names and order; the C types as in the header test)."""
    torch = pytest.importorskip("torch")
    path = Path(torch.__file__).parent / "include" / "ATen" / "dlpack.h"
    if not path.is_file():
        pytest.skip(f"no dlpack.h at {path}")
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    body = re.search(r"typedef struct (?:%s )?\{([^{}]*)\} %s;" % (struct, struct), text).group(1)
    names = [re.sub(r"^\(\*(\w+)\).*", r"\1", m.group(2)) for m in
             re.finditer(r"^\s*([\w][\w *]*?)\s*(\(\*\w+\)\([^)]*\)|\w+);\s*$", body, re.M)]
    assert [n for n, _ in getattr(L, struct)._fields_] == names
