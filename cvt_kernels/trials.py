"""How the dispatcher tries a candidate on one call: on copies, checked, and timed alone.

A *trial* is one op call made repeatable. ``prepare(candidate, truth)`` makes everything the
candidate needs on the call's device (copies of the inputs as leaves, in float64 for the
truth) and returns a :class:`Run`; calling the run executes the candidate once (forward,
and with gradients ``torch.autograd.grad`` against a fixed cotangent, so nothing accumulates
from one run to the next) and returns its *named results*:

* the outputs (``"out"``, or the op's own names: ``"normed"``, ``"sum"``),
* ``"grad_<input>"`` for every input that requires a gradient (weights, biases, the
  residual, the LayerNorm affine),
* whatever else the op changes (the projection's ``"running_mean"``/``"running_var"``).

:func:`disagreement` judges every one of them against the float64 truth by the 2x rule
(:mod:`cvt_kernels.agreement`); :func:`time_runs` times runs with only the candidate
between the clock's marks: copies and cotangents are made before (the cotangent on the
untimed first run), several runs per sample (about a millisecond), samples alternating
between candidates, the median kept.

The truth is float64 for every dtype (the torch backend, autocast off): it needs neither
TF32 switched off (process-wide state another thread may be using) nor any other global.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import agreement

__all__ = ["CudaClock", "GRAD_FLOOR", "Run", "TRUTH_DTYPE", "cotangent", "copy_input",
           "disagreement", "time_runs", "truth_mode"]

Results = Dict[str, Optional[Tensor]]
#: The dtype every truth is computed in.
TRUTH_DTYPE = torch.float64
#: A gradient's error is relative to max(its own largest entry, this fraction of the largest
#: gradient of the call): gradients that are zero in exact math (a key bias's: softmax
#: ignores a shift of a whole row) hold only rounding noise, which no rule can judge alone.
GRAD_FLOOR = 1e-3


class Run:
    """One candidate, ready to run on its copies: ``run()`` returns its named results.

    ``forward(*copies)`` computes the op's outputs (a tensor or a tuple, named by
    ``output_names``); with ``grad`` the run differentiates them with respect to the copies
    that require gradients (named by ``input_names``) against cotangents made once, on the
    first run. ``extra(copies)`` adds named tensors the op changes in place (running
    statistics). ``harness_ms``: the time spent making copies and cotangents;
    ``candidate``: the name of what runs (for messages and tests)."""

    def __init__(self, context: Callable[[], contextlib.AbstractContextManager],
                 forward: Callable[..., object], copies: Sequence[Optional[Tensor]],
                 input_names: Sequence[str], output_names: Sequence[str], grad: bool,
                 cotangent_dtype: torch.dtype,
                 extra: Optional[Callable[[], Results]] = None, harness_ms: float = 0.0,
                 candidate: str = ""):
        self.candidate = candidate
        self.context, self.forward, self.copies = context, forward, list(copies)
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.grad, self.cotangent_dtype, self.extra = grad, cotangent_dtype, extra
        self.harness_ms = harness_ms
        self._cotangents: Optional[List[Tensor]] = None

    def __call__(self) -> Results:
        """One run, its named results (outputs, gradients, ``extra``)."""
        return self._run(True)

    def timed(self) -> None:
        """One run as the clock sees it: the candidate's forward and backward only."""
        self._run(False)

    def _run(self, results_wanted: bool) -> Optional[Results]:
        with self.context():
            outs = self.forward(*self.copies)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            if len(outs) != len(self.output_names):
                raise RuntimeError(f"returned {len(outs)} outputs, expected "
                                   f"{len(self.output_names)} ({', '.join(self.output_names)})")
            results: Results = {n: (o.detach() if o is not None else None)
                                for n, o in zip(self.output_names, outs)}
            if self.grad:
                leaves = [(n, c) for n, c in zip(self.input_names, self.copies)
                          if c is not None and c.requires_grad]
                diff = [(o, i) for i, o in enumerate(outs) if o is not None and o.requires_grad]
                if self._cotangents is None:
                    start = time.perf_counter()
                    self._cotangents = [cotangent(o, self.cotangent_dtype, seed=i)
                                        for o, i in diff]
                    _sync(outs[0])
                    self.harness_ms += 1e3 * (time.perf_counter() - start)
                grads = torch.autograd.grad([o for o, _ in diff], [c for _, c in leaves],
                                            self._cotangents, allow_unused=True)
                results.update({f"grad_{n}": g for (n, _), g in zip(leaves, grads)})
            if self.extra is not None and results_wanted:
                results.update(self.extra())
        return results if results_wanted else None


def _sync(t: Optional[Tensor]) -> None:
    if t is not None and t.is_cuda:
        torch.cuda.synchronize(t.device)


def copy_input(t: Optional[Tensor], dtype: Optional[torch.dtype], leaf: bool,
               grad: bool) -> Optional[Tensor]:
    """A detached copy of one input on its own device (in ``dtype`` when given and ``t``
    is floating): a leaf that requires grad when ``leaf and grad``."""
    if t is None:
        return None
    out = t.detach()
    if dtype is not None and out.is_floating_point():
        out = out.to(dtype)
    out = out.clone()
    return out.requires_grad_(True) if leaf and grad and out.is_floating_point() else out


def cotangent(t: Tensor, via: Optional[torch.dtype] = None, seed: int = 0) -> Tensor:
    """A cotangent of size ~1 for ``t``, the same for every candidate and the truth: drawn
    on the CPU from a fixed seed in float32, rounded to ``via`` first (the call's dtype, so
    a float64 truth sees exactly the cotangent a bf16 candidate sees), then moved to ``t``'s
    device and dtype. Made outside every timed region."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(t.shape, generator=g)
    if via is not None:
        out = out.to(via)
    return out.to(device=t.device, dtype=t.dtype)


@contextlib.contextmanager
def truth_mode(device: torch.device):
    """While a truth is computed: autocast off (its inputs are float64 anyway)."""
    with torch.autocast(device.type, enabled=False):
        yield


# ------------------------------------------------------------------------------ checking
def _is_grad(name: str) -> bool:
    return name.startswith("grad_")


def disagreement(ours: Results, base: Results, truth: Results, dtype: torch.dtype,
                 baseline: str) -> Optional[str]:
    """Why ``ours`` fails the 2x rule against ``truth`` (``base``: the baseline's results
    in the same dtype), or ``None`` when every tensor passes. Every tensor the truth holds
    is judged on its own; one missing, extra, misshapen or beyond its bar fails."""
    missing = [n for n, t in truth.items() if t is not None and ours.get(n) is None]
    extra = [n for n, t in ours.items() if t is not None and truth.get(n) is None]
    if missing or extra:
        what = ([f"no {', '.join(missing)}"] if missing else []) + (
            [f"{', '.join(extra)} the truth has not"] if extra else [])
        return f"returned {' and '.join(what)}"
    grads = [t for n, t in truth.items() if t is not None and _is_grad(n)]
    floor = GRAD_FLOOR * max((t.detach().abs().max().item() for t in grads if t.numel()),
                             default=0.0)
    verdicts = []
    for name, t in truth.items():
        if t is None:
            continue
        o, b = ours[name], base.get(name)
        if b is None:
            return f"the {baseline} baseline returned no {name}"
        if o.shape != t.shape:
            return f"its {name} has shape {tuple(o.shape)}, expected {tuple(t.shape)}"
        verdicts.append(agreement.judge(name, o, b, t, dtype,
                                        floor if _is_grad(name) else 0.0))
    failing = [v for v in verdicts if not v.ok]
    if failing:
        return (f"error against the float64 truth above twice the {baseline} backend's: "
                + agreement.describe(failing))
    return None


def error_text(ours: Results, truth: Results) -> str:
    """The largest relative error of any tensor against the truth, for display."""
    errors = [agreement.error(ours[n], t) for n, t in truth.items()
              if t is not None and ours.get(n) is not None and ours[n].shape == t.shape]
    return f"{max(errors):.1e}" if errors else "n/a"


# ------------------------------------------------------------------------------ timing
class CudaClock:
    """Marks are CUDA events recorded on the current stream of the current device (the
    caller holds a device guard); ``elapsed_ms`` waits for the later one."""

    def mark(self) -> object:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end)


#: Runs per sample reach about this many milliseconds (a launch-bound op of 10 us runs 100
#: times), and never more than ``MAX_ITERS``.
TARGET_MS = 1.0
MAX_ITERS = 200
SAMPLES = 5


def time_runs(runs: Dict[str, Callable[[], object]], clock=None, samples: int = SAMPLES,
              target_ms: float = TARGET_MS) -> Dict[str, float]:
    """Median milliseconds of one run of each candidate. Each run already ran once (its
    check: compiled, tuned, cotangents made); one more run per candidate sizes its
    samples; then ``samples`` rounds, candidates alternating, each sample ``n`` runs
    between two marks and nothing else."""
    clock = clock if clock is not None else CudaClock()
    iters: Dict[str, int] = {}
    for name, run in runs.items():
        start = clock.mark()
        run()
        end = clock.mark()
        once = clock.elapsed_ms(start, end)
        iters[name] = max(1, min(MAX_ITERS, math.ceil(target_ms / max(once, 1e-3))))
    per_run: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(samples):
        for name, run in runs.items():
            n = iters[name]
            start = clock.mark()
            for _ in range(n):
                run()
            end = clock.mark()
            per_run[name].append(clock.elapsed_ms(start, end) / n)
    return {name: statistics.median(xs) for name, xs in per_run.items()}
