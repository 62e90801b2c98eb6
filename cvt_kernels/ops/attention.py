"""The attention core: ``softmax(q k^T * scale) v`` per head, no mask, explicit scale.

Tokens stay token-major: ``q`` is ``(B, Nq, H*D)``, ``k`` and ``v`` are ``(B, Nk, H*D)``
(``Nq != Nk`` in CvT: k and v come from the stride-2 projection), and the output is
``(B, Nq, H*D)``. CvT passes ``scale = dim_out ** -0.5``, not ``head_dim ** -0.5``.

Layers as in ``conv_projection.py``: the public :func:`attention`, then the
``cvt_kernels::attention`` / ``cvt_kernels::attention_backward`` custom ops around a kernel
backend's forward (which saves the float32 log-sum-exp per row) and backward, with an
``autograd.Function`` twin for eager calls (``_checks.eager_call``).
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .. import _plan, backends
from ..backends.base import stat_dtype
from ._checks import (autocast_cast, autocast_dtype, check_positive_int, check_same,
                      check_tensor, eager_call, no_autocast)
from ._choice import choose_backend
from ._register import differentiable_op

__all__ = ["attention", "validate_attention"]


def validate_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                       dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=3)
    check_same(q, "q", [("k", k), ("v", v)])
    check_positive_int(num_heads, "num_heads")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected batch {q.shape[0]} and {q.shape[2]} channels (those of "
                         f"q), got shape {tuple(k.shape)}")
    if q.shape[2] % num_heads != 0:
        raise ValueError(f"num_heads: {q.shape[2]} channels do not split into {num_heads} "
                         f"heads")
    if q.shape[0] > 0 and q.shape[1] > 0 and k.shape[1] == 0:
        raise ValueError("k: expected at least one key token, got 0 (softmax over nothing)")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


def _forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
             backend: str) -> Tuple[Tensor, Tensor]:
    with no_autocast(q):
        out, lse = backends.get_backend(backend).attention_forward(q, k, v, num_heads, scale)
    return out.contiguous(), lse.contiguous()  # as the fake implementation promises


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor, num_heads: int, scale: float, backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    with no_autocast(q):
        grads = backends.get_backend(backend).attention_backward(
            grad_out, q, k, v, out, lse, num_heads, scale)
    return tuple(g.contiguous() for g in grads)


def _forward_fake(q, k, v, num_heads, scale, backend):
    lse = q.new_empty((q.shape[0], num_heads, q.shape[1]), dtype=stat_dtype(q.dtype))
    return q.new_empty(q.shape), lse


def _backward_fake(grad_out, q, k, v, out, lse, num_heads, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale, backend = inputs
    out, lse = output
    # lse has no gradient: autograd passes None for it instead of materializing zeros (one
    # launch per call).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_heads, ctx.scale, ctx.backend = num_heads, scale, backend


def _formula(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output was not used
            return (None,) * 6
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.num_heads,
                                 ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None
    return backward


_REGISTERED = differentiable_op("attention", _forward, _forward_fake, _backward_impl,
                                _backward_fake, _setup_context, _formula, "_AttentionFunction")
_attention_op, _AttentionFunction = _REGISTERED.op, _REGISTERED.twin


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
              dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, no mask; token-major ``(B, N, H*D)`` in and out.

    Arguments:
        q: ``(B, Nq, H*D)``, the queries.
        k: ``(B, Nk, H*D)``, the keys; ``Nk`` may differ from ``Nq`` (CvT's k and v come
            from the stride-2 projection) and must be at least 1 when ``Nq > 0``.
        v: ``(B, Nk, H*D)``, the values (``k``'s shape).
        num_heads: ``H``; the channels split into ``H`` consecutive groups of ``D`` (channel
            ``c`` belongs to head ``c // D``). ``D = C / H`` must be a whole number.
        scale: multiplies the logits ``q k^T``. CvT passes ``dim_out ** -0.5``, the full
            width ``H*D``, not ``D ** -0.5``: nothing is assumed here.
        dropout_p: dropout probability on the attention weights, in ``[0, 1)``; pass
            ``0.0`` in eval mode. Only the ``torch`` backend implements it (the automatic
            choice does; a forced kernel backend raises).

    Layout: the tokens are not transposed into ``(B, H, N, D)`` as
    ``F.scaled_dot_product_attention`` and ``flash_attn_func``'s ``(B, N, H, D)`` want:
    the ``(B, N, H*D)`` tensors a ``Linear`` produces go in and come out as they are. Any
    strides are accepted.

    Dtypes: float16, bfloat16, float32 or float64, the same for ``q``, ``k`` and ``v``
    (under autocast they are cast to its dtype first, as for SDPA), on one device (CPU or
    CUDA). Logits, softmax and the log-sum-exp are computed in float32 (float64 for
    float64 inputs) whatever the input dtype.

    Returns:
        ``(B, Nq, H*D)`` in ``q``'s dtype (the autocast dtype under autocast), differentiable
        with respect to ``q``, ``k`` and ``v``.

    Raises ``TypeError``/``ValueError``/``RuntimeError`` naming the argument for a wrong
    rank, mismatched shapes, dtypes or devices, or ``C % num_heads != 0``; a forced backend
    that cannot run the call raises ``BackendUnavailableError`` with its reasons.
    """
    validate_attention(q, k, v, num_heads, scale, dropout_p)
    return run_attention(q, k, v, num_heads, scale, dropout_p)


def run_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                  dropout_p: float = 0.0) -> Tensor:
    """:func:`attention` for arguments already validated (a module's call plan)."""
    amp = autocast_dtype(q)
    if amp is not None:  # custom ops are invisible to autocast: cast as it would for SDPA
        q, k, v = (autocast_cast(t, amp) for t in (q, k, v))
    backend = _choose_backend(q, k, v, num_heads, float(scale), dropout_p)
    if backend.composite:
        return backend.attention(q, k, v, num_heads, float(scale), dropout_p)
    op = _AttentionFunction.call if eager_call(q, k, v) else _attention_op
    out, _ = op(q, k, v, num_heads, float(scale), backend.name)
    return out


def _choose_backend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                    dropout_p: float) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among the backends that can run the
    call (measured on its first call on a GPU: ``cvt_kernels.dispatch``)."""
    planned = _plan.next_choice("attention")  # a module's call plan answers
    if planned is not None:
        return planned

    def signature(grad: bool) -> tuple:
        return (("q", q.shape), ("k", k.shape), ("heads", num_heads), ("scale", scale),
                ("dtype", q.dtype), ("grad", grad), ("dropout", dropout_p))

    return choose_backend(
        "attention", lambda b: b.attention_reasons(q, k, v, num_heads, dropout_p),
        (q.device, q.dtype, q.shape[-1], num_heads, dropout_p), (("q", q), ("k", k), ("v", v)),
        lambda qc, kc, vc: attention(qc, kc, vc, num_heads, scale, dropout_p), signature,
        q.dtype, q.device)
