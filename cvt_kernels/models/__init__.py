"""The reference CvT models (see :mod:`cvt_kernels.models.cvt`)."""

from .cvt import *  # noqa: F401,F403
from .cvt import __all__  # noqa: F401
