"""Fill the dispatch cache for a model: ``python -m cvt_kernels.tune``.

    python -m cvt_kernels.tune --model cvt_13 --img-size 224 --batch 64 --dtype bfloat16
    python -m cvt_kernels.tune --model cvt_w24 --img-size 384 --batch 32 --eval
    python -m cvt_kernels.tune --scope block     # a model accelerated with scope="block"

Builds the model (random weights: the choices depend on shapes, not values), accelerates
it, and runs one training step (forward and backward) and/or one inference call, so every
fused call decides which implementation serves it (``cvt_kernels.dispatch``: each candidate
checked against a higher-precision truth, timed, the fastest correct one kept) and the
decisions land in the cache file, where later processes on this machine find them. Prints
one line per attention module as it runs, then a table: every key, its candidates' times
and errors, the choice. On CPU nothing is timed (the ``torch`` backend serves every call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from . import _cli, accelerate, dispatch, models
from .modules import FusedConvAttention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROG = "python -m cvt_kernels.tune"


#: What a run tunes unless told otherwise: the GPU defaults are the training setup the
#: dispatch decisions matter for; on a CPU nothing is timed (the torch backend serves every
#: call), so a small float32 run only fills the keys, in seconds instead of minutes.
DEFAULTS = {"cuda": {"dtype": "bfloat16", "batch": 64}, "cpu": {"dtype": "float32", "batch": 2}}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Options checked and per-device defaults filled in; a bad value is a
    :class:`cvt_kernels._cli.UsageError` (one line, exit code 2 under :func:`main`)."""
    p = _cli.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS),
                   help="the CvT whose calls to tune")
    p.add_argument("--img-size", type=int, default=224, help="image height and width")
    p.add_argument("--batch", type=int,
                   help=f"images per call ({DEFAULTS['cuda']['batch']} on a GPU, "
                        f"{DEFAULTS['cpu']['batch']} on CPU)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help=f"model dtype ({DEFAULTS['cuda']['dtype']} on a GPU, "
                        f"{DEFAULTS['cpu']['dtype']} on CPU)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="only the training step")
    mode.add_argument("--eval", action="store_true", help="only inference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N]")
    p.add_argument("--scope", default="attention", choices=["attention", "block"],
                   help="what accelerate() replaces, as the model you will run: the "
                   "attention modules, or whole blocks (LayerNorm and MLP decisions too)")
    args = p.parse_args(argv)
    if args.img_size < 16 or (args.batch is not None and args.batch < 1):
        p.error(f"--img-size {args.img_size} / --batch {args.batch}: expected an image of at "
                f"least 16 pixels and a batch of at least 1")
    device = _cli.check_device(args.device)
    args.device = str(device)
    for name, value in DEFAULTS[device.type].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def describe_run(args: argparse.Namespace) -> str:
    """What this run tunes, in one line (the first the command prints)."""
    modes = "training step" if args.train else "inference" if args.eval else \
        "training step and inference"
    what = "attention modules" if args.scope == "attention" else "whole blocks"
    return (f"tuning {args.model} {args.img_size}x{args.img_size}, batch {args.batch}, "
            f"{args.dtype} on {args.device}: {modes}, {what} accelerated")


def summary(decision: dispatch.Decision) -> str:
    """The call a key describes, in a few words (shapes, dtype, mode)."""
    try:
        key = json.loads(decision.key)
    except ValueError:
        return decision.key
    skip = {"torch", "triton", "cvt_kernels", "device", "op"}
    return " ".join(f"{k}={v}" for k, v in key.items() if k not in skip)


def table(made: List[dispatch.Decision]) -> str:
    lines = [f"{'op':16s} {'choice':9s} {'how':14s} candidates (median ms, error vs truth)  "
             f"| call"]
    for d in made:
        op = json.loads(d.key).get("op", "?") if d.key.startswith("{") else d.key
        cands = "; ".join(dispatch.candidate_texts(d, reason_width=60))
        lines.append(f"{op:16s} {d.choice:9s} {d.source:14s} {cands}  | {summary(d)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> List[dispatch.Decision]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = getattr(models, args.model)(img_size=args.img_size).to(device=device, dtype=dtype)
    model, replaced = accelerate(model, scope=args.scope)
    attention = [m for m in model.modules() if isinstance(m, FusedConvAttention)]
    done = {"n": 0, "mode": ""}

    def progress(module, inputs):
        done["n"] += 1
        print(f"  [{args.model} {done['mode']}] attention {done['n']}/{len(attention)} "
              f"({time.monotonic() - start:.1f} s)", flush=True)

    hooks = [m.register_forward_pre_hook(progress) for m in attention]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    modes = ["train"] if args.train else ["eval"] if args.eval else ["train", "eval"]
    start = time.monotonic()
    try:
        for mode in modes:
            done.update(n=0, mode=mode)
            if mode == "train":
                model.train()
                model(x).float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                model.eval()
                with torch.no_grad():
                    model(x)
    finally:
        for h in hooks:
            h.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    what = "attention modules" if args.scope == "attention" else "blocks"
    print(f"{replaced} {what}, {', '.join(modes)}: {time.monotonic() - start:.1f} s")
    return list(dispatch.decisions().values())


def main(argv: Optional[List[str]] = None) -> int:
    """The exit code: 0, 2 for a usage error (a bad option, a device this machine lacks, a
    bad dispatch setting), 1 for a failure while running; errors are one line on stderr
    (``--debug``: the traceback)."""
    return _cli.run(_main, argv, PROG)


def _main(argv: List[str]) -> int:
    args = parse_args(argv)
    try:
        policy, path = dispatch.policy(), dispatch.cache_path()
    except ValueError as exc:
        raise _cli.UsageError(str(exc)) from exc
    print(describe_run(args), flush=True)
    print(f"dispatch policy {policy}; decisions file {path or 'off (memory only)'}")
    if policy != "measure":
        print(f"{dispatch.POLICY_ENV}={policy}: nothing is measured; unset it to tune")
    if args.device == "cpu":
        print("on CPU nothing is timed: the torch backend serves every call")
    made = run(args)
    print(table(made) if made else "no decision was made (nothing to choose between)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
