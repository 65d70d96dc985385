"""A train step two ways, interleaved in one process: the library's own
`bridge_train_step` against `BridgeModule` + torch's AdamW (the host's stack: set the
weights, loss and flat gradient through the library, the gradient cut into the
parameters, clipping, torch AdamW and the schedule).

    cargo build --release
    DINO_BRIDGE_LIB=target/release/libdino_bridge.so PYTHONPATH=bindings/python \\
        python bench/module_step.py [--config default|repa] [--batch 16] [--rounds 5] [--threads 2]

Both start from the same fresh weights (a fixed seed) and train on the same batches; each
round times one step of each, alternating which goes first. Prints the median seconds per
step and the ratio module / library (the issue's target: at most 1.10).
"""

import argparse
import statistics
import time

import numpy as np
import torch

from dino_bridge import Bridge
from dino_bridge.torch import BridgeModule

PRESETS = {"default": {}, "repa": {"adapter_depth": 1, "grid": 16}}
OPTIM = dict(lr=2e-4, weight_decay=0.05, grad_clip=1.0, warmup_steps=10, total_steps=1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(PRESETS), default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.config]
    library = Bridge(seed=1, **cfg, **OPTIM)
    module = BridgeModule(Bridge(seed=1, **cfg, **OPTIM))
    opt = torch.optim.AdamW(module.param_groups(OPTIM["weight_decay"]), lr=OPTIM["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, module.lr_lambda)
    info = library.info()
    side, tokens, dim = info["latent_size"], info["tokens"], info["target_dim"]
    gen = np.random.default_rng(0)
    x = gen.standard_normal((args.batch, info["in_ch"], side, side)).astype(np.float32)
    t = gen.standard_normal((args.batch, tokens, dim)).astype(np.float32)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def library_step():
        library.train_step(x, t)

    def module_step():
        opt.zero_grad(set_to_none=True)
        module(xt, tt).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), OPTIM["grad_clip"])
        opt.step()
        sched.step()

    library_step(), module_step()  # warm: allocator, BLAS, first-call setup
    times = {"library": [], "module": []}
    for r in range(args.rounds):
        order = [("library", library_step), ("module", module_step)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    lib, mod = statistics.median(times["library"]), statistics.median(times["module"])
    print(f"{args.config} preset, batch {args.batch}, {info['param_count'] / 1e6:.1f}M parameters, "
          f"{args.threads} threads, {args.rounds} rounds")
    print(f"  bridge_train_step          {lib:.3f} s/step  ({args.batch / lib:.2f} samples/s)")
    print(f"  BridgeModule + torch AdamW {mod:.3f} s/step  ({args.batch / mod:.2f} samples/s)")
    print(f"  ratio module / library: {mod / lib:.3f}")


if __name__ == "__main__":
    main()
