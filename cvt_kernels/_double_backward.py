"""A second derivative through the fused ops raises one error that says what to do.

The kernel backends (``reference``, ``triton``, ``cuda``) have a hand-written backward that
is not itself differentiable, and the ``torch`` backend's attention is PyTorch's fused SDPA
kernel, whose backward has no derivative either. Without this module the user saw
PyTorch's "trying to differentiate twice a function that was marked with
@once_differentiable", "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_
backward is not implemented", or (a gradient that did not depend on the output's
gradient) a silent disconnection. Forcing the ``torch`` backend under SDPA's math kernel
differentiates twice (``tests/test_double_backward.py``).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

HOW = ("for a second derivative, run the forward under cvt_kernels.use_backend('torch') and "
       "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) (both "
       "differentiate twice), or use the model without accelerate()")


def op_name(twin: str) -> str:
    """The public op an eager twin serves: ``_ConvProjectionFunction`` -> ``conv_projection``."""
    stem = twin.strip("_").removesuffix("Function")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", stem).lower()


def message(op: str) -> str:
    return (f"cvt_kernels {op}: double backward (differentiating a gradient taken with "
            f"create_graph=True) is not supported by the fused ops (the reference, triton and "
            f"cuda backends, and the torch backend's fused SDPA attention); {HOW}")


class _NoSecondDerivative(torch.autograd.Function):
    """Passes gradients on unchanged; differentiating them raises :func:`message`."""

    @staticmethod
    def forward(ctx, op: str, count: int, *tensors: Tensor):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(message(ctx.op))


def _refused(op: str, grads: Sequence[Optional[Tensor]], anchors: Sequence[object]):
    """``grads`` as they are, each behind a node that raises on a second derivative; the
    ``anchors`` (tensors the true second derivative depends on) connect that node to the
    graph even when no gradient does."""
    present = [g for g in grads if isinstance(g, Tensor)]
    linked = [t for t in anchors if isinstance(t, Tensor) and t.requires_grad]
    if not present or not (linked or any(g.requires_grad for g in present)):
        return grads
    wrapped = iter(_NoSecondDerivative.apply(op, len(present), *present, *linked))
    return tuple(next(wrapped) if isinstance(g, Tensor) else g for g in grads)


def once_differentiable(op: str, backward: Callable) -> Callable:
    """``torch.autograd.function.once_differentiable`` for the eager twin named ``op``, with
    :func:`message` as its error, and
    connected through the saved tensors too (PyTorch's only through the incoming
    gradients: a gradient of ``out.sum()`` came out silently detached)."""
    op = op_name(op)

    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # a plain backward: nothing to guard
            return grads
        single = not isinstance(grads, tuple)
        out = _refused(op, (grads,) if single else grads,
                       (*grad_outputs, *ctx.saved_tensors))
        return out[0] if single else out

    wrapper.__name__ = getattr(backward, "__name__", "backward")
    wrapper.__doc__ = backward.__doc__
    return wrapper


def guard_sdpa(out: Tensor, op: str = "attention") -> Tensor:
    """``out`` of ``F.scaled_dot_product_attention``: when a fused SDPA kernel made it (its
    backward has no derivative), the gradients it passes back under ``create_graph=True``
    raise :func:`message` when differentiated, before PyTorch's error about its internals.
    SDPA's math kernel is composite and differentiates twice: left alone."""
    if torch.compiler.is_compiling() or not out.requires_grad:  # (compiled: aot_autograd
        return out  # refuses double backward itself)
    node = out.grad_fn
    if node is not None and type(node).__name__.startswith("ScaledDotProduct"):
        def hook(grad_inputs: Tuple[Optional[Tensor], ...], grad_outputs):
            if torch.is_grad_enabled():
                return _refused(op, grad_inputs, ())
            return None
        node.register_hook(hook)
    return out


__all__ = ["HOW", "guard_sdpa", "message", "once_differentiable"]
