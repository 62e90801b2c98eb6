"""Call plans: a fused module's checks and backend choices made once per call signature.

A block-scope call runs seven to nine ops; each validated its arguments and asked the
dispatcher for a backend on every call (``benchmarks.overhead --module block``: most of
the host time of a stubbed call). A module that adopts plans (``FusedBlock``, the Hugging
Face ``FusedHFCvtLayer``) instead reads what its forward needs from its submodules once per
call into a flat tuple of arguments, keys a plan on :func:`signature` of those arguments
and :func:`state` (the process and thread settings every choice depends on), and:

* on a miss runs its forward fully validated while :func:`recording` the backend each op
  chose (``ops._choice.choose_backend``), and keeps the choices as the plan;
* on a hit runs the same forward without the checks (the same signature passed them),
  the ops taking the recorded backends in order (:func:`replaying`).

What a plan holds is choices and the fact that the checks passed: never a tensor, nothing
derived from parameter values (a ``.data`` write that changes a dtype, device, shape or
``requires_grad`` changes the signature and re-validates; one that changes values only
changes nothing a plan holds). Tracing (``torch.compile``, ``torch.export``) and
``torch.func`` transforms bypass plans: Dynamo must not guard on a dict of them.

Anything that may change an existing choice bumps :func:`generation` (``dispatch.clear``,
a backend registered or its remembered reasons cleared): every plan made before is
ignored from then on.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

# The counter lives below dispatch and the backends, which bump it (tests/test_layering.py).
from ._plan_generation import _GENERATION, bump_generation, generation

__all__ = ["bump_generation", "generation", "next_choice", "recording", "replaying", "run",
           "signature", "state"]

#: Plans kept per module (new signatures beyond it replace the oldest ones).
MAX_PLANS = 32


class _Thread(threading.local):
    """Per thread: the choices being recorded (a list) or replayed (a tuple and the next
    position), so a plan replayed in one thread never answers another thread's ops."""

    def __init__(self):
        self.record: Optional[List[Tuple[str, str]]] = None
        self.replay: Optional[tuple] = None
        self.pos = 0


THREAD = _Thread()


_REGISTRY: Optional[dict] = None


def _registry() -> dict:
    global _REGISTRY
    if _REGISTRY is None:
        from .backends import _REGISTRY as registry  # backends imports this module

        _REGISTRY = registry
    return _REGISTRY


def replayed(op: str):
    """The backend the plan being replayed holds for the next choice, when it is one of
    ``op`` (``ops._choice.choose_backend`` asks first); ``None`` otherwise, and replaying
    stops: the rest of the call chooses as usual."""
    t = THREAD
    replay = t.replay
    if replay is None:
        return None
    pos = t.pos
    if pos < len(replay) and replay[pos][0] == op:
        t.pos = pos + 1
        return _registry()[replay[pos][1]]
    t.replay = None
    return None


def next_choice(op: str):
    """:func:`replayed` when a plan is being replayed in this thread, else ``None``: for
    an op to ask before it builds what a choice needs (closures, signatures)."""
    return replayed(op) if THREAD.replay is not None else None


def recorded(op: str, choose: Callable[[], object]):
    """``choose()``, appended to the plan being recorded; choices made inside it (a
    dispatcher trial runs the op again) are not the call's own and are not recorded."""
    t = THREAD
    record = t.record
    if record is None:
        return choose()
    t.record = None
    try:
        backend = choose()
    finally:
        t.record = record
    record.append((op, backend.name))
    return backend


def state(device: torch.device) -> tuple:
    """What every choice (and check) depends on besides the call's own arguments: grad
    mode, the forced backend (this thread's ``use_backend``, else ``CVT_KERNELS_BACKEND``),
    the dispatch policy (``CVT_KERNELS_DISPATCH``) and whether timing is possible, the
    dispatcher's context (device, autocast dtype, float32 precision flags), the one-pass
    policy, and the plans' generation."""
    m = _MODULES or _import_modules()
    backends, dispatch, one_pass = m
    return (torch.is_grad_enabled(), backends.forced_backend(), dispatch.policy(),
            dispatch.can_measure(device), dispatch.context(device), one_pass.mode(),
            _GENERATION[0])


_MODULES: tuple = ()


def _import_modules() -> tuple:
    global _MODULES
    from . import backends, dispatch  # they import this module
    from .ops import one_pass

    _MODULES = (backends, dispatch, one_pass)
    return _MODULES


def signature(args: tuple) -> tuple:
    """``args`` with every tensor replaced by what checks and choices read of it: type
    (plain or a subclass), shape, dtype, device, ``requires_grad`` (never its values);
    nested tuples likewise."""
    out = []
    for a in args:
        if isinstance(a, Tensor):
            out.append((type(a), a.shape, a.dtype, a.device, a.requires_grad))
        elif isinstance(a, tuple):
            out.append(signature(a))
        else:
            out.append(a)
    return tuple(out)


class recording:
    """Records the backend of each op choice made in this thread inside the block."""

    def __init__(self):
        self.choices: List[Tuple[str, str]] = []

    def __enter__(self):
        t = THREAD
        self._saved = (t.record, t.replay, t.pos)
        t.record, t.replay = self.choices, None
        return self

    def __exit__(self, *exc):
        t = THREAD
        t.record, t.replay, t.pos = self._saved
        return False


class replaying:
    """Answers this thread's op choices inside the block from ``choices``, in order."""

    def __init__(self, choices: tuple):
        self.choices = choices
        self.complete = False

    def __enter__(self):
        t = THREAD
        self._saved = (t.record, t.replay, t.pos)
        t.record, t.replay, t.pos = None, self.choices, 0
        return self

    def __exit__(self, *exc):
        t = THREAD
        self.complete = t.replay is self.choices and t.pos == len(self.choices)
        t.record, t.replay, t.pos = self._saved
        return False


class Stats:
    """Counters for tests: plans recorded (each one a fully validated call), replayed, and
    of those replayed how many took the plan's direct path."""
    recorded = 0
    replayed = 0
    direct = 0


#: A direct path: ``direct(x, h, w, args)``, the same call with the recorded choices
#: wired in (no op layer, no choices asked), or ``None``.
Direct = Optional[Callable[[Tensor, int, int, tuple], Tensor]]

#: Whether plans recorded from now on may take direct paths (read when a plan is made, so
#: it costs no call anything): ``python -m benchmarks.overhead --no-direct`` measures
#: without them.
DIRECT_PATHS = True


def run(module: torch.nn.Module, x: Tensor, h: int, w: int, args: tuple,
        forward: Callable[[Tensor, int, int, tuple, bool], Tensor],
        direct_for: Optional[Callable[[tuple, Tensor, int, int, tuple], Direct]] = None
        ) -> Tensor:
    """``forward(x, h, w, args, checked)`` through ``module``'s plan for this call.

    ``args`` must hold everything ``forward`` reads besides ``x``, ``h`` and ``w``
    (tensors, module settings): the plan's key is their :func:`signature`, ``x``'s, ``h``,
    ``w`` and :func:`state`. ``direct_for(choices, x, h, w, args)``, asked once when a plan
    is recorded, may return a :data:`Direct` path that later calls with the same key take
    instead of replaying ``forward`` (it must compute exactly what ``forward`` does with
    those choices: ``cvt_kernels.block.direct_eval``)."""
    if (torch.compiler.is_compiling() or not isinstance(x, Tensor)
            or torch._C._are_functorch_transforms_active()):
        return forward(x, h, w, args, True)
    gen = _GENERATION[0]
    key = ((type(x), x.shape, x.dtype, x.device, x.requires_grad), h, w, state(x.device),
           signature(args))
    plans: Dict[tuple, tuple] = module.__dict__.get("_cvt_plans")
    if plans is None:
        plans = module.__dict__["_cvt_plans"] = {}
    plan = plans.get(key)
    if plan is not None:
        choices, direct = plan
        Stats.replayed += 1
        if direct is not None:
            Stats.direct += 1
            return direct(x, h, w, args)
        with replaying(choices) as rep:
            out = forward(x, h, w, args, False)
        if not rep.complete:  # the ops chose differently from the plan: never again
            plans.pop(key, None)
        return out
    with recording() as rec:
        out = forward(x, h, w, args, True)
    Stats.recorded += 1
    if _GENERATION[0] == gen:  # nothing was forgotten meanwhile (another thread)
        if len(plans) >= MAX_PLANS:
            try:
                plans.pop(next(iter(plans)), None)
            except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                pass
        choices = tuple(rec.choices)
        direct = direct_for(choices, x, h, w, args) if direct_for and DIRECT_PATHS else None
        plans[key] = (choices, direct)
    return out
