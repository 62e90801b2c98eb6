"""CPU micro-benchmarks with pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Tiny shapes, seconds in all; each case first asserts that the provider agrees with eager,
then times it (no speed from wrong answers). Not part of ``pytest tests`` (the README's test
command passes ``tests`` only). CPU timing says nothing about the GPU kernels: these catch
gross regressions of the CPU path (the ``torch`` backend) and keep the harness honest.
"""

from __future__ import annotations

import copy

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, models
from cvt_kernels.models import Attention

from .attention_core import eager as eager_attention
from .conv_projection import backend_projection, eager_projection

ROUNDS = dict(rounds=10, warmup_rounds=2, iterations=1)
PROVIDERS = ["eager", "torch"]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_block(cls: bool = True) -> Attention:
    torch.manual_seed(0)
    attn = Attention(32, 32, 2, qkv_bias=True, stride_kv=2, with_cls_token=cls)
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    return attn.eval()


def on_backend(fn, backend):
    def run(*args):
        with torch.no_grad(), cvt_kernels.use_backend(backend):
            return fn(*args)
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_eval(benchmark, provider):
    """FusedConvAttention (torch backend) vs the reference Attention, eval forward."""
    benchmark.group = "block eval 2x(16x16+1)x32"
    eager = tiny_block()
    x = torch.randn(2, 16 * 16 + 1, 32)
    fn = (on_backend(eager, "auto") if provider == "eager" else
          on_backend(FusedConvAttention.from_reference(copy.deepcopy(eager)).eval(), "torch"))
    with torch.no_grad():
        assert max_rel(fn(x, 16, 16), eager(x, 16, 16)) < 1e-5
    benchmark.pedantic(fn, args=(x, 16, 16), **ROUNDS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_conv_projection_eval(benchmark, provider):
    """The q/k/v conv projection op (torch backend) vs the reference module's layers."""
    benchmark.group = "conv_projection eval 2x(16x16)x32"
    attn = tiny_block(cls=False)
    fused = FusedConvAttention.from_reference(copy.deepcopy(attn)).eval()
    x = torch.randn(2, 16 * 16, 32)
    ref = on_backend(eager_projection(attn), "auto")
    fn = ref if provider == "eager" else on_backend(backend_projection(fused, "torch"), "torch")
    assert max_rel(fn(x, 16, 16), ref(x, 16, 16)) < 1e-5
    benchmark.pedantic(fn, args=(x, 16, 16), **ROUNDS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_op(benchmark, provider):
    """The attention op (torch backend: SDPA with CvT's scale) vs einsum + softmax."""
    benchmark.group = "attention 2x2 heads 257q x 65k x64"
    heads, scale = 2, 128 ** -0.5
    q, k, v = torch.randn(2, 257, 128), torch.randn(2, 65, 128), torch.randn(2, 65, 128)
    ref = on_backend(eager_attention, "auto")
    fn = ref if provider == "eager" else on_backend(cvt_kernels.ops.attention, "torch")
    assert max_rel(fn(q, k, v, heads, scale), ref(q, k, v, heads, scale)) < 1e-5
    benchmark.pedantic(fn, args=(q, k, v, heads, scale), **ROUNDS)


@pytest.mark.parametrize("provider", ["eager", "accelerated"])
def test_narrow_cvt_eval(benchmark, provider):
    """A narrow CvT (CvT-13's layout at widths 16/32/64, depth 1/1/2) at 64x64, eval."""
    benchmark.group = "narrow CvT eval 2x3x64x64"
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=10, img_size=64, spec_overrides={
        "DIM_EMBED": [16, 32, 64], "NUM_HEADS": [1, 2, 2], "DEPTH": [1, 1, 2]}).eval()
    model = (eager if provider == "eager"
             else cvt_kernels.accelerate(copy.deepcopy(eager))[0])
    fn = on_backend(model, "torch" if provider == "accelerated" else "auto")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel(fn(x), eager(x)) < 1e-4
    benchmark.pedantic(fn, args=(x,), **ROUNDS)
