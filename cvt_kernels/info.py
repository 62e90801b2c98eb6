"""``python -m cvt_kernels.info``: versions, devices and which backends can run here, and why not."""

from __future__ import annotations

import os
import platform
import sys
from typing import List, Tuple


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def report() -> str:
    return "\n".join(_report()[0])


def _report() -> Tuple[List[str], List[str]]:
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
    lines += _backend_lines(errors) + _dispatch_lines(errors) + _one_pass_lines(errors)
    return lines, errors


def _dispatch_lines(errors: List[str]) -> List[str]:
    """The dispatch policy, the decisions file and what it holds for this machine."""
    import json

    import torch

    from cvt_kernels import dispatch

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
    stored = dispatch._read(path)["decisions"] if path.exists() else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = dispatch.versions(device)
    mine = []
    for key, entry in stored.items():
        try:
            parsed = json.loads(key)
        except ValueError:
            continue
        if all(parsed.get(k) == v for k, v in here.items()):
            mine.append(f"{parsed.get('op')} -> {entry.get('choice')}")
    lines.append(f"decisions   {path}: {len(stored)} stored, {len(mine)} for this device and "
                 f"these versions ({dispatch.CACHE_ENV}=PATH|off; python -m "
                 f"cvt_kernels.tune fills it)")
    counts = {}
    for m in mine:
        counts[m] = counts.get(m, 0) + 1
    lines += [f"            {m} ({n} shape{'s' if n > 1 else ''})"
              for m, n in sorted(counts.items())]
    return lines


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


def main() -> int:
    """Prints the report; exit code 1 (and one line on stderr per setting) when a setting in
    the environment is invalid, since every call would fail on it."""
    lines, errors = _report()
    print("\n".join(lines))
    for error in errors:
        print(f"python -m cvt_kernels.info: error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
