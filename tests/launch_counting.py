"""Helpers of the launch-count tests (tests/test_*_launches.py): meta tensors, and one
call's launches on the triton backend counted as ``benchmarks.step_cost`` counts a step.
Import after ``pytest.importorskip("triton")``."""

import torch

import cvt_kernels
from benchmarks import step_cost as sc

BF16 = torch.bfloat16


def meta(*shape, grad=False, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def counted(fn, warmup: bool = False) -> sc.StepCost:
    """What ``fn()`` launches with the triton backend forced (after an uncounted call with
    ``warmup``: a module's call plan is then made, and the counted call takes it)."""
    def step():
        with cvt_kernels.use_backend("triton"):
            fn()
    return sc.count_module(step, warmup=warmup)


def kinds(cost: sc.StepCost):
    return [(x.kind, x.name) for x in cost.launches]
