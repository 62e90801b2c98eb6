"""Functional ops (each a ``torch.library`` custom op for kernel backends; see ``backends``)."""

from .attention import attention, validate_attention
from .conv_projection import conv_projection, run_conv_projection, validate_conv_projection
from .layer_norm import add_layer_norm, layer_norm
from .mlp import mlp

__all__ = [
    "add_layer_norm",
    "attention",
    "conv_projection",
    "layer_norm",
    "mlp",
    "run_conv_projection",
    "validate_attention",
    "validate_conv_projection",
]
