"""When does a low-precision result agree? flash-attention's rule, for every check we run.

A bfloat16 CvT is far from the exact answer on its own: eager PyTorch's gradients in bf16
can differ from float64's by more than their own size. Comparing our bf16 result with
eager's bf16 result therefore measures bf16 noise, not our kernels. Instead both are
compared with a *truth* computed at higher precision from the same weights and inputs
(float32 for fp16/bf16, float64 for float32), and ours passes when

    error(ours, truth) <= factor * error(eager, truth) + eps[dtype]     (factor 2)

with error = max |x - truth| / max(max |truth|, floor). ``floor`` keeps tensors that are
zero in exact math (a k bias's gradient: softmax ignores a shift of a whole row) from
turning rounding noise into a huge relative error; for gradients it is 1e-3 of the largest
gradient. ``eps`` is a small absolute slack for results that are exact (or nearly) in both.

The rule needs a well-conditioned problem: where eager's own error is of order 1 (a
training BatchNorm over two values per channel, e.g. CvT-13 at 32x32 with batch 2, whose
stage-3 k/v see a 1x1 map), every low-precision result is noise and no rule can judge it.

Used by ``python/demo.py`` and the model and block benchmarks; the tests use the same rule
(``tests/conftest.py: assert_close_by_rule``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

FACTOR = 2.0
#: Slack added to the bar, relative to the truth's scale: about one rounding step of a value
#: of size 1 in float32, a quarter of one in fp16, half of one in bf16.
EPS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2.5e-4,
       torch.bfloat16: 4e-3}


def truth_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the truth is computed in: float64 for float32/float64, else float32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def error(x: torch.Tensor, truth: torch.Tensor, floor: float = 0.0) -> float:
    """max |x - truth| / max(max |truth|, floor, tiny), over the entries where the truth is
    finite; a non-finite ``x`` where the truth is finite is an infinite error."""
    x, truth = x.detach().double(), truth.detach().double()
    finite = torch.isfinite(truth)
    if not finite.any():
        return 0.0 if torch.equal(torch.isnan(x), torch.isnan(truth)) else math.inf
    diff = (x - truth)[finite]
    if not torch.isfinite(diff).all():
        return math.inf
    scale = max(truth[finite].abs().max().item(), floor, 1e-30)
    return diff.abs().max().item() / scale if diff.numel() else 0.0


@dataclass
class Verdict:
    """One tensor checked by the rule: our error, the baseline's, the bar, pass or fail."""
    name: str
    ours: float
    baseline: float
    bar: float

    @property
    def ok(self) -> bool:
        return self.ours <= self.bar

    def __str__(self) -> str:
        return (f"{self.name} {self.ours:.2e} vs eager {self.baseline:.2e} "
                f"(bar {self.bar:.2e}){'' if self.ok else ' FAIL'}")


def judge(name: str, ours: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor,
          dtype: torch.dtype, floor: float = 0.0, factor: float = FACTOR) -> Verdict:
    """``ours`` and ``baseline`` (eager PyTorch in the same ``dtype``) against ``truth``."""
    if ours.shape != truth.shape or baseline.shape != truth.shape:
        raise ValueError(f"{name}: shapes differ: ours {tuple(ours.shape)}, baseline "
                         f"{tuple(baseline.shape)}, truth {tuple(truth.shape)}")
    base = error(baseline, truth, floor)
    return Verdict(name, error(ours, truth, floor), base, factor * base + EPS[dtype])


def judge_all(name: str, ours: Sequence[Optional[torch.Tensor]],
              baseline: Sequence[Optional[torch.Tensor]],
              truth: Sequence[Optional[torch.Tensor]], dtype: torch.dtype,
              relative_floor: float = 0.0) -> Verdict:
    """The worst of several tensors (gradients, running statistics): each judged alone,
    reported as the one nearest to (or furthest past) its bar. ``relative_floor`` times the
    largest truth entry over all tensors is every tensor's floor (1e-3 for gradients). A
    tensor the truth has and ours lacks fails."""
    if not (len(ours) == len(baseline) == len(truth)):
        raise ValueError(f"{name}: {len(ours)} tensors, baseline {len(baseline)}, truth "
                         f"{len(truth)}")
    present = [t for t in truth if t is not None]
    if not present:
        return Verdict(name, 0.0, 0.0, 0.0)
    floor = relative_floor * max(t.detach().abs().max().item() for t in present)
    worst: Optional[Verdict] = None
    for o, b, t in zip(ours, baseline, truth):
        if t is None:
            continue
        if o is None or b is None:
            v = Verdict(name, math.inf if o is None else 0.0, math.inf if b is None else 0.0,
                        0.0)
        else:
            v = judge(name, o, b, t, dtype, floor)
        if worst is None or _margin(v) > _margin(worst):
            worst = v
    assert worst is not None
    return worst


def _margin(v: Verdict) -> float:
    return v.ours / v.bar if v.bar > 0 else (math.inf if v.ours > 0 else 0.0)


def all_ok(verdicts: Iterable[Verdict]) -> bool:
    return all(v.ok for v in verdicts)


def describe(verdicts: Iterable[Verdict]) -> str:
    return "; ".join(str(v) for v in verdicts)


@contextlib.contextmanager
def no_drop_path(*models: torch.nn.Module) -> Iterator[None]:
    """Stochastic depth off while a check runs: its random masks come from ``torch.rand`` in
    the model's dtype, so a float32 truth would draw different masks than a bf16 model (the
    generator yields different numbers per dtype). Drop path is stock code, not ours; the
    check is about the rest. Any module with a float ``drop_prob`` (ours, timm's, Hugging
    Face's) is set to 0 and restored afterwards."""
    saved: List = []
    for model in models:
        for m in model.modules():
            p = getattr(m, "drop_prob", None)
            if isinstance(p, float):
                saved.append((m, p))
                m.drop_prob = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.drop_prob = p


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off in cuBLAS and cuDNN while a float32 truth is computed on a GPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


__all__ = ["EPS", "FACTOR", "Verdict", "all_ok", "describe", "error", "exact_float32",
           "judge", "judge_all", "no_drop_path", "truth_dtype"]
