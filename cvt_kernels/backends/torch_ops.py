"""The ``torch`` backend: the fastest composition of stock PyTorch ops we know.

It is the default on CPU, the fallback for every call a kernel backend declines, and the
"best hand-assembled PyTorch" baseline of the benchmarks. Being composite, autograd and
``torch.compile`` see straight through it (see ``base.py``).

What makes it faster than the reference module:

* tokens are viewed as a channels-last map (no NCHW copy) for the depthwise conv, and the
  class token split off in one ``split`` (one ``cat`` in backward);
* BatchNorm runs on the conv's output, in eval mode too (one launch): with autograd viewed
  as a ``(tokens, channels)`` matrix (a view of cuDNN's and oneDNN's channels-last output
  for this input, and the layout PyTorch's CPU backward gets right at batch 1), without it
  on the 4-D map in whatever layout the conv returned; nothing derived from the weights is
  kept between calls, so no write to them can leave a stale copy
  (``tests/test_eval_caches.py``);
* the MLP's GEMMs carry its bias, QuickGELU's constants and the residual (see
  :meth:`TorchBackend.mlp`);
* attention is ``F.scaled_dot_product_attention`` with the explicit CvT scale, so no
  score matrix is materialized where a fused SDPA kernel exists.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._double_backward import guard_sdpa
from .reference_math import layer_norm_reference
from .base import (Backend, ProjectionConfig, ProjectionParams, bn_momentum_factor,
                   eager_call, uses_batch_stats)


class TorchBackend(Backend):
    name = "torch"
    composite = True

    def conv_projection(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                        cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                        eps: float) -> Tensor:
        if cfg.method == "linear":
            # cat(class token, tokens) would be x itself.
            return linear(x, params.proj_weight, params.proj_bias)
        if cfg.with_cls_token:
            # One split, not two slices: its backward is one cat, where two slices cost a
            # zero-filled slice_backward each and an add (60 launches in a CvT-13 step).
            cls, rest = x.split([1, x.shape[1] - 1], dim=1)
        else:
            cls, rest = None, x
        # (B, h*w, C) -> (B, C, h, w): a view with channels-last strides when rows are dense.
        x_map = rest.transpose(1, 2).unflatten(2, (h, w))
        channels = x.shape[2]
        if cfg.method == "dw_bn":
            y = F.conv2d(x_map, params.conv_weight, None, cfg.stride, cfg.padding, 1, channels)
            batch_stats = uses_batch_stats(training, params)
            factor = 0.0
            if training and params.running_mean is not None:
                if params.num_batches_tracked is not None:
                    params.num_batches_tracked.add_(1)
                factor = bn_momentum_factor(momentum, params.num_batches_tracked)
            # Eval mode too: one launch, where folding BatchNorm into the conv's weight and
            # bias every call takes seven small ones, and a fold kept across calls goes
            # stale (writes through .data and batch_norm's own statistics update bump no
            # version counter; tests/test_eval_caches.py).
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad
                for t in (x, params.conv_weight, params.bn_weight, params.bn_bias))
            if grad:
                # BatchNorm over dim 0 of the (B*h'*w', C) token matrix: the statistics of
                # BatchNorm2d over (B, h', w'). Not F.batch_norm on the 4-D map: PyTorch's
                # CPU batch_norm backward returns wrong gradients at batch 1 when the
                # incoming gradient is the channels-last-like view this layout produces
                # (seen with torch 2.13, train and eval; see tests/test_pytorch_bugs.py).
                # The matrix is a view of a channels-last conv output (cuDNN's and
                # oneDNN's for this channels-last input), a copy of an NCHW one.
                batch, _, ho, wo = y.shape
                tokens = y.flatten(2).transpose(1, 2).reshape(batch * ho * wo, channels)
                tokens = F.batch_norm(tokens, params.running_mean, params.running_var,
                                      params.bn_weight, params.bn_bias, batch_stats, factor,
                                      eps)
                t = tokens.view(batch, ho * wo, channels)
            else:
                # No backward, so no bug: BatchNorm on the 4-D map, in whatever layout the
                # conv returned (it keeps it), and the token view of that; the class
                # token's cat reads either layout, so no layout costs a copy there.
                y = F.batch_norm(y, params.running_mean, params.running_var,
                                 params.bn_weight, params.bn_bias, batch_stats, factor, eps)
                t = y.flatten(2).transpose(1, 2)
        else:  # "avg"
            y = F.avg_pool2d(x_map, cfg.kernel_size, cfg.stride, cfg.padding, ceil_mode=True)
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
        return guard_sdpa(out).transpose(1, 2).flatten(2)

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
          by 1/1.702 (:func:`_quick_gelu_weights`), computed every call (one elementwise
          pass over the ``8 C^2`` weight elements against the GEMMs' ``16 N C^2`` flops for
          ``N`` rows; a copy kept across calls would go stale after writes through
          ``.data``, which bump no version counter);
        * with autograd: QuickGELU(z) = silu(1.702 z) / 1.702 with the constants on the
          weights the same way, so the backward multiplies only weight-sized gradients
          (one small launch per weight: four launches with the forward's foreach). With
          them in the GEMMs' ``alpha``/``beta`` instead, autograd multiplies fc1's bias and
          input gradients and fc2's input gradient, all activation-sized (five launches):
          2.9 GB more per CvT-13 224 b64 bf16 training step (``benchmarks.step_cost``).
          fc1's ``beta`` is 1, so CUDA's addmm can fuse the bias (cuBLASLt epilogue)
          instead of first copying it into the output;
        * otherwise (no autograd: float64, other devices, tracing): both factors in the
          GEMMs' ``alpha``/``beta``, nothing scaled or stored, one launch fewer than the
          weights' multiply (on CUDA, addmm with ``beta`` != 1 copies the broadcast bias
          into its output first: a launch and an output-sized write the count above does
          not see).

        The residual is accumulated by the second GEMM into ``residual + b2``.

        Rounding: the activation's argument is rounded differently from the reference's
        (``round(1.702 round(z))`` without autograd; with it, ``1.702 W1`` and ``W2 /
        1.702`` are rounded in the weights' dtype, a float32 master copy under autocast).
        ``tests/test_block.py`` and ``tests/test_torch_backend_cost.py`` check outputs and
        gradients against a float64 truth by the 2x rule, in float32 and bfloat16.
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
        if act == "gelu":
            h = F.gelu(F.linear(x2, fc1_weight, fc1_bias))
            return _linear_add(h, fc2_weight, fc2_bias, r2).reshape(*lead, c_out)
        if act != "quick_gelu":
            raise ValueError(f"act: expected 'quick_gelu' or 'gelu', got {act!r}")
        if grad:
            w1, b1, w2 = _quick_gelu_weights(fc1_weight, fc1_bias, fc2_weight)
            h = F.silu(F.linear(x2, w1, b1))
            return _linear_add(h, w2, fc2_bias, r2).reshape(*lead, c_out)
        alpha = QUICK_GELU_ALPHA
        if fc1_bias is not None:
            h = torch.addmm(fc1_bias, x2, fc1_weight.t(), beta=alpha, alpha=alpha)
        else:
            h = torch.mm(x2, fc1_weight.t()).mul_(alpha)
        h = F.silu(h, inplace=True)
        return _linear_add(h, fc2_weight, fc2_bias, r2, 1.0 / alpha).reshape(*lead, c_out)

    def layer_norm(self, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
        # PyTorch's native LayerNorm already keeps half-precision activations in their
        # dtype and computes statistics and affine in float32 (a float32 affine may come
        # with them): the reference's casts around it are what this saves. No stock op
        # fuses the add; the fused block avoids it where it can (residual in a GEMM).
        if cpu_half_affine_grads(x, weight, bias):
            # PyTorch's CPU layer_norm backward sums a half-precision input's weight and
            # bias gradients in that precision (bfloat16, 4096 rows: ~8% off; torch 2.11
            # and 2.13; tests/test_pytorch_bugs.py): the reference's float32 round trip.
            y, s = layer_norm_reference(x, weight, bias, eps, residual)
            return y, (None if residual is None else s)
        s = x if residual is None else x + residual
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
        return y, (None if residual is None else s)


def cpu_half_affine_grads(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
                          ) -> bool:
    """Whether a layer norm of ``x`` is a CPU half-precision one that autograd will ask for
    the affine's gradients of (the case PyTorch's CPU kernel sums in half precision)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
            and torch.is_grad_enabled()
            and any(p is not None and p.requires_grad for p in (weight, bias)))


QUICK_GELU_ALPHA = 1.702


def _quick_gelu_weights(w1: Tensor, b1: Optional[Tensor], w2: Tensor
                        ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(1.702 W1, 1.702 b1, W2 / 1.702)`` (``b1`` may be ``None``): one foreach launch;
    its backward is one weight-sized multiply per tensor."""
    a = QUICK_GELU_ALPHA
    if b1 is None:
        w1, w2 = torch._foreach_mul([w1, w2], [a, 1.0 / a])
        return w1, None, w2
    w1, b1, w2 = torch._foreach_mul([w1, b1, w2], [a, a, 1.0 / a])
    return w1, b1, w2


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
        w1, b1, w2 = _quick_gelu_weights(w1, b1, w2)
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
        if x.dim() > 2 and not x.is_contiguous():
            # F.linear takes matmul's path for such an input: a copy, mm and a bias add_
            # (three launches). The rows made dense once (a copy only where they are not)
            # and one addmm instead.
            out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
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
    device = x.device.type
    # meta (step counting) has no autocast and stands for CUDA: it takes CUDA's path.
    amp = device != "meta" and (device not in ("cpu", "cuda")
                                or torch.is_autocast_enabled(device))
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
