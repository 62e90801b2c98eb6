"""Compile what the GPU really compiles, without a GPU, and say what it will cost.

``python -m benchmarks.launch_check [--arch 90 80 86 89] [--quick] [--only S]`` (from the
repository root)

The ahead-of-time signatures an earlier check compiled were not what a launch compiles: at
launch Triton specializes integer arguments divisible by 16 (vectorized loads, ``cp.async``,
fewer registers) and equal to 1 (constants), ``None`` pointers, and float32 runs at the
precision the launcher reads from ``torch`` at run time. So this check runs the launchers
themselves, the same calls :class:`~cvt_kernels.backends.triton.TritonBackend` makes in a
training step and in inference, with CPU tensors while Triton believes it targets
``sm_<arch>``: a compile-only driver (:class:`_CompileOnlyDriver`) stands in for the CUDA
one, every ``JITFunction.run`` compiles instead of launching, and every autotuned launch
compiles each candidate the autotuner keeps after pruning. The launchers pick their
configs from a simulated :class:`~cvt_kernels.backends.triton._runtime.Target` (SM count,
shared memory per block), so the grids are the ones a real H100 / A100 / A10 / L4 would get.

A developer tool, not part of the installed package: it lives under ``benchmarks/`` because
it reaches into the Triton backend's internals (the runtime never imports it).

Shapes: every attention block of CvT-13/21/W24 (CvT-21's blocks are CvT-13's) at 224 and
384, batch 1, 64 and 256 on sm_90 (CvT-13 and W24 at 224, batch 64 on sm_80/86/89: their
configs follow the architecture's limits, not the shape), float16/bfloat16/float32,
training (statistics, projections, attention forward and backward, projection backward) and
inference (projections, attention, one-pass), plus a ragged case (197 queries, 50 keys).
``--quick``: CvT-13 at 224, batch 64 on every architecture.

Reported per compiled binary: registers, spilled bytes, shared memory, CTAs per SM (an
estimate from registers, shared memory and warps), wgmma / mma.sync / ``cp.async`` / TMA
use; per launch at the CvT-13 stage shapes, batch 64, bfloat16 (``--table`` picks another
dtype/batch): grid, waves on the simulated GPU, and the longest serial loop one program
runs at that shape. Exits 1 when a binary a launch would use spills, exceeds shared memory,
runs fp16/bf16 dots without wgmma on sm_90, or fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _driver_config
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from cvt_kernels.backends.base import ProjectionConfig, ProjectionParams, cdiv
from cvt_kernels.backends.triton import _runtime
from cvt_kernels.backends.triton import attention as attn
from cvt_kernels.backends.triton import configs
from cvt_kernels.backends.triton import conv_projection as cp
from cvt_kernels.backends.triton import layer_norm, mlp, one_pass

from ._autotune import pruned_configs

KERNEL_MODULES = (attn, cp, one_pass, layer_norm, mlp)


# ----------------------------------------------------------------------- the fake driver
class _Utils:
    def __init__(self, target: _runtime.Target):
        self._target = target

    def get_device_properties(self, device):
        return {"max_shared_mem": self._target.smem_per_block,
                "multiprocessor_count": self._target.sm_count, "warpSize": 32}


class _CompileOnlyDriver:
    """Enough of a Triton driver for ``JITFunction.run(..., warmup=True)`` to compile for
    ``target`` on a machine without a GPU. The device id is the arch, so each architecture
    gets its own per-device kernel cache inside Triton."""

    def __init__(self, target: _runtime.Target):
        self.target = GPUTarget("cuda", target.arch, 32)
        self.utils = _Utils(target)

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the launch check compiles only; nothing is timed")


@dataclass
class Launch:
    """One kernel launch a launcher made: what it compiled and the grid it asked for."""
    kernel: str                      # the @triton.jit function's name
    compiled: object                 # Triton's CompiledKernel
    grid: Tuple[int, int, int]
    args: Dict[str, object]          # bound arguments (tensors, ints, constexprs)
    num_warps: int
    num_stages: int
    candidate: bool = False          # one of an autotuner's candidates (not necessarily run)
    shape: str = ""                  # the CvT call it belongs to
    constexprs: Tuple[str, ...] = ()
    automatic: bool = True           # the dispatcher may choose it (False: forced only)


@dataclass
class Recorder:
    """What the compile-only launches of one :func:`_compile_only` block go into, and the
    CvT call the drivers are making (set by :meth:`call` before its launches)."""
    only: Optional[str] = None       # compile only kernels whose name this regex finds
    launches: List[Launch] = field(default_factory=list)
    shape: str = ""                  # the CvT call the next launches belong to
    automatic: bool = True           # that call is one the backend accepts unforced
    what: str = ""                   # the workload being driven, for the heartbeat
    # called after every compile: a cold Triton cache makes one shape minutes of compiling,
    # and a command silent that long looks hung (the heartbeat in run_launches)
    tick: Optional[Callable[[], None]] = None

    def call(self, shape: str, reasons: List[str]) -> None:
        """The next launches are ``shape``'s; with ``reasons`` (the backend declines the
        call) only a forced backend would make them."""
        self.shape, self.automatic = shape, not reasons


# Calls the dispatcher declines (a forced backend still runs them) are compiled for these
# architectures only: informational, and their spilling compiles are the slowest.
FORCED_ARCHES = (90,)


def _bound(fn: JITFunction, args, kwargs) -> Dict[str, object]:
    sig = inspect.signature(fn.fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    return dict(bound.arguments)


def _grid3(grid) -> Tuple[int, int, int]:
    g = tuple(int(v) for v in grid) + (1, 1)
    return g[0], g[1], g[2]


@contextlib.contextmanager
def _compile_only(target: _runtime.Target, only: Optional[str] = None) -> Iterator[Recorder]:
    """Within this block, launches compile for ``target`` and are recorded, not run."""
    rec = Recorder(only=only)
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if rec.only and not re.search(rec.only, self.fn.__name__):
            return None
        if not rec.automatic and target.arch not in FORCED_ARCHES:
            return None  # forced-only calls (float32 IEEE attention): reported for sm_90
        compiled = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if rec.tick:
            rec.tick()
        if warmup:
            return compiled
        meta = _bound(self, args, kwargs)
        g = grid(meta) if callable(grid) else grid
        rec.launches.append(Launch(self.fn.__name__, compiled, _grid3(g), meta,
                                   kwargs.get("num_warps", compiled.metadata.num_warps),
                                   kwargs.get("num_stages", compiled.metadata.num_stages),
                                   shape=rec.shape, automatic=rec.automatic,
                                   constexprs=tuple(p.name for p in self.params
                                                    if p.is_constexpr)))
        return compiled

    def tuned_run(self, *args, **kwargs):
        # What Autotuner.run would benchmark: every candidate left after pruning.
        for config in pruned_configs(self, args, kwargs):
            before = len(rec.launches)
            self.fn.run(*args, **kwargs, **config.all_kwargs())
            for launch in rec.launches[before:]:
                launch.candidate = True

    _driver_config.set_active(_CompileOnlyDriver(target))
    JITFunction.run, Autotuner.run = run, tuned_run
    try:
        with _runtime.simulate(target), _no_dispatch_cache():
            yield rec
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        _driver_config.reset_active() if _has_default_driver() else setattr(
            _driver_config, "_active", None)


def _has_default_driver() -> bool:
    try:
        _driver_config.default  # noqa: B018
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def _no_dispatch_cache():
    old = os.environ.get("CVT_KERNELS_DISPATCH_CACHE")
    os.environ["CVT_KERNELS_DISPATCH_CACHE"] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CVT_KERNELS_DISPATCH_CACHE", None)
        else:
            os.environ["CVT_KERNELS_DISPATCH_CACHE"] = old


# ---------------------------------------------------------------- the calls a step makes
@dataclass(frozen=True)
class Block:
    """One CvT attention block's shapes."""
    model: str
    stage: int
    img: int
    dim: int
    heads: int
    side: int      # tokens per side of the map
    cls: bool

    def tag(self) -> str:
        return f"{self.model} s{self.stage} {self.img}px"


CVT_STAGES = {  # (dims, heads); CvT-21 has CvT-13's stage shapes (only depths differ)
    "cvt13": ((64, 192, 384), (1, 3, 6)),
    "cvtw24": ((192, 768, 1024), (3, 12, 16)),
}


def blocks(models: Sequence[str], imgs: Sequence[int]) -> List[Block]:
    out = []
    for model in models:
        dims, heads = CVT_STAGES[model]
        for img in imgs:
            side = (img + 2 * 2 - 7) // 4 + 1  # patch embed 7/4/2, then 3/2/1 twice
            for stage in range(3):
                out.append(Block(model, stage + 1, img, dims[stage], heads[stage], side,
                                 cls=stage == 2))
                side = (side + 2 - 3) // 2 + 1
    return out


def _empty(*shape, dtype):
    # Never read or written: only pointers, dtypes and divisibility matter to a compile.
    return torch.empty(shape, dtype=dtype)


def _drive_block(rec: Recorder, backend, blk: Block, batch: int, dtype: torch.dtype,
                 train: bool) -> None:
    """The Triton launches of one FusedConvAttention call on ``blk`` (forward and, in
    training, backward), as the ops layer makes them."""
    c, h = blk.dim, blk.side
    n_q = h * h + int(blk.cls)
    kv_side = (h - 1) // 2 + 1
    n_k = kv_side * kv_side + int(blk.cls)
    sdt = torch.float32
    x = _empty(batch, n_q, c, dtype=dtype)
    # Running buffers in the model's dtype, with a counter: a model converted with .to(dtype).
    params = ProjectionParams(
        conv_weight=_empty(c, 1, 3, 3, dtype=dtype), bn_weight=_empty(c, dtype=dtype),
        bn_bias=_empty(c, dtype=dtype), running_mean=_empty(c, dtype=dtype),
        running_var=_empty(c, dtype=dtype), num_batches_tracked=_empty(dtype=torch.int64),
        proj_weight=_empty(c, c, dtype=dtype), proj_bias=_empty(c, dtype=dtype))
    mean, rstd = _empty(c, dtype=sdt), _empty(c, dtype=sdt)
    mode = "train" if train else "eval"
    for name, stride in (("q", 1), ("kv", 2)):
        cfg = ProjectionConfig(stride=stride, with_cls_token=blk.cls)
        rec.call(f"{blk.tag()} b{batch} {_dname(dtype)} {mode} proj_{name}",
                 backend.conv_projection_reasons(x, cfg, train))
        if train:  # batch statistics, the running ones updated; eval reads those as they are
            backend.conv_projection_batch_stats(x, h, h, params, cfg, True, 0.1, 1e-5)
            backend.conv_projection_forward(x, h, h, params, mean, rstd, cfg)
        else:
            backend.conv_projection_forward(x, h, h, params, None, None, cfg, 1e-5)
        if train:
            n = n_q if stride == 1 else n_k
            backend.conv_projection_backward(_empty(batch, n, c, dtype=dtype), x, h, h, params,
                                             mean, rstd, cfg, True)
            if stride != 1:  # a block's k and v add their input gradients to q's (block_train)
                backend.conv_projection_backward_into(
                    _empty(*x.shape, dtype=dtype), _empty(batch, n, c, dtype=dtype), x, h, h,
                    params, mean, rstd, cfg, True)
    q, k, v = _empty(batch, n_q, c, dtype=dtype), _empty(batch, n_k, c, dtype=dtype), \
        _empty(batch, n_k, c, dtype=dtype)
    rec.call(f"{blk.tag()} b{batch} {_dname(dtype)} {mode} attention",
             backend.attention_reasons(q, k, v, blk.heads, 0.0))
    out, lse = backend.attention_forward(q, k, v, blk.heads, c ** -0.5)
    if train:
        backend.attention_backward(_empty(batch, n_q, c, dtype=dtype), q, k, v, out,
                                   _empty(batch, blk.heads, n_q, dtype=sdt), blk.heads, c ** -0.5)
    elif c // blk.heads <= one_pass.MAX_HEAD_DIM:
        # Eval's one-pass path: used where the attention is (its automatic flag stays).
        rec.shape = f"{blk.tag()} b{batch} {_dname(dtype)} {mode} one_pass"
        one_pass.one_pass_attention(
            x, h, h, params.conv_weight, params.running_mean, params.running_var, 1e-5,
            params.bn_weight, params.bn_bias,
            params.proj_weight, params.proj_bias, k, v, blk.heads, c ** -0.5, blk.cls,
            *((params.proj_weight, params.proj_bias) if blk.heads == 1 else ()))


def _drive_block_ops(rec: Recorder, backend, blk: Block, batch: int, dtype: torch.dtype,
                     train: bool) -> None:
    """The block scope's launches (``accelerate(scope="block")``) on ``blk``: both
    LayerNorms (the second with the residual add) and the MLP (QuickGELU, hidden 4x)."""
    if not hasattr(backend, "mlp_forward"):
        return
    c = blk.dim
    n = blk.side * blk.side + int(blk.cls)
    mode = "train" if train else "eval"
    x = _empty(batch, n, c, dtype=dtype)
    w, b = _empty(c, dtype=dtype), _empty(c, dtype=dtype)
    rec.call(f"{blk.tag()} b{batch} {_dname(dtype)} {mode} layer_norm",
             backend.layer_norm_reasons(x))
    for residual in (None, _empty(batch, n, c, dtype=dtype)):
        _, s, mean, rstd = backend.layer_norm_forward(x, residual, w, b, 1e-5)
        if train:
            backend.layer_norm_backward(x, residual, x if residual is not None else x, w,
                                        _empty(batch, n, dtype=torch.float32),
                                        _empty(batch, n, dtype=torch.float32), True)
    if not train:  # the stage norms: a conv output read as tokens (channels-major)
        backend.layer_norm_forward(_empty(batch, c, n, dtype=dtype).transpose(1, 2), None, w,
                                   b, 1e-5)
    rec.call(f"{blk.tag()} b{batch} {_dname(dtype)} {mode} mlp",
             backend.mlp_reasons(x, "quick_gelu"))
    w1, b1 = _empty(4 * c, c, dtype=dtype), _empty(4 * c, dtype=dtype)
    w2, b2 = _empty(c, 4 * c, dtype=dtype), _empty(c, dtype=dtype)
    # Training: with drop path (in the epilogue, the prologues of the backward) and z.
    rand = _empty(batch, 1, 1, dtype=dtype) if train else None
    out, z = backend.mlp_forward(x, w1, b1, w2, b2, "quick_gelu", x, drop_rand=rand,
                                 keep_prob=0.9, store_z=train)
    if train:
        backend.mlp_backward(x, x, w1, w2, _empty(batch * n, 4 * c, dtype=dtype),
                             "quick_gelu", True, True, drop_rand=rand, keep_prob=0.9)
    # The attention's output projection with the skip connection (ops/linear.py).
    wp = _empty(c, c, dtype=dtype)
    backend.linear_forward(x, wp, b, x, drop_rand=rand, keep_prob=0.9)
    if train:
        backend.linear_backward(x, x, wp, True, drop_rand=rand, keep_prob=0.9)
    else:  # eval: the block's norm2 in fc1's prologue
        backend.norm_mlp_forward(x, w, b, 1e-5, w1, b1, w2, b2, "quick_gelu", x)


def _drive_ragged(rec: Recorder, backend, dtype: torch.dtype) -> None:
    """Attention with 197 queries and 50 keys (no tile divides either), 3 heads of every
    head dim the kernels support (CvT's are all 64)."""
    for d in (16, 32, 64, 128):
        q, k, v = (_empty(2, n, 3 * d, dtype=dtype) for n in (197, 50, 50))
        rec.call(f"ragged 197x50 d{d} b2 {_dname(dtype)} train attention",
                 backend.attention_reasons(q, k, v, 3, 0.0))
        out, lse = backend.attention_forward(q, k, v, 3, (3 * d) ** -0.5)
        backend.attention_backward(_empty(2, 197, 3 * d, dtype=dtype), q, k, v, out,
                                   _empty(2, 3, 197, dtype=torch.float32), 3, (3 * d) ** -0.5)


def _dname(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


@contextlib.contextmanager
def _tf32(on: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# "fp32": float32 at torch's default precision (IEEE dots); "tf32": with TF32 allowed.
DTYPES = ("bf16", "fp16", "fp32", "tf32")
_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                "tf32": torch.float32}


# Which shapes each architecture is driven at. Every shape adds specializations (batch 1
# makes ``B == 1`` a constant; 384 px changes which token counts divide by 16), so the
# target GPU (sm_90) gets them all and the others the configs' worth (their launch configs
# depend on the architecture's limits, not on the shape).
SCOPES = {
    "quick": (["cvt13"], [224], [64]),
    "medium": (["cvt13", "cvtw24"], [224], [64]),
    "full": (["cvt13", "cvtw24"], [224, 384], [1, 64, 256]),
}
DEFAULT_SCOPE = {90: "full", 80: "medium", 86: "medium", 89: "medium"}


def run_launches(arch: int, scope: str = "quick",
                 progress: Optional[Callable[[str], None]] = None,
                 dtypes: Sequence[str] = DTYPES,
                 only: Optional[str] = None) -> List[Launch]:
    """Every launch the workloads make on a simulated ``sm_<arch>``, compiled (``only``:
    just the kernels whose name contains it)."""
    from cvt_kernels.backends.triton import TritonBackend

    backend = TritonBackend()
    target = _runtime.simulated_target(arch)
    models, imgs, batches = SCOPES[scope]
    with _compile_only(target, only) as rec, _autotune_on():
        if progress:
            rec.tick = _heartbeat(progress, rec, arch)
        for name in dtypes:
            dtype = _DTYPE_NAMES[name]
            with _tf32(name == "tf32"):
                for blk in blocks(models, imgs):
                    rec.what = f"{name} {blk.tag()}"
                    for batch in batches:
                        for train in (True, False):
                            _drive_block(rec, backend, blk, batch, dtype, train)
                            _drive_block_ops(rec, backend, blk, batch, dtype, train)
                    if progress:
                        progress(f"sm_{arch} {name} {blk.tag()}: {len(rec.launches)} launches")
                _drive_ragged(rec, backend, dtype)
    return rec.launches


HEARTBEAT_S = 10.0


def _heartbeat(progress: Callable[[str], None], rec: Recorder, arch: int) -> Callable[[], None]:
    """A "still compiling" line at most every :data:`HEARTBEAT_S` seconds."""
    start = last = time.monotonic()

    def tick() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= HEARTBEAT_S:
            last = now
            progress(f"sm_{arch} {rec.what}: still compiling ({len(rec.launches)} launches, "
                     f"{now - start:.0f} s)")
    return tick


# ------------------------------------------------------------------ attention spill tables
_ATTN_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv",
                 "_attn_bwd_dq_kernel": "dq"}


@contextlib.contextmanager
def _spill_tables_emptied():
    """Every attention candidate reaches the autotuner's list (the wgmma rule stays)."""
    tables = configs.ATTENTION_SPILLS
    saved = dict(tables)
    try:
        for family in tables:
            tables[family] = set()
        yield
    finally:
        tables.update(saved)


def attention_spills(arch: int, scope: str = "quick",
                     progress: Optional[Callable[[str], None]] = None) -> List[tuple]:
    """The entries of ``configs.ATTENTION_SPILLS[family]`` for ``arch`` under this Triton version:
    ``(kernel, operand bytes, BLOCK_D, (BLOCK_M, BLOCK_N, warps, stages))`` of every
    candidate that spills as launched, all candidates compiled unpruned at the workloads'
    shapes (fp16/bf16, and float32 with TF32: at IEEE precision every candidate spills and
    the backend declines the call as a whole)."""
    with _spill_tables_emptied():
        launches = run_launches(arch, scope, progress, dtypes=("bf16", "fp16", "tf32"),
                                only="|".join(_ATTN_KERNELS))
    binaries = analyse(arch, launches)
    out = set()
    for la in launches:
        if binaries[id(la.compiled)].spill:
            a = la.args
            out.add((_ATTN_KERNELS[la.kernel], a["Q"].dtype.itemsize, a["BLOCK_D"],
                     (a["BLOCK_M"], a["BLOCK_N"], la.num_warps, la.num_stages)))
    return sorted(out)


@contextlib.contextmanager
def _autotune_on():
    """The launchers autotune on a GPU unless told not to: the check must see the candidates,
    so ``CVT_KERNELS_AUTOTUNE=0`` from the caller's environment does not apply here."""
    old = os.environ.pop("CVT_KERNELS_AUTOTUNE", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["CVT_KERNELS_AUTOTUNE"] = old


# ------------------------------------------------------------------- what a binary costs
def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``REG``, ``SHARED``, ``LOCAL``, ``STACK`` of the (single) kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    return {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out)}


# Per-SM limits (CUDA programming guide, compute capabilities table): registers, threads'
# warps, resident blocks, shared memory per SM (usable by blocks; 1 KB per block reserved).
SM_LIMITS = {
    90: dict(regs=65536, warps=64, ctas=32, smem=233472),
    80: dict(regs=65536, warps=64, ctas=32, smem=167936),
    86: dict(regs=65536, warps=48, ctas=16, smem=102400),
    89: dict(regs=65536, warps=48, ctas=24, smem=102400),
}


def ctas_per_sm(arch: int, regs: int, smem: int, num_warps: int) -> int:
    """Resident blocks per SM (an estimate: register allocation per warp rounded up to 256
    registers, 1 KB of shared memory reserved per block)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["ctas"]
    return max(0, min(by_regs, by_warps, by_smem, lim["ctas"]))


@dataclass
class Binary:
    """One compiled kernel (one specialization of one config) for one architecture."""
    kernel: str
    arch: int
    config: str
    regs: int = -1
    spill: int = -1
    smem: int = -1
    ctas: int = 0
    wgmma: int = 0
    mma: int = 0
    cp_async: int = 0
    tma: int = 0
    half_dots: bool = False
    shapes: List[str] = field(default_factory=list)
    error: Optional[str] = None

    def problem(self) -> Optional[str]:
        if self.error:
            return self.error
        if self.spill:
            return f"{self.spill} bytes spilled"
        if self.smem > _runtime.SMEM_PER_BLOCK[self.arch]:
            return (f"{self.smem} bytes of shared memory > {_runtime.SMEM_PER_BLOCK[self.arch]}"
                    f" per block")
        if self.arch >= 90 and self.half_dots and self.mma and not self.wgmma:
            return "fp16/bf16 dots on mma.sync, not wgmma, on Hopper"
        if self.ctas == 0:
            return "no block fits on an SM"
        return None


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK", "BLOCK_D", "ROWS_PER_BLOCK")


def _config_text(launch: Launch) -> str:
    parts = [f"{k[6:] if k.startswith('BLOCK_') else k}{launch.args[k]}"
             for k in _CONFIG_KEYS if isinstance(launch.args.get(k), int)]
    return " ".join(parts) + f" w{launch.num_warps} st{launch.num_stages}"


def _spec_text(launch: Launch) -> str:
    """What the launch specialized on: operand dtype, flags, and which integer arguments
    were 1 or not a multiple of 16 (all others, strides included, were multiples of 16)."""
    bits = []
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor) or name in _CONFIG_KEYS:
            continue
        if name in launch.constexprs:
            if isinstance(value, (bool, int, str)):
                bits.append(f"{name}={int(value) if isinstance(value, bool) else value}")
        elif isinstance(value, int):
            if value == 1:
                bits.append(f"{name}=1")
            elif value % 16:
                bits.append(f"{name}%16!=0")
    return f"{_operand_dtype(launch)} " + " ".join(bits)


def _operand_dtype(launch: Launch) -> str:
    half = sorted({_dname(v.dtype) for v in launch.args.values()
                   if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16)})
    return "/".join(half) or "fp32"


def analyse(arch: int, launches: List[Launch]) -> Dict[int, Binary]:
    """Resource use of each distinct binary among ``launches`` (keyed by ``id``)."""
    out: Dict[int, Binary] = {}
    for launch in launches:
        key = id(launch.compiled)
        if key in out:
            continue
        b = Binary(launch.kernel, arch, _config_text(launch))
        try:
            usage = resource_usage(launch.compiled.asm["cubin"])
            ptx = launch.compiled.asm["ptx"]
        except Exception as exc:  # report every binary
            b.error = f"{type(exc).__name__}: {exc}"
            out[key] = b
            continue
        b.regs = usage.get("REG", -1)
        b.spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        b.smem = launch.compiled.metadata.shared + usage.get("SHARED", 0)
        b.ctas = ctas_per_sm(arch, b.regs, b.smem, launch.num_warps)
        b.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
        b.mma = len(re.findall(r"\bmma\.sync", ptx))
        b.tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
        b.cp_async = len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx))
        b.half_dots = _operand_dtype(launch) != "fp32"
        out[key] = b
    return out


# The longest loop one program runs, at the launch's shape (trip count). A kernel with no
# entry is reported as "-". Kernel authors: keep this beside any loop you change.
def _trip(launch: Launch) -> Optional[int]:
    a = launch.args
    fn = SERIAL_TRIPS.get(launch.kernel)
    return None if fn is None else int(fn(a, launch.grid))


SERIAL_TRIPS: Dict[str, Callable[[Dict[str, object], Tuple[int, int, int]], int]] = {
    "_attn_fwd_kernel": lambda a, g: cdiv(a["n_k"], a["BLOCK_N"]),
    "_attn_bwd_dq_kernel": lambda a, g: cdiv(a["n_k"], a["BLOCK_N"]),
    "_attn_bwd_dkdv_kernel": lambda a, g: cdiv(a["n_q"], a["BLOCK_M"]),
    "_one_pass_fwd_kernel": lambda a, g: max(cdiv(a["C_IN"], a["BLOCK_K"]),
                                             cdiv(a["n_k"], a["BLOCK_N"])),
    # conv projection: first levels loop over their run of row tiles, second levels over
    # tiles of BLOCK_P partials; the resident forward over its N slices
    "_stats_partials_kernel": lambda a, g: cdiv(a["ROWS_PER_PROGRAM"], a["BLOCK_M"]),
    "_stats_combine_kernel": lambda a, g: cdiv(a["N_PARTS"], a["BLOCK_P"]),
    "_param_grads_kernel": lambda a, g: cdiv(max(a["N_BN"], a["N_CONV"], a["N_W"]),
                                             a["BLOCK_P"]),
    "_forward_kernel": lambda a, g: (cdiv(cdiv(a["C_OUT"], a["BLOCK_N"]), a["N_SPLIT"])
                                     if a["RESIDENT"] else cdiv(a["C_IN"], a["BLOCK_K"])),
    "_grad_tokens_kernel": lambda a, g: cdiv(a["ROWS_PER_PROGRAM"], a["BLOCK_M"]) * (
        1 if a["FUSE_WEIGHT_GRAD"] else cdiv(a["C_OUT"], a["BLOCK_N"])),
    "_grad_conv_out_kernel": lambda a, g: cdiv(a["ROWS_PER_PROGRAM"], a["BLOCK_M"]) + (
        cdiv(a["N_BN"], a["BLOCK_P"]) if a["BATCH_STATS"] else 0),
    "_grad_input_kernel": lambda a, g: 1,
    "_layer_norm_fwd_kernel": lambda a, g: 1,
    "_layer_norm_bwd_kernel": lambda a, g: cdiv(a["ROWS_PER_PROGRAM"], a["BLOCK_M"]),
    "_gemm_kernel": lambda a, g: cdiv(a["K_PER_SPLIT"] if a["SPLIT_K"] else a["K"],
                                      a["BLOCK_K"]),
    "_grad_proj_weight_kernel": lambda a, g: cdiv(
        cdiv(a["B"] * (a["N_OUT"] + a["CLS"]), a["BLOCK_M"]), a["SPLIT"]),
}


def kernel_sources_digest() -> str:
    """A hash of every @triton.jit function's source in the kernel modules (helpers
    included): the committed reports name it, so a kernel edited without rerunning this
    check fails ``tests/test_launch_check.py``."""
    digest = hashlib.sha256()
    for module in KERNEL_MODULES:
        for name, obj in sorted(vars(module).items()):
            fn = getattr(obj, "fn", None)  # JITFunction (InterpretedFunction when interpreting)
            if (type(obj).__name__ in ("JITFunction", "InterpretedFunction") and fn is not None
                    and fn.__module__ == module.__name__):
                digest.update(f"{module.__name__}.{name}\n{inspect.getsource(fn)}".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------ report
def _binary_table(arch: int, binaries: Dict[int, Binary], launches: List[Launch]) -> List[str]:
    shapes: Dict[int, set] = {}
    specs: Dict[int, str] = {}
    for launch in launches:
        shapes.setdefault(id(launch.compiled), set()).add(launch.shape)
        specs.setdefault(id(launch.compiled), _spec_text(launch))
    automatic = {id(la.compiled) for la in launches if la.automatic}
    lines = [f"## sm_{arch}: compiled binaries ({len(binaries)}; use: auto = a call the "
             f"dispatcher may give the backend, forced = only when the triton backend is "
             f"forced)",
             f"{'kernel':24s} {'config':34s} {'regs':>4s} {'spill':>5s} {'smem':>6s} "
             f"{'cta/SM':>6s} {'wgmma':>5s} {'mma':>4s} {'cp.async':>8s} {'tma':>3s} "
             f"{'launches':>8s} {'use':>6s}  specialization"]
    for key, b in sorted(binaries.items(), key=lambda kv: (kv[1].kernel, kv[1].config,
                                                          specs[kv[0]])):
        if b.error:
            lines.append(f"{b.kernel:24s} {b.config:34s} FAILED {b.error}")
            continue
        use = "auto" if key in automatic else "forced"
        lines.append(f"{b.kernel:24s} {b.config:34s} {b.regs:>4d} {b.spill:>5d} {b.smem:>6d} "
                     f"{b.ctas:>6d} {b.wgmma:>5d} {b.mma:>4d} {b.cp_async:>8d} {b.tma:>3d} "
                     f"{len(shapes[key]):>8d} {use:>6s}  {specs[key]}")
    return lines


def _launch_table(arch: int, binaries: Dict[int, Binary], launches: List[Launch],
                  select: str) -> List[str]:
    target = _runtime.simulated_target(arch)
    lines = [f"## sm_{arch}: launches at {select} ({target.sm_count} SMs); waves = grid / "
             f"(CTAs per SM x SMs); serial = the longest loop one program runs (trips); "
             f"cand = an autotuner candidate",
             f"{'call':44s} {'kernel':24s} {'config':34s} {'grid':>16s} {'cta/SM':>6s} "
             f"{'waves':>6s} {'serial':>6s}"]
    for launch in launches:
        if select not in launch.shape:
            continue
        b = binaries[id(launch.compiled)]
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        waves = programs / max(1, b.ctas * target.sm_count)
        trip = _trip(launch)
        grid = "x".join(str(v) for v in launch.grid)
        lines.append(f"{launch.shape:44s} {launch.kernel:24s} "
                     f"{_config_text(launch) + (' cand' if launch.candidate else ''):34s} "
                     f"{grid:>16s} {b.ctas:>6d} {waves:>6.2f} "
                     f"{'-' if trip is None else trip:>6}")
    return lines


def targets(arch: int, binaries: Dict[int, Binary], launches: List[Launch],
            select: str) -> List[str]:
    """The issue's static targets at ``select`` (a shape substring), one line each: the
    longest serial loop of a second-level reduction (over partials), and the reduction
    and projection-forward launches that neither fit 2 CTAs per SM nor fill one wave."""
    out = []
    target = _runtime.simulated_target(arch)
    worst = max(((_trip(la) or 0, la) for la in launches
                 if select in la.shape and la.kernel in _SECOND_LEVEL),
                key=lambda t: t[0], default=(0, None))
    out.append(f"longest serial loop of a second-level reduction: {worst[0]} tiles of partials "
               f"({worst[1].kernel if worst[1] else '-'}; target: no more than ~64 partials)")
    short = 0
    for launch in launches:
        if select not in launch.shape or launch.kernel not in _FILL_TARGET:
            continue
        b = binaries[id(launch.compiled)]
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        if not (b.ctas >= 2 or programs >= b.ctas * target.sm_count):
            short += 1
            out.append(f"fill: {launch.shape} {launch.kernel} {_config_text(launch)}: "
                       f"{b.ctas} CTA/SM and {programs} programs (< 1 wave)")
    out.append(f"projection forward and reduction launches short of 2 CTAs/SM and of a full "
               f"wave: {short}")
    return out


_SECOND_LEVEL = ("_stats_combine_kernel", "_param_grads_kernel")
_FILL_TARGET = ("_forward_kernel", "_stats_partials_kernel", "_grad_conv_out_kernel",
                "_grad_tokens_kernel", "_grad_proj_weight_kernel") + _SECOND_LEVEL


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80, 86, 89],
                        choices=sorted(_runtime.SMEM_PER_BLOCK))
    parser.add_argument("--quick", action="store_true", help="CvT-13 at 224, batch 64 only "
                        "(default: every shape on sm_90, CvT-13 and W24 at 224, batch 64 on "
                        "the others)")
    parser.add_argument("--only", default=None, help="compile and report only kernels whose "
                        "name this regular expression finds (e.g. 'attn|one_pass')")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="fp32: float32 at torch's default (IEEE) precision; tf32: with "
                        "TF32 allowed")
    parser.add_argument("--table", default="cvt13 s", help="launch table: calls containing "
                        "this and --table-batch/--table-dtype (default: CvT-13 stages)")
    parser.add_argument("--table-batch", type=int, default=64)
    parser.add_argument("--table-dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--attention-spills", action="store_true",
                        help="print configs.ATTENTION_SPILLS entries for each --arch "
                        "instead: every attention candidate compiled unpruned (CvT-13 224 b64 and the ragged "
                        "shapes; the tables hold the union over Triton 3.9 and 3.6)")
    args = parser.parse_args(argv)
    if _runtime.interpreting():
        print("TRITON_INTERPRET is set: the kernels were loaded for the interpreter and cannot "
              "be compiled; run without it", file=sys.stderr)
        return 2
    # What a launch does by default under both Triton versions (3.9 warns it will change).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.time()
    print(f"triton {triton.__version__}; kernels {kernel_sources_digest()}; launch-faithful: "
          f"the launchers' own calls on a simulated GPU (float32 at "
          f"{'TF32' if torch.backends.cuda.matmul.allow_tf32 else 'IEEE'}, torch's default); "
          f"smem = dynamic + static bytes; CTAs/SM and waves are estimates")
    if args.attention_spills:
        for arch in args.arch:
            family = _runtime.simulated_target(arch).family
            entries = attention_spills(arch, progress=lambda m: print(f"# {m}", file=sys.stderr,
                                                                      flush=True))
            print(f"\n# sm_{arch} (family {family}), triton {triton.__version__}: "
                  f"{len(entries)} spilling candidates")
            print("{\n" + "".join(f"    {e!r},\n" for e in entries) + "}")
        return 0
    bad: List[str] = []
    forced_only: List[str] = []  # problems of binaries only a forced backend launches
    for arch in args.arch:
        scope = "quick" if args.quick else DEFAULT_SCOPE[arch]
        print(f"\n# sm_{arch}: {scope} shapes: models {SCOPES[scope][0]}, images "
              f"{SCOPES[scope][1]}, batches {SCOPES[scope][2]}, plus the ragged attention")
        launches = run_launches(arch, scope,
                                progress=lambda m: print(f"# {m}", file=sys.stderr, flush=True),
                                dtypes=args.dtype, only=args.only)
        binaries = analyse(arch, launches)
        shown = {k: b for k, b in binaries.items()
                 if not args.only or re.search(args.only, b.kernel)}
        print()
        print("\n".join(_binary_table(arch, shown, [la for la in launches
                                                     if id(la.compiled) in shown])))
        select = f"b{args.table_batch} {args.table_dtype}"
        table = [la for la in launches if args.table in la.shape and select in la.shape
                 and id(la.compiled) in shown]
        print()
        print("\n".join(_launch_table(arch, binaries, table, "")))
        print()
        print(f"## sm_{arch}: targets at {args.table} {select}")
        print("\n".join(targets(arch, binaries, table, "")))
        specs = {id(la.compiled): _spec_text(la) for la in launches}
        automatic = {id(la.compiled) for la in launches if la.automatic}
        for key, b in binaries.items():
            if b.problem():
                line = f"sm_{arch} {b.kernel} {b.config} [{specs[key]}]: {b.problem()}"
                (bad if key in automatic else forced_only).append(line)
    print(f"\n# {time.time() - start:.0f} s")
    if forced_only:
        print(f"\n{len(forced_only)} binaries run only when the triton backend is forced (the "
              f"dispatcher declines these calls, with the reason), and are not clean:")
        for line in sorted(forced_only):
            print(f"  {line}")
    if bad:
        print(f"\n{len(bad)} binaries must not ship:")
        for line in sorted(bad):
            print(f"  {line}")
        print(f"\n{len(bad)} binaries must not ship", file=sys.stderr)
        return 1
    print("\nevery binary a launch compiles: no spills, shared memory within limits, "
          "fp16/bf16 dots on wgmma on sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
