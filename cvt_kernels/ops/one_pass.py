"""Inference-time one-pass attention: the q projection and, for one head, the output
projection inside the Triton attention kernel.

See :mod:`cvt_kernels.backends.triton.one_pass` for the kernel. :func:`one_pass_reasons`
says why a call cannot take this path (the caller then runs the separate ops);
:func:`run_one_pass` runs it through the ``cvt_kernels::one_pass_attention`` custom op.

Whether fusing pays depends on the shape and the GPU (with several heads the fused kernel
rebuilds each query tile's conv + BN once per head; the separate kernels write q and read it
back), so
``CVT_KERNELS_ONE_PASS`` picks the policy: ``auto`` (default) makes the two paths two
candidates of the dispatcher (:func:`run_faster`, ``cvt_kernels.dispatch``;
:func:`decisions`): wherever the triton backend can run the q projection and the attention,
the first eligible call of each shape on a GPU checks both against a float64 truth, times
them and keeps the faster correct one; ``1`` always fuses; ``0`` never does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import backends, dispatch, trials
from ..backends.base import uses_batch_stats
from ._checks import autocast_dtype, eager_call, no_autocast
from ._register import forward_op

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


def _one_pass(x: Tensor, conv_weight: Tensor, running_mean: Tensor, running_var: Tensor,
              bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], q_weight: Tensor,
              q_bias: Optional[Tensor], k: Tensor, v: Tensor, proj_weight: Optional[Tensor],
              proj_bias: Optional[Tensor], h: int, w: int, num_heads: int, scale: float,
              with_cls_token: bool, eps: float) -> Tensor:
    from ..backends.triton.one_pass import one_pass_attention

    # On x's GPU, not the current one (a model on cuda:1): Triton launches on the current.
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with no_autocast(x), guard:
        return one_pass_attention(x, h, w, conv_weight, running_mean, running_var, eps,
                                  bn_weight, bn_bias, q_weight, q_bias, k, v, num_heads, scale,
                                  with_cls_token, proj_weight, proj_bias)


def _one_pass_fake(x, conv_weight, running_mean, running_var, bn_weight, bn_bias, q_weight,
                   q_bias, k, v, proj_weight, proj_bias, h, w, num_heads, scale,
                   with_cls_token, eps):
    return x.new_empty((x.shape[0], x.shape[1], k.shape[2]))


_one_pass_op = forward_op("one_pass_attention", _one_pass, _one_pass_fake).op


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
    # The one-pass kernel is the triton backend's q projection and attention in one: it
    # is a candidate where that backend can run both (a forced other backend excludes it).
    forced = backends.forced_backend()
    if forced is not None and forced != "triton":
        return [f"the {forced} backend is forced"]
    q_reasons = _triton_reasons(lambda b: b.conv_projection_reasons(x, cfg, training),
                                ("projection", x.device, x.dtype, cfg, training))
    reasons += [f"the triton backend cannot run the q projection: {r}" for r in q_reasons]
    width = params.proj_weight.shape[0]

    def attention_reasons(b) -> List[str]:  # asked once per key: the stand-in only then
        stand_in = x.new_empty((x.shape[0], 1, width))  # q's dtype, device and width
        return b.attention_reasons(stand_in, stand_in, stand_in, num_heads, dropout_p)

    a_reasons = _triton_reasons(attention_reasons,
                                ("attention", x.device, x.dtype, width, num_heads, dropout_p))
    reasons += [f"the triton backend cannot run the attention: {r}" for r in a_reasons]
    return reasons


_TRITON_REASONS: Dict[tuple, Tuple[str, ...]] = {}


def _triton_reasons(ask, key: tuple) -> Tuple[str, ...]:
    """The triton backend's reasons for one call (remembered per key in eager mode; the
    reasons depend on what the key holds and on whether triton is forced)."""
    key = key + (backends.forced_backend(),)
    remember = not torch.compiler.is_compiling()
    if remember and key in _TRITON_REASONS:
        return _TRITON_REASONS[key]
    try:
        backend = backends.get_backend("triton")
    except backends.BackendUnavailableError as exc:
        reasons: Tuple[str, ...] = (str(exc),)
    else:
        unavailable = backend.unavailable_reason()
        reasons = (unavailable,) if unavailable is not None else tuple(ask(backend))
    if remember:
        _TRITON_REASONS[key] = reasons
    return reasons


def run_one_pass(x: Tensor, h: int, w: int, q_projection: tuple, k: Tensor, v: Tensor,
                 num_heads: int, scale: float, proj: nn.Linear) -> Tensor:
    """Attention output after ``proj``, for a call :func:`one_pass_reasons` accepted."""
    params, cfg, _, _, eps = q_projection
    fuse_proj = num_heads == 1
    # Forward-only (no grad): the eager path needs no autograd.Function, just the function.
    # The kernel reads the running statistics as they are (rstd from running_var and eps).
    op = _one_pass if eager_call(x, k, v, params.conv_weight, proj.weight) else _one_pass_op
    out = op(x, params.conv_weight, params.running_mean, params.running_var, params.bn_weight,
             params.bn_bias, params.proj_weight, params.proj_bias, k, v,
             proj.weight if fuse_proj else None, proj.bias if fuse_proj else None, h, w,
             num_heads, scale, cfg.with_cls_token, eps)
    return out if fuse_proj else torch.nn.functional.linear(out, proj.weight, proj.bias)


@dataclass(frozen=True)
class Decision:
    """What ``auto`` chose for one shape, and why (a view of the dispatcher's decision)."""
    path: str                      # "one-pass" or "separate"
    one_pass_ms: Optional[float]   # median time of one call (None: not timed)
    separate_ms: Optional[float]
    why: str


_OP = "one_pass"
_PATHS = ("separate", "one-pass")  # the fixed order's choice first


def decisions() -> Dict[tuple, Decision]:
    """The ``auto`` choices made (or loaded) in this process, keyed by (device, dtype, x
    shape, h, w, heads, width, k shape)."""
    out = {}
    for (op, parts, *_), d in dispatch.remembered().items():
        if op != _OP:
            continue
        p = dict(parts)
        key = (p["device"], p["dtype"], p["x"], p["h"], p["w"], p["heads"], p["width"], p["k"])
        why = "; ".join(d.excluded.values()) or ("faster" if d.times_ms else d.source)
        out[key] = Decision(d.choice, d.times_ms.get("one-pass"), d.times_ms.get("separate"),
                            why)
    return out


def decision_parts(x: Tensor, h: int, w: int, num_heads: int, width: int,
                   k_shape: torch.Size) -> tuple:
    """The dispatcher's signature of a :func:`run_faster` call."""
    return (("device", x.device), ("dtype", x.dtype), ("x", x.shape), ("h", h), ("w", w),
            ("heads", num_heads), ("width", width), ("k", k_shape))


def kept_path(x: Tensor, h: int, w: int, num_heads: int, width: int,
              k_shape: torch.Size) -> Optional[str]:
    """The path :func:`run_faster` takes for this call now, without deciding anything:
    ``"one-pass"`` under ``CVT_KERNELS_ONE_PASS=1``, else the dispatcher's remembered
    decision (``None``: none yet)."""
    if mode() == "1":
        return "one-pass"
    return dispatch.kept(_OP, decision_parts(x, h, w, num_heads, width, k_shape), _PATHS,
                         x.device)


def run_faster(x: Tensor, h: int, w: int, num_heads: int, width: int, k: Tensor,
               one_pass: Callable[[], Tensor], separate: Callable[[], Tensor],
               truth: Callable[[], Tensor]) -> Tensor:
    """The attention output by the one-pass kernel or the separate kernels, as
    ``CVT_KERNELS_ONE_PASS`` says (for a call :func:`one_pass_reasons` accepted). Under
    ``auto`` the dispatcher decides per shape (``cvt_kernels.dispatch``), one-pass and
    separate being two candidates like the backends of an op: on the first call of a shape
    on a GPU both run, are checked against ``truth()`` (the attention in float64 on the
    torch backend) by the 2x rule and timed, and the faster correct one serves every later
    call; elsewhere an earlier decision for the shape serves, else the separate kernels."""
    if mode() == "1":
        return one_pass()
    parts = decision_parts(x, h, w, num_heads, width, k.shape)
    paths = {"one-pass": one_pass, "separate": separate}
    outputs: Dict[str, Tensor] = {}

    def prepare(path: str, is_truth: bool) -> trials.Run:
        def forward():
            out = truth() if is_truth else paths[path]()
            if not is_truth:
                outputs[path] = out
            return out

        return trials.Run(contextlib.nullcontext, forward, (), (), ("out",), False, x.dtype,
                          candidate="truth" if is_truth else path)

    decision = dispatch.decide(_OP, parts, _PATHS, prepare, "separate", x.dtype, x.device)
    if decision.choice in outputs:  # measured just now: its last output is this call's
        return outputs[decision.choice]
    return paths[decision.choice]()
