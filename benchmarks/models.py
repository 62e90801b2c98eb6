"""Whole CvT models: inference and training-step throughput (images/s) over a batch sweep.

    python -m benchmarks.models                          # GPU: CvT-13 224 bf16, batch 1..256
    python -m benchmarks.models --model cvt_w24 --img-size 384 --batch 1 8 32
    python -m benchmarks.models --quick                  # CPU smoke: CvT-13 at 64x64, batch 1, 2
    python -m benchmarks.models --out DIR                # DIR/models.csv/.md/.png

(``python -m benchmarks.run --level model`` is the same with the harness's options.)

Providers: ``eager`` (the reference ``cvt_kernels.models`` CvT), ``accelerated``
(``cvt_kernels.accelerate``, automatic backend), ``accelerated-<backend>`` for each backend
forced (``torch``; ``triton`` where it can run: CUDA), ``compile``
(``torch.compile(mode=--compile-mode)`` of the eager model: default on GPU only, ``--compile``
on CPU, where compiling a whole CvT takes minutes). Modes: ``eval`` (inference, no grad) and
``train`` (forward, cross-entropy, backward and an AdamW step; the model in ``--dtype``).

Times: ``triton.testing.do_bench`` quantiles on GPU (and ``do_bench_cudagraph`` for eval
batches up to 8), peak GPU memory; on CPU wall clock, the providers interleaved round by
round so that load from other processes hits them alike.

Every provider is checked against eager at every batch before it is timed: eval logits
(max |diff| / max |eager|), and for train one step from the same weights (loss, every
gradient). A provider that disagrees, cannot run, or runs out of GPU memory gets a row that
says so and is not timed; its larger batches are skipped after an out-of-memory.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels import models

from .common import (BUDGET_SPENT, DTYPES, add_speedups, cudagraph_ms, current_device,
                     free_memory, is_oom, out_of_time, peak_mb, save_results,
                     time_interleaved_cpu, time_ms)

GPU_BATCHES = [1, 8, 32, 64, 128, 256]
# Eval logits bar (max |diff| / max |eager|) per dtype; on a GPU float32 convs and the
# Triton kernels may use TF32. Half dtypes: also at least 3x eager's own error vs float32.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
GPU_FP32_TOLERANCE = 5e-3
# Gradients after one step are compared loosely: small ones are mostly rounding noise.
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.2, torch.bfloat16: 0.5}
GPU_FP32_GRAD_TOLERANCE = 5e-2
# Eval batches up to this size also get a CUDA-graph time (launch overhead dominates there).
CUDAGRAPH_MAX_BATCH = 8


class Provider:
    """A model to time: ``module`` holds the weights (reset, train/eval), ``call`` runs it."""

    def __init__(self, module: torch.nn.Module, call: Callable, graphable: bool = True):
        self.module, self.call, self.graphable = module, call, graphable


def build_eager(name: str, img: int, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    model = getattr(models, name)(img_size=img)
    with torch.no_grad():  # non-trivial running statistics, so eval BN folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    return model.to(device=device, dtype=dtype)


def with_backend(module: torch.nn.Module, backend: Optional[str]) -> Callable:
    if backend is None:
        return module

    def call(x):
        with cvt_kernels.use_backend(backend):
            return module(x)
    return call


def make_providers(eager: torch.nn.Module, args: argparse.Namespace, device: torch.device
                   ) -> Dict[str, Tuple[Optional[Callable[[], Provider]], str]]:
    """name -> (factory or None, reason it cannot run). Factories build lazily, so a
    provider filtered out or skipped costs no memory."""
    def accelerated(backend):
        def make():
            module = cvt_kernels.accelerate(copy.deepcopy(eager))[0]
            return Provider(module, with_backend(module, backend))
        return make

    def compiled():
        module = copy.deepcopy(eager)
        # max-autotune replays its own CUDA graphs: no second capture around it.
        return Provider(module, torch.compile(module, mode=args.compile_mode), graphable=False)

    available = cvt_kernels.backends.available_backends()
    out: Dict[str, Tuple[Optional[Callable[[], Provider]], str]] = {
        "eager": (lambda: Provider(eager, eager), ""),
        "accelerated": (accelerated(None), ""),
    }
    for backend in ("torch", "triton", "cuda"):
        reason = available.get(backend)
        out[f"accelerated-{backend}"] = ((accelerated(backend), "") if reason is None
                                         else (None, reason))
    if args.compile_mode == "none":
        out["compile"] = (None, "--compile-mode none")
    elif device.type == "cpu" and not args.compile:
        out["compile"] = (None, "CPU: compiling a whole CvT takes minutes here; pass --compile")
    else:
        out["compile"] = (compiled, "")
    if args.providers:
        out = {k: v for k, v in out.items() if k in args.providers or k == "eager"}
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def grad_err(grads: List[Optional[torch.Tensor]], ref: List[Optional[torch.Tensor]]) -> float:
    """Worst gradient error, each against the larger of its own scale and 1e-3 of the
    largest gradient (some are exactly zero in exact math, e.g. a k bias, and pure noise)."""
    pairs = [(g, r) for g, r in zip(grads, ref) if r is not None]
    floor = 1e-3 * max(r.abs().max().item() for _, r in pairs)
    return max(((g.double() - r.double()).abs().max() / max(r.abs().max().item(), floor)).item()
               if g is not None else float("inf") for g, r in pairs)


def first_step(p: Provider, state: dict, x: torch.Tensor, labels: torch.Tensor):
    """One training forward/backward from ``state``: (loss, gradients)."""
    p.module.load_state_dict(state)
    p.module.train()
    p.module.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same drop-path masks for every provider
    loss = F.cross_entropy(p.call(x).float(), labels)
    loss.backward()
    grads = [q.grad.detach().clone() if q.grad is not None else None
             for q in p.module.parameters()]
    p.module.zero_grad(set_to_none=True)
    return loss.item(), grads


def train_step(p: Provider, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    # A tiny learning rate: the weights barely move while the step is timed.
    opt = torch.optim.AdamW(p.module.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(p.call(x).float(), labels).backward()
        opt.step()
    return step


def run_one(name: str, img: int, dtype_name: str, args: argparse.Namespace,
            device: torch.device, rows: List[dict], on_rows: Optional[Callable]) -> None:
    dtype = DTYPES[dtype_name]
    quick = args.quick
    eager = build_eager(name, img, dtype, device)
    state = copy.deepcopy(eager.state_dict())
    truth32 = (build_eager(name, img, torch.float32, device).eval()
               if dtype != torch.float32 else None)
    tf32 = device.type == "cuda" and dtype == torch.float32
    tol = GPU_FP32_TOLERANCE if tf32 else TOLERANCE[dtype]
    factories = make_providers(eager, args, device)
    built: Dict[str, Provider] = {}
    oom_at: Dict[Tuple[str, str], int] = {}
    for mode in args.modes:
        for batch in (args.train_batch if mode == "train" else args.batch):
            g = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, img, img, generator=g).to(device, dtype)
            labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
            base = dict(model=name, img=img, dtype=dtype_name, mode=mode, batch=batch)
            group: List[dict] = []
            cpu_fns: Dict[str, Callable[[], None]] = {}
            ref, why, bar = None, "", tol
            try:  # eager's answer, which every provider must match
                if mode == "eval":
                    eager.load_state_dict(state)
                    with torch.no_grad():
                        ref = eager.eval()(x).float()
                else:
                    ref = first_step(Provider(eager, eager), state, x, labels)
            except Exception as exc:
                why = ("eager reference out of memory" if is_oom(exc)
                       else f"eager reference failed: {type(exc).__name__}: {exc}")[:160]
                free_memory()
            if mode == "eval" and ref is not None and truth32 is not None:
                try:  # half dtypes: eager's own error sets the bar (flash-attention's rule)
                    with torch.no_grad():
                        bar = max(tol, 3 * rel_err(ref, truth32(x.float()).float()))
                except Exception:
                    free_memory()  # no float32 truth at this size: the fixed bar stays
            for prov, (factory, reason) in factories.items():
                row = dict(base, provider=prov)
                if factory is None:
                    group.append({**row, "status": f"skipped: {reason}"})
                    continue
                if ref is None:
                    group.append({**row, "status": f"skipped: {why} at batch {batch}"})
                    continue
                if (mode, prov) in oom_at:
                    group.append({**row, "status": "skipped: out of memory at batch "
                                                   f"{oom_at[(mode, prov)]}"})
                    continue
                if out_of_time(args):
                    group.append({**row, "status": BUDGET_SPENT})
                    continue
                try:
                    if prov not in built:
                        built[prov] = factory()
                    result, fn = check(built[prov], mode, x, labels, ref, state, bar, dtype,
                                       device)
                    if fn is not None and device.type == "cuda":
                        result.update(time_gpu(fn, built[prov], mode, batch, device, quick))
                    elif fn is not None:  # CPU: timed below, interleaved with the others
                        cpu_fns[prov] = fn
                        result["status"] = "pending: checked, not yet timed"
                except Exception as exc:
                    if is_oom(exc):
                        oom_at[(mode, prov)] = batch
                        result = {"status": f"skipped: out of memory at batch {batch}"}
                    else:
                        first = str(exc).splitlines()[0][:120] if str(exc) else ""
                        result = {"status": f"failed: {type(exc).__name__}: {first}"}
                    if prov in built:
                        built[prov].module.zero_grad(set_to_none=True)
                    free_memory()
                group.append({**row, **result})
                if on_rows is not None:  # after every measurement: a timeout keeps what ran
                    on_rows(rows + group)
            if cpu_fns:
                try:
                    times = time_interleaved_cpu(cpu_fns, args.repeats or (3 if quick else 10))
                except Exception as exc:
                    times, failed = {}, f"failed: {type(exc).__name__}: {exc}"[:160]
                for r in group:
                    if r["provider"] in times:
                        *med_q20_q80, share = times[r["provider"]]
                        r.update(status="ok", **timed_row(med_q20_q80, batch, "n/a", "n/a"),
                                 cpu_share=share)
                    elif r["provider"] in cpu_fns:
                        r["status"] = failed
                for prov in cpu_fns:
                    built[prov].module.zero_grad(set_to_none=True)
            add_speedups(group, ("eager", "compile"))
            for r in group:
                shown = (f"{r['ms']:10.2f} ms {r['images_per_s']:9.1f} img/s  err "
                         f"{r['rel_err']} grad err {r['grad_err']}  "
                         f"x{r.get('vs_eager', 1)} vs eager"
                         + (f"  cpu share {r['cpu_share']}" if "cpu_share" in r else "")
                         if r["status"] == "ok" else r["status"])
                print(f"{name} {img} {dtype_name} {mode:5s} b{batch:<4d} {r['provider']:20s} "
                      f"{shown}", flush=True)
            rows.extend(group)
            if on_rows is not None:
                on_rows(rows)  # again, with the speed-ups
    del built, eager, truth32
    free_memory()


def check(p: Provider, mode: str, x, labels, ref, state, bar: float, dtype: torch.dtype,
          device: torch.device) -> Tuple[dict, Optional[Callable[[], None]]]:
    """The agreement fields of a row, and the function to time (None: it disagrees)."""
    if mode == "eval":
        p.module.load_state_dict(state)
        p.module.eval()
        with torch.no_grad():
            err = rel_err(p.call(x).float(), ref)
        out = dict(rel_err=f"{err:.1e}", grad_err="n/a")
        if not err <= bar:
            return {"status": f"wrong: rel err {err:.2e} > {bar:.1e}", **out}, None

        def fn():
            with torch.no_grad():
                p.call(x)
        return {"status": "ok", **out}, fn
    loss, grads = first_step(p, state, x, labels)
    err = abs(loss - ref[0]) / max(abs(ref[0]), 1e-12)
    gerr = grad_err(grads, ref[1])
    out = dict(rel_err=f"{err:.1e}", grad_err=f"{gerr:.1e}")
    tf32 = device.type == "cuda" and dtype == torch.float32
    gbar = GPU_FP32_GRAD_TOLERANCE if tf32 else GRAD_TOLERANCE[dtype]
    if not (err <= bar and gerr <= gbar):
        return {"status": f"wrong: loss rel err {err:.2e}, grad err {gerr:.2e}", **out}, None
    p.module.load_state_dict(state)
    return {"status": "ok", **out}, train_step(p, x, labels)


def timed_row(times: Tuple[float, float, float], batch: int, cg, peak) -> dict:
    ms, q20, q80 = times
    return {"ms": round(ms, 3), "q20_ms": round(q20, 3), "q80_ms": round(q80, 3),
            "images_per_s": round(batch / (ms * 1e-3), 1), "cudagraph_ms": cg, "peak_mb": peak}


def time_gpu(fn: Callable[[], None], p: Provider, mode: str, batch: int,
             device: torch.device, quick: bool) -> dict:
    """do_bench quantiles, peak memory, and for small eval batches a CUDA-graph median."""
    times = time_ms(fn, device, quick)
    cg = "n/a"
    if mode == "eval" and batch <= CUDAGRAPH_MAX_BATCH:
        cg = (cudagraph_ms(fn, device, quick) if p.graphable
              else "n/a: torch.compile max-autotune uses CUDA graphs itself")
    row = timed_row(times, batch, cg, peak_mb(fn, device))
    p.module.zero_grad(set_to_none=True)  # the optimizer's state goes with ``fn``
    return row


def defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fills in what was not given: GPU sweeps; on CPU (--quick) a seconds-long smoke."""
    on_cpu_quick = args.quick and device.type == "cpu"
    args.model = args.model or ["cvt_13"]
    args.img_size = args.img_size or ([64] if on_cpu_quick else [224])
    args.dtype = args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32"])
    args.batch = args.batch or ([1, 2] if on_cpu_quick else
                                GPU_BATCHES if device.type == "cuda" else [1, 4])
    # Batch 2, not 1, on CPU: torch 2.13's CPU batch_norm backward is wrong at batch 1 for
    # the eager CvT (README, "A PyTorch bug we avoid"), which would fail the agreement check.
    args.train_batch = args.train_batch or ([2] if device.type == "cpu" else args.batch)
    args.modes = args.modes or ["eval", "train"]
    return args


def run(args: argparse.Namespace, on_rows: Optional[Callable[[List[dict]], None]] = None
        ) -> List[dict]:
    device = current_device()
    args = defaults(args, device)
    rows: List[dict] = []
    for name in args.model:
        for img in args.img_size:
            for dtype_name in args.dtype:
                run_one(name, img, dtype_name, args, device, rows, on_rows)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help="CPU smoke run (CvT-13 at 64x64)")
    p.add_argument("--model", nargs="+", choices=sorted(models.CVT_SPECS))
    p.add_argument("--img-size", nargs="+", type=int)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, help="eval batches (and train, by default)")
    p.add_argument("--train-batch", nargs="+", type=int, help="train batches")
    p.add_argument("--modes", nargs="+", choices=["eval", "train"])
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help="comma-separated subset (eager always runs: it is the baseline)")
    p.add_argument("--compile", action="store_true", help="also torch.compile on CPU")
    p.add_argument("--compile-mode", default="max-autotune", help="or 'none'")
    p.add_argument("--repeats", type=int, help="CPU: timed calls per measurement")
    p.add_argument("--budget-s", type=float, help="stop timing after this many seconds "
                   "(remaining rows say so); for time-boxed GPU sessions")
    p.add_argument("--no-plot", action="store_true", help="write no .png")
    p.add_argument("--out", help="directory for models.csv/.md/.png")
    return p


def main() -> None:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()
    args.deadline = time.monotonic() + args.budget_s if args.budget_s else None
    command = "python -m benchmarks.models " + shlex.join(sys.argv[1:])

    def save(rows: List[dict], final: bool = False) -> None:
        if args.out and rows:
            save_results(args.out, "models", "Whole CvT models: images/s", args, rows,
                         command=command, plot=final and not args.no_plot, verbose=final)
    save(run(args, on_rows=save), final=True)


if __name__ == "__main__":
    main()
