"""Backend registry and dispatcher: which backend runs a call, or why not.

Each backend answers, per call, the list of reasons it cannot run it (an empty list means
it can). Without a forced backend the first one in :data:`AUTO_ORDER` that can run a call
runs it under the fixed policy; ``torch`` can run every call, so there is always one. The
kernel backends are not in that order (:data:`NOT_AUTO` says why: on the first GPU
measurements, an H200, the ``triton`` backend was slower than ``torch`` at every CvT-13
block shape, and the ``cuda`` backend has not run on a GPU yet). Under the measured policy
(the default) the ops ask :func:`candidates` instead, and ``cvt_kernels.dispatch`` checks
and times them per call shape on a GPU.

Forcing a backend, for every call in scope:

* ``CVT_KERNELS_BACKEND=reference|torch|triton|cuda|auto`` in the environment, or
* ``with cvt_kernels.use_backend("torch"): ...`` (takes precedence over the variable).

A forced backend that cannot run a call raises :class:`BackendUnavailableError` listing
the reasons; it never silently falls back. :func:`explain` returns the reasons of every
backend for a call, so callers can print why a fused path was not taken.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .. import _plan_generation
from .base import Backend, ProjectionConfig, ProjectionGrads, ProjectionParams  # noqa: F401
from .reference import ReferenceBackend
from .torch_ops import TorchBackend

__all__ = [
    "AUTO_ORDER",
    "CANDIDATES",
    "KNOWN_BACKENDS",
    "NOT_AUTO",
    "Backend",
    "BackendUnavailableError",
    "ProjectionConfig",
    "ProjectionParams",
    "available_backends",
    "candidates",
    "clear_selection_cache",
    "explain",
    "forced_backend",
    "get_backend",
    "register_backend",
    "select",
    "use_backend",
]

ENV_VAR = "CVT_KERNELS_BACKEND"
#: Preference order when no backend is forced. ``reference`` is the oracle: never automatic.
#: The fixed policy's order (``CVT_KERNELS_DISPATCH=fixed``); the measured policy compares
#: :data:`CANDIDATES` per call shape instead (see :data:`NOT_AUTO` for why the kernel
#: backends are not in this order).
AUTO_ORDER = ("torch",)
#: Kernel backends left out of the fixed order, and why (``python -m cvt_kernels.info``);
#: the measured dispatch still considers them, per call shape, on a GPU.
NOT_AUTO = {
    "triton": ("slower than the torch backend in every CvT-13 block measured on an H200 "
               "(bf16, batch 64, eval and train, wall and CUDA-graph time: "
               "benchmarks/results/h200/2026-11-30_e4e1ada)"),
    "cuda": "not verified on a GPU yet",
}
KNOWN_BACKENDS = ("reference", "torch", "triton", "cuda")
_NAMES = KNOWN_BACKENDS + ("auto",)

_REGISTRY: Dict[str, Backend] = {}
_NOT_REGISTERED: Dict[str, str] = {
    "triton": "not implemented in this version of cvt_kernels",
}

class _Forced(threading.local):
    """The backends forced by :func:`use_backend`, innermost last: per thread, so a trial
    or a forced block in one thread never decides what another thread runs. A
    ``threading.local`` rather than a ``ContextVar``: Dynamo traces attribute reads of a
    thread-local (and guards on them, so a compiled model follows a change), while it
    cannot trace ``ContextVar.get`` (torch 2.13: "Unsupported method call")."""

    def __init__(self):
        self.stack: List[str] = []


_forced = _Forced()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run a call; the message lists its reasons."""


# (op, forced backend, call key) -> the backend name select() chose: the reasons depend only
# on what the key holds, and asking every backend costs tens of microseconds a call.
_SELECTED: Dict[tuple, str] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _NOT_REGISTERED.pop(backend.name, None)
    clear_selection_cache()


def clear_selection_cache() -> None:
    """Forget :func:`select`'s and :func:`candidates`' remembered answers (after changing a
    backend's behaviour)."""
    _SELECTED.clear()
    _CANDIDATES_OF.clear()
    _plan_generation.bump_generation()  # call plans hold choices made from these


def _check_name(name: str, what: str) -> str:
    """``name`` in lower case (names are case-insensitive wherever a user types one), or a
    ``ValueError`` naming ``what``."""
    normalized = name.strip().lower() if isinstance(name, str) else name
    if normalized not in _NAMES:
        raise ValueError(f"{what}: expected one of {', '.join(_NAMES)} (any case), got "
                         f"{name!r}")
    return normalized


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``CVT_KERNELS_BACKEND`` (``None``: auto)."""
    # Every op call asks (seven per block-scope block), under torch.compile too: no cache
    # here (Dynamo warns about lru_cache), only cheap work (the names are one constant).
    stack = _forced.stack
    if stack:
        name = stack[-1]
    else:
        name = _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    return None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (or ``"auto"``; any case, like ``CVT_KERNELS_BACKEND``) for every call
    inside the ``with`` block.

    The setting is per thread: another thread (a data loader, a second model served
    concurrently, the dispatcher's trials) keeps its own. ``CVT_KERNELS_BACKEND`` is
    process-wide. A model compiled with ``torch.compile`` retraces when the forced backend
    changes (Dynamo guards on it).
    """
    stack = _forced.stack
    stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        stack.pop()


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; raises with the reason when it does not exist here."""
    name = _check_name(name, "backend")
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"backend {name!r}: {_NOT_REGISTERED.get(name, 'unknown')}")
    return _REGISTRY[name]


def available_backends() -> Dict[str, Optional[str]]:
    """Each known backend and why it cannot run at all here (``None``: it can)."""
    out: Dict[str, Optional[str]] = {}
    for name in KNOWN_BACKENDS:
        if name in _REGISTRY:
            out[name] = _REGISTRY[name].unavailable_reason()
        else:
            out[name] = _NOT_REGISTERED.get(name, "unknown")
    return out


def _reasons(backend: Backend, ask: Callable[[Backend], List[str]]) -> List[str]:
    global_reason = backend.unavailable_reason()
    if global_reason is not None:
        return [global_reason]
    return ask(backend)


def explain(ask, *args, **kwargs) -> Dict[str, List[str]]:
    """Reasons each backend gives for one call: ``ask(backend)`` returns its reasons, or
    name the op and pass its tensors: ``explain("attention", q, k, v, num_heads,
    dropout_p=0.0)``, ``explain("conv_projection", x, cfg, training=False)`` (``cfg`` a
    ``ProjectionConfig``). An empty list: that backend can run the call; which of those
    serves it is the dispatcher's decision (``cvt_kernels.dispatch.decisions()``)."""
    if isinstance(ask, str):
        ask = _asker(ask, *args, **kwargs)
    out: Dict[str, List[str]] = {}
    for name in KNOWN_BACKENDS:
        if name in _REGISTRY:
            out[name] = _reasons(_REGISTRY[name], ask)
        else:
            out[name] = [_NOT_REGISTERED.get(name, "unknown")]
    return out


def _asker(op: str, *args, **kwargs) -> Callable[[Backend], List[str]]:
    if op == "attention":
        q, k, v, num_heads = args[:4]
        dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        return lambda b: b.attention_reasons(q, k, v, num_heads, dropout_p)
    if op == "conv_projection":
        x, cfg = args[:2]
        training = args[2] if len(args) > 2 else kwargs.get("training", False)
        return lambda b: b.conv_projection_reasons(x, cfg, training)
    raise ValueError(f"explain: op {op!r}: expected 'attention' or 'conv_projection' (or a "
                     f"callable asking each backend)")


def select(op: str, ask: Callable[[Backend], List[str]], key: Optional[tuple] = None
           ) -> Backend:
    """The backend that runs one call of ``op``.

    ``ask(backend)`` returns that backend's reasons for declining the call. ``key``, when
    given, holds everything those reasons depend on (device, dtype, configuration): the
    choice is then remembered for the key in eager mode (a forced backend that declines
    is not remembered: it raises every time).
    """
    forced = forced_backend()
    remember = key is not None and not torch.compiler.is_compiling()
    if remember:
        hit = _SELECTED.get((op, forced, key))
        if hit is not None:
            return _REGISTRY[hit]
    if forced is not None:
        backend = get_backend(forced)
        reasons = _reasons(backend, ask)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: forced backend {forced!r} cannot run this call: " + "; ".join(reasons))
        if remember:
            _SELECTED[(op, forced, key)] = backend.name
        return backend
    for name in AUTO_ORDER:
        backend = _REGISTRY.get(name)
        if backend is not None and not _reasons(backend, ask):
            if remember:
                _SELECTED[(op, forced, key)] = backend.name
            return backend
    # Unreachable while the torch backend accepts every call; kept as a clear error.
    details = "; ".join(f"{n}: {', '.join(r)}" for n, r in explain(ask).items())
    raise BackendUnavailableError(f"{op}: no backend can run this call ({details})")


#: What the measuring dispatcher compares (``cvt_kernels.dispatch``), stock PyTorch first:
#: the first that can run a call is the fixed order's choice.
CANDIDATES = ("torch", "triton", "cuda")
_CANDIDATES_OF: Dict[tuple, Tuple[str, ...]] = {}


def candidates(op: str, ask: Callable[[Backend], List[str]], key: tuple) -> Tuple[str, ...]:
    """The backends of :data:`CANDIDATES` that can run one call of ``op`` (their reasons are
    empty), in that order; remembered per ``key`` like :func:`select`'s choices."""
    remember = not torch.compiler.is_compiling()
    if remember:
        hit = _CANDIDATES_OF.get((op, key))
        if hit is not None:
            return hit
    names = tuple(n for n in CANDIDATES if n in _REGISTRY and not _reasons(_REGISTRY[n], ask))
    if remember:
        _CANDIDATES_OF[(op, key)] = names
    return names


register_backend(ReferenceBackend())
register_backend(TorchBackend())


def _register_triton() -> None:
    # The triton backend exists only where ``import triton`` works; elsewhere it keeps a
    # reason. Errors inside cvt_kernels' own Triton module are not swallowed.
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        _NOT_REGISTERED["triton"] = f"triton is not importable ({type(exc).__name__}: {exc})"
        return
    from .triton import TritonBackend

    register_backend(TritonBackend())


_register_triton()


def _register_cuda() -> None:
    # Always registered: without the extension (cvt_kernels._C, or a JIT build under
    # CVT_KERNELS_JIT=1) it reports "not built: <reason>" as its unavailable_reason. The
    # extension is looked up here, once: the dispatcher also runs while torch.compile
    # traces, where an import cannot run. Without CVT_KERNELS_JIT=1 that is an import
    # attempt; with it, the first import of cvt_kernels compiles csrc/ (minutes), later
    # ones reuse the cached build.
    from .cuda import CudaBackend

    backend = CudaBackend()
    backend.ext  # noqa: B018 (resolves the extension or the reason now)
    register_backend(backend)


_register_cuda()
