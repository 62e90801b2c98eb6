"""PyTorch defects the package works around, pinned by tests so we notice when they change.

CPU ``batch_norm`` backward at batch 1: when the incoming gradient is the channels-last-like
view that CvT's "flatten tokens, prepend the class token" produces (shape (1, C, h, w),
strides (4, 1, 20, 4) for C=4, w=5), the input and weight gradients are wrong (errors of
order 1; seen with torch 2.13 CPU, float32 and float64, train and eval). The reference CvT
(ours and microsoft/CvT) hits it at batch 1 with a class token. Our backends never feed
``batch_norm`` such a gradient; these tests check that, whatever PyTorch does.
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
