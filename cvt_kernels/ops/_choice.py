"""Which backend serves one call of an op: the part every op's dispatch shares.

A forced backend (``CVT_KERNELS_BACKEND`` / ``use_backend``) is taken or refused with its
reasons; otherwise the backends that can run the call are the candidates, and
``cvt_kernels.dispatch`` decides among them (measured on the first call of a signature on a
GPU). A trial runs the op itself on copies of the call's tensors under each candidate
(:mod:`cvt_kernels.trials`), so what is checked and timed is exactly what the call would
run, and every output and gradient it returns is checked.

Ops whose trials carry more than tensors in and gradients out (``conv_projection``: running
statistics) pass their own ``prepare``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _plan, backends, dispatch, trials

__all__ = ["choose_backend", "trial_context"]

Inputs = Sequence[Tuple[str, Optional[Tensor]]]


def trial_context(name: str, truth: bool, device: torch.device):
    """What a trial runs under: ``name`` forced (in this thread only), and for the truth
    autocast off."""
    stack = contextlib.ExitStack()
    stack.enter_context(backends.use_backend(name))
    if truth:
        stack.enter_context(trials.truth_mode(device))
    return stack


def choose_backend(op: str, ask: Callable[[backends.Backend], List[str]], key: tuple,
                   inputs: Inputs, call: Optional[Callable[..., object]],
                   signature: Callable[[bool], tuple], dtype: torch.dtype,
                   device: torch.device, output_names: Sequence[str] = ("out",),
                   prepare: Optional[Callable[[str, bool, bool], trials.Run]] = None,
                   ) -> backends.Backend:
    """The backend that runs this call of ``op``.

    ``ask(backend)`` gives a backend's reasons not to run the call (empty: it can), ``key``
    caches those answers (it must hold everything they depend on: device, dtypes,
    configuration). ``inputs`` are the call's tensors by name (``None`` entries allowed):
    the call needs gradients when one of them requires grad, and a trial returns the
    gradient of each that does. ``call(*copies)`` runs the op on copies of the inputs and
    returns its outputs (a tensor, or a tuple named by ``output_names``); an op whose trial
    returns more (the projection: running statistics) passes ``prepare(name, truth, grad)``
    instead. ``signature(grad)`` is the call's (name, value) pairs that key a measured
    decision; ``dtype`` the call's compute dtype.

    Inside a module's call plan (:mod:`cvt_kernels._plan`) the plan's backend answers
    (replaying), or the choice is recorded in it (recording)."""
    t = _plan.THREAD
    if t.replay is not None:
        backend = _plan.replayed(op)
        if backend is not None:
            return backend
    if t.record is not None:
        return _plan.recorded(op, lambda: _choose(op, ask, key, inputs, call, signature,
                                                  dtype, device, output_names, prepare))
    return _choose(op, ask, key, inputs, call, signature, dtype, device, output_names,
                   prepare)


def _choose(op, ask, key, inputs, call, signature, dtype, device, output_names, prepare
            ) -> backends.Backend:
    if backends.forced_backend() is not None:
        return backends.select(op, ask, key=key)
    names = backends.candidates(op, ask, key)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for _, t in inputs)

    def default_prepare(name: str, truth: bool) -> trials.Run:
        start = time.perf_counter()
        to = trials.TRUTH_DTYPE if truth else None
        copies = [trials.copy_input(t, to, True, grad) for _, t in inputs]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return trials.Run(lambda: trial_context(name, truth, device), call, copies,
                          [n for n, _ in inputs], output_names, grad, dtype,
                          harness_ms=1e3 * (time.perf_counter() - start),
                          candidate="truth" if truth else name)

    run = default_prepare if prepare is None else (lambda n, t: prepare(n, t, grad))
    decision = dispatch.decide(op, signature(grad), names, run, "torch", dtype, device)
    return backends.get_backend(decision.choice)
