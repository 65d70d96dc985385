"""What a REPA user meets first (ABI 4): `AlignLoss` out of the box is REPA's projection loss
(value and gradient, whatever the projections' scale), per-sample losses with their
gradients, REPA's list of projections, arrays of the wrong kind refused in one line, shape
messages that say where a size comes from, and non-finite input raised or propagated for
`GradScaler`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load

from dino_bridge import Bridge, BridgeError
from dino_bridge.torch import AlignLoss, LatentLoss


@pytest.fixture
def repa_bridge(shapes):
    """A REPA-grid bridge (6x10 tokens for 12x20 latents), with the library's default
    settings: alignment is REPA's loss unless told otherwise."""
    with Bridge(shapes / "model.safetensors") as b:
        yield b


def repa_proj_loss(zs, zs_tilde):
    """REPA's `SILoss` projection term (loss.py), as REPA computes and logs it."""
    proj_loss, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += -(z_j * z_tilde_j).sum(dim=-1).mean()  # mean_flat over tokens
    return proj_loss / (len(zs) * bsz)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_the_default_align_loss_is_repas_cosine_loss(repa_bridge, shapes, scale):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    base = torch.from_numpy(load(shapes, "pred_same.npy"))  # [2, 60, 48] on the bridge's grid
    pred = (scale * base).requires_grad_(True)
    align = AlignLoss(repa_bridge)
    loss = align(pred, lat)
    loss.backward()

    ref_pred = (scale * base).double().requires_grad_(True)
    target = torch.from_numpy(np.asarray(repa_bridge.forward(lat.numpy()))).double()
    ref = repa_proj_loss([target], [ref_pred])  # zs = [bridge.forward(x)], REPA's loss.py untouched
    ref.backward()
    # REPA logs mean(-cos); the bridge's loss is mean(1 - cos): one more, the same gradient.
    assert abs(loss.item() - (ref.item() + 1.0)) <= 1e-5, (loss.item(), ref.item())
    assert abs(align.repa_logged(loss).item() - ref.item()) <= 1e-5
    err = (pred.grad.double() - ref_pred.grad).abs().max().item()
    assert err <= 1e-4 * ref_pred.grad.abs().max().item(), err


def test_the_loss_is_scale_free_and_the_training_loss_is_another(repa_bridge, shapes):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    base = torch.from_numpy(load(shapes, "pred_same.npy"))
    align = AlignLoss(repa_bridge)
    assert abs(align(base, lat).item() - align(10 * base, lat).item()) <= 1e-6
    # The training loss's weights (w_*) do not reach alignment; align_w_* do.
    with Bridge(repa_bridge_path(shapes), w_cos=0.0, w_norm=0.0, w_raw=1.0) as other_training:
        assert abs(AlignLoss(other_training)(base, lat).item() - align(base, lat).item()) <= 1e-6
    with Bridge(repa_bridge_path(shapes), align_w_raw=1.0) as raw:
        assert AlignLoss(raw)(10 * base, lat).item() > AlignLoss(raw)(base, lat).item() + 1.0
    settings = repa_bridge.settings()
    assert (settings["align_w_cos"], settings["align_w_norm"], settings["align_w_raw"]) == (1.0, 0.0, 0.0)
    assert np.allclose((settings["w_cos"], settings["w_norm"], settings["w_raw"]), (1.0, 0.25, 0.05))


def repa_bridge_path(shapes):
    return shapes / "model.safetensors"


@pytest.mark.parametrize("module", ["align", "latent"])
def test_per_sample_losses_and_their_gradients(repa_bridge, shapes, module):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    other = torch.from_numpy(load(shapes, "pred_fine.npy" if module == "align" else "target_rect.npy"))
    weights = torch.tensor([0.3, 2.0])

    def make(reduction):
        if module == "align":
            return lambda x: AlignLoss(repa_bridge, reduction=reduction)(x, lat)
        return lambda x: LatentLoss(repa_bridge, reduction=reduction)(x, other)

    base = other if module == "align" else lat
    x = base.clone().requires_grad_(True)
    per = make("none")(x)
    assert per.shape == (2,)
    (weights * per).sum().backward()
    # Each sample alone: its own loss and its own gradient, weighted.
    for b in range(2):
        xb = base[b:b + 1].clone().requires_grad_(True)
        if module == "align":
            lb = AlignLoss(repa_bridge)(xb, lat[b:b + 1])
        else:
            lb = LatentLoss(repa_bridge)(xb, other[b:b + 1])
        lb.backward()
        assert abs(per[b].item() - lb.item()) <= 1e-5
        want = weights[b] * xb.grad[0]
        assert (x.grad[b] - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-9
    mean, total = make("mean")(base), make("sum")(base)
    assert abs(mean.item() - per.mean().item()) <= 1e-6 and abs(total.item() - per.sum().item()) <= 1e-5
    xs = base.clone().requires_grad_(True)
    make("sum")(xs).backward()
    xm = base.clone().requires_grad_(True)
    make("mean")(xm).backward()
    torch.testing.assert_close(xs.grad, 2 * xm.grad)


def test_a_list_of_projections_and_arrays_of_another_kind(repa_bridge, shapes):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    pred = torch.from_numpy(load(shapes, "pred_same.npy"))
    align = AlignLoss(repa_bridge)
    assert align([pred], lat).item() == align(pred, lat).item()  # REPA's zs_tilde, one encoder
    for bad, words in (([pred, pred], "list of 2 (Tensor, Tensor); a bridge stands for one encoder"),
                       (pred.numpy(), "numpy.ndarray; it takes torch tensors")):
        with pytest.raises(TypeError) as e:
            align(bad, lat)
        message = str(e.value)
        assert words in message and "\n" not in message and len(message) < 300, message
    with pytest.raises(ValueError, match="reduction='avg'"):
        AlignLoss(repa_bridge, reduction="avg")


def test_shape_messages_say_where_each_size_comes_from(repa_bridge, shapes):
    lat = load(shapes, "latents_rect.npy")  # [2, 4, 12, 20]: a 6x10 token grid
    with pytest.raises(ValueError) as e:
        repa_bridge.loss_backward(np.zeros((3, 60, 48), np.float32), lat, grid=(6, 10))
    assert "expected [2, 60, 48] (batch 2 from the latents, 60 tokens of the caller grid 6x10, target_dim 48)" \
        in str(e.value)
    with pytest.raises(ValueError, match=r"expected \[2, 60, 48\] \(batch 2 from the latents, 60 tokens of the "
                                         r"latents' token grid 6x10, target_dim 48\)"):
        repa_bridge.latent_loss_backward(lat, np.zeros((2, 61, 48), np.float32))


def test_non_finite_input_raises_or_propagates_for_grad_scaler(repa_bridge, shapes):
    lat = torch.from_numpy(load(shapes, "latents_rect.npy"))
    proj = torch.nn.Linear(32, 48)
    hidden = torch.randn(2, 60, 32)
    hidden[1, 7, 3] = float("inf")  # an overflow upstream, as fp16 autocast may make
    with pytest.raises(BridgeError) as e:
        AlignLoss(repa_bridge)(proj(hidden), lat)
    assert e.value.status_name == "NON_FINITE"

    align = AlignLoss(repa_bridge, nonfinite="propagate")
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in proj.parameters()]
    loss = align(proj(hidden), lat)
    assert torch.isnan(loss)
    scaler.scale(loss).backward()
    assert all(torch.isnan(p.grad).all() for p in proj.parameters())
    scaler.step(opt)  # skipped: the gradients are not finite
    scaler.update()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, proj.parameters()))
    assert scaler.get_scale() < 1024.0
    # A finite step afterwards goes through.
    hidden[1, 7, 3] = 0.0
    opt.zero_grad()
    scaler.scale(align(proj(hidden), lat)).backward()
    scaler.step(opt)
    assert not all(torch.equal(a, p.detach()) for a, p in zip(before, proj.parameters()))
    # The latent loss too.
    bad_lat = lat.clone().requires_grad_(True)
    with torch.no_grad():
        bad_lat[0, 0, 0, 0] = float("nan")
    tgt = torch.from_numpy(load(shapes, "target_rect.npy"))
    with pytest.raises(BridgeError):
        LatentLoss(repa_bridge)(bad_lat, tgt)
    out = LatentLoss(repa_bridge, nonfinite="propagate")(bad_lat, tgt)
    out.backward()
    assert torch.isnan(out) and torch.isnan(bad_lat.grad).all()
