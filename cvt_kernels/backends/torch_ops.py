"""The ``torch`` backend: the fastest composition of stock PyTorch ops we know.

It is the default on CPU, the fallback for every call a kernel backend declines, and the
"best hand-assembled PyTorch" baseline of the benchmarks. Being composite, autograd and
``torch.compile`` see straight through it (see ``base.py``).

What makes it faster than the reference module:

* tokens are viewed as a channels-last map (no NCHW copy) for the depthwise conv;
* in eval mode BatchNorm is folded into the depthwise conv's weight and bias (one op; the
  folded pair is cached while nothing changes, see :func:`folded_conv`);
* attention is ``F.scaled_dot_product_attention`` with the explicit CvT scale, so no
  score matrix is materialized where a fused SDPA kernel exists.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (Backend, ProjectionConfig, ProjectionParams, TensorVersionCache,
                   bn_momentum_factor, uses_batch_stats)


_FOLDED = TensorVersionCache()  # conv_weight -> (weight, shift)


def folded_conv(params: ProjectionParams, eps: float, dtype: torch.dtype
                ) -> Tuple[Tensor, Tensor]:
    """The running-stat BatchNorm folded into the depthwise conv: ``(weight, bias)`` of one
    conv. Without autograd in eager mode the pair is cached per ``conv_weight`` and rebuilt
    when any of the five tensors changes: nine small launches fewer per projection and call.
    With autograd (fine-tuning with BN frozen) it is rebuilt every call, so gradients reach
    the parameters."""
    def compute():
        scale = torch.rsqrt(params.running_var + eps)
        if params.bn_weight is not None:
            scale = scale * params.bn_weight
        shift = -params.running_mean * scale
        if params.bn_bias is not None:
            shift = shift + params.bn_bias
        weight = params.conv_weight * scale.to(params.conv_weight.dtype)[:, None, None, None]
        return weight, shift.to(dtype)

    tensors = (params.conv_weight, params.bn_weight, params.bn_bias, params.running_mean,
               params.running_var)
    return _FOLDED.get(params.conv_weight, tensors, (float(eps), dtype), compute,
                       enabled=not torch.is_grad_enabled())


class TorchBackend(Backend):
    name = "torch"
    composite = True

    def conv_projection(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                        cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                        eps: float) -> Tensor:
        if cfg.with_cls_token:
            cls, rest = x[:, :1], x[:, 1:]
        else:
            cls, rest = None, x
        # (B, h*w, C) -> (B, C, h, w): a view with channels-last strides when rows are dense.
        x_map = rest.transpose(1, 2).unflatten(2, (h, w))
        channels = x.shape[2]
        if cfg.method == "dw_bn":
            if uses_batch_stats(training, params):
                y = F.conv2d(x_map, params.conv_weight, None, cfg.stride, cfg.padding, 1,
                             channels)
                factor = 0.0
                if training and params.running_mean is not None:
                    if params.num_batches_tracked is not None:
                        params.num_batches_tracked.add_(1)
                    factor = bn_momentum_factor(momentum, params.num_batches_tracked)
                # BatchNorm over dim 0 of the (B*h'*w', C) token matrix: the statistics of
                # BatchNorm2d over (B, h', w'). Not F.batch_norm on the 4-D map: PyTorch's
                # CPU batch_norm backward returns wrong gradients at batch 1 when the
                # incoming gradient is the channels-last-like view this layout produces
                # (seen with torch 2.13; see tests/test_pytorch_bugs.py).
                batch, _, ho, wo = y.shape
                tokens = y.flatten(2).transpose(1, 2).reshape(batch * ho * wo, channels)
                tokens = F.batch_norm(tokens, params.running_mean, params.running_var,
                                      params.bn_weight, params.bn_bias, True, factor, eps)
                t = tokens.view(batch, ho * wo, channels)
                if cls is not None:
                    t = torch.cat([cls, t], dim=1)
                return F.linear(t, params.proj_weight, params.proj_bias)
            else:
                weight, shift = folded_conv(params, eps, x.dtype)
                y = F.conv2d(x_map, weight, shift, cfg.stride, cfg.padding, 1, channels)
        elif cfg.method == "avg":
            y = F.avg_pool2d(x_map, cfg.kernel_size, cfg.stride, cfg.padding, ceil_mode=True)
        else:
            y = x_map
        t = y.flatten(2).transpose(1, 2)
        if cls is not None:
            t = torch.cat([cls, t], dim=1)
        return F.linear(t, params.proj_weight, params.proj_bias)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                  dropout_p: float) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), dropout_p=dropout_p,
                                             scale=scale)
        return out.transpose(1, 2).flatten(2)

    # Every call: the default Support (any device, float dtype, method, dropout).
