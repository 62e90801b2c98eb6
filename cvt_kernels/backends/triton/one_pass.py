"""Inference-time one-pass CvT attention: the q projection in the attention kernel's prologue
and, for single-head attention, the output projection in its epilogue.

``out = proj(attention(q, k, v))`` with ``q = Linear_q(BN(dwconv3x3_stride1(x)))``. Each
program owns one query tile of one (batch, head): it builds its q tile from ``x`` (the
depthwise conv, BatchNorm with the running statistics, read from the buffers with ``eps``
as the projection's eval kernel reads them, and ``proj_q`` as a GEMM over input channels,
exactly the projection kernel's prologue), runs the online-softmax loop over the
precomputed k and v, and, when there is one head (CvT's stage 1: C = head_dim = 64), applies
``proj`` (+ bias) to the finished tile before storing it. So q and the attention output
never travel through memory: for CvT-13 stage 1 at batch 64 in bfloat16 that is ~51 MB of
writes and reads fewer per call, out of ~170 MB moved by the unfused path.

Forward only: the ops layer uses it when no gradient is needed (``torch.no_grad`` or
``torch.inference_mode``) and BatchNorm uses running statistics; the backward of a training
step needs q and the attention output anyway. Rounding matches the unfused kernels: q and
the attention output are rounded to the input dtype where the unfused path stores them.

The price: with several heads, every head's programs rebuild the same conv + BN tile of
``x`` (all input channels), so whether this beats the unfused kernels depends on the shape
and the GPU. By default the ops layer measures both on the first call of each shape and
keeps the faster (``CVT_KERNELS_ONE_PASS=auto``, :mod:`cvt_kernels.ops.one_pass`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv
from ._runtime import acc_dtype as _acc_dtype
from ._runtime import dot_precision as _input_precision
from ._runtime import target_of
from .attention import LOG2E, _attend, _block_d, _load_rows
from .conv_projection import _check_sizes, _projection_input_tile

__all__ = ["MAX_HEAD_DIM", "one_pass_attention", "one_pass_config"]

MAX_HEAD_DIM = 64  # compiled without spills up to here (launch_check); 128 is not checked


@triton.jit
def _one_pass_fwd_kernel(
    # Pointers: x (B, n_q, C_IN), depthwise weight (C_IN, 1, 3, 3), BatchNorm's running mean
    # and variance (any float dtype) and affine (C_IN), q projection weight (C, C_IN) and
    # bias, k and v (B, n_k, C), output projection weight (C, C) and bias, out (B, n_q, C)
    X, CW, RM, RV, BNW, BNB, WQ, BQ, K, V, WP, BP, Out,
    # Sizes, the scale (scale * log2(e), >= 0) and BatchNorm's eps
    H, W, C_IN, n_q, n_k, num_heads, head_dim, qk_scale_log2, eps,
    # Meta-parameters: what is present
    CLS: tl.constexpr, HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr, HAS_QB: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_PB: tl.constexpr,
    # Meta-parameters: tiles and precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``X (B, n_q, C_IN)``, ``K``/``V``/``Out (B, n_*, C)`` with ``C = num_heads *
    head_dim``, all contiguous; grid ``(B * num_heads, cdiv(n_q, BLOCK_M))``."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    C = num_heads * head_dim

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < head_dim
    # Query tokens of this tile -> map positions (stride 1: one output per input token).
    p = offs_m - CLS
    is_cls = mask_m & (p < 0)
    conv_ok = mask_m & (p >= 0)
    p = tl.maximum(p, 0)
    b_rows = tl.zeros([BLOCK_M], tl.int32) + b

    # Prologue: q = BN(dwconv(x)) @ Wq[head rows]^T + bq, one BLOCK_K slice of channels at a time.
    q = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    w_rows = h * head_dim + offs_d
    for k0 in range(0, C_IN, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        c_ok = c < C_IN
        # BatchNorm's rstd from the running variance as it is loaded: no launch before this.
        t = _projection_input_tile(X, CW, RM, RV, eps, BNW, BNB, b_rows, p // W, p % W, mask_m,
                                   conv_ok, is_cls, c, c_ok, H, W, n_q, C_IN, 1, CLS, HAS_BN_W,
                                   HAS_BN_B, True, ACC_DTYPE, BLOCK_M, BLOCK_K)
        w_t = tl.load(WQ + w_rows[None, :] * C_IN + c[:, None],
                      mask=c_ok[:, None] & mask_d[None, :], other=0.0)
        q = tl.dot(t.to(w_t.dtype), w_t, q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_QB:
        q += tl.load(BQ + w_rows, mask=mask_d, other=0.0).to(ACC_DTYPE)[None, :]
    q = q.to(K.dtype.element_ty)  # the unfused projection stores q in the input dtype

    base_kv = b.to(tl.int64) * n_k * C + h * head_dim
    acc, m_i, l_i = _attend(q, K + base_kv, V + base_kv, C, C, n_k, offs_d, mask_d,
                            qk_scale_log2, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, ACC_DTYPE,
                            INPUT_PRECISION)
    out = acc / l_i[:, None]

    o_ptrs = Out + b.to(tl.int64) * n_q * C + offs_m[:, None].to(tl.int64) * C
    if EVEN_D:
        o_mask = mask_m[:, None]
    else:
        o_mask = mask_m[:, None] & mask_d[None, :]
    if HAS_PROJ:
        # One head: the tile holds every channel of its tokens, so proj can run here.
        o = out.to(Out.dtype.element_ty)  # the unfused attention stores its output so
        wp_t = _load_rows(WP + offs_d[None, :] * head_dim + offs_d[:, None], mask_d, mask_d,
                          not EVEN_D, EVEN_D)
        y = tl.dot(o.to(wp_t.dtype), wp_t, input_precision=INPUT_PRECISION,
                   out_dtype=ACC_DTYPE)
        if HAS_PB:
            y += tl.load(BP + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)[None, :]
        tl.store(o_ptrs + offs_d[None, :], y.to(Out.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs + h * head_dim + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=o_mask)


def one_pass_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes and launch options. Not tuned on hardware (no GPU yet): the forward
    attention kernel's first sm_90 candidate's tile shape with a 32-channel prologue slice;
    ``python -m benchmarks.launch_check`` checks it compiles without spills."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)


def one_pass_attention(x: Tensor, h: int, w: int, conv_weight: Tensor, running_mean: Tensor,
                       running_var: Tensor, eps: float, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], q_weight: Tensor, q_bias: Optional[Tensor],
                       k: Tensor, v: Tensor, num_heads: int, scale: float,
                       with_cls_token: bool, proj_weight: Optional[Tensor] = None,
                       proj_bias: Optional[Tensor] = None) -> Tensor:
    """``attention(q_proj(x), k, v)`` for ``x (B, [1+] h*w, C_in)``, then ``proj`` when
    ``proj_weight`` is given (one head only). The q projection's BatchNorm uses
    ``running_mean``/``running_var`` (``(C_in,)``, any float dtype, read as they are) and
    ``eps``. One launch. The caller checked shapes and support."""
    batch, n_q, c_in = x.shape
    n_k, channels = k.shape[1], k.shape[2]
    head_dim = channels // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"one_pass_attention: head_dim {head_dim} > {MAX_HEAD_DIM}")
    if proj_weight is not None and num_heads != 1:
        raise ValueError("one_pass_attention: the proj epilogue needs num_heads == 1")
    x, conv_weight, q_weight, k, v, running_mean, running_var = (
        t.contiguous() for t in (x, conv_weight, q_weight, k, v, running_mean, running_var))
    bn_weight, bn_bias, q_bias, proj_weight, proj_bias = (
        None if t is None else t.contiguous()
        for t in (bn_weight, bn_bias, q_bias, proj_weight, proj_bias))
    _check_sizes(x, k, v)
    out = torch.empty((batch, n_q, channels), dtype=x.dtype, device=x.device)
    _check_sizes(out)
    if out.numel() == 0:
        return out
    if scale < 0:  # the kernel needs a scale >= 0: softmax(c q.k) = softmax(|c| (-q).k)
        q_weight, scale = -q_weight, -scale
        q_bias = None if q_bias is None else -q_bias
    interpret = target_of(x) is None
    cfg = one_pass_config(head_dim, x.dtype, interpret)
    grid = (batch * num_heads, cdiv(n_q, cfg["BLOCK_M"]))
    _one_pass_fwd_kernel[grid](
        x, conv_weight, running_mean, running_var, bn_weight, bn_bias, q_weight, q_bias, k, v,
        proj_weight, proj_bias, out, h, w, c_in, n_q, n_k, num_heads, head_dim, scale * LOG2E,
        float(eps),
        CLS=int(with_cls_token), HAS_BN_W=bn_weight is not None, HAS_BN_B=bn_bias is not None,
        HAS_QB=q_bias is not None, HAS_PROJ=proj_weight is not None,
        HAS_PB=proj_bias is not None, BLOCK_D=_block_d(head_dim),
        EVEN_D=head_dim == _block_d(head_dim), ACC_DTYPE=_acc_dtype(x.dtype),
        INPUT_PRECISION=_input_precision(x.dtype), **cfg)
    return out
