"""torch.autocast: the custom-op path casts like autocast would, statistics stay float32,
and the result is at least as accurate as eager PyTorch under the same autocast."""

import copy

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention

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
