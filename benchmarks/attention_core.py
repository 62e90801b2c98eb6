"""Attention core benchmark: CvT's reduced-token attention, every provider, every stage shape.

    python -m benchmarks.attention_core                 # GPU: all shapes, bf16/fp16/fp32
    python -m benchmarks.attention_core --quick         # CPU smoke run (tiny shapes)
    python -m benchmarks.attention_core --out DIR       # also write DIR/attention_core.csv/.md

Providers: ``eager`` (the reference module's einsum + softmax), ``sdpa-<backend>`` for each
``F.scaled_dot_product_attention`` backend that accepts the call (explicit CvT scale),
``triton`` (our kernel). Each provider is checked against a float32 reference before it is
timed and its max error is printed beside its time; a provider that cannot run says why.
Modes: forward, and forward+backward. Times: ``triton.testing.do_bench`` medians on GPU,
wall-clock medians on CPU.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels.backends import get_backend

from .common import (DTYPES, add_speedups, cudagraph_ms, floor_us, free_memory, is_oom,
                     not_run_status, peak_mb, save_results, shape_parser, time_ms)

# (model, image size, stage) -> (Nq, Nk, heads); head_dim is 64 in every CvT config.
STAGE_SHAPES = {
    ("cvt_13", 224, 1): (3136, 784, 1), ("cvt_13", 224, 2): (784, 196, 3),
    ("cvt_13", 224, 3): (197, 50, 6),
    ("cvt_13", 384, 1): (9216, 2304, 1), ("cvt_13", 384, 2): (2304, 576, 3),
    ("cvt_13", 384, 3): (577, 145, 6),
    ("cvt_w24", 224, 1): (3136, 784, 3), ("cvt_w24", 224, 2): (784, 196, 12),
    ("cvt_w24", 224, 3): (197, 50, 16),
    ("cvt_w24", 384, 1): (9216, 2304, 3), ("cvt_w24", 384, 2): (2304, 576, 12),
    ("cvt_w24", 384, 3): (577, 145, 16),
}
# CvT-21 has CvT-13's widths and heads: its attention shapes are CvT-13's.
HEAD_DIM = 64


def heads_view(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)


def eager(q, k, v, heads, scale):
    s = torch.einsum("bhlk,bhtk->bhlt", heads_view(q, heads), heads_view(k, heads)) * scale
    return torch.einsum("bhlt,bhtv->bhlv", F.softmax(s, dim=-1),
                        heads_view(v, heads)).transpose(1, 2).flatten(2)


def sdpa_with(backend) -> Callable:
    def run(q, k, v, heads, scale):
        with torch.nn.attention.sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(heads_view(q, heads), heads_view(k, heads),
                                                 heads_view(v, heads), scale=scale)
        return out.transpose(1, 2).flatten(2)
    return run


def triton_provider(q, k, v, heads, scale):
    """The user's path: the attention op with the triton backend forced."""
    with cvt_kernels.use_backend("triton"):
        return cvt_kernels.ops.attention(q, k, v, heads, scale)


def providers(device: torch.device) -> Dict[str, Tuple[Optional[Callable], str]]:
    """name -> (function or None, reason it cannot run)."""
    out: Dict[str, Tuple[Optional[Callable], str]] = {"eager": (eager, "")}
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    for short, attr in names.items():
        backend = getattr(SDPBackend, attr, None)
        out[f"sdpa-{short}"] = ((sdpa_with(backend), "") if backend is not None
                                else (None, f"SDPBackend.{attr} missing in this torch"))
    reason = cvt_kernels.backends.available_backends().get("triton")
    out["triton"] = (triton_provider, "") if reason is None else (None, reason)
    return out


def flops(batch: int, n_q: int, n_k: int, heads: int, mode: str) -> float:
    fwd = 4.0 * batch * heads * n_q * n_k * HEAD_DIM  # two matmuls, 2 flops per MAC
    return fwd if mode == "forward" else 3.5 * fwd  # backward: five matmuls (2.5x)


def bytes_moved(batch: int, n_q: int, n_k: int, heads: int, dtype: torch.dtype, mode: str) -> float:
    elem = torch.finfo(dtype).bits // 8
    c = heads * HEAD_DIM
    fwd = elem * batch * c * (2 * n_q + 2 * n_k) + 4 * batch * heads * n_q
    return fwd if mode == "forward" else fwd + elem * batch * c * (2 * n_q + 2 * n_k + 2 * n_k)


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick and device.type == "cpu":
        shapes = {("tiny", 0, 1): (40, 12, 2)}
        dtypes = ["float32"]
        batch = 2
    else:
        shapes = {k: v for k, v in STAGE_SHAPES.items()
                  if (args.model in (None, k[0])) and (args.img_size in (None, k[1]))}
        dtypes = args.dtype or list(DTYPES)
        batch = args.batch
    ref_backend = get_backend("reference")
    rows: List[dict] = []
    provs = providers(device)
    wanted = getattr(args, "providers", None)  # benchmarks.run --providers: a subset
    if wanted:
        provs = {k: v for k, v in provs.items() if k in wanted}
    for (model, img, stage), (n_q, n_k, heads) in shapes.items():
        scale = (heads * HEAD_DIM) ** -0.5
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(batch, n, heads * HEAD_DIM, generator=g).to(device, dtype)
                       for n in (n_q, n_k, n_k))
            truth = ref_backend.attention_forward(q.float(), k.float(), v.float(), heads,
                                                  scale)[0]
            for mode in ("forward", "forward+backward"):
                for name, (fn, reason) in provs.items():
                    row = dict(model=model, img=img, stage=stage, batch=batch, n_q=n_q,
                               n_k=n_k, heads=heads, head_dim=HEAD_DIM, dtype=dtype_name,
                               mode=mode, provider=name)
                    status = not_run_status(fn, reason, args)
                    if status is not None:
                        rows.append({**row, "status": status})
                        continue
                    try:
                        err = (fn(q, k, v, heads, scale).float() - truth).abs().max().item()
                        qg, kg, vg = (t.detach().requires_grad_(mode != "forward") for t in (q, k, v))
                        grad = torch.randn_like(q)

                        def call():
                            out = fn(qg, kg, vg, heads, scale)
                            if mode != "forward":
                                out.backward(grad)
                        ms, q20, q80 = time_ms(call, device, quick)
                        peak = peak_mb(call, device)
                        # Launch overhead is a large part of these short calls: graph time too.
                        cg = cudagraph_ms(call, device, quick) if mode == "forward" else "n/a"
                    except Exception as exc:  # the provider declined this call: say why
                        status = (f"skipped: out of memory at batch {batch}" if is_oom(exc) else
                                  f"failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:120]}")
                        free_memory()
                        rows.append({**row, "status": status})
                        continue
                    fl = flops(batch, n_q, n_k, heads, mode)
                    by = bytes_moved(batch, n_q, n_k, heads, dtype, mode)
                    floor = floor_us(device, dtype, fl, by)
                    rows.append({**row, "status": "ok", "max_err": f"{err:.2e}",
                                 "ms": round(ms, 4), "q20_ms": round(q20, 4),
                                 "q80_ms": round(q80, 4), "cudagraph_ms": cg,
                                 "peak_mb": peak,
                                 "tflops": round(fl / (ms * 1e-3) / 1e12, 2),
                                 "gbps": round(by / (ms * 1e-3) / 1e9, 1),
                                 "floor_frac": (round(floor / (ms * 1e3), 3)
                                                if floor is not None else "n/a")})
                    print(f"{model} {img} s{stage} {dtype_name:8s} {mode:16s} {name:15s} "
                          f"{ms:9.4f} ms  err {err:.1e}  {rows[-1]['tflops']:7.1f} TFLOP/s  "
                          f"floor {rows[-1]['floor_frac']}", flush=True)
                add_speedups(rows[-len(provs):], ("eager", "sdpa-flash", "sdpa-efficient",
                                                  "sdpa-cudnn"))
    return rows


def main() -> None:
    args = shape_parser(__doc__.splitlines()[0]).parse_args()
    rows = run(args)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['provider']}: {r['status']} ({r['model']} s{r['stage']} {r['dtype']} {r['mode']})")
    if args.out:
        save_results(args.out, "attention_core", "Attention core: CvT stage shapes", args, rows)

if __name__ == "__main__":
    main()
