"""torch.compile(fullgraph=True) traces FusedConvAttention on every CPU backend."""

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention

from conftest import CPU_BACKENDS, make_attention


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_fullgraph_forward_backward(backend, training):
    ref = make_attention(dtype=torch.float32, training=training)
    eager = FusedConvAttention.from_reference(ref)
    stats_before = ref.conv_proj_k.bn.num_batches_tracked.item()
    x = torch.randn(2, 1 + 5 * 3, 16, requires_grad=True)
    with cvt_kernels.use_backend(backend):
        compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
        y = compiled(x, 5, 3)
        y.sum().backward()
        grad_compiled = x.grad.clone()
        x.grad = None
        y_eager = eager(x, 5, 3)
        y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad_compiled, x.grad)
    expected = stats_before + (2 if training else 0)  # the running-stat update survives tracing
    assert ref.conv_proj_k.bn.num_batches_tracked.item() == expected


def test_inductor_reference_backend_custom_ops():
    """The custom ops (reference backend) under the default inductor backend."""
    ref = make_attention(dtype=torch.float32, training=True, cls=False)
    fused = FusedConvAttention.from_reference(ref)
    x = torch.randn(2, 4 * 4, 16, requires_grad=True)
    with cvt_kernels.use_backend("reference"):
        y = torch.compile(fused, fullgraph=True)(x, 4, 4)
        y.square().sum().backward()
        g = x.grad.clone()
        x.grad = None
        y2 = fused(x, 4, 4)
        y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g, x.grad)


def test_env_var_is_honoured_under_compile(monkeypatch):
    monkeypatch.setenv("CVT_KERNELS_BACKEND", "reference")
    fused = FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    x = torch.randn(2, 1 + 4 * 4, 16)
    gm_ops = []

    def capture(gm, example_inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(fused, fullgraph=True, backend=capture)(x, 4, 4)
    assert any("cvt_kernels.attention" in op for op in gm_ops), gm_ops


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake tensors, autograd registration are consistent."""
    q = torch.randn(2, 5, 8, requires_grad=True)
    k = torch.randn(2, 3, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.cvt_kernels.attention.default, (q, k, k, 2, 0.5, "reference"))
    x = torch.randn(2, 1 + 3 * 5, 4, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    bn_w = torch.rand(4, requires_grad=True)
    bn_b = torch.randn(4, requires_grad=True)
    mean, rstd = torch.randn(4), torch.rand(4) + 0.5
    pw = torch.randn(6, 4, requires_grad=True)
    pb = torch.randn(6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.cvt_kernels.conv_projection.default,
        (x, w, bn_w, bn_b, mean, rstd, pw, pb, 3, 5, "dw_bn", 3, 2, 1, True, True, "reference"))
    torch.library.opcheck(
        torch.ops.cvt_kernels.conv_projection_stats.default,
        (x.detach(), w.detach(), 3, 5, 3, 2, 1, True, "reference"))
