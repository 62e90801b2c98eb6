#!/usr/bin/env bash
# GPU work for a lent machine (its own torch and Triton, no package registry), in calls of
# at most 10 minutes each; every file lands under $OUT (at most 8 per call, two folders
# deep at most). A session's device time is short (15 minutes in all, machine start
# included): run `quick` first, the others only if time is left.
#   bash benchmarks/gpu_session.sh quick   info.txt, tests_gpu.txt, bench.log,
#                                          bench/blocks_quick.{csv,md}, bench/models_quick.{csv,md}
#                                          (the GPU test tier; every CvT-13 block shape, eager vs
#                                          torch vs triton vs one-pass; whole CvT-13 at batch
#                                          64, eval and train; about 7 minutes)
#   bash benchmarks/gpu_session.sh tests   info.txt, tests.txt, bench.log,
#                                          bench/attention_core.{csv,md}, bench/models.{csv,md}
#   bash benchmarks/gpu_session.sh bench   bench.log, bench/blocks.{csv,md},
#                                          bench/conv_projection.{csv,md},
#                                          bench/models_compile.{csv,md}
#   bash benchmarks/gpu_session.sh cuda    cuda_build.txt, cuda_tests.txt, bench.log,
#                                          bench/conv_bn.{csv,md} (builds csrc/ first)
#   bash benchmarks/gpu_session.sh sanitize sanitizer_{memcheck,racecheck,synccheck}.txt,
#                                          bench.log, bench/blocks_one_pass.{csv,md}
# Run from the repository root with CVT_KERNELS_COMMIT=<short sha>: the machine's copy of the
# tree has no .git, and the commit stamps every results file. Then commit the files under
# benchmarks/results/<device>/ and make the plots here: python -m benchmarks.plot FILE.csv
# (--no-plot below: the GPU machine may lack matplotlib, and a PNG would be a ninth file).
#
# NOT YET RUN ON A GPU: no GPU has been lent to this project so far. The time budgets below
# are estimates: each step has a `timeout` as a backstop and `--budget-s` so the harness
# stops starting new measurements in time; results files are rewritten after every chunk,
# so a step cut short keeps what it measured. Sum of the timeouts per call: about 560 s.
set -u
MODE=${1:-quick}
OUT=${OUT:-/tmp/cvt_kernels_out}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVT_KERNELS_COMMIT=${CVT_KERNELS_COMMIT:-unknown}
export TRITON_DEFAULT_FP_FUSION=1
RUN="python -m benchmarks.run --no-plot --out $OUT/bench"

write_info() {
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
}

if [ "$MODE" = quick ]; then
  write_info
  # The GPU tier only (the rest runs on CPU in CI), stopping at 150 s.
  timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests -rs > "$OUT/tests_gpu.txt" 2>&1
  echo "tests exit $?" >> "$OUT/tests_gpu.txt"
  timeout 150 $RUN --level blocks --model cvt_13 --dtype bfloat16 --batch 64 \
    --providers eager,torch,triton,triton-one-pass --compile-mode none --budget-s 130 \
    --tag _quick > "$OUT/bench.log" 2>&1
  echo "blocks exit $?" >> "$OUT/bench.log"
  timeout 120 $RUN --level model --model cvt_13 --dtype bfloat16 --batch 64 \
    --providers eager,accelerated --compile-mode none --budget-s 100 --tag _quick \
    >> "$OUT/bench.log" 2>&1
  echo "models exit $?" >> "$OUT/bench.log"
elif [ "$MODE" = tests ]; then
  write_info
  timeout 210 python -m pytest -q -p no:cacheprovider tests -rs > "$OUT/tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/tests.txt"
  # Every stage shape of CvT-13/W24 at 224 and 384, all dtypes, batch 64.
  timeout 140 $RUN --level ops --op attention --batch 64 --budget-s 110 > "$OUT/bench.log" 2>&1
  echo "attention_core exit $?" >> "$OUT/bench.log"
  # Whole CvT-13, bf16, batch sweep, inference and training step, eager vs accelerated (this
  # replaces the demo run: the same comparison at batch 64, and more). No compile here.
  timeout 200 $RUN --level model --model cvt_13 --dtype bfloat16 --batch 1 8 32 64 128 256 \
    --providers eager,accelerated,accelerated-torch,accelerated-triton --compile-mode none \
    --budget-s 170 >> "$OUT/bench.log" 2>&1
  echo "models exit $?" >> "$OUT/bench.log"
elif [ "$MODE" = bench ]; then
  # torch.compile(max-autotune) costs minutes per shape: CvT-13 shapes, bfloat16 only.
  timeout 230 $RUN --level blocks --model cvt_13 --dtype bfloat16 --batch 64 --budget-s 200 \
    > "$OUT/bench.log" 2>&1
  echo "blocks exit $?" >> "$OUT/bench.log"
  timeout 120 $RUN --level ops --op conv_projection --model cvt_13 --dtype bfloat16 \
    --batch 64 --budget-s 100 >> "$OUT/bench.log" 2>&1
  echo "conv_projection exit $?" >> "$OUT/bench.log"
  # Whole CvT-13 under torch.compile(max-autotune) at batch 64 (eager and accelerated beside
  # it, same process); compile goes last so a timeout still leaves the other two.
  timeout 210 $RUN --level model --model cvt_13 --dtype bfloat16 --batch 64 \
    --providers eager,accelerated,compile --budget-s 180 --tag _compile >> "$OUT/bench.log" 2>&1
  echo "models (compile) exit $?" >> "$OUT/bench.log"
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
elif [ "$MODE" = sanitize ]; then
  # compute-sanitizer over every Triton kernel at odd sizes (tests/sanitize/run.sh), then
  # the inference one-pass kernel beside the unfused triton path at every CvT-13 block shape
  # (the `bench` call's blocks file has it too, next to torch.compile).
  timeout 360 bash tests/sanitize/run.sh > "$OUT/bench.log" 2>&1
  echo "sanitize exit $?" >> "$OUT/bench.log"
  timeout 200 $RUN --level blocks --model cvt_13 --dtype bfloat16 \
    --batch 64 --providers eager,torch,triton,triton-one-pass --compile-mode none \
    --budget-s 170 --tag _one_pass >> "$OUT/bench.log" 2>&1
  echo "blocks (one pass) exit $?" >> "$OUT/bench.log"
else
  echo "usage: bash benchmarks/gpu_session.sh [quick|tests|bench|cuda|sanitize]" >&2
  exit 2
fi
