"""cvt_kernels: fused kernels for the Convolutional vision Transformer (CvT).

``FusedConvAttention`` is a drop-in for CvT's attention module; ``accelerate(model)``
swaps it into an existing model in place. See README.md.
"""

__version__ = "0.1.0"

from . import agreement, backends, dispatch, models, ops  # noqa: E402
from .backends import BackendUnavailableError, use_backend  # noqa: E402
from .modules import FusedConvAttention  # noqa: E402
from .block import FusedBlock  # noqa: E402
from .acceleration import accelerate  # noqa: E402


def accelerate_hf(model, scope: str = "attention"):
    """:func:`cvt_kernels.hf.accelerate_hf`: transformers' CvT (``CvtModel``,
    ``CvtForImageClassification``) on the fused ops, in place; returns ``(model,
    number_replaced)``. Imports ``transformers`` (``import cvt_kernels`` alone does not);
    ``accelerate(model, sync_bn=True)`` handles data-parallel BatchNorm for such models."""
    from .hf import accelerate_hf as impl

    return impl(model, scope=scope)


__all__ = [
    "BackendUnavailableError",
    "FusedBlock",
    "FusedConvAttention",
    "__version__",
    "accelerate",
    "accelerate_hf",
    "agreement",
    "backends",
    "dispatch",
    "models",
    "ops",
    "use_backend",
]
