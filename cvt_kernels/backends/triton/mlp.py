"""CvT's MLP in Triton: fc1 with bias and activation in the GEMM's epilogue, fc2 with bias
and the residual add in its epilogue; the backward's ``act'(z)`` in the epilogue of
``g W2`` and ``act(z)`` applied as ``z`` is loaded for ``dW2 = g^T act(z)``.

The math is :mod:`cvt_kernels.ops.mlp`'s (its reference functions are the oracle). Every
product is one GEMM kernel (:func:`_gemm_kernel`) with compile-time switches for its
prologue and epilogue; operands are read through strides, so transposes cost nothing. The
weight gradients (K = every row of the batch, few output tiles) split K over programs into
float32 partials summed in a fixed order after (split-K without atomics: deterministic);
the bias gradients are column sums of fixed-shape tensors.

Layers: the ``@triton.jit`` kernel and helpers, the plain launcher :func:`gemm` (tensors
in, tensor out; a compile check can drive it), and :func:`mlp_forward` /
:func:`mlp_backward`, what the backend's methods call. Not yet run on a GPU: the block sizes
below are a starting point, not tuned (issue 18).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import cdiv
from ._runtime import acc_dtype, dot_precision, target_of

__all__ = ["ACT_CODES", "gemm", "mlp_backward", "mlp_forward", "split_k_plan"]

#: The activation switch of the kernel: 0 none, 1 QuickGELU, 2 exact GELU.
ACT_CODES = {None: 0, "quick_gelu": 1, "gelu": 2}
# Split-K of the weight gradients (K = B * tokens, 200,704 at CvT-13 stage 1, batch 64, and
# only 2 output tiles of 128 x 128): programs per SM to aim for, and the least K blocks one
# program sums (fewer would spend more on the partials than on the products).
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_K_BLOCKS = 8


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:  # QuickGELU: z * sigmoid(1.702 z)
        return z * tl.sigmoid(1.702 * z)
    elif ACT == 2:  # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        s = tl.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf


@triton.jit
def _gemm_kernel(
    # Pointers to matrices
    A, B, C, BIAS, Z_OUT, RES, Z_IN,
    # Matrix dimensions: C (M, N) = A (M, K) @ B (K, N); program_id(2) sums K's run
    # [pid * K_PER_SPLIT, (pid + 1) * K_PER_SPLIT) into its own C slice (split-K)
    M, N, K, K_PER_SPLIT,
    # Strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    stride_zom, stride_zon, stride_rm, stride_rn, stride_zim, stride_zin,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,   # + BIAS[n]
    ACT: tl.constexpr,        # epilogue: C = act(acc); with STORE_Z, Z_OUT = acc first
    STORE_Z: tl.constexpr,
    HAS_RES: tl.constexpr,    # epilogue: + RES[m, n]
    ACT_GRAD: tl.constexpr,   # epilogue: * act'(Z_IN[m, n])
    B_ACT: tl.constexpr,      # prologue: B = act(B) as it is loaded
    SPLIT_K: tl.constexpr,    # program_id(2) sums one run of K into its C slice
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & (kk[None, :] < k_end), other=0.0)
        b = tl.load(B + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < k_end) & mask_n[None, :], other=0.0)
        if B_ACT != 0:
            # act(0) == 0 for both activations: the masked tail stays zero.
            b = _act(b.to(ACC), B_ACT).to(A.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(ACC)[None, :]
    if STORE_Z:
        tl.store(Z_OUT + rm[:, None] * stride_zom + rn[None, :] * stride_zon,
                 acc.to(Z_OUT.dtype.element_ty), mask=mask)
    if ACT != 0:
        acc = _act(acc, ACT)
    if ACT_GRAD != 0:
        z = tl.load(Z_IN + rm[:, None] * stride_zim + rn[None, :] * stride_zin, mask=mask,
                    other=0.0).to(ACC)
        acc = acc * _act_grad(z, ACT_GRAD)
    if HAS_RES:
        acc += tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask,
                       other=0.0).to(ACC)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=mask)


def _blocks(a: Tensor) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if target_of(a) is None:  # the interpreter: small tiles keep tiny tests fast
        return 16, 16, 16, 1, 1
    if a.dtype == torch.float32:
        if dot_precision(a.dtype) == "ieee":
            # FMA dots hold both operand tiles in registers: 64x64x32 spilled 8-384 B as
            # launched (the transposed backward GEMMs; launch_check, Triton 3.9).
            return 64, 64, 16, 4, 2
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


def gemm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, act: Optional[str] = None,
         store_z: bool = False, residual: Optional[Tensor] = None,
         act_grad: Optional[str] = None, z_in: Optional[Tensor] = None,
         b_act: Optional[str] = None, out_dtype: Optional[torch.dtype] = None,
         split_k: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``C = epilogue(prologue(a) @ prologue(b))`` for 2-D ``a (M, K)`` and ``b (K, N)`` of
    one dtype, any strides (pass ``w.t()`` for ``x W^T``). Epilogue, in this order:
    ``+ bias (N,)``; with ``store_z`` the pre-activation is also returned; ``act``;
    ``* act'(z_in (M, N))`` for ``act_grad``; ``+ residual (M, N)``. ``b_act`` applies an
    activation to ``b`` as it is loaded. Accumulates in float32 (float64 for float64).
    ``split_k`` (no epilogue): for a long ``K`` and few output tiles (the weight gradients,
    K = every token of the batch), programs sum runs of ``K`` into float32 partials that are
    then summed in a fixed order (deterministic, no atomics).
    Returns ``(C, z or None)``, ``C`` in ``out_dtype`` (default ``a``'s)."""
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
    if split_k and (bias is not None or act or store_z or residual is not None or act_grad):
        raise ValueError("split_k: the partial sums take no epilogue")
    out_dtype = out_dtype or a.dtype
    z = torch.empty((m, n), device=a.device, dtype=a.dtype) if store_z else None
    if m == 0 or n == 0:
        return torch.empty((m, n), device=a.device, dtype=out_dtype), z
    if k == 0:  # an empty sum: the epilogue of zeros
        a = torch.zeros((m, 1), device=a.device, dtype=a.dtype)
        b = torch.zeros((1, n), device=b.device, dtype=b.dtype)
        k = 1
    block_m, block_n, block_k, warps, stages = _blocks(a)
    splits, k_per_split = (split_k_plan(m, n, k, block_m, block_n, block_k, a) if split_k
                           else (1, k))
    if splits > 1:
        c = torch.empty((splits, m, n), device=a.device,
                        dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
    else:
        c = torch.empty((1, m, n), device=a.device, dtype=out_dtype)
    grid = (cdiv(m, block_m), cdiv(n, block_n), splits)
    _gemm_kernel[grid](
        a, b, c, bias, z, residual, z_in,
        m, n, k, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        c.stride(2),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        z_in.stride(0) if z_in is not None else 0, z_in.stride(1) if z_in is not None else 0,
        HAS_BIAS=bias is not None, ACT=ACT_CODES[act], STORE_Z=store_z,
        HAS_RES=residual is not None, ACT_GRAD=ACT_CODES[act_grad], B_ACT=ACT_CODES[b_act],
        SPLIT_K=splits > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACC=acc_dtype(a.dtype),
        PRECISION=dot_precision(a.dtype), num_warps=warps, num_stages=stages)
    # Second level of split-K: the partials summed over a fixed shape, in a fixed order.
    return (c.sum(0).to(out_dtype) if splits > 1 else c[0]), z


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


def mlp_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], act: str, residual: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor]:
    """``(out, z)`` as :func:`cvt_kernels.ops.mlp.reference_forward`: two GEMMs, the
    activation written once (``a``, fc2's input) beside the pre-activation ``z``."""
    c_out = fc2_weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    a, z = gemm(x2, fc1_weight.t(), fc1_bias, act=act, store_z=True)
    r2 = residual.reshape(-1, c_out) if residual is not None else None
    out, _ = gemm(a, fc2_weight.t(), fc2_bias, residual=r2)
    return out.reshape(*x.shape[:-1], c_out), z


def mlp_backward(grad_out: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                 z: Tensor, act: str, has_bias1: bool, has_bias2: bool
                 ) -> Tuple[Optional[Tensor], ...]:
    """``(dx, dW1, db1, dW2, db2)`` as :func:`cvt_kernels.ops.mlp.reference_backward`."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dz, _ = gemm(g, fc2_weight, act_grad=act, z_in=z)           # (g W2) * act'(z)
    dw2, _ = gemm(g.t(), z, b_act=act, out_dtype=fc2_weight.dtype,  # g^T act(z)
                  split_k=True)
    dw1, _ = gemm(dz.t(), x2, out_dtype=fc1_weight.dtype, split_k=True)  # dz^T x
    dx, _ = gemm(dz, fc1_weight)                                    # dz W1
    # Column sums of fixed-shape tensors in the statistics dtype: deterministic.
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    db1 = dz.to(sdt).sum(0).to(fc1_weight.dtype) if has_bias1 else None
    db2 = g.to(sdt).sum(0).to(fc2_weight.dtype) if has_bias2 else None
    return dx.reshape(x.shape), dw1, db1, dw2, db2
