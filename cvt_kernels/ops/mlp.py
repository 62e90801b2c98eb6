"""CvT's MLP: ``residual + fc2(act(fc1(x)))``, ``act`` QuickGELU or exact GELU.

The four layers of one op: the reference math (:func:`mlp_reference`, and the explicit
:func:`reference_forward`/:func:`reference_backward` pair the ``reference`` backend runs),
the ``cvt_kernels::mlp`` / ``cvt_kernels::mlp_backward`` custom ops around a kernel
backend's forward (which saves the pre-activation ``z``) and backward, their eager
``autograd.Function`` twin, and the public :func:`mlp`. Composite backends (``torch``) are
called directly, as for the other ops (``backends/base.py``).

Math, rows ``x`` of ``(M, C_in)``::

    z   = x W1^T + b1                 # (M, hidden)
    a   = act(z)                      # quick_gelu: z * sigmoid(1.702 z); gelu: z * Phi(z)
    out = a W2^T + b2 [+ residual]    # (M, C_out)

Backward, ``g = d out``: ``dW2 = g^T a``, ``db2 = sum g``, ``dz = (g W2) * act'(z)``,
``dW1 = dz^T x``, ``db1 = sum dz``, ``dx = dz W1``, ``d residual = g``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..backends.base import stat_dtype
from ._checks import (autocast_cast, autocast_dtype, check_same, check_tensor, eager_call,
                      eager_twin, no_autocast)
from ._choice import choose_backend

__all__ = ["ACTIVATIONS", "QUICK_GELU_ALPHA", "mlp", "mlp_reference", "validate_mlp"]

#: ``quick_gelu``: the reference CvT's ``z * sigmoid(1.702 z)``; ``gelu``: exact (erf)
#: GELU, Hugging Face CvT's ``nn.GELU()``.
ACTIVATIONS = ("quick_gelu", "gelu")
QUICK_GELU_ALPHA = 1.702


# ------------------------------------------------------------------------ reference math
def activation(z: Tensor, act: str) -> Tensor:
    if act == "quick_gelu":
        return z * torch.sigmoid(QUICK_GELU_ALPHA * z)
    return F.gelu(z)


def activation_grad(z: Tensor, act: str) -> Tensor:
    """``d act / d z`` at ``z``."""
    if act == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_ALPHA * z)
        return s + QUICK_GELU_ALPHA * z * s * (1 - s)
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return cdf + z * pdf


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def mlp_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                  fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str = "quick_gelu",
                  residual: Optional[Tensor] = None) -> Tensor:
    """The oracle: the math above in float32 (float64 stays float64), returned in ``x``'s
    dtype; differentiable by autograd."""
    cd = stat_dtype(x.dtype)
    z = F.linear(x.to(cd), fc1_weight.to(cd), _cast(fc1_bias, cd))
    out = F.linear(activation(z, act), fc2_weight.to(cd), _cast(fc2_bias, cd))
    if residual is not None:
        out = out + residual.to(cd)
    return out.to(x.dtype)


def reference_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual
                      ) -> Tuple[Tensor, Tensor]:
    """The ``reference`` backend's forward: ``(out, z)``, ``z`` ``(M, hidden)`` in ``x``'s
    dtype (what a kernel saves for the backward)."""
    cd = stat_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(cd)
    z = F.linear(x2, fc1_weight.to(cd), _cast(fc1_bias, cd))
    out = F.linear(activation(z, act), fc2_weight.to(cd), _cast(fc2_bias, cd))
    if residual is not None:
        out = out + residual.reshape(out.shape).to(cd)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1]), z.to(x.dtype)


def reference_backward(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2
                       ) -> Tuple[Optional[Tensor], ...]:
    """The ``reference`` backend's backward: ``(dx, dW1, db1, dW2, db2)``."""
    cd = stat_dtype(x.dtype)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
    zc = z.to(cd)
    a = activation(zc, act)
    dw2 = g.t() @ a
    dz = (g @ fc2_weight.to(cd)) * activation_grad(zc, act)
    dw1 = dz.t() @ x.reshape(-1, x.shape[-1]).to(cd)
    dx = (dz @ fc1_weight.to(cd)).reshape(x.shape)
    return (dx.to(x.dtype), dw1.to(fc1_weight.dtype),
            dz.sum(0).to(fc1_weight.dtype) if has_bias1 else None,
            dw2.to(fc2_weight.dtype), g.sum(0).to(fc2_weight.dtype) if has_bias2 else None)


# ------------------------------------------------------------------------ checks
def validate_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor]) -> None:
    check_tensor(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x: expected a tensor of at least 2 dimensions (..., C_in), got "
                         f"shape {tuple(x.shape)}")
    check_tensor(fc1_weight, "fc1_weight", ndim=2)
    check_tensor(fc2_weight, "fc2_weight", ndim=2)
    hidden, c_in = fc1_weight.shape
    c_out = fc2_weight.shape[0]
    if c_in != x.shape[-1]:
        raise ValueError(f"fc1_weight: expected shape (hidden, {x.shape[-1]}) for x's "
                         f"{x.shape[-1]} channels, got {tuple(fc1_weight.shape)}")
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight: expected shape (C_out, {hidden}) for fc1's {hidden} "
                         f"outputs, got {tuple(fc2_weight.shape)}")
    for name, b, n in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, c_out)):
        if b is not None:
            check_tensor(b, name, ndim=1)
            if b.shape[0] != n:
                raise ValueError(f"{name}: expected shape ({n},), got {tuple(b.shape)}")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {', '.join(ACTIVATIONS)}, got {act!r}")
    if residual is not None:
        check_tensor(residual, "residual")
        want = tuple(x.shape[:-1]) + (c_out,)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual: expected shape {want}, got {tuple(residual.shape)}")
    check_same(x, "x", [("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
                        ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias),
                        ("residual", residual)])


# ------------------------------------------------------------------------ custom ops
def _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, backend):
    with no_autocast(x):
        out, z = backends.get_backend(backend).mlp_forward(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    return out.contiguous(), z.contiguous()


def _backward_impl(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
                   backend) -> List[Optional[Tensor]]:
    with no_autocast(x):
        grads = backends.get_backend(backend).mlp_backward(
            grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2)
    return [None if g is None else g.contiguous() for g in grads]


@torch.library.custom_op("cvt_kernels::mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor], backend: str
            ) -> Tuple[Tensor, Tensor]:
    return _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, backend)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, backend):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(tuple(x.shape[:-1]) + (fc2_weight.shape[0],)),
            x.new_empty((rows, fc1_weight.shape[0])))


@torch.library.custom_op("cvt_kernels::mlp_backward", mutates_args=())
def _mlp_backward_op(grad_out: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                     z: Tensor, act: str, has_bias1: bool, has_bias2: bool, backend: str
                     ) -> List[Tensor]:
    grads = _backward_impl(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
                           backend)
    # Custom ops cannot return None: absent gradients travel as empty tensors.
    return [g if g is not None else x.new_empty((0,)) for g in grads]


@_mlp_backward_op.register_fake
def _(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2, backend):
    def bias(present: bool, n: int) -> Tensor:
        return fc1_weight.new_empty((n,) if present else (0,))

    return [x.new_empty(x.shape), fc1_weight.new_empty(fc1_weight.shape),
            bias(has_bias1, fc1_weight.shape[0]), fc2_weight.new_empty(fc2_weight.shape),
            bias(has_bias2, fc2_weight.shape[0])]


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, backend = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, fc1_weight, fc2_weight, z)
    ctx.config = (act, fc1_bias is not None, fc2_bias is not None, backend)
    ctx.has_residual = residual is not None


def _backward_with(backward_op):
    def backward(ctx, grad_out, _grad_z):
        x, fc1_weight, fc2_weight, z = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx, dw1, db1, dw2, db2 = backward_op(grad_out, x, fc1_weight, fc2_weight, z,
                                             *ctx.config)
        has_bias1, has_bias2 = ctx.config[1:3]
        return (dx, dw1, db1 if has_bias1 else None, dw2, db2 if has_bias2 else None, None,
                grad_out if ctx.has_residual else None, None)
    return backward


_mlp_op.register_autograd(_backward_with(_mlp_backward_op), setup_context=_setup_context)

_MLPFunction = eager_twin("_MLPFunction", _forward, _setup_context,
                          _backward_with(_backward_impl))


# ------------------------------------------------------------------------ public function
def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
        fc2_bias: Optional[Tensor], act: str = "quick_gelu",
        residual: Optional[Tensor] = None) -> Tensor:
    """``residual + fc2(act(fc1(x)))``: CvT's MLP (without dropout) and, optionally, the
    residual add after it, as one op.

    Arguments:
        x: ``(..., C_in)`` (CvT: ``(B, T, C_in)`` tokens); any strides.
        fc1_weight: ``(hidden, C_in)``; fc1_bias: ``(hidden,)`` or ``None``.
        fc2_weight: ``(C_out, hidden)``; fc2_bias: ``(C_out,)`` or ``None``.
        act: ``"quick_gelu"`` (``z * sigmoid(1.702 z)``, the reference CvT's) or ``"gelu"``
            (exact, erf; Hugging Face CvT's).
        residual: ``(..., C_out)`` added to the result, or ``None``.

    Dtypes: float16, bfloat16, float32 or float64, the same for every tensor, on one device
    (under autocast the GEMMs run in its dtype, as eager's Linear layers do, and the residual
    is added after in the promoted dtype).

    Returns ``(..., C_out)`` in ``x``'s dtype (promoted with the residual's under autocast),
    differentiable with respect to every tensor argument.

    The ``torch`` backend runs the cheapest exact composition of stock ops it knows (see
    ``TorchBackend.mlp``); kernel backends run through the ``cvt_kernels::mlp`` custom op.
    Raises ``TypeError``/``ValueError``/``RuntimeError`` naming the argument; a forced
    backend that cannot run the call raises ``BackendUnavailableError`` with its reasons.
    """
    validate_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    return run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)


def run_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor]) -> Tensor:
    """:func:`mlp` for inputs already validated (the fused block checks once)."""
    amp = autocast_dtype(x)
    if amp is not None and residual is not None:
        # Eager adds the residual stream (float32 under autocast) to the half-precision
        # Linear output in the promoted dtype: so do we, outside the op.
        return residual + run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, None)
    backend = _choose_backend(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    if backend.composite:
        return backend.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    if amp is not None:  # custom ops are invisible to autocast: cast as it would for Linear
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
            autocast_cast(t, amp) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    op = _MLPFunction.call if eager_call(*tensors) else _mlp_op
    out, _ = op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, backend.name)
    return out


def _choose_backend(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str,
                    residual: Optional[Tensor]) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among those that can run the call
    (measured on its first call on a GPU, as for the attention ops)."""
    def signature(grad: bool) -> tuple:
        return (("x", tuple(x.shape)), ("hidden", fc1_weight.shape[0]),
                ("out", fc2_weight.shape[0]), ("act", act), ("residual", residual is not None),
                ("dtype", x.dtype), ("grad", grad))

    return choose_backend(
        "mlp", lambda b: b.mlp_reasons(x, act), (x.device, x.dtype, act),
        (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual),
        lambda x_, w1, b1, w2, b2, r: mlp(x_, w1, b1, w2, b2, act, r), signature,
        x.dtype, x.device)
