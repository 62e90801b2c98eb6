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
    ran was checked by the agreement rule first, and the rest say why they did not run."""
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
    # A tiny CvT-13 (every stage, the class token): a whole one took --quick past 2 minutes.
    assert {r["model"] for r in rows} == {"cvt_13-tiny"}
    assert "python -m benchmarks.run --quick" in rows[0]["command"] and rows[0]["commit"]
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
        if r["status"] == "ok":
            assert float(r["rel_err"]) < 1e-4 and float(r["images_per_s"]) > 0, r
            assert float(r["eager_err"]) < 1e-4, r
            if r["mode"] == "train":  # the training tensor nearest its bar: "name error"
                assert float(r["grad_err"].split()[-1]) < 1e-3, r
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert ok >= {"eager", "accelerated", "accelerated-block", "accelerated-torch"}, rows
    # Providers that cannot run here are listed with a reason, never dropped.
    assert {r["provider"] for r in rows} >= {"accelerated-triton", "compile",
                                             "accelerated+compile"}



def test_readme_table_is_rendered_from_its_results_file():
    """The README's headline numbers are exactly what the committed results file says."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_table

    readme = (ROOT / "README.md").read_text()
    source = readme_table.source_of(readme)
    assert (ROOT / source).exists() and (ROOT / source).with_suffix(".md").exists(), source
    assert readme_table.block(readme) == readme_table.render(source), (
        f"README table is stale: python -m benchmarks.readme_table {source}")


def _run(tmp_path, *args, fault=None):
    env = dict(ENV)
    if fault:
        env["CVT_KERNELS_BENCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out",
                           str(tmp_path), "--no-plot", "--compile-mode", "none", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_a_crash_of_the_cuda_context_costs_one_row(tmp_path):
    """A provider whose kernel poisons the CUDA context (simulated: the error a sticky fault
    raises) gets ``crashed`` in its row; a new worker process goes on past it, the other
    providers are measured, and the crashed provider's later rows say where it crashed."""
    proc = _run(tmp_path, "--level", "blocks", "--isolate", "on", "--no-md", fault="torch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "continuing in a new process (1 of" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "blocks.csv")))
    assert not (tmp_path / "blocks.md").exists()  # --no-md
    by = {(r["mode"], r["provider"]): r["status"] for r in rows}
    assert by[("eval", "torch")].startswith("crashed: RuntimeError: CUDA error: an illegal")
    assert by[("train", "torch")].startswith("skipped: this provider crashed the CUDA context")
    assert "mode=eval" in by[("train", "torch")]
    assert by[("eval", "eager")] == by[("train", "eager")] == "ok"
    assert len(rows) == len(set((r["mode"], r["provider"]) for r in rows)) == 10
    assert "--worker" not in rows[0]["command"] and "--journal-dir" not in rows[0]["command"]


def test_a_worker_that_dies_is_replaced_and_the_row_says_so(tmp_path):
    """A hard crash (the process dies with no Python cleanup, like a segfault): the row that
    was running is recorded as crashed with the exit code, and the run completes."""
    proc = _run(tmp_path, "--level", "model", "--modes", "eval", "--isolate", "on",
                "--providers", "eager,accelerated,accelerated-torch", fault="accelerated:die")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "models.csv")))
    by = {(r["batch"], r["provider"]): r["status"] for r in rows}
    assert by[("1", "accelerated")] == ("crashed: the worker process died while this row ran "
                                        "(exit code 134)")
    assert by[("2", "accelerated")].startswith("skipped: this provider crashed")
    assert by[("1", "accelerated-torch")] == by[("2", "eager")] == "ok"
    # Nothing measured twice, nothing lost: one row per (batch, provider).
    assert len(rows) == len(by) == 6


def test_a_plain_failure_is_not_retried(tmp_path):
    """A bad option ends the run with its own exit code (argparse: 2), no restarts."""
    proc = _run(tmp_path, "--level", "blocks", "--isolate", "on", "--dtype", "float8")
    assert proc.returncode == 2 and "new process" not in proc.stdout


def test_summary_of_a_session_directory(tmp_path):
    """benchmarks.summarize reads what gpu_session.sh writes; missing parts say so."""
    from benchmarks import summarize

    (tmp_path / "bench").mkdir()
    (tmp_path / "tests_gpu.txt").write_text(
        "== attention_bf16_d64 (cap 50 s)\n..F\nFAILED tests/x.py::test_a - AssertionError\n"
        "1 failed, 2 passed in 3.0s\nexit 1\n")
    head = "model,img,stage,batch,dtype,mode,provider,status,ms\n"
    body = "".join(f"cvt_13,224,1,64,bfloat16,train,{p},ok,{ms}\n"
                   for p, ms in (("eager", 10.0), ("torch", 4.0), ("triton", 2.0)))
    (tmp_path / "bench" / "blocks_quick.csv").write_text(head + body)
    text = summarize.summarize(tmp_path)
    assert "attention_bf16_d64" in text and "1 failed, 2 passed" in text and "[exit 1]" in text
    assert "FAILED tests/x.py::test_a" in text
    lines = {ln.split("  x")[0].split(" not measured")[0].strip(): ln for ln in
             text.splitlines()}
    assert "x5.00 (target >= 4.0x): met" in lines["stage-1 block fwd+bwd vs eager"]
    assert "x2.00 (target >= 1.2x): met" in lines["stage-1 block fwd+bwd vs torch backend"]
    assert "not measured" in lines["stage-3 block fwd+bwd vs eager"]
    assert "no bench/models_quick.csv" in text and "no profile.txt" in text


def test_overhead_benchmark_runs_and_needs_the_interpreter(tmp_path):
    """benchmarks.overhead: rows for both backends and three calls; without
    TRITON_INTERPRET=1 it refuses with one line (the triton launchers need the interpreter
    to run on CPU)."""
    refused = subprocess.run([sys.executable, "-m", "benchmarks.overhead"], cwd=ROOT,
                             capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and "TRITON_INTERPRET=1" in refused.stderr
    done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--calls", "3",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env={**ENV, "TRITON_INTERPRET": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(open(tmp_path / "overhead.csv")))
    assert {(r["backend"], r["call"]) for r in rows} == {
        (b, c) for b in ("triton", "torch", "auto")
        for c in ("eval forward", "train forward", "train forward+backward")}
    assert all(float(r["us_per_call"]) > 0 for r in rows)
    block = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--module", "block",
                            "--calls", "2", "--repeats", "1", "--out", str(tmp_path),
                            "--tag", "_block"], cwd=ROOT, capture_output=True, text=True,
                           env={**ENV, "TRITON_INTERPRET": "1"}, timeout=300)
    assert block.returncode == 0, block.stdout + block.stderr
    rows = list(csv.DictReader(open(tmp_path / "overhead_block.csv")))
    assert {r["module"] for r in rows} == {"block"}
    assert {r["backend"] for r in rows} == {"triton", "torch", "auto", "eager"}


def test_harness_without_out_says_so_and_takes_several_levels():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--level", "ops",
                           "blocks", "--op", "attention", "--no-plot", "--compile-mode", "none"],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no --out DIR given: results are printed here, no files are written" in proc.stdout
    assert "== level ops" in proc.stdout and "== level blocks" in proc.stdout
    assert "== level model" not in proc.stdout and "wrote " not in proc.stdout


def test_harness_runs_as_a_file_from_any_directory(tmp_path):
    """``python -m benchmarks.run`` needs the repository root; the file runs from anywhere
    (a relative --out is the caller's), and bad options are one line, exit code 2."""
    run_py = str(ROOT / "benchmarks" / "run.py")
    assert "repository root" in subprocess.run(
        [sys.executable, run_py, "--help"], cwd=tmp_path, capture_output=True, text=True,
        env=ENV).stdout
    bad = subprocess.run([sys.executable, run_py, "--level", "everything"], cwd=tmp_path,
                         capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "invalid choice: 'everything'" in bad.stderr
    done = subprocess.run([sys.executable, run_py, "--quick", "--level", "blocks", "--out",
                           "results", "--no-plot", "--compile-mode", "none"], cwd=tmp_path,
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "results" / "blocks.csv").exists()


def _common():
    sys.path.insert(0, str(ROOT))
    from benchmarks import common
    return common


def test_times_below_the_timer_resolution_get_no_ratio(capsys):
    """A tiny shape's time that is smaller than its own noise, or than the clock's tick,
    gets a note instead of a ratio like x286.64 or x0.0."""
    common = _common()
    rows = [dict(provider="eager", status="ok", ms=0.25, q20_ms=0.2, q80_ms=5.0),
            dict(provider="torch", status="ok", ms=0.3, q20_ms=0.29, q80_ms=0.31),
            dict(provider="triton", status="ok", ms=0.0, q20_ms=0.0, q80_ms=0.0),
            dict(provider="compile", status="skipped: --compile-mode none")]
    common.print_group(rows, "tiny")
    out = capsys.readouterr().out.splitlines()
    assert not [k for r in rows for k in r if k.startswith("vs_")], rows
    assert "q20-q80 spread (4.8 ms) is larger than the time" in rows[0]["timing"]
    assert "timer's resolution" in rows[2]["timing"] and "timing" not in rows[1]
    assert "(no ratio: eager's time is below the timer's resolution" in out[1]
    assert all(" vs eager" not in line for line in out[1:]), out
    resolved = [dict(provider="eager", status="ok", ms=300.0, q20_ms=299.0, q80_ms=301.0),
                dict(provider="torch", status="ok", ms=1.0, q20_ms=0.99, q80_ms=1.01)]
    common.add_speedups(resolved)
    assert resolved[1]["vs_eager"] == 300.0
    assert resolved[0]["vs_torch"] == 0.0033  # not rounded away to 0.0


def test_failure_messages_are_kept_whole(tmp_path):
    common = _common()
    message = ("the provider cannot run this shape because " + "of a long reason, " * 20
               + "end of the sentence.")
    status = common.failure_status(RuntimeError(message + "\nsecond line"), 1)
    assert status == f"failed: RuntimeError: {message}"
    common.write_markdown(tmp_path / "x.md", "t", {}, [dict(provider="p", status=status)])
    assert message in (tmp_path / "x.md").read_text()
