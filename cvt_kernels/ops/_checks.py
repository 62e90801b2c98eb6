"""Input validation shared by the ops: clear errors, raised before anything is launched."""

from __future__ import annotations

import contextlib

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from ..backends.base import eager_call  # noqa: F401 (re-exported for the ops)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: object, name: str, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def check_positive_int(v: object, name: str) -> int:
    # SymInts (torch.compile with dynamic shapes) behave like ints.
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v}")
    return v


_AUTOCAST_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_same(ref: Tensor, ref_name: str, others: Iterable[Tuple[str, Optional[Tensor]]],
               dtype: bool = True) -> None:
    """Every tensor in ``others`` must be on ``ref``'s device (and have its dtype, unless
    autocast is on and will cast both: then half and float32 may mix, as in eager)."""
    mixing_ok = autocast_dtype(ref) is not None and ref.dtype in _AUTOCAST_FLOATS
    for name, t in others:
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{name}: expected a tensor on {ref.device} (the device of "
                               f"{ref_name}), got one on {t.device}")
        if dtype and t.dtype != ref.dtype and not (mixing_ok and t.dtype in _AUTOCAST_FLOATS):
            raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), "
                            f"got {t.dtype}")


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a matmul in for ``t``'s device, or ``None`` when off."""
    device_type = t.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Autocast's rule for one operand: floating tensors other than float64 go to ``dtype``."""
    if t is None or dtype is None or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def no_autocast(t: Tensor):
    """For a custom op's body: autocast stays active inside it and would recast the kernel
    backend's own float32 math (the reference backend's einsums, say) to half precision,
    where large attention logits overflow. The op layer casts the inputs itself. (A no-op
    context when autocast is off: entering ``torch.autocast`` costs microseconds a call.)"""
    if t.device.type in ("cuda", "cpu") and not torch.is_autocast_enabled(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def eager_twin(name: str, forward, setup_context, backward) -> type:
    """A custom op's eager twin (:func:`eager_call`): an ``autograd.Function`` running the
    op's own forward, context and backward without torch.library's dispatch. Old-style
    ``forward(ctx, ...)`` on purpose: with a ``setup_context`` method, ``Function.apply``
    binds the arguments through ``inspect.signature`` on every call, which cost more than
    the custom op saved. The backward is once differentiable: a second derivative raises,
    saying what to do (``cvt_kernels._double_backward``), instead of coming out wrong."""
    from .._double_backward import once_differentiable

    def twin_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return with_plain_call(type(name, (torch.autograd.Function,),
                                {"forward": staticmethod(twin_forward),
                                 "backward": staticmethod(once_differentiable(name, backward)),
                                 "__doc__": "The eager twin of a custom op (see "
                                            "_checks.eager_twin)."}), forward)


def with_plain_call(twin: type, forward) -> type:
    """Give an eager twin ``twin.call(*inputs)``: ``twin.apply`` when autograd records the
    call, else the op's ``forward`` itself. ``Function.apply`` costs its bookkeeping even
    under ``no_grad``: seven calls per block-scope CvT block cost 45-70 us of host time
    (torch 2.13 on this project's CPU machine, ``python -m benchmarks.overhead --module
    block``, triton eval rows before and after)."""
    def call(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in inputs):
            return twin.apply(*inputs)
        return forward(*inputs)

    twin.call = staticmethod(call)
    return twin
