"""Bad input gets a clear error naming the argument, raised before anything runs."""

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, ops
from cvt_kernels.backends import ProjectionConfig

from conftest import CPU_BACKENDS, make_attention
from test_ops import projection_inputs


@pytest.fixture(params=CPU_BACKENDS)
def attn(request):
    module = FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    with cvt_kernels.use_backend(request.param):
        yield module


def test_wrong_rank(attn):
    with pytest.raises(ValueError, match=r"x: expected a 3-D tensor"):
        attn(torch.randn(2, 10, 16, 1), 3, 3)


def test_token_count_must_match_h_w(attn):
    with pytest.raises(ValueError, match=r"x: expected 10 tokens \(h\*w = 3\*3 \+ 1"):
        attn(torch.randn(2, 9, 16), 3, 3)


def test_token_count_without_class_token():
    attn = FusedConvAttention.from_reference(make_attention(dtype=torch.float32, cls=False))
    with pytest.raises(ValueError, match=r"x: expected 12 tokens \(h\*w = 3\*4\)"):
        attn(torch.randn(2, 13, 16), 3, 4)


def test_wrong_channel_count(attn):
    with pytest.raises(ValueError, match=r"x: expected 16 channels"):
        attn(torch.randn(2, 10, 8), 3, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(attn, dtype):
    with pytest.raises(TypeError, match=r"x: expected a floating dtype"):
        attn(torch.zeros(2, 10, 16, dtype=dtype), 3, 3)


def test_not_a_tensor(attn):
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        attn([[1.0]], 3, 3)


@pytest.mark.parametrize("h,w,exc", [(0, 9, ValueError), (3.0, 3, TypeError), (True, 3, TypeError)])
def test_bad_h_w(attn, h, w, exc):
    with pytest.raises(exc, match=r"\bh: expected"):
        attn(torch.randn(2, 10, 16), h, w)


def test_mixed_dtype_between_input_and_parameters(attn):
    with pytest.raises(TypeError, match=r"proj_weight: expected dtype torch.float64"):
        attn(torch.randn(2, 10, 16, dtype=torch.float64), 3, 3)


def test_mismatched_devices(attn):
    # The meta device stands in for a second device on CPU-only machines.
    with pytest.raises(RuntimeError, match=r"expected a tensor on meta"):
        attn(torch.randn(2, 10, 16, device="meta"), 3, 3)


def test_training_needs_more_than_one_value_per_channel():
    attn = FusedConvAttention.from_reference(make_attention(dtype=torch.float32, cls=False))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        attn(torch.randn(1, 1, 16), 1, 1)
    attn.eval()
    assert attn(torch.randn(1, 1, 16), 1, 1).shape == (1, 1, 32)  # eval is fine


def test_empty_batch_in_eval_returns_empty(attn):
    attn.eval()
    out = attn(torch.randn(0, 10, 16), 3, 3)
    assert out.shape == (0, 10, 32)


def test_attention_argument_checks():
    q = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="num_heads"):
        ops.attention(q, q, q, 3, 1.0)
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        ops.attention(q, q, q[:, :3], 2, 1.0)
    with pytest.raises(ValueError, match="k: expected batch 2"):
        ops.attention(q, q[:1], q[:1], 2, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, q, q, 2, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="k: expected dtype"):
        ops.attention(q, q.double(), q.double(), 2, 1.0)
    with pytest.raises(TypeError, match="num_heads: expected an int"):
        ops.attention(q, q, q, 2.0, 1.0)


def test_projection_argument_checks():
    x, params, cfg = projection_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="method"):
        ops.conv_projection(x, 3, 5, params, ProjectionConfig("conv", 3, 1, 1, True))
    with pytest.raises(ValueError, match="conv_weight: expected shape"):
        ops.conv_projection(x, 3, 5, params._replace(conv_weight=torch.randn(4, 1, 5, 5,
                                                                         dtype=x.dtype)), cfg)
    with pytest.raises(ValueError, match="running_mean: expected shape"):
        ops.conv_projection(x, 3, 5, params._replace(running_mean=torch.zeros(3, dtype=x.dtype)),
                            cfg)


def test_errors_come_before_any_state_change(attn):
    bn = attn.conv_proj_q.bn
    before = bn.num_batches_tracked.clone(), bn.running_mean.clone()
    with pytest.raises(ValueError):
        attn(torch.randn(2, 9, 16), 3, 3)
    assert torch.equal(bn.num_batches_tracked, before[0])
    assert torch.equal(bn.running_mean, before[1])
