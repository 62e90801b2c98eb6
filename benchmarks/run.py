"""One harness for every benchmark level: ops, attention blocks, whole models.

    python -m benchmarks.run --quick --out /tmp/bench            # CPU: every level, ~1 min
    python -m benchmarks.run --level model --model cvt_13 --dtype bfloat16 \\
        --batch 1 8 32 64 128 256 --out DIR                       # GPU: CvT-13 batch sweep
    python -m benchmarks.run --level ops --op attention --batch 64 --out DIR
    python -m benchmarks.run --level blocks --model cvt_w24 --img-size 384 --providers eager,torch

Levels call the per-level scripts' ``run(args)`` (``benchmarks.attention_core``,
``benchmarks.conv_projection``, ``benchmarks.blocks``, ``benchmarks.models``), which still
run on their own. Files: ``attention_core``, ``conv_projection``, ``blocks``, ``models``
(+ ``--tag``) ``.csv``/``.md``/``.png`` under ``--out``, rewritten after every chunk of
work, so a run stopped by a timeout keeps what it measured. ``--budget-s`` stops starting
new work after that many seconds; the rows not measured say so (time-boxed GPU sessions).

CvT-21's attention shapes are CvT-13's: ``--model cvt_21`` at the op and block levels runs
CvT-13's shapes. ``--batch`` applies to every level (default: 64 for ops and blocks, a
sweep for models). On CPU the op and block levels run one tiny shape (CPU timing says
nothing about GPU kernels); ``torch.compile`` runs on CPU only with ``--compile``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from typing import Callable, List

from . import attention_core, blocks, conv_projection, models
from .common import DTYPES, current_device, out_of_time, save_results

OPS = {"attention": (attention_core, "attention_core", "Attention core: CvT stage shapes"),
       "conv_projection": (conv_projection, "conv_projection", "q/k/v convolutional projection")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--level", choices=["ops", "blocks", "model", "all"], default="all")
    p.add_argument("--op", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--quick", action="store_true",
                   help="every level at the smallest size (CPU smoke, about a minute)")
    p.add_argument("--model", nargs="+", choices=["cvt_13", "cvt_21", "cvt_w24"])
    p.add_argument("--img-size", nargs="+", type=int)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int)
    p.add_argument("--train-batch", nargs="+", type=int, help="model level: train batches")
    p.add_argument("--modes", nargs="+", choices=["eval", "train"], help="model level")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help="comma-separated subset, e.g. eager,accelerated,compile")
    p.add_argument("--compile", action="store_true", help="torch.compile on CPU too")
    p.add_argument("--compile-mode", default="max-autotune", help="or 'none'")
    p.add_argument("--repeats", type=int, help="CPU: timed calls per measurement")
    p.add_argument("--budget-s", type=float, help="start no new work after this many seconds")
    p.add_argument("--tag", default="", help="suffix for the file names, e.g. _compile")
    p.add_argument("--no-plot", action="store_true", help="write no .png (plot later from CSV)")
    p.add_argument("--out", help="directory for the results files")
    return p.parse_args(argv)


def saver(args: argparse.Namespace, name: str, title: str) -> Callable[..., None]:
    command = "python -m benchmarks.run " + shlex.join(args.argv)

    def save(rows: List[dict], final: bool = False) -> None:
        if args.out and rows:
            save_results(args.out, name + args.tag, title, args, rows, command=command,
                         plot=final and not args.no_plot, verbose=final)
    return save


def shape_chunks(args: argparse.Namespace):
    """(model, img_size) chunks for the op and block scripts (None: all of them)."""
    if args.quick or current_device().type == "cpu":
        return [(None, None)]  # those scripts run one tiny shape on CPU
    shape_models = sorted({"cvt_13" if m == "cvt_21" else m
                           for m in args.model or ["cvt_13", "cvt_w24"]})
    return [(m, s) for m in shape_models for s in (args.img_size or [224, 384])]


def run_shapes(module, name: str, title: str, args: argparse.Namespace) -> List[dict]:
    """Runs an op or block script chunk by chunk (model, size, batch), saving after each."""
    rows: List[dict] = []
    save = saver(args, name, title)
    on_gpu = current_device().type == "cuda"
    compile_mode = args.compile_mode if (on_gpu or args.compile) else "none"
    for model, img in shape_chunks(args):
        for batch in args.batch or [64]:
            if out_of_time(args):
                print(f"{name}: time budget spent, {model} {img} batch {batch} not run")
                continue
            sub = argparse.Namespace(quick=args.quick, model=model, img_size=img,
                                     dtype=args.dtype, batch=batch, out=None,
                                     compile_mode=compile_mode, providers=args.providers,
                                     deadline=args.deadline)
            rows += module.run(sub)
            save(rows)
    save(rows, final=True)
    return rows


def run_models(args: argparse.Namespace) -> List[dict]:
    sub = copy.copy(args)
    sub.model = args.model
    save = saver(args, "models", "Whole CvT models: images/s")
    rows = models.run(sub, on_rows=save)
    save(rows, final=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    args.deadline = time.monotonic() + args.budget_s if args.budget_s else None
    start = time.monotonic()
    levels = ["ops", "blocks", "model"] if args.level == "all" else [args.level]
    for level in levels:
        t0 = time.monotonic()
        if level == "ops":
            for op in args.op:
                module, name, title = OPS[op]
                run_shapes(module, name, title, args)
        elif level == "blocks":
            run_shapes(blocks, "blocks", "Attention blocks: CvT stage shapes", args)
        else:
            run_models(args)
        print(f"== level {level}: {time.monotonic() - t0:.1f} s", flush=True)
    print(f"== total {time.monotonic() - start:.1f} s on {current_device()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
