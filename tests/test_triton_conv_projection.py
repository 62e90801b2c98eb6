"""The triton backend's convolutional projection, function by function against the reference.

On CPU these run the kernels through Triton's interpreter (``TRITON_INTERPRET=1``): tiny
shapes, 16-wide tiles so tails and multi-block reductions are still exercised. bfloat16 is
covered by float16 there (the interpreter's ``tl.dot`` is wrong on bfloat16 operands, a
Triton 3.9 interpreter bug); real bfloat16 runs in the GPU tier.
"""

import contextlib
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs `import triton`")

import cvt_kernels  # noqa: E402
from cvt_kernels import agreement, backends, ops  # noqa: E402
from cvt_kernels.backends import BackendUnavailableError, ProjectionConfig, ProjectionParams  # noqa: E402
from cvt_kernels.backends.triton._runtime import interpreting  # noqa: E402

from conftest import (assert_close_by_rule, dtype_id, make_attention, mode_id,  # noqa: E402
                      run_launch_check)

INTERPRET = interpreting()
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on CPU "
                "(README: TRITON_INTERPRET=1 python -m pytest -q -n 2 tests)",
                allow_module_level=True)

DEVICE = "cpu" if INTERPRET else "cuda"
REF = backends.get_backend("reference")
TRI = backends.get_backend("triton")


def _need_interpreter_for(dtype):
    if dtype == torch.float64 and not INTERPRET:
        pytest.skip("float64 kernels run only under the interpreter")


def make_inputs(batch, h, w, cin, cout, cls, stride, dtype, affine=True, bias=True,
                requires_grad=False):
    g = dict(dtype=dtype, device=DEVICE)
    x = torch.randn(batch, h * w + cls, cin, **g)
    params = ProjectionParams(
        torch.randn(cin, 1, 3, 3, **g),
        (torch.rand(cin, **g) + 0.5) if affine else None,
        torch.randn(cin, **g) if affine else None,
        torch.randn(cin, **g) * 0.1, torch.rand(cin, **g) + 0.5,
        torch.tensor(0, device=DEVICE),
        torch.randn(cout, cin, **g), torch.randn(cout, **g) if bias else None)
    if requires_grad:
        x.requires_grad_(True)
        params = params._replace(**{
            k: getattr(params, k).requires_grad_(True)
            for k in ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")
            if getattr(params, k) is not None})
    return x, params, ProjectionConfig("dw_bn", 3, stride, 1, bool(cls))


def _close(ours, ref, name, dtype, truth=None):
    """float64: within 1e-10 of the reference (relative to max(|ref|, 1)). float32: by the
    2x rule against the float64 ``truth``, each tensor relative to its own size: our error
    at most twice the float32 reference's plus 1e-6 (a 1e-5 relative error fails)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    if dtype == torch.float64:
        err = (ours - ref).abs().max() / ref.abs().max().clamp_min(1.0)
        assert err <= 1e-10, f"{name}: relative error {err:.3e} > 1e-10"
        return
    ours_err, ref_err = agreement.error(ours, truth), agreement.error(ref, truth)
    assert ours_err <= 2 * ref_err + 1e-6, (
        f"{name}: error {ours_err:.3e} > 2 x the float32 reference's {ref_err:.3e} + 1e-6")


def _float64(x, p):
    return x.double(), p._replace(**{k: getattr(p, k).double() for k in p._fields
                                     if getattr(p, k) is not None
                                     and getattr(p, k).is_floating_point()})


CASES = [
    # batch, h, w, C_in, C_out, cls, stride, dtype
    (2, 3, 5, 5, 7, 1, 1, torch.float64),
    (2, 3, 5, 5, 7, 0, 2, torch.float32),
    (1, 1, 1, 3, 4, 1, 1, torch.float64),
    (2, 4, 4, 16, 4, 0, 1, torch.float32),
    (2, 4, 4, 20, 7, 1, 2, torch.float64),   # C_in over two K slices
    (1, 3, 5, 16, 4, 1, 2, torch.float32),
    # The forward's resident row tile in 3 and 4 slices of 16 channels, C_out in 3 N slices;
    # above 64 channels the K loop (interpreter tables, configs.INTERPRETER_RESIDENT).
    (1, 3, 3, 40, 40, 1, 1, torch.float32),
    (1, 2, 3, 56, 20, 0, 2, torch.float64),
    (1, 2, 2, 72, 36, 1, 1, torch.float32),
    # Many first-level programs (7 programs of 2 row blocks, the last with one ragged
    # block) and two second-level steps of 4 partials (the last with 3).
    (4, 7, 7, 3, 5, 0, 1, torch.float64),
    (4, 7, 7, 3, 5, 1, 1, torch.float32),
]


@pytest.mark.parametrize("batch,h,w,cin,cout,cls,stride,dtype", CASES)
def test_functions_match_reference(batch, h, w, cin, cout, cls, stride, dtype):
    """Pass 1, pass 2 (batch and running stats) and both backwards, one by one."""
    _need_interpreter_for(dtype)
    x, p, cfg = make_inputs(batch, h, w, cin, cout, cls, stride, dtype)
    x64, p64 = _float64(x, p)
    mean, var = TRI.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    ref_mean, ref_var = REF.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    true_mean, true_var = REF.conv_projection_stats(x64, h, w, p64.conv_weight, cfg)
    _close(mean, ref_mean, "mean", dtype, true_mean)
    _close(var, ref_var, "var", dtype, true_var)

    def running(p_):
        return p_.running_mean.to(ref_mean.dtype), torch.rsqrt(p_.running_var + 1e-5).to(
            ref_mean.dtype)

    true_running = (p64.running_mean, torch.rsqrt(p64.running_var + 1e-5))
    # Batch statistics; the running ones given as (mean, rstd); the running buffers read by
    # the kernels themselves (mean/rstd None: rsqrt(running_var + eps) as they load it).
    for batch_stats, (m, rstd), (m64, rstd64), given in (
            (True, (ref_mean, torch.rsqrt(ref_var + 1e-5)),
             (true_mean, torch.rsqrt(true_var + 1e-5)), True),
            (False, running(p), true_running, True),
            (False, running(p), true_running, False)):
        ours_stats = (m, rstd) if given else (None, None)
        out = TRI.conv_projection_forward(x, h, w, p, *ours_stats, cfg, 1e-5)
        ref = REF.conv_projection_forward(x, h, w, p, m, rstd, cfg)
        truth = REF.conv_projection_forward(x64, h, w, p64, m64, rstd64, cfg)
        _close(out, ref, f"out (batch_stats={batch_stats})", dtype, truth)
        go = torch.randn_like(ref)
        ours = TRI.conv_projection_backward(go, x, h, w, p, *ours_stats, cfg, batch_stats,
                                            1e-5)
        theirs = REF.conv_projection_backward(go, x, h, w, p, m, rstd, cfg, batch_stats)
        true = REF.conv_projection_backward(go.double(), x64, h, w, p64, m64, rstd64, cfg,
                                            batch_stats)
        for name, a, b, t in zip(ours._fields, ours, theirs, true):
            _close(a, b, f"d{name} (batch_stats={batch_stats})", dtype, t)


def test_no_affine_no_bias_and_non_contiguous_inputs():
    """bn/proj biases absent, and x / proj_weight given as strided views."""
    batch, h, w, cin, cout = 2, 3, 3, 5, 6
    x, p, cfg = make_inputs(batch, h, w, cin, cout, 1, 1, torch.float64, affine=False,
                            bias=False)
    x = torch.randn(batch, h * w + 1, 2 * cin, dtype=torch.float64, device=DEVICE)[..., ::2]
    p = p._replace(proj_weight=torch.randn(cin, cout, dtype=torch.float64, device=DEVICE).t())
    assert not x.is_contiguous() and not p.proj_weight.is_contiguous()
    mean, var = TRI.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    rstd = torch.rsqrt(var + 1e-5)
    _close(mean, REF.conv_projection_stats(x, h, w, p.conv_weight, cfg)[0], "mean", x.dtype)
    out = TRI.conv_projection_forward(x, h, w, p, mean, rstd, cfg)
    _close(out, REF.conv_projection_forward(x, h, w, p, mean, rstd, cfg), "out", x.dtype)
    go = torch.randn_like(out)[:, :, :]
    ours = TRI.conv_projection_backward(go, x, h, w, p, mean, rstd, cfg, True)
    theirs = REF.conv_projection_backward(go, x, h, w, p, mean, rstd, cfg, True)
    assert ours.bn_weight is None and ours.bn_bias is None and ours.proj_bias is None
    for name, a, b in zip(ours._fields, ours, theirs):
        if b is not None:
            _close(a, b, f"d{name}", x.dtype)


@pytest.mark.parametrize("cls,stride", [(1, 1), (1, 2), (0, 2)])
def test_backward_into_adds_the_input_gradient_in_the_kernels(cls, stride):
    """``conv_projection_backward_into``: ``dx`` added to the given buffer in the kernels'
    stores (class-token rows and map rows both), the buffer returned as ``dx``, every
    parameter gradient as without it; the reference backend's default (an add after)
    agrees. float64: to rounding."""
    batch, h, w, cin, cout = 2, 3, 4, 5, 6
    x, p, cfg = make_inputs(batch, h, w, cin, cout, cls, stride, torch.float64)
    mean, var = TRI.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    rstd = torch.rsqrt(var + 1e-5)
    out = TRI.conv_projection_forward(x, h, w, p, mean, rstd, cfg)
    go = torch.randn_like(out)
    plain = TRI.conv_projection_backward(go, x, h, w, p, mean, rstd, cfg, True)
    before = torch.randn_like(x)
    into = before.clone()
    added = TRI.conv_projection_backward_into(into, go, x, h, w, p, mean, rstd, cfg, True)
    assert added.x is into
    torch.testing.assert_close(into, before + plain.x, rtol=1e-12, atol=1e-12)
    for name in plain._fields[1:]:
        torch.testing.assert_close(getattr(added, name), getattr(plain, name), rtol=0, atol=0)
    ref_into = before.clone()
    REF.conv_projection_backward_into(ref_into, go, x, h, w, p, mean, rstd, cfg, True)
    torch.testing.assert_close(ref_into, into, rtol=1e-12, atol=1e-12)


def test_backward_into_rejects_a_buffer_it_cannot_add_into():
    from cvt_kernels.backends.triton import conv_projection as cp

    x, p, cfg = make_inputs(2, 3, 3, 4, 4, 1, 1, torch.float64)
    mean, rstd = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
    go = torch.randn(2, 10, 4, dtype=x.dtype)
    stats = TRI._stats(p, mean, rstd, None)
    for bad in (torch.zeros(2, 10, 5, dtype=x.dtype), torch.zeros_like(x, dtype=torch.float32),
                torch.zeros(2, 4, 10, dtype=x.dtype).transpose(1, 2)):
        with pytest.raises(ValueError, match="dx_into"):
            cp.conv_projection_backward(go, x, 3, 3, p.conv_weight, stats, p.bn_weight,
                                        p.bn_bias, p.proj_weight, p.proj_bias, 1, True, True,
                                        dx_into=bad)


@pytest.mark.parametrize("batch,h,w,programs,blocks_per_program", [
    (2, 4, 4, None, None),
    # Many first-level programs and second-level steps, ragged at both levels: each
    # program's Chan merge and the tile merge keep the digits (13 blocks of 16 rows).
    (4, 7, 7, 7, 2),
])
def test_statistics_survive_a_large_mean(batch, h, w, programs, blocks_per_program):
    """mean 1e4, std 1e-2: sum-of-squares would lose every digit of the variance."""
    from cvt_kernels.backends.triton import conv_projection as cp

    if programs is not None:
        launch = cp.stats_launch(batch, h * w, 3, torch.float32, None)
        assert (launch.programs, launch.blocks_per_program) == (programs, blocks_per_program)
    x = 1e4 + 1e-2 * torch.randn(batch, h * w, 3, dtype=torch.float32, device=DEVICE)
    conv_w = torch.zeros(3, 1, 3, 3, device=DEVICE)
    conv_w[:, 0, 1, 1] = 1.0  # identity conv: y is x
    cfg = ProjectionConfig("dw_bn", 3, 1, 1, False)
    mean, var = TRI.conv_projection_stats(x, h, w, conv_w, cfg)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(dim=(0, 1)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), x64.var(dim=(0, 1), unbiased=False), rtol=1e-3,
                               atol=0)


def test_reductions_are_deterministic():
    """Fixed-order two-level reductions, no atomics: the same bits on every run."""
    x, p, cfg = make_inputs(4, 7, 7, 3, 5, 1, 1, torch.float32)
    runs = []
    for _ in range(2):
        mean, var = TRI.conv_projection_stats(x, 7, 7, p.conv_weight, cfg)
        rstd = torch.rsqrt(var + 1e-5)
        go = torch.ones(4, 50, 5, device=DEVICE)
        runs.append((mean, var) + tuple(
            TRI.conv_projection_backward(go, x, 7, 7, p, mean, rstd, cfg, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------- BatchNorm statistics in the kernels
def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def _conv_map(x, p, h, w, cfg):
    """The depthwise conv output (B, C, h', w') of the map tokens, in x's dtype."""
    rest = x[:, int(cfg.with_cls_token):]
    return torch.nn.functional.conv2d(rest.transpose(1, 2).reshape(x.shape[0], -1, h, w),
                                      p.conv_weight, None, cfg.stride, 1, 1, x.shape[2])


@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
def test_statistics_pass_updates_running_statistics_as_batchnorm2d(momentum):
    """The statistics kernels apply nn.BatchNorm2d's training update in place: the counter
    first, then ``(1 - f) * running + f * batch`` with the unbiased variance, ``f =
    momentum`` or ``1 / num_batches_tracked``. float64 to 1e-13: a skipped update, or a
    momentum rounded to float32 (1.5e-9 relative), fails. 7x7 maps at stride 2 with a
    class token, 20 channels: several programs and channel blocks, one counter step a call.
    The returned rstd is ``rsqrt(var + eps)`` with eps (1e-3 here) exact."""
    _need_interpreter_for(torch.float64)
    batch, h, w, cin = 4, 7, 7, 20
    x, p, cfg = make_inputs(batch, h, w, cin, 3, 1, 2, torch.float64)
    bn = torch.nn.BatchNorm2d(cin, eps=1e-3, momentum=momentum).double().to(DEVICE)
    with torch.no_grad():
        bn.running_mean.copy_(p.running_mean)
        bn.running_var.copy_(p.running_var)
    for step in range(3):
        xs = x * (step + 1) + step
        mean, rstd = TRI.conv_projection_batch_stats(xs, h, w, p, cfg, True, momentum, 1e-3)
        y = _conv_map(xs, p, h, w, cfg)
        bn.train()(y)
        assert p.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
        assert _rel_err(mean, y.mean(dim=(0, 2, 3))) <= 1e-13
        true_rstd = torch.rsqrt(y.var(dim=(0, 2, 3), unbiased=False) + 1e-3)
        assert _rel_err(rstd, true_rstd) <= 1e-13
        assert _rel_err(p.running_mean, bn.running_mean) <= 1e-13, step
        assert _rel_err(p.running_var, bn.running_var) <= 1e-13, step


def test_statistics_pass_without_running_statistics_or_counter():
    """``nn.BatchNorm2d``'s corner cases: no running statistics (the counter still moves in
    training), no counter with momentum None (factor 0: nothing moves), no counter with a
    momentum (the update), and no update at all outside training."""
    _need_interpreter_for(torch.float64)
    x, p, cfg = make_inputs(2, 5, 4, 20, 3, 0, 1, torch.float64)
    p = p._replace(num_batches_tracked=torch.tensor(5, device=DEVICE))
    y = _conv_map(x, p, 5, 4, cfg)
    batch_mean = y.mean(dim=(0, 2, 3))
    unbiased = y.var(dim=(0, 2, 3), unbiased=True)

    no_running = p._replace(running_mean=None, running_var=None)
    mean, _ = TRI.conv_projection_batch_stats(x, 5, 4, no_running, cfg, True, 0.1, 1e-5)
    assert no_running.num_batches_tracked.item() == 6 and _rel_err(mean, batch_mean) <= 1e-13

    for momentum in (None, 0.1):
        q = p._replace(running_mean=p.running_mean.clone(), running_var=p.running_var.clone(),
                       num_batches_tracked=None)
        TRI.conv_projection_batch_stats(x, 5, 4, q, cfg, True, momentum, 1e-5)
        if momentum is None:
            assert torch.equal(q.running_mean, p.running_mean)
            assert torch.equal(q.running_var, p.running_var)
        else:
            assert _rel_err(q.running_mean, 0.9 * p.running_mean + 0.1 * batch_mean) <= 1e-13
            assert _rel_err(q.running_var, 0.9 * p.running_var + 0.1 * unbiased) <= 1e-13

    q = p._replace(running_mean=p.running_mean.clone(), running_var=p.running_var.clone(),
                   num_batches_tracked=p.num_batches_tracked.clone())
    count = q.num_batches_tracked.item()
    TRI.conv_projection_batch_stats(x, 5, 4, q, cfg, False, 0.1, 1e-5)
    assert torch.equal(q.running_mean, p.running_mean) and torch.equal(q.running_var,
                                                                       p.running_var)
    assert q.num_batches_tracked.item() == count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_statistics_pass_updates_half_precision_buffers(dtype):
    """A model converted with ``.to(dtype)`` holds its running statistics in ``dtype``: the
    kernel loads them, updates in float32 and stores once, within one ulp of the update
    computed in float64 (which moves them by far more). (No tl.dot in these kernels:
    bfloat16 is right under the interpreter too.)"""
    x, p, cfg = make_inputs(2, 5, 5, 20, 3, 0, 1, dtype)
    rm0, rv0 = p.running_mean.clone(), p.running_var.clone()
    mean, rstd = TRI.conv_projection_batch_stats(x, 5, 5, p, cfg, True, 0.1, 1e-5)
    p64 = p._replace(conv_weight=p.conv_weight.double())
    y = _conv_map(x.double(), p64, 5, 5, cfg)
    m64, v64 = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=True)
    assert mean.dtype == rstd.dtype == torch.float32
    assert _rel_err(mean, m64) <= 1e-5
    for ours, before, batch in ((p.running_mean, rm0, m64), (p.running_var, rv0, v64)):
        expected = 0.9 * before.double() + 0.1 * batch
        assert ours.dtype == dtype
        ulp = torch.finfo(dtype).eps * expected.abs() + torch.finfo(dtype).tiny
        assert ((ours.double() - expected).abs() <= ulp).all(), (ours, expected)
        assert ((before.double() - expected).abs() > 4 * ulp).any()  # the update shows


@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float16], ids=dtype_id)
def test_eval_kernels_read_the_running_buffers_at_each_call(stats_dtype):
    """Eval (mean/rstd None): the forward and backward kernels read running_mean and
    running_var as they are (float16 buffers beside float64 inputs too) with eps, at
    every call: writes through ``.data`` (no version bump) are seen by the next call."""
    _need_interpreter_for(torch.float64)
    x, p, cfg = make_inputs(2, 4, 5, 20, 6, 1, 2, torch.float64)
    p = p._replace(running_mean=p.running_mean.to(stats_dtype),
                   running_var=p.running_var.to(stats_dtype))
    outs = []
    for _ in range(2):
        ours = TRI.conv_projection_forward(x, 4, 5, p, None, None, cfg, 1e-3)
        ref = REF.conv_projection_forward(x, 4, 5, p, None, None, cfg, 1e-3)
        _close(ours, ref, "out", x.dtype)
        go = torch.randn_like(ref)
        grads = TRI.conv_projection_backward(go, x, 4, 5, p, None, None, cfg, False, 1e-3)
        ref_grads = REF.conv_projection_backward(go, x, 4, 5, p, None, None, cfg, False, 1e-3)
        for name, a, b in zip(grads._fields, grads, ref_grads):
            _close(a, b, f"d{name}", x.dtype)
        outs.append(ours)
        p.running_mean.data.add_(0.5)
        p.running_var.data.mul_(2.0)
    assert (outs[0] - outs[1]).abs().max() > 0.1


def test_backward_writes_each_gradient_in_its_parameter_dtype():
    """float16 weights with float32 BatchNorm affine (autocast's mix): every gradient comes
    out of the kernels in its parameter's dtype, each in its own storage."""
    x, p, cfg = make_inputs(2, 4, 4, 20, 6, 1, 1, torch.float16)
    p = p._replace(bn_weight=p.bn_weight.float(), bn_bias=p.bn_bias.float())
    mean, var = TRI.conv_projection_stats(x, 4, 4, p.conv_weight, cfg)
    rstd = torch.rsqrt(var + 1e-5)
    go = torch.randn(2, 17, 6, dtype=torch.float16, device=DEVICE)
    ours = TRI.conv_projection_backward(go, x, 4, 4, p, mean, rstd, cfg, True)
    theirs = REF.conv_projection_backward(go, x, 4, 4, p, mean, rstd, cfg, True)
    params = dict(zip(("x",) + p._fields, (x,) + tuple(p)))
    for name, a, b in zip(ours._fields, ours, theirs):
        assert a.dtype == b.dtype == params[name].dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2,
                                   atol=1e-2 * b.float().abs().max().item(), msg=name)
    assert len({g.data_ptr() for g in ours}) == len(ours)


# CvT-13/21/W24 projection shapes (batch-independent part): (h, C_in, C_out, stride, cls)
_CVT_SHAPES = [(56, 64, 64, 1, 0), (56, 64, 64, 2, 0), (28, 192, 192, 1, 0),
               (28, 192, 192, 2, 0), (14, 384, 384, 1, 1), (14, 384, 384, 2, 1),
               (56, 192, 192, 1, 0), (28, 768, 768, 2, 0), (14, 1024, 1024, 2, 1)]


@pytest.mark.parametrize("arch", [90, 80, 86, 89])
def test_gpu_launch_plans(arch):
    """What the launchers would pick on each GPU, checked without launching: the second
    levels take at most ~64 partials' worth of serial steps (tiles of 64), the first levels
    fill the GPU, and every config fits the target's shared memory per block (sm_86/sm_89:
    101,376 B, where the big weight-gradient tile would not launch)."""
    from cvt_kernels.backends.triton import _runtime, configs
    from cvt_kernels.backends.triton import conv_projection as cp

    target = _runtime.simulated_target(arch)
    with _runtime.simulate(target):
        assert _runtime.target_of(torch.empty(1)) == target
    reduce_p = configs.GPU_REDUCE.block_p
    for batch in (1, 64, 256):
        for h, c_in, c_out, stride, cls in _CVT_SHAPES:
            ho = (h - 1) // stride + 1
            n_out = ho * ho
            s = cp.stats_launch(batch, n_out, c_in, torch.bfloat16, target)
            b = cp.backward_launch(batch, n_out, cls, c_in, c_out, torch.bfloat16, target)
            for programs, blocks in ((s.programs, s.blocks_per_program),
                                     (b.token_programs, b.token_blocks_per_program),
                                     (b.conv_programs, b.conv_blocks_per_program)):
                assert programs <= 4 * target.sm_count
                assert triton.cdiv(programs, reduce_p) <= 9  # second-level serial steps
            if batch >= 64:  # first levels fill the GPU
                assert s.programs * s.channel_blocks >= target.sm_count
            # d_proj_weight comes from the grad-tokens kernel at C_out 64 (stage 1)
            assert b.fused_weight_grad == (c_out <= 64)
            for dtype in (torch.float16, torch.float32):
                f = cp.forward_launch(batch * (n_out + cls), c_in, c_out, dtype, target)
                w = cp.backward_launch(batch, n_out, cls, c_in, c_out, dtype, target).weight
                table = configs.GPU_WEIGHT_GRAD_CONFIGS[dtype.itemsize]
                fixed = (configs.GPU_WEIGHT_GRAD_FMA, *configs.GPU_WEIGHT_GRAD_PRE_HOPPER.values())
                if w not in fixed:  # IEEE float32 / below sm_90: small fixed tiles
                    assert dict(table)[w] <= target.smem_per_block
                if target.arch < 90 and dtype.itemsize == 2:
                    assert w == configs.GPU_WEIGHT_GRAD_PRE_HOPPER[2]
                if f.num_k:
                    smem = {cfg: m for cfg, _, m in
                            configs.GPU_RESIDENT_FORWARD[dtype.itemsize]}[f.config]
                    assert smem <= target.smem_per_block
                    assert f.num_k * f.config.block_k >= c_in
    # CvT's C_in 64/192/384 keep the normalized row tile resident (built once per row
    # tile) in 16-bit on every target; in float32, 384 channels need 136 KB of shared
    # memory for it: resident on sm_80/sm_90, the K loop on sm_86/sm_89 (101,376 B).
    for c_in in (64, 192, 384):
        assert cp.forward_launch(64 * 3136, c_in, c_in, torch.bfloat16, target).num_k > 0
    # float32 with TF32 (tensor cores) may keep it; at IEEE (FMA dots, torch's default) the
    # forward takes the K loop and the weight gradient is not fused (both spilled there).
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        f32 = cp.forward_launch(64 * 197, 384, 384, torch.float32, target)
        assert (f32.num_k > 0) == (arch in (80, 90))
        assert cp.backward_launch(64, 3136, 0, 64, 64, torch.float32,
                                  target).fused_weight_grad
        torch.backends.cuda.matmul.allow_tf32 = False
        assert cp.forward_launch(64 * 3136, 64, 64, torch.float32, target).num_k == 0
        ieee = cp.backward_launch(64, 3136, 0, 64, 64, torch.float32, target)
        assert not ieee.fused_weight_grad and ieee.weight == (
            configs.GPU_WEIGHT_GRAD_FMA if arch >= 90 else configs.GPU_WEIGHT_GRAD_PRE_HOPPER[4])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_launch_geometry_caches_key_on_tf32_and_target():
    """The launch geometries are computed once per shape (lru caches): the TF32 flag and the
    target are in the key, so the same sizes under another flag or target get that one's
    geometry, whichever was asked first (a cache serving a stale one fails here)."""
    from cvt_kernels.backends.triton import _runtime
    from cvt_kernels.backends.triton import conv_projection as cp
    from cvt_kernels.backends.triton import layer_norm as ln

    sizes = (64, 3136, 0, 64, 64, torch.float32)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in (90, 86):
            target = _runtime.simulated_target(arch)
            for order in ((True, False), (False, True)):
                cp._forward_launch.cache_clear()
                cp._backward_launch.cache_clear()
                got = {}
                for tf32 in order:
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    got[tf32] = (cp.forward_launch(64 * 3136, 64, 64, torch.float32, target),
                                 cp.backward_launch(*sizes, target))
                    assert got[tf32] == (
                        cp._forward_launch.__wrapped__(64 * 3136, 64, 64, torch.float32,
                                                       target, tf32),
                        cp._backward_launch.__wrapped__(*sizes, target, tf32))
                # TF32 keeps the row tile resident and fuses the weight gradient; IEEE not
                assert got[True][0].num_k > 0 and got[False][0].num_k == 0
                assert got[True][1].fused_weight_grad and not got[False][1].fused_weight_grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    # The target: the interpreter's (None) and a GPU's geometries differ for the same sizes.
    cpu = torch.empty(1)
    for target in (None, _runtime.simulated_target(90), None):
        stats = cp.stats_launch(64, 3136, 64, torch.bfloat16, target)
        assert stats == cp.stats_launch.__wrapped__(64, 3136, 64, torch.bfloat16, target)
        with (_runtime.simulate(target) if target else contextlib.nullcontext()):
            rows = (ln.forward_launch(64 * 3136, 64, cpu), ln.backward_launch(64 * 3136, 64, cpu))
        assert rows == (ln._forward_launch.__wrapped__(64 * 3136, 64, target),
                        ln._backward_launch.__wrapped__(64 * 3136, 64, target))
    assert (cp.stats_launch(64, 3136, 64, torch.bfloat16, None)
            != cp.stats_launch(64, 3136, 64, torch.bfloat16, _runtime.simulated_target(90)))


def test_launchers_reject_a_wrong_geometry_before_any_launch(monkeypatch):
    """The launch plans are built from the call's sizes: tokens that do not fill the map, or
    a stride the kernels lack, raise a ValueError naming them before anything launches (and
    nothing is cached for them: the right call afterwards runs)."""
    from cvt_kernels.backends.triton import conv_projection as cp

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched")

    monkeypatch.setattr(cp, "_stats_partials_kernel", NoLaunch())
    monkeypatch.setattr(cp, "_forward_kernel", NoLaunch())
    monkeypatch.setattr(cp, "_grad_tokens_kernel", NoLaunch())
    c = 8
    cw, pw = torch.randn(c, 1, 3, 3), torch.randn(c, c)
    stats = cp.BatchNormStats(torch.zeros(c), torch.ones(c))
    for x, stride, message in ((torch.randn(1, 15, c), 1, "does not hold 4x4 tokens"),
                               (torch.randn(1, 16, c), 3, "stride 3 is not supported")):
        with pytest.raises(ValueError, match=message):
            cp.conv_projection_stats(x, 4, 4, cw, stride, False)
        with pytest.raises(ValueError, match=message):
            cp.conv_projection_forward(x, 4, 4, cw, stats, None, None, pw, None, stride, False)
        with pytest.raises(ValueError, match=message):
            cp.conv_projection_backward(torch.randn(1, 16, c), x, 4, 4, cw, stats, None, None,
                                        pw, None, stride, False, True)
    with pytest.raises(ValueError, match="grad_out of shape"):
        cp.conv_projection_backward(torch.randn(1, 15, c), torch.randn(1, 16, c), 4, 4, cw,
                                    stats, None, None, pw, None, 1, False, True)


def test_launch_plans_key_on_tf32_and_target(monkeypatch):
    """What the launchers cache per call signature (grids and compile-time arguments) keys
    on the TF32 flag and the target: on a simulated sm_90, float32 launches at the flag of
    the call, whichever flag came first, with the geometry the uncached functions give."""
    from cvt_kernels.backends.triton import _runtime
    from cvt_kernels.backends.triton import conv_projection as cp

    launched = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.name] = (grid, kwargs)
            return launch

    for name in ("_forward_kernel", "_grad_tokens_kernel", "_grad_conv_out_kernel",
                 "_grad_input_kernel", "_grad_proj_weight_kernel", "_param_grads_kernel"):
        monkeypatch.setattr(cp, name, Recorder(name))
    batch, h, w, c = 2, 4, 4, 64
    x = torch.randn(batch, h * w, c)
    cw, bw, bb = torch.randn(c, 1, 3, 3), torch.randn(c), torch.randn(c)
    pw, pb = torch.randn(c, c), torch.randn(c)
    stats = cp.BatchNormStats(torch.zeros(c), torch.ones(c))
    grad = torch.randn(batch, h * w, c)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with _runtime.simulate(_runtime.simulated_target(90)) as target:
            for order in ((True, False), (False, True)):
                cp._forward_plan.cache_clear()
                cp._backward_plan.cache_clear()
                for tf32 in order:
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    cp.conv_projection_forward(x, h, w, cw, stats, bw, bb, pw, pb, 1, False)
                    cp.conv_projection_backward(grad, x, h, w, cw, stats, bw, bb, pw, pb, 1,
                                                False, True)
                    fwd = cp._forward_launch.__wrapped__(batch * h * w, c, c, torch.float32,
                                                         target, tf32)
                    bwd = cp._backward_launch.__wrapped__(batch, h * w, 0, c, c,
                                                          torch.float32, target, tf32)
                    grid, kw = launched.pop("_forward_kernel")
                    precision = "tf32" if tf32 else "ieee"
                    assert kw["DOT_PRECISION"] == precision
                    assert (kw["RESIDENT"], kw["BLOCK_M"], kw["BLOCK_N"]) == (
                        fwd.num_k > 0, fwd.config.block_m, fwd.config.block_n)
                    assert grid == (-(-batch * h * w // fwd.config.block_m), fwd.n_split)
                    grid, kw = launched.pop("_grad_tokens_kernel")
                    assert kw["DOT_PRECISION"] == precision
                    assert kw["FUSE_WEIGHT_GRAD"] == bwd.fused_weight_grad == tf32
                    assert grid[0] == bwd.token_programs
                    assert ("_grad_proj_weight_kernel" in launched) == (not tf32)
                    launched.clear()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    cp.conv_projection_forward(x, h, w, cw, stats, bw, bb, pw, pb, 1, False)
    _, kw = launched.pop("_forward_kernel")  # the interpreter's own tiles
    interp = cp._forward_launch.__wrapped__(batch * h * w, c, c, torch.float32, None,
                                            allow_tf32)
    assert (kw["BLOCK_M"], kw["BLOCK_N"]) == (interp.config.block_m, interp.config.block_n)


def test_launch_geometry_fills_use_the_flag_of_their_key():
    """A geometry cache's fill computes with the TF32 flag of its key, not a second read of
    the global flag (which another thread may have flipped since the key was made)."""
    from cvt_kernels.backends.triton import _runtime
    from cvt_kernels.backends.triton import conv_projection as cp

    target = _runtime.simulated_target(90)
    sizes = (64, 3136, 0, 64, 64, torch.float32, target)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            for tf32 in (True, False):
                fwd = cp._forward_launch.__wrapped__(64 * 3136, 64, 64, torch.float32, target,
                                                     tf32)
                bwd = cp._backward_launch.__wrapped__(*sizes, tf32)
                assert (fwd.num_k > 0) == tf32, (flag, tf32)
                assert bwd.fused_weight_grad == tf32, (flag, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_weight_grad_config_follows_shared_memory():
    """The weight-gradient GEMM takes the first candidate that fits the target's shared
    memory per block (a made-up Hopper part with 20 KB takes the 64-row tile; below sm_90
    the 16-bit weight gradient takes its own tile, which spills on neither Triton)."""
    from cvt_kernels.backends.triton import _runtime, configs
    from cvt_kernels.backends.triton import conv_projection as cp

    big, small = (cfg for cfg, _ in configs.GPU_WEIGHT_GRAD_CONFIGS[2])
    for target, expected in ((_runtime.simulated_target(90), big),
                             (_runtime.Target(90, 132, 20000), small),
                             (_runtime.simulated_target(86),
                              configs.GPU_WEIGHT_GRAD_PRE_HOPPER[2])):
        with _runtime.simulate(target):
            x = torch.empty(1)
            assert cp.backward_launch(64, 3136, 0, 64, 64, torch.bfloat16,
                                      _runtime.target_of(x)).weight == expected


def _run_ops(backend, x, h, w, p, cfg, training):
    """Output and gradients of ops.conv_projection on fresh copies of the leaves."""
    x = x.detach().clone().requires_grad_(True)
    leaves = {k: getattr(p, k).detach().clone().requires_grad_(True)
              for k in ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")}
    stats = {k: getattr(p, k).clone() for k in ("running_mean", "running_var",
                                                "num_batches_tracked")}
    params = p._replace(**leaves, **stats)
    with cvt_kernels.use_backend(backend):
        out = ops.conv_projection(x, h, w, params, cfg, training=training)
    # A random cotangent (the same in every dtype). Not one constant per channel: through
    # the Linear that is constant over tokens, and training BatchNorm's backward then gives
    # dx = 0 (and dconv_w = 0) in exact math, so the 2x rule compared rounding noise with
    # rounding noise (the first GPU run failed on exactly that: dx 1.3e-4 vs 2.8e-6 where
    # the truth was 1e-14).
    g = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out))
    return [out, x.grad] + [leaves[k].grad for k in leaves] + [stats["running_mean"],
                                                              stats["running_var"]]


@pytest.mark.parametrize("training", [True, False])
def test_float16_within_twice_pytorch_error(training):
    """fp16 through the ops (stats, forward, backward): error vs the float64 truth at most
    2x that of the torch backend in fp16. (bf16 takes the same code path; GPU tier.)"""
    x, p, cfg = make_inputs(2, 4, 4, 16, 16, 1, 2, torch.float16)
    names = ["out", "dx", "dconv_w", "dbn_w", "dbn_b", "dproj_w", "dproj_b", "running_mean",
             "running_var"]
    ours = _run_ops("triton", x, 4, 4, p, cfg, training)
    pytorch = _run_ops("torch", x, 4, 4, p, cfg, training)
    p64 = p._replace(**{k: getattr(p, k).double() for k in p._fields
                        if k != "num_batches_tracked"})
    truth = _run_ops("reference", x.double(), 4, 4, p64, cfg, training)
    for name, a, b, t in zip(names, ours, pytorch, truth):
        assert a.dtype == b.dtype, name
        assert_close_by_rule(a, b, t, name, atol=1e-3 * t.abs().max().item())


GRADCHECK_CASES = [(True, 1, True), (False, 2, True), (True, 2, False)]  # cls, stride, training


@pytest.mark.parametrize("cls,stride,training", GRADCHECK_CASES)
def test_gradcheck_through_ops(cls, stride, training):
    _need_interpreter_for(torch.float64)
    h, w = 3, 2
    x, p, cfg = make_inputs(2, h, w, 3, 2, int(cls), stride, torch.float64, requires_grad=True)
    names = ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")

    def fn(x, *weights):
        params = p._replace(**dict(zip(names, weights)))
        return ops.conv_projection(x, h, w, params, cfg, training=training)

    with cvt_kernels.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, *(getattr(p, k) for k in names)),
                                        fast_mode=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_batchnorm2d(momentum):
    cin, h, w = 5, 5, 4
    conv = torch.nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False).double().to(DEVICE)
    bn = torch.nn.BatchNorm2d(cin, momentum=momentum).double().to(DEVICE)
    lin = torch.nn.Linear(cin, 7).double().to(DEVICE)
    if not INTERPRET:  # float64 is interpreter-only; float32 on a GPU
        conv, bn, lin = conv.float(), bn.float(), lin.float()
    dtype = lin.weight.dtype
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    params = ProjectionParams(conv.weight, bn.weight, bn.bias, rm, rv, nbt, lin.weight, lin.bias)
    cfg = ProjectionConfig("dw_bn", 3, 2, 1, False)
    to_map = lambda x: x.transpose(1, 2).reshape(x.shape[0], cin, h, w)  # noqa: E731
    with cvt_kernels.use_backend("triton"), torch.no_grad():
        for step in range(3):
            x = torch.randn(3, h * w, cin, dtype=dtype, device=DEVICE) * (step + 1) + step
            ours = ops.conv_projection(x, h, w, params, cfg, training=True, momentum=momentum)
            ref = lin(bn.train()(conv(to_map(x))).flatten(2).transpose(1, 2))
            torch.testing.assert_close(ours, ref)
            torch.testing.assert_close(rm, bn.running_mean)
            torch.testing.assert_close(rv, bn.running_var)
            assert nbt.item() == bn.num_batches_tracked.item() == step + 1
        x = torch.randn(2, h * w, cin, dtype=dtype, device=DEVICE)
        ours = ops.conv_projection(x, h, w, params, cfg, training=False, momentum=momentum)
        ref = lin(bn.eval()(conv(to_map(x))).flatten(2).transpose(1, 2))
        torch.testing.assert_close(ours, ref)


def test_fused_attention_with_triton_projections_matches_reference(monkeypatch):
    """FusedConvAttention with the q/k/v projections on triton (attention itself has no
    Triton kernel yet, so only it is routed to torch) equals the reference module."""
    import cvt_kernels.modules as modules

    dtype = torch.float64 if INTERPRET else torch.float32
    ref = make_attention(dim_in=8, dim_out=8, heads=2, cls=True, dtype=dtype).to(DEVICE)
    fused = cvt_kernels.FusedConvAttention.from_reference(make_attention(
        dim_in=8, dim_out=8, heads=2, cls=True, dtype=dtype).to(DEVICE))
    fused.load_state_dict(ref.state_dict())
    attention = modules.attention

    def attention_on_torch(*args, **kwargs):
        with cvt_kernels.use_backend("torch"):
            return attention(*args, **kwargs)

    monkeypatch.setattr(modules, "attention", attention_on_torch)
    h, w = 3, 3
    x = torch.randn(2, 1 + h * w, 8, dtype=dtype, device=DEVICE)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = ref(x_ref, h, w)
    with cvt_kernels.use_backend("triton"):
        out = fused(x_ours, h, w)
    torch.testing.assert_close(out, out_ref)
    go = torch.randn_like(out)
    out_ref.backward(go)
    out.backward(go)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    ours = dict(fused.named_parameters())
    for name, param in ref.named_parameters():
        torch.testing.assert_close(ours[name].grad, param.grad, msg=name)
    ours_buffers = dict(fused.named_buffers())
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(ours_buffers[name], buf, msg=name)


# ---------------------------------------------------------------------- dispatcher reasons
def _reasons(x, cfg):
    return TRI.conv_projection_reasons(x, cfg, True)


def test_declines_with_reasons():
    x = torch.randn(1, 4, 8, device=DEVICE)
    ok = ProjectionConfig("dw_bn", 3, 2, 1, False)
    with cvt_kernels.use_backend("triton"):
        assert _reasons(x, ok) == []
        assert any("method 'avg'" in r for r in _reasons(x, ProjectionConfig("avg", 3, 2, 1)))
        assert any("kernel_size 5" in r for r in _reasons(x, ProjectionConfig("dw_bn", 5, 1, 2)))
        assert any("stride 3" in r for r in _reasons(x, ProjectionConfig("dw_bn", 3, 3, 1)))
        assert any("int" in r for r in _reasons(x.to(torch.int32), ok))
        assert TRI.attention_reasons(x, x, x, 1, 0.0) == []
        assert any("dropout" in r for r in TRI.attention_reasons(x, x, x, 1, 0.1))
    if DEVICE == "cpu":
        # Not forced: a CPU tensor is declined even under the interpreter ...
        assert any("CUDA" in r for r in _reasons(x, ok))
        # ... so auto mode on CPU picks torch for both ops.
        with cvt_kernels.use_backend("auto"):
            assert backends.select("conv_projection", lambda b: b.conv_projection_reasons(
                x, ok, True)).name == "torch"
            assert backends.select("attention", lambda b: b.attention_reasons(
                x, x, x, 1, 0.0)).name == "torch"


def test_forced_triton_raises_for_avg_projection():
    x, p, _ = make_inputs(1, 3, 3, 4, 4, 0, 2, torch.float32)
    p = p._replace(conv_weight=None, bn_weight=None, bn_bias=None, running_mean=None,
                   running_var=None, num_batches_tracked=None)
    with cvt_kernels.use_backend("triton"), pytest.raises(BackendUnavailableError,
                                                          match="only 'dw_bn'"):
        ops.conv_projection(x, 3, 3, p, ProjectionConfig("avg", 3, 2, 1, False))


# ------------------------------------------------------------------------- compile check
def test_launch_check_compiles_the_statistics_kernels_for_sm90():
    """The H100 readiness check (the launchers' own calls compiled for sm_90, cuobjdump, no
    GPU) on its cheapest kernels. In a subprocess: under TRITON_INTERPRET=1 this process
    holds interpreter-only kernels."""
    start = time.time()
    run = run_launch_check("--quick", "--arch", "90", "--dtype", "fp16", "--only",
                           "_stats_(partials|combine)_kernel", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "_stats_combine_kernel" in run.stdout and "no spills" in run.stdout
    # the second level's serial loop at CvT-13 shapes (issue 16's target: ~64 partials)
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("longest serial"))
    assert int(line.split(":")[1].split()[0]) <= 64, line
    assert time.time() - start < 240


# ------------------------------------------------------------------------------ GPU tier
GPU_SHAPES = [
    # batch, h, w, C_in, C_out, cls, stride: CvT-13 stage 1 (q, kv) and stage 3 (kv)
    (8, 56, 56, 64, 64, 0, 1),
    (8, 56, 56, 64, 64, 0, 2),
    (8, 14, 14, 384, 384, 1, 2),
]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="realistic shapes are too slow for the interpreter")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=mode_id)
def test_gpu_realistic_shapes_within_twice_pytorch_error(shape, dtype, training):
    batch, h, w, cin, cout, cls, stride = shape
    x, p, cfg = make_inputs(batch, h, w, cin, cout, cls, stride, dtype)
    names = ["out", "dx", "dconv_w", "dbn_w", "dbn_b", "dproj_w", "dproj_b", "running_mean",
             "running_var"]
    ours = _run_ops("triton", x, h, w, p, cfg, training)
    pytorch = _run_ops("torch", x, h, w, p, cfg, training)
    p64 = p._replace(**{k: getattr(p, k).double() for k in p._fields
                        if k != "num_batches_tracked"})
    truth = _run_ops("reference", x.double(), h, w, p64, cfg, training)
    for name, a, b, t in zip(names, ours, pytorch, truth):
        assert a.dtype == b.dtype, name
        assert_close_by_rule(a, b, t, name, atol=1e-3 * t.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs compiled kernels")
def test_gpu_bfloat16_dot_path():
    """The bf16 tl.dot path the interpreter cannot check, against the float32 reference."""
    x, p, cfg = make_inputs(2, 7, 9, 24, 40, 1, 2, torch.bfloat16)
    mean, var = TRI.conv_projection_stats(x, 7, 9, p.conv_weight, cfg)
    rstd = torch.rsqrt(var + 1e-5)
    out = TRI.conv_projection_forward(x, 7, 9, p, mean, rstd, cfg)
    ref = REF.conv_projection_forward(x, 7, 9, p, mean, rstd, cfg)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2 * ref.abs().max().item())
