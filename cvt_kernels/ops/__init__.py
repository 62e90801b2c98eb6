"""Functional ops (each a ``torch.library`` custom op for kernel backends; see ``backends``)."""

from .attention import attention, validate_attention
from .conv_projection import conv_projection, run_conv_projection, validate_conv_projection

__all__ = [
    "attention",
    "conv_projection",
    "run_conv_projection",
    "validate_attention",
    "validate_conv_projection",
]
