"""One attention block per CvT stage shape: eager vs torch backend vs torch.compile vs Triton.

    python -m benchmarks.blocks                          # GPU: CvT-13/W24 at 224 and 384
    python -m benchmarks.blocks --model cvt_13 --img-size 224 --dtype bfloat16
    python -m benchmarks.blocks --quick                  # CPU smoke run (one tiny block)
    python -m benchmarks.blocks --out DIR                # also write DIR/blocks.csv/.md

Providers: ``eager`` (the reference ``Attention`` module), ``torch`` (``FusedConvAttention``
on the torch backend: the best hand-assembled PyTorch), ``compile`` (``torch.compile`` of the
eager module, ``--compile-mode``, default max-autotune on GPU), ``triton`` (the triton
backend forced, separate kernels: ``CVT_KERNELS_ONE_PASS=0``), ``triton-one-pass`` (the same
with the inference one-pass kernel, ``CVT_KERNELS_ONE_PASS=1``; eval only; by default the
package measures both per shape and keeps the faster). Modes: ``eval`` (forward, BatchNorm
folded) and ``train`` (forward and backward with batch statistics, a random cotangent).
Before it is timed, every provider is checked by the agreement rule of
``cvt_kernels.agreement``: its output (and in training dx, every parameter gradient and the
running statistics after the call), and eager's, against a truth at higher precision
(float32 for fp16/bf16, float64 for float32) from the same weights and inputs; it passes
when its error is at most twice eager's (+ a small eps). Columns ``rel_err`` and
``eager_err``: the output errors vs the truth; ``grad_err``: the training tensor nearest its
bar. A provider that fails the rule, cannot run or crashes is listed with the reason, not
timed.
CvT-21's blocks have CvT-13's shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, agreement
from cvt_kernels.flops import attention_block_bytes, attention_block_flops, stage_shapes
from cvt_kernels.models import Attention
from cvt_kernels.ops import one_pass

from . import checks
from .checks import Results, grads_and_buffers
from .common import (DTYPES, ContextLost, block_call, failure_status, floor_fraction, free_memory,
                     inject_fault, not_run_status, print_group, save_results, shape_parser,
                     time_call)
from .journal import Journal, crashed_now, run_row

# The q/k/v projection benchmark's bar (max |diff| / max |eager|) per dtype: TF32 for
# float32 on GPU. (The blocks use the agreement rule instead.)
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def build(shape: dict, dtype: torch.dtype, device: torch.device) -> Attention:
    torch.manual_seed(0)
    attn = Attention(shape["dim_in"], shape["dim_out"], shape["num_heads"], qkv_bias=True,
                     stride_kv=2, with_cls_token=shape["with_cls_token"])
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    return attn.to(device=device, dtype=dtype)


PROVIDERS = ("eager", "torch", "compile", "triton", "triton-one-pass")
OUTPUTS = ("out", "dx")  # the tensors a block's call returns (dx in training only)


def providers(eager: Attention, compile_mode: Optional[str], wanted=None
              ) -> Dict[str, Tuple[Optional[Callable], Optional[torch.nn.Module], str]]:
    """name -> (callable or None, the module holding its weights, reason it cannot run)."""
    wanted = wanted or PROVIDERS
    fused = FusedConvAttention.from_reference(copy.deepcopy(eager))
    out: Dict[str, Tuple[Optional[Callable], Optional[torch.nn.Module], str]] = {
        "eager": (eager, eager, "")}

    def with_backend(name):
        def run(x, h, w):
            with cvt_kernels.use_backend(name):
                return fused(x, h, w)
        return run

    out["torch"] = (with_backend("torch"), fused, "")
    if compile_mode and "compile" in wanted:
        compiled = copy.deepcopy(eager)
        out["compile"] = (torch.compile(compiled, mode=compile_mode), compiled, "")
    else:
        out["compile"] = (None, None, "--compile-mode none")
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
        if name == "eager":
            agree = checks.fields(checks.verdicts(eager, eager, truth, dtype, OUTPUTS),
                                  baseline=True)
        else:
            found = checks.verdicts(one_call(fn, module, state, x, h, w, grad, train), eager,
                                    truth, dtype, OUTPUTS)
            agree = checks.fields(found)
            wrong = checks.wrong_status(found)
            if wrong is not None:
                return {"status": wrong, **agree}
        module.load_state_dict(state)
        # No CUDA graph around torch.compile's max-autotune, which replays graphs itself.
        timing = time_call(block_call(fn, x, h, w, grad, train), device, quick,
                           graph=not train and name != "compile")
    except Exception as exc:  # the provider declined this call: say why
        status = failure_status(exc, x.shape[0])
        if status.startswith("skipped: out of memory"):
            free_memory()
        return {"status": status}
    return {"status": "ok", **agree, **timing}


def run(args: argparse.Namespace) -> List[dict]:
    """Every (shape, dtype, mode, provider) row. ``args.journal`` (a ``Journal``) skips the
    rows a crashed worker finished; ``args.on_rows(rows)`` is called after every row."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    journal = getattr(args, "journal", None) or Journal(None)
    on_rows = getattr(args, "on_rows", None) or (lambda rows: None)
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
    for model, img, shape in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            h, w = shape["h"], shape["w"]
            tokens = h * w + (1 if shape["with_cls_token"] else 0)
            ids = {mode: [dict(model=model, img=img, stage=shape["stage"], batch=batch,
                               tokens=tokens, dim=shape["dim_out"], heads=shape["num_heads"],
                               dtype=dtype_name, mode=mode, provider=name) for name in names]
                   for mode in ("eval", "train")}
            if all(journal.all_done(i) for i in ids.values()):  # a restarted worker
                rows += [journal.lookup(i) for mode in ids for i in ids[mode]]
                on_rows(rows)
                continue
            eager = build(shape, dtype, device)
            truth_module = copy.deepcopy(eager).to(agreement.truth_dtype(dtype))
            state = copy.deepcopy(eager.state_dict())
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, tokens, shape["dim_in"], generator=gen).to(device, dtype)
            grad = torch.randn(batch, tokens, shape["dim_out"], generator=gen).to(device, dtype)
            fl = attention_block_flops(h, w, shape["dim_in"], shape["dim_out"],
                                       shape["num_heads"], shape["with_cls_token"])["total"]
            by = attention_block_bytes(h, w, shape["dim_in"], shape["dim_out"],
                                       shape["with_cls_token"], torch.finfo(dtype).bits // 8)
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
                                    one_call(truth_module, truth_module, state,
                                             x.to(agreement.truth_dtype(dtype)), h, w,
                                             grad.to(agreement.truth_dtype(dtype)), train))
                        result = measure_provider(name, fn, module, state, x, h, w, grad,
                                                  train, *references, dtype, device, quick)
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
                print_group(group, f"{model} {img} s{shape['stage']} {dtype_name:8s} {mode:5s}")
                rows += group
                on_rows(rows)
            eager = truth_module = None  # free this shape's modules before the next
            free_memory()
    return rows


def main() -> None:
    p = shape_parser(__doc__.splitlines()[0])
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode for the compile provider, or 'none'")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        save_results(args.out, "blocks", "Attention blocks: CvT stage shapes", args, rows)

if __name__ == "__main__":
    main()
