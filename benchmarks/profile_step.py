"""Per-kernel time breakdown of one CvT training step and one eval step (torch.profiler).

    python -m benchmarks.profile_step                    # GPU: CvT-13 224 bf16 batch 64, triton
    python -m benchmarks.profile_step --model cvt_13 --img-size 224 --batch 64 \\
        --dtype bfloat16 --backend triton --out DIR/profile.txt
    python -m benchmarks.profile_step --backend torch    # CPU: CvT-13 64x64 fp32 batch 2
    python -m benchmarks.profile_step --backend torch --model cvt_13-tiny   # seconds on CPU
    python -m benchmarks.profile_step --modes eval --steps 3

Modes: ``train`` (zero_grad, forward, cross-entropy, backward, AdamW step) and ``eval``
(forward under ``torch.no_grad()``), on ``cvt_kernels.accelerate(model, scope=--scope)``
with ``--backend`` forced. Each mode is warmed up (autotuning and Triton compiles stay out
of the profile), timed outside the profiler (median of 3 synchronized steps), then
``--steps`` steps are profiled. Per mode: a header line (on GPU with the kernels' device
time per step beside the wall time: the difference is the GPU waiting for the host), the
key-averages table (sorted by self device time on GPU, self CPU time on CPU) and the time
by category (our kernels, GEMM, convolution, ...). The text goes to stdout and, section by
section, to ``--out``. A mode that fails gets ``failed: ...`` in its header and the next
mode still runs; exit status 1 if any failed.

:func:`host_and_device` is the same question asked of any step, as a results row's fields
(``benchmarks.models`` adds them to every row): host time to issue it, the kernels' device
time, and which of the two bounds it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cvt_kernels

from .common import DTYPES, TINY, current_device, device_name, git_commit

ROW_LIMIT = 30
# Our kernels' names as the profiler shows them: the @triton.jit function names. Read from
# the sources so that new kernels are counted without editing this list (helpers that are
# inlined never appear as kernels, so matching them too is harmless).
_JIT_DEF = re.compile(r"@triton\.jit[^\n]*\n(?:\s*@[^\n]*\n)*\s*def (\w+)")
OUR_KERNELS = frozenset(
    name for src in (Path(cvt_kernels.__file__).parent / "backends" / "triton").glob("*.py")
    for name in _JIT_DEF.findall(src.read_text()))
# First match wins: cuDNN batch-norm kernels also say "cudnn", cuDNN convolutions are
# "implicit_gemm" kernels (fprop/dgrad/wgrad) and SDPA's memory-efficient kernels are
# "fmha_cutlass*", so those are tested before GEMM.
CATEGORIES = [
    ("batch-norm", re.compile(r"batch_norm|bn_", re.I)),
    ("attention (torch SDPA)", re.compile(r"flash|fmha|attention|scaled_dot_product", re.I)),
    ("convolution", re.compile(r"conv|cudnn|depthwise|fprop|dgrad|wgrad", re.I)),
    ("GEMM", re.compile(r"gemm|sm90_xmma|cutlass|ampere|nvjet"
                        r"|^aten::(mm|addmm|addmm_|bmm|baddbmm)$|_linear_pointwise", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|vectorized|reduce", re.I)),
]


def category(name: str) -> str:
    if name in OUR_KERNELS or name.startswith("cvt_kernels::"):
        return "ours (cvt_kernels)"
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def self_time_key(avgs, cuda: bool) -> str:
    # torch renamed *_cuda_* to *_device_* (the old names remain as deprecated aliases for
    # now); use whichever this version's events have.
    if not cuda:
        return "self_cpu_time_total"
    return next((k for k in ("self_device_time_total", "self_cuda_time_total")
                 if not len(avgs) or hasattr(avgs[0], k)), "self_cuda_time_total")


def by_category(avgs, key: str, cuda: bool) -> str:
    totals = {}
    for evt in avgs:
        # On GPU the CPU-side ops also carry their kernels' time: count the kernels only.
        if cuda and (str(getattr(evt, "device_type", "")).rsplit(".", 1)[-1] != "CUDA"
                     or getattr(evt, "is_user_annotation", False)):
            continue
        label = category(evt.key)
        totals[label] = totals.get(label, 0.0) + getattr(evt, key)
    total = sum(totals.values()) or 1.0
    what = "self device time of the kernels" if cuda else "self CPU time of the aten ops"
    lines = [f"by category ({what}, all profiled steps):"]
    if not totals:
        lines.append("  (no events recorded)")
    for label, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<48} {us / 1e3:10.3f} ms {100 * us / total:6.1f} %")
    return "\n".join(lines) + "\n"


def _kernel_events(avgs, cuda: bool):
    """The profiler's kernel rows: device-side events that are not user annotations."""
    return [evt for evt in avgs if cuda
            and str(getattr(evt, "device_type", "")).rsplit(".", 1)[-1] == "CUDA"
            and not getattr(evt, "is_user_annotation", False)]


def host_and_device(step, device: torch.device, repeats: int = 3) -> dict:
    """Where one call of ``step`` spends its time, as a results row's fields:

    * ``host_ms``: the median wall time of issuing a step from an idle device, not waiting
      for it (the Python, dispatch and launch work; on CPU the step's wall time);
    * ``device_ms``: the kernels' device time in one profiled step (``n/a`` on CPU);
    * ``profiled_cpu_ms``: the CPU time of that profiled step (the profiler's own overhead
      included, so above ``host_ms``);
    * ``bound``: ``host`` when issuing the step takes longer than its kernels run (the GPU
      waits for Python: CUDA graphs or fewer launches pay, faster kernels do not),
      ``device`` otherwise.

    ``step`` must be warmed up (nothing compiled, measured or autotuned on this call)."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    host = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("cvt_kernels.step"):
            step()
        sync()
    avgs = prof.key_averages()
    key = self_time_key(avgs, cuda)
    device_us = sum(getattr(evt, key) for evt in _kernel_events(avgs, cuda))
    cpu_us = next((evt.cpu_time_total for evt in avgs if evt.key == "cvt_kernels.step"), None)
    host_ms = statistics.median(host)
    row = {"host_ms": round(host_ms, 3),
           "device_ms": round(device_us / 1e3, 3) if device_us else "n/a",
           "profiled_cpu_ms": round(cpu_us / 1e3, 3) if cpu_us is not None else "n/a"}
    row["bound"] = ("n/a" if not device_us else
                    "host" if host_ms > device_us / 1e3 else "device")
    return row


def build_model(name: str, img_size: int):
    """``name`` from ``cvt_kernels.models``, or ``<name>-tiny`` (benchmarks.models' small
    variant, CvT-13's layout at a fraction of its width: seconds on a CPU)."""
    base, _, variant = name.partition("-")
    spec = None
    if variant:
        spec = TINY
    return getattr(cvt_kernels.models, base)(img_size=img_size, spec_overrides=spec)


def run_mode(mode: str, args, device: torch.device, dtype: torch.dtype, sync) -> tuple:
    """Builds the model and profiles one mode; returns (header fields, profiler text)."""
    torch.manual_seed(0)
    model = build_model(args.model, args.img_size).to(device, dtype)
    model, replaced = cvt_kernels.accelerate(model, scope=args.scope)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    labels = torch.randint(0, model.num_classes, (args.batch,), device=device)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).float(), labels).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()  # the kernels still in flight belong in this profile
    avgs = prof.key_averages()
    key = self_time_key(avgs, device.type == "cuda")
    text = avgs.table(sort_by=key, row_limit=ROW_LIMIT) + "\n"
    text += by_category(avgs, key, device.type == "cuda")
    fields = [f"{replaced} {'blocks' if args.scope == 'block' else 'attention modules'} fused",
              f"{statistics.median(times):.2f} ms/step (median of 3)"]
    kernels = _kernel_events(avgs, device.type == "cuda")
    if kernels:  # against the wall time above: the rest is the GPU waiting for the host
        fields.append(f"kernels {sum(getattr(e, key) for e in kernels) / 1e3 / args.steps:.2f}"
                      f" ms/step")
    return fields, text


def main(argv=None) -> int:
    device = current_device()
    gpu = device.type == "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    names = [n for n in cvt_kernels.models.__all__ if n.startswith("cvt_")]
    p.add_argument("--model", default="cvt_13", choices=names + [f"{n}-tiny" for n in names],
                   help="a CvT, or <name>-tiny (its layout at a fraction of the width)")
    p.add_argument("--img-size", type=int, default=224 if gpu else 64,
                   help="input height and width (224 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=64 if gpu else 2,
                   help="images per step (64 on GPU, 2 on CPU)")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=list(DTYPES),
                   help="model and input dtype (bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--backend", default="triton",
                   choices=["triton", "auto", "torch", "reference"],
                   help="backend forced for the fused ops (auto: the package's choice)")
    p.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    p.add_argument("--steps", type=int, default=1, help="steps profiled per mode")
    p.add_argument("--scope", default="attention", choices=["attention", "block"],
                   help="accelerate(model, scope=...): the attention only, or whole blocks")
    p.add_argument("--out", help="also write the text to this file (parent dirs created)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out or os.devnull, "w") as out:
        def emit(text: str) -> None:
            print(text, end="", flush=True)
            out.write(text)
            out.flush()  # a crash or a kill in the next mode keeps this section

        return profile_modes(args, device, dtype, sync, emit)


def profile_modes(args, device: torch.device, dtype: torch.dtype, sync, emit) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    reason = cvt_kernels.backends.available_backends().get(args.backend)
    if reason is not None:  # unusable for every call: one line instead of one per mode
        emit(f"profile_step: backend {args.backend!r} cannot run here: {reason}\n")
        return 1
    common = [args.model, f"img {args.img_size}", f"batch {args.batch}", args.dtype,
              f"backend {args.backend}", device_name(device), f"torch {torch.__version__}",
              f"triton {triton_version}",
              f"commit {os.environ.get('CVT_KERNELS_COMMIT') or git_commit()}"]
    failed = False
    for mode in args.modes:
        try:
            with cvt_kernels.use_backend(args.backend):
                fields, text = run_mode(mode, args, device, dtype, sync)
        except Exception as e:  # noqa: BLE001 (any failure is reported, the next mode runs)
            failed = True
            first = (str(e).strip().splitlines() or [""])[0]
            fields, text = [f"failed: {type(e).__name__}: {first}"], ""
        if device.type == "cuda":  # not in the except block: its traceback held the tensors
            torch.cuda.empty_cache()
        emit("== " + " | ".join([mode] + common + fields) + "\n" + text + "\n")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
