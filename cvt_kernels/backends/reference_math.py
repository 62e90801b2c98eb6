"""The reference math of the block ops (MLP, output projection + residual, LayerNorm) and
of drop path's arithmetic: plain PyTorch in float32 (float64 stays float64), returned in the
input dtype.

The ``reference`` backend runs the explicit ``*_forward`` / ``*_backward`` pairs; the
``*_reference`` functions are the autograd-differentiable oracles the tests compare with.
The math is written out in each op's docstring (``cvt_kernels/ops/mlp.py``, ``linear.py``,
``layer_norm.py``, ``_drop_path.py``), which re-export these functions under their old
names. They live here, below the ops, because the backends layer must not import the ops
layer (``tests/test_layering.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import stat_dtype

__all__ = ["QUICK_GELU_ALPHA", "activation", "activation_grad", "drop_path",
           "drop_path_row_factors", "layer_norm_backward", "layer_norm_forward",
           "layer_norm_reference", "linear_backward", "linear_forward", "linear_reference",
           "mlp_backward", "mlp_forward", "mlp_reference"]

#: The reference CvT's QuickGELU: ``z * sigmoid(1.702 z)``.
QUICK_GELU_ALPHA = 1.702


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# -------------------------------------------------------------------- drop path
def drop_path(y: Tensor, rand: Tensor, keep: float) -> Tensor:
    """``DropPath``'s forward given its draws: ``y.div(keep) * floor(keep + rand)``."""
    mask = (keep + rand).floor_()
    return y.div(keep) * mask.reshape((y.shape[0],) + (1,) * (y.ndim - 1))


def drop_path_row_factors(rand: Tensor, keep: float, rows: int, dtype: torch.dtype) -> Tensor:
    """``floor(keep + rand) / keep`` per row of a ``(B * T, C)`` matrix (``T = rows / B``),
    in ``dtype``: the factor the reference math scales the rows by."""
    per_sample = (keep + rand.reshape(-1)).floor().to(dtype) / keep
    return per_sample.repeat_interleave(rows // per_sample.numel())


# -------------------------------------------------------------------- mlp
def activation(z: Tensor, act: str) -> Tensor:
    if act == "quick_gelu":
        return z * torch.sigmoid(QUICK_GELU_ALPHA * z)
    return F.gelu(z)


def activation_grad(z: Tensor, act: str) -> Tensor:
    """``d act / d z`` at ``z``."""
    if act == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_ALPHA * z)
        return s + QUICK_GELU_ALPHA * z * s * (1 - s)
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return cdf + z * pdf


def mlp_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                  fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str = "quick_gelu",
                  residual: Optional[Tensor] = None) -> Tensor:
    """The oracle: the math of ``ops/mlp.py``'s docstring in float32 (float64 stays
    float64), returned in ``x``'s dtype; differentiable by autograd."""
    cd = stat_dtype(x.dtype)
    z = F.linear(x.to(cd), fc1_weight.to(cd), _cast(fc1_bias, cd))
    out = F.linear(activation(z, act), fc2_weight.to(cd), _cast(fc2_bias, cd))
    if residual is not None:
        out = out + residual.to(cd)
    return out.to(x.dtype)


def mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual,
                drop_rand=None, keep_prob=1.0, store_z=True) -> Tuple[Tensor, Tensor]:
    """The ``reference`` backend's forward: ``(out, z)``, ``z`` ``(M, hidden)`` in ``x``'s
    dtype (what a kernel saves for the backward; empty without ``store_z``). With
    ``drop_rand`` the MLP's output is rounded to ``x``'s dtype and dropped as
    ``DropPath`` computes it before the residual is added."""
    cd = stat_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(cd)
    z = F.linear(x2, fc1_weight.to(cd), _cast(fc1_bias, cd))
    out = F.linear(activation(z, act), fc2_weight.to(cd), _cast(fc2_bias, cd))
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    if drop_rand is not None:
        out = drop_path(out.to(x.dtype), drop_rand, keep_prob).to(cd)
    if residual is not None:
        out = out + residual.to(cd)
    return out.to(x.dtype), (z.to(x.dtype) if store_z else x.new_empty((0,)))


def mlp_backward(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
                 drop_rand=None, keep_prob=1.0) -> Tuple[Optional[Tensor], ...]:
    """The ``reference`` backend's backward: ``(dx, dW1, db1, dW2, db2)``."""
    cd = stat_dtype(x.dtype)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
    if drop_rand is not None:
        g = g * drop_path_row_factors(drop_rand, keep_prob, g.shape[0], cd)[:, None]
    zc = z.to(cd)
    a = activation(zc, act)
    dw2 = g.t() @ a
    dz = (g @ fc2_weight.to(cd)) * activation_grad(zc, act)
    dw1 = dz.t() @ x.reshape(-1, x.shape[-1]).to(cd)
    dx = (dz @ fc1_weight.to(cd)).reshape(x.shape)
    return (dx.to(x.dtype), dw1.to(fc1_weight.dtype),
            dz.sum(0).to(fc1_weight.dtype) if has_bias1 else None,
            dw2.to(fc2_weight.dtype), g.sum(0).to(fc2_weight.dtype) if has_bias2 else None)


# -------------------------------------------------------------------- linear
def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     residual: Optional[Tensor] = None) -> Tensor:
    """The oracle: ``residual + x W^T + b`` in float32 (float64 stays float64), returned in
    ``x``'s dtype; differentiable by autograd."""
    cd = stat_dtype(x.dtype)
    out = F.linear(x.to(cd), weight.to(cd), _cast(bias, cd))
    if residual is not None:
        out = out + residual.to(cd)
    return out.to(x.dtype)


def linear_forward(x, weight, bias, residual, drop_rand=None, keep_prob=1.0) -> Tensor:
    """The ``reference`` backend's forward. With ``drop_rand`` the product is rounded to
    ``x``'s dtype and dropped as ``DropPath`` computes it before the residual is added."""
    cd = stat_dtype(x.dtype)
    out = F.linear(x.to(cd), weight.to(cd), _cast(bias, cd))
    if drop_rand is not None:
        out = drop_path(out.to(x.dtype), drop_rand, keep_prob).to(cd)
    if residual is not None:
        out = out + residual.to(cd)
    return out.to(x.dtype)


def linear_backward(grad_out, x, weight, has_bias, drop_rand=None, keep_prob=1.0
                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The ``reference`` backend's backward: ``(dx, dW, db)``."""
    cd = stat_dtype(x.dtype)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
    if drop_rand is not None:
        g = g * drop_path_row_factors(drop_rand, keep_prob, g.shape[0], cd)[:, None]
    x2 = x.reshape(-1, x.shape[-1]).to(cd)
    dx = (g @ weight.to(cd)).reshape(x.shape)
    return (dx.to(x.dtype), (g.t() @ x2).to(weight.dtype),
            g.sum(0).to(weight.dtype) if has_bias else None)


# -------------------------------------------------------------------- layer_norm
def layer_norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float = 1e-5, residual: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor]:
    """The oracle: ``(normed, s)`` with the math of ``ops/layer_norm.py``'s docstring computed
    in float32 (float64 stays float64), ``normed`` in ``x``'s dtype; differentiable by
    autograd."""
    s = x if residual is None else x + residual
    cd = stat_dtype(x.dtype)
    y = F.layer_norm(s.to(cd), (s.shape[-1],), _cast(weight, cd), _cast(bias, cd), eps)
    return y.to(x.dtype), s


def layer_norm_forward(x, residual, weight, bias, eps) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``reference`` backend's forward: ``(normed, sum, mean, rstd)`` (``sum`` empty
    without a residual), explicit statistics in float32 (float64 for float64)."""
    s = x if residual is None else x + residual
    cd = stat_dtype(x.dtype)
    sc = s.to(cd)
    mean = sc.mean(-1)
    var = (sc - mean[..., None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (sc - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return (y.to(x.dtype), s if residual is not None else x.new_empty((0,)), mean, rstd)


def layer_norm_backward(grad_normed, grad_sum, s, weight, mean, rstd, has_bias
                        ) -> Tuple[Optional[Tensor], ...]:
    """The ``reference`` backend's backward: ``(ds, dweight, dbias)``."""
    cd = stat_dtype(s.dtype)
    g = grad_normed.to(cd)
    xhat = (s.to(cd) - mean[..., None]) * rstd[..., None]
    gw = g * weight.to(cd) if weight is not None else g
    ds = rstd[..., None] * (gw - gw.mean(-1, keepdim=True)
                            - xhat * (gw * xhat).mean(-1, keepdim=True))
    if grad_sum is not None:
        ds = ds + grad_sum.to(cd)
    rows = tuple(range(g.ndim - 1))
    dweight = (g * xhat).sum(rows).to(weight.dtype) if weight is not None else None
    dbias = g.sum(rows).to(weight.dtype if weight is not None else s.dtype) if has_bias else None
    return ds.to(s.dtype), dweight, dbias
