"""Host-side cost of one fused attention call, with the kernel launches stubbed out.

    TRITON_INTERPRET=1 python -m benchmarks.overhead --out DIR     # any machine, no GPU

The first GPU run (benchmarks/results/h200) showed CvT blocks on the triton backend bound
by the CPU, not the GPU: at CvT-13 stage 1, batch 64, bf16, eval, the kernels take 0.31 ms
(CUDA-graph replay) but a call takes 1.0 ms (0.82 for eager PyTorch). This script measures
that host-side part where no GPU is needed: every Triton launch becomes a no-op (under
``TRITON_INTERPRET=1``, so the launchers still run their Python), and what remains per call
of ``FusedConvAttention`` is our Python, torch's dispatch and the small torch ops around the
kernels. Rows: eval forward, train forward, train forward + backward, at a tiny shape (so
the stubbed kernels' absence is the only difference from a GPU call); ``torch`` is the
composite backend, really run, for scale. CPU seconds of this machine: compare rows from
one run, or runs of two commits on the same machine, not with GPU times.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, List

import torch


def _stub_triton_launches() -> None:
    """Every ``kernel[grid](...)`` (autotuned or not) returns without running anything."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    InterpretedFunction.__getitem__ = no_launch
    Autotuner.__getitem__ = no_launch


def _time_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _modules(module: str):
    """(the reference module, its fused twin) at a tiny CvT stage-1-like shape."""
    from cvt_kernels import FusedBlock, FusedConvAttention
    from cvt_kernels.models import Attention, Block
    from cvt_kernels.models.cvt import LayerNorm, QuickGELU

    torch.manual_seed(0)
    if module == "hf":
        from transformers.models.cvt.modeling_cvt import CvtLayer

        from cvt_kernels.hf import FusedHFCvtLayer

        ref = CvtLayer(1, 64, 3, 1, 1, 1, 2, "dw_bn", True, 0.0, 0.0, 4.0, 0.0,
                       with_cls_token=False)
        return ref, FusedHFCvtLayer(copy.deepcopy(ref))
    if module == "attention":
        ref = Attention(64, 64, 1, qkv_bias=True, stride_kv=2, with_cls_token=False)
        return ref, FusedConvAttention.from_reference(copy.deepcopy(ref))
    ref = Block(64, 64, 1, qkv_bias=True, act_layer=QuickGELU, norm_layer=LayerNorm,
                stride_kv=2, with_cls_token=False)
    return ref, FusedBlock.from_reference(copy.deepcopy(ref))


def measure(backend: str, calls: int, repeats: int, module: str = "attention") -> List[dict]:
    """Rows of one backend (``eager``: the reference module itself, no fused op)."""
    import contextlib

    import cvt_kernels

    ref, fused = _modules(module)
    if backend == "eager":
        fused = ref
    x = torch.randn(1, 16, 64)
    xg = x.clone().requires_grad_()

    def backward():
        fused(xg, 4, 4).sum().backward()

    rows = []
    with (contextlib.nullcontext() if backend == "eager" else cvt_kernels.use_backend(backend)):
        for mode in ("eval forward", "train forward", "train forward+backward"):
            fused.train(mode != "eval forward")
            if mode == "train forward+backward":
                us = _time_us(backward, calls, repeats)
            else:
                with torch.no_grad():
                    us = _time_us(lambda: fused(x, 4, 4), calls, repeats)
            rows.append(dict(module=module, backend=backend, call=mode,
                             us_per_call=round(us, 1)))
    return rows


def measure_interleaved(backends, calls: int, repeats: int, module: str = "attention"
                        ) -> List[dict]:
    """The rows of :func:`measure` for every backend, their samples interleaved (one
    sample of each backend in turn, the order rotating), so that a machine whose load
    changes during the run (this project's shared 2-core one) moves every backend's
    samples alike and the ratios between rows stay meaningful."""
    import contextlib

    import cvt_kernels

    setups = {}
    for backend in backends:
        ref, fused = _modules(module)
        x = torch.randn(1, 16, 64)
        setups[backend] = (ref if backend == "eager" else fused, x,
                           x.clone().requires_grad_())

    def context(backend):
        return (contextlib.nullcontext() if backend == "eager"
                else cvt_kernels.use_backend(backend))

    rows = []
    for mode in ("eval forward", "train forward", "train forward+backward"):
        samples = {b: [] for b in backends}
        calls_of = {}
        for backend, (m, x, xg) in setups.items():
            m.train(mode != "eval forward")
            if mode == "train forward+backward":
                calls_of[backend] = (lambda m=m, xg=xg: m(xg, 4, 4).sum().backward(),
                                     contextlib.nullcontext)
            else:
                calls_of[backend] = (lambda m=m, x=x: m(x, 4, 4), torch.no_grad)
        for r in range(repeats + 1):  # the first round warms every backend up
            order = list(backends)[r % len(backends):] + list(backends)[:r % len(backends)]
            for backend in order:
                fn, grad_ctx = calls_of[backend]
                with context(backend), grad_ctx():
                    us = _time_us(fn, calls, 1) if r else _time_us(fn, 20, 1)
                if r:
                    samples[backend].append(us)
        for backend in backends:
            rows.append(dict(module=module, backend=backend, call=mode,
                             us_per_call=round(statistics.median(samples[backend]), 1)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="calls per sample")
    p.add_argument("--repeats", type=int, default=7, help="samples (the median is reported)")
    p.add_argument("--module", choices=["attention", "block", "hf"], default="attention",
                   help="one FusedConvAttention call, or one FusedBlock (block scope: "
                   "LayerNorms, attention, MLP) beside the reference Block ('eager' rows), "
                   "or one FusedHFCvtLayer beside transformers' CvtLayer")
    p.add_argument("--sequential", action="store_true",
                   help="all samples of one backend, then the next (the method before "
                   "overhead_block_plan; default: samples interleaved across backends)")
    p.add_argument("--no-direct", action="store_true",
                   help="call plans without their direct paths (cvt_kernels._plan."
                   "DIRECT_PATHS): a planned eval call replays the ops instead, as before "
                   "the direct paths")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--out", help="directory for overhead<tag>.csv and .md")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("benchmarks.overhead: run with TRITON_INTERPRET=1 (the triton backend's "
              "launchers run on the CPU, their kernels stubbed out)", file=sys.stderr)
        return 2
    # One thread: the torch rows' tiny ops must not wait on idle OpenMP workers.
    torch.set_num_threads(1)
    os.environ.setdefault("CVT_KERNELS_ONE_PASS", "0")
    _stub_triton_launches()
    if args.no_direct:
        from cvt_kernels import _plan

        _plan.DIRECT_PATHS = False
    backends = ("triton", "torch", "auto") + (("eager",) if args.module != "attention" else ())
    from cvt_kernels._progress import Progress

    progress = Progress("benchmarks.overhead", total=len(backends))
    rows = []
    if not args.sequential:
        progress.step(f"{', '.join(backends)}, interleaved: eval forward, train forward, "
                      f"train forward+backward ({args.repeats} samples of {args.calls} "
                      f"calls each)")
        rows = measure_interleaved(backends, args.calls, args.repeats, args.module)
        rows.sort(key=lambda r: backends.index(r["backend"]))  # stable: calls in order
    for b in backends if args.sequential else ():
        progress.step(f"{b}: eval forward, train forward, train forward+backward "
                      f"({args.repeats} samples of {args.calls} calls each)")
        rows += measure(b, args.calls, args.repeats, args.module)
    for r in rows:
        print(f"{r['backend']:7s} {r['call']:24s} {r['us_per_call']:8.1f} us")
    if args.out:
        from .common import save_results
        what = {"attention": "FusedConvAttention", "block": "FusedBlock",
                "hf": "FusedHFCvtLayer (transformers' CvtLayer at block scope)"}[args.module]
        save_results(args.out, "overhead" + args.tag,
                     f"Host-side cost per {what} call (kernels stubbed)", args, rows,
                     command="TRITON_INTERPRET=1 python -m benchmarks.overhead "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                     plot=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
