"""PyTorch defects the package works around, pinned by tests so we notice when they change.

CPU ``batch_norm`` backward at batch 1: when the incoming gradient is the channels-last-like
view that CvT's "flatten tokens, prepend the class token" produces (shape (1, C, h, w),
strides (4, 1, 20, 4) for C=4, w=5), the input and weight gradients are wrong (errors of
order 1; seen with torch 2.13 CPU, float32 and float64, train and eval). The reference CvT
(ours and microsoft/CvT) hits it at batch 1 with a class token. Our backends never feed
``batch_norm`` such a gradient; these tests check that, whatever PyTorch does.

CPU ``layer_norm`` backward with a half-precision input sums the weight and bias gradients
in that precision: bfloat16, 4096 rows of 64, ~8% relative error (float32 input: 1e-7;
seen with torch 2.11 and 2.13 CPU, float32 or bfloat16 affine alike; the input gradient is
fine). The reference CvT's LayerNorm computes in float32 and never meets it; the ``torch``
backend's layer norm, which keeps half-precision activations in their dtype, takes the
float32 round trip on the CPU when those gradients are wanted.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels import ops

from conftest import CPU_BACKENDS, make_attention
from test_ops import projection_inputs


def batch_norm_backward_bug_present() -> bool:
    torch.manual_seed(0)
    y = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 16, 4, dtype=torch.float64)
    weird = g[:, 1:].transpose(1, 2).unflatten(2, (3, 5))
    a, = torch.autograd.grad(F.batch_norm(y, None, None, training=True), y, weird)
    b, = torch.autograd.grad(F.batch_norm(y, None, None, training=True), y, weird.contiguous())
    return not torch.allclose(a, b)


def test_report_batch_norm_backward_bug():
    if not batch_norm_backward_bug_present():
        pytest.skip("this PyTorch computes the strided batch_norm backward correctly; the "
                    "workaround in backends/torch_ops.py and the test hook may be dropped")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_one_with_class_token_gradcheck(backend, training):
    x, params, cfg = projection_inputs(cin=4, cout=3, h=3, w=5, batch=1, cls=True)
    with cvt_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, bw, cw: ops.conv_projection(
                x, 3, 5, params._replace(bn_weight=bw, conv_weight=cw), cfg, training=training),
            (x, params.bn_weight, params.conv_weight))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_batch_one_matches_fixed_reference(backend):
    ref = make_attention(cls=True, training=True)
    contiguous_bn_grads(ref)
    ours = cvt_kernels.FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(1, 1 + 4 * 4, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x, 4, 4).square().sum().backward()
    with cvt_kernels.use_backend(backend):
        ours(x2, 4, 4).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)


def contiguous_bn_grads(module: torch.nn.Module) -> torch.nn.Module:
    """Makes a reference model's BatchNorm gradients correct at batch 1 (see module doc)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_full_backward_pre_hook(
                lambda _m, grad_out: tuple(g.contiguous() if g is not None else None
                                           for g in grad_out))
    return module


def _layer_norm_affine_grad_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  dy: torch.Tensor, norm) -> float:
    """The worst relative error of ``norm``'s weight and bias gradients against float64
    (on the same rounded inputs)."""
    def grads(x_, w_, b_, dy_):
        w_, b_ = w_.detach().clone().requires_grad_(), b_.detach().clone().requires_grad_()
        norm(x_, w_, b_).backward(dy_)
        return w_.grad.double(), b_.grad.double()

    ours = grads(x, weight, bias, dy)
    truth = grads(x.double(), weight.double(), bias.double(), dy.double())
    return max(((a - t).abs().max() / t.abs().max()).item() for a, t in zip(ours, truth))


def _layer_norm_inputs(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2048, 64) * 2 + 1).to(dtype)
    return x, torch.rand(64) + 0.5, torch.randn(64) * 0.1, (torch.randn(2048, 64) * 1e-3).to(dtype)


def test_report_layer_norm_half_backward_bug():
    x, w, b, dy = _layer_norm_inputs(torch.bfloat16)
    err = _layer_norm_affine_grad_error(
        x, w, b, dy, lambda x_, w_, b_: F.layer_norm(x_, (64,), w_, b_, 1e-5))
    if err < 1e-3:
        pytest.skip(f"this PyTorch sums CPU bfloat16 layer_norm affine gradients accurately "
                    f"(error {err:.1e}): the float32 round trip in backends/torch_ops.py "
                    f"may be dropped")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_torch_backend_layer_norm_affine_grads_are_float32_accurate(dtype, residual):
    """The ``torch`` backend's layer norm on a half-precision CPU input: weight and bias
    gradients as accurate as float32 sums of the rounded inputs make them (where PyTorch's
    own kernel is ~8% off); output and the sum in the input's dtype."""
    x, w, b, dy = _layer_norm_inputs(dtype)
    r = torch.zeros_like(x) if residual else None
    backend = cvt_kernels.backends.get_backend("torch")

    def norm(x_, w_, b_):
        y, s = backend.layer_norm(x_, None if r is None else r.to(x_.dtype), w_, b_, 1e-5)
        assert y.dtype == x_.dtype and (s is None) == (r is None)
        return y

    assert _layer_norm_affine_grad_error(x, w, b, dy, norm) < 1e-4
