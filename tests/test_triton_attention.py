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

from conftest import assert_close_by_rule, dtype_id, head_dim_id, run_aot_check  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = get_backend("reference")


def qkv(batch, nq, nk, heads, d, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(1234)
    make = lambda n: (torch.randn(batch, n, heads * d, generator=g, dtype=torch.float64)
                      .to(DEVICE, dtype).requires_grad_(requires_grad))
    return make(nq), make(nk), make(nk)


# Nq != Nk, ragged tails (17 and 5 are not multiples of any block), a class-token-like
# extra row/column, head dims 16 to 128 (96: a masked head dim), 1 to 3 heads, batch 1 and 2.
SHAPES = [(1, 17, 5, 1, 16), (2, 17, 5, 3, 64), (2, 10, 3, 2, 32), (1, 1, 1, 1, 16),
          (1, 9, 20, 2, 128), (1, 5, 3, 1, 96)]


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


def test_gradcheck_float64():
    q, k, v = qkv(1, 7, 3, 2, 16, torch.float64, requires_grad=True)
    # Through the custom op (autograd formula included). fast_mode: a few random directional
    # derivatives instead of one launch per element, which the interpreter cannot afford.
    with cvt_kernels.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: cvt_kernels.ops.attention(q, k, v, 2, 0.3), (q, k, v),
            fast_mode=True)


@pytest.mark.parametrize("d", [16, 64])
def test_float16_by_the_2x_rule(d):
    heads = 2
    q, k, v = qkv(2, 17, 5, heads, d, torch.float64)
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


def test_aot_check_compiles_the_default_forward_for_sm90():
    """The CvT config (bf16, head_dim 64) compiles for H100 without spills and uses wgmma.
    In a subprocess: under TRITON_INTERPRET=1 this process holds interpreter-only kernels."""
    cfg = tri.forward_config(64, torch.bfloat16, interpret=False)
    run = run_aot_check(
        f"attn_fwd        bfloat16 d64 {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}")
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("attn_fwd"))
    assert line.split()[-2] == "yes", line  # wgmma


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_every_architecture_and_dtype_has_configs_and_hopper_half_ones_use_wgmma(kernel, d):
    """What a GPU may launch: some config for every (arch, dtype, head_dim) up to 128, and on
    Hopper only wgmma tiles for fp16/bf16 (the AOT check verifies the rule on the PTX)."""
    for arch in (90, 80):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            configs = tri.shipped_configs(kernel, dtype, d, arch)
            assert configs, (kernel, arch, dtype, d)
            assert tri.unsupported_reason(dtype, d, arch) is None, (arch, dtype, d)
            if arch == 90 and dtype != torch.float32:
                assert all(tri.uses_wgmma(kernel, c) for c in configs), (kernel, dtype, d, configs)
    assert tri.unsupported_reason(torch.float16, 129, 90) is not None


@pytest.mark.parametrize("kernel,name", [("dkdv", "attn_bwd_dkdv"), ("dq", "attn_bwd_dq")])
def test_aot_check_compiles_the_default_head_dim_128_backward_for_sm90_on_wgmma(kernel, name):
    """The d128 backward defaults (the tightest register budgets) compile for H100 without
    spills and on wgmma: the AOT check exits 1 otherwise."""
    cfg = tri.kernel_config(kernel, 128, torch.bfloat16, interpret=False, arch=90)
    run = run_aot_check(
        f"{name:15s} bfloat16 d128 {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}")
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith(name))
    assert line.split()[-2] == "yes", line  # wgmma
