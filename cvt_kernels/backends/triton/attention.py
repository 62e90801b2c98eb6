"""Reduced-token flash attention for CvT: ``softmax(q k^T * scale) v`` per head, Nq != Nk.

FlashAttention-2 in Triton, reading and writing CvT's token-major layout directly:
``q`` is ``(B, Nq, H*D)``, ``k``/``v`` are ``(B, Nk, H*D)``, head ``h`` is the column slice
``[h*D, (h+1)*D)``; no head transpose ever goes to memory. No mask (CvT has none) beyond the
ragged tails of Nq, Nk and D; the scale is explicit (CvT passes ``dim_out ** -0.5``).

Forward: one program per (batch*head, BLOCK_M query rows) streams over the keys with an
online softmax (running max and sum in float32, float64 for float64 inputs) and writes the
output and the natural-log log-sum-exp of each score row, the only state the backward needs.

Backward: two kernels, each owning its output so no atomics are needed and results are
deterministic: ``dq`` per BLOCK_M queries (looping over all keys), which also writes
``delta = rowsum(dO * O)`` for its rows, then ``dk, dv`` per BLOCK_N keys (looping over all
queries, reading delta). Probabilities are recomputed from the saved log-sum-exp.

Saved for backward (by the ops layer): q, k, v, out, lse: ``B*H*Nq`` floats beyond the
inputs, never the ``Nq x Nk`` probability matrix.
"""

from __future__ import annotations

import inspect
import os
import threading
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv
from ._runtime import acc_dtype as _acc_dtype
from .configs import (ATTENTION_CANDIDATES, ATTENTION_SPILLS, DKDV_CANDIDATES, DQ_CANDIDATES,
                      FORWARD_CANDIDATES, MAX_HEAD_DIM)
from ._runtime import dot_precision as _input_precision
from ._runtime import target_of

LOG2E = 1.4426950408889634  # the kernels spell out log2(e) and ln(2) as literals

# The kernels spell out their token-major pointer arithmetic instead of sharing a helper on
# purpose: as launched (`python -m benchmarks.launch_check`, Triton 3.9 and 3.6) the
# tightest tiles sit at 250-255 registers (bf16 dk/dv 32x128: 253; most float32 head_dim-128
# tiles), and an earlier AOT check saw the same sums associated differently (a
# `_tile(_head(...))` helper) spill 8-16 bytes on six configs (not re-measured as launched).
# After any edit, regenerate the spill tables below from the launch-faithful check under
# both versions.


@triton.jit
def _load_rows(ptrs, mask_rows, mask_d, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A ``(rows, BLOCK_D)`` tile: masked on rows only for a ragged tile (``MASK_ROWS``), on
    the head dim only when it is narrower than ``BLOCK_D`` (not ``EVEN_D``); a full tile of
    an even head dim is a plain load."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _attend_tile(q, k_base, v_base, stride_kn, stride_vn, start_n, n_k, offs_n, offs_d,
                 mask_d, acc, m_i, l_i, qk_scale_log2,
                 MASK_N: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """One key tile of the online softmax. ``m_i`` is the running max of the scaled scores
    ``s * qk_scale_log2`` (log2 domain: exp2 is the native instruction)."""
    cols = start_n + offs_n
    mask_n = cols < n_k
    k = _load_rows(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                   mask_n, mask_d, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if MASK_N:
        # The ragged last tile: scale before masking, so masked scores are exactly -inf
        # (a zero scale times -inf would be NaN).
        s = tl.where(mask_n[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
    else:
        # max(s * c) = max(s) * c for c >= 0 (the launchers fold a negative scale's sign
        # into q), and s * c - m is one FMA per score.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale_log2)
        p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                   mask_n, mask_d, MASK_N, EVEN_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION,
                                        out_dtype=ACC_DTYPE)
    return acc, m_new, l_i


@triton.jit
def _attend(q, k_base, v_base, stride_kn, stride_vn, n_k, offs_d, mask_d, qk_scale_log2,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The online-softmax loop over all key tiles for one query tile ``q``: returns the
    unnormalized output, the running max (log2 domain) and the running sum. Full key tiles
    run without masks; only the ragged last one (if any) is masked, after the loop, so
    CvT-13 stage 1 (784 keys = 12 x 64 + 16) masks one tile in 13 and stage 3 (50 keys)
    runs the masked tile alone. Needs ``qk_scale_log2 >= 0``."""
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    n_full = n_k - n_k % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, k_base, v_base, stride_kn, stride_vn, start_n, n_k,
                                     offs_n, offs_d, mask_d, acc, m_i, l_i, qk_scale_log2,
                                     False, EVEN_D, ACC_DTYPE, INPUT_PRECISION)
    if n_full < n_k:
        acc, m_i, l_i = _attend_tile(q, k_base, v_base, stride_kn, stride_vn, n_full, n_k,
                                     offs_n, offs_d, mask_d, acc, m_i, l_i, qk_scale_log2,
                                     True, EVEN_D, ACC_DTYPE, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    # Pointers: q (B, n_q, H*D), k and v (B, n_k, H*D), out like q, lse (B, H, n_q)
    Q, K, V, Out, Lse,
    # Strides (batch, token); channels are dense
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    # Sizes and the scale (scale * log2(e), >= 0)
    num_heads, n_q, n_k, head_dim, qk_scale_log2,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Batch*head on grid axis 0 (2^31 limit), query blocks on axis 1 (65535 limit).
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < head_dim

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + offs_m[:, None].to(tl.int64) * stride_qn
              + h * head_dim + offs_d[None, :])
    q = _load_rows(q_ptrs, mask_m, mask_d, True, EVEN_D)
    k_base = K + b.to(tl.int64) * stride_kb + h * head_dim
    v_base = V + b.to(tl.int64) * stride_vb + h * head_dim
    acc, m_i, l_i = _attend(q, k_base, v_base, stride_kn, stride_vn, n_k, offs_d, mask_d,
                            qk_scale_log2, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, ACC_DTYPE,
                            INPUT_PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + offs_m[:, None].to(tl.int64) * stride_on
              + h * head_dim + offs_d[None, :])
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # Natural-log lse: (m + log2 l) * ln 2.
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + pid_bh.to(tl.int64) * n_q + offs_m, lse.to(Lse.dtype.element_ty), mask=mask_m)


@triton.jit
def _dkdv_tile(k, v, dk, dv, q_base, do_base, Lse, Delta, row_base, stride_qn, stride_don,
               start_m, n_q, offs_m, offs_d, mask_d, qk_scale_log2,
               MASK_M: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One query tile's contribution to ``dk``, ``dv`` of a key tile. No score mask at all:
    queries past ``n_q`` (the ragged tile, ``MASK_M``) load q, dO, lse and delta as 0, so
    their p is 1 and they add exactly 0 (dO = 0 and dp - delta = 0); key rows past ``n_k``
    only touch their own rows of dk and dv, which are never stored."""
    rows = start_m + offs_m
    mask_m = rows < n_q
    q = _load_rows(q_base + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                   mask_m, mask_d, MASK_M, EVEN_D)
    do = _load_rows(do_base + rows[:, None].to(tl.int64) * stride_don + offs_d[None, :],
                    mask_m, mask_d, MASK_M, EVEN_D)
    if MASK_M:
        lse = tl.load(Lse + row_base + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
        delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
    else:
        lse = tl.load(Lse + row_base + rows).to(ACC_DTYPE)
        delta = tl.load(Delta + row_base + rows).to(ACC_DTYPE)
    # Scores transposed, (keys, queries): dk and dv then need no transposes of p.
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    p_t = tl.exp2(s_t * qk_scale_log2 - lse[None, :] * 1.4426950408889634)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    # Pointers: q, dO (B, n_q, H*D), k, v (B, n_k, H*D), lse and delta (B, H, n_q),
    # dk, dv like k
    Q, K, V, DO, Lse, Delta, DK, DV,
    # Strides (batch, token); channels are dense
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
    # Sizes and the scale (and scale * log2(e))
    num_heads, n_q, n_k, head_dim, scale, qk_scale_log2,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dk, dv for BLOCK_N keys of one head, looping over all queries: full query tiles
    unmasked, the ragged last one (if any) with masked loads."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_k
    mask_d = offs_d < head_dim

    k = _load_rows(K + b.to(tl.int64) * stride_kb + offs_n[:, None].to(tl.int64) * stride_kn
                   + h * head_dim + offs_d[None, :], mask_n, mask_d, True, EVEN_D)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + offs_n[:, None].to(tl.int64) * stride_vn
                   + h * head_dim + offs_d[None, :], mask_n, mask_d, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)

    q_base = Q + b.to(tl.int64) * stride_qb + h * head_dim
    do_base = DO + b.to(tl.int64) * stride_dob + h * head_dim
    row_base = pid_bh.to(tl.int64) * n_q
    m_full = n_q - n_q % BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, Lse, Delta, row_base, stride_qn,
                            stride_don, start_m, n_q, offs_m, offs_d, mask_d, qk_scale_log2,
                            False, EVEN_D, ACC_DTYPE, INPUT_PRECISION)
    if m_full < n_q:
        dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, Lse, Delta, row_base, stride_qn,
                            stride_don, m_full, n_q, offs_m, offs_d, mask_d, qk_scale_log2,
                            True, EVEN_D, ACC_DTYPE, INPUT_PRECISION)

    if EVEN_D:
        kv_mask = mask_n[:, None]
    else:
        kv_mask = mask_n[:, None] & mask_d[None, :]
    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + offs_n[:, None].to(tl.int64) * stride_dkn
             + h * head_dim + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + offs_n[:, None].to(tl.int64) * stride_dvn
             + h * head_dim + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(q, do, dq, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, start_n, n_k,
             offs_n, offs_d, mask_d, qk_scale_log2,
             MASK_N: tl.constexpr, EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """One key tile's contribution to ``dq``. Query rows past ``n_q`` load q, dO, lse as 0
    (delta is then 0) and add exactly 0 to their own, never stored, rows."""
    cols = start_n + offs_n
    mask_n = cols < n_k
    k = _load_rows(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                   mask_n, mask_d, MASK_N, EVEN_D)
    v = _load_rows(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                   mask_n, mask_d, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    p = tl.exp2(s * qk_scale_log2 - lse_log2[:, None])
    if MASK_N:
        # Keys past n_k load as 0, but their p = exp2(-lse) need not be small (it can be
        # inf): zero it, so no inf * 0 reaches dq.
        p = tl.where(mask_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    # Pointers: q, dO, out (B, n_q, H*D), k, v (B, n_k, H*D), lse and delta (B, H, n_q),
    # dq like q
    Q, K, V, DO, O, Lse, Delta, DQ,
    # Strides (batch, token); channels are dense
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_ob, stride_on, stride_dqb, stride_dqn,
    # Sizes and the scale (and scale * log2(e))
    num_heads, n_q, n_k, head_dim, scale, qk_scale_log2,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dq for BLOCK_M queries of one head; also writes their ``delta = rowsum(dO * O)``,
    which the dk/dv kernel (launched after this one) reads. Full key tiles run unmasked, the
    ragged last one (if any) masked."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < head_dim

    q = _load_rows(Q + b.to(tl.int64) * stride_qb + offs_m[:, None].to(tl.int64) * stride_qn
                   + h * head_dim + offs_d[None, :], mask_m, mask_d, True, EVEN_D)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + offs_m[:, None].to(tl.int64) * stride_don
                    + h * head_dim + offs_d[None, :], mask_m, mask_d, True, EVEN_D)
    o = _load_rows(O + b.to(tl.int64) * stride_ob + offs_m[:, None].to(tl.int64) * stride_on
                   + h * head_dim + offs_d[None, :], mask_m, mask_d, True, EVEN_D)
    row_base = pid_bh.to(tl.int64) * n_q
    lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)
    lse_log2 = lse * 1.4426950408889634
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), axis=1)
    tl.store(Delta + row_base + offs_m, delta.to(Delta.dtype.element_ty), mask=mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    k_base = K + b.to(tl.int64) * stride_kb + h * head_dim
    v_base = V + b.to(tl.int64) * stride_vb + h * head_dim
    n_full = n_k - n_k % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_tile(q, do, dq, lse_log2, delta, k_base, v_base, stride_kn, stride_vn,
                      start_n, n_k, offs_n, offs_d, mask_d, qk_scale_log2,
                      False, EVEN_D, ACC_DTYPE, INPUT_PRECISION)
    if n_full < n_k:
        dq = _dq_tile(q, do, dq, lse_log2, delta, k_base, v_base, stride_kn, stride_vn,
                      n_full, n_k, offs_n, offs_d, mask_d, qk_scale_log2,
                      True, EVEN_D, ACC_DTYPE, INPUT_PRECISION)

    dq = dq * scale
    if EVEN_D:
        q_mask = mask_m[:, None]
    else:
        q_mask = mask_m[:, None] & mask_d[None, :]
    tl.store(DQ + b.to(tl.int64) * stride_dqb + offs_m[:, None].to(tl.int64) * stride_dqn
             + h * head_dim + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------- launchers
def _block_d(head_dim: int) -> int:
    # (Not triton.next_power_of_2: a constexpr function since Triton 3.9, slow from host code.)
    return max(16, 1 << max(0, head_dim - 1).bit_length())


# Launch configurations: the candidates and the spill tables live in ``configs.py``.
_CANDIDATES = ATTENTION_CANDIDATES
_SPILLS = ATTENTION_SPILLS  # the same dict: launch_check --attention-spills empties it


def uses_wgmma(kernel: str, config) -> bool:
    """Whether Triton lowers the half-precision dots of ``kernel`` at ``config`` to Hopper's
    wgmma: only when the dots' row block (keys in dk/dv, queries elsewhere) is at least 64;
    below that it emits Ampere's mma.sync (so on every candidate's PTX as launched, Triton
    3.9 and 3.6; the launch-faithful check fails a half config without wgmma on sm_90)."""
    rows = config[1] if kernel == "dkdv" else config[0]
    return rows >= 64


def shipped_configs(kernel: str, dtype: torch.dtype, head_dim: int, arch: int = 90) -> list:
    """The candidates of ``kernel`` ("fwd", "dkdv" or "dq") that ``arch`` runs: those that do
    not spill there and, for fp16/bf16 on Hopper, those that use wgmma (mma.sync would leave
    half of Hopper's tensor-core throughput unused)."""
    narrow, wide = _CANDIDATES[kernel]
    key = (dtype.itemsize, _block_d(head_dim))
    candidates = wide if key[1] > 64 else narrow
    return [c for c in candidates if (kernel, *key, c) not in _SPILLS[arch]
            and not (arch >= 90 and dtype.itemsize == 2 and not uses_wgmma(kernel, c))]


def _as_dict(c) -> dict:
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def unsupported_reason(dtype: torch.dtype, head_dim: int, arch: int,
                       precision: str = "tf32") -> Optional[str]:
    """Why no spill-free configuration exists for this call (``None``: one does).
    ``precision``: the float32 dots' (``"ieee"`` unless TF32 is allowed)."""
    if dtype == torch.float32 and precision == "ieee":
        # Without TF32 the dots are scalar FMAs whose operands all stay in registers: every
        # candidate spilled, down to 32x16 tiles (launch_check, Triton 3.9 and 3.6).
        return ("float32 attention at IEEE precision: every Triton config spills registers; "
                "allow TF32 (torch.backends.cuda.matmul.allow_tf32 = True) for the kernel; "
                "the torch backend runs it (a forced triton backend runs it, slower)")
    if head_dim > MAX_HEAD_DIM:
        return (f"head_dim {head_dim}: the attention kernel ships configs up to "
                f"{MAX_HEAD_DIM}")
    empty = [k for k in _CANDIDATES if not shipped_configs(k, dtype, head_dim, arch)]
    if empty:
        return (f"{dtype} with head_dim {head_dim} on sm_{arch // 10}x: every "
                f"{'/'.join(empty)} attention config spills registers there")
    return None


# Tiny blocks under the interpreter: its cost grows with the block, not the grid.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)


def kernel_config(kernel: str, head_dim: int, dtype: torch.dtype, interpret: bool,
                  arch: int = 90) -> dict:
    """Default block sizes and launch options of ``kernel`` ("fwd", "dkdv" or "dq")."""
    if interpret:
        return dict(_INTERPRETER_CONFIG)
    return _as_dict(shipped_configs(kernel, dtype, head_dim, arch)[0])


def forward_config(head_dim: int, dtype: torch.dtype, interpret: bool, arch: int = 90) -> dict:
    """Default block sizes and launch options of the forward kernel."""
    return kernel_config("fwd", head_dim, dtype, interpret, arch)


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        allowed = shipped_configs(kernel, q.dtype, named_args["head_dim"],
                                  target_of(q).family)
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in allowed]
    return prune


def _autotune_options() -> dict:
    """Triton's on-disk autotuning cache (``cache_results``, Triton 3.3 and newer), so a new
    process picks the configs an earlier one measured, unless the package's decisions
    cache is off (``CVT_KERNELS_DISPATCH_CACHE=off``, read at import)."""
    from ... import dispatch  # the package root imports this module's package: import late

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        return {}
    return {"cache_results": dispatch.cache_path() is not None}


def _tuned(kernel, name: str, candidates):
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st)
               for m, n, w, st in candidates]
    # Triton adds the tensors' dtypes to the key.
    return triton.autotune(configs, key=["n_q", "n_k", "head_dim"],
                           prune_configs_by={"early_config_prune": _prune(name)},
                           **_autotune_options())(kernel)


# Every candidate goes to the autotuner; _prune keeps those of the call's head_dim and arch.
_attn_fwd_tuned = _tuned(_attn_fwd_kernel, "fwd", sum(_CANDIDATES["fwd"], []))
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, "dkdv", sum(_CANDIDATES["dkdv"], []))
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, "dq", sum(_CANDIDATES["dq"], []))


# Triton's Autotuner keeps the call's arguments on the shared kernel object while it
# benchmarks (triton-lang/triton#11494, open): two threads tuning at once trample each other.
# One lock around tuned launches; a launch is asynchronous, so holding it costs microseconds
# (seconds only while a new shape is being tuned, which the other threads must wait for).
_AUTOTUNE_LOCK = threading.Lock()


# (kernel, n_q, n_k, head_dim, dtype) -> the config the autotuner chose outside capture: what
# a CUDA-graph capture of the same call launches (capture cannot time, so without this it
# would launch the default config, not the measured one).
_TUNED: Dict[tuple, dict] = {}


def _launch(kernel, tuned, default: dict, interpret: bool, grid_of, *args,
            tune_key: Optional[tuple] = None, **kwargs) -> None:
    """Launches ``tuned`` (autotuning) on a GPU, else ``kernel`` with ``default``: also
    with ``CVT_KERNELS_AUTOTUNE=0`` and under ``torch.use_deterministic_algorithms(True)``
    (a timing-based config would make the bits depend on the run). During CUDA-graph
    capture (autotuning times launches, which capture cannot) ``kernel`` runs with the
    config tuned for ``tune_key`` by an earlier eager call, else with ``default``."""
    if (interpret or os.environ.get("CVT_KERNELS_AUTOTUNE", "1") == "0"
            or torch.are_deterministic_algorithms_enabled()):
        kernel[grid_of(default)](*args, **kwargs, **default)
    elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        config = _TUNED.get(tune_key, default)
        kernel[grid_of(config)](*args, **kwargs, **config)
    else:
        with _AUTOTUNE_LOCK:
            tuned[grid_of](*args, **kwargs)
            best = getattr(tuned, "best_config", None)
            if tune_key is not None and best is not None:
                _TUNED[tune_key] = _config_kwargs(best)


def _config_kwargs(config) -> dict:
    """A ``triton.Config`` as launch keywords (block sizes, warps, stages)."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _rows(t: Tensor) -> Tensor:
    """Kernels assume unit stride along channels; anything else is made dense once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                      scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` for token-major ``q (B, Nq, H*D)``, ``k, v (B, Nk, H*D)``."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    batch, n_q, channels = q.shape
    n_k = k.shape[1]
    head_dim = channels // num_heads
    out = torch.empty(batch, n_q, channels, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(batch, num_heads, n_q, dtype=lse_dtype, device=q.device)
    if out.numel() == 0:
        return out, lse
    if scale < 0:  # the kernel needs a scale >= 0: softmax(c q.k) = softmax(|c| (-q).k)
        q, scale = -q, -scale
    target = target_of(q)
    interpret = target is None
    cfg = forward_config(head_dim, q.dtype, interpret, 90 if interpret else target.family)
    _launch(
        _attn_fwd_kernel, _attn_fwd_tuned, cfg, interpret,
        lambda meta: (batch * num_heads, cdiv(n_q, meta["BLOCK_M"])),
        q, k, v, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_heads, n_q, n_k, head_dim, scale * LOG2E,
        BLOCK_D=_block_d(head_dim), EVEN_D=head_dim == _block_d(head_dim),
        ACC_DTYPE=_acc_dtype(q.dtype), INPUT_PRECISION=_input_precision(q.dtype),
        tune_key=("fwd", n_q, n_k, head_dim, q.dtype, q.device))
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                       lse: Tensor, num_heads: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the forward's ``out`` and ``lse``."""
    grad_out, q, k, v, out = (_rows(t) for t in (grad_out, q, k, v, out))
    batch, n_q, channels = q.shape
    n_k = k.shape[1]
    head_dim = channels // num_heads
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta = rowsum(dO * O) per (batch, head, query), in the statistics dtype: written by
    # the dq kernel (which loads dO anyway), read by the dk/dv kernel launched after it.
    delta = torch.empty_like(lse, dtype=torch.float64 if q.dtype == torch.float64
                             else torch.float32, memory_format=torch.contiguous_format)
    lse = lse.contiguous()
    target = target_of(q)
    interpret = target is None
    arch = 90 if interpret else target.family
    common = dict(BLOCK_D=_block_d(head_dim), EVEN_D=head_dim == _block_d(head_dim),
                  ACC_DTYPE=_acc_dtype(q.dtype), INPUT_PRECISION=_input_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    _launch(
        _attn_bwd_dq_kernel, _attn_bwd_dq_tuned,
        kernel_config("dq", head_dim, q.dtype, interpret, arch), interpret,
        lambda meta: (batch * num_heads, cdiv(n_q, meta["BLOCK_M"])),
        q, k, v, grad_out, out, lse, delta, dq, *strides, out.stride(0), out.stride(1),
        dq.stride(0), dq.stride(1), num_heads, n_q, n_k, head_dim, scale, scale * LOG2E,
        tune_key=("dq", n_q, n_k, head_dim, q.dtype, q.device), **common)
    _launch(
        _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned,
        kernel_config("dkdv", head_dim, q.dtype, interpret, arch), interpret,
        lambda meta: (batch * num_heads, cdiv(n_k, meta["BLOCK_N"])),
        q, k, v, grad_out, lse, delta, dk, dv, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        num_heads, n_q, n_k, head_dim, scale, scale * LOG2E,
        tune_key=("dkdv", n_q, n_k, head_dim, q.dtype, q.device), **common)
    return dq, dk, dv


__all__ = ["DKDV_CANDIDATES", "DQ_CANDIDATES", "FORWARD_CANDIDATES", "MAX_HEAD_DIM",
           "attention_backward", "attention_forward", "forward_config", "kernel_config",
           "shipped_configs", "unsupported_reason", "uses_wgmma"]
