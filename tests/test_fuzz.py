"""Differential fuzzing: random valid CvT attention configurations, every CPU backend (and the
Triton kernels under the interpreter) vs the reference module, forward, all gradients and
running statistics (float64 tight; float32 by the 2x rule)."""

import copy
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cvt_kernels
from cvt_kernels import FusedConvAttention

from conftest import CPU_BACKENDS, assert_close_by_rule, make_attention
from test_pytorch_bugs import contiguous_bn_grads


@st.composite
def configs(draw, methods=("dw_bn", "dw_bn", "avg", "linear")):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([1, 2, 4]))
    cls = draw(st.booleans())
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    method = draw(st.sampled_from(list(methods)))
    stride_kv = draw(st.integers(1, 2))
    batch = draw(st.integers(1, 3))
    training = draw(st.booleans())
    if training and method == "dw_bn" and batch * h * w <= 1:
        training = False  # BatchNorm training needs two values per channel (tested elsewhere)
    if training and method == "dw_bn" and stride_kv == 2:
        kv = ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1)
        if batch * kv <= 1:
            stride_kv = 1
    return dict(dim_in=draw(st.integers(1, 6)), dim_out=heads * head_dim, heads=heads, cls=cls,
                h=h, w=w, method=method, stride_kv=stride_kv, batch=batch, training=training,
                qkv_bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["dense", "sliced", "transposed"])),
                dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float32])))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_random_configurations_match_reference(backend, cfg):
    check_against_reference(backend, cfg)


# The Triton kernels under the interpreter (~0.5 s a launch, ~10 launches a case): fewer
# cases, only what the triton backend serves (dw_bn; it declines the others with a reason).
@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1"
                         and importlib.util.find_spec("triton")),
                    reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(methods=["dw_bn"]))
def test_random_configurations_match_reference_triton(cfg):
    check_against_reference("triton", cfg)


def check_against_reference(backend, cfg):
    ref = make_attention(dim_in=cfg["dim_in"], dim_out=cfg["dim_out"], heads=cfg["heads"],
                         cls=cfg["cls"], training=cfg["training"], method=cfg["method"])
    ref.stride_kv = cfg["stride_kv"]
    for proj in (ref.conv_proj_k, ref.conv_proj_v):
        if proj is not None and hasattr(proj, "conv"):
            proj.conv.stride = (cfg["stride_kv"],) * 2
        elif proj is not None:
            proj.avg.stride = cfg["stride_kv"]
    if not cfg["qkv_bias"]:
        for lin in (ref.proj_q, ref.proj_k, ref.proj_v):
            lin.bias = None
    contiguous_bn_grads(ref)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref).to(cfg["dtype"]))
    eager = copy.deepcopy(ref).float()  # float32 PyTorch: the yardstick for float32 errors
    tokens = cfg["h"] * cfg["w"] + cfg["cls"]
    layout = cfg["layout"]
    wide = cfg["dim_in"] * (2 if layout == "sliced" else 1)
    base = torch.randn(cfg["batch"], tokens, wide, dtype=torch.float64)

    def view(t):  # a non-contiguous view of the same values
        if layout == "sliced":  # every other channel of a wider tensor
            return t[..., ::2]
        if layout == "transposed":  # (B, C, T) memory seen as (B, T, C): channel stride T
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        return t

    x1 = base.clone().requires_grad_()
    x2 = base.clone().to(cfg["dtype"]).requires_grad_()
    y = ref(view(x1), cfg["h"], cfg["w"])
    grad = torch.randn_like(y)
    y.backward(grad)
    with cvt_kernels.use_backend(backend):
        y2 = ours(view(x2), cfg["h"], cfg["w"])
    y2.backward(grad.to(cfg["dtype"]))
    if cfg["dtype"] == torch.float64:
        torch.testing.assert_close(y2, y, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-8, atol=1e-10)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)
        for (name, b), c in zip(ref.named_buffers(), ours.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)
        return
    # float32: at most 2x the error of eager PyTorch in float32 against the float64 truth
    # (tiny BatchNorm batches can be ill-conditioned for both alike).
    x3 = base.clone().float().requires_grad_()
    y3 = eager(view(x3), cfg["h"], cfg["w"])
    y3.backward(grad.float())
    assert_close_by_rule(y2, y3, y, "output", atol=1e-5)
    assert_close_by_rule(x2.grad, x3.grad, x1.grad, "x.grad", atol=1e-5)
    for (name, p), q, e in zip(ref.named_parameters(), ours.parameters(), eager.parameters()):
        scale = max(1.0, p.grad.abs().max().item())
        assert_close_by_rule(q.grad, e.grad, p.grad, name, atol=1e-5 * scale)
    for (name, b), c, e in zip(ref.named_buffers(), ours.buffers(), eager.buffers()):
        assert_close_by_rule(c, e, b, name, atol=1e-6)
