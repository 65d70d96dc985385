#!/usr/bin/env bash
# Builds the CUDA library here and bundles what the GPU machine needs (it has no Rust
# and no network) into target/gpu-bundle: the stripped cdylib and the fixtures.
#   tests/gpu/prepare.sh      then, on the device: tests/gpu/run.sh (carry target/gpu-bundle)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
eval "$(scripts/cuda-toolchain.sh --env)"
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --lib
bundle=target/gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle"
strip -o "$bundle/libdino_bridge.so" target/cuda/release/libdino_bridge.so
cp -r "${DINO_BRIDGE_FIXTURES:-$root/../shared/fixtures/tiny}" "$bundle/fixtures"
du -sh "$bundle"
