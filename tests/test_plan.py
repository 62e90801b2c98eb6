"""Call plans (cvt_kernels._plan): a fused block checks its arguments and chooses its ops'
backends once per call signature, and anything that may change a check or a choice makes
a new plan: shapes, dtypes, requires_grad, train/eval, grad mode, autocast, the forced
backend (per thread), the dispatch policy, the dispatcher's remembered choices."""

import copy
import threading

import pytest
import torch

import cvt_kernels
from cvt_kernels import _plan, backends, block, dispatch
from cvt_kernels.block import FusedBlock
from cvt_kernels.models import Block
from cvt_kernels.models.cvt import LayerNorm, QuickGELU
from cvt_kernels.ops import _choice

from conftest import randomize_bn


def make_block(dtype=torch.float64, training=False) -> FusedBlock:
    ref = Block(16, 16, 2, qkv_bias=True, act_layer=QuickGELU, norm_layer=LayerNorm,
                stride_kv=2, with_cls_token=False).to(dtype)
    randomize_bn(ref)
    fused = FusedBlock.from_reference(copy.deepcopy(ref))
    fused.train(training)
    return fused


class Counts:
    """Choices made (not replayed) and LayerNorm checks, counted through the module
    globals the block's forward calls."""

    def __init__(self, monkeypatch):
        self.choices, self.checks = 0, 0
        choose, validate = _choice._choose, block.validate_layer_norm

        def counted_choose(*args, **kwargs):
            self.choices += 1
            return choose(*args, **kwargs)

        def counted_validate(*args, **kwargs):
            self.checks += 1
            return validate(*args, **kwargs)

        monkeypatch.setattr(_choice, "_choose", counted_choose)
        monkeypatch.setattr(block, "validate_layer_norm", counted_validate)

    def reset(self):
        self.choices, self.checks = 0, 0


def x_of(dtype=torch.float64, batch=2):
    return torch.randn(batch, 16, 16, dtype=dtype)


def test_plan_is_reused_and_answers_match(monkeypatch):
    module, x = make_block(), x_of()
    counts = Counts(monkeypatch)
    first = module(x, 4, 4)
    assert counts.choices > 0 and counts.checks > 0
    counts.reset()
    second = module(x, 4, 4)
    assert (counts.choices, counts.checks) == (0, 0)  # a lookup, then the launches
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    general = module.forward_general(x, 4, 4)
    torch.testing.assert_close(second, general, rtol=0, atol=0)


def _changes():
    """(name, change(module, x) -> (module, x, context manager)) for each key part."""
    import contextlib

    nothing = contextlib.nullcontext

    def shape(m, x):
        return m, x_of(batch=3), nothing()

    def dtype(m, x):
        return m.float(), x.float(), nothing()

    def training(m, x):
        return m.train(), x, nothing()

    def grad_mode(m, x):
        return m, x, torch.no_grad()

    def input_grad(m, x):
        return m, x.requires_grad_(), nothing()

    def param_requires_grad(m, x):
        m.mlp.fc1.weight.requires_grad_(False)
        return m, x, nothing()

    def forced_backend(m, x):
        return m, x, cvt_kernels.use_backend("reference")

    def drop_prob(m, x):
        m.drop_path = cvt_kernels.models.cvt.DropPath(0.2).train()
        return m, x, nothing()

    def bn_momentum(m, x):
        m.attn.conv_proj_k.bn.momentum = 0.3
        return m, x, nothing()

    return [shape, dtype, training, grad_mode, input_grad, param_requires_grad,
            forced_backend, drop_prob, bn_momentum]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_each_key_part_makes_a_new_plan(monkeypatch, change):
    module, x = make_block(), x_of()
    counts = Counts(monkeypatch)
    for _ in range(2):
        module(x, 4, 4)
    counts.reset()
    module, x, ctx = change(module, x)
    with ctx:
        module(x, 4, 4)
        assert counts.checks > 0 and counts.choices > 0  # checked and chosen anew
        counts.reset()
        module(x, 4, 4)
        assert (counts.choices, counts.checks) == (0, 0)  # and that plan is kept


def test_autocast_makes_a_new_plan(monkeypatch):
    module, x = make_block(torch.float32), x_of(torch.float32)
    counts = Counts(monkeypatch)
    for _ in range(2):
        module(x, 4, 4)
    counts.reset()
    for amp in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=amp):
            module(x, 4, 4)
            assert counts.checks > 0 and counts.choices > 0
            counts.reset()


def test_dispatch_policy_makes_a_new_plan(monkeypatch):
    module, x = make_block(), x_of()
    counts = Counts(monkeypatch)
    module(x, 4, 4)
    counts.reset()
    monkeypatch.setenv(dispatch.POLICY_ENV, "fixed")
    module(x, 4, 4)
    assert counts.choices > 0


def test_a_data_write_that_changes_a_dtype_is_checked_again():
    module, x = make_block(), x_of()
    module(x, 4, 4)
    module(x, 4, 4)
    module.mlp.fc1.weight.data = module.mlp.fc1.weight.data.float()  # no new Parameter
    with pytest.raises(TypeError, match="fc1_weight: expected dtype torch.float64"):
        module(x, 4, 4)


def test_a_new_signature_raises_the_same_errors():
    module, x = make_block(), x_of()
    module(x, 4, 4)
    module(x, 4, 4)
    bad = torch.randn(2, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError) as planned:
        module(bad, 4, 4)
    with pytest.raises(ValueError) as general:
        module.forward_general(bad, 4, 4)
    assert str(planned.value) == str(general.value)


def _spy_reference(monkeypatch):
    """Thread ids of the calls the reference backend's layer_norm kernel served."""
    seen = []
    ref = backends.get_backend("reference")
    forward = type(ref).layer_norm_forward

    def spy(self, *args, **kwargs):
        seen.append(threading.get_ident())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(ref), "layer_norm_forward", spy)
    return seen


def test_forced_backend_in_one_thread_does_not_reach_another_threads_plan(monkeypatch):
    module, x = make_block(), x_of()
    seen = _spy_reference(monkeypatch)
    with cvt_kernels.use_backend("reference"):
        for _ in range(2):  # planned, then replayed: the reference kernels serve
            module(x, 4, 4)
    assert len(seen) == 4 and set(seen) == {threading.get_ident()}
    other = []

    def run():
        for _ in range(2):
            module(x, 4, 4)
        other.append(threading.get_ident())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert other and other[0] not in seen  # stock ops (auto: torch on CPU) served it


def test_forgotten_dispatch_decisions_make_new_plans(monkeypatch):
    module, x = make_block(), x_of()
    counts = Counts(monkeypatch)
    module(x, 4, 4)
    counts.reset()
    module(x, 4, 4)
    assert counts.choices == 0
    dispatch.clear()
    module(x, 4, 4)
    assert counts.choices > 0


def test_a_changed_choice_is_followed(monkeypatch):
    """The torch backend stops taking layer_norm calls (its remembered answers cleared, as
    tests and backend authors do): the next call runs another backend, not the plan's."""
    module, x = make_block(), x_of()
    seen = _spy_reference(monkeypatch)
    monkeypatch.setattr(backends, "CANDIDATES", ("torch", "reference"))
    for _ in range(2):
        module(x, 4, 4)
    assert not seen
    torch_backend = backends.get_backend("torch")
    monkeypatch.setattr(type(torch_backend), "layer_norm_reasons",
                        lambda self, x: ["refused by the test"])
    backends.clear_selection_cache()
    module(x, 4, 4)
    assert len(seen) == 2  # norm1, and norm2 (in norm_mlp: the reference runs both ops)


def test_plans_are_not_state():
    module, x = make_block(), x_of()
    module(x, 4, 4)
    assert "_cvt_plans" in module.__dict__
    assert not any("plan" in k for k in module.state_dict())
    copy.deepcopy(module)(x, 4, 4)


def test_plans_do_not_travel_to_another_process(tmp_path):
    """A module saved with its plans (torch.save of the whole model) must not replay them
    in a process whose dispatcher may choose otherwise: each process starts its own
    generation."""
    import subprocess
    import sys

    code = "import cvt_kernels._plan as p; print(p.generation())"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(seen) == 2 and str(_plan.generation()) + "\n" not in seen


def test_torch_func_transforms_bypass_plans():
    module, x = make_block(), x_of()
    module(x, 4, 4)
    before = dict(module.__dict__["_cvt_plans"])
    batched = torch.func.vmap(lambda t: module(t[None], 4, 4)[0])(x)
    torch.testing.assert_close(batched, module(x, 4, 4))
    assert module.__dict__["_cvt_plans"].keys() == before.keys()


# ------------------------------------------------------------------ the direct eval path
def _triton_usable() -> bool:
    import os
    return (backends.available_backends().get("triton") is None
            or os.environ.get("TRITON_INTERPRET") == "1")


needs_triton = pytest.mark.skipif(not _triton_usable(),
                                  reason="the triton backend runs only on a GPU or under "
                                         "TRITON_INTERPRET=1")


def make_cls_block(dtype, cls: bool, heads: int = 2) -> FusedBlock:
    ref = Block(16, 16, heads, qkv_bias=True, act_layer=QuickGELU, norm_layer=LayerNorm,
                stride_kv=2, with_cls_token=cls).to(dtype)
    randomize_bn(ref)
    fused = FusedBlock.from_reference(copy.deepcopy(ref)).eval()
    return fused, ref.eval()


@needs_triton
@pytest.mark.parametrize("cls", [False, True], ids=["nocls", "cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_direct_eval_is_the_ops_bit_for_bit(monkeypatch, cls, dtype):
    """A plan's second eval call on the triton backend takes the direct path (the backend
    functions straight, no op layer) and gives the ops' result exactly; the reference
    block agrees too."""
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "0")
    assert_direct_eval_is_the_ops(*make_cls_block(dtype, cls), cls, dtype, block.direct_eval)


def assert_direct_eval_is_the_ops(fused, ref, cls: bool, dtype, direct_path):
    """The plan's second eval call (on the triton backend) goes direct through
    ``direct_path`` and equals the first (the ops) exactly, and the reference block."""
    x = torch.randn(2, 16 + cls, 16, dtype=dtype)
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        first = fused(x, 4, 4)  # recorded: the ops
        (_, direct), = fused.__dict__["_cvt_plans"].values()
        assert direct.func is direct_path
        before = _plan.Stats.direct
        second = fused(x, 4, 4)
        assert _plan.Stats.direct == before + 1
        assert torch.equal(first, second)
        torch.testing.assert_close(second, ref(x, 4, 4),
                                   **({} if dtype == torch.float32 else dict(rtol=1e-10,
                                                                              atol=1e-10)))


@needs_triton
def test_direct_eval_reads_the_parameters_of_each_call(monkeypatch):
    """Nothing derived from parameter values is kept: writes (in place, through .data,
    to the running statistics) show in the next direct call."""
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "0")
    fused, ref = make_cls_block(torch.float64, True)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        fused(x, 4, 4), fused(x, 4, 4)
        before = _plan.Stats.direct
        for write in (lambda m: m.mlp.fc2.weight.mul_(1.5),
                      lambda m: m.attn.conv_proj_k.bn.running_var.data.mul_(2.0),
                      lambda m: m.norm1.weight.data.add_(0.25)):
            write(fused), write(ref)  # (the fused block holds copies of ref's tensors)
            torch.testing.assert_close(fused(x, 4, 4), ref(x, 4, 4), rtol=1e-10, atol=1e-10)
        assert _plan.Stats.direct == before + 3


@needs_triton
@pytest.mark.parametrize("case", ["grad", "torch", "one_pass_kept", "train", "subclass"])
def test_direct_eval_only_where_the_ops_would_all_run_on_one_kernel_backend(monkeypatch,
                                                                             case):
    """Not with autograd, another backend, training, a tensor subclass, nor where the
    path that serves the attention is not the one the plan recorded (the kept decision
    under ``auto`` says one-pass, the recorded call ran the separate kernels)."""
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", {"one_pass": "1", "one_pass_kept": "auto"}
                       .get(case, "0"))
    if case == "one_pass_kept":
        monkeypatch.setattr(block, "kept_path", lambda *args: "one-pass")
    fused, _ = make_cls_block(torch.float32, False)
    fused.train(case == "train")
    x = torch.randn(2, 16, 16)
    if case == "subclass":
        class Marked(torch.Tensor):
            pass
        fused.norm1.weight = torch.nn.Parameter(
            fused.norm1.weight.detach().as_subclass(Marked))
    backend = "torch" if case == "torch" else "triton"
    grad = torch.enable_grad() if case == "grad" else torch.no_grad()
    with cvt_kernels.use_backend(backend), grad:
        before = _plan.Stats.direct
        for _ in range(3):
            fused(x, 4, 4)
    assert _plan.Stats.direct == before


@needs_triton
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_direct_eval_with_the_one_pass_kernel_is_the_ops_bit_for_bit(monkeypatch, heads,
                                                                     dtype):
    """Where the one-pass kernel serves (``CVT_KERNELS_ONE_PASS=1``; one head: the output
    projection inside it too), a plan's second eval call goes direct through it and gives
    the ops' result exactly; the reference block agrees."""
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "1")
    assert_direct_eval_is_the_ops(*make_cls_block(dtype, True, heads), True, dtype,
                                  block.direct_eval_one_pass)


@needs_triton
def test_a_module_with_a_direct_plan_pickles(monkeypatch):
    import io

    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "0")
    fused, _ = make_cls_block(torch.float32, False)
    x = torch.randn(2, 16, 16)
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        fused(x, 4, 4)
        assert any(direct is not None for _, direct in fused.__dict__["_cvt_plans"].values())
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x, 4, 4), fused(x, 4, 4))


@needs_triton
def test_direct_paths_can_be_turned_off_for_plans_made_afterwards(monkeypatch):
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "0")
    monkeypatch.setattr(_plan, "DIRECT_PATHS", False)
    fused, _ = make_cls_block(torch.float32, False)
    x = torch.randn(2, 16, 16)
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        before = (_plan.Stats.direct, _plan.Stats.replayed)
        for _ in range(3):
            fused(x, 4, 4)
    assert (_plan.Stats.direct, _plan.Stats.replayed) == (before[0], before[1] + 2)


@needs_triton
def test_direct_eval_under_one_pass_auto_where_the_separate_kernels_are_kept(monkeypatch):
    """``CVT_KERNELS_ONE_PASS=auto`` (the default): on this CPU the dispatcher keeps the
    separate kernels for the shape (nothing can be timed), so the plan goes direct, with the
    same numbers."""
    monkeypatch.setenv("CVT_KERNELS_ONE_PASS", "auto")
    fused, _ = make_cls_block(torch.float32, True)
    x = torch.randn(2, 17, 16)
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        first = fused(x, 4, 4)
        before = _plan.Stats.direct
        assert torch.equal(fused(x, 4, 4), first)
    assert _plan.Stats.direct == before + 1
