#!/usr/bin/env bash
# One call on a lent GPU machine (its own torch and Triton, no package registry): installs
# the package from this tree, runs the whole test suite on the GPU (the `gpu` tier included)
# and the benchmarks, and writes at most 7 files under $OUT (two folders deep at most):
#   info.txt  tests.txt  bench.log  bench/attention_core.{csv,md}  bench/demo_*.{csv,md}
# Usage (from the repository root):
#   CVT_KERNELS_COMMIT=<short sha> bash benchmarks/gpu_session.sh
# The machine's copy of the tree has no .git, so the commit is passed in to stamp results.
# Budget: about 10 minutes (tests <= 4, attention benchmark <= 4, demo <= 2).
set -u
OUT=${OUT:-/tmp/cvt_kernels_out}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVT_KERNELS_COMMIT=${CVT_KERNELS_COMMIT:-unknown}

{
  echo "commit $CVT_KERNELS_COMMIT  date $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  # No registry here: no build isolation, no dependency resolution; PYTHONPATH is the fallback.
  pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3 || true
  python -m cvt_kernels.info 2>&1
  python -c "import pytest; print('pytest', pytest.__version__)" 2>&1
} > "$OUT/info.txt"

timeout 240 python -m pytest -q -p no:cacheprovider tests -rs > "$OUT/tests.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests.txt"

timeout 240 python -m benchmarks.attention_core --batch 64 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "attention_core exit $?" >> "$OUT/bench.log"

timeout 120 python python/demo.py --save "$OUT/bench" >> "$OUT/bench.log" 2>&1
echo "demo exit $?" >> "$OUT/bench.log"
