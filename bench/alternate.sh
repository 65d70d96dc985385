#!/usr/bin/env bash
# Two builds of the library side by side: bench/capi_bench.c against LIB_A and LIB_B in
# turn (A B A B ...), so that the machine's drift hits both alike; prints every run and
# the median ratio B/A per measure.
#
#   bench/alternate.sh OLD/libdino_bridge.so NEW/libdino_bridge.so [ROUNDS] [-- capi_bench args]
#
# The BLAS is whatever the library finds (DINO_BRIDGE_BLAS chooses one: a name or a path).
set -euo pipefail
cd "$(dirname "$0")/.."
a=$(realpath "$1"); b=$(realpath "$2"); rounds=${3:-5}
shift $(( $# >= 3 ? 3 : 2 )); [[ ${1:-} == -- ]] && shift
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
gcc -std=c11 -O2 -Wall -Werror -Iinclude bench/capi_bench.c -o "$work/capi_bench" \
  -L"$(dirname "$b")" -ldino_bridge
for lib in a b; do mkdir -p "$work/$lib"; done
cp "$a" "$work/a/libdino_bridge.so"; cp "$b" "$work/b/libdino_bridge.so"
for r in $(seq "$rounds"); do
  for lib in a b; do
    LD_LIBRARY_PATH="$work/$lib" "$work/capi_bench" "$@" | sed "s/^/$lib $r /" | tee -a "$work/all"
  done
done
python3 - "$work/all" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    lib, r, name, value, unit = line.split()
    runs.setdefault((name, unit), {}).setdefault(lib, []).append(float(value))
print(f"{'measure':16} {'A (median)':>12} {'B (median)':>12}  B/A per round (median)")
for (name, unit), v in runs.items():
    ratios = [b / a for a, b in zip(v["a"], v["b"])]
    print(f"{name:16} {statistics.median(v['a']):12.3f} {statistics.median(v['b']):12.3f}  "
          f"{' '.join(f'{x:.3f}' for x in ratios)} ({statistics.median(ratios):.3f}) {unit}")
PY
