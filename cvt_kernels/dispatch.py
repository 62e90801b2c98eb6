"""Measured, checked dispatch: which implementation serves a call, decided once per key.

On the first GPU (an H200) the Triton kernels were correct but slower than stock PyTorch at
every CvT-13 block shape; on another GPU, shape or version the answer may differ, and a
kernel nobody ran on that hardware may even be wrong. So, like ``cudnn.benchmark`` and
Triton's autotuner, the choice is made on the user's machine, per key (op, shapes, dtype,
train or eval, device, versions), from the candidates that can run the call:

1. **checked**: each candidate runs once on copies of the call's data (in training forward
   and backward with a random cotangent, on copies of the running statistics, so the
   module's own statistics and counters do not move); its tensors are compared with a
   *truth* at higher precision, and it is excluded, with a ``RuntimeWarning`` naming the
   reason, when its error exceeds twice the *baseline*'s (stock PyTorch in the same dtype)
   plus a small eps (:mod:`cvt_kernels.agreement`) or when it raises;
2. **timed**: CUDA events, the candidates alternating, median of :data:`REPS` rounds;
3. **kept**: the fastest correct candidate serves the key for the life of the process and,
   through a JSON file (:data:`CACHE_ENV`), of later processes on the same machine and
   versions.

Nothing is timed where timing is impossible or unwanted: on CPU, under ``torch.compile``
tracing, during CUDA-graph capture, with ``torch.use_deterministic_algorithms(True)``, or
with ``CVT_KERNELS_DISPATCH=fixed``. There a decision made earlier for the key serves, else
the first candidate (the fixed order: stock PyTorch first).

How a call reaches a kernel (``FusedConvAttention.forward``):

1. ``fused_attention`` validates q, k and v's projection arguments, then for each
   projection ``ops.conv_projection.run_conv_projection``;
2. which asks the dispatcher: a forced backend (``CVT_KERNELS_BACKEND``, ``use_backend``)
   serves directly; otherwise :func:`decide` over the backends whose reasons are empty
   (``backends.candidates``), keyed by the call;
3. the chosen backend runs: a composite one (``torch``) as stock ops, a kernel one
   (``triton``, ``cuda``) through an ``autograd.Function`` in eager mode or the
   ``torch.library`` custom op when traced;
4. ``ops.attention.attention`` does the same for the attention core, and
   ``ops.one_pass.run_faster`` for "one pass vs separate kernels" in eval.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import agreement

POLICY_ENV = "CVT_KERNELS_DISPATCH"
POLICIES = ("measure", "fixed")
#: Path of the JSON file of decisions; ``off`` (or ``0``, ``none``) keeps them in memory.
CACHE_ENV = "CVT_KERNELS_DISPATCH_CACHE"
#: Timed rounds per candidate (the median is kept).
REPS = 7
_FILE_FORMAT = 1

Tensors = List[Optional[Tensor]]


_POLICY_SEEN = ("", "measure")  # (the variable's raw value, its policy): read per call


def policy() -> str:
    """``CVT_KERNELS_DISPATCH``: ``measure`` (default) or ``fixed`` (any case)."""
    global _POLICY_SEEN
    raw = os.environ.get(POLICY_ENV, "")
    if raw == _POLICY_SEEN[0]:
        return _POLICY_SEEN[1]
    value = raw.strip().lower() or "measure"
    if value not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={raw!r}: expected one of {', '.join(POLICIES)}")
    _POLICY_SEEN = (raw, value)
    return value


def cache_path() -> Optional[Path]:
    """The decisions file, or ``None`` when persistence is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cvt_kernels" / "dispatch.json"


@dataclass
class Decision:
    """What serves one key, and the evidence: each candidate's median time (ms) and error
    against the truth, and why any candidate was excluded."""
    choice: str
    source: str                       # measured | cache | fixed | only candidate
    candidates: List[str]
    times_ms: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    excluded: Dict[str, str] = field(default_factory=dict)
    key: str = ""                     # the readable key (JSON): op, call signature, versions


# (op, call signature, candidates) -> Decision: the per-call lookup stays a dict hit.
_DECISIONS: Dict[tuple, Decision] = {}
_LOOKED_UP: set = set()  # keys already looked up in the file by this process
_LOCK = threading.RLock()


def remembered() -> Dict[tuple, Decision]:
    """This process's decisions by (op, call signature, candidates)."""
    with _LOCK:
        return dict(_DECISIONS)


def decisions() -> Dict[str, Decision]:
    """Every decision this process made or loaded, by readable key."""
    with _LOCK:
        return {d.key: d for d in _DECISIONS.values()}


def clear() -> None:
    """Forget this process's decisions (the file stays)."""
    with _LOCK:
        _DECISIONS.clear()
        _LOOKED_UP.clear()


def versions(device: torch.device) -> Dict[str, str]:
    """What a decision depends on besides the call: the GPU model and the software."""
    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 (any broken install: the key just says so)
        triton_version = "none"
    out = {"torch": torch.__version__, "triton": triton_version, "cvt_kernels": __version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out["device"] = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        out["device"] = device.type
    return out


def make_key(op: str, parts: tuple, device: torch.device) -> str:
    """The readable, JSON-safe key of a decision: the op, the call's signature (``parts``,
    pairs of name and value) and the versions it depends on."""
    signature = {name: (list(v) if isinstance(v, tuple) else
                        v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                 for name, v in parts}
    return json.dumps({"op": op, **signature, **versions(device)}, sort_keys=True)


def can_measure(device: torch.device) -> bool:
    """Timing is allowed: a CUDA device, eager mode, no capture, no deterministic mode, and
    the ``measure`` policy."""
    return (device.type == "cuda" and policy() == "measure"
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
            and not torch.are_deterministic_algorithms_enabled())


def decide(op: str, parts: tuple, candidates: Sequence[str], run: Callable[[str], Tensors],
           truth: Optional[Callable[[], Tensors]], baseline: str, dtype: torch.dtype,
           device: torch.device, names: Sequence[str] = ("out",)) -> Decision:
    """The candidate that serves this call of ``op``: remembered, loaded from the file,
    measured now (:func:`can_measure`), or the first of ``candidates`` (the fixed order).

    ``parts`` is the call's signature, a tuple of (name, value) pairs (shapes, dtype, mode,
    configuration) that with ``op`` and the versions keys the decision. ``run(name)`` runs
    candidate ``name`` once on copies of the call's data and returns the tensors to check
    (``names`` labels the first ones; the rest, gradients and statistics, are judged
    together); ``truth()`` computes them at higher precision. Without a truth (``None``:
    paths with no precise twin) each candidate must agree with ``baseline``'s own result to
    a per-dtype tolerance."""
    if not candidates:
        raise ValueError(f"{op}: no candidate can run this call")
    if policy() == "fixed":  # reproducible anywhere: neither timing nor remembered choices
        return Decision(candidates[0], "fixed", list(candidates), key=op)
    fast = (op, parts, candidates if isinstance(candidates, tuple) else tuple(candidates))
    hit = _DECISIONS.get(fast)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling():  # a trace may not time, take locks or read files
        return Decision(candidates[0], "fixed", list(candidates), key=op)
    if len(candidates) == 1:
        decision = Decision(candidates[0], "only candidate", list(candidates),
                            key=make_key(op, parts, device))
        _DECISIONS[fast] = decision
        return decision
    with _LOCK:
        hit = _DECISIONS.get(fast)  # another thread may have decided meanwhile
        if hit is not None:
            return hit
        key = make_key(op, parts, device)
        decision = _load(key, candidates) if fast not in _LOOKED_UP else None
        _LOOKED_UP.add(fast)  # the file is read once per key and process
        if decision is None and not can_measure(device):
            return Decision(candidates[0], "fixed", list(candidates), key=key)
        if decision is None:
            decision = _measure(candidates, run, truth, baseline, dtype, names)
            decision.key = key
            _store(key, decision)
        _DECISIONS[fast] = decision
        return decision


def _measure(candidates: Sequence[str], run: Callable[[str], Tensors],
             truth: Optional[Callable[[], Tensors]], baseline: str, dtype: torch.dtype,
             names: Sequence[str]) -> Decision:
    decision = Decision(baseline, "measured", list(candidates))
    results: Dict[str, Tensors] = {}
    for name in candidates:
        try:
            results[name] = run(name)
        except Exception as exc:  # noqa: BLE001 (a candidate that cannot run here is excluded)
            if name == baseline:
                raise
            decision.excluded[name] = f"raised {type(exc).__name__}: {str(exc)[:160]}"
    reference = truth() if truth is not None else None
    for name, tensors in list(results.items()):
        if name == baseline:
            continue
        why = _disagreement(tensors, results[baseline], reference, dtype, names, baseline)
        if why is not None:
            decision.excluded[name] = why
            del results[name]
        else:
            decision.errors[name] = _error_text(tensors, reference or results[baseline])
    if reference is not None:
        decision.errors[baseline] = _error_text(results[baseline], reference)
    for name, why in decision.excluded.items():
        warnings.warn(f"cvt_kernels: the {name} candidate is excluded for this call's shape: "
                      f"{why}; please report this as a bug", RuntimeWarning, stacklevel=4)
    if len(results) > 1:  # an excluded candidate is never timed, let alone chosen
        decision.times_ms = time_candidates({n: (lambda n=n: run(n)) for n in results})
    decision.choice = min(results, key=lambda n: (decision.times_ms.get(n, 0.0),
                                                  n != baseline))
    return decision


# One tensor per name in ``names``; the rest are gradients and statistics.
def _disagreement(ours: Tensors, base: Tensors, truth: Optional[Tensors],
                  dtype: torch.dtype, names: Sequence[str], baseline: str) -> Optional[str]:
    if len(ours) != len(base):
        return f"returned {len(ours)} tensors, the baseline {len(base)}"
    if truth is None:  # no precise twin: agree with the baseline to the dtype's tolerance
        for i, (a, b) in enumerate(zip(ours, base)):
            if a is None or b is None:
                continue
            err = relative_error(a, b)
            tolerance = _NO_TRUTH_TOLERANCE.get(dtype, 1e-6)
            if not err <= tolerance:
                label = names[i] if i < len(names) else f"tensor {i}"
                return (f"its {label} differs from the {baseline} path's by {err:.2e} "
                        f"(relative to the largest value; tolerance {tolerance:.0e})")
        return None
    verdicts = [agreement.judge(label, o, b, t, dtype)
                for label, o, b, t in zip(names, ours, base, truth)
                if o is not None and b is not None and t is not None]
    rest = len(names)
    if len(truth) > rest:
        verdicts.append(agreement.judge_all("gradients and statistics", ours[rest:],
                                            base[rest:], truth[rest:], dtype, 1e-3))
    failing = [v for v in verdicts if not v.ok]
    if failing:
        return (f"error against the truth above twice the {baseline} backend's: "
                + agreement.describe(failing))
    return None


def relative_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| over the finite entries of ``b``; infinite where NaN/Inf sit in
    different places (NaN and Inf inputs propagate the same way through both paths)."""
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    a, b = a[finite].double(), b[finite].double()
    if b.numel() == 0:
        return 0.0
    scale, error = b.abs().max().item(), (a - b).abs().max().item()
    return error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))


# Paths compared with each other rather than with a truth (the one-pass kernel vs the
# separate kernels): both round intermediate values differently, so this catches a broken
# kernel, not the last bits (the tests check those against the reference).
_NO_TRUTH_TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2,
                       torch.float64: 1e-9}


def _error_text(tensors: Tensors, reference: Tensors) -> str:
    pairs = [(a, b) for a, b in zip(tensors, reference) if a is not None and b is not None]
    if not pairs:
        return "n/a"
    return f"{max(agreement.error(a, b) for a, b in pairs):.1e}"


def time_candidates(fns: Dict[str, Callable[[], object]]) -> Dict[str, float]:
    """Median milliseconds of one call of each, CUDA events on the current stream, the
    candidates alternating round by round (each already ran once: compiled and tuned)."""
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(REPS):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(xs) for name, xs in samples.items()}


# ------------------------------------------------------------------------- persistence
def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") == _FILE_FORMAT and isinstance(data.get("decisions"), dict):
            return data
    except (OSError, ValueError, AttributeError):
        pass  # missing, unreadable or foreign: start afresh (never fail a model over it)
    return {"format": _FILE_FORMAT, "decisions": {}}


def _load(key: str, candidates: Sequence[str]) -> Optional[Decision]:
    path = cache_path()
    if path is None:
        return None
    entry = _read(path)["decisions"].get(key)
    if not entry or entry.get("choice") not in candidates:
        return None  # unknown, or chosen among candidates this process does not have
    fields = {k: v for k, v in entry.items() if k in Decision.__dataclass_fields__}
    try:
        decision = Decision(**fields)
    except TypeError:
        return None
    decision.source, decision.key = "cache", key
    return decision


def _store(key: str, decision: Decision) -> None:
    """Adds one decision to the file: read, merge, write a temporary file beside it and
    rename it over the old one (atomic), under an advisory lock where the OS has one, so
    concurrent processes neither corrupt the file nor lose each other's entries."""
    path = cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            data = _read(path)
            entry = {k: v for k, v in asdict(decision).items() if k != "key"}
            data["decisions"][key] = {**entry, "source": "measured"}
            data["decisions"][key]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not fail a model: keep it in memory
        warnings.warn(f"cvt_kernels: could not write the dispatch cache {path} ({exc}); "
                      f"set {CACHE_ENV}=off or to a writable path", RuntimeWarning,
                      stacklevel=3)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: atomic replace alone (a concurrent entry may be lost)
        yield
        return
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def candidate_texts(decision: Decision, reason_width: Optional[int] = None) -> List[str]:
    """Each candidate's evidence: its median time and error, or why it was excluded (cut to
    ``reason_width`` characters when given)."""
    texts = []
    for name in decision.candidates:
        if name in decision.excluded:
            texts.append(f"{name}: excluded ({decision.excluded[name][:reason_width]})")
            continue
        t = decision.times_ms.get(name)
        texts.append(f"{name}: {t:.3f} ms" if t is not None else name)
        if name in decision.errors:
            texts[-1] += f", err {decision.errors[name]}"
    return texts


def describe(decision: Decision) -> str:
    """One line: the choice, how it was made, every candidate's time and error."""
    return f"{decision.choice} ({decision.source}; {'; '.join(candidate_texts(decision))})"


def random_like(t: Tensor, via: Optional[torch.dtype] = None, seed: int = 0) -> Tensor:
    """A cotangent of size ~1, the same for every candidate (a fixed seed, drawn on the CPU
    in float32), rounded to ``via`` first (the call's dtype, so a float32 truth sees exactly
    the bf16 candidates' cotangent), then in ``t``'s dtype."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(t.shape, generator=g)
    if via is not None:
        out = out.to(via)
    return out.to(device=t.device, dtype=t.dtype)


@contextlib.contextmanager
def truth_mode(device: torch.device):
    """While a truth is computed: autocast off, TF32 off."""
    with torch.autocast(device.type, enabled=False), agreement.exact_float32():
        yield


def copy_for_trial(t: Optional[Tensor], dtype: Optional[torch.dtype], leaf: bool,
                   grad: bool) -> Optional[Tensor]:
    """A detached copy of one input for a trial call (in ``dtype`` when given and ``t`` is
    floating), a leaf that requires grad when ``leaf and grad``."""
    if t is None:
        return None
    out = t.detach()
    if dtype is not None and out.is_floating_point():
        out = out.to(dtype)
    out = out.clone()
    return out.requires_grad_(True) if leaf and grad and out.is_floating_point() else out


__all__ = ["CACHE_ENV", "POLICIES", "POLICY_ENV", "REPS", "Decision", "cache_path",
           "can_measure", "clear", "copy_for_trial", "decide", "decisions", "describe",
           "make_key", "policy", "random_like", "time_candidates", "truth_mode", "versions"]
