"""The ``reference`` backend: plain, obviously-correct math in float32 (float64 stays float64).

It is the test oracle and the documentation of the math every kernel backend implements,
forward *and* backward: a kernel backend implements the same four functions and is tested
against these one by one. It is never chosen automatically.

Forward of one projection (``dw_bn``), tokens ``x`` of shape ``(B, [1 +] h*w, C_in)``::

    y    = dwconv(x_map, conv_weight, stride, padding)          # (B, C_in, h', w')
    mean, var = batch stats of y over (B, h', w')               # or the running stats
    t    = [cls, flatten((y - mean) * rstd * bn_weight + bn_bias)]
    out  = t @ proj_weight^T + proj_bias                        # (B, [1 +] h'*w', C_out)

Attention, per head, with an explicit ``scale``::

    S = q k^T * scale;  lse = logsumexp(S);  P = exp(S - lse);  out = P v
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference_math
from .base import (Backend, ProjectionConfig, ProjectionGrads, ProjectionParams, Support,
                   given_or_running_stats, stat_dtype)


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, N, H*D) -> (B, H, N, D)`` (a view)."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``(B, H, N, D) -> (B, N, H*D)``."""
    return t.transpose(1, 2).flatten(2)


def _split_cls(x: Tensor, cfg: ProjectionConfig) -> Tuple[Optional[Tensor], Tensor]:
    if cfg.with_cls_token:
        return x[:, :1], x[:, 1:]
    return None, x


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _to_tokens(m: Tensor) -> Tensor:
    return m.flatten(2).transpose(1, 2)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _bn_shape(t: Tensor) -> Tensor:
    return t[None, :, None, None]


class ReferenceBackend(Backend):
    name = "reference"
    composite = False
    support = Support(kernels="reference", attention_dropout=False)

    # ------------------------------------------------------------------ projection
    def _normalized_map(self, x_map: Tensor, params: ProjectionParams, cfg: ProjectionConfig,
                        mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
        """Recomputes ``y`` (the depthwise conv) and ``xhat`` (it, normalized)."""
        cdt = x_map.dtype
        y = F.conv2d(x_map, params.conv_weight.to(cdt), None, cfg.stride, cfg.padding,
                     1, x_map.shape[1])
        xhat = (y - _bn_shape(mean)) * _bn_shape(rstd)
        return y, xhat

    def _tokens_after_projection_conv(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                                      cfg: ProjectionConfig, mean: Tensor, rstd: Tensor
                                      ) -> Tensor:
        """``t``: the tokens the Linear reads, in the compute dtype."""
        cdt = stat_dtype(x.dtype)
        cls, rest = _split_cls(x.to(cdt), cfg)
        x_map = _to_map(rest, h, w)
        if cfg.method == "dw_bn":
            _, xhat = self._normalized_map(x_map, params, cfg, mean, rstd)
            z = xhat
            if params.bn_weight is not None:
                z = z * _bn_shape(params.bn_weight.to(cdt))
            if params.bn_bias is not None:
                z = z + _bn_shape(params.bn_bias.to(cdt))
        elif cfg.method == "avg":
            z = F.avg_pool2d(x_map, cfg.kernel_size, cfg.stride, cfg.padding, ceil_mode=True)
        else:
            z = x_map
        t = _to_tokens(z)
        if cls is not None:
            t = torch.cat([cls, t], dim=1)
        return t

    def conv_projection_stats(self, x, h, w, conv_weight, cfg):
        cdt = stat_dtype(x.dtype)
        _, rest = _split_cls(x.to(cdt), cfg)
        y = F.conv2d(_to_map(rest, h, w), conv_weight.to(cdt), None, cfg.stride, cfg.padding,
                     1, x.shape[2])
        mean = y.mean(dim=(0, 2, 3))
        var = ((y - _bn_shape(mean)) ** 2).mean(dim=(0, 2, 3))
        return mean, var

    def conv_projection_forward(self, x, h, w, params, mean, rstd, cfg, eps=None):
        cdt = stat_dtype(x.dtype)
        if cfg.method == "dw_bn":
            mean, rstd = given_or_running_stats(params, mean, rstd, eps, x.dtype)
        t = self._tokens_after_projection_conv(x, h, w, params, cfg, mean.to(cdt), rstd.to(cdt))
        out = F.linear(t, params.proj_weight.to(cdt), _cast(params.proj_bias, cdt))
        return out.to(x.dtype)

    def conv_projection_backward(self, grad_out, x, h, w, params, mean, rstd, cfg, batch_stats,
                                 eps=None):
        cdt = stat_dtype(x.dtype)
        if cfg.method == "dw_bn":
            mean, rstd = given_or_running_stats(params, mean, rstd, eps, x.dtype)
        save_mean, save_rstd = mean.to(cdt), rstd.to(cdt)
        go = grad_out.to(cdt)
        t = self._tokens_after_projection_conv(x, h, w, params, cfg, save_mean, save_rstd)
        d_proj_w = go.flatten(0, 1).t() @ t.flatten(0, 1)
        d_proj_b = go.sum(dim=(0, 1)) if params.proj_bias is not None else None
        dt = go @ params.proj_weight.to(cdt)
        d_cls, dt_rest = _split_cls(dt, cfg)
        ho, wo = cfg.out_size(h), cfg.out_size(w)
        dz = _to_map(dt_rest, ho, wo)

        cls, rest = _split_cls(x.to(cdt), cfg)
        x_map = _to_map(rest, h, w)
        d_conv_w = d_bn_w = d_bn_b = None
        if cfg.method == "dw_bn":
            _, xhat = self._normalized_map(x_map, params, cfg, save_mean, save_rstd)
            gamma = (params.bn_weight.to(cdt) if params.bn_weight is not None
                     else torch.ones_like(save_rstd))
            d_bn_w = (dz * xhat).sum(dim=(0, 2, 3))
            d_bn_b = dz.sum(dim=(0, 2, 3))
            dxhat = dz * _bn_shape(gamma)
            if batch_stats:
                count = dz.numel() // dz.shape[1]
                # BatchNorm training backward: the batch mean and variance depend on y too.
                dy = _bn_shape(save_rstd) * (
                    dxhat
                    - _bn_shape((dxhat).sum(dim=(0, 2, 3)) / count)
                    - xhat * _bn_shape((dxhat * xhat).sum(dim=(0, 2, 3)) / count))
            else:
                dy = dxhat * _bn_shape(save_rstd)
            conv_w = params.conv_weight.to(cdt)
            groups = x_map.shape[1]
            dx_map = torch.nn.grad.conv2d_input(x_map.shape, conv_w, dy, cfg.stride,
                                                cfg.padding, 1, groups)
            d_conv_w = torch.nn.grad.conv2d_weight(x_map, conv_w.shape, dy, cfg.stride,
                                                   cfg.padding, 1, groups)
        elif cfg.method == "avg":
            dx_map = torch.ops.aten.avg_pool2d_backward(
                dz, x_map, [cfg.kernel_size] * 2, [cfg.stride] * 2, [cfg.padding] * 2,
                True, True, None)
        else:
            dx_map = dz
        dx = _to_tokens(dx_map)
        if d_cls is not None:
            dx = torch.cat([d_cls, dx], dim=1)

        def like(g: Optional[Tensor], p: Optional[Tensor]) -> Optional[Tensor]:
            return None if g is None or p is None else g.to(p.dtype)

        return ProjectionGrads(
            x=dx.to(x.dtype), conv_weight=like(d_conv_w, params.conv_weight),
            bn_weight=like(d_bn_w, params.bn_weight), bn_bias=like(d_bn_b, params.bn_bias),
            proj_weight=like(d_proj_w, params.proj_weight),
            proj_bias=like(d_proj_b, params.proj_bias))

    # ------------------------------------------------------------------- attention
    def _scores(self, q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
        cdt = stat_dtype(q.dtype)
        qh = split_heads(q.to(cdt), num_heads)
        kh = split_heads(k.to(cdt), num_heads)
        return torch.einsum("bhld,bhtd->bhlt", qh, kh) * scale

    def attention_forward(self, q, k, v, num_heads, scale):
        cdt = stat_dtype(q.dtype)
        s = self._scores(q, k, num_heads, scale)
        lse = torch.logsumexp(s, dim=-1)
        # softmax() subtracts the row max, exactly; exp(s - lse) would carry lse's rounding
        # (|lse| * eps) into every probability when logits are huge.
        p = torch.softmax(s, dim=-1)
        out = torch.einsum("bhlt,bhtd->bhld", p, split_heads(v.to(cdt), num_heads))
        return merge_heads(out).to(q.dtype), lse

    def attention_backward(self, grad_out, q, k, v, out, lse, num_heads, scale):
        cdt = stat_dtype(q.dtype)
        # The oracle recomputes the probabilities from the scores (see attention_forward);
        # kernel backends use the saved lse instead.
        p = torch.softmax(self._scores(q, k, num_heads, scale), dim=-1)
        do = split_heads(grad_out.to(cdt), num_heads)
        qh, kh, vh = (split_heads(t.to(cdt), num_heads) for t in (q, k, v))
        dv = torch.einsum("bhlt,bhld->bhtd", p, do)
        dp = torch.einsum("bhld,bhtd->bhlt", do, vh)
        # rowsum(dO * O) == rowsum(P * dP): the softmax Jacobian's diagonal correction.
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq = torch.einsum("bhlt,bhtd->bhld", ds, kh) * scale
        dk = torch.einsum("bhlt,bhld->bhtd", ds, qh) * scale
        return (merge_heads(dq).to(q.dtype), merge_heads(dk).to(k.dtype),
                merge_heads(dv).to(v.dtype))


    # ------------------------------------------------------------------ block ops
    # The math: reference_math.py (re-exported beside each op, cvt_kernels/ops/*.py).
    block_ops = ("mlp", "layer_norm", "linear")

    def mlp_forward(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual,
                    **options):  # drop path, store_z: see reference_math.mlp_forward
        return reference_math.mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act,
                                          residual, **options)

    def mlp_backward(self, grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
                     **options):
        return reference_math.mlp_backward(grad_out, x, fc1_weight, fc2_weight, z, act,
                                           has_bias1, has_bias2, **options)

    def linear_forward(self, x, weight, bias, residual, **options):
        return reference_math.linear_forward(x, weight, bias, residual, **options)

    def linear_backward(self, grad_out, x, weight, has_bias, **options):
        return reference_math.linear_backward(grad_out, x, weight, has_bias, **options)

    def layer_norm_forward(self, x, residual, weight, bias, eps):
        return reference_math.layer_norm_forward(x, residual, weight, bias, eps)

    def layer_norm_backward(self, grad_normed, grad_sum, s, weight, mean, rstd, has_bias):
        return reference_math.layer_norm_backward(grad_normed, grad_sum, s, weight, mean, rstd,
                                                  has_bias)
