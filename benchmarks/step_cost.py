"""What one CvT step launches, counted on the ``meta`` device: kernels, bytes, FLOPs, where
they come from, and a roofline time that is an estimate, not a measurement.

    python -m benchmarks.step_cost                       # CvT-13 224, batch 64, bf16, all
    python -m benchmarks.step_cost --providers eager block-triton --modes eval
    python -m benchmarks.step_cost --model cvt_13-tiny --img-size 64 --batch 2 --no-save
    python -m benchmarks.step_cost --optimizer           # train rows include an AdamW step

Steps: ``train`` is forward, ``cross_entropy(logits.float(), labels)`` and backward, as in
``benchmarks.models`` but **without the optimizer step** unless ``--optimizer`` (AdamW,
``foreach=True`` as on CUDA); ``eval`` is a forward under ``torch.no_grad()``. Each step is
run once uncounted first (first-call work: lazy initialization, the dispatcher's
decisions), then counted. Nothing derived from the weights is kept between calls (issue 23),
so the counted step is every step.

Providers: ``eager`` (``cvt_kernels.models``), ``attention-<backend>`` and
``block-<backend>`` (``cvt_kernels.accelerate(model, scope=...)`` with ``use_backend``
forcing ``torch`` or ``triton``), ``block-triton-one-pass`` (eval only,
``CVT_KERNELS_ONE_PASS=1``; every other provider counts with it ``0``). The dispatcher runs
its fixed policy (``CVT_KERNELS_DISPATCH=fixed``: nothing is measured) with its decisions
file off, and Triton's autotuning off (``CVT_KERNELS_AUTOTUNE=0``: the launchers' shipped
default configuration, the first of their tables).

What counts as one launch (every rule is one kernel per op; CUDA sometimes launches more):

* **aten ops**: every op a ``TorchDispatchMode`` sees that would run a kernel on the GPU.
  Not launches: views and other aliasing ops (``OpOverload.is_view``: view, transpose,
  permute, expand, as_strided, t, (un)squeeze, slice/select/split, detach, alias;
  ``Tag.inplace_view``: t_, transpose_, ...), ``_unsafe_view`` and ``_reshape_alias``
  (views whose schema does not say so), allocations (empty, empty_like, empty_strided,
  new_empty, new_empty_strided, empty_permuted: memory, no kernel), storage metadata
  (resize_, set_), ops with no tensor result and nothing written (``promote_types``,
  profiler markers), ops on CPU tensors only (host work: AdamW's step counters), and ops
  whose tensors are all empty. ``reshape``/``contiguous`` reach the mode as a view (free)
  or a ``clone`` (one launch), as on the GPU. One launch per op even where CUDA runs
  several kernels for it (cuDNN convolutions with layout transposes, batch norm, LayerNorm
  backward's gamma/beta pass, split-K GEMMs, flash attention's backward, multi-block
  reductions), except ``_foreach_*`` ops, counted as CUDA's ``multi_tensor_apply`` launches
  them (at most 110/64/48/36/30 tensors for 1..5 tensor lists and 320 chunks of 65536
  elements per launch).
* **Triton launches**: ``JITFunction.run`` (and the interpreter's and the ``Autotuner``'s
  ``run``) are replaced for the duration of the count: a launch is recorded (kernel, grid,
  tensors), never compiled or run. The launchers pick configurations and grids for an
  H100 (``_runtime.simulate(_runtime.simulated_target(90))``).
* Kernels CUDA's ATen runs as aten ops of their own inside another (the profiler counts
  them): a cuDNN convolution's bias ``add_`` and ``convolution_backward``'s bias ``sum``.
* Host syncs (``.item()``, ``bool(t)``, data-dependent shapes) are reported with their
  call site (a GPU waits there, and CUDA-graph capture fails); ``.item()`` answers 1.

Making ``meta`` stand for CUDA while counting (all undone afterwards):

* Scaled-dot-product attention runs on the ``meta`` device as PyTorch's math composition
  (a dozen ops); a GPU runs one flash-attention kernel (bf16/fp16, head dim <= 256, no mask)
  or the memory-efficient one (float32). So ``F.scaled_dot_product_attention`` is replaced
  by the aten op a GPU would choose.
* The backends declare ``cpu`` and ``cuda`` (``Support.devices``) and the triton backend
  is unavailable without CUDA or the interpreter: on the registered instances ``meta`` is
  added and ``unavailable_reason`` is ``None``. The ops' ``no_autocast`` enters
  ``torch.autocast("meta")``, which raises (autocast has no meta device): a no-op on meta.
* Convolutions: meta returns every output contiguous; a GPU's cuDNN returns channels-last
  for a channels-last input (the torch backend's projections view the tokens that way), so
  the output is given that layout
  (:func:`_conv_layout_as_on_cuda`; BatchNorm on meta keeps a layout, as on a GPU). Before
  this, the count had copies of the normalized tokens that a GPU makes as views.
* Not emulated: ``torch_ops.linear_add`` takes its autocast branch for a device other than
  cpu/cuda (``residual + F.linear``: addmm + add) where CUDA runs add + ``addmm_``: the
  same launches, one output-sized read fewer per call (about 3% of block-triton eval's
  bytes). Gradient accumulation runs out of place (``add``) under a dispatch mode, in place
  (``add_``) on a GPU when it can: same launches and bytes.

Bytes per launch: every tensor it reads plus every tensor it writes, each at its extent
(elements over the dimensions with a non-zero stride, times the element size: a broadcast
bias counts once). aten: the inputs, plus the outputs and mutated arguments (an in-place
``add_`` reads and writes ``self``; ``copy_``, ``zero_``, ``fill_``, random fills and
``out=`` arguments are written only). Triton: each distinct tensor argument once, at its
full extent (a kernel is taken to read or write each of its tensors once): it overcounts a
tensor a kernel touches only in part (the projection backward's ``dx`` in
``_grad_tokens_kernel``, written only at the class token) and ignores re-reads (attention
reading K and V once per query tile, served mostly from L2); a tensor a kernel reads and
writes whole is counted twice (:data:`TRITON_READ_AND_WRITTEN`: the projection backward's
``dx`` when it accumulates).

FLOPs: the matrix and convolution math only, 2 per multiply-add, each useful product once
(what a kernel recomputes is not counted): aten through ``torch.utils.flop_counter``'s
formulas (mm, addmm, bmm, baddbmm, convolution and its backward, SDPA kernels); Triton
kernels by a formula per kernel from their arguments (:data:`TRITON_FLOPS`; a kernel not
in it, the elementwise and reduction ones, counts 0, as an aten elementwise op does).

Roofline estimate per launch: ``max(bytes / bandwidth, flops / peak, --min-us)``, summed
over the step; bandwidth and peak from ``benchmarks.common.PEAKS`` (H100 and H200: 800
dense 16-bit TFLOP/s; 3.0 and 4.8 TB/s), the float32 GEMM peak as TF32's. It ignores host
time, launch gaps, occupancy and caches: **an estimate to rank designs, never a measured
time**. With CvT-13 224 b64 bf16 it is compared with the committed H200 run
(:data:`CALIBRATION_DIR`): the profile's aten call counts, its device-kernel total and the
measured wall times, each ratio printed and saved.

Call sites: the innermost frame in ``cvt_kernels`` that issued the launch (not
``ops/_checks.py``, which every eager twin passes through); in backward, where autograd
runs an aten op with no Python frame, ``bwd of`` the forward's site (autograd anomaly mode
keeps the forward stack, ``check_nan=False``) and the autograd node's name; outside the
package, the caller's frame (the step's own loss: ``benchmarks/step_cost.py ... step``).

Output: a Markdown table to stdout (and the budgets of issue 24, met or not, and the
calibration), and ``<out>/<model>_<img>_b<batch>_<dtype>_<commit>{.csv,.md,_sites.csv}``
stamped with commit, versions and the command. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as _dt
import inspect
import os
import re
import shlex
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cvt_kernels

from ._autotune import pruned_configs
from .common import DTYPES, PEAKS, TINY, git_commit

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = str(Path(cvt_kernels.__file__).resolve().parent) + os.sep
THIS_FILE = str(Path(__file__).resolve())
DEFAULT_OUT = REPO / "benchmarks" / "results" / "step_cost"
CALIBRATION_DIR = REPO / "benchmarks" / "results" / "h200" / "2026-11-30_e4e1ada"
GPUS = ("H100", "H200")
MIN_US = 3.0  # a kernel's shortest device time: launch, ramp-up and drain on a Hopper GPU

aten = torch.ops.aten


# ---------------------------------------------------------------------------- records
@dataclass
class Launch:
    """One kernel launch a step would make on the GPU."""
    kind: str                 # "aten" or "triton"
    name: str                 # aten op (``mm``) or Triton kernel (``_forward_kernel``)
    site: str                 # where in cvt_kernels it comes from
    nbytes: int               # read + written
    flops: float
    tensor_core: bool = True  # 16-bit operands (the dense peak) rather than float32
    grid: Tuple[int, ...] = ()

    def est_us(self, gpu: str, min_us: float = MIN_US) -> float:
        peak = PEAKS[gpu]
        tflops = peak["tflops16"] if self.tensor_core else peak["tflops32"]
        return max(self.nbytes / (peak["tbps"] * 1e6), self.flops / (tflops * 1e6), min_us)


@dataclass
class StepCost:
    """Every launch of one counted step, and anything the count noticed."""
    launches: List[Launch] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    host_ops: Dict[str, int] = field(default_factory=dict)  # aten ops on CPU tensors only

    def total(self, what: str = "launches", kind: Optional[str] = None) -> float:
        rows = [x for x in self.launches if kind is None or x.kind == kind]
        if what == "launches":
            return len(rows)
        return sum(getattr(x, what) for x in rows)

    def est_ms(self, gpu: str, min_us: float = MIN_US) -> float:
        return sum(x.est_us(gpu, min_us) for x in self.launches) / 1e3

    def op_counts(self, kind: str = "aten") -> Dict[str, int]:
        out: Dict[str, int] = defaultdict(int)
        for x in self.launches:
            if x.kind == kind:
                out[x.name] += 1
        return dict(out)

    def sites(self, gpu: str = "H100", min_us: float = MIN_US) -> List[dict]:
        """Launches grouped by (kind, name, site), most launches first."""
        groups: Dict[tuple, dict] = {}
        for x in self.launches:
            g = groups.setdefault((x.kind, x.name, x.site), dict(
                kind=x.kind, name=x.name, site=x.site, launches=0, mb=0.0, gflop=0.0,
                est_us=0.0))
            g["launches"] += 1
            g["mb"] += x.nbytes / 1e6
            g["gflop"] += x.flops / 1e9
            g["est_us"] += x.est_us(gpu, min_us)
        return sorted(groups.values(), key=lambda g: (-g["launches"], -g["mb"]))


# ------------------------------------------------------------------------ call sites
_FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
# Plumbing every op passes through (an eager twin's ``apply``): never the call site.
_PLUMBING = (os.path.join(PACKAGE_DIR, "ops", "_checks.py"),)
_LIBRARIES = tuple(str(Path(m.__file__).resolve().parent) + os.sep
                   for m in (torch, contextlib))


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def _pick(frames: Iterator[Tuple[str, int, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(the innermost frame in the package, else None; the innermost other frame of ours
    or the caller's, else None) among ``frames`` (path, line, function), innermost first.
    Other frames: not torch, Triton or the standard library; of this file only the step
    itself (the loss and the backward call), not the counting machinery."""
    other = None
    for path, line, func in frames:
        if path.startswith(PACKAGE_DIR):
            if path not in _PLUMBING:
                return f"{_short(path)}:{line} {func}", other
            continue
        if other is None and not path.startswith(_LIBRARIES) and not path.startswith("<") \
                and f"{os.sep}triton{os.sep}" not in path \
                and (path != THIS_FILE or func == "step"):
            other = f"{_short(path)}:{line} {func}"
    return None, other


def _stack() -> Iterator[Tuple[str, int, str]]:
    f = sys._getframe(2)
    while f is not None:
        yield f.f_code.co_filename, f.f_lineno, f.f_code.co_name
        f = f.f_back


def call_site() -> str:
    """Where a launch comes from: the innermost frame in cvt_kernels; in backward, where
    autograd runs an op with no Python frame, ``bwd of`` the forward's site (anomaly mode
    keeps the forward's stack) and the autograd node; else the innermost caller's frame."""
    package, other = _pick(_stack())
    if package is not None:
        return package
    node = torch._C._current_autograd_node()
    if node is not None:
        lines = node.metadata.get("traceback_", []) if node.metadata else []
        frames = ((m.group(1), int(m.group(2)), m.group(3))
                  for m in (_FRAME_LINE.search(x) for x in reversed(lines)) if m)
        where = _pick(frames)
        return f"bwd of {where[0] or where[1] or '?'} ({node.name()})"
    return other or "outside cvt_kernels"


# ------------------------------------------------------------------------ aten counting
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
                aten.new_empty_strided, aten.empty_permuted}
# Metadata only, though their schemas do not say "view": same storage, new sizes/strides.
_METADATA = {aten._unsafe_view, aten._reshape_alias, aten.resize_, aten.set_, aten.lift_fresh}
# Mutating ops that overwrite their target without reading it.
_WRITE_ONLY = {aten.copy_, aten.zero_, aten.fill_, aten.uniform_, aten.normal_,
               aten.random_, aten.bernoulli_, aten.exponential_, aten.index_put_}
# CUDA's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): per launch at most
# this many tensors (by number of tensor lists) and this many chunks of CHUNK elements.
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS = 320
_MTA_CHUNK = 65536


def extent_bytes(t: torch.Tensor) -> int:
    """The memory a kernel touches to read or write ``t`` once: its elements over the
    dimensions with a non-zero stride (a broadcast operand counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _unique(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _written_args(func, args, kwargs) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(tensors the op writes among its arguments, those it only writes)."""
    written, write_only = [], []
    packet = func.overloadpacket
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        ts = _tensors(value)
        written += ts
        if packet in _WRITE_ONLY or a.name == "out" or a.is_out:
            write_only += ts
    return written, write_only


def is_launch(func, args, kwargs, out) -> bool:
    """Whether ``func`` would launch a kernel on the GPU (the rule in the module docstring)."""
    if func.namespace != "aten":  # profiler markers; custom ops show their inner launches
        return False
    # A view only makes new sizes and strides over the same storage: host work. (On CUDA
    # the copy a non-viewable reshape needs arrives here as its own ``clone``.)
    if func.is_view or torch.Tag.inplace_view in func.tags:
        return False
    packet = func.overloadpacket
    if packet in _ALLOCATIONS or packet in _METADATA:  # the caching allocator: no kernel
        return False
    ins = _tensors((args, kwargs))
    outs = _tensors(out)
    written, _ = _written_args(func, args, kwargs)
    if not outs and not written:  # answers a question (promote_types), touches no memory
        return False
    touched = ins + outs
    if not any(t.device.type != "cpu" for t in touched):  # runs on the host
        return False
    return any(t.numel() > 0 for t in touched)  # CUDA launches nothing for empty tensors


def _foreach_launches(args) -> int:
    """How many kernels CUDA's ``multi_tensor_apply`` launches for a ``_foreach_*`` op."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a
             and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    max_tensors = _MTA_TENSORS.get(len(lists), 30)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:  # ATen's loop: launch when the tensors or the blocks are full
        if t.numel() == 0:
            continue
        tensors += 1
        chunks = -(-t.numel() // _MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if blocks == _MTA_BLOCKS or (tensors == max_tensors and last):
                launches += 1
                blocks = 0
                tensors = 0 if last else 1  # a tensor split over launches is carried on
    return launches + (1 if blocks else 0)


def _aten_flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func.overloadpacket)
    if formula is None:
        return 0.0
    try:
        return float(formula(*args, **kwargs, out_val=out))
    except Exception:  # noqa: BLE001 (a formula that does not fit this overload: say 0)
        return 0.0


def _tensor_core(ts: Sequence[torch.Tensor]) -> bool:
    floats = [t for t in ts if t.is_floating_point()]
    return not floats or any(t.dtype in (torch.float16, torch.bfloat16) for t in floats)


def _nested_launches(func, args, kwargs, out) -> List[Tuple[str, List[torch.Tensor],
                                                            List[torch.Tensor]]]:
    """Kernels CUDA's ATen runs as separate aten ops inside ``func`` (the profiler counts
    them as calls of their own): (name, reads, writes) each. ATen/native/Convolution.cpp:
    a cuDNN convolution adds its bias with ``output.add_(bias)``; ``convolution_backward``
    sums ``grad_output`` for the bias gradient (no backend computes it itself)."""
    packet = func.overloadpacket
    if packet is aten.convolution:
        bias, groups = args[2], args[8]
        if bias is not None and groups == 1:  # depthwise kernels take the bias themselves
            return [("add_", [out, bias], [out])]
    if packet is aten.convolution_backward:
        mask = args[10] if len(args) > 10 else kwargs.get("output_mask")
        if mask is not None and mask[2] and out[2] is not None:
            return [("sum", [args[0]], [out[2]])]
    return []


def _placeholder(t: torch.Tensor):
    # What ``.item()`` of a meta tensor returns while counting: its value is unknown.
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


class AtenCounter(TorchDispatchMode):
    """Records every aten op that would launch a kernel into ``cost`` (and, apart, the
    aten ops that run on the host: CPU tensors only)."""

    def __init__(self, cost: StepCost):
        super().__init__()
        self.cost = cost

    def _note(self, text: str) -> None:
        if text not in self.cost.notes:
            self.cost.notes.append(text)

    def _host_op(self, name: str, args) -> None:
        # A CPU ``_foreach_*`` op runs per tensor (its slow path), and the profiler counts
        # each of those calls: AdamW's step counters, one ``add_`` per parameter.
        calls = 1
        if name.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple))]
            name, calls = name[len("_foreach_"):], len(lists[0]) if lists else 1
        self.cost.host_ops[name] = self.cost.host_ops.get(name, 0) + calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = [t for t in _tensors((args, kwargs)) if t.device.type != "cpu"]
        if on_device and (torch.Tag.data_dependent_output in func.tags
                          or torch.Tag.dynamic_output_shape in func.tags):
            # A value read on the host (``.item()``, ``bool(t)``, nonzero): a GPU
            # synchronizes here, and CUDA-graph capture fails. Reported, and ``.item()``
            # answers a placeholder so the count goes on.
            site = call_site()
            self._note(f"host sync: {func.overloadpacket.__name__} at {site}")
            if func.overloadpacket is aten._local_scalar_dense:
                self.cost.launches.append(Launch("aten", "_local_scalar_dense", site,
                                                 extent_bytes(on_device[0]), 0.0))
                return _placeholder(on_device[0])
        out = _conv_layout_as_on_cuda(func, args, func(*args, **kwargs))
        if func.namespace not in ("aten", "profiler"):
            self._note(f"non-aten op {func} ran uncounted (its inner aten ops are not seen)")
        if not is_launch(func, args, kwargs, out):
            if func.namespace == "aten" and not on_device and (_tensors(out) or _written_args(
                    func, args, kwargs)[0]):
                self._host_op(func.overloadpacket.__name__, args)
            return out
        written, write_only = _written_args(func, args, kwargs)
        skip = {id(t) for t in write_only}
        reads = _unique([t for t in _tensors((args, kwargs)) if id(t) not in skip])
        writes = _unique(_tensors(out) + written)
        nbytes = sum(map(extent_bytes, reads)) + sum(map(extent_bytes, writes))
        name = func.overloadpacket.__name__
        site = call_site()
        flops = _aten_flops(func, args, kwargs, out)
        core = _tensor_core(reads)
        n = _foreach_launches(args) if name.startswith("_foreach_") else 1
        for _ in range(n):  # bytes and FLOPs shared out over a foreach op's launches
            self.cost.launches.append(Launch("aten", name, site, nbytes // n, flops / n, core))
        for nested, r, w in _nested_launches(func, args, kwargs, out):
            self.cost.launches.append(Launch(
                "aten", nested, site, sum(map(extent_bytes, r)) + sum(map(extent_bytes, w)),
                0.0, core))
        return out


# ---------------------------------------------------------------------- Triton launches
def _int(v) -> int:
    return int(v) if isinstance(v, (int, torch.SymInt)) else 0


def _n(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _attention_flops(matmuls: int):
    # Each of the kernel's matmuls is (n_q x n_k x head_dim) per batch and head.
    def flops(a) -> float:
        return (2.0 * matmuls * a["Q"].shape[0] * _int(a["num_heads"]) * _int(a["n_q"])
                * _int(a["n_k"]) * _int(a["head_dim"]))
    return flops


def _projection_forward_flops(a) -> float:
    c_in, c_out = _int(a["C_IN"]), _int(a["C_OUT"])
    rows = _n(a["out_ptr"]) // max(c_out, 1)
    return 2.0 * rows * c_in * c_out + 2.0 * 9 * _int(a["B"]) * _int(a["N_OUT"]) * c_in


def _grad_tokens_flops(a) -> float:
    c_in, c_out = _int(a["C_IN"]), _int(a["C_OUT"])
    rows = _n(a["go_ptr"]) // max(c_out, 1)
    gemms = 2 if a.get("FUSE_WEIGHT_GRAD") else 1  # dt = dy W (+ dW = dy^T xhat)
    return 2.0 * gemms * rows * c_in * c_out


def _grad_weight_flops(a) -> float:
    c_in, c_out = _int(a["C_IN"]), _int(a["C_OUT"])
    return 2.0 * (_n(a["go_ptr"]) // max(c_out, 1)) * c_in * c_out


def _conv_taps_flops(a) -> float:  # a 3x3 depthwise pass over the output map
    return 2.0 * 9 * _int(a["B"]) * _int(a.get("N_OUT", _int(a.get("HO")) * _int(a.get("WO"))))\
        * _int(a["C"])


def _one_pass_flops(a) -> float:
    x, out = a["X"], a["Out"]
    batch, n_q, c_in = x.shape[0], _int(a["n_q"]), _int(a["C_IN"])
    heads, d, n_k = _int(a["num_heads"]), _int(a["head_dim"]), _int(a["n_k"])
    width = heads * d
    total = 2.0 * 9 * batch * n_q * c_in          # depthwise conv of the query map
    total += 2.0 * batch * n_q * c_in * width      # q projection
    total += 4.0 * batch * heads * n_q * n_k * d   # attention
    if a.get("HAS_PROJ"):
        total += 2.0 * batch * n_q * width * out.shape[-1]
    return total


#: FLOPs of one launch of each Triton kernel, from its bound arguments (see the docstring).
TRITON_FLOPS: Dict[str, Callable[[dict], float]] = {
    "_attn_fwd_kernel": _attention_flops(2),       # S = q k^T, o = p v
    "_attn_bwd_dq_kernel": _attention_flops(3),    # S, dP = dO v^T, dq = dS k
    "_attn_bwd_dkdv_kernel": _attention_flops(4),  # S, dP, dv = p^T dO, dk = dS^T q
    "_forward_kernel": _projection_forward_flops,
    "_grad_tokens_kernel": _grad_tokens_flops,
    "_grad_proj_weight_kernel": _grad_weight_flops,
    "_grad_conv_out_kernel": _conv_taps_flops,     # the depthwise weight's gradient
    "_grad_input_kernel": _conv_taps_flops,        # the depthwise conv's input gradient
    "_gemm_kernel": lambda a: 2.0 * _int(a["M"]) * _int(a["N"]) * _int(a["K"]),
    "_one_pass_fwd_kernel": _one_pass_flops,
}

_SIGNATURES: Dict[object, inspect.Signature] = {}


def _bound(fn, args, kwargs) -> Dict[str, object]:
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    return dict(bound.arguments)


def _grid(grid, meta) -> Tuple[int, ...]:
    g = grid(meta) if callable(grid) else grid
    return tuple(int(v) for v in g)


# Kernels that, with a compile-time switch on, read a tensor they write (whole): counted
# twice there. (_grad_tokens_kernel's ACCUMULATE touches only the class-token rows of its
# dx, already overcounted at dx's extent.)
TRITON_READ_AND_WRITTEN = {"_grad_input_kernel": ("ACCUMULATE", "dx_ptr")}


@contextlib.contextmanager
def recorded_triton_launches(sink: Callable[[], StepCost]) -> Iterator[None]:
    """Within this block every Triton launch (JIT, interpreter or autotuner) is recorded
    into ``sink()`` instead of being compiled and run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover (older Triton)
        pass

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        name = self.fn.__name__
        meta = _bound(self.fn, args, kwargs)
        tensors = _unique([v for v in meta.values() if isinstance(v, torch.Tensor)])
        formula = TRITON_FLOPS.get(name)
        flops = float(formula(meta)) if formula is not None else 0.0
        nbytes = sum(map(extent_bytes, tensors))
        flag, pointer = TRITON_READ_AND_WRITTEN.get(name, (None, None))
        if flag is not None and meta.get(flag):
            nbytes += extent_bytes(meta[pointer])  # read as well as written
        sink().launches.append(Launch(
            "triton", name, call_site(), nbytes, flops, _tensor_core(tensors),
            _grid(grid, meta)))
        return None

    def tuned_run(self, *args, **kwargs):
        # What the autotuner would launch after timing: its first candidate left after
        # pruning stands for it (no timing without a GPU).
        first = pruned_configs(self, args, kwargs)[0]
        return self.fn.run(*args, **kwargs, **first.all_kwargs())

    saved = [(cls, cls.__dict__["run"]) for cls in classes] + [(Autotuner,
                                                                 Autotuner.__dict__["run"])]
    for cls in classes:
        cls.run = run
    Autotuner.run = tuned_run
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


# -------------------------------------------------------------- making meta look like CUDA
def conv_layout_line(device: Optional[str] = None) -> str:
    """What this machine's depthwise convolution returns for a channels-last view of
    tokens, as the torch backend feeds it: the assumption of :func:`_conv_layout_as_on_cuda`
    checked where it applies (``gpu_session.sh`` writes this line into ``info.txt``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    channels, side = 8, 8
    tokens = torch.randn(2, side * side, channels, device=device, dtype=dtype)
    weight = torch.randn(channels, 1, 3, 3, device=device, dtype=dtype)
    out = F.conv2d(tokens.transpose(1, 2).unflatten(2, (side, side)), weight, None, 1, 1, 1,
                   channels)
    layout = ("channels-last" if out.is_contiguous(memory_format=torch.channels_last)
              else "NCHW" if out.is_contiguous() else f"strides {out.stride()}")
    return (f"depthwise conv of a channels-last {dtype} input on {device}: {layout} output "
            f"(benchmarks.step_cost counts channels-last, cuDNN's layout)")


def _conv_layout_as_on_cuda(func, args, out):
    """A 2-D convolution's output in the layout cuDNN gives it, where meta leaves every
    convolution output contiguous (its kernel has no device to decide by:
    ``torch._meta_registrations.meta_conv``). PyTorch's rule for CUDA
    (``cudnn_conv_suggest_memory_format`` in ATen's ``ConvUtils.h``, and
    ``use_cudnn_depthwise``, which takes cuDNN for every channels-last depthwise
    convolution): channels-last when the input or the weight suggests channels-last and
    neither is float64. The torch backend's projections feed the conv a channels-last view
    of the tokens; with an NCHW output, the token view after BatchNorm would be a copy on
    meta and a view on a GPU. (The backward's input gradient already follows the input's
    layout on meta, as cuDNN's does.)"""
    if func is not aten.convolution.default:
        return out
    inp, weight = args[0], args[1]
    if (out.device.type != "meta" or inp.dim() != 4
            or torch.float64 in (inp.dtype, weight.dtype)
            or torch.channels_last not in (suggest_memory_format(inp),
                                           suggest_memory_format(weight))
            or out.is_contiguous(memory_format=torch.channels_last)):
        return out
    return torch.empty(out.shape, dtype=out.dtype, device=out.device,
                       memory_format=torch.channels_last)


def _sdpa_as_on_cuda(original):
    """``F.scaled_dot_product_attention`` for meta tensors as a GPU runs it: one
    flash-attention op (16-bit, head dim a multiple of 8 up to 256, no mask) or one
    memory-efficient one (otherwise without a mask); anything else as given."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        d = query.shape[-1]
        plain = (query.device.type == "meta" and attn_mask is None and not enable_gqa
                 and query.shape[1] == key.shape[1])
        if plain and query.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if plain:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, None, grad, dropout_p, is_causal, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return sdpa


def _no_autocast_on_meta(original):
    # The package's no_autocast enters torch.autocast("meta", enabled=False), which raises:
    # autocast has no meta device. Nothing to switch off there.
    def no_autocast(t):
        if t.device.type == "meta":
            return contextlib.nullcontext()
        return original(t)
    return no_autocast


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def counting(sink: Callable[[], StepCost], one_pass: bool = False) -> Iterator[None]:
    """Everything a count needs, undone on exit: Triton launches recorded, the launchers
    simulating an H100 and the triton backend accepting meta tensors, the dispatcher's
    fixed policy (its remembered choices restored afterwards), autotuning off, SDPA as on
    a GPU, ``no_autocast`` a no-op on meta, and ``CVT_KERNELS_ONE_PASS``."""
    from cvt_kernels import backends
    from cvt_kernels.backends.triton import _runtime
    from cvt_kernels.ops import _checks

    saved_caches = [(d, dict(d)) for d in (backends._SELECTED, backends._CANDIDATES_OF)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_env(CVT_KERNELS_DISPATCH="fixed", CVT_KERNELS_DISPATCH_CACHE="off",
                                 CVT_KERNELS_AUTOTUNE="0",
                                 CVT_KERNELS_ONE_PASS="1" if one_pass else "0"))
        stack.enter_context(recorded_triton_launches(sink))
        # The launchers take their GPU path for non-CUDA tensors under simulate(), and the
        # backend's tensor reasons accept them; its unavailable_reason (no CUDA, no
        # interpreter) does not look at simulate(): on this instance it is None while
        # counting.
        stack.enter_context(_runtime.simulate(_runtime.simulated_target(90)))
        triton_backend = backends._REGISTRY.get("triton")
        if triton_backend is not None:
            stack.enter_context(_patched(triton_backend, "unavailable_reason", lambda: None))
        # The backends declare the devices they run on (cpu, cuda): on this instance, meta
        # stands for cuda while counting.
        for backend in backends._REGISTRY.values():
            support = getattr(backend, "support", None)
            if support is not None and "meta" not in support.devices:
                stack.enter_context(_patched(backend, "support", dataclasses.replace(
                    support, devices=tuple(support.devices) + ("meta",))))
        stack.enter_context(_patched(F, "scaled_dot_product_attention",
                                     _sdpa_as_on_cuda(F.scaled_dot_product_attention)))
        # Where the ops bound it, not in _checks itself: a module imported while counting
        # would otherwise keep the replacement for good.
        original = _checks.no_autocast
        replacement = _no_autocast_on_meta(original)
        for module in [m for name, m in list(sys.modules.items())
                       if name.startswith("cvt_kernels") and m is not None and m is not _checks]:
            if vars(module).get("no_autocast") is original:
                stack.enter_context(_patched(module, "no_autocast", replacement))
        try:
            yield
        finally:
            for d, old in saved_caches:
                d.clear()
                d.update(old)


# ------------------------------------------------------------------------- the steps
@dataclass(frozen=True)
class Provider:
    name: str
    scope: Optional[str]      # None: the eager reference model
    backend: Optional[str]
    one_pass: bool = False
    modes: Tuple[str, ...] = ("train", "eval")


PROVIDERS = {p.name: p for p in (
    Provider("eager", None, None),
    Provider("attention-torch", "attention", "torch"),
    Provider("attention-triton", "attention", "triton"),
    Provider("block-torch", "block", "torch"),
    Provider("block-triton", "block", "triton"),
    Provider("block-triton-one-pass", "block", "triton", one_pass=True, modes=("eval",)),
)}
MODES = ("train", "eval")


def build_model(name: str, img: int, dtype: torch.dtype) -> nn.Module:
    """``name`` from ``cvt_kernels.models`` (``-tiny``: benchmarks.models' small variant) on
    the meta device (no memory, no initialization)."""
    base, _, variant = name.partition("-")
    spec = None
    if variant:
        if variant != "tiny":
            raise ValueError(f"--model: unknown variant {variant!r} (expected <model>-tiny)")
        spec = TINY
    with torch.device("meta"):
        model = getattr(cvt_kernels.models, base)(img_size=img, spec_overrides=spec)
    return model.to(dtype)


def count_module(module: Callable[[], object], cost: Optional[StepCost] = None,
                 warmup: bool = False, between: Callable[[], None] = lambda: None,
                 one_pass: bool = False) -> StepCost:
    """The launches of ``step()`` (``module``: a callable that runs one step on meta
    tensors), after an uncounted warm-up call when ``warmup``."""
    cost = cost if cost is not None else StepCost()
    warm = StepCost()
    current = [warm]
    with counting(lambda: current[0], one_pass=one_pass), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode announces itself on every use
        if warmup:  # under the aten counter too: a host sync there is reported, not fatal
            with AtenCounter(warm):
                module()
            between()
        current[0] = cost
        with torch.autograd.set_detect_anomaly(True, check_nan=False), AtenCounter(cost):
            module()
    cost.notes += [f"{n} (warm-up step only)" for n in warm.notes if n not in cost.notes]
    return cost


def count_step(provider: Provider, mode: str, model_name: str, img: int, batch: int,
               dtype: torch.dtype, optimizer: bool = False,
               base: Optional[nn.Module] = None) -> StepCost:
    """One counted ``mode`` step of ``provider`` (a warm-up step first)."""
    model = copy.deepcopy(base) if base is not None else build_model(model_name, img, dtype)
    if provider.scope is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cvt_kernels.accelerate(model, scope=provider.scope)[0]
    model.train(mode == "train")
    x = torch.empty(batch, 3, img, img, device="meta", dtype=dtype)
    labels = torch.empty(batch, device="meta", dtype=torch.long)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
           if optimizer and mode == "train" else None)
    def step():
        with (cvt_kernels.use_backend(provider.backend) if provider.backend
              else contextlib.nullcontext()):
            if mode == "eval":
                with torch.no_grad():
                    model(x)
                return
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).float(), labels).backward()
            if opt is not None:
                opt.step()

    return count_module(step, warmup=True, one_pass=provider.one_pass)


# ------------------------------------------------------------------------- budgets
#: Issue 24's budgets at CvT-13 224, batch 64, bf16 (no optimizer step):
#: (provider, mode, what, limit); what is "launches" or "gb".
BUDGETS = [
    ("block-triton", "eval", "launches", 120), ("block-triton", "eval", "gb", 4.5),
    ("block-triton", "train", "launches", 700), ("block-triton", "train", "gb", 20.0),
    ("block-torch", "eval", "launches", 220), ("block-torch", "train", "launches", 1100),
]
BUDGET_SHAPE = ("cvt_13", 224, 64, "bfloat16")


def budget_lines(rows: List[dict], shape: tuple) -> List[str]:
    if shape != BUDGET_SHAPE:
        return [f"(the budgets are for {' '.join(map(str, BUDGET_SHAPE))}; not checked at "
                f"{' '.join(map(str, shape))})"]
    lines = []
    by = {(r["provider"], r["mode"]): r for r in rows}
    for provider, mode, what, limit in BUDGETS:
        r = by.get((provider, mode))
        if r is None:
            continue
        value = r["launches"] if what == "launches" else r["gb"]
        unit = "launches" if what == "launches" else "GB"
        verdict = "met" if value <= limit else "NOT met"
        lines.append(f"{provider} {mode}: {value:g} {unit} (budget <= {limit:g}): {verdict}")
    return lines


# --------------------------------------------------------------------- calibration
# The committed profile's aten rows whose count is not the same op here: on CUDA,
# ``_to_copy`` and ``clone`` run ``copy_`` inside (the profiler counts nested ops).
PROFILE_ALIASES = {"copy_": ("copy_", "_to_copy", "clone"),
                   "cudnn_convolution": ("convolution",)}


def read_profile(path: Path) -> Dict[str, dict]:
    """mode -> {"wall_ms", "device_ms", "calls": {aten op: count}} from a profile.txt of
    ``benchmarks.profile_step``."""
    out: Dict[str, dict] = {}
    if not path.exists():
        return out
    mode = None
    for line in path.read_text().splitlines():
        if line.startswith("== "):
            mode = line[3:].split(" | ")[0].strip()
            wall = re.search(r"([\d.]+) ms/step", line)
            out[mode] = {"wall_ms": float(wall.group(1)) if wall else None, "device_ms": None,
                         "calls": {}, "header": line[3:]}
            continue
        if mode is None:
            continue
        m = re.match(r"\s*aten::(\S+)\s.*\s(\d+)\s*$", line)
        if m:
            out[mode]["calls"][m.group(1)] = int(m.group(2))
        m = re.match(r"Self CUDA time total:\s*([\d.]+)(ms|us|s)", line)
        if m:
            scale = {"ms": 1.0, "us": 1e-3, "s": 1e3}[m.group(2)]
            out[mode]["device_ms"] = float(m.group(1)) * scale
    return out


def read_models_csv(path: Path) -> Dict[Tuple[str, str], float]:
    """(provider, mode) -> measured ms from a ``benchmarks.models`` CSV (CvT-13 224 b64)."""
    out: Dict[Tuple[str, str], float] = {}
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (r.get("model"), r.get("img"), r.get("batch")) == ("cvt_13", "224", "64") \
                    and r.get("status") == "ok":
                out[(r["provider"], r["mode"])] = float(r["ms"])
    return out


# The committed run's providers as this counter names them: "accelerated" was attention
# scope on the triton backend there (the automatic choice at e4e1ada; the profile forced it).
CALIBRATION_PROVIDERS = {"eager": "eager", "accelerated": "attention-triton"}


def calibration(costs: Dict[Tuple[str, str], StepCost], optimizer: Optional[StepCost],
                shape: tuple, with_optimizer: bool) -> List[str]:
    """Lines comparing the counts and the H200 estimate with the committed H200 run."""
    if shape != BUDGET_SHAPE:
        return [f"calibration: n/a (the committed H200 run is {BUDGET_SHAPE}; this is {shape})"]
    profile = read_profile(CALIBRATION_DIR / "profile.txt")
    measured = read_models_csv(CALIBRATION_DIR / "bench" / "models_quick.csv")
    if not profile and not measured:
        return [f"calibration: n/a ({CALIBRATION_DIR} not found)"]
    rel = _short(str(CALIBRATION_DIR))
    lines = [f"Calibration against {rel} (NVIDIA H200, torch 2.11, Triton 3.6, commit e4e1ada; "
             f"counted here at this commit, so paths changed since then differ):"]
    extra = "" if with_optimizer or optimizer is None else " + the AdamW step counted apart"
    for mode in MODES:
        cost = costs.get(("attention-triton", mode))
        prof = profile.get(mode)
        if cost is None or prof is None:
            continue
        # The profiler counts host-side aten calls too (AdamW's step counters are CPU
        # tensors): they are added here, though they launch nothing.
        parts = [cost] + ([optimizer] if mode == "train" and optimizer is not None
                          and not with_optimizer else [])
        ours: Dict[str, int] = defaultdict(int)
        for c in parts:
            for k, v in list(c.op_counts("aten").items()) + list(c.host_ops.items()):
                ours[k] += v
        pairs = []
        for op, n in sorted(prof["calls"].items()):
            mine = sum(ours.get(a, 0) for a in PROFILE_ALIASES.get(op, (op,)))
            pairs.append(f"{op} {n}/{mine}" + ("" if n == mine else " (differs)"))
        same = sum(1 for p in pairs if "differs" not in p)
        lines.append(f"- {mode}, attention-triton{extra if mode == 'train' else ''}: aten "
                     f"calls (profile/counted) {', '.join(pairs)}: {same} of {len(pairs)} equal")
    for measured_name, ours_name in CALIBRATION_PROVIDERS.items():
        for mode in MODES:
            cost = costs.get((ours_name, mode))
            if cost is None:
                continue
            est = cost.est_ms("H200")
            roofline = cost.est_ms("H200", 0.0)  # without the per-kernel minimum
            launches = cost.total()
            if mode == "train" and optimizer is not None and not with_optimizer:
                est += optimizer.est_ms("H200")
                roofline += optimizer.est_ms("H200", 0.0)
                launches += optimizer.total()
            parts = [f"- {mode}, {ours_name}{extra if mode == 'train' else ''}: estimate "
                     f"{est:.2f} ms on H200 ({launches} launches)"]
            prof = profile.get(mode) if ours_name == "attention-triton" else None
            if prof and prof.get("device_ms"):
                per_kernel = (prof["device_ms"] - roofline) * 1e3 / max(launches, 1)
                parts.append(f"profile device-kernel total {prof['device_ms']:.2f} ms "
                             f"(x{prof['device_ms'] / est:.2f} the estimate; the roofline "
                             f"without a minimum, {roofline:.2f} ms, plus {per_kernel:.1f} us "
                             f"per kernel would match it)")
            if prof and prof.get("wall_ms"):
                parts.append(f"profile wall {prof['wall_ms']:.2f} ms/step "
                             f"(x{prof['wall_ms'] / est:.2f})")
            wall = measured.get((measured_name, mode))
            if wall is not None:
                host_us = (wall - est) * 1e3 / max(launches, 1)
                parts.append(f"benchmarks.models {wall:.2f} ms (x{wall / est:.2f}; "
                             f"{host_us:.0f} us per launch beyond the estimate)")
            lines.append("; ".join(parts))
    return lines


# ---------------------------------------------------------------------------- output
def summary_row(provider: str, mode: str, cost: StepCost, min_us: float) -> dict:
    return {
        "provider": provider, "mode": mode,
        "launches": int(cost.total()),
        "aten_launches": int(cost.total(kind="aten")),
        "triton_launches": int(cost.total(kind="triton")),
        "gb": round(cost.total("nbytes") / 1e9, 2),
        "gflop": round(cost.total("flops") / 1e9, 1),
        **{f"est_ms_{g.lower()}": round(cost.est_ms(g, min_us), 2) for g in GPUS},
    }


def markdown_table(rows: List[dict]) -> str:
    head = ("| provider | mode | launches | aten | triton | GB | GFLOP | est. ms H100 | "
            "est. ms H200 |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['provider']} | {r['mode']} | {r['launches']} | {r['aten_launches']} | "
        f"{r['triton_launches']} | "
        f"{r['gb']:.2f} | {r['gflop']:.1f} | {r['est_ms_h100']:.2f} | {r['est_ms_h200']:.2f} |\n"
        for r in rows)


def sites_table(cost: StepCost, top: int, min_us: float) -> str:
    lines = ["| launches | kind | op / kernel | site | MB | est. us H100 |",
             "|---|---|---|---|---|---|"]
    for g in cost.sites("H100", min_us)[:top]:
        lines.append(f"| {g['launches']} | {g['kind']} | {g['name']} | {g['site']} | "
                     f"{g['mb']:.1f} | {g['est_us']:.0f} |")
    return "\n".join(lines) + "\n"


def _versions() -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch_version": torch.__version__, "triton_version": triton_version}


class Progress:
    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.t0, self.quiet = total, 0, time.perf_counter(), quiet

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[step_cost {self.done}/{self.total}, {time.perf_counter() - self.t0:.0f} s] "
                  f"{what}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="cvt_13", help="cvt_13, cvt_21, cvt_w24, or <model>-tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--optimizer", action="store_true",
                   help="include an AdamW (foreach) step in the train rows")
    p.add_argument("--min-us", type=float, default=MIN_US,
                   help="the estimate's shortest kernel, microseconds")
    p.add_argument("--top", type=int, default=8, help="call sites shown per row on stdout "
                   "(the .md file holds 25)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the results files")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    shape = (args.model, args.img_size, args.batch, args.dtype)
    jobs = [(PROVIDERS[n], m) for n in args.providers for m in args.modes
            if m in PROVIDERS[n].modes]
    calibrate = shape == BUDGET_SHAPE and "train" in args.modes \
        and "attention-triton" in args.providers and not args.optimizer
    progress = Progress(len(jobs) + int(calibrate), args.quiet)
    base = build_model(args.model, args.img_size, dtype)
    costs: Dict[Tuple[str, str], StepCost] = {}
    for provider, mode in jobs:
        costs[(provider.name, mode)] = count_step(provider, mode, args.model, args.img_size,
                                                  args.batch, dtype, args.optimizer, base)
        progress(f"counted {provider.name} {mode}: {costs[(provider.name, mode)].total():.0f} "
                 f"launches")
    optimizer = None
    if calibrate:  # the measured train steps include AdamW: count it once, on its own
        optimizer = count_optimizer(base)
        progress(f"counted an AdamW step apart (calibration): {optimizer.total():.0f} launches")
    rows = [summary_row(n, m, c, args.min_us) for (n, m), c in costs.items()]
    commit = git_commit()
    versions = _versions()
    step = ("forward + cross-entropy + backward" + (" + AdamW step" if args.optimizer else
                                                    " (no optimizer step)"))
    command = " ".join(["python -m benchmarks.step_cost",
                        shlex.join(list(argv if argv is not None else sys.argv[1:]))]).strip()
    header = [f"model {args.model}, {args.img_size}x{args.img_size}, batch {args.batch}, "
              f"{args.dtype}; train = {step}; eval = forward under no_grad",
              f"commit {commit}; torch {versions['torch_version']}; triton "
              f"{versions['triton_version']}; "
              f"counted on the meta device (Triton launchers simulating sm_90); "
              f"{progress.elapsed():.0f} s",
              f"ESTIMATE, not a measurement: sum over launches of max(bytes / bandwidth, "
              f"flops / peak, {args.min_us:g} us) (H100 3.0 TB/s, H200 4.8 TB/s, 800 TFLOP/s)"]
    budgets = budget_lines(rows, shape)
    calib = (calibration(costs, optimizer, shape, args.optimizer) if calibrate else
             ["calibration: run the default shape with attention-triton train (and no "
              "--optimizer) to compare with the committed H200 run"])
    notes = sorted({n for c in costs.values() for n in c.notes})
    print("\n".join(header) + "\n")
    print(markdown_table(rows))
    if budgets:
        print("Budgets (issue 24):\n" + "\n".join("- " + b for b in budgets) + "\n")
    print("\n".join(calib) + "\n")
    for (n, m), c in costs.items():
        print(f"Top call sites, {n} {m}:\n{sites_table(c, args.top, args.min_us)}")
    for n in notes:
        print(f"note: {n}")
    if not args.no_save:
        write_results(Path(args.out), shape, commit, versions, command, header, rows, budgets,
                      calib, costs, notes, args.min_us)
    return 0


def count_optimizer(base: nn.Module) -> StepCost:
    """One AdamW step (``foreach=True``, as CUDA defaults to) over ``base``'s parameters,
    after an uncounted one (the first allocates the state)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    return count_module(opt.step, warmup=True)


def write_results(out: Path, shape: tuple, commit: str, versions: Dict[str, str],
                  command: str, header: List[str], rows: List[dict], budgets: List[str],
                  calib: List[str], costs: Dict[Tuple[str, str], StepCost],
                  notes: List[str], min_us: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, img, batch, dtype = shape
    stem = out / f"{model}_{img}_b{batch}_{dtype}_{commit.split('+')[0]}"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stamp = {"model": model, "img": img, "batch": batch, "dtype": dtype, "commit": commit,
             **versions, "date": date, "command": command}
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(stamp))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **stamp})
    with open(f"{stem}_sites.csv", "w", newline="") as f:
        fields = ["provider", "mode", "kind", "name", "site", "launches", "mb", "gflop",
                  "est_us_h100"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for (n, m), c in costs.items():
            for g in c.sites("H100", min_us):
                w.writerow({"provider": n, "mode": m, "kind": g["kind"], "name": g["name"],
                            "site": g["site"], "launches": g["launches"],
                            "mb": round(g["mb"], 2), "gflop": round(g["gflop"], 3),
                            "est_us_h100": round(g["est_us"], 1)})
    with open(f"{stem}.md", "w") as f:
        f.write(f"# Step cost, counted on the meta device: {model} {img} b{batch} {dtype}\n\n")
        f.write("".join(f"- {h}\n" for h in header))
        f.write(f"- date: {date}\n- command: `{command}`\n- rules: one launch per aten op "
                f"that launches a kernel (views, allocations and host-side ops excluded) and "
                f"per Triton launch (recorded, not run); bytes = extents read + written; "
                f"FLOPs = matrix and convolution math (the docstring of "
                f"benchmarks/step_cost.py)\n\n")
        f.write(markdown_table(rows) + "\n")
        if budgets:
            f.write("## Budgets (issue 24)\n\n" + "".join(f"- {b}\n" for b in budgets) + "\n")
        f.write("## Calibration\n\n" + "\n".join(calib) + "\n\n")
        f.write("## Top call sites (by launches)\n\n")
        for (n, m), c in costs.items():
            f.write(f"### {n} {m}\n\n{sites_table(c, 25, min_us)}\n")
        if notes:
            f.write("## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"wrote {_short(str(stem))}.csv, .md and _sites.csv", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
