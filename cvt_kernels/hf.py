"""Hugging Face ``transformers`` CvT on the fused ops: ``accelerate_hf(model)``.

This module imports ``transformers``; ``cvt_kernels`` imports it only when a model holds
transformers' ``CvtAttention`` (so transformers is loaded already). ``cvt_kernels.accelerate``
calls :func:`accelerate_hf` for such models.

transformers' CvT computes the same attention as the reference (same ``dw_bn`` projection,
same ``scale = embed_dim ** -0.5``), under other names. It builds only ``dw_bn``
projections: for ``qkv_projection_method="avg"`` its ``CvtSelfAttentionProjection`` has no
``convolution_projection`` and its own forward fails, so such modules are refused here.
"""

from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn
from torch import Tensor
from transformers.models.cvt.modeling_cvt import CvtAttention

from .backends.base import ProjectionCall, ProjectionConfig, ProjectionParams
from .modules import fused_attention
from .ops._checks import check_tensor

__all__ = ["FusedHFCvtAttention", "accelerate_hf"]

_WHICH = ("query", "key", "value")


def _conv_and_norm(self_attention: nn.Module, which: str) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    projection = getattr(self_attention, f"convolution_projection_{which}")
    conv_proj = getattr(projection, "convolution_projection", None)
    if conv_proj is None:
        raise ValueError(
            f"convolution_projection_{which}: expected a 'dw_bn' projection (conv + BatchNorm); "
            f"this one has none (qkv_projection_method other than 'dw_bn'), which "
            f"transformers' CvtSelfAttentionProjection cannot run either")
    conv, bn = conv_proj.convolution, conv_proj.normalization
    square = (len(set(conv.kernel_size)) == 1 and len(set(conv.stride)) == 1
              and isinstance(conv.padding, tuple) and len(set(conv.padding)) == 1)
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
    if not (square and depthwise and set(conv.dilation) == {1}):
        raise ValueError(
            f"convolution_projection_{which}: expected a square depthwise conv without bias "
            f"or dilation, got {conv}")
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
        raise ValueError(f"convolution_projection_{which}: expected an affine BatchNorm2d, "
                         f"got {bn}")
    return conv, bn


class FusedHFCvtAttention(nn.Module):
    """Drop-in for transformers' ``CvtAttention`` (self-attention + output projection).

    Keeps the original children ``attention`` (``CvtSelfAttention``) and ``output``
    (``CvtSelfOutput``), so it owns the very same parameters and buffers under the same
    state_dict keys; ``forward(hidden_state, height, width)`` reads them and runs
    :func:`cvt_kernels.ops.conv_projection` (q, k, v), :func:`cvt_kernels.ops.attention`
    and the output Linear on the backend the dispatcher picks.

    ``sync_bn``/``sync_bn_group``: as in :class:`cvt_kernels.FusedConvAttention`.
    """

    sync_bn: bool = False
    sync_bn_group = None

    def __init__(self, hf_attention: nn.Module):
        super().__init__()
        if type(hf_attention) is not CvtAttention:
            raise TypeError(f"hf_attention: expected a transformers CvtAttention, got "
                            f"{type(hf_attention).__name__}")
        for which in _WHICH:  # refuse what the ops cannot run now, not at the first forward
            _conv_and_norm(hf_attention.attention, which)
        self.attention = hf_attention.attention
        self.output = hf_attention.output
        self.training = hf_attention.training  # not .train(): that would flip shared children

    def _projection(self, which: str):
        self_attention = self.attention
        conv, bn = _conv_and_norm(self_attention, which)
        linear = getattr(self_attention, f"projection_{which}")
        cfg = ProjectionConfig("dw_bn", conv.kernel_size[0], conv.stride[0], conv.padding[0],
                               self_attention.with_cls_token)
        params = ProjectionParams(conv.weight, bn.weight, bn.bias, bn.running_mean,
                                  bn.running_var, bn.num_batches_tracked, linear.weight,
                                  linear.bias)
        return ProjectionCall(params, cfg, bn.training, bn.momentum, bn.eps)

    def forward(self, hidden_state: Tensor, height: int, width: int) -> Tensor:
        check_tensor(hidden_state, "hidden_state", ndim=3)
        self_attention = self.attention
        dropout = self_attention.dropout
        out = fused_attention(hidden_state, height, width,
                              [self._projection(which) for which in _WHICH],
                              self_attention.num_heads, self_attention.scale,
                              dropout.p if dropout.training else 0.0, self.output.dense,
                              sync_bn=self.sync_bn, sync_bn_group=self.sync_bn_group)
        return self.output.dropout(out)


def accelerate_hf(model: nn.Module) -> Tuple[nn.Module, int]:
    """Replaces every transformers ``CvtAttention`` inside ``model`` (a ``CvtModel``, a
    ``CvtForImageClassification`` or any module holding them) with a
    :class:`FusedHFCvtAttention` sharing its parameters and buffers (state_dict keys,
    devices, dtypes, train/eval state kept), in place. Returns ``(model, number_replaced)``.
    Nothing is replaced when any of them cannot be (``ValueError`` naming its path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if type(model) is CvtAttention:
        raise TypeError("model: is itself a CvtAttention and cannot be replaced in place; use "
                        "cvt_kernels.hf.FusedHFCvtAttention(model)")
    replacements: List[Tuple[nn.Module, str, nn.Module]] = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) is CvtAttention:  # exact type: already-fused modules are left alone
                full = f"{path}.{name}" if path else name
                try:
                    replacements.append((parent, name, FusedHFCvtAttention(child)))
                except ValueError as e:
                    raise ValueError(f"model.{full}: {e}") from None
    for parent, name, fused in replacements:
        setattr(parent, name, fused)
    return model, len(replacements)
