"""``FusedBlock``: CvT's transformer block on the fused ops (``accelerate(model, scope="block")``).

The reference block::

    x = x + drop_path(attn(norm1(x), h, w))
    x = x + drop_path(mlp(norm2(x)))           # mlp = fc2(QuickGELU(fc1(.)))

on the ops: :func:`cvt_kernels.ops.layer_norm` for both norms (float32 statistics,
input-dtype I/O), :class:`~cvt_kernels.FusedConvAttention` for the attention and
:func:`cvt_kernels.ops.mlp` for the MLP. Where drop path is off (eval, or rate 0: every
block of CvT-13 in eval) the residual adds go into the GEMMs that precede them (the
attention's output projection, fc2); where it is on, the first add is fused with norm2
(:func:`cvt_kernels.ops.add_layer_norm`). A submodule the ops cannot run (another
activation or norm, MLP dropout in training) runs as the module it is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .models.cvt import Attention, Block, Mlp, QuickGELU
from .modules import FusedConvAttention
from .ops._checks import check_tensor
from .ops.layer_norm import run_layer_norm, validate_layer_norm
from .ops.mlp import run_mlp, validate_mlp

__all__ = ["FusedBlock", "drop_path_active", "layer_norm_of", "mlp_activation"]


def layer_norm_of(norm: nn.Module) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], float]]:
    """``(weight, bias, eps)`` of a LayerNorm over the last axis (``nn.LayerNorm`` or the
    reference's float32 ``LayerNorm``, which compute the same), else ``None``."""
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps
    return None


def mlp_activation(act: nn.Module) -> Optional[str]:
    """The ``mlp`` op's name for an activation module, or ``None`` when it has none."""
    if type(act) is QuickGELU:
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def dropout_active(drop: nn.Module) -> bool:
    return isinstance(drop, nn.Dropout) and drop.training and drop.p > 0


def drop_path_active(drop_path: nn.Module) -> bool:
    """Whether ``drop_path`` may change its input (an unknown module: assume it may)."""
    if isinstance(drop_path, nn.Identity):
        return False
    prob = getattr(drop_path, "drop_prob", None)
    if prob is None:
        return True
    return bool(drop_path.training and prob > 0)


def norm(norm_module: nn.Module, x: Tensor, residual: Optional[Tensor] = None
         ) -> Tuple[Tensor, Tensor]:
    """``(norm(s), s)`` with ``s = x + residual`` (or ``x``): the op when the module is a
    LayerNorm, else the module itself."""
    args = layer_norm_of(norm_module)
    if args is None:
        s = x if residual is None else x + residual
        return norm_module(s), s
    weight, bias, eps = args
    validate_layer_norm(x, weight, bias, eps, residual)
    y, s = run_layer_norm(x, residual, weight, bias, eps)
    return y, (x if s is None else s)


def mlp_call(fc1: nn.Linear, fc2: nn.Linear, act: str, x: Tensor,
             residual: Optional[Tensor]) -> Tensor:
    validate_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, residual)
    return run_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, residual)


class FusedBlock(Block):
    """Drop-in for :class:`cvt_kernels.models.Block` (the reference CvT block).

    Same submodules (``norm1``, ``attn``, ``drop_path``, ``norm2``, ``mlp``), parameters,
    buffers and state_dict keys; ``attn`` is a :class:`~cvt_kernels.FusedConvAttention`.
    ``forward(x, h, w)``: ``x`` ``(B, h*w [+1], C)``, returns the same shape and dtype,
    with the reference block's numbers (float64 tests: outputs, gradients, BatchNorm
    running statistics) and the same random draws of drop path, in the same order.
    """

    @classmethod
    def from_reference(cls, block: Block) -> "FusedBlock":
        """A ``FusedBlock`` sharing ``block``'s submodules (its attention made a
        ``FusedConvAttention`` over the same parameters), with the same train/eval state."""
        if not isinstance(block, Block):
            raise TypeError(f"block: expected a cvt_kernels.models.Block, got "
                            f"{type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.with_cls_token = block.with_cls_token
        for name, child in block.named_children():  # the reference's order: same keys
            if name == "attn" and type(child) is Attention:
                child = FusedConvAttention.from_reference(child)
            setattr(new, name, child)
        new.training = block.training  # not .train(): that would also flip shared children
        return new

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        check_tensor(x, "x", ndim=3)
        normed, _ = norm(self.norm1, x)
        if not drop_path_active(self.drop_path) and isinstance(self.attn, FusedConvAttention):
            x = self.attn.forward_residual(normed, h, w, x)
            normed, _ = norm(self.norm2, x)
        else:
            # x + drop_path(attn): the add is commutative in IEEE arithmetic, bit for bit.
            normed, x = norm(self.norm2, self.drop_path(self.attn(normed, h, w)), x)
        mlp = self.mlp
        act = (mlp_activation(mlp.act) if isinstance(mlp, Mlp)
               and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear) else None)
        if act is None or dropout_active(mlp.drop):
            return x + self.drop_path(mlp(normed))
        if drop_path_active(self.drop_path):
            return x + self.drop_path(mlp_call(mlp.fc1, mlp.fc2, act, normed, None))
        return mlp_call(mlp.fc1, mlp.fc2, act, normed, x)
