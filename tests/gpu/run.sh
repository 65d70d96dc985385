#!/usr/bin/env bash
# On the GPU machine (driver 580, CUDA 13, PyTorch installed), with target/gpu-bundle
# carried from tests/gpu/prepare.sh. Writes the log to $OUT (or /tmp) and exits non-zero
# if a check fails. About 3 minutes; --quick for one.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-/tmp}
# libcuda comes from the driver; cuBLAS, cuRAND, NVRTC and the runtime from PyTorch's
# CUDA 13 wheels.
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + "/nvidia")' 2>/dev/null || true)
libs=$(find "$nv" -name 'lib*.so*' -path '*cu13*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
export DINO_BRIDGE_LIB=$root/target/gpu-bundle/libdino_bridge.so
export PYTHONPATH=$root/bindings/python:$root/bench
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$out/gpu.txt"
ldd "$DINO_BRIDGE_LIB" | grep -E 'cuda|cublas|curand|nvrtc|not found' | tee -a "$out/gpu.txt"
timeout 450 python3 tests/gpu/check_gpu.py target/gpu-bundle/fixtures "$@" 2>&1 | tee "$out/check_gpu.log"
exit "${PIPESTATUS[0]}"
