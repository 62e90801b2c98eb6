"""The main job: build a CvT (CvT-13 unless --model names another), accelerate it, check it
agrees with eager, time both.

    python python/demo.py                      # CPU: CvT-13, float32, batch 4, 224x224
    python python/demo.py --model cvt_21 --img-size 64 --no-train
    python python/demo.py --save benchmarks/results/cpu

On a GPU it runs bfloat16 at batch 64 unless told otherwise. Eval (inference) and a
training step (forward + backward + AdamW) are timed side by side, interleaved. First the
accelerated model's outputs, gradients and running statistics are checked: each of eager
and accelerated against a truth at higher precision (float64 for float32, float32 for
fp16/bf16), accelerated's error at most twice eager's (``cvt_kernels.agreement``). No speed
is reported for a model that fails.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cvt_kernels  # noqa: E402
from cvt_kernels import _cli, agreement, backends, models  # noqa: E402
from cvt_kernels.modules import SCOPES  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = _cli.ArgumentParser(prog="demo.py", description=__doc__)
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS),
                   help="the CvT to build")
    p.add_argument("--batch", type=int, default=64 if on_gpu else 4,
                   help="images per call (64 on a GPU, 4 on CPU)")
    p.add_argument("--img-size", type=int, default=224, help="image height and width")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=DTYPES,
                   help="model and input dtype (bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--backend", default="auto", type=str.lower,
                   choices=backends.KNOWN_BACKENDS + ("auto",),
                   help="force this backend for the accelerated model (auto: the dispatcher "
                        "chooses)")
    p.add_argument("--repeats", type=int, default=10 if not on_gpu else 30,
                   help="timed calls per provider (30 on a GPU)")
    p.add_argument("--warmup", type=int, default=2 if not on_gpu else 5,
                   help="untimed calls first (5 on a GPU)")
    p.add_argument("--scope", default="attention", choices=SCOPES,
                   help="what accelerate() replaces: the attention modules, or whole blocks "
                        "(LayerNorms and MLPs too)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument("--save", metavar="DIR", help="write demo_<model>_<...>.csv/.md into DIR")
    args = p.parse_args(argv)
    if args.batch < 1 or args.img_size < 16 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --img-size >= 16, --warmup >= 0")
    args.device = _cli.check_device(args.device)
    check_backend(args.backend)
    return args


def check_backend(name: str) -> None:
    """A forced backend that cannot run on this machine at all is a usage error; one that
    declines a particular call fails that call (exit code 1) with its reasons."""
    available = backends.available_backends()
    if name != "auto" and available[name] is not None:
        usable = ", ".join(["auto"] + [n for n, reason in available.items() if reason is None])
        raise _cli.UsageError(f"--backend {name}: not available here ({available[name]}); "
                              f"use one of: {usable}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Median-friendly samples, alternating providers so drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def q20(samples: List[float]) -> float:
    """The 20th percentile (the smallest sample when there are fewer than two)."""
    return statistics.quantiles(samples, n=5)[0] if len(samples) > 1 else min(samples)


def check_agreement(eager: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor,
                    dtype: torch.dtype) -> List[agreement.Verdict]:
    """Eval logits, then one training step from the same state (logits, every gradient,
    the running statistics after it), accelerated vs eager, each against the truth."""
    truth = copy.deepcopy(eager).to(agreement.truth_dtype(dtype))
    xt = x.to(agreement.truth_dtype(dtype))
    models3 = (fused, eager, truth)
    for m in models3:
        m.eval()
    with torch.inference_mode(), agreement.exact_float32():
        logits = [m(xi) for m, xi in zip(models3, (x, x, xt))]
    verdicts = [agreement.judge("eval logits", *logits, dtype)]
    outs = []
    # A random cotangent of size ~1 (not the gradient of a mean, whose 1/numel scale puts
    # fp16 gradients among the subnormals, where fp16 noise swamps every comparison).
    grad = torch.randn(logits[1].shape, generator=torch.Generator().manual_seed(2))
    grad = grad.to(x.device, dtype)
    with agreement.no_drop_path(*models3), agreement.exact_float32():
        for m, xi in zip(models3, (x, x, xt)):
            m.train()
            out = m(xi)
            out.backward(grad.to(out.dtype))
            outs.append(out.detach())
    verdicts.append(agreement.judge("train logits", *outs, dtype))
    params = [dict(m.named_parameters()) for m in models3]
    names = [n for n, p in params[1].items() if p.grad is not None]
    verdicts.append(agreement.judge_all(
        "gradients", *([p[n].grad for n in names] for p in params), dtype, relative_floor=1e-3))
    buffers = [dict(m.named_buffers()) for m in models3]
    names = [n for n, b in buffers[1].items() if b.is_floating_point()]
    verdicts.append(agreement.judge_all(
        "running stats", *([b[n] for n in names] for b in buffers), dtype))
    del truth
    return verdicts


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def main(argv=None) -> int:
    """The exit code: 0 when the models agree (and were timed), 1 when they do not or a run
    fails, 2 for a usage error; errors are one line on stderr (``--debug``: the traceback)."""
    return _cli.run(_main, argv, "demo.py")


def _main(argv) -> int:
    args = parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        print("note: float16 on CPU is slow in eager PyTorch; timings will say little")
    torch.manual_seed(0)
    eager = getattr(models, args.model)(img_size=args.img_size).to(device=device, dtype=dtype)
    fused = copy.deepcopy(eager)
    _, replaced = cvt_kernels.accelerate(fused, scope=args.scope)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    with backends.use_backend(args.backend):
        probe = fused.stage0.blocks[0].attn
        print(f"cvt_kernels {cvt_kernels.__version__} | torch {torch.__version__} | "
              f"{device_name(device)} | {args.model} {args.img_size}x{args.img_size} "
              f"batch {args.batch} {args.dtype}")
        what = "attention modules" if args.scope == "attention" else "blocks"
        print(f"accelerated {replaced} {what}; backend for "
              f"{type(probe).__name__}: {backends.forced_backend() or 'auto'} -> "
              f"{backends.select('conv_projection', lambda b: b.conv_projection_reasons(x, probe._projection('q')[1], False)).name}")

        # ---- agreement first: eval logits, one training step's logits, gradients and
        # running statistics. Each of eager and accelerated is compared with a truth at
        # higher precision (float64 for float32, float32 for fp16/bf16) from the same
        # weights and inputs; accelerated passes when its error is at most twice eager's
        # (+ a small eps): the rule of cvt_kernels.agreement, which measures our kernels
        # rather than bf16's own noise.
        checks = check_agreement(eager, fused, x, dtype)
        ok = agreement.all_ok(checks)
        print("agreement with a " + str(agreement.truth_dtype(dtype))[6:] + " truth (max |diff|"
              " / max |truth|; accelerated <= 2x eager + eps):")
        for v in checks:
            print(f"  {v}")
        print(f"  -> {'OK' if ok else 'MISMATCH'}")
        if not ok:
            print("demo.py: error: the accelerated model disagrees with the truth by more "
                  "than eager does (FAIL above), so it is not timed; please report it with "
                  "this output and that of python -m cvt_kernels.info", file=sys.stderr)
            return 1

        rows = []
        eager.eval(), fused.eval()
        with torch.inference_mode():
            samples = time_interleaved({"eager": lambda: eager(x), "accelerated": lambda: fused(x)},
                                       args.repeats, args.warmup, device)
        rows.append(("eval forward", samples))
        if not args.no_train:
            eager.train(), fused.train()
            opts = {"eager": torch.optim.AdamW(eager.parameters(), lr=1e-6),
                    "accelerated": torch.optim.AdamW(fused.parameters(), lr=1e-6)}

            def step(model, opt):
                def run():
                    opt.zero_grad(set_to_none=True)
                    model(x).float().square().mean().backward()
                    opt.step()
                return run

            samples = time_interleaved({"eager": step(eager, opts["eager"]),
                                        "accelerated": step(fused, opts["accelerated"])},
                                       max(3, args.repeats // 2), args.warmup, device)
            rows.append(("train step (fwd+bwd+AdamW)", samples))

    table = []
    print(f"\n{'mode':28s} {'eager ms':>10s} {'accel ms':>10s} {'speedup':>8s} {'img/s accel':>12s}")
    for mode, samples in rows:
        te, ta = (statistics.median(samples[k]) for k in ("eager", "accelerated"))
        speedup = te / ta
        print(f"{mode:28s} {te * 1e3:10.1f} {ta * 1e3:10.1f} {speedup:7.2f}x "
              f"{args.batch / ta:12.1f}")
        table.append({"mode": mode, "eager_ms": round(te * 1e3, 3),
                      "accelerated_ms": round(ta * 1e3, 3), "speedup": round(speedup, 3),
                      "eager_q20_ms": round(q20(samples["eager"]) * 1e3, 3),
                      "accelerated_q20_ms": round(q20(samples["accelerated"]) * 1e3, 3),
                      "repeats": len(samples["eager"])})

    if args.save:
        out_dir = Path(args.save)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = (f"demo_{args.model}_{args.img_size}_b{args.batch}_{args.dtype}"
                + ("" if args.scope == "attention" else f"_{args.scope}"))
        stamp = {"device": device_name(device), "torch": torch.__version__,
                 "cvt_kernels": cvt_kernels.__version__, "commit": git_commit(),
                 "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "backend": args.backend, "scope": args.scope,
                 "threads": torch.get_num_threads(),
                 "command": "python python/demo.py " + " ".join(argv)}
        with open(out_dir / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]) + list(stamp))
            writer.writeheader()
            for row in table:
                writer.writerow({**row, **stamp})
        with open(out_dir / f"{stem}.md", "w") as f:
            f.write(f"# {args.model} {args.img_size}x{args.img_size}, batch {args.batch}, "
                    f"{args.dtype}: eager vs accelerated\n\n")
            f.write("".join(f"- {k}: {v}\n" for k, v in stamp.items()))
            f.write(f"- agreement (accelerated vs eager, each against a "
                    f"{str(agreement.truth_dtype(dtype))[6:]} truth): "
                    f"{agreement.describe(checks)}\n\n")
            f.write("| mode | eager ms (median) | accelerated ms (median) | speedup | repeats |\n")
            f.write("|---|---|---|---|---|\n")
            for r in table:
                f.write(f"| {r['mode']} | {r['eager_ms']} | {r['accelerated_ms']} | "
                        f"{r['speedup']}x | {r['repeats']} |\n")
        print(f"\nwrote {out_dir / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
