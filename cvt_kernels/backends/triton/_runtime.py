"""What every Triton launcher asks before a launch: interpreter or GPU, which GPU, which
precision. One small module so the answers are the same everywhere, and so the
launch-faithful compile check (``benchmarks/launch_check.py``) can make the launchers take their GPU
path with CPU tensors by simulating a target (:func:`simulate`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import triton.language as tl
from torch import Tensor

__all__ = ["Target", "acc_dtype", "dot_precision", "interpreting", "simulate", "simulated",
           "target_of", "tf32_allowed"]


def interpreting() -> bool:
    """Kernels run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Target:
    """The GPU a launch compiles for, as far as launch configurations care."""
    arch: int             # compute capability as major * 10 + minor: 90, 89, 86, 80
    sm_count: int
    smem_per_block: int   # the opt-in maximum of shared memory one block may use, bytes

    @property
    def family(self) -> int:
        """The attention spill tables' keys: 90 for Hopper and newer, 86 for sm_86-89
        (100 KB of shared memory, other register allocation), 80 for the rest."""
        if self.arch >= 90:
            return 90
        return 86 if self.arch >= 86 else 80


# Opt-in shared memory per block by architecture (CUDA programming guide, "Technical
# Specifications"): what the simulated targets of the compile check use.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SM counts of the parts the compile check simulates: H100 SXM, A100, A10 / RTX 3090-class,
# L4 / L40S-class (the waves it reports are for these).
SM_COUNT = {90: 132, 80: 108, 86: 84, 89: 58}


def simulated_target(arch: int) -> Target:
    return Target(arch, SM_COUNT[arch], SMEM_PER_BLOCK[arch])


_SIMULATED: Optional[Target] = None
_DEVICE_TARGETS: Dict[int, Target] = {}


@contextlib.contextmanager
def simulate(target: Target) -> Iterator[Target]:
    """Within this block every launcher treats its tensors, CPU ones included, as living on
    ``target`` (for the compile check, which compiles without launching)."""
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, target
    try:
        yield target
    finally:
        _SIMULATED = previous


def simulated() -> Optional[Target]:
    """The target :func:`simulate` set (``None`` outside it)."""
    return _SIMULATED


def target_of(t: Tensor) -> Optional[Target]:
    """The GPU ``t``'s kernels compile for; ``None`` when the interpreter runs them."""
    if _SIMULATED is not None:
        return _SIMULATED
    if not t.is_cuda:  # (t.device builds a torch.device: ~1 us, ~30 times a block call)
        return None
    index = t.get_device()
    target = _DEVICE_TARGETS.get(index)
    if target is None:  # device properties cost microseconds: once per device
        props = torch.cuda.get_device_properties(index)
        target = Target(props.major * 10 + props.minor, props.multi_processor_count,
                        getattr(props, "shared_memory_per_block_optin",
                                SMEM_PER_BLOCK.get(props.major * 10 + props.minor, 101376)))
        _DEVICE_TARGETS[index] = target
    return target


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype inside kernels: float32, float64 for float64 (interpreter only)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 exactly when PyTorch's own matmuls
    would use it, IEEE otherwise (16-bit operands are exact products either way)."""
    return precision_for(dtype, tf32_allowed())


def precision_for(dtype: torch.dtype, tf32: bool) -> str:
    """:func:`dot_precision` for a TF32 flag already read (a cache key's)."""
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"


def tf32_allowed() -> bool:
    """PyTorch's float32 matmul flag as :func:`dot_precision` reads it (the launch
    geometry caches' key: configs for float32 differ with it)."""
    # What torch.backends.cuda.matmul.allow_tf32 returns, without its module __getattr__
    # (6 us a read on this project's CPU machine, seven reads a block call; 0.7 us here).
    getter = getattr(torch._C, "_get_cublas_allow_tf32", None)
    return getter() if getter is not None else torch.backends.cuda.matmul.allow_tf32
