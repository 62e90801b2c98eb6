"""The attention's output projection with the block's skip connection in its epilogue:
``residual + drop_path(x W^T + b)``, one GEMM on a kernel backend.

Why an op of its own. At block scope every CvT block ends its attention with
``x + proj(attn)``: on stock PyTorch two launches (``linear_add``: ``residual + bias``, then
``addmm_`` onto it; 26 per CvT-13 eval step) and, in training with drop path, five more
(``DropPath``: rand, add, floor, div, mul) plus the add. A GEMM with bias, drop path and
residual in its epilogue is one launch, and the Triton MLP's GEMM kernel already has that
epilogue (fc2 + residual), compile-checked at CvT's shapes. The alternatives were worse:

* inside the ``attention`` op: the projection mixes every head of every query tile, so it
  cannot be the attention kernel's epilogue for more than one head (the one-pass eval path
  does that where it can), and the attention op is not the block's (its backends, trials
  and custom op stay as they are);
* inside the ``mlp`` op: a different product with different operands, a special case of
  nothing;
* ``torch_ops.linear_add`` calling a kernel: stock compositions stay stock (``torch``
  backend), and a kernel must be a *checked* candidate of the dispatcher, never silently
  taken.

So, like ``mlp`` and ``layer_norm``: the reference math (:func:`linear_reference`, and
:func:`reference_forward` / :func:`reference_backward` for the ``reference`` backend), the
``cvt_kernels::linear`` / ``cvt_kernels::linear_backward`` custom ops, their eager twin, and
:func:`linear`, dispatched by :func:`cvt_kernels.ops._choice.choose_backend` (measured and
checked against a float64 truth per shape on a GPU). A composite backend runs today's stock
composition (``torch_ops.linear`` / ``linear_add``, called directly); a kernel backend runs
the custom op when it lists ``"linear"`` in ``block_ops`` (``triton``, ``reference``) and
declines it with a reason otherwise (``cuda``, which has no block ops).

Math, rows ``x`` of ``(M, C_in)``, ``f`` the drop factor of each row's sample (1 without
drop path, :mod:`._drop_path`)::

    out = residual + f * (x W^T + b)          # (M, C_out)

Backward, ``g = d out``: ``dx = (f g) W``, ``dW = (f g)^T x``, ``db = sum f g``,
``d residual = g``.
"""

from __future__ import annotations

from typing import List, Optional

from torch import Tensor

from .. import _plan, backends
from ..backends import torch_ops
from . import _drop_path
from ._checks import (autocast_cast, autocast_dtype, check_same, check_tensor, eager_call,
                      no_autocast)
from ._choice import choose_backend
from ._register import differentiable_op

__all__ = ["linear", "linear_reference", "run_linear", "validate_linear"]


# ------------------------------------------------------------------------ reference math
# In the backends layer (the reference backend runs it, and backends never import ops); the
# old names stay importable from here.
from ..backends.reference_math import (  # noqa: E402,F401
    linear_backward as reference_backward, linear_forward as reference_forward,
    linear_reference)


# ------------------------------------------------------------------------ checks
def validate_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    residual: Optional[Tensor]) -> None:
    check_tensor(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x: expected a tensor of at least 2 dimensions (..., C_in), got "
                         f"shape {tuple(x.shape)}")
    check_tensor(weight, "weight", ndim=2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (C_out, {x.shape[-1]}) for x's "
                         f"{x.shape[-1]} channels, got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor(residual, "residual")
        want = tuple(x.shape[:-1]) + (c_out,)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual: expected shape {want}, got {tuple(residual.shape)}")
    check_same(x, "x", [("weight", weight), ("bias", bias), ("residual", residual)])


# ------------------------------------------------------------------------ custom ops
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
             drop_rand: Optional[Tensor], keep_prob: float, backend: str) -> Tensor:
    with no_autocast(x):
        out = backends.get_backend(backend).linear_forward(
            x, weight, bias, residual, drop_rand=drop_rand, keep_prob=keep_prob)
    return out.contiguous()


def _forward_fake(x, weight, bias, residual, drop_rand, keep_prob, backend):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _backward_impl(grad_out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
                   drop_rand: Optional[Tensor], keep_prob: float, backend: str
                   ) -> List[Optional[Tensor]]:
    with no_autocast(x):
        grads = backends.get_backend(backend).linear_backward(
            grad_out, x, weight, has_bias, drop_rand=drop_rand, keep_prob=keep_prob)
    return [None if g is None else g.contiguous() for g in grads]


def _backward_fake(grad_out, x, weight, has_bias, drop_rand, keep_prob, backend):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if has_bias else (0,))]


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, drop_rand, keep_prob, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, drop_rand)
    ctx.config = (bias is not None, keep_prob, backend)
    ctx.has_residual = residual is not None


def _formula(backward_op):
    def backward(ctx, grad_out):
        if grad_out is None:  # the output was not used
            return (None,) * 7
        x, weight, drop_rand = ctx.saved_tensors
        has_bias, keep_prob, backend = ctx.config
        grad_out = grad_out.contiguous()
        dx, dw, db = backward_op(grad_out, x, weight, has_bias, drop_rand, keep_prob, backend)
        return (dx, dw, db if has_bias else None, grad_out if ctx.has_residual else None,
                None, None, None)
    return backward


_REGISTERED = differentiable_op("linear", _forward, _forward_fake, _backward_impl,
                                _backward_fake, _setup_context, _formula, "_LinearFunction")
_linear_op, _LinearFunction = _REGISTERED.op, _REGISTERED.twin


# ------------------------------------------------------------------------ public function
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor],
           residual: Optional[Tensor] = None) -> Tensor:
    """``residual + x W^T + b`` as one op (the residual add inside the GEMM).

    Arguments:
        x: ``(..., C_in)``, any strides.
        weight: ``(C_out, C_in)``; bias: ``(C_out,)`` or ``None``.
        residual: ``(..., C_out)`` or ``None``.

    Dtypes: float16, bfloat16, float32 or float64, the same for every tensor, on one device
    (under autocast the GEMM runs in its dtype, as eager's Linear does, and the residual is
    added after in the promoted dtype). Returns ``(..., C_out)`` in ``x``'s dtype,
    differentiable with respect to every tensor argument. Raises ``TypeError``/
    ``ValueError``/``RuntimeError`` naming the argument; a forced backend that cannot run
    the call raises ``BackendUnavailableError`` with its reasons.
    """
    validate_linear(x, weight, bias, residual)
    return run_linear(x, weight, bias, residual)


def run_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
               drop_prob: float = 0.0) -> Tensor:
    """:func:`linear` for inputs already validated, with ``residual + drop_path(...)`` when
    ``drop_prob`` > 0 (the draws made here as CvT's ``DropPath`` makes them)."""
    amp = autocast_dtype(x)
    if amp is not None and residual is not None:
        # Eager adds the residual stream (float32 under autocast) to the half-precision
        # Linear output in the promoted dtype: so do we, outside the op.
        out = run_linear(x, weight, bias, None)
        rand = _drop_path.draw(out.shape, out.dtype, out.device, drop_prob)
        return residual + (out if rand is None else _drop_path.apply(out, rand, 1 - drop_prob))
    rand = _drop_path.draw(tuple(x.shape[:-1]) + (weight.shape[0],), x.dtype, x.device,
                           drop_prob)
    return _run_drawn(x, weight, bias, residual, rand, 1.0 - drop_prob)


def _run_drawn(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
               rand: Optional[Tensor], keep: float) -> Tensor:
    backend = _choose_backend(x, weight, bias, residual, rand, keep)
    if backend.composite:
        if rand is None:
            if residual is None:
                return torch_ops.linear(x, weight, bias)
            return torch_ops.linear_add(x, weight, bias, residual)
        out = _drop_path.apply(torch_ops.linear(x, weight, bias), rand, keep)
        return out if residual is None else residual + out
    amp = autocast_dtype(x)
    if amp is not None:  # custom ops are invisible to autocast: cast as it would for Linear
        x, weight, bias = (autocast_cast(t, amp) for t in (x, weight, bias))
    op = _LinearFunction.call if eager_call(x, weight, bias, residual, rand) else _linear_op
    return op(x, weight, bias, residual, rand, keep, backend.name)


def _reasons(backend: backends.Backend, x: Tensor) -> List[str]:
    if backend.composite:  # stock ops (torch_ops.linear_add): whatever the backend takes
        return backend.tensor_reasons(x)
    if "linear" not in backend.block_ops:
        return [f"no linear implementation in the {backend.name} backend"]
    return backend.tensor_reasons(x)


def _choose_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    residual: Optional[Tensor], rand: Optional[Tensor], keep: float
                    ) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among those that can run the call
    (checked and timed on its first call per signature on a GPU; with drop path, on the
    call's own draws)."""
    planned = _plan.next_choice("linear")  # a module's call plan answers
    if planned is not None:
        return planned

    def signature(grad: bool) -> tuple:
        return (("x", tuple(x.shape)), ("out", weight.shape[0]),
                ("bias", bias is not None), ("residual", residual is not None),
                ("drop_path", rand is not None), ("dtype", x.dtype),
                ("weight_dtype", weight.dtype), ("grad", grad))

    inputs = (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
              ("drop_rand", rand))

    def call(x_, w, b, r, rand_):
        return _run_drawn(x_, w, b, r, rand_, keep)

    return choose_backend("linear", lambda b: _reasons(b, x), (x.device, x.dtype), inputs,
                          call, signature, x.dtype, x.device)

