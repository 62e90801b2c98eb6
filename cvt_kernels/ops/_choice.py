"""Which backend serves one call of an op: the part every op's dispatch shares.

A forced backend (``CVT_KERNELS_BACKEND`` / ``use_backend``) is taken or refused with its
reasons; otherwise the backends that can run the call are the candidates, and
``cvt_kernels.dispatch`` decides among them (measured on the first call of a signature on a
GPU). A trial runs the op itself on copies of the call's tensors under each candidate, so
what is checked and timed is exactly what the call would run.

Ops whose trials carry more than tensors in and gradients out (``conv_projection``: running
statistics) pass their own trial.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import agreement, backends, dispatch

__all__ = ["choose_backend"]


def choose_backend(op: str, ask: Callable[[backends.Backend], List[str]], key: tuple,
                   tensors: Sequence[Optional[Tensor]], call: Optional[Callable[..., Tensor]],
                   signature: Callable[[bool], tuple], dtype: torch.dtype,
                   device: torch.device,
                   output_names: Callable[[bool], Tuple[str, ...]] = lambda grad: ("out",),
                   trial: Optional[Callable[[str, bool, bool], List[Optional[Tensor]]]] = None,
                   ) -> backends.Backend:
    """The backend that runs this call of ``op``.

    ``ask(backend)`` gives a backend's reasons not to run the call (empty: it can), ``key``
    caches those answers. ``tensors`` are the call's differentiable inputs (``None`` entries
    allowed): the call needs gradients when one of them requires grad. ``call(*copies)`` runs
    the op on copies of ``tensors`` and returns its differentiable output; an op whose trial
    returns more (the projection: running statistics) passes ``trial(name, truth, grad)``
    instead. ``signature(grad)`` is the call's (name, value) pairs that key a measured
    decision; ``output_names(grad)`` labels the first tensors a trial returns (the output,
    then gradients in ``tensors``' order)."""
    if backends.forced_backend() is not None:
        return backends.select(op, ask, key=key)
    names = backends.candidates(op, ask, key)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def run(name: str, truth: bool = False) -> List[Optional[Tensor]]:
        if trial is not None:
            return trial(name, truth, grad)
        to = agreement.truth_dtype(dtype) if truth else None
        copies = [dispatch.copy_for_trial(t, to, True, grad) for t in tensors]
        with contextlib.ExitStack() as stack:
            stack.enter_context(backends.use_backend(name))
            if truth:
                stack.enter_context(dispatch.truth_mode(device))
            out = call(*copies)
            if not grad:
                return [out.detach()]
            out.backward(dispatch.random_like(out, via=dtype))
        return [out.detach()] + [c.grad for c in copies if c is not None]

    decision = dispatch.decide(op, signature(grad), names, run, lambda: run("torch", True),
                               "torch", dtype, device, names=output_names(grad))
    return backends.get_backend(decision.choice)
