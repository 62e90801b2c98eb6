"""Numerical safety and resource behaviour on every CPU backend: NaN/Inf propagate like the
reference, BatchNorm statistics survive a large mean, results are deterministic, repeated
calls neither grow memory nor leave state on the module."""

import copy
import gc
import resource
import warnings

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, ops

from conftest import CPU_BACKENDS, make_attention
from test_ops import projection_inputs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_reference(backend, training, bad):
    ref = make_attention(cls=True, training=training)
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 1 + 4 * 4, 16, dtype=torch.float64)
    x[1, 5, 3] = bad
    expected = ref(x, 4, 4)
    with cvt_kernels.use_backend(backend):
        out = ours(x, 4, 4)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_statistics_with_large_mean_and_tiny_variance(backend):
    """float32 input around 1000 with spread 1e-3: naive E[y^2] - E[y]^2 loses everything."""
    x, params, cfg = projection_inputs(cin=3, cout=4, h=6, w=6, batch=4, cls=False,
                                       dtype=torch.float32, requires_grad=False)
    x = 1000.0 + 1e-3 * torch.randn_like(x)
    x64 = x.double()
    p64 = params._replace(**{k: (getattr(params, k).double() if getattr(params, k) is not None
                                 and getattr(params, k).is_floating_point() else getattr(params, k))
                             for k in params._fields})
    p64 = p64._replace(running_mean=p64.running_mean.clone(), running_var=p64.running_var.clone(),
                       num_batches_tracked=p64.num_batches_tracked.clone())
    with cvt_kernels.use_backend("reference"):
        truth = ops.conv_projection(x64, 6, 6, p64, cfg, training=True)
    with cvt_kernels.use_backend(backend):
        out = ops.conv_projection(x, 6, 6, params, cfg, training=True)
    # The conv of ~1000 with a spread of 1e-3 leaves ~5e-5 relative precision in float32.
    rel = ((out.double() - truth).abs().max() / truth.abs().max()).item()
    assert rel < 5e-2, rel
    torch.testing.assert_close(params.running_var.double(), p64.running_var, rtol=5e-2, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_equal_and_peaked_scores(backend):
    q = torch.zeros(1, 5, 8, dtype=torch.float64)
    v = torch.randn(1, 7, 8, dtype=torch.float64)
    with cvt_kernels.use_backend(backend):
        flat = ops.attention(q, torch.randn(1, 7, 8, dtype=torch.float64), v, 2, 1.0)
    torch.testing.assert_close(flat, v.mean(1, keepdim=True).expand(1, 5, 8))
    k = torch.zeros(1, 7, 8, dtype=torch.float64)
    k[0, 3] = 100.0
    with cvt_kernels.use_backend(backend):
        peaked = ops.attention(torch.ones(1, 5, 8, dtype=torch.float64), k, v, 1, 1.0)
    torch.testing.assert_close(peaked, v[:, 3:4].expand(1, 5, 8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    ours = FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    x = torch.randn(3, 1 + 5 * 5, 16)

    def run():
        ours.zero_grad()
        xi = x.clone().requires_grad_()
        with cvt_kernels.use_backend(backend):
            out = ours(xi, 5, 5)
        out.square().sum().backward()
        return [out.detach(), xi.grad] + [p.grad.clone() for p in ours.parameters()]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every object pokes deprecated aliases
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_calls_do_not_grow_memory_or_module_state(backend):
    ours = FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    x = torch.randn(2, 1 + 3 * 3, 16)
    state_before = set(vars(ours)) | set(ours.state_dict())

    def step():
        xi = x.clone().requires_grad_()
        with cvt_kernels.use_backend(backend):
            ours(xi, 3, 3).sum().backward()

    for _ in range(20):  # warm up allocator and dispatcher caches
        step()
    tensors_before = _live_tensors()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(1000):
        step()
    # Exact: no Python-visible tensor survives a call (saved activations, caches).
    assert _live_tensors() == tensors_before
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 20, f"max RSS grew by {grown_mb:.1f} MB over 1000 calls"
    assert set(vars(ours)) | set(ours.state_dict()) == state_before
