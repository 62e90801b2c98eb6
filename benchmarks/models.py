"""Whole CvT models: inference and training-step throughput (images/s) over a batch sweep.

    python -m benchmarks.models                          # GPU: CvT-13 224 bf16, batch 1..256
    python -m benchmarks.models --model cvt_w24 --img-size 384 --batch 1 8 32
    python -m benchmarks.models --quick                  # CPU smoke: a tiny CvT-13, batch 1, 2
    python -m benchmarks.models --out DIR                # DIR/models.csv/.md/.png

(``python -m benchmarks.run --level model`` is the same with the harness's options.)

Providers: ``eager`` (the reference ``cvt_kernels.models`` CvT), ``accelerated``
(``cvt_kernels.accelerate``, the dispatcher's choice per call), ``accelerated-block``
(``accelerate(model, scope="block")``: attention, LayerNorms and MLPs on the fused ops, the
dispatcher's choice), ``accelerated-<backend>`` and ``accelerated-block-<backend>`` for
each backend forced (``torch``; ``triton``, ``cuda`` where they can run), ``compile``
(``torch.compile(mode=--compile-mode)`` of the eager model), ``accelerated+compile`` and
``accelerated-block+compile`` (the same of the accelerated models; default on GPU only,
``--compile`` on CPU, where compiling a whole CvT takes minutes), and the CUDA-graph
providers ``eager+graph``, ``accelerated+graph``, ``accelerated-block+graph`` (GPU only,
:class:`Graphed`: eval replays one captured forward from a static input; training replays
``torch.cuda.make_graphed_callables`` forward and backward graphs, the loss, gradient
accumulation and AdamW eager). The compile providers are measured after every other row
(in this order of modes and batches): a time budget (``--budget-s``) cuts them first.
Modes: ``eval`` (inference, no grad) and ``train`` (forward, cross-entropy, backward and an
AdamW step; the model in ``--dtype``).

Columns, GPU: ``ms`` (``triton.testing.do_bench`` median, ``q20_ms``/``q80_ms``),
``cudagraph_ms`` (the same call from a CUDA graph, without host time: eval, the forward by
``do_bench_cudagraph``; train, the whole step, forward, loss, backward and an AdamW with
``capturable=True``, captured once and replayed; or why capture failed; ``n/a`` for the
compile and graph providers), ``peak_mb`` (one call), ``first_call_s`` (the check's call:
compilation, the dispatcher's measurements, Triton autotuning or graph capture; never in
``ms``), and where the time goes (``benchmarks.profile_step.host_and_device``):
``host_ms`` (issuing one step, from an idle GPU, no sync), ``device_ms`` (the profiler's
kernel time of one step), ``profiled_cpu_ms`` (the step's CPU time under the profiler,
its overhead included) and ``bound`` (``host`` when issuing takes longer than the kernels
run). On CPU: wall clock, the providers interleaved round by round so that load from
other processes hits them alike, ``host_ms`` the step's wall time.

Every provider is checked at every batch before it is timed, by the agreement rule of
``cvt_kernels.agreement``: the eval logits, and for train one forward and backward from the
same weights with a random cotangent (logits, every parameter gradient, the running
statistics after it; drop path off), each of the provider's and eager's against a float64
truth from the same weights and inputs; the provider passes when its error is at most twice
eager's (+ a small eps). Columns: ``rel_err`` and ``eager_err`` (logits vs the truth),
``grad_err`` (the training tensor nearest its bar). A provider that fails, cannot run, or
runs out of GPU memory gets a row that says so and is not timed; its larger batches are
skipped after an out-of-memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels import agreement, models

from . import checks, common
from .common import (BUDGET_SPENT, DTYPES, ContextLost, add_speedups, captured_step_ms,
                     cudagraph_ms, current_device, failure_status, free_memory, inject_fault,
                     is_oom, out_of_time, peak_mb, ratio_text, save_results,
                     time_interleaved_cpu, time_ms)
from .journal import Journal, crashed_now, run_row
from .profile_step import host_and_device

GPU_BATCHES = [1, 8, 32, 64, 128, 256]
# The truth every provider and eager are judged against (the agreement rule).
TRUTH_DTYPE = torch.float64


class Provider:
    """A model to time: ``module`` holds the weights (reset, train/eval), ``call`` runs it;
    ``graphed`` says why a CUDA-graph time of it would be meaningless (empty: it is not)."""

    def __init__(self, module: torch.nn.Module, call: Callable, graphed: str = ""):
        self.module, self.call, self.graphed = module, call, graphed


def drop_path_on(module: torch.nn.Module) -> bool:
    """Whether a call of ``module`` in its current mode draws drop-path masks."""
    return module.training and any(
        isinstance(getattr(m, "drop_prob", None), float) and m.drop_prob > 0
        for m in module.modules())


class _Forward(torch.nn.Module):
    """``module(x)`` as a module of its own, so ``make_graphed_callables`` replaces this
    forward, not the model's."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class Graphed:
    """``module``'s calls replayed from CUDA graphs (the ``+graph`` providers).

    Without grad (eval): the forward is captured once per input signature with a static
    input; a call copies its input in, replays, and returns the static output (the next
    call overwrites it). With grad (training): ``torch.cuda.make_graphed_callables`` on the
    module, forward and backward graphs inside one autograd node (the loss, the
    accumulation into ``.grad`` and the optimizer stay eager).

    Before a capture the module runs :data:`WARMUP` eager calls (forward and, with grad,
    backward to ``torch.autograd.grad``, so no ``.grad`` is touched) on a side stream: the
    dispatcher measures, Triton autotunes and every first-call cache fills there, never
    during capture. The buffers (running statistics) that the warm-ups and the capture
    moved are put back, so one call moves them once, as an eager call does. A new
    signature (shape, dtype, device, train/eval, grad mode, drop path on or off) frees the
    old graphs and captures again. ``backend`` is forced while warming up and capturing
    (``None``: the dispatcher's choice)."""

    WARMUP = 2

    def __init__(self, module: torch.nn.Module, backend: Optional[str] = None):
        self.module, self.backend = module, backend
        self.key: Optional[tuple] = None
        self.graph = self.graphed = self.static_x = self.static_out = None

    def _forced(self):
        return (cvt_kernels.use_backend(self.backend) if self.backend
                else contextlib.nullcontext())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, self.module.training,
               torch.is_grad_enabled(), drop_path_on(self.module))
        if key != self.key:
            self.release()
            self._capture(x, torch.is_grad_enabled())
            self.key = key
        if self.graphed is not None:
            return self.graphed(x)
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out

    def release(self) -> None:
        self.key = None
        self.graph = self.graphed = self.static_x = self.static_out = None

    def _capture(self, x: torch.Tensor, grad: bool) -> None:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the input is on {x.device}")
        buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        params = [p for p in self.module.parameters() if p.requires_grad]
        static_x = x.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with self._forced():
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    out = self.module(static_x)
                    if grad and params:
                        torch.autograd.grad(out, params, torch.ones_like(out),
                                            allow_unused=True)
            torch.cuda.current_stream().wait_stream(side)
            if grad:
                wrapper = _Forward(self.module).train(self.module.training)
                self.graphed = torch.cuda.make_graphed_callables(
                    wrapper, (static_x,), allow_unused_input=True)
            else:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static_out = self.module(static_x)
                self.static_x = static_x
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


# --quick on CPU without --model: CvT-13's layout (three stages, the class token in the last,
# every projection kind) at a fraction of its width and depth. The smoke run checks that each
# provider runs and agrees; a whole CvT-13's training steps took it past two minutes.
QUICK_MODEL = "cvt_13-tiny"
TINY = common.TINY  # in common.py: profile_step and step_cost build it too


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
    provider filtered out or skipped costs no memory. The compile providers come last
    (:data:`DEFERRED`: measured after every other row)."""
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
                            graphed="n/a: torch.compile'd")
        return make

    def graphed(scope=None):
        def make():
            module = copy.deepcopy(eager)
            if scope is not None:
                module = cvt_kernels.accelerate(module, scope=scope)[0]
            return Provider(module, Graphed(module), graphed="n/a: replays CUDA graphs itself")
        return make

    available = cvt_kernels.backends.available_backends()
    out: Dict[str, Tuple[Optional[Callable[[], Provider]], str]] = {
        "eager": (lambda: Provider(eager, eager), ""),
        "accelerated": (accelerated(None), ""),
        "accelerated-block": (accelerated(None, "block"), ""),
    }
    for backend in ("torch", "triton", "cuda"):
        reason = available.get(backend)
        for name, scope in ((f"accelerated-{backend}", "attention"),
                            (f"accelerated-block-{backend}", "block")):
            out[name] = (accelerated(backend, scope), "") if reason is None else (None, reason)
    for name, scope in (("eager+graph", None), ("accelerated+graph", "attention"),
                        ("accelerated-block+graph", "block")):
        out[name] = ((graphed(scope), "") if device.type == "cuda"
                     else (None, "CUDA graphs need a CUDA device"))
    for name, scope in (("compile", None), ("accelerated+compile", "attention"),
                        ("accelerated-block+compile", "block")):
        if args.compile_mode == "none":
            out[name] = (None, "--compile-mode none")
        elif device.type == "cpu" and not args.compile:
            out[name] = (None, "CPU: compiling a whole CvT takes minutes here; pass --compile")
        else:
            out[name] = (compiled(scope), "")
    if args.providers:
        out = {k: v for k, v in out.items() if k in args.providers or k == "eager"}
    return out


#: Providers measured after every other row of a run (compiling a whole CvT takes minutes).
DEFERRED = ("compile", "accelerated+compile", "accelerated-block+compile")


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


class _Run:
    """What the groups of one (model, image size, dtype) share."""

    def __init__(self, name: str, img: int, dtype_name: str, args: argparse.Namespace,
                 device: torch.device, rows: List[dict], on_rows: Callable):
        self.name, self.img, self.dtype_name, self.args = name, img, dtype_name, args
        self.device, self.rows, self.on_rows = device, rows, on_rows
        self.dtype = DTYPES[dtype_name]
        self.journal = getattr(args, "journal", None) or Journal(None)
        self.eager = build_eager(name, img, self.dtype, device)
        self.state = copy.deepcopy(self.eager.state_dict())
        truth_module = copy.deepcopy(self.eager).to(TRUTH_DTYPE)
        self.truth = Provider(truth_module, truth_module)
        self.factories = make_providers(self.eager, args, device)
        self.built: Dict[str, Provider] = {}
        self.oom_at: Dict[Tuple[str, str], int] = {}
        self.groups: Dict[Tuple[str, int], List[dict]] = {}  # (mode, batch) -> its rows


def run_one(name: str, img: int, dtype_name: str, args: argparse.Namespace,
            device: torch.device, rows: List[dict], on_rows: Optional[Callable]) -> None:
    """Every row of one model, image size and dtype: the providers other than
    :data:`DEFERRED` for every mode and batch, then the deferred ones the same way."""
    run = _Run(name, img, dtype_name, args, device, rows, on_rows or (lambda rows: None))
    names = list(run.factories)
    for phase in ([n for n in names if n not in DEFERRED], [n for n in names if n in DEFERRED]):
        if not phase:
            continue
        for mode in args.modes:
            for batch in (args.train_batch if mode == "train" else args.batch):
                run_group(run, mode, batch, phase)
    run.built.clear()  # the caller frees the rest when this returns


def run_group(run: _Run, mode: str, batch: int, names: List[str]) -> None:
    """The rows of ``names`` at one mode and batch: each checked, then timed (on CPU after
    the loop, interleaved); saved after every row."""
    args, device, dtype, journal = run.args, run.device, run.dtype, run.journal
    train = mode == "train"
    base = dict(model=run.name, img=run.img, dtype=run.dtype_name, mode=mode, batch=batch)
    ids = [dict(base, provider=prov) for prov in names]
    siblings = run.groups.setdefault((mode, batch), [])
    if journal.all_done(ids):  # a restarted worker: this group ran before
        done = [journal.lookup(i) for i in ids]
        run.rows.extend(done)
        siblings.extend(done)
        run.on_rows(run.rows)
        return
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, run.img, run.img, generator=g).to(device, dtype)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cotangent = torch.randn(batch, 1000, generator=g).to(device, dtype)
    group: List[dict] = []
    cpu_fns: Dict[str, Callable[[], None]] = {}
    refs: List[checks.Results] = []  # eager's and the truth's, once per group
    why = ""
    eager_first_s: List[float] = []

    def references() -> bool:
        nonlocal why
        if refs or why:
            return not why
        try:
            with agreement.exact_float32():
                start = time.perf_counter()
                refs.append(one_call(Provider(run.eager, run.eager), run.state, x, cotangent,
                                     train))
                eager_first_s.append(_elapsed(start, device))
                refs.append(one_call(run.truth, run.state, x.to(TRUTH_DTYPE), cotangent, train))
        except Exception as exc:
            status = failure_status(exc, batch)
            if status.startswith("crashed"):
                raise ContextLost(f"eager reference: {status}") from exc
            which = "eager reference" if not refs else f"{TRUTH_DTYPE} truth"
            why = (f"{which} out of memory" if is_oom(exc)
                   else f"{which} {failure_status(exc, batch)}")
            refs.clear()
            free_memory()
        return not why

    for identity in ids:
        prov = identity["provider"]
        factory, reason = run.factories[prov]

        def measure() -> dict:
            if factory is None:
                return {"status": f"skipped: {reason}"}
            if (mode, prov) in run.oom_at:
                return {"status": f"skipped: out of memory at batch {run.oom_at[(mode, prov)]}"}
            if out_of_time(args):
                return {"status": BUDGET_SPENT}
            if not references():
                return {"status": f"skipped: {why} at batch {batch}"}
            try:
                inject_fault(prov)
                if prov not in run.built:
                    run.built[prov] = factory()
                p = run.built[prov]
                result, fn = check(p, prov, mode, x, labels, cotangent, run.state, refs, dtype,
                                   device)
                if prov == "eager" and eager_first_s:
                    result["first_call_s"] = round(eager_first_s[0], 3)
                if fn is not None and device.type == "cuda":
                    result.update(time_gpu(fn, p, mode, batch, device, args.quick, x, labels))
                elif fn is not None:  # CPU: timed below, interleaved with the others
                    cpu_fns[prov] = fn
                    result["status"] = PENDING
                return result
            except Exception as exc:
                status = failure_status(exc, batch)
                if status.startswith("skipped: out of memory"):
                    run.oom_at[(mode, prov)] = batch
                if prov in run.built and not status.startswith("crashed"):
                    release(run.built[prov])
                    free_memory()
                return {"status": status}

        row, measured = run_row(journal, identity, measure)
        group.append(row)
        run.on_rows(run.rows + group)  # after every measurement: a timeout keeps what ran
        if crashed_now(row, measured):
            run.rows.extend(group)
            raise ContextLost(f"{prov}: {group[-1]['status']}")
    if cpu_fns:
        time_cpu_group(cpu_fns, group, ids, run, batch)
    siblings.extend(group)
    add_speedups(siblings, ("eager", "compile"))  # the deferred rows use the first's eager
    for r in group:
        shown = (f"{r['ms']:10.2f} ms {r['images_per_s']:9.1f} img/s  err "
                 f"{r['rel_err']} (eager {r['eager_err']}) grad err {r['grad_err']}  "
                 f"{ratio_text(r)}"
                 + (f"  cpu share {r['cpu_share']}" if "cpu_share" in r else "")
                 + (f"  host {r['host_ms']} / device {r['device_ms']} ms"
                    if "host_ms" in r else "")
                 if r["status"] == "ok" else r["status"])
        print(f"{run.name} {run.img} {run.dtype_name} {mode:5s} b{batch:<4d} "
              f"{r['provider']:26s} {shown}", flush=True)
    run.rows.extend(group)
    run.on_rows(run.rows)  # again, with the speed-ups


def time_cpu_group(cpu_fns: Dict[str, Callable[[], None]], group: List[dict],
                   ids: List[dict], run: _Run, batch: int) -> None:
    """CPU: the checked providers of a group timed round by round; their rows finished and
    journaled. (The host fields: the wall time is the host's; no device to profile.)"""
    failed = ""
    try:
        times = time_interleaved_cpu(cpu_fns, run.args.repeats or (3 if run.args.quick else 10))
    except Exception as exc:
        times, failed = {}, failure_status(exc, batch)
    for identity, r in zip(ids, group):
        prov = r["provider"]
        if prov in times:
            *med_q20_q80, share = times[prov]
            r.update(status="ok", **timed_row(med_q20_q80, batch, "n/a", "n/a"),
                     cpu_share=share, host_ms=round(med_q20_q80[0], 3), device_ms="n/a",
                     profiled_cpu_ms="n/a", bound="n/a")
        elif prov in cpu_fns:
            r["status"] = failed
        if prov in cpu_fns:
            run.journal.finish(identity, r)
    for prov in cpu_fns:
        release(run.built[prov])


def release(p: Provider) -> None:
    """Frees what timing ``p`` left behind: gradients, and a graphed provider's graphs."""
    p.module.zero_grad(set_to_none=True)
    if isinstance(p.call, Graphed):
        p.call.release()


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


PENDING = "pending: checked, not yet timed"


def check(p: Provider, prov: str, mode: str, x, labels, cotangent, state,
          refs: List[checks.Results], dtype: torch.dtype, device: torch.device
          ) -> Tuple[dict, Optional[Callable[[], None]]]:
    """The agreement fields of a row (eval logits; in training the logits, every gradient
    and the running statistics of one step, by the rule against the truth), the seconds of
    the checked call (``first_call_s``: compilation, measurements, capture), and the
    function to time (None: it fails the rule)."""
    train = mode == "train"
    eager, truth = refs
    if prov == "eager":
        found = checks.verdicts(eager, eager, truth, dtype, ("logits",))
        out = checks.fields(found, baseline=True)
    else:
        start = time.perf_counter()
        ours = one_call(p, state, x, cotangent, train)
        first = _elapsed(start, device)
        found = checks.verdicts(ours, eager, truth, dtype, ("logits",))
        out = {**checks.fields(found), "first_call_s": round(first, 3)}
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
             device: torch.device, quick: bool, x: torch.Tensor, labels: torch.Tensor
             ) -> dict:
    """do_bench quantiles, peak memory, a CUDA-graph time (eval: the forward; train: the
    whole step with a capturable AdamW) and where the step's time goes (host vs device)."""
    times = time_ms(fn, device, quick)
    row = timed_row(times, batch, "n/a", peak_mb(fn, device))
    row.update(host_and_device(fn, device))
    release(p)  # the optimizer's state goes with ``fn``
    if p.graphed:
        row["cudagraph_ms"] = p.graphed
    elif mode == "eval":
        row["cudagraph_ms"] = cudagraph_ms(fn, device, quick)
    else:
        row["cudagraph_ms"] = captured_step_ms(p.module, p.call, x, labels, device, quick)
        release(p)
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
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.providers:  # a typo stops the run instead of being dropped
        every = argparse.Namespace(compile_mode="max-autotune", compile=True, providers=None)
        known = list(make_providers(None, every, torch.device("cpu")))
        unknown = [n for n in args.providers if n not in known]
        if unknown:
            sys.exit(f"error: --providers {','.join(unknown)}: not a model provider; the "
                     f"providers are {', '.join(known)}")
    args.deadline = time.monotonic() + args.budget_s if args.budget_s else None
    command = "python -m benchmarks.models " + shlex.join(sys.argv[1:])

    def save(rows: List[dict], final: bool = False) -> None:
        if args.out and rows:
            save_results(args.out, "models", "Whole CvT models: images/s", args, rows,
                         command=command, plot=final and not args.no_plot, verbose=final)
    save(run(args, on_rows=save), final=True)


if __name__ == "__main__":
    main()
