"""The torch side: tensors in and out, and the autograd wrappers against torch.autograd
on the same loss written in PyTorch."""

import numpy as np
import pytest
from conftest import load

torch = pytest.importorskip("torch")

from dino_bridge import Bridge  # noqa: E402
from dino_bridge.torch import AlignLoss, LatentLoss  # noqa: E402


def reference_loss(pred, target, w=(1.0, 0.25, 0.05)):
    """DESIGN.md's loss in PyTorch."""
    dot = (pred * target).sum(-1)
    cos = dot / (pred.norm(dim=-1).clamp_min(1e-8) * target.norm(dim=-1).clamp_min(1e-8))
    n = lambda a: a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return w[0] * (1 - cos).mean() + w[1] * ((n(pred) - n(target)) ** 2).mean() + w[2] * ((pred - target) ** 2).mean()


@pytest.fixture
def bridge(fx):
    with Bridge(fx / "model.safetensors") as b:
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
