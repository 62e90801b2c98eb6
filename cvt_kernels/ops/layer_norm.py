"""LayerNorm over the last axis with float32 statistics and input-dtype I/O, optionally
fused with the residual add before it (CvT's ``x = x + attn(...); norm2(x)``).

The reference CvT runs LayerNorm in float32 with casts around it: a float32 copy of every
half-precision activation in and out. Here the statistics (and the affine) are computed in
float32 (float64 for float64) while the activations stay in their own dtype in memory.

Layers as in ``mlp.py``: the reference math (:func:`layer_norm_reference`, and
:func:`reference_forward`/:func:`reference_backward` for the ``reference`` backend), the
``cvt_kernels::layer_norm`` / ``cvt_kernels::layer_norm_backward`` custom ops, their eager
twin, and the public :func:`layer_norm` and :func:`add_layer_norm`.

Math, rows ``s`` of ``(M, C)`` (``s = x + residual`` rounded to the input dtype, as eager
materializes the sum, or ``s = x``)::

    mean = sum(s) / C;  var = sum((s - mean)^2) / C;  rstd = 1 / sqrt(var + eps)
    y    = (s - mean) * rstd * weight + bias

Backward, ``g = dy`` (plus ``g_s``, the gradient reaching the sum directly)::

    xhat = (s - mean) * rstd;  gw = g * weight
    ds = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) + g_s
    dweight = sum_rows(g * xhat);  dbias = sum_rows(g);  dx = dresidual = ds
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..backends.base import stat_dtype
from ._checks import check_same, check_tensor, eager_call, no_autocast
from ._choice import choose_backend
from ._register import differentiable_op

__all__ = ["add_layer_norm", "layer_norm", "layer_norm_reference", "validate_layer_norm"]


# ------------------------------------------------------------------------ reference math
# In the backends layer (the reference backend runs it, and backends never import ops); the
# old names stay importable from here.
from ..backends.reference_math import (  # noqa: E402,F401
    layer_norm_backward as reference_backward, layer_norm_forward as reference_forward,
    layer_norm_reference)


# ------------------------------------------------------------------------ checks
def validate_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, residual: Optional[Tensor] = None) -> None:
    check_tensor(x, "x")
    if x.ndim < 1:
        raise ValueError("x: expected a tensor of at least 1 dimension (..., C), got a scalar")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, name, ndim=1)
            if t.shape[0] != channels:
                raise ValueError(f"{name}: expected shape ({channels},) for x's {channels} "
                                 f"channels, got {tuple(t.shape)}")
    if residual is not None:
        check_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    check_same(x, "x", [("residual", residual)])
    # The affine may be float32 with half-precision activations (the statistics dtype).
    check_same(x, "x", [("weight", weight), ("bias", bias)], dtype=False)
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {' or '.join(map(str, allowed))} (for x "
                            f"of dtype {x.dtype}), got {t.dtype}")


# ------------------------------------------------------------------------ custom ops
def _forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with no_autocast(x):
        y, s, mean, rstd = backends.get_backend(backend).layer_norm_forward(
            x, residual, weight, bias, eps)
    return y.contiguous(), s.contiguous(), mean.contiguous(), rstd.contiguous()


def _forward_fake(x, residual, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[:-1], dtype=stat_dtype(x.dtype))
    s = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), s, stats, stats.new_empty(stats.shape)


def _backward_impl(grad_normed: Tensor, grad_sum: Optional[Tensor], s: Tensor,
                   weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool,
                   backend: str) -> List[Optional[Tensor]]:
    with no_autocast(s):
        grads = backends.get_backend(backend).layer_norm_backward(
            grad_normed, grad_sum, s, weight, mean, rstd, has_bias)
    return [None if g is None else g.contiguous() for g in grads]


def _backward_fake(grad_normed, grad_sum, s, weight, mean, rstd, has_bias, backend):
    affine = weight if weight is not None else s.new_empty((s.shape[-1],))
    return [s.new_empty(s.shape),
            affine.new_empty(affine.shape) if weight is not None else s.new_empty((0,)),
            affine.new_empty(affine.shape) if has_bias else s.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend = inputs
    _, s, mean, rstd = output
    # Outputs without a gradient (the statistics, an unused sum) reach the backward as None
    # instead of zeros autograd would materialize: two to three launches per call saved.
    ctx.set_materialize_grads(False)
    ctx.has_residual = residual is not None
    # Without a residual the sum is an empty placeholder: not differentiable either.
    ctx.mark_non_differentiable(mean, rstd, *(() if ctx.has_residual else (s,)))
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)
    ctx.config = (bias is not None, backend)


def _formula(backward_op):
    def backward(ctx, grad_normed, grad_sum, _grad_mean, _grad_rstd):
        if not ctx.has_residual:
            grad_sum = None  # no sum was returned: its "gradient" is an empty placeholder
        if grad_normed is None:  # only the sum was used: it passes its gradient on
            return (grad_sum, grad_sum, None, None, None, None)
        s, weight, mean, rstd = ctx.saved_tensors
        # Any strides: the kernels read a sliced or transposed gradient in place.
        ds, dweight, dbias = backward_op(grad_normed, grad_sum, s, weight, mean, rstd,
                                         *ctx.config)
        has_bias = ctx.config[0]
        return (ds, ds if ctx.has_residual else None,
                dweight if weight is not None else None, dbias if has_bias else None,
                None, None)
    return backward


_REGISTERED = differentiable_op("layer_norm", _forward, _forward_fake, _backward_impl,
                                _backward_fake, _setup_context, _formula, "_LayerNormFunction")
_layer_norm_op, _LayerNormFunction = _REGISTERED.op, _REGISTERED.twin


# ------------------------------------------------------------------------ public functions
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis, float32 statistics, input-dtype I/O.

    Arguments:
        x: ``(..., C)``, float16/bfloat16/float32/float64, any strides.
        weight, bias: ``(C,)`` or ``None``; ``x``'s dtype or float32 (a float32 affine with
            half-precision activations is applied in float32, without a cast copy).
        eps: added to the variance (``nn.LayerNorm``'s ``eps``).

    Returns ``(..., C)`` in ``x``'s dtype: what the reference CvT's float32 LayerNorm
    returns (its float32 math rounded once), differentiable with respect to all three.
    """
    validate_layer_norm(x, weight, bias, eps)
    return run_layer_norm(x, None, weight, bias, eps)[0]


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """``s = x + residual`` and ``layer_norm(s)`` in one op: CvT's
    ``x = x + drop_path(attn(...)); norm2(x)``. ``residual``: ``x``'s shape and dtype.

    Returns ``(normed, s)``, both ``x``'s shape and dtype (``s`` rounded to that dtype as
    eager's add is), differentiable with respect to everything; the other arguments as in
    :func:`layer_norm`.
    """
    validate_layer_norm(x, weight, bias, eps, residual)
    y, s = run_layer_norm(x, residual, weight, bias, eps)
    return y, s


def run_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
    """``(normed, sum or None)`` for inputs already validated."""
    backend = _choose_backend(x, residual, weight, bias, eps)
    if backend.composite:
        return backend.layer_norm(x, residual, weight, bias, float(eps))
    op = (_LayerNormFunction.call if eager_call(x, residual, weight, bias)
          else _layer_norm_op)
    y, s, _, _ = op(x, residual, weight, bias, float(eps), backend.name)
    return y, (s if residual is not None else None)


def _choose_backend(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among those that can run the call:
    on a GPU measured on its first call per shape (``cvt_kernels.dispatch``: checked against
    a float32/float64 truth, timed, kept), elsewhere the first (``torch``)."""
    def signature(grad: bool) -> tuple:
        return (("x", tuple(x.shape)), ("residual", residual is not None),
                ("affine", weight is not None), ("bias", bias is not None), ("eps", eps),
                ("dtype", x.dtype), ("affine_dtype", None if weight is None else weight.dtype),
                ("grad", grad))

    def call(x_, r, w, b):
        normed, s = run_layer_norm(x_, r, w, b, eps)
        return normed if r is None else (normed, s)

    return choose_backend(
        "layer_norm", lambda b: b.layer_norm_reasons(x), (x.device, x.dtype, x.shape[-1]),
        (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)), call,
        signature, x.dtype, x.device,
        output_names=("normed",) if residual is None else ("normed", "sum"))
