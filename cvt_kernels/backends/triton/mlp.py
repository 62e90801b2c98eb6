"""CvT's MLP and the attention's output projection in Triton: GEMMs whose prologues and
epilogues hold everything elementwise around them.

* MLP forward: fc1 with bias (and, in eval, the activation) in its epilogue, fc2 with
  bias, drop path and the residual add in its epilogue. In training fc1 writes only the
  pre-activation ``z`` (what the backward reads) and fc2 applies the activation as it
  loads its A tiles: one ``(M, hidden)`` tensor written, not two. Backward: ``act'(z)``
  in the epilogue of ``g W2``, ``act(z)`` applied as ``z`` is loaded for
  ``dW2 = g^T act(z)``.
* Output projection (:func:`linear_forward`): one GEMM with bias, drop path and the
  residual in its epilogue.
* Eval: the block's norm2 in fc1's prologue (:func:`norm_mlp_forward`): fc1's programs
  loop over whole rows of its input anyway (K = the channels), so a pre-pass over the same
  tiles gives each row's mean and variance, and every A tile is normalized as it is
  loaded (the layer_norm kernel's arithmetic, rounded to the input dtype as the norm's
  output would be).
* Weight gradients (:func:`weight_gradients`; K = every token of the batch, few output
  tiles): K split over programs into float32 partials; the **bias gradients ride in the
  same programs** (the row sums of the A tiles they load anyway: ``db = g^T 1``), and one
  launch (:func:`sum_partials`) sums every partial of a backward in a fixed order and
  writes each gradient in its parameter's dtype (split-K without atomics: deterministic).
  An MLP backward is five launches: ``dz``, ``dW2``+``db2``, ``dW1``+``db1``, the sum,
  ``dx``.
* Drop path (CvT's ``DropPath``: ``x.div(keep) * floor(keep + rand)`` per sample, the
  uniform draws ``rand`` made by the caller as ``DropPath`` makes them): in the forward
  epilogue, rounded where eager rounds (the GEMM's output, the scaled output, the sum
  with the residual); in the backward as a prologue scale of the incoming gradient's rows
  (``dz``, ``dx``) or of its K run (``dW``, ``db``), rounded to its dtype as eager's
  ``DivBackward`` rounds it.

The math is :mod:`cvt_kernels.ops.mlp`'s and :mod:`cvt_kernels.ops.linear`'s (their
reference functions are the oracle). Every product is one GEMM kernel (:func:`_gemm_kernel`)
with compile-time switches; operands are read through strides, so transposes cost nothing.

Layers: the ``@triton.jit`` kernels and helpers, the plain launchers :func:`gemm`,
:func:`weight_gradients` and :func:`sum_partials` (tensors in, tensors out; a compile check
can drive them), :func:`_linear` (``gemm`` for this module's own callers: a Linear's weight,
3-D activations and residuals read through strides, no views), and :func:`mlp_forward` /
:func:`mlp_backward` / :func:`linear_forward` / :func:`linear_backward`, what the backend's
methods call. A launch's compile-time arguments are computed once per (dtype, target, TF32
flag, switches) (:func:`_gemm_constants`). Not yet run on a GPU: the block sizes below are
a starting point, not tuned (issue 18).
"""

from __future__ import annotations

import functools
import struct
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv, next_power_of_2, stat_dtype
from ._runtime import Target, acc_dtype, precision_for, target_of, tf32_allowed

__all__ = ["ACT_CODES", "Drop", "GradJob", "gemm", "linear_backward", "linear_forward",
           "mlp_backward", "mlp_forward", "norm_mlp_forward", "split_k_plan", "sum_partials",
           "weight_gradients"]

#: The activation switch of the kernel: 0 none, 1 QuickGELU, 2 exact GELU.
ACT_CODES = {None: 0, "quick_gelu": 1, "gelu": 2}
# Kernel constants (constexpr: a @triton.jit function reads no other globals).
QUICK_GELU_ALPHA = tl.constexpr(1.702)
SQRT_HALF = tl.constexpr(0.7071067811865476)     # 1 / sqrt(2): erf's argument for Phi
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # the standard normal density's constant
# Drop path's switch: 1 forward epilogue (C = round(round(acc) * f[m]) before the residual),
# 2 prologue scale of A's rows (f[m]), 3 prologue scale of A's columns, K (f[k]).
DROP_CODES = {None: 0, "epilogue": 1, "rows": 2, "k": 3}
# Split-K of the weight gradients (K = B * tokens, 200,704 at CvT-13 stage 1, batch 64, and
# only 2 output tiles of 128 x 128): programs per SM to aim for, and the least K blocks one
# program sums (fewer would spend more on the partials than on the products).
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_K_BLOCKS = 8
# The partials' sum: programs per SM to aim for (each sums every split of BLOCK columns),
# and the bounds of BLOCK.
PARTIALS_PROGRAMS_PER_SM = 2
PARTIALS_BLOCK = (128, 1024)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:  # QuickGELU: z * sigmoid(1.702 z)
        return z * tl.sigmoid(z * QUICK_GELU_ALPHA)
    elif ACT == 2:  # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.erf(z * SQRT_HALF))
    else:
        tl.static_assert(ACT == 0, "ACT: 0 (none), 1 (QuickGELU) or 2 (GELU)")
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    tl.static_assert((ACT == 1) or (ACT == 2), "ACT_GRAD: 1 (QuickGELU) or 2 (GELU)")
    if ACT == 1:
        s = tl.sigmoid(z * QUICK_GELU_ALPHA)
        return s + z * QUICK_GELU_ALPHA * s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * SQRT_HALF))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        return cdf + z * pdf


@triton.jit
def _drop_factor(R, idx, ok, ROWS_PER_SAMPLE, keep_hi, keep_lo, ACC: tl.constexpr):
    """DropPath's factor ``floor(keep + r) / keep`` for rows ``idx`` (``r`` their sample's
    draw; ``keep + r`` rounded to ``r``'s dtype first: DropPath adds in its input's dtype).
    ``keep`` arrives as float32 ``hi + lo`` (float64 to the last bit under the interpreter)."""
    keep = tl.cast(keep_hi, ACC) + tl.cast(keep_lo, ACC)
    r = tl.load(R + idx // ROWS_PER_SAMPLE, mask=ok, other=0.0)
    kept = tl.floor((keep + r.to(ACC)).to(R.dtype.element_ty).to(ACC))
    return kept / keep


@triton.jit
def _gemm_kernel(
    # Pointers to matrices
    A, B, C, BIAS, RES, Z_IN, ROWSUM, DROP_R, NORM_W, NORM_B,
    # Matrix dimensions: C (M, N) = A (M, K) @ B (K, N); program_id(2) sums K's run
    # [pid * K_PER_SPLIT, (pid + 1) * K_PER_SPLIT) into its own C slice (split-K)
    M, N, K, K_PER_SPLIT,
    # Strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    stride_rm, stride_rn, stride_zim, stride_zin, stride_rss,
    # Drop path: rows of A (or of K) per sample, keep probability (float32 hi + lo);
    # the LayerNorm prologue's eps
    ROWS_PER_SAMPLE, keep_hi, keep_lo, norm_eps,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,   # + BIAS[n]
    ACT: tl.constexpr,        # epilogue: C = act(acc)
    HAS_RES: tl.constexpr,    # epilogue: + RES[m, n]
    ACT_GRAD: tl.constexpr,   # epilogue: * act'(Z_IN[m, n])
    A_ACT: tl.constexpr,      # prologue: A = act(A) as it is loaded (rounded to A's dtype)
    B_ACT: tl.constexpr,      # prologue: B = act(B) as it is loaded
    SPLIT_K: tl.constexpr,    # program_id(2) sums one run of K into its C slice
    ROW_SUMS: tl.constexpr,   # ROWSUM[split, m] = sum of A[m, k] (as scaled) over the run
    DROP: tl.constexpr,       # DROP_CODES: drop path in the epilogue or as a scale of A
    NORM_A: tl.constexpr,     # prologue: A = LayerNorm of A's rows (over K) * NORM_W + NORM_B
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    if SPLIT_K:
        pid_k = tl.program_id(2)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
        C += pid_k * stride_cs
    else:  # the epilogue GEMMs: no extra registers for a split they never use
        k_start = 0
        k_end = K
    if DROP == 2:
        f_rows = _drop_factor(DROP_R, rm, mask_m, ROWS_PER_SAMPLE, keep_hi, keep_lo, ACC)
    if ROW_SUMS:
        row_sums = tl.zeros((BLOCK_M,), dtype=ACC)
    if NORM_A:  # the statistics of whole rows (K: every channel), two passes as layer_norm
        mean = tl.zeros((BLOCK_M,), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mean += tl.sum(tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                                   mask=mask_m[:, None] & (kk[None, :] < K),
                                   other=0.0).to(ACC), axis=1)
        mean = mean / K
        var = tl.zeros((BLOCK_M,), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            ok = mask_m[:, None] & (kk[None, :] < K)
            xs = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=ok,
                         other=0.0).to(ACC)
            diff = tl.where(ok, xs - mean[:, None], 0.0)
            var += tl.sum(diff * diff, axis=1)
        rstd = 1.0 / tl.sqrt(var / K + norm_eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & (kk[None, :] < k_end), other=0.0)
        # The incoming gradient scaled as eager's DivBackward leaves it: rounded to its dtype.
        if DROP == 2:
            a = (a.to(ACC) * f_rows[:, None]).to(A.dtype.element_ty)
        if DROP == 3:
            f_k = _drop_factor(DROP_R, kk, kk < k_end, ROWS_PER_SAMPLE, keep_hi, keep_lo, ACC)
            a = (a.to(ACC) * f_k[None, :]).to(A.dtype.element_ty)
        if A_ACT != 0:  # fc2 on z: the activation fc1 did not store (act(0) == 0: tails)
            a = _act(a.to(ACC), A_ACT).to(A.dtype.element_ty)
        if NORM_A:  # rounded as the norm's output is stored (B's masked tail is zero)
            k_ok = kk < k_end
            a = ((a.to(ACC) - mean[:, None]) * rstd[:, None]
                 * tl.load(NORM_W + kk, mask=k_ok, other=0.0).to(ACC)[None, :]
                 + tl.load(NORM_B + kk, mask=k_ok, other=0.0).to(ACC)[None, :]
                 ).to(A.dtype.element_ty)
        if ROW_SUMS:  # the bias gradient: a few adds per loaded element, float32
            row_sums += tl.sum(a.to(ACC), axis=1)
        b = tl.load(B + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < k_end) & mask_n[None, :], other=0.0)
        if B_ACT != 0:
            # act(0) == 0 for both activations: the masked tail stays zero.
            b = _act(b.to(ACC), B_ACT).to(A.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    if ROW_SUMS:
        if pid_n == 0:  # every N tile loads the same A: the first stores the sums
            tl.store(ROWSUM + tl.program_id(2) * stride_rss + rm,
                     row_sums.to(ROWSUM.dtype.element_ty), mask=mask_m)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(ACC)[None, :]
    if ACT != 0:
        acc = _act(acc, ACT)
    if ACT_GRAD != 0:
        z = tl.load(Z_IN + rm[:, None] * stride_zim + rn[None, :] * stride_zin, mask=mask,
                    other=0.0).to(ACC)
        acc = acc * _act_grad(z, ACT_GRAD)
    if DROP == 1:
        # Rounded where eager rounds: the layer's output, then x.div(keep) * floor(...).
        f_out = _drop_factor(DROP_R, rm, mask_m, ROWS_PER_SAMPLE, keep_hi, keep_lo, ACC)
        y = acc.to(C.dtype.element_ty).to(ACC)
        acc = (y * f_out[:, None]).to(C.dtype.element_ty).to(ACC)
    if HAS_RES:
        acc += tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask,
                       other=0.0).to(ACC)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_partials_kernel(
    # Pointers: the partials (SPLITS, E3), rows of stride_ps; up to four flat outputs that
    # take columns [0, E0), [E0, E1), [E1, E2), [E2, E3) (an absent one: an empty range)
    P, O0, O1, O2, O3,
    # Sizes
    SPLITS, stride_ps, E0, E1, E2, E3,
    # Meta-parameters
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < E3
    acc = tl.zeros((BLOCK,), dtype=ACC)
    p = P + i
    for _ in range(0, SPLITS):  # a fixed order: the same bits every run
        acc += tl.load(p, mask=ok, other=0.0).to(ACC)
        p += stride_ps
    tl.store(O0 + i, acc.to(O0.dtype.element_ty), mask=i < E0)
    tl.store(O1 + (i - E0), acc.to(O1.dtype.element_ty), mask=(i >= E0) & (i < E1))
    tl.store(O2 + (i - E1), acc.to(O2.dtype.element_ty), mask=(i >= E1) & (i < E2))
    tl.store(O3 + (i - E2), acc.to(O3.dtype.element_ty), mask=(i >= E2) & ok)


class Drop(NamedTuple):
    """Drop path for one call: ``rand`` the per-sample uniform draws (``B`` elements, in the
    dtype ``DropPath`` draws them: its input's), ``keep`` = 1 - drop probability; the rows
    of a ``(B * T, C)`` operand belong to sample ``row // T``."""
    rand: Tensor
    keep: float


def _drop_args(drop: Optional[Drop], rows: int) -> Tuple[Optional[Tensor], int, float, float]:
    """``(rand, rows per sample, keep hi, keep lo)`` for the kernel."""
    if drop is None:
        return None, 1, 1.0, 0.0
    rand = drop.rand.reshape(-1)
    if rand.numel() == 0 or rows % rand.numel():
        raise ValueError(f"drop.rand: expected one draw per sample of {rows} rows, got "
                         f"{rand.numel()}")
    hi = struct.unpack("f", struct.pack("f", drop.keep))[0]  # keep rounded to float32
    return rand, rows // rand.numel(), hi, drop.keep - hi


def _blocks(a: Tensor, drop_prologue: bool = False) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); ``drop_prologue``: the backward
    GEMMs that scale A by the drop factor as they load it."""
    return _gemm_blocks(a.dtype, target_of(a), tf32_allowed(), drop_prologue)


@functools.lru_cache(maxsize=64)  # nine GEMMs a block's training call: one lookup each
def _gemm_blocks(dtype: torch.dtype, target: Optional[Target], tf32: bool,
                 drop_prologue: bool) -> Tuple[int, int, int, int, int]:
    if target is None:  # the interpreter: small tiles keep tiny tests fast
        return 16, 16, 16, 1, 1
    if dtype == torch.float32:
        if not tf32:  # IEEE dots (dot_precision)
            # FMA dots hold both operand tiles in registers: 64x64x32 spilled 8-384 B as
            # launched (the transposed backward GEMMs; launch_check, Triton 3.9), and
            # 64x64x16 8-16 B with the drop factor's scale of A (sm_90).
            return (32, 64, 16, 4, 2) if drop_prologue else (64, 64, 16, 4, 2)
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


@functools.lru_cache(maxsize=256)
def _gemm_constants(dtype: torch.dtype, target: Optional[Target], tf32: bool,
                    switches: tuple) -> Tuple[int, int, Mapping[str, object]]:
    """``(BLOCK_M, BLOCK_N, compile-time arguments)`` of one :func:`_gemm_kernel` launch:
    a pure function of the operands' dtype, the target, PyTorch's TF32 flag (the float32
    tiles and dot precision depend on it) and the kernel's switches ``(HAS_BIAS, act,
    HAS_RES, act_grad, a_act, b_act, SPLIT_K, ROW_SUMS, drop code, NORM_A)``; built once
    instead of ~20 keyword arguments a launch, eleven a block's training call. A dict never
    changed once built (``**`` copies it into each launch; a read-only MappingProxyType
    unpacked 2.4 us slower: benchmarks.size_arguments)."""
    (has_bias, act, has_res, act_grad, a_act, b_act, split_k, row_sums, drop,
     norm_a) = switches
    block_m, block_n, block_k, warps, stages = _gemm_blocks(
        dtype, target, tf32, drop in (DROP_CODES["rows"], DROP_CODES["k"]))
    return block_m, block_n, dict(
        HAS_BIAS=has_bias, ACT=ACT_CODES[act], HAS_RES=has_res, ACT_GRAD=ACT_CODES[act_grad],
        A_ACT=ACT_CODES[a_act], B_ACT=ACT_CODES[b_act], SPLIT_K=split_k, ROW_SUMS=row_sums,
        DROP=drop, NORM_A=norm_a, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ACC=acc_dtype(dtype), PRECISION=precision_for(dtype, tf32), num_warps=warps,
        num_stages=stages)


_NO_STRIDES = (0, 0)


def _launch(a: Tensor, b: Tensor, c: Tensor, m: int, n: int, k: int, strides: tuple, *,
            bias: Optional[Tensor] = None, act: Optional[str] = None,
            residual: Optional[Tensor] = None, residual_strides: tuple = _NO_STRIDES,
            act_grad: Optional[str] = None, z_in: Optional[Tensor] = None,
            a_act: Optional[str] = None, b_act: Optional[str] = None,
            row_sums: Optional[Tensor] = None, drop: Optional[Drop] = None,
            drop_mode: Optional[str] = None, splits: int = 1,
            k_per_split: Optional[int] = None,
            norm: Optional[Tuple[Tensor, Tensor, float]] = None) -> None:
    """One launch of :func:`_gemm_kernel`: ``C (splits, M, N) = A (M, K) @ B (K, N)``
    with ``strides`` ``(a_m, a_k, b_k, b_n, c_split, c_m, c_n)`` (operands read through
    strides, so a transposed weight or the rows of a 3-D activation need no view), and
    ``row_sums`` ``(splits, M)`` (or ``(M,)``: one split); ``norm``: the LayerNorm
    prologue's ``(weight, bias, eps)`` over ``a``'s rows. Every tensor already checked and
    allocated; ``K > 0``."""
    drop_code = DROP_CODES[drop_mode] if drop is not None else 0
    block_m, block_n, constants = _gemm_constants(
        a.dtype, target_of(a), tf32_allowed(),
        (bias is not None, act, residual is not None, act_grad, a_act, b_act, splits > 1,
         row_sums is not None, drop_code, norm is not None))
    rand, rows_per_sample, keep_hi, keep_lo = _drop_args(drop, k if drop_mode == "k" else m)
    norm_w, norm_b, norm_eps = norm if norm is not None else (None, None, 0.0)
    _gemm_kernel[(cdiv(m, block_m), cdiv(n, block_n), splits)](
        a, b, c, bias, residual, z_in, row_sums, rand, norm_w, norm_b,
        m, n, k, k_per_split or k, *strides, *residual_strides,
        *(z_in.stride() if z_in is not None else _NO_STRIDES),
        # (a 1-D row_sums: one split's, its split stride M as for a (1, M) view of it)
        0 if row_sums is None else row_sums.stride(0) if row_sums.ndim == 2 else m,
        rows_per_sample, keep_hi, keep_lo, float(norm_eps), **constants)


def _matrix(t: Tensor) -> Tuple[Tensor, int, int, int]:
    """``(t, rows, row stride, column stride)``: ``t`` read as the matrix of its last
    axis' rows, without a view where its leading axes collapse into uniformly strided rows
    (2-D, or a 3-D activation; a reshape costs ~3 us, benchmarks.size_arguments), else a
    reshaped (copied where it must be) ``t``."""
    shape, strides = t.shape, t.stride()
    if len(shape) == 2:
        return t, shape[0], strides[0], strides[1]
    if len(shape) == 3 and (strides[0] == shape[1] * strides[1] or shape[0] == 1):
        return t, shape[0] * shape[1], strides[1], strides[2]
    t = t.reshape(-1, shape[-1])
    strides = t.stride()
    return t, t.shape[0], strides[0], strides[1]


def _linear(x: Tensor, weight: Tensor, transposed: bool, out_dtype: Optional[torch.dtype] = None,
            **epilogue) -> Tensor:
    """``x @ weight.t()`` (``transposed``: a Linear's ``(N, K)`` weight) or ``x @ weight``
    over ``x``'s last axis, shaped ``(*x.shape[:-1], N)``, with :func:`gemm`'s epilogue and
    prologue keywords (``residual`` shaped like the output), with no view made of ``x``,
    the weight, the residual or the output (sizes as separate ints: benchmarks.
    size_arguments). :func:`gemm` checks its arguments and calls this; this module's own
    callers call it directly, their arguments checked by the op layer."""
    k = x.shape[-1]
    if k == 0:  # an empty sum (never at CvT sizes): gemm's zeros, through views
        rows = x.reshape(-1, 0)
        residual = epilogue.pop("residual", None)
        out = gemm(rows, weight.t() if transposed else weight, out_dtype=out_dtype,
                   residual=None if residual is None else residual.reshape(rows.shape[0], -1),
                   **epilogue)
        return out.view(*x.shape[:-1], out.shape[-1])
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (the input's), got {weight.dtype}")
    lead = x.shape[:-1] if x.ndim != 2 else None  # (before _matrix may reshape x)
    x, m, sam, sak = _matrix(x)
    wn, wk = weight.stride()
    n, kw = weight.shape if transposed else weight.shape[::-1]
    if kw != k:
        raise ValueError(f"weight: expected {k} input features, got shape "
                         f"{tuple(weight.shape)}")
    residual = epilogue.get("residual")
    if residual is not None:
        residual, rows, srm, srn = _matrix(residual)
        if rows != m or residual.shape[-1] != n:
            raise ValueError(f"residual: expected {m} rows of {n}, got shape "
                             f"{tuple(residual.shape)}")
        epilogue["residual"], epilogue["residual_strides"] = residual, (srm, srn)
    c = (torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype) if lead is None
         else torch.empty(*lead, n, device=x.device, dtype=out_dtype or x.dtype))
    if m == 0 or n == 0:
        return c
    b_strides = (wk, wn) if transposed else (wn, wk)
    _launch(x, weight, c, m, n, k, (sam, sak, *b_strides, m * n, n, 1), **epilogue)
    return c


def gemm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, act: Optional[str] = None,
         residual: Optional[Tensor] = None, act_grad: Optional[str] = None,
         z_in: Optional[Tensor] = None, a_act: Optional[str] = None,
         b_act: Optional[str] = None, out_dtype: Optional[torch.dtype] = None,
         split_k: bool = False, drop: Optional[Drop] = None,
         drop_mode: Optional[str] = None,
         norm: Optional[Tuple[Tensor, Tensor, float]] = None) -> Tensor:
    """``C = epilogue(prologue(a) @ prologue(b))`` for 2-D ``a (M, K)`` and ``b (K, N)`` of
    one dtype, any strides (pass ``w.t()`` for ``x W^T``). Epilogue, in this order:
    ``+ bias (N,)``; ``act``; ``* act'(z_in (M, N))`` for ``act_grad``; drop path
    (``drop``, ``drop_mode "epilogue"``); ``+ residual (M, N)``. Prologue: ``a_act`` /
    ``b_act`` apply an activation to ``a`` / ``b`` as they are loaded; ``drop`` with
    ``drop_mode`` ``"rows"`` scales ``a``'s rows by the drop factor of their sample;
    ``norm`` ``(weight (K,), bias (K,), eps)`` layer-normalizes ``a``'s rows as loaded.
    Accumulates in float32 (float64 for float64). ``split_k`` (no epilogue): the weight
    gradients' split-K, as :func:`weight_gradients`. Returns ``C`` in ``out_dtype``
    (default ``a``'s)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a, b: expected (M, K) and (K, N), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (a's), got {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n)),
                           ("z_in", z_in, (m, n))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if (act_grad is None) != (z_in is None):
        raise ValueError("z_in: needed exactly when act_grad is given")
    if (drop is None) != (drop_mode is None) or drop_mode not in (None, "epilogue", "rows"):
        raise ValueError(f"drop_mode: expected 'epilogue' or 'rows' exactly when drop is "
                         f"given, got {drop_mode!r}")
    if split_k:
        if (bias is not None or act or residual is not None or act_grad or a_act
                or drop is not None or norm is not None):
            raise ValueError("split_k: the partial sums take no epilogue")
        (c, _), = weight_gradients([GradJob(a, b, b_act=b_act, out_dtype=out_dtype)])
        return c
    if k == 0:  # an empty sum: the epilogue of zeros
        a = torch.zeros((m, 1), device=a.device, dtype=a.dtype)
        b = torch.zeros((1, n), device=b.device, dtype=b.dtype)
    return _linear(a, b, False, out_dtype, bias=bias, act=act, residual=residual,
                   act_grad=act_grad, z_in=z_in, a_act=a_act, b_act=b_act, drop=drop,
                   drop_mode=drop_mode, norm=norm)


class GradJob(NamedTuple):
    """One weight gradient ``dW = prologue(a) @ prologue(b)`` (``a`` ``(M, K)``: the
    incoming gradient transposed, ``b`` ``(K, N)``: the layer's input) and, with ``bias``,
    ``db = sum_k a[:, k]``; ``b_act`` and ``drop`` (scale of ``a``'s K run) as in
    :func:`gemm`; gradients in ``out_dtype`` (default ``a``'s)."""
    a: Tensor
    b: Tensor
    bias: bool = False
    b_act: Optional[str] = None
    drop: Optional[Drop] = None
    out_dtype: Optional[torch.dtype] = None


def weight_gradients(jobs: Sequence[GradJob]) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """``[(dW, db or None)]`` for one or two :class:`GradJob` sharing ``K`` (a backward's
    weight gradients): one split-K launch per job into one float32 workspace (float64 for
    float64), the bias gradients summed by the same programs, then one
    :func:`sum_partials` launch for all of them. Where ``K`` needs one split, each job
    writes its gradients directly (one launch per job, nothing else)."""
    if not 1 <= len(jobs) <= 2:
        raise ValueError(f"jobs: expected one or two, got {len(jobs)}")
    k = jobs[0].a.shape[1]
    for job in jobs:
        if job.a.ndim != 2 or job.b.ndim != 2 or job.a.shape[1] != k or job.b.shape[0] != k:
            raise ValueError(f"jobs: expected a (M, {k}) and b ({k}, N), got "
                             f"{tuple(job.a.shape)} and {tuple(job.b.shape)}")
        if job.a.dtype != job.b.dtype:
            raise TypeError(f"jobs: b's dtype {job.b.dtype} is not a's {job.a.dtype}")
    first = jobs[0].a
    device = first.device
    outs = []
    for job in jobs:
        m, n = job.a.shape[0], job.b.shape[1]
        dtype = job.out_dtype or job.a.dtype
        outs.append((torch.empty(m, n, device=device, dtype=dtype),
                     torch.empty(m, device=device, dtype=dtype) if job.bias else None))
    if k == 0 or any(o[0].numel() == 0 for o in outs):
        # Degenerate shapes: an empty sum is zero (a launch of its own, never at CvT sizes).
        return [(w.zero_(), None if bias is None else bias.zero_()) for w, bias in outs]
    block_m, block_n, block_k, _, _ = _blocks(first, any(j.drop is not None for j in jobs))
    splits, k_per_split = split_k_plan(first.shape[0], jobs[0].b.shape[1], k, block_m,
                                       block_n, block_k, first)
    if splits == 1:
        for job, (w, bias) in zip(jobs, outs):
            m, n = w.shape
            _launch(job.a, job.b, w, m, n, k, (*job.a.stride(), *job.b.stride(), m * n, n, 1),
                    b_act=job.b_act, drop=job.drop,
                    drop_mode="k" if job.drop is not None else None, row_sums=bias)
        return outs
    sizes = [w.numel() + (0 if bias is None else bias.numel()) for w, bias in outs]
    work = torch.empty(splits, sum(sizes), device=device, dtype=stat_dtype(first.dtype))
    start = 0
    for job, (w, bias), size in zip(jobs, outs, sizes):
        m, n = w.shape
        c = work[:, start:start + m * n].view(splits, m, n)
        sums = work[:, start + m * n:start + size] if bias is not None else None
        _launch(job.a, job.b, c, m, n, k, (*job.a.stride(), *job.b.stride(), *c.stride()),
                b_act=job.b_act, drop=job.drop,
                drop_mode="k" if job.drop is not None else None, row_sums=sums,
                splits=splits, k_per_split=k_per_split)
        start += size
    sum_partials(work, [t.view(-1) for pair in outs for t in pair if t is not None])
    return outs


def sum_partials(partials: Tensor, outs: Sequence[Tensor]) -> None:
    """``outs`` (one to four contiguous 1-D tensors, any float dtypes) = the column sums of
    ``partials`` ``(S, sum of their sizes)`` (rows of a contiguous last axis), in ``outs``'
    order, summed over the ``S`` rows in a fixed order in float32 (float64 for float64) and
    rounded once into each output's dtype: one launch."""
    if not 1 <= len(outs) <= 4:
        raise ValueError(f"outs: expected one to four tensors, got {len(outs)}")
    ends, end = [], 0
    for i, t in enumerate(outs):
        if t.ndim != 1 or not t.is_contiguous():
            raise ValueError(f"outs[{i}]: expected a contiguous 1-D tensor, got shape "
                             f"{tuple(t.shape)}")
        end += t.numel()
        ends.append(end)
    if partials.ndim != 2 or partials.shape[1] != end or partials.stride(1) != 1:
        raise ValueError(f"partials: expected (S, {end}) with a contiguous last axis, got "
                         f"shape {tuple(partials.shape)}")
    if end == 0:
        return
    outs = list(outs) + [outs[0]] * (4 - len(outs))  # absent outputs: empty column ranges
    ends += [end] * (4 - len(ends))
    target = target_of(partials)
    if target is None:
        block = PARTIALS_BLOCK[0]
    else:
        want = cdiv(end, PARTIALS_PROGRAMS_PER_SM * target.sm_count)
        block = min(max(next_power_of_2(want), PARTIALS_BLOCK[0]), PARTIALS_BLOCK[1])
    _gemm_partials_kernel[(cdiv(end, block),)](
        partials, *outs, partials.shape[0], partials.stride(0), *ends,
        BLOCK=block, ACC=acc_dtype(partials.dtype), num_warps=4)


def split_k_plan(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
                 a: Tensor) -> Tuple[int, int]:
    """``(splits, K per split)``: enough programs for about two per SM, each over at least
    ``SPLIT_MIN_K_BLOCKS`` blocks of ``K`` (a multiple of ``block_k``); under the
    interpreter, two splits where ``K`` has two blocks (the tests' tiny shapes)."""
    k_blocks = cdiv(k, block_k)
    target = target_of(a)
    if target is None:
        splits = min(2, k_blocks)
    else:
        tiles = cdiv(m, block_m) * cdiv(n, block_n)
        splits = max(1, min(cdiv(SPLIT_PROGRAMS_PER_SM * target.sm_count, tiles),
                            k_blocks // SPLIT_MIN_K_BLOCKS))
    k_per_split = cdiv(k_blocks, splits) * block_k
    return cdiv(k, k_per_split), k_per_split


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def mlp_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor],
                drop: Optional[Drop] = None, store_z: bool = True) -> Tuple[Tensor, Tensor]:
    """``(out, z)`` as :func:`..reference_math.mlp_forward`: two GEMMs, one
    ``(M, hidden)`` tensor between them. With ``store_z`` (a backward will read it) that is
    the pre-activation ``z``, which fc2 activates as it loads it; else the activation
    (``z`` is then empty)."""
    hidden = _linear(x, fc1_weight, True, bias=fc1_bias, act=None if store_z else act)
    out = _linear(hidden, fc2_weight, True, bias=fc2_bias, residual=residual,
                  a_act=act if store_z else None, drop=drop,
                  drop_mode="epilogue" if drop is not None else None)
    # z as the backward reads it: its rows (a view of a contiguous tensor, no copy)
    return out, (hidden.view(-1, hidden.shape[-1]) if store_z else x.new_empty(0))


def norm_mlp_forward(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                     fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                     fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor]
                     ) -> Tensor:
    """Eval: ``residual + fc2(act(fc1(layer_norm(x))))`` in the MLP's two launches, the
    norm in fc1's prologue (nothing stored for a backward: no ``z``, no statistics)."""
    if x.shape[-1] == 0:  # an empty row: the norm's output is its bias (never at CvT sizes)
        from .layer_norm import layer_norm_forward  # layer_norm.py imports this module

        normed = layer_norm_forward(x, None, norm_weight, norm_bias, eps)[0]
        return mlp_forward(normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual,
                           store_z=False)[0]
    a = _linear(x, fc1_weight, True, bias=fc1_bias, act=act,
                norm=(norm_weight, norm_bias, float(eps)))
    return _linear(a, fc2_weight, True, bias=fc2_bias, residual=residual)


def mlp_backward(grad_out: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                 z: Tensor, act: str, has_bias1: bool, has_bias2: bool,
                 drop: Optional[Drop] = None) -> Tuple[Optional[Tensor], ...]:
    """``(dx, dW1, db1, dW2, db2)`` as :func:`..reference_math.mlp_backward`: five
    launches (``dz``; ``dW2, db2`` and ``dW1, db1`` split over K; their partials summed;
    ``dx``). With ``drop`` the incoming gradient is scaled by the drop factor on its way
    into ``dz``, ``dW2`` and ``db2`` (the residual's gradient is the op layer's)."""
    g = _rows(grad_out)
    x2 = _rows(x)
    mode = "rows" if drop is not None else None
    dz = _linear(g, fc2_weight, False, act_grad=act, z_in=z, drop=drop, drop_mode=mode)
    (dw2, db2), (dw1, db1) = weight_gradients([
        GradJob(g.t(), z, bias=has_bias2, b_act=act, drop=drop,     # g^T act(z), g^T 1
                out_dtype=fc2_weight.dtype),
        GradJob(dz.t(), x2, bias=has_bias1, out_dtype=fc1_weight.dtype)])  # dz^T x, dz^T 1
    dx = _linear(dz, fc1_weight, False)                               # dz W1
    return dx.view(*x.shape), dw1, db1, dw2, db2  # (a torch.Size argument parses slower)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   residual: Optional[Tensor], drop: Optional[Drop] = None) -> Tensor:
    """``residual + drop_path(x W^T + b)`` as :func:`..reference_math.linear_forward`:
    one GEMM."""
    return _linear(x, weight, True, bias=bias, residual=residual, drop=drop,
                   drop_mode="epilogue" if drop is not None else None)


def linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
                    drop: Optional[Drop] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(dx, dW, db)`` as :func:`..reference_math.linear_backward`: ``dx`` one
    GEMM, ``dW`` and ``db`` split over K and summed (two launches, one where K needs no
    split)."""
    dx = _linear(grad_out, weight, False, drop=drop,
                 drop_mode="rows" if drop is not None else None)
    (dw, db), = weight_gradients([GradJob(_rows(grad_out).t(), _rows(x), bias=has_bias,
                                          drop=drop, out_dtype=weight.dtype)])
    return dx, dw, db
