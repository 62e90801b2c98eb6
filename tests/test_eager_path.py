"""The eager fast path of the kernel ops: an autograd.Function instead of the custom op in
plain eager mode (same functions, same results), eval constants that follow the buffers,
the dispatcher's remembered choices. Triton backend under the interpreter; the torch
backend on CPU."""

import copy
import importlib
import os

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, backends

# (cvt_kernels.ops exports functions under the modules' names: import the modules by path.)
projection_mod = importlib.import_module("cvt_kernels.ops.conv_projection")
attention_mod = importlib.import_module("cvt_kernels.ops.attention")

from conftest import make_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")


def _run(module, x, training):
    module.train(training)
    xi = x.clone().requires_grad_()
    with cvt_kernels.use_backend("triton"):
        out = module(xi, 3, 3)
    out.square().sum().backward()
    return [out.detach(), xi.grad] + [p.grad for p in module.parameters()] + [
        b.clone() for b in module.buffers()]


@needs_interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_function_and_custom_op_give_identical_results(monkeypatch, training):
    base = make_attention(dim_in=8, dim_out=8, heads=2, training=training)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    fast = _run(FusedConvAttention.from_reference(copy.deepcopy(base)), x, training)
    used = []
    for mod, op in ((projection_mod, "_conv_projection_op"), (attention_mod, "_attention_op")):
        monkeypatch.setattr(mod, "eager_call", lambda *t: False)
        original = getattr(mod, op)
        monkeypatch.setattr(mod, op, lambda *a, _f=original, _n=op: used.append(_n) or _f(*a))
    traced_path = _run(FusedConvAttention.from_reference(copy.deepcopy(base)), x, training)
    assert used.count("_conv_projection_op") == 3 and used.count("_attention_op") == 1
    for a, b in zip(fast, traced_path):
        assert torch.equal(a, b)


@needs_interpreter
def test_eager_calls_skip_the_custom_ops(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the custom op ran in eager mode")

    monkeypatch.setattr(projection_mod, "_conv_projection_op", refuse)
    monkeypatch.setattr(attention_mod, "_attention_op", refuse)
    module = FusedConvAttention.from_reference(make_attention(dim_in=8, dim_out=8, heads=2))
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend("triton"):
        module(x, 3, 3).sum().backward()
    assert x.grad is not None


@needs_interpreter
def test_double_backward_raises_instead_of_a_silent_zero():
    module = FusedConvAttention.from_reference(make_attention(dim_in=8, dim_out=8, heads=2))
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend("triton"):
        (g,) = torch.autograd.grad(module(x, 3, 3).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        g.sum().backward()


def test_eval_constants_follow_the_buffers():
    """The eval BatchNorm constants (rstd) follow a running statistic or a parameter
    changed in place or through load_state_dict (tests/test_eval_caches.py: every other
    way)."""
    ref = make_attention(dim_in=8, dim_out=8, heads=2, training=False)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    for _ in range(2):  # the second call is served from the cache
        with torch.no_grad():
            torch.testing.assert_close(ours(x, 3, 3), ref(x, 3, 3), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            for m in (ref, ours):
                m.conv_proj_k.bn.running_var.mul_(1.5)
                m.conv_proj_q.bn.weight.add_(0.25)
                m.conv_proj_v.conv.weight.mul_(-1.0)
    state = copy.deepcopy(ref.state_dict())
    for v in state.values():
        if v.is_floating_point():
            v.add_(0.1)
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 3, 3), ref(x, 3, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_eval_mode_with_autograd_reaches_the_parameters(backend):
    """Eval mode with gradients on (fine-tuning with BatchNorm frozen): no cached constant
    may cut the graph; the conv and BN parameters get their gradients."""
    ref = make_attention(dim_in=8, dim_out=8, heads=2, training=False)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    with cvt_kernels.use_backend(backend):
        with torch.no_grad():
            ours(x, 3, 3)  # fills the caches
        with torch.inference_mode():
            ours(x, 3, 3)  # inference tensors must not be reused below
        ours(x, 3, 3).square().sum().backward()
    ref(x, 3, 3).square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)


def test_the_dispatcher_remembers_choices_but_a_declining_forced_backend_raises_each_time():
    calls = []
    key = ("test-key",)

    def ask(backend):
        calls.append(backend.name)
        return ["no"] if backend.name == "triton" else []

    with backends.use_backend("torch"):
        assert backends.select("op", ask, key=key).name == "torch"
        assert backends.select("op", ask, key=key).name == "torch"
    assert calls == ["torch"]
    if backends.available_backends()["triton"] is None:
        with backends.use_backend("triton"):
            for _ in range(2):
                with pytest.raises(backends.BackendUnavailableError, match="no"):
                    backends.select("op", ask, key=key)
    backends.clear_selection_cache()
    with backends.use_backend("torch"):
        backends.select("op", ask, key=key)
    assert calls.count("torch") == 2
