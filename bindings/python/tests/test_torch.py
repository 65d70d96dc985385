"""The torch side: tensors in and out, and the autograd wrappers against torch.autograd
on the same loss written in PyTorch, on square and rectangular latents, at caller grids
finer and coarser than the bridge's."""

import numpy as np
import pytest
from conftest import COMPOSITE, assert_close, load

torch = pytest.importorskip("torch")

from dino_bridge import Bridge  # noqa: E402
from dino_bridge.torch import AlignLoss, LatentLoss  # noqa: E402


def reference_loss(pred, target, w=(1.0, 0.25, 0.05), w_gram=0.0):
    """DESIGN.md's loss in PyTorch."""
    dot = (pred * target).sum(-1)
    cos = dot / (pred.norm(dim=-1).clamp_min(1e-8) * target.norm(dim=-1).clamp_min(1e-8))
    n = lambda a: a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    loss = w[0] * (1 - cos).mean() + w[1] * ((n(pred) - n(target)) ** 2).mean() + w[2] * ((pred - target) ** 2).mean()
    if w_gram:
        def c(x):
            u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            return u @ u.transpose(1, 2)

        loss = loss + w_gram * ((c(pred) - c(target)) ** 2).mean()
    return loss


def pool(tokens, grid, k):
    """Average-pools [B, h*w, D] on the row-major grid (h, w) by k x k."""
    b, _, d = tokens.shape
    h, w = grid
    return tokens.reshape(b, h // k, k, w // k, k, d).mean(dim=(2, 4)).reshape(b, (h // k) * (w // k), d)


def spatial_norm(x, gamma):
    y = x - gamma * x.mean(dim=1, keepdim=True)
    return y / (y.std(dim=1, unbiased=False, keepdim=True) + 1e-6)


@pytest.fixture
def bridge(fx):
    with Bridge(fx / "model.safetensors", **COMPOSITE) as b:
        yield b


def test_align_loss_gradient_equals_autograd_on_the_pooled_loss(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    pred = torch.from_numpy(load(fx, "pred_grid8.npy")).requires_grad_(True)
    loss = AlignLoss(bridge)(pred, lat)
    loss.backward()
    ours = pred.grad.clone()

    ref_pred = pred.detach().double().requires_grad_(True)
    target = torch.from_numpy(np.asarray(bridge.forward(load(fx, "latents.npy")))).double()
    b, _, d = ref_pred.shape
    pooled = ref_pred.view(b, 4, 2, 4, 2, d).mean(dim=(2, 4)).reshape(b, 16, d)
    ref = reference_loss(pooled, target)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    scale = ref_pred.grad.abs().max().item()
    assert (ours.double() - ref_pred.grad).abs().max().item() <= 1e-4 * scale


def test_align_loss_scales_with_the_upstream_gradient_and_takes_bf16(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    pred = torch.from_numpy(load(fx, "pred_grid8.npy")).requires_grad_(True)
    (3.0 * AlignLoss(bridge)(pred, lat)).backward()
    g3 = pred.grad.clone()
    pred.grad = None
    AlignLoss(bridge)(pred, lat).backward()
    torch.testing.assert_close(g3, 3.0 * pred.grad)

    p16 = pred.detach().bfloat16().requires_grad_(True)
    loss = AlignLoss(bridge)(p16, lat)
    loss.backward()
    assert p16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p16.grad.float(), pred.grad, atol=2e-3 * pred.grad.abs().max().item(), rtol=0.05)


def test_latent_loss_matches_the_fixture(bridge, fx, expected):
    lat = torch.from_numpy(load(fx, "latents.npy")).requires_grad_(True)
    loss = LatentLoss(bridge)(lat, torch.from_numpy(load(fx, "target.npy")))
    loss.backward()
    assert abs(loss.item() - expected["loss_latents"]) <= 1e-5
    want = torch.from_numpy(load(fx, "grad_latents.npy"))
    assert (lat.grad - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_torch_tensors_are_checked(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    out = bridge.forward(lat)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 16, 48)
    with pytest.raises(ValueError, match="not contiguous"):
        bridge.forward(lat.transpose(2, 3))
    with pytest.raises(ValueError, match="device meta"):
        bridge.forward(torch.empty(3, 4, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        bridge.forward(lat.double())


# -- rectangular latents (the shapes fixtures: 12x20 latents, a 6x10 bridge grid) ---------


@pytest.fixture
def rect(shapes):
    with Bridge(shapes / "model.safetensors", **COMPOSITE) as b:
        yield b


def test_forward_on_rectangular_tensors(rect, shapes):
    for size, grid in (("rect", (6, 10)), ("small", (2, 3)), ("base", (4, 4))):
        lat = torch.from_numpy(load(shapes, f"latents_{size}.npy"))
        out = rect.forward(lat)
        assert isinstance(out, torch.Tensor) and out.shape == (2, grid[0] * grid[1], 48)
        assert_close(out.numpy(), load(shapes, f"out_{size}.npy"), size)
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    bf = rect.forward(lat.bfloat16())
    assert bf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sides 12x15 must be positive multiples of 2"):
        rect.forward(lat[..., :15].contiguous())


@pytest.mark.parametrize(
    "pred, grid, weights, name",
    [
        ("pred_fine", (12, 20), {}, "fine_repa"),  # alignment's default: REPA's loss
        ("pred_fine", (12, 20), COMPOSITE, "fine_default"),
        ("pred_coarse", (3, 5), {}, "coarse_repa"),
        ("pred_fine", (12, 20), dict(align_w_gram=0.5, spatial_norm_gamma=0.6, **COMPOSITE),
         "fine_spatialnorm0.6_gram0.5"),
        ("pred_coarse", (3, 5), dict(align_w_gram=0.5, spatial_norm_gamma=0.6, **COMPOSITE),
         "coarse_spatialnorm0.6_gram0.5"),
        ("pred_same", (6, 10), dict(align_w_gram=0.5, spatial_norm_gamma=0.6, **COMPOSITE),
         "same_spatialnorm0.6_gram0.5"),
    ],
)
def test_align_loss_on_rectangular_latents_matches_pytorch(shapes, shapes_expected, pred, grid, weights, name):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    want = torch.from_numpy(load(shapes, f"grad_pred_{name}.npy"))
    # A path and settings: AlignLoss makes the Bridge; the grid given once, per call, or inferred.
    align = AlignLoss(shapes / "model.safetensors", pred_grid=grid, **weights)
    inferred = AlignLoss(align.bridge)
    for call in (lambda p: align(p, lat), lambda p: inferred(p, lat), lambda p: inferred(p, lat, grid=grid)):
        p = torch.from_numpy(load(shapes, f"{pred}.npy")).requires_grad_(True)
        loss = call(p)
        loss.backward()
        assert abs(loss.item() - shapes_expected[f"loss_{name}"]) <= 1e-5, name
        assert (p.grad - want).abs().max().item() <= 1e-4 * want.abs().max().item(), name
    align.bridge.close()


@pytest.mark.parametrize("case, grid, k", [("fine", (12, 20), 2), ("coarse", (3, 5), 2)])
def test_align_loss_gradient_equals_autograd_at_finer_and_coarser_grids(rect, shapes, case, grid, k):
    """Independent of the fixtures' gradients: torch.autograd on DESIGN.md's loss, with the
    finer of the two grids pooled to the coarser."""
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    pred = torch.from_numpy(load(shapes, f"pred_{case}.npy")).requires_grad_(True)
    loss = AlignLoss(rect)(pred, lat)
    loss.backward()
    ref_pred = pred.detach().double().requires_grad_(True)
    target = rect.forward(lat).double()
    if case == "fine":
        ref = reference_loss(pool(ref_pred, grid, k), target)
    else:
        ref = reference_loss(ref_pred, pool(target, (6, 10), k))
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert (pred.grad.double() - ref_pred.grad).abs().max().item() <= 1e-4 * ref_pred.grad.abs().max().item()


def test_spatial_norm_and_gram_equal_autograd_on_a_coarse_grid(shapes):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    with Bridge(shapes / "model.safetensors", align_w_gram=0.5, spatial_norm_gamma=0.6, **COMPOSITE) as b:
        pred = torch.from_numpy(load(shapes, "pred_coarse.npy")).requires_grad_(True)
        loss = AlignLoss(b)(pred, lat)
        loss.backward()
        ref_pred = pred.detach().double().requires_grad_(True)
        target = spatial_norm(pool(b.forward(lat).double(), (6, 10), 2), 0.6)
        ref = reference_loss(ref_pred, target, w_gram=0.5)
        ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert (pred.grad.double() - ref_pred.grad).abs().max().item() <= 1e-4 * ref_pred.grad.abs().max().item()


def test_align_loss_refuses_a_token_count_no_grid_fits(rect, shapes):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    pred = torch.zeros(2, 120, 48, requires_grad=True)
    with pytest.raises(ValueError, match="120 tokens fit no caller grid for the bridge's token grid 6x10"):
        AlignLoss(rect)(pred, lat)
    with pytest.raises(ValueError, match=r"grid=\(10, 12\)"):
        AlignLoss(rect, pred_grid=(10, 12))(pred, lat)


def test_latent_loss_and_train_step_on_rectangular_tensors(shapes, shapes_expected):
    tgt = torch.from_numpy(load(shapes, "target_rect.npy"))
    with Bridge(shapes / "model.safetensors", w_gram=0.5, align_w_gram=0.5, lr=1e-3, warmup_steps=0,
                **COMPOSITE) as b:
        lat = torch.from_numpy(load(shapes, "latents_rect.npy")).requires_grad_(True)
        loss = LatentLoss(b)(lat, tgt)
        (2.0 * loss).backward()
        assert abs(loss.item() - shapes_expected["loss_rect_train_gram0.5"]) <= 1e-5
        want = 2.0 * torch.from_numpy(load(shapes, "grad_latents_rect.npy"))
        assert (lat.grad - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        first = b.train_step(lat.detach(), tgt)
        assert abs(first["loss"] - shapes_expected["loss_rect_train_gram0.5"]) <= 1e-5
        for _ in range(5):
            last = b.train_step(lat.detach(), tgt)
        assert last["loss"] < first["loss"] and last["step"] == 6


# -- custom ops: torch.compile, autocast ----------------------------------------------------

from dino_bridge.torch import bridge_key  # noqa: E402


def _projector(seed=0, width=32, dim=48):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.SiLU(), torch.nn.Linear(64, dim))


def _grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


def test_the_ops_pass_opcheck(bridge, fx):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch with
    dynamic shapes, as torch.library checks them."""
    lat = torch.from_numpy(load(fx, "latents.npy"))
    pred = torch.from_numpy(load(fx, "pred_grid8.npy")).requires_grad_(True)
    key = bridge_key(bridge)
    for grid, per_sample in (([], False), ([8, 8], False), ([], True)):
        torch.library.opcheck(torch.ops.dino_bridge.align_loss.default, (pred, lat, key, grid, per_sample, False))
    for per_sample in (False, True):
        torch.library.opcheck(torch.ops.dino_bridge.latent_loss.default,
                              (lat.clone().requires_grad_(True), torch.from_numpy(load(fx, "target.npy")), key,
                               per_sample, False))


def test_a_compiled_alignment_step_has_no_graph_break_and_matches_eager(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    hidden = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(1))
    proj = _projector()
    align = AlignLoss(bridge)

    def step(h, latents):
        return align(proj(h), latents)

    explained = torch._dynamo.explain(step)(hidden, lat)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = step(hidden, lat)
    eager.backward()
    want = _grads(proj)
    proj.zero_grad()
    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss = compiled(hidden, lat)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for got, ref in zip(_grads(proj), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_a_compiled_latent_loss_step_has_no_graph_break_and_matches_eager(bridge, fx):
    """A decoder's predicted latents scored in DINO space; with dynamic shapes (two batch
    sizes through one graph)."""
    x = torch.from_numpy(load(fx, "latents.npy"))
    target = torch.from_numpy(load(fx, "target.npy"))
    torch.manual_seed(0)
    decoder = torch.nn.Conv2d(4, 4, 3, padding=1)
    latent = LatentLoss(bridge)

    def step(inp, tgt):
        return latent(decoder(inp), tgt)

    explained = torch._dynamo.explain(step)(x, target)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for b in (3, 2):
        decoder.zero_grad()
        eager = step(x[:b], target[:b])
        eager.backward()
        want = _grads(decoder)
        decoder.zero_grad()
        loss = compiled(x[:b], target[:b])
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
        for got, ref in zip(_grads(decoder), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_under_autocast_the_bridge_reads_the_latents_unrounded(bridge, fx):
    """pred comes out of the projector in bf16 under autocast; the latents stay f32 and
    must reach the bridge as f32 (the ABI 2 wrapper rounded them to pred's dtype). The
    result must equal the library's all-f32 result on the same (bf16-valued) pred: the
    same loss, and pred's gradient the f32 one rounded to bf16."""
    lat = torch.from_numpy(load(fx, "latents.npy"))
    hidden = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(2))
    proj = _projector(1)
    align = AlignLoss(bridge)
    seen = []
    original = bridge.loss_backward

    def spy(pred, latents, *args, **kwargs):
        seen.append((pred.dtype, latents.dtype))
        return original(pred, latents, *args, **kwargs)

    bridge.loss_backward = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = proj(hidden)
            pred.retain_grad()
            loss = align(pred, lat)
        loss.backward()
    finally:
        del bridge.loss_backward
    assert pred.dtype == torch.bfloat16 and seen == [(torch.bfloat16, torch.float32)]
    assert loss.dtype == torch.float32 and pred.grad.dtype == torch.bfloat16
    ref_loss, ref_grad = bridge.loss_backward(pred.detach().float(), lat)  # exact: the bf16 values in f32
    assert abs(loss.item() - ref_loss) <= 1e-6 * abs(ref_loss)
    torch.testing.assert_close(pred.grad, ref_grad.bfloat16(), rtol=0, atol=0)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in proj.parameters())


def test_under_autocast_the_bridges_target_is_the_f32_runs(bridge, fx):
    """A bf16 pred close to the target, f32 latents, under autocast. (1) The loss, small and
    so sensitive to the target, equals the all-f32 run's on the same pred values; with the
    latents rounded to bf16 it moves by half. (2) The target itself, recovered from a
    raw-MSE-only loss (d/dpred of mean((pool(pred) - t)^2), scaled, is pool(pred) - t
    spread back), equals the f32 latents' target to the bf16 gradient's precision, 160x
    closer than the rounded latents' target is."""
    lat = torch.from_numpy(load(fx, "latents.npy"))
    target, rounded_target = bridge.forward(lat), bridge.forward(lat.bfloat16().float())
    assert (target - rounded_target).abs().max() > 1e-3
    # pred on the caller grid 8x8 (the bridge's is 4x4): the target repeated 2x2, in bf16.
    near = target.reshape(3, 4, 1, 4, 1, 48).expand(3, 4, 2, 4, 2, 48).reshape(3, 64, 48).bfloat16()

    pred = near.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AlignLoss(bridge)(pred, lat)
    f32_loss, _ = bridge.loss_backward(near.float(), lat)
    rounded_loss, _ = bridge.loss_backward(near.float(), lat.bfloat16().float())
    assert abs(rounded_loss - f32_loss) > 0.1 * f32_loss
    assert abs(loss.item() - f32_loss) <= 1e-3 * f32_loss, (loss.item(), f32_loss, rounded_loss)

    with Bridge(fx / "model.safetensors", align_w_cos=0.0, align_w_norm=0.0, align_w_raw=1.0) as raw:
        pred = near.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (AlignLoss(raw)(pred, lat) * (pred.numel() / 2)).backward()
    recovered = (pred.detach().float() - pred.grad.float()).reshape(3, 4, 2, 4, 2, 48).mean(dim=(2, 4))
    recovered = recovered.reshape(3, 16, 48)
    err = (recovered - target).abs().max().item()
    assert err <= 1e-4, err
    assert (recovered - rounded_target).abs().max().item() > 10 * err


def test_a_compiled_step_under_autocast_matches_eager(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    hidden = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(3))
    proj = _projector(2)
    align = AlignLoss(bridge)

    def step(h, latents):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return align(proj(h), latents)

    explained = torch._dynamo.explain(step)(hidden, lat)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = step(hidden, lat)
    eager.backward()
    want = _grads(proj)
    proj.zero_grad()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, lat)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for got, ref in zip(_grads(proj), want):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-5)


def test_the_loss_is_a_0d_float32_tensor_written_by_the_library(bridge, fx):
    lat = torch.from_numpy(load(fx, "latents.npy"))
    pred = torch.from_numpy(load(fx, "pred_grid8.npy"))
    loss = AlignLoss(bridge)(pred, lat)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cpu"
    out = torch.full((), float("nan"))
    got, _ = bridge.loss_backward(pred, lat, loss_out=out)
    assert got is out and out.item() == loss.item()
    with pytest.raises(ValueError, match=r"loss_out: shape \[2\], expected one element"):
        bridge.loss_backward(pred, lat, loss_out=torch.zeros(2))
    with pytest.raises(ValueError, match=r"grid='8x8': expected \(ph, pw\)"):
        AlignLoss(bridge)(pred, lat, grid="8x8")
