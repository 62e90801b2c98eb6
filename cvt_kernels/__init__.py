"""cvt_kernels: fused kernels for the Convolutional vision Transformer (CvT).

``FusedConvAttention`` is a drop-in for CvT's attention module; ``accelerate(model)``
swaps it into an existing model in place. See README.md.
"""

__version__ = "0.1.0"

from . import agreement, backends, dispatch, models, ops  # noqa: E402
from .backends import BackendUnavailableError, use_backend  # noqa: E402
from .modules import FusedConvAttention, accelerate  # noqa: E402
from .block import FusedBlock  # noqa: E402

__all__ = [
    "BackendUnavailableError",
    "FusedBlock",
    "FusedConvAttention",
    "__version__",
    "accelerate",
    "agreement",
    "backends",
    "dispatch",
    "models",
    "ops",
    "use_backend",
]
