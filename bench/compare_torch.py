"""The bridge against PyTorch eager on the same work, interleaved in one process.

    cargo build --release
    DINO_BRIDGE_LIB=target/release/libdino_bridge.so PYTHONPATH=bindings/python:bench \\
        python bench/compare_torch.py [--batch 32] [--threads 2] [--iters 3] [--pipeline] \\
        [--config default|repa] [--size HxW]

Builds a bridge of `--config` (fresh weights, fixed seed) for latents of `--size` (default
32x32; the token grid is the size / 2^adapter_depth), saves it as safetensors,
loads the same file into the PyTorch model of DESIGN.md (bench/torch_bridge.py), checks
that both give the same tokens, then alternates the two on forward and on a train step
(forward + backward + AdamW) and prints samples/s and ratios. Peak memory of a forward is
measured in a fresh subprocess per framework. `--pipeline` also times what the bridge
replaces: the SD VAE decoder at the image size (8 px per latent) and DINOv2-base at 14 px
per token (112 px for the default bridge at 256 px, 224 px for `repa`: REPA's own target;
random weights from their configs; no download).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Preset configs (DESIGN.md, "Model"): the fields that differ from the library's default.
PRESETS = {"default": {}, "repa": {"adapter_depth": 1, "grid": 16}}


def forward_gflop(cfg, h, w):
    """Forward GFLOP per sample at an h x w latent for a config as `Bridge.info()` gives it,
    counted as config.rs forward_flops_at."""
    macs = h * w * cfg["adapter_mid_channels"] * cfg["in_ch"] * 9
    c_in = cfg["adapter_mid_channels"]
    for s in range(cfg["adapter_depth"]):
        c_out = cfg["adapter_out_channels"] if s + 1 == cfg["adapter_depth"] else cfg["adapter_mid_channels"]
        h, w = h // 2, w // 2
        macs += h * w * c_out * c_in * 4 + 2 * h * w * c_out * c_out * 9
        c_in = c_out
    t, wd, hid = h * w, cfg["width"], round(cfg["width"] * cfg["mlp_ratio"])
    macs += t * cfg["adapter_out_channels"] * wd
    macs += cfg["depth"] * (t * wd * 3 * wd + 2 * t * t * wd + t * wd * wd + 2 * t * wd * hid)
    macs += t * wd * cfg["target_dim"]
    return 2 * macs / 1e9


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--train-iters", type=int, default=2)
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--config", choices=sorted(PRESETS), default="default")
    ap.add_argument("--size", default="32x32", help="latent size HxW")
    ap.add_argument("--memory-of", choices=["bridge", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return ap.parse_args()


def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    args = parse()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before the library starts its pool
    import torch

    torch.set_num_threads(args.threads)
    from dino_bridge import Bridge
    from torch_bridge import TorchBridge

    lh, lw = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 4, lh, lw)).astype(np.float32)
    if args.memory_of:
        if args.memory_of == "bridge":
            with Bridge(args.checkpoint) as b:
                before = peak_rss_mib()
                b.forward(x)
        else:
            m, _ = TorchBridge.from_safetensors(args.checkpoint)
            m.eval()
            before = peak_rss_mib()
            with torch.no_grad():
                m(torch.from_numpy(x))
        print(json.dumps({"before": before, "peak": peak_rss_mib()}))
        return

    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "bridge.safetensors")
    bridge = Bridge(seed=1, lr=1e-4, warmup_steps=0, dropout=0.0, **PRESETS[args.config])
    bridge.save(ckpt)
    cfg = bridge.info()
    gh, gw = bridge.token_grid(lh, lw)
    gflop = forward_gflop(cfg, lh, lw)
    print(f"config {args.config}: {lh}x{lw} latents -> {gh}x{gw} tokens, {gflop:.2f} GFLOP/sample forward")
    tm, _ = TorchBridge.from_safetensors(ckpt)
    tm.eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ref = tm(xt).numpy()
    ours = bridge.forward(x)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"same weights: max |bridge - torch| / max |torch| = {err:.2e}")

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    with torch.no_grad():
        tm(xt)
    bridge.forward(x)
    fb, ft = [], []
    for _ in range(args.iters):
        fb.append(timed(lambda: bridge.forward(x)))
        with torch.no_grad():
            ft.append(timed(lambda: tm(xt)))
    b_sps, t_sps = args.batch / np.median(fb), args.batch / np.median(ft)
    print(f"forward    batch {args.batch}, {args.threads} threads: bridge {b_sps:7.2f} samples/s ({b_sps * gflop:6.1f} GFLOP/s), "
          f"torch eager {t_sps:7.2f} ({t_sps * gflop:6.1f}); ratio {b_sps / t_sps:.2f}")

    targets = rng.standard_normal((args.batch, gh * gw, cfg["target_dim"])).astype(np.float32)
    tt = torch.from_numpy(targets)
    tm.train()
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.05)

    def torch_step():
        pred = tm(xt)
        cos = torch.nn.functional.cosine_similarity(pred, tt, dim=-1, eps=1e-8)
        n = lambda a: a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        loss = (1 - cos).mean() + 0.25 * ((n(pred) - n(tt)) ** 2).mean() + 0.05 * ((pred - tt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()

    torch_step()
    bridge.train_step(x, targets)
    sb, st = [], []
    for _ in range(args.train_iters):
        sb.append(timed(lambda: bridge.train_step(x, targets)))
        st.append(timed(torch_step))
    b_sps, t_sps = args.batch / np.median(sb), args.batch / np.median(st)
    print(f"train step batch {args.batch}: bridge {b_sps:7.2f} samples/s, torch eager {t_sps:7.2f}; ratio {b_sps / t_sps:.2f}")

    mem = {}
    for who in ("bridge", "torch"):
        out = subprocess.run([sys.executable, __file__, "--memory-of", who, "--checkpoint", ckpt, "--batch", str(args.batch),
                              "--threads", str(args.threads), "--size", args.size], capture_output=True, text=True,
                             env=os.environ)
        mem[who] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS of a forward (fresh process): bridge {mem['bridge']['peak']:.0f} MiB, torch {mem['torch']['peak']:.0f} MiB; "
          f"ratio {mem['bridge']['peak'] / mem['torch']['peak']:.2f}")

    if args.pipeline:
        from diffusers import AutoencoderKL
        from transformers import Dinov2Config, Dinov2Model

        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=256).eval()
        dino_px = (gh * 14, gw * 14)
        dino = Dinov2Model(Dinov2Config(image_size=dino_px[0])).eval()
        n = 2 if lh * lw <= 32 * 32 else 1
        z = torch.randn(n, 4, lh, lw)
        with torch.no_grad():
            def pipeline():
                img = vae.decode(z).sample
                small = torch.nn.functional.interpolate(img, size=dino_px, mode="bicubic")
                dino(pixel_values=small)
            pipeline()
            per_pipe = timed(pipeline) / n
        per_bridge = np.median(fb) / args.batch
        print(f"VAE decode {lh * 8}x{lw * 8}px + DINOv2-base {dino_px[0]}x{dino_px[1]}px: {per_pipe * 1e3:.0f} ms/sample; "
              f"bridge {per_bridge * 1e3:.1f} ms/sample; the bridge is {per_pipe / per_bridge:.0f}x cheaper")
    bridge.close()


if __name__ == "__main__":
    main()
