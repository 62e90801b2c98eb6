"""benchmarks.step_cost: launches, bytes and FLOPs counted on the meta device (CPU only).

A tiny CvT-13 (benchmarks.models.TINY: depths 1, 1, 2, so four blocks) at 32x32, batch 2.
"""

import csv
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from benchmarks import step_cost as sc
from cvt_kernels import backends
from cvt_kernels.backends.triton import _runtime
from cvt_kernels.ops import _checks

BF16 = torch.bfloat16
BLOCKS = 4  # TINY's depths 1 + 1 + 2


def meta(*shape, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def count(fn, **kwargs) -> sc.StepCost:
    with torch.no_grad():
        return sc.count_module(fn, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    base = sc.build_model("cvt_13-tiny", 32, BF16)
    runs = {}

    def get(provider: str, mode: str) -> sc.StepCost:
        if (provider, mode) not in runs:
            runs[(provider, mode)] = sc.count_step(sc.PROVIDERS[provider], mode, "cvt_13-tiny",
                                                   32, 2, BF16, base=base)
        return runs[(provider, mode)]
    return get


# ------------------------------------------------------------------ exact small counts
def test_one_linear_is_one_launch_with_known_bytes_and_flops():
    lin = nn.Linear(8, 16, device="meta", dtype=BF16)
    x = meta(4, 8)
    cost = count(lambda: lin(x))
    assert [(x.kind, x.name) for x in cost.launches] == [("aten", "addmm")]
    # x (4x8) + weight (16x8) + bias (16) read, out (4x16) written, 2 bytes each
    assert cost.launches[0].nbytes == 2 * (4 * 8 + 16 * 8 + 16 + 4 * 16)
    assert cost.launches[0].flops == 2 * 4 * 8 * 16


def test_one_more_op_in_the_model_is_one_more_launch():
    lin = nn.Linear(8, 16, device="meta", dtype=BF16)
    x = meta(4, 8)
    one = count(lambda: lin(x))
    two = count(lambda: torch.relu(lin(x)))
    assert two.total() == one.total() + 1
    assert two.total("nbytes") == one.total("nbytes") + 2 * (2 * 4 * 16)


def test_views_and_allocations_launch_nothing_copies_do():
    x = meta(4, 6)
    views = count(lambda: (x.view(24), x.t(), x.reshape(2, 12), x.unsqueeze(0).expand(3, 4, 6),
                           x[1:], x[0], x.detach(), torch.empty_like(x)))
    assert views.total() == 0
    copies = count(lambda: (x.t().contiguous(), x.to(torch.float32)))
    assert [x.name for x in copies.launches] == ["clone", "_to_copy"]


def test_in_place_ops_read_and_write_their_target_copies_only_write():
    a, b = meta(1000), meta(1000)
    n = 2 * 1000
    assert count(lambda: a.add_(b)).total("nbytes") == 3 * n   # read a, b; write a
    assert count(lambda: a.copy_(b)).total("nbytes") == 2 * n  # read b; write a
    assert count(lambda: a.zero_()).total("nbytes") == n       # write a
    bias = meta(8)
    # a broadcast operand counts once, at its extent
    assert count(lambda: bias.expand(4, 8).clone()).total("nbytes") == 2 * 8 + 2 * 32


def test_conv_with_bias_is_two_launches_as_cudnn_runs_it():
    conv = nn.Conv2d(3, 8, 3, device="meta", dtype=BF16)
    depthwise = nn.Conv2d(8, 8, 3, groups=8, device="meta", dtype=BF16)
    x = meta(2, 3, 10, 10)
    assert [x.name for x in count(lambda: conv(x)).launches] == ["convolution", "add_"]
    assert [x.name for x in count(lambda: depthwise(conv(x))).launches] == [
        "convolution", "add_", "convolution"]


def test_a_channels_last_depthwise_conv_keeps_its_layout_as_cudnn_does():
    """Meta leaves every conv output contiguous; cuDNN returns channels-last for a
    channels-last input (the torch backend's token view), so the tokens after the conv and
    BatchNorm are a view on a GPU, and the count has no copy there. An NCHW input stays
    NCHW (the token matrix is then a copy); the backward's input gradient follows the
    input's layout, as cuDNN's does (meta already does that)."""
    channels, side = 8, 6
    weight = meta(channels, 1, 3, 3)
    mean, var = meta(channels), meta(channels)

    def tokens_after(x_map):
        y = F.conv2d(x_map, weight, None, 1, 1, 1, channels)
        y = F.batch_norm(y, mean, var, None, None, False, 0.0, 1e-5)
        return y.flatten(2).transpose(1, 2).reshape(-1, channels)

    tokens = meta(2, side * side, channels)
    as_map = tokens.transpose(1, 2).unflatten(2, (side, side))  # channels-last strides
    assert [x.name for x in count(lambda: tokens_after(as_map)).launches] == [
        "convolution", "native_batch_norm"]
    nchw = meta(2, channels, side, side)
    assert [x.name for x in count(lambda: tokens_after(nchw)).launches] == [
        "convolution", "native_batch_norm", "clone"]
    # float64 never takes cuDNN's channels-last path.
    f64 = meta(2, side * side, channels, dtype=torch.float64).transpose(1, 2).unflatten(
        2, (side, side))
    weight64 = meta(channels, 1, 3, 3, dtype=torch.float64)
    seen = {}
    count(lambda: seen.setdefault("out", F.conv2d(f64, weight64, None, 1, 1, 1, channels)))
    assert seen["out"].is_contiguous()

    grads = {}

    def backward(x_map):
        x_map = x_map.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        out = F.conv2d(x_map, w, None, 1, 1, 1, channels)
        grads["x"], _ = torch.autograd.grad(out, (x_map, w), torch.empty_like(out))

    sc.count_module(lambda: backward(as_map))
    assert grads["x"].is_contiguous(memory_format=torch.channels_last)
    sc.count_module(lambda: backward(nchw))
    assert grads["x"].is_contiguous()


def test_conv_layout_line_says_what_this_machine_returns():
    line = sc.conv_layout_line("cpu")
    assert line.startswith("depthwise conv of a channels-last torch.float32 input on cpu: ")
    assert "output" in line


def test_foreach_ops_count_multi_tensor_apply_launches():
    small = [meta(10) for _ in range(111)]
    assert sc._foreach_launches([small]) == 2            # 110 tensors per launch
    assert sc._foreach_launches([small[:3], small[:3]]) == 1
    big = [meta(321 * 65536)]
    assert sc._foreach_launches([big]) == 2              # 320 chunks per launch


def test_a_host_sync_is_reported_and_the_count_goes_on():
    x = meta(4)
    cost = count(lambda: x.sum().item() + 1)
    assert [x.name for x in cost.launches] == ["sum", "_local_scalar_dense"]
    assert any(n.startswith("host sync: _local_scalar_dense at tests/test_step_cost.py")
               for n in cost.notes), cost.notes


# ------------------------------------------------------------------ Triton launches
@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def test_triton_launches_are_recorded_not_run():
    x, y = meta(100, dtype=torch.float32), meta(100, dtype=torch.float32)
    cost = count(lambda: _scale_kernel[(triton.cdiv(100, 64),)](x, y, 100, BLOCK=64))
    (launch,) = cost.launches
    assert (launch.kind, launch.name, launch.grid) == ("triton", "_scale_kernel", (2,))
    assert launch.nbytes == 2 * 400
    assert launch.site.startswith("tests/test_step_cost.py")
    with pytest.raises(Exception):  # outside the count the same launch cannot run on meta
        _scale_kernel[(2,)](x, y, 100, BLOCK=64)


def test_the_launchers_pick_an_h100_grid():
    from cvt_kernels.backends.triton import attention

    q, k = meta(2, 50, 128), meta(2, 13, 128)
    cost = count(lambda: attention.attention_forward(q, k, k, 2, 0.125))
    (launch,) = cost.launches
    block_m = attention.forward_config(64, BF16, False, 90)["BLOCK_M"]
    assert launch.name == "_attn_fwd_kernel"
    assert launch.grid[:2] == (2 * 2, triton.cdiv(50, block_m))
    assert launch.flops == 4 * 2 * 2 * 50 * 13 * 64
    assert launch.site.startswith("cvt_kernels/backends/triton/attention.py")


# ------------------------------------------------------------------ whole tiny models
def test_counts_are_positive_and_providers_differ_as_expected(tiny):
    eager, block = tiny("eager", "eval"), tiny("block-triton", "eval")
    assert eager.total() > 0 and eager.total(kind="triton") == 0
    assert block.total(kind="triton") > 0
    # A fused block replaces LayerNorm (casts, norm, cast back), the MLP's GEMMs and
    # QuickGELU's elementwise ops with a few kernels: fewer launches and bytes.
    assert block.total() < eager.total()
    assert block.total("nbytes") < eager.total("nbytes")
    assert block.total("flops") > 0 and eager.total("flops") > 0


def test_attention_scope_triton_launches_are_exact(tiny):
    counts = tiny("attention-triton", "eval").op_counts("triton")
    assert counts["_attn_fwd_kernel"] == BLOCKS
    assert counts["_forward_kernel"] == 3 * BLOCKS  # q, k and v projections
    train = tiny("attention-triton", "train").op_counts("triton")
    assert train["_attn_bwd_dq_kernel"] == train["_attn_bwd_dkdv_kernel"] == BLOCKS
    assert train["_stats_partials_kernel"] == 3 * BLOCKS


def test_torch_attention_counts_as_one_flash_kernel_as_on_a_gpu(tiny):
    counts = tiny("attention-torch", "eval").op_counts("aten")
    assert counts["_scaled_dot_product_flash_attention"] == BLOCKS
    assert "_softmax" not in counts  # not PyTorch's math composition on the meta device


def test_sites_name_the_code_that_launched(tiny):
    sites = {(g["name"], g["site"].split(":")[0]) for g in tiny("block-triton", "train").sites()}
    assert ("_forward_kernel", "cvt_kernels/backends/triton/conv_projection.py") in sites
    backward = [g["site"] for g in tiny("eager", "train").sites()
                if g["site"].startswith("bwd of")]
    # the model's ops, or the loss the step itself computes
    assert all(s.startswith(("bwd of cvt_kernels/", "bwd of benchmarks/step_cost.py"))
               for s in backward), backward
    assert any(s.startswith("bwd of cvt_kernels/models/cvt.py") for s in backward)


def test_counting_leaves_no_global_state_behind(tiny):
    env = {k: os.environ.get(k) for k in ("CVT_KERNELS_DISPATCH", "CVT_KERNELS_AUTOTUNE",
                                          "CVT_KERNELS_ONE_PASS", "CVT_KERNELS_DISPATCH_CACHE")}
    selected = dict(backends._SELECTED)
    runs = (JITFunction.run, Autotuner.run, F.scaled_dot_product_attention)
    sc.count_step(sc.PROVIDERS["block-triton-one-pass"], "eval", "cvt_13-tiny", 32, 2, BF16)
    assert _runtime.simulated() is None
    triton_backend = backends.get_backend("triton")
    assert "unavailable_reason" not in vars(triton_backend)
    assert "support" not in vars(backends.get_backend("torch"))
    assert (JITFunction.run, Autotuner.run, F.scaled_dot_product_attention) == runs
    assert sys.modules["cvt_kernels.ops.layer_norm"].no_autocast is _checks.no_autocast
    assert {k: os.environ.get(k) for k in env} == env
    assert backends._SELECTED == selected
    if not _runtime.interpreting() and not torch.cuda.is_available():
        assert triton_backend.unavailable_reason() is not None  # declines meta again


def test_main_prints_and_writes_the_files(tmp_path, capsys):
    assert sc.main(["--model", "cvt_13-tiny", "--img-size", "32", "--batch", "2",
                    "--providers", "eager", "block-triton", "--modes", "eval", "--out",
                    str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| block-triton | eval |" in out and "ESTIMATE" in out
    assert "(the budgets are for cvt_13 224 64 bfloat16; not checked at" in out
    rows = [{"provider": "block-triton", "mode": "eval", "launches": 121, "gb": 4.5}]
    assert sc.budget_lines(rows, sc.BUDGET_SHAPE) == [
        "block-triton eval: 121 launches (budget <= 120): NOT met",
        "block-triton eval: 4.5 GB (budget <= 4.5): met"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and files[0].startswith("cvt_13-tiny_32_b2_bfloat16_")
    assert all(f.endswith(s) for f, s in zip(files, (".csv", ".md", "_sites.csv")))
    with open(tmp_path / files[0], newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert int(rows["block-triton"]["triton_launches"]) > 0
    assert rows["eager"]["triton_launches"] == "0"
    assert rows["eager"]["triton_version"] == triton.__version__
