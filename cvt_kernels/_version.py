"""The package's version, in one place: read as text by ``setup.py``, imported by the package
root and by :mod:`cvt_kernels.dispatch` (which sits below the root, so it cannot import it)."""

__version__ = "0.1.0"
