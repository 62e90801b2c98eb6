"""Inference-time one-pass attention (``CVT_KERNELS_ONE_PASS=1``): the q projection and, for
one head, the output projection inside the Triton attention kernel.

See :mod:`cvt_kernels.backends.triton.one_pass` for the kernel. :func:`one_pass_reasons`
says why a call cannot take this path (the caller then runs the separate ops);
:func:`run_one_pass` runs it through the ``cvt_kernels::one_pass_attention`` custom op.
Opt-in until a GPU benchmark shows it is faster than the separate kernels.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import backends
from ..backends.base import uses_batch_stats
from ._checks import autocast_dtype, no_autocast
from .conv_projection import running_mean_rstd

__all__ = ["ENV", "enabled", "one_pass_reasons", "run_one_pass"]

ENV = "CVT_KERNELS_ONE_PASS"


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


@torch.library.custom_op("cvt_kernels::one_pass_attention", mutates_args=())
def _one_pass_op(x: Tensor, conv_weight: Tensor, mean: Tensor, rstd: Tensor,
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], q_weight: Tensor,
                 q_bias: Optional[Tensor], k: Tensor, v: Tensor, proj_weight: Optional[Tensor],
                 proj_bias: Optional[Tensor], h: int, w: int, num_heads: int, scale: float,
                 with_cls_token: bool) -> Tensor:
    from ..backends.triton.one_pass import one_pass_attention

    with no_autocast(x):
        return one_pass_attention(x, h, w, conv_weight, mean, rstd, bn_weight, bn_bias,
                                  q_weight, q_bias, k, v, num_heads, scale, with_cls_token,
                                  proj_weight, proj_bias)


@_one_pass_op.register_fake
def _(x, conv_weight, mean, rstd, bn_weight, bn_bias, q_weight, q_bias, k, v, proj_weight,
      proj_bias, h, w, num_heads, scale, with_cls_token):
    return x.new_empty((x.shape[0], x.shape[1], k.shape[2]))


def one_pass_reasons(x: Tensor, projections: List[tuple], num_heads: int, dropout_p: float,
                     proj: nn.Linear) -> List[str]:
    """Why ``fused_attention``'s arguments cannot take the one-pass path (empty: they can).
    ``projections`` as in :func:`cvt_kernels.modules.fused_attention`."""
    if not enabled():
        return [f"{ENV} is not 1"]
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
    q_backend = _chosen(lambda b: b.conv_projection_reasons(x, cfg, training))
    if q_backend != "triton":
        reasons.append(f"the q projection runs on the {q_backend} backend, not triton")
    width = params.proj_weight.shape[0]
    stand_in = x.new_empty((x.shape[0], 1, width))  # q's dtype, device and width
    attn_backend = _chosen(lambda b: b.attention_reasons(stand_in, stand_in, stand_in,
                                                         num_heads, dropout_p))
    if attn_backend != "triton":
        reasons.append(f"attention runs on the {attn_backend} backend, not triton")
    return reasons


def _chosen(ask) -> str:
    try:
        return backends.select("one_pass", ask).name
    except backends.BackendUnavailableError as e:  # a forced backend that cannot run it
        return f"forced ({e})"


def run_one_pass(x: Tensor, h: int, w: int, q_projection: tuple, k: Tensor, v: Tensor,
                 num_heads: int, scale: float, proj: nn.Linear) -> Tensor:
    """Attention output after ``proj``, for a call :func:`one_pass_reasons` accepted."""
    params, cfg, _, _, eps = q_projection
    mean, rstd = running_mean_rstd(params, x.dtype, eps)
    fuse_proj = num_heads == 1
    out = _one_pass_op(x, params.conv_weight, mean, rstd, params.bn_weight, params.bn_bias,
                       params.proj_weight, params.proj_bias, k, v,
                       proj.weight if fuse_proj else None,
                       proj.bias if fuse_proj else None, h, w, num_heads, scale,
                       cfg.with_cls_token)
    return out if fuse_proj else torch.nn.functional.linear(out, proj.weight, proj.bias)
