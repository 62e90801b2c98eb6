"""torch.compile(fullgraph=True) traces FusedConvAttention, and a whole accelerated CvT, on
every CPU backend."""

import copy
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cvt_kernels
from cvt_kernels import FusedConvAttention, models

from conftest import CPU_BACKENDS, make_attention, randomize_bn


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


def _opcheck_samples():
    """Inputs for every op ``cvt_kernels.ops._register`` registered, on the reference
    backend: gradients wanted where the op is differentiable, so opcheck runs the backward
    op and its fake too. Several samples where an optional tensor changes the backward's
    placeholders."""
    def g(*shape):
        return torch.randn(*shape, requires_grad=True)

    q, k = g(2, 5, 8), g(2, 3, 8)
    x = g(2, 1 + 3 * 5, 4)
    w = g(4, 1, 3, 3)
    bn_w, bn_b = (torch.rand(4) + 0.5).requires_grad_(), g(4)
    mean, rstd = torch.randn(4), torch.rand(4) + 0.5
    pw, pb = g(6, 4), g(6)
    t, r = g(2, 5, 4), g(2, 5, 4)
    ln_w, ln_b = g(4), g(4)
    w1, b1, w2, b2 = g(8, 4), g(8), g(4, 8), g(4)
    rand = torch.rand(2, 1, 1)
    return {
        "attention": [(q, k, k, 2, 0.5, "reference")],
        "conv_projection": [
            (x, w, bn_w, bn_b, mean, rstd, pw, pb, 3, 5, "dw_bn", 3, 2, 1, True, True,
             "reference", None, None, 1e-5),
            (x, w, None, None, None, None, pw, None, 3, 5, "dw_bn", 3, 1, 1, True, False,
             "reference", torch.randn(4), torch.rand(4) + 0.5, 1e-5)],
        # No running statistics (BatchNorm with track_running_stats=False), then the
        # training update of all three buffers in place.
        "conv_projection_stats": [
            (x.detach(), w.detach(), 3, 5, 3, 2, 1, True, "reference", None, None, None),
            (x.detach(), w.detach(), 3, 5, 3, 2, 1, True, "reference", torch.zeros(4),
             torch.ones(4), torch.zeros((), dtype=torch.long))],
        "layer_norm": [(t, r, ln_w, ln_b, 1e-5, "reference"),
                       (t, None, None, None, 1e-5, "reference")],
        "mlp": [(t, w1, b1, w2, b2, "quick_gelu", r, None, 1.0, True, "reference"),
                (t, w1, None, w2, None, "gelu", None, rand, 0.75, True, "reference")],
        "linear": [(t, w2[:, :4].detach().clone().requires_grad_(), b2, r, None, 1.0,
                    "reference"),
                   (t, w1, None, None, rand, 0.5, "reference")],
        "norm_mlp": [tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in
                           (t, ln_w, ln_b, 1e-5, w1, b1, w2, b2, "quick_gelu", r,
                            "reference"))],
    }


# Registered ops that opcheck cannot run here, with the reason.
_NOT_CHECKED_ON_CPU = {
    "one_pass_attention": "a Triton kernel only (no reference backend); "
                          "tests/test_triton_one_pass.py runs it under the interpreter",
}


def test_every_registered_op_passes_opcheck():
    """torch.library.opcheck on every op of the registry (schema, fake, autograd
    registration, and through aot_dispatch the backward op and its fake). A newly
    registered op without a sample here fails."""
    from cvt_kernels.ops._register import REGISTERED

    samples = _opcheck_samples()
    assert set(REGISTERED) == set(samples) | set(_NOT_CHECKED_ON_CPU), sorted(REGISTERED)
    for name, calls in samples.items():
        op = getattr(torch.ops.cvt_kernels, name).default
        for args in calls:
            torch.library.opcheck(op, args)


class _RecordBackwardOps(TorchDispatchMode):
    """The ``cvt_kernels::*_backward`` calls a backward makes, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("cvt_kernels::") and name.endswith("_backward"):
            # Detached: the backward ops themselves have no autograd formula.
            def detached(v):
                return v.detach() if isinstance(v, torch.Tensor) else v

            self.calls.append((func, tuple(map(detached, args)),
                               {k: detached(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def test_every_backward_op_passes_opcheck():
    """opcheck on the backward ops as autograd calls them (opcheck on a forward op does not
    compare the backward op's fake with what it returns: an absent gradient's placeholder
    of the wrong shape would pass there)."""
    from cvt_kernels.ops._register import REGISTERED

    samples = _opcheck_samples()
    seen = set()
    for name, entry in REGISTERED.items():
        if entry.backward_op is None:
            continue
        for args in samples[name]:
            out = getattr(torch.ops.cvt_kernels, name)(*args)
            first = out[0] if isinstance(out, (tuple, list)) else out
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            with _RecordBackwardOps() as record:
                torch.autograd.grad(first.sum(), tensors, allow_unused=True)
            assert record.calls, name
            for func, b_args, b_kwargs in record.calls:
                seen.add(func._schema.name)
                torch.library.opcheck(func, b_args, b_kwargs)
    assert seen == {f"cvt_kernels::{n}_backward" for n, e in REGISTERED.items()
                    if e.backward_op is not None}


def test_registered_ops_keep_their_parts():
    """Each differentiable op of the registry has its backward op, and an eager twin that
    gives the custom op's gradients and marks the same outputs differentiable (the two
    paths of ``_checks.eager_call``)."""
    from cvt_kernels.ops._register import REGISTERED

    samples = _opcheck_samples()
    with_backward = {n for n, e in REGISTERED.items() if e.backward_op is not None}
    assert with_backward == {"attention", "conv_projection", "layer_norm", "mlp", "linear"}
    for name in sorted(with_backward):
        entry = REGISTERED[name]
        assert entry.backward_op._qualname == f"cvt_kernels::{name}_backward"
        for args in samples[name]:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            needs_grad = []

            def run(call):
                out = call(*args)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                needs_grad.append([o.requires_grad for o in outs])
                weight = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(0))
                return torch.autograd.grad((outs[0] * weight).sum(), tensors,
                                           allow_unused=True)

            for got, want in zip(run(entry.twin.apply), run(entry.op)):
                assert (got is None) == (want is None), name
                if got is not None:
                    torch.testing.assert_close(got, want)
            assert needs_grad[0] == needs_grad[1], (name, needs_grad)


NARROW = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 1]}


# Block scope on the torch backend only (the reference backend: the block test below).
@pytest.mark.parametrize("scope, backend", [("attention", b) for b in CPU_BACKENDS]
                         + [("block", "torch")])
def test_fullgraph_whole_accelerated_model(scope, backend):
    """A whole accelerated CvT-13 (narrow) compiles with no graph break, trains (forward,
    backward, running statistics) and evaluates like the uncompiled model."""
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=5, img_size=32, spec_overrides=NARROW)
    randomize_bn(eager)
    fused = cvt_kernels.accelerate(copy.deepcopy(eager), scope=scope)[0]
    compiled_src = copy.deepcopy(fused)
    x = torch.randn(2, 3, 32, 32)
    with cvt_kernels.use_backend(backend):
        compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
        for train in (True, False):
            fused.train(train), compiled_src.train(train)
            torch.manual_seed(1)  # the same drop-path masks
            ref = fused(x)
            torch.manual_seed(1)
            out = compiled(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            if train:
                ref.square().mean().backward()
                out.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(fused.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def _block(train: bool):
    from cvt_kernels.block import FusedBlock
    from cvt_kernels.models.cvt import Block, QuickGELU

    torch.manual_seed(0)
    ref = Block(16, 16, 2, qkv_bias=True, drop_path=0.1, with_cls_token=True, stride_kv=2,
                act_layer=QuickGELU)
    randomize_bn(ref)
    ref.train(train)
    return FusedBlock.from_reference(copy.deepcopy(ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_fullgraph_fused_block(backend, training):
    """A FusedBlock (block scope: LayerNorms, attention, MLP, residuals on the ops) compiles
    with no graph break; forward, input gradient and parameter gradients match eager."""
    fused = _block(training)
    compiled_src = copy.deepcopy(fused)
    x = torch.randn(2, 1 + 4 * 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with cvt_kernels.use_backend(backend):
        compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
        torch.manual_seed(1)  # the same drop-path masks
        ref = fused(x, 4, 5)
        torch.manual_seed(1)
        out = compiled(x2, 4, 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if training:
        ref.square().mean().backward()
        out.square().mean().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-6)
        for (name, p), q in zip(fused.named_parameters(), compiled_src.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_reduce_overhead_mode_runs_on_cpu():
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU; on CPU inductor
    alone) of a block-scope FusedBlock, whose calls reach every op of an accelerated model
    (projections, attention, LayerNorm, MLP), with no graph break: an eval and a training
    forward run and give the eager module's numbers (drop path off: inductor draws other
    random numbers than eager). One block and no backward (the aot_eager tests above check
    gradients): inductor's C++ compile of a whole CvT took minutes on a CI machine."""
    fused = _block(True)
    fused.drop_path = torch.nn.Identity()
    compiled_src = copy.deepcopy(fused)
    compiled = torch.compile(compiled_src, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 1 + 4 * 5, 16)
    fused.eval(), compiled_src.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, 4, 5), fused(x, 4, 5), rtol=1e-4, atol=1e-5)
    fused.train(), compiled_src.train()
    torch.testing.assert_close(compiled(x, 4, 5), fused(x, 4, 5), rtol=1e-4, atol=1e-5)
    for (name, b), c in zip(fused.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)  # statistics moved


def test_a_mutated_argument_with_a_default_is_refused_at_registration():
    """torch 2.11 drops a trailing argument equal to its default before a mutating op's
    version bump (IndexError under torch.compile); the factory refuses such a schema on
    every torch, before anything is registered."""
    from cvt_kernels.ops._register import REGISTERED, forward_op

    def body(x: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x.clone()

    with pytest.raises(TypeError, match=r"\['buf'\].*must not have defaults"):
        forward_op("refused_for_its_default", body, body, mutates_args=("buf",))
    assert "refused_for_its_default" not in REGISTERED
