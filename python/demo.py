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
is reported for a model that fails. Batch 1, and sizes whose training step has a BatchNorm
over fewer than 8 values per channel (CvT-13 below 40x40 at batch 2), are refused: there
eager's own gradients are noise and no rule can judge (measurements at MIN_BATCH_NORM_VALUES).
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cvt_kernels  # noqa: E402
from cvt_kernels import _cli, agreement, backends, models  # noqa: E402
from cvt_kernels._progress import Progress  # noqa: E402
from cvt_kernels.modules import SCOPES  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The agreement check needs every BatchNorm to normalize over at least this many values
#: per channel in its training step, and a batch of at least MIN_BATCH. Below them eager's
#: own gradients are rounding noise amplified (two values normalize to exactly -1 and +1
#: whatever they were) and eager's error on one tensor is luck, so the per-tensor 2x rule
#: fails correct backends. Measured on CvT-13, float32, 6 seeds per row, the worst tensor's
#: error / bar for the torch and reference backends (2026-12-07, 2-core CPU): 40x40 batch 1
#: (4 values) up to 1.15 (2 of 12 failed); batch 1 at 72x72 (9 values) 0.91, at 112x112
#: 0.91, at 224x224 0.80; 40x40 batch 2 (8 values) 0.40; 40x40 batch 4 (16 values) 0.33.
MIN_BATCH_NORM_VALUES = 8
MIN_BATCH = 2


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
    check_judgeable(args.model, args.img_size, args.batch)
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
                     device: torch.device, progress: Optional[Progress] = None
                     ) -> Tuple[Dict[str, List[float]], float]:
    """Median-friendly samples, alternating providers so drift hits both alike, and the
    CPU share: this process's CPU time over (wall time x torch's threads), as
    ``benchmarks.common.time_interleaved_cpu`` measures it (CPU only; 1.0 on a GPU)."""
    for i in range(warmup):
        for fn in fns.values():
            fn()
        if progress is not None:
            progress.tick(f"warm-up {i + 1}/{warmup}")
    sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    wall = cpu = 0.0
    for i in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
            wall += samples[name][-1]
            cpu += time.process_time() - start_cpu
            if progress is not None:
                progress.tick(f"round {i + 1}/{repeats}, {name} done")
    share = 1.0 if device.type == "cuda" else cpu / (wall * torch.get_num_threads())
    return samples, share


#: Below this CPU share (this process's CPU time / (wall time x threads)) other processes
#: took the cores while the demo timed: its ratios are not measurements.
QUIET_SHARE = 0.8


def load_verdict(shares: List[float], rows) -> Optional[str]:
    """Why the timings were taken under load (``None``: the machine was quiet enough):
    the CPU share below :data:`QUIET_SHARE`, or a provider's q20-q80 spread larger than
    half its median (the rule ``benchmarks.common.unresolved`` applies, made stricter for
    a ratio of two such times)."""
    share = min(shares) if shares else 1.0
    if share < QUIET_SHARE:
        return (f"this process got {share:.0%} of the CPU time it asked for (other "
                f"processes held the cores; below {QUIET_SHARE:.0%} the demo calls it busy)")
    for mode, samples in rows:
        for name, xs in samples.items():
            if len(xs) > 1:
                qs = statistics.quantiles(xs, n=5)
                if qs[-1] - qs[0] > 0.5 * statistics.median(xs):
                    return (f"the {name} {mode} times spread by more than half their median "
                            f"(q20 {qs[0] * 1e3:.1f} ms, q80 {qs[-1] * 1e3:.1f} ms)")
    return None


def q20(samples: List[float]) -> float:
    """The 20th percentile (the smallest sample when there are fewer than two)."""
    return statistics.quantiles(samples, n=5)[0] if len(samples) > 1 else min(samples)


def check_agreement(eager: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor,
                    dtype: torch.dtype, progress: Optional[Progress] = None
                    ) -> List[agreement.Verdict]:
    """Eval logits, then one training step from the same state (logits, every gradient,
    the running statistics after it), accelerated vs eager, each against the truth."""
    def tick(detail: str) -> None:
        if progress is not None:
            progress.tick(detail)

    with heartbeat_per_block(progress, eager, fused):
        return _check_agreement(eager, fused, x, dtype, tick)


@contextlib.contextmanager
def heartbeat_per_block(progress: Optional[Progress], *modules: torch.nn.Module
                        ) -> Iterator[None]:
    """While the check runs, every transformer block's forward and backward may print a
    "still ..." line (at most every 10 s): a float64 training step of CvT-13 on a small CPU
    is minutes with no other place to say so."""
    if progress is None:
        yield
        return
    blocks = [m for module in modules for m in module.modules()
              if type(m).__name__ in ("Block", "FusedBlock")]
    handles = [h for i, m in enumerate(blocks) for h in (
        m.register_forward_pre_hook(lambda *_, i=i: progress.tick(f"block {i + 1} forward")),
        m.register_full_backward_pre_hook(
            lambda *_, i=i: progress.tick(f"block {i + 1} backward")))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_agreement(eager, fused, x, dtype, tick) -> List[agreement.Verdict]:
    truth = copy.deepcopy(eager).to(agreement.truth_dtype(dtype))
    xt = x.to(agreement.truth_dtype(dtype))
    models3 = (fused, eager, truth)
    for m in models3:
        m.eval()
    names3 = ("accelerated", "eager", "truth")
    logits = []
    with torch.inference_mode(), agreement.exact_float32():
        for name, m, xi in zip(names3, models3, (x, x, xt)):
            tick(f"eval of the {name} model")
            logits.append(m(xi))
    verdicts = [agreement.judge("eval logits", *logits, dtype)]
    outs = []
    # A random cotangent of size ~1 (not the gradient of a mean, whose 1/numel scale puts
    # fp16 gradients among the subnormals, where fp16 noise swamps every comparison).
    grad = torch.randn(logits[1].shape, generator=torch.Generator().manual_seed(2))
    grad = grad.to(x.device, dtype)
    with agreement.no_drop_path(*models3), agreement.exact_float32():
        for name, m, xi in zip(names3, models3, (x, x, xt)):
            tick(f"training step of the {name} model")
            m.train()
            out = m(xi)
            out.backward(grad.to(out.dtype))
            outs.append(out.detach())
    tick("comparing the gradients and running statistics")
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


def accelerated_line(fused: torch.nn.Module, replaced: int, scope: str, x: torch.Tensor
                     ) -> str:
    """What ``accelerate()`` replaced (the module class, and at block scope what a block
    fuses), and the backend that serves the first q projection."""
    block = fused.stage0.blocks[0]
    if scope == "block":
        what = f"{replaced} blocks ({type(block).__name__}: attention, LayerNorms and MLP)"
    else:
        what = f"{replaced} attention modules ({type(block.attn).__name__})"
    cfg = block.attn._projection("q")[1]
    chosen = backends.select("conv_projection",
                             lambda b: b.conv_projection_reasons(x, cfg, False)).name
    return (f"accelerated {what}; backend {backends.forced_backend() or 'auto'} -> {chosen} "
            f"(stage 0's first q projection)")


def batch_norm_values(model: str, img_size: int, batch: int) -> Tuple[int, str, tuple]:
    """The fewest values per channel a BatchNorm of the model normalizes over in training
    (batch x its map), that BatchNorm's name and input shape, from a forward on the meta
    device (nothing is computed or allocated)."""
    with torch.device("meta"):
        net = getattr(models, model)(img_size=img_size).eval()  # eval: shapes only
    seen: List[Tuple[int, str, tuple]] = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda _m, inputs, name=name: seen.append(
                (inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3], name,
                 tuple(inputs[0].shape))))
    net(torch.empty(batch, 3, img_size, img_size, device="meta"))
    return min(seen, key=lambda seen_one: seen_one[0])


def check_judgeable(model: str, img_size: int, batch: int) -> None:
    """A size whose agreement check would be luck is a usage error saying which sizes work
    (see MIN_BATCH_NORM_VALUES)."""
    if batch < MIN_BATCH:
        raise _cli.UsageError(
            f"--batch {batch}: at batch 1 the agreement check's training gradients are "
            f"noise-dominated (every BatchNorm normalizes one image; a correct backend's "
            f"worst gradient reached 0.8-1.15x the 2x-eager bar from 40x40 to 224x224), so "
            f"no verdict would mean anything: use --batch {MIN_BATCH} or more")
    values, name, shape = batch_norm_values(model, img_size, batch)
    if values >= MIN_BATCH_NORM_VALUES:
        return
    need_batch = max(MIN_BATCH, -(-MIN_BATCH_NORM_VALUES // (values // batch)))
    need_img = next(size for size in range(img_size + 8, 8 * img_size + 9, 8)
                    if batch_norm_values(model, size, batch)[0] >= MIN_BATCH_NORM_VALUES)
    raise _cli.UsageError(
        f"--img-size {img_size} --batch {batch}: the agreement check's training step has a "
        f"BatchNorm over {values} value(s) per channel ({name}: batch {batch} x a "
        f"{shape[2]}x{shape[3]} map); below {MIN_BATCH_NORM_VALUES} eager PyTorch's own "
        f"gradients are noise, so no rule can judge the accelerated model's: use --batch "
        f"{need_batch} or more, or --img-size {need_img} or more")


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
    progress = Progress("demo.py", total=4 if args.no_train else 5)
    progress.step(f"building {args.model} and accelerating it ({args.scope} scope)")
    torch.manual_seed(0)
    eager = getattr(models, args.model)(img_size=args.img_size).to(device=device, dtype=dtype)
    fused = copy.deepcopy(eager)
    _, replaced = cvt_kernels.accelerate(fused, scope=args.scope)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    with backends.use_backend(args.backend):
        print(f"cvt_kernels {cvt_kernels.__version__} | torch {torch.__version__} | "
              f"{device_name(device)} | {args.model} {args.img_size}x{args.img_size} "
              f"batch {args.batch} {args.dtype}")
        print(accelerated_line(fused, replaced, args.scope, x))

        # ---- agreement first: eval logits, one training step's logits, gradients and
        # running statistics. Each of eager and accelerated is compared with a truth at
        # higher precision (float64 for float32, float32 for fp16/bf16) from the same
        # weights and inputs; accelerated passes when its error is at most twice eager's
        # (+ a small eps): the rule of cvt_kernels.agreement, which measures our kernels
        # rather than bf16's own noise.
        progress.step("checking agreement: eval and one training step of eager, accelerated "
                      "and a higher-precision truth")
        checks = check_agreement(eager, fused, x, dtype, progress)
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

        rows, shares = [], []
        eager.eval(), fused.eval()
        progress.step(f"timing eval: {args.warmup} warm-up and {args.repeats} timed calls of "
                      f"each model, alternating")
        with torch.inference_mode():
            samples, share = time_interleaved(
                {"eager": lambda: eager(x), "accelerated": lambda: fused(x)}, args.repeats,
                args.warmup, device, progress)
        rows.append(("eval forward", samples))
        shares.append(share)
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

            progress.step(f"timing the training step: {args.warmup} warm-up and "
                          f"{max(3, args.repeats // 2)} timed steps of each model")
            samples, share = time_interleaved({"eager": step(eager, opts["eager"]),
                                               "accelerated": step(fused, opts["accelerated"])},
                                              max(3, args.repeats // 2), args.warmup, device,
                                              progress)
            rows.append(("train step (fwd+bwd+AdamW)", samples))
            shares.append(share)
    progress.step("done")

    busy = load_verdict(shares, rows)
    table = []
    print(f"\n{'mode':28s} {'eager ms':>10s} {'accel ms':>10s} {'speedup':>8s} "
          f"{'img/s accel':>12s}")
    for mode, samples in rows:
        te, ta = (statistics.median(samples[k]) for k in ("eager", "accelerated"))
        speedup = te / ta
        print(f"{mode:28s} {te * 1e3:10.1f} {ta * 1e3:10.1f} {speedup:7.2f}x "
              f"{args.batch / ta:12.1f}")
        table.append({"mode": mode, "eager_ms": round(te * 1e3, 3),
                      "accelerated_ms": round(ta * 1e3, 3), "speedup": round(speedup, 3),
                      "eager_q20_ms": round(q20(samples["eager"]) * 1e3, 3),
                      "accelerated_q20_ms": round(q20(samples["accelerated"]) * 1e3, 3),
                      "repeats": len(samples["eager"]),
                      "cpu_share": round(min(shares), 2), "under_load": busy or ""})
    if busy:
        print(f"\nUNDER LOAD: {busy}. The times and ratios above were taken under load and "
              f"are not a measurement; rerun on a quiet machine (benchmarks.run refuses such "
              f"ratios).")
    elif device.type == "cpu":
        print(f"\nquiet machine: this process got {min(shares):.0%} of the CPU time it asked "
              f"for while timing")

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
            if busy:
                f.write(f"**Taken under load, not a measurement**: {busy}.\n\n")
            f.write("| mode | eager ms (median) | accelerated ms (median) | speedup | repeats |\n")
            f.write("|---|---|---|---|---|\n")
            for r in table:
                f.write(f"| {r['mode']} | {r['eager_ms']} | {r['accelerated_ms']} | "
                        f"{r['speedup']}x | {r['repeats']} |\n")
        print(f"\nwrote {out_dir / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
