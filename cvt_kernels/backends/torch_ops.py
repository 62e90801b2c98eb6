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
                   bn_momentum_factor, eager_call, uses_batch_stats)


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
                return linear(t, params.proj_weight, params.proj_bias)
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
        return linear(t, params.proj_weight, params.proj_bias)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                  dropout_p: float) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), dropout_p=dropout_p,
                                             scale=scale)
        return out.transpose(1, 2).flatten(2)

    # Every call: the default Support (any device, float dtype, method, dropout).

    # ------------------------------------------------------------------ block ops
    block_ops = ("mlp", "layer_norm")

    def mlp(self, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
            fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str,
            residual: Optional[Tensor]) -> Tensor:
        """The cheapest exact compositions we know, fastest first:

        * no autograd, float32 on a CPU with oneDNN, eager: two oneDNN GEMMs with fused
          epilogues (``mkldnn._linear_pointwise``, what Inductor emits on CPU): fc1 + bias +
          activation, fc2 + bias + residual. QuickGELU is oneDNN's ``swish`` (``z *
          sigmoid(z)``) on ``1.702 z``: fc1's weight and bias scaled by 1.702, fc2's weight
          by 1/1.702 (computed from the parameters, cached per tensor version like the
          folded BatchNorm conv; nothing is added to the module or its state_dict);
        * otherwise (autograd, float64, other devices, tracing): QuickGELU(z) =
          silu(1.702 z) / 1.702 with both factors in the GEMMs' ``alpha``/``beta`` (one
          elementwise pass instead of three, nothing folded or stored), and the residual
          accumulated by the second GEMM into ``residual + b2``.

        Rounding: one float32 rounding step of the activation's argument differs from the
        reference's (``round(1.702 round(z))`` vs ``round(1.702 z)``);
        ``tests/test_block.py`` checks the result against a float64 truth by the 2x rule.
        """
        c_out = fc2_weight.shape[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        r2 = None if residual is None else residual.reshape(-1, c_out)
        tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in tensors)
        if not grad and _onednn_fits(x, tensors):
            out = _onednn_mlp(x2.contiguous(), fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              act, None if r2 is None else r2.contiguous())
            return out.reshape(*lead, c_out)
        if act == "quick_gelu":
            alpha = QUICK_GELU_ALPHA
            if fc1_bias is not None:
                h = torch.addmm(fc1_bias, x2, fc1_weight.t(), beta=alpha, alpha=alpha)
            else:
                h = torch.mm(x2, fc1_weight.t()).mul(alpha)
            h = F.silu(h, inplace=not grad)
            scale = 1.0 / alpha
        else:
            h = F.gelu(F.linear(x2, fc1_weight, fc1_bias))
            scale = 1.0
        return _linear_add(h, fc2_weight, fc2_bias, r2, scale).reshape(*lead, c_out)

    def layer_norm(self, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
        # PyTorch's native LayerNorm already keeps half-precision activations in their
        # dtype and computes statistics and affine in float32 (a float32 affine may come
        # with them): the reference's casts around it are what this saves. No stock op
        # fuses the add; the fused block avoids it where it can (residual in a GEMM).
        s = x if residual is None else x + residual
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
        return y, (None if residual is None else s)


QUICK_GELU_ALPHA = 1.702
_FOLDED_MLP = TensorVersionCache()  # fc1_weight -> (1.702 W1, 1.702 b1, W2 / 1.702)


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_ONEDNN = _onednn_available()


def _onednn_fits(x: Tensor, tensors) -> bool:
    """The oneDNN fused-epilogue GEMMs serve: float32 on the CPU, no autocast, eager plain
    tensors (traced calls keep stock ops: Inductor fuses them itself), all one dtype."""
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and all(t is None or t.dtype == torch.float32 for t in tensors)
            # The weights as oneDNN takes them (the activations are made contiguous).
            and all(t is None or t.is_contiguous() for t in tensors[1:])
            and eager_call(*tensors) and x.numel() > 0)


def _onednn_mlp(x2: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                act: str, r2: Optional[Tensor]) -> Tensor:
    linear = torch.ops.mkldnn._linear_pointwise
    if act == "quick_gelu":
        def fold():
            a = QUICK_GELU_ALPHA
            return (w1 * a, None if b1 is None else b1 * a, w2 * (1.0 / a))

        w1, b1, w2 = _FOLDED_MLP.get(w1, (w1, b1, w2), (QUICK_GELU_ALPHA,), fold)
        h = linear(x2, w1, b1, "swish", [], "")
    else:
        h = linear(x2, w1, b1, "gelu", [], "none")  # "none": exact erf GELU
    if r2 is None:
        return linear(h, w2, b2, "none", [], "")
    return linear.binary(h, r2, w2, b2, "add")


def _linear_add(x2: Tensor, weight: Tensor, bias: Optional[Tensor], r2: Optional[Tensor],
                scale: float = 1.0) -> Tensor:
    """``r2 + scale * (x2 W^T) + b`` for 2-D ``x2``: the residual accumulated by the GEMM
    (``addmm_`` onto ``r2 + b``) instead of a separate add pass over the output."""
    if r2 is None:
        if bias is None:
            return torch.mm(x2, weight.t()).mul(scale) if scale != 1.0 else torch.mm(x2, weight.t())
        return torch.addmm(bias, x2, weight.t(), alpha=scale)
    acc = r2 + bias if bias is not None else r2.clone()
    return acc.addmm_(x2, weight.t(), alpha=scale)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear``; without autograd on a CPU in float32 by oneDNN's GEMM with the bias in
    its epilogue: about twice as fast as ``F.linear``'s MKL ``addmm`` (bias copied into the
    output first) at CvT's shapes on this project's CPU machine (one thread: 1.0 vs 2.1 ms
    for 788 x 384 x 384)."""
    tensors = (x, weight, bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if grad or not _onednn_fits(x, tensors):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                             bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear_add(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    """``residual + F.linear(x, weight, bias)`` with the add inside the GEMM: a oneDNN
    binary-add epilogue (float32 CPU, no autograd), else ``addmm_`` onto ``residual +
    bias``. Falls back to the plain sum under autocast or with mixed dtypes (eager's
    promotion rules then decide the dtype)."""
    c_out = weight.shape[0]
    tensors = (x, weight, bias, residual)
    amp = x.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(x.device.type)
    if amp or any(t is not None and t.dtype != x.dtype for t in tensors):
        return residual + F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = residual.reshape(-1, c_out)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not grad and _onednn_fits(x, tensors):
        out = torch.ops.mkldnn._linear_pointwise.binary(x2.contiguous(), r2.contiguous(),
                                                        weight, bias, "add")
    else:
        out = _linear_add(x2, weight, bias, r2)
    return out.reshape(*lead, c_out)
