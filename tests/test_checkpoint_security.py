"""No file a user hands to this package can run code (issue 25): every loader reads with
``torch.load(weights_only=True)`` (``cvt_kernels._cli.safe_torch_load``), which refuses a
pickle of anything but tensors, numbers, strings and containers of them. Each loader gets a
file whose unpickling would create a marker file: the marker must not appear, and the user
gets one line naming the file (exit code 2, no traceback). The command-line loaders run in
a subprocess, as a user runs them."""

import importlib.util
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvt_kernels import _cli, backends, convert

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}


class CreatesAFile:
    """Unpickled by a full ``pickle`` load, this calls ``pathlib.Path.touch(marker)``: any
    code would run the same way (``os.system`` included)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def poisoned_checkpoint(path: Path, marker: Path) -> Path:
    """A plausible training checkpoint with the payload where a loader finds it only after
    the weights (the optimizer entry)."""
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "optimizer": CreatesAFile(marker),
                "step": 1}, path)
    return path


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "ran"
    return poisoned_checkpoint(tmp_path / "evil.pt", marker), marker


def test_the_payload_runs_when_loaded_unsafely(evil):
    """The control: a full unpickling does create the marker, so the tests below prove a
    refusal, not a dud payload."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_library_loaders_refuse_without_running(evil):
    path, marker = evil
    for load in (_cli.safe_torch_load, convert.load_checkpoint, convert.load_file):
        with pytest.raises(ValueError, match=r"holds Python objects \(getattr\) that safe "
                                             r"loading .* refuses, so nothing in it was run"):
            load(str(path))
    assert not marker.exists()


def script(name: str) -> Path:
    return ROOT / "python" / f"{name}.py"


def hf_directory(tmp_path: Path, marker: Path) -> Path:
    """A ``from_pretrained`` directory whose ``pytorch_model.bin`` carries the payload."""
    import transformers

    directory = tmp_path / "hf"
    transformers.CvtConfig(num_labels=3).save_pretrained(directory)
    torch.save({"cvt.encoder.stages.0.cls_token": CreatesAFile(marker)},
               directory / "pytorch_model.bin")
    return directory


# Each command line that reads a file: (argv after the interpreter, what names the file).
COMMANDS = {
    "convert": lambda f, out: (["-m", "cvt_kernels.convert", f, out, "--to", "hf"], f"SRC {f}"),
    "convert_checkpoint.py": lambda f, out: ([script("convert_checkpoint"), f, out, "--to",
                                              "package"], f"SRC {f}"),
    "infer.py --checkpoint": lambda f, out: ([script("infer"), "--checkpoint", f],
                                             f"--checkpoint {f}"),
    "infer.py --images": lambda f, out: ([script("infer"), "--images", f], f"--images {f}"),
    "train_synthetic.py --resume": lambda f, out: (
        [script("train_synthetic"), "--resume", f, "--steps", "2", "--batch", "1",
         "--img-size", "32", "--device", "cpu"], f"--resume {f}"),
}


def test_every_command_refuses_a_poisoned_file_in_one_line(tmp_path):
    """All at once (each process mostly waits for its imports), each with its own file and
    marker, then each checked."""
    runs, markers = {}, {}
    for i, (name, make) in enumerate(COMMANDS.items()):
        markers[name] = tmp_path / f"ran{i}"
        runs[name] = make(poisoned_checkpoint(tmp_path / f"evil{i}.pt", markers[name]),
                          tmp_path / "out.pth")
    if importlib.util.find_spec("transformers") is not None:
        markers["infer.py --hf"] = tmp_path / "ran_hf"
        hf = hf_directory(tmp_path, markers["infer.py --hf"])
        runs["infer.py --hf"] = ([script("infer"), "--hf", hf, "--img-size", "32"], f"--hf {hf}")
    procs = {name: subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert not markers[name].exists(), f"{name} ran the code in the file it was given"
        assert proc.returncode == 2, (name, proc.returncode, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        names_the_file = runs[name][1]
        assert names_the_file in lines[0] and "nothing in it was run" in lines[0], lines[0]
    assert not (tmp_path / "out.pth").exists()
