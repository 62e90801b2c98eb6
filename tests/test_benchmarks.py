"""The benchmark scripts run (CPU smoke mode) and every provider either runs or says why."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A smoke run of the scripts: the Triton kernels are tested elsewhere, and under the
# interpreter they would make these runs take minutes.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_attention_core_quick(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.attention_core", "--quick", "--out",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True, env=ENV)
    rows = list(csv.DictReader(open(tmp_path / "attention_core.csv")))
    assert {r["provider"] for r in rows} >= {"eager", "sdpa-math", "triton"}
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith(("skipped: ", "failed: ")), r
        assert r["commit"] and r["torch"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert any(r["provider"] == "eager" for r in ok)
    for r in ok:
        assert float(r["max_err"]) < 1e-4, r  # no speed from wrong answers
    assert (tmp_path / "attention_core.md").read_text().startswith("# Attention core")


def _quick(module, tmp_path, *extra):
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out",
                    str(tmp_path), *extra], cwd=ROOT, check=True, capture_output=True, text=True,
                   env=ENV)
    return list(csv.DictReader(open(tmp_path / f"{module}.csv")))


def test_blocks_and_projection_quick(tmp_path):
    for module in ("blocks", "conv_projection"):
        rows = _quick(module, tmp_path, "--compile-mode", "none")
        ok = [r for r in rows if r["status"] == "ok"]
        assert {r["provider"] for r in ok} >= {"eager", "torch"}, rows
        assert {r["mode"] for r in ok} == {"eval", "train"}
        for r in ok:
            assert float(r["rel_err"]) < 1e-4, r


def test_conv_bn_quick(tmp_path):
    """cuDNN-style baseline runs on CPU; cuda and triton rows say why they did not run."""
    from cvt_kernels import backends

    rows = _quick("conv_bn", tmp_path)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"cudnn"}
    assert {(r["part"], r["mode"], r["stride"]) for r in ok} == {
        (p, m, s) for p in ("conv_bn", "conv_bn_linear") for m in ("eval", "train")
        for s in ("1", "2")}
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith(("skipped: ", "failed: ")), r
    reason = backends.available_backends()["cuda"]
    if reason is not None:
        assert all(reason in r["status"] for r in rows if r["provider"] == "cuda")
    for r in ok:
        assert float(r["rel_err"]) < 1e-4, r


def test_harness_quick_all_levels(tmp_path):
    """``python -m benchmarks.run --quick``: every level writes its files, every provider that
    ran was checked against eager first, and the rest say why they did not run."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--level", "all",
                           "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True,
                          text=True, env=ENV)
    for stem in ("attention_core", "conv_projection", "blocks", "models"):
        assert (tmp_path / f"{stem}.csv").exists() and (tmp_path / f"{stem}.md").exists(), stem
        # The plot is optional (matplotlib is not a test dependency): a PNG, or the reason.
        assert (tmp_path / f"{stem}.png").exists() or "no .png: matplotlib" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "models.csv")))
    assert {(r["mode"], r["batch"]) for r in rows} == {("eval", "1"), ("eval", "2"),
                                                       ("train", "2")}
    assert "python -m benchmarks.run --quick" in rows[0]["command"] and rows[0]["commit"]
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
        if r["status"] == "ok":
            assert float(r["rel_err"]) < 1e-4 and float(r["images_per_s"]) > 0, r
            if r["mode"] == "train":
                assert float(r["grad_err"]) < 1e-3, r
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert ok >= {"eager", "accelerated", "accelerated-torch"}, rows
    # Providers that cannot run here are listed with a reason, never dropped.
    assert {r["provider"] for r in rows} >= {"accelerated-triton", "compile"}



def test_readme_table_is_rendered_from_its_results_file():
    """The README's headline numbers are exactly what the committed results file says."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_table

    readme = (ROOT / "README.md").read_text()
    source = readme_table.source_of(readme)
    assert (ROOT / source).exists() and (ROOT / source).with_suffix(".md").exists(), source
    assert readme_table.block(readme) == readme_table.render(source), (
        f"README table is stale: python -m benchmarks.readme_table {source}")
