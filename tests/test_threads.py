"""Thread safety: modules and ops called from many threads at once give the single-threaded
answers, and autotuned Triton launches never run concurrently (Triton's Autotuner keeps
per-call state on the shared kernel object: triton-lang/triton#11494)."""

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention

from conftest import CPU_BACKENDS, make_attention

THREADS = 8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_forward_backward_matches_single_threaded(backend):
    """Each thread owns a module (train mode: each updates its own running statistics) and
    an input; all run at once through the same dispatcher and ops."""
    base = make_attention(training=True)
    inputs = [torch.randn(2, 1 + 5 * 4, 16, dtype=torch.float64) for _ in range(THREADS)]

    def run(i):
        module = FusedConvAttention.from_reference(copy.deepcopy(base))
        x = inputs[i].clone().requires_grad_()
        with cvt_kernels.use_backend(backend):  # per thread: each forces its own
            out = module(x, 5, 4)
        out.square().sum().backward()
        return out.detach(), x.grad, module.conv_proj_k.bn.running_mean.clone()

    expected = [run(i) for i in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, range(THREADS)))
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_autotuned_launches_are_serialized():
    triton_attention = pytest.importorskip("cvt_kernels.backends.triton.attention")
    active, overlaps = [0], []
    lock = threading.Lock()

    class FakeTuned:  # stands in for triton.autotune(...)(kernel): records overlapping calls
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                with lock:
                    active[0] += 1
                    overlaps.append(active[0] > 1)
                time.sleep(0.002)  # the autotuner's benchmarking window
                with lock:
                    active[0] -= 1
            return launch

    tuned = FakeTuned()

    def call(_):
        triton_attention._launch(None, tuned, {}, False, lambda meta: (1,))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(call, range(4 * THREADS)))
    assert len(overlaps) == 4 * THREADS and not any(overlaps)
