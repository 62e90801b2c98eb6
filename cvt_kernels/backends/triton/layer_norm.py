"""LayerNorm (+ the residual add before it) in Triton: float32 statistics, input-dtype I/O.

The math is :mod:`cvt_kernels.ops.layer_norm`'s (its reference functions are the oracle).
One program normalizes one row (CvT's widths, 64 to 1024, fit one block). The backward
writes ``ds`` per row and per-program partial sums of ``dweight``/``dbias`` over a fixed
range of rows; the partials are summed in a fixed order after it: a deterministic two-level
reduction, no atomics.

Layers: the ``@triton.jit`` kernels, then the plain launchers (:func:`layer_norm_forward`,
:func:`layer_norm_backward`) that check inputs, allocate outputs and pick block sizes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv, stat_dtype
from ._runtime import acc_dtype, target_of

__all__ = ["layer_norm_backward", "layer_norm_forward"]

# Rows one backward program reduces into its dweight/dbias partial: fewer partials to sum,
# still enough programs to fill a GPU at CvT's row counts (B * tokens, thousands).
BWD_ROWS_PER_PROGRAM = 32


@triton.jit
def _layer_norm_fwd_kernel(
    # Pointers to matrices
    X, R, W, B, Y, S, MEAN, RSTD,
    # Row strides (the last axis is contiguous)
    stride_x, stride_r, stride_y, stride_s,
    # Matrix dimensions
    N, eps,
    # Meta-parameters
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the input dtype, as eager materializes it, then normalized.
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(ACC)
    mean = tl.sum(xf, axis=0) / N
    diff = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    # Pointers to matrices
    DY, DSUM, S, W, MEAN, RSTD, DS, DW_PART, DB_PART,
    # Row strides (the last axis is contiguous)
    stride_dy, stride_dsum, stride_s, stride_ds,
    # Matrix dimensions
    M, N, ROWS_PER_PROGRAM,
    # Meta-parameters
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    start = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = start + i
        # A row past the end (the last program's tail) loads zeros and stores nothing.
        row_mask = mask & ((cols * 0 + row) < M)
        s = tl.load(S + row * stride_s + cols, mask=row_mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * stride_dy + cols, mask=row_mask, other=0.0).to(ACC)
        # Clamped: a dead row's statistics are read from the last row and multiply zeros.
        mean = tl.load(MEAN + tl.minimum(row, M - 1))
        rstd = tl.load(RSTD + tl.minimum(row, M - 1))
        xhat = tl.where(row_mask, (s - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            gw = dy * w
        else:
            gw = dy
        c1 = tl.sum(xhat * gw, axis=0) / N
        c2 = tl.sum(gw, axis=0) / N
        ds = (gw - c2 - xhat * c1) * rstd
        if HAS_DSUM:
            ds += tl.load(DSUM + row * stride_dsum + cols, mask=row_mask, other=0.0).to(ACC)
        tl.store(DS + row * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=row_mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    tl.store(DB_PART + pid * N + cols, db, mask=mask)


def _rows(t: Tensor) -> Tensor:
    """``(M, N)`` with a contiguous last axis (a view when it already has one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: Tensor, name: str, shape) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block_n: int, x: Tensor) -> int:
    if target_of(x) is None:  # the interpreter ignores it
        return 1
    return min(max(block_n // 256, 1), 8)


def layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(normed, sum, mean, rstd)`` of ``x (+ residual)`` over the last axis; ``sum`` is
    empty without ``residual``; ``mean``/``rstd`` ``x.shape[:-1]`` in float32 (float64 for
    float64). Shapes and dtypes as :func:`cvt_kernels.ops.layer_norm.reference_forward`."""
    n = x.shape[-1]
    if residual is not None:
        _check(residual, "residual", x.shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check(t, name, (n,))
    x2 = _rows(x)
    m = x2.shape[0]
    r2 = _rows(residual) if residual is not None else None
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    s = torch.empty((m, n) if residual is not None else (0,), device=x.device, dtype=x.dtype)
    sdt = stat_dtype(x.dtype)
    mean = torch.empty((m,), device=x.device, dtype=sdt)
    rstd = torch.empty((m,), device=x.device, dtype=sdt)
    if m > 0 and n > 0:
        block_n = _block_n(n)
        _layer_norm_fwd_kernel[(m,)](
            x2, r2, weight, bias, y, s, mean, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            s.stride(0) if residual is not None else 0,
            n, float(eps),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, ACC=acc_dtype(x.dtype),
            num_warps=_warps(block_n, x))
    lead = x.shape[:-1]
    return (y.reshape(x.shape), s.reshape(x.shape) if residual is not None else s,
            mean.reshape(lead), rstd.reshape(lead))


def layer_norm_backward(grad_normed: Tensor, grad_sum: Optional[Tensor], s: Tensor,
                        weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool
                        ) -> Tuple[Optional[Tensor], ...]:
    """``(ds, dweight, dbias)``, as :func:`cvt_kernels.ops.layer_norm.reference_backward`."""
    n = s.shape[-1]
    _check(grad_normed, "grad_normed", s.shape)
    if grad_sum is not None:
        _check(grad_sum, "grad_sum", s.shape)
    s2, dy2 = _rows(s), _rows(grad_normed)
    m = s2.shape[0]
    dsum2 = _rows(grad_sum) if grad_sum is not None else None
    ds = torch.empty((m, n), device=s.device, dtype=s.dtype)
    sdt = stat_dtype(s.dtype)
    programs = max(cdiv(m, BWD_ROWS_PER_PROGRAM), 1)
    dw_part = torch.zeros((programs, n), device=s.device, dtype=sdt)
    db_part = torch.zeros((programs, n), device=s.device, dtype=sdt)
    if m > 0 and n > 0:
        block_n = _block_n(n)
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dsum2, s2, weight, mean.reshape(-1), rstd.reshape(-1), ds, dw_part, db_part,
            dy2.stride(0), dsum2.stride(0) if dsum2 is not None else 0, s2.stride(0),
            ds.stride(0), m, n, BWD_ROWS_PER_PROGRAM,
            HAS_DSUM=grad_sum is not None, HAS_WEIGHT=weight is not None, BLOCK_N=block_n,
            ACC=acc_dtype(s.dtype), num_warps=_warps(block_n, s))
    affine_dtype = weight.dtype if weight is not None else s.dtype
    # Second level: the programs' partials summed over a fixed shape, in a fixed order.
    dweight = dw_part.sum(0).to(affine_dtype) if weight is not None else None
    dbias = db_part.sum(0).to(affine_dtype) if has_bias else None
    return ds.reshape(s.shape), dweight, dbias
