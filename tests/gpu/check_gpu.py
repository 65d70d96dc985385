"""CUDA checks for the GPU machine (run by tests/gpu/run.sh, which sets DINO_BRIDGE_LIB
to the CUDA build and PYTHONPATH to the bindings).

Correctness: CUDA against the CPU path of the same library, on the fixtures and on the
default config (forward f32 and bf16, loss_backward with a caller grid of twice the bridge
grid, latent_loss_backward, train steps), all through the Python binding with torch CUDA
tensors on a non-default stream. Safety: a host pointer given as a device pointer must get
INVALID_ARGUMENT. Speed: forward, loss_backward and train step against PyTorch eager with
the same weights. Prints one line per check and exits non-zero if any check fails.

    python tests/gpu/check_gpu.py FIXTURES_DIR [--quick]
"""
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dino_bridge import Bridge, BridgeError
from dino_bridge import _lib as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from torch_bridge import TorchBridge  # noqa: E402

FAILED = []


def check(name, ok, detail=""):
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a, b):
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def compare(label, ckpt, batch, tol_f32, tol_bf16, steps):
    cpu = Bridge(ckpt, device=-1)
    gpu = Bridge(ckpt, device=0)
    gpu16 = Bridge(ckpt, device=0, compute_dtype="bf16")
    info = cpu.info
    g, d = info["grid"], info["target_dim"]
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, info["in_ch"], info["latent_size"], info["latent_size"], generator=gen)
    pred = torch.randn(batch, (2 * g) ** 2, d, generator=gen)
    tgt = torch.randn(batch, g * g, d, generator=gen)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        lat_d, pred_d, tgt_d = lat.cuda(), pred.cuda(), tgt.cuda()
        out = gpu.forward(lat_d)
        out16 = gpu16.forward(lat_d)
        loss_g, grad_g = gpu.loss_backward(pred_d, lat_d)
        lloss_g, lgrad_g = gpu.latent_loss_backward(lat_d, tgt_d)
    side.synchronize()
    ref = cpu.forward(lat)
    check(f"{label}: forward f32", rel(out, ref) < tol_f32, f"rel {rel(out, ref):.2e}")
    check(f"{label}: forward bf16 compute", rel(out16, ref) < tol_bf16, f"rel {rel(out16, ref):.2e}")
    loss_c, grad_c = cpu.loss_backward(pred, lat)
    check(f"{label}: loss_backward (grid {2 * g})", abs(loss_g - loss_c) < tol_f32 * abs(loss_c) + 1e-6
          and rel(grad_g, grad_c) < tol_f32, f"loss {loss_g:.6f} vs {loss_c:.6f}, grad rel {rel(grad_g, grad_c):.2e}")
    lloss_c, lgrad_c = cpu.latent_loss_backward(lat, tgt)
    check(f"{label}: latent_loss_backward", abs(lloss_g - lloss_c) < tol_f32 * abs(lloss_c) + 1e-6
          and rel(lgrad_g, lgrad_c) < 10 * tol_f32, f"grad rel {rel(lgrad_g, lgrad_c):.2e}")
    losses_c = [cpu.train_step(lat, tgt)["loss"] for _ in range(steps)]
    with torch.cuda.stream(side):
        losses_g = [gpu.train_step(lat_d, tgt_d)["loss"] for _ in range(steps)]
    side.synchronize()
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses_g, losses_c))
    after = rel(gpu.forward(lat_d).cpu(), cpu.forward(lat))
    check(f"{label}: {steps} train steps", worst < 1e-3 and after < 1e-2,
          f"losses {losses_c[0]:.4f}->{losses_c[-1]:.4f}, worst rel {worst:.2e}, forward after rel {after:.2e}")
    return gpu


def host_pointer_rejected(gpu):
    info = gpu.info
    host = np.zeros((1, info["in_ch"], info["latent_size"], info["latent_size"]), np.float32)
    out = torch.empty(1, info["grid"] ** 2, info["target_dim"], device="cuda")
    status = L.lib().bridge_forward_cuda_ptr(gpu._handle(), host.ctypes.data, out.data_ptr(), 1, L.DTYPE_F32, None)
    msg = (L.lib().bridge_last_error() or b"").decode()
    check("host pointer as device pointer -> INVALID_ARGUMENT",
          L.STATUS_NAMES.get(status) == "INVALID_ARGUMENT", f"status {L.STATUS_NAMES.get(status)}: {msg}")


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def throughput(ckpt, batches, iters):
    tm, _ = TorchBridge.from_safetensors(ckpt)
    tm = tm.cuda().eval()
    peak = 790e12
    flops = None
    for compute in ("f32", "bf16"):
        b = Bridge(ckpt, device=0, compute_dtype=compute)
        flops = flops or b.info.get("forward_flops") or 8.9e9
        for batch in batches:
            x = torch.randn(batch, 4, 32, 32, device="cuda")
            sb = timed(lambda: b.forward(x), iters)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=compute == "bf16"):
                st = timed(lambda: tm(x), iters)
            print(f"forward {compute:4s} batch {batch:5d}: bridge {batch / sb:9.0f} samples/s "
                  f"({batch * flops / sb / 1e12:6.1f} TFLOP/s, {100 * batch * flops / sb / peak:4.1f}% of bf16 peak), "
                  f"torch eager {batch / st:9.0f}; ratio {st / sb:.2f}", flush=True)
    b = Bridge(ckpt, device=0)
    for batch in batches:
        x = torch.randn(batch, 4, 32, 32, device="cuda")
        pred = torch.randn(batch, 64, 768, device="cuda")
        tgt = torch.randn(batch, 64, 768, device="cuda")
        sl = timed(lambda: b.loss_backward(pred, x), iters)
        strain = timed(lambda: b.train_step(x, tgt), max(1, iters // 2))
        print(f"batch {batch:5d}: loss_backward {1 / sl:8.1f} calls/s, train_step {batch / strain:8.0f} samples/s",
              flush=True)


def main():
    fx = Path(sys.argv[1])
    quick = "--quick" in sys.argv
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; library {os.environ.get('DINO_BRIDGE_LIB')}")
    tiny = compare("fixtures", fx / "model.safetensors", 4, 1e-4, 5e-2, 5)
    host_pointer_rejected(tiny)
    try:
        Bridge(fx / "model.safetensors", device=7)
        check("device 7 -> error", False)
    except BridgeError as e:
        check("device 7 -> error", e.status_name in ("INVALID_ARGUMENT", "DEVICE"), str(e))
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "default.safetensors")
    Bridge(seed=1, dropout=0.0).save(ckpt)
    compare("default config", ckpt, 8, 1e-3, 8e-2, 3 if quick else 20)
    throughput(ckpt, [256] if quick else [256, 1024], 3 if quick else 10)
    print(f"{len(FAILED)} checks failed: {FAILED}" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
