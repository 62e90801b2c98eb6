#!/usr/bin/env bash
# compute-sanitizer over every Triton kernel (GPU only): memcheck (out-of-bounds and
# misaligned accesses, leaks), racecheck (shared-memory hazards), synccheck.
#   bash tests/sanitize/run.sh [memcheck|racecheck|synccheck|all]   (default: all)
# Writes $OUT/sanitizer_<tool>.txt when OUT is set. Exit status: 0 clean, 1 an error found
# or a wrong result, 3 no compute-sanitizer on this machine.
set -u
cd "$(dirname "$0")/../.."
TOOLS=${1:-all}
[ "$TOOLS" = all ] && TOOLS="memcheck racecheck synccheck"
SAN=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  [ -z "$SAN" ] && [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ] && SAN="$dir/bin/compute-sanitizer"
done
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)" >&2
  exit 3
fi
# Every tensor its own cudaMalloc: out-of-bounds accesses inside PyTorch's cached blocks
# would otherwise land in memory the allocator owns and go unreported.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export CVT_KERNELS_AUTOTUNE=0
status=0
for tool in $TOOLS; do
  log=${OUT:+$OUT/sanitizer_$tool.txt}
  log=${log:-/dev/stdout}
  echo "== $SAN --tool $tool ${PY:-python3} tests/sanitize/workload.py" > "$log"
  "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
    "${PY:-python3}" tests/sanitize/workload.py >> "$log" 2>&1
  rc=$?
  echo "== $tool exit $rc" >> "$log"
  [ $rc -ne 0 ] && status=1
done
exit $status
