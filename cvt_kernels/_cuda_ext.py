"""Finds the CUDA extension (``csrc/``): the installed ``cvt_kernels._C``, or a JIT build.

:func:`load` returns ``(module, None)`` or ``(None, reason)``; the ``cuda`` backend reports
the reason as ``"not built: <reason>"``. Nothing here compiles unless asked:

* ``cvt_kernels._C`` is what ``setup.py`` builds (``pip install --no-build-isolation -e .``
  with a CUDA torch and a toolkit).
* ``CVT_KERNELS_JIT=1``: when ``_C`` is missing, compile ``csrc/`` with
  ``torch.utils.cpp_extension.load`` (ninja) into ``CVT_KERNELS_JIT_CACHE`` (default
  ``~/.cache/cvt_kernels/jit/<torch>-<cuda>``) when ``cvt_kernels`` is imported; later
  processes reuse the build until a source or flag changes. Only from a source checkout
  (``csrc/`` next to the package), and only when asked: a multi-minute build never starts
  by surprise.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional, Tuple

from . import _build_config as cfg

ROOT = Path(__file__).resolve().parents[1]


def _not_installed_reason() -> str:
    """Why ``cvt_kernels._C`` is absent, as the build would see it here."""
    import torch

    cuda_home = cfg.find_cuda_home(os.environ)
    # Skip the flag here: it says why a build was skipped, not whether one could run.
    env = {k: v for k, v in os.environ.items() if k != cfg.ENV_SKIP}
    can_build, why = cfg.cuda_build_decision(env, torch, cuda_home)
    if not can_build:
        return why
    return (f"cvt_kernels._C is not installed, though it could be built here ({why}): "
            f"pip install --no-build-isolation -e . (or {cfg.ENV_JIT}=1 to compile it on "
            f"first use)")


def jit_cache_dir() -> Path:
    import torch

    default = Path.home() / ".cache" / "cvt_kernels" / "jit" / (
        f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}")
    return Path(os.environ.get(cfg.ENV_JIT_CACHE) or default)


def jit_load():
    """Compiles (or reuses) ``csrc/`` with ``torch.utils.cpp_extension.load``; raises on
    failure with the reason."""
    import torch

    sources = [ROOT / s for s in cfg.SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise RuntimeError(f"the CUDA sources are not here ({', '.join(missing)}): the JIT "
                           f"build needs a source checkout")
    cuda_home = cfg.find_cuda_home(os.environ)
    ok, why = cfg.cuda_build_decision({}, torch, cuda_home)
    if not ok:
        raise RuntimeError(why)
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    if not cfg._is_toolkit(cpp_extension.CUDA_HOME):
        # torch guessed at import time (e.g. the directory above a wrapper-script nvcc);
        # use the toolkit validated above.
        cpp_extension.CUDA_HOME = cuda_home
    build_dir = jit_cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="cvt_kernels_C", sources=[str(s) for s in sources],
        extra_include_paths=[str(ROOT / "csrc")], extra_cflags=list(cfg.CXX_FLAGS),
        extra_cuda_cflags=list(cfg.NVCC_FLAGS), build_directory=str(build_dir),
        verbose=cfg.flag(os.environ, "CVT_KERNELS_JIT_VERBOSE"))


def load() -> Tuple[Optional[object], Optional[str]]:
    """``(module, None)`` when the extension is usable, else ``(None, reason)``."""
    name = f"{__package__}._C"
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as exc:
        installed_error = None if exc.name == name else (
            f"{name} does not load (ModuleNotFoundError: {exc})")
    except Exception as exc:  # built, but does not load (e.g. against another torch)
        installed_error = f"{name} does not load ({type(exc).__name__}: {exc})"
    if cfg.flag(os.environ, cfg.ENV_JIT):
        try:
            return jit_load(), None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return None, f"{cfg.ENV_JIT}=1 but the JIT build failed ({type(exc).__name__}: {first})"
    if installed_error is not None:
        return None, installed_error
    return None, _not_installed_reason()
