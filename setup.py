"""Installs cvt_kernels: pure Python + Triton, always; no CUDA build is needed to install.

The version lives in one place, ``cvt_kernels/__init__.py``; it is read here as text so
that installing never imports torch.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "cvt_kernels" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="cvt_kernels",
    version=VERSION,
    description="Fused GPU kernels (Triton, CUDA) for the Convolutional vision Transformer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["cvt_kernels", "cvt_kernels.*"]),
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
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "hf": ["transformers"],
        # Plots of benchmark results; optional at run time (benchmarks/plot.py).
        "bench": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
