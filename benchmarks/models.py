"""Whole CvT models: inference and training-step throughput (images/s) over a batch sweep.

    python -m benchmarks.models                          # GPU: CvT-13 224 bf16, batch 1..256
    python -m benchmarks.models --model cvt_w24 --img-size 384 --batch 1 8 32
    python -m benchmarks.models --quick                  # CPU smoke: a tiny CvT-13, batch 1, 2
    python -m benchmarks.models --out DIR                # DIR/models.csv/.md/.png

(``python -m benchmarks.run --level model`` is the same with the harness's options.)

Providers: ``eager`` (the reference ``cvt_kernels.models`` CvT), ``accelerated``
(``cvt_kernels.accelerate``, automatic backend), ``accelerated-block``
(``accelerate(model, scope="block")``: attention, LayerNorms and MLPs on the fused ops),
``accelerated-<backend>`` for each backend forced (``torch``; ``triton`` where it can run:
CUDA), ``accelerated-block-<backend>`` (block scope, ``triton`` or ``cuda`` forced), ``compile`` (``torch.compile(mode=--compile-mode)`` of the eager model) and
``accelerated+compile`` (the same of ``accelerate(model)``): default on GPU only,
``--compile`` on CPU, where compiling a whole CvT takes minutes. Modes: ``eval`` (inference, no grad) and
``train`` (forward, cross-entropy, backward and an AdamW step; the model in ``--dtype``).

Times: ``triton.testing.do_bench`` quantiles on GPU (and ``do_bench_cudagraph`` for eval
batches up to 8), peak GPU memory; on CPU wall clock, the providers interleaved round by
round so that load from other processes hits them alike.

Every provider is checked at every batch before it is timed, by the agreement rule of
``cvt_kernels.agreement``: the eval logits, and for train one forward and backward from the
same weights with a random cotangent (logits, every parameter gradient, the running
statistics after it; drop path off), each of the provider's and eager's against a truth at
higher precision (float32 for fp16/bf16, float64 for float32) from the same weights and
inputs; the provider passes when its error is at most twice eager's (+ a small eps).
Columns: ``rel_err`` and ``eager_err`` (logits vs the truth), ``grad_err`` (the training
tensor nearest its bar). A provider that fails, cannot run, or runs out of GPU memory gets
a row that says so and is not timed; its larger batches are skipped after an out-of-memory.
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

from cvt_kernels import agreement

from . import checks
from .common import (BUDGET_SPENT, DTYPES, ContextLost, add_speedups, cudagraph_ms,
                     current_device, failure_status, free_memory, inject_fault, is_oom,
                     out_of_time, peak_mb, ratio_text, save_results, time_interleaved_cpu,
                     time_ms)
from .journal import Journal, crashed_now, run_row

GPU_BATCHES = [1, 8, 32, 64, 128, 256]
# Eval batches up to this size also get a CUDA-graph time (launch overhead dominates there).
CUDAGRAPH_MAX_BATCH = 8


class Provider:
    """A model to time: ``module`` holds the weights (reset, train/eval), ``call`` runs it."""

    def __init__(self, module: torch.nn.Module, call: Callable, graphable: bool = True):
        self.module, self.call, self.graphable = module, call, graphable


# --quick on CPU without --model: CvT-13's layout (three stages, the class token in the last,
# every projection kind) at a fraction of its width and depth. The smoke run checks that each
# provider runs and agrees; a whole CvT-13's training steps took it past two minutes.
QUICK_MODEL = "cvt_13-tiny"
TINY = dict(DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 2])


def build_eager(name: str, img: int, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    base, _, variant = name.partition("-")
    model = getattr(models, base)(img_size=img, spec_overrides=TINY if variant else None)
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
    def accelerated(backend, scope="attention"):
        def make():
            module = cvt_kernels.accelerate(copy.deepcopy(eager), scope=scope)[0]
            return Provider(module, with_backend(module, backend))
        return make

    def compiled(scope=None):
        def make():
            module = copy.deepcopy(eager)
            if scope is not None:
                module = cvt_kernels.accelerate(module, scope=scope)[0]
            # max-autotune replays its own CUDA graphs: no second capture around it.
            return Provider(module, torch.compile(module, mode=args.compile_mode),
                            graphable=False)
        return make

    available = cvt_kernels.backends.available_backends()
    out: Dict[str, Tuple[Optional[Callable[[], Provider]], str]] = {
        "eager": (lambda: Provider(eager, eager), ""),
        "accelerated": (accelerated(None), ""),
        "accelerated-block": (accelerated(None, "block"), ""),
    }
    for backend in ("torch", "triton", "cuda"):
        reason = available.get(backend)
        out[f"accelerated-{backend}"] = ((accelerated(backend), "") if reason is None
                                         else (None, reason))
        if backend != "torch":  # (accelerated-block on CPU is the torch backend already)
            out[f"accelerated-block-{backend}"] = ((accelerated(backend, "block"), "")
                                                   if reason is None else (None, reason))
    for name, scope in (("compile", None), ("accelerated+compile", "attention")):
        if args.compile_mode == "none":
            out[name] = (None, "--compile-mode none")
        elif device.type == "cpu" and not args.compile:
            out[name] = (None, "CPU: compiling a whole CvT takes minutes here; pass --compile")
        else:
            out[name] = (compiled(scope), "")
    if args.providers:
        out = {k: v for k, v in out.items() if k in args.providers or k == "eager"}
    return out


def one_call(p: Provider, state: dict, x: torch.Tensor, grad: torch.Tensor,
             train: bool) -> checks.Results:
    """From ``state``: the eval logits, or one training forward and backward with the
    cotangent ``grad`` (logits, every parameter gradient, the running statistics after it).
    Drop path is off (its masks depend on the dtype); a random cotangent of size ~1, not a
    loss's, keeps fp16 gradients out of the subnormals."""
    p.module.load_state_dict(state)
    p.module.train(train)
    p.module.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return checks.Results([p.call(x)], {}, {})
    with agreement.no_drop_path(p.module):
        out = p.call(x)
        out.backward(grad.to(out.dtype))
    grads, buffers = checks.grads_and_buffers(p.module)
    p.module.zero_grad(set_to_none=True)
    return checks.Results([out.detach()], grads, buffers)


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
    journal = getattr(args, "journal", None) or Journal(None)
    on_rows = on_rows or (lambda rows: None)
    eager = build_eager(name, img, dtype, device)
    state = copy.deepcopy(eager.state_dict())
    truth_dtype = agreement.truth_dtype(dtype)
    truth_module = copy.deepcopy(eager).to(truth_dtype)
    truth = Provider(truth_module, truth_module)
    factories = make_providers(eager, args, device)
    built: Dict[str, Provider] = {}
    oom_at: Dict[Tuple[str, str], int] = {}
    for mode in args.modes:
        train = mode == "train"
        for batch in (args.train_batch if train else args.batch):
            base = dict(model=name, img=img, dtype=dtype_name, mode=mode, batch=batch)
            ids = [dict(base, provider=prov) for prov in factories]
            if journal.all_done(ids):  # a restarted worker: this group ran before
                rows.extend(journal.lookup(i) for i in ids)
                on_rows(rows)
                continue
            g = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, img, img, generator=g).to(device, dtype)
            labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
            cotangent = torch.randn(batch, 1000, generator=g).to(device, dtype)
            group: List[dict] = []
            cpu_fns: Dict[str, Callable[[], None]] = {}
            refs: List[checks.Results] = []  # eager's and the truth's, once per group
            why = ""

            def references() -> bool:
                nonlocal why
                if refs or why:
                    return not why
                try:
                    with agreement.exact_float32():
                        refs.append(one_call(Provider(eager, eager), state, x, cotangent, train))
                        refs.append(one_call(truth, state, x.to(truth_dtype), cotangent, train))
                except Exception as exc:
                    status = failure_status(exc, batch)
                    if status.startswith("crashed"):
                        raise ContextLost(f"eager reference: {status}") from exc
                    which = "eager reference" if not refs else f"{truth_dtype} truth"
                    why = (f"{which} out of memory" if is_oom(exc)
                           else f"{which} {failure_status(exc, batch)}")
                    refs.clear()
                    free_memory()
                return not why

            for identity in ids:
                prov = identity["provider"]
                factory, reason = factories[prov]

                def measure() -> dict:
                    if factory is None:
                        return {"status": f"skipped: {reason}"}
                    if (mode, prov) in oom_at:
                        return {"status": f"skipped: out of memory at batch {oom_at[(mode, prov)]}"}
                    if out_of_time(args):
                        return {"status": BUDGET_SPENT}
                    if not references():
                        return {"status": f"skipped: {why} at batch {batch}"}
                    try:
                        inject_fault(prov)
                        if prov not in built:
                            built[prov] = factory()
                        result, fn = check(built[prov], prov, mode, x, labels, cotangent,
                                           state, refs, dtype)
                        if fn is not None and device.type == "cuda":
                            result.update(time_gpu(fn, built[prov], mode, batch, device, quick))
                        elif fn is not None:  # CPU: timed below, interleaved with the others
                            cpu_fns[prov] = fn
                            result["status"] = PENDING
                        return result
                    except Exception as exc:
                        status = failure_status(exc, batch)
                        if status.startswith("skipped: out of memory"):
                            oom_at[(mode, prov)] = batch
                        if prov in built and not status.startswith("crashed"):
                            built[prov].module.zero_grad(set_to_none=True)
                            free_memory()
                        return {"status": status}

                row, measured = run_row(journal, identity, measure)
                group.append(row)
                on_rows(rows + group)  # after every measurement: a timeout keeps what ran
                if crashed_now(row, measured):
                    rows.extend(group)
                    raise ContextLost(f"{prov}: {group[-1]['status']}")
            if cpu_fns:
                try:
                    times = time_interleaved_cpu(cpu_fns, args.repeats or (3 if quick else 10))
                except Exception as exc:
                    times, failed = {}, failure_status(exc, batch)
                for identity, r in zip(ids, group):
                    if r["provider"] in times:
                        *med_q20_q80, share = times[r["provider"]]
                        r.update(status="ok", **timed_row(med_q20_q80, batch, "n/a", "n/a"),
                                 cpu_share=share)
                    elif r["provider"] in cpu_fns:
                        r["status"] = failed
                    if r["provider"] in cpu_fns:
                        journal.finish(identity, r)
                for prov in cpu_fns:
                    built[prov].module.zero_grad(set_to_none=True)
            add_speedups(group, ("eager", "compile"))
            for r in group:
                shown = (f"{r['ms']:10.2f} ms {r['images_per_s']:9.1f} img/s  err "
                         f"{r['rel_err']} (eager {r['eager_err']}) grad err {r['grad_err']}  "
                         f"{ratio_text(r)}"
                         + (f"  cpu share {r['cpu_share']}" if "cpu_share" in r else "")
                         if r["status"] == "ok" else r["status"])
                print(f"{name} {img} {dtype_name} {mode:5s} b{batch:<4d} {r['provider']:20s} "
                      f"{shown}", flush=True)
            rows.extend(group)
            on_rows(rows)  # again, with the speed-ups
    built.clear()  # the caller frees the rest when this returns


PENDING = "pending: checked, not yet timed"


def check(p: Provider, prov: str, mode: str, x, labels, cotangent, state,
          refs: List[checks.Results], dtype: torch.dtype
          ) -> Tuple[dict, Optional[Callable[[], None]]]:
    """The agreement fields of a row (eval logits; in training the logits, every gradient
    and the running statistics of one step, by the rule against the truth), and the
    function to time (None: it fails the rule)."""
    train = mode == "train"
    eager, truth = refs
    if prov == "eager":
        found = checks.verdicts(eager, eager, truth, dtype, ("logits",))
        out = checks.fields(found, baseline=True)
    else:
        found = checks.verdicts(one_call(p, state, x, cotangent, train), eager, truth, dtype,
                                ("logits",))
        out = checks.fields(found)
        wrong = checks.wrong_status(found)
        if wrong is not None:
            return {"status": wrong, **out}, None
    out.setdefault("grad_err", "n/a")
    p.module.load_state_dict(state)
    p.module.train(train)
    if not train:
        def fn():
            with torch.no_grad():
                p.call(x)
        return {"status": "ok", **out}, fn
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
    args.model = args.model or [QUICK_MODEL if on_cpu_quick else "cvt_13"]
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
                free_memory()
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
