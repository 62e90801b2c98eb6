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

from .attention_core import DTYPES, time_ms
from .blocks import TOLERANCE, build
from .common import add_speedups, floor_us, save_results


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
                    try:
                        with torch.no_grad():
                            err = ((fn(x, h, w).float() - ref).abs().max()
                                   / ref.abs().max()).item()
                        if not err <= TOLERANCE[dtype]:
                            rows.append({**row, "status": f"wrong: rel err {err:.2e}"})
                            continue
                        xg = x.detach().requires_grad_(train)
                        grad = torch.randn_like(ref).to(dtype)

                        def call():
                            if train:
                                fn(xg, h, w).backward(grad)
                            else:
                                with torch.no_grad():
                                    fn(xg, h, w)
                        ms, q20, q80 = time_ms(call, device, quick)
                    except Exception as exc:
                        rows.append({**row, "status": f"failed: {type(exc).__name__}: "
                                                      f"{str(exc).splitlines()[0][:120]}"})
                        continue
                    mult = 3.0 if train else 1.0
                    floor = floor_us(device, dtype, fl * mult, by * mult)
                    rows.append({**row, "status": "ok", "rel_err": f"{err:.1e}",
                                 "ms": round(ms, 4), "q20_ms": round(q20, 4),
                                 "q80_ms": round(q80, 4),
                                 "floor_frac": (round(floor / (ms * 1e3), 3)
                                                if floor is not None else "n/a")})
                add_speedups(rows[-len(provs):])
                for r in rows[-len(provs):]:
                    print(f"{model} {img} s{r['stage']} {dtype_name:8s} {mode:5s} "
                          f"{r['provider']:9s} " + (f"{r['ms']:9.4f} ms  x{r.get('vs_eager', 1)}"
                                                    " vs eager" if r["status"] == "ok"
                                                    else r["status"]), flush=True)
    if available.get("triton") is not None:
        print(f"triton: skipped: {available['triton']}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", choices=["cvt_13", "cvt_w24"])
    p.add_argument("--img-size", type=int, choices=[224, 384])
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--out")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        save_results(args.out, "conv_projection", "q/k/v convolutional projection", args, rows)

if __name__ == "__main__":
    main()
