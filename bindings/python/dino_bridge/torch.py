"""PyTorch: REPA alignment as a loss module, built on `torch.library` custom ops.

    align = AlignLoss(Bridge(adapter_depth=1, grid=16))     # or AlignLoss("bridge.safetensors")
    loss = diffusion_loss + lam * align(projector(h), latents)
    loss.backward()                      # the bridge's gradient flows into the projector

`pred` is the projector's output `[B, ph*pw, D]` on the caller's token grid `(ph, pw)`
(16x16 for SiT/2 on 32x32 latents); `latents` `[B, C, H, W]` give the bridge's grid
`(h, w) = (H, W) / 2^adapter_depth` (8x8 for the published bridge, 16x16 for `repa`).
The caller grid must equal the bridge's, or be `k` times it (pred is average-pooled to it
inside the library and the gradient spread back to all `ph*pw` tokens), or `1/k` of it
(the bridge's target is pooled instead). Pass it as `grid=(ph, pw)`, or leave it out: it
is inferred from the token count when exactly one grid fits. The bridge itself is frozen.

The loss is alignment's (`align_w_*` of the Bridge): REPA's cosine loss `mean(1 - cos)`
by default, so `AlignLoss` is REPA's projection loss (REPA logs `mean(-cos)`, one less:
`AlignLoss.repa_logged(loss)`). The bridge's own training loss (`w_*`) is another.
`reduction="mean" | "sum" | "none"` as in torch (`"none"`: each sample's loss, `[B]`, for
timestep weighting or masking, each with its gradient).

Non-finite input: on the CPU the library checks pred, latents and the loss and raises
`BridgeError` (`NON_FINITE`) by default (`nonfinite="raise"`); `nonfinite="propagate"`
returns a NaN loss and a NaN gradient instead, so that a `GradScaler`, which checks the
gradients of the optimiser's parameters, skips the step as it would in pure torch. On a
GPU nothing is checked (that would need a host sync): a non-finite input propagates. Loss
scaling cures an overflow in the backward, not one in the forward (an `inf` in `pred`).

The losses are the custom ops `torch.ops.dino_bridge.align_loss` and
`torch.ops.dino_bridge.latent_loss` (`torch.library.custom_op`, with `register_fake` and
`register_autograd`), so `torch.compile(fullgraph=True)` traces a training step through
them without a graph break. Each op computes the loss and its gradient in one library call
and saves the gradient for backward. Each tensor reaches the library in its own dtype:
under `torch.autocast` a bf16 `pred` is read as bf16 and f32 latents as f32 (the bridge's
target is not rounded). The loss is a float32 tensor on pred's device, written by the
library there (on a GPU with no host sync).
"""

import itertools
import json
import math
import threading
import weakref
from pathlib import Path
from typing import List, Tuple

import torch

from .bridge import Bridge, BridgeError, _grid_pair

# The ops take a bridge as an integer key (custom ops take tensors and plain values only);
# the registry holds the Bridge weakly: an AlignLoss/LatentLoss keeps its own reference.
_BRIDGES: "weakref.WeakValueDictionary[int, Bridge]" = weakref.WeakValueDictionary()
_KEYS: "weakref.WeakKeyDictionary[Bridge, int]" = weakref.WeakKeyDictionary()
_NEXT = itertools.count(1)
_LOCK = threading.Lock()


def bridge_key(bridge: Bridge) -> int:
    """The integer the custom ops name `bridge` by (the same for the life of the Bridge)."""
    with _LOCK:
        key = _KEYS.get(bridge)
        if key is None:
            key = next(_NEXT)
            _KEYS[bridge], _BRIDGES[key] = key, bridge
        return key


def _bridge(key: int) -> Bridge:
    b = _BRIDGES.get(key)
    if b is None:
        raise ValueError(f"dino_bridge: no live Bridge has key {key} (it was garbage-collected)")
    return b


def _as_bridge(bridge_or_path, **kwargs) -> Bridge:
    return bridge_or_path if isinstance(bridge_or_path, Bridge) else Bridge(bridge_or_path, **kwargs)


def _grid_list(grid) -> List[int]:
    """`grid` as the op's `int[]`: [] (inferred), or [ph, pw]."""
    return [] if grid is None else list(_grid_pair(grid))


# -- the ops -----------------------------------------------------------------------------------


def _loss_buffer(like: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Where the library writes the loss: 0-d (the mean) or `[B]` (each sample's)."""
    shape = (like.shape[0],) if per_sample else ()
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _non_finite(e: Exception, propagate: bool) -> bool:
    """Whether `e` is the library's NON_FINITE and the caller asked for NaN instead."""
    return propagate and isinstance(e, BridgeError) and e.status_name == "NON_FINITE"


@torch.library.custom_op("dino_bridge::align_loss", mutates_args=())
def align_loss(pred: torch.Tensor, latents: torch.Tensor, bridge: int, grid: List[int], per_sample: bool,
               propagate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """REPA alignment of `pred` `[B, ph*pw, D]` to the frozen bridge's tokens for `latents`:
    `(loss, d mean-loss / d pred)`, the loss a float32 tensor on pred's device (0-d, or
    `[B]` with `per_sample`), the gradient of pred's shape and dtype. `grid` is `[ph, pw]`,
    or `[]` to infer it. `propagate`: a non-finite input or loss gives NaN, not an error."""
    loss = _loss_buffer(pred, per_sample)
    try:
        _, grad = _bridge(bridge).loss_backward(pred.detach().contiguous(), latents.detach().contiguous(),
                                                grid=tuple(grid) if grid else None, loss_out=loss)
    except BridgeError as e:
        if not _non_finite(e, propagate):
            raise
        return loss.fill_(float("nan")), torch.full_like(pred, float("nan"))
    return loss, grad


@align_loss.register_fake
def _(pred, latents, bridge, grid, per_sample, propagate):
    shape = (pred.shape[0],) if per_sample else ()
    return pred.new_empty(shape, dtype=torch.float32), pred.new_empty(pred.shape)


@torch.library.custom_op("dino_bridge::latent_loss", mutates_args=())
def latent_loss(latents: torch.Tensor, target: torch.Tensor, bridge: int, per_sample: bool,
                propagate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss between bridge(`latents`) and `target` `[B, h*w, D]`, and the gradient of
    its mean with respect to the latents: `(loss, grad_latents)`, as in `align_loss`."""
    loss = _loss_buffer(latents, per_sample)
    try:
        _, grad = _bridge(bridge).latent_loss_backward(latents.detach().contiguous(), target.detach().contiguous(),
                                                       loss_out=loss)
    except BridgeError as e:
        if not _non_finite(e, propagate):
            raise
        return loss.fill_(float("nan")), torch.full_like(latents, float("nan"))
    return loss, grad


@latent_loss.register_fake
def _(latents, target, bridge, per_sample, propagate):
    shape = (latents.shape[0],) if per_sample else ()
    return latents.new_empty(shape, dtype=torch.float32), latents.new_empty(latents.shape)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The gradient of `sum(grad_loss * loss)` from the gradient of the mean loss: a 0-d
    loss scales it; a per-sample loss `[B]` weighs each sample's part, `B * grad[b]` (each
    sample's loss reaches only its own slice of the input)."""
    grad_loss = grad_loss.to(grad.dtype)
    if grad_loss.dim() == 0:
        return grad * grad_loss
    weights = grad_loss * grad.shape[0]
    return grad * weights.reshape((-1,) + (1,) * (grad.dim() - 1))


def _align_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The bridge is frozen and its target a constant: no gradient for latents.
    return _scaled(grad, grad_loss), None, None, None, None, None


def _latent_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # The library gives no gradient for the target (a constant in DESIGN.md's use).
    return _scaled(grad, grad_loss), None, None, None, None


align_loss.register_autograd(_align_backward, setup_context=_setup_context)
latent_loss.register_autograd(_latent_backward, setup_context=_setup_context)


# -- the modules -------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")
_NONFINITE = ("raise", "propagate")


def _choice(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")
    return value


def _tensor(name: str, x, module: str) -> torch.Tensor:
    """`x` as the torch tensor a module takes; anything else is a one-line TypeError (no
    dump of the values). A list of one projection (REPA keeps one per encoder in
    `zs_tilde`) is taken as that projection."""
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], torch.Tensor):
            return x[0]
        kinds = ", ".join(type(v).__name__ for v in x[:4]) + (", ..." if len(x) > 4 else "")
        raise TypeError(f"{module}: {name} is a {type(x).__name__} of {len(x)} ({kinds}); a bridge stands for one "
                        f"encoder: pass one tensor (e.g. zs_tilde[0]), or one {module} per encoder")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: {name} is a {type(x).__module__}.{type(x).__name__}; it takes torch tensors "
                        f"(Bridge.loss_backward and latent_loss_backward take numpy and other DLPack arrays)")
    return x


def _reduce(loss: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    """The library's mean (0-d) or per-sample loss (`[B]`) as `reduction` asks."""
    return loss * batch if reduction == "sum" else loss


class AlignLoss(torch.nn.Module):
    """`loss = AlignLoss(bridge)(pred, latents)`: REPA alignment of `pred` `[B, ph*pw, D]`
    to the frozen bridge's tokens for `latents` `[B, C, H, W]` (the clean latents, as the
    diffusion model's target sees them); differentiable in `pred`.

    The loss is alignment's (`align_w_*` of the Bridge): REPA's `mean(1 - cos)` by default
    (`repa_logged(loss)` gives what REPA logs, `mean(-cos)`). `reduction` = "mean" (the
    default), "sum" or "none" (each sample's loss, `[B]`). `nonfinite` = "raise" (the
    default: NaN or Inf in the inputs or the loss raise `BridgeError` on the CPU) or
    "propagate" (a NaN loss and gradient, for `GradScaler` to skip the step).

    `pred_grid=(ph, pw)` fixes the caller's token grid for every call (a call's own
    `grid=` overrides it); without either, it is inferred per call from the token count
    and the latents' size. Other keyword arguments go to `Bridge(...)` when `bridge` is a
    path (e.g. `align_w_gram`, `spatial_norm_gamma`)."""

    def __init__(self, bridge, pred_grid=None, *, reduction: str = "mean", nonfinite: str = "raise", **kwargs):
        super().__init__()
        self.reduction = _choice("reduction", reduction, _REDUCTIONS)
        self.nonfinite = _choice("nonfinite", nonfinite, _NONFINITE)
        self.bridge = _as_bridge(bridge, **kwargs)
        self.pred_grid = pred_grid
        self._key = bridge_key(self.bridge)

    def forward(self, pred: torch.Tensor, latents: torch.Tensor, grid=None) -> torch.Tensor:
        pred = _tensor("pred", pred, "AlignLoss")
        latents = _tensor("latents", latents, "AlignLoss")
        grid = self.pred_grid if grid is None else grid
        loss, _ = torch.ops.dino_bridge.align_loss(pred, latents, self._key, _grid_list(grid),
                                                   self.reduction == "none", self.nonfinite == "propagate")
        return _reduce(loss, self.reduction, pred.shape[0])

    def repa_logged(self, loss: torch.Tensor) -> torch.Tensor:
        """What REPA logs as `proj_loss` for a loss of this module: `mean(-cos)`, which is
        `loss - 1` (for "mean", and per sample for "none"). Only for REPA's weights (the
        default) and those two reductions."""
        w = self.bridge.settings()
        if (w["align_w_cos"], w["align_w_norm"], w["align_w_raw"], w["align_w_gram"]) != (1.0, 0.0, 0.0, 0.0):
            raise ValueError("repa_logged: this bridge's alignment is not REPA's cosine loss (align_w_* are not "
                             "1, 0, 0, 0)")
        if self.reduction == "sum":
            raise ValueError("repa_logged: REPA logs a mean; use reduction 'mean' or 'none'")
        return loss - 1.0


class LatentLoss(torch.nn.Module):
    """`loss = LatentLoss(bridge)(latents, target)`: a DINO-space loss on predicted
    latents `[B, C, H, W]` against `target` `[B, h*w, D]` on their token grid,
    differentiable in `latents` through the frozen bridge, with alignment's weights.
    `reduction` and `nonfinite` as in `AlignLoss`."""

    def __init__(self, bridge, *, reduction: str = "mean", nonfinite: str = "raise", **kwargs):
        super().__init__()
        self.reduction = _choice("reduction", reduction, _REDUCTIONS)
        self.nonfinite = _choice("nonfinite", nonfinite, _NONFINITE)
        self.bridge = _as_bridge(bridge, **kwargs)
        self._key = bridge_key(self.bridge)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        latents = _tensor("latents", latents, "LatentLoss")
        target = _tensor("target", target, "LatentLoss")
        loss, _ = torch.ops.dino_bridge.latent_loss(latents, target, self._key, self.reduction == "none",
                                                    self.nonfinite == "propagate")
        return _reduce(loss, self.reduction, latents.shape[0])


# -- training the bridge in the host's own stack (ABI 5) --------------------------------------
#
# `BridgeModule`'s parameters are views of one float32 buffer, the flat vector of the C API.
# The ops take the parameters as their autograd inputs and hand the library that buffer;
# their backward cuts the flat gradient back into one view per parameter.

_MODULES: "weakref.WeakValueDictionary[int, BridgeModule]" = weakref.WeakValueDictionary()


def _module(key: int) -> "BridgeModule":
    m = _MODULES.get(key)
    if m is None:
        raise ValueError(f"dino_bridge: no live BridgeModule has key {key} (it was garbage-collected)")
    return m


def _grads_of_params(grad: torch.Tensor, shapes: List[torch.Size]) -> List[torch.Tensor]:
    """The flat gradient cut into the parameters' shapes (views of it, in order)."""
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(grad[offset:offset + n].view(shape))
        offset += n
    return out


@torch.library.custom_op("dino_bridge::train_loss", mutates_args=())
def train_loss(params: List[torch.Tensor], latents: torch.Tensor, targets: torch.Tensor, module: int, seed: int,
               want_latents: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bridge's training loss of `latents` against `targets` in training mode (dropout
    masks from `seed`, or the module's own sequence when `seed < 0`), with the weights
    `params` (views of the module's flat buffer): `(loss, flat gradient, latents' gradient
    or an empty tensor)`, all float32."""
    m = _module(module)
    flat = m._flat_for_call(params)
    loss = torch.empty((), dtype=torch.float32, device=flat.device)
    grad = torch.empty_like(flat)
    grad_latents = torch.empty(latents.shape, dtype=torch.float32, device=latents.device) if want_latents else None
    m.bridge.loss_grads(latents.detach().contiguous(), targets.detach().contiguous(), m._seed(seed), grad_params=grad,
                        grad_latents=grad_latents, loss_out=loss)
    return loss, grad, (grad_latents if want_latents else latents.new_empty(0, dtype=torch.float32))


@train_loss.register_fake
def _(params, latents, targets, module, seed, want_latents):
    n = sum(p.numel() for p in params)
    gl = latents.new_empty(latents.shape if want_latents else (0,), dtype=torch.float32)
    return latents.new_empty((), dtype=torch.float32), params[0].new_empty(n), gl


def _train_loss_context(ctx, inputs, output):
    params, latents = inputs[0], inputs[1]
    _, grad, grad_latents = output
    ctx.mark_non_differentiable(grad, grad_latents)
    ctx.save_for_backward(grad, grad_latents)
    ctx.shapes = [p.shape for p in params]
    ctx.latents_dtype = latents.dtype
    ctx.want_latents = inputs[5]


def _train_loss_backward(ctx, grad_loss, _g, _gl):
    grad, grad_latents = ctx.saved_tensors
    g = grad * grad_loss.to(grad.dtype)
    params = _grads_of_params(g, ctx.shapes)
    gl = (grad_latents * grad_loss).to(ctx.latents_dtype) if ctx.want_latents else None
    return params, gl, None, None, None, None


train_loss.register_autograd(_train_loss_backward, setup_context=_train_loss_context)


@torch.library.custom_op("dino_bridge::train_tokens", mutates_args=())
def train_tokens(params: List[torch.Tensor], latents: torch.Tensor, module: int,
                 seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens `[B, h*w, target_dim]` (float32) of `latents` in training mode with the
    weights `params`, and the seed its dropout masks came from (int64, 0-d, CPU), which
    the backward's `train_vjp` draws again."""
    m = _module(module)
    flat = m._flat_for_call(params)
    used = m._seed(seed)
    b, grid = m.bridge._latents_shape(latents)
    out = torch.empty((b, grid[0] * grid[1], m.bridge._info["target_dim"]), dtype=torch.float32,
                      device=flat.device)
    m.bridge.forward_train(latents.detach().contiguous(), used, out=out)
    return out, torch.tensor(used - 2**63, dtype=torch.int64)  # int64 holds a u64 shifted


@train_tokens.register_fake
def _(params, latents, module, seed):
    m = _module(module)
    b, grid = m.bridge._latents_shape(latents)
    out = latents.new_empty((b, grid[0] * grid[1], m.bridge._info["target_dim"]), dtype=torch.float32)
    return out, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("dino_bridge::train_vjp", mutates_args=())
def train_vjp(params: List[torch.Tensor], latents: torch.Tensor, grad_out: torch.Tensor, module: int,
              seed: torch.Tensor, want_latents: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of `train_tokens` (the same seed, so the same masks):
    `(flat gradient, latents' gradient or an empty tensor)`, float32."""
    m = _module(module)
    flat = m._flat_for_call(params)
    grad = torch.empty_like(flat)
    grad_latents = torch.empty(latents.shape, dtype=torch.float32, device=latents.device) if want_latents else None
    m.bridge.vjp(latents.detach().contiguous(), grad_out.detach().to(torch.float32).contiguous(),
                 int(seed.item()) + 2**63, grad_params=grad, grad_latents=grad_latents)
    return grad, (grad_latents if want_latents else latents.new_empty(0, dtype=torch.float32))


@train_vjp.register_fake
def _(params, latents, grad_out, module, seed, want_latents):
    n = sum(p.numel() for p in params)
    return params[0].new_empty(n), latents.new_empty(latents.shape if want_latents else (0,), dtype=torch.float32)


def _train_tokens_context(ctx, inputs, output):
    params, latents, module, _ = inputs
    _, used = output
    ctx.mark_non_differentiable(used)
    ctx.save_for_backward(*params, latents, used)
    ctx.module = module
    ctx.latents_grad = latents.requires_grad


def _train_tokens_backward(ctx, grad_out, _used):
    *params, latents, used = ctx.saved_tensors
    grad, grad_latents = torch.ops.dino_bridge.train_vjp(params, latents, grad_out, ctx.module, used,
                                                         ctx.latents_grad)
    gl = grad_latents.to(latents.dtype) if ctx.latents_grad else None
    return _grads_of_params(grad, [p.shape for p in params]), gl, None, None


train_tokens.register_autograd(_train_tokens_backward, setup_context=_train_tokens_context)


def _tree(module: torch.nn.Module, dotted: str):
    """The submodule that holds `dotted`'s last part, made on the way (plain containers,
    so that named_parameters() gives the checkpoint's names)."""
    *path, leaf = dotted.split(".")
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        module = child
    return module, leaf


class BridgeModule(torch.nn.Module):
    """The bridge as a torch module, trained by the host's own stack (its optimiser, DDP):

        module = BridgeModule(Bridge(...))            # or BridgeModule.from_checkpoint(path)
        opt = torch.optim.AdamW(module.param_groups(0.05), lr=2e-4, betas=(0.9, 0.999))
        loss = DDP(module)(latents, targets)         # the bridge's training loss
        loss.backward(); opt.step()

    Its named parameters are the checkpoint's tensors (names and shapes), views of one
    float32 buffer: a call hands the library that buffer (one copy of the weights into the
    library, `bridge_set_params_dlpack`), and the gradient comes back as one flat vector
    (`bridge_loss_grads_dlpack`, `bridge_vjp_dlpack`) cut into views per parameter.
    `module(latents, targets)` is the training loss (the bridge's `w_*`), `module(latents)`
    the tokens; both are differentiable in the parameters and the latents, and run as the
    custom ops `dino_bridge::train_loss` / `train_tokens` / `train_vjp` (no graph break
    under `torch.compile`).

    Dropout (the config's `dropout`) draws its masks from a seed per call: the module's
    own sequence, mixed from `dropout_seed`, the process's rank under
    `torch.distributed` and a call count; or `seed=` given to the call. With dropout 0 the
    eval mode is the same function; with dropout > 0 `module.eval()` gives the eval
    forward's tokens, without gradients.

    `.to()`, `.float()`, `.cuda()` and `load_state_dict` keep the parameters views of the
    buffer (`_apply` is overridden: a move to another device makes a bridge there); each
    call checks that they still are. What replaces them (FSDP, ZeRO-3 parameter sharding,
    `load_state_dict(assign=True)`, `.half()`) is refused with a message: use DDP."""

    def __init__(self, bridge, *, dropout_seed: int = 0, **kwargs):
        super().__init__()
        from .bridge import Bridge

        self.bridge = bridge if isinstance(bridge, Bridge) else Bridge(bridge, **kwargs)
        self.dropout_seed = int(dropout_seed)
        self._calls = 0
        self._layout = self.bridge.param_info()
        self._key = id(self)
        _MODULES[self._key] = self
        ordinal = self.bridge.info()["device"]
        device = torch.device("cpu") if ordinal < 0 else torch.device("cuda", ordinal)
        flat = torch.empty(self.bridge.param_count(), dtype=torch.float32, device=device)
        self.bridge.get_params(flat)
        self._flat = flat
        self._names = []
        for p in self._layout:
            holder, leaf = _tree(self, p["name"])
            holder.register_parameter(leaf, torch.nn.Parameter(self._view(p)))
            self._names.append(p["name"])
        self._step = self.bridge.info()["step"]

    def _view(self, p: dict) -> torch.Tensor:
        return self._flat[p["offset"]:p["offset"] + p["numel"]].view(p["shape"])

    @classmethod
    def from_checkpoint(cls, path, *, optimizer=None, **kwargs) -> "BridgeModule":
        """A module over a library checkpoint (`bridge-train`'s or `save`'s); with
        `optimizer`, see `load_optimizer_state`."""
        module = cls(str(path), **kwargs)
        if optimizer is not None:
            module.load_optimizer_state(optimizer, path)
        return module

    # -- what the host's optimiser needs --------------------------------------------------
    def param_groups(self, weight_decay: float) -> list:
        """Two groups for torch's optimisers: the tensors the library's AdamW decays
        (matrices and kernels; not biases, norm scales, the position embedding) with
        `weight_decay`, the rest with none."""
        params = dict(self.named_parameters())
        decay = [params[p["name"]] for p in self._layout if p["decays"]]
        other = [params[p["name"]] for p in self._layout if not p["decays"]]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]

    def lr_lambda(self, step: int) -> float:
        """The library's schedule as a factor of the base rate for the update with 0-based
        index `step` (linear warmup, then cosine to 0 over `total_steps`; constant when
        `total_steps` is 0), for `torch.optim.lr_scheduler.LambdaLR`."""
        s = self.bridge.settings()
        warmup, total = s["warmup_steps"], s["total_steps"]
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def step(self) -> int:
        """Updates applied so far, as the checkpoint it came from (or `save`) records."""
        return self._step

    # -- the calls ------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, targets: "torch.Tensor | None" = None, *, seed: "int | None" = None):
        latents = _tensor("latents", latents, "BridgeModule")
        params = list(self.parameters())
        seed = -1 if seed is None else int(seed) % 2**63
        if not self.training and self.bridge._info["dropout"] > 0:
            if targets is not None:
                raise ValueError("BridgeModule.eval() with dropout > 0 gives tokens only (the training loss is a "
                                 "training-mode quantity); call module.train() or bridge-train eval")
            return self.bridge.forward(latents.detach().to(torch.float32).contiguous())
        if targets is not None:
            targets = _tensor("targets", targets, "BridgeModule")
            loss, _, _ = torch.ops.dino_bridge.train_loss(params, latents, targets, self._key, seed,
                                                          latents.requires_grad)
            return loss
        tokens, _ = torch.ops.dino_bridge.train_tokens(params, latents, self._key, seed)
        return tokens

    def _seed(self, seed: int) -> int:
        """The seed of one call's masks: `seed` when given, else the module's sequence."""
        if seed >= 0:
            return seed
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        self._calls += 1
        return (self.dropout_seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + self._calls) % 2**64

    def _flat_for_call(self, params: List[torch.Tensor]) -> torch.Tensor:
        """The buffer, after checking that `params` are still its views (in order), and
        handed to the library: one weight version for the call."""
        flat = self._flat
        base = flat.data_ptr()
        if len(params) != len(self._layout):
            raise RuntimeError(f"BridgeModule: {len(params)} parameters reached the op, the bridge has "
                               f"{len(self._layout)}")
        for p, info in zip(params, self._layout):
            if (p.device != flat.device or p.dtype != torch.float32 or tuple(p.shape) != info["shape"]
                    or p.data_ptr() != base + 4 * info["offset"] or not p.is_contiguous()):
                raise RuntimeError(
                    f"BridgeModule: parameter {info['name']} is no longer a view of the module's flat float32 buffer "
                    f"(it is {p.dtype} {list(p.shape)} on {p.device}). Something replaced it: FSDP and ZeRO-3 "
                    f"parameter sharding, load_state_dict(assign=True), .half() or a manual `.data =` are not "
                    f"supported; train with DDP, or copy into the parameters in place")
        self.bridge.set_params(flat)
        return flat

    # -- keeping the parameters views -----------------------------------------------------
    def _apply(self, fn, recurse=True):
        moved = fn(self._flat)
        if moved.dtype != torch.float32:
            raise TypeError(f"BridgeModule keeps float32 master weights (the library computes in f32, or in bf16 on "
                            f"a GPU with compute_dtype='bf16'); it cannot become {moved.dtype}")
        if moved.device != self._flat.device:
            self._move_to(moved.device)
        return self

    def _move_to(self, device: torch.device) -> None:
        """A bridge on `device` with this one's weights, moments, step and settings; the
        parameters (the same objects) become views of a buffer there."""
        import tempfile

        from .bridge import Bridge

        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"BridgeModule: device {device} is not supported (cpu or cuda)")
        ordinal = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                     else torch.cuda.current_device())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "move.safetensors"
            self.bridge.set_params(self._flat)
            self.bridge.save(path)
            self.bridge = Bridge(path, device=ordinal, **self.bridge._made_with, **self.bridge.settings())
        flat = torch.empty(self.bridge.param_count(), dtype=torch.float32, device=device)
        self.bridge.get_params(flat)
        self._flat = flat
        params = dict(self.named_parameters())
        with torch.no_grad():
            for info in self._layout:
                params[info["name"]].data = self._view(info)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, path, optimizer: "torch.optim.Optimizer | None" = None, ema: "dict | None" = None,
             step: "int | None" = None) -> None:
        """Writes a library checkpoint (atomically): the weights, the config and the train
        state as the library writes them; with `optimizer` (torch's AdamW over this
        module's parameters) its moments as `optim.m.<name>` / `optim.v.<name>` and its
        step as the train state's; `ema` (name -> tensor) as `ema.<name>`. `bridge-train
        train --resume` and `from_checkpoint` continue it."""
        import tempfile

        from . import checkpoint

        path = Path(path)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            own = Path(tmp) / "library.safetensors"
            self.bridge.set_params(self._flat)
            self.bridge.save(own)
            meta, tensors = checkpoint.read(own)
        state = json.loads(meta.get("train_state", "{}"))
        if optimizer is not None:
            moments, opt_step = self._moments_of(optimizer)
            tensors.update(moments)
            state["step"] = opt_step
        if step is not None:
            state["step"] = int(step)
        if ema is not None:
            for name, t in ema.items():
                tensors[f"ema.{name}"] = t.detach().to("cpu", torch.float32).numpy()
        meta["train_state"] = json.dumps(state)
        checkpoint.write(path, meta, tensors)
        self._step = state.get("step", self._step)

    def _moments_of(self, optimizer) -> Tuple[dict, int]:
        """torch AdamW's `exp_avg` / `exp_avg_sq` by checkpoint name, and its step (the
        same for every parameter it has stepped)."""
        out, steps = {}, set()
        for name, p in self.named_parameters():
            st = optimizer.state.get(p, {})
            if "exp_avg" not in st:
                zeros = torch.zeros(p.shape).numpy()
                out[f"optim.m.{name}"], out[f"optim.v.{name}"] = zeros, zeros
                continue
            out[f"optim.m.{name}"] = st["exp_avg"].detach().to("cpu", torch.float32).numpy()
            out[f"optim.v.{name}"] = st["exp_avg_sq"].detach().to("cpu", torch.float32).numpy()
            steps.add(int(st["step"]))
        if len(steps) > 1:
            raise ValueError(f"the optimiser's parameters have stepped different counts {sorted(steps)}; a checkpoint "
                             f"has one step")
        return out, (steps.pop() if steps else 0)

    @staticmethod
    def read_ema(path) -> "dict | None":
        """The moving average a checkpoint carries (`ema.<name>`, as `bridge-train --ema`
        and `save(ema=...)` write it), by parameter name, or None without one."""
        from . import checkpoint

        _, tensors = checkpoint.read(path, prefix="ema.")
        return {name[len("ema."):]: torch.from_numpy(t) for name, t in tensors.items()} or None

    def load_optimizer_state(self, optimizer, path) -> int:
        """Sets torch AdamW's state for this module's parameters from a library checkpoint:
        `exp_avg` / `exp_avg_sq` from its moments, `step` from its train state (the
        library's step is torch's per-parameter step: both count updates and correct the
        bias by it). Returns the step (for a scheduler's `last_epoch`)."""
        from . import checkpoint

        meta, tensors = checkpoint.read(path, prefix="optim.")
        step = int(json.loads(meta.get("train_state", "{}")).get("step", 0))
        fused = any(g.get("fused") for g in optimizer.param_groups)  # its step lives on the device
        for name, p in self.named_parameters():
            m, v = tensors.get(f"optim.m.{name}"), tensors.get(f"optim.v.{name}")
            if m is None or v is None:
                raise ValueError(f"{path} has no optimiser moments for {name}: not a training checkpoint")
            optimizer.state[p] = {
                "step": torch.tensor(float(step), device=p.device if fused else "cpu"),
                "exp_avg": torch.from_numpy(m).to(p.device),
                "exp_avg_sq": torch.from_numpy(v).to(p.device),
            }
        self._step = step
        return step
