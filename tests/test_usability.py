"""Library behaviour a new user meets first (issue 17): one case rule for backend names,
a warning when accelerate() finds nothing to replace, a bad head count refused at
construction, the public ops documented, and the README's claims about them."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import cvt_kernels
from cvt_kernels import backends, ops
from cvt_kernels.models import Attention, cvt_13

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["TORCH", "Torch", " torch "])
def test_backend_names_are_case_insensitive_in_both_places(monkeypatch, name):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with cvt_kernels.use_backend(name):
        assert backends.forced_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, name)
    assert backends.forced_backend() == "torch"


def test_accelerate_warns_when_a_model_holds_no_cvt_attention():
    with pytest.warns(UserWarning, match="Linear holds no CvT attention module"):
        assert cvt_kernels.accelerate(torch.nn.Linear(4, 4))[1] == 0


def test_accelerate_twice_is_quiet():
    model, n = cvt_kernels.accelerate(cvt_13(num_classes=2, img_size=32))
    assert n == 13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cvt_kernels.accelerate(model)[1] == 0
        cvt_kernels.accelerate(model.stage0.blocks[0].attn)  # itself fused: nothing to warn


@pytest.mark.parametrize("cls", [Attention, cvt_kernels.FusedConvAttention])
def test_heads_that_do_not_split_the_width_fail_at_construction(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: dim_out=30 .* num_heads=4"):
        cls(16, 30, 4)
    with pytest.raises(ValueError, match="num_heads=0"):
        cls(16, 32, 0)


@pytest.mark.parametrize("fn, words", [
    (ops.attention, ["(B, Nq, H*D)", "(B, Nk, H*D)", "(B, H, N, D)", "flash_attn_func",
                     "dim_out ** -0.5", "float16, bfloat16, float32 or float64", "Returns:",
                     "Raises"]),
    (ops.conv_projection, ["(B, T, C_in)", "(C_in, 1, k, k)", "(C_out, C_in)", "Returns:",
                           "float16, bfloat16, float32 or float64", "running_var",
                           "with_cls_token", "Raises"]),
])
def test_public_ops_document_shapes_dtypes_and_return(fn, words):
    for word in words:
        assert word in fn.__doc__, word


def test_readme_hugging_face_block_imports_cvt_kernels():
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.+?)\n```", readme, re.S)
                 if "from_pretrained" in b)
    assert "import cvt_kernels" in block


def test_readme_says_where_the_build_message_shows_and_links_the_reproduction():
    readme = " ".join(" ".join(p.read_text() for p in [ROOT / "README.md",
                                                       *sorted((ROOT / "docs").glob("*.md"))])
                      .split())
    assert "skipping the CUDA extension: <reason>` (pip shows it only with `pip install -v`" \
        in readme
    assert "python tests/repro_torch_bn_batch1.py" in readme
    assert (ROOT / "tests" / "repro_torch_bn_batch1.py").exists()
    assert "eager's own gradients are wrong" in readme
