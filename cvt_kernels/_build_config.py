"""Where the CUDA toolkit is and whether to build the CUDA extension: shared by setup.py,
the JIT loader (``cvt_kernels/_cuda_ext.py``) and ``csrc/check_compile.py``.

Standard library only: ``setup.py`` loads this file by path, without importing the package
(which imports torch), and must work in an isolated build environment without torch.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from typing import Mapping, Optional, Sequence, Tuple

ENV_FORCE = "CVT_KERNELS_FORCE_BUILD"        # a skipped or failed build is an error
ENV_SKIP = "CVT_KERNELS_SKIP_CUDA_BUILD"     # never build the extension
ENV_JIT = "CVT_KERNELS_JIT"                  # compile csrc/ on first use when _C is missing
ENV_JIT_CACHE = "CVT_KERNELS_JIT_CACHE"      # where the JIT build lives
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"            # TORCH_CUDA_ARCH_LIST when unset (setup.py)

#: Sources of ``cvt_kernels._C``, relative to the repository root.
SOURCES = ("csrc/bindings.cpp", "csrc/kernels/dwconv_bn.cu")
CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home(env: Mapping[str, str] = os.environ,
                   extra: Sequence[str] = ()) -> Optional[str]:
    """A CUDA toolkit directory (``bin/nvcc`` and ``include/cuda_runtime.h``), or ``None``.

    Tried in order: ``CUDA_HOME``, ``CUDA_PATH``, the directory above the ``nvcc`` on
    ``PATH`` (symlinks resolved; a wrapper script in ``/usr/local/bin`` is no toolkit, so
    the search goes on), ``/usr/local/cuda``, ``/usr/local/cuda-*`` (newest first).
    """
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), *extra]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def _version_key(path: str) -> Tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def toolkit_version(cuda_home: str) -> Optional[str]:
    """``"13.0.88"``-style version of the toolkit (``version.json``, else ``nvcc --version``)."""
    try:
        with open(os.path.join(cuda_home, "version.json")) as f:
            return json.load(f)["cuda"]["version"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build_decision(env: Mapping[str, str], torch_module, cuda_home: Optional[str],
                        toolkit: Optional[str] = None) -> Tuple[bool, str]:
    """``(build, reason)``: whether ``setup.py`` builds ``cvt_kernels._C``, and why (not).

    ``torch_module`` is the imported ``torch`` or ``None``; ``toolkit`` the toolkit's version
    (looked up when ``None``). Never raises: every "no" is a one-line reason.
    """
    if flag(env, ENV_SKIP):
        return False, f"{ENV_SKIP}=1"
    if torch_module is None:
        return False, ("torch is not importable in the build environment (an isolated build "
                       "never has it: pip install --no-build-isolation -e . with a CUDA torch "
                       "installed)")
    version = getattr(torch_module, "__version__", "?")
    torch_cuda = getattr(getattr(torch_module, "version", None), "cuda", None)
    if not torch_cuda:
        return False, f"torch {version} is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, ("no CUDA toolkit found (nvcc and cuda_runtime.h under CUDA_HOME, "
                       "CUDA_PATH, PATH or /usr/local/cuda*)")
    toolkit = toolkit or toolkit_version(cuda_home)
    if toolkit is None:
        return False, f"cannot tell the CUDA version of the toolkit at {cuda_home}"
    if toolkit.split(".")[0] != str(torch_cuda).split(".")[0]:
        return False, (f"the toolkit at {cuda_home} is CUDA {toolkit}, torch {version} was "
                       f"built with CUDA {torch_cuda} (the major versions must match)")
    return True, f"torch {version} (CUDA {torch_cuda}), toolkit CUDA {toolkit} at {cuda_home}"


def arch_list(env: Mapping[str, str] = os.environ) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as setup.py builds it: the environment's, else 8.0 and 9.0
    (+ PTX for newer GPUs)."""
    return env.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
