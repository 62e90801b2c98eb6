"""LayerNorm (+ the residual add before it) in Triton: float32 statistics, input-dtype I/O.

The math is :mod:`cvt_kernels.ops.layer_norm`'s (its reference functions are the oracle).
One program normalizes a tile of whole rows (CvT's widths, 64 to 1024, fit one block; rows
are stacked until the tile holds ~4K elements). The backward writes ``ds`` per row and
per-program partial sums of ``dweight``/``dbias`` over a fixed run of row tiles (about four
programs per SM) into one float32 workspace that every program fills (no zeroing); one
launch (:func:`.mlp.sum_partials`) sums them in a fixed order and writes both gradients in
the affine's dtype: a deterministic two-level reduction, no atomics, two launches a
backward.

Layers: the ``@triton.jit`` kernels, then the plain launchers (:func:`layer_norm_forward`,
:func:`layer_norm_backward`) that check inputs, allocate outputs and pick block sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv, next_power_of_2, stat_dtype
from ._runtime import Target, acc_dtype, target_of
from .mlp import sum_partials

__all__ = ["MAX_WIDTH", "backward_launch", "forward_launch", "layer_norm_backward",
           "layer_norm_forward"]

# A row is normalized inside one program's registers: wider rows decline (reason below).
MAX_WIDTH = 8192
# Elements of the [BLOCK_M, BLOCK_N] tile one program holds: rows are stacked until the
# tile has this many, so CvT's narrow rows (64 channels at stage 1) do not leave a 1-warp
# program per row (200,704 programs of 64 elements at CvT-13 stage 1, batch 64). The
# backward keeps three tiles live (the sum, its gradient, ds): a smaller one.
FWD_TILE = 4096
BWD_TILE = 2048
# Backward programs per SM: each reduces a fixed run of rows into one dweight/dbias partial.
BWD_PROGRAMS_PER_SM = 4
# Under the interpreter: small tiles and two row tiles per backward program, so the tiny
# test shapes take several programs, ragged row tails and the backward's loop.
_INTERPRETER_TILE = 128


@triton.jit
def _offsets(rows, cols, T, stride_b, stride_t, stride_c):
    """Offsets of ``[rows, cols]`` in a ``(B, T, N)`` tensor of any strides (row ``r`` is
    token ``r % T`` of sample ``r // T``): a transposed or sliced input read in place."""
    b = rows // T
    return (b * stride_b + (rows - b * T) * stride_t)[:, None] + cols[None, :] * stride_c


@triton.jit
def _layer_norm_fwd_kernel(
    # Pointers to matrices
    X, R, W, B, Y, S, MEAN, RSTD,
    # Strides: the inputs as (B, T, N) (any), the outputs' rows (contiguous (M, N))
    stride_xb, stride_xt, stride_xc, stride_rb, stride_rt, stride_rc, stride_y, stride_s,
    # Matrix dimensions: M = B * T rows of N
    M, N, T, eps,
    # Meta-parameters
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + _offsets(rows, cols, T, stride_xb, stride_xt, stride_xc), mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the input dtype, as eager materializes it, then normalized.
        # (Added in ACC and rounded once: the same bits as a native half-precision add; the
        # interpreter's bfloat16 add gave NaN.)
        r = tl.load(R + _offsets(rows, cols, T, stride_rb, stride_rt, stride_rc), mask=mask,
                    other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(ACC)
    mean = tl.sum(xf, axis=1) / N
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    # Pointers to matrices
    DY, DSUM, S, W, MEAN, RSTD, DS, DW_PART, DB_PART,
    # Strides: the inputs as (B, T, N) (any), the rows of ds (contiguous (M, N)) and of the
    # partials (one per program)
    stride_dyb, stride_dyt, stride_dyc, stride_dsumb, stride_dsumt, stride_dsumc,
    stride_sb, stride_st, stride_sc, stride_ds, stride_part,
    # Matrix dimensions: M = B * T rows of N
    M, N, T, ROWS_PER_PROGRAM,
    # Meta-parameters
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    start = pid.to(tl.int64) * ROWS_PER_PROGRAM  # a multiple of BLOCK_M
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = start + i + tl.arange(0, BLOCK_M)
        # Rows past the end (the last program's tail) load zeros and store nothing.
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        s = tl.load(S + _offsets(rows, cols, T, stride_sb, stride_st, stride_sc), mask=mask,
                    other=0.0).to(ACC)
        dy = tl.load(DY + _offsets(rows, cols, T, stride_dyb, stride_dyt, stride_dyc),
                     mask=mask, other=0.0).to(ACC)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            gw = dy * w[None, :]
        else:
            gw = dy
        c1 = tl.sum(xhat * gw, axis=1) / N
        c2 = tl.sum(gw, axis=1) / N
        ds = (gw - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DSUM:
            ds += tl.load(DSUM + _offsets(rows, cols, T, stride_dsumb, stride_dsumt,
                                          stride_dsumc), mask=mask, other=0.0).to(ACC)
        tl.store(DS + rows[:, None] * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty),
                 mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * stride_part + cols, dw, mask=col_ok)
    tl.store(DB_PART + pid * stride_part + cols, db, mask=col_ok)


class RowTiles(NamedTuple):
    """How a launch tiles ``M`` rows of ``N`` elements: ``block_m`` rows of ``block_n``
    (a power of two >= N) per tile, ``rows_per_program`` rows per program (backward: a
    multiple of ``block_m``), ``programs`` programs of ``warps`` warps."""
    block_m: int
    block_n: int
    rows_per_program: int
    programs: int
    warps: int


def _tile(m: int, n: int, elements: int, target: Optional[Target]) -> Tuple[int, int, int]:
    """``(block_m, block_n, warps)``: rows stacked up to ``elements`` per tile; 4 warps, and
    one more warp per 128 columns from 1024 columns (at most 16) so that wide rows keep a
    few elements per thread."""
    block_n = max(16, next_power_of_2(n))
    if target is None:  # the interpreter ignores warps
        return min(max(_INTERPRETER_TILE // block_n, 1), max(next_power_of_2(m), 1)), block_n, 1
    block_m = min(max(elements // block_n, 1), max(next_power_of_2(m), 1))
    return block_m, block_n, (4 if block_n < 1024 else min(block_n // 128, 16))


def forward_launch(m: int, n: int, t: Tensor) -> RowTiles:
    """The forward's tiling for ``M`` rows of width ``N`` on ``t``'s device."""
    return _forward_launch(m, n, target_of(t))


def backward_launch(m: int, n: int, t: Tensor) -> RowTiles:
    """The backward's tiling: about ``BWD_PROGRAMS_PER_SM`` programs per SM, each over a
    run of whole row tiles (under the interpreter: two tiles)."""
    return _backward_launch(m, n, target_of(t))


# Pure functions of their arguments (sizes and the target; the module's constants are
# never changed at run time): one computation per shape, ~5 us a launch saved.
@functools.lru_cache(maxsize=1024)
def _forward_launch(m: int, n: int, target: Optional[Target]) -> RowTiles:
    block_m, block_n, warps = _tile(m, n, FWD_TILE, target)
    return RowTiles(block_m, block_n, block_m, max(cdiv(m, block_m), 1), warps)


@functools.lru_cache(maxsize=1024)
def _backward_launch(m: int, n: int, target: Optional[Target]) -> RowTiles:
    # From 512 columns, tiles of half the size: 2048-element tiles of 512-wide rows spilled
    # 8 bytes at 4 warps under Triton 3.6 and at 8 warps under 3.9 (launch_check, sm_86/89).
    tile = BWD_TILE if n <= 256 else BWD_TILE // 2
    block_m, block_n, warps = _tile(m, n, tile, target)
    if target is None:
        rows = 2 * block_m
    else:
        rows = cdiv(cdiv(m, BWD_PROGRAMS_PER_SM * target.sm_count), block_m) * block_m
    rows = max(rows, block_m)
    return RowTiles(block_m, block_n, rows, max(cdiv(m, rows), 1), warps)


def _as_3d(t: Tensor) -> Tensor:
    """``t`` as ``(B, T, N)`` for the kernels' strided loads: itself when 3-D, else a view
    ``(1, M, N)`` where one exists (a copy only for a layout no view can flatten)."""
    if t.ndim == 3:
        return t
    if t.ndim == 2:
        return t[None]
    try:
        return t.view(1, -1, t.shape[-1])
    except RuntimeError:
        return t.reshape(1, -1, t.shape[-1])


def _strides(t: Optional[Tensor]) -> Tuple[int, int, int]:
    return t.stride() if t is not None else (0, 0, 0)  # a 3-D tensor's (_as_3d)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Sizes passed as separate ints: torch parses a torch.Size or tuple argument 1.5-5 us
    # slower (benchmarks.size_arguments: this project's CPU machine, torch 2.13).
    return torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty(
        (), dtype=dtype, device=device)


def _check(x: Tensor, name: str, shape) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(normed, sum, mean, rstd)`` of ``x (+ residual)`` over the last axis; ``sum`` is
    empty without ``residual``; ``mean``/``rstd`` ``x.shape[:-1]`` in float32 (float64 for
    float64). Shapes and dtypes as :func:`..reference_math.layer_norm_forward`."""
    n = x.shape[-1]
    if residual is not None:
        _check(residual, "residual", x.shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check(t, name, (n,))
    # Read in place, any strides (the stage norms' inputs are transposed conv outputs).
    x3 = _as_3d(x)
    m = x3.shape[0] * x3.shape[1]
    r3 = _as_3d(residual) if residual is not None else None
    # Outputs allocated in their final shapes, contiguous: row r of (M, N) at r * N.
    shape, lead, dev = x.shape, x.shape[:-1], x.device
    y = _empty(shape, x.dtype, dev)
    s = _empty(shape, x.dtype, dev) if residual is not None else torch.empty(
        0, dtype=x.dtype, device=dev)
    sdt = stat_dtype(x.dtype)
    mean = _empty(lead, sdt, dev)
    rstd = _empty(lead, sdt, dev)
    if m > 0 and n > 0:
        launch = forward_launch(m, n, x)
        _layer_norm_fwd_kernel[(launch.programs,)](
            x3, r3, weight, bias, y, s, mean, rstd,
            *_strides(x3), *_strides(r3), n, n if residual is not None else 0,
            m, n, x3.shape[1], float(eps),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            ACC=acc_dtype(x.dtype), num_warps=launch.warps)
    return y, s, mean, rstd


def layer_norm_backward(grad_normed: Tensor, grad_sum: Optional[Tensor], s: Tensor,
                        weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool
                        ) -> Tuple[Optional[Tensor], ...]:
    """``(ds, dweight, dbias)``, as :func:`..reference_math.layer_norm_backward`."""
    n = s.shape[-1]
    _check(grad_normed, "grad_normed", s.shape)
    if grad_sum is not None:
        _check(grad_sum, "grad_sum", s.shape)
    # Read in place, any strides (a sliced or transposed incoming gradient).
    s3, dy3 = _as_3d(s), _as_3d(grad_normed)
    m = s3.shape[0] * s3.shape[1]
    dsum3 = _as_3d(grad_sum) if grad_sum is not None else None
    dev = s.device
    ds = _empty(s.shape, s.dtype, dev)  # contiguous: row r of (M, N) at r * N
    affine_dtype = weight.dtype if weight is not None else s.dtype
    dweight = torch.empty(n, device=dev, dtype=affine_dtype) if weight is not None else None
    dbias = torch.empty(n, device=dev, dtype=affine_dtype) if has_bias else None
    if m == 0 or n == 0:  # an empty sum (never at CvT's sizes): zeros, a launch of their own
        return (ds, None if dweight is None else dweight.zero_(),
                None if dbias is None else dbias.zero_())
    launch = backward_launch(m, n, s)
    # Each program writes its row of both partials: nothing to zero first.
    parts = torch.empty(launch.programs, 2 * n, device=dev, dtype=stat_dtype(s.dtype))
    # The statistics are read at row r's flat index (the forward's are contiguous already).
    mean = mean if mean.is_contiguous() else mean.reshape(-1)
    rstd = rstd if rstd.is_contiguous() else rstd.reshape(-1)
    _layer_norm_bwd_kernel[(launch.programs,)](
        dy3, dsum3, s3, weight, mean, rstd, ds, parts, parts[:, n:],
        *_strides(dy3), *_strides(dsum3), *_strides(s3), n, 2 * n,
        m, n, s3.shape[1], launch.rows_per_program,
        HAS_DSUM=grad_sum is not None, HAS_WEIGHT=weight is not None,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, ACC=acc_dtype(s.dtype),
        num_warps=launch.warps)
    # Second level, one launch for both: the partials summed in a fixed order, rounded once.
    if dweight is not None or dbias is not None:
        if dweight is None:
            sum_partials(parts[:, n:], [dbias])
        else:
            sum_partials(parts if dbias is not None else parts[:, :n],
                         [dweight] + ([dbias] if dbias is not None else []))
    return ds, dweight, dbias
