"""Installs cvt_kernels: pure Python + Triton, always; the CUDA extension when it can.

The version lives in one place, ``cvt_kernels/_version.py``; it is read here as text so
that installing never needs the package importable.

The CUDA extension ``cvt_kernels._C`` (``csrc/``) is built with torch's ``CUDAExtension``
and ninja only when torch is importable *in the build environment*, is a CUDA build, and a
CUDA toolkit of the same major version is found (``cvt_kernels/_build_config.py``). An
isolated build (plain ``pip install .``) has no torch: it installs pure Python and says so.
To build the extension: ``pip install --no-build-isolation -e .`` with a CUDA torch installed.

Environment: ``CVT_KERNELS_SKIP_CUDA_BUILD=1`` never builds it (and never imports torch);
``CVT_KERNELS_FORCE_BUILD=1`` turns "cannot build" and a failed build into errors (else
both are a one-line "skipping" message and a pure-Python install); ``TORCH_CUDA_ARCH_LIST``
picks the GPU architectures (default ``8.0;9.0+PTX``); ``CUDA_HOME`` the toolkit.
"""

import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "cvt_kernels" / "_version.py").read_text(), re.M).group(1)


def _build_config():
    """``cvt_kernels/_build_config.py`` loaded by path (stdlib only; no torch, no package)."""
    spec = importlib.util.spec_from_file_location(
        "_cvt_kernels_build_config", HERE / "cvt_kernels" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """``(ext_modules, cmdclass)`` for ``cvt_kernels._C``, or ``([], {})`` with a message."""
    cfg = _build_config()
    force = cfg.flag(os.environ, cfg.ENV_FORCE)

    def skip(reason):
        if force:
            sys.exit(f"cvt_kernels: {cfg.ENV_FORCE}=1 but the CUDA extension cannot be built: "
                     f"{reason}")
        print(f"cvt_kernels: skipping the CUDA extension: {reason}", file=sys.stderr)
        return [], {}

    torch = None
    if not cfg.flag(os.environ, cfg.ENV_SKIP):
        try:
            import torch
        except Exception:  # ImportError, or a broken install: the decision says why
            torch = None
    cuda_home = cfg.find_cuda_home(os.environ)
    build, reason = cfg.cuda_build_decision(os.environ, torch, cuda_home)
    if not build:
        return skip(reason)
    # torch.utils.cpp_extension reads both when it is imported: set them first. CUDA_HOME
    # is the toolkit validated above (torch's own guess, the directory above the nvcc on
    # PATH, is wrong where nvcc is a wrapper script).
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list(os.environ)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class BuildCudaExtension(BuildExtension):
        """A failed compile skips the extension (pure-Python install) unless forced."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                if force:
                    raise
                print(f"cvt_kernels: skipping the CUDA extension: the build failed "
                      f"({type(exc).__name__}: {exc}); {cfg.ENV_FORCE}=1 shows the error",
                      file=sys.stderr)
                self.extensions = []

    print(f"cvt_kernels: building the CUDA extension ({reason}; TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    ext = CUDAExtension(
        "cvt_kernels._C", sources=list(cfg.SOURCES), include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)})
    return [ext], {"build_ext": BuildCudaExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = cuda_extension()

setup(
    name="cvt_kernels",
    version=VERSION,
    description="Fused GPU kernels (Triton, CUDA) for the Convolutional vision Transformer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["cvt_kernels", "cvt_kernels.*"]),
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        # torch.library.custom_op / register_autograd arrived in 2.4. A bare ``torch``
        # pulls a multi-GB CUDA build on a machine without torch: see README.
        "torch>=2.4",
        # Triton ships for Linux only; elsewhere the torch backend serves every call.
        "triton; platform_system == 'Linux'",
        # Silences torch's "Failed to initialize NumPy" warning on CPU wheels.
        "numpy",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs on two workers.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
        "hf": ["transformers"],
        # Plots of benchmark results; optional at run time (benchmarks/plot.py).
        "bench": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
