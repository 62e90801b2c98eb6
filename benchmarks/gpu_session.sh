#!/usr/bin/env bash
# GPU work for a lent machine (its own torch and Triton, no package registry, no .git), in
# calls of at most 10 minutes each; every file lands under $OUT (at most 8 per call, two
# folders deep at most). A session's device time is short (15 minutes in all, machine start
# included): run `quick` first, the others only if time is left.
#
#   bash benchmarks/gpu_session.sh quick   one call, at most QUICK_TOTAL_S (default 565 s).
#     Steps in this order (a run cut off still returns what matters most), each capped
#     (`timeout`; every cap also cut to what is left of QUICK_TOTAL_S, 15 s kept for the
#     summary), results files rewritten after every row. Files (8, the machine's limit):
#     info.txt           nvidia-smi, `python -m cvt_kernels.info`, versions, the CPU, the
#                        depthwise conv's output layout (the step-cost count assumes cuDNN's)
#     tests_gpu.txt      1. GPU test groups proving the kernels right at CvT-13 shapes, bf16
#                        then fp32 (projection, attention d64, one-pass, LayerNorm/MLP), CUDA-
#                        graph capture and replay of accelerated models (eval, a whole
#                        training step, the +graph provider), the measured dispatcher, ragged
#                        tails; memory growth and determinism at the end, if time is left
#     bench/models_quick.csv
#                        2. whole CvT-13 224 b64 bf16, eval and train: eager, accelerated at
#                        attention and block scope on torch, triton and the dispatcher's
#                        choice, the CUDA-graph providers (+graph); per row wall ms, CUDA-graph
#                        ms (eval: the forward; train: the whole step, capturable AdamW), peak
#                        MB, error vs float64 by the 2x rule, first-call seconds (compile,
#                        dispatcher, capture: never in ms) and 4. host vs device time of one
#                        step (host_ms, device_ms, bound). torch.compile (mode default) of
#                        eager and of the block-scope model is added late (--append)
#     bench/blocks_quick.csv
#                        3. every CvT-13 block shape at block scope (LayerNorms, attention,
#                        MLP), eval and train: eager, torch, triton, one-pass, the dispatcher's
#                        choice (auto); compile of eager and of auto added late, if time is left
#     dispatch.txt       5. `python -m cvt_kernels.tune` (CvT-13 b64 bf16, train and eval) run
#                        twice, each into an empty decisions file (block scope a third time if
#                        150 s are left): every decision with its candidates' times, errors and
#                        harness costs, and `agreement:` lines (run 1 against run 2, block
#                        scope, and the decisions the benchmarks made); then what
#                        `python -m cvt_kernels.info --decisions` shows of run 1
#     bench/step_cost.csv
#                        6. `python -m benchmarks.step_cost` (the meta device, no GPU, in the
#                        background from the start): launches, GB, estimated ms per provider
#     bench/overhead_block.csv
#                        `python -m benchmarks.overhead --module block` after the counter, on
#                        this machine's CPU: host us per FusedBlock call, kernels stubbed
#     log.txt            every step's output and `NAME exit RC (S s)`; the per-kernel profile
#                        of one training and one eval step (block scope, triton forced)
#     summary.txt        7. one screen: steps, tests, every model row with the counter's
#                        estimate beside it, blocks with the dispatcher within 5% of the best
#                        forced backend or not, the decisions' agreement, the targets of
#                        ../shared/docs/performance.md and issue 24 met or not, the 2026-11-30
#                        run beside (rewritten after every benchmark step)
#     Caps (s): info 20; tests 30+25+20+12+30+35+30+25 = 207; models 150; blocks 70; tune
#     35+35; profile 25: 542, then torch.compile of the whole model (up to 240) and of the
#     blocks (up to 120), the block-scope tune and the last tests only in what is left. The
#     2026-11-30 quick runs took 4.5-5.5 min; a whole CvT-13's compile takes minutes per
#     mode, so it comes last and gets what is left (its rows then say "time budget").
#   bash benchmarks/gpu_session.sh tests   info.txt, tests.txt, bench.log,
#                                          bench/attention_core.{csv,md}, bench/models.{csv,md}
#   bash benchmarks/gpu_session.sh bench   bench.log, bench/blocks.{csv,md},
#                                          bench/conv_projection.{csv,md},
#                                          bench/models_compile.{csv,md}
#   bash benchmarks/gpu_session.sh cuda    cuda_build.txt, cuda_tests.txt, bench.log,
#                                          bench/conv_bn.{csv,md} (builds csrc/ first)
#   bash benchmarks/gpu_session.sh sanitize sanitizer_{memcheck,racecheck,synccheck}.txt,
#                                          bench.log, bench/blocks_one_pass.{csv,md}
# Run from the repository root with CVT_KERNELS_COMMIT=<short sha> (the commit stamps every
# results file). Then commit the files under benchmarks/results/<device>/<date>_<sha>/ and
# make the plots and Markdown tables here: python -m benchmarks.plot FILE.csv.
#
# How a step fails without losing the run: every step has a cap (`timeout -s INT`, so pytest
# still prints its failures; -k kills 10 s later) and the benchmarks a smaller --budget-s;
# results files are rewritten after every row; each test group runs in its own pytest
# process and the benchmark levels in a worker that a new one replaces when a kernel
# crashes the CUDA context (the crash becomes that row's status; benchmarks/journal.py).
# Scratch files (decisions files, the counter's output) live outside $OUT.
# PY=python3 by default (the GPU machines have no `python`); DRY_RUN=1 runs every step on
# CPU at toy sizes (argument parsing, file names, the summary; test groups collected in one
# process, not run), as CI cannot otherwise.
set -u
MODE=${1:-quick}
PY=${PY:-python3}
OUT=${OUT:-/tmp/cvt_kernels_out}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVT_KERNELS_COMMIT=${CVT_KERNELS_COMMIT:-unknown}
export TRITON_DEFAULT_FP_FUSION=1
# Autotuning results on disk: a restarted benchmark worker, the profile step and later
# calls reuse what the tests and earlier steps measured (keyed by shape, dtype and config).
export TRITON_CACHE_AUTOTUNING=1
DRY=${DRY_RUN:-0}
RUN="$PY -m benchmarks.run --no-plot --out $OUT/bench"
PYTEST_TIMEOUT=""
if $PY -c "import pytest_timeout" 2>/dev/null; then PYTEST_TIMEOUT="--timeout 120"; fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/cvt_session.XXXXXX")
START=$(date +%s)
# The quick call's whole budget: every cap is cut to what is left of it (minus a reserve
# for the summary). On CPU (DRY_RUN=1) the caps are only a guard against a hang.
TOTAL=${QUICK_TOTAL_S:-565}
SCALE=1
if [ "$DRY" = 1 ]; then TOTAL=${QUICK_TOTAL_S:-7200}; SCALE=20; export OMP_NUM_THREADS=1; fi

trap 'rm -rf "$SCRATCH"' EXIT

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# cap WANT [RESERVE]: WANT seconds (x SCALE), or what is left of TOTAL minus RESERVE.
cap() {
  local want=$(( $1 * SCALE )) spare=$(( $(left) - ${2:-15} ))
  if [ "$spare" -lt "$want" ]; then want=$spare; fi
  if [ "$want" -lt 1 ]; then want=1; fi
  echo "$want"
}

write_info() {
  {
    echo "commit $CVT_KERNELS_COMMIT  date $(date -u '+%Y-%m-%d %H:%M UTC')  mode $MODE"
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    else
      echo "nvidia-smi: not found (no NVIDIA driver tools on this machine)"
    fi
    timeout "$(cap 15)" $PY -m cvt_kernels.info 2>&1
    timeout "$(cap 15)" $PY -c "from benchmarks.step_cost import conv_layout_line
print(conv_layout_line())" 2>&1
    $PY -c "import pytest, numpy; print('pytest', pytest.__version__, 'numpy',
      numpy.__version__)" 2>&1
    echo "pytest-timeout: ${PYTEST_TIMEOUT:-not installed}"
    echo "cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
  } > "$OUT/info.txt"
}

# budget WANT MARGIN: a benchmark's --budget-s, MARGIN seconds inside its step's cap.
budget() {
  local b=$(( $(cap "$1") - $2 ))
  if [ "$b" -lt 1 ]; then b=1; fi
  echo "$b"
}

# test_group NAME CAP_S PYTEST_ARGS...: one pytest process (a test that crashes the CUDA
# context takes only its group down), its output appended to tests_gpu.txt. Dry run: the
# group is written down and collected with the others in one process (benchmarks/gpu_groups).
test_group() {
  local name=$1 c
  c=$(cap "$2")
  shift 2
  if [ "$DRY" = 1 ]; then
    { printf '%q ' "$name" "$@"; echo; } >> "$SCRATCH/groups.txt"
    return
  fi
  local t0=$SECONDS
  {
    echo "== $name (cap ${c} s, started $(date -u +%T))"
    timeout -s INT -k 10 "$c" $PY -m pytest -p no:cacheprovider -q -rfEs --tb=short \
      $PYTEST_TIMEOUT "$@" 2>&1
    echo "exit $? ($(( SECONDS - t0 )) s)"
  } >> "$OUT/tests_gpu.txt"
}

collect_groups() {  # dry run: every group's selection checked in one process
  [ "$DRY" = 1 ] && [ -f "$SCRATCH/groups.txt" ] || return 0
  TRITON_INTERPRET=1 timeout "$(cap 60)" $PY -m benchmarks.gpu_groups "$SCRATCH/groups.txt" \
    >> "$OUT/tests_gpu.txt" 2>&1
  rm -f "$SCRATCH/groups.txt"
}

# step NAME CAP_S COMMAND...: a capped step, its output appended to log.txt.
step() {
  local name=$1 c t0=$SECONDS
  c=$(cap "$2")
  shift 2
  echo "== $name (cap ${c} s, started $(date -u +%T))" >> "$OUT/log.txt"
  timeout -s INT -k 10 "$c" "$@" >> "$OUT/log.txt" 2>&1
  echo "$name exit $? ($(( SECONDS - t0 )) s)" >> "$OUT/log.txt"
}

# The step-cost counter's CSV (running in the background) into bench/, its text into
# log.txt, once it has finished; then the summary.
COST_PID=""
summary() {
  if [ -n "$COST_PID" ] && ! kill -0 "$COST_PID" 2>/dev/null; then
    wait "$COST_PID"
    { echo "== step_cost (in the background from the start; counted on the meta device)"
      cat "$SCRATCH/step_cost.txt"
      echo "step_cost exit $(cat "$SCRATCH/step_cost.rc" 2>/dev/null || echo none)"
      echo "== overhead (after step_cost, niced: host us per FusedBlock call, kernels stubbed)"
      cat "$SCRATCH/overhead.txt" 2>/dev/null
      echo "overhead exit $(cat "$SCRATCH/overhead.rc" 2>/dev/null || echo none)"
    } >> "$OUT/log.txt"
    for f in "$SCRATCH"/step_cost/*.csv; do
      case $f in *_sites.csv) ;; *) cp "$f" "$OUT/bench/step_cost.csv" ;; esac
    done
    if [ -f "$SCRATCH/overhead/overhead_block.csv" ]; then
      cp "$SCRATCH/overhead/overhead_block.csv" "$OUT/bench/overhead_block.csv"
    fi
    COST_PID=""
  fi
  timeout 15 $PY -m benchmarks.summarize "$OUT" > /dev/null 2>> "$OUT/log.txt"
}

if [ "$MODE" = quick ]; then
  MODELS="eager,accelerated,accelerated-torch,accelerated-triton,accelerated-block"
  MODELS="$MODELS,accelerated-block-torch,accelerated-block-triton,eager+graph"
  MODELS="$MODELS,accelerated+graph,accelerated-block+graph"
  BLOCKS="eager,torch,triton,triton-one-pass,auto"
  if [ "$DRY" = 1 ]; then  # CPU: the same command lines at toy sizes
    SIZE="--quick"; MODEL_SIZE="--quick --img-size 64 --batch 2"; DTYPE=""
    PROFILE="--backend torch --model cvt_13-tiny --img-size 64 --batch 2"
    TUNE="--img-size 32 --batch 2 --dtype float32"
    COST="--model cvt_13-tiny --img-size 64 --batch 2 --dtype float32"
    OVERHEAD="--calls 3 --repeats 1"
  else
    SIZE="--model cvt_13 --img-size 224 --batch 64"; MODEL_SIZE="$SIZE"; DTYPE="--dtype bfloat16"
    PROFILE="--backend triton --batch 64 --dtype bfloat16"
    TUNE="--model cvt_13 --img-size 224 --batch 64 --dtype bfloat16"
    COST=""  # its default: CvT-13 224 b64 bf16, every provider, the budgets, calibration
    OVERHEAD="--calls 100 --repeats 5"
  fi
  : > "$OUT/tests_gpu.txt"; : > "$OUT/log.txt"
  # The decisions the benchmarks make (first calls) go to a file of their own: tune's runs
  # below start from empty files, and dispatch.txt compares all of them.
  export CVT_KERNELS_DISPATCH_CACHE="$SCRATCH/bench_decisions.json"
  write_info
  # 6. The counter needs no GPU: on the CPU, niced, while the tests run; then our Python's
  # cost per block call on this machine's CPU (kernels stubbed, benchmarks.overhead: its
  # backends' samples interleaved, so the ratios hold under the load beside it).
  ( CUDA_VISIBLE_DEVICES="" nice -n 10 timeout -k 5 "$(cap 240)" $PY -m benchmarks.step_cost \
      $COST --out "$SCRATCH/step_cost" --quiet > "$SCRATCH/step_cost.txt" 2>&1
    echo $? > "$SCRATCH/step_cost.rc"
    CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 nice -n 10 timeout -k 5 "$(cap 90)" \
      $PY -m benchmarks.overhead --module block $OVERHEAD --tag _block \
      --out "$SCRATCH/overhead" > "$SCRATCH/overhead.txt" 2>&1
    echo $? > "$SCRATCH/overhead.rc" ) &
  COST_PID=$!
  # 1. The kernels right at CvT-13 shapes in bf16 (then fp32), graph capture and replay, the
  # dispatcher with real timing, ragged tails. Autotuning off where the configs are not the
  # point (graphs; the ragged shapes each compiled every config in the first GPU run).
  test_group conv_projection_bf16 30 -m gpu tests/test_triton_conv_projection.py -k bf16
  test_group attention_bf16_d64 25 -m gpu tests/test_triton_attention.py -k "bf16 and d64"
  test_group block_bf16 20 -m gpu tests/test_triton_block.py -k bf16
  test_group one_pass_bf16 12 -m gpu tests/test_triton_one_pass.py -k bf16
  test_group kernels_fp32 30 -m gpu tests/test_triton_conv_projection.py \
    tests/test_triton_attention.py tests/test_triton_block.py -k "fp32 and not d128"
  # A block's training call as one autograd node on the kernels (not marked gpu: it also
  # runs under the interpreter), after the fp32 group compiled its kernels.
  test_group block_train 25 tests/test_block_train.py -k triton_kernels
  CVT_KERNELS_AUTOTUNE=0 test_group graphs 35 -m gpu tests/test_gpu.py -k graph
  test_group dispatch 30 -m gpu tests/test_gpu.py -k measured_dispatch
  CVT_KERNELS_AUTOTUNE=0 test_group ragged 25 -m gpu tests/test_gpu.py -k "ragged or 65535"
  collect_groups
  # 2 and 4. Whole CvT-13: every provider but compile, host vs device time per row.
  step models 150 $RUN --level model $MODEL_SIZE $DTYPE --providers "$MODELS" \
    --compile-mode none --budget-s "$(budget 150 15)" --tag _quick --no-md
  summary
  # 3. Every CvT-13 block shape at block scope.
  step blocks 70 $RUN --level blocks $SIZE $DTYPE --scope block --providers "$BLOCKS" \
    --compile-mode none --budget-s "$(budget 70 10)" --tag _quick --no-md
  summary
  # 5. The dispatcher: two independent tune runs (empty decisions files), then block scope.
  step tune_1 35 env CVT_KERNELS_DISPATCH_CACHE="$SCRATCH/tune_1.json" \
    $PY -m cvt_kernels.tune $TUNE
  step tune_2 35 env CVT_KERNELS_DISPATCH_CACHE="$SCRATCH/tune_2.json" \
    $PY -m cvt_kernels.tune $TUNE
  DECISIONS="tune_1=$SCRATCH/tune_1.json tune_2=$SCRATCH/tune_2.json"
  if [ "$(left)" -gt $(( 150 * SCALE )) ]; then  # (compile below needs time too)
    step tune_block 35 env CVT_KERNELS_DISPATCH_CACHE="$SCRATCH/tune_block.json" \
      $PY -m cvt_kernels.tune $TUNE --scope block
    DECISIONS="$DECISIONS tune_block=$SCRATCH/tune_block.json"
  fi
  timeout 15 $PY -m benchmarks.summarize --decisions $DECISIONS \
    "benchmarks=$SCRATCH/bench_decisions.json" > "$OUT/dispatch.txt" 2>&1
  { echo "== python -m cvt_kernels.info --decisions, on tune_1's file (the package's own view)"
    CVT_KERNELS_DISPATCH_CACHE="$SCRATCH/tune_1.json" timeout "$(cap 15)" \
      $PY -m cvt_kernels.info --decisions 2>&1; } >> "$OUT/dispatch.txt"
  # Where the time goes, kernel by kernel: one training and one eval step, block scope.
  step profile 25 $PY -m benchmarks.profile_step $PROFILE --scope block
  summary
  # 2, late: torch.compile (mode default; minutes per mode for a whole CvT-13): what is left
  # of the budget, whole model first, its rows added to the same files (eager again beside
  # them, in the same process).
  step models_compile 240 $RUN --level model $MODEL_SIZE $DTYPE \
    --providers eager,compile,accelerated-block+compile --compile-mode default \
    --budget-s "$(budget 240 25)" --tag _quick --no-md --append
  summary
  if [ "$(left)" -gt $(( 60 * SCALE )) ]; then
    step blocks_compile 120 $RUN --level blocks $SIZE $DTYPE --scope block \
      --providers eager,compile,auto+compile --compile-mode default \
      --budget-s "$(budget 120 15)" --tag _quick --no-md --append
  fi
  # What is left: GPU memory growth over 1000 calls, bitwise determinism.
  if [ "$(left)" -gt $(( 40 * SCALE )) ]; then
    test_group gpu_misc 40 -m gpu tests/test_gpu.py \
      -k "memory_does_not_grow or deterministic or two_gpus or current_one"
    collect_groups
  fi
  # The counter, if it is still counting: waited for while time is left, else stopped (the
  # summary then joins the committed estimate of this shape, and names its commit).
  while [ -n "$COST_PID" ] && kill -0 "$COST_PID" 2>/dev/null && [ "$(left)" -gt 12 ]; do
    sleep 2
  done
  if [ -n "$COST_PID" ] && kill -0 "$COST_PID" 2>/dev/null; then
    pkill -P "$COST_PID" 2>/dev/null  # its timeouts (they stop their commands), then it
    kill "$COST_PID" 2>/dev/null
    echo "step_cost exit killed (still counting at the end; or overhead still timing)" \
      >> "$OUT/log.txt"
    COST_PID=""
  fi
  summary
elif [ "$MODE" = tests ]; then
  write_info
  # The whole GPU tier (quick ran its bf16/d64 core): fp16, fp32, head_dim 128, ragged.
  timeout -s INT -k 10 240 $PY -m pytest -q -p no:cacheprovider -rfEs --tb=short \
    $PYTEST_TIMEOUT -m gpu tests > "$OUT/tests.txt" 2>&1
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
  ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  { date -u '+%Y-%m-%d %H:%M UTC'; nvcc --version 2>&1 | tail -2
    time TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 CVT_KERNELS_FORCE_BUILD=1 \
      timeout 300 $PY setup.py build_ext --inplace 2>&1 | tail -40
    $PY -m cvt_kernels.info 2>&1; } > "$OUT/cuda_build.txt" 2>&1
  timeout -s INT -k 10 150 $PY -m pytest -q -rfEs --tb=short -p no:cacheprovider \
    tests/test_cuda_backend.py \
    > "$OUT/cuda_tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/cuda_tests.txt"
  timeout 120 $PY -m benchmarks.conv_bn --model cvt_13 --batch 64 --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
  echo "conv_bn exit $?" >> "$OUT/bench.log"
elif [ "$MODE" = sanitize ]; then
  # compute-sanitizer over every Triton kernel at odd sizes (tests/sanitize/run.sh), then
  # the inference one-pass kernel beside the unfused triton path at every CvT-13 block shape
  # (the `bench` call's blocks file has it too, next to torch.compile).
  PY=$PY timeout 360 bash tests/sanitize/run.sh > "$OUT/bench.log" 2>&1
  echo "sanitize exit $?" >> "$OUT/bench.log"
  timeout 200 $RUN --level blocks --model cvt_13 --dtype bfloat16 \
    --batch 64 --providers eager,torch,triton,triton-one-pass --compile-mode none \
    --budget-s 170 --tag _one_pass >> "$OUT/bench.log" 2>&1
  echo "blocks (one pass) exit $?" >> "$OUT/bench.log"
else
  echo "usage: bash benchmarks/gpu_session.sh [quick|tests|bench|cuda|sanitize]" >&2
  exit 2
fi
