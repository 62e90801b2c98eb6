"""A second derivative (``torch.autograd.grad(..., create_graph=True)``, then backward again)
through the fused ops (issue 25): every backend that cannot raises one error saying so and
what to do, and what it says to do (the torch backend under SDPA's math kernel) gives the
reference module's second derivative."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cvt_kernels
from cvt_kernels import backends, models
from cvt_kernels.modules import FusedConvAttention

from conftest import make_attention

BACKENDS = [b for b in ("reference", "torch", "triton")
            if backends.available_backends()[b] is None]
TINY = dict(DIM_EMBED=[8, 16, 24], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 1])


def second_derivative(call, x, cotangent_of_out: bool):
    """d/dx of |dL/dx|^2, with L = sum(out^2) (the incoming gradient depends on the output)
    or L = sum(out) (it does not: only the saved tensors carry the dependence)."""
    out = call(x)
    loss = out.square().sum() if cotangent_of_out else out.sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    g.square().sum().backward()
    return x.grad


def on_3x3(module):
    return lambda x: module(x, 3, 3)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("squared", [True, False], ids=["sum-of-squares", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_says_it_is_not_supported_and_what_to_do(backend, squared, training):
    module = FusedConvAttention.from_reference(make_attention(dim_in=8, dim_out=8, heads=2,
                                                              training=training))
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend(backend), pytest.raises(RuntimeError) as err:
        second_derivative(on_3x3(module), x, squared)
    text = str(err.value)
    assert "double backward" in text and "not supported by the fused ops" in text, text
    assert "use_backend('torch')" in text and "SDPBackend.MATH" in text, text
    assert "scaled_dot_product" not in text and "once_differentiable" not in text, text


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_advice_differentiates_twice_like_the_reference_module(training):
    ref = make_attention(dim_in=8, dim_out=8, heads=2, training=training)
    fused = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    expected = second_derivative(on_3x3(ref), x_ref, True)
    with cvt_kernels.use_backend("torch"), sdpa_kernel(SDPBackend.MATH):
        got = second_derivative(on_3x3(fused), x, True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_the_advice_holds_for_a_whole_model(scope):
    """Block scope adds the LayerNorm and MLP ops: the torch backend runs them composite."""
    eager = models.cvt_13(img_size=32, num_classes=4, spec_overrides=TINY).double()
    fused = cvt_kernels.accelerate(copy.deepcopy(eager), scope=scope)[0]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    expected = second_derivative(eager, x.detach().clone().requires_grad_(), True)
    with cvt_kernels.use_backend("torch"), sdpa_kernel(SDPBackend.MATH):
        got = second_derivative(fused, x, True)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # Without the math kernel the same model says what to do.
    with cvt_kernels.use_backend("torch"), pytest.raises(RuntimeError, match="double backward"):
        second_derivative(fused, x.detach().clone().requires_grad_(), True)
