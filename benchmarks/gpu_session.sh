#!/usr/bin/env bash
# GPU work for a lent machine (its own torch and Triton, no package registry), in two calls
# of at most 10 minutes each; every file lands under $OUT, at most two folders deep:
#   bash benchmarks/gpu_session.sh tests   info.txt, tests.txt, bench.log,
#                                          bench/attention_core.{csv,md}, bench/demo_*.{csv,md}
#   bash benchmarks/gpu_session.sh bench   bench.log, bench/blocks.{csv,md},
#                                          bench/conv_projection.{csv,md}
#   bash benchmarks/gpu_session.sh cuda    cuda_build.txt, cuda_tests.txt, bench.log,
#                                          bench/conv_bn.{csv,md} (builds csrc/ first)
# Run from the repository root with CVT_KERNELS_COMMIT=<short sha>: the machine's copy of the
# tree has no .git, and the commit stamps every results file. Then commit the files under
# benchmarks/results/<device>/.
set -u
MODE=${1:-tests}
OUT=${OUT:-/tmp/cvt_kernels_out}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVT_KERNELS_COMMIT=${CVT_KERNELS_COMMIT:-unknown}
export TRITON_DEFAULT_FP_FUSION=1

if [ "$MODE" = tests ]; then
  {
    echo "commit $CVT_KERNELS_COMMIT  date $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    # No registry: no build isolation, no dependency resolution; PYTHONPATH is the fallback.
    # The CUDA extension is built by the `cuda` mode (minutes): not here.
    CVT_KERNELS_SKIP_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -q -e . 2>&1 \
      | tail -3 || true
    python -m cvt_kernels.info 2>&1
    python -c "import pytest; print('pytest', pytest.__version__)" 2>&1
  } > "$OUT/info.txt"
  timeout 240 python -m pytest -q -p no:cacheprovider tests -rs > "$OUT/tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/tests.txt"
  timeout 220 python -m benchmarks.attention_core --batch 64 --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
  echo "attention_core exit $?" >> "$OUT/bench.log"
  timeout 100 python python/demo.py --save "$OUT/bench" >> "$OUT/bench.log" 2>&1
  echo "demo exit $?" >> "$OUT/bench.log"
elif [ "$MODE" = bench ]; then
  # torch.compile(max-autotune) costs minutes per shape: CvT-13 shapes, bfloat16 only.
  timeout 330 python -m benchmarks.blocks --model cvt_13 --dtype bfloat16 --batch 64 \
    --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "blocks exit $?" >> "$OUT/bench.log"
  timeout 230 python -m benchmarks.conv_projection --model cvt_13 --dtype bfloat16 --batch 64 \
    --out "$OUT/bench" >> "$OUT/bench.log" 2>&1
  echo "conv_projection exit $?" >> "$OUT/bench.log"
elif [ "$MODE" = cuda ]; then
  # Build cvt_kernels._C in place for this GPU only (halves the compile), then its tests and
  # the conv+BN benchmark (CvT-13 shapes, every dtype).
  ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  { date -u '+%Y-%m-%d %H:%M UTC'; nvcc --version 2>&1 | tail -2
    time TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 CVT_KERNELS_FORCE_BUILD=1 \
      timeout 300 python setup.py build_ext --inplace 2>&1 | tail -40
    python -m cvt_kernels.info 2>&1; } > "$OUT/cuda_build.txt" 2>&1
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -rs \
    > "$OUT/cuda_tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/cuda_tests.txt"
  timeout 120 python -m benchmarks.conv_bn --model cvt_13 --batch 64 --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
  echo "conv_bn exit $?" >> "$OUT/bench.log"
else
  echo "usage: bash benchmarks/gpu_session.sh [tests|bench|cuda]" >&2
  exit 2
fi
