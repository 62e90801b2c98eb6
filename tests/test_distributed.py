"""Data parallelism on CPU: two processes (gloo) under DistributedDataParallel.

* An accelerated CvT under DDP gives the gradients and running statistics of the
  unaccelerated model under the same DDP setup.
* ``accelerate(model, sync_bn=True)``: BatchNorm uses the statistics of the global batch, so
  two processes with half the batch each reproduce one process with the whole batch
  (outputs, gradients, running statistics).
"""

import copy
import datetime
import faulthandler
import gc
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import cvt_kernels
from cvt_kernels import models

from conftest import randomize_bn

WORLD = 2
LOCAL_BATCH = 2
# Narrow CvT-13 (all three stages, class token in stage 3), no drop path: a per-process
# random mask could not match the mask of one process holding the whole batch.
NARROW = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 1],
          "DROP_PATH_RATE": [0.0, 0.0, 0.0]}
TOL = dict(rtol=1e-9, atol=1e-11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.cvt_13(num_classes=5, img_size=32, spec_overrides=NARROW).double().train()
    randomize_bn(model)
    return model


def _global_batch() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))


def _step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out.detach()


def _params_and_buffers(model):
    inner = model.module if isinstance(model, DDP) else model
    grads = {n: p.grad for n, p in inner.named_parameters()}
    return grads, dict(inner.named_buffers())


def _assert_same(ours, ref, what):
    (g1, b1), (g2, b2) = ours, ref
    assert g1.keys() == g2.keys()
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], **TOL, msg=f"{what}: grad {name}")
    for name in b2:
        torch.testing.assert_close(b1[name], b2[name], **TOL, msg=f"{what}: buffer {name}")


def _worker(rank: int, port: int) -> None:
    # A native abort (a gloo thread) then prints where each Python thread was.
    faulthandler.enable()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        base = _model()
        x_all = _global_batch()
        x = x_all[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]

        # 1. accelerated vs unaccelerated, both under DDP, two steps.
        eager = DDP(copy.deepcopy(base))
        fused = DDP(cvt_kernels.accelerate(copy.deepcopy(base))[0])
        for _ in range(2):
            for m in (eager, fused):
                m.zero_grad(set_to_none=True)
            out_e, out_f = _step(eager, x), _step(fused, x)
            torch.testing.assert_close(out_f, out_e, **TOL)
            _assert_same(_params_and_buffers(fused), _params_and_buffers(eager), "DDP")

        # 2. sync_bn: two half batches == one whole batch in one process.
        whole = copy.deepcopy(base)
        out_whole = _step(whole, x_all)
        synced = DDP(cvt_kernels.accelerate(copy.deepcopy(base), sync_bn=True)[0])
        out_synced = _step(synced, x)
        torch.testing.assert_close(out_synced, out_whole[rank * LOCAL_BATCH:
                                                         (rank + 1) * LOCAL_BATCH], **TOL)
        _assert_same(_params_and_buffers(synced), _params_and_buffers(whole), "sync_bn")

        # Without sync_bn the local statistics differ from the global ones: the check above
        # can fail.
        local = DDP(cvt_kernels.accelerate(copy.deepcopy(base))[0])
        out_local = _step(local, x)
        assert not torch.allclose(out_local, out_synced, **TOL)
        # No rank tears its connections down while the other may still be reading from
        # them: CI once saw rank 0 abort ("terminate called without an active exception")
        # while rank 1 was shutting down.
        dist.barrier()
        # The DDP reducers go before the process group does: one freed after
        # destroy_process_group deadlocked in ~ProcessGroupGloo (a CI run, py-spy: the
        # surviving rank stuck in pthread_mutex_lock under c10d::Reducer::~Reducer).
        del eager, fused, synced, local
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gloo_two_processes():
    # A deadline, not join() alone: a CI run (two pytest-xdist workers, 2026-12-07) had one
    # rank gone and the other idle inside gloo for 20 minutes, which would hang CI to its
    # limit. Past the deadline the ranks are killed and the test fails saying so.
    context = mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail("DDP ranks still running after 300 s (hung in gloo?); killed")


def test_sync_bn_without_a_process_group_is_the_ordinary_path():
    """As nn.SyncBatchNorm: not initialized (or one process) means local statistics."""
    base = _model()
    x = _global_batch()
    plain = cvt_kernels.accelerate(copy.deepcopy(base))[0]
    synced = cvt_kernels.accelerate(copy.deepcopy(base), sync_bn=True)[0]
    assert all(m.sync_bn for m in synced.modules()
               if isinstance(m, cvt_kernels.FusedConvAttention))
    torch.testing.assert_close(_step(synced, x), _step(plain, x), **TOL)
    _assert_same(_params_and_buffers(synced), _params_and_buffers(plain), "single process")
    assert "sync_bn" not in str(synced.state_dict().keys())


def test_sync_bn_arguments_are_checked():
    with pytest.raises(TypeError, match="sync_bn"):
        cvt_kernels.accelerate(_model(), sync_bn="yes")
    with pytest.raises(ValueError, match="process_group"):
        cvt_kernels.accelerate(_model(), process_group=object())
