"""AlignLoss under DistributedDataParallel: two processes (gloo, CPU, a file store), each
with its own Bridge loaded from one checkpoint and a DDP-wrapped projector, each aligning
its half of a batch. After backward (DDP all-reduces the mean of the gradients) every rank's
projector gradients must equal, to float tolerance, one process's gradients on the whole
batch: the alignment loss is a mean over samples, so the two halves' mean is the whole."""

import os
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from dino_bridge import Bridge  # noqa: E402
from dino_bridge.torch import AlignLoss  # noqa: E402

WORLD = 2
BATCH = 4
TIMEOUT_S = 120


def tiny_bridge(**kwargs) -> Bridge:
    return Bridge(in_ch=4, latent_size=16, grid=4, target_dim=48, adapter_mid_channels=32, adapter_out_channels=64,
                  width=64, depth=2, heads=4, dropout=0.0, **kwargs)


def projector() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 48))


def data():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, 16, 32, generator=gen), torch.randn(BATCH, 4, 16, 16, generator=gen)


def _worker(rank, init_file, ckpt, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        hidden, latents = data()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        proj = projector()
        model = DDP(proj)
        align = AlignLoss(Bridge(ckpt))  # each rank its own bridge, from the same file
        loss = align(model(hidden[part]), latents[part])
        loss.backward()  # DDP averages the gradients over the ranks here
        torch.save({"loss": loss.detach(), "grads": [p.grad.detach() for p in proj.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(monkeypatch, worker, world: int, args: tuple) -> None:
    """`worker(rank, *args)` in `world` processes, talking over loopback; fails the test
    when they have not all finished in TIMEOUT_S (a rank that died takes the others down
    with mp.spawn's error)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # the ranks talk over loopback only
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    start = time.monotonic()
    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    while not ctx.join(timeout=1):
        if time.monotonic() - start > TIMEOUT_S:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the DDP ranks did not finish in {TIMEOUT_S} s")


def test_ddp_gradients_over_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.safetensors"
    with tiny_bridge(seed=11) as b:
        b.save(ckpt)
    run_ranks(monkeypatch, _worker, WORLD, (str(tmp_path / "store"), str(ckpt), str(tmp_path)))

    hidden, latents = data()
    proj = projector()
    with Bridge(ckpt) as b:
        whole = AlignLoss(b)(proj(hidden), latents)
        whole.backward()
    want = [p.grad for p in proj.parameters()]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, whole.detach(), rtol=1e-6, atol=1e-7)
    assert all(r["loss"] != results[0]["loss"] for r in results[1:]), "the ranks must see different halves"
    for rank, r in enumerate(results):
        assert len(r["grads"]) == len(want)
        for got, ref in zip(r["grads"], want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=lambda m: f"rank {rank}: {m}")


# -- BridgeModule under DDP: the bridge itself trained by the host ---------------------------------

STEPS = 3
MODULE_BATCH = 8
MODULE_OPTIM = dict(lr=1e-3, weight_decay=0.05, grad_clip=0.1, warmup_steps=1, total_steps=10)


def module_batches():
    gen = torch.Generator().manual_seed(9)
    return [(torch.randn(MODULE_BATCH, 4, 16, 16, generator=gen), torch.randn(MODULE_BATCH, 16, 48, generator=gen))
            for _ in range(STEPS)]


def train_module(module, batches, part=slice(None)):
    """torch AdamW with the library's decay groups, clipping and schedule, on `part` of
    each batch."""
    inner = getattr(module, "module", module)  # the BridgeModule inside DDP
    opt = torch.optim.AdamW(inner.param_groups(MODULE_OPTIM["weight_decay"]), lr=MODULE_OPTIM["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, inner.lr_lambda)
    for x, t in batches:
        opt.zero_grad()
        module(x[part], t[part]).backward()  # DDP averages the gradients over the ranks here
        torch.nn.utils.clip_grad_norm_(module.parameters(), MODULE_OPTIM["grad_clip"])
        opt.step()
        sched.step()


def _module_worker(rank, world, init_file, ckpt, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dino_bridge.torch import BridgeModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = DDP(BridgeModule(Bridge(ckpt, **MODULE_OPTIM)))
        share = MODULE_BATCH // world
        train_module(module, module_batches(), slice(rank * share, (rank + 1) * share))
        torch.save({n: p.detach().clone() for n, p in module.module.named_parameters()},
                   os.path.join(out_dir, f"module{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


WORLDS = [2, 4] if os.environ.get("DINO_BRIDGE_FULL") == "1" else [2]


@pytest.mark.parametrize("world", WORLDS)
def test_ddp_trains_a_bridge_module_as_one_process_on_the_whole_batch(world, tmp_path, monkeypatch):
    from dino_bridge.torch import BridgeModule

    ckpt = tmp_path / "tiny.safetensors"
    with tiny_bridge(seed=11) as b:  # dropout 0: the ranks' masks cannot differ
        b.save(ckpt)
    run_ranks(monkeypatch, _module_worker, world, (world, str(tmp_path / "store"), str(ckpt), str(tmp_path)))
    whole = BridgeModule(Bridge(ckpt, **MODULE_OPTIM))
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    train_module(whole, module_batches())
    # The loss does not depend on a few elements (a bias before a normalisation, the keys'
    # bias): float noise in their gradient moves them by up to Adam's step; the rest must
    # agree to 1e-5 of each tensor's scale.
    noise_bound = 2 * STEPS * MODULE_OPTIM["lr"]
    for rank in range(world):
        got = torch.load(tmp_path / f"module{rank}.pt")
        moved = 0
        for name, p in whole.named_parameters():
            err = (got[name] - p.detach()).abs()
            scale = p.detach().abs().max()
            assert err.max() <= noise_bound, f"rank {rank}: {name} differs by {err.max()}"
            moved += int((err > 1e-5 * scale).sum())
            assert not torch.equal(p.detach(), before[name]) or name.endswith("bias"), f"{name} did not train"
        assert moved <= 0.01 * sum(p.numel() for p in whole.parameters()), f"rank {rank}: {moved} elements differ"
    with torch.no_grad():
        x = module_batches()[0][0]
        ranks = BridgeModule(Bridge(ckpt))
        ranks.load_state_dict(torch.load(tmp_path / "module0.pt"))
        torch.testing.assert_close(ranks(x), whole(x), rtol=1e-4, atol=1e-5)
