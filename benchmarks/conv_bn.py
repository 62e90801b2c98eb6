"""The depthwise conv + BatchNorm stage of the projections: CUDA kernels vs cuDNN vs Triton.

    python -m benchmarks.conv_bn                         # GPU: CvT-13/W24 stage shapes, 224, 384
    python -m benchmarks.conv_bn --model cvt_13 --img-size 224 --dtype bfloat16
    python -m benchmarks.conv_bn --quick                 # CPU smoke run (one tiny shape)
    python -m benchmarks.conv_bn --out DIR               # also write DIR/conv_bn.csv/.md

Two parts, each at stride 1 (the q projection) and stride 2 (k, v), modes ``eval`` (forward,
running statistics) and ``train`` (statistics pass, forward and backward):

* ``conv_bn``: ``x`` tokens -> normalized tokens (class token passed through).
  Providers: ``cudnn`` (``F.conv2d`` on the channels-last view + ``F.batch_norm``: cuDNN on
  a GPU, ATen's CPU kernels on CPU), ``cuda`` (``csrc/``: ``dwconv_bn_stats``,
  ``dwconv_bn_forward``, ``dwconv_bn_backward``). Triton has no row here: its kernels fuse
  conv + BN into the Linear's GEMM prologue and never write normalized tokens.
* ``conv_bn_linear``: the whole projection ``Linear(BN(dwconv(x)))`` through
  ``cvt_kernels.ops.conv_projection``. Providers: ``cudnn`` (the ``torch`` backend: cuDNN
  conv + BN + cuBLAS Linear), ``cuda`` (the cuda backend: the kernels above + cuBLAS),
  ``triton`` (the triton backend: the fused Triton kernels).

Every output is compared with ``cudnn``'s before it is timed; a provider that disagrees or
cannot run is listed with its reason. (The package itself picks per call shape on the
user's GPU: ``cvt_kernels.dispatch``; this benchmark shows the same race side by side.)
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels.backends import ProjectionConfig, ProjectionParams
from cvt_kernels.flops import stage_shapes

from .blocks import TOLERANCE
from .common import (DTYPES, add_speedups, floor_fraction, measure, ratio_text,
                     save_results, shape_parser)

EPS, MOMENTUM = 1e-5, 0.1


class Stage:
    """One projection's parameters (conv, BatchNorm, Linear) at one shape and dtype."""

    def __init__(self, channels: int, stride: int, cls: bool, dtype: torch.dtype,
                 device: torch.device):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels,
                                    bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.lin = torch.nn.Linear(channels, channels)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)
        for m in (self.conv, self.bn, self.lin):
            m.to(device=device, dtype=dtype)
        self.stride, self.cls, self.channels = stride, cls, channels

    def params(self) -> ProjectionParams:
        return ProjectionParams(self.conv.weight, self.bn.weight, self.bn.bias,
                                self.bn.running_mean, self.bn.running_var,
                                self.bn.num_batches_tracked, self.lin.weight, self.lin.bias)

    def cfg(self) -> ProjectionConfig:
        return ProjectionConfig("dw_bn", 3, self.stride, 1, self.cls)


def cudnn_conv_bn(stage: Stage, training: bool) -> Callable:
    def run(x, h, w):
        cls, rest = (x[:, :1], x[:, 1:]) if stage.cls else (None, x)
        x_map = rest.transpose(1, 2).unflatten(2, (h, w))  # channels-last view, no copy
        y = F.conv2d(x_map, stage.conv.weight, None, stage.stride, 1, 1, stage.channels)
        y = F.batch_norm(y, stage.bn.running_mean, stage.bn.running_var, stage.bn.weight,
                         stage.bn.bias, training, MOMENTUM, EPS)
        t = y.flatten(2).transpose(1, 2)
        return torch.cat([cls, t], dim=1) if cls is not None else t
    return run


class _CudaConvBN(torch.autograd.Function):
    """The csrc/ kernels alone: statistics (training), normalize, backward."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, stage, h, w, training):
        ext = cvt_kernels.backends.get_backend("cuda").ext
        x = x.contiguous()
        w32 = weight.detach().float().contiguous()
        if training:
            mean, var = ext.dwconv_bn_stats(x, w32, h, w, stage.stride, stage.cls)
            n = x.shape[0] * ((h - 1) // stage.stride + 1) * ((w - 1) // stage.stride + 1)
            with torch.no_grad():
                stage.bn.running_mean.mul_(1 - MOMENTUM).add_(mean.to(x.dtype), alpha=MOMENTUM)
                stage.bn.running_var.mul_(1 - MOMENTUM).add_((var * (n / (n - 1))).to(x.dtype),
                                                             alpha=MOMENTUM)
        else:
            mean = stage.bn.running_mean.float()
            var = stage.bn.running_var.float()
        rstd = torch.rsqrt(var + EPS)
        g32, b32 = gamma.detach().float(), beta.detach().float()
        ctx.save_for_backward(x, w32, mean, rstd, g32)
        ctx.config = (h, w, stage.stride, stage.cls, training)
        ctx.dtypes = (weight.dtype, gamma.dtype, beta.dtype)
        return ext.dwconv_bn_forward(x, w32, mean, rstd, g32, b32, h, w, stage.stride,
                                     stage.cls)

    @staticmethod
    def backward(ctx, grad):
        ext = cvt_kernels.backends.get_backend("cuda").ext
        x, w32, mean, rstd, g32 = ctx.saved_tensors
        h, w, stride, cls, training = ctx.config
        dx, dw, dg, db = ext.dwconv_bn_backward(grad.contiguous(), x, w32, mean, rstd, g32,
                                                h, w, stride, cls, training)
        wd, gd, bd = ctx.dtypes
        return dx, dw.to(wd), dg.to(gd), db.to(bd), None, None, None, None


def cuda_conv_bn(stage: Stage, training: bool) -> Callable:
    def run(x, h, w):
        return _CudaConvBN.apply(x, stage.conv.weight, stage.bn.weight, stage.bn.bias, stage,
                                 h, w, training)
    return run


def backend_projection(stage: Stage, name: str, training: bool) -> Callable:
    def run(x, h, w):
        with cvt_kernels.use_backend(name):
            return cvt_kernels.ops.conv_projection(x, h, w, stage.params(), stage.cfg(),
                                                   training=training, momentum=MOMENTUM,
                                                   eps=EPS)
    return run


def providers(stage: Stage, part: str, training: bool
              ) -> Dict[str, Tuple[Optional[Callable], str]]:
    available = cvt_kernels.backends.available_backends()
    cuda_reason = available.get("cuda")
    if part == "conv_bn":
        out = {"cudnn": (cudnn_conv_bn(stage, training), "")}
        out["cuda"] = ((cuda_conv_bn(stage, training), "") if cuda_reason is None
                       else (None, f"cuda backend: {cuda_reason}"))
        out["triton"] = (None, "no standalone conv+BN kernel: Triton fuses it into the "
                               "Linear (see the conv_bn_linear rows)")
        return out
    out = {"cudnn": (backend_projection(stage, "torch", training), "")}
    for name in ("cuda", "triton"):
        reason = available.get(name)
        out[name] = ((backend_projection(stage, name, training), "") if reason is None
                     else (None, f"{name} backend: {reason}"))
    return out


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick and device.type == "cpu":
        cases = [("tiny", 0, dict(stage=3, h=7, w=7, dim_in=16, with_cls_token=True))]
        dtypes, batch = ["float32"], 2
    else:
        cases = [(m, s, st) for m in ("cvt_13", "cvt_w24") for s in (224, 384)
                 if args.model in (None, m) and args.img_size in (None, s)
                 for st in stage_shapes(m, s)]
        dtypes, batch = args.dtype or list(DTYPES), args.batch
    rows: List[dict] = []
    for model, img, shape in cases:
        h, w, c, cls = shape["h"], shape["w"], shape["dim_in"], bool(shape["with_cls_token"])
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            x = torch.randn(batch, h * w + int(cls), c, device=device, dtype=dtype)
            for stride in (1, 2):
                stage = Stage(c, stride, cls, dtype, device)
                ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
                tokens_out = ho * wo + int(cls)
                elem = torch.finfo(dtype).bits // 8
                for part in ("conv_bn", "conv_bn_linear"):
                    flop = batch * ho * wo * c * 18.0
                    nbytes = batch * elem * (x.shape[1] + tokens_out) * c
                    if part == "conv_bn_linear":
                        flop += batch * tokens_out * c * c * 2.0
                        nbytes += batch * elem * tokens_out * c
                    for mode in ("eval", "train"):
                        train = mode == "train"
                        provs = providers(stage, part, train)
                        with torch.no_grad():
                            ref = provs["cudnn"][0](x, h, w).float()
                        group = []
                        for name, (fn, reason) in provs.items():
                            row = dict(model=model, img=img, stage=shape["stage"], batch=batch,
                                       tokens=x.shape[1], channels=c, stride=stride, part=part,
                                       dtype=dtype_name, mode=mode, provider=name)
                            if fn is None:
                                result = {"status": f"skipped: {reason}"}
                            else:
                                result = measure(fn, x, h, w, ref, TOLERANCE[dtype], train,
                                                 device, quick)
                            if result["status"] == "ok":
                                mult = 3.0 if train else 1.0
                                result["floor_frac"] = floor_fraction(
                                    device, dtype, flop * mult, nbytes * mult, result["ms"])
                            group.append({**row, **result})
                        rows += group
                        add_speedups(group, baselines=("cudnn",))
                        label = (f"{model} {img} s{shape['stage']} stride{stride} {part:14s} "
                                 f"{dtype_name:8s} {mode:5s}")
                        for r in group:
                            result = (f"{r['ms']:9.4f} ms  {ratio_text(r, 'cudnn')}"
                                      if r["status"] == "ok" else r["status"])
                            print(f"{label} {r['provider']:7s} {result}", flush=True)
    return rows


def main() -> None:
    p = shape_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    rows = run(args)
    if args.out:
        save_results(args.out, "conv_bn", "depthwise conv + BatchNorm stage", args, rows)


if __name__ == "__main__":
    main()
