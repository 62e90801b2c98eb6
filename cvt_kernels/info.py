"""``python -m cvt_kernels.info``: versions, devices and which backends can run here, and why not."""

from __future__ import annotations

import os
import platform
from typing import List


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def report() -> str:
    import torch

    import cvt_kernels
    from cvt_kernels import backends

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
    forced = backends.forced_backend()
    lines.append(f"backend     {forced or 'auto'} (order when auto: "
                 f"{', '.join(backends.AUTO_ORDER)})")
    lines.append("backends:")
    for name, reason in backends.available_backends().items():
        state = "available" if reason is None else "unavailable: " + reason
        if name in backends.NOT_AUTO and name not in backends.AUTO_ORDER:
            state += f" (not chosen automatically: {backends.NOT_AUTO[name]})"
        lines.append(f"  {name:10s} {state}")
    from .ops import one_pass  # no triton import

    try:
        policy = {"auto": "auto: measured per shape on the first eval call on a GPU, the faster "
                          "kept", "1": "on: always where it applies", "0": "off"}[one_pass.mode()]
    except ValueError as e:
        policy = f"invalid: {e}"
    lines.append(f"one-pass    {policy} (inference q/proj fusion in the Triton attention "
                 f"kernel; {one_pass.ENV}=auto|1|0)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
