"""No stale eval-mode constants (issue 23, item 6): whatever way the weights or the
BatchNorm statistics change after a first eval call, the accelerated model's next eval call
computes what the plain model computes with the same tensors.

Hostile ways, each a known source of stale caches keyed on tensor identity and version
counters: an EMA update through ``.data`` (no version bump), ``vector_to_parameters``
(``.data`` reassigned), ``load_state_dict``, an optimizer step, a ``no_grad`` ``copy_``, the
running statistics changed through ``.data``, buffers reassigned twice (a freed tensor's
``id`` comes back at version 0), and a training forward moving the statistics. Also one
tensor at a time, so a cache keyed on some of the tensors it reads is caught.

float64: to ~1e-12; float32 (the torch backend's oneDNN path): the 2x rule against a
float64 truth. The Triton backend runs under the interpreter at a tiny shape."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import cvt_kernels
from cvt_kernels import models
from cvt_kernels.models.cvt import Block, LayerNorm, QuickGELU

from conftest import assert_close_by_rule, randomize_bn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "reference",
            pytest.param("triton", marks=pytest.mark.skipif(
                not INTERPRET, reason="the triton backend on CPU needs TRITON_INTERPRET=1"))]
SCOPES = ["attention", "block"]
TINY = {"DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2]}


class _Blocks(nn.Module):
    """One CvT block on a 3x3 map with a class token: the Triton interpreter's tiny model
    (the interpreter takes ~0.5 s a launch)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(8, 8, 2, mlp_ratio=2.0, qkv_bias=True,
                                           act_layer=QuickGELU, norm_layer=LayerNorm,
                                           stride_kv=2, with_cls_token=True)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x, 3, 3)
        return x


def _pair(backend, scope, dtype):
    """``(plain, accelerated, input)``: the same weights, eval mode."""
    if backend == "triton":
        plain, x = _Blocks().to(dtype), torch.randn(2, 10, 8, dtype=dtype)
    else:
        plain = models.cvt_13(num_classes=10, img_size=32, spec_overrides=TINY).to(dtype)
        x = torch.randn(2, 3, 32, 32, dtype=dtype)
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    cvt_kernels.accelerate(fused, scope=scope)
    return plain.eval(), fused.eval(), x


def _noise(t, g, scale=0.1):
    return scale * torch.randn(t.shape, generator=g, dtype=t.dtype)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# Each takes (model, generator, input); both models get the same changes (same seed).
def _ema_through_data(m, g, x):
    for p in m.parameters():
        q = p.detach() + _noise(p, g)
        p.data.mul_(0.9).add_(0.1 * q)


def _vector_to_parameters(m, g, x):
    v = parameters_to_vector(m.parameters()).detach()
    vector_to_parameters(v + _noise(v, g), m.parameters())


def _load_state_dict(m, g, x):
    state = {k: (v + _noise(v, g)) if v.is_floating_point() else v.clone()
             for k, v in m.state_dict().items()}
    for name, v in state.items():
        if name.endswith("running_var"):
            v.abs_().add_(0.1)
    m.load_state_dict(state)


def _optimizer_step(m, g, x):
    params = list(m.parameters())
    for p in params:
        p.grad = _noise(p, g, 1.0)
    torch.optim.AdamW(params, lr=0.05).step()


def _no_grad_copy(m, g, x):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p * 0.9 + _noise(p, g))


def _bn_stats_through_data(m, g, x):
    for bn in _bns(m):
        bn.running_mean.data.add_(_noise(bn.running_mean, g, 0.5))
        bn.running_var.data.mul_(1.0 + _noise(bn.running_var, g, 1.0).abs())


def _fresh_bn_stats(m, g, x):
    for bn in _bns(m):
        bn.running_mean = _noise(bn.running_mean, g, 0.5)
        bn.running_var = 0.5 + _noise(bn.running_var, g, 1.0).abs()


def _bn_stats_reassigned(m, g, x):
    # New tensors for the buffers a first eval call saw: the first assignment frees the
    # seen tensor, and the next new one usually takes its id, at the same version (0).
    # Reassigned until it does (the values stay the same whatever the number of tries).
    for bn in _bns(m):
        for name, value in (("running_mean", _noise(bn.running_mean, g, 0.5)),
                            ("running_var", 0.5 + _noise(bn.running_var, g, 1.0).abs())):
            seen = id(getattr(bn, name))
            for _ in range(20):
                setattr(bn, name, value.clone())
                if id(getattr(bn, name)) == seen:
                    break


def _training_forward(m, g, x):
    m.train()
    with torch.no_grad():
        m(x + _noise(x, g, 1.0))
    m.eval()


# name -> (change before the first eval call or None, change after it)
HOSTILE = {
    "ema_data": (None, _ema_through_data),
    "vector_to_parameters": (None, _vector_to_parameters),
    "load_state_dict": (None, _load_state_dict),
    "optimizer_step": (None, _optimizer_step),
    "no_grad_copy": (None, _no_grad_copy),
    "bn_stats_data": (None, _bn_stats_through_data),
    "bn_stats_reassigned": (_fresh_bn_stats, _bn_stats_reassigned),
    "training_forward": (None, _training_forward),
}


def _apply(change, models_, x, seed):
    for m in models_:
        change(m, torch.Generator().manual_seed(seed), x)


def _check_after(plain, fused, x, backend, prepare, change, dtype):
    if prepare is not None:
        _apply(prepare, (plain, fused), x, seed=1)
    with cvt_kernels.use_backend(backend):
        with torch.no_grad():
            first = fused(x)  # would fill an eval cache
        _expect(first, plain, x, dtype)
        _apply(change, (plain, fused), x, seed=2)
        with torch.no_grad():
            again = fused(x)
    _expect(again, plain, x, dtype)


def _expect(ours, plain, x, dtype):
    with torch.no_grad():
        ref = plain(x)
        if dtype == torch.float64:
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        else:
            truth = copy.deepcopy(plain).double()(x.double())
            assert_close_by_rule(ours, ref, truth, "output", atol=1e-6)


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_after_weights_change_float64(backend, scope, case):
    plain, fused, x = _pair(backend, scope, torch.float64)
    _check_after(plain, fused, x, backend, *HOSTILE[case], torch.float64)


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"training_forward"}))
@pytest.mark.parametrize("scope", SCOPES)
def test_eval_after_weights_change_float32(scope, case):
    """float32 on the torch backend: its oneDNN MLP (QuickGELU's 1.702 folded into copies of
    the weights) and its eval BatchNorm."""
    plain, fused, x = _pair("torch", scope, torch.float32)
    _check_after(plain, fused, x, "torch", *HOSTILE[case], torch.float32)


# One tensor of one block at a time, through .data (a cache keyed on a subset of what it
# reads would miss it). The v projection: a per-channel shift of k changes no output.
ONE_TENSOR = ["attn.conv_proj_v.conv.weight", "attn.conv_proj_v.bn.weight",
              "attn.conv_proj_v.bn.bias", "attn.conv_proj_v.bn.running_mean",
              "attn.conv_proj_v.bn.running_var", "attn.proj_v.weight", "attn.proj_v.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
              "norm2.weight"]


def _one_tensor_change(suffix):
    def change(m, g, x):
        tensors = dict(m.named_parameters(), **dict(m.named_buffers()))
        t = next(t for n, t in tensors.items() if n.endswith(f"blocks.0.{suffix}"))
        if suffix.endswith("running_var"):
            t.data.mul_(2.0)
        else:
            t.data.add_(_noise(t, g, 0.5))
    return change


@pytest.mark.parametrize("suffix", ONE_TENSOR)
@pytest.mark.parametrize("backend,scope,dtype", [
    ("torch", "block", torch.float32), ("torch", "block", torch.float64),
    ("torch", "attention", torch.float64), ("reference", "block", torch.float64)])
def test_eval_after_one_tensor_changes(backend, scope, dtype, suffix):
    plain, fused, x = _pair(backend, scope, dtype)
    _check_after(plain, fused, x, backend, None, _one_tensor_change(suffix), dtype)


@pytest.mark.skipif(not INTERPRET, reason="the triton backend on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["bn_stats_data", "bn_stats_reassigned", "ema_data"])
def test_one_pass_eval_after_weights_change(monkeypatch, case):
    """The one-pass kernel (q projection + attention) reads the same eval statistics."""
    from cvt_kernels import modules
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "1")
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return run_one_pass(*args, **kwargs)

    run_one_pass = modules.run_one_pass
    monkeypatch.setattr(modules, "run_one_pass", spy)
    plain, fused, x = _pair("triton", "attention", torch.float64)
    _check_after(plain, fused, x, "triton", *HOSTILE[case], torch.float64)
    assert len(calls) == 2
