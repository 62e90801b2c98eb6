"""The q/k/v convolutional projection (dwconv + BatchNorm + Linear, x3) at CvT stage shapes.

    python -m benchmarks.conv_projection                 # GPU: CvT-13/W24, 224 and 384
    python -m benchmarks.conv_projection --quick         # CPU smoke run
    python -m benchmarks.conv_projection --out DIR       # also write DIR/conv_projection.csv/.md

Providers: ``eager`` (the reference module's ``forward_conv`` + ``proj_q/k/v``), the
``reference`` and ``torch`` backends, ``compile`` (``torch.compile`` of eager,
``--compile-mode``), ``triton``. Modes: ``eval`` and ``train`` (forward + backward, batch
statistics). Outputs are checked against eager before timing.
"""

from __future__ import annotations

import argparse
import copy
from typing import List

import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention
from cvt_kernels.flops import attention_block_flops, stage_shapes

from .blocks import TOLERANCE, build
from .common import (BUDGET_SPENT, DTYPES, floor_fraction, measure, out_of_time, print_group,
                     save_results, shape_parser)


def eager_projection(attn):
    def run(x, h, w):
        q, k, v = attn.forward_conv(x, h, w)
        return torch.cat([attn.proj_q(q), attn.proj_k(k), attn.proj_v(v)], dim=1)
    return run


def backend_projection(fused: FusedConvAttention, name: str):
    def run(x, h, w):
        with cvt_kernels.use_backend(name):
            outs = [cvt_kernels.ops.conv_projection(x, h, w, *fused._projection(which))
                    for which in "qkv"]
        return torch.cat(outs, dim=1)
    return run


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick and device.type == "cpu":
        cases = [("tiny", 0, dict(stage=1, h=8, w=8, dim_in=16, dim_out=16, num_heads=1,
                                  with_cls_token=False))]
        dtypes, batch, compile_mode = ["float32"], 2, None
    else:
        cases = [(m, s, st) for m in ("cvt_13", "cvt_w24") for s in (224, 384)
                 if args.model in (None, m) and args.img_size in (None, s)
                 for st in stage_shapes(m, s)]
        dtypes, batch = args.dtype or list(DTYPES), args.batch
        compile_mode = None if args.compile_mode == "none" else args.compile_mode
    available = cvt_kernels.backends.available_backends()
    rows: List[dict] = []
    for model, img, shape in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            attn = build(shape, dtype, device)
            fused = FusedConvAttention.from_reference(copy.deepcopy(attn))
            h, w = shape["h"], shape["w"]
            tokens = h * w + (1 if shape["with_cls_token"] else 0)
            x = torch.randn(batch, tokens, shape["dim_in"], device=device, dtype=dtype)
            parts = attention_block_flops(h, w, shape["dim_in"], shape["dim_out"],
                                          shape["num_heads"], shape["with_cls_token"])
            fl = batch * sum(parts[k] for k in ("conv_q", "conv_kv", "linear_q", "linear_kv"))
            elem = torch.finfo(dtype).bits // 8
            by = batch * elem * (tokens * shape["dim_in"] + 3 * tokens * shape["dim_out"])
            provs = {"eager": eager_projection(attn),
                     "reference": backend_projection(fused, "reference"),
                     "torch": backend_projection(fused, "torch")}
            if compile_mode:
                provs["compile"] = torch.compile(eager_projection(copy.deepcopy(attn)),
                                                 mode=compile_mode)
            if available.get("triton") is None:
                provs["triton"] = backend_projection(fused, "triton")
            wanted = getattr(args, "providers", None)  # benchmarks.run --providers: a subset
            if wanted:
                provs = {k: v for k, v in provs.items() if k in wanted}
            for mode in ("eval", "train"):
                train = mode == "train"
                for m in (attn, fused):
                    m.train(train)
                with torch.no_grad():
                    ref = eager_projection(attn)(x, h, w).float()
                for name, fn in provs.items():
                    row = dict(model=model, img=img, stage=shape["stage"], batch=batch,
                               tokens=tokens, dim=shape["dim_out"], dtype=dtype_name,
                               mode=mode, provider=name)
                    if out_of_time(args):
                        rows.append({**row, "status": BUDGET_SPENT})
                        continue
                    result = measure(fn, x, h, w, ref, TOLERANCE[dtype], train, device, quick,
                                     cudagraph=name != "compile")
                    if result["status"] == "ok":
                        mult = 3.0 if train else 1.0
                        result["floor_frac"] = floor_fraction(device, dtype, fl * mult, by * mult,
                                                              result["ms"])
                    rows.append({**row, **result})
                print_group(rows[-len(provs):], f"{model} {img} s{shape['stage']} "
                                                f"{dtype_name:8s} {mode:5s}")
    if available.get("triton") is not None:
        print(f"triton: skipped: {available['triton']}")
    return rows


def main() -> None:
    p = shape_parser(__doc__.splitlines()[0])
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode for the compile provider, or 'none'")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        save_results(args.out, "conv_projection", "q/k/v convolutional projection", args, rows)

if __name__ == "__main__":
    main()
