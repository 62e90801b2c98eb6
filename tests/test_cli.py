"""Every command a user types (issue 17): the scripts in python/ and ``python -m
cvt_kernels.info``, run for real in a subprocess. A user error ends with one line on stderr
that says what is wrong and what to do, exit code 2 (usage) or 1 (a failure while running),
and no traceback unless ``--debug``. (``cvt_kernels.convert``: tests/test_convert.py;
``benchmarks.run``: tests/test_benchmarks.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvt_kernels import backends, models

ROOT = Path(__file__).resolve().parents[1]
# The interpreter would make the triton backend "available" on CPU; the forced backend must
# not leak in from the environment.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}
NO_CUDA = not torch.cuda.is_available()


def run(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env or ENV, timeout=300)


def script(name: str) -> Path:
    return ROOT / "python" / f"{name}.py"


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit code ``code`` and one line on stderr holding every word; returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ demo.py
@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_demo_cuda_on_a_cpu_build_is_a_usage_error():
    assert_one_line_error(run(script("demo"), "--device", "cuda"), 2,
                          "--device cuda", "no CUDA device", "use --device cpu")


def test_demo_misspelled_backend_is_a_usage_error_and_the_case_does_not_matter():
    assert_one_line_error(run(script("demo"), "--backend", "tritn"), 2,
                          "--backend", "'tritn'", "triton")
    # Upper case is the same backend (the library's rule): here, cuda is not built.
    if backends.available_backends()["cuda"] is not None:
        assert_one_line_error(run(script("demo"), "--backend", "CUDA"), 2,
                              "--backend cuda: not available here", "use one of: auto")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_demo_debug_shows_the_traceback():
    proc = run(script("demo"), "--device", "cuda", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UsageError" in proc.stderr


def test_demo_help_names_the_chosen_model_and_shows_defaults():
    out = run(script("demo"), "--help").stdout
    assert "CvT-13 unless --model names another" in out
    assert "(default: cvt_13)" in out and "(default: auto)" in out


# ------------------------------------------------------------------------------ infer.py
@pytest.fixture(scope="module")
def cvt13_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "cvt13.pth"
    torch.save(models.cvt_13(num_classes=3).state_dict(), path)
    return path


@pytest.mark.parametrize("content, words", [
    (None, ["--images", "no such file"]),
    (torch.rand(20, 24, 3), ["channels-last (H, W, 3)", "t.permute(2, 0, 1)"]),
    ({"image": torch.rand(3, 20, 24)}, ["holds a dict with keys ['image']", "torch.save the"]),
    ("not a tensor file", ["not a torch.save file", "(3, H, W)"]),
], ids=["missing", "hwc", "dict", "text"])
def test_infer_bad_image_files_are_usage_errors(tmp_path, content, words):
    path = tmp_path / "img.pt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    assert_one_line_error(run(script("infer"), "--images", path), 2, f"--images {path}", *words)


def test_infer_missing_checkpoint_is_a_usage_error(tmp_path):
    assert_one_line_error(run(script("infer"), "--checkpoint", tmp_path / "none.pth"), 2,
                          "--checkpoint", "no such file")


def test_infer_checkpoint_of_another_model_names_the_right_one(cvt13_checkpoint):
    line = assert_one_line_error(
        run(script("infer"), "--checkpoint", cvt13_checkpoint, "--model", "cvt_21"), 2,
        "does not match --model cvt_21", "missing:", "pass --model cvt_13")
    assert len(line) < 600  # not load_state_dict's multi-kilobyte list of keys


# ---------------------------------------------------------------------- train_synthetic.py
TRAIN = ["--batch", "2", "--img-size", "32", "--num-classes", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def step2_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as --save writes it at step 2 (tests/test_examples.py trains and resumes
    real ones), without the weights: the options are checked before anything is loaded."""
    path = tmp_path_factory.mktemp("train") / "step2.pt"
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "step": 2, "cpu_rng": None,
                "cuda_rng": None, "args": {"model": "cvt_13", "num_classes": 4}}, path)
    return path


def test_train_resume_with_nothing_left_to_do_says_so(step2_checkpoint):
    assert_one_line_error(
        run(script("train_synthetic"), *TRAIN, "--steps", "2", "--resume", step2_checkpoint),
        2, "at step 2", "no step would run", "pass --steps 4")


def test_train_resume_with_another_model_names_the_right_one(step2_checkpoint):
    assert_one_line_error(
        run(script("train_synthetic"), *TRAIN, "--steps", "3", "--model", "cvt_21",
            "--resume", step2_checkpoint),
        2, "saved with --model cvt_13", "pass --model cvt_13")


def test_train_help_is_whole_and_shows_defaults():
    out = run(script("train_synthetic"), "--help").stdout
    assert "AMP where available,\nand a checkpoint that resumes exactly." in out
    assert "(default: 10)" in out and "(default: cvt_13)" in out


# ------------------------------------------------------------------ python -m cvt_kernels.info
def test_info_names_a_misspelled_backend_and_prints_the_rest():
    proc = run("-m", "cvt_kernels.info", env={**ENV, backends.ENV_VAR: "tritn"})
    assert_one_line_error(proc, 1, "CVT_KERNELS_BACKEND", "'tritn'", "fix or unset")
    assert "backend     invalid" in proc.stdout
    for name in backends.KNOWN_BACKENDS:
        assert f"  {name}" in proc.stdout
    assert "one-pass" in proc.stdout


def test_info_accepts_the_backend_in_any_case():
    proc = run("-m", "cvt_kernels.info", env={**ENV, backends.ENV_VAR: "Torch"})
    assert proc.returncode == 0 and "backend     torch" in proc.stdout, proc.stderr


@pytest.mark.skipif(not NO_CUDA, reason="the interpreter note is for CPU-only machines")
def test_info_under_the_interpreter_says_why_auto_picks_torch():
    out = run("-m", "cvt_kernels.info", env={**ENV, "TRITON_INTERPRET": "1"}).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("  triton "))
    assert "only through Triton's CPU interpreter" in line
    assert "auto picks torch for CPU tensors" in line


# ----------------------------------------------------------- the PyTorch bug reproduction
def test_batch_norm_reproduction_script_reports_the_bug():
    from test_pytorch_bugs import batch_norm_backward_bug_present

    proc = run(ROOT / "tests" / "repro_torch_bn_batch1.py")
    present = batch_norm_backward_bug_present()
    assert proc.returncode == (1 if present else 0), proc.stdout + proc.stderr
    assert ("BUG:" if present else "OK:") in proc.stdout
