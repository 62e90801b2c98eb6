"""Every command a user types (issue 17): the scripts in python/ and ``python -m
cvt_kernels.info``, run for real in a subprocess. A user error ends with one line on stderr
that says what is wrong and what to do, exit code 2 (usage) or 1 (a failure while running),
and no traceback unless ``--debug``. (``cvt_kernels.convert``: tests/test_convert.py;
``benchmarks.run``: tests/test_benchmarks.py.)"""

import os
import re
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


def test_demo_refuses_a_size_it_cannot_judge_and_says_which_work():
    """CvT-13 at 32x32 batch 2: a BatchNorm over 2 values per channel, where eager's own
    gradient errors are noise and the 2x rule flipped (it failed its own check)."""
    assert_one_line_error(run(script("demo"), "--img-size", "32", "--batch", "2"), 2,
                          "--img-size 32 --batch 2", "2 value(s) per channel",
                          "use --batch 8 or more, or --img-size 40 or more")


def test_demo_block_scope_says_what_it_accelerated_at_the_smallest_judged_size():
    proc = run(script("demo"), "--img-size", "16", "--batch", "8", "--scope", "block",
               "--no-train", "--repeats", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accelerated 13 blocks (FusedBlock: attention, LayerNorms and MLP); backend auto" \
        in proc.stdout and "FusedConvAttention" not in proc.stdout, proc.stdout
    assert "-> OK" in proc.stdout
    # Progress on stderr, step n of m with the time elapsed (issue 25: silent stretches).
    steps = re.findall(r"^\[demo.py +[\d.]+ s\] (\d+/\d+) ", proc.stderr, re.M)
    assert steps == ["1/4", "2/4", "3/4", "4/4"], proc.stderr
    # ... and a verdict on the machine's load under the timings.
    assert "quiet machine" in proc.stdout or "UNDER LOAD" in proc.stdout, proc.stdout


def test_demo_calls_timings_taken_under_load_what_they_are():
    from test_examples import load_script

    demo = load_script("demo")
    steady = {"eager": [1.0, 1.01, 0.99, 1.0, 1.02], "accelerated": [0.5, 0.51, 0.5, 0.49, 0.5]}
    assert demo.load_verdict([0.95], [("eval forward", steady)]) is None
    assert "50% of the CPU" in demo.load_verdict([0.5], [("eval forward", steady)])
    noisy = dict(steady, accelerated=[0.5, 2.0, 0.4, 3.0, 0.5])
    assert "spread" in demo.load_verdict([0.95], [("eval forward", noisy)])


def test_progress_says_what_step_of_how_many_and_beats_while_a_step_runs(monkeypatch):
    import io

    from cvt_kernels import _progress

    clock = [0.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = _progress.Progress("tool", total=2, stream=out)
    p.step("loading")
    clock[0] = 5.0
    p.tick("half")  # under the heartbeat: silent
    clock[0] = 12.0
    p.tick("three quarters")
    p.step("saving")
    lines = out.getvalue().splitlines()
    assert lines == ["[tool    0.0 s] 1/2 loading",
                     "[tool   12.0 s]   still loading: three quarters",
                     "[tool   12.0 s] 2/2 saving"]


def test_demo_refuses_batch_1_whose_check_would_be_luck():
    """At batch 1 a correct backend's worst float32 gradient reached 1.15x the 2x-eager bar
    (CvT-13 40x40, 2 of 12 seeds failed; 0.8-0.9x up to 224x224): refused with a reason."""
    assert_one_line_error(run(script("demo"), "--img-size", "224", "--batch", "1"), 2,
                          "--batch 1", "noise", "use --batch 2 or more")


def test_demo_accepts_the_smallest_judged_sizes():
    from test_examples import load_script

    demo = load_script("demo")
    for img, batch in ((40, 2), (16, 8), (224, 2)):
        demo.check_judgeable("cvt_13", img, batch)  # no error
    with pytest.raises(demo._cli.UsageError, match="4 value"):
        demo.check_judgeable("cvt_13", 32, 4)


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


# ------------------------------------------------------------------ python -m cvt_kernels.tune
@pytest.mark.parametrize("device, words", [
    ("tpu", ["--device 'tpu'", "not a device name", "use cpu or cuda"]),
    ("mps", ["--device mps", "only cpu and cuda"]),
])
def test_tune_unknown_device_is_one_line_naming_it(device, words):
    assert_one_line_error(run("-m", "cvt_kernels.tune", "--device", device), 2,
                          "python -m cvt_kernels.tune: error:", *words)


def test_tune_cpu_defaults_are_small_float32_and_the_first_line_says_what(tmp_path):
    """bfloat16 at batch 64 took 74 s on a CPU, where nothing is timed anyway."""
    from cvt_kernels import dispatch, tune

    args = tune.parse_args(["--device", "cpu"])
    assert (args.dtype, args.batch) == ("float32", 2)
    assert (tune.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--batch", "8"]).dtype,
            tune.parse_args(["--device", "cpu", "--batch", "8"]).batch) == ("bfloat16", 8)
    proc = run("-m", "cvt_kernels.tune", "--device", "cpu", "--img-size", "32", "--eval",
               env={**ENV, dispatch.CACHE_ENV: str(tmp_path / "d.json")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("tuning cvt_13 32x32, batch 2, float32 on cpu: "
                                           "inference, attention modules accelerated")


# ----------------------------------------------------------- the PyTorch bug reproduction
def test_batch_norm_reproduction_script_reports_the_bug():
    from test_pytorch_bugs import batch_norm_backward_bug_present

    proc = run(ROOT / "tests" / "repro_torch_bn_batch1.py")
    present = batch_norm_backward_bug_present()
    assert proc.returncode == (1 if present else 0), proc.stdout + proc.stderr
    assert ("BUG:" if present else "OK:") in proc.stdout
