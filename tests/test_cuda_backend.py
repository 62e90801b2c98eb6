"""The ``cuda`` backend (csrc/ kernels + cuBLAS + triton/SDPA attention), its build and its
compile check.

On CPU: the backend reports why it cannot run ("not built: ..."), the dispatcher passes over
it and a forced ``cuda`` raises with that reason; the build decision of setup.py; setup.py
itself without CUDA; the backend's Python glue (Linear composition, gradient plumbing, SDPA
attention) with the extension replaced by a plain-PyTorch model of its contract; and the
compile-only check of csrc/ for sm_90 (when nvcc is installed).

On a GPU with the extension built (``gpu`` marker): the real kernels against the
``reference`` backend per dtype, training and eval, gradients, running statistics, odd
shapes, the class token, non-contiguous and misaligned inputs, determinism.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import cvt_kernels
from cvt_kernels import _build_config, _cuda_ext, backends, ops
from cvt_kernels.backends import BackendUnavailableError, ProjectionConfig, ProjectionParams
from cvt_kernels.backends import cuda as cuda_module
from cvt_kernels.backends.cuda import CudaBackend, sdpa_attention_backward, sdpa_attention_forward

from conftest import assert_close_by_rule, dtype_id, make_attention, mode_id

ROOT = Path(__file__).resolve().parents[1]
CUDA = backends.get_backend("cuda")
REF = backends.get_backend("reference")
CUDA_REASON = CUDA.unavailable_reason()


# ------------------------------------------------------------------- reasons, dispatcher
def test_reports_why_it_cannot_run():
    if CUDA.ext is None:
        assert CUDA_REASON.startswith("not built: "), CUDA_REASON
        assert backends.available_backends()["cuda"] == CUDA_REASON
    elif not torch.cuda.is_available():
        assert "no CUDA device" in CUDA_REASON
    x = torch.randn(1, 4, 8)
    reasons = backends.explain(lambda b: b.conv_projection_reasons(
        x, ProjectionConfig("dw_bn", 3, 1, 1, False), True))
    assert reasons["cuda"]  # a CPU tensor: never runs here


def test_auto_passes_over_it_on_cpu_and_forcing_raises_with_the_reason():
    attn = cvt_kernels.FusedConvAttention.from_reference(make_attention(dtype=torch.float32))
    x = torch.randn(2, 1 + 9, 16)
    with cvt_kernels.use_backend("auto"):
        assert backends.select("attention", lambda b: b.attention_reasons(
            x, x, x, 1, 0.0)).name == "torch"
        attn(x, 3, 3)
    with cvt_kernels.use_backend("cuda"), pytest.raises(BackendUnavailableError,
                                                        match="forced backend 'cuda'") as info:
        attn(x, 3, 3)
    expected = CUDA_REASON if CUDA_REASON is not None else "x is on cpu"
    assert expected in str(info.value)


def test_info_shows_the_cuda_backend():
    out = subprocess.run([sys.executable, "-m", "cvt_kernels.info"], capture_output=True,
                         text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.strip().startswith("cuda "))
    if CUDA_REASON is not None:
        assert CUDA_REASON in line
    else:
        assert "available" in line


def test_declines_what_it_has_no_kernel_for():
    backend = CudaBackend(loader=lambda: (types.SimpleNamespace(), None))
    x = torch.randn(1, 4, 8)
    assert any("method 'avg'" in r for r in backend.conv_projection_reasons(
        x, ProjectionConfig("avg", 3, 2, 1), True))
    assert any("kernel_size 5" in r for r in backend.conv_projection_reasons(
        x, ProjectionConfig("dw_bn", 5, 1, 2), True))
    assert any("stride 3" in r for r in backend.conv_projection_reasons(
        x, ProjectionConfig("dw_bn", 3, 3, 1), True))
    assert any("dropout" in r for r in backend.attention_reasons(x, x, x, 1, 0.1))
    assert any("cpu" in r for r in backend.attention_reasons(x, x, x, 1, 0.0))


def test_extension_is_resolved_at_import():
    """The dispatcher also runs while torch.compile(fullgraph=True) traces, where the
    extension's import could not run: the registry resolves it when it registers."""
    assert CUDA._loaded


def test_loader_reasons_and_laziness():
    calls = []

    def loader():
        calls.append(1)
        return None, "because"

    backend = CudaBackend(loader=loader)
    assert not calls  # nothing is looked up before the first question
    assert backend.unavailable_reason() == "not built: because"
    assert backend.unavailable_reason() == "not built: because"
    assert len(calls) == 1
    if not torch.cuda.is_available():
        fake = CudaBackend(loader=lambda: (types.SimpleNamespace(), None))
        assert "no CUDA device" in fake.unavailable_reason()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch reasons")
def test_loader_on_a_cpu_torch(monkeypatch):
    monkeypatch.delenv(_build_config.ENV_JIT, raising=False)
    ext, reason = _cuda_ext.load()
    assert ext is None and "CPU build" in reason
    monkeypatch.setenv(_build_config.ENV_JIT, "1")  # asked for: the JIT build says why not
    ext, reason = _cuda_ext.load()
    assert ext is None and reason.startswith("CVT_KERNELS_JIT=1 but the JIT build failed")


# ------------------------------------------------------------------------- build decision
def _torch(version="2.13.0", cuda="13.0"):
    return types.SimpleNamespace(__version__=version, version=types.SimpleNamespace(cuda=cuda))


@pytest.mark.parametrize("env,torch_module,home,toolkit,build,words", [
    ({"CVT_KERNELS_SKIP_CUDA_BUILD": "1"}, _torch(), "/cuda", "13.0", False, "SKIP"),
    ({}, None, "/cuda", "13.0", False, "--no-build-isolation"),
    ({}, _torch("2.13.0+cpu", None), "/cuda", "13.0", False, "CPU build"),
    ({}, _torch(), None, None, False, "no CUDA toolkit"),
    ({}, _torch(cuda="12.8"), "/cuda", "13.0.88", False, "major versions must match"),
    ({}, _torch(cuda="13.0"), "/cuda", "13.0.88", True, "toolkit CUDA 13.0.88 at /cuda"),
    ({"CVT_KERNELS_SKIP_CUDA_BUILD": "0"}, _torch(), "/cuda", "13.1", True, "torch 2.13.0"),
])
def test_cuda_build_decision(env, torch_module, home, toolkit, build, words):
    ok, reason = _build_config.cuda_build_decision(env, torch_module, home, toolkit)
    assert ok is build and words in reason, reason


def test_find_cuda_home(tmp_path):
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "wrapper" / "bin"  # an nvcc script on PATH is not a toolkit
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\n")
    (wrapper / "nvcc").chmod(0o755)
    found = _build_config.find_cuda_home({"CUDA_HOME": str(toolkit), "PATH": str(wrapper)})
    assert found == str(toolkit.resolve())
    found = _build_config.find_cuda_home({"PATH": str(wrapper)})
    assert found != str(wrapper.parent) and (found is None or _build_config._is_toolkit(found))
    assert _build_config.arch_list({}) == "8.0;9.0+PTX"
    assert _build_config.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0"


def _setup(*args, **env):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_setup_without_cuda_installs_pure_python():
    """No CUDA here (or skipped): setup.py still works and says why in one line."""
    run = _setup("--version", CVT_KERNELS_SKIP_CUDA_BUILD="1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == cvt_kernels.__version__
    assert "cvt_kernels: skipping the CUDA extension: CVT_KERNELS_SKIP_CUDA_BUILD=1" in run.stderr
    if torch.version.cuda is None:
        run = _setup("--version")
        assert run.returncode == 0, run.stderr
        assert "skipping the CUDA extension: torch" in run.stderr and "CPU build" in run.stderr
        forced = _setup("--version", CVT_KERNELS_FORCE_BUILD="1")
        assert forced.returncode != 0
        assert "CVT_KERNELS_FORCE_BUILD=1 but the CUDA extension cannot be built" in forced.stderr


# ----------------------------------------------- the backend's Python glue, on CPU
class ReferenceExtension:
    """The contract of ``cvt_kernels._C`` in plain PyTorch (the reference backend with an
    identity projection), so the backend's glue runs on CPU: argument order, shapes and
    dtypes as csrc/bindings.cpp checks them."""

    eye = None

    @staticmethod
    def _params(x, weight, gamma, beta):
        assert x.is_contiguous() and weight.dtype == torch.float32
        assert weight.shape == (x.shape[2], 1, 3, 3) and weight.is_contiguous()
        for t in (gamma, beta):
            assert t is None or (t.dtype == torch.float32 and t.shape == (x.shape[2],))
        eye = torch.eye(x.shape[2], dtype=x.dtype)
        return ProjectionParams(weight, gamma, beta, None, None, None, eye, None)

    def dwconv_bn_stats(self, x, weight, h, w, stride, cls):
        self._params(x, weight, None, None)
        return REF.conv_projection_stats(x, h, w, weight, ProjectionConfig("dw_bn", 3, stride, 1, cls))

    def dwconv_bn_forward(self, x, weight, mean, rstd, gamma, beta, h, w, stride, cls):
        assert mean.dtype == rstd.dtype == torch.float32
        params = self._params(x, weight, gamma, beta)
        cfg = ProjectionConfig("dw_bn", 3, stride, 1, cls)
        return REF.conv_projection_forward(x, h, w, params, mean, rstd, cfg)

    def dwconv_bn_backward(self, grad_tokens, x, weight, mean, rstd, gamma, h, w, stride, cls,
                           batch_stats):
        assert grad_tokens.dtype == x.dtype and grad_tokens.is_contiguous()
        params = self._params(x, weight, gamma, None)
        cfg = ProjectionConfig("dw_bn", 3, stride, 1, cls)
        g = REF.conv_projection_backward(grad_tokens, x, h, w, params, mean, rstd, cfg,
                                         batch_stats)
        c = x.shape[2]
        d_gamma = g.bn_weight if g.bn_weight is not None else torch.zeros(c)
        # bn_bias's gradient: sum(dz) whether or not the call had a beta
        d_beta = grad_tokens[:, int(cls):].sum(dim=(0, 1)).to(torch.float32)
        return g.x, g.conv_weight.float(), d_gamma.float(), d_beta


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """The cuda backend with the reference model of the extension, accepting CPU tensors."""
    backend = CudaBackend(loader=lambda: (ReferenceExtension(), None))
    monkeypatch.setattr(backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(backend, "tensor_reasons", lambda x: [])
    monkeypatch.setitem(backends._REGISTRY, "cuda", backend)
    return backend


def _ops_run(name, x, h, w, p, cfg, training):
    x = x.detach().clone().requires_grad_(True)
    leaves = {k: getattr(p, k).detach().clone().requires_grad_(True)
              for k in ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")}
    stats = {k: getattr(p, k).clone() for k in ("running_mean", "running_var",
                                                "num_batches_tracked")}
    with cvt_kernels.use_backend(name):
        out = ops.conv_projection(x, h, w, p._replace(**leaves, **stats), cfg, training=training)
    out.backward(torch.ones_like(out)
                 + torch.arange(out.shape[-1], dtype=out.dtype, device=out.device) * 0.01)
    return [out, x.grad, *(leaves[k].grad for k in leaves), stats["running_mean"],
            stats["running_var"], stats["num_batches_tracked"]]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,stride", [(True, 1), (False, 2)])
def test_glue_through_the_ops_matches_reference(cuda_on_cpu, training, cls, stride):
    """float64 in, float32 to the extension's parameters (the glue casts), float64 out."""
    g = dict(dtype=torch.float64)
    h, w, cin, cout, batch = 3, 5, 4, 6, 2
    p = ProjectionParams(torch.randn(cin, 1, 3, 3, **g), torch.rand(cin, **g) + 0.5,
                         torch.randn(cin, **g),
                         torch.randn(cin, **g) * 0.1, torch.rand(cin, **g) + 0.5,
                         torch.tensor(3), torch.randn(cout, cin, **g), torch.randn(cout, **g))
    x = torch.randn(batch, h * w + int(cls), cin, **g)
    cfg = ProjectionConfig("dw_bn", 3, stride, 1, cls)
    ours = _ops_run("cuda", x, h, w, p, cfg, training)
    theirs = _ops_run("reference", x, h, w, p, cfg, training)
    names = ["out", "dx", "dconv_w", "dbn_w", "dbn_b", "dproj_w", "dproj_b", "running_mean",
             "running_var", "num_batches_tracked"]
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("heads,nq,nk,dim", [(1, 7, 3, 8), (2, 5, 9, 16)])
@pytest.mark.parametrize("block", [None, 1, 40])  # default, one query per block, a tail
def test_sdpa_attention_path_matches_reference(heads, nq, nk, dim, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(cuda_module, "BACKWARD_BLOCK_ELEMENTS", block)
    q = torch.randn(2, nq, dim, dtype=torch.float64)
    k = torch.randn(2, nk, dim, dtype=torch.float64)
    v = torch.randn(2, nk, dim, dtype=torch.float64)
    scale = dim ** -0.5
    out, lse = sdpa_attention_forward(q, k, v, heads, scale)
    ref_out, _ = REF.attention_forward(q, k, v, heads, scale)
    torch.testing.assert_close(out, ref_out)
    assert lse.shape == (2, heads, nq) and lse.dtype == torch.float64
    go = torch.randn_like(out)
    for a, b in zip(sdpa_attention_backward(go, q, k, v, heads, scale),
                    REF.attention_backward(go, q, k, v, ref_out, None, heads, scale)):
        torch.testing.assert_close(a, b)


def test_glue_attention_through_the_ops(cuda_on_cpu):
    """On CPU the triton backend declines (not forced), so the SDPA path runs."""
    q = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    with cvt_kernels.use_backend("cuda"):
        out = ops.attention(q, kv, kv, 2, 0.3)
    out.sum().backward()
    grads = (q.grad.clone(), kv.grad.clone())
    q.grad = kv.grad = None
    with cvt_kernels.use_backend("reference"):
        ref = ops.attention(q, kv, kv, 2, 0.3)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, (q.grad, kv.grad))


# --------------------------------------------------------------------- compile-only check
CUDA_HOME = _build_config.find_cuda_home()


@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit (nvcc) found: CUDA_HOME, "
                                              "CUDA_PATH, PATH or /usr/local/cuda*")
def test_csrc_compiles_for_sm90_without_spills(tmp_path):
    """Every csrc/kernels/*.cu for sm_90 (nvcc, cuobjdump), no spills, and bindings.cpp
    syntax-checked against torch's headers. (The committed report adds sm_80.)"""
    run = subprocess.run([sys.executable, str(ROOT / "csrc" / "check_compile.py"), "--arch",
                          "90", "--bindings", "--out", str(tmp_path / "report.txt")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = (tmp_path / "report.txt").read_text()
    assert "ok: every kernel compiles, no spills, no local memory" in report
    for kernel in ("stats_partials_kernel<bf16, 8>", "normalize_kernel<f16, 8>",
                   "conv_grad_kernel<f32, 4, true>", "grad_input_kernel<bf16, 1>"):
        assert kernel in report
    assert "bindings.cpp: " in report


# ------------------------------------------------------------------------------ GPU tier
def _need_cuda_backend():
    if CUDA_REASON is not None:
        pytest.skip(f"cuda backend: {CUDA_REASON}")


@pytest.fixture
def no_tf32(monkeypatch):
    """float32 references in float32: no TF32 in cuBLAS nor in cuDNN's convolutions."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(batch, h, w, cin, cout, cls, stride, dtype, affine=True, bias=True):
    g = dict(dtype=dtype, device="cuda")
    x = torch.randn(batch, h * w + cls, cin, **g)
    params = ProjectionParams(
        torch.randn(cin, 1, 3, 3, **g), (torch.rand(cin, **g) + 0.5) if affine else None,
        torch.randn(cin, **g) if affine else None, torch.randn(cin, **g) * 0.1,
        torch.rand(cin, **g) + 0.5, torch.tensor(0, device="cuda"),
        torch.randn(cout, cin, **g), torch.randn(cout, **g) if bias else None)
    return x, params, ProjectionConfig("dw_bn", 3, stride, 1, bool(cls))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


FUNCTION_CASES = [
    # batch, h, w, C_in, C_out, cls, stride: odd maps, scalar path (C % 4 != 0), 1x1 map
    (2, 3, 5, 5, 7, 1, 1),
    (2, 3, 5, 5, 7, 0, 2),
    (1, 1, 1, 3, 4, 1, 1),
    (2, 7, 9, 24, 40, 1, 2),
    (3, 14, 14, 64, 64, 0, 1),
    (2, 7, 7, 384, 384, 1, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FUNCTION_CASES)
def test_gpu_functions_match_reference_float32(case, no_tf32):
    """Pass 1, pass 2 (batch and running stats) and both backwards, one by one, float32
    (TF32 off so cuBLAS and cuDNN compute what the reference means)."""
    _need_cuda_backend()
    batch, h, w, cin, cout, cls, stride = case
    x, p, cfg = make_inputs(batch, h, w, cin, cout, cls, stride, torch.float32)
    mean, var = CUDA.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    ref_mean, ref_var = REF.conv_projection_stats(x, h, w, p.conv_weight, cfg)
    assert _rel(mean, ref_mean) < 1e-5 and _rel(var, ref_var) < 1e-5
    running = (p.running_mean, torch.rsqrt(p.running_var + 1e-5))
    for batch_stats, (m, rstd) in ((True, (ref_mean, torch.rsqrt(ref_var + 1e-5))),
                                   (False, running)):
        out = CUDA.conv_projection_forward(x, h, w, p, m, rstd, cfg)
        ref = REF.conv_projection_forward(x, h, w, p, m, rstd, cfg)
        assert out.dtype == ref.dtype and _rel(out, ref) < 1e-5, batch_stats
        go = torch.randn_like(ref)
        ours = CUDA.conv_projection_backward(go, x, h, w, p, m, rstd, cfg, batch_stats)
        theirs = REF.conv_projection_backward(go, x, h, w, p, m, rstd, cfg, batch_stats)
        for name, a, b in zip(ours._fields, ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert _rel(a, b) < 1e-4, f"d{name} (batch_stats={batch_stats}): {_rel(a, b):.2e}"


GPU_SHAPES = [
    # CvT-13 stage 1 (q, kv), stage 3 kv with class token, an odd map with an odd channel count
    (8, 56, 56, 64, 64, 0, 1),
    (8, 56, 56, 64, 64, 0, 2),
    (8, 14, 14, 384, 384, 1, 2),
    (3, 7, 9, 36, 20, 1, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=mode_id)
def test_gpu_ops_within_twice_pytorch_error(shape, dtype, training):
    """Output, every gradient and the running statistics through the ops: error vs the
    float64 reference at most 2x that of the torch backend in the same dtype."""
    _need_cuda_backend()
    batch, h, w, cin, cout, cls, stride = shape
    x, p, cfg = make_inputs(batch, h, w, cin, cout, cls, stride, dtype)
    names = ["out", "dx", "dconv_w", "dbn_w", "dbn_b", "dproj_w", "dproj_b", "running_mean",
             "running_var"]
    ours = _ops_run("cuda", x, h, w, p, cfg, training)[:9]
    pytorch = _ops_run("torch", x, h, w, p, cfg, training)[:9]
    p64 = p._replace(**{k: getattr(p, k).double() for k in p._fields
                        if k != "num_batches_tracked"})
    truth = _ops_run("reference", x.double(), h, w, p64, cfg, training)[:9]
    for name, a, b, t in zip(names, ours, pytorch, truth):
        assert a.dtype == b.dtype, name
        assert_close_by_rule(a, b, t, name, atol=1e-3 * t.abs().max().item())


@pytest.mark.gpu
def test_gpu_non_contiguous_misaligned_and_no_affine(no_tf32):
    """Strided x and proj_weight, x at a 2-byte offset (scalar path), no BN affine, no bias."""
    _need_cuda_backend()
    batch, h, w, cin, cout = 2, 5, 6, 32, 16
    x, p, cfg = make_inputs(batch, h, w, cin, cout, 1, 2, torch.float16, affine=False,
                            bias=False)
    strided = torch.randn(batch, h * w + 1, 2 * cin, dtype=torch.float16, device="cuda")[..., ::2]
    flat = torch.randn(batch * (h * w + 1) * cin + 1, dtype=torch.float16, device="cuda")
    misaligned = flat[1:].view(batch, h * w + 1, cin)
    assert misaligned.data_ptr() % 16 != 0 and not strided.is_contiguous()
    p = p._replace(proj_weight=torch.randn(cin, cout, dtype=torch.float16, device="cuda").t())
    for xin in (strided, misaligned):
        mean, var = CUDA.conv_projection_stats(xin, h, w, p.conv_weight, cfg)
        ref_mean, ref_var = REF.conv_projection_stats(xin, h, w, p.conv_weight, cfg)
        assert _rel(mean, ref_mean) < 1e-5 and _rel(var, ref_var) < 1e-5
        rstd = torch.rsqrt(var + 1e-5)
        out = CUDA.conv_projection_forward(xin, h, w, p, mean, rstd, cfg)
        ref = REF.conv_projection_forward(xin, h, w, p, mean, rstd, cfg)
        assert _rel(out, ref) < 2e-2
        go = torch.randn_like(out)
        ours = CUDA.conv_projection_backward(go, xin, h, w, p, mean, rstd, cfg, True)
        theirs = REF.conv_projection_backward(go, xin, h, w, p, mean, rstd, cfg, True)
        assert ours.bn_weight is None and ours.bn_bias is None and ours.proj_bias is None
        for name, a, b in zip(ours._fields, ours, theirs):
            if b is not None:
                assert _rel(a, b) < 3e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["identity", "box"])
def test_gpu_statistics_survive_a_large_mean(kernel):
    """mean 1e4, std 1e-2 (identity conv: sum of squares would lose every digit of the
    variance), and a box filter whose border outputs (the shift) are far from the mean."""
    _need_cuda_backend()
    h = w = 8
    x = 1e4 + 1e-2 * torch.randn(4, h * w, 8, device="cuda")
    conv_w = torch.zeros(8, 1, 3, 3, device="cuda")
    if kernel == "identity":
        conv_w[:, 0, 1, 1] = 1.0
    else:
        conv_w.fill_(1.0 / 9.0)  # corner outputs see 4/9 of the mean
    mean, var = CUDA.conv_projection_stats(x, h, w, conv_w, ProjectionConfig("dw_bn", 3, 1, 1))
    y = torch.nn.functional.conv2d(x.double().transpose(1, 2).reshape(4, 8, h, w),
                                   conv_w.double(), padding=1, groups=8)
    torch.testing.assert_close(mean.double(), y.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), y.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3,
                               atol=0)


@pytest.mark.gpu
def test_gpu_deterministic():
    _need_cuda_backend()
    x, p, cfg = make_inputs(4, 28, 28, 192, 192, 0, 2, torch.bfloat16)
    runs = []
    for _ in range(2):
        mean, var = CUDA.conv_projection_stats(x, 28, 28, p.conv_weight, cfg)
        rstd = torch.rsqrt(var + 1e-5)
        out = CUDA.conv_projection_forward(x, 28, 28, p, mean, rstd, cfg)
        grads = CUDA.conv_projection_backward(torch.ones_like(out), x, 28, 28, p, mean, rstd,
                                              cfg, True)
        runs.append([mean, var, out, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,heads", [(64, 1), (384, 6), (512, 2)])  # head_dim 256: SDPA
def test_gpu_module_matches_reference(dim, heads, no_tf32):
    """FusedConvAttention on the cuda backend vs the reference module, float32, training
    then eval: output, every gradient, the running statistics."""
    _need_cuda_backend()
    ref = make_attention(dim_in=dim, dim_out=dim, heads=heads, cls=True,
                         dtype=torch.float32).cuda()
    fused = cvt_kernels.FusedConvAttention.from_reference(make_attention(
        dim_in=dim, dim_out=dim, heads=heads, cls=True, dtype=torch.float32).cuda())
    fused.load_state_dict(ref.state_dict())
    h = w = 7
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        x = torch.randn(2, 1 + h * w, dim, device="cuda")
        x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_ref = ref(x_ref, h, w)
        with cvt_kernels.use_backend("cuda"):
            out = fused(x_ours, h, w)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
        go = torch.randn_like(out)
        out_ref.backward(go)
        out.backward(go)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        ours = dict(fused.named_parameters())
        for name, param in ref.named_parameters():
            torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-3, atol=1e-4,
                                       msg=name)
        buffers = dict(fused.named_buffers())
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(buffers[name], buf, msg=name)


@pytest.mark.gpu
def test_gpu_bindings_check_their_arguments():
    _need_cuda_backend()
    ext = CUDA.ext
    x = torch.randn(2, 10, 8, device="cuda")
    w = torch.randn(8, 1, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.dwconv_bn_stats(x.cpu(), w, 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="x has 10 tokens"):
        ext.dwconv_bn_stats(x, w, 3, 3, 1, False)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        ext.dwconv_bn_stats(x, w.half(), 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ext.dwconv_bn_stats(x, w[:4], 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        ext.dwconv_bn_stats(x, w, 3, 3, 3, True)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.dwconv_bn_stats(x.transpose(0, 1), w, 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ext.dwconv_bn_stats(x.double(), w, 3, 3, 1, True)
    m = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="rstd must have shape"):
        ext.dwconv_bn_forward(x, w, m, m[:4], None, None, 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="gamma must be float32"):
        ext.dwconv_bn_forward(x, w, m, m, m.half(), None, 3, 3, 1, True)
    with pytest.raises(RuntimeError, match="grad_tokens must have shape"):
        ext.dwconv_bn_backward(x[:, :5].contiguous(), x, w, m, m, None, 3, 3, 1, True, True)
