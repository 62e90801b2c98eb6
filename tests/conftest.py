"""Shared test helpers: tiny modules, the per-dtype tolerance rule, GPU marker handling."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

import cvt_kernels
from cvt_kernels.models import Attention

# Under pytest-xdist (the README's test command: two workers) each worker computes on one
# thread: two processes of two OpenMP threads each on a 2-core machine spin-wait on each
# other, and CPU half-precision GEMMs then crawl.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

CPU_BACKENDS = ("reference", "torch")
# Short test ids, so a GPU session can select by dtype (`-k bf16`; "float16" would also
# match "bfloat16") and by head dim (`-k d64`).
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
             torch.bfloat16: "bf16"}


def dtype_id(dtype) -> str:
    return DTYPE_IDS.get(dtype, str(dtype))


def head_dim_id(d) -> str:
    return f"d{d}"


def mode_id(training) -> str:
    return "train" if training else "eval"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    torch.manual_seed(0)
    # Tests patch backends' reasons: no choice remembered from an earlier test may serve.
    cvt_kernels.backends.clear_selection_cache()
    # Nor a dispatch decision, and none from (or into) the user's decisions file.
    cvt_kernels.dispatch.clear()
    monkeypatch.setenv(cvt_kernels.dispatch.CACHE_ENV, "off")


def run_launch_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m benchmarks.launch_check ARGS`` (from the repository root) in a subprocess
    without TRITON_INTERPRET (a process that has it holds interpreter-only kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.launch_check", *args],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout)


def randomize_bn(module: torch.nn.Module) -> None:
    """Non-trivial BatchNorm state, so eval mode and the affine are really exercised."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def make_attention(dim_in=16, dim_out=32, heads=2, cls=True, dtype=torch.float64,
                   training=True, **kwargs) -> Attention:
    attn = Attention(dim_in, dim_out, heads, qkv_bias=True, stride_kv=2,
                     with_cls_token=cls, **kwargs).to(dtype)
    randomize_bn(attn)
    return attn.train(training)


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_by_rule(ours: torch.Tensor, pytorch_same_dtype: torch.Tensor,
                         truth: torch.Tensor, name: str = "", factor: float = 2.0,
                         atol: float = 1e-6) -> None:
    """flash-attention's rule: our error vs the float64 truth may be at most ``factor`` times
    PyTorch's own error in the same dtype (plus a tiny absolute slack for exact zeros)."""
    ours_err = (ours.double() - truth.double()).abs().max().item()
    ref_err = (pytorch_same_dtype.double() - truth.double()).abs().max().item()
    assert ours_err <= factor * ref_err + atol, (
        f"{name}: error {ours_err:.3e} > {factor} x PyTorch's {ref_err:.3e} (+{atol:g})")


def grads_of(module: torch.nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    return {n: (p.grad.detach().clone() if p.grad is not None else None)
            for n, p in module.named_parameters()}
