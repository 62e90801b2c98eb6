"""benchmarks/profile_step.py on CPU: both sections with a profiler table, and a clear one-line
refusal for a backend that cannot run here."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Without the interpreter the triton backend cannot run on CPU (the refusal tested below).
# One intra-op thread: on a machine busy with other tests, OpenMP threads waiting on each
# other made the run several times slower (6 s alone, 20+ s next to one busy core).
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
       "OMP_NUM_THREADS": "1"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.profile_step", *args], cwd=ROOT,
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_profile_step_torch_backend(tmp_path):
    out = tmp_path / "sub" / "profile.txt"  # parent dirs are created
    r = _run("--backend", "torch", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    sections = text.split("== ")[1:]
    assert [s.split(" | ")[0] for s in sections] == ["train", "eval"], text[:2000]
    for s in sections:
        header = s.splitlines()[0]
        assert "failed" not in header and "ms/step" in header and "backend torch" in header
        assert "Self CPU" in s and ("aten::addmm" in s or "aten::mm" in s), s[:2000]
        assert "by category" in s and "GEMM" in s
    assert text in r.stdout  # printed as well


def test_profile_step_unavailable_backend_one_line(tmp_path):
    out = tmp_path / "profile.txt"
    r = _run("--backend", "triton", "--out", str(out))
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "'triton'" in lines[0], r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert out.read_text().strip() == lines[0]


def test_profile_step_block_scope_eval(tmp_path):
    out = tmp_path / "profile.txt"
    r = _run("--backend", "torch", "--scope", "block", "--modes", "eval", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    header = text.split("== ")[1].splitlines()[0]
    assert header.startswith("eval") and "13 blocks fused" in header, header
    assert "by category" in text and "GEMM" in text
