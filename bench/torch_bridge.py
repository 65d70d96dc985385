"""The bridge architecture of DESIGN.md in plain PyTorch (eager), loading the same
safetensors checkpoints as the Rust library, for side-by-side benchmarks."""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_safetensors(path):
    """(tensors as float32 numpy arrays, metadata) without the safetensors package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": np.float32, "F16": np.float16}
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        tensors[name] = np.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"]).astype(np.float32)
    return tensors, meta


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, c, eps=1e-5), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, c, eps=1e-5), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class Stage(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 2, stride=2)
        self.res = ResBlock(c_out)


class Adapter(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mid, out, depth = cfg["adapter_mid_channels"], cfg["adapter_out_channels"], cfg["adapter_depth"]
        self.stem = nn.Conv2d(cfg["in_ch"], mid, 3, padding=1)
        chans, c = [], mid
        for s in range(depth):
            c_out = out if s == depth - 1 else mid
            chans.append((c, c_out))
            c = c_out
        self.stages = nn.ModuleList(Stage(a, b) for a, b in chans)
        self.norm_out = nn.GroupNorm(32, out, eps=1e-5)
        self.proj = nn.Linear(out, cfg["width"])
        self.shift, self.scale = cfg["latent_shift"], cfg["latent_scale"]

    def forward(self, z):
        """Tokens [B, h*w, width] (row-major) and the token grid (h, w)."""
        x = self.stem((z - self.shift) * self.scale)
        for st in self.stages:
            x = st.res(st.down(x))
        x = F.silu(self.norm_out(x))
        return self.proj(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


class Attention(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(w, 3 * w), nn.Linear(w, w), heads

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, w))


class Mlp(nn.Module):
    def __init__(self, w, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(w, hidden), nn.Linear(hidden, w)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, w, heads, hidden, p):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(w, eps=1e-6), Attention(w, heads)
        self.norm2, self.mlp = nn.LayerNorm(w, eps=1e-6), Mlp(w, hidden)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, t = cfg["width"], cfg["grid"] ** 2
        self.grid = cfg["grid"]
        hidden = round(w * cfg["mlp_ratio"])
        self.pos_embed = nn.Parameter(torch.zeros(1, t, w))
        self.blocks = nn.ModuleList(Block(w, cfg["heads"], hidden, cfg["dropout"]) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(w, eps=1e-6)

    def forward(self, x, hw):
        g, w = self.grid, self.pos_embed.shape[-1]
        pos = self.pos_embed
        if tuple(hw) != (g, g):  # DESIGN.md: bicubic, align_corners=False, no antialias
            grid = pos.reshape(1, g, g, w).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=tuple(hw), mode="bicubic", align_corners=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, -1, w)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class TorchBridge(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.adapter, self.backbone = Adapter(cfg), Backbone(cfg)
        self.head = nn.Linear(cfg["width"], cfg["target_dim"])

    def forward(self, z):
        tokens, hw = self.adapter(z)
        return self.head(self.backbone(tokens, hw))

    @classmethod
    def from_safetensors(cls, path):
        tensors, meta = read_safetensors(path)
        cfg = json.loads(meta["config"])
        model = cls(cfg)
        state = {k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith(("optim.", "ema."))}
        model.load_state_dict(state, strict=True)
        return model, cfg
