"""A block's training call as one autograd node: a call plan's direct path for training.

``block_forward`` in training runs eight ops (two LayerNorms, three projections, the
attention, the output projection with the first residual add, the MLP with the second),
each an ``autograd.Function`` with its op layer around the backend functions: per block
and step ~66 allocations, 8 autograd nodes and their bookkeeping, and in the backward two
adds where autograd sums the residual stream's gradients (``benchmarks.overhead --module
block``, ``benchmarks.step_cost``). Once a plan has recorded that every op of the call ran
on one kernel backend (``cvt_kernels._plan``), later calls with the same signature run
:class:`BlockTrainFunction` instead: the same backend functions with the same arguments
in the same order, and in the backward the same backend backward functions in reverse,
except that the residual stream's gradient enters each LayerNorm's backward kernel as its
``grad_sum`` (the add inside the kernel, float32 accumulation) instead of a separate add
after it, and k's and v's projection backwards add their input gradients to q's
(``conv_projection_backward_into``: in the kernels' stores on the triton backend) where
autograd would sum three. Drop path draws what ``DropPath`` draws, in its order
(``ops._drop_path``); the BatchNorm running statistics move once per call, as the ops move
them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._double_backward import once_differentiable
from .backends.base import ProjectionParams, eager_call, uses_batch_stats
from .ops import _drop_path
from .ops._checks import autocast_dtype

__all__ = ["BlockTrainFunction", "direct_train", "direct_train_for"]

# What block_forward's training call chooses, in order (the choices a plan records).
TRAIN_OPS = ("layer_norm", "conv_projection", "conv_projection", "conv_projection",
             "attention", "linear", "layer_norm", "mlp")


class _Spec(NamedTuple):
    """The non-tensor arguments of one call (what the plan's key fixed)."""
    kernels: object  # the kernel backend
    h: int
    w: int
    eps1: float
    eps2: float
    projections: tuple  # per q, k, v: (cfg, update running stats, momentum, eps)
    num_heads: int
    scale: float
    act: str
    drop_prob: float


# The tensor inputs, in order: x, norm1's (weight, bias), per projection (conv_weight,
# bn_weight, bn_bias, proj_weight, proj_bias), the output projection's (weight, bias),
# norm2's (weight, bias), fc1's and fc2's (weight, bias). The running statistics are not
# inputs: they are updated in place (no gradient), as by the ops.
_N_INPUTS = 1 + 2 + 3 * 5 + 2 + 2 + 4


def _forward(ctx, spec: _Spec, *inputs: Tensor) -> Tensor:
    kernels, h, w = spec.kernels, spec.h, spec.w
    x, w1, b1 = inputs[:3]
    proj_w, proj_b, w2, b2, fc1_w, fc1_b, fc2_w, fc2_b = inputs[18:]
    normed1, _, mean1, rstd1 = kernels.layer_norm_forward(x, None, w1, b1, spec.eps1)
    normed1, mean1, rstd1 = normed1.contiguous(), mean1.contiguous(), rstd1.contiguous()
    saved_projections, qkv = [], []
    for i, (cfg, running, momentum, eps) in enumerate(spec.projections):
        conv_w, bn_w, bn_b, p_w, p_b = inputs[3 + 5 * i:8 + 5 * i]
        # Pass 1 (batch statistics; the running statistics' update) as ops.conv_projection.
        stats_params = ProjectionParams(conv_w, None, None, *running, None, None)
        mean, rstd = kernels.conv_projection_batch_stats(
            normed1, h, w, stats_params, cfg, any(t is not None for t in running), momentum,
            eps)
        mean, rstd = mean.contiguous(), rstd.contiguous()
        params = ProjectionParams(conv_w, bn_w, bn_b, None, None, None, p_w, p_b)
        qkv.append(kernels.conv_projection_forward(normed1, h, w, params, mean, rstd, cfg,
                                                   eps).contiguous())
        saved_projections += [mean, rstd]
    out, lse = kernels.attention_forward(*qkv, spec.num_heads, spec.scale)
    out, lse = out.contiguous(), lse.contiguous()
    keep = 1.0 - spec.drop_prob
    rand_attn = _drop_path.draw(tuple(out.shape[:-1]) + (proj_w.shape[0],), out.dtype,
                                out.device, spec.drop_prob)
    x1 = kernels.linear_forward(out, proj_w, proj_b, x, drop_rand=rand_attn,
                                keep_prob=keep).contiguous()
    normed2, _, mean2, rstd2 = kernels.layer_norm_forward(x1, None, w2, b2, spec.eps2)
    normed2, mean2, rstd2 = normed2.contiguous(), mean2.contiguous(), rstd2.contiguous()
    rand_mlp = _drop_path.draw(tuple(normed2.shape[:-1]) + (fc2_w.shape[0],), normed2.dtype,
                               normed2.device, spec.drop_prob)
    y, z = kernels.mlp_forward(normed2, fc1_w, fc1_b, fc2_w, fc2_b, spec.act, x1,
                               drop_rand=rand_mlp, keep_prob=keep, store_z=True)
    ctx.spec = spec
    ctx.save_for_backward(*inputs, normed1, mean1, rstd1, *saved_projections, *qkv, out, lse,
                          rand_attn, x1, mean2, rstd2, normed2, z.contiguous(), rand_mlp)
    return y.contiguous()


def _backward(ctx, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
    spec = ctx.spec
    kernels, h, w = spec.kernels, spec.h, spec.w
    saved = ctx.saved_tensors
    inputs, rest = saved[:_N_INPUTS], saved[_N_INPUTS:]
    x, w1, b1 = inputs[:3]
    proj_w, proj_b, w2, b2, fc1_w, fc1_b, fc2_w, fc2_b = inputs[18:]
    normed1, mean1, rstd1 = rest[:3]
    stats = rest[3:9]
    q, k, v, out, lse, rand_attn, x1, mean2, rstd2, normed2, z, rand_mlp = rest[9:]
    keep = 1.0 - spec.drop_prob
    grad_y = grad_y.contiguous()
    d_normed2, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b = kernels.mlp_backward(
        grad_y, normed2, fc1_w, fc2_w, z, spec.act, fc1_b is not None, fc2_b is not None,
        drop_rand=rand_mlp, keep_prob=keep)
    # x1 feeds norm2 and fc2's residual: its gradient is norm2's backward plus grad_y,
    # added inside the LayerNorm backward kernel (its grad_sum).
    d_x1, d_w2, d_b2 = kernels.layer_norm_backward(d_normed2, grad_y, x1, w2, mean2, rstd2,
                                                   b2 is not None)
    d_x1 = d_x1.contiguous()
    d_out, d_proj_w, d_proj_b = kernels.linear_backward(d_x1, out, proj_w, proj_b is not None,
                                                        drop_rand=rand_attn, keep_prob=keep)
    d_qkv = kernels.attention_backward(d_out.contiguous(), q, k, v, out, lse, spec.num_heads,
                                       spec.scale)
    grads = [None] * _N_INPUTS
    d_normed1 = None
    for i, (cfg, _, _, eps) in enumerate(spec.projections):
        conv_w, bn_w, bn_b, p_w, p_b = inputs[3 + 5 * i:8 + 5 * i]
        params = ProjectionParams(conv_w, bn_w, bn_b, None, None, None, p_w, p_b)
        args = (d_qkv[i].contiguous(), normed1, h, w, params, stats[2 * i], stats[2 * i + 1],
                cfg, True, eps)
        if d_normed1 is None:
            g = kernels.conv_projection_backward(*args)
            d_normed1 = g[0].contiguous()
        else:  # q, k and v read normed1: k's and v's input gradients added to q's
            g = kernels.conv_projection_backward_into(d_normed1, *args)
        grads[3 + 5 * i:8 + 5 * i] = list(g[1:])
    # x feeds norm1 and the output projection's residual: norm1's backward plus d_x1.
    d_x, d_w1, d_b1 = kernels.layer_norm_backward(d_normed1, d_x1, x, w1, mean1, rstd1,
                                                  b1 is not None)
    grads[:3] = [d_x, d_w1, d_b1]
    grads[18:] = [d_proj_w, d_proj_b, d_w2, d_b2, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b]
    # (An absent input, None, needs no gradient: its slot is None too.)
    return (None,) + tuple(g.contiguous() if g is not None and need else None
                           for g, need in zip(grads, ctx.needs_input_grad[1:]))


class BlockTrainFunction(torch.autograd.Function):
    """One CvT block's training forward and backward on one kernel backend (see the module
    docstring). ``apply(spec, *inputs)``; once differentiable (a second derivative raises
    ``cvt_kernels._double_backward.message``)."""

    forward = staticmethod(_forward)
    backward = staticmethod(once_differentiable("_BlockTrainFunction", _backward))


def _inputs(x: Tensor, args) -> tuple:
    a = args.attn
    tensors = [x, *args.norm1[:2]]
    for p in a.projections:
        params = p.params
        tensors += [params.conv_weight, params.bn_weight, params.bn_bias, params.proj_weight,
                    params.proj_bias]
    return (*tensors, *a.proj, *args.norm2[:2], *args.fc1, *args.fc2)


def direct_train(backend_name: str, x: Tensor, h: int, w: int, args) -> Tensor:
    """``block_forward``'s training call (``args``: a ``cvt_kernels.block.BlockArgs``) as
    :class:`BlockTrainFunction` on the kernel backend ``backend_name``."""
    a = args.attn
    projections = tuple(
        (cfg, (params.running_mean, params.running_var, params.num_batches_tracked)
         if training else (None, None, None), momentum, eps)
        for params, cfg, training, momentum, eps in a.projections)
    spec = _Spec(backends.get_backend(backend_name), h, w, float(args.norm1[2]),
                 float(args.norm2[2]), projections, a.num_heads, float(a.scale), args.act,
                 args.drop_prob)
    return BlockTrainFunction.apply(spec, *_inputs(x, args))


def direct_train_for(choices: tuple, x: Tensor, h: int, w: int, args):
    """A call plan's direct path for ``block_forward``'s training call, or ``None`` (the
    plan replays the ops): when every op of the recorded call ran on one kernel backend
    with autograd recording (some input requires a gradient), no autocast, no attention
    dropout, and every projection a ``dw_bn`` one normalizing with batch statistics. Asked
    once per plan: everything read here is in the plan's key."""
    names = {name for _, name in choices}
    if tuple(op for op, _ in choices) != TRAIN_OPS or len(names) != 1:
        return None
    backend = backends.get_backend(names.pop())
    a = args.attn
    if (backend.composite or not torch.is_grad_enabled() or autocast_dtype(x) is not None
            or a.dropout_p != 0.0):
        return None
    for params, cfg, training, _, _ in a.projections:
        if (cfg.method != "dw_bn" or not uses_batch_stats(training, params)
                or params.conv_weight is None):
            return None
    tensors = _inputs(x, args)
    if not eager_call(*tensors) or not any(t is not None and t.requires_grad
                                           for t in tensors):
        return None
    return functools.partial(direct_train, backend.name)
