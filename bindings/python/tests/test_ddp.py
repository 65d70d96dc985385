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


def test_ddp_gradients_over_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.safetensors"
    with tiny_bridge(seed=11) as b:
        b.save(ckpt)
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # the ranks talk over loopback only
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    start = time.monotonic()
    ctx = mp.spawn(_worker, args=(str(tmp_path / "store"), str(ckpt), str(tmp_path)), nprocs=WORLD, join=False)
    while not ctx.join(timeout=1):
        if time.monotonic() - start > TIMEOUT_S:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the DDP ranks did not finish in {TIMEOUT_S} s")

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
