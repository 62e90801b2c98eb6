"""FusedConvAttention as a drop-in: constructor, state_dict both ways, from_reference, accelerate."""

import copy
import inspect

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, accelerate, models
from cvt_kernels.models import Attention

from conftest import CPU_BACKENDS, make_attention, randomize_bn


def test_same_constructor_signature():
    assert inspect.signature(FusedConvAttention.__init__) == inspect.signature(Attention.__init__)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_state_dict_round_trips_strictly(method):
    ref = Attention(16, 32, 2, qkv_bias=True, method=method, stride_kv=2)
    randomize_bn(ref)
    fused = FusedConvAttention(16, 32, 2, qkv_bias=True, method=method, stride_kv=2)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    back = Attention(16, 32, 2, qkv_bias=True, method=method, stride_kv=2)
    back.load_state_dict(fused.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_parameters_live_in_standard_modules():
    fused = FusedConvAttention(16, 32, 2)
    assert isinstance(fused.conv_proj_q.conv, torch.nn.Conv2d)
    assert isinstance(fused.conv_proj_q.bn, torch.nn.BatchNorm2d)
    assert isinstance(fused.proj_q, torch.nn.Linear) and isinstance(fused.proj, torch.nn.Linear)


@pytest.mark.parametrize("training", [True, False])
def test_from_reference_shares_weights_and_mode(training):
    ref = make_attention(training=training)
    fused = FusedConvAttention.from_reference(ref)
    assert fused.training == training
    assert fused.conv_proj_k.bn.training == training
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and p1 is p2
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), fused.named_buffers()):
        assert n1 == n2 and b1 is b2
    assert fused.scale == ref.scale == 32 ** -0.5
    with pytest.raises(TypeError, match="attn"):
        FusedConvAttention.from_reference(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_reference(backend, method, cls, training):
    """Forward, every parameter gradient, the input gradient and the BN running stats."""
    ref = make_attention(cls=cls, training=training, method=method)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    h, w = 5, 3
    x = torch.randn(2, h * w + cls, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for step in range(2):  # two steps: running stats evolve in training mode
        y = ref(x, h, w)
        grad = torch.randn_like(y)
        y.backward(grad)
        with cvt_kernels.use_backend(backend):
            y2 = ours(x2, h, w)
        y2.backward(grad)
        torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-10)
    for (name, p), p2 in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, b), b2 in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b2, b, rtol=1e-12, atol=1e-12, msg=name)


def test_accelerate_replaces_every_attention_in_place():
    model = models.cvt_13(num_classes=5).eval()
    params_before = [p for p in model.parameters()]
    out, count = accelerate(model)
    assert out is model and count == 13
    assert sum(isinstance(m, FusedConvAttention) for m in model.modules()) == 13
    assert not any(type(m) is Attention for m in model.modules())
    assert [p for p in model.parameters()] == params_before  # same tensors, not copies
    assert not model.stage2.blocks[0].attn.training
    _, again = accelerate(model)
    assert again == 0  # already fused modules are left alone


def test_accelerate_keeps_dtype_and_mode():
    model = models.cvt_13(num_classes=5).to(torch.float64).train()
    accelerate(model)
    attn = model.stage1.blocks[1].attn
    assert attn.training and attn.proj.weight.dtype == torch.float64


def test_accelerate_errors():
    with pytest.raises(TypeError, match="model"):
        accelerate("not a module")
    with pytest.raises(TypeError, match="from_reference"):
        accelerate(Attention(8, 8, 1))


def test_version_in_one_place():
    import re
    from pathlib import Path
    setup_text = (Path(__file__).parents[1] / "setup.py").read_text()
    assert "version=VERSION" in setup_text and re.match(r"\d+\.\d+\.\d+", cvt_kernels.__version__)
