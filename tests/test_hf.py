"""transformers' CvT, accelerated: the same logits, hidden states, gradients and BatchNorm
statistics as transformers' eager model, in training and eval mode, at batch 1 and 2."""

import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed "
                                           "(pip install -e '.[hf]'); the HF tests need it")
from transformers import CvtConfig, CvtForImageClassification, CvtModel  # noqa: E402
from transformers.models.cvt.modeling_cvt import CvtAttention  # noqa: E402

import cvt_kernels  # noqa: E402
from cvt_kernels.hf import FusedHFCvtAttention, accelerate_hf  # noqa: E402

from conftest import CPU_BACKENDS, randomize_bn  # noqa: E402
from test_pytorch_bugs import contiguous_bn_grads  # noqa: E402

# 40x40 -> maps 10x10, 5x5, 3x3 (k/v 2x2): odd sizes, and BatchNorm in training mode still
# has more than one value per channel at batch 1. transformers indexes its drop-path
# schedule by stage, so stage i needs more than i layers (depth 1/1/2 raises IndexError).
IMG = 40
DEPTH = [1, 2, 3]


def tiny_config(**overrides) -> CvtConfig:
    kwargs = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=DEPTH, num_labels=5,
                  drop_rate=[0.0, 0.1, 0.1], drop_path_rate=[0.0, 0.1, 0.2])
    kwargs.update(overrides)
    return CvtConfig(**kwargs)


def build_pair(cls=CvtForImageClassification, dtype=torch.float64):
    eager = cls(tiny_config()).to(dtype)
    randomize_bn(eager)
    fused = copy.deepcopy(eager)
    # Eager PyTorch's BatchNorm gradients are wrong at batch 1 with a class token (see
    # test_pytorch_bugs.py); hooked after the copy, so the accelerated model has no hook.
    contiguous_bn_grads(eager)
    _, n = cvt_kernels.accelerate(fused)
    assert n == sum(DEPTH)
    return eager, fused


def test_import_cvt_kernels_does_not_import_transformers():
    code = "import sys, cvt_kernels; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", [CvtModel, CvtForImageClassification])
@pytest.mark.parametrize("training", [True, False])
def test_accelerate_shares_parameters_keys_and_mode(cls, training):
    model = cls(tiny_config()).train(training)
    before = dict(model.state_dict(keep_vars=True))
    _, n = cvt_kernels.accelerate(model)
    assert n == sum(DEPTH)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same tensors
    fused = [m for m in model.modules() if isinstance(m, FusedHFCvtAttention)]
    assert len(fused) == n and not any(type(m) is CvtAttention for m in model.modules())
    assert all(m.training == training for m in model.modules())
    model.load_state_dict(cls(tiny_config()).state_dict(), strict=True)
    assert cvt_kernels.accelerate(model)[1] == 0  # already fused: left alone
    assert accelerate_hf(cls(tiny_config()))[1] == n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_eval_matches_eager(backend, batch):
    eager, fused = build_pair()
    eager.eval(), fused.eval()
    x = torch.randn(batch, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        ref = eager(x, output_hidden_states=True)
        with cvt_kernels.use_backend(backend):
            ours = fused(x, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-10, atol=1e-10)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_base_model_matches_eager_float32_default_backend():
    eager, fused = build_pair(CvtModel, torch.float32)
    eager.eval(), fused.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref, ours = eager(x), fused(x)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(ours.cls_token_value, ref.cls_token_value, rtol=1e-4, atol=1e-5)


def run_step(model, x, seed):
    torch.manual_seed(seed)  # identical dropout and drop-path masks in both models
    out = model(x, output_hidden_states=True)
    (out.logits.square().mean() + out.hidden_states[-1].square().mean()).backward()
    return out.logits.detach(), [h.detach() for h in out.hidden_states]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_training_matches_eager(backend, batch):
    eager, fused = build_pair()
    eager.train(), fused.train()
    x = torch.randn(batch, 3, IMG, IMG, dtype=torch.float64)
    for step in range(2):  # two steps: the running statistics move
        eager.zero_grad(), fused.zero_grad()
        ref, ref_hidden = run_step(eager, x + step, seed=step)
        with cvt_kernels.use_backend(backend):
            ours, hidden = run_step(fused, x + step, seed=step)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
        assert len(hidden) == len(ref_hidden) == 3
        for a, b in zip(hidden, ref_hidden):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # Gradients that vanish in exact math (a k bias shifts a row's scores alike) are
    # rounding noise in both models: compare against the overall gradient scale.
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in fused.named_parameters()]
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * scale, msg=name)
    assert [n for n, _ in eager.named_buffers()] == [n for n, _ in fused.named_buffers()]
    for (name, b), c in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12, msg=name)
    bn = fused.cvt.encoder.stages[2].layers[1].attention.attention.convolution_projection_value
    assert bn.convolution_projection.normalization.num_batches_tracked.item() == 2


def test_refuses_projections_transformers_cannot_run():
    # transformers builds no conv for "avg" and its own forward fails on such a module.
    model = CvtModel(tiny_config(qkv_projection_method=["dw_bn", "avg", "dw_bn"]))
    with pytest.raises(ValueError, match=r"model\.encoder\.stages\.1\.layers\.0\.attention: "
                                         r"convolution_projection_query: expected a 'dw_bn'"):
        cvt_kernels.accelerate(model)
    assert not any(isinstance(m, FusedHFCvtAttention) for m in model.modules())  # all or none


def test_bad_arguments_raise_naming_them():
    attn = CvtModel(tiny_config()).encoder.stages[0].layers[0].attention
    with pytest.raises(TypeError, match="model: is itself a CvtAttention"):
        cvt_kernels.accelerate(attn)
    with pytest.raises(TypeError, match="hf_attention: expected a transformers CvtAttention"):
        FusedHFCvtAttention(torch.nn.Linear(2, 2))
    fused = FusedHFCvtAttention(attn)
    with pytest.raises(ValueError, match="x: expected 64 tokens"):
        fused(torch.randn(1, 65, 16), 8, 8)
    with pytest.raises(TypeError, match="hidden_state: expected a torch.Tensor"):
        fused([0.0], 8, 8)


def test_sync_bn_reaches_hugging_face_attention():
    """accelerate(hf, sync_bn=True) marks every fused HF attention; without a process group
    the model computes exactly what it computes without sync_bn (as nn.SyncBatchNorm)."""
    eager, fused = build_pair()
    synced = copy.deepcopy(fused)
    cvt_kernels.accelerate(synced, sync_bn=True)
    flags = [m.sync_bn for m in synced.modules() if isinstance(m, FusedHFCvtAttention)]
    assert flags and all(flags)
    fused.train(), synced.train()
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    torch.testing.assert_close(run_step(synced, x, 0), run_step(fused, x, 0), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["attention", "block"])
@pytest.mark.parametrize("cls", [CvtForImageClassification, CvtModel])
def test_no_split_modules_name_every_fused_class(cls, scope):
    """``device_map="auto"`` keeps each class named in ``_no_split_modules`` on one device:
    a fused module (whose ops take all its weights on the input's device) must be one, in
    every pretrained model of the tree, without changing transformers' class for other
    models."""
    from transformers import PreTrainedModel
    from transformers.models.cvt.modeling_cvt import CvtPreTrainedModel

    from cvt_kernels.hf import FusedHFCvtLayer

    class_value = list(CvtPreTrainedModel._no_split_modules)
    model, _ = cvt_kernels.accelerate(cls(tiny_config()), scope=scope)
    fused = {type(m).__name__ for m in model.modules()
             if isinstance(m, (FusedHFCvtAttention, FusedHFCvtLayer))}
    assert fused == ({"FusedHFCvtLayer", "FusedHFCvtAttention"} if scope == "block"
                     else {"FusedHFCvtAttention"})
    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    assert pretrained and all(fused <= set(m._no_split_modules) for m in pretrained)
    assert all("CvtLayer" in m._no_split_modules for m in pretrained)
    assert list(CvtPreTrainedModel._no_split_modules) == class_value
    assert "FusedHFCvtLayer" not in cls(tiny_config())._no_split_modules


def _same_call(a, b) -> bool:
    """Two ProjectionCalls hold the very same tensors and equal settings."""
    return (all(x is y for x, y in zip(a.params, b.params))
            and (a.cfg, a.training, a.momentum, a.eps) == (b.cfg, b.training, b.momentum, b.eps))


@pytest.mark.parametrize("training", [True, False])
def test_a_layers_plan_reads_what_the_general_reads_read(training):
    """The call plan's fast reads of transformers' modules (their dicts) give what the
    attribute reads give; a module the fast reads do not know (a conv subclass, a padding
    changed) falls back to the general reads, whose checks raise for what the ops cannot
    run."""
    model = CvtModel(tiny_config()).train(training)
    cvt_kernels.accelerate(model, scope="block")
    attention = model.encoder.stages[0].layers[0].attention  # (no output dropout)
    assert isinstance(attention, FusedHFCvtAttention)
    for which in ("query", "key", "value"):
        assert _same_call(attention._stock_projection(which), attention._projection(which))
    args = attention.plan_args()
    assert args.proj.weight is attention.output.dense.weight
    assert args.num_heads == attention.attention.num_heads
    conv_proj = attention.attention.convolution_projection_key.convolution_projection
    conv_proj.convolution.padding = "same"
    assert attention._stock_projection("key") is None
    with pytest.raises(ValueError, match="convolution_projection_key"):
        attention.plan_args()

