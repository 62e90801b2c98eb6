"""The ``torch`` backend's compositions (issue 24): what they launch, counted on the ``meta``
device by ``benchmarks.step_cost`` (one launch per aten op, as on a GPU), and that they
compute what they did: float64 against the reference backend to ~1e-12, float32 and
bfloat16 by the 2x rule against a float64 truth.

Each count pins one change: the class token split (one ``cat`` in backward, where two
slices cost two zero-filled ``slice_backward`` and an ``add``), BatchNorm on the conv's
4-D output without autograd (no copy whatever layout the conv returns), the QuickGELU
constants on the weights in training (no multiply of an activation-sized tensor in
backward), and ``linear``/``linear_add`` taking one GEMM path for any input layout."""

import copy

import pytest
import torch
import torch.nn.functional as F

import cvt_kernels
from benchmarks import step_cost as sc
from cvt_kernels import models, ops
from cvt_kernels.backends.base import ProjectionConfig, ProjectionParams
from cvt_kernels.backends.torch_ops import TorchBackend, linear, linear_add
from cvt_kernels.ops.mlp import mlp_reference

from conftest import assert_close_by_rule
from test_ops import projection_inputs

BF16 = torch.bfloat16
TORCH = TorchBackend()


def meta_projection(c=8, h=4, w=4, batch=2, cls=True, stride=1, grad=True):
    """Meta tensors of one dw_bn projection (what a CvT-13 block passes, at a tiny size)."""
    def t(*shape, req=grad):
        return torch.empty(*shape, device="meta", dtype=BF16).requires_grad_(req)

    x = t(batch, h * w + cls, c)
    params = ProjectionParams(t(c, 1, 3, 3), t(c), t(c), t(c, req=False), t(c, req=False),
                              torch.zeros((), dtype=torch.long, device="meta"), t(c, c), t(c))
    return x, params, ProjectionConfig("dw_bn", 3, stride, 1, cls)


def aten_ops(cost: sc.StepCost):
    return [x.name for x in cost.launches if x.kind == "aten"]


# ------------------------------------------------------------------ launch counts
def test_class_token_costs_one_cat_in_backward():
    x, params, cfg = meta_projection()

    def step():
        out = TORCH.conv_projection(x, 4, 4, params, cfg, True, 0.1, 1e-5)
        out.backward(torch.empty_like(out))

    names = aten_ops(sc.count_module(step))
    assert "slice_backward" not in names, names
    # forward: the class token's cat; backward: the split's cat (dx in one piece)
    assert names.count("cat") == 2, names
    assert "add" not in names, names  # the two slices' gradients summed: gone


@pytest.mark.parametrize("cls", [True, False])
def test_eval_projection_copies_nothing_the_conv_layout_decides(cls):
    """The step counter gives the conv output cuDNN's layout for this input (channels-last;
    meta alone would say NCHW): without autograd BatchNorm runs on the 4-D map and keeps
    it, so the token matrix is a view (no copy) without a class token, and the class
    token's cat reads it in place with one."""
    x, params, cfg = meta_projection(cls=cls, grad=False)
    with torch.no_grad():
        names = aten_ops(sc.count_module(
            lambda: TORCH.conv_projection(x, 4, 4, params, cfg, False, 0.1, 1e-5)))
    if cls:
        assert names == ["convolution", "native_batch_norm", "cat", "addmm"], names
    else:
        assert names == ["convolution", "native_batch_norm", "addmm"], names


def test_training_quick_gelu_multiplies_only_weights():
    """silu(1.702 z) / 1.702 with the constants on the weights (one foreach launch) instead
    of the GEMMs' alpha/beta, whose backward multiplies activation-sized gradients."""
    rows, c, hidden = 256, 8, 32

    def t(*shape):
        return torch.empty(*shape, device="meta", dtype=BF16).requires_grad_()

    x, w1, b1, w2, b2, r = t(rows, c), t(hidden, c), t(hidden), t(c, hidden), t(c), t(rows, c)

    def step():
        out = TORCH.mlp(x, w1, b1, w2, b2, "quick_gelu", r)
        out.backward(torch.empty_like(out))

    cost = sc.count_module(step)
    weight_bytes = 2 * (w1.numel() + b1.numel() + w2.numel())
    muls = [x for x in cost.launches if x.name.startswith(("mul", "_foreach_mul"))]
    assert muls and all(m.nbytes <= 2 * weight_bytes for m in muls), [
        (m.name, m.nbytes) for m in muls]
    assert sorted(aten_ops(cost)) == sorted(
        ["_foreach_mul", "addmm", "silu", "add", "addmm_",        # forward
         "mm", "mm", "silu_backward", "mm", "mm", "sum", "sum",   # backward
         "mul", "mul", "mul"])                                    # d(scaled weights)


def test_linear_of_a_strided_input_is_one_gemm():
    weight, bias = (torch.empty(*s, device="meta", dtype=BF16) for s in ((6, 8), (6,)))
    x = torch.empty(2, 8, 5, device="meta", dtype=BF16).transpose(1, 2)  # (2, 5, 8) strided
    with torch.no_grad():
        assert aten_ops(sc.count_module(lambda: linear(x, weight, bias))) == ["clone", "addmm"]


def test_linear_add_on_meta_counts_the_cuda_path():
    x, weight, bias = (torch.empty(*s, device="meta", dtype=BF16)
                       for s in ((2, 5, 8), (6, 8), (6,)))
    r = torch.empty(2, 5, 6, device="meta", dtype=BF16)
    with torch.no_grad():
        names = aten_ops(sc.count_module(lambda: linear_add(x, weight, bias, r)))
    assert names == ["add", "addmm_"], names  # r + b, then the GEMM accumulates into it


# ------------------------------------------------------------------ the same numbers
def _projection_run(backend, x, params, cfg, training, grad):
    x = x.detach().clone().requires_grad_(grad)
    params = ProjectionParams(*(None if t is None else t.detach().clone().requires_grad_(
        grad and t.is_floating_point() and i not in (3, 4)) for i, t in enumerate(params)))
    with cvt_kernels.use_backend(backend), torch.set_grad_enabled(grad):
        out = ops.conv_projection(x, 3, 5, params, cfg, training=training)
        grads = []
        if grad:
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
            grads = [t.grad for t in (x, *params) if t is not None and t.requires_grad]
    return out.detach(), grads, params


@pytest.mark.parametrize("method,stride", [("dw_bn", 1), ("dw_bn", 2), ("avg", 2), ("linear", 1)])
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("training,grad", [(True, True), (False, False), (False, True),
                                           (True, False)])
@pytest.mark.parametrize("batch", [1, 2])
def test_projection_matches_the_reference_backend(method, stride, cls, training, grad, batch):
    """Every path of ``conv_projection`` (the split, BatchNorm on the token matrix with
    autograd and on the 4-D map without, the linear method's shortcut): output, every
    gradient and the BatchNorm state equal the reference backend's in float64."""
    x, params, cfg = projection_inputs(cls=cls, method=method, stride=stride, batch=batch,
                                       requires_grad=False)
    x = torch.randn(batch, 2 * x.shape[1], x.shape[2], dtype=x.dtype)[:, ::2]  # strided rows
    ours, ours_grads, ours_params = _projection_run("torch", x, params, cfg, training, grad)
    ref, ref_grads, ref_params = _projection_run("reference", x, params, cfg, training, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert len(ours_grads) == len(ref_grads)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    for a, b in zip(ours_params[3:6], ref_params[3:6]):  # running stats, num_batches_tracked
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _mlp_grads(fn, tensors, dtype, grad_out):
    ts = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*ts)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [t.grad for t in ts if t is not None]


def _mlp_tensors(bias, residual, dtype=torch.float64, c=48, hidden=192, rows=(2, 50)):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return (rand(*rows, c, scale=3.0), rand(hidden, c, scale=2 * c ** -0.5),
            rand(hidden) if bias else None, rand(c, hidden, scale=hidden ** -0.5),
            rand(c) if bias else None, rand(*rows, c) if residual else None,
            rand(*rows, c))


@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True),
                                           (False, False)])
def test_training_mlp_matches_the_reference_in_float64(bias, residual):
    *tensors, grad_out = _mlp_tensors(bias, residual)
    ours = _mlp_grads(lambda *t: TORCH.mlp(*t[:5], "quick_gelu", t[5]), tensors,
                      torch.float64, grad_out)
    ref = _mlp_grads(lambda *t: mlp_reference(*t[:5], "quick_gelu", t[5]), tensors,
                     torch.float64, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_mlp_by_the_2x_rule(dtype, bias):
    """Output and every gradient no further from a float64 truth than twice eager's own
    error (nn.Linear + the reference QuickGELU in the same dtype)."""
    *tensors, grad_out = _mlp_tensors(bias, True)
    act = models.QuickGELU()

    def eager(x, w1, b1, w2, b2, r):
        return r + F.linear(act(F.linear(x, w1, b1)), w2, b2)

    ours = _mlp_grads(lambda *t: TORCH.mlp(*t[:5], "quick_gelu", t[5]), tensors, dtype,
                      grad_out)
    ref = _mlp_grads(eager, tensors, dtype, grad_out)
    truth = _mlp_grads(eager, tensors, torch.float64, grad_out)
    names = ["out", "x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual"]
    if not bias:
        names = [n for n in names if not n.endswith("bias")]
    for name, a, b, t in zip(names, ours, ref, truth):
        assert_close_by_rule(a, b, t, name, atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_training_mlp_under_autocast_matches_eager():
    """Under autocast the weights are scaled in float32 (foreach is no autocast op), then
    cast with the GEMMs, as eager's Linear casts them."""
    *tensors, grad_out = _mlp_tensors(True, False, dtype=torch.float32)
    act = models.QuickGELU()

    def eager(x, w1, b1, w2, b2, r):
        return F.linear(act(F.linear(x, w1, b1)), w2, b2)

    with torch.autocast("cpu", dtype=BF16):
        ours = _mlp_grads(lambda *t: TORCH.mlp(*t[:5], "quick_gelu", None), tensors,
                          torch.float32, grad_out)
        ref = _mlp_grads(eager, tensors, torch.float32, grad_out)
    truth = _mlp_grads(eager, tensors, torch.float64, grad_out)
    for name, a, b, t in zip(["out", "x", "w1", "b1", "w2", "b2"], ours, ref, truth):
        assert a.dtype == b.dtype, name
        assert_close_by_rule(a, b, t, name, atol=1e-3)


def test_block_scope_training_step_matches_eager_in_float64():
    """A tiny accelerated model (block scope, torch backend, drop path on) trains like the
    eager one: logits, every parameter gradient and the BatchNorm state after two steps."""
    tiny = {"DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2]}
    eager = models.cvt_13(num_classes=5, img_size=32, spec_overrides=tiny).double()
    fused = cvt_kernels.accelerate(copy.deepcopy(eager), scope="block")[0]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for _ in range(2):
        for m in (eager, fused):
            m.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws, in the same order
        a = eager(x)
        a.square().sum().backward()
        torch.manual_seed(1)
        with cvt_kernels.use_backend("torch"):
            b = fused(x)
            b.square().sum().backward()
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, buf), other in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(other, buf, rtol=1e-12, atol=1e-12, msg=name)


def test_mlp_names_an_unknown_activation():
    x, w1, b1, w2, b2, r, _ = _mlp_tensors(True, True)
    with pytest.raises(ValueError, match="act: expected 'quick_gelu' or 'gelu', got 'relu'"):
        TORCH.mlp(x, w1, b1, w2, b2, "relu", r)
