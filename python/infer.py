"""Classify images with a CvT checkpoint, eager vs accelerated: top-5 classes and timings.

    python python/infer.py --checkpoint cvt_13.pth --images cat.pt dog.pt
    python python/infer.py --checkpoint cvt-13-hf.safetensors          # HF names: converted
    python python/infer.py --hf ./cvt-13                               # a from_pretrained dir
    python python/infer.py --random 4                                  # random weights/images

``--checkpoint``: a state_dict (``torch.save`` or ``.safetensors``; a training checkpoint's
``model`` / ``state_dict`` entry is taken) under this package's names or Hugging Face's
(``cvt.encoder...``) for the architecture ``--model``; HF checkpoints are converted
(:mod:`cvt_kernels.convert`) and run on our model built with HF's exact GELU and plain
LayerNorm. ``--hf``: a ``transformers`` ``CvtForImageClassification`` (a local directory or
a hub name), accelerated in place. Images: ``torch.save`` files of float tensors in [0, 1]
(or uint8), ``(3, H, W)`` or ``(N, 3, H, W)``; resized to ``--img-size`` and normalized
with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import cvt_kernels  # noqa: E402
from cvt_kernels import _cli, convert, models  # noqa: E402
from cvt_kernels._cli import UsageError  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = _cli.ArgumentParser(prog="infer.py", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="state_dict file (ours or HF names)")
    src.add_argument("--hf", metavar="DIR_OR_NAME", help="transformers from_pretrained source")
    p.add_argument("--model", default="cvt_13", choices=sorted(models.CVT_SPECS),
                   help="architecture of --checkpoint")
    p.add_argument("--images", nargs="*", default=[], metavar="PT", help="image tensor files")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="add N random images (2 when no --images)")
    p.add_argument("--img-size", type=int, default=224, help="images are resized to this")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=DTYPES,
                   help="model dtype (bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Values and files the run cannot use end it here, before any model is built."""
    if args.repeats < 1 or args.random < 0 or args.img_size < 16:
        p.error("--repeats must be >= 1, --random >= 0 and --img-size >= 16")
    if not args.images and args.random == 0:
        args.random = 2
    if args.checkpoint:
        _cli.existing_file(args.checkpoint, "--checkpoint")
    for path in args.images:
        _cli.existing_file(path, "--images")
    # A hub name is "org/name"; what looks like a path must be a directory here.
    if args.hf and args.hf.startswith((".", "/", "~")) and not os.path.isdir(
            os.path.expanduser(args.hf)):
        raise UsageError(f"--hf {args.hf}: no such directory (a from_pretrained directory or "
                         f"a hub name like microsoft/cvt-13)")
    args.device = _cli.check_device(args.device)
    return args


def load_images(paths: List[str], random: int, size: int) -> torch.Tensor:
    batches = [F.interpolate(load_image_file(path), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False) for path in paths]
    if random:
        batches.append(torch.rand(random, 3, size, size, generator=torch.Generator()
                                  .manual_seed(0)))
    images = torch.cat(batches)
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def load_image_file(path: str) -> torch.Tensor:
    """``(N, 3, H, W)`` float in [0, 1], or a :class:`UsageError` saying what the file holds."""
    try:  # weights_only: an image file is data and never runs code
        t = _cli.safe_torch_load(path)
    except ValueError as exc:  # not a torch.save file, or one holding Python objects
        raise UsageError(f"--images {path}: {exc}; save each image as a (3, H, W) tensor, "
                         f"e.g. torch.save(torchvision.io.read_image('cat.jpg'), 'cat.pt')") \
            from exc
    if not isinstance(t, torch.Tensor):
        keys = f" with keys {list(t)[:5]}" if isinstance(t, dict) else ""
        raise UsageError(f"--images {path}: holds a {type(t).__name__}{keys}, not a tensor; "
                         f"torch.save the (3, H, W) or (N, 3, H, W) image tensor itself")
    if t.ndim in (3, 4) and t.shape[-1] == 3 and t.shape[-3] != 3:
        order = "(2, 0, 1)" if t.ndim == 3 else "(0, 3, 1, 2)"
        raise UsageError(f"--images {path}: shape {tuple(t.shape)} is channels-last (H, W, 3); "
                         f"expected channels first: save t.permute{order}")
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise UsageError(f"--images {path}: expected a (3, H, W) or (N, 3, H, W) tensor, got "
                         f"shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise UsageError(f"--images {path}: expected float in [0, 1] or uint8, got {t.dtype}")
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    return t[None] if t.ndim == 3 else t


def load_model(args) -> tuple:
    """``(model, labels or None, description)``; ``model(images)`` returns logits."""
    if args.hf:
        return load_hf(args.hf)
    build = getattr(models, args.model)
    if not args.checkpoint:
        torch.manual_seed(0)
        return build(num_classes=1000, img_size=args.img_size), None, \
            f"{args.model} with random weights (pass --checkpoint or --hf for real ones)"
    state, hf_names, notes = load_checkpoint(args.checkpoint)
    head = state.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    options = dict(act="gelu", layer_norm="plain") if hf_names else {}
    check_architecture(state, args, num_classes, options)
    model = build(num_classes=num_classes, img_size=args.img_size, **options)
    model.load_state_dict(state, strict=True)
    names = "Hugging Face names, converted" if hf_names else "package names"
    return model, None, f"{args.model} from {args.checkpoint} ({'; '.join([names] + notes)})"


def load_hf(source: str) -> tuple:
    try:
        from transformers import CvtForImageClassification
    except ImportError as exc:
        raise UsageError(f"--hf needs transformers ({exc}): pip install -e '.[hf]'") from exc
    try:  # transformers reads .bin weights with torch.load(weights_only=True) too
        hf = CvtForImageClassification.from_pretrained(source)
    except Exception as exc:
        refused = _cli.unsafe_pickle_message(exc)
        if refused is None:
            raise
        raise UsageError(f"--hf {source}: its weights file {refused}") from exc
    return _Logits(hf), hf.config.id2label, \
        f"transformers CvtForImageClassification from {source}"


def load_checkpoint(path: str) -> tuple:
    """``(state_dict under our names, whether it had HF names, notes)``; a file that is not a
    CvT checkpoint is a :class:`UsageError` saying what it holds."""
    try:
        state, notes = convert.load_checkpoint(path)
        hf_names = convert.naming(state) == "hf"
        if hf_names:
            state = convert.hf_to_package(state)
        elif convert.naming(state) != "package":
            convert.package_to_hf(state)  # raises, naming the keys that are not CvT names
    except ValueError as exc:
        raise UsageError(f"--checkpoint {path}: {str(exc).removeprefix('state_dict: ')}") \
            from exc
    return state, hf_names, notes


def check_architecture(state: dict, args, num_classes: int, options: dict) -> None:
    """A checkpoint of another CvT is a :class:`UsageError` naming the ``--model`` it fits,
    instead of ``load_state_dict``'s list of every missing key."""
    try:
        convert.check_state_dict(state, _expected(args.model, num_classes, options),
                                 f"--checkpoint {args.checkpoint}")
    except ValueError as exc:
        fits = [name for name in sorted(models.CVT_SPECS) if name != args.model
                and _fits(state, name, num_classes, options)]
        hint = (f"; it is a {fits[0]} checkpoint: pass --model {fits[0]}" if fits else
                "; pass the --model it was trained as")
        raise UsageError(str(exc).replace("the target model", f"--model {args.model}") + hint) \
            from exc


def _expected(name: str, num_classes: int, options: dict) -> dict:
    with torch.device("meta"):  # only keys and shapes are compared: nothing is allocated
        return getattr(models, name)(num_classes=num_classes, **options).state_dict()


def _fits(state: dict, name: str, num_classes: int, options: dict) -> bool:
    expected = _expected(name, num_classes, options)
    return set(expected) == set(state) and all(expected[k].shape == state[k].shape
                                               for k in state)


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
    """The exit code: 0, 2 for a usage error (a missing or wrong file, an option this machine
    cannot serve), 1 for a failure while running; errors are one line on stderr."""
    return _cli.run(_main, argv, "infer.py")


def _main(argv) -> int:
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    # Images first: a wrong file ends the run before a model is built.
    images = load_images(args.images, args.random, args.img_size).to(device, dtype)
    eager, labels, what = load_model(args)
    eager = eager.to(device, dtype).eval()
    fused, n = cvt_kernels.accelerate(copy.deepcopy(eager))
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
