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
folded) and ``train`` (forward and backward with batch statistics). Every provider's output
is compared with eager's before it is timed; a provider that disagrees or cannot run is
listed with the reason, not timed.
CvT-21's blocks have CvT-13's shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention
from cvt_kernels.flops import attention_block_bytes, attention_block_flops, stage_shapes
from cvt_kernels.models import Attention
from cvt_kernels.ops import one_pass

from .common import (DTYPES, floor_fraction, measure, not_run_status, print_group,
                     save_results, shape_parser)

# Disagreement bar (max |diff| / max |eager|) per dtype: TF32 for float32 on GPU.
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


def providers(eager: Attention, compile_mode: Optional[str], wanted=None
              ) -> Dict[str, Tuple[Optional[Callable], str]]:
    fused = FusedConvAttention.from_reference(copy.deepcopy(eager))
    out: Dict[str, Tuple[Optional[Callable], str]] = {"eager": (eager, "")}

    def with_backend(name):
        def run(x, h, w):
            with cvt_kernels.use_backend(name):
                return fused(x, h, w)
        return run

    out["torch"] = (with_backend("torch"), "")
    if compile_mode and (not wanted or "compile" in wanted):
        out["compile"] = (torch.compile(copy.deepcopy(eager), mode=compile_mode), "")
    else:
        out["compile"] = (None, "--compile-mode none")
    reason = cvt_kernels.backends.available_backends().get("triton")
    # "triton" is the separate kernels, "triton-one-pass" the fused one (the default, auto,
    # picks the faster of the two per shape on the first call).
    out["triton"] = ((with_one_pass(with_backend("triton"), "0"), "") if reason is None
                     else (None, reason))
    if reason is not None:
        out["triton-one-pass"] = (None, reason)
    elif eager.training:
        out["triton-one-pass"] = (None, "the one-pass kernel is inference-only (eval, no grad)")
    else:
        out["triton-one-pass"] = (with_one_pass(with_backend("triton"), "1"), "")
    return {k: v for k, v in out.items() if not wanted or k in wanted}


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


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    rows: List[dict] = []
    for model, img, shape in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            eager = build(shape, dtype, device)
            h, w = shape["h"], shape["w"]
            tokens = h * w + (1 if shape["with_cls_token"] else 0)
            x = torch.randn(batch, tokens, shape["dim_in"], device=device, dtype=dtype)
            fl = attention_block_flops(h, w, shape["dim_in"], shape["dim_out"],
                                       shape["num_heads"], shape["with_cls_token"])["total"]
            by = attention_block_bytes(h, w, shape["dim_in"], shape["dim_out"],
                                       shape["with_cls_token"], torch.finfo(dtype).bits // 8)
            for mode in ("eval", "train"):
                train = mode == "train"
                eager.train(train)
                provs = providers(eager, compile_mode, getattr(args, "providers", None))
                for prov in provs.values():
                    if isinstance(prov[0], torch.nn.Module):
                        prov[0].train(train)
                with torch.no_grad():
                    ref = eager(x, h, w).float()
                for name, (fn, reason) in provs.items():
                    row = dict(model=model, img=img, stage=shape["stage"], batch=batch,
                               tokens=tokens, dim=shape["dim_out"], heads=shape["num_heads"],
                               dtype=dtype_name, mode=mode, provider=name)
                    status = not_run_status(fn, reason, args)
                    if status is not None:
                        rows.append({**row, "status": status})
                        continue
                    result = measure(fn, x, h, w, ref, TOLERANCE[dtype], train, device, quick,
                                     cudagraph=name != "compile")
                    if result["status"] == "ok":
                        total_fl = batch * fl * (3.0 if train else 1.0)
                        total_by = batch * by * (3.0 if train else 1.0)
                        result["tflops"] = round(total_fl / (result["ms"] * 1e-3) / 1e12, 2)
                        result["floor_frac"] = floor_fraction(device, dtype, total_fl, total_by,
                                                              result["ms"])
                    rows.append({**row, **result})
                print_group(rows[-len(provs):], f"{model} {img} s{shape['stage']} "
                                                f"{dtype_name:8s} {mode:5s}")
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
