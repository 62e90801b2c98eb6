"""CvT's convolutional projection, ``Linear(flatten(BN(dwconv3x3(x_map))))``, in Triton.

Tokens are channel-last, ``x`` of shape ``(B, [1 +] h*w, C_in)``: the 3x3 depthwise conv
reads the 9 neighbouring tokens' channel vectors directly, so no NCHW copy is ever made.
The class token (token 0 with ``CLS``) skips the conv and BatchNorm and goes straight into
the Linear. Padding 1 and kernel 3 are baked in (the backend declines anything else).

Forward (training), as the ops layer drives it:

* pass 1, :func:`conv_projection_stats`: ``_stats_partials_kernel`` computes the conv for a
  tile of output tokens x channels and writes per-block ``(mean, M2)`` of the conv output
  minus a per-channel shift (its value at the first position); ``_stats_combine`` merges
  the blocks in a fixed order with Chan's parallel formula. Shift + block-centred M2 +
  Chan keep a large mean with a tiny variance accurate; deterministic, no atomics. The
  conv output is not stored.
* pass 2, :func:`conv_projection_forward`: ``_forward_kernel`` is a GEMM whose A-operand
  prologue recomputes the conv for a ``BLOCK_M`` x ``BLOCK_K`` slice and normalizes it
  (``(y - mean) * rstd * gamma + beta``); the normalized tokens exist only in registers.

Backward, :func:`conv_projection_backward`. Saved by the ops layer: ``x``, the weights,
``mean`` and ``rstd`` (``2 * C_in`` floats beyond the inputs). Recomputed: the conv output
``y`` and ``xhat`` (9 MACs per element, cheaper than storing ``B * T' * C_in`` values in
the forward). Scratch memory during the backward: one float32 buffer ``dz`` of
``B * h'w' * C_in`` (the gradient of the normalized tokens, overwritten in place by the
gradient of the conv output ``dy``) plus per-block partial sums of ``O(C_in * 9 * blocks)``
and ``O(split * C_out * C_in)`` floats. Kernels, in order:

1. ``_grad_tokens_kernel``: ``dt = grad_out @ proj_weight`` (GEMM); the class-token rows go
   straight to ``dx``; the others are stored as ``dz``, and the epilogue recomputes ``xhat``
   to write per-block partials of ``sum(dz)`` and ``sum(dz * xhat)`` (BN's weight/bias
   gradients and the two sums of BN's training backward).
2. ``_sum_partials_kernel``: those partials -> ``d_bn_bias``, ``d_bn_weight``.
3. ``_grad_conv_out_kernel``: ``dy`` from ``dz`` (BN training or eval backward), in place,
   and per-block partials of the depthwise-weight gradient (9 taps).
4. ``_sum_partials_kernel``: -> ``d_conv_weight``.
5. ``_grad_input_kernel``: ``dx`` = transposed depthwise conv of ``dy`` (gather form, one
   writer per element, no atomics).
6. ``_grad_proj_weight_kernel``: ``d_proj_weight = grad_out^T @ t`` with ``t`` recomputed
   in the prologue as in the forward, split over rows into partials (the reduction is over
   ``B * T'`` rows, far longer than the output is wide), plus ``d_proj_bias``;
   ``_sum_partials_kernel`` adds the splits.

Precision: conv, statistics and normalization in float32 (float64 for float64 inputs, only
possible under the interpreter); ``tl.dot`` gets float16/bfloat16 operands for 16-bit
inputs, float32 operands with TF32 or IEEE precision per
``torch.backends.cuda.matmul.allow_tf32`` for float32 inputs, accumulating in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv, stat_dtype
from ._runtime import Target, dot_precision, target_of

# --------------------------------------------------------------------------------- kernels


@triton.jit
def _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, row_ok, c, c_ok, H, W, T_IN, C,
                 STRIDE: tl.constexpr, CLS: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """3x3 depthwise conv, padding 1, at output positions ``(b, oy, ox)`` x channels ``c``."""
    y = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for tap in tl.static_range(9):
        iy = oy * STRIDE + (tap // 3 - 1)
        ix = ox * STRIDE + (tap % 3 - 1)
        ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        tok = b * T_IN + CLS + iy * W + ix
        xv = tl.load(x_ptr + tok[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :],
                     other=0.0)
        wv = tl.load(cw_ptr + c * 9 + tap, mask=c_ok, other=0.0)
        y += xv.to(ACC) * wv.to(ACC)[None, :]
    return y


@triton.jit
def _output_rows(rows, B, T_OUT, WO, CLS: tl.constexpr):
    """Output token rows ``b * T' + j`` -> batch, map position and class-token flags."""
    row_ok = rows < B * T_OUT
    b = rows // T_OUT
    p = rows % T_OUT - CLS  # -1 on class-token rows
    is_cls = row_ok & (p < 0)
    conv_ok = row_ok & (p >= 0)
    p = tl.maximum(p, 0)
    return b, p, p // WO, p % WO, row_ok, conv_ok, is_cls


@triton.jit
def _projection_input_tile(x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, bnb_ptr, b, oy, ox,
                           row_ok, conv_ok, is_cls, c, c_ok, H, W, T_IN, C,
                           STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
                           HAS_BN_B: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """``t``, the tokens the Linear reads: normalized conv rows, raw class-token rows, and
    zeros outside the tile's valid rows/channels (so they add nothing to a dot)."""
    y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, conv_ok, c, c_ok, H, W, T_IN, C, STRIDE, CLS,
                     ACC, BLOCK_M, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    scale = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_BN_W:
        scale = scale * tl.load(bnw_ptr + c, mask=c_ok, other=0.0).to(ACC)
    t = (y - mean[None, :]) * scale[None, :]
    if HAS_BN_B:
        t = t + tl.load(bnb_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    valid = conv_ok[:, None] & c_ok[None, :]
    if CLS:
        cls_ok = is_cls[:, None] & c_ok[None, :]
        cls_val = tl.load(x_ptr + (b * T_IN)[:, None] * C + c[None, :], mask=cls_ok, other=0.0)
        t = tl.where(cls_ok, cls_val.to(ACC), t)
        valid = valid | cls_ok
    return tl.where(valid, t, 0.0)


@triton.jit
def _dwconv_first_position(x_ptr, cw_ptr, c, c_ok, H, W, C, CLS: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv output at ``(b=0, oy=0, ox=0)``: the statistics' shift."""
    y = tl.zeros([BLOCK_C], ACC)
    zero = tl.zeros([BLOCK_C], tl.int32)
    for tap in tl.static_range(9):
        iy = zero + (tap // 3 - 1)
        ix = zero + (tap % 3 - 1)
        ok = c_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(x_ptr + (CLS + iy * W + ix) * C + c, mask=ok, other=0.0)
        wv = tl.load(cw_ptr + c * 9 + tap, mask=c_ok, other=0.0)
        y += xv.to(ACC) * wv.to(ACC)
    return y


@triton.jit
def _stats_partials_kernel(x_ptr, cw_ptr, part_ptr, B, H, W, WO, N_OUT, C,
                           STRIDE: tl.constexpr, CLS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per block of output tokens: ``(mean, M2)`` per channel of ``y - shift``.

    ``part`` is ``(2 * blocks + 1, C)``: rows ``2i, 2i+1`` for block ``i``, the last row the
    shift. Every block shifts by the same per-channel value (the conv output at the first
    position), so a large mean cancels before any sum is formed: with a tiny variance,
    neither ``sum(y^2) - n * mean^2`` nor Chan's cross term on raw means (each rounded to
    the ulp of the mean) would keep its digits.
    """
    ACC = part_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    total = B * N_OUT
    row_ok = rows < total
    b = rows // N_OUT
    p = rows % N_OUT
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    shift = _dwconv_first_position(x_ptr, cw_ptr, c, c_ok, H, W, C, CLS, ACC, BLOCK_C)
    y = _dwconv_tile(x_ptr, cw_ptr, b, p // WO, p % WO, row_ok, c, c_ok, H, W, H * W + CLS, C,
                     STRIDE, CLS, ACC, BLOCK_M, BLOCK_C)
    d = tl.where(row_ok[:, None], y - shift[None, :], 0.0)
    count = tl.minimum(total - pid_m * BLOCK_M, BLOCK_M).to(ACC)
    mean = tl.sum(d, axis=0) / count
    e = tl.where(row_ok[:, None], d - mean[None, :], 0.0)
    m2 = tl.sum(e * e, axis=0)
    base = part_ptr + pid_m * 2 * C + c
    tl.store(base, mean, mask=c_ok)
    tl.store(base + C, m2, mask=c_ok)
    if pid_m == 0:
        tl.store(part_ptr + tl.num_programs(0) * 2 * C + c, shift, mask=c_ok)


@triton.jit
def _stats_combine_kernel(part_ptr, mean_ptr, var_ptr, N_BLOCKS, TOTAL, C,
                          ROWS_PER_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan et al.'s pairwise update over the blocks, in block order (deterministic)."""
    ACC = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for i in range(0, N_BLOCKS):
        n_b = tl.minimum(TOTAL - i * ROWS_PER_BLOCK, ROWS_PER_BLOCK).to(ACC)
        mean_b = tl.load(part_ptr + i * 2 * C + c, mask=c_ok, other=0.0)
        m2_b = tl.load(part_ptr + i * 2 * C + C + c, mask=c_ok, other=0.0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    shift = tl.load(part_ptr + N_BLOCKS * 2 * C + c, mask=c_ok, other=0.0)
    tl.store(mean_ptr + c, shift + mean_a, mask=c_ok)
    tl.store(var_ptr + c, m2_a / n_a, mask=c_ok)


@triton.jit
def _forward_kernel(x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, bnb_ptr, pw_ptr, pb_ptr, out_ptr,
                    B, H, W, WO, N_OUT, C_IN, C_OUT,
                    STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
                    HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """``out[rows, n] = t[rows, :] @ proj_weight[n, :]^T + bias``, ``t`` built per K slice."""
    ACC = mean_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    T_OUT = N_OUT + CLS
    T_IN = H * W + CLS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, p, oy, ox, row_ok, conv_ok, is_cls = _output_rows(rows, B, T_OUT, WO, CLS)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < C_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, C_IN, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        c_ok = c < C_IN
        t = _projection_input_tile(x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, bnb_ptr, b, oy,
                                   ox, row_ok, conv_ok, is_cls, c, c_ok, H, W, T_IN, C_IN,
                                   STRIDE, CLS, HAS_BN_W, HAS_BN_B, ACC, BLOCK_M, BLOCK_K)
        w_t = tl.load(pw_ptr + n[None, :] * C_IN + c[:, None],
                      mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        # 16-bit inputs: the MMA takes 16-bit operands; float32: TF32 or IEEE per torch.
        acc = tl.dot(t.to(w_t.dtype), w_t, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(pb_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + rows[:, None] * C_OUT + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_tokens_kernel(go_ptr, pw_ptr, x_ptr, cw_ptr, mean_ptr, rstd_ptr, dz_ptr, dx_ptr,
                        part_ptr, B, H, W, WO, N_OUT, C_IN, C_OUT,
                        STRIDE: tl.constexpr, CLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dt = grad_out @ proj_weight`` for a tile of output rows x input channels.

    Class-token rows are the class token's input gradient; the others are stored as ``dz``
    (layout ``(B * h'w', C_in)``), and ``(sum(dz), sum(dz * xhat))`` per channel go to
    ``part`` ``(blocks, 2, C_in)``.
    """
    ACC = dz_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    T_OUT = N_OUT + CLS
    T_IN = H * W + CLS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, p, oy, ox, row_ok, conv_ok, is_cls = _output_rows(rows, B, T_OUT, WO, CLS)
    c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C_IN
    acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
    for n0 in range(0, C_OUT, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < C_OUT
        go = tl.load(go_ptr + rows[:, None] * C_OUT + n[None, :],
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(pw_ptr + n[:, None] * C_IN + c[None, :], mask=n_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc = tl.dot(go, w.to(go.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    conv_mask = conv_ok[:, None] & c_ok[None, :]
    tl.store(dz_ptr + (b * N_OUT + p)[:, None] * C_IN + c[None, :], acc, mask=conv_mask)
    if CLS:
        tl.store(dx_ptr + (b * T_IN)[:, None] * C_IN + c[None, :],
                 acc.to(dx_ptr.dtype.element_ty), mask=is_cls[:, None] & c_ok[None, :])
    y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, conv_ok, c, c_ok, H, W, T_IN, C_IN, STRIDE, CLS,
                     ACC, BLOCK_M, BLOCK_K)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    xhat = (y - mean[None, :]) * rstd[None, :]
    dz = tl.where(conv_mask, acc, 0.0)
    base = part_ptr + pid_m * 2 * C_IN + c
    tl.store(base, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(base + C_IN, tl.sum(dz * xhat, axis=0), mask=c_ok)


@triton.jit
def _grad_conv_out_kernel(x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, sums_ptr, dz_ptr, part_ptr,
                          B, H, W, WO, N_OUT, C,
                          STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
                          BATCH_STATS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """``dz -> dy`` in place, and per-block depthwise-weight gradient partials.

    Eval: ``dy = gamma * rstd * dz``. Training (the statistics depend on ``y``):
    ``dy = gamma * rstd * (dz - sum(dz) / n - xhat * sum(dz * xhat) / n)``.
    ``sums`` is ``(sum(dz), sum(dz * xhat))``, ``part`` is ``(blocks, C, 9)``.
    """
    ACC = dz_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    total = B * N_OUT
    T_IN = H * W + CLS
    row_ok = rows < total
    b = rows // N_OUT
    p = rows % N_OUT
    oy = p // WO
    ox = p % WO
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = row_ok[:, None] & c_ok[None, :]
    dz = tl.load(dz_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0)
    scale = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_BN_W:
        scale = scale * tl.load(bnw_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if BATCH_STATS:
        y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, row_ok, c, c_ok, H, W, T_IN, C, STRIDE, CLS,
                         ACC, BLOCK_M, BLOCK_C)
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
        xhat = (y - mean[None, :]) * rstd[None, :]
        inv_n = 1.0 / total.to(ACC)
        sum_dz = tl.load(sums_ptr + c, mask=c_ok, other=0.0)
        sum_dz_xhat = tl.load(sums_ptr + C + c, mask=c_ok, other=0.0)
        dz = dz - (sum_dz * inv_n)[None, :] - xhat * (sum_dz_xhat * inv_n)[None, :]
    dy = tl.where(mask, dz * scale[None, :], 0.0)
    tl.store(dz_ptr + rows[:, None] * C + c[None, :], dy, mask=mask)
    # d conv_weight[c, tap] = sum over output positions of dy * (the input under the tap).
    for tap in tl.static_range(9):
        iy = oy * STRIDE + (tap // 3 - 1)
        ix = ox * STRIDE + (tap % 3 - 1)
        ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        tok = b * T_IN + CLS + iy * W + ix
        xv = tl.load(x_ptr + tok[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :],
                     other=0.0)
        tl.store(part_ptr + pid_m * 9 * C + c * 9 + tap, tl.sum(dy * xv.to(ACC), axis=0),
                 mask=c_ok)


@triton.jit
def _grad_input_kernel(dy_ptr, cw_ptr, dx_ptr, B, H, W, HO, WO, C,
                       STRIDE: tl.constexpr, CLS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx`` of the map tokens: each input position gathers the (up to 9) output positions
    whose window covers it, so every element has one writer."""
    ACC = dy_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * H * W
    b = rows // (H * W)
    q = rows % (H * W)
    iy = q // W
    ix = q % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dx = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for tap in tl.static_range(9):
        # iy = oy * STRIDE + ky - 1  =>  oy = (iy + 1 - ky) / STRIDE when that divides.
        ny = iy + (1 - tap // 3)
        nx = ix + (1 - tap % 3)
        ok = row_ok & (ny >= 0) & (nx >= 0) & (ny % STRIDE == 0) & (nx % STRIDE == 0)
        oy = ny // STRIDE
        ox = nx // STRIDE
        ok = ok & (oy < HO) & (ox < WO)
        dyv = tl.load(dy_ptr + (b * HO * WO + oy * WO + ox)[:, None] * C + c[None, :],
                      mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(cw_ptr + c * 9 + tap, mask=c_ok, other=0.0).to(ACC)
        dx += dyv * wv[None, :]
    tok = b * (H * W + CLS) + CLS + q
    tl.store(dx_ptr + tok[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _grad_proj_weight_kernel(go_ptr, x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, bnb_ptr,
                             part_ptr, B, H, W, WO, N_OUT, C_IN, C_OUT, SPLIT,
                             STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
                             HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split ``s`` of ``d_proj_weight = grad_out^T @ t`` (and of ``d_proj_bias``): row blocks
    ``s, s + SPLIT, ...``. ``part`` is ``(SPLIT, C_out * C_in + C_out)``."""
    ACC = mean_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    T_OUT = N_OUT + CLS
    T_IN = H * W + CLS
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < C_OUT
    c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C_IN
    acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
    bias_acc = tl.zeros([BLOCK_N], ACC)
    for m0 in range(pid_s * BLOCK_M, B * T_OUT, SPLIT * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        b, p, oy, ox, row_ok, conv_ok, is_cls = _output_rows(rows, B, T_OUT, WO, CLS)
        go_t = tl.load(go_ptr + rows[None, :] * C_OUT + n[:, None],
                       mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        t = _projection_input_tile(x_ptr, cw_ptr, mean_ptr, rstd_ptr, bnw_ptr, bnb_ptr, b, oy,
                                   ox, row_ok, conv_ok, is_cls, c, c_ok, H, W, T_IN, C_IN,
                                   STRIDE, CLS, HAS_BN_W, HAS_BN_B, ACC, BLOCK_M, BLOCK_K)
        acc = tl.dot(go_t, t.to(go_t.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            bias_acc += tl.sum(go_t.to(ACC), axis=1)
    row = part_ptr + pid_s * (C_OUT * C_IN + C_OUT)
    tl.store(row + n[:, None] * C_IN + c[None, :], acc, mask=n_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(row + C_OUT * C_IN + n, bias_acc, mask=n_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, N_PARTS, N_COLS, BLOCK: tl.constexpr):
    """``out[j] = sum_i part[i, j]`` in a fixed order: the deterministic second level of
    every per-block reduction."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N_COLS
    acc = tl.zeros([BLOCK], out_ptr.dtype.element_ty)
    for i in range(0, N_PARTS):
        acc += tl.load(part_ptr + i * N_COLS + cols, mask=ok, other=0.0)
    tl.store(out_ptr + cols, acc, mask=ok)


# ------------------------------------------------------------------------------ launchers


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_c: int
    num_warps: int


# The interpreter runs one program at a time in numpy: small tiles keep the tests' tails
# and multi-block reductions exercised at tiny shapes.
_INTERPRETER_GEMM = GemmConfig(16, 16, 16, 1, 1)
_INTERPRETER_TILE = TileConfig(16, 16, 1)
# What a GPU gets; cvt_kernels/backends/triton/aot.py compiles exactly these for sm_90/sm_80
# and rejects any that spills or overflows shared memory. (narrow, wide) per operand width:
# float32 takes BLOCK_K 16, since 32 overflows sm_80's shared memory and spills there.
GPU_GEMM_CONFIGS = {
    2: (GemmConfig(128, 64, 32, 8, 2), GemmConfig(128, 128, 32, 8, 2)),
    4: (GemmConfig(128, 64, 16, 8, 2), GemmConfig(128, 128, 16, 8, 2)),
}
# 64 tokens x 32 channels: 64 channels made the BN-training backward spill on sm_90 (its
# 9 taps, xhat and dz are live together).
GPU_TILE_CONFIG = TileConfig(64, 32, 4)
_REDUCE_BLOCK = 128


def gemm_config(dtype: torch.dtype, wide: bool, target: Optional[Target]) -> GemmConfig:
    """Block sizes of the GEMM kernels; ``wide``: BLOCK_N 128 (for C_out > 64).

    The weight-gradient GEMM always takes the narrow one: its prologue tile and its
    ``BLOCK_N x BLOCK_K`` accumulator are live together and the wide one spills on sm_80.
    ``target`` ``None``: the interpreter's tiny tiles.
    """
    if target is None:
        return _INTERPRETER_GEMM
    return GPU_GEMM_CONFIGS[2 if dtype.itemsize == 2 else 4][int(wide)]


def tile_config(channels: int, target: Optional[Target]) -> TileConfig:
    """Block sizes of the stencil kernels (conv statistics, BN backward, dx)."""
    if target is None:
        return _INTERPRETER_TILE
    return GPU_TILE_CONFIG


def _check_sizes(*tensors: Tensor) -> None:
    # Offsets are int32 inside the kernels.
    for t in tensors:
        if t is not None and t.numel() >= 2 ** 31:
            raise ValueError(f"triton conv_projection: a tensor of {t.numel()} elements is "
                             f"beyond the kernels' int32 indexing")


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@dataclass(frozen=True)
class _Geometry:
    batch: int
    h: int
    w: int
    ho: int
    wo: int
    channels: int
    stride: int
    cls: int

    @property
    def n_out(self) -> int:
        return self.ho * self.wo


def _geometry(x: Tensor, h: int, w: int, stride: int, with_cls_token: bool) -> _Geometry:
    if x.dim() != 3 or x.shape[1] != h * w + int(with_cls_token):
        raise ValueError(f"triton conv_projection: x of shape {tuple(x.shape)} does not hold "
                         f"{h}x{w} tokens (class token: {with_cls_token})")
    if stride not in (1, 2):
        raise ValueError(f"triton conv_projection: stride {stride} is not supported")
    ho = (h - 1) // stride + 1  # padding 1, kernel 3
    wo = (w - 1) // stride + 1
    return _Geometry(x.shape[0], h, w, ho, wo, x.shape[2], stride, int(with_cls_token))


def _sum_partials(part: Tensor, n_parts: int, n_cols: int, dtype: torch.dtype) -> Tensor:
    out = torch.empty(n_cols, device=part.device, dtype=dtype)
    _sum_partials_kernel[(cdiv(n_cols, _REDUCE_BLOCK),)](
        part, out, n_parts, n_cols, BLOCK=_REDUCE_BLOCK)
    return out


def conv_projection_stats(x: Tensor, h: int, w: int, conv_weight: Tensor, stride: int,
                          with_cls_token: bool) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` of the depthwise conv output (pass 1)."""
    g = _geometry(x, h, w, stride, with_cls_token)
    x = x.contiguous()
    conv_weight = conv_weight.contiguous()
    _check_sizes(x)
    sdt = stat_dtype(x.dtype)
    cfg = tile_config(g.channels, target_of(x))
    total = g.batch * g.n_out
    n_blocks = cdiv(total, cfg.block_m)
    part = torch.empty((2 * n_blocks + 1, g.channels), device=x.device, dtype=sdt)
    _stats_partials_kernel[(n_blocks, cdiv(g.channels, cfg.block_c))](
        x, conv_weight, part, g.batch, g.h, g.w, g.wo, g.n_out, g.channels,
        STRIDE=g.stride, CLS=g.cls, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps)
    mean = torch.empty(g.channels, device=x.device, dtype=sdt)
    var = torch.empty_like(mean)
    _stats_combine_kernel[(cdiv(g.channels, _REDUCE_BLOCK),)](
        part, mean, var, n_blocks, total, g.channels, ROWS_PER_BLOCK=cfg.block_m,
        BLOCK_C=_REDUCE_BLOCK)
    return mean, var


def conv_projection_forward(x: Tensor, h: int, w: int, conv_weight: Tensor, mean: Tensor,
                            rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            proj_weight: Tensor, proj_bias: Optional[Tensor], stride: int,
                            with_cls_token: bool) -> Tensor:
    """``Linear(flatten([cls,] (dwconv(x) - mean) * rstd * bn_weight + bn_bias))`` (pass 2)."""
    g = _geometry(x, h, w, stride, with_cls_token)
    sdt = stat_dtype(x.dtype)
    x, conv_weight, bn_weight, bn_bias, proj_weight, proj_bias = map(
        _contiguous, (x, conv_weight, bn_weight, bn_bias, proj_weight, proj_bias))
    mean = mean.to(sdt).contiguous()
    rstd = rstd.to(sdt).contiguous()
    _check_sizes(x)
    c_out = proj_weight.shape[0]
    rows = g.batch * (g.n_out + g.cls)
    out = torch.empty((g.batch, g.n_out + g.cls, c_out), device=x.device, dtype=x.dtype)
    _check_sizes(out)
    cfg = gemm_config(x.dtype, c_out > 64, target_of(x))
    grid = (cdiv(rows, cfg.block_m), cdiv(c_out, cfg.block_n))
    _forward_kernel[grid](
        x, conv_weight, mean, rstd, bn_weight, bn_bias, proj_weight, proj_bias, out,
        g.batch, g.h, g.w, g.wo, g.n_out, g.channels, c_out,
        STRIDE=g.stride, CLS=g.cls, HAS_BN_W=bn_weight is not None,
        HAS_BN_B=bn_bias is not None, HAS_BIAS=proj_bias is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _weight_grad_split(rows: int, tiles: int, block_m: int, target: Optional[Target]) -> int:
    """How many row splits ``d_proj_weight`` is reduced over: enough programs to fill the
    GPU (the output has few tiles), never more than there are row blocks."""
    row_blocks = cdiv(rows, block_m)
    if target is None:
        return min(row_blocks, 2)
    return max(1, min(row_blocks, cdiv(2 * target.sm_count, tiles)))


def conv_projection_backward(grad_out: Tensor, x: Tensor, h: int, w: int, conv_weight: Tensor,
                             mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor],
                             bn_bias: Optional[Tensor], proj_weight: Tensor,
                             proj_bias: Optional[Tensor], stride: int, with_cls_token: bool,
                             batch_stats: bool) -> Dict[str, Optional[Tensor]]:
    """Gradients of :func:`conv_projection_forward`, in the stat dtype (the caller casts).

    With ``batch_stats`` ``mean``/``rstd`` are the batch statistics and BatchNorm's
    training backward is applied (they depend on ``x`` and ``conv_weight``).
    """
    g = _geometry(x, h, w, stride, with_cls_token)
    sdt = stat_dtype(x.dtype)
    grad_out, x, conv_weight, bn_weight, bn_bias, proj_weight = map(
        _contiguous, (grad_out, x, conv_weight, bn_weight, bn_bias, proj_weight))
    mean = mean.to(sdt).contiguous()
    rstd = rstd.to(sdt).contiguous()
    _check_sizes(x, grad_out)
    dev = x.device
    c_in, c_out = g.channels, proj_weight.shape[0]
    rows = g.batch * (g.n_out + g.cls)
    if tuple(grad_out.shape) != (g.batch, g.n_out + g.cls, c_out):
        raise ValueError(f"triton conv_projection: grad_out of shape {tuple(grad_out.shape)}, "
                         f"expected {(g.batch, g.n_out + g.cls, c_out)}")
    precision = dot_precision(x.dtype)
    target = target_of(x)
    dx = torch.empty_like(x)

    # 1-2. dt = grad_out @ W: dz for the map rows, dx for the class token, BN sums.
    gcfg = gemm_config(x.dtype, c_out > 64, target)
    m_blocks = cdiv(rows, gcfg.block_m)
    dz = torch.empty((g.batch * g.n_out, c_in), device=dev, dtype=sdt)
    part = torch.empty((m_blocks, 2, c_in), device=dev, dtype=sdt)
    _grad_tokens_kernel[(m_blocks, cdiv(c_in, gcfg.block_k))](
        grad_out, proj_weight, x, conv_weight, mean, rstd, dz, dx, part,
        g.batch, g.h, g.w, g.wo, g.n_out, c_in, c_out,
        STRIDE=g.stride, CLS=g.cls, DOT_PRECISION=precision, BLOCK_M=gcfg.block_m,
        BLOCK_N=gcfg.block_n, BLOCK_K=gcfg.block_k, num_warps=gcfg.num_warps,
        num_stages=gcfg.num_stages)
    bn_sums = _sum_partials(part, m_blocks, 2 * c_in, sdt)  # (sum(dz), sum(dz * xhat))

    # 3-4. dy in place of dz, and the depthwise weight's gradient.
    tcfg = tile_config(c_in, target)
    t_blocks = cdiv(g.batch * g.n_out, tcfg.block_m)
    conv_part = torch.empty((t_blocks, c_in, 9), device=dev, dtype=sdt)
    _grad_conv_out_kernel[(t_blocks, cdiv(c_in, tcfg.block_c))](
        x, conv_weight, mean, rstd, bn_weight, bn_sums, dz, conv_part,
        g.batch, g.h, g.w, g.wo, g.n_out, c_in,
        STRIDE=g.stride, CLS=g.cls, HAS_BN_W=bn_weight is not None, BATCH_STATS=batch_stats,
        BLOCK_M=tcfg.block_m, BLOCK_C=tcfg.block_c, num_warps=tcfg.num_warps)
    d_conv_w = _sum_partials(conv_part, t_blocks, 9 * c_in, sdt).view(c_in, 1, 3, 3)

    # 5. dx of the map tokens.
    _grad_input_kernel[(cdiv(g.batch * g.h * g.w, tcfg.block_m),
                        cdiv(c_in, tcfg.block_c))](
        dz, conv_weight, dx, g.batch, g.h, g.w, g.ho, g.wo, c_in,
        STRIDE=g.stride, CLS=g.cls, BLOCK_M=tcfg.block_m, BLOCK_C=tcfg.block_c,
        num_warps=tcfg.num_warps)

    # 6. d_proj_weight (+ d_proj_bias), split over rows.
    wcfg = gemm_config(x.dtype, False, target)
    tiles = cdiv(c_out, wcfg.block_n) * cdiv(c_in, wcfg.block_k)
    split = _weight_grad_split(rows, tiles, wcfg.block_m, target)
    width = c_out * c_in + c_out
    w_part = torch.empty((split, width), device=dev, dtype=sdt)
    _grad_proj_weight_kernel[(cdiv(c_out, wcfg.block_n), cdiv(c_in, wcfg.block_k),
                              split)](
        grad_out, x, conv_weight, mean, rstd, bn_weight, bn_bias, w_part,
        g.batch, g.h, g.w, g.wo, g.n_out, c_in, c_out, split,
        STRIDE=g.stride, CLS=g.cls, HAS_BN_W=bn_weight is not None,
        HAS_BN_B=bn_bias is not None, HAS_BIAS=proj_bias is not None,
        DOT_PRECISION=precision, BLOCK_M=wcfg.block_m, BLOCK_N=wcfg.block_n,
        BLOCK_K=wcfg.block_k, num_warps=wcfg.num_warps, num_stages=wcfg.num_stages)
    w_sums = _sum_partials(w_part, split, width, sdt)
    # One of each pair is cloned: gradients must not alias each other (custom-op rule).
    return {
        "x": dx,
        "conv_weight": d_conv_w,
        "bn_weight": bn_sums[c_in:],
        "bn_bias": bn_sums[:c_in].clone(),
        "proj_weight": w_sums[:c_out * c_in].view(c_out, c_in),
        "proj_bias": w_sums[c_out * c_in:].clone() if proj_bias is not None else None,
    }
