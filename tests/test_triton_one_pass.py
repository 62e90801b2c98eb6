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
from cvt_kernels import FusedConvAttention  # noqa: E402
from cvt_kernels.ops.one_pass import ENV, one_pass_reasons  # noqa: E402

from conftest import assert_close_by_rule, make_attention  # noqa: E402

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

    monkeypatch.delenv(ENV, raising=False)
    assert ENV in reasons()  # opt-in
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
