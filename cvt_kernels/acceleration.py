"""``accelerate(model)``: CvT's modules inside a model replaced in place by the fused ones.

The top of the package's layering (``modules`` <- ``block`` <- ``hf`` <- this module):
it imports the fused modules; none of them imports it. ``cvt_kernels.accelerate`` and
``cvt_kernels.modules.accelerate`` are this module's :func:`accelerate`.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch.nn as nn

from .block import FusedBlock, FusedLayerNorm
from .models.cvt import Attention, Block, LayerNorm
from .modules import FusedConvAttention

__all__ = ["SCOPES", "accelerate"]

SCOPES = ("attention", "block")


def accelerate(model: nn.Module, sync_bn: bool = False, process_group=None,
               scope: str = "attention") -> Tuple[nn.Module, int]:
    """Replaces CvT's modules inside ``model`` with fused ones sharing their parameters
    (devices, dtypes, train/eval state kept), in place. Returns ``(model,
    number_of_modules_replaced)``.

    ``scope``:

    * ``"attention"`` (default): every reference :class:`~cvt_kernels.models.Attention`
      becomes a :class:`FusedConvAttention`;
    * ``"block"``: every reference :class:`~cvt_kernels.models.Block` becomes a
      :class:`~cvt_kernels.block.FusedBlock` (its attention fused as above, its LayerNorms
      and MLP on the ``layer_norm`` and ``mlp`` ops, residual adds folded into GEMMs or
      LayerNorm); Attention modules outside a block are fused as with ``"attention"``, and
      the reference's float32 ``LayerNorm`` modules outside the blocks (the stage norms)
      become :class:`~cvt_kernels.block.FusedLayerNorm` on the ``layer_norm`` op. The count
      is of blocks (and such attention modules).

    Both keep the state_dict (keys and tensors) and the numbers (float64 tests: outputs,
    every gradient, BatchNorm statistics), so loading the state dict into a reference
    model reverses it. The default stays ``"attention"`` until a GPU has measured the block
    ops: on CPU ``"block"`` is faster (``benchmarks/results/cpu/``), but on a GPU nothing
    of it has run yet, and the ``torch`` backend's MLP there is unfused stock ops.

    Hugging Face ``transformers`` CvT modules (``CvtAttention``, and ``CvtLayer`` for
    ``"block"``) are replaced too, by :func:`cvt_kernels.hf.accelerate_hf`.

    ``sync_bn=True`` makes every fused attention (new or already there) use BatchNorm
    statistics all-reduced over ``process_group`` (``None``: the default group) in training,
    like ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for ``nn.BatchNorm2d``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn: expected a bool, got {type(sync_bn).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError("process_group: only used with sync_bn=True")
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope: expected one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if type(model) is Attention:
        raise TypeError("model: is itself an Attention and cannot be replaced in place; use "
                        "FusedConvAttention.from_reference(model)")
    if scope == "block" and type(model) is Block:
        raise TypeError("model: is itself a Block and cannot be replaced in place; use "
                        "cvt_kernels.block.FusedBlock.from_reference(model)")
    replaced = 0
    # HF first: it may refuse a module, and then nothing should have been replaced yet.
    if any(_is_hf_cvt_attention(m) or _is_hf_cvt_layer(m) for m in model.modules()):
        # Imported here: transformers is loaded already (the model holds its modules), and
        # `import cvt_kernels` must not need it.
        from .hf import accelerate_hf

        replaced += accelerate_hf(model, scope=scope)[1]
    # Exact types: already-fused modules are left alone. Blocks first (each fuses its own
    # attention), then the module list again for attention modules outside any block.
    kinds = ((Block, FusedBlock), (Attention, FusedConvAttention))
    for kind, fused_kind in kinds[1 if scope == "attention" else 0:]:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is kind:
                    setattr(parent, name, fused_kind.from_reference(child))
                    replaced += 1
    if scope == "block":
        # The reference's float32 LayerNorms outside the blocks (the stage norms) of a model
        # with fused blocks on the layer_norm op too (the blocks' own run on it already).
        # Not counted.
        in_blocks = {id(m) for b in model.modules() if isinstance(b, FusedBlock)
                     for m in b.modules()}
        for parent in list(model.modules()) if in_blocks else []:
            if id(parent) in in_blocks:
                continue
            for name, child in list(parent.named_children()):
                if type(child) is LayerNorm:
                    setattr(parent, name, FusedLayerNorm.from_reference(child))
    fused = [m for m in model.modules() if _is_fused(m)]
    if not fused:  # an already accelerated model is quietly left as it is
        warnings.warn(f"accelerate: the {type(model).__name__} holds no CvT attention module "
                      f"(cvt_kernels.models.Attention, or transformers' CvtAttention): nothing "
                      f"was replaced", UserWarning, stacklevel=2)
    if sync_bn:
        for module in fused:
            module.sync_bn, module.sync_bn_group = True, process_group
    return model, replaced


def _is_fused(module: nn.Module) -> bool:
    # By name: importing cvt_kernels.hf would import transformers.
    return isinstance(module, FusedConvAttention) or type(module).__name__ == "FusedHFCvtAttention"


def _is_hf_cvt_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "CvtAttention" and cls.__module__.startswith("transformers.")


def _is_hf_cvt_layer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "CvtLayer" and cls.__module__.startswith("transformers.")
