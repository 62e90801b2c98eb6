"""One harness for every benchmark level: ops, attention blocks, whole models.

Run it from the repository root (``python -m benchmarks.run``; elsewhere Python answers
"No module named 'benchmarks'"), or from anywhere as ``python PATH/TO/benchmarks/run.py``.

    python -m benchmarks.run --quick --out /tmp/bench            # CPU: every level, < 1 min
    python -m benchmarks.run --level ops blocks --quick --out DIR  # several levels
    python -m benchmarks.run --level model --model cvt_13 --dtype bfloat16 \\
        --batch 1 8 32 64 128 256 --out DIR                       # GPU: CvT-13 batch sweep
    python -m benchmarks.run --level ops --op attention --batch 64 --out DIR
    python -m benchmarks.run --level blocks --model cvt_w24 --img-size 384 --providers eager,torch

On a GPU (``--isolate auto``) the levels run in a worker process: a kernel that crashes the
CUDA context (an illegal address poisons every later call of the process) costs its own
row, recorded as ``crashed: ...``; a new worker goes on past it from a journal of the rows
done, and skips that provider's later rows (``benchmarks/journal.py``; blocks and model
levels; the op levels record the crash and go on). ``--no-md`` writes CSVs only
(``python -m benchmarks.plot CSV`` writes the .md and .png later).

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
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):  # python benchmarks/run.py: the package is the file's parent
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import main
    sys.exit(main())

from cvt_kernels import _cli  # noqa: E402

from . import attention_core, blocks, conv_projection, models  # noqa: E402
from .common import (CONTEXT_LOST_EXIT, DTYPES, ContextLost, current_device,  # noqa: E402
                     out_of_time, save_results)
from .journal import Journal, mark_exit  # noqa: E402

# A worker whose CUDA context was lost is replaced at most this many times per run.
MAX_RESTARTS = 4

OPS = {"attention": (attention_core, "attention_core", "Attention core: CvT stage shapes"),
       "conv_projection": (conv_projection, "conv_projection", "q/k/v convolutional projection")}


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--level", nargs="+", choices=["ops", "blocks", "model", "all"],
                   default=["all"], help="one or more levels, run in this order")
    p.add_argument("--op", nargs="+", choices=list(OPS), default=list(OPS),
                   help="ops level: which ops")
    p.add_argument("--quick", action="store_true",
                   help="every level at the smallest size (CPU smoke, under a minute; the "
                        "model level on a tiny CvT-13 unless --model is given)")
    p.add_argument("--model", nargs="+", choices=["cvt_13", "cvt_21", "cvt_w24"],
                   help="models whose shapes (ops, blocks) or whole models (model) to run")
    p.add_argument("--img-size", nargs="+", type=int, help="image sizes (224 384 on a GPU)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                   help="dtypes (bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--batch", nargs="+", type=int,
                   help="batches (64 for ops and blocks, a sweep for models)")
    p.add_argument("--train-batch", nargs="+", type=int, help="model level: train batches")
    p.add_argument("--modes", nargs="+", choices=["eval", "train"], help="model level")
    p.add_argument("--scope", choices=list(blocks.SCOPES), default="attention",
                   help="blocks level: the attention module, or whole transformer blocks")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help="comma-separated subset, e.g. eager,accelerated,compile")
    p.add_argument("--compile", action="store_true", help="torch.compile on CPU too")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile's mode, or 'none' for no compile provider")
    p.add_argument("--repeats", type=int, help="CPU: timed calls per measurement")
    p.add_argument("--budget-s", type=float, help="start no new work after this many seconds")
    p.add_argument("--tag", default="", help="suffix for the file names, e.g. _compile")
    p.add_argument("--append", action="store_true",
                   help="keep the rows an existing results file holds, except those this run "
                        "measures again (a later step of a GPU session adds to one file)")
    p.add_argument("--no-plot", action="store_true", help="write no .png (plot later from CSV)")
    p.add_argument("--no-md", action="store_true",
                   help="write no .md (python -m benchmarks.plot CSV makes it later)")
    p.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                   help="run the levels in a worker process that a new one replaces when a "
                        "kernel crashes the CUDA context (auto: on a GPU)")
    p.add_argument("--out", help="directory for the results files (made if missing); "
                                 "without it nothing is written")
    # Set by the supervisor for its worker processes.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--journal-dir", help=argparse.SUPPRESS)
    p.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    counts = (args.batch or []) + (args.train_batch or []) + (args.img_size or []) + (
        [args.repeats] if args.repeats is not None else [])
    if any(n < 1 for n in counts):
        p.error("--batch, --train-batch, --img-size and --repeats take positive numbers")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: is a file, expected a directory (made if missing)")
    if args.providers:
        check_providers(p, args)
    return args


# The projection script builds its providers inline (benchmarks/conv_projection.py: run).
CONV_PROJECTION_PROVIDERS = ("eager", "reference", "torch", "compile", "triton")


def provider_names(args: argparse.Namespace) -> Dict[str, List[str]]:
    """Each level (op) that ``args`` runs -> the providers its script knows, whether or not
    they can run here (those that cannot are rows saying why)."""
    import torch

    chosen = {lv for level in args.level
              for lv in (["ops", "blocks", "model"] if level == "all" else [level])}
    names: Dict[str, List[str]] = {}
    if "ops" in chosen and "attention" in args.op:
        names["ops attention"] = list(attention_core.providers(torch.device("cpu")))
    if "ops" in chosen and "conv_projection" in args.op:
        names["ops conv_projection"] = list(CONV_PROJECTION_PROVIDERS)
    if "blocks" in chosen:
        names["blocks"] = list(blocks.PROVIDERS)
    if "model" in chosen:  # the factories build nothing until called
        every = argparse.Namespace(compile_mode="max-autotune", compile=True, providers=None)
        names["model"] = list(models.make_providers(None, every, torch.device("cpu")))
    return names


def check_providers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A name no chosen level knows (a typo) stops the run before anything is measured,
    instead of being dropped from every level."""
    names = provider_names(args)
    known = {n for level in names.values() for n in level}
    unknown = [n for n in args.providers if n not in known]
    if unknown:
        listed = "; ".join(f"{level}: {', '.join(level_names)}"
                           for level, level_names in names.items())
        p.error(f"--providers {','.join(unknown)}: not a provider of the chosen level(s) "
                f"({' '.join(args.level)}); the providers are {listed}")


def saver(args: argparse.Namespace, name: str, title: str) -> Callable[..., None]:
    command = "python -m benchmarks.run " + shlex.join(args.argv)

    def save(rows: List[dict], final: bool = False) -> None:
        if args.out and rows:
            save_results(args.out, name + args.tag, title, args, rows, command=command,
                         plot=final and not args.no_plot, verbose=final,
                         markdown=not args.no_md)
    return save


def journal_for(args: argparse.Namespace, name: str) -> Journal:
    """The level's journal in the supervisor's directory (none when not isolated)."""
    if not args.journal_dir:
        return Journal(None)
    return Journal(os.path.join(args.journal_dir, f"{name}{args.tag}.jsonl"))


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
    journal = journal_for(args, name)
    for model, img in shape_chunks(args):
        for batch in args.batch or [64]:
            if out_of_time(args):
                print(f"{name}: time budget spent, {model} {img} batch {batch} not run")
                continue
            done = list(rows)
            # Blocks save after every row (and journal it); the op levels after every chunk.
            sub = argparse.Namespace(quick=args.quick, model=model, img_size=img,
                                     dtype=args.dtype, batch=batch, out=None,
                                     compile_mode=compile_mode, providers=args.providers,
                                     scope=args.scope,
                                     deadline=args.deadline, journal=journal,
                                     on_rows=lambda chunk: save(done + chunk))
            rows += module.run(sub)
            save(rows)
    save(rows, final=True)
    return rows


def run_models(args: argparse.Namespace) -> List[dict]:
    sub = copy.copy(args)
    sub.model = args.model
    sub.journal = journal_for(args, "models")
    save = saver(args, "models", "Whole CvT models: images/s")
    rows = models.run(sub, on_rows=save)
    save(rows, final=True)
    return rows


def supervise(argv: List[str], args: argparse.Namespace) -> int:
    """Runs the levels in a worker process; when a worker stops with a row unfinished (it
    died) or reports a lost CUDA context, a new worker goes on from the journals, past the
    row that crashed (``journal.py``). Any other exit ends the run with its code."""
    deadline = time.time() + args.budget_s if args.budget_s else None
    with tempfile.TemporaryDirectory(prefix="cvt_bench_journal_") as journal_dir:
        # The file, not -m: the worker runs in the user's directory (a relative --out means
        # the same there), and the file finds its package from anywhere.
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker",
                   "--journal-dir", journal_dir]
        if deadline is not None:
            command += ["--deadline-epoch", str(deadline)]
        for attempt in range(MAX_RESTARTS + 1):
            rc = subprocess.call(command)
            how = (f"signal {-rc}" if rc < 0 else f"exit code {rc}")
            unfinished = [mark_exit(str(p), how) for p in Path(journal_dir).glob("*.jsonl")]
            if rc == 0 or not (rc == CONTEXT_LOST_EXIT or any(unfinished)):
                return rc
            print(f"== worker stopped ({how}); continuing in a new process "
                  f"({attempt + 1} of {MAX_RESTARTS} restarts)", flush=True)
        print(f"== gave up after {MAX_RESTARTS} restarts", flush=True)
        return 1


def user_argv(argv: List[str]) -> List[str]:
    """``argv`` without the options the supervisor adds (the command stamped on results)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--journal-dir", "--deadline-epoch"):
            skip = True
        elif a != "--worker":
            out.append(a)
    return out


def main(argv=None) -> int:
    """The exit code: 0, 2 for a usage error, 1 (or the worker's code) for a failure."""
    return _cli.run(_main, argv, "python -m benchmarks.run")


def _main(argv: List[str]) -> int:
    args = parse_args(argv)
    args.argv = user_argv(argv)
    isolate = args.isolate == "on" or (args.isolate == "auto" and current_device().type == "cuda")
    if not args.out and not args.worker:
        print("note: no --out DIR given: results are printed here, no files are written",
              flush=True)
    if isolate and not args.worker:
        return supervise(argv, args)
    if args.deadline_epoch is not None:
        args.deadline = time.monotonic() + (args.deadline_epoch - time.time())
    else:
        args.deadline = time.monotonic() + args.budget_s if args.budget_s else None
    start = time.monotonic()
    levels = [lv for level in args.level
              for lv in (["ops", "blocks", "model"] if level == "all" else [level])]
    levels = list(dict.fromkeys(levels))
    try:
        for level in levels:
            t0 = time.monotonic()
            finished = (Path(args.journal_dir) / f"{level}.done" if args.journal_dir else None)
            if finished is not None and finished.exists():  # before a restart: files saved
                print(f"== level {level}: done by an earlier worker", flush=True)
                continue
            if level == "ops":
                for op in args.op:
                    module, name, title = OPS[op]
                    run_shapes(module, name, title, args)
            elif level == "blocks":
                run_shapes(blocks, "blocks", "Attention blocks: CvT stage shapes", args)
            else:
                run_models(args)
            if finished is not None:
                finished.touch()
            print(f"== level {level}: {time.monotonic() - t0:.1f} s", flush=True)
    except ContextLost as exc:
        print(f"== CUDA context lost ({exc}); results so far are saved", flush=True)
        return CONTEXT_LOST_EXIT
    print(f"== total {time.monotonic() - start:.1f} s on {current_device()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
