"""What torch charges to parse a size argument: one allocation or view with its sizes given
as separate ints, as a tuple, or as a ``torch.Size``; and what a launch's compile-time
keywords cost when passed literally or unpacked from a dict or a read-only mapping.

    python -m benchmarks.size_arguments --out benchmarks/results/cpu

Why the triton launchers pass sizes as separate ints (``torch.empty(m, n, ...)``,
``y.view(*x.shape)``) and allocate outputs in their final shapes: a block's training call
makes ~80 allocations and views, and on the project's CPU machine (torch 2.13) a tuple or
``torch.Size`` argument parsed 1.5-5 us slower than the same ints
(``docs/performance.md``, "The launchers' Python, trimmed"). Host time of this machine,
one thread; no GPU involved (a CUDA allocation parses its arguments the same way). The
launchers' cached compile-time arguments are plain dicts: ``**`` copies a dict in C, while a
``types.MappingProxyType`` is unpacked key by key (``_gemm_constants`` in
``backends/triton/mlp.py``, the projection plans in ``conv_projection.py``).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from types import MappingProxyType
from typing import List

import torch


def measure(number: int, repeats: int) -> List[dict]:
    """Rows ``(op, form, us_per_call)``: the best of ``repeats`` timings of ``number``
    calls each."""
    x = torch.empty(1, 16, 64)
    y = torch.empty(16, 64)
    keywords = {f"K{i}": i for i in range(14)}  # a launch's constexprs, warps, stages
    env = {"torch": torch, "x": x, "y": y, "f32": torch.float32, "dev": x.device,
           "shape": x.shape, "tup": tuple(x.shape), "launch": lambda *a, **k: None,
           "args": tuple(range(24)), "kw": keywords, "kw_proxy": MappingProxyType(keywords)}
    literal = ", ".join(f"{k}={v}" for k, v in keywords.items())
    launch = "launch(*24 args, 14 keywords)"
    empty = "torch.empty(..., dtype, device)"
    cases = [
        (empty, "ints", "torch.empty(1, 16, 64, dtype=f32, device=dev)"),
        (empty, "tuple", "torch.empty(tup, dtype=f32, device=dev)"),
        (empty, "torch.Size", "torch.empty(shape, dtype=f32, device=dev)"),
        ("y.view(...)", "ints", "y.view(1, 16, 64)"),
        ("y.view(...)", "tuple", "y.view(tup)"),
        ("y.view(...)", "torch.Size", "y.view(shape)"),
        ("y.view(...)", "*torch.Size", "y.view(*shape)"),
        ("y.reshape(...)", "ints", "y.reshape(1, 16, 64)"),
        ("y.reshape(...)", "torch.Size", "y.reshape(shape)"),
        ("torch.empty_like(x)", "tensor", "torch.empty_like(x)"),
        ("y.t()", "view", "y.t()"),
        (launch, "literal", f"launch(*args, {literal})"),
        (launch, "**dict", "launch(*args, **kw)"),
        (launch, "**MappingProxyType", "launch(*args, **kw_proxy)"),
    ]
    rows = []
    for op, form, stmt in cases:
        best = min(timeit.repeat(stmt, globals=env, number=number, repeat=repeats))
        rows.append(dict(op=op, form=form, statement=stmt,
                         us_per_call=round(best / number * 1e6, 2)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=100000, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings (the best is reported)")
    p.add_argument("--out", help="directory for size_arguments.csv and .md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.number, args.repeats)
    for r in rows:
        print(f"{r['us_per_call']:7.2f} us  {r['statement']}")
    if args.out:
        from .common import save_results

        save_results(args.out, "size_arguments", "Parsing a size argument (ints, tuple or "
                     "torch.Size) and a launch's keywords (host us per call)", args, rows,
                     plot=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
