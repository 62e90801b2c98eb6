"""The whole FusedConvAttention, and a whole CvT-13, on the triton backend (projection and
attention kernels) vs the reference, under TRITON_INTERPRET=1 on CPU or on a GPU."""

import copy
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run",
                allow_module_level=True)

import cvt_kernels  # noqa: E402
from cvt_kernels import FusedConvAttention, models  # noqa: E402

from conftest import make_attention, randomize_bn  # noqa: E402
from test_pytorch_bugs import contiguous_bn_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float64 where the interpreter runs the kernels; float32 (TF32 off) on a GPU.
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64
TOL = dict(rtol=1e-4, atol=1e-5) if DTYPE == torch.float32 else dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_attention_dispatches_to_triton_when_forced():
    q = torch.randn(1, 5, 16, device=DEVICE, dtype=DTYPE)
    backend = cvt_kernels.backends.get_backend("triton")
    with cvt_kernels.use_backend("triton"):
        assert backend.attention_reasons(q, q, q, 1, 0.0) == []
    assert any("dropout" in r for r in backend.attention_reasons(q, q, q, 1, 0.1))


@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_reference(cls, training):
    ref = make_attention(dim_in=16, dim_out=32, heads=2, cls=cls, training=training,
                         dtype=DTYPE).to(DEVICE)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    h, w = 5, 3
    x = torch.randn(2, h * w + cls, 16, device=DEVICE, dtype=DTYPE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = ref(x, h, w)
    grad = torch.randn_like(y)
    y.backward(grad)
    with cvt_kernels.use_backend("triton"):
        y2 = ours(x2, h, w)
    y2.backward(grad)
    torch.testing.assert_close(y2, y, **TOL)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=TOL["rtol"],
                                   atol=TOL["atol"] * max(scale, 1.0), msg=name)
    for (name, b), c in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c, b, **TOL, msg=name)


# The interpreter simulates every program in numpy: CvT-13's real widths (64/192/384) take
# minutes per forward there, so on CPU the model keeps CvT-13's stages, strides, class token
# and more than one block per later stage, at narrow widths and depths 1/2/2. On a GPU it is
# the real CvT-13.
NARROW = None if DEVICE == "cuda" else {"DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3],
                                        "DEPTH": [1, 2, 2]}


def test_cvt13_forward_and_backward_match_eager():
    """CvT-13 at 32x32 (stages 8x8, 4x4, 2x2 + class token), every block on the Triton kernels."""
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=10, spec_overrides=NARROW).to(DEVICE, DTYPE)
    randomize_bn(eager)
    fused = copy.deepcopy(eager)
    contiguous_bn_grads(eager)
    cvt_kernels.accelerate(fused)
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=DTYPE)
    eager.train(), fused.train()
    torch.manual_seed(1)
    ref = eager(x)
    ref.square().mean().backward()
    torch.manual_seed(1)
    with cvt_kernels.use_backend("triton"):
        ours = fused(x)
    ours.square().mean().backward()
    torch.testing.assert_close(ours, ref, **TOL)
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3 if DTYPE == torch.float32 else 1e-6,
                                   atol=1e-6 * scale, msg=name)
    eager.eval(), fused.eval()
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        torch.testing.assert_close(fused(x), eager(x), **TOL)


def test_head_dim_above_the_shipped_configs_is_declined_with_a_reason():
    q = torch.randn(1, 5, 256, device=DEVICE)
    reasons = cvt_kernels.backends.get_backend("triton").attention_reasons(q, q, q, 1, 0.0)
    assert any("head_dim 256" in r for r in reasons)
