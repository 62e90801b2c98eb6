"""A few CvT training steps on synthetic data with the fused attention, AMP where available,
and a checkpoint that resumes exactly.

    python python/train_synthetic.py                             # CvT-13, 10 steps
    python python/train_synthetic.py --steps 4 --save ckpt.pt    # ... then later:
    python python/train_synthetic.py --steps 8 --resume ckpt.pt  # continues at step 4

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
from cvt_kernels import models  # noqa: E402

AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS))
    p.add_argument("--steps", type=int, default=10, help="train until this step count")
    p.add_argument("--batch", type=int, default=64 if on_gpu else 4)
    p.add_argument("--img-size", type=int, default=224 if on_gpu else 64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--amp", default="bfloat16" if on_gpu else "none", choices=AMP)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-accelerate", action="store_true", help="train the eager model")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint here at the end")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.img_size < 16:
        p.error("--steps and --batch must be >= 1 and --img-size >= 16")
    if args.amp == "float16" and args.device == "cpu":
        p.error("--amp float16 needs a CUDA device (CPU autocast: use --amp bfloat16)")
    return args


def synthetic_batch(step: int, batch: int, img_size: int, num_classes: int,
                    device: torch.device):
    """Images and labels for ``step``, the same on every run."""
    g = torch.Generator().manual_seed(10_000 + step)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    # A label the model can learn: which channel/quadrant mix is brightest.
    labels = images.mean(dim=(2, 3)).mul(7).floor().sum(1).long().remainder(num_classes)
    return images.to(device), labels.to(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    build = getattr(models, args.model)
    model = build(num_classes=args.num_classes, img_size=args.img_size).to(device)
    replaced = 0 if args.no_accelerate else cvt_kernels.accelerate(model)[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    amp_dtype = AMP[args.amp]
    # A gradient scaler only for float16: bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
        torch.set_rng_state(ckpt["cpu_rng"])  # drop-path masks continue where they stopped
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        print(f"resumed from {args.resume} at step {start}")
    print(f"{args.model} {args.img_size}x{args.img_size} batch {args.batch} on {device}, "
          f"amp {args.amp}, {replaced} attention modules accelerated")

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
            print(f"step {step + 1}: loss is {loss.item()}: stopping", file=sys.stderr)
            return 1
        print(f"step {step + 1:4d}  loss {loss.item():.4f}  {args.batch / elapsed:8.1f} img/s")

    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": max(args.steps, start),
                    "cpu_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda"
                    else None, "args": vars(args)}, args.save)
        print(f"saved {args.save} (step {max(args.steps, start)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
