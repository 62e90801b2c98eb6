"""Tuning tables of the Triton kernels, apart from the kernels (flash-attention's
``hopper/tile_size.h`` habit): block sizes, warps and stages per kernel family, the
per-architecture exclusions (shared memory per block), and how many programs a reduction's
first level launches: the conv projection's and the attention's (candidates and spill
tables; ``attention.py`` applies them).

Every GPU entry is compiled without a GPU, as the launchers launch it, by ``python -m
benchmarks.launch_check`` (a developer tool in the repository, not in the package); the
registers / shared memory quoted beside the entries are what that check printed (Triton 3.9, bf16/fp16 unless said).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..base import cdiv
from ._runtime import Target, dot_precision, precision_for

__all__ = ["GemmConfig", "TileConfig", "ReduceConfig", "projection_gemm_config",
           "projection_tile_config", "reduce_config", "resident_forward_config", "row_split",
           "weight_grad_config", "grad_conv_tile_config", "forward_kloop_config", "fma_dots",
           "stats_tile_config", "grad_tokens_config", "ATTENTION_CANDIDATES", "ATTENTION_SPILLS",
           "FORWARD_CANDIDATES", "DKDV_CANDIDATES", "DQ_CANDIDATES", "MAX_HEAD_DIM"]


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


@dataclass(frozen=True)
class ReduceConfig:
    """Second level of a two-level reduction: ``BLOCK_P`` partials x ``block`` columns per
    step, summed as one tile (``tl.sum`` over axis 0), so a program loops over
    ``cdiv(partials, block_p)`` tiles, never over each partial."""
    block_p: int
    block: int
    num_warps: int


# ------------------------------------------------------------------------ the interpreter
# It runs one program at a time in numpy: small tiles keep the tests' tails, multi-program
# reductions and ragged last chunks exercised at tiny shapes.
INTERPRETER_GEMM = GemmConfig(16, 16, 16, 1, 1)
INTERPRETER_TILE = TileConfig(16, 16, 1)
INTERPRETER_REDUCE = ReduceConfig(4, 16, 1)
# The forward's resident row tile under the interpreter: up to 4 slices of 16 channels
# (C_in <= 64), so the tests reach 1 to 4 slices and, above 64 channels, the K loop.
INTERPRETER_RESIDENT = ((GemmConfig(16, 16, 16, 1, 1), 4, 0),)
# Row blocks per first-level program under the interpreter (no SM count): 2, so tiny
# shapes still give several programs, each merging more than one block, with a ragged last.
INTERPRETER_BLOCKS_PER_PROGRAM = 2

# -------------------------------------------------------------------- GPUs: the projection
# The GEMM kernels' configs, (narrow, wide) per operand width (bytes): BLOCK_N 64 for
# C_out <= 64, 128 above. float32 takes BLOCK_K 16 (32 overflows sm_80's shared memory
# and spills there). The K-loop forms of grad_tokens / forward (C_in above the resident
# width) use these.
GPU_GEMM_CONFIGS = {
    2: (GemmConfig(128, 64, 32, 8, 2), GemmConfig(128, 128, 32, 8, 2)),
    4: (GemmConfig(128, 64, 16, 8, 2), GemmConfig(128, 128, 16, 8, 2)),
}
# The forward with the whole normalized row tile resident: (config, most K slices, shared
# memory measured at that many slices, max of sm_80/sm_90). The first entry with
# ``cdiv(C_in, block_k) <= slices`` whose shared memory fits the target is taken; none:
# the K loop with GPU_GEMM_CONFIGS. Registers as compiled (sm_90 / sm_80, 4 slices):
# 16-bit 64x64x64 w4: 122 / 158 (2+ CTAs/SM); 64x64x128 w8: 124 / 144; float32 64x64x64
# w4: 162 / 200; 64x64x128 w8 (3 slices): 219 / 192. The conv's 9-tap loop is a runtime
# loop: unrolled, all 9 tap loads were live at once and these spilled.
GPU_RESIDENT_FORWARD = {
    2: ((GemmConfig(64, 64, 64, 4, 1), 4, 41984), (GemmConfig(64, 64, 128, 8, 1), 4, 87040)),
    4: ((GemmConfig(64, 64, 64, 4, 1), 4, 82944), (GemmConfig(64, 64, 128, 8, 1), 3, 136192)),
}
# _grad_tokens_kernel, (narrow, wide): float32 at 128 rows, 8 warps, and at 64 rows with 4
# warps spilled 8-16 bytes on sm_80/86/89/90 as launched (IEEE); 64 rows, 8 warps, 1 stage
# do not (IEEE / TF32 regs: sm_90 104 / 136, sm_80 102 / 172, sm_86 106 / 173).
GPU_GRAD_TOKENS_CONFIGS = {
    2: GPU_GEMM_CONFIGS[2],
    4: (GemmConfig(64, 64, 16, 8, 1), GemmConfig(64, 128, 16, 8, 1)),
}
# The forward's K loop (C_in too wide for a resident tile), (narrow, wide) as above: the
# narrow 16-bit 128x64x32 spilled 8 bytes on sm_80, 64x64x32 w4 does not. float32 (IEEE
# dots: every fp32 model at torch's default precision takes this loop): since the kernels
# read the depthwise weight as (C, 1, 3, 3) (strided tap loads, no per-call copy), the
# narrow 128x64x16 w8 needed 164-170 registers on sm_90 (was 128: 1 CTA/SM, 8 warps);
# 64x64x16 w4 needs 166-168 on sm_90/80/86, no spills: 3 CTAs/SM, 12 warps.
GPU_FORWARD_KLOOP_CONFIGS = {
    2: (GemmConfig(64, 64, 32, 4, 2), GemmConfig(128, 128, 32, 8, 2)),
    4: (GemmConfig(64, 64, 16, 4, 2), GPU_GEMM_CONFIGS[4][1]),
}
# _grad_tokens_kernel computes the d_proj_weight partials itself when C_out fits one N
# slice and at most this many (CvT's stage 1): with the wide 128x128 tile it spilled on
# sm_80 (16-40 bytes); the narrow 128x64 one compiles to 218-255 regs, no spill.
FUSED_WEIGHT_GRAD_MAX_C_OUT = 64
# d_proj_weight = grad_out^T @ t: candidates best first, with the shared memory the
# compile check measured for each (largest of sm_80/sm_90, any dtype of that width); the
# launcher takes the first that fits ``Target.smem_per_block`` (sm_86/sm_89: 101,376 B).
# (With the 9-tap conv loop unrolled, 128x64 needed 106-124 KB and failed there.)
GPU_WEIGHT_GRAD_CONFIGS = {
    2: ((GemmConfig(128, 64, 32, 8, 2), 25600), (GemmConfig(64, 64, 32, 4, 2), 13312)),
    4: ((GemmConfig(128, 64, 16, 8, 2), 41984), (GemmConfig(64, 64, 16, 4, 2), 21504)),
}
# float32 at IEEE precision (FMA dots): the 128-row tile spilled 8 bytes on sm_86/sm_89 as
# launched, and 64 rows with 4 warps too; 64 rows, 8 warps, 1 stage do not (97-102 regs).
GPU_WEIGHT_GRAD_FMA = GemmConfig(64, 64, 16, 8, 1)
# Below sm_90 (launch_check): the 16-bit 128-row tile and the float32 FMA tile above
# spilled 8 bytes on sm_80/86/89 under Triton 3.6, and 64x64x32 with 4 warps on sm_86/89
# under 3.9; these spill under neither.
GPU_WEIGHT_GRAD_PRE_HOPPER = {2: GemmConfig(64, 64, 32, 8, 1), 4: GemmConfig(32, 64, 16, 4, 1)}
# 64 tokens x 32 channels: 64 channels made the BN-training backward spill on sm_90 (its
# 9 taps, xhat and dz are live together).
GPU_TILE_CONFIG = TileConfig(64, 32, 4)
# The statistics pass, as launched (launch_check): 64 rows spilled 8-16 bytes on sm_80
# (16-bit, 4 warps) and sm_90 (float32); 32 rows x 32 channels, 4 warps, do not.
GPU_STATS_TILE = {2: TileConfig(32, 32, 4), 4: TileConfig(32, 32, 4)}
# float32 32x32 spilled 8 bytes on sm_80 (class-token stages) with 4 warps under Triton
# 3.6 and with 8 under 3.9: 16 channels there.
GPU_STATS_TILE_PRE_HOPPER_FP32 = TileConfig(32, 16, 4)
# The BN backward + depthwise-weight partials: 16-bit 64 rows spilled 8 bytes on sm_80
# (bf16, training), 32 rows do not (128 regs); float32 32 rows spilled there, 64 do not.
GPU_GRAD_CONV_TILE = {2: TileConfig(32, 32, 4), 4: TileConfig(64, 32, 4)}
GPU_REDUCE = ReduceConfig(64, 64, 4)
# First-level programs of a reduction: about this many per SM (the tile kernels run
# several CTAs per SM; the GEMMs 1-2), rounded to whole row blocks per program.
PROGRAMS_PER_SM = {"tile": 4, "gemm": 2}


def projection_gemm_config(dtype: torch.dtype, wide: bool,
                           target: Optional[Target]) -> GemmConfig:
    """Block sizes of the K-loop GEMM kernels; ``wide``: BLOCK_N 128 (for C_out > 64).
    ``target`` ``None``: the interpreter's tiny tiles."""
    if target is None:
        return INTERPRETER_GEMM
    return GPU_GEMM_CONFIGS[2 if dtype.itemsize == 2 else 4][int(wide)]


def fma_dots(dtype: torch.dtype, target: Optional[Target], tf32: Optional[bool] = None) -> bool:
    """float32 dots at IEEE precision on a GPU (torch's default, ``allow_tf32`` off): FMA
    loops, not tensor cores, with far more registers live. The launch-faithful check found
    the resident forward (6.8-9.1 KB) and the fused weight gradient (520 B) spilling there,
    so those take the plain kernels. ``tf32``: the TF32 flag as a caller already read it
    (a cache's key: its fill must use the flag of the key), else read here."""
    if target is None or dtype != torch.float32:
        return False
    return (dot_precision(dtype) if tf32 is None else precision_for(dtype, tf32)) == "ieee"


def resident_forward_config(dtype: torch.dtype, c_in: int, target: Optional[Target],
                            tf32: Optional[bool] = None) -> Optional[Tuple[GemmConfig, int]]:
    """``(config, K slices)`` of the forward with the whole normalized row tile built once
    per row tile, or ``None`` when C_in is too wide for it (the K loop then) or the dots
    are FMA loops (:func:`fma_dots`; ``tf32`` as there)."""
    if fma_dots(dtype, target, tf32):
        return None
    if target is None:
        table, smem_limit = INTERPRETER_RESIDENT, 0
    else:
        table = GPU_RESIDENT_FORWARD[2 if dtype.itemsize == 2 else 4]
        smem_limit = target.smem_per_block
    for cfg, most_slices, smem in table:
        slices = cdiv(c_in, cfg.block_k)
        if slices <= most_slices and smem <= smem_limit:
            return cfg, slices
    return None


def weight_grad_config(dtype: torch.dtype, target: Optional[Target],
                       tf32: Optional[bool] = None) -> GemmConfig:
    """The weight-gradient GEMM's config: the first candidate whose measured shared memory
    fits ``target.smem_per_block`` (``tf32`` as in :func:`fma_dots`)."""
    if target is None:
        return INTERPRETER_GEMM
    candidates = GPU_WEIGHT_GRAD_CONFIGS[2 if dtype.itemsize == 2 else 4]
    fma = fma_dots(dtype, target, tf32)
    if target.arch < 90 and (dtype.itemsize == 2 or fma):
        return GPU_WEIGHT_GRAD_PRE_HOPPER[2 if dtype.itemsize == 2 else 4]
    if fma:
        return GPU_WEIGHT_GRAD_FMA
    for cfg, smem in candidates:
        if smem <= target.smem_per_block:
            return cfg
    return candidates[-1][0]


def projection_tile_config(target: Optional[Target]) -> TileConfig:
    """Block sizes of the stencil kernels (conv statistics, dx)."""
    return INTERPRETER_TILE if target is None else GPU_TILE_CONFIG


def stats_tile_config(dtype: torch.dtype, target: Optional[Target]) -> TileConfig:
    """Block sizes of the statistics pass (``_stats_partials_kernel``)."""
    if target is None:
        return INTERPRETER_TILE
    if dtype.itemsize == 4 and target.arch < 90:
        return GPU_STATS_TILE_PRE_HOPPER_FP32
    return GPU_STATS_TILE[2 if dtype.itemsize == 2 else 4]


def grad_conv_tile_config(dtype: torch.dtype, target: Optional[Target]) -> TileConfig:
    """Block sizes of the BN backward + depthwise-weight gradient kernel."""
    if target is None:
        return INTERPRETER_TILE
    return GPU_GRAD_CONV_TILE[2 if dtype.itemsize == 2 else 4]


def grad_tokens_config(dtype: torch.dtype, wide: bool,
                       target: Optional[Target]) -> GemmConfig:
    """``_grad_tokens_kernel``'s config; ``wide``: BLOCK_N 128 (for C_out > 64)."""
    if target is None:
        return INTERPRETER_GEMM
    return GPU_GRAD_TOKENS_CONFIGS[2 if dtype.itemsize == 2 else 4][int(wide)]


def forward_kloop_config(dtype: torch.dtype, wide: bool,
                         target: Optional[Target]) -> GemmConfig:
    """The forward's config when C_in is too wide for a resident row tile."""
    if target is None:
        return INTERPRETER_GEMM
    return GPU_FORWARD_KLOOP_CONFIGS[2 if dtype.itemsize == 2 else 4][int(wide)]


def reduce_config(target: Optional[Target]) -> ReduceConfig:
    return INTERPRETER_REDUCE if target is None else GPU_REDUCE


def row_split(row_blocks: int, other_programs: int, kind: str,
              target: Optional[Target]) -> Tuple[int, int]:
    """``(programs, blocks_per_program)`` of a reduction's first level over ``row_blocks``
    row blocks when ``other_programs`` programs run beside each (channel blocks): about
    ``PROGRAMS_PER_SM[kind] * sm_count`` programs in all, each looping over a contiguous
    run of row blocks, so the second level sums ``O(sm_count)`` partials. Every program
    gets at least one block (the last may get fewer than the others)."""
    if row_blocks <= 0:
        return 0, 1
    if target is None:
        per = INTERPRETER_BLOCKS_PER_PROGRAM
    else:
        wanted = max(1, cdiv(PROGRAMS_PER_SM[kind] * target.sm_count, max(1, other_programs)))
        per = cdiv(row_blocks, wanted)
    return cdiv(row_blocks, per), per


# ------------------------------------------------------------------------------ attention
# Launch configurations. Nothing here is tuned on hardware: the candidates come from the
# Triton fused-attention tutorial's Hopper settings; on a GPU each kernel autotunes over the
# candidates that compile for its architecture without spilling as launched (the tables
# below, from ``python -m benchmarks.launch_check``), once per (Nq, Nk,
# head_dim, dtype). CVT_KERNELS_AUTOTUNE=0 uses the first candidate left.
# (BLOCK_M, BLOCK_N, num_warps, num_stages), in order of preference. BLOCK_M counts queries
# and BLOCK_N keys in every kernel; the two backward kernels tune independently.
FORWARD_CANDIDATES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3),
                      (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
# The backward's first candidates after the two 64x64 ones are the Triton tutorial's Hopper
# settings: dk/dv over 128 keys with 32-query steps, dq over 128 queries with 32-key steps,
# 4 warps, 3 to 5 stages (both keep the wgmma row block at 128).
DKDV_CANDIDATES = [(64, 64, 4, 2), (64, 64, 8, 1), (32, 128, 4, 3), (32, 128, 4, 4),
                   (32, 128, 4, 5), (64, 32, 4, 2), (128, 64, 8, 1),
                   (64, 32, 8, 1)]  # the last: float32 on sm_8x, where the others spill
DQ_CANDIDATES = [(64, 64, 4, 2), (64, 64, 8, 1), (128, 32, 4, 3), (128, 32, 4, 4),
                 (128, 32, 4, 5), (64, 32, 4, 2), (128, 64, 8, 1),
                 (32, 64, 8, 1)]  # the last: float32 on sm_8x, where the others spill
# head_dim 65..128 (BLOCK_D 128): smaller tiles / more warps keep the accumulators in
# registers. The dk/dv kernel holds two 64x128 float32 accumulators: with 64 keys (the least
# that wgmma takes) only 16 queries a step fit without spilling. The last dk/dv and dq
# candidates are float32's, where the others spill as launched (dk/dv on sm_8x, dq on both).
FORWARD_CANDIDATES_D128 = [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2),
                           (32, 16, 4, 1)]  # the last: float32 on sm_86/89
DKDV_CANDIDATES_D128 = [(16, 64, 8, 1), (16, 64, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2),
                        (32, 16, 4, 1)]
DQ_CANDIDATES_D128 = [(64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (32, 32, 8, 1),
                      (16, 32, 4, 1)]
MAX_HEAD_DIM = 128
ATTENTION_CANDIDATES = {
    "fwd": (FORWARD_CANDIDATES, FORWARD_CANDIDATES_D128),
    "dkdv": (DKDV_CANDIDATES, DKDV_CANDIDATES_D128),
    "dq": (DQ_CANDIDATES, DQ_CANDIDATES_D128),
}
# (kernel, operand bytes, BLOCK_D, config) that spill registers as launched, per
# architecture family: the union over Triton 3.9 and 3.6 of the launch-faithful compile
# (launch_check's compile-only launches of these launchers with every candidate unpruned:
# CvT-13 stage shapes at batch 64, one head and several, 197 x 50, for BLOCK_D 16-128;
# sm_90 and sm_80 compiled separately). Operand bytes 4 is float32 with TF32 dots
# (``allow_tf32``): at IEEE precision (PyTorch's default) the float32 dots run on CUDA cores
# and every d64 candidate spills on sm_90, from 176 bytes up (not tabled).
# No fp16/bf16 candidate spills on sm_90; the ones the old AOT signature pruned there (dk/dv
# 64x64 w4 st2 at d64: "8 bytes") do not spill as launched.
# Regenerate after a kernel or candidate change: `python -m benchmarks.launch_check
# --attention-spills --arch 90 80 86` under Triton 3.9 and 3.6 prints each family's entries; the tables hold the union (sm_86's printout
# includes sm_80's entries that spill there too).
ATTENTION_SPILLS_SM90 = {
    ("fwd", 4, 64, (128, 64, 4, 3)), ("dkdv", 4, 64, (32, 128, 4, 3)),
    ("dkdv", 4, 64, (32, 128, 4, 4)), ("dkdv", 4, 64, (32, 128, 4, 5)),
    ("dkdv", 4, 64, (128, 64, 8, 1)), ("dkdv", 4, 128, (32, 32, 4, 2)),
    ("dkdv", 4, 128, (64, 32, 8, 1)), ("dq", 4, 64, (128, 32, 4, 4)),
    ("dq", 4, 64, (128, 32, 4, 5)), ("dq", 4, 128, (32, 32, 4, 2)),
    ("dq", 4, 128, (32, 32, 8, 1)), ("dq", 4, 128, (64, 32, 8, 1)),
    ("dq", 4, 128, (64, 64, 8, 1)),
    # Triton 3.9 only
    ("fwd", 4, 64, (64, 128, 4, 3)), ("fwd", 4, 128, (32, 32, 4, 2)),
    ("dkdv", 4, 64, (64, 32, 4, 2)), ("dkdv", 4, 128, (16, 64, 8, 1)),
    ("dq", 4, 32, (32, 64, 8, 1)),
    # Triton 3.6 only
    ("dq", 4, 64, (128, 32, 4, 3)),
}
ATTENTION_SPILLS_SM80 = {
    ("dkdv", 2, 64, (32, 128, 4, 3)), ("dkdv", 2, 64, (32, 128, 4, 4)),
    ("dkdv", 2, 64, (32, 128, 4, 5)), ("dkdv", 2, 64, (128, 64, 8, 1)),
    ("dkdv", 2, 128, (16, 64, 8, 1)), ("dkdv", 2, 128, (16, 64, 8, 2)),
    ("dkdv", 2, 128, (32, 32, 4, 2)), ("dq", 2, 32, (32, 64, 8, 1)),
    ("dq", 2, 64, (128, 32, 4, 3)), ("dq", 2, 64, (128, 32, 4, 4)),
    ("dq", 2, 64, (128, 32, 4, 5)), ("dq", 2, 128, (64, 32, 8, 1)),
    ("dq", 2, 128, (64, 64, 8, 1)), ("fwd", 4, 64, (64, 128, 4, 3)),
    ("fwd", 4, 64, (128, 64, 4, 3)), ("fwd", 4, 64, (128, 128, 8, 3)),
    ("fwd", 4, 128, (64, 32, 8, 2)), ("fwd", 4, 128, (64, 64, 8, 2)),
    ("dkdv", 4, 32, (128, 64, 8, 1)), ("dkdv", 4, 64, (32, 128, 4, 3)),
    ("dkdv", 4, 64, (32, 128, 4, 4)), ("dkdv", 4, 64, (32, 128, 4, 5)),
    ("dkdv", 4, 64, (64, 32, 4, 2)), ("dkdv", 4, 64, (64, 64, 4, 2)),
    ("dkdv", 4, 64, (64, 64, 8, 1)), ("dkdv", 4, 64, (128, 64, 8, 1)),
    ("dkdv", 4, 128, (16, 64, 8, 1)), ("dkdv", 4, 128, (16, 64, 8, 2)),
    ("dkdv", 4, 128, (32, 32, 4, 2)), ("dkdv", 4, 128, (64, 32, 8, 1)),
    ("dq", 4, 64, (64, 64, 4, 2)), ("dq", 4, 64, (64, 64, 8, 1)),
    ("dq", 4, 64, (128, 32, 4, 3)), ("dq", 4, 64, (128, 32, 4, 4)),
    ("dq", 4, 64, (128, 32, 4, 5)), ("dq", 4, 64, (128, 64, 8, 1)),
    ("dq", 4, 128, (32, 32, 4, 2)), ("dq", 4, 128, (32, 32, 8, 1)),
    ("dq", 4, 128, (64, 32, 8, 1)), ("dq", 4, 128, (64, 64, 8, 1)),
    # Triton 3.9 only
    ("dkdv", 2, 32, (128, 64, 8, 1)), ("dq", 2, 32, (64, 64, 4, 2)),
    # Triton 3.6 only
    ("dq", 4, 32, (64, 64, 4, 2)),
}
# sm_86/sm_89 (A10, L4, L40S, RTX 30/40): the sm_80 set plus what spills only there, 8-72
# bytes (launch_check --arch 86 89: the same configs on both, Triton 3.9).
ATTENTION_SPILLS_SM86 = ATTENTION_SPILLS_SM80 | {
    ("dkdv", 2, 64, (64, 64, 4, 2)), ("dq", 2, 64, (128, 64, 8, 1)),
    ("fwd", 4, 32, (128, 64, 4, 3)), ("fwd", 4, 128, (32, 32, 4, 2)),
}
ATTENTION_SPILLS = {90: ATTENTION_SPILLS_SM90, 80: ATTENTION_SPILLS_SM80,
                    86: ATTENTION_SPILLS_SM86}
