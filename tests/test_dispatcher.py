"""The dispatcher: automatic choice, forcing by context manager and environment, reasons."""

import subprocess
import sys

import pytest
import torch

import cvt_kernels
from cvt_kernels import backends, ops
from cvt_kernels.backends import BackendUnavailableError

from conftest import make_attention


def test_auto_picks_torch_on_cpu_and_never_reference():
    q = torch.randn(1, 4, 8)
    backend = backends.select("attention", lambda b: b.attention_reasons(q, q, q, 1, 0.0))
    assert backend.name == "torch"
    assert "reference" not in backends.AUTO_ORDER


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.forced_backend() is None
    with cvt_kernels.use_backend("reference"):
        assert backends.forced_backend() == "reference"
        with cvt_kernels.use_backend("auto"):
            assert backends.forced_backend() is None
        assert backends.forced_backend() == "reference"
    assert backends.forced_backend() is None


def test_context_manager_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.forced_backend() == "reference"
    with cvt_kernels.use_backend("torch"):
        assert backends.forced_backend() == "torch"


def test_bad_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with cvt_kernels.use_backend("cudnn"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CVT_KERNELS_BACKEND"):
        backends.forced_backend()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_forcing_an_unavailable_backend_lists_reasons(name):
    # method "avg": no Triton kernel, so "triton" declines even where it runs (GPU, or the
    # CPU interpreter when forced); "cuda" has no extension on CPU ("not built: ...") and
    # no kernel for "avg" either.
    attn = cvt_kernels.FusedConvAttention.from_reference(
        make_attention(dtype=torch.float32, method="avg"))
    x = torch.randn(2, 1 + 9, 16)
    with cvt_kernels.use_backend(name), pytest.raises(BackendUnavailableError,
                                                      match=name) as info:
        attn(x, 3, 3)
    assert "forced backend" in str(info.value) or "not implemented" in str(info.value)


def test_explain_reports_every_backend():
    q = torch.randn(1, 4, 8)
    reasons = backends.explain(lambda b: b.attention_reasons(q, q, q, 1, 0.5))
    assert set(reasons) == set(backends.KNOWN_BACKENDS)
    assert reasons["torch"] == []
    assert any("dropout" in r for r in reasons["reference"])


def test_dropout_is_routed_to_torch_automatically():
    q = torch.randn(1, 4, 8)
    with cvt_kernels.use_backend("auto"):
        out = ops.attention(q, q, q, 2, 1.0, dropout_p=0.3)
    assert out.shape == q.shape


def test_info_prints_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "cvt_kernels.info"], capture_output=True,
                         text=True, check=True).stdout
    assert f"cvt_kernels {cvt_kernels.__version__}" in out
    assert "torch" in out and "triton" in out
    for name in backends.KNOWN_BACKENDS:
        assert f"  {name}" in out


def test_explain_takes_plain_tensors_and_reasons_come_from_declarations():
    from cvt_kernels.backends.base import Backend, ProjectionConfig, Support

    q = torch.randn(1, 4, 8)
    by_op = backends.explain("attention", q, q, q, 2, dropout_p=0.5)
    assert by_op == backends.explain(lambda b: b.attention_reasons(q, q, q, 2, 0.5))
    assert by_op["torch"] == [] and any("dropout" in r for r in by_op["reference"])
    cfg = ProjectionConfig("avg", 3, 2, 1)
    reasons = backends.explain("conv_projection", q, cfg, training=True)
    assert reasons["torch"] == []
    with pytest.raises(ValueError, match="op 'softmax'"):
        backends.explain("softmax", q)

    class GpuOnly(Backend):  # a new backend: a declaration, no reason-writing code
        support = Support(kernels="Demo", devices=("cuda",), methods=("dw_bn",),
                          strides=(1,), attention_dropout=False)

    got = GpuOnly().conv_projection_reasons(q, cfg, False)
    assert any("method 'avg': only 'dw_bn' has a Demo kernel" in r for r in got)
    assert any("stride 2: the kernel handles stride 1" in r for r in got)
    assert any("x is on cpu: the Demo kernels need a CUDA tensor" in r for r in got)
    assert any("dropout" in r for r in GpuOnly().attention_reasons(q, q, q, 1, 0.1))
    assert GpuOnly().tensor_reasons(q.to(torch.int32))  # and dtypes
