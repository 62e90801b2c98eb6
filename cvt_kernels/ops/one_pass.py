"""Inference-time one-pass attention: the q projection and, for one head, the output
projection inside the Triton attention kernel.

See :mod:`cvt_kernels.backends.triton.one_pass` for the kernel. :func:`one_pass_reasons`
says why a call cannot take this path (the caller then runs the separate ops);
:func:`run_one_pass` runs it through the ``cvt_kernels::one_pass_attention`` custom op.

Whether fusing pays depends on the shape and the GPU (with several heads the fused kernel
rebuilds each query tile's conv + BN once per head; the separate kernels write q and read it
back), so
``CVT_KERNELS_ONE_PASS`` picks the policy: ``auto`` (default) measures both paths on the
first eligible call of each shape on a GPU and keeps the faster (:func:`run_faster`,
:func:`decisions`); ``1`` always fuses; ``0`` never does.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import backends
from ..backends.base import uses_batch_stats
from ._checks import autocast_dtype, eager_call, no_autocast
from .conv_projection import running_mean_rstd

__all__ = ["ENV", "Decision", "decisions", "enabled", "mode", "one_pass_reasons",
           "run_faster", "run_one_pass"]

ENV = "CVT_KERNELS_ONE_PASS"
MODES = ("auto", "1", "0")


def mode() -> str:
    """``CVT_KERNELS_ONE_PASS``: ``auto`` (unset), ``1`` or ``0``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(MODES)}")
    return value


def enabled() -> bool:
    return mode() != "0"


def _one_pass(x: Tensor, conv_weight: Tensor, mean: Tensor, rstd: Tensor,
              bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], q_weight: Tensor,
              q_bias: Optional[Tensor], k: Tensor, v: Tensor, proj_weight: Optional[Tensor],
              proj_bias: Optional[Tensor], h: int, w: int, num_heads: int, scale: float,
              with_cls_token: bool) -> Tensor:
    from ..backends.triton.one_pass import one_pass_attention

    with no_autocast(x):
        return one_pass_attention(x, h, w, conv_weight, mean, rstd, bn_weight, bn_bias,
                                  q_weight, q_bias, k, v, num_heads, scale, with_cls_token,
                                  proj_weight, proj_bias)


@torch.library.custom_op("cvt_kernels::one_pass_attention", mutates_args=())
def _one_pass_op(x: Tensor, conv_weight: Tensor, mean: Tensor, rstd: Tensor,
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], q_weight: Tensor,
                 q_bias: Optional[Tensor], k: Tensor, v: Tensor, proj_weight: Optional[Tensor],
                 proj_bias: Optional[Tensor], h: int, w: int, num_heads: int, scale: float,
                 with_cls_token: bool) -> Tensor:
    return _one_pass(x, conv_weight, mean, rstd, bn_weight, bn_bias, q_weight, q_bias, k, v,
                     proj_weight, proj_bias, h, w, num_heads, scale, with_cls_token)


@_one_pass_op.register_fake
def _(x, conv_weight, mean, rstd, bn_weight, bn_bias, q_weight, q_bias, k, v, proj_weight,
      proj_bias, h, w, num_heads, scale, with_cls_token):
    return x.new_empty((x.shape[0], x.shape[1], k.shape[2]))


def one_pass_reasons(x: Tensor, projections: List[tuple], num_heads: int, dropout_p: float,
                     proj: nn.Linear) -> List[str]:
    """Why ``fused_attention``'s arguments cannot take the one-pass path (empty: they can).
    ``projections`` as in :func:`cvt_kernels.modules.fused_attention`."""
    if not enabled():
        return [f"{ENV} is 0"]
    reasons = []
    if torch.is_grad_enabled():
        reasons.append("gradients are enabled (the one-pass kernel is forward-only)")
    if autocast_dtype(x) is not None:
        reasons.append("autocast is on")
    params, cfg, training = projections[0][:3]
    if cfg.method != "dw_bn" or cfg.stride != 1:
        reasons.append(f"q projection {cfg.method!r} with stride {cfg.stride}: the kernel "
                       f"builds q with a stride-1 dw_bn projection")
    elif uses_batch_stats(training, params):
        reasons.append("BatchNorm uses batch statistics (training mode)")
    if dropout_p > 0.0:
        reasons.append("attention dropout")
    head_dim = params.proj_weight.shape[0] // num_heads
    if head_dim > 64:  # cvt_kernels.backends.triton.one_pass.MAX_HEAD_DIM (no triton import)
        reasons.append(f"head_dim {head_dim}: the one-pass kernel ships configs up to 64")
    if reasons:
        return reasons
    # The separate ops would run on the triton backend, else no fusion.
    q_backend = _chosen(lambda b: b.conv_projection_reasons(x, cfg, training),
                        ("projection", x.device, x.dtype, cfg, training))
    if q_backend != "triton":
        reasons.append(f"the q projection runs on the {q_backend} backend, not triton")
    width = params.proj_weight.shape[0]
    stand_in = x.new_empty((x.shape[0], 1, width))  # q's dtype, device and width
    attn_backend = _chosen(lambda b: b.attention_reasons(stand_in, stand_in, stand_in,
                                                         num_heads, dropout_p),
                           ("attention", x.device, x.dtype, width, num_heads, dropout_p))
    if attn_backend != "triton":
        reasons.append(f"attention runs on the {attn_backend} backend, not triton")
    return reasons


def _chosen(ask, key: tuple) -> str:
    try:
        return backends.select("one_pass", ask, key=key).name
    except backends.BackendUnavailableError as e:  # a forced backend that cannot run it
        return f"forced ({e})"


def run_one_pass(x: Tensor, h: int, w: int, q_projection: tuple, k: Tensor, v: Tensor,
                 num_heads: int, scale: float, proj: nn.Linear) -> Tensor:
    """Attention output after ``proj``, for a call :func:`one_pass_reasons` accepted."""
    params, cfg, _, _, eps = q_projection
    mean, rstd = running_mean_rstd(params, x.dtype, eps)
    fuse_proj = num_heads == 1
    # Forward-only (no grad): the eager path needs no autograd.Function, just the function.
    op = _one_pass if eager_call(x, k, v, params.conv_weight, proj.weight) else _one_pass_op
    out = op(x, params.conv_weight, mean, rstd, params.bn_weight, params.bn_bias,
                       params.proj_weight, params.proj_bias, k, v,
                       proj.weight if fuse_proj else None,
                       proj.bias if fuse_proj else None, h, w, num_heads, scale,
                       cfg.with_cls_token)
    return out if fuse_proj else torch.nn.functional.linear(out, proj.weight, proj.bias)


@dataclass(frozen=True)
class Decision:
    """What ``auto`` chose for one shape, and why."""
    path: str                      # "one-pass" or "separate"
    one_pass_ms: Optional[float]   # median time of one call (None: not timed)
    separate_ms: Optional[float]
    why: str


_DECISIONS: Dict[tuple, Decision] = {}
_DECIDE_LOCK = threading.Lock()
_TIMING_REPS = 7
# Largest |one-pass - separate| / max|separate| accepted on the first call of a shape: both
# paths round q differently, so this catches a broken kernel, not the last bits (the tests
# check those against the reference).
_AGREEMENT = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def decisions() -> Dict[tuple, Decision]:
    """The ``auto`` choices made in this process, keyed by (device, dtype, x shape, h, w,
    heads, width, k shape)."""
    return dict(_DECISIONS)


def run_faster(x: Tensor, h: int, w: int, num_heads: int, width: int, k: Tensor,
               one_pass: Callable[[], Tensor], separate: Callable[[], Tensor]) -> Tensor:
    """The attention output by the one-pass kernel or the separate kernels, as
    ``CVT_KERNELS_ONE_PASS`` says (for a call :func:`one_pass_reasons` accepted). Under
    ``auto`` a shape seen for the first time on a GPU, outside ``torch.compile`` tracing
    and CUDA-graph capture, runs both (their outputs must agree), times both and keeps the
    faster for every later call of that shape; where it cannot measure it runs the separate
    kernels unless that shape was decided before."""
    if mode() == "1":
        return one_pass()
    if torch.compiler.is_compiling():
        return separate()  # a trace must not time anything; the graph keeps the separate ops
    key = (x.device, x.dtype, tuple(x.shape), h, w, num_heads, width, tuple(k.shape))
    decision = _DECISIONS.get(key)
    if decision is None and _can_measure(x):
        with _DECIDE_LOCK:
            decision = _DECISIONS.get(key)
            if decision is None:
                decision, out = _decide(x.dtype, one_pass, separate)
                _DECISIONS[key] = decision
                return out
    if decision is not None and decision.path == "one-pass":
        return one_pass()
    return separate()


def _can_measure(x: Tensor) -> bool:
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _decide(dtype: torch.dtype, one_pass: Callable[[], Tensor],
            separate: Callable[[], Tensor]) -> Tuple[Decision, Tensor]:
    reference = separate()

    def declined(why: str) -> Tuple[Decision, Tensor]:
        warnings.warn(f"cvt_kernels: {why}; using the separate kernels for this shape",
                      RuntimeWarning, stacklevel=5)
        return Decision("separate", None, None, why), reference

    try:
        fused = one_pass()
    except Exception as exc:  # a kernel that cannot compile here must not fail the model
        return declined(f"the one-pass kernel failed ({type(exc).__name__}: {exc})")
    error = _relative_error(fused, reference)
    tolerance = _AGREEMENT.get(dtype, 1e-6)
    if not error <= tolerance:
        return declined(f"the one-pass output differs from the separate kernels' by "
                        f"{error:.2e} (relative to the largest value; tolerance "
                        f"{tolerance:.0e}): please report this as a bug")
    one_pass_ms, separate_ms = _time_pair(one_pass, separate)
    if one_pass_ms < separate_ms:
        return Decision("one-pass", one_pass_ms, separate_ms, "faster"), fused
    return Decision("separate", one_pass_ms, separate_ms, "faster"), reference


def _relative_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| over the finite entries of ``b``; infinite where NaN/Inf sit in
    different places (NaN and Inf inputs propagate the same way through both paths)."""
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return math.inf
    a, b = a[finite].double(), b[finite].double()
    if b.numel() == 0:
        return 0.0
    scale, error = b.abs().max().item(), (a - b).abs().max().item()
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


def _time_pair(first: Callable[[], Tensor], second: Callable[[], Tensor]) -> Tuple[float, float]:
    """Median milliseconds of one call of each, measured alternately on the current stream
    (both already ran once: kernels compiled and autotuned)."""
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(_TIMING_REPS):
        for fn, out in zip((first, second), times):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    return statistics.median(times[0]), statistics.median(times[1])
