"""Measured, checked dispatch: which implementation serves a call, decided once per key.

On the first GPU (an H200) the Triton kernels were correct but slower than stock PyTorch at
every CvT-13 block shape; on another GPU, shape or version the answer may differ, and a
kernel nobody ran on that hardware may even be wrong. So, like ``cudnn.benchmark`` and
Triton's autotuner, the choice is made on the user's machine, per key, from the candidates
that can run the call (:mod:`cvt_kernels.trials` runs them):

1. **checked**: each candidate runs once on copies of the call's data made on the call's
   device (in training, forward and backward against a fixed cotangent, on copies of the
   running statistics, so the module's own statistics and counters do not move). *Every*
   tensor it returns is compared with a float64 truth (the ``torch`` backend): each output,
   the gradient of every input that requires one, the running statistics. It is excluded,
   with a ``RuntimeWarning`` naming the tensor, when one error exceeds twice the
   *baseline*'s (stock PyTorch in the same dtype) plus a small eps
   (:mod:`cvt_kernels.agreement`), or when it raises;
2. **timed**: CUDA events around the candidate alone (copies and cotangents are made
   before), several runs per sample (about a millisecond), :data:`trials.SAMPLES` samples
   alternating between candidates, the median kept, under a guard for the call's device.
   Each candidate's harness cost (copies, cotangents) is recorded beside its time;
3. **kept**: the fastest correct candidate serves the key for the life of the process and,
   through a JSON file (:data:`CACHE_ENV`; :mod:`cvt_kernels.dispatch_file` reads,
   checks and writes it, and a file it cannot use is one warning, never an error), of later
   processes.

The key (:func:`make_key`) holds the op and the call's signature (shapes, dtypes, mode,
configuration), the candidate set, the autocast dtype, the float32 precision flags (TF32 in
cuBLAS and cuDNN, ``float32_matmul_precision``), the device's name and compute capability,
the torch, Triton and cvt_kernels versions and a digest of the package's code: a decision
made by other code, other settings or on another device is measured again, never reused.

Nothing is timed where timing is impossible or unwanted: on CPU, during CUDA-graph capture,
under ``torch.compile``/``torch.export`` tracing, with
``torch.use_deterministic_algorithms(True)``, or with ``CVT_KERNELS_DISPATCH=fixed``. There
a decision made earlier for the key serves (in memory, else from the file), else the first
candidate (the fixed order: stock PyTorch first). While tracing, the lookup runs once at
trace time (``torch.compiler.assume_constant_result``), so what ``python -m
cvt_kernels.tune`` decided is what compiled and exported programs run; with symbolic shapes
(a dynamic batch) the decision made for the same op and mode at the last concrete shape
serves. ``CVT_KERNELS_DISPATCH=fixed`` ignores every remembered decision.

How a call reaches a kernel (``FusedConvAttention.forward``):

1. ``fused_attention`` validates q, k and v's projection arguments, then for each
   projection ``ops.conv_projection.run_conv_projection``;
2. which asks :func:`cvt_kernels.ops._choice.choose_backend`: a forced backend
   (``CVT_KERNELS_BACKEND``, ``use_backend``, per thread) serves directly; otherwise
   :func:`decide` over the backends whose reasons are empty (``backends.candidates``);
3. the chosen backend runs: a composite one (``torch``) as stock ops, a kernel one
   (``triton``, ``cuda``) through an ``autograd.Function`` in eager mode or the
   ``torch.library`` custom op when traced;
4. ``ops.attention.attention`` does the same for the attention core, and
   ``ops.one_pass.run_faster`` decides "one pass vs separate kernels" in eval the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import _plan_generation, dispatch_file, trials
from .dispatch_file import CACHE_ENV, cache_path  # noqa: F401 (re-exported)

POLICY_ENV = "CVT_KERNELS_DISPATCH"
POLICIES = ("measure", "fixed")

#: ``prepare(candidate, truth)``: a :class:`cvt_kernels.trials.Run` of one candidate on
#: copies of the call's data (the truth: float64 copies on the baseline backend).
Prepare = Callable[[str, bool], trials.Run]


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


@dataclass
class Decision:
    """What serves one key, and the evidence: each candidate's median time (ms) and error
    against the truth, the cost of its trial harness (ms: copies, cotangents), and why any
    candidate was excluded."""
    choice: str
    source: str                       # measured | cache | fixed | only candidate
    candidates: List[str]
    times_ms: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    excluded: Dict[str, str] = field(default_factory=dict)
    harness_ms: Dict[str, float] = field(default_factory=dict)
    key: str = ""                     # the readable key (JSON): see make_key


# (op, call signature, candidates, context) -> Decision: the per-call lookup is a dict hit.
_DECISIONS: Dict[tuple, Decision] = {}
# The same, for calls that may not measure and found nothing (CPU, capture): the fixed
# choice, consulted only while measuring is impossible, so a later GPU call still measures.
_UNMEASURED: Dict[tuple, Decision] = {}
# (op, the signature's parts without shapes, candidates) -> the latest decision: what a
# trace with symbolic shapes (a dynamic batch) runs.
_BY_MODE: Dict[tuple, Decision] = {}
_LOCK = threading.RLock()


def remembered() -> Dict[tuple, Decision]:
    """This process's decisions by (op, call signature, candidates, context)."""
    with _LOCK:
        return dict(_DECISIONS)


def decisions() -> Dict[str, Decision]:
    """Every decision this process made or loaded, by readable key."""
    with _LOCK:
        return {d.key: d for d in _DECISIONS.values()}


def clear() -> None:
    """Forget this process's decisions (the file stays: ``python -m cvt_kernels.info``
    says where it is; delete it to forget them for good)."""
    with _LOCK:
        _DECISIONS.clear()
        _UNMEASURED.clear()
        _BY_MODE.clear()
        # the modules' call plans hold choices made from these
        _plan_generation.bump_generation()


# ---------------------------------------------------------------------------------- keys
def _flag(name: str, default):
    getter = getattr(torch._C, name, None)  # the public properties cost 3-6 us a read
    return getter() if getter is not None else default


def context(device: torch.device) -> tuple:
    """What a decision depends on besides the call's own signature, read per call: the
    device, the autocast dtype on its type (``None``: off) and the float32 precision
    flags (TF32 in cuBLAS and cuDNN, ``torch.get_float32_matmul_precision()``)."""
    kind = device.type
    amp = (torch.get_autocast_dtype(kind)
           if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) else None)
    return (device, amp, _flag("_get_cublas_allow_tf32", None),
            _flag("_get_cudnn_allow_tf32", None),
            _flag("_get_float32_matmul_precision", None))


_CODE_DIGEST: Optional[str] = None


def code_digest() -> str:
    """A digest of the package's Python sources and ``csrc/`` (where present): the kernels,
    their configurations and the ops around them. Any change measures again."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        package = Path(__file__).resolve().parent
        files = sorted(package.rglob("*.py"))
        csrc = package.parent / "csrc"
        if csrc.is_dir():
            files += sorted(p for p in csrc.rglob("*") if p.suffix in (".cu", ".cpp", ".h",
                                                                         ".cuh"))
        h = hashlib.sha256()
        for path in files:
            try:
                h.update(str(path.relative_to(package.parent)).encode())
                h.update(path.read_bytes())
            except OSError:
                h.update(b"unreadable")
        _CODE_DIGEST = h.hexdigest()[:16]
    return _CODE_DIGEST


def versions(device: torch.device) -> Dict[str, str]:
    """What a decision depends on besides the call: the GPU model and the software."""
    from ._version import __version__
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 (any broken install: the key just says so)
        triton_version = "none"
    out = {"torch": torch.__version__, "triton": triton_version, "cvt_kernels": __version__,
           "code": code_digest()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out["device"] = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        out["device"] = device.type
    return out


def _text(v):
    if isinstance(v, (tuple, list, torch.Size)):
        return [_text(x) for x in v]
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def make_key(op: str, parts: tuple, device: torch.device,
             candidates: Sequence[str] = (), ctx: Optional[tuple] = None) -> str:
    """The readable, JSON-safe key of a decision: the op, the call's signature (``parts``,
    pairs of name and value), the candidates, the context (:func:`context`) and the
    versions it depends on (:func:`versions`)."""
    ctx = context(device) if ctx is None else ctx
    signature = {name: _text(v) for name, v in parts}
    settings = {"candidates": list(candidates), "autocast": _text(ctx[1]),
                "cublas_tf32": ctx[2], "cudnn_tf32": ctx[3], "fp32_matmul": ctx[4]}
    return json.dumps({"op": op, **signature, **settings, **versions(device)},
                      sort_keys=True)


def _symbolic(v) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_symbolic(x) for x in v)
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _mode_key(op: str, parts: tuple, candidates: tuple) -> tuple:
    """The key without the shapes (every part that holds a tuple) and without symbolic
    values: what a decision serves in a trace with a dynamic batch."""
    return (op, tuple((n, v) for n, v in parts
                      if not isinstance(v, (tuple, list)) and not _symbolic(v)), candidates)


# -------------------------------------------------------------------------------- decide
def can_measure(device: torch.device) -> bool:
    """Timing is allowed: a CUDA device, eager mode, no capture, no deterministic mode, and
    the ``measure`` policy."""
    return (device.type == "cuda" and policy() == "measure"
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
            and not torch.are_deterministic_algorithms_enabled())


def _fixed(op: str, candidates: Sequence[str], key: str = "") -> Decision:
    return Decision(candidates[0], "fixed", list(candidates), key=key or op)


def decide(op: str, parts: tuple, candidates: Sequence[str], prepare: Prepare,
           baseline: str, dtype: torch.dtype, device: torch.device,
           clock=None) -> Decision:
    """The candidate that serves this call of ``op``: remembered, loaded from the file,
    measured now (:func:`can_measure`), or the first of ``candidates`` (the fixed order).

    ``parts`` is the call's signature, a tuple of (name, value) pairs (shapes, dtypes,
    mode, configuration). ``prepare(name, truth)`` returns a run of candidate ``name`` on
    copies of the call's data (``truth``: float64 copies, run by ``baseline``), whose named
    results are all judged (:func:`cvt_kernels.trials.disagreement`). ``baseline`` (stock
    PyTorch) must be a candidate; ``dtype`` is the call's compute dtype (the 2x rule's eps);
    ``clock`` replaces the CUDA-event clock (tests)."""
    if not candidates:
        raise ValueError(f"{op}: no candidate can run this call")
    candidates = tuple(candidates)
    if policy() == "fixed":  # reproducible anywhere: neither timing nor remembered choices
        return _fixed(op, candidates)
    if torch.compiler.is_compiling():
        return _traced(op, parts, candidates, device)
    fast = (op, parts, candidates, context(device))
    hit = _DECISIONS.get(fast)  # the hot path, before can_measure's checks
    if hit is not None:
        return hit
    measurable = can_measure(device)
    hit = _remembered(fast, measurable)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _DECISIONS.get(fast)  # another thread may have decided meanwhile
        if hit is not None:
            return hit
        key = make_key(op, parts, device, candidates, fast[3])
        if len(candidates) == 1:
            decision = Decision(candidates[0], "only candidate", list(candidates), key=key)
        else:
            decision = _load(key, candidates)
            if decision is None and not measurable:
                decision = _fixed(op, candidates, key)
                _UNMEASURED[fast] = decision
                return decision
            if decision is None:
                guard = torch.cuda.device(device) if device.type == "cuda" else _nothing()
                with guard:
                    decision = _measure(candidates, prepare, baseline, dtype, clock)
                decision.key = key
                _store(key, decision)
        _DECISIONS[fast] = decision
        _BY_MODE[_mode_key(op, parts, candidates)] = decision
        return decision


def _remembered(fast: tuple, measurable: bool) -> Optional[Decision]:
    """:func:`decide`'s answer from memory for the call keyed ``fast``: its decision, or
    where nothing can be timed (``measurable`` False) the fixed order's answer given
    before; ``None`` when there is none."""
    hit = _DECISIONS.get(fast)
    if hit is None and not measurable:
        hit = _UNMEASURED.get(fast)
    return hit


def kept(op: str, parts: tuple, candidates: Sequence[str], device: torch.device
         ) -> Optional[str]:
    """What :func:`decide` returns for this call now without deciding anything: the
    remembered decision's choice (or the fixed order's under the ``fixed`` policy),
    ``None`` when none is remembered. A remembered decision changes only through
    :func:`clear`, which bumps the call plans' generation."""
    candidates = tuple(candidates)
    if policy() == "fixed":
        return _fixed(op, candidates).choice
    hit = _remembered((op, parts, candidates, context(device)), can_measure(device))
    return None if hit is None else hit.choice


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _traced(op: str, parts: tuple, candidates: tuple, device: torch.device) -> Decision:
    """A decision while ``torch.compile`` or ``torch.export`` traces: looked up, never
    measured. Static shapes: :func:`_lookup_for_trace` runs once at trace time; symbolic
    ones: the latest decision for the same op and mode, else the fixed order."""
    if _symbolic(tuple(v for _, v in parts)):
        hit = _BY_MODE.get(_mode_key(op, parts, candidates))
        choice = hit.choice if hit is not None else candidates[0]
    else:
        choice = _lookup_for_trace(op, parts, candidates, device)
    return Decision(choice, "traced", list(candidates), key=op)


@torch.compiler.assume_constant_result
def _lookup_for_trace(op: str, parts: tuple, candidates: tuple, device: torch.device) -> str:
    # Dynamo calls this at trace time and bakes the answer into the graph: the dict and
    # file reads are never traced (and a compiled model keeps the answer until it is
    # recompiled, e.g. after torch.compiler.reset()).
    ctx = context(device)
    hit = _DECISIONS.get((op, parts, candidates, ctx))
    if hit is None and len(candidates) > 1:
        with _LOCK:
            hit = _load(make_key(op, parts, device, candidates, ctx), candidates)
        if hit is not None:
            _DECISIONS[(op, parts, candidates, ctx)] = hit
            _BY_MODE[_mode_key(op, parts, candidates)] = hit
    return hit.choice if hit is not None else candidates[0]


def _measure(candidates: Sequence[str], prepare: Prepare, baseline: str, dtype: torch.dtype,
             clock=None) -> Decision:
    decision = Decision(baseline, "measured", list(candidates))
    runs: Dict[str, trials.Run] = {}
    results: Dict[str, trials.Results] = {}
    for name in candidates:
        try:
            run = prepare(name, False)
            results[name] = run()
            runs[name] = run
        except Exception as exc:  # noqa: BLE001 (a candidate that cannot run is excluded)
            if name == baseline:
                raise
            decision.excluded[name] = f"raised {type(exc).__name__}: {str(exc)[:160]}"
    try:
        truth = prepare(baseline, True)()
    except Exception as exc:  # noqa: BLE001 (no truth: nothing can be checked, so trust none)
        truth = None
        why = f"the float64 truth could not be computed ({type(exc).__name__}: {str(exc)[:120]})"
    for name in list(results):
        if name == baseline:
            continue
        reason = why if truth is None else trials.disagreement(
            results[name], results[baseline], truth, dtype, baseline)
        if reason is not None:
            decision.excluded[name] = reason
            del results[name], runs[name]
        else:
            decision.errors[name] = trials.error_text(results[name], truth)
    if truth is not None:
        decision.errors[baseline] = trials.error_text(results[baseline], truth)
    del truth, results  # free the copies' results before timing
    for name, reason in decision.excluded.items():
        warnings.warn(f"cvt_kernels: the {name} candidate is excluded for this call's shape: "
                      f"{reason}; please report this as a bug", RuntimeWarning, stacklevel=4)
    decision.harness_ms = {name: round(run.harness_ms, 4) for name, run in runs.items()}
    if len(runs) > 1:  # an excluded candidate is never timed, let alone chosen
        decision.times_ms = time_candidates({n: r.timed for n, r in runs.items()}, clock)
    decision.choice = min(runs, key=lambda n: (decision.times_ms.get(n, 0.0), n != baseline))
    return decision


def time_candidates(runs: Dict[str, Callable[[], object]], clock=None) -> Dict[str, float]:
    """Median milliseconds of one run of each candidate (:func:`trials.time_runs`)."""
    return trials.time_runs(runs, clock)


# ------------------------------------------------------------------------- persistence
# The file itself (where, limits, validation, locking): cvt_kernels.dispatch_file.
def _load(key: str, candidates: Sequence[str]) -> Optional[Decision]:
    entry = dispatch_file.load(key)
    if entry is None or entry["choice"] not in candidates:
        return None  # unknown, or chosen among candidates this process does not have
    fields = {k: v for k, v in entry.items() if k in Decision.__dataclass_fields__}
    try:
        decision = Decision(**fields)
    except TypeError:  # a field this Decision requires and the entry lacks
        return None
    decision.source, decision.key = "cache", key
    return decision


def _store(key: str, decision: Decision) -> None:
    """Adds one decision to the file (see :func:`cvt_kernels.dispatch_file.store`)."""
    entry = {k: v for k, v in asdict(decision).items() if k != "key"}
    dispatch_file.store(key, {**entry, "source": "measured"})


def candidate_texts(decision: Decision, reason_width: Optional[int] = None) -> List[str]:
    """Each candidate's evidence: its median time (one call, the candidate alone), error
    against the truth and the cost of its trial harness (copies, cotangents: paid once, not
    timed), or why it was excluded (cut to ``reason_width`` characters when given)."""
    texts = []
    for name in decision.candidates:
        if name in decision.excluded:
            texts.append(f"{name}: excluded ({decision.excluded[name][:reason_width]})")
            continue
        t = decision.times_ms.get(name)
        texts.append(f"{name}: {t:.3f} ms" if t is not None else name)
        if name in decision.errors:
            texts[-1] += f", err {decision.errors[name]}"
        if name in decision.harness_ms:
            texts[-1] += f", harness {decision.harness_ms[name]:.2f} ms"
    return texts


def describe(decision: Decision) -> str:
    """One line: the choice, how it was made, every candidate's time and error."""
    return f"{decision.choice} ({decision.source}; {'; '.join(candidate_texts(decision))})"


__all__ = ["CACHE_ENV", "POLICIES", "POLICY_ENV", "Decision", "Prepare", "cache_path",
           "can_measure", "clear", "code_digest", "context", "decide", "decisions",
           "describe", "make_key", "policy", "time_candidates", "versions"]
