"""The functional ops on every CPU backend: float64 gradcheck, BatchNorm semantics, dtypes."""

import pytest
import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels import ops
from cvt_kernels.backends import ProjectionConfig, ProjectionParams, get_backend

from conftest import CPU_BACKENDS, assert_close_by_rule, make_attention

torch.backends.cudnn.deterministic = True


def projection_inputs(cin=4, cout=6, h=3, w=5, batch=2, cls=True, method="dw_bn", stride=1,
                      dtype=torch.float64, requires_grad=True):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    x = torch.randn(batch, h * w + cls, cin, **g)
    if method == "dw_bn":
        conv_w = torch.randn(cin, 1, 3, 3, **g)
        bn_w = (torch.rand(cin, dtype=dtype) + 0.5).requires_grad_(requires_grad)
        bn_b = torch.randn(cin, **g)
        rm = torch.randn(cin, dtype=dtype) * 0.1
        rv = torch.rand(cin, dtype=dtype) + 0.5
        nbt = torch.tensor(0)
    else:
        conv_w = bn_w = bn_b = rm = rv = nbt = None
    params = ProjectionParams(conv_w, bn_w, bn_b, rm, rv, nbt, torch.randn(cout, cin, **g),
                              torch.randn(cout, **g))
    cfg = ProjectionConfig(method, 3, stride, 1, cls)
    return x, params, cfg


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method,stride", [("dw_bn", 1), ("dw_bn", 2), ("avg", 2), ("linear", 1)])
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_conv_projection_gradcheck(backend, method, stride, cls, training):
    x, params, cfg = projection_inputs(cls=cls, method=method, stride=stride)
    h, w = 3, 5
    diff = [t for t in (params.conv_weight, params.bn_weight, params.bn_bias,
                        params.proj_weight, params.proj_bias) if t is not None]

    def fn(x, *weights):
        it = iter(weights)
        p = params._replace(**{k: next(it) for k in ("conv_weight", "bn_weight", "bn_bias")
                               if getattr(params, k) is not None},
                            proj_weight=next(it), proj_bias=next(it))
        return ops.conv_projection(x, h, w, p, cfg, training=training)

    with cvt_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, *diff))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nq,nk,heads", [(17, 5, 1), (9, 4, 3), (1, 1, 2)])
def test_attention_gradcheck(backend, nq, nk, heads):
    d = 4
    q = torch.randn(2, nq, heads * d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, nk, heads * d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, nk, heads * d, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda q, k, v: ops.attention(q, k, v, heads, 0.3), (q, k, v))


@pytest.mark.parametrize("nq,nk,heads,d", [(17, 5, 1, 16), (17, 5, 3, 64), (20, 6, 2, 32)])
def test_attention_reference_equals_torch_and_einsum(nq, nk, heads, d):
    q, k, v = (torch.randn(3, n, heads * d, dtype=torch.float64) for n in (nq, nk, nk))
    scale = (heads * d) ** -0.5  # CvT's scale: the full width
    qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    expected = (torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1) @ vh).transpose(1, 2).flatten(2)
    for backend in CPU_BACKENDS:
        with cvt_kernels.use_backend(backend):
            torch.testing.assert_close(ops.attention(q, k, v, heads, scale), expected)
    out, lse = get_backend("reference").attention_forward(q, k, v, heads, scale)
    assert lse.shape == (3, heads, nq)
    torch.testing.assert_close(lse, torch.logsumexp(qh @ kh.transpose(-1, -2) * scale, -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_follow_batchnorm2d(backend, momentum):
    """Several training steps, then eval: identical to nn.Conv2d + nn.BatchNorm2d."""
    cin, h, w = 5, 6, 4
    conv = torch.nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False).double()
    bn = torch.nn.BatchNorm2d(cin, momentum=momentum).double()
    lin = torch.nn.Linear(cin, 7).double()
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    params = ProjectionParams(conv.weight, bn.weight, bn.bias, rm, rv, nbt, lin.weight, lin.bias)
    cfg = ProjectionConfig("dw_bn", 3, 2, 1, False)
    with cvt_kernels.use_backend(backend):
        for step in range(4):
            x = torch.randn(3, h * w, cin, dtype=torch.float64) * (step + 1) + step
            ours = ops.conv_projection(x, h, w, params, cfg, training=True, momentum=momentum)
            bn.train()
            ref = lin(bn(conv(x.transpose(1, 2).reshape(3, cin, h, w))).flatten(2).transpose(1, 2))
            torch.testing.assert_close(ours, ref)
            torch.testing.assert_close(rm, bn.running_mean)
            torch.testing.assert_close(rv, bn.running_var)
            assert nbt.item() == bn.num_batches_tracked.item() == step + 1
        bn.eval()
        x = torch.randn(2, h * w, cin, dtype=torch.float64)
        ours = ops.conv_projection(x, h, w, params, cfg, training=False, momentum=momentum)
        ref = lin(bn(conv(x.transpose(1, 2).reshape(2, cin, h, w))).flatten(2).transpose(1, 2))
        torch.testing.assert_close(ours, ref)
        assert nbt.item() == 4  # eval does not count


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bn_without_running_stats_uses_batch_stats_in_eval(backend):
    x, params, cfg = projection_inputs(requires_grad=False)
    params = params._replace(running_mean=None, running_var=None, num_batches_tracked=None)
    with cvt_kernels.use_backend(backend):
        a = ops.conv_projection(x, 3, 5, params, cfg, training=False)
        b = ops.conv_projection(x, 3, 5, params, cfg, training=True)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_module_low_precision_by_the_2x_rule(backend, dtype, training):
    """Ours in ``dtype`` is at most ~2x as far from float64 as PyTorch's reference in ``dtype``."""
    truth_mod = make_attention(dim_in=32, dim_out=64, heads=2, training=training)
    low_mod = make_attention(dim_in=32, dim_out=64, heads=2, training=training)
    low_mod.load_state_dict(truth_mod.state_dict())
    low_mod.to(dtype)
    ours_mod = cvt_kernels.FusedConvAttention.from_reference(
        make_attention(dim_in=32, dim_out=64, heads=2, training=training))
    ours_mod.load_state_dict(truth_mod.state_dict())
    ours_mod.to(dtype)
    h, w = 6, 5
    x64 = torch.randn(3, 1 + h * w, 32, dtype=torch.float64)
    truth = truth_mod(x64, h, w)
    pytorch_low = low_mod(x64.to(dtype), h, w)
    with cvt_kernels.use_backend(backend):
        ours = ours_mod(x64.to(dtype), h, w)
    assert ours.dtype == dtype
    assert_close_by_rule(ours, pytorch_low, truth, name=f"{backend} {dtype}", atol=1e-3)


def test_reference_backend_computes_in_float32_for_half_inputs():
    x, params, cfg = projection_inputs(dtype=torch.float16, requires_grad=False)
    mean, var = get_backend("reference").conv_projection_stats(x, 3, 5, params.conv_weight, cfg)
    assert mean.dtype == var.dtype == torch.float32
    out = ops.conv_projection(x, 3, 5, params, cfg, training=True)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_is_finite_for_huge_logits(backend):
    q = torch.full((1, 4, 8), 300.0)
    k = torch.full((1, 3, 8), 300.0)
    v = torch.randn(1, 3, 8)
    with cvt_kernels.use_backend(backend):
        out = ops.attention(q, k, v, 1, 1.0)  # scores 720000: exp overflows without the max
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(1, 4, 8))


def test_dropout_goes_to_the_torch_backend():
    q = torch.randn(1, 4, 8)
    reasons = get_backend("reference").attention_reasons(q, q, q, 1, 0.1)
    assert reasons and "dropout" in reasons[0]
    torch.manual_seed(0)
    out = ops.attention(q, q, q, 1, 1.0, dropout_p=0.5)
    torch.manual_seed(0)
    expected = F.scaled_dot_product_attention(q[:, None], q[:, None], q[:, None],
                                              dropout_p=0.5, scale=1.0)[:, 0]
    torch.testing.assert_close(out, expected)
    with cvt_kernels.use_backend("reference"), pytest.raises(
            cvt_kernels.BackendUnavailableError, match="dropout"):
        ops.attention(q, q, q, 1, 1.0, dropout_p=0.5)
