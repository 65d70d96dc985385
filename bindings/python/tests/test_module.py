"""Training the bridge in the host's own stack (ABI 5): the flat-vector calls of `Bridge`
against the fixtures' PyTorch reference, and `BridgeModule` with torch's AdamW against the
library's own train step, across each other's checkpoints, under torch.compile, and
refusing what cannot work."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ROOT, assert_close, load  # noqa: E402
from dino_bridge import Bridge, BridgeError  # noqa: E402
from dino_bridge.torch import BridgeModule  # noqa: E402

# The library's optimiser settings for these tests: a short warmup and schedule, and a
# clip that is active at the tiny bridge's gradient norms.
OPTIM = dict(lr=1e-3, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=0.1, warmup_steps=2,
             total_steps=10)


def reference(fx: Path, name: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(fx / name))


def assert_tensors_match(got: dict, want: dict):
    """Each named tensor within the fixtures' tolerance (1e-4 of its largest magnitude); a
    gradient that is zero in exact arithmetic (a bias before a normalisation) within 1e-6
    of the largest gradient of all."""
    assert set(got) == set(want)
    overall = max(float(np.abs(w).max()) for w in want.values())
    for name, w in want.items():
        if np.abs(w).max() > 1e-6 * overall:
            assert_close(got[name], w, name)
        else:
            assert np.abs(got[name] - w).max() <= 1e-6 * overall, name


def by_name(bridge: Bridge, flat) -> dict:
    flat = np.asarray(flat)
    return {p["name"]: flat[p["offset"]:p["offset"] + p["numel"]].reshape(p["shape"]) for p in bridge.param_info()}


# -- the C API's flat-vector calls, through Bridge ---------------------------------------------


def test_loss_grads_equal_the_reference_for_every_tensor(fx, expected):
    b = Bridge(fx / "model.safetensors")
    loss, grad, grad_latents = b.loss_grads(load(fx, "latents.npy"), load(fx, "target.npy"), seed=5,
                                            want_latents=True)
    assert abs(loss - expected["loss_train_params"]) < 1e-5
    assert_tensors_match(by_name(b, grad), reference(fx, "grad_params_train.safetensors"))
    assert_close(grad_latents, load(fx, "grad_latents.npy"), "latents")


def test_the_vjp_equals_the_reference_for_a_random_cotangent(fx):
    b = Bridge(fx / "model.safetensors")
    grad, grad_latents = b.vjp(load(fx, "latents.npy"), load(fx, "cotangent.npy"), seed=5, want_latents=True)
    assert_tensors_match(by_name(b, grad), reference(fx, "vjp_params.safetensors"))
    assert_close(grad_latents, load(fx, "vjp_latents.npy"), "latents")
    out = b.forward_train(load(fx, "latents.npy"), seed=5)
    assert_close(out, load(fx, "out.npy"), "dropout 0: the training forward is the forward")


def test_get_and_set_round_trip_bit_for_bit(fx):
    b = Bridge(fx / "model.safetensors")
    info = b.param_info()
    assert [p["name"] for p in info][:2] == ["adapter.stem.weight", "adapter.stem.bias"]
    assert info[-1]["offset"] + info[-1]["numel"] == b.param_count() == b.info()["param_count"]
    before = b.get_params()
    other = np.random.default_rng(0).standard_normal(b.param_count()).astype(np.float32)
    b.set_params(other)
    assert np.array_equal(b.get_params(), other)
    b.set_params(before)
    assert np.array_equal(b.get_params(), before)
    assert np.array_equal(b.forward(load(fx, "latents.npy")), Bridge(fx / "model.safetensors").forward(
        load(fx, "latents.npy")))


def test_bad_flat_vectors_get_messages(fx):
    b = Bridge(fx / "model.safetensors")
    n = b.param_count()
    with pytest.raises(ValueError, match=rf"expected float32 \[{n}\]"):
        b.set_params(np.zeros(n - 1, dtype=np.float32))
    with pytest.raises(ValueError, match="float16"):
        b.set_params(np.zeros(n, dtype=np.float16))
    bad = b.get_params()
    bad[7] = np.nan
    with pytest.raises(BridgeError, match=r"params\[7\] = NaN"):
        b.set_params(bad)
    assert np.isfinite(b.get_params()).all()


# -- BridgeModule --------------------------------------------------------------------------------


def tiny_module(fx, **kwargs) -> BridgeModule:
    return BridgeModule(Bridge(fx / "model.safetensors", **OPTIM), **kwargs)


def batches(fx, count: int, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, 16, 48, generator=gen)


def torch_adamw(module: BridgeModule):
    opt = torch.optim.AdamW(module.param_groups(OPTIM["weight_decay"]), lr=OPTIM["lr"],
                            betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, module.lr_lambda)


def host_step(module, opt, sched, x, t):
    opt.zero_grad()
    loss = module(x, t)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), OPTIM["grad_clip"])
    opt.step()
    sched.step()
    return loss.item()


def null_directions(fx) -> dict:
    """Per tensor, the elements the loss does not depend on (a bias just before a
    normalisation, the keys' part of the attention's bias: softmax ignores a shift):
    their gradient is float noise, which Adam scales up to full steps, so two
    implementations move them apart by up to a step size while computing the same
    function."""
    grads = reference(fx, "grad_params_train.safetensors")
    overall = max(float(np.abs(g).max()) for g in grads.values())
    return {n: np.abs(g) <= 1e-6 * overall for n, g in grads.items()}


def assert_weights_close(module: BridgeModule, bridge: Bridge, what: str, fx, steps: int, rel=1e-5):
    """Every tensor within `rel` of its largest magnitude, but for its `null_directions`,
    which are held to the `steps` Adam steps they took (at most about lr each); and the
    function itself (the tokens) within the fixtures' tolerance."""
    theirs = by_name(bridge, bridge.get_params())
    null = null_directions(fx)
    assert 0 < sum(m.sum() for m in null.values()) < 0.01 * bridge.param_count()
    for name, p in module.named_parameters():
        want, got = theirs[name], p.detach().numpy()
        err = np.abs(got - want)
        assert err[~null[name]].max(initial=0) <= rel * np.abs(want).max(), f"{what}: {name} differs by {err.max()}"
        assert err[null[name]].max(initial=0) <= 2 * steps * OPTIM["lr"], f"{what}: {name}'s null directions"
    x = load(fx, "latents.npy")
    with torch.no_grad():
        ours = module(torch.from_numpy(x))  # dropout 0: the training forward is the forward
    assert_close(ours.numpy(), bridge.forward(x), f"{what}: tokens")


def test_the_parameters_are_the_checkpoints_tensors_over_one_buffer(fx):
    m = tiny_module(fx)
    names = [p["name"] for p in m.bridge.param_info()]
    assert [n for n, _ in m.named_parameters()] == names
    state = m.state_dict()
    for p in m.bridge.param_info():
        assert tuple(state[p["name"]].shape) == p["shape"]
    base = m._flat.data_ptr()
    assert [p.data_ptr() - base for p in m.parameters()] == [4 * p["offset"] for p in m.bridge.param_info()]
    groups = m.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == len(names) and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 or p.shape[0] == 1
                                                                   for p in groups[1]["params"])


def test_module_gradients_equal_the_reference(fx, expected):
    m = tiny_module(fx)
    x = torch.from_numpy(load(fx, "latents.npy")).requires_grad_()
    loss = m(x, torch.from_numpy(load(fx, "target.npy")))
    assert abs(loss.item() - expected["loss_train_params"]) < 1e-5
    loss.backward()
    assert_tensors_match({n: p.grad.numpy() for n, p in m.named_parameters()},
                         reference(fx, "grad_params_train.safetensors"))
    assert_close(x.grad, load(fx, "grad_latents.npy"), "latents")
    m.zero_grad()
    x.grad = None
    (m(x) * torch.from_numpy(load(fx, "cotangent.npy"))).sum().backward()
    assert_tensors_match({n: p.grad.numpy() for n, p in m.named_parameters()}, reference(fx, "vjp_params.safetensors"))
    assert_close(x.grad, load(fx, "vjp_latents.npy"), "vjp latents")


def test_five_torch_adamw_steps_equal_five_library_train_steps(fx):
    module, library = tiny_module(fx), Bridge(fx / "model.safetensors", **OPTIM)
    opt, sched = torch_adamw(module)
    for step, (x, t) in enumerate(batches(fx, 5)):
        lr = opt.param_groups[0]["lr"]
        loss = host_step(module, opt, sched, x, t)
        stats = library.train_step(x.numpy(), t.numpy())
        assert abs(loss - stats["loss"]) <= 1e-5 * abs(stats["loss"]), step
        assert abs(lr - stats["lr"]) <= 1e-6 * stats["lr"], (step, lr, stats["lr"])
        assert_weights_close(module, library, f"step {step + 1}", fx, step + 1)


def test_loss_grads_then_apply_grads_is_the_train_step_bit_for_bit(fx):
    host, library = Bridge(fx / "model.safetensors", **OPTIM), Bridge(fx / "model.safetensors", **OPTIM)
    for x, t in batches(fx, 5):
        _, grad, _ = host.loss_grads(x.numpy(), t.numpy(), seed=0)
        applied = host.apply_grads(grad)
        stepped = library.train_step(x.numpy(), t.numpy())
        assert (applied["grad_norm"], applied["lr"], applied["step"]) == (stepped["grad_norm"], stepped["lr"],
                                                                          stepped["step"])
        assert np.array_equal(host.get_params(), library.get_params())


def test_the_module_and_the_library_continue_each_others_checkpoints(fx, tmp_path):
    data = list(batches(fx, 8))
    # The module trains 5 steps and saves; the library resumes it.
    module = tiny_module(fx)
    opt, sched = torch_adamw(module)
    for x, t in data[:5]:
        host_step(module, opt, sched, x, t)
    ema = {n: p.detach() * 0.5 for n, p in module.named_parameters()}
    module.save(tmp_path / "module.safetensors", optimizer=opt, ema=ema)
    back = BridgeModule.read_ema(tmp_path / "module.safetensors")
    assert set(back) == set(ema) and all(torch.equal(back[n], ema[n]) for n in ema)
    assert BridgeModule.read_ema(fx / "model.safetensors") is None
    resumed = Bridge(tmp_path / "module.safetensors", **OPTIM)
    assert resumed.info()["step"] == 5
    for x, t in data[5:]:
        host_step(module, opt, sched, x, t)
        resumed.train_step(x.numpy(), t.numpy())
    assert_weights_close(module, resumed, "library resumed the module's checkpoint", fx, len(data))
    # The library trains 5 steps and saves; the module resumes it.
    library = Bridge(fx / "model.safetensors", **OPTIM)
    for x, t in data[:5]:
        library.train_step(x.numpy(), t.numpy())
    library.save(tmp_path / "library.safetensors")
    module = BridgeModule.from_checkpoint(tmp_path / "library.safetensors", **OPTIM)
    opt = torch.optim.AdamW(module.param_groups(OPTIM["weight_decay"]), lr=OPTIM["lr"],
                            betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"])
    step = module.load_optimizer_state(opt, tmp_path / "library.safetensors")
    assert step == module.step == 5
    for g in opt.param_groups:
        g["initial_lr"] = OPTIM["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, module.lr_lambda, last_epoch=step - 1)
    for x, t in data[5:]:
        host_step(module, opt, sched, x, t)
        library.train_step(x.numpy(), t.numpy())
    assert_weights_close(module, library, "the module resumed the library's checkpoint", fx, len(data))


def test_bridge_train_resumes_the_modules_checkpoint(fx, tmp_path):
    exe = Path(os.environ.get("BRIDGE_TRAIN", ROOT / "target" / "release" / "bridge-train"))
    if not exe.is_file():
        pytest.skip(f"no bridge-train at {exe} (cargo build --release)")
    module = tiny_module(fx)
    opt, sched = torch_adamw(module)
    for x, t in batches(fx, 3):
        host_step(module, opt, sched, x, t)
    out = tmp_path / "run"
    out.mkdir()
    module.save(out / "latest.safetensors", optimizer=opt)
    data = tmp_path / "data"
    data.mkdir()
    gen = np.random.default_rng(3)
    np.save(data / "latents.npy", gen.standard_normal((12, 4, 16, 16)).astype(np.float32))
    np.save(data / "targets.npy", gen.standard_normal((12, 16, 48)).astype(np.float32))
    run = subprocess.run([str(exe), "train", "--data", str(data), "--out", str(out), "--resume", "--epochs", "1",
                          "--batch", "4", "--val-count", "4", "--warmup", "2", "--quiet"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resuming from" in run.stdout
    from dino_bridge import checkpoint

    meta, _ = checkpoint.read(out / "latest.safetensors")
    assert json.loads(meta["train_state"])["step"] == 3 + 2  # two batches of 4 from 8 training rows
    back = BridgeModule.from_checkpoint(out / "latest.safetensors")
    assert back.step == 5


def test_the_module_compiles_without_a_graph_break(fx):
    m = tiny_module(fx)
    x, t = next(batches(fx, 1))
    eager = m(x, t)
    explain = torch._dynamo.explain(lambda a, b: m(a, b))(x, t)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(lambda a, b: m(a, b), fullgraph=True, backend="eager")
    got = compiled(x, t)
    got.backward()
    torch.testing.assert_close(got, eager)
    assert all(p.grad is not None for p in m.parameters())


def test_views_survive_to_and_load_state_dict_and_replacements_are_refused(fx):
    m = tiny_module(fx)
    x, t = next(batches(fx, 1))
    before = m(x, t).item()
    assert m.float().to("cpu") is m
    state = {k: v.clone() * 0.5 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    base = m._flat.data_ptr()
    assert [p.data_ptr() - base for p in m.parameters()] == [4 * p["offset"] for p in m.bridge.param_info()]
    assert m(x, t).item() != before  # the halved weights reached the library
    with pytest.raises(TypeError, match="float32 master weights"):
        m.half()
    m.load_state_dict(state, assign=True)
    with pytest.raises(RuntimeError, match="no longer a view.*FSDP"):
        m(x, t)


def test_dropout_masks_follow_the_seed(fx):
    b = Bridge(dropout=0.3, in_ch=4, latent_size=16, grid=4, target_dim=48, adapter_mid_channels=32,
               adapter_out_channels=64, width=64, depth=2, heads=4)
    m = BridgeModule(b, dropout_seed=3)
    x, _ = next(batches(fx, 1))
    a, a2, c = m(x, seed=1), m(x, seed=1), m(x, seed=2)
    assert torch.equal(a, a2) and not torch.equal(a, c)
    assert not torch.equal(m(x), m(x)), "the module's own sequence draws new masks per call"
    # The VJP redraws the forward's masks: the gradient of sum(out * g) matches finite
    # differences along the latents only if both passes used the same masks.
    x.requires_grad_()
    out = m(x, seed=9)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    dx = torch.randn_like(x) * 1e-2
    with torch.no_grad():
        plus = (m(x + dx, seed=9) * g).sum() - (m(x - dx, seed=9) * g).sum()
    assert abs(plus.item() / 2 - (x.grad * dx).sum().item()) < 1e-2 * abs(plus.item() / 2) + 1e-4
