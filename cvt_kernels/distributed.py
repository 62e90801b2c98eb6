"""Synchronized BatchNorm for the convolutional projections (``accelerate(model, sync_bn=True)``).

With data parallelism each process sees a slice of the batch. ``nn.SyncBatchNorm`` makes
BatchNorm use the statistics of the whole (global) batch; this module does the same for the
BatchNorm inside CvT's projections. The two-pass design needs one all-reduce between the
statistics pass and the normalize + Linear pass: the per-channel count, sum and sum of
squares, shifted by the running mean (the same on every process, so the shift cancels) to
keep the sums small. The all-reduce is differentiated by a second all-reduce of the matching
gradients (``_AllReduceSum``; ``torch.distributed.nn.functional.all_reduce`` did the same and is
deprecated), so the backward is the global BatchNorm backward, as ``nn.SyncBatchNorm``
computes it.

This path is stock PyTorch ops (a depthwise conv, the reductions, the normalize, a Linear):
it runs on any device and backend and is chosen only in training mode with more than one
process. Eval mode and single-process runs take the ordinary path; so does a model whose
process group is not initialized, as ``nn.SyncBatchNorm`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.base import (ProjectionConfig, ProjectionParams, stat_dtype, update_running_stats,
                            uses_batch_stats)

__all__ = ["sync_bn_active", "sync_conv_projection"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; the gradient of every input is the sum of the
    output gradients over the processes (each process's output feeds its own loss)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=ctx.group)
        return total, None


def sync_bn_active(group, cfg: ProjectionConfig, training: bool,
                   params: ProjectionParams) -> bool:
    """Whether a projection call must use the global statistics of ``group``."""
    if cfg.method != "dw_bn" or not uses_batch_stats(training, params):
        return False
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size(group) > 1


def sync_conv_projection(x: Tensor, h: int, w: int, params: ProjectionParams,
                         cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                         eps: float, group=None) -> Tensor:
    """:func:`cvt_kernels.ops.conv_projection` (``method="dw_bn"``, batch statistics) with
    the statistics all-reduced over ``group`` (``None``: the default group). Inputs are
    validated by the caller."""
    cls, rest = (x[:, :1], x[:, 1:]) if cfg.with_cls_token else (None, x)
    channels = x.shape[2]
    x_map = rest.transpose(1, 2).unflatten(2, (h, w))
    y = F.conv2d(x_map, params.conv_weight, None, cfg.stride, cfg.padding, 1, channels)
    batch, _, ho, wo = y.shape
    acc = stat_dtype(x.dtype)  # float32 statistics for half inputs, as BatchNorm keeps them
    tokens = y.flatten(2).transpose(1, 2).reshape(batch * ho * wo, channels).to(acc)
    if params.running_mean is not None:
        shift = params.running_mean.detach().to(acc)
    else:
        shift = tokens.new_zeros(channels)
    centered = tokens - shift
    local = torch.cat([centered.sum(0), centered.square().sum(0),
                       tokens.new_full((1,), float(tokens.shape[0]))])
    total = _AllReduceSum.apply(local, group)
    count = total[-1]
    mean_shifted = total[:channels] / count
    var = (total[channels:2 * channels] / count - mean_shifted.square()).clamp_min(0.0)
    mean = mean_shifted + shift
    if training:
        update_running_stats(params, mean.detach(), var.detach(), count.detach(), momentum)
    normalized = (tokens - mean) * torch.rsqrt(var + eps)
    if params.bn_weight is not None:
        normalized = normalized * params.bn_weight.to(acc)
    if params.bn_bias is not None:
        normalized = normalized + params.bn_bias.to(acc)
    t = normalized.to(x.dtype).view(batch, ho * wo, channels)
    if cls is not None:
        t = torch.cat([cls, t], dim=1)
    return F.linear(t, params.proj_weight, params.proj_bias)
