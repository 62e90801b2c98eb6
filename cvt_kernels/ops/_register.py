"""One registration for every op of the package: the custom op, its fake, its backward op
and fake, the autograd formula, and the eager twin, from one call per op.

Each differentiable op (``attention``, ``conv_projection``, ``layer_norm``, ``mlp``,
``linear``) is five things that must agree: ``cvt_kernels::<name>`` (what ``torch.compile``
and ``torch.export`` see), its fake (shapes for tracing), ``cvt_kernels::<name>_backward``
and its fake (so a compiled backward stays one opaque call), the autograd formula joining
them, and the eager twin (:func:`._checks.eager_twin`: the same forward, context and
formula without torch.library's dispatch, for plain eager calls). The op's module keeps
what is particular to it: the forward and backward bodies, the two fakes, what the context
saves, and the formula; :func:`differentiable_op` does the joining, the same way for all:

* a backward body returning ``List[Optional[Tensor]]`` becomes an op returning
  ``List[Tensor]``, an absent gradient as an empty tensor (custom ops cannot return
  ``None``), which the formula reads as absent by its own flags; the eager twin calls the
  body directly and sees the ``None``;
* the schemas are read off the bodies' annotations, so a body and its op cannot disagree
  on an argument;
* every op lands in :data:`REGISTERED`, which ``tests/test_compile.py`` walks with
  ``torch.library.opcheck``: an op registered without a sample there fails that test.

Forward-only ops (the projection's batch statistics, the eval ``norm_mlp``, the one-pass
attention) go through :func:`forward_op`: custom op and fake, registered the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ._checks import eager_twin

NAMESPACE = "cvt_kernels"


@dataclass(frozen=True)
class RegisteredOp:
    """What :func:`differentiable_op` / :func:`forward_op` registered under ``name``:
    ``op`` (``torch.ops.cvt_kernels.<name>``'s custom op), ``backward_op`` (``None`` for a
    forward-only op) and ``twin`` (the eager ``autograd.Function``, with ``twin.call``;
    ``None`` for a forward-only op)."""

    name: str
    op: object
    backward_op: Optional[object] = None
    twin: Optional[type] = None


REGISTERED: Dict[str, RegisteredOp] = {}


def _remember(entry: RegisteredOp) -> RegisteredOp:
    if entry.name in REGISTERED:
        raise RuntimeError(f"name: the op {NAMESPACE}::{entry.name} is registered already")
    REGISTERED[entry.name] = entry
    return entry


def forward_op(name: str, forward: Callable, fake: Callable,
               mutates_args: Sequence[str] = ()) -> RegisteredOp:
    """``cvt_kernels::<name>`` running ``forward`` (annotated: the schema), with ``fake``.

    A mutated argument may not have a default: torch 2.11 (the GPU machines') drops
    trailing arguments equal to their default before the in-place version bump, which then
    indexes past them (IndexError under torch.compile); torch 2.13 fills defaults first."""
    params = inspect.signature(forward).parameters
    defaulted = [a for a in mutates_args if params[a].default is not inspect.Parameter.empty]
    if defaulted:
        raise TypeError(f"forward: the mutated arguments {defaulted} of {NAMESPACE}::{name} "
                        f"must not have defaults")
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward,
                                 mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return _remember(RegisteredOp(name, op))


def differentiable_op(name: str, forward: Callable, fake: Callable, backward: Callable,
                      backward_fake: Callable, setup_context: Callable,
                      formula: Callable[[Callable], Callable], twin_name: str) -> RegisteredOp:
    """Register ``cvt_kernels::<name>`` and ``cvt_kernels::<name>_backward`` and build the
    eager twin ``twin_name``.

    Arguments:
        forward: the forward body, annotated (its signature is the op's schema); returns
            contiguous tensors, as ``fake`` promises.
        backward: the backward body ``(grad..., saved..., constants...) -> gradients``,
            annotated for its arguments; ``None`` for a gradient that does not exist.
        setup_context: ``(ctx, inputs, output)``, saving what ``formula`` reads.
        formula: ``formula(backward_fn)`` returns the autograd ``backward(ctx, *grads)``
            calling ``backward_fn`` (the backward op, or for the twin the body itself) and
            mapping its results onto the forward's inputs (``None`` where absent: an empty
            tensor from the op is read as absent by the formula's own flags).
    """
    signature = inspect.signature(backward, eval_str=True)
    if signature.return_annotation == List[Optional[Tensor]]:
        def backward_as_op(grad: Tensor, *args, **kwargs):
            # Custom ops cannot return None: an absent gradient travels as an empty tensor.
            return [g if g is not None else grad.new_empty((0,))
                    for g in backward(grad, *args, **kwargs)]

        backward_as_op.__signature__ = signature.replace(return_annotation=List[Tensor])
        backward_as_op.__name__ = f"{name}_backward"
    else:  # every gradient always exists (a tuple of tensors): the body is the op
        backward_as_op = backward

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    op.register_fake(fake)
    backward_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward_as_op,
                                          mutates_args=())
    backward_op.register_fake(backward_fake)
    op.register_autograd(formula(backward_op), setup_context=setup_context)
    twin = eager_twin(twin_name, forward, setup_context, formula(backward))
    return _remember(RegisteredOp(name, op, backward_op, twin))
