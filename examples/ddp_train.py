"""Train a bridge with PyTorch DDP: `BridgeModule` (the bridge as a torch module over the
library's flat-parameter calls), torch's AdamW with the library's decay groups, warmup
and cosine schedule and gradient clipping, one data shard per rank, checkpoints that
`bridge-train` and the library read.

    cargo build --release
    DINO_BRIDGE_LIB=target/release/libdino_bridge.so PYTHONPATH=bindings/python \\
        torchrun --nproc-per-node 2 examples/ddp_train.py [--data FOLDER] [--steps 200] [--out runs/ddp]

On CUDA (a library built with `--features cuda`) each rank takes the GPU of its local
rank and the ranks talk over NCCL; on the CPU over gloo. `--data` is a `bridge-train` data
folder (`latents.npy` `[N, C, H, W]`, `targets.npy` `[N, h*w, D]`, memory-mapped); without
it, a synthetic task (targets a fixed random function of the latents) shows the mechanics.
The global batch is `--batch` (split over the ranks), so 1 or N processes train the same
run. Rank 0 prints the mean loss over the ranks and writes `OUT/latest.safetensors` (the
weights, torch AdamW's moments as the library's, the step) every `--save-every` steps and
at the end: `bridge-train train --resume --out OUT` continues it, and
`BridgeModule.from_checkpoint` / `load_optimizer_state` bring it back here.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dino_bridge import Bridge
from dino_bridge.torch import BridgeModule

# A small bridge on REPA's grid (16x16 tokens from 32x32 latents) for the synthetic task.
SYNTHETIC = dict(in_ch=4, latent_size=32, grid=16, adapter_depth=1, target_dim=64, adapter_mid_channels=32,
                 adapter_out_channels=64, width=64, depth=2, heads=4, dropout=0.0)


def synthetic(rows: int, seed: int = 0):
    """Latents and targets whose tokens are a fixed random function of each 2x2 patch."""
    gen = np.random.default_rng(seed)
    latents = gen.standard_normal((rows, 4, 32, 32)).astype(np.float32)
    mix = gen.standard_normal((16, 64)).astype(np.float32) / 4
    patches = latents.reshape(rows, 4, 16, 2, 16, 2).transpose(0, 2, 4, 1, 3, 5).reshape(rows, 256, 16)
    return latents, np.tanh(patches @ mix).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="a bridge-train data folder (default: a synthetic task)")
    ap.add_argument("--checkpoint", type=Path, help="start from these weights (default: fresh)")
    ap.add_argument("--out", type=Path, default=Path("runs/ddp"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="global batch, split over the ranks")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue OUT/latest.safetensors")
    args = ap.parse_args()

    # -- the process group: one process per device ------------------------------------------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and os.environ.get("DINO_BRIDGE_EXAMPLE_CPU") != "1"
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")

    # -- the data: each rank its shard of every global batch ---------------------------------
    if args.data:
        latents = np.load(args.data / "latents.npy", mmap_mode="r")
        targets = np.load(args.data / "targets.npy", mmap_mode="r")
    else:
        latents, targets = synthetic(1024)

    # -- the bridge, its optimiser and schedule ---------------------------------------------
    settings = dict(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, total_steps=args.steps,
                    grad_clip=args.grad_clip)
    ordinal = device.index if cuda else -1
    latest = args.out / "latest.safetensors"
    start = latest if args.resume else args.checkpoint
    if start is not None:
        bridge = Bridge(start, device=ordinal, **settings)
    else:
        bridge = Bridge(device=ordinal, seed=0, **(SYNTHETIC if not args.data else {}), **settings)
    module = BridgeModule(bridge)
    opt = torch.optim.AdamW(module.param_groups(args.weight_decay), lr=args.lr, fused=cuda)
    step = module.load_optimizer_state(opt, latest) if args.resume else 0
    for g in opt.param_groups:
        g.setdefault("initial_lr", args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, module.lr_lambda, last_epoch=step - 1)
    model = DDP(module) if world > 1 else module
    share = args.batch // world
    order = np.random.default_rng(1).permutation(len(latents))
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{world} rank(s) on {device}, global batch {args.batch}, {module.bridge.param_count():,} parameters, "
              f"from step {step}")

    # -- the loop ---------------------------------------------------------------------------
    first = mean = None
    while step < args.steps:
        at = (step * args.batch) % (len(order) - args.batch + 1)
        rows = np.sort(order[at + rank * share:at + (rank + 1) * share])
        x = torch.from_numpy(np.ascontiguousarray(latents[rows], dtype=np.float32)).to(device)
        t = torch.from_numpy(np.ascontiguousarray(targets[rows], dtype=np.float32)).to(device)
        opt.zero_grad(set_to_none=True)
        loss = model(x, t)
        loss.backward()  # DDP averages the gradients over the ranks here
        torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        step += 1
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        first = mean.item() if first is None else first
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            print(f"step {step}: loss {mean.item():.5f} lr {sched.get_last_lr()[0]:.2e}", flush=True)
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            module.save(latest, optimizer=opt)
    if rank == 0:
        last = None if mean is None else mean.item()
        print(json.dumps({"first_loss": first, "last_loss": last, "steps": step, "checkpoint": str(latest)}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
