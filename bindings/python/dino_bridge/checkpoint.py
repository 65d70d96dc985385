"""The library's checkpoint files (safetensors, DESIGN.md "Checkpoints") read and written
from Python, for `BridgeModule`: the host's AdamW moments go in as `optim.m.<name>` /
`optim.v.<name>`, a moving average as `ema.<name>`, the step in the `train_state`
metadata. The library writes the weights, the config and the train state
(`Bridge.save`); this module only replaces and adds tensors and metadata in what it wrote,
so the format stays the library's. Writes are atomic as the library's are: a temporary
file in the same folder, fsync, rename, fsync of the folder."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16}


def read(path: str | Path, prefix: str | None = None):
    """`(metadata, tensors)` of a safetensors file: the metadata dict, and its tensors (as
    float32 numpy arrays, all of them or those whose name starts with `prefix`)."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + size
    tensors = {}
    for name, entry in header.items():
        if prefix is not None and not name.startswith(prefix):
            continue
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}; expected F32 or F16")
        start, end = entry["data_offsets"]
        array = np.frombuffer(data[base + start:base + end], dtype=dtype).reshape(entry["shape"])
        tensors[name] = array.astype(np.float32)
    return meta, tensors


def write(path: str | Path, metadata: dict, tensors: dict) -> None:
    """Writes `tensors` (name -> float32 array) with `metadata` (str -> str) atomically."""
    path = Path(path)
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(tensors[name])), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
