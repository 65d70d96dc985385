#!/usr/bin/env bash
# Brings a CUDA 13.0 build toolchain (nvcc, headers, runtime, cuBLAS, cuRAND, NVRTC) from
# PyPI into an ignored folder, so `cargo build --release --features cuda` works on a
# machine without a GPU or a system CUDA. Makes the unversioned library names the linker
# looks for and a link stub for the driver library (libcuda.so.1 comes from the GPU
# machine's driver at run time). Idempotent: a second run reuses what is there.
#
#   scripts/cuda-toolchain.sh            # sets up .cuda/ and prints the environment
#   eval "$(scripts/cuda-toolchain.sh --env)"
#   cargo build --release --features cuda
#
# DINO_BRIDGE_CUDA_DIR overrides the folder (default: .cuda in the repository root).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${DINO_BRIDGE_CUDA_DIR:-$root/.cuda}
venv=$dir/venv
quiet=0
[[ ${1:-} == --env ]] && quiet=1

say() { [[ $quiet == 1 ]] || echo "cuda-toolchain: $*" >&2; }
fail() { echo "cuda-toolchain: FAILED: $*" >&2; exit 1; }

packages=(
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cublas==13.0.*"
  "nvidia-curand" "nvidia-cuda-nvrtc==13.0.*"
)

command -v python3 >/dev/null || fail "python3 is not installed (apt-get install python3 python3-venv)"
command -v gcc >/dev/null || fail "gcc is not installed (apt-get install gcc); it builds the libcuda link stub"

if [[ ! -x $venv/bin/python ]]; then
  say "creating $venv"
  python3 -m venv "$venv" || fail "python3 -m venv $venv (is python3-venv installed?)"
fi
marker=$venv/.packages
if [[ ! -f $marker ]] || [[ "$(cat "$marker")" != "${packages[*]}" ]]; then
  say "installing ${packages[*]} (about 1.5 GB)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${packages[@]}" \
    || fail "pip install of the CUDA 13.0 packages (is PyPI reachable?)"
  echo "${packages[*]}" > "$marker"
fi

cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)
[[ -n $cu && -x $cu/bin/nvcc ]] || fail "nvcc not found under $venv (expected nvidia/cu13/bin/nvcc)"
version=$("$cu/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
[[ $version == 13.0* ]] || fail "nvcc reports release '$version', expected 13.0"
[[ -f $cu/include/cuda.h ]] || fail "cuda.h not found in $cu/include"

# Unversioned names (libcublas.so -> libcublas.so.13) where the linker looks for them.
mkdir -p "$cu/lib64/stubs"
for lib in "$cu"/lib/*.so.*; do
  base=$(basename "$lib")
  ln -sf "$lib" "$cu/lib64/$base"
  ln -sf "$lib" "$cu/lib64/${base%%.so.*}.so"
done

# Link stub for the driver API: every cu* function cuda.h declares, under the names it
# binds after preprocessing (the _v2 forms) and the raw names. Never loaded at run time.
stub=$cu/lib64/stubs/libcuda.so
if [[ ! -f $stub || $cu/include/cuda.h -nt $stub ]]; then
  say "building the libcuda link stub"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  {
    gcc -E -P -I"$cu/include" -x c "$cu/include/cuda.h" 2>/dev/null || true
    cat "$cu/include/cuda.h"
  } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$tmp/stub.c"
  count=$(wc -l < "$tmp/stub.c")
  [[ $count -gt 300 ]] || fail "only $count driver functions found in cuda.h"
  gcc -shared -fPIC -o "$stub" -Wl,-soname,libcuda.so.1 "$tmp/stub.c" \
    || fail "compiling the libcuda stub"
  ln -sf "$stub" "$cu/lib64/stubs/libcuda.so.1"
  say "libcuda stub: $count symbols"
fi

env_lines=(
  "export CUDA_HOME='$cu'"
  "export CUDA_PATH='$cu'"
  "export CUDA_ROOT='$cu'"
  "export CUDA_COMPUTE_CAP=90"
  "export CUDARC_CUDA_VERSION=13000"
  "export PATH='$cu/bin':\"\$PATH\""
  "export LIBRARY_PATH='$cu/lib64:$cu/lib64/stubs':\"\${LIBRARY_PATH:-}\""
)
if [[ $quiet == 1 ]]; then
  printf '%s\n' "${env_lines[@]}"
else
  say "nvcc $version ready in $cu"
  echo "# the environment for: cargo build --release --features cuda"
  printf '%s\n' "${env_lines[@]}"
fi
