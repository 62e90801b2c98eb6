"""A few CvT training steps on synthetic data with the fused attention, AMP where available,
and a checkpoint that resumes exactly.

    python python/train_synthetic.py                             # CvT-13, 10 steps
    python python/train_synthetic.py --steps 4 --save ckpt.pt    # ... then later:
    python python/train_synthetic.py --steps 8 --resume ckpt.pt  # continues at step 4

``--steps`` is the step count to train until, counted from the start (a resumed run does
``--steps`` minus the checkpoint's step). ``--resume`` needs the ``--model`` and
``--num-classes`` the checkpoint was saved with.

On a GPU the defaults are bfloat16 autocast at batch 64, 224x224; on CPU float32 at batch 4,
64x64. The data are a pure function of the step number (random images, labels that depend
on the image so the loss can fall), and the checkpoint holds the model, the optimizer, the
AMP gradient scaler, the step and the RNG state: 4 steps, save, resume, 4 more steps gives
the same weights as 8 steps in one go.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cvt_kernels  # noqa: E402
from cvt_kernels import _cli, models  # noqa: E402
from cvt_kernels._cli import UsageError  # noqa: E402

AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = _cli.ArgumentParser(prog="train_synthetic.py", description=__doc__)
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS),
                   help="the CvT to train")
    p.add_argument("--steps", type=int, default=10,
                   help="train until this step count (a resumed run included)")
    p.add_argument("--batch", type=int, default=64 if on_gpu else 4,
                   help="images per step (64 on a GPU)")
    p.add_argument("--img-size", type=int, default=224 if on_gpu else 64,
                   help="image height and width (224 on a GPU)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head")
    p.add_argument("--amp", default="bfloat16" if on_gpu else "none", choices=AMP,
                   help="autocast dtype (bfloat16 on a GPU)")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument("--no-accelerate", action="store_true", help="train the eager model")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint here at the end")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.img_size < 16 or args.num_classes < 1:
        p.error("--steps, --batch and --num-classes must be >= 1 and --img-size >= 16")
    if args.amp == "float16" and args.device == "cpu":
        p.error("--amp float16 needs a CUDA device (CPU autocast: use --amp bfloat16)")
    args.device = _cli.check_device(args.device)
    if args.resume:
        _cli.existing_file(args.resume, "--resume")
    if args.save:
        _cli.writable_path(args.save, "--save")
    return args


def synthetic_batch(step: int, batch: int, img_size: int, num_classes: int,
                    device: torch.device):
    """Images and labels for ``step``, the same on every run."""
    g = torch.Generator().manual_seed(10_000 + step)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    # A label the model can learn: which channel/quadrant mix is brightest.
    labels = images.mean(dim=(2, 3)).mul(7).floor().sum(1).long().remainder(num_classes)
    return images.to(device), labels.to(device)


def read_checkpoint(args) -> dict:
    """``--resume``'s contents, before anything is built: a file that is not this script's
    checkpoint, or one that does not fit the options, is a :class:`UsageError` saying which
    options to pass."""
    try:  # weights_only: a checkpoint is data and never runs code (see save_checkpoint)
        # On the CPU: the RNG states must stay there; load_state_dict moves the rest.
        ckpt = _cli.safe_torch_load(args.resume, map_location="cpu")
    except ValueError as exc:
        raise UsageError(f"--resume {args.resume}: not a checkpoint of this script: {exc}") \
            from exc
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= set(ckpt):
        raise UsageError(f"--resume {args.resume}: not a checkpoint of this script (expected "
                         f"the 'model', 'optimizer' and 'step' entries that --save writes)")
    check_resumable(args, ckpt)
    return ckpt


def restore(ckpt: dict, args, model, optimizer, scaler) -> int:
    """Loads the model, optimizer, scaler and RNG state; returns the checkpoint's step."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # a checkpoint without saved options: the keys tell
        raise UsageError(f"--resume {args.resume}: its weights do not fit --model {args.model} "
                         f"--num-classes {args.num_classes} ({_cli.one_line(exc, 160)})") \
            from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["cpu_rng"])  # drop-path masks continue where they stopped
    if args.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], args.device)
    return ckpt["step"]


def check_resumable(args, ckpt: dict) -> None:
    saved = ckpt.get("args") or {}
    wrong = [k for k in ("model", "num_classes") if k in saved and saved[k] != getattr(args, k)]
    if wrong:
        raise UsageError(f"--resume {args.resume}: saved with {_flags(saved, wrong)}, not "
                         f"{_flags(vars(args), wrong)}: pass {_flags(saved, wrong)} to resume it")
    if ckpt["step"] >= args.steps:
        raise UsageError(f"--resume {args.resume}: the checkpoint is at step {ckpt['step']}, "
                         f"--steps {args.steps} is not past it, so no step would run (--steps "
                         f"counts from the start): pass --steps {ckpt['step'] + args.steps} for "
                         f"{args.steps} more")


def _flags(values: dict, keys) -> str:
    return " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in keys)


def main(argv=None) -> int:
    """The exit code: 0, 1 when the loss stops being finite or a run fails, 2 for a usage
    error (bad options, a checkpoint that does not fit them); errors are one line on stderr."""
    return _cli.run(_main, argv, "train_synthetic.py")


def _main(argv) -> int:
    args = parse_args(argv)
    ckpt = read_checkpoint(args) if args.resume else None
    device = args.device
    torch.manual_seed(args.seed)
    build = getattr(models, args.model)
    model = build(num_classes=args.num_classes, img_size=args.img_size).to(device)
    replaced = 0 if args.no_accelerate else cvt_kernels.accelerate(model)[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    amp_dtype = AMP[args.amp]
    # A gradient scaler only for float16: bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if ckpt is not None:
        start = restore(ckpt, args, model, optimizer, scaler)
        print(f"resumed from {args.resume} at step {start}")
    print(f"{args.model} {args.img_size}x{args.img_size} batch {args.batch} on {device}, "
          f"amp {args.amp}, {replaced} attention modules accelerated")
    if not train(args, model, optimizer, scaler, amp_dtype, start):
        return 1
    if args.save:
        save_checkpoint(args, model, optimizer, scaler)
    return 0


def save_checkpoint(args, model, optimizer, scaler) -> None:
    """Tensors, numbers, strings and containers of them only, so ``--resume`` reads it with
    ``torch.load(weights_only=True)``, which refuses anything that could run code."""
    device = args.device
    options = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": args.steps,
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "args": options}, args.save)
    print(f"saved {args.save} (step {args.steps})")


def train(args, model, optimizer, scaler, amp_dtype, start: int) -> bool:
    """Steps ``start`` to ``--steps``; ``False`` when the loss stops being finite."""
    device = args.device
    model.train()
    for step in range(start, args.steps):
        images, labels = synthetic_batch(step, args.batch, args.img_size, args.num_classes,
                                         device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - began
        if not torch.isfinite(loss):
            print(f"train_synthetic.py: error: step {step + 1}: the loss is {loss.item()}; "
                  f"try a smaller --lr", file=sys.stderr)
            return False
        print(f"step {step + 1:4d}  loss {loss.item():.4f}  {args.batch / elapsed:8.1f} img/s")
    return True


if __name__ == "__main__":
    sys.exit(main())
