"""Block scope (issue 18): the ``mlp`` and ``layer_norm`` ops, ``FusedBlock`` and
``accelerate(model, scope="block")`` compute what the reference CvT computes (float64:
outputs, every gradient, BatchNorm statistics; float32 by the 2x rule), trace under
``torch.compile(fullgraph=True)``, keep the state_dict, and reject bad input by name."""

import copy

import pytest
import torch
import torch.nn.functional as F

import cvt_kernels
from cvt_kernels import FusedBlock, FusedConvAttention, models
from cvt_kernels.models import Block
from cvt_kernels.ops import add_layer_norm, layer_norm, mlp
from cvt_kernels.ops.layer_norm import layer_norm_reference
from cvt_kernels.ops.mlp import mlp_reference

from conftest import CPU_BACKENDS, assert_close_by_rule, randomize_bn
from test_pytorch_bugs import contiguous_bn_grads

TINY = {"DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2]}


def mlp_args(c_in=6, hidden=10, c_out=6, rows=(2, 5), dtype=torch.float64, bias=True,
             residual=True, grad=True):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    return (rand(*rows, c_in), rand(hidden, c_in), rand(hidden) if bias else None,
            rand(c_out, hidden), rand(c_out) if bias else None,
            rand(*rows, c_out) if residual else None)


# ---------------------------------------------------------------- the ops, one by one
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_mlp_gradcheck(backend, act, bias, residual):
    x, w1, b1, w2, b2, r = mlp_args(bias=bias, residual=residual)
    tensors = [t for t in (x, w1, b1, w2, b2, r) if t is not None]

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, w1, b1, w2, b2, r)]
        return mlp(*args[:5], act, args[5])

    with cvt_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(f, tensors)
        # and the value is the reference's
        torch.testing.assert_close(f(*tensors), mlp_reference(x, w1, b1, w2, b2, act, r),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("residual,affine", [(True, True), (False, False), (False, True)])
def test_layer_norm_gradcheck(backend, residual, affine):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, r = rand(3, 4, 7), rand(3, 4, 7)
    w, b = (rand(7), rand(7)) if affine else (None, None)
    with cvt_kernels.use_backend(backend):
        if residual:
            # Both outputs carry gradient: the block uses the sum as its skip connection.
            assert torch.autograd.gradcheck(
                lambda *t: add_layer_norm(t[0], t[1], t[2], t[3], 1e-5), (x, r, w, b))
            y, s = add_layer_norm(x, r, w, b)
            ref_y, ref_s = layer_norm_reference(x, w, b, 1e-5, r)
            torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
        else:
            ts = (x,) + tuple(t for t in (w, b) if t is not None)
            assert torch.autograd.gradcheck(
                lambda *t: layer_norm(t[0], *(t[1:] if affine else (None, None))), ts)
            y, ref_y = layer_norm(x, w, b), layer_norm_reference(x, w, b)[0]
        torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("grad", [False, True])
def test_mlp_float32_rounding_by_the_2x_rule(backend, act, grad):
    """The silu rewrite of QuickGELU (alpha/beta in the GEMMs, or oneDNN's fused swish
    without autograd) is no further from a float64 truth than twice eager's own error."""
    x, w1, b1, w2, b2, r = mlp_args(c_in=48, hidden=192, c_out=48, rows=(2, 50),
                                    dtype=torch.float32, grad=False)
    x = x * 3  # activations well into both tails of the sigmoid
    act_module = models.QuickGELU() if act == "quick_gelu" else torch.nn.GELU()

    def eager(*t):
        return t[5] + F.linear(act_module(F.linear(t[0], t[1], t[2])), t[3], t[4])

    args = [t.detach().clone().requires_grad_(grad) for t in (x, w1, b1, w2, b2, r)]
    with torch.set_grad_enabled(grad), cvt_kernels.use_backend(backend):
        ours = mlp(*args[:5], act, args[5])
    truth = eager(*(t.double() for t in (x, w1, b1, w2, b2, r)))
    assert_close_by_rule(ours, eager(x, w1, b1, w2, b2, r), truth, "out")


def test_mlp_eval_constants_follow_the_weights():
    """Without autograd the float32 CPU path caches 1.702-scaled weight copies: an in-place
    update (an optimizer step, load_state_dict) must be seen by the next call."""
    x, w1, b1, w2, b2, r = mlp_args(dtype=torch.float32, grad=False)
    with torch.no_grad():
        for _ in range(2):
            out = mlp(x, w1, b1, w2, b2, "quick_gelu", r)
            ref = mlp_reference(x, w1, b1, w2, b2, "quick_gelu", r)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            w1.mul_(-2), b1.add_(1), w2.mul_(0.5)


def test_layer_norm_half_keeps_dtype_and_float32_math():
    """bfloat16 activations with a float32 affine: bfloat16 out, the reference's float32
    LayerNorm's value within one bf16 rounding of it."""
    x = torch.randn(4, 9, 32).to(torch.bfloat16) * 4 + 100  # a large mean: float32 stats
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    ref_module = models.LayerNorm(32)
    with torch.no_grad():
        ref_module.weight.copy_(w), ref_module.bias.copy_(b)
        ref = ref_module(x)
    for backend in CPU_BACKENDS:
        with cvt_kernels.use_backend(backend):
            ours = layer_norm(x, w, b)
        assert ours.dtype == torch.bfloat16
        truth = F.layer_norm(x.double(), (32,), w.double(), b.double())
        assert_close_by_rule(ours, ref, truth, backend)


# ---------------------------------------------------------------- whole models
def build_pair(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=10, img_size=48, spec_overrides=TINY, **kwargs).to(dtype)
    randomize_bn(eager)
    with torch.no_grad():  # non-trivial LayerNorm affines, so their gradients are exercised
        for m in eager.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    fused = copy.deepcopy(eager)
    contiguous_bn_grads(eager)  # eager's batch_norm bug (test_pytorch_bugs.py)
    _, n = cvt_kernels.accelerate(fused, scope="block")
    assert n == sum(TINY["DEPTH"])
    assert sum(isinstance(m, FusedBlock) for m in fused.modules()) == n
    assert not any(type(m) is Block for m in fused.modules())
    return eager, fused


def train_two_steps_alike(eager, fused, opts, x, backend, logits=lambda out: out):
    """Two optimizer steps of each model on ``x + step`` (the same random masks): outputs
    and every gradient agree at each step, the buffers (running statistics) after."""
    for step in range(2):
        outs, grads = [], []
        for model, opt in zip((eager, fused), opts):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout and drop-path masks
            with cvt_kernels.use_backend(backend):
                out = logits(model(x + step))
                out.square().mean().backward()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
        scale = max(g.abs().max().item() for g in grads[0])
        for (name, _), g_ref, g in zip(eager.named_parameters(), *grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9 * scale, msg=name)
    for (name, b), c in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_scope_training_matches_eager(backend):
    """Two AdamW steps: outputs, every gradient, BatchNorm running statistics (the last
    stage-3 block has drop path 0.05 in training: the add + LayerNorm op path)."""
    eager, fused = build_pair()
    assert fused.stage2.blocks[1].drop_path.drop_prob > 0
    eager.train(), fused.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, fused)]
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    train_two_steps_alike(eager, fused, opts, x, backend)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act,layer_norm_kind", [("quick_gelu", "float32"), ("gelu", "plain")])
def test_block_scope_eval_matches_eager(backend, act, layer_norm_kind):
    eager, fused = build_pair(act=act, layer_norm=layer_norm_kind)
    eager.eval(), fused.eval()
    x = torch.randn(3, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        ref = eager(x)
        with cvt_kernels.use_backend(backend):
            ours = fused(x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def _autocast_step(model, x, logits, amp: bool):
    """One training step's output and parameter gradients (float64 copies), under CPU
    bfloat16 autocast when ``amp``; the same drop-path masks each call."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = logits(model(x))
    out.double().square().mean().backward()
    return out.detach(), {n: p.grad.double() for n, p in model.named_parameters()
                          if p.grad is not None}


def assert_autocast_training_like_eager(eager, fused, x, logits=lambda out: out):
    """Block scope under bfloat16 autocast: the output dtype eager gives, and the output and
    every parameter gradient within 2x eager's error against a float64 run (slack: 1e-6 of
    the largest gradient, for the ones that are zero in exact arithmetic, such as the key
    bias's: softmax ignores a shift shared by every key)."""
    truth_out, truth = _autocast_step(copy.deepcopy(eager).double(), x.double(), logits, False)
    eager_out, eager_grads = _autocast_step(eager, x, logits, True)
    ours_out, ours_grads = _autocast_step(fused, x, logits, True)
    assert ours_out.dtype == eager_out.dtype == torch.bfloat16
    assert_close_by_rule(ours_out, eager_out, truth_out, "output")
    assert ours_grads.keys() == eager_grads.keys() == truth.keys()
    slack = 1e-6 * max(g.abs().max().item() for g in truth.values())
    for name, g in truth.items():
        assert_close_by_rule(ours_grads[name], eager_grads[name], g, name, atol=slack)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_scope_under_autocast_trains_like_eager(backend):
    eager, fused = build_pair(torch.float32)
    with cvt_kernels.use_backend(backend):
        assert_autocast_training_like_eager(eager, fused, torch.randn(2, 3, 48, 48))


def test_block_scope_float32_eval_by_the_2x_rule():
    """float32, the default backend (on CPU: oneDNN fused epilogues without autograd)."""
    eager, fused = build_pair(torch.float32)
    truth = copy.deepcopy(eager).double().eval()
    eager.eval(), fused.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_close_by_rule(fused(x), eager(x), truth(x.double()), "logits", atol=1e-6)


def test_state_dict_round_trip():
    """Same keys and tensors; a reference model loading the fused one's state dict (and
    back) computes the same; accelerating an attention-scope model to block scope too."""
    eager, _ = build_pair()
    model = copy.deepcopy(eager)
    before = dict(model.state_dict(keep_vars=True))
    cvt_kernels.accelerate(model)  # attention first: block scope must still take it
    _, n = cvt_kernels.accelerate(model, scope="block")
    assert n == sum(TINY["DEPTH"])
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert all(isinstance(m.attn, FusedConvAttention) for m in model.modules()
               if isinstance(m, FusedBlock))
    back = models.cvt_13(num_classes=10, img_size=48, spec_overrides=TINY).double()
    back.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(back.state_dict(), strict=True)
    back.eval(), model.eval()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), back(x), rtol=1e-10, atol=1e-10)
    with pytest.warns(UserWarning, match="nothing"):
        assert cvt_kernels.accelerate(torch.nn.Linear(2, 2), scope="block")[1] == 0


def test_fullgraph_compile_block_scope():
    """No graph break (fullgraph) in training and eval; same outputs, gradients and
    running statistics as the uncompiled block-scope model."""
    torch._dynamo.reset()
    narrow = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2]}
    eager = models.cvt_13(num_classes=5, img_size=32, spec_overrides=narrow)
    randomize_bn(eager)
    fused = cvt_kernels.accelerate(copy.deepcopy(eager), scope="block")[0]
    compiled_src = copy.deepcopy(fused)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    try:
        torch.manual_seed(1)
        ref = fused(x)
        torch.manual_seed(1)
        out = compiled(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        ref.square().mean().backward()
        out.square().mean().backward()
        # Eval without grad: the path that takes oneDNN in eager stays stock ops traced.
        fused.eval(), compiled_src.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fused(x), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    for (name, p), q in zip(fused.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(fused.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fullgraph_compile_custom_ops():
    """The kernel-backend path: the mlp and layer_norm custom ops and their fake kernels."""
    torch._dynamo.reset()
    x, w1, b1, w2, b2, r = mlp_args(dtype=torch.float32)
    lw, lb = torch.rand(6) + 0.5, torch.randn(6)

    def f(x, w1, b1, w2, b2, r):
        y, s = add_layer_norm(x, r, lw, lb)
        return mlp(y, w1, b1, w2, b2, "quick_gelu", s)

    try:
        with cvt_kernels.use_backend("reference"):
            out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w1, b1, w2, b2, r)
            out.sum().backward()
            grads = [t.grad.clone() for t in (x, w1, r)]
            for t in (x, w1, r):
                t.grad = None
            ref = f(x, w1, b1, w2, b2, r)
            ref.sum().backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref)
    for g, t in zip(grads, (x, w1, r)):
        torch.testing.assert_close(g, t.grad)


# ---------------------------------------------------------------- errors
def test_bad_input_names_the_argument():
    x, w1, b1, w2, b2, r = mlp_args(grad=False)
    with pytest.raises(ValueError, match="act"):
        mlp(x, w1, b1, w2, b2, "relu")
    with pytest.raises(ValueError, match="fc1_weight"):
        mlp(x, w1[:, :3], b1, w2, b2)
    with pytest.raises(ValueError, match="fc2_weight"):
        mlp(x, w1, b1, w2[:, :3], b2)
    with pytest.raises(ValueError, match="fc2_bias"):
        mlp(x, w1, b1, w2, b2[:2])
    with pytest.raises(ValueError, match="residual"):
        mlp(x, w1, b1, w2, b2, residual=r[:, :2])
    with pytest.raises(TypeError, match="fc1_weight"):
        mlp(x, w1.float(), b1, w2, b2)
    with pytest.raises(TypeError, match="x"):
        mlp(x.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(5, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, None, None, eps=-1.0)
    with pytest.raises(TypeError, match="bias"):
        layer_norm(x, None, torch.zeros(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, x[:, :2], None, None)
    with pytest.raises(ValueError, match="scope"):
        cvt_kernels.accelerate(models.cvt_13(num_classes=2, spec_overrides=TINY), scope="mlp")
    with pytest.raises(TypeError, match="block"):
        FusedBlock.from_reference(torch.nn.Linear(2, 2))
    _, fused = build_pair()
    with pytest.raises(ValueError, match="^x: expected a 3-D"):
        fused.stage0.blocks[0](torch.randn(16, 16, dtype=torch.float64), 4, 4)
    with pytest.raises(ValueError, match="weight"):  # channels that are not norm1's
        fused.stage0.blocks[0](torch.randn(1, 16, 8, dtype=torch.float64), 4, 4)


# ---------------------------------------------------------------- Hugging Face CvT
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
def test_hf_block_scope_matches_eager(backend, dropout):
    """transformers' CvT with scope="block" (exact GELU, nn.LayerNorm, drop path applied
    to the MLP's sum): same keys and tensors; training (two steps: logits, every gradient,
    running statistics) and eval (every hidden state) as transformers computes them. With
    dropout on, training runs the layer's own dropout modules; without, the fused MLP."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import CvtForImageClassification
    from transformers.models.cvt.modeling_cvt import CvtLayer

    from cvt_kernels.hf import FusedHFCvtLayer
    from test_hf import DEPTH, IMG, tiny_config

    config = tiny_config() if dropout else tiny_config(drop_rate=[0.0, 0.0, 0.0])
    eager = CvtForImageClassification(config).double()
    randomize_bn(eager)
    fused = copy.deepcopy(eager)
    contiguous_bn_grads(eager)
    before = dict(fused.state_dict(keep_vars=True))
    _, n = cvt_kernels.accelerate(fused, scope="block")
    assert n == sum(DEPTH) and not any(type(m) is CvtLayer for m in fused.modules())
    assert sum(isinstance(m, FusedHFCvtLayer) for m in fused.modules()) == n
    after = fused.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)

    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    eager.train(), fused.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, fused)]
    train_two_steps_alike(eager, fused, opts, x, backend, lambda out: out.logits)

    eager.eval(), fused.eval()
    with torch.no_grad():
        ref = eager(x, output_hidden_states=True)
        with cvt_kernels.use_backend(backend):
            ours = fused(x, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hf_block_scope_under_autocast_trains_like_eager(backend):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import CvtForImageClassification

    from test_hf import IMG, tiny_config

    torch.manual_seed(0)
    eager = CvtForImageClassification(tiny_config(drop_rate=[0.0, 0.0, 0.0]))
    randomize_bn(eager)
    fused = copy.deepcopy(eager)
    cvt_kernels.accelerate(fused, scope="block")
    with cvt_kernels.use_backend(backend):
        assert_autocast_training_like_eager(eager, fused, torch.randn(2, 3, IMG, IMG),
                                            lambda out: out.logits)
