"""torch.autocast: the custom-op path casts like autocast would, statistics stay float32,
and the result is at least as accurate as eager PyTorch under the same autocast."""

import copy
import importlib.util
import os

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, models

from conftest import CPU_BACKENDS, assert_close_by_rule, make_attention


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_cpu_autocast_bfloat16(backend, training):
    truth_mod = make_attention(dim_in=32, dim_out=64, heads=2, training=training)
    eager = copy.deepcopy(truth_mod).float()
    ours = FusedConvAttention.from_reference(copy.deepcopy(truth_mod).float())
    x = torch.randn(3, 1 + 6 * 5, 32, dtype=torch.float64)
    truth = truth_mod(x, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pytorch_amp = eager(x.float(), 6, 5)
        with cvt_kernels.use_backend(backend):
            out = ours(x.float(), 6, 5)
    assert out.dtype == pytorch_amp.dtype == torch.bfloat16
    assert_close_by_rule(out, pytorch_amp, truth, name=backend, atol=1e-3)
    # Running statistics are updated in float32 from float32 statistics.
    bn = ours.conv_proj_k.bn
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, eager.conv_proj_k.bn.running_mean,
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_gradients_reach_float32_parameters(backend):
    ours = FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    x = torch.randn(2, 1 + 4 * 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), cvt_kernels.use_backend(backend):
        out = ours(x, 4, 4)
    out.float().square().mean().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def _interpreted_triton():
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")


OVERFLOW_BACKENDS = CPU_BACKENDS + (("triton",) if _interpreted_triton() else ())


def _attention_float64(q, k, v, heads, scale):
    split = lambda t: t.double().unflatten(-1, (heads, -1)).transpose(1, 2)
    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) * scale, dim=-1)
    return (p @ split(v)).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("backend", OVERFLOW_BACKENDS)
def test_float16_logits_beyond_the_float16_range_stay_finite(backend):
    """Logits of ~1e5 (float16 max: 65504): eager fp16 attention overflows to inf and its
    softmax to NaN; ours keeps scores and softmax statistics in float32. q, k, v are float16
    values, so the float64 truth from the same values is the exact answer."""
    g = torch.Generator().manual_seed(0)
    heads, d = 2, 16
    q, k = ((torch.randn(2, n, heads * d, generator=g) * 300).half() for n in (17, 5))
    v = torch.randn(2, 5, heads * d, generator=g).half()
    scale = (heads * d) ** -0.5
    truth = _attention_float64(q, k, v, heads, scale)
    with torch.autocast("cpu", dtype=torch.float16):
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        scores = torch.einsum("bhlk,bhtk->bhlt", split(q), split(k)) * scale  # as the reference
        assert not torch.isfinite(torch.softmax(scores, dim=-1)).all()
        with cvt_kernels.use_backend(backend):
            out = cvt_kernels.ops.attention(q.requires_grad_(), k.requires_grad_(),
                                            v.requires_grad_(), heads, scale)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-3)  # fp16 output rounding
    out.float().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_module_with_huge_logits_stays_finite_where_eager_does_not(backend):
    """The whole module under fp16 autocast with q/k projections scaled so the logits reach
    ~1e5: the eager reference returns NaN, ours stays finite, gradients included."""
    ref = make_attention(dim_in=16, dim_out=32, heads=2, training=True, dtype=torch.float32)
    with torch.no_grad():
        ref.proj_q.weight.mul_(1500)
        ref.proj_k.weight.mul_(1500)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 1 + 6 * 5, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(ref(x, 6, 5)).all()
        with cvt_kernels.use_backend(backend):
            out = ours(x, 6, 5)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, p in ours.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_whole_model_under_autocast(backend):
    """Inside a model under autocast the attention input is bfloat16 while the parameters are
    float32 (eager mixes them the same way): accepted, and as accurate as eager."""
    torch.manual_seed(0)
    narrow = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 1]}
    truth_model = models.cvt_13(num_classes=5, img_size=32, spec_overrides=narrow).double()
    eager = copy.deepcopy(truth_model).float()
    fused = cvt_kernels.accelerate(copy.deepcopy(eager))[0]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    truth = truth_model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        pytorch_amp = eager(x.float())
        torch.manual_seed(1)
        with cvt_kernels.use_backend(backend):
            out = fused(x.float())
    assert_close_by_rule(out, pytorch_amp, truth, name=backend, atol=1e-3)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


def test_autocast_still_rejects_dtypes_it_does_not_cast():
    """Half and float32 may mix under autocast (it casts them); float64 it leaves alone."""
    ours = FusedConvAttention.from_reference(make_attention(dtype=torch.float64))
    x = torch.randn(2, 1 + 4 * 4, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="dtype"):
        ours(x, 4, 4)
