"""``python -m cvt_kernels.info``: versions, devices and which backends can run here, and why not."""

from __future__ import annotations

import os
import platform
import sys
from typing import List, Optional, Tuple


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def report() -> str:
    return "\n".join(_report()[0])


def _report(detail: bool = False) -> Tuple[List[str], List[str]]:
    """The report's lines, and one line per setting in the environment that is invalid (the
    rest of the report is still printed: it is what a user needs to fix the setting)."""
    import torch

    import cvt_kernels

    lines: List[str] = [
        f"cvt_kernels {cvt_kernels.__version__}",
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton      {_triton_version()}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}",
        f"CUDA_HOME={os.environ.get('CUDA_HOME', '')!s}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"device {i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("devices     CPU only (torch.cuda.is_available() is False)")
    errors: List[str] = []
    lines += (_backend_lines(errors) + _dispatch_lines(errors, detail)
              + _one_pass_lines(errors))
    return lines, errors


def _dispatch_lines(errors: List[str], detail: bool = False) -> List[str]:
    """The dispatch policy, the decisions file and what it holds for this machine (with
    ``detail``: every decision, its candidates' times, errors and harness costs)."""
    import json

    import torch

    from cvt_kernels import dispatch, dispatch_file

    try:
        policy = dispatch.policy()
    except ValueError as exc:
        errors.append(f"{exc}; fix or unset {dispatch.POLICY_ENV}")
        return [f"dispatch    invalid ({exc})"]
    what = ("measure: on a GPU each call shape's candidates are checked against a truth and "
            "timed once, the fastest correct one kept" if policy == "measure" else
            "fixed: the first backend of the order, nothing timed or read from the file")
    lines = [f"dispatch    {what} ({dispatch.POLICY_ENV}=measure|fixed)"]
    path = dispatch.cache_path()
    if path is None:
        return lines + [f"decisions   kept in memory only ({dispatch.CACHE_ENV}=off)"]
    stored = dispatch_file.entries()  # the valid ones: a malformed file is one warning
    details: List[str] = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = dispatch.versions(device)
    mine = []
    for key, entry in stored.items():
        try:
            parsed = json.loads(key)
        except (ValueError, RecursionError):
            continue
        if isinstance(parsed, dict) and all(parsed.get(k) == v for k, v in here.items()):
            mine.append(f"{parsed.get('op')} -> {entry.get('choice')}")
            if detail:
                details.append(_decision_text(parsed, entry, set(here)))
    lines.append(f"decisions   {path}: {len(stored)} stored, {len(mine)} for this device, "
                 f"code and versions ({dispatch.CACHE_ENV}=PATH|off; python -m "
                 f"cvt_kernels.tune fills it; --decisions lists them, --forget deletes the "
                 f"file)")
    counts = {}
    for m in mine:
        counts[m] = counts.get(m, 0) + 1
    lines += [f"            {m} ({n} shape{'s' if n > 1 else ''})"
              for m, n in sorted(counts.items())]
    return lines + details


def _decision_text(key: dict, entry: dict, versions: set) -> str:
    """One decision: the op and call, then each candidate's median time of one call (the
    candidate alone), error against the float64 truth and harness cost, or its exclusion."""
    from cvt_kernels import dispatch

    fields = {k: v for k, v in entry.items() if k in dispatch.Decision.__dataclass_fields__}
    decision = dispatch.Decision(**fields)
    skip = versions | {"op", "candidates"}
    call = " ".join(f"{k}={v}" for k, v in key.items() if k not in skip)
    return (f"  {key.get('op')}: {call}\n      -> {decision.choice}; "
            + "; ".join(dispatch.candidate_texts(decision, reason_width=100)))


def _backend_lines(errors: List[str]) -> List[str]:
    import torch

    from cvt_kernels import backends

    try:
        forced = backends.forced_backend() or "auto"
    except ValueError as exc:  # a misspelled CVT_KERNELS_BACKEND: say so, report the rest
        errors.append(f"{exc}; fix or unset {backends.ENV_VAR}")
        forced = f"invalid ({exc})"
    lines = [f"backend     {forced} (order when auto: {', '.join(backends.AUTO_ORDER)})",
             "backends:"]
    on_cpu_only = not torch.cuda.is_available()
    for name, reason in backends.available_backends().items():
        state = "available" if reason is None else "unavailable: " + reason
        if name == "triton" and reason is None and on_cpu_only:
            state += (" only through Triton's CPU interpreter (TRITON_INTERPRET=1, for tests; "
                      "far slower than compiled kernels): it runs only when forced, auto "
                      "picks torch for CPU tensors")
        elif name in backends.NOT_AUTO and name not in backends.AUTO_ORDER:
            state += (f" (not in the fixed order: {backends.NOT_AUTO[name]}; the measured "
                      f"dispatch considers it per call shape on a GPU; forcing runs it)")
        lines.append(f"  {name:10s} {state}")
    return lines


def _one_pass_lines(errors: List[str]) -> List[str]:
    from .ops import one_pass  # no triton import

    try:
        policy = {"auto": "auto: measured per shape on the first eval call on a GPU, the faster "
                          "kept", "1": "on: always where it applies", "0": "off"}[one_pass.mode()]
    except ValueError as e:
        policy = f"invalid: {e}"
        errors.append(f"{e}; fix or unset {one_pass.ENV}")
    return [f"one-pass    {policy} (inference q/proj fusion in the Triton attention "
            f"kernel; {one_pass.ENV}=auto|1|0)"]


USAGE = """usage: python -m cvt_kernels.info [--decisions | --forget]

  (no option)  versions, devices, backends and why not, the dispatch settings
  --decisions  also every decision stored for this device: its candidates' times, errors
               against the truth and trial-harness costs
  --forget     delete the decisions file (the dispatcher measures again on first calls)"""


def main(argv: Optional[List[str]] = None) -> int:
    """Prints the report; exit code 1 (and one line on stderr per setting) when a setting in
    the environment is invalid, since every call would fail on it."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--decisions"], ["--forget"]):
        if args in (["-h"], ["--help"]):
            print(USAGE)
            return 0
        print(f"python -m cvt_kernels.info: error: unknown arguments {' '.join(args)!r}; "
              f"expected none, --decisions or --forget", file=sys.stderr)
        return 2
    if args == ["--forget"]:
        return _forget()
    lines, errors = _report(detail=args == ["--decisions"])
    print("\n".join(lines))
    for error in errors:
        print(f"python -m cvt_kernels.info: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _forget() -> int:
    from cvt_kernels import dispatch, dispatch_file

    path = dispatch.cache_path()
    if path is None:
        print(f"decisions are kept in memory only ({dispatch.CACHE_ENV}=off): nothing to delete")
        return 0
    if not path.exists() and not path.is_symlink():
        print(f"{path}: no decisions file")
        return 0
    if path.is_symlink() or not path.is_file():
        print(f"python -m cvt_kernels.info: error: {path} is not a regular file; not deleted",
              file=sys.stderr)
        return 1
    path.unlink()
    dispatch_file.forget()
    print(f"{path}: deleted; the next call of each shape on a GPU is measured again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
