"""The Triton attention kernels against the reference backend, under TRITON_INTERPRET=1 on CPU."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run",
                allow_module_level=True)

import cvt_kernels  # noqa: E402
from cvt_kernels.backends import get_backend  # noqa: E402
from cvt_kernels.backends.triton import attention as tri  # noqa: E402

from conftest import assert_close_by_rule, dtype_id, head_dim_id  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = get_backend("reference")


def qkv(batch, nq, nk, heads, d, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(1234)
    make = lambda n: (torch.randn(batch, n, heads * d, generator=g, dtype=torch.float64)
                      .to(DEVICE, dtype).requires_grad_(requires_grad))
    return make(nq), make(nk), make(nk)


# Nq != Nk, ragged tails (17 and 5 are not multiples of any block), a class-token-like
# extra row/column, head dims 16 to 128 (96: a masked head dim), 1 to 3 heads, batch 1 and 2.
# Against the interpreter's 16-key tiles: one masked tile alone (5 keys, like CvT stage 3's
# 50 in one tile), full tiles with no tail (16, 32 keys), full tiles and a tail (20, 37);
# head_dim == BLOCK_D (16, 32, 64, 128: no head-dim mask) and not (96, 24).
SHAPES = [(1, 17, 5, 1, 16), (2, 17, 5, 3, 64), (2, 10, 3, 2, 32), (1, 1, 1, 1, 16),
          (1, 9, 20, 2, 128), (1, 5, 3, 1, 96), (1, 9, 32, 2, 16), (2, 5, 16, 1, 32),
          (1, 7, 37, 1, 24), (1, 18, 33, 1, 96)]


@pytest.mark.parametrize("batch,nq,nk,heads,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_backward_match_reference(batch, nq, nk, heads, d, dtype):
    q, k, v = qkv(batch, nq, nk, heads, d, dtype)
    scale = (heads * d) ** -0.5
    out, lse = tri.attention_forward(q, k, v, heads, scale)
    ref_out, ref_lse = REF.attention_forward(q, k, v, heads, scale)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **tol)
    grad = torch.randn_like(out)
    grads = tri.attention_backward(grad, q, k, v, out, lse, heads, scale)
    ref_grads = REF.attention_backward(grad, q, k, v, ref_out, ref_lse, heads, scale)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, **tol, msg=f"d{name}")


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("nq,nk", [(5, 1), (32, 31), (33, 32), (31, 33), (64, 64)])
@pytest.mark.parametrize("d", [16, 24])
def test_full_and_ragged_tiles_float64(monkeypatch, block, nq, nk, d):
    """The unmasked full-tile loops and the masked tails (keys in the forward and dq, queries
    in dk/dv) at two tile sizes: no full tile, exact multiples, a tail of 1 or of
    BLOCK - 1; even and masked head dims. float64: agreement to rounding, so a dropped or
    double-counted key or query shows."""
    monkeypatch.setitem(tri._INTERPRETER_CONFIG, "BLOCK_M", block)
    monkeypatch.setitem(tri._INTERPRETER_CONFIG, "BLOCK_N", block)
    q, k, v = qkv(1, nq, nk, 2, d, torch.float64)
    out, lse = tri.attention_forward(q, k, v, 2, 0.3)
    ref_out, ref_lse = REF.attention_forward(q, k, v, 2, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    grads = tri.attention_backward(grad, q, k, v, out, lse, 2, 0.3)
    ref_grads = REF.attention_backward(grad, q, k, v, ref_out, ref_lse, 2, 0.3)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_negative_and_zero_scale(scale):
    """The kernels take max(s) * c as the scaled row max, true for c >= 0: the launcher
    folds a negative scale's sign into q. A zero scale must not turn masked keys into NaN
    (0 * -inf) in the ragged tile."""
    q, k, v = qkv(1, 9, 20, 2, 16, torch.float64)
    out, lse = tri.attention_forward(q, k, v, 2, scale)
    ref_out, ref_lse = REF.attention_forward(q, k, v, 2, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    grads = tri.attention_backward(grad, q, k, v, out, lse, 2, scale)
    ref_grads = REF.attention_backward(grad, q, k, v, ref_out, ref_lse, 2, scale)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("nq,nk,d", [(7, 3, 16), (5, 20, 24)])
def test_gradcheck_float64(nq, nk, d):
    q, k, v = qkv(1, nq, nk, 2, d, torch.float64, requires_grad=True)
    # Through the custom op (autograd formula included). fast_mode: a few random directional
    # derivatives instead of one launch per element, which the interpreter cannot afford.
    with cvt_kernels.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: cvt_kernels.ops.attention(q, k, v, 2, 0.3), (q, k, v),
            fast_mode=True)


@pytest.mark.parametrize("d,nk", [(16, 5), (64, 5), (16, 32), (24, 37)])
def test_float16_by_the_2x_rule(d, nk):
    heads = 2
    q, k, v = qkv(2, 17, nk, heads, d, torch.float64)
    scale = (heads * d) ** -0.5
    truth, _ = REF.attention_forward(q, k, v, heads, scale)
    half = [t.half() for t in (q, k, v)]
    # PyTorch's own float16 attention: the score matrix and softmax in float16.
    qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in half)
    pytorch_half = (torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1) @ vh)
    pytorch_half = pytorch_half.transpose(1, 2).flatten(2)
    ours, _ = tri.attention_forward(*half, heads, scale)
    assert ours.dtype == torch.float16
    assert_close_by_rule(ours, pytorch_half, truth, name=f"fp16 d={d}", atol=1e-3)


def test_non_contiguous_inputs():
    q, k, v = qkv(2, 9, 4, 2, 16, torch.float32)
    big = torch.randn(2, 9, 64, device=DEVICE)
    q_view = big[:, :, 8:40]  # rows strided, channels dense
    out, _ = tri.attention_forward(q_view, k, v, 2, 0.2)
    ref, _ = REF.attention_forward(q_view.contiguous(), k, v, 2, 0.2)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)
    out_t, _ = tri.attention_forward(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, 2, 0.2)
    ref_t, _ = REF.attention_forward(q, k, v, 2, 0.2)
    torch.testing.assert_close(out_t, ref_t, rtol=2e-4, atol=2e-5)


def test_huge_logits_stay_finite():
    q = torch.full((1, 4, 16), 30.0, device=DEVICE)
    k = torch.full((1, 3, 16), 30.0, device=DEVICE)
    v = torch.randn(1, 3, 16, device=DEVICE)
    out, lse = tri.attention_forward(q, k, v, 1, 1.0)  # scores 14400: exp overflows naively
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(1, 4, 16))


def test_very_negative_lse_keeps_gradients_finite():
    """lse = -14400: exp2(-lse) of a padded key (loaded as 0) is inf, so the ragged key tile
    of dq must zero those probabilities rather than multiply inf by a zero key."""
    q = torch.full((1, 4, 16), -30.0, device=DEVICE)
    k = torch.full((1, 3, 16), 30.0, device=DEVICE)
    v = torch.randn(1, 3, 16, device=DEVICE)
    out, lse = tri.attention_forward(q, k, v, 1, 1.0)
    assert (lse < -1e4).all()
    grads = tri.attention_backward(torch.randn_like(out), q, k, v, out, lse, 1, 1.0)
    for name, g in zip("qkv", grads):
        assert torch.isfinite(g).all(), f"d{name}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("batch,nq,nk,heads", [(8, 3136, 784, 1), (16, 197, 50, 6), (4, 577, 145, 16)])
@pytest.mark.parametrize("d", [64, 128], ids=head_dim_id)
def test_gpu_cvt_shapes_by_the_2x_rule(dtype, batch, nq, nk, heads, d):
    q, k, v = qkv(batch, nq, nk, heads, d, torch.float64)
    scale = (heads * d) ** -0.5
    truth, _ = REF.attention_forward(q, k, v, heads, scale)
    low = [t.to(dtype) for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, d)).transpose(1, 2) for t in low), scale=scale)
    ours, _ = tri.attention_forward(*low, heads, scale)
    assert_close_by_rule(ours, sdpa.transpose(1, 2).flatten(2), truth, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("batch,nq,nk,heads", [(4, 3136, 784, 1), (16, 197, 50, 6)])
@pytest.mark.parametrize("d", [64, 128], ids=head_dim_id)
def test_gpu_backward_at_cvt_shapes_by_the_2x_rule(dtype, batch, nq, nk, heads, d):
    """dq, dk, dv on the GPU (delta from the dq kernel, the d128 wgmma tiles) vs the float64
    reference: within twice the error of PyTorch's SDPA backward in the same dtype."""
    q, k, v = qkv(batch, nq, nk, heads, d, torch.float64)
    scale = (heads * d) ** -0.5
    grad = torch.randn_like(q)
    truth_out, truth_lse = REF.attention_forward(q, k, v, heads, scale)
    truth = REF.attention_backward(grad, q, k, v, truth_out, truth_lse, heads, scale)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, d)).transpose(1, 2) for t in low), scale=scale)
    sdpa.transpose(1, 2).flatten(2).backward(grad.to(dtype))
    out, lse = tri.attention_forward(*(t.detach() for t in low), heads, scale)
    ours = tri.attention_backward(grad.to(dtype), *(t.detach() for t in low), out, lse,
                                  heads, scale)
    for name, g, t, x in zip("qkv", ours, truth, low):
        assert_close_by_rule(g, x.grad, t, name=f"d{name} {dtype} d={d}", atol=1e-3)


_LAUNCH_FAITHFUL = """
import json, os, sys, torch
os.environ["CVT_KERNELS_AUTOTUNE"] = "0"  # the default config of each kernel only
from benchmarks import launch_check as lc  # run from the repository root
from cvt_kernels.backends.triton import _runtime, attention as attn
b, nq, nk, h, d = (int(a) for a in sys.argv[1:6])
with lc._compile_only(_runtime.simulated_target(90)) as rec:
    q = torch.empty(b, nq, h * d, dtype=torch.bfloat16)
    k = torch.empty(b, nk, h * d, dtype=torch.bfloat16)
    out, lse = attn.attention_forward(q, k, k, h, 0.125)
    attn.attention_backward(q, q, k, k, out, torch.empty(b, h, nq), h, 0.125)
launches = rec.launches
binaries = lc.analyse(90, launches)
print(json.dumps([dict(kernel=l.kernel, config=binaries[id(l.compiled)].config,
                       regs=binaries[id(l.compiled)].regs, spill=binaries[id(l.compiled)].spill,
                       wgmma=binaries[id(l.compiled)].wgmma) for l in launches]))
"""


# CvT-13 stage 1 at batch 64 (head_dim 64, one head); head_dim 128 (the tightest register
# budgets) at stage 2's token counts.
@pytest.mark.parametrize("shape", [(64, 3136, 784, 1, 64), (64, 785, 197, 3, 128)],
                         ids=["d64", "d128"])
def test_default_configs_compile_for_sm90_as_launched_without_spills_on_wgmma(shape):
    """The default configs (bf16) of the forward, dq and dk/dv kernels compile for H100 as
    the launchers launch them (the launch-faithful check: divisibility and ==1
    specializations) without spills and on wgmma. In a subprocess: under TRITON_INTERPRET=1
    this process holds interpreter-only kernels."""
    import json
    import subprocess
    import sys

    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "launch_check.py").exists():
        pytest.skip("the launch-faithful compile check is not in this checkout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _LAUNCH_FAITHFUL, *map(str, shape)], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r["kernel"] for r in rows) == sorted(
        ["_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]), rows
    for r in rows:
        assert r["spill"] == 0 and r["wgmma"] > 0, r


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_every_architecture_and_dtype_has_configs_and_hopper_half_ones_use_wgmma(kernel, d):
    """What a GPU may launch: some config for every (arch, dtype, head_dim) up to 128, and on
    Hopper only wgmma tiles for fp16/bf16 (the launch-faithful check verifies the rule on the PTX)."""
    for arch in (90, 86, 80):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            configs = tri.shipped_configs(kernel, dtype, d, arch)
            assert configs, (kernel, arch, dtype, d)
            assert tri.unsupported_reason(dtype, d, arch) is None, (arch, dtype, d)
            if arch == 90 and dtype != torch.float32:
                assert all(tri.uses_wgmma(kernel, c) for c in configs), (kernel, dtype, d, configs)
    assert tri.unsupported_reason(torch.float16, 129, 90) is not None


def test_capture_launches_the_config_tuned_by_the_eager_call(monkeypatch):
    """CUDA-graph capture cannot time, so it must not autotune; it launches the config the
    autotuner chose for the same call outside capture (issue 23: it ran the default)."""
    import triton

    from cvt_kernels.backends.triton import attention as attn

    best = triton.Config(dict(BLOCK_M=128, BLOCK_N=32), num_warps=8, num_stages=3)
    launched = []

    class Tuned:  # triton.autotune(...)(kernel) after tuning this key
        best_config = best

        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(("tuned", k))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(("plain", k))

    default = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    key = ("fwd", 3136, 784, 64, torch.bfloat16, torch.device("cuda", 0))
    monkeypatch.setattr(attn, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    attn._launch(Kernel(), Tuned(), default, False, lambda meta: (1,), tune_key=key)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    attn._launch(Kernel(), Tuned(), default, False, lambda meta: (1,), tune_key=key)
    other = key[:1] + (197,) + key[2:]
    attn._launch(Kernel(), Tuned(), default, False, lambda meta: (1,), tune_key=other)
    assert launched == [("tuned", {}),
                        ("plain", dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),
                        ("plain", default)]  # never tuned: the default, still no timing
