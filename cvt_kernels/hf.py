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

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from transformers.models.cvt.modeling_cvt import CvtAttention, CvtLayer

from . import _plan
from .backends.base import ProjectionCall, ProjectionConfig, ProjectionParams
from .block import (BlockArgs, block_args, block_forward, direct_for, drop_path_active,
                    dropout_active, mlp_activation, norm)
from .modules import AttentionArgs, Linear, fused_attention, linear_of, stock_projection_call
from .ops._checks import check_tensor
from .ops.mlp import run_mlp, validate_mlp

__all__ = ["FusedHFCvtAttention", "FusedHFCvtLayer", "accelerate_hf"]

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

    def _stock_projection(self, which: str) -> Optional[ProjectionCall]:
        """:meth:`_projection` for transformers' own module types, read from the modules'
        dicts with the checks of :func:`_conv_and_norm` in their cheap form
        (``nn.Module.__getattr__`` costs ~1 us a read: a layer's call plan read its
        arguments in ~200 us, a ``FusedBlock``'s in ~50); ``None`` for anything else (the
        general reads then, which say what is wrong)."""
        self_attention = self._modules.get("attention")
        if self_attention is None:
            return None
        children = self_attention._modules
        projection = children.get(f"convolution_projection_{which}")
        linear = children.get(f"projection_{which}")
        if projection is None or type(linear) is not nn.Linear:
            return None
        conv_proj = projection._modules.get("convolution_projection")
        if conv_proj is None:
            return None
        conv = conv_proj._modules.get("convolution")
        bn = conv_proj._modules.get("normalization")
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or not bn.affine:
            return None
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        channels = conv.in_channels
        if not (len(kernel) == len(stride) == 2 and kernel[0] == kernel[1]
                and stride[0] == stride[1] and type(padding) is tuple and len(padding) == 2
                and padding[0] == padding[1] and conv.dilation == (1, 1)
                and conv.groups == channels == conv.out_channels
                and conv._parameters.get("bias") is None):
            return None
        cfg = ProjectionConfig("dw_bn", kernel[0], stride[0], padding[0],
                               self_attention.with_cls_token)
        return stock_projection_call(conv, bn, linear, cfg)

    def plan_args(self) -> Optional[AttentionArgs]:
        """What :func:`~cvt_kernels.modules.fused_attention` takes from this module for a
        call with the residual in the output projection (a layer's call plan), or ``None``
        where that call is not the module's (output dropout on, sync_bn)."""
        modules = self._modules
        output, self_attention = modules.get("output"), modules.get("attention")
        if output is None or self_attention is None:
            return None  # (the module's own forward says what is missing)
        out_modules, attn_modules = output._modules, self_attention._modules
        out_dropout, dense = out_modules.get("dropout"), out_modules.get("dense")
        dropout = attn_modules.get("dropout")
        if out_dropout is None or dense is None or dropout is None:
            return None
        if (out_dropout.training and out_dropout.p > 0) or self.sync_bn:
            return None
        fast = not torch.compiler.is_compiling()
        return AttentionArgs(tuple((fast and self._stock_projection(which))
                                   or self._projection(which) for which in _WHICH),
                             self_attention.num_heads, self_attention.scale,
                             dropout.p if dropout.training else 0.0,
                             linear_of(dense) if fast else Linear(dense.weight, dense.bias))

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

    def forward_residual(self, hidden_state: Tensor, height: int, width: int,
                         residual: Tensor) -> Tensor:
        """``self(hidden_state, height, width) + residual``, the add inside the output
        projection's GEMM when the output dropout is off."""
        if self.output.dropout.training and self.output.dropout.p > 0:
            return self(hidden_state, height, width) + residual
        check_tensor(hidden_state, "hidden_state", ndim=3)
        self_attention = self.attention
        dropout = self_attention.dropout
        return fused_attention(hidden_state, height, width,
                               [self._projection(which) for which in _WHICH],
                               self_attention.num_heads, self_attention.scale,
                               dropout.p if dropout.training else 0.0, self.output.dense,
                               sync_bn=self.sync_bn, sync_bn_group=self.sync_bn_group,
                               residual=residual)


class FusedHFCvtLayer(nn.Module):
    """Drop-in for transformers' ``CvtLayer`` (``accelerate(model, scope="block")``).

    Keeps its children (``attention`` as a :class:`FusedHFCvtAttention`, ``intermediate``,
    ``output``, ``drop_path``, ``layernorm_before``, ``layernorm_after``), so the same
    parameters under the same state_dict keys. ``forward(hidden_state, height, width)``
    computes what ``CvtLayer`` does::

        h = h + drop_path(attention(layernorm_before(h)))
        out = drop_path(h + output.dense(GELU(intermediate.dense(layernorm_after(h)))))

    on the ``layer_norm`` and ``mlp`` ops (exact GELU), the residual adds inside the GEMMs
    where drop path allows (transformers applies the second drop path to the sum).
    """

    def __init__(self, hf_layer: nn.Module):
        super().__init__()
        if type(hf_layer) is not CvtLayer:
            raise TypeError(f"hf_layer: expected a transformers CvtLayer, got "
                            f"{type(hf_layer).__name__}")
        for name, child in hf_layer.named_children():  # CvtLayer's order: same keys
            if name == "attention" and type(child) is CvtAttention:
                child = FusedHFCvtAttention(child)
            setattr(self, name, child)
        self.training = hf_layer.training

    def plan_args(self) -> Optional[BlockArgs]:
        """:func:`cvt_kernels.block.block_forward`'s arguments read from the submodules now
        (``None``: the general forward runs the call). transformers applies the second drop
        path to the sum: only an inactive drop path is the block's."""
        # Submodules read from the dicts (nn.Module.__getattr__: ~1 us a read); a missing
        # one makes block_args decline and the general forward say what is wrong.
        modules = self._modules
        attention, drop_path = modules.get("attention"), modules.get("drop_path")
        output, intermediate = modules.get("output"), modules.get("intermediate")
        if (not isinstance(attention, FusedHFCvtAttention) or drop_path is None
                or output is None or intermediate is None or drop_path_active(drop_path)):
            return None
        parts, inner = output._modules, intermediate._modules
        return block_args(modules.get("layernorm_before"), attention.plan_args(), drop_path,
                          modules.get("layernorm_after"), inner.get("dense"),
                          inner.get("activation"), parts.get("dense"), (parts.get("dropout"),))

    def forward(self, hidden_state: Tensor, height: int, width: int) -> Tensor:
        # As FusedBlock's: settings read per call, checks and choices once per signature.
        args = self.plan_args()
        if args is not None:
            return _plan.run(self, hidden_state, height, width, args, block_forward,
                             direct_for)
        return self.forward_general(hidden_state, height, width)

    def forward_general(self, hidden_state: Tensor, height: int, width: int) -> Tensor:
        """The forward for what :func:`~cvt_kernels.block.block_forward` cannot run (an
        active drop path, output dropout, another activation), checked on every call."""
        check_tensor(hidden_state, "hidden_state", ndim=3)
        normed, _ = norm(self.layernorm_before, hidden_state)
        if (not drop_path_active(self.drop_path)
                and isinstance(self.attention, FusedHFCvtAttention)):
            hidden_state = self.attention.forward_residual(normed, height, width, hidden_state)
            normed, _ = norm(self.layernorm_after, hidden_state)
        else:
            attention_output = self.drop_path(self.attention(normed, height, width))
            normed, hidden_state = norm(self.layernorm_after, attention_output, hidden_state)
        dense1, dense2 = self.intermediate.dense, self.output.dense
        act = mlp_activation(self.intermediate.activation)
        if act is None or dropout_active(self.output.dropout):
            return self.drop_path(self.output(self.intermediate(normed), hidden_state))
        validate_mlp(normed, dense1.weight, dense1.bias, dense2.weight, dense2.bias, act,
                     hidden_state)
        return self.drop_path(run_mlp(normed, dense1.weight, dense1.bias, dense2.weight,
                                      dense2.bias, act, hidden_state))


def accelerate_hf(model: nn.Module, scope: str = "attention") -> Tuple[nn.Module, int]:
    """Replaces every transformers ``CvtAttention`` inside ``model`` (a ``CvtModel``, a
    ``CvtForImageClassification`` or any module holding them) with a
    :class:`FusedHFCvtAttention` sharing its parameters and buffers (state_dict keys,
    devices, dtypes, train/eval state kept), in place; with ``scope="block"`` every
    ``CvtLayer`` with a :class:`FusedHFCvtLayer` instead (its attention fused too). Returns
    ``(model, number_replaced)``. Nothing is replaced when any of them cannot be
    (``ValueError`` naming its path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if scope not in ("attention", "block"):
        raise ValueError(f"scope: expected 'attention' or 'block', got {scope!r}")
    if type(model) is CvtAttention:
        raise TypeError("model: is itself a CvtAttention and cannot be replaced in place; use "
                        "cvt_kernels.hf.FusedHFCvtAttention(model)")
    if scope == "block" and type(model) is CvtLayer:
        raise TypeError("model: is itself a CvtLayer and cannot be replaced in place; use "
                        "cvt_kernels.hf.FusedHFCvtLayer(model)")
    kind, fused_kind = (CvtLayer, FusedHFCvtLayer) if scope == "block" else (
        CvtAttention, FusedHFCvtAttention)
    replacements: List[Tuple[nn.Module, str, nn.Module]] = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) is kind:  # exact type: already-fused modules are left alone
                full = f"{path}.{name}" if path else name
                try:
                    replacements.append((parent, name, fused_kind(child)))
                except ValueError as e:
                    raise ValueError(f"model.{full}: {e}") from None
    for parent, name, fused in replacements:
        setattr(parent, name, fused)
    if scope == "block":  # attention modules outside any layer (or in a fused one already)
        return model, len(replacements) + accelerate_hf(model)[1]
    _keep_fused_modules_whole(model)
    return model, len(replacements)


def _keep_fused_modules_whole(model: nn.Module) -> None:
    """Names the fused classes in ``_no_split_modules`` of every pretrained model inside
    ``model`` (on the instances: transformers' class attribute is shared by every CvT), so
    ``device_map="auto"`` never puts one fused module's tensors on two devices (the fused
    ops take all their weights on the input's device)."""
    from transformers import PreTrainedModel

    fused = {type(m).__name__ for m in model.modules()
             if isinstance(m, (FusedHFCvtAttention, FusedHFCvtLayer))}
    if not fused:
        return
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            current = m._no_split_modules or []
            # transformers 5 keeps a set on the instance (post_init), 4.x the class's list.
            m._no_split_modules = (current | fused if isinstance(current, set)
                                   else list(current) + sorted(fused - set(current)))
