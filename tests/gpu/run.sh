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
if [[ ! -f $DINO_BRIDGE_LIB ]]; then
  echo "run.sh: $DINO_BRIDGE_LIB is missing: run tests/gpu/prepare.sh here and carry target/gpu-bundle" | tee "$out/gpu.txt"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$out/gpu.txt"
deps=$(ldd "$DINO_BRIDGE_LIB" 2>&1)
echo "$deps" | grep -E 'cuda|cublas|curand|nvrtc|not found' | tee -a "$out/gpu.txt"
# A library the loader cannot find would make every check fail on a traceback: stop now.
if missing=$(echo "$deps" | grep 'not found'); then
  echo "run.sh: STOP: the dynamic loader cannot find what libdino_bridge.so needs:" | tee -a "$out/gpu.txt"
  echo "$missing" | tee -a "$out/gpu.txt"
  echo "run.sh: searched LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$out/gpu.txt"
  exit 3
fi
timeout 450 python3 tests/gpu/check_gpu.py target/gpu-bundle/fixtures "$@" 2>&1 | tee "$out/check_gpu.log"
exit "${PIPESTATUS[0]}"
