"""The benchmark commands a user types (issue 25): ``python -m benchmarks.run --providers``
names a provider no level knows instead of dropping it, and ``python -m
benchmarks.readme_table`` prints unless told to ``--write``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
sys.path.insert(0, str(ROOT))

from benchmarks import conv_projection, readme_table  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_an_unknown_provider_stops_the_run_naming_it_and_the_providers():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--providers",
                           "bogus,eager", "--level", "blocks", "model"], cwd=ROOT,
                          capture_output=True, text=True, env=ENV, timeout=120)
    line = one_line_error(proc)
    assert "--providers bogus:" in line and "== level" not in proc.stdout
    assert "blocks: eager, torch, compile" in line and "accelerated-block" in line, line


def test_a_provider_of_another_level_only_is_refused_too(capsys):
    """sdpa-math is an attention-op provider: the model level alone would run eager only."""
    with pytest.raises(SystemExit) as stop:  # argparse's exit, as in the subprocess above
        bench_run.parse_args(["--level", "model", "--providers", "eager,sdpa-math"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--providers sdpa-math:" in err
    assert "model: eager, accelerated" in err and "ops attention" not in err


def test_known_providers_of_each_level_pass():
    args = bench_run.parse_args(["--providers", "eager,torch,sdpa-math,accelerated-block,"
                                 "triton-one-pass,reference,accelerated+compile"])
    assert args.providers[0] == "eager"


def test_the_projection_providers_listed_are_the_scripts_own():
    """benchmarks/conv_projection.py builds its providers inline: the list run.py checks
    against must name the same ones."""
    source = Path(conv_projection.__file__).read_text()
    body = source[source.index("def run("):]
    inline = set(re.findall(r'provs\["([\w+-]+)"\]', body)) | set(
        re.findall(r'"([\w+-]+)": (?:eager|backend)_projection', body))
    assert inline == set(bench_run.CONV_PROJECTION_PROVIDERS), inline


def fake_readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\n{readme_table.BEGIN}\nold table\n{readme_table.END}\n\nrest\n")
    return path


def test_readme_table_prints_by_default_and_writes_only_with_write(tmp_path):
    source = readme_table.source_of((ROOT / readme_table.DOC).read_text())
    readme = fake_readme(tmp_path)
    before = readme.read_text()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.readme_table", source,
                           "--readme", str(readme)], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert readme.read_text() == before  # untouched
    assert proc.stdout.strip() == readme_table.render(source) and "--write" in proc.stderr
    assert readme_table.main([source, "--readme", str(readme), "--write"]) == 0
    assert readme_table.block(readme.read_text()) == readme_table.render(source)
    assert readme.read_text().endswith("\n\nrest\n")
    assert readme_table.main([source, "--readme", str(readme), "--check"]) == 0


def test_models_alone_also_names_an_unknown_provider():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--providers",
                           "eager,acclerated"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "--providers acclerated" in line and "accelerated-block" in line, line


def test_a_results_stamp_says_when_the_code_differs_from_its_commit(tmp_path):
    """``git_commit()`` appends ``+dirty`` for an uncommitted change to the code, not for
    results files the run writes itself."""
    from benchmarks.common import tree_is_dirty

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "cvt_kernels").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "cvt_kernels" / "k.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    assert not tree_is_dirty(tmp_path)
    (tmp_path / "benchmarks" / "results" / "r.csv").write_text("a\n")
    assert not tree_is_dirty(tmp_path)
    (tmp_path / "cvt_kernels" / "k.py").write_text("x = 2\n")
    assert tree_is_dirty(tmp_path)
