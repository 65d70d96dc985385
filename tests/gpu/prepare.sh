#!/usr/bin/env bash
# Builds the CUDA library here and bundles what the GPU machine needs (it has no Rust
# and no network) into target/gpu-bundle: the stripped cdylib and the fixtures. Checks
# that the bundle fits what the device tool carries and that the kernels are built for
# the H200 (sm_90), and prints both facts.
#   tests/gpu/prepare.sh      then, on the device: tests/gpu/run.sh (carry target/gpu-bundle)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
eval "$(scripts/cuda-toolchain.sh --env)"
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --lib
bundle=target/gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle"
lib=$bundle/libdino_bridge.so
strip -o "$lib" target/cuda/release/libdino_bridge.so
cp -r "${DINO_BRIDGE_FIXTURES:-$root/../shared/fixtures/tiny}" "$bundle/fixtures"

# The device tool carries at most 64 MiB in all; keep a margin for the working tree.
limit=$((60 * 1024 * 1024))
size=$(du -sb "$bundle" | cut -f1)
echo "prepare.sh: bundle $((size / 1024 / 1024)) MiB ($size bytes; limit 60 MiB)"
if ((size > limit)); then
  echo "prepare.sh: FAILED: the bundle is over 60 MiB" >&2
  exit 1
fi
# candle's kernels are PTX text in the library, one module per .cu file, each naming its
# target; the few precompiled ones are sm_90 ELF inside a fatbin. None may be for another
# architecture, and there must be some.
sm90=$(grep -a -c -E '^\.target sm_90a?$' "$lib" || true)
other=$(grep -a -o '^\.target sm_[0-9a-z]*' "$lib" | grep -v -c -E 'sm_90a?$' || true)
echo "prepare.sh: $sm90 PTX modules for sm_90, $other for other architectures"
if ((sm90 == 0 || other > 0)); then
  echo "prepare.sh: FAILED: expected sm_90 kernels only (is CUDA_COMPUTE_CAP=90 set?)" >&2
  exit 1
fi
