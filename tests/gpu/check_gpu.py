"""CUDA checks for the GPU machine (run by tests/gpu/run.sh, which sets DINO_BRIDGE_LIB
to the CUDA build and PYTHONPATH to the bindings).

Correctness: CUDA against the CPU path of the same library, on the fixtures and on the
default config (forward f32 and bf16, loss_backward with a caller grid of twice the bridge
grid, latent_loss_backward, train steps), on rectangular latents (24x40 on the default
config: a 6x10 token grid through the resized position embedding; forward f32 and bf16,
latent_loss_backward, a train step), and REPA alignment on a `repa` bridge (16x16 tokens
from 32x32 latents) at a finer (32x32, pred pooled) and a coarser (8x8, target pooled)
caller grid, and at a coarser grid on 24x40 latents with w_gram and spatial_norm_gamma,
all through the Python binding with torch CUDA tensors on a non-default stream. Two host
threads on one CUDA bridge (forwards against train steps) must each see one weight
version. PyTorch's current device and stream, and the driver's current context, must be
what they were before a call. Safety: a host pointer given as a device pointer must get
INVALID_ARGUMENT. ABI 3 (DLPack): each tensor in its own dtype (bf16 pred, f32 latents), the
loss written into a device tensor with no host sync (the host returns while the stream is
still busy behind torch.cuda._sleep, and the result is still right: the library waited on
the stream), calls on the legacy default stream (`__dlpack__(stream=1)`, NULL to the
library), and AlignLoss / LatentLoss as custom ops under torch.compile(fullgraph=True) on
CUDA tensors, against eager. ABI 5: the flat-vector calls (loss_grads, VJP, get/set)
against the CPU, and BridgeModule under DDP (NCCL, one process) against the CPU module. Speed: forward, loss_backward and train step against PyTorch
eager with the same weights. Prints one line per check and exits non-zero if any check fails.

    python tests/gpu/check_gpu.py FIXTURES_DIR [--quick] [--dry-run]

`--dry-run` runs every line it can without CUDA: the "GPU" bridge is a CPU bridge and the
tensors are CPU tensors, the rest of the code is the same (CI runs it with the CPU build,
so this script cannot rot). Checks that only mean something on a GPU print SKIP.
"""
import contextlib
import ctypes
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dino_bridge import Bridge, BridgeError, capabilities
from dino_bridge import _lib as L
from dino_bridge.torch import AlignLoss, LatentLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from torch_bridge import TorchBridge  # noqa: E402

DRY = "--dry-run" in sys.argv
DEVICE = -1 if DRY else 0  # the bridge under test
TDEV = "cpu" if DRY else "cuda"  # where its tensors live
FAILED = []
# H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet, without sparsity).
BF16_PEAK = 989e12


def check(name, ok, detail=""):
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def skip(name, why):
    print(f"[SKIP] {name}: {why}", flush=True)


def rel(a, b):
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def new_stream():
    return None if DRY else torch.cuda.Stream()


def on(stream):
    """`with on(s):` makes `s` the current torch stream (nothing in a dry run)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def sync(stream=None):
    if DRY:
        return
    (stream or torch.cuda).synchronize()


def close_loss(a, b, tol):
    return abs(a - b) < tol * abs(b) + 1e-6


def compare(label, ckpt, batch, tol_f32, tol_bf16, steps):
    cpu = Bridge(ckpt, device=-1)
    gpu = Bridge(ckpt, device=DEVICE)
    # bf16 compute needs CUDA; the dry run takes the f32 path through the same lines.
    gpu16 = Bridge(ckpt, device=DEVICE, compute_dtype="f32" if DRY else "bf16")
    info = cpu.info()
    g, d = info["grid"], info["target_dim"]
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, info["in_ch"], info["latent_size"], info["latent_size"], generator=gen)
    pred = torch.randn(batch, (2 * g) ** 2, d, generator=gen)
    tgt = torch.randn(batch, g * g, d, generator=gen)
    side = new_stream()
    with on(side):
        lat_d, pred_d, tgt_d = lat.to(TDEV), pred.to(TDEV), tgt.to(TDEV)
        out = gpu.forward(lat_d)
        out16 = gpu16.forward(lat_d)
        loss_g, grad_g = gpu.loss_backward(pred_d, lat_d, grid=(2 * g, 2 * g))
        lloss_g, lgrad_g = gpu.latent_loss_backward(lat_d, tgt_d)
    sync(side)
    ref = cpu.forward(lat)
    check(f"{label}: forward f32", rel(out, ref) < tol_f32, f"rel {rel(out, ref):.2e}")
    check(f"{label}: forward bf16 compute", rel(out16, ref) < tol_bf16, f"rel {rel(out16, ref):.2e}")
    loss_c, grad_c = cpu.loss_backward(pred, lat, grid=(2 * g, 2 * g))
    check(f"{label}: loss_backward (caller grid {2 * g}x{2 * g})", close_loss(loss_g, loss_c, tol_f32)
          and rel(grad_g, grad_c) < tol_f32, f"loss {loss_g:.6f} vs {loss_c:.6f}, grad rel {rel(grad_g, grad_c):.2e}")
    lloss_c, lgrad_c = cpu.latent_loss_backward(lat, tgt)
    check(f"{label}: latent_loss_backward", close_loss(lloss_g, lloss_c, tol_f32)
          and rel(lgrad_g, lgrad_c) < 10 * tol_f32, f"grad rel {rel(lgrad_g, lgrad_c):.2e}")
    losses_c = [cpu.train_step(lat, tgt)["loss"] for _ in range(steps)]
    with on(side):
        losses_g = [gpu.train_step(lat_d, tgt_d)["loss"] for _ in range(steps)]
    sync(side)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses_g, losses_c))
    after = rel(gpu.forward(lat_d).cpu(), cpu.forward(lat))
    check(f"{label}: {steps} train steps", worst < 1e-3 and after < 1e-2,
          f"losses {losses_c[0]:.4f}->{losses_c[-1]:.4f}, worst rel {worst:.2e}, forward after rel {after:.2e}")
    return gpu


def rectangular(ckpt, batch, size, tol_f32, tol_bf16):
    """CPU against CUDA on latents of another size and aspect than the stored grid: the
    position embedding is resized (bicubic) on the device, forward and backward."""
    cpu = Bridge(ckpt, device=-1, lr=1e-4, warmup_steps=0)
    gpu = Bridge(ckpt, device=DEVICE, lr=1e-4, warmup_steps=0)
    gpu16 = Bridge(ckpt, device=DEVICE, compute_dtype="f32" if DRY else "bf16")
    info = cpu.info()
    height, width = size
    h, w = cpu.token_grid(height, width)
    label = f"rectangular {height}x{width} latents ({h}x{w} tokens)"
    gen = torch.Generator().manual_seed(2)
    lat = torch.randn(batch, info["in_ch"], height, width, generator=gen)
    tgt = torch.randn(batch, h * w, info["target_dim"], generator=gen)
    side = new_stream()
    with on(side):
        lat_d, tgt_d = lat.to(TDEV), tgt.to(TDEV)
        out = gpu.forward(lat_d)
        out16 = gpu16.forward(lat_d)
        lloss_g, lgrad_g = gpu.latent_loss_backward(lat_d, tgt_d)
        step_g = gpu.train_step(lat_d, tgt_d)
        after_g = gpu.forward(lat_d)
    sync(side)
    ref = cpu.forward(lat)
    check(f"{label}: shape", tuple(out.shape) == (batch, h * w, info["target_dim"]), str(tuple(out.shape)))
    check(f"{label}: forward f32", rel(out, ref) < tol_f32, f"rel {rel(out, ref):.2e}")
    check(f"{label}: forward bf16 compute", rel(out16, ref) < tol_bf16, f"rel {rel(out16, ref):.2e}")
    lloss_c, lgrad_c = cpu.latent_loss_backward(lat, tgt)
    check(f"{label}: latent_loss_backward",
          close_loss(lloss_g, lloss_c, tol_f32) and rel(lgrad_g, lgrad_c) < 10 * tol_f32, f"loss {lloss_g:.6f} vs {lloss_c:.6f}, grad rel {rel(lgrad_g, lgrad_c):.2e}")
    step_c = cpu.train_step(lat, tgt)
    after_c = cpu.forward(lat)
    check(f"{label}: train step", close_loss(step_g["loss"], step_c["loss"], 1e-3) and rel(after_g, after_c) < 1e-2,
          f"loss {step_g['loss']:.6f} vs {step_c['loss']:.6f}, forward after rel {rel(after_g, after_c):.2e}")


def repa_alignment(ckpt, batch, tol_f32):
    """REPA alignment on a `repa` bridge (16x16 tokens from 32x32 latents), CPU against
    CUDA: a finer caller grid (pred pooled), a coarser one (the target pooled), and a
    coarser one on rectangular latents with the Gram term and spatial normalisation."""
    cases = [
        ("finer caller grid 32x32 (pred pooled 2x2)", (32, 32), (32, 32), {}),
        ("coarser caller grid 8x8 (target pooled 2x2)", (32, 32), (8, 8), {}),
        ("24x40 latents, caller grid 6x10, w_gram 0.5, spatial_norm_gamma 0.6", (24, 40), (6, 10),
         dict(w_gram=0.5, spatial_norm_gamma=0.6)),
    ]
    gen = torch.Generator().manual_seed(3)
    for label, (height, width), grid, settings in cases:
        cpu = Bridge(ckpt, device=-1, **settings)
        gpu = Bridge(ckpt, device=DEVICE, **settings)
        info = cpu.info()
        lat = torch.randn(batch, info["in_ch"], height, width, generator=gen)
        pred = torch.randn(batch, grid[0] * grid[1], info["target_dim"], generator=gen)
        side = new_stream()
        with on(side):
            loss_g, grad_g = gpu.loss_backward(pred.to(TDEV), lat.to(TDEV))  # the grid inferred
        sync(side)
        loss_c, grad_c = cpu.loss_backward(pred, lat, grid=grid)
        h, w = cpu.token_grid(height, width)
        check(f"repa bridge, {h}x{w} tokens: {label}",
              close_loss(loss_g, loss_c, tol_f32) and rel(grad_g, grad_c) < tol_f32
              and tuple(grad_g.shape) == tuple(pred.shape),
              f"loss {loss_g:.6f} vs {loss_c:.6f}, grad rel {rel(grad_g, grad_c):.2e}")
        cpu.close()
        gpu.close()


def host_pointer_rejected(gpu):
    info = gpu.info()
    side = info["latent_size"]
    host = np.zeros((1, info["in_ch"], side, side), np.float32)
    out = torch.empty(1, info["grid"] ** 2, info["target_dim"], device=TDEV)
    status = L.lib().bridge_forward_cuda_ptr(gpu._handle(), host.ctypes.data, out.data_ptr(), 1, side, side,
                                             L.DTYPE_F32, None)
    msg = (L.lib().bridge_last_error() or b"").decode()
    # The CPU build has no CUDA entry points to reach: it says so.
    want = "UNSUPPORTED" if DRY else "INVALID_ARGUMENT"
    check(f"host pointer as device pointer -> {want}", L.STATUS_NAMES.get(status) == want,
          f"status {L.STATUS_NAMES.get(status)}: {msg}")


def no_such_device(ckpt):
    want = ("UNSUPPORTED",) if DRY else ("DEVICE",)
    try:
        Bridge(ckpt, device=7)
        check("device 7 -> error", False, "created")
    except BridgeError as e:
        check(f"device 7 -> {want[0]}", e.status_name in want, str(e))


def current_context():
    """The driver's current context on this thread (None where there is no driver)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    ctx = ctypes.c_void_p()
    status = cuda.cuCtxGetCurrent(ctypes.byref(ctx))
    return (status, ctx.value)


def caller_state_unchanged(ckpt):
    """After every kind of call, on a side stream: the same torch device and stream, and
    the same driver context, as before it."""
    if DRY:
        skip("torch device, stream and CUDA context unchanged by calls", "no CUDA in a dry run")
        return
    b = Bridge(ckpt, device=DEVICE)
    info = b.info()
    x = torch.randn(2, info["in_ch"], info["latent_size"], info["latent_size"], device=TDEV)
    t = torch.randn(2, info["grid"] ** 2, info["target_dim"], device=TDEV)
    side = new_stream()
    changed = []
    with on(side):
        for name, call in [("forward", lambda: b.forward(x)), ("loss_backward", lambda: b.loss_backward(t, x)),
                           ("latent_loss_backward", lambda: b.latent_loss_backward(x, t)),
                           ("train_step", lambda: b.train_step(x, t)), ("info", b.info)]:
            before = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream, current_context())
            call()
            after = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream, current_context())
            if before != after:
                changed.append(f"{name}: {before} -> {after}")
    before = current_context()
    b.close()
    if current_context() != before:
        changed.append(f"destroy: {before} -> {current_context()}")
    sync()
    check("torch device, stream and CUDA context unchanged by calls", not changed, "; ".join(changed))


def threads_race(ckpt, steps):
    """One bridge, two host threads: forwards at batch 64 on one torch stream against
    train steps at batch 1 on another. Every forward must equal (within 1e-5 relative)
    the output of one weight version: the trainer's own forward right after each step."""
    b = Bridge(ckpt, device=DEVICE, lr=1e-2, warmup_steps=0)
    info = b.info()
    gen = torch.Generator().manual_seed(1)
    shape = (info["in_ch"], info["latent_size"], info["latent_size"])
    x = torch.randn(64, *shape, generator=gen).to(TDEV)
    x1 = torch.randn(1, *shape, generator=gen).to(TDEV)
    t1 = torch.randn(1, info["grid"] ** 2, info["target_dim"], generator=gen).to(TDEV)
    versions, seen, errors = [], [], []
    done = threading.Event()
    start = threading.Barrier(2)

    def trainer():
        s = new_stream()
        try:
            with on(s):
                start.wait()
                versions.append(b.forward(x))
                for _ in range(steps):
                    b.train_step(x1, t1)
                    versions.append(b.forward(x))
            sync(s)
        except Exception as e:  # noqa: BLE001 (reported as a failed check below)
            errors.append(repr(e))
        finally:
            done.set()

    def reader():
        s = new_stream()
        try:
            with on(s):
                start.wait()
                while not done.is_set() or len(seen) < 2:
                    seen.append(b.forward(x))
            sync(s)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=trainer), threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sync()
    if errors:
        check("two threads on one bridge: one weight version per forward", False, "; ".join(errors))
        return
    versions = [v.float().cpu() for v in versions]
    closest = min(rel(versions[i + 1], versions[i]) for i in range(len(versions) - 1))
    nearest = [min(range(len(versions)), key=lambda v: rel(y, versions[v])) for y in seen]
    off = [rel(y, versions[v]) for y, v in zip(seen, nearest)]
    mixed = sum(d > 1e-5 for d in off)
    matched = len({v for v, d in zip(nearest, off) if d <= 1e-5})
    check("two threads on one bridge: one weight version per forward",
          mixed == 0 and closest > 1e-3,
          f"{len(seen)} forwards, {len(versions)} versions (closest pair {closest:.2e} apart), "
          f"{mixed} mixed, {matched} versions matched")


def dlpack_calls(ckpt, batch):
    """ABI 3 through the binding: mixed dtypes, a device loss, the legacy default stream,
    all against the CPU path of the same library."""
    cpu = Bridge(ckpt, device=-1)
    gpu = Bridge(ckpt, device=DEVICE)
    info = cpu.info()
    g, d, s = info["grid"], info["target_dim"], info["latent_size"]
    gen = torch.Generator().manual_seed(4)
    lat = torch.randn(batch, info["in_ch"], s, s, generator=gen)
    pred = torch.randn(batch, (2 * g) ** 2, d, generator=gen)
    tgt = torch.randn(batch, g * g, d, generator=gen)
    loss_c, grad_c = cpu.loss_backward(pred.bfloat16().float(), lat)
    side = new_stream()
    with on(side):
        lat_d, pred16_d = lat.to(TDEV), pred.bfloat16().to(TDEV)
        loss_t = torch.full((), float("nan"), device=TDEV)
        got, grad_g = gpu.loss_backward(pred16_d, lat_d, loss_out=loss_t)
    sync(side)
    check("DLPack: bf16 pred with f32 latents, loss in a device tensor",
          got is loss_t and close_loss(loss_t.item(), loss_c, 1e-4) and grad_g.dtype == torch.bfloat16
          and rel(grad_g, grad_c) < 1e-2, f"loss {loss_t.item():.6f} vs {loss_c:.6f}, grad rel {rel(grad_g, grad_c):.2e}")
    # The legacy default stream: torch's current stream is handle 0, passed to __dlpack__ as 1.
    out = gpu.forward(lat.to(TDEV))
    lloss, lgrad = gpu.latent_loss_backward(lat.to(TDEV), tgt.to(TDEV), loss_out=torch.empty((), device=TDEV))
    sync()
    lloss_c, lgrad_c = cpu.latent_loss_backward(lat, tgt)
    check("DLPack: the legacy default stream", rel(out, cpu.forward(lat)) < 1e-4
          and close_loss(lloss.item(), lloss_c, 1e-4) and rel(lgrad, lgrad_c) < 1e-3,
          f"forward rel {rel(out, cpu.forward(lat)):.2e}, latent loss {lloss.item():.6f} vs {lloss_c:.6f}")
    caps = capabilities()
    check("capabilities", caps["abi_version"] == L.ABI_VERSION and caps["cuda"] == (not DRY)
          and (DRY or caps["cuda_devices"] >= 1) and caps["dlpack_version"] == (1, 0), str(caps))
    no_host_sync(gpu, cpu, lat, pred)


def no_host_sync(gpu, cpu, lat, pred):
    """A device loss leaves the host free: with the stream held busy by torch.cuda._sleep
    and the inputs made by kernels queued behind it, the calls must return long before the
    sleep ends, and their results, read after a sync, must be right (the library waited
    on the stream for its inputs with an event, not the host)."""
    name = "DLPack: forward and loss_backward with a device loss return before the stream is done"
    if DRY:
        skip(name, "no CUDA in a dry run")
        return
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        lat_d, pred_d = lat.to(TDEV), pred.to(TDEV)
        loss_t = torch.empty((), device=TDEV)
        gpu.loss_backward(pred_d, lat_d, loss_out=loss_t)  # warm-up (first-use work of this shape)
        gpu.forward(lat_d)
    side.synchronize()
    cycles = 2_000_000_000
    with torch.cuda.stream(side):
        start = time.perf_counter()
        torch.cuda._sleep(cycles)
        side.synchronize()
    slept = time.perf_counter() - start
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        lat2, pred2 = lat_d * 1.0, pred_d + 0.0  # queued behind the sleep
        start = time.perf_counter()
        _, grad_g = gpu.loss_backward(pred2, lat2, loss_out=loss_t)
        out = gpu.forward(lat2)
        host = time.perf_counter() - start
    side.synchronize()
    loss_c, grad_c = cpu.loss_backward(pred, lat)
    check(name, host < 0.25 * slept and close_loss(loss_t.item(), loss_c, 1e-4) and rel(grad_g, grad_c) < 1e-4
          and rel(out, cpu.forward(lat)) < 1e-4,
          f"host {host * 1e3:.1f} ms against a {slept * 1e3:.0f} ms sleep; loss {loss_t.item():.6f} vs {loss_c:.6f}")


def compiled_losses(ckpt, batch):
    """AlignLoss and LatentLoss (torch.library custom ops) in one torch.compile(fullgraph=True)
    step on the bridge's device: no graph break, the same loss and projector gradients as
    eager (aot_eager: the custom ops' fake and autograd registrations, without spending the
    device budget on inductor's compile)."""
    b = Bridge(ckpt, device=DEVICE)
    info = b.info()
    g, d, s = info["grid"], info["target_dim"], info["latent_size"]
    gen = torch.Generator().manual_seed(6)
    lat = torch.randn(batch, info["in_ch"], s, s, generator=gen).to(TDEV)
    hidden = torch.randn(batch, (2 * g) ** 2, 64, generator=gen).to(TDEV)
    tgt = torch.randn(batch, g * g, d, generator=gen).to(TDEV)
    torch.manual_seed(0)
    proj = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, d)).to(TDEV)
    dec = torch.nn.Conv2d(info["in_ch"], info["in_ch"], 3, padding=1).to(TDEV)
    align, latent = AlignLoss(b), LatentLoss(b)

    def step(h, x, t):
        with torch.autocast(TDEV, dtype=torch.bfloat16):
            a = align(proj(h), x)
        return a + 0.1 * latent(dec(x), t)

    breaks = torch._dynamo.explain(step)(hidden, lat, tgt).graph_break_count
    eager = step(hidden, lat, tgt)
    eager.backward()
    want = [p.grad.clone() for p in list(proj.parameters()) + list(dec.parameters())]
    for p in list(proj.parameters()) + list(dec.parameters()):
        p.grad = None
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, lat, tgt)
    loss.backward()
    got = [p.grad for p in list(proj.parameters()) + list(dec.parameters())]
    sync()
    worst = max(rel(a, w) for a, w in zip(got, want))
    check("custom ops under torch.compile(fullgraph=True), autocast bf16", breaks == 0
          and close_loss(loss.item(), eager.item(), 1e-5) and worst < 1e-2,
          f"{breaks} graph breaks, loss {loss.item():.6f} vs {eager.item():.6f}, worst grad rel {worst:.2e}")


def timed(fn, iters):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def throughput(ckpt, batches, iters):
    tm, _ = TorchBridge.from_safetensors(ckpt)
    tm = tm.to(TDEV).eval()
    flops = 8.9e9  # per sample, the default config's forward (DESIGN.md)
    for compute in ("f32",) if DRY else ("f32", "bf16"):
        b = Bridge(ckpt, device=DEVICE, compute_dtype=compute)
        for batch in batches:
            x = torch.randn(batch, 4, 32, 32, device=TDEV)
            sb = timed(lambda: b.forward(x), iters)
            with torch.no_grad(), torch.autocast(TDEV, dtype=torch.bfloat16, enabled=compute == "bf16"):
                st = timed(lambda: tm(x), iters)
            print(f"forward {compute:4s} batch {batch:5d}: bridge {batch / sb:9.0f} samples/s "
                  f"({batch * flops / sb / 1e12:6.1f} TFLOP/s, {100 * batch * flops / sb / BF16_PEAK:4.1f}% of "
                  f"the bf16 peak), torch eager {batch / st:9.0f}; ratio {st / sb:.2f}", flush=True)
    b = Bridge(ckpt, device=DEVICE)
    for batch in batches:
        x = torch.randn(batch, 4, 32, 32, device=TDEV)
        pred = torch.randn(batch, 64, 768, device=TDEV)
        tgt = torch.randn(batch, 64, 768, device=TDEV)
        sl = timed(lambda: b.loss_backward(pred, x), iters)
        strain = timed(lambda: b.train_step(x, tgt), max(1, iters // 2))
        print(f"batch {batch:5d}: loss_backward {1 / sl:8.1f} calls/s, train_step {batch / strain:8.0f} samples/s",
              flush=True)


def host_training(ckpt, batch):
    """ABI 5 on the device: the flat-vector calls against the CPU path, and BridgeModule
    with torch AdamW under DDP (NCCL, one process; gloo in the dry run) against the same
    steps on the CPU."""
    cpu, gpu = Bridge(ckpt, device=-1), Bridge(ckpt, device=DEVICE)
    info = cpu.info()
    g, d, s = info["grid"], info["target_dim"], info["latent_size"]
    gen = torch.Generator().manual_seed(6)
    lat, tgt = torch.randn(batch, info["in_ch"], s, s, generator=gen), torch.randn(batch, g * g, d, generator=gen)
    cot = torch.randn(batch, g * g, d, generator=gen)
    side = new_stream()
    with on(side):
        lat_d, tgt_d, cot_d = lat.to(TDEV), tgt.to(TDEV), cot.to(TDEV)
        loss_d = torch.empty((), device=TDEV)
        _, gp_d, gl_d = gpu.loss_grads(lat_d, tgt_d, 3, want_latents=True, loss_out=loss_d)
        vp_d, vl_d = gpu.vjp(lat_d, cot_d, 3, want_latents=True)
        flat_d = torch.empty(gpu.param_count(), device=TDEV)
        gpu.get_params(flat_d)
        gpu.set_params(flat_d)
        again_d = torch.empty_like(flat_d)
        gpu.get_params(again_d)
    sync(side)
    loss_c, gp_c, gl_c = cpu.loss_grads(lat, tgt, 3, want_latents=True)
    vp_c, vl_c = cpu.vjp(lat, cot, 3, want_latents=True)
    check("ABI 5: loss_grads (loss, flat gradient, latents' gradient) against the CPU",
          close_loss(loss_d.item(), loss_c, 1e-4) and rel(gp_d, gp_c) < 1e-3 and rel(gl_d, gl_c) < 1e-3,
          f"loss {loss_d.item():.6f} vs {loss_c:.6f}, grad rel {rel(gp_d, gp_c):.2e}, latents {rel(gl_d, gl_c):.2e}")
    check("ABI 5: the VJP against the CPU", rel(vp_d, vp_c) < 1e-3 and rel(vl_d, vl_c) < 1e-3,
          f"params rel {rel(vp_d, vp_c):.2e}, latents {rel(vl_d, vl_c):.2e}")
    check("ABI 5: get/set round trip on the device", torch.equal(flat_d, again_d)
          and rel(flat_d, torch.from_numpy(cpu.get_params())) == 0)
    # BridgeModule under DDP, one process, against the same 3 steps on the CPU.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dino_bridge.torch import BridgeModule

    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo" if DRY else "nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        weights = {}
        for where, ordinal in (("cpu", -1), (TDEV, DEVICE)):
            module = BridgeModule(Bridge(ckpt, device=ordinal, lr=1e-3, warmup_steps=1))
            model = DDP(module) if where == TDEV else module
            opt = torch.optim.AdamW(module.param_groups(0.05), lr=1e-3, fused=not DRY and where != "cpu")
            for _ in range(3):
                opt.zero_grad()
                model(lat.to(where), tgt.to(where)).backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                opt.step()
            weights[where] = torch.cat([p.detach().flatten().cpu() for p in module.parameters()])
        check("ABI 5: BridgeModule under DDP on the device = the CPU module", rel(weights[TDEV], weights["cpu"]) < 1e-4,
              f"rel {rel(weights[TDEV], weights['cpu']):.2e}")
    finally:
        dist.destroy_process_group()


def main():
    fx = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))
    quick = "--quick" in sys.argv or DRY
    if DRY:
        print(f"dry run: CPU bridges and CPU tensors; library {os.environ.get('DINO_BRIDGE_LIB')}")
    else:
        assert torch.cuda.is_available(), "no CUDA device visible to torch"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; "
              f"library {os.environ.get('DINO_BRIDGE_LIB')}")
    model = fx / "model.safetensors"
    tiny = compare("fixtures", model, 4, 1e-4, 5e-2, 5)
    host_pointer_rejected(tiny)
    no_such_device(model)
    caller_state_unchanged(model)
    threads_race(model, 12 if quick else 24)
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "default.safetensors")
    Bridge(seed=1, dropout=0.0).save(ckpt)
    compare("default config", ckpt, 2 if DRY else 8, 1e-3, 8e-2, 3 if quick else 20)
    rectangular(ckpt, 2 if DRY else 8, (24, 40), 1e-3, 8e-2)
    repa = os.path.join(tmp, "repa.safetensors")
    Bridge(adapter_depth=1, grid=16, seed=1, dropout=0.0).save(repa)
    repa_alignment(repa, 2 if DRY else 8, 1e-3)
    dlpack_calls(model, 4)
    compiled_losses(model, 4)
    host_training(model, 4)
    if DRY:
        throughput(ckpt, [2], 1)
    else:
        throughput(ckpt, [256] if quick else [256, 1024], 3 if quick else 10)
    print(f"{len(FAILED)} checks failed: {FAILED}" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
