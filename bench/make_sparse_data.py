"""A data folder far larger than memory, for checking that bridge-train never reads the
target file whole: sparse float16 `latents.npy` / `targets.npy` of N rows (zeros).

    python3 bench/make_sparse_data.py /tmp/sparse 300000      # 29.5 GB of targets, 0 on disk
    /usr/bin/time -v target/release/bridge-train train --config default --data /tmp/sparse \\
        --out /tmp/sparse-run --epochs 1 --batch 16 --limit-batches 6 --val-count 32 --pool 32
"""

import os
import struct
import sys


def header(descr, shape):
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, ", ".join(map(str, shape)))
    d += " " * ((64 - (10 + len(d) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode()


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    os.makedirs(out, exist_ok=True)
    for name, shape in [("latents.npy", (n, 4, 32, 32)), ("targets.npy", (n, 64, 768))]:
        h = header("<f2", shape)
        count = 1
        for s in shape:
            count *= s
        with open(os.path.join(out, name), "wb") as f:
            f.write(h)
            f.truncate(len(h) + 2 * count)
        print(f"{name}: {shape}, {(len(h) + 2 * count) / 1e9:.1f} GB (sparse)")


if __name__ == "__main__":
    main()
