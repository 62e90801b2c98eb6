"""A block's training call as one autograd node (cvt_kernels.block_train): a call plan
whose recorded training call ran every op on one kernel backend runs later calls as
``BlockTrainFunction``, with the numbers of the ops (outputs, every gradient, BatchNorm
running statistics, drop path's draws) and of the reference block."""

import copy
import os

import pytest
import torch

import cvt_kernels
from cvt_kernels import _plan, backends, block_train
from cvt_kernels.block import FusedBlock
from cvt_kernels.models import Block
from cvt_kernels.models.cvt import LayerNorm, QuickGELU

from conftest import randomize_bn


def make_blocks(dtype, cls=True, drop_path=0.2, qkv_bias=True):
    torch.manual_seed(0)
    ref = Block(16, 16, 2, qkv_bias=qkv_bias, act_layer=QuickGELU, norm_layer=LayerNorm,
                stride_kv=2, with_cls_token=cls, drop_path=drop_path).to(dtype)
    randomize_bn(ref)
    ref.train()
    return ref, FusedBlock.from_reference(copy.deepcopy(ref)).train()


def steps(module, backend, dtype, cls, calls=3, forward=None):
    """``calls`` training steps with fixed inputs, cotangents and drop-path seeds: each
    step's output and input gradient, then the parameters' summed gradients and the
    buffers."""
    out = []
    for i in range(calls):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(2, 16 + cls, 16, dtype=dtype, generator=gen).requires_grad_()
        cotangent = torch.randn(2, 16 + cls, 16, dtype=dtype, generator=gen)
        torch.manual_seed(100 + i)  # drop path's draws
        with cvt_kernels.use_backend(backend) if backend else _null():
            y = (forward or module)(x, 4, 4)
        y.backward(cotangent)
        out.append((y.detach(), x.grad))
    grads = {n: p.grad for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return out, grads, buffers


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_same_steps(a, b, **tol):
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = a, b
    for (ya, gxa), (yb, gxb) in zip(out_a, out_b):
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(gxa, gxb, **tol)
    # (a GPU run's gradients and buffers beside a CPU reference)
    grads_a, bufs_a = ({k: None if t is None else t.cpu() for k, t in d.items()}
                       for d in (grads_a, bufs_a))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) in (22, 25)  # qkv biases
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            torch.testing.assert_close(grads_a[name], grads_b[name], **tol, msg=name)
    assert bufs_a.keys() == bufs_b.keys()
    for name in bufs_a:
        torch.testing.assert_close(bufs_a[name], bufs_b[name], **tol, msg=name)


def direct_calls(fn):
    before = _plan.Stats.direct
    result = fn()
    return result, _plan.Stats.direct - before


TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls,drop_path,qkv_bias", [(True, 0.2, True), (False, 0.0, True),
                                                    (True, 0.0, False)],
                         ids=["cls-droppath", "nocls", "no-qkv-bias"])
def test_direct_train_equals_the_ops_and_the_reference_block(monkeypatch, cls, drop_path,
                                                             qkv_bias):
    """float64, reference backend (the kernel backend that runs anywhere): three steps
    through the direct path equal three through the ops (plans without direct paths) and
    three of the reference block, every gradient and running statistic included."""
    ref, fused = make_blocks(torch.float64, cls, drop_path, qkv_bias)
    ops_block = copy.deepcopy(fused)
    (direct, taken) = direct_calls(lambda: steps(fused, "reference", torch.float64, cls))
    assert taken == 2  # the first call records the plan
    monkeypatch.setattr(_plan, "DIRECT_PATHS", False)
    (through_ops, taken) = direct_calls(lambda: steps(ops_block, "reference", torch.float64,
                                                      cls))
    assert taken == 0
    assert_same_steps(direct, through_ops, **TIGHT)
    assert_same_steps(direct, steps(ref, None, torch.float64, cls), **TIGHT)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                    and not torch.cuda.is_available(),
                    reason="the triton backend runs on a GPU or under TRITON_INTERPRET=1")
def test_direct_train_on_the_triton_kernels():
    """float32 (what the interpreter's dots compute faithfully): two steps on the triton
    backend, the second through the direct path, agree with the reference block's (the
    ops path is compared with the direct one in float64 above; the interpreter runs a
    launch in ~0.3 s, so the ops path is not run here again)."""
    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    ref, fused = make_blocks(torch.float32, True, 0.2)
    fused = fused.to(device)
    direct, taken = direct_calls(lambda: steps(
        fused, "triton", torch.float32, True, calls=2,
        forward=lambda x, h, w: fused(x.to(device), h, w).cpu()))
    assert taken == 1
    assert_same_steps(direct, steps(ref, None, torch.float32, True, calls=2),
                      rtol=1e-4, atol=1e-5)


def test_parameters_without_gradients_get_none(monkeypatch):
    ref, fused = make_blocks(torch.float64)
    for module in (ref, fused):
        module.norm1.weight.requires_grad_(False)
        module.attn.proj_k.bias.requires_grad_(False)
    direct, taken = direct_calls(lambda: steps(fused, "reference", torch.float64, True))
    assert taken == 2
    assert direct[1]["norm1.weight"] is None and direct[1]["attn.proj_k.bias"] is None
    assert_same_steps(direct, steps(ref, None, torch.float64, True), **TIGHT)


@pytest.mark.parametrize("case", ["torch", "attention_dropout", "autocast", "frozen",
                                  "eval_bn"])
def test_direct_train_only_where_the_ops_would_all_run_on_one_kernel_backend(case):
    """Not on the composite backend, with attention dropout, under autocast, with nothing
    requiring a gradient, nor with BatchNorm normalizing by its running statistics."""
    _, fused = make_blocks(torch.float32 if case == "autocast" else torch.float64)
    if case == "attention_dropout":
        fused.attn.attn_drop.p = 0.1
    if case == "eval_bn":
        for m in fused.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    if case == "frozen":
        fused.requires_grad_(False)
    backend = "torch" if case in ("torch", "attention_dropout") else "reference"
    dtype = torch.float32 if case == "autocast" else torch.float64
    x = torch.randn(2, 17, 16, dtype=dtype, requires_grad=case != "frozen")
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else _null())
    before = _plan.Stats.direct
    with cvt_kernels.use_backend(backend), amp:
        for _ in range(3):
            fused(x, 4, 4)
    assert _plan.Stats.direct == before


def planned_call():
    """A block, its input, and the output of its second (planned, direct) training call."""
    _, fused = make_blocks(torch.float64)
    x = torch.randn(2, 17, 16, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend("reference"):
        fused(x, 4, 4)
        y, taken = direct_calls(lambda: fused(x, 4, 4))
    assert taken == 1
    return fused, x, y


def test_second_derivative_raises_saying_what_to_do():
    _, x, y = planned_call()
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_an_input_changed_in_place_after_the_forward_is_caught():
    """The node saves what its backward reads as autograd does: an in-place write to one
    (an optimizer step between forward and backward) raises instead of a wrong gradient."""
    fused, _, y = planned_call()
    with torch.no_grad():
        fused.mlp.fc2.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_the_node_is_one_per_block():
    _, _, y = planned_call()
    assert type(y.grad_fn).__name__ == "BlockTrainFunctionBackward"
    assert {type(f[0]).__name__ for f in y.grad_fn.next_functions if f[0] is not None} == {
        "AccumulateGrad"}
    assert block_train.TRAIN_OPS.count("conv_projection") == 3
    assert backends.get_backend("reference").composite is False


def test_a_strided_input_as_a_stage_passes_it():
    """The stage's first block reads the patch embedding's transposed output in place."""
    ref, fused = make_blocks(torch.float64, drop_path=0.0)
    base = torch.randn(2, 16, 17, dtype=torch.float64, requires_grad=True)

    def run(module, backend):
        x = base.transpose(1, 2)  # (2, 17, 16), not contiguous
        with cvt_kernels.use_backend(backend) if backend else _null():
            y = module(x, 4, 4)
        return y.detach(), torch.autograd.grad((y * y).sum(), base)[0]

    run(fused, "reference")
    (y, gx), taken = direct_calls(lambda: run(fused, "reference"))
    assert taken == 1
    run(ref, None)  # the same two BatchNorm updates
    want_y, want_gx = run(ref, None)
    torch.testing.assert_close(y, want_y, **TIGHT)
    torch.testing.assert_close(gx, want_gx, **TIGHT)
