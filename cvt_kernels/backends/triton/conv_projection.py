"""CvT's convolutional projection, ``Linear(flatten(BN(dwconv3x3(x_map))))``, in Triton.

Tokens are channel-last, ``x`` of shape ``(B, [1 +] h*w, C_in)``: the 3x3 depthwise conv
reads the 9 neighbouring tokens' channel vectors directly, so no NCHW copy is ever made.
The class token (token 0 with ``CLS``) skips the conv and BatchNorm and goes straight into
the Linear. Padding 1 and kernel 3 are baked in (the backend declines anything else).

The kernels read the depthwise weight ``(C_in, 1, 3, 3)`` as it is: tap ``t`` of channel
``c`` at ``c * 9 + t``, a strided vector load per tap from a few KB that stay in cache (no
per-call copy into a tap-major ``(9, C_in)`` layout: that was a launch per kernel, three
per training step of each projection). The price, measured by the launch-faithful compile
(sm_90, Triton 3.9; no spills anywhere): one load and one address per channel a thread
holds instead of one vector load, so the 16-bit statistics pass went from 80-96 to 124-126
registers (4 CTAs/SM: its grid has 4 programs per SM, so no fewer run at once) and the
float32 K-loop forward from 128 to 164-170 (its tile moved to 64x64: :mod:`.configs`);
the other kernels moved by a few registers either way. The conv's 9 taps are a runtime
loop (unrolled, all 9 loads were live together and the GEMMs spilled).

Every per-channel reduction is two-level, deterministic (fixed order, no atomics): the
first level runs about ``PROGRAMS_PER_SM x sm_count`` programs along rows (from
``_runtime.target_of``; small fixed numbers under the interpreter), each looping over a
contiguous run of row tiles and accumulating in registers, so there are ``O(sm_count)``
partials; the second level reduces them ``BLOCK_P`` (64) at a time as one tile. Tables:
:mod:`.configs`.

Forward (training), as the ops layer drives it, three launches:

* pass 1, :func:`conv_projection_stats`: ``_stats_partials_kernel`` computes the conv for
  tiles of output tokens x channels (not stored) and merges per-tile ``(mean, M2)`` of the
  conv output minus a per-channel shift (its value at the first position) with Chan's
  parallel formula; ``_stats_combine_kernel`` merges the programs' partials, a tile at a
  time. Shift + tile-centred M2 + Chan keep a large mean with a tiny variance accurate.
  The combine writes ``mean`` and ``rstd = rsqrt(var + eps)`` and, in training, applies
  ``nn.BatchNorm2d``'s running-statistics update in place, on the device (no host sync,
  CUDA-graph safe): ``num_batches_tracked += 1`` first (one program of the partials kernel,
  so the combine reads the new count after the kernel boundary), then ``running = (1 - f)
  * running + f * batch`` with the unbiased variance, ``f = momentum`` or ``1 /
  num_batches_tracked`` when ``momentum`` is ``None``; float32 math, stored in the buffers'
  own dtype.
* pass 2, :func:`conv_projection_forward`: ``_forward_kernel`` is a GEMM whose A-operand
  prologue recomputes the conv and normalizes it (``(y - mean) * rstd * gamma + beta``);
  the normalized tokens exist only in registers / shared memory. When C_in fits (up to
  4 slices of ``BLOCK_K``: 256 or 512 channels in 16-bit), the whole normalized row tile
  is built once and every ``BLOCK_N`` slice of C_out is computed from it; wider C_in runs
  a K loop per N slice (the conv rebuilt ``C_out / BLOCK_N`` times).

Eval is pass 2 alone, one launch: the kernels take BatchNorm's ``running_mean`` and
``running_var`` as they are (any float dtype) with ``eps`` (:class:`BatchNormStats`,
``RUNNING_STATS``) and compute ``rstd`` as they load them, each call, from the buffers'
current values (nothing cached, so writes through ``.data`` are always seen).

Backward, :func:`conv_projection_backward`. Saved by the ops layer: ``x``, the weights,
``mean`` and ``rstd`` (``2 * C_in`` floats beyond the inputs; in eval the running buffers
themselves). Recomputed: the conv output ``y`` and ``xhat`` (9 MACs per element, cheaper
than storing ``B * T' * C_in`` values in the forward). Scratch memory during the backward:
one float32 buffer ``dz`` of ``B * h'w' * C_in`` (the gradient of the normalized tokens,
overwritten in place by the gradient of the conv output ``dy``) plus per-program partial
sums of ``O(sm_count * C_in * 9)`` and ``O(split * C_out * C_in)`` floats. Kernels, in
order (4 launches, 5 where C_out is above one N slice):

1. ``_grad_tokens_kernel``: ``dt = grad_out @ proj_weight`` (GEMM), each program over a
   run of row tiles; the class-token rows go straight to ``dx``; the others are stored as
   ``dz``, and the epilogue recomputes ``xhat`` to accumulate the program's partials of
   ``sum(dz)`` and ``sum(dz * xhat)`` (BN's weight/bias gradients and the two sums of BN's
   training backward). When C_out fits one N slice (<= 64: CvT's stage 1) it also
   accumulates ``grad_out^T @ t`` and ``sum(grad_out)`` from the tiles it already holds:
   the ``proj`` weight/bias gradient partials, and step 4's kernel is not launched.
2. ``_grad_conv_out_kernel``: each program first sums step 1's partials of its channel
   block itself (fixed order; ``O(sm_count)`` rows from L2, instead of a launch between
   the two kernels), then ``dy`` from ``dz`` (BN training or eval backward), in place,
   and per-program partials of the depthwise-weight gradient (9 taps).
3. ``_grad_input_kernel``: ``dx`` = transposed depthwise conv of ``dy`` (gather form, one
   writer per element, no atomics).
4. ``_grad_proj_weight_kernel`` (C_out above one N slice): ``d_proj_weight = grad_out^T @
   t`` with ``t`` recomputed in the prologue as in the forward, split over rows into
   partials (the reduction is over ``B * T'`` rows, far longer than the output is wide),
   plus ``d_proj_bias``. Its tile is the first candidate that fits the target's shared
   memory per block.
5. ``_param_grads_kernel``: the one second level of every parameter gradient (BN weight
   and bias, the depthwise weight, proj weight and bias), each program a column block of
   one of the three partial buffers, each gradient stored directly in its parameter's
   dtype (no casts after the kernels).

Precision: conv, statistics and normalization in float32 (float64 for float64 inputs, only
possible under the interpreter); ``tl.dot`` gets float16/bfloat16 operands for 16-bit
inputs, float32 operands with TF32 or IEEE precision per
``torch.backends.cuda.matmul.allow_tf32`` for float32 inputs, accumulating in float32.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv, stat_dtype
from . import configs
from .configs import GemmConfig, TileConfig
from ._runtime import Target, acc_dtype, precision_for, target_of, tf32_allowed

# --------------------------------------------------------------------------------- kernels
# Argument order of every kernel: pointers, sizes (runtime integers), strides where any,
# scalars (eps, momentum), meta-parameters (constexpr: geometry, HAS_* flags for optional
# tensors, precision, tiles). The depthwise weight is read as ``(C, 1, 3, 3)``: tap ``t`` of
# channel ``c`` at ``c * 9 + t``.
# BatchNorm statistics come as ``mean_ptr`` and ``spread_ptr``: the batch mean and rstd
# (stat dtype), or with ``RUNNING_STATS`` the running mean and variance (any float dtype),
# whose rstd the kernel derives with ``eps`` (:func:`_bn_mean_rstd`).


@triton.jit
def _scalar(value, ACC: tl.constexpr):
    """A float argument in the accumulator dtype. Compiled, ``value`` is a float32 argument;
    under the interpreter it is the Python float itself, kept exact in float64 (a plain
    literal would round it to float32 first: 1e-9 relative in ``momentum``)."""
    return tl.full([], value, ACC)


@triton.jit
def _bn_mean_rstd(mean_ptr, spread_ptr, eps, c, c_ok, ACC: tl.constexpr,
                  RUNNING_STATS: tl.constexpr):
    """``(mean, rstd)`` of channels ``c`` (0 outside ``c_ok``)."""
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    spread = tl.load(spread_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if RUNNING_STATS:  # eval: BatchNorm's rstd from the running variance, here, each call
        rstd = tl.where(c_ok, tl.rsqrt(spread + _scalar(eps, ACC)), 0.0)
    else:
        rstd = spread
    return mean, rstd


@triton.jit
def _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, row_ok, c, c_ok, H, W, T_IN, C,
                 STRIDE: tl.constexpr, CLS: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """3x3 depthwise conv, padding 1, at output positions ``(b, oy, ox)`` x channels ``c``."""
    y = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for tap in range(9):
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
def _projection_input_tile(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr, b, oy,
                           ox, row_ok, conv_ok, is_cls, c, c_ok, H, W, T_IN, C,
                           STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
                           HAS_BN_B: tl.constexpr, RUNNING_STATS: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``t``, the tokens the Linear reads: normalized conv rows, raw class-token rows, and
    zeros outside the tile's valid rows/channels (so they add nothing to a dot)."""
    y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, conv_ok, c, c_ok, H, W, T_IN, C, STRIDE, CLS,
                     ACC, BLOCK_M, BLOCK_C)
    mean, scale = _bn_mean_rstd(mean_ptr, spread_ptr, eps, c, c_ok, ACC, RUNNING_STATS)
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
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise update of (count, mean, M2); ``n_a + n_b > 0``."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


@triton.jit
def _stats_partials_kernel(
        # Pointers: x (B, [1 +] H*W, C), conv weight (C, 1, 3, 3), part (2 * programs + 1,
        # C), num_batches_tracked (int64 scalar) or None
        x_ptr, cw_ptr, part_ptr, tracked_ptr,
        # Sizes: ROWS_PER_PROGRAM output tokens per program, a multiple of BLOCK_M
        B, H, W, WO, N_OUT, C, ROWS_PER_PROGRAM,
        # Meta-parameters. HAS_TRACKED: training with a counter, which program (0, 0) adds
        # 1 to (BatchNorm counts first; the combine reads the new count after this kernel)
        STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_TRACKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First level of the statistics: program ``i`` merges the ``(mean, M2)`` of ``y - shift``
    over its contiguous run of ``ROWS_PER_PROGRAM`` output tokens, one ``BLOCK_M`` tile at a
    time (Chan), and writes rows ``2i, 2i+1`` of ``part``; program 0 also writes the shift
    (the last row).

    Every tile shifts by the same per-channel value (the conv output at the first position),
    so a large mean cancels before any sum is formed: with a tiny variance, neither
    ``sum(y^2) - n * mean^2`` nor Chan's cross term on raw means (each rounded to the ulp
    of the mean) would keep its digits.
    """
    ACC = part_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    if HAS_TRACKED:
        if pid_p == 0:
            if pid_c == 0:
                tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)
    total = B * N_OUT
    start = pid_p * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, total)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    shift = _dwconv_first_position(x_ptr, cw_ptr, c, c_ok, H, W, C, CLS, ACC, BLOCK_C)
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        b = rows // N_OUT
        p = rows % N_OUT
        y = _dwconv_tile(x_ptr, cw_ptr, b, p // WO, p % WO, row_ok, c, c_ok, H, W,
                         H * W + CLS, C, STRIDE, CLS, ACC, BLOCK_M, BLOCK_C)
        d = tl.where(row_ok[:, None], y - shift[None, :], 0.0)
        n_b = tl.minimum(end - m0, BLOCK_M).to(ACC)
        mean_b = tl.sum(d, axis=0) / n_b
        e = tl.where(row_ok[:, None], d - mean_b[None, :], 0.0)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, tl.sum(e * e, axis=0))
    base = part_ptr + pid_p * 2 * C + c
    tl.store(base, mean_a, mask=c_ok)
    tl.store(base + C, m2_a, mask=c_ok)
    if pid_p == 0:
        tl.store(part_ptr + tl.num_programs(0) * 2 * C + c, shift, mask=c_ok)


@triton.jit
def _stats_combine_kernel(
        # Pointers: part (2 * N_PARTS + 1, C) from _stats_partials_kernel; mean, var, rstd
        # (C,) out; with UPDATE running_mean, running_var (C,, any float dtype) updated in
        # place and num_batches_tracked (read with CUMULATIVE, else None)
        part_ptr, mean_ptr, var_ptr, rstd_ptr, rm_ptr, rv_ptr, tracked_ptr,
        # Sizes: TOTAL tokens, ROWS_PER_PART of them per partial (the last has the rest)
        N_PARTS, TOTAL, C, ROWS_PER_PART,
        # Scalars: BatchNorm's eps and momentum (unused with CUMULATIVE)
        eps, momentum,
        # Meta-parameters. UPDATE: the running statistics move (training with running
        # stats); CUMULATIVE: momentum None, the factor is 1 / num_batches_tracked
        UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """Second level: ``BLOCK_P`` partials at a time merged as one tile (their total count,
    mean and ``sum(M2_i + n_i (mean_i - mean)^2)``), the tiles merged in order (Chan);
    ``cdiv(N_PARTS, BLOCK_P)`` serial steps, deterministic, no atomics. Then the batch's
    ``mean``, biased ``var`` and ``rstd``, and ``nn.BatchNorm2d``'s running update:
    ``running = (1 - f) * running + f * batch`` (unbiased variance ``M2 / (n - 1)``)."""
    ACC = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_a = tl.zeros([BLOCK_C], ACC)
    mean_a = tl.zeros([BLOCK_C], ACC)
    m2_a = tl.zeros([BLOCK_C], ACC)
    for i0 in range(0, N_PARTS, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)
        i_ok = i < N_PARTS
        n_i = tl.minimum(tl.maximum(TOTAL - i * ROWS_PER_PART, 0), ROWS_PER_PART)
        n_i = tl.where(i_ok, n_i, 0).to(ACC)
        mask = i_ok[:, None] & c_ok[None, :]
        ptrs = part_ptr + (2 * i)[:, None] * C + c[None, :]
        mean_i = tl.load(ptrs, mask=mask, other=0.0)
        m2_i = tl.load(ptrs + C, mask=mask, other=0.0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i[:, None] * mean_i, axis=0) / n_b
        dev = mean_i - mean_b[None, :]
        m2_b = tl.sum(m2_i + n_i[:, None] * dev * dev, axis=0)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    shift = tl.load(part_ptr + N_PARTS * 2 * C + c, mask=c_ok, other=0.0)
    mean = shift + mean_a
    var = m2_a / n_a
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, var, mask=c_ok)
    tl.store(rstd_ptr + c, tl.rsqrt(var + _scalar(eps, ACC)), mask=c_ok)
    if UPDATE:
        if CUMULATIVE:
            f = 1.0 / tl.load(tracked_ptr).to(ACC)
        else:
            f = _scalar(momentum, ACC)
        rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
        rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(ACC)
        rm = (1.0 - f) * rm + f * mean
        rv = (1.0 - f) * rv + f * (m2_a / (n_a - 1.0))
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr, b, oy, ox,
                      row_ok, conv_ok, is_cls, k0, H, W, T_IN, C_IN, STRIDE: tl.constexpr,
                      CLS: tl.constexpr, HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr,
                      RUNNING_STATS: tl.constexpr, ACC: tl.constexpr, OPERAND: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channels ``k0 .. k0 + BLOCK_K`` of the normalized row tile, as the MMA operand dtype
    (16-bit inputs: 16-bit operands; float32: TF32 or IEEE per torch)."""
    c = k0 + tl.arange(0, BLOCK_K)
    t = _projection_input_tile(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr, b,
                               oy, ox, row_ok, conv_ok, is_cls, c, c < C_IN, H, W, T_IN, C_IN,
                               STRIDE, CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC, BLOCK_M,
                               BLOCK_K)
    return t.to(OPERAND)


@triton.jit
def _weight_slice(pw_ptr, n, n_ok, k0, C_IN, BLOCK_K: tl.constexpr):
    """``proj_weight[n, k0 .. k0 + BLOCK_K]^T``: a ``BLOCK_K x BLOCK_N`` operand."""
    c = k0 + tl.arange(0, BLOCK_K)
    return tl.load(pw_ptr + n[None, :] * C_IN + c[:, None],
                   mask=(c < C_IN)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _forward_kernel(
        # Pointers: x (B, T_in, C_IN), conv weight (C_IN, 1, 3, 3), BN statistics (C_IN,)
        # (mean and rstd, or the running mean and var with RUNNING_STATS), BN weight/bias
        # (C_IN,) or None, proj weight (C_OUT, C_IN), bias (C_OUT,) or None, out (B, T_out,
        # C_OUT)
        x_ptr, cw_ptr, mean_ptr, spread_ptr, bnw_ptr, bnb_ptr, pw_ptr, pb_ptr, out_ptr,
        # Sizes: N_SPLIT programs share a row tile, each taking every N_SPLIT-th N slice
        B, H, W, WO, N_OUT, C_IN, C_OUT, N_SPLIT,
        # Scalars: BatchNorm's eps (read with RUNNING_STATS)
        eps,
        # Meta-parameters. RESIDENT: C_IN <= NUM_K * BLOCK_K, the row tile kept in NUM_K
        # (1 to 4) slices; otherwise one N slice per program and a K loop. ACC: float32
        # (float64 for float64 inputs)
        STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
        HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING_STATS: tl.constexpr,
        RESIDENT: tl.constexpr, NUM_K: tl.constexpr, ACC: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """``out[rows, n] = t[rows, :] @ proj_weight[n, :]^T + bias``.

    ``RESIDENT``: the normalized row tile ``t`` (conv + BN of every input channel) is built
    once, then multiplied with each of the program's ``BLOCK_N`` slices of the weight.
    Otherwise (C_IN too wide to keep) each program computes one N slice with a K loop that
    rebuilds ``t`` one ``BLOCK_K`` slice at a time (``cdiv(C_OUT, BLOCK_N)`` rebuilds).
    """
    OPERAND = pw_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    T_OUT = N_OUT + CLS
    T_IN = H * W + CLS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, p, oy, ox, row_ok, conv_ok, is_cls = _output_rows(rows, B, T_OUT, WO, CLS)
    out_rows = out_ptr + rows[:, None] * C_OUT
    if RESIDENT:
        t0 = _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr, b,
                               oy, ox, row_ok, conv_ok, is_cls, 0, H, W, T_IN, C_IN, STRIDE,
                               CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC, OPERAND, BLOCK_M,
                               BLOCK_K)
        if NUM_K > 1:
            t1 = _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr,
                                   b, oy, ox, row_ok, conv_ok, is_cls, BLOCK_K, H, W, T_IN,
                                   C_IN, STRIDE, CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC,
                                   OPERAND, BLOCK_M, BLOCK_K)
        if NUM_K > 2:
            t2 = _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr,
                                   b, oy, ox, row_ok, conv_ok, is_cls, 2 * BLOCK_K, H, W, T_IN,
                                   C_IN, STRIDE, CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC,
                                   OPERAND, BLOCK_M, BLOCK_K)
        if NUM_K > 3:
            t3 = _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr,
                                   b, oy, ox, row_ok, conv_ok, is_cls, 3 * BLOCK_K, H, W, T_IN,
                                   C_IN, STRIDE, CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC,
                                   OPERAND, BLOCK_M, BLOCK_K)
        for n0 in range(pid_n * BLOCK_N, C_OUT, N_SPLIT * BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < C_OUT
            acc = tl.dot(t0, _weight_slice(pw_ptr, n, n_ok, 0, C_IN, BLOCK_K),
                         input_precision=DOT_PRECISION, out_dtype=ACC)
            if NUM_K > 1:
                acc = tl.dot(t1, _weight_slice(pw_ptr, n, n_ok, BLOCK_K, C_IN, BLOCK_K), acc,
                             input_precision=DOT_PRECISION, out_dtype=ACC)
            if NUM_K > 2:
                acc = tl.dot(t2, _weight_slice(pw_ptr, n, n_ok, 2 * BLOCK_K, C_IN, BLOCK_K),
                             acc, input_precision=DOT_PRECISION, out_dtype=ACC)
            if NUM_K > 3:
                acc = tl.dot(t3, _weight_slice(pw_ptr, n, n_ok, 3 * BLOCK_K, C_IN, BLOCK_K),
                             acc, input_precision=DOT_PRECISION, out_dtype=ACC)
            if HAS_BIAS:
                acc += tl.load(pb_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
            tl.store(out_rows + n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & n_ok[None, :])
    else:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < C_OUT
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, C_IN, BLOCK_K):
            t = _normalized_slice(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr, b,
                                  oy, ox, row_ok, conv_ok, is_cls, k0, H, W, T_IN, C_IN, STRIDE,
                                  CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC, OPERAND, BLOCK_M,
                                  BLOCK_K)
            acc = tl.dot(t, _weight_slice(pw_ptr, n, n_ok, k0, C_IN, BLOCK_K), acc,
                         input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(pb_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
        tl.store(out_rows + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_tokens_kernel(
        # Pointers: grad_out (B, T_out, C_OUT), proj weight (C_OUT, C_IN), x, conv weight,
        # BN statistics, BN weight/bias (or None) as in the forward; dz (B * h'w', C_IN), dx
        # (B, T_in, C_IN), part (programs, 2, C_IN); w_part (programs, C_OUT * C_IN + C_OUT)
        # with FUSE_WEIGHT_GRAD
        go_ptr, pw_ptr, x_ptr, cw_ptr, mean_ptr, spread_ptr, bnw_ptr, bnb_ptr, dz_ptr, dx_ptr,
        part_ptr, w_part_ptr,
        # Sizes: ROWS_PER_PROGRAM output rows per program, a multiple of BLOCK_M
        B, H, W, WO, N_OUT, C_IN, C_OUT, ROWS_PER_PROGRAM,
        # Scalars: BatchNorm's eps (read with RUNNING_STATS)
        eps,
        # Meta-parameters. FUSE_WEIGHT_GRAD (C_OUT <= BLOCK_N, one N slice): also the
        # program's partial of d_proj_weight (and of d_proj_bias with HAS_BIAS) from the
        # tiles it has loaded.
        STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
        HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING_STATS: tl.constexpr,
        FUSE_WEIGHT_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dt = grad_out @ proj_weight`` for the program's run of output rows x a block of
    input channels, one ``BLOCK_M`` tile at a time.

    Class-token rows are the class token's input gradient; the others are stored as ``dz``,
    and the program's ``(sum(dz), sum(dz * xhat))`` per channel go to ``part``. With
    ``FUSE_WEIGHT_GRAD`` the same ``grad_out`` tile and the recomputed conv give
    ``grad_out^T @ t`` too, so ``_grad_proj_weight_kernel`` (another read of ``grad_out``
    and ``x`` and another conv) is not launched. With ``ACCUMULATE`` the class token's
    gradient is added to what ``dx`` holds (one writer per element: no race).
    """
    ACC = dz_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    T_OUT = N_OUT + CLS
    T_IN = H * W + CLS
    start = pid_p * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, B * T_OUT)
    c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C_IN
    mean, rstd = _bn_mean_rstd(mean_ptr, spread_ptr, eps, c, c_ok, ACC, RUNNING_STATS)
    sum_dz = tl.zeros([BLOCK_K], ACC)
    sum_dz_xhat = tl.zeros([BLOCK_K], ACC)
    if FUSE_WEIGHT_GRAD:
        n = tl.arange(0, BLOCK_N)
        n_ok = n < C_OUT
        w = tl.load(pw_ptr + n[:, None] * C_IN + c[None, :], mask=n_ok[:, None] & c_ok[None, :],
                    other=0.0)
        gamma = tl.full([BLOCK_K], 1.0, ACC)
        if HAS_BN_W:
            gamma = tl.load(bnw_ptr + c, mask=c_ok, other=0.0).to(ACC)
        beta = tl.zeros([BLOCK_K], ACC)
        if HAS_BN_B:
            beta = tl.load(bnb_ptr + c, mask=c_ok, other=0.0).to(ACC)
        d_w = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        d_b = tl.zeros([BLOCK_N], ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        b, p, oy, ox, row_ok, conv_ok, is_cls = _output_rows(rows, B, T_OUT, WO, CLS)
        conv_mask = conv_ok[:, None] & c_ok[None, :]
        y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, conv_ok, c, c_ok, H, W, T_IN, C_IN,
                         STRIDE, CLS, ACC, BLOCK_M, BLOCK_K)
        xhat = (y - mean[None, :]) * rstd[None, :]
        if FUSE_WEIGHT_GRAD:
            go = tl.load(go_ptr + rows[:, None] * C_OUT + n[None, :],
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(go, w.to(go.dtype), input_precision=DOT_PRECISION, out_dtype=ACC)
            # t as the forward built it: normalized conv rows, raw class-token rows.
            t = tl.where(conv_mask, xhat * gamma[None, :] + beta[None, :], 0.0)
            if CLS:
                cls_ok = is_cls[:, None] & c_ok[None, :]
                cls_val = tl.load(x_ptr + (b * T_IN)[:, None] * C_IN + c[None, :], mask=cls_ok,
                                  other=0.0)
                t = tl.where(cls_ok, cls_val.to(ACC), t)
            d_w = tl.dot(tl.trans(go), t.to(go.dtype), d_w, input_precision=DOT_PRECISION,
                         out_dtype=ACC)
            if HAS_BIAS:
                d_b += tl.sum(go.to(ACC), axis=0)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
            for n0 in range(0, C_OUT, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                nn_ok = nn < C_OUT
                go = tl.load(go_ptr + rows[:, None] * C_OUT + nn[None, :],
                             mask=row_ok[:, None] & nn_ok[None, :], other=0.0)
                wn = tl.load(pw_ptr + nn[:, None] * C_IN + c[None, :],
                             mask=nn_ok[:, None] & c_ok[None, :], other=0.0)
                acc = tl.dot(go, wn.to(go.dtype), acc, input_precision=DOT_PRECISION,
                             out_dtype=ACC)
        tl.store(dz_ptr + (b * N_OUT + p)[:, None] * C_IN + c[None, :], acc, mask=conv_mask)
        if CLS:
            cls_ptrs = dx_ptr + (b * T_IN)[:, None] * C_IN + c[None, :]
            cls_mask = is_cls[:, None] & c_ok[None, :]
            d_cls = acc
            if ACCUMULATE:
                d_cls = acc + tl.load(cls_ptrs, mask=cls_mask, other=0.0).to(ACC)
            tl.store(cls_ptrs, d_cls.to(dx_ptr.dtype.element_ty), mask=cls_mask)
        dz = tl.where(conv_mask, acc, 0.0)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    base = part_ptr + pid_p * 2 * C_IN + c
    tl.store(base, sum_dz, mask=c_ok)
    tl.store(base + C_IN, sum_dz_xhat, mask=c_ok)
    if FUSE_WEIGHT_GRAD:
        row = w_part_ptr + pid_p * (C_OUT * C_IN + C_OUT)
        tl.store(row + n[:, None] * C_IN + c[None, :], d_w, mask=n_ok[:, None] & c_ok[None, :])
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(row + C_OUT * C_IN + n, d_b, mask=n_ok)


@triton.jit
def _grad_conv_out_kernel(
        # Pointers: x, conv weight, BN statistics, BN weight (or None) as in the forward;
        # bn_part (N_BN, 2, C): _grad_tokens_kernel's partials of (sum(dz), sum(dz * xhat));
        # dz (B * h'w', C), overwritten by dy; part (programs, C, 9)
        x_ptr, cw_ptr, mean_ptr, spread_ptr, bnw_ptr, bn_part_ptr, dz_ptr, part_ptr,
        # Sizes: ROWS_PER_PROGRAM map tokens per program, a multiple of BLOCK_M
        B, H, W, WO, N_OUT, C, ROWS_PER_PROGRAM, N_BN,
        # Scalars: BatchNorm's eps (read with RUNNING_STATS)
        eps,
        # Meta-parameters. BLOCK_P: partial rows summed per step (BATCH_STATS)
        STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
        BATCH_STATS: tl.constexpr, RUNNING_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dz -> dy`` in place over the program's run of tokens, and the program's partial of
    the depthwise-weight gradient (9 taps, accumulated over its tiles).

    Eval: ``dy = gamma * rstd * dz``. Training (the statistics depend on ``y``):
    ``dy = gamma * rstd * (dz - sum(dz) / n - xhat * sum(dz * xhat) / n)``, the two sums
    reduced here from ``bn_part`` (every program of a channel block sums the same partials
    in the same order, so all hold the same bits): ``cdiv(N_BN, BLOCK_P)`` steps over
    ``O(sm_count)`` rows, in place of a second-level launch between two kernels.
    """
    ACC = dz_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    total = B * N_OUT
    T_IN = H * W + CLS
    start = pid_p * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, total)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, rstd = _bn_mean_rstd(mean_ptr, spread_ptr, eps, c, c_ok, ACC, RUNNING_STATS)
    scale = rstd
    if HAS_BN_W:
        scale = scale * tl.load(bnw_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if BATCH_STATS:
        sum_dz = tl.zeros([BLOCK_C], ACC)
        sum_dz_xhat = tl.zeros([BLOCK_C], ACC)
        for i0 in range(0, N_BN, BLOCK_P):
            i = i0 + tl.arange(0, BLOCK_P)
            ptrs = bn_part_ptr + (2 * i)[:, None] * C + c[None, :]
            mask = (i < N_BN)[:, None] & c_ok[None, :]
            sum_dz += tl.sum(tl.load(ptrs, mask=mask, other=0.0), axis=0)
            sum_dz_xhat += tl.sum(tl.load(ptrs + C, mask=mask, other=0.0), axis=0)
        inv_n = 1.0 / total.to(ACC)
        mean_dz = sum_dz * inv_n
        mean_dz_xhat = sum_dz_xhat * inv_n
    taps = tl.arange(0, 16)  # 9 used
    dw = tl.zeros([16, BLOCK_C], ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        b = rows // N_OUT
        p = rows % N_OUT
        oy = p // WO
        ox = p % WO
        mask = row_ok[:, None] & c_ok[None, :]
        dz = tl.load(dz_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0)
        if BATCH_STATS:
            y = _dwconv_tile(x_ptr, cw_ptr, b, oy, ox, row_ok, c, c_ok, H, W, T_IN, C,
                             STRIDE, CLS, ACC, BLOCK_M, BLOCK_C)
            xhat = (y - mean[None, :]) * rstd[None, :]
            dz = dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]
        dy = tl.where(mask, dz * scale[None, :], 0.0)
        tl.store(dz_ptr + rows[:, None] * C + c[None, :], dy, mask=mask)
        # d conv_weight[c, tap] = sum over output positions of dy * (the input under the tap).
        for tap in range(9):
            iy = oy * STRIDE + (tap // 3 - 1)
            ix = ox * STRIDE + (tap % 3 - 1)
            ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            tok = b * T_IN + CLS + iy * W + ix
            xv = tl.load(x_ptr + tok[:, None] * C + c[None, :],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            s = tl.sum(dy * xv.to(ACC), axis=0)
            dw += tl.where(taps[:, None] == tap, s[None, :], 0.0)
    tl.store(part_ptr + pid_p * 9 * C + c[None, :] * 9 + taps[:, None], dw,
             mask=(taps < 9)[:, None] & c_ok[None, :])


@triton.jit
def _grad_input_kernel(
        # Pointers: dy (B * h'w', C), conv weight (C, 1, 3, 3), dx (B, T_in, C)
        dy_ptr, cw_ptr, dx_ptr,
        # Sizes
        B, H, W, HO, WO, C,
        # Meta-parameters
        STRIDE: tl.constexpr, CLS: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx`` of the map tokens: each input position gathers the (up to 9) output positions
    whose window covers it, so every element has one writer (with ``ACCUMULATE``, added to
    what ``dx`` holds)."""
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
    for tap in range(9):
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
    dx_ptrs = dx_ptr + tok[:, None] * C + c[None, :]
    dx_mask = row_ok[:, None] & c_ok[None, :]
    if ACCUMULATE:
        dx += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(ACC)
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def _grad_proj_weight_kernel(
        # Pointers: grad_out (B, T_out, C_OUT); x, conv weight, BN statistics, BN
        # weight/bias as in the forward; part (SPLIT, C_OUT * C_IN + C_OUT)
        go_ptr, x_ptr, cw_ptr, mean_ptr, spread_ptr, bnw_ptr, bnb_ptr, part_ptr,
        # Sizes
        B, H, W, WO, N_OUT, C_IN, C_OUT, SPLIT,
        # Scalars: BatchNorm's eps (read with RUNNING_STATS)
        eps,
        # Meta-parameters
        STRIDE: tl.constexpr, CLS: tl.constexpr, HAS_BN_W: tl.constexpr,
        HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING_STATS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """Split ``s`` of ``d_proj_weight = grad_out^T @ t`` (and of ``d_proj_bias``): row blocks
    ``s, s + SPLIT, ...``."""
    ACC = part_ptr.dtype.element_ty
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
        t = _projection_input_tile(x_ptr, cw_ptr, mean_ptr, spread_ptr, eps, bnw_ptr, bnb_ptr,
                                   b, oy, ox, row_ok, conv_ok, is_cls, c, c_ok, H, W, T_IN,
                                   C_IN, STRIDE, CLS, HAS_BN_W, HAS_BN_B, RUNNING_STATS, ACC,
                                   BLOCK_M, BLOCK_K)
        acc = tl.dot(go_t, t.to(go_t.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            bias_acc += tl.sum(go_t.to(ACC), axis=1)
    row = part_ptr + pid_s * (C_OUT * C_IN + C_OUT)
    tl.store(row + n[:, None] * C_IN + c[None, :], acc, mask=n_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(row + C_OUT * C_IN + n, bias_acc, mask=n_ok)


@triton.jit
def _column_sums(part_ptr, n_parts, n_cols, cols, ok, ACC: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """``sum_i part[i, cols]`` over ``n_parts`` rows of ``n_cols``, ``BLOCK_P`` rows a step
    summed as a tile, in a fixed order."""
    acc = tl.zeros([BLOCK], ACC)
    for i0 in range(0, n_parts, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)
        tile = tl.load(part_ptr + i[:, None] * n_cols + cols[None, :],
                       mask=(i < n_parts)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    return acc


@triton.jit
def _param_grads_kernel(
        # Pointers: partials of (sum(dz), sum(dz * xhat)) (N_BN, 2, C_IN), of the depthwise
        # weight's gradient (N_CONV, C_IN, 9) and of proj's (N_W, C_OUT * C_IN + C_OUT), all
        # in the stat dtype; the gradients of bn_weight, bn_bias (C_IN,), conv_weight
        # (C_IN, 1, 3, 3), proj_weight (C_OUT, C_IN), proj_bias (C_OUT,), each in its
        # parameter's dtype (None: no such parameter)
        bn_part_ptr, conv_part_ptr, w_part_ptr, d_bnw_ptr, d_bnb_ptr, d_cw_ptr, d_pw_ptr,
        d_pb_ptr,
        # Sizes: the partials' rows; the programs of the first two column ranges (the
        # third takes the rest of the grid)
        N_BN, N_CONV, N_W, C_IN, C_OUT, BN_PROGRAMS, CONV_PROGRAMS,
        # Meta-parameters
        HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """The second level of every parameter gradient of the backward, in one launch: each
    program sums ``BLOCK`` columns of one partial buffer (:func:`_column_sums`) and stores
    them, cast once, into the gradient they belong to."""
    ACC = bn_part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if pid < BN_PROGRAMS:  # columns [0, C_IN): d bn_bias; [C_IN, 2 C_IN): d bn_weight
        cols = pid * BLOCK + lanes
        ok = cols < 2 * C_IN
        acc = _column_sums(bn_part_ptr, N_BN, 2 * C_IN, cols, ok, ACC, BLOCK_P, BLOCK)
        if HAS_BN_B:
            tl.store(d_bnb_ptr + cols, acc.to(d_bnb_ptr.dtype.element_ty), mask=cols < C_IN)
        if HAS_BN_W:
            tl.store(d_bnw_ptr + (cols - C_IN), acc.to(d_bnw_ptr.dtype.element_ty),
                     mask=ok & (cols >= C_IN))
    elif pid < BN_PROGRAMS + CONV_PROGRAMS:  # (C_IN, 9) = conv_weight's (C_IN, 1, 3, 3)
        cols = (pid - BN_PROGRAMS) * BLOCK + lanes
        ok = cols < 9 * C_IN
        acc = _column_sums(conv_part_ptr, N_CONV, 9 * C_IN, cols, ok, ACC, BLOCK_P, BLOCK)
        tl.store(d_cw_ptr + cols, acc.to(d_cw_ptr.dtype.element_ty), mask=ok)
    else:  # [0, C_OUT * C_IN): d proj_weight; then C_OUT columns of d proj_bias
        cols = (pid - BN_PROGRAMS - CONV_PROGRAMS) * BLOCK + lanes
        n_w = C_OUT * C_IN
        ok = cols < n_w + C_OUT
        acc = _column_sums(w_part_ptr, N_W, n_w + C_OUT, cols, ok, ACC, BLOCK_P, BLOCK)
        tl.store(d_pw_ptr + cols, acc.to(d_pw_ptr.dtype.element_ty), mask=cols < n_w)
        if HAS_BIAS:
            tl.store(d_pb_ptr + (cols - n_w), acc.to(d_pb_ptr.dtype.element_ty),
                     mask=ok & (cols >= n_w))


# ------------------------------------------------------------------------------ launchers
class BatchNormStats(NamedTuple):
    """What the kernels normalize with, per channel.

    ``running`` False: the batch statistics from :func:`conv_projection_stats`, ``mean``
    and ``spread = rstd`` (any float dtype, read as the stat dtype). ``running`` True:
    BatchNorm's ``running_mean`` and ``running_var`` buffers as they are (any float dtype,
    no cast), ``spread`` the variance: the kernels compute ``rsqrt(running_var + eps)`` as
    they load it, so an eval call launches nothing for its statistics and always reads the
    buffers' current values."""
    mean: Tensor
    spread: Tensor
    eps: float = 0.0
    running: bool = False


class RunningUpdate(NamedTuple):
    """``nn.BatchNorm2d``'s training-mode update, applied by :func:`conv_projection_stats`
    in place: the buffers (each may be ``None``: no running statistics, no counter) and the
    momentum (``None``: the cumulative average, ``1 / num_batches_tracked``)."""
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]


def _check_sizes(*tensors: Tensor) -> None:
    # Offsets are int32 inside the kernels.
    for t in tensors:
        if t is not None and t.numel() >= 2 ** 31:
            raise ValueError(f"triton conv_projection: a tensor of {t.numel()} elements is "
                             f"beyond the kernels' int32 indexing")


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    # The kernels take dense row-major tensors: a strided view (never a module's own
    # parameters, nor the tokens a Linear or the attention produce) costs one copy here.
    return None if t is None else t.contiguous()


class _Geometry(NamedTuple):  # (a frozen dataclass took ~4 us more to build, 9 a block)
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


def _geometry(shape: Tuple[int, ...], h: int, w: int, stride: int,
              with_cls_token: bool) -> _Geometry:
    if len(shape) != 3 or shape[1] != h * w + int(with_cls_token):
        raise ValueError(f"triton conv_projection: x of shape {tuple(shape)} does not hold "
                         f"{h}x{w} tokens (class token: {with_cls_token})")
    if stride not in (1, 2):
        raise ValueError(f"triton conv_projection: stride {stride} is not supported")
    ho = (h - 1) // stride + 1  # padding 1, kernel 3
    wo = (w - 1) // stride + 1
    return _Geometry(shape[0], h, w, ho, wo, shape[2], stride, int(with_cls_token))


class StatsLaunch(NamedTuple):
    """How :func:`conv_projection_stats` launches: first-level programs along rows, the
    row blocks each merges, and the channel blocks beside them."""
    config: TileConfig
    programs: int
    blocks_per_program: int
    channel_blocks: int


# The three launch geometries are pure functions of their arguments, the TF32 flag that
# dot_precision reads (forward and backward: an argument of their caches) and this
# package's constant tables (never changed at run time): computed once per shape, ~20 us
# a projection's training call saved.
@functools.lru_cache(maxsize=1024)
def stats_launch(batch: int, n_out: int, channels: int, dtype: torch.dtype,
                 target: Optional[Target]) -> StatsLaunch:
    cfg = configs.stats_tile_config(dtype, target)
    c_blocks = cdiv(channels, cfg.block_c)
    programs, per = configs.row_split(cdiv(batch * n_out, cfg.block_m), c_blocks, "tile",
                                      target)
    return StatsLaunch(cfg, programs, per, c_blocks)


def _contiguous_buffer(t: Optional[Tensor]) -> Optional[Tensor]:
    # A running buffer as a kernel takes it, through its pointer: a strided one (never seen
    # in a module; possible by hand) goes through a contiguous copy (written back afterwards
    # where the kernel updates it).
    if t is None or (not t.requires_grad and t.is_contiguous()):  # a module's buffers
        return t
    return t.detach().contiguous()


class _StatsPlan(NamedTuple):
    """What :func:`conv_projection_stats` launches with that depends only on sizes,
    switches, dtype and target (as :class:`_BackwardPlan`)."""
    g: _Geometry
    launch: StatsLaunch
    partials_grid: tuple
    rows_per_program: int
    partials: Mapping[str, object]
    combine_grid: tuple
    combine: Mapping[str, object]


@functools.lru_cache(maxsize=1024)
def _stats_plan(x_shape: Tuple[int, ...], h: int, w: int, stride: int, with_cls_token: bool,
                dtype: torch.dtype, target: Optional[Target], has_tracked: bool, moves: bool,
                cumulative: bool) -> _StatsPlan:
    g = _geometry(x_shape, h, w, stride, with_cls_token)
    launch = stats_launch(g.batch, g.n_out, g.channels, dtype, target)
    cfg, r = launch.config, configs.reduce_config(target)
    partials = dict(
        STRIDE=g.stride, CLS=g.cls, HAS_TRACKED=has_tracked, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    combine = dict(UPDATE=moves, CUMULATIVE=cumulative, BLOCK_P=r.block_p, BLOCK_C=r.block,
                   num_warps=r.num_warps)
    return _StatsPlan(g, launch, (launch.programs, launch.channel_blocks),
                      launch.blocks_per_program * cfg.block_m, partials,
                      (cdiv(g.channels, r.block),), combine)


def conv_projection_stats(x: Tensor, h: int, w: int, conv_weight: Tensor, stride: int,
                          with_cls_token: bool, eps: float = 1e-5,
                          update: Optional[RunningUpdate] = None
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Pass 1: per-channel ``(mean, biased var, rstd = rsqrt(var + eps))`` of the depthwise
    conv output, in the stat dtype; with ``update``, ``nn.BatchNorm2d``'s running-statistics
    update in place too (:class:`RunningUpdate`). Two launches in all."""
    rm = rv = tracked = None
    momentum = None
    if update is not None:
        rm, rv, tracked = map(_contiguous_buffer, update[:3])
        momentum = update.momentum
    # nn.BatchNorm2d's factor is 0 with momentum None and no counter: nothing moves then.
    moves = rm is not None and rv is not None and (momentum is not None or tracked is not None)
    cumulative = moves and momentum is None
    plan = _stats_plan(x.shape, h, w, stride, with_cls_token, x.dtype, target_of(x),
                       tracked is not None, moves, cumulative)
    g, launch = plan.g, plan.launch
    x, conv_weight = x.contiguous(), conv_weight.contiguous()
    _check_sizes(x)
    sdt = stat_dtype(x.dtype)
    part = torch.empty(2 * launch.programs + 1, g.channels, device=x.device, dtype=sdt)
    _stats_partials_kernel[plan.partials_grid](
        x, conv_weight, part, tracked, g.batch, g.h, g.w, g.wo, g.n_out, g.channels,
        plan.rows_per_program, **plan.partials)
    # (Three allocations, not rows of one: the custom ops' outputs must not alias.)
    mean = torch.empty(g.channels, device=x.device, dtype=sdt)
    var = torch.empty_like(mean)
    rstd = torch.empty_like(mean)
    _stats_combine_kernel[plan.combine_grid](
        part, mean, var, rstd, rm if moves else None, rv if moves else None,
        tracked if cumulative else None, launch.programs, g.batch * g.n_out, g.channels,
        plan.rows_per_program, float(eps), 0.0 if momentum is None else float(momentum),
        **plan.combine)
    if update is not None:
        for given, used in zip(update[:3], (rm, rv, tracked)):
            if given is not None and used.data_ptr() != given.data_ptr():
                with torch.no_grad():
                    given.copy_(used)  # the strided buffer's copy (_contiguous_buffer)
    return mean, var, rstd


class ForwardLaunch(NamedTuple):
    """How :func:`conv_projection_forward` launches: its config, the K slices of a resident
    normalized row tile (0: not resident, a K loop per N slice), and how many programs
    share a row tile (each takes every ``n_split``-th N slice)."""
    config: GemmConfig
    num_k: int
    n_split: int


def forward_launch(rows: int, c_in: int, c_out: int, dtype: torch.dtype,
                   target: Optional[Target]) -> ForwardLaunch:
    return _forward_launch(rows, c_in, c_out, dtype, target, tf32_allowed())


@functools.lru_cache(maxsize=1024)
def _forward_launch(rows: int, c_in: int, c_out: int, dtype: torch.dtype,
                    target: Optional[Target], tf32: bool) -> ForwardLaunch:
    # (tf32: the cache's key, and the flag the fill uses: never a second read of it)
    resident = configs.resident_forward_config(dtype, c_in, target, tf32)
    if resident is None:  # C_in too wide to keep: one N slice per program, K loop
        cfg = configs.forward_kloop_config(dtype, c_out > 64, target)
        return ForwardLaunch(cfg, 0, cdiv(c_out, cfg.block_n))
    cfg, num_k = resident
    if target is None:
        return ForwardLaunch(cfg, num_k, 1)
    # Split a row tile's N slices over programs only when the row tiles alone would leave
    # SMs idle (small batches): each split rebuilds the tile.
    wanted = cdiv(configs.PROGRAMS_PER_SM["gemm"] * target.sm_count, cdiv(rows, cfg.block_m))
    return ForwardLaunch(cfg, num_k, max(1, min(cdiv(c_out, cfg.block_n), wanted)))


def _stats_operands(stats: BatchNormStats, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The two statistics tensors as a kernel reads them: the running buffers as they are
    (the kernels convert as they load), batch statistics in the stat dtype of ``dtype``
    (no-ops for the ops layer's own, already float32 and contiguous)."""
    if stats.running:
        return _contiguous_buffer(stats.mean), _contiguous_buffer(stats.spread)
    sdt = stat_dtype(dtype)
    mean, spread = stats.mean, stats.spread
    # (.to of a tensor already in the dtype returns it, after ~3 us of argument parsing)
    return ((mean if mean.dtype == sdt else mean.to(sdt)).contiguous(),
            (spread if spread.dtype == sdt else spread.to(sdt)).contiguous())


class _ForwardPlan(NamedTuple):
    """What :func:`conv_projection_forward` launches with that depends only on sizes,
    switches, dtype, target and TF32 flag (as :class:`_BackwardPlan`)."""
    g: _Geometry
    c_out: int
    grid: tuple
    n_split: int
    constants: Mapping[str, object]


@functools.lru_cache(maxsize=1024)
def _forward_plan(x_shape: Tuple[int, ...], h: int, w: int, stride: int, with_cls_token: bool,
                  c_out: int, dtype: torch.dtype, target: Optional[Target], tf32: bool,
                  has_bn_w: bool, has_bn_b: bool, has_bias: bool, running: bool
                  ) -> _ForwardPlan:
    g = _geometry(x_shape, h, w, stride, with_cls_token)
    rows = g.batch * (g.n_out + g.cls)
    launch = _forward_launch(rows, g.channels, c_out, dtype, target, tf32)
    cfg = launch.config
    constants = dict(
        STRIDE=g.stride, CLS=g.cls, HAS_BN_W=has_bn_w, HAS_BN_B=has_bn_b, HAS_BIAS=has_bias,
        RUNNING_STATS=running, RESIDENT=launch.num_k > 0, NUM_K=max(1, launch.num_k),
        ACC=acc_dtype(dtype), DOT_PRECISION=precision_for(dtype, tf32), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return _ForwardPlan(g, c_out, (cdiv(rows, cfg.block_m), launch.n_split), launch.n_split,
                        constants)


def conv_projection_forward(x: Tensor, h: int, w: int, conv_weight: Tensor,
                            stats: BatchNormStats, bn_weight: Optional[Tensor],
                            bn_bias: Optional[Tensor], proj_weight: Tensor,
                            proj_bias: Optional[Tensor], stride: int,
                            with_cls_token: bool) -> Tensor:
    """``Linear(flatten([cls,] (dwconv(x) - mean) * rstd * bn_weight + bn_bias))`` (pass 2):
    one launch, in training (batch statistics) and in eval (the running ones)."""
    plan = _forward_plan(x.shape, h, w, stride, with_cls_token, proj_weight.shape[0], x.dtype,
                         target_of(x), tf32_allowed(), bn_weight is not None,
                         bn_bias is not None, proj_bias is not None, stats.running)
    g = plan.g
    x, conv_weight, bn_weight, bn_bias, proj_weight, proj_bias = map(
        _contiguous, (x, conv_weight, bn_weight, bn_bias, proj_weight, proj_bias))
    mean, spread = _stats_operands(stats, x.dtype)
    _check_sizes(x)
    out = torch.empty(g.batch, g.n_out + g.cls, plan.c_out, device=x.device, dtype=x.dtype)
    _check_sizes(out)
    _forward_kernel[plan.grid](
        x, conv_weight, mean, spread, bn_weight, bn_bias, proj_weight, proj_bias, out,
        g.batch, g.h, g.w, g.wo, g.n_out, g.channels, plan.c_out, plan.n_split,
        float(stats.eps), **plan.constants)
    return out


def _weight_grad_split(rows: int, tiles: int, block_m: int, target: Optional[Target]) -> int:
    """How many row splits ``d_proj_weight`` is reduced over: enough programs to fill the
    GPU (the output has few tiles), never more than there are row blocks."""
    row_blocks = cdiv(rows, block_m)
    if target is None:
        return min(row_blocks, 2)
    return max(1, min(row_blocks, cdiv(2 * target.sm_count, tiles)))


class BackwardLaunch(NamedTuple):
    """How :func:`conv_projection_backward` launches (what the tests and the compile check
    inspect without launching)."""
    tokens: GemmConfig        # _grad_tokens_kernel
    token_programs: int       # its first-level programs along rows
    token_blocks_per_program: int
    fused_weight_grad: bool   # d_proj_weight from _grad_tokens_kernel (C_out <= BLOCK_N)
    conv_tile: TileConfig     # _grad_conv_out_kernel
    conv_programs: int        # its programs along rows
    conv_blocks_per_program: int
    input_tile: TileConfig    # _grad_input_kernel
    weight: GemmConfig        # _grad_proj_weight_kernel
    weight_split: int


def backward_launch(batch: int, n_out: int, cls: int, c_in: int, c_out: int,
                    dtype: torch.dtype, target: Optional[Target]) -> BackwardLaunch:
    return _backward_launch(batch, n_out, cls, c_in, c_out, dtype, target,
                            tf32_allowed())


@functools.lru_cache(maxsize=1024)
def _backward_launch(batch: int, n_out: int, cls: int, c_in: int, c_out: int,
                     dtype: torch.dtype, target: Optional[Target], tf32: bool
                     ) -> BackwardLaunch:
    rows = batch * (n_out + cls)
    gcfg = configs.grad_tokens_config(dtype, c_out > 64, target)
    t_programs, t_per = configs.row_split(cdiv(rows, gcfg.block_m), cdiv(c_in, gcfg.block_k),
                                          "gemm", target)
    ccfg = configs.grad_conv_tile_config(dtype, target)
    c_programs, c_per = configs.row_split(cdiv(batch * n_out, ccfg.block_m),
                                          cdiv(c_in, ccfg.block_c), "tile", target)
    wcfg = configs.weight_grad_config(dtype, target, tf32)
    tiles = cdiv(c_out, wcfg.block_n) * cdiv(c_in, wcfg.block_k)
    split = _weight_grad_split(rows, tiles, wcfg.block_m, target)
    fused = (c_out <= min(gcfg.block_n, configs.FUSED_WEIGHT_GRAD_MAX_C_OUT)
             and not configs.fma_dots(dtype, target, tf32))
    return BackwardLaunch(gcfg, t_programs, t_per, fused, ccfg, c_programs,
                          c_per, configs.projection_tile_config(target), wcfg, split)


def _like(p: Optional[Tensor]) -> Optional[Tensor]:
    """A contiguous gradient buffer in ``p``'s dtype (``None`` where there is no ``p``)."""
    # empty_like: torch parses a torch.Size argument ~4 us slower (benchmarks.size_arguments).
    return None if p is None else torch.empty_like(p, memory_format=torch.contiguous_format)


class _BackwardPlan(NamedTuple):
    """Everything :func:`conv_projection_backward` launches with that depends only on the
    call's sizes, switches, dtype, target and TF32 flag: grids, runtime sizes and each
    kernel's compile-time arguments (dicts never changed once built: ``**`` copies them
    into each launch; a read-only MappingProxyType unpacked 2.4 us
    slower: benchmarks.size_arguments)."""
    g: _Geometry
    c_out: int
    width: int                # proj weight + bias gradient columns of the partials
    launch: BackwardLaunch
    tokens_grid: tuple
    tokens_rows: int          # rows per first-level program of _grad_tokens_kernel
    tokens: Mapping[str, object]
    conv_grid: tuple
    conv_rows: int
    conv: Mapping[str, object]
    input_grid: tuple
    input: Mapping[str, object]
    weight_grid: Optional[tuple]  # None: the weight gradient rides in _grad_tokens_kernel
    w_parts: int
    weight: Optional[Mapping[str, object]]
    param_grid: tuple
    bn_programs: int
    conv_programs: int
    params: Mapping[str, object]


@functools.lru_cache(maxsize=1024)
def _backward_plan(x_shape: Tuple[int, ...], h: int, w: int, stride: int, with_cls_token: bool,
                   c_out: int, dtype: torch.dtype, target: Optional[Target], tf32: bool,
                   has_bn_w: bool, has_bn_b: bool, has_bias: bool, running: bool,
                   batch_stats: bool, accumulate: bool = False) -> _BackwardPlan:
    # A pure function of its arguments and this package's constant tables: built once per
    # signature instead of on each of a block training call's three projection backwards.
    g = _geometry(x_shape, h, w, stride, with_cls_token)
    c_in = g.channels
    launch = _backward_launch(g.batch, g.n_out, g.cls, c_in, c_out, dtype, target, tf32)
    r = configs.reduce_config(target)
    precision = precision_for(dtype, tf32)
    geometry = dict(STRIDE=g.stride, CLS=g.cls)
    switches = dict(geometry, HAS_BN_W=has_bn_w)
    gcfg, tcfg, icfg, wcfg = launch.tokens, launch.conv_tile, launch.input_tile, launch.weight
    width = c_out * c_in + c_out
    tokens = dict(
        switches, HAS_BN_B=has_bn_b, HAS_BIAS=has_bias, RUNNING_STATS=running,
        FUSE_WEIGHT_GRAD=launch.fused_weight_grad, ACCUMULATE=accumulate,
        DOT_PRECISION=precision, BLOCK_M=gcfg.block_m, BLOCK_N=gcfg.block_n,
        BLOCK_K=gcfg.block_k,
        num_warps=gcfg.num_warps, num_stages=gcfg.num_stages)
    conv = dict(
        switches, BATCH_STATS=batch_stats, RUNNING_STATS=running, BLOCK_P=r.block_p,
        BLOCK_M=tcfg.block_m, BLOCK_C=tcfg.block_c, num_warps=tcfg.num_warps)
    inputs = dict(geometry, ACCUMULATE=accumulate, BLOCK_M=icfg.block_m,
                  BLOCK_C=icfg.block_c, num_warps=icfg.num_warps)
    if launch.fused_weight_grad:
        weight_grid, w_parts, weight = None, launch.token_programs, None
    else:
        w_parts = launch.weight_split
        weight_grid = (cdiv(c_out, wcfg.block_n), cdiv(c_in, wcfg.block_k), w_parts)
        weight = dict(
            switches, HAS_BN_B=has_bn_b, HAS_BIAS=has_bias, RUNNING_STATS=running,
            DOT_PRECISION=precision, BLOCK_M=wcfg.block_m, BLOCK_N=wcfg.block_n,
            BLOCK_K=wcfg.block_k, num_warps=wcfg.num_warps, num_stages=wcfg.num_stages)
    bn_programs = cdiv(2 * c_in, r.block) if has_bn_w or has_bn_b else 0
    conv_programs = cdiv(9 * c_in, r.block)
    params = dict(HAS_BN_W=has_bn_w, HAS_BN_B=has_bn_b, HAS_BIAS=has_bias, BLOCK_P=r.block_p,
                  BLOCK=r.block, num_warps=r.num_warps)
    return _BackwardPlan(
        g, c_out, width, launch,
        (launch.token_programs, cdiv(c_in, gcfg.block_k)),
        launch.token_blocks_per_program * gcfg.block_m, tokens,
        (launch.conv_programs, cdiv(c_in, tcfg.block_c)),
        launch.conv_blocks_per_program * tcfg.block_m, conv,
        (cdiv(g.batch * g.h * g.w, icfg.block_m), cdiv(c_in, icfg.block_c)), inputs,
        weight_grid, w_parts, weight,
        (bn_programs + conv_programs + cdiv(width, r.block),), bn_programs, conv_programs,
        params)


def conv_projection_backward(grad_out: Tensor, x: Tensor, h: int, w: int, conv_weight: Tensor,
                             stats: BatchNormStats, bn_weight: Optional[Tensor],
                             bn_bias: Optional[Tensor], proj_weight: Tensor,
                             proj_bias: Optional[Tensor], stride: int, with_cls_token: bool,
                             batch_stats: bool, dx_into: Optional[Tensor] = None
                             ) -> Dict[str, Optional[Tensor]]:
    """Gradients of :func:`conv_projection_forward`: ``dx`` in ``x``'s dtype and every
    parameter's gradient in that parameter's dtype (``None`` for an absent parameter).
    Given ``dx_into`` (``x``'s shape and dtype, contiguous), ``dx`` is added to it in the
    kernels' stores and ``dx_into`` is returned as ``dx``: a block's three projections sum
    their input gradients without an add pass per projection.

    With ``batch_stats`` ``stats`` are the batch statistics and BatchNorm's training
    backward is applied (they depend on ``x`` and ``conv_weight``). Four launches (five
    when C_out is above one N slice), the last :func:`_param_grads_kernel`.
    """
    plan = _backward_plan(x.shape, h, w, stride, with_cls_token, proj_weight.shape[0],
                          x.dtype, target_of(x), tf32_allowed(), bn_weight is not None,
                          bn_bias is not None, proj_bias is not None, stats.running,
                          batch_stats, dx_into is not None)
    g, c_out, launch = plan.g, plan.c_out, plan.launch
    c_in = g.channels
    if grad_out.shape != (g.batch, g.n_out + g.cls, c_out):
        raise ValueError(f"triton conv_projection: grad_out of shape {tuple(grad_out.shape)}, "
                         f"expected {(g.batch, g.n_out + g.cls, c_out)}")
    grad_out, x, conv_weight, bn_weight, bn_bias, proj_weight = map(
        _contiguous, (grad_out, x, conv_weight, bn_weight, bn_bias, proj_weight))
    mean, spread = _stats_operands(stats, x.dtype)
    eps = float(stats.eps)
    _check_sizes(x, grad_out)
    dev = x.device
    sdt = stat_dtype(x.dtype)
    if dx_into is None:
        dx = torch.empty_like(x)
    else:
        if (dx_into.shape != x.shape or dx_into.dtype != x.dtype or dx_into.device != dev
                or not dx_into.is_contiguous()):
            raise ValueError(f"triton conv_projection: dx_into must be a contiguous "
                             f"{x.dtype} tensor of shape {tuple(x.shape)} on {dev}, got "
                             f"{dx_into.dtype} {tuple(dx_into.shape)} on {dx_into.device}"
                             f"{'' if dx_into.is_contiguous() else ' (not contiguous)'}")
        dx = dx_into

    # 1. dt = grad_out @ W: dz for the map rows, dx for the class token, the BN sums'
    # partials (and, for C_out <= BLOCK_N, the proj weight/bias gradient partials from the
    # same tiles).
    dz = torch.empty(g.batch * g.n_out, c_in, device=dev, dtype=sdt)
    bn_part = torch.empty(launch.token_programs, 2, c_in, device=dev, dtype=sdt)
    w_part = (torch.empty(launch.token_programs, plan.width, device=dev, dtype=sdt)
              if launch.fused_weight_grad else None)
    _grad_tokens_kernel[plan.tokens_grid](
        grad_out, proj_weight, x, conv_weight, mean, spread, bn_weight, bn_bias, dz, dx,
        bn_part, w_part, g.batch, g.h, g.w, g.wo, g.n_out, c_in, c_out, plan.tokens_rows, eps,
        **plan.tokens)

    # 2. dy in place of dz (the BN sums reduced in the kernel), and the depthwise weight
    # gradient's partials.
    conv_part = torch.empty(launch.conv_programs, c_in, 9, device=dev, dtype=sdt)
    _grad_conv_out_kernel[plan.conv_grid](
        x, conv_weight, mean, spread, bn_weight, bn_part, dz, conv_part,
        g.batch, g.h, g.w, g.wo, g.n_out, c_in, plan.conv_rows, launch.token_programs, eps,
        **plan.conv)

    # 3. dx of the map tokens.
    _grad_input_kernel[plan.input_grid](dz, conv_weight, dx, g.batch, g.h, g.w, g.ho, g.wo,
                                        c_in, **plan.input)

    # 4. d_proj_weight (+ d_proj_bias) partials: step 1's, or a GEMM split over rows.
    if plan.weight is not None:
        w_part = torch.empty(plan.w_parts, plan.width, device=dev, dtype=sdt)
        _grad_proj_weight_kernel[plan.weight_grid](
            grad_out, x, conv_weight, mean, spread, bn_weight, bn_bias, w_part,
            g.batch, g.h, g.w, g.wo, g.n_out, c_in, c_out, plan.w_parts, eps, **plan.weight)

    # 5. Every parameter gradient, from the three partial buffers, in one launch.
    grads = {"x": dx, "conv_weight": _like(conv_weight), "bn_weight": _like(bn_weight),
             "bn_bias": _like(bn_bias), "proj_weight": _like(proj_weight),
             "proj_bias": _like(proj_bias)}
    _param_grads_kernel[plan.param_grid](
        bn_part, conv_part, w_part, grads["bn_weight"], grads["bn_bias"], grads["conv_weight"],
        grads["proj_weight"], grads["proj_bias"], launch.token_programs, launch.conv_programs,
        plan.w_parts, c_in, c_out, plan.bn_programs, plan.conv_programs, **plan.params)
    return grads
