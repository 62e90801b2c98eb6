"""Classify images with a CvT checkpoint, eager vs accelerated: top-5 classes and timings.

    python python/infer.py --checkpoint cvt_13.pth --images cat.pt dog.pt
    python python/infer.py --checkpoint cvt-13-hf.safetensors          # HF names: converted
    python python/infer.py --hf ./cvt-13                               # a from_pretrained dir
    python python/infer.py --random 4                                  # random weights/images

``--checkpoint``: a state_dict (``torch.save`` or ``.safetensors``) under this package's
names or Hugging Face's (``cvt.encoder...``); HF checkpoints are converted
(:mod:`cvt_kernels.convert`) and run on our model built with HF's exact GELU and plain
LayerNorm. ``--hf``: a ``transformers`` ``CvtForImageClassification`` (a local directory or
a hub name), accelerated in place. Images: ``torch.save`` files of float tensors in [0, 1]
(or uint8), ``(3, H, W)`` or ``(N, 3, H, W)``; resized to ``--img-size`` and normalized
with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cvt_kernels  # noqa: E402
from cvt_kernels import convert, models  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="state_dict file (ours or HF names)")
    src.add_argument("--hf", metavar="DIR_OR_NAME", help="transformers from_pretrained source")
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS),
                   help="architecture of --checkpoint")
    p.add_argument("--images", nargs="*", default=[], metavar="PT", help="image tensor files")
    p.add_argument("--random", type=int, default=0, metavar="N", help="add N random images")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not args.images and args.random <= 0:
        args.random = 2
    return args


def load_images(paths: List[str], random: int, size: int) -> torch.Tensor:
    batches = []
    for path in paths:
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4) or t.shape[-3] != 3:
            raise ValueError(f"--images {path}: expected a (3, H, W) or (N, 3, H, W) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        t = t[None] if t.ndim == 3 else t
        batches.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False))
    if random:
        batches.append(torch.rand(random, 3, size, size, generator=torch.Generator()
                                  .manual_seed(0)))
    images = torch.cat(batches)
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def load_model(args) -> tuple:
    """``(model, labels or None, description)``; ``model(images)`` returns logits."""
    if args.hf:
        from transformers import CvtForImageClassification

        hf = CvtForImageClassification.from_pretrained(args.hf)
        labels = hf.config.id2label
        return _Logits(hf), labels, f"transformers CvtForImageClassification from {args.hf}"
    build = getattr(models, args.model)
    if not args.checkpoint:
        torch.manual_seed(0)
        return build(num_classes=1000, img_size=args.img_size), None, \
            f"{args.model} with random weights (pass --checkpoint or --hf for real ones)"
    state = convert.load_file(args.checkpoint)
    hf_names = any(k.startswith(("cvt.", "encoder.")) for k in state)
    num_classes = state["classifier.weight" if hf_names else "head.weight"].shape[0]
    if hf_names:
        model = build(num_classes=num_classes, img_size=args.img_size, act="gelu",
                      layer_norm="plain")
        state = convert.hf_to_package(state, model)
    else:
        model = build(num_classes=num_classes, img_size=args.img_size)
    model.load_state_dict(state, strict=True)
    names = "Hugging Face names, converted" if hf_names else "package names"
    return model, None, f"{args.model} from {args.checkpoint} ({names})"


class _Logits(torch.nn.Module):
    """transformers returns an output object; the timing loop wants the logits tensor."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, images):
        return self.hf(pixel_values=images).logits


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    eager, labels, what = load_model(args)
    eager = eager.to(device, dtype).eval()
    fused, n = cvt_kernels.accelerate(copy.deepcopy(eager))
    images = load_images(args.images, args.random, args.img_size).to(device, dtype)
    print(f"{what}; {n} attention modules accelerated; {len(images)} images "
          f"{args.img_size}x{args.img_size}, {args.dtype} on {device}")

    with torch.no_grad():
        ref, out = eager(images), fused(images)
        diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        probs = out.float().softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        for i, (p, idx) in enumerate(zip(top.values, top.indices)):
            names = [labels[int(j)] if labels else str(int(j)) for j in idx]
            print(f"image {i}: " + ", ".join(f"{name} {prob:.3f}"
                                             for name, prob in zip(names, p.tolist())))
        same_top1 = bool((ref.argmax(-1) == out.argmax(-1)).all())
        print(f"accelerated vs eager: max |diff| / max |eager| = {diff:.2e}, "
              f"same top-1: {same_top1}")
        t_eager = median_ms(lambda: eager(images), args.repeats, device)
        t_fused = median_ms(lambda: fused(images), args.repeats, device)
    print(f"eager {t_eager:.1f} ms, accelerated {t_fused:.1f} ms "
          f"({t_eager / t_fused:.2f}x), median of {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
