"""CvT's MLP: ``residual + drop_path(fc2(act(fc1(x))))``, ``act`` QuickGELU or exact GELU.

The four layers of one op: the reference math (:func:`mlp_reference`, and the explicit
:func:`reference_forward`/:func:`reference_backward` pair the ``reference`` backend runs),
the ``cvt_kernels::mlp`` / ``cvt_kernels::mlp_backward`` custom ops around a kernel
backend's forward (which saves the pre-activation ``z`` when a backward will read it) and
backward, their eager ``autograd.Function`` twin, and the public :func:`mlp`. Composite
backends (``torch``) are called directly, as for the other ops (``backends/base.py``).

Math, rows ``x`` of ``(M, C_in)``::

    z   = x W1^T + b1                 # (M, hidden)
    a   = act(z)                      # quick_gelu: z * sigmoid(1.702 z); gelu: z * Phi(z)
    out = a W2^T + b2                 # (M, C_out)
    out = residual + drop_path(out)   # optional, both

Backward, ``g = d out`` (times the drop factor ``f`` of each row's sample with drop path):
``dW2 = g^T a``, ``db2 = sum g``, ``dz = (g W2) * act'(z)``, ``dW1 = dz^T x``,
``db1 = sum dz``, ``dx = dz W1``, ``d residual = d out``.

Drop path (the block's, fused into fc2's epilogue by the block, :mod:`._drop_path`) is
internal: :func:`run_mlp` takes its probability and draws as ``DropPath`` would; the
public :func:`mlp` has none.

In eval (nothing to differentiate) :func:`run_norm_mlp` takes the block's norm2 in as
well: ``residual + mlp(layer_norm(x))`` (``cvt_kernels::norm_mlp``, forward only). A
kernel backend with a ``norm_mlp_forward`` normalizes fc1's input tiles as they are loaded
(the triton GEMM: two launches for the norm and the MLP), any other runs its
``layer_norm`` and ``mlp`` one after the other; a composite backend runs its stock ops.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from . import _drop_path
from ._checks import (autocast_cast, autocast_dtype, check_same, check_tensor, eager_call,
                      no_autocast)
from ._choice import choose_backend
from ._register import differentiable_op, forward_op
from .layer_norm import run_layer_norm, validate_layer_norm

__all__ = ["ACTIVATIONS", "QUICK_GELU_ALPHA", "mlp", "mlp_reference", "run_mlp",
           "run_norm_mlp", "validate_mlp"]

#: ``quick_gelu``: the reference CvT's ``z * sigmoid(1.702 z)``; ``gelu``: exact (erf)
#: GELU, Hugging Face CvT's ``nn.GELU()``.
ACTIVATIONS = ("quick_gelu", "gelu")


# ------------------------------------------------------------------------ reference math
# In the backends layer (the reference backend runs it, and backends never import ops); the
# old names stay importable from here.
from ..backends.reference_math import (  # noqa: E402,F401
    QUICK_GELU_ALPHA, activation, activation_grad, mlp_backward as reference_backward,
    mlp_forward as reference_forward, mlp_reference)


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
def _forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor],
             drop_rand: Optional[Tensor], keep_prob: float, store_z: bool, backend: str
             ) -> Tuple[Tensor, Tensor]:
    with no_autocast(x):
        out, z = backends.get_backend(backend).mlp_forward(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, drop_rand=drop_rand,
            keep_prob=keep_prob, store_z=store_z)
    return out.contiguous(), z.contiguous()


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, drop_rand,
                  keep_prob, store_z, backend):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(tuple(x.shape[:-1]) + (fc2_weight.shape[0],)),
            x.new_empty((rows, fc1_weight.shape[0]) if store_z else (0,)))


def _backward_impl(grad_out: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                   z: Tensor, act: str, has_bias1: bool, has_bias2: bool,
                   drop_rand: Optional[Tensor], keep_prob: float, backend: str
                   ) -> List[Optional[Tensor]]:
    with no_autocast(x):
        grads = backends.get_backend(backend).mlp_backward(
            grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
            drop_rand=drop_rand, keep_prob=keep_prob)
    return [None if g is None else g.contiguous() for g in grads]


def _backward_fake(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2, drop_rand,
                   keep_prob, backend):
    def bias(present: bool, n: int) -> Tensor:
        return fc1_weight.new_empty((n,) if present else (0,))

    return [x.new_empty(x.shape), fc1_weight.new_empty(fc1_weight.shape),
            bias(has_bias1, fc1_weight.shape[0]), fc2_weight.new_empty(fc2_weight.shape),
            bias(has_bias2, fc2_weight.shape[0])]


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, drop_rand, keep_prob,
     store_z, backend) = inputs
    _, z = output
    # z has no gradient: autograd passes None for it instead of materializing zeros of
    # (M, hidden) (0.64 GB per CvT-13 step at batch 64, bf16).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, fc1_weight, fc2_weight, z, drop_rand)
    ctx.config = (act, fc1_bias is not None, fc2_bias is not None)
    ctx.drop = (keep_prob, backend)
    ctx.has_residual = residual is not None


def _formula(backward_op):
    def backward(ctx, grad_out, _grad_z):
        if grad_out is None:  # the output was not used
            return (None,) * 11
        x, fc1_weight, fc2_weight, z, drop_rand = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx, dw1, db1, dw2, db2 = backward_op(grad_out, x, fc1_weight, fc2_weight, z,
                                             *ctx.config, drop_rand, *ctx.drop)
        has_bias1, has_bias2 = ctx.config[1:3]
        return (dx, dw1, db1 if has_bias1 else None, dw2, db2 if has_bias2 else None, None,
                grad_out if ctx.has_residual else None, None, None, None, None)
    return backward


_REGISTERED = differentiable_op("mlp", _forward, _forward_fake, _backward_impl, _backward_fake,
                                _setup_context, _formula, "_MLPFunction")
_mlp_op, _MLPFunction = _REGISTERED.op, _REGISTERED.twin


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
            fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor],
            drop_prob: float = 0.0) -> Tensor:
    """:func:`mlp` for inputs already validated (the fused block checks once), with
    ``residual + drop_path(mlp)`` when ``drop_prob`` > 0: the drop path's random draws
    made here, as CvT's ``DropPath`` makes them (same generator, shape, dtype), and the
    drop factor applied in fc2's epilogue by a kernel backend."""
    amp = autocast_dtype(x)
    if amp is not None and residual is not None:
        # Eager adds the residual stream (float32 under autocast) to the half-precision
        # Linear output in the promoted dtype: so do we, outside the op.
        out = run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, None)
        return residual + _dropped(out, drop_prob)
    rand = _drop_path.draw(tuple(x.shape[:-1]) + (fc2_weight.shape[0],), x.dtype, x.device,
                           drop_prob)
    return _run_drawn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, rand,
                      1.0 - drop_prob)


def _dropped(y: Tensor, drop_prob: float) -> Tensor:
    rand = _drop_path.draw(y.shape, y.dtype, y.device, drop_prob)
    return y if rand is None else _drop_path.apply(y, rand, 1.0 - drop_prob)


def _run_drawn(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
               fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor],
               rand: Optional[Tensor], keep: float) -> Tensor:
    """:func:`run_mlp` once drop path's draws (``rand``, or ``None``) are made."""
    amp = autocast_dtype(x)
    backend = _choose_backend(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual,
                              rand, keep)
    if backend.composite:
        if rand is None:
            return backend.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
        out = _drop_path.apply(backend.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                           act, None), rand, keep)
        return out if residual is None else residual + out
    if amp is not None:  # custom ops are invisible to autocast: cast as it would for Linear
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
            autocast_cast(t, amp) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    # z (the pre-activation) is stored only for a backward: eval writes no (M, hidden) copy.
    store_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in tensors)
    op = _MLPFunction.call if eager_call(*tensors, rand) else _mlp_op
    out, _ = op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual, rand, keep,
                store_z, backend.name)
    return out


def _choose_backend(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str,
                    residual: Optional[Tensor], rand: Optional[Tensor], keep: float
                    ) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among those that can run the call
    (measured on its first call on a GPU, as for the attention ops; with drop path, on the
    call's own draws: a trial draws nothing, so the caller's random stream is untouched)."""
    def signature(grad: bool) -> tuple:
        return (("x", tuple(x.shape)), ("hidden", fc1_weight.shape[0]),
                ("out", fc2_weight.shape[0]), ("act", act), ("bias1", fc1_bias is not None),
                ("bias2", fc2_bias is not None), ("residual", residual is not None),
                ("drop_path", rand is not None), ("dtype", x.dtype),
                ("weight_dtype", fc1_weight.dtype), ("grad", grad))

    inputs = (("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
              ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias), ("residual", residual),
              ("drop_rand", rand))

    def call(x_, w1, b1, w2, b2, r, rand_):
        return _run_drawn(x_, w1, b1, w2, b2, act, r, rand_, keep)

    return choose_backend(
        "mlp", lambda b: b.mlp_reasons(x, act), (x.device, x.dtype, act), inputs, call,
        signature, x.dtype, x.device)


# ------------------------------------------------- eval: with the LayerNorm before it
def _forward_norm(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                  fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                  fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor], backend: str
                  ) -> Tensor:
    kernels = backends.get_backend(backend)
    fused = getattr(kernels, "norm_mlp_forward", None)
    with no_autocast(x):
        if fused is not None:
            out = fused(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                        fc2_bias, act, residual)
        else:  # a kernel backend without the fused kernel: its two ops, in order
            normed = kernels.layer_norm_forward(x, None, norm_weight, norm_bias, eps)[0]
            out = kernels.mlp_forward(normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act,
                                      residual, store_z=False)[0]
    return out.contiguous()


def _forward_norm_fake(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                       fc2_bias, act, residual, backend):
    return x.new_empty(tuple(x.shape[:-1]) + (fc2_weight.shape[0],))


_norm_mlp_op = forward_op("norm_mlp", _forward_norm, _forward_norm_fake).op


def run_norm_mlp(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                 fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor],
                 checked: bool = True) -> Tensor:
    """``residual + mlp(layer_norm(x, norm_weight, norm_bias, eps))``, the block's norm2 and
    MLP, for eval. The MLP's arguments validated by the caller for ``x``'s shape (the norm's
    too with ``checked=False``); where autograd records the call, or under autocast, the
    two ops run one after the other (forward only: no backward for the fused op)."""
    if checked:
        validate_layer_norm(x, norm_weight, norm_bias, eps)
    tensors = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    if (autocast_dtype(x) is not None or torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in tensors)):
        normed = run_layer_norm(x, None, norm_weight, norm_bias, eps)[0]
        return run_mlp(normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    backend = _choose_norm_backend(*tensors[:3], eps, *tensors[3:], act)
    if backend.composite:
        normed = backend.layer_norm(x, None, norm_weight, norm_bias, float(eps))[0]
        return backend.mlp(normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual)
    op = _forward_norm if eager_call(*tensors) else _norm_mlp_op
    return op(x, norm_weight, norm_bias, float(eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias,
              act, residual, backend.name)


def _choose_norm_backend(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                         fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                         fc2_bias: Optional[Tensor], residual: Optional[Tensor], act: str
                         ) -> backends.Backend:
    """As :func:`_choose_backend`, for a backend that runs both the layer_norm and the mlp
    op on this call (checked and timed against the float64 truth on a GPU)."""
    def signature(grad: bool) -> tuple:
        return (("x", tuple(x.shape)), ("hidden", fc1_weight.shape[0]),
                ("out", fc2_weight.shape[0]), ("act", act), ("eps", eps),
                ("bias1", fc1_bias is not None), ("bias2", fc2_bias is not None),
                ("residual", residual is not None), ("dtype", x.dtype),
                ("weight_dtype", fc1_weight.dtype), ("norm_dtype", norm_weight.dtype),
                ("grad", grad))

    inputs = (("x", x), ("norm_weight", norm_weight), ("norm_bias", norm_bias),
              ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
              ("fc2_bias", fc2_bias), ("residual", residual))

    def call(x_, nw, nb, w1, b1, w2, b2, r):
        return run_norm_mlp(x_, nw, nb, eps, w1, b1, w2, b2, act, r)

    return choose_backend(
        "norm_mlp", lambda b: b.layer_norm_reasons(x) + b.mlp_reasons(x, act),
        (x.device, x.dtype, x.shape[-1], act), inputs, call, signature, x.dtype, x.device)
