"""The ``cuda`` backend: the ``csrc/`` CUDA kernels for depthwise conv + BatchNorm, cuBLAS
for the projections, and the best attention available.

A kernel backend (behind the ``cvt_kernels::*`` custom ops, like ``triton``):

* projection, pass 1 (training): ``_C.dwconv_bn_stats`` -- per-channel mean and biased
  variance of the depthwise conv output (conv recomputed, nothing stored);
* projection, pass 2: ``_C.dwconv_bn_forward`` writes the normalized tokens ``t`` (class
  token passed through, dtype of ``x``), then ``F.linear(t, proj_weight, proj_bias)`` (cuBLAS;
  float32 follows ``torch.backends.cuda.matmul.allow_tf32``);
* projection backward: ``t`` recomputed, ``d_proj_weight = grad_out^T t`` and
  ``dt = grad_out @ proj_weight`` (cuBLAS), then ``_C.dwconv_bn_backward``: BatchNorm's
  (training or eval) backward, the depthwise weight gradient and ``dx``. Scratch: ``t``
  and ``dt`` (``B * T' * C_in`` each, dtype of ``x``) plus the extension's float32 ``dy``;
* attention: the triton backend's flash attention when it can run the call, else
  ``F.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN, as PyTorch picks).
  The SDPA path's backward recomputes the probabilities a block of queries at a time
  (cuBLAS matmuls in float32) and reads no ``lse``: the saved one is NaN-filled, since SDPA
  does not return it. The Triton kernel serves head_dim <= 128 (every CvT config).

The registry looks the extension up when it registers the backend
(``cvt_kernels/_cuda_ext.py``); without it the backend reports ``"not built: <reason>"``
and the dispatcher passes over it.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (Backend, ProjectionConfig, ProjectionGrads, ProjectionParams, Support,
                   given_or_running_stats, stat_dtype)

__all__ = ["CudaBackend", "sdpa_attention_backward", "sdpa_attention_forward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _heads(t: Tensor, num_heads: int) -> Tensor:
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)


def sdpa_attention_forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                           scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` with ``out`` from ``F.scaled_dot_product_attention``; ``lse`` is NaN
    (SDPA does not return it; :func:`sdpa_attention_backward` does not read it)."""
    out = F.scaled_dot_product_attention(_heads(q, num_heads), _heads(k, num_heads),
                                         _heads(v, num_heads), scale=scale)
    lse = torch.full((q.shape[0], num_heads, q.shape[1]), float("nan"), device=q.device,
                     dtype=stat_dtype(q.dtype))
    return out.transpose(1, 2).flatten(2), lse


#: Score elements per block of the SDPA path's backward (float32: 256 MiB of scores).
BACKWARD_BLOCK_ELEMENTS = 1 << 26


def sdpa_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                            scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of ``softmax(q k^T * scale) v``: the probabilities recomputed for a
    block of queries at a time (all keys; at most :data:`BACKWARD_BLOCK_ELEMENTS` scores),
    float32 matmuls (float64 for float64), ``dS = P * (dP - rowsum(P * dP))``.

    Explicit math, not SDPA's autograd: a custom op's implementation runs below autograd.
    """
    cdt = stat_dtype(q.dtype)
    qh, kh, vh, doh = (_heads(t, num_heads) for t in (q, k, v, grad_out))  # (B, H, N, D)
    kf, vf = kh.to(cdt), vh.to(cdt)
    batch, heads, n_q, _ = qh.shape
    n_k = kh.shape[2]
    dq = torch.empty(qh.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(kh.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(vh.shape, dtype=cdt, device=q.device)
    rows = max(1, min(n_q, BACKWARD_BLOCK_ELEMENTS // max(1, batch * heads * n_k)))
    for start in range(0, n_q, rows):
        qc = qh[:, :, start:start + rows].to(cdt)
        doc = doh[:, :, start:start + rows].to(cdt)
        p = torch.softmax(torch.matmul(qc, kf.transpose(-1, -2)) * scale, dim=-1)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq[:, :, start:start + rows] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale

    def merge(t: Tensor, like: Tensor) -> Tensor:
        return t.transpose(1, 2).flatten(2).to(like.dtype)

    return merge(dq, q), merge(dk, k), merge(dv, v)


class CudaBackend(Backend):
    name = "cuda"
    composite = False

    def __init__(self, loader: Optional[Callable[[], Tuple[Optional[object], Optional[str]]]]
                 = None):
        self._loader = loader
        self._loaded = False
        self._ext: Optional[object] = None
        self._reason: Optional[str] = None

    @property
    def ext(self):
        """The extension module (``cvt_kernels._C`` or the JIT build), or ``None``."""
        if not self._loaded:
            loader = self._loader
            if loader is None:
                from .. import _cuda_ext

                loader = _cuda_ext.load
            self._ext, self._reason = loader()
            self._loaded = True
        return self._ext

    def unavailable_reason(self) -> Optional[str]:
        if self.ext is None:
            return f"not built: {self._reason}"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    support = Support(kernels="CUDA", devices=("cuda",), dtypes=_DTYPES,
                      min_capability=(8, 0), methods=("dw_bn",), kernel_padding=(3, 1),
                      strides=(1, 2), attention_dropout=False)

    # ------------------------------------------------------------------ projection
    def _tokens(self, x: Tensor, h: int, w: int, params: ProjectionParams, mean: Tensor,
                rstd: Tensor, cfg: ProjectionConfig) -> Tensor:
        """The normalized tokens the Linear reads (class token first), dtype of ``x``."""
        return self.ext.dwconv_bn_forward(
            x.contiguous(), _f32(params.conv_weight), _f32(mean), _f32(rstd),
            _f32(params.bn_weight), _f32(params.bn_bias), h, w, cfg.stride, cfg.with_cls_token)

    def conv_projection_stats(self, x, h, w, conv_weight, cfg):
        return self.ext.dwconv_bn_stats(x.contiguous(), _f32(conv_weight), h, w, cfg.stride,
                                        cfg.with_cls_token)

    # The extension takes explicit (mean, rstd): in eval they come from the running buffers
    # by stock ops (base.given_or_running_stats), a few small launches per call.
    def conv_projection_forward(self, x, h, w, params, mean, rstd, cfg, eps=None):
        mean, rstd = given_or_running_stats(params, mean, rstd, eps, x.dtype)
        t = self._tokens(x, h, w, params, mean, rstd, cfg)
        return F.linear(t, params.proj_weight, params.proj_bias)

    def conv_projection_backward(self, grad_out, x, h, w, params, mean, rstd, cfg, batch_stats,
                                 eps=None):
        mean, rstd = given_or_running_stats(params, mean, rstd, eps, x.dtype)
        x = x.contiguous()
        grad_out = grad_out.contiguous()
        c_in, c_out = x.shape[2], params.proj_weight.shape[0]
        t = self._tokens(x, h, w, params, mean, rstd, cfg)
        d_proj_w = grad_out.reshape(-1, c_out).t() @ t.reshape(-1, c_in)
        d_proj_b = (grad_out.sum(dim=(0, 1), dtype=torch.float32)
                    if params.proj_bias is not None else None)
        dt = torch.matmul(grad_out, params.proj_weight.to(grad_out.dtype))
        dx, d_conv_w, d_bn_w, d_bn_b = self.ext.dwconv_bn_backward(
            dt.contiguous(), x, _f32(params.conv_weight), _f32(mean), _f32(rstd),
            _f32(params.bn_weight), h, w, cfg.stride, cfg.with_cls_token, batch_stats)

        def like(g: Optional[Tensor], p: Optional[Tensor]) -> Optional[Tensor]:
            return None if g is None or p is None else g.to(p.dtype)

        return ProjectionGrads(
            x=dx, conv_weight=like(d_conv_w, params.conv_weight),
            bn_weight=like(d_bn_w, params.bn_weight), bn_bias=like(d_bn_b, params.bn_bias),
            proj_weight=like(d_proj_w, params.proj_weight),
            proj_bias=like(d_proj_b, params.proj_bias))

    # ------------------------------------------------------------------- attention
    def _triton_attention(self, q: Tensor, k: Tensor, v: Tensor,
                          num_heads: int) -> Optional[Backend]:
        """The triton backend when it runs this call (the forward and the backward ask the
        same question of the same tensors' shapes and dtypes, so they agree), else None."""
        from . import _REGISTRY  # the registry imports this module: import late

        triton = _REGISTRY.get("triton")
        if triton is None or triton.unavailable_reason() is not None:
            return None
        if triton.attention_reasons(q, k, v, num_heads, 0.0):
            return None
        return triton

    def attention_forward(self, q, k, v, num_heads, scale):
        triton = self._triton_attention(q, k, v, num_heads)
        if triton is not None:
            return triton.attention_forward(q, k, v, num_heads, scale)
        return sdpa_attention_forward(q, k, v, num_heads, scale)

    def attention_backward(self, grad_out, q, k, v, out, lse, num_heads, scale):
        triton = self._triton_attention(q, k, v, num_heads)
        if triton is not None:
            return triton.attention_backward(grad_out, q, k, v, out, lse, num_heads, scale)
        return sdpa_attention_backward(grad_out, q, k, v, num_heads, scale)
