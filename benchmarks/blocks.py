"""One block per CvT stage shape: eager vs the fused ops on each backend vs torch.compile.

    python -m benchmarks.blocks                          # GPU: CvT-13/W24 at 224 and 384
    python -m benchmarks.blocks --model cvt_13 --img-size 224 --dtype bfloat16
    python -m benchmarks.blocks --scope block            # whole blocks (LayerNorms, MLP too)
    python -m benchmarks.blocks --quick                  # CPU smoke run (one tiny block)
    python -m benchmarks.blocks --out DIR                # also write DIR/blocks.csv/.md

Scopes (``--scope``, as ``cvt_kernels.accelerate``): ``attention`` (default: the reference
``Attention`` module vs ``FusedConvAttention``) or ``block`` (the reference transformer
``Block``, LayerNorms, attention, QuickGELU MLP and residuals, vs ``FusedBlock``; drop path
off). Providers: ``eager`` (the reference module), ``torch`` (the fused module on the torch
backend: the best hand-assembled PyTorch), ``triton`` (the triton backend forced, separate
kernels: ``CVT_KERNELS_ONE_PASS=0``), ``triton-one-pass`` (the same with the inference
one-pass kernel, ``CVT_KERNELS_ONE_PASS=1``; eval only), ``auto`` (nothing forced: the
dispatcher's choice per call, measured on the first call), ``compile`` (``torch.compile``
of the eager module, ``--compile-mode``, default max-autotune on GPU) and ``auto+compile``
(the same of the fused module). The compile providers are measured after every other row
of the run, so a time budget cuts them first. Modes: ``eval`` (forward, BatchNorm folded)
and ``train`` (forward and backward with batch statistics, a random cotangent).

Before it is timed, every provider is checked by the agreement rule of
``cvt_kernels.agreement``: its output (and in training dx, every parameter gradient and the
running statistics after the call), and eager's, against a float64 truth from the same
weights and inputs; it passes when its error is at most twice eager's (+ a small eps).
Columns ``rel_err`` and ``eager_err``: the output errors vs the truth; ``grad_err``: the
training tensor nearest its bar; ``first_call_s``: the checked call (compilation, the
dispatcher's measurements, autotuning; never in ``ms``); ``cudagraph_ms``: the same call
replayed from a CUDA graph (forward, or forward and backward; not for the compile
providers), the device time without the host's; ``tflops`` and ``floor_frac`` against the
matrix FLOPs and the least bytes of the call. A provider that fails the rule, cannot run
or crashes is listed with the reason, not timed.
CvT-21's blocks have CvT-13's shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, agreement
from cvt_kernels.block import FusedBlock
from cvt_kernels.flops import attention_block_bytes, attention_block_flops, stage_shapes
from cvt_kernels.models import Attention
from cvt_kernels.models.cvt import Block, LayerNorm, QuickGELU
from cvt_kernels.ops import one_pass

from . import checks
from .checks import Results, grads_and_buffers
from .common import (DTYPES, ContextLost, add_speedups, block_call, failure_status,
                     floor_fraction, free_memory, inject_fault, not_run_status, print_group,
                     save_results, shape_parser, time_call)
from .journal import Journal, crashed_now, run_row

# The q/k/v projection benchmark's bar (max |diff| / max |eager|) per dtype: TF32 for
# float32 on GPU. (The blocks use the agreement rule instead.)
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# The truth every provider and eager are judged against (the agreement rule).
TRUTH_DTYPE = torch.float64
SCOPES = ("attention", "block")


def build(shape: dict, dtype: torch.dtype, device: torch.device, scope: str = "attention"
          ) -> torch.nn.Module:
    """The reference module of one stage shape: ``Attention``, or (``scope="block"``) the
    whole ``Block`` as CvT-13 builds it (float32 LayerNorms, QuickGELU, MLP ratio 4, drop
    path off), with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    common = dict(qkv_bias=True, stride_kv=2, with_cls_token=shape["with_cls_token"])
    if scope == "block":
        module = Block(shape["dim_in"], shape["dim_out"], shape["num_heads"],
                       act_layer=QuickGELU, norm_layer=LayerNorm, **common)
    else:
        module = Attention(shape["dim_in"], shape["dim_out"], shape["num_heads"], **common)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    return module.to(device=device, dtype=dtype)


PROVIDERS = ("eager", "torch", "compile", "triton", "triton-one-pass", "auto", "auto+compile")
#: Measured after every other row of a run: compiling costs seconds to minutes per shape.
DEFERRED = ("compile", "auto+compile")
OUTPUTS = ("out", "dx")  # the tensors a block's call returns (dx in training only)


def providers(eager: torch.nn.Module, compile_mode: Optional[str], wanted=None
              ) -> Dict[str, Tuple[Optional[Callable], Optional[torch.nn.Module], str]]:
    """name -> (callable or None, the module holding its weights, reason it cannot run).
    ``eager`` is an ``Attention`` or a ``Block``; the fused module is its counterpart."""
    wanted = wanted or PROVIDERS
    fused_type = FusedBlock if isinstance(eager, Block) else FusedConvAttention
    fused = fused_type.from_reference(copy.deepcopy(eager))
    out: Dict[str, Tuple[Optional[Callable], Optional[torch.nn.Module], str]] = {
        "eager": (eager, eager, "")}

    def with_backend(name):
        def run(x, h, w):
            with cvt_kernels.use_backend(name):
                return fused(x, h, w)
        return run

    out["torch"] = (with_backend("torch"), fused, "")
    out["auto"] = (fused, fused, "")
    for name, source in (("compile", eager), ("auto+compile", fused)):
        if compile_mode and name in wanted:
            module = copy.deepcopy(source)
            out[name] = (torch.compile(module, mode=compile_mode), module, "")
        else:
            out[name] = (None, None, "--compile-mode none")
    reason = cvt_kernels.backends.available_backends().get("triton")
    # "triton" is the separate kernels, "triton-one-pass" the fused one (the default, auto,
    # picks the faster of the two per shape on the first call).
    out["triton"] = ((with_one_pass(with_backend("triton"), "0"), fused, "") if reason is None
                     else (None, None, reason))
    if reason is not None:
        out["triton-one-pass"] = (None, None, reason)
    elif eager.training:
        out["triton-one-pass"] = (None, None,
                                  "the one-pass kernel is inference-only (eval, no grad)")
    else:
        out["triton-one-pass"] = (with_one_pass(with_backend("triton"), "1"), fused, "")
    return {k: v for k, v in out.items() if k in wanted}


def with_one_pass(fn: Callable, setting: str) -> Callable:
    """``fn`` with ``CVT_KERNELS_ONE_PASS=setting``: "1" always runs the inference one-pass
    kernel (q projection in the attention prologue, proj in the epilogue for one head), "0"
    never does (the separate kernels)."""
    def run(x, h, w):
        previous = os.environ.get(one_pass.ENV)
        os.environ[one_pass.ENV] = setting
        try:
            return fn(x, h, w)
        finally:
            if previous is None:
                del os.environ[one_pass.ENV]
            else:
                os.environ[one_pass.ENV] = previous
    return run


def one_call(fn: Callable, module: torch.nn.Module, state: dict, x: torch.Tensor, h: int,
             w: int, grad: torch.Tensor, train: bool) -> Results:
    """``fn(x, h, w)`` from ``state``: forward (eval) or forward + backward with ``grad``."""
    module.load_state_dict(state)
    module.train(train)
    module.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return Results([fn(x, h, w)], {}, {})
    xg = x.detach().clone().requires_grad_()
    out = fn(xg, h, w)
    out.backward(grad.to(out.dtype))
    grads, buffers = grads_and_buffers(module)
    module.zero_grad(set_to_none=True)
    return Results([out.detach(), xg.grad], grads, buffers)


def measure_provider(name: str, fn: Callable, module: torch.nn.Module, state: dict,
                     x: torch.Tensor, h: int, w: int, grad: torch.Tensor, train: bool,
                     eager: Results, truth: Results, dtype: torch.dtype,
                     device: torch.device, quick: bool) -> dict:
    """Checks one provider by the agreement rule, then times it (the row's fields)."""
    try:
        inject_fault(name)
        first = {}
        if name == "eager":
            agree = checks.fields(checks.verdicts(eager, eager, truth, dtype, OUTPUTS),
                                  baseline=True)
        else:
            start = time.perf_counter()
            ours = one_call(fn, module, state, x, h, w, grad, train)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = {"first_call_s": round(time.perf_counter() - start, 3)}
            found = checks.verdicts(ours, eager, truth, dtype, OUTPUTS)
            agree = {**checks.fields(found), **first}
            wrong = checks.wrong_status(found)
            if wrong is not None:
                return {"status": wrong, **agree}
        module.load_state_dict(state)
        # No CUDA graph around torch.compile, which may replay graphs itself.
        timing = time_call(block_call(fn, x, h, w, grad, train), device, quick,
                           graph=name not in DEFERRED)
        module.zero_grad(set_to_none=True)
    except Exception as exc:  # the provider declined this call: say why
        status = failure_status(exc, x.shape[0])
        if status.startswith("skipped: out of memory"):
            free_memory()
        return {"status": status}
    return {"status": "ok", **agree, **timing}


def block_flops_bytes(shape: dict, scope: str, elem_bytes: int) -> Tuple[float, float]:
    """Forward matrix FLOPs and least bytes per image of one stage's module: the attention
    block's, plus at block scope the MLP's two GEMMs (ratio 4) and the LayerNorms' and
    MLP's input and output (its hidden activation kept on chip, as a fused MLP would)."""
    h, w = shape["h"], shape["w"]
    fl = attention_block_flops(h, w, shape["dim_in"], shape["dim_out"], shape["num_heads"],
                               shape["with_cls_token"])["total"]
    by = attention_block_bytes(h, w, shape["dim_in"], shape["dim_out"],
                               shape["with_cls_token"], elem_bytes)
    if scope == "block":
        n = h * w + (1 if shape["with_cls_token"] else 0)
        c = shape["dim_out"]
        fl += 2 * 2 * n * c * 4 * c
        by += 4 * n * c * elem_bytes
    return fl, by


def run(args: argparse.Namespace) -> List[dict]:
    """Every (shape, dtype, mode, provider) row, the :data:`DEFERRED` providers after all
    the others. ``args.journal`` (a ``Journal``) skips the rows a crashed worker finished;
    ``args.on_rows(rows)`` is called after every row; ``args.scope``: ``attention``
    (default) or ``block``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    journal = getattr(args, "journal", None) or Journal(None)
    on_rows = getattr(args, "on_rows", None) or (lambda rows: None)
    scope = getattr(args, "scope", None) or "attention"
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    quick = args.quick or device.type == "cpu"
    if quick and device.type == "cpu":
        cases = [("tiny", 0, dict(stage=3, h=6, w=6, dim_in=32, dim_out=32, num_heads=2,
                                  with_cls_token=True))]
        dtypes, batch = ["float32"], 2
        compile_mode = None if args.compile_mode == "none" else "default"
    else:
        cases = [(m, s, st) for m in ("cvt_13", "cvt_w24") for s in (224, 384)
                 if args.model in (None, m) and args.img_size in (None, s)
                 for st in stage_shapes(m, s)]
        dtypes, batch = args.dtype or list(DTYPES), args.batch
        compile_mode = None if args.compile_mode == "none" else args.compile_mode
    names = [n for n in PROVIDERS if not getattr(args, "providers", None) or n in args.providers]
    rows: List[dict] = []
    groups: Dict[tuple, List[dict]] = {}
    for phase in ([n for n in names if n not in DEFERRED], [n for n in names if n in DEFERRED]):
        if not phase:
            continue
        for model, img, shape in cases:
            for dtype_name in dtypes:
                run_shape(model, img, shape, dtype_name, batch, phase, scope, compile_mode,
                          device, quick, args, journal, rows, groups, on_rows)
    return rows


def run_shape(model: str, img: int, shape: dict, dtype_name: str, batch: int,
              names: List[str], scope: str, compile_mode: Optional[str], device: torch.device,
              quick: bool, args: argparse.Namespace, journal: Journal, rows: List[dict],
              groups: Dict[tuple, List[dict]], on_rows: Callable) -> None:
    """The rows of ``names`` at one stage shape and dtype, eval then train."""
    dtype = DTYPES[dtype_name]
    h, w = shape["h"], shape["w"]
    tokens = h * w + (1 if shape["with_cls_token"] else 0)
    ids = {mode: [dict(model=model, img=img, scope=scope, stage=shape["stage"], batch=batch,
                       tokens=tokens, dim=shape["dim_out"], heads=shape["num_heads"],
                       dtype=dtype_name, mode=mode, provider=name)
                  for name in names]
           for mode in ("eval", "train")}
    if all(journal.all_done(i) for i in ids.values()):  # a restarted worker
        for mode in ids:
            done = [journal.lookup(i) for i in ids[mode]]
            rows += done
            groups.setdefault(_group_key(done[0]), []).extend(done)
        on_rows(rows)
        return
    eager = build(shape, dtype, device, scope)
    truth_module = copy.deepcopy(eager).to(TRUTH_DTYPE)
    state = copy.deepcopy(eager.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, shape["dim_in"], generator=gen).to(device, dtype)
    grad = torch.randn(batch, tokens, shape["dim_out"], generator=gen).to(device, dtype)
    fl, by = block_flops_bytes(shape, scope, torch.finfo(dtype).bits // 8)
    for mode in ("eval", "train"):
        train = mode == "train"
        eager.train(train)
        provs = providers(eager, compile_mode, names)
        group: List[dict] = []
        references: Optional[Tuple[Results, Results]] = None
        for identity in ids[mode]:
            name = identity["provider"]
            fn, module, reason = provs[name]

            def measure_row():
                nonlocal references
                status = not_run_status(fn, reason, args)
                if status is not None:
                    return {"status": status}
                if references is None:  # eager and the truth, once per group
                    with agreement.exact_float32():
                        references = (
                            one_call(eager, eager, state, x, h, w, grad, train),
                            one_call(truth_module, truth_module, state, x.to(TRUTH_DTYPE),
                                     h, w, grad.to(TRUTH_DTYPE), train))
                result = measure_provider(name, fn, module, state, x, h, w, grad, train,
                                          *references, dtype, device, quick)
                if result["status"] == "ok":
                    total_fl = batch * fl * (3.0 if train else 1.0)
                    total_by = batch * by * (3.0 if train else 1.0)
                    result["tflops"] = round(total_fl / (result["ms"] * 1e-3) / 1e12, 2)
                    result["floor_frac"] = floor_fraction(device, dtype, total_fl,
                                                          total_by, result["ms"])
                return result

            row, measured = run_row(journal, identity, measure_row)
            group.append(row)
            on_rows(rows + group)
            if crashed_now(row, measured):
                rows += group
                raise ContextLost(f"{name}: {group[-1]['status']}")
        siblings = groups.setdefault(_group_key(group[0]), [])
        siblings.extend(group)
        add_speedups(siblings)  # the deferred rows' ratios use the first phase's eager
        print_group(group, f"{model} {img} s{shape['stage']} {dtype_name:8s} {mode:5s}",
                    speedups=False)
        rows += group
        on_rows(rows)
    free_memory()  # this shape's modules go with the frame


def _group_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "img", "stage", "dtype", "mode", "batch",
                                      "scope"))


def main() -> None:
    p = shape_parser(__doc__.splitlines()[0])
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode for the compile providers, or 'none'")
    p.add_argument("--scope", choices=SCOPES, default="attention",
                   help="the attention module, or whole transformer blocks")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        save_results(args.out, "blocks", "Blocks: CvT stage shapes", args, rows)


if __name__ == "__main__":
    main()
