"""The inference one-pass kernel (q projection in the attention prologue, proj in the
epilogue for one head) against the reference module, under TRITON_INTERPRET=1 on CPU."""

import copy
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run",
                allow_module_level=True)

import cvt_kernels  # noqa: E402
import cvt_kernels.modules as modules  # noqa: E402
from cvt_kernels import FusedConvAttention, dispatch, trials  # noqa: E402
import cvt_kernels.ops.one_pass as one_pass_mod  # noqa: E402
from cvt_kernels.ops.one_pass import ENV, one_pass_reasons  # noqa: E402

from conftest import assert_close_by_rule, dtype_id, make_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def one_pass_on(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    calls = []
    run = modules.run_one_pass
    monkeypatch.setattr(modules, "run_one_pass", lambda *a: calls.append(1) or run(*a))
    return calls


# One head (proj fused into the epilogue) and several heads (proj as a GEMM after it);
# ragged sizes; with and without class token.
CASES = [dict(dim_in=16, dim_out=16, heads=1, cls=False, h=5, w=3),
         dict(dim_in=8, dim_out=16, heads=2, cls=True, h=3, w=4),
         dict(dim_in=12, dim_out=24, heads=3, cls=True, h=1, w=1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c['heads']}cls{int(c['cls'])}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_pass_matches_reference(one_pass_on, case, dtype):
    ref = make_attention(dim_in=case["dim_in"], dim_out=case["dim_out"], heads=case["heads"],
                         cls=case["cls"], training=False).to(DEVICE)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref).to(dtype))
    x = torch.randn(2, case["h"] * case["w"] + case["cls"], case["dim_in"], device=DEVICE,
                    dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x, case["h"], case["w"])
        with cvt_kernels.use_backend("triton"):
            out = ours(x.to(dtype), case["h"], case["w"])
    assert one_pass_on, "the one-pass path did not run"
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_one_pass_float16_within_twice_pytorch_error(one_pass_on):
    ref = make_attention(dim_in=16, dim_out=16, heads=1, cls=True, training=False).to(DEVICE)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref).half())
    eager = copy.deepcopy(ref).half()
    x = torch.randn(2, 1 + 6 * 5, 16, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        truth = ref(x, 6, 5)
        pytorch_half = eager(x.half(), 6, 5)
        with cvt_kernels.use_backend("triton"):
            out = ours(x.half(), 6, 5)
    assert one_pass_on
    assert_close_by_rule(out, pytorch_half, truth, "one-pass fp16", atol=1e-3)


def test_one_pass_declines_with_reasons(monkeypatch):
    ref = make_attention(dim_in=8, dim_out=16, heads=2, training=False).to(DEVICE).float()
    ours = FusedConvAttention.from_reference(ref)
    x = torch.randn(2, 1 + 3 * 3, 8, device=DEVICE)
    projections = [ours._projection(w) for w in "qkv"]

    def reasons():
        return " ".join(one_pass_reasons(x, projections, 2, 0.0, ours.proj))

    monkeypatch.setenv(ENV, "0")
    assert f"{ENV} is 0" in reasons()
    monkeypatch.setenv(ENV, "1")
    assert "gradients are enabled" in reasons()
    with torch.no_grad():
        with cvt_kernels.use_backend("torch"):
            assert "torch backend" in reasons()
        with cvt_kernels.use_backend("triton"):
            assert reasons() == ""
            projections[0] = ours.train()._projection("q")
            assert "batch statistics" in reasons()


def test_one_pass_under_torch_compile(one_pass_on):
    ref = make_attention(dim_in=8, dim_out=16, heads=1, cls=True, training=False,
                         dtype=torch.float32).to(DEVICE)
    ours = FusedConvAttention.from_reference(ref)
    x = torch.randn(2, 1 + 4 * 3, 8, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")(x, 4, 3)
        eager = ours(x, 4, 3)
    torch._dynamo.reset()
    assert len(one_pass_on) == 2  # traced once (the op runs inside the graph), eager once
    torch.testing.assert_close(compiled, eager)


def test_one_pass_declines_head_dim_above_64(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    ours = FusedConvAttention.from_reference(
        make_attention(dim_in=8, dim_out=128, heads=1, training=False).to(DEVICE).float())
    x = torch.randn(1, 1 + 2 * 2, 8, device=DEVICE)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        reasons = one_pass_reasons(x, [ours._projection(w) for w in "qkv"], 1, 0.0, ours.proj)
    assert any("head_dim 128" in r for r in reasons), reasons


# ---------------------------------------------------------------- the auto policy (default)
@pytest.fixture
def auto(monkeypatch):
    """CVT_KERNELS_ONE_PASS unset (auto), a fresh decision table, measuring allowed on this
    device, a fake clock (``times`` = (one-pass ms, separate ms)) and counted one-pass runs."""
    monkeypatch.delenv(ENV, raising=False)
    state = dict(times=(1.0, 2.0), timed=0, one_pass_runs=0)

    def fake_time(fns, clock=None):
        state["timed"] += 1
        assert set(fns) == {"one-pass", "separate"}
        return dict(zip(("one-pass", "separate"), state["times"]))

    run = modules.run_one_pass

    def counted(*a):
        state["one_pass_runs"] += 1
        return run(*a)

    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_candidates", fake_time)
    monkeypatch.setattr(modules, "run_one_pass", counted)
    return state


def _block(heads=1, cls=True):
    ref = make_attention(dim_in=8, dim_out=16, heads=heads, cls=cls, training=False,
                         dtype=torch.float32).to(DEVICE)
    return ref, FusedConvAttention.from_reference(copy.deepcopy(ref))


@pytest.mark.parametrize("one_pass_faster", [True, False])
def test_auto_measures_each_shape_once_and_keeps_the_faster(auto, one_pass_faster):
    ref, ours = _block()
    auto["times"] = (1.0, 2.0) if one_pass_faster else (2.0, 1.0)
    x = torch.randn(2, 1 + 3 * 3, 8, device=DEVICE)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        first, second = ours(x, 3, 3), ours(x, 3, 3)
        expected = ref(x, 3, 3)
    assert auto["timed"] == 1  # the second call used the stored decision
    assert auto["one_pass_runs"] == (2 if one_pass_faster else 1)  # measuring runs it once
    (key, decision), = one_pass_mod.decisions().items()
    assert decision.path == ("one-pass" if one_pass_faster else "separate")
    assert (decision.one_pass_ms, decision.separate_ms) == auto["times"]
    assert key[2] == tuple(x.shape)
    for out in (first, second):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        ours(torch.randn(1, 1 + 3 * 3, 8, device=DEVICE), 3, 3)  # a new shape: measured again
    assert auto["timed"] == 2 and len(one_pass_mod.decisions()) == 2


def test_auto_keeps_the_separate_kernels_when_one_pass_disagrees(auto, monkeypatch):
    ref, ours = _block(heads=2)
    run = modules.run_one_pass
    monkeypatch.setattr(modules, "run_one_pass", lambda *a: run(*a) + 1.0)  # a broken kernel
    x = torch.randn(2, 1 + 3 * 3, 8, device=DEVICE)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="error against the float64 truth"):
            out = ours(x, 3, 3)
        expected = ref(x, 3, 3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    (decision,) = one_pass_mod.decisions().values()
    assert decision.path == "separate" and "float64 truth" in decision.why
    assert auto["timed"] == 0  # a wrong kernel is never timed, let alone chosen


def test_auto_keeps_the_separate_kernels_when_one_pass_fails(auto, monkeypatch):
    ref, ours = _block()

    def broken(*a):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(modules, "run_one_pass", broken)
    x = torch.randn(1, 1 + 2 * 3, 8, device=DEVICE)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="out of resources"):
            out = ours(x, 2, 3)
        again = ours(x, 2, 3)  # decided: no second try, no second warning
        expected = ref(x, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, out)
    (decision,) = one_pass_mod.decisions().values()
    assert decision.path == "separate" and "raised RuntimeError" in decision.why


def test_auto_runs_the_separate_kernels_where_it_cannot_measure(auto, monkeypatch):
    """Where nothing can be timed (CPU tensors, CUDA-graph capture): no guess in favour of
    the fused kernel, nothing stored; torch.compile traces the separate kernels."""
    monkeypatch.setattr(dispatch, "can_measure", lambda device: False)
    ref, ours = _block()
    x = torch.randn(1, 1 + 2 * 2, 8, device=DEVICE)
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        torch.testing.assert_close(ours(x, 2, 2), ref(x, 2, 2), rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")(x, 2, 2)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, ref(x, 2, 2), rtol=1e-4, atol=1e-5)
    assert auto["one_pass_runs"] == 0 and auto["timed"] == 0
    assert one_pass_mod.decisions() == {}


def test_an_invalid_one_pass_setting_is_a_value_error(monkeypatch):
    _, ours = _block()
    monkeypatch.setenv(ENV, "yes")
    with torch.no_grad(), cvt_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match=ENV):
            ours(torch.randn(1, 1 + 2 * 2, 8, device=DEVICE), 2, 2)


def test_the_check_ignores_matching_non_finite_entries_only():
    """One-pass and separate are judged like every candidate (trials.disagreement): NaN and
    Inf where the truth has them pass, a NaN where the truth is finite fails."""
    truth = {"out": torch.tensor([1.0, float("nan"), float("inf"), -2.0],
                                 dtype=torch.float64)}
    same = {"out": truth["out"].float()}
    assert trials.disagreement(same, same, truth, torch.float32, "separate") is None
    moved = {"out": torch.tensor([float("nan"), 0.0, float("inf"), -2.0])}
    assert "out" in trials.disagreement(moved, same, truth, torch.float32, "separate")


def test_only_cuda_tensors_outside_capture_are_measured():
    assert not dispatch.can_measure(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_gpu_auto_times_both_paths_at_cvt_shapes(monkeypatch, dtype):
    """On a GPU, with real timing: a CvT-13 stage-1 block (C=64, 1 head, 56x56) and a stage-3
    block (C=384, 6 heads, 14x14) are each decided once, with both times recorded, and every
    call's output is that of one of the two paths."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA")
    monkeypatch.delenv(ENV, raising=False)
    for dim, heads, side in ((64, 1, 56), (384, 6, 14)):
        ref = make_attention(dim_in=dim, dim_out=dim, heads=heads, cls=heads > 1,
                             training=False, dtype=torch.float32).cuda()
        ours = FusedConvAttention.from_reference(copy.deepcopy(ref).to(dtype))
        x = torch.randn(8, side * side + (heads > 1), dim, device="cuda", dtype=dtype)
        with torch.no_grad(), cvt_kernels.use_backend("triton"):
            first, second = ours(x, side, side), ours(x, side, side)
            monkeypatch.setenv(ENV, "0")
            separate = ours(x, side, side)
            monkeypatch.setenv(ENV, "1")
            fused = ours(x, side, side)
            monkeypatch.delenv(ENV)
        decision = next(d for k, d in one_pass_mod.decisions().items() if k[2] == tuple(x.shape))
        assert decision.one_pass_ms > 0 and decision.separate_ms > 0, decision
        chosen = fused if decision.path == "one-pass" else separate
        torch.testing.assert_close(first, chosen, rtol=0, atol=0)
        torch.testing.assert_close(second, chosen, rtol=0, atol=0)
    assert len(one_pass_mod.decisions()) == 2


@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
@pytest.mark.parametrize("scale", [0.4, -0.4], ids=["pos", "neg"])
@pytest.mark.parametrize("heads,d,nk", [(1, 16, 16), (2, 8, 21)], ids=["even_d", "masked_d"])
def test_one_pass_kernel_against_projection_then_attention_float64(scale, heads, d, nk,
                                                                    stats_dtype):
    """The kernel itself, against the reference projection followed by reference attention:
    a negative scale (the launcher folds its sign into the q projection), an even head dim
    with exactly one full key tile and a masked head dim with a ragged key tile. The
    running statistics go in as they are (float16 buffers beside float64 inputs too) and
    the kernel takes rsqrt(running_var + eps) itself."""
    from cvt_kernels.backends import get_backend
    from cvt_kernels.backends.base import ProjectionConfig, ProjectionParams
    from cvt_kernels.backends.triton.one_pass import one_pass_attention

    ref = get_backend("reference")
    g = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    c_in, c, h, w = 8, heads * d, 3, 4
    x = rand(2, 1 + h * w, c_in)
    conv_w, bn_w, bn_b = rand(c_in, 1, 3, 3), rand(c_in), rand(c_in)
    running_mean = rand(c_in).to(stats_dtype)
    running_var = (rand(c_in).abs() + 0.5).to(stats_dtype)
    q_w, q_b, k, v = rand(c, c_in), rand(c), rand(2, nk, c), rand(2, nk, c)
    params = ProjectionParams(conv_w, bn_w, bn_b, running_mean, running_var, None, q_w, q_b)
    q = ref.conv_projection_forward(x, h, w, params, None, None,
                                    ProjectionConfig(stride=1, with_cls_token=True), 1e-3)
    expected, _ = ref.attention_forward(q, k, v, heads, scale)
    out = one_pass_attention(x, h, w, conv_w, running_mean, running_var, 1e-3, bn_w, bn_b,
                             q_w, q_b, k, v, heads, scale, True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
