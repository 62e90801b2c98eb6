"""Will the Triton kernels compile for H100/A100, and at what cost? Checked without a GPU.

``python -m cvt_kernels.backends.triton.aot [--arch 90 80] [--full] [--only NAME]``

Compiles every kernel config the launchers can pick (``gemm_config``/``tile_config`` on a
GPU) for ``GPUTarget("cuda", arch, 32)`` ahead of time, runs the ``cuobjdump`` bundled
with Triton on each cubin and prints registers, shared memory, spilled (LOCAL) bytes and
whether the PTX uses Hopper's ``wgmma`` or the older ``mma``. Exits 1 when a config
spills, needs more shared memory than the architecture has, or fails to compile: each is
a bug to fix before a GPU ever sees it.

By default stride 2 with a class token is compiled (the superset of the code paths;
registers do not depend on the stride); ``--full`` adds every stride/class-token pair.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention as attn
from . import configs as cfgs
from . import conv_projection as cp
from . import one_pass
from ._runtime import interpreting

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Job:
    name: str       # kernel + config, for the table
    kernel: object  # the @triton.jit function
    args: Dict[str, object]  # "*fp16"-style pointer, "i32", or a constexpr value
    num_warps: int
    num_stages: int = 1
    tensor_cores: bool = False  # its dots are fp16/bf16 GEMMs: on sm_90 they must be wgmma


# Integer arguments the launchers pass that are multiples of 16 in every CvT config (channel
# counts 64/192/384...); on a GPU the JIT specializes them as such, and pointers are
# 16-byte aligned (fresh allocations), which is what lets loads vectorize.
_DIVISIBLE_INTS = {"C", "C_IN", "C_OUT"}


def _signature(kernel, args: Dict[str, object]):
    """``triton.compile`` arguments, with the JIT's divisibility-by-16 specialization."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if isinstance(value, str) and (value.startswith("*") or value in ("i32", "fp32")):
            signature[name] = value
            if value.startswith("*") or name in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return signature, constexprs, attrs


def _ints(*names: str) -> Dict[str, str]:
    return {n: "i32" for n in names}


def jobs(full: bool = False, arch: int = 90) -> Iterator[Job]:
    """Every kernel config the launchers pick on a GPU, for each dtype."""
    geometry = [(2, 1)] if not full else [(s, c) for s in (1, 2) for c in (0, 1)]
    tiles = [cp.GPU_TILE_CONFIG]
    for dtype in _DTYPES:
        x, acc = _PTR[dtype], "*fp32"
        dname = str(dtype).replace("torch.", "")
        precision = "tf32" if dtype == torch.float32 else "ieee"
        half = dtype.itemsize == 2
        size = 2 if half else 4
        for stride, cls in geometry:
            geo = dict(STRIDE=stride, CLS=cls)
            tag = f"{dname} s{stride}{' cls' if cls else ''}"
            st = cfgs.GPU_STATS_TILE[size]
            yield Job(f"stats_partials  {tag} M{st.block_m} C{st.block_c} w{st.num_warps}",
                      cp._stats_partials_kernel, dict(
                          x_ptr=x, taps_ptr=x, part_ptr=acc,
                          **_ints("B", "H", "W", "WO", "N_OUT", "C", "ROWS_PER_PROGRAM"),
                          **geo, BLOCK_M=st.block_m, BLOCK_C=st.block_c), st.num_warps)
            for t in tiles:
                ttag = f"{tag} M{t.block_m} C{t.block_c} w{t.num_warps}"
                yield Job(f"grad_input      {ttag}", cp._grad_input_kernel, dict(
                    dy_ptr=acc, taps_ptr=x, dx_ptr=x, **_ints("B", "H", "W", "HO", "WO", "C"),
                    **geo, BLOCK_M=t.block_m, BLOCK_C=t.block_c), t.num_warps)
            gt = cfgs.GPU_GRAD_CONV_TILE[size]
            for batch_stats in (True, False):
                yield Job(f"grad_conv_out   {tag} M{gt.block_m} C{gt.block_c} w{gt.num_warps}"
                          f"{' train' if batch_stats else ' eval'}",
                          cp._grad_conv_out_kernel, dict(
                              x_ptr=x, taps_ptr=x, mean_ptr=acc, rstd_ptr=acc, bnw_ptr=x,
                              sums_ptr=acc, dz_ptr=acc, part_ptr=acc,
                              **_ints("B", "H", "W", "WO", "N_OUT", "C", "ROWS_PER_PROGRAM"),
                              **geo, HAS_BN_W=True, BATCH_STATS=batch_stats,
                              BLOCK_M=gt.block_m, BLOCK_C=gt.block_c), gt.num_warps)
            forward_args = dict(x_ptr=x, taps_ptr=x, mean_ptr=acc, rstd_ptr=acc, bnw_ptr=x,
                                bnb_ptr=x, pw_ptr=x, pb_ptr=x, out_ptr=x,
                                **_ints("B", "H", "W", "WO", "N_OUT", "C_IN", "C_OUT",
                                        "N_SPLIT"),
                                HAS_BN_W=True, HAS_BN_B=True, HAS_BIAS=True, **geo,
                                DOT_PRECISION=precision)
            # The resident forward (normalized row tile built once) at its most K slices.
            for g, slices, _ in cfgs.GPU_RESIDENT_FORWARD[size]:
                yield Job(f"forward resident {tag} {g.block_m}x{g.block_n}x{g.block_k}x{slices} "
                          f"w{g.num_warps} st{g.num_stages}", cp._forward_kernel, dict(
                              forward_args, RESIDENT=True, NUM_K=slices, BLOCK_M=g.block_m,
                              BLOCK_N=g.block_n, BLOCK_K=g.block_k), g.num_warps, g.num_stages,
                          half)
            for g in cfgs.GPU_FORWARD_KLOOP_CONFIGS[size]:
                gtag = f"{tag} {g.block_m}x{g.block_n}x{g.block_k} w{g.num_warps} st{g.num_stages}"
                yield Job(f"forward         {gtag}", cp._forward_kernel, dict(
                    forward_args, RESIDENT=False, NUM_K=1, BLOCK_M=g.block_m, BLOCK_N=g.block_n,
                    BLOCK_K=g.block_k), g.num_warps, g.num_stages, half)
            for g in cfgs.GPU_GRAD_TOKENS_CONFIGS[size]:
                gtag = f"{tag} {g.block_m}x{g.block_n}x{g.block_k} w{g.num_warps} st{g.num_stages}"
                # fused d_proj_weight: C_out <= FUSED_WEIGHT_GRAD_MAX_C_OUT, the narrow tile
                fusable = g.block_n <= cfgs.FUSED_WEIGHT_GRAD_MAX_C_OUT
                for fuse in (False, True) if fusable else (False,):
                    yield Job(f"grad_tokens     {gtag}{' wgrad' if fuse else ''}",
                              cp._grad_tokens_kernel, dict(
                                  go_ptr=x, pw_ptr=x, x_ptr=x, taps_ptr=x, mean_ptr=acc,
                                  rstd_ptr=acc, bnw_ptr=x, bnb_ptr=x, dz_ptr=acc, dx_ptr=x,
                                  part_ptr=acc, w_part_ptr=acc,
                                  **_ints("B", "H", "W", "WO", "N_OUT", "C_IN", "C_OUT",
                                          "ROWS_PER_PROGRAM"),
                                  **geo, HAS_BN_W=True, HAS_BN_B=True, HAS_BIAS=True,
                                  FUSE_WEIGHT_GRAD=fuse, DOT_PRECISION=precision,
                                  BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k),
                              g.num_warps, g.num_stages, half)
            for g, _ in cfgs.GPU_WEIGHT_GRAD_CONFIGS[size]:
                gtag = f"{tag} {g.block_m}x{g.block_n}x{g.block_k} w{g.num_warps} st{g.num_stages}"
                yield Job(f"grad_proj_weight {gtag}", cp._grad_proj_weight_kernel, dict(
                    go_ptr=x, x_ptr=x, taps_ptr=x, mean_ptr=acc, rstd_ptr=acc, bnw_ptr=x,
                    bnb_ptr=x, part_ptr=acc,
                    **_ints("B", "H", "W", "WO", "N_OUT", "C_IN", "C_OUT", "SPLIT"),
                    HAS_BN_W=True, HAS_BN_B=True, HAS_BIAS=True, **geo,
                    DOT_PRECISION=precision, BLOCK_M=g.block_m, BLOCK_N=g.block_n,
                    BLOCK_K=g.block_k), g.num_warps, g.num_stages, half)
    yield from attention_jobs(arch)
    yield from one_pass_jobs()
    # dtype-independent (float32 statistics/partials)
    r = cfgs.GPU_REDUCE
    yield Job(f"stats_combine   fp32 P{r.block_p} C{r.block} w{r.num_warps}",
              cp._stats_combine_kernel, dict(
                  part_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32",
                  **_ints("N_PARTS", "TOTAL", "C", "ROWS_PER_PART"), BLOCK_P=r.block_p,
                  BLOCK_C=r.block), r.num_warps)
    yield Job(f"sum_partials    fp32 P{r.block_p} C{r.block} w{r.num_warps}",
              cp._sum_partials_kernel, dict(
                  part_ptr="*fp32", out_ptr="*fp32", **_ints("N_PARTS", "N_COLS"),
                  BLOCK_P=r.block_p, BLOCK=r.block), r.num_warps)


def attention_jobs(arch: int) -> Iterator[Job]:
    """Every attention config a GPU of ``arch`` can run: the autotune candidates left after
    the spill table and, for fp16/bf16 on sm_90, the wgmma rule (the first is the default)."""
    family = 90 if arch >= 90 else 80
    for dtype in _DTYPES:
        x = _PTR[dtype]
        dname = str(dtype).replace("torch.", "")
        half = dtype.itemsize == 2
        for head_dim in (16, 32, 64, 128):  # up to attn.MAX_HEAD_DIM
            block_d = max(16, triton.next_power_of_2(head_dim))
            common = dict(ACC_DTYPE=tl.float32, BLOCK_D=block_d, EVEN_D=head_dim == block_d,
                          INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                          **_ints("num_heads", "n_q", "n_k", "head_dim"))
            for m, n, w, st in attn.shipped_configs("fwd", dtype, head_dim, family):
                yield Job(f"attn_fwd        {dname} d{head_dim} {m}x{n} w{w} st{st}",
                          attn._attn_fwd_kernel, dict(
                              Q=x, K=x, V=x, Out=x, Lse="*fp32",
                              **_ints(*(f"stride_{t}{d}" for t in "qkvo" for d in "bn")),
                              qk_scale_log2="fp32", BLOCK_M=m, BLOCK_N=n, **common), w, st,
                          half)
            strides = [f"stride_{t}{d}" for t in ("q", "k", "v", "do") for d in "bn"]
            for m, n, w, st in attn.shipped_configs("dkdv", dtype, head_dim, family):
                yield Job(f"attn_bwd_dkdv   {dname} d{head_dim} {m}x{n} w{w} st{st}",
                          attn._attn_bwd_dkdv_kernel, dict(
                              Q=x, K=x, V=x, DO=x, Lse="*fp32", Delta="*fp32", DK=x, DV=x,
                              **_ints(*strides, "stride_dkb", "stride_dkn", "stride_dvb",
                                      "stride_dvn"),
                              scale="fp32", qk_scale_log2="fp32", BLOCK_M=m, BLOCK_N=n,
                              **common), w, st, half)
            for m, n, w, st in attn.shipped_configs("dq", dtype, head_dim, family):
                tag = f"{dname} d{head_dim} {m}x{n} w{w} st{st}"
                yield Job(f"attn_bwd_dq     {tag}", attn._attn_bwd_dq_kernel, dict(
                    Q=x, K=x, V=x, DO=x, O=x, Lse="*fp32", Delta="*fp32", DQ=x,
                    **_ints(*strides, "stride_ob", "stride_on", "stride_dqb", "stride_dqn"),
                    scale="fp32", qk_scale_log2="fp32", BLOCK_M=m, BLOCK_N=n, **common), w, st,
                    half)


def one_pass_jobs() -> Iterator[Job]:
    """The inference one-pass kernel (its one config), with and without the proj epilogue."""
    for dtype in _DTYPES:
        x = _PTR[dtype]
        dname = str(dtype).replace("torch.", "")
        cfg = one_pass.one_pass_config(64, dtype, interpret=False)
        for head_dim in (16, 32, 64):
            for fuse_proj in (True, False):
                yield Job(f"one_pass_fwd    {dname} d{head_dim}{' proj' if fuse_proj else ''} "
                          f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} "
                          f"w{cfg['num_warps']} st{cfg['num_stages']}",
                          one_pass._one_pass_fwd_kernel, dict(
                              X=x, CW=x, MEAN="*fp32", RSTD="*fp32", BNW=x, BNB=x, WQ=x, BQ=x,
                              K=x, V=x, WP=x, BP=x, Out=x,
                              **_ints("H", "W", "C_IN", "n_q", "n_k", "num_heads",
                                      "head_dim"),
                              qk_scale_log2="fp32", CLS=1, HAS_BN_W=True, HAS_BN_B=True,
                              HAS_QB=True, HAS_PROJ=fuse_proj, HAS_PB=fuse_proj,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                              EVEN_D=head_dim == max(16, triton.next_power_of_2(head_dim)),
                              BLOCK_K=cfg["BLOCK_K"], ACC_DTYPE=tl.float32,
                              INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee"),
                          cfg["num_warps"], cfg["num_stages"], dtype.itemsize == 2)


def kernel_sources_digest() -> str:
    """A hash of every @triton.jit function's source in the kernel modules (helpers
    included): the committed reports name it, so a kernel edited without rerunning this
    check fails ``tests/test_aot_reports.py``."""
    digest = hashlib.sha256()
    for module in (attn, cp, one_pass):
        for name, obj in sorted(vars(module).items()):
            fn = getattr(obj, "fn", None)  # JITFunction (InterpretedFunction when interpreting)
            if (type(obj).__name__ in ("JITFunction", "InterpretedFunction") and fn is not None
                    and fn.__module__ == module.__name__):
                digest.update(f"{module.__name__}.{name}\n{inspect.getsource(fn)}".encode())
    return digest.hexdigest()[:16]


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


# Most shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Row:
    name: str
    arch: int
    regs: int = -1
    smem: int = -1    # Triton's dynamic shared memory + static shared memory, bytes
    spill: int = -1   # LOCAL + STACK bytes (no calls here: a stack frame is spilled registers)
    wgmma: bool = False
    mma: bool = False
    tensor_cores: bool = False
    error: Optional[str] = None

    def problem(self) -> Optional[str]:
        """Why this config must not ship (``None``: it may)."""
        if self.error:
            return self.error
        if self.spill:
            return f"{self.spill} bytes spilled"
        if self.smem > SMEM_LIMIT.get(self.arch, 1 << 30):
            return f"{self.smem} bytes of shared memory > {SMEM_LIMIT[self.arch]}"
        if self.arch >= 90 and self.tensor_cores and not self.wgmma:
            return "fp16/bf16 dots on mma.sync, not wgmma, on Hopper"
        return None


def check(job: Job, arch: int) -> Row:
    row = Row(job.name, arch, tensor_cores=job.tensor_cores)
    signature, constexprs, attrs = _signature(job.kernel, job.args)
    try:
        compiled = triton.compile(
            ASTSource(fn=job.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as exc:  # report every config, not just the first failure
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    row.regs = usage.get("REG", -1)
    row.smem = compiled.metadata.shared + usage.get("SHARED", 0)
    row.spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    row.wgmma = "wgmma" in ptx
    row.mma = re.search(r"\bmma\.sync", ptx) is not None
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--full", action="store_true", help="every stride/class-token pair")
    parser.add_argument("--only", default=None, help="substring of the config names to check")
    args = parser.parse_args(argv)
    if interpreting():
        print("TRITON_INTERPRET is set: the kernels were loaded for the interpreter and cannot "
              "be compiled; run without it", file=sys.stderr)
        return 2
    rows = []
    print(f"triton {triton.__version__}; kernels {kernel_sources_digest()}; smem = Triton's "
          f"dynamic + static shared memory; spill = LOCAL + STACK bytes; pointers 16-byte "
          f"aligned, channel counts multiples of 16")
    print(f"{'kernel / config':58s} {'sm':>3s} {'regs':>5s} {'smem':>7s} {'spill':>6s} "
          f"{'wgmma':>5s} {'mma':>4s}")
    for arch in args.arch:
        for job in jobs(args.full, arch):
            if args.only and args.only not in job.name:
                continue
            row = check(job, arch)
            rows.append(row)
            if row.error:
                print(f"{row.name:58s} {arch:>3d} FAILED {row.error}")
            else:
                print(f"{row.name:58s} {arch:>3d} {row.regs:>5d} {row.smem:>7d} "
                      f"{row.spill:>6d} {'yes' if row.wgmma else 'no':>5s} "
                      f"{'yes' if row.mma else 'no':>4s}", flush=True)
    bad = [r for r in rows if r.problem()]
    if bad:
        print(f"\n{len(bad)} config(s) must not ship:", file=sys.stderr)
        for r in bad:
            print(f"  sm_{r.arch} {r.name}: {r.problem()}", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} configs compiled, no spills, shared memory within limits, "
          f"fp16/bf16 GEMMs on wgmma on sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
