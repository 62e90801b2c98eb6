"""The benchmark scripts run (CPU smoke mode) and every provider either runs or says why."""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package, imported by some tests
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
    """The performance page's headline table is exactly what the committed results file
    says."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_table

    readme = (ROOT / readme_table.DOC).read_text()
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
    from benchmarks import blocks
    assert len(rows) == len(set((r["mode"], r["provider"]) for r in rows)) == 2 * len(
        blocks.PROVIDERS)
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


def _lines(text):
    """summary lines by their label (the text before the numbers)."""
    return {re.split(r"\s{2,}", ln.strip())[0]: ln for ln in text.splitlines() if ln.strip()}


def test_summary_of_a_session_directory(tmp_path):
    """benchmarks.summarize reads what gpu_session.sh writes: test groups, block rows with
    the dispatcher's choice against the best forced backend, the targets met or not from
    model rows (with and without CUDA graphs), the counted estimate beside each model row it
    counts, the steps' exits; missing parts say so."""
    from benchmarks import summarize

    (tmp_path / "bench").mkdir()
    (tmp_path / "tests_gpu.txt").write_text(
        "== attention_bf16_d64 (cap 50 s)\n..F\nFAILED tests/x.py::test_a - AssertionError\n"
        "1 failed, 2 passed in 3.0s\nexit 1 (4 s)\n")
    (tmp_path / "info.txt").write_text("commit abc1234  date 2026-12-07  mode quick\n"
                                       "name, memory.total\nNVIDIA H100 80GB HBM3, 81559\n")
    (tmp_path / "log.txt").write_text("== models (cap 150 s)\n...\nmodels exit 0 (99 s)\n"
                                      "== blocks (cap 75 s)\nblocks exit 124 (75 s)\n")
    head = "model,img,scope,stage,batch,dtype,mode,provider,status,ms\n"
    body = "".join(f"cvt_13,224,block,{st},64,bfloat16,train,{p},ok,{ms}\n"
                   for st, p, ms in ((1, "eager", 10.0), (1, "torch", 4.0), (1, "triton", 2.0),
                                     (1, "auto", 2.05), (3, "eager", 3.0), (3, "torch", 2.0),
                                     (3, "triton", 2.5), (3, "auto", 2.5)))
    (tmp_path / "bench" / "blocks_quick.csv").write_text(head + body)
    head = ("model,img,dtype,mode,batch,provider,status,ms,cudagraph_ms,peak_mb,host_ms,"
            "device_ms,bound\n")
    rows = [("eval", "eager", 12.0, 5.0, 900, 11.0, 5.0, "host"),
            ("eval", "accelerated-block-torch", 8.0, 4.0, 600, 7.9, 4.0, "host"),
            ("eval", "accelerated-block+graph", 3.0, "n/a: replays", 600, 0.1, 3.0, "device"),
            ("train", "eager", 60.0, "failed: RuntimeError: x", 9000, 55.0, 30.0, "host"),
            ("train", "accelerated-block-torch", 45.0, 20.0, 5000, 40.0, 20.0, "host")]
    (tmp_path / "bench" / "models_quick.csv").write_text(head + "".join(
        f"cvt_13,224,bfloat16,{m},64,{p},ok,{ms},{cg},{pk},{h},{d},{b}\n"
        for m, p, ms, cg, pk, h, d, b in rows))
    (tmp_path / "bench" / "step_cost.csv").write_text(
        "provider,mode,launches,gb,est_ms_h100,est_ms_h200,model,img,batch,dtype,commit\n"
        "block-torch,eval,271,7.97,2.8,1.95,cvt_13,224,64,bfloat16,abc1234\n"
        "block-triton,eval,110,4.1,2.0,1.5,cvt_13,224,64,bfloat16,abc1234\n")
    text = summarize.summarize(tmp_path)
    assert "attention_bf16_d64" in text and "1 failed, 2 passed" in text and "[exit 1]" in text
    assert "FAILED tests/x.py::test_a" in text
    assert "models 99 s | blocks 75 s [exit 124]" in text
    lines = _lines(text)
    assert "triton x5.00, auto x4.88 (>=4x): met" in lines["block s1 train vs eager"]
    assert "triton x2.00, auto x1.95 (>=1.2x): met" in lines[
        "block s1 train vs torch backend"]
    assert "NOT met" in lines["block s3 train vs eager"]
    assert "not measured (compile: no row)" in lines["block s1 train vs compile"]
    # auto vs the best forced backend: 2.05 / 2.0 within 5% at stage 1, 2.5 / 2.0 not at 3.
    assert "auto/triton 1.02: within 5%" in text and "auto/torch 1.25: NOT within 5%" in text
    assert "dispatcher within 5% of the best forced backend at 1 of 2 shapes: NOT met" in text
    assert ("x1.50 (perf.md >=2x: NOT met; issue 24 >=1.5x: met), "
            "accelerated-block-torch") in lines["CvT-13 eval vs eager"]
    assert "x4.00 (perf.md >=2.5x: met; issue 24 >=2x: met), accelerated-block+graph" in \
        lines["CvT-13 eval, graphs, vs eager"]
    assert "x3.00 (issue 24 >=1.5x: met), accelerated-block-torch (graph ms)" in lines[
        "CvT-13 train, graphs, vs eager"]
    assert "x0.56 (perf.md <=0.6x: met)" in lines["CvT-13 train peak memory vs eager"]
    assert "not measured (compile: no row)" in lines["CvT-13 eval vs compile"]
    # The counted estimate beside the rows it counts (the H100 column: info.txt's GPU), and
    # none beside a row the counter has no row for.
    eval_row, train_row = [ln for ln in text.splitlines()
                           if ln.startswith("  accelerated-block-torch ")]
    assert eval_row.split()[1] == "8.00" and eval_row.endswith("271   8.0   2.80"), eval_row
    assert train_row.split()[-1] == "host", train_row
    assert "step_cost.csv, this run's commit" in text
    assert "110, 4.1 (<=120, <=4.5): met" in lines["block-triton eval launches, GB"]
    assert "graph capture failed, eager: failed: RuntimeError: x" in text
    assert "vs 2026-11-30" in text and "eager 12.20 -> 12.00" in text
    assert "no dispatch.txt" in text and "no profile step in log.txt" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = summarize.summarize(empty)
    assert "no bench/models_quick.csv" in text and "no tests_gpu.txt" in text


def _decision(choice, times, **extra):
    return {"choice": choice, "source": "measured", "candidates": list(times),
            "times_ms": times, "errors": {n: "1.0e-03" for n in times}, "excluded": {},
            "harness_ms": {n: 0.5 for n in times}, **extra}


def test_decisions_report_tables_and_agreement(tmp_path, capsys):
    """``--decisions``: each file's decisions with every candidate's time, error and harness
    cost; then the first file against each other one: keys in common and differences."""
    from benchmarks import summarize

    def key(op, shape):
        return json.dumps({"op": op, "x": shape, "training": True, "candidates": ["torch",
                           "triton"], "torch": "2.11", "code": "abc", "device": "H100"})

    one = {key("attention", [64, 3136]): _decision("torch", {"torch": 0.1, "triton": 0.2}),
           key("mlp", [64, 197]): _decision("triton", {"torch": 0.3, "triton": 0.25})}
    two = {key("attention", [64, 3136]): _decision("torch", {"torch": 0.1, "triton": 0.21}),
           key("mlp", [64, 197]): _decision("torch", {"torch": 0.25, "triton": 0.26})}
    for name, entries in (("a.json", one), ("b.json", two)):
        (tmp_path / name).write_text(json.dumps({"format": 1, "decisions": entries}))
    rc = summarize.main(["--decisions", f"run1={tmp_path / 'a.json'}",
                         f"run2={tmp_path / 'b.json'}", f"none={tmp_path / 'missing.json'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "attention: x=[64, 3136] training=True\n      -> torch (measured); torch: 0.100 ms, " \
           "err 1.0e-03, harness 0.50 ms; triton: 0.200 ms" in out
    assert "decisions: run1: 2 keys; chosen torch 1, triton 1" in out
    assert "agreement: run1 vs run2: 2 keys in common, 1 same choice: 1 differ" in out
    assert "differ mlp x=[64, 197] training=True: run1 triton (" in out
    assert "agreement: run1 vs none: 0 keys in common, 0 same choice: no keys in common" in out
    assert "none: nothing measured" in out
    assert summarize.main(["--decisions", "no-label"]) == 2
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "dispatch.txt").write_text(out)
    text = summarize.summarize(tmp_path / "s")
    assert "  agreement: run1 vs run2: 2 keys in common, 1 same choice: 1 differ" in text


def test_step_cost_of_another_shape_is_not_joined(tmp_path):
    """The counted estimate is joined only where the counter counted the measured shape;
    otherwise the summary says there is none for it."""
    from benchmarks import summarize

    rows, note = summarize.step_cost_rows([], ("cvt_13-tiny", "64", "2", "float32"), "x")
    assert rows == {} and note == "no step-cost file for cvt_13-tiny 64 2 float32"
    rows, note = summarize.step_cost_rows([], ("cvt_13", "224", "64", "bfloat16"), "zzz")
    assert ("block-triton", "eval") in rows and "not this run's" in note


def _fake_compile(module, mode=None, **kwargs):
    return module  # the deferral is under test, not torch.compile


def test_compile_rows_are_measured_after_every_other_row(monkeypatch):
    """Whole models and blocks: the compile providers run after every other provider of
    every mode (a time budget cuts them first), and their ratios use the first rows'
    eager time."""
    import torch

    from benchmarks import blocks, models

    monkeypatch.setattr(torch, "compile", _fake_compile)
    args = argparse.Namespace(quick=True, model=None, img_size=None, dtype=None, batch=[2],
                              train_batch=[2], modes=["eval", "train"], compile=True,
                              compile_mode="default", repeats=1, deadline=None,
                              providers=["eager", "compile"])
    rows = models.run(args)
    order = [(r["mode"], r["provider"]) for r in rows]
    assert order == [("eval", "eager"), ("train", "eager"), ("eval", "compile"),
                     ("train", "compile")], order
    assert all(r["status"] == "ok" for r in rows), rows
    assert all("vs_eager" in r for r in rows[-2:]), rows[-2:]  # one sample: no noise note
    args = argparse.Namespace(quick=True, model=None, img_size=None, dtype=None, batch=2,
                              compile_mode="default", deadline=None, scope="block",
                              providers=["eager", "auto+compile", "auto"])
    rows = blocks.run(args)
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("eval", "eager"), ("eval", "auto"), ("train", "eager"), ("train", "auto"),
        ("eval", "auto+compile"), ("train", "auto+compile")]
    assert {r["scope"] for r in rows} == {"block"}
    assert all(r["status"] == "ok" for r in rows), rows
    for r, eager in zip(rows[-2:], (rows[0], rows[2])):  # (unless the CPU's noise hid it)
        assert "vs_eager" in r or r.get("timing") or eager.get("timing"), (r, eager)


# The files the quick GPU session returns: at most 8 (the machine's limit), two folders deep.
SESSION_FILES = {"info.txt", "tests_gpu.txt", "log.txt", "dispatch.txt", "summary.txt",
                 "bench/models_quick.csv", "bench/blocks_quick.csv", "bench/step_cost.csv",
                 "bench/overhead_block.csv"}


def test_dry_run_of_the_quick_gpu_session(tmp_path):
    """``DRY_RUN=1 bash benchmarks/gpu_session.sh quick`` on CPU: every step runs at toy sizes
    and exits 0, every test group selects tests, and exactly the session's files are
    written (no more than the GPU machine returns), each holding what the summary reads."""
    out = tmp_path / "out"
    env = {**ENV, "DRY_RUN": "1", "PY": sys.executable, "OUT": str(out),
           "CVT_KERNELS_COMMIT": "dryrun0"}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == SESSION_FILES, written
    # The layout the step-cost count assumes for the torch backend's convs, as this machine
    # returns it (on the GPU: the check of the assumption).
    assert "depthwise conv of a channels-last" in (out / "info.txt").read_text()
    log = (out / "log.txt").read_text()
    exits = dict(re.findall(r"^(\S+) exit (\S+)", log, re.M))
    assert exits == {s: "0" for s in ("models", "blocks", "tune_1", "tune_2", "tune_block",
                                       "profile", "models_compile", "blocks_compile",
                                       "step_cost", "overhead")}, log[-3000:]
    tests = (out / "tests_gpu.txt").read_text()
    groups = re.findall(r"^== (\S+) \(collect only", tests, re.M)
    assert len(groups) >= 9 and "gpu_misc" in groups, tests
    assert re.findall(r"^exit (\S+)", tests, re.M) == ["0"] * len(groups), tests
    models = list(csv.DictReader(open(out / "bench" / "models_quick.csv")))
    assert {r["provider"] for r in models} >= {
        "eager", "accelerated", "accelerated-block", "accelerated-torch",
        "accelerated-block-torch", "accelerated-block-triton", "eager+graph",
        "accelerated-block+graph", "compile", "accelerated-block+compile"}
    for r in models:
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
        if r["status"] == "ok":
            assert float(r["host_ms"]) > 0 and r["device_ms"] == "n/a", r
            assert r["commit"] == "dryrun0"
    # The compile step's rows added to the file (--append), eager measured again beside
    # them; every other row kept once.
    names = [(r["mode"], r["provider"]) for r in models]
    assert len(names) == len(set(names)), names
    assert [p for _, p in names[-6:]] == ["eager", "eager", "compile",
                                           "accelerated-block+compile", "compile",
                                           "accelerated-block+compile"], names
    assert len({r["command"] for r in models}) == 2
    blocks_rows = list(csv.DictReader(open(out / "bench" / "blocks_quick.csv")))
    assert {r["scope"] for r in blocks_rows} == {"block"}
    assert {r["provider"] for r in blocks_rows} >= {"triton-one-pass", "auto", "compile",
                                                    "auto+compile"}
    assert {r["provider"] for r in blocks_rows if r["status"] == "ok"} >= {"eager", "torch",
                                                                            "auto"}
    cost = list(csv.DictReader(open(out / "bench" / "step_cost.csv")))
    assert {r["model"] for r in cost} == {"cvt_13-tiny"} and len(cost) >= 10
    assert "agreement: tune_1 vs tune_2" in (out / "dispatch.txt").read_text()
    summary = (out / "summary.txt").read_text()
    for part in ("tests (tests_gpu.txt)", "bench/models_quick.csv", "scope block",
                 "dispatcher (dispatch.txt)", "targets (", "vs 2026-11-30", "profile (log.txt)",
                 "step_cost.csv, this run's commit",
                 "host us per FusedBlock call on this machine's CPU"):
        assert part in summary, part
    overhead = list(csv.DictReader(open(out / "bench" / "overhead_block.csv")))
    assert {r["backend"] for r in overhead} == {"triton", "torch", "auto", "eager"}
    assert re.search(r"train forward\+backward: triton \d+ us, eager \d+ us", summary)
    assert len(summary.splitlines()) <= 110, summary


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
    hf = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--module", "hf",
                         "--calls", "2", "--repeats", "1", "--out", str(tmp_path),
                         "--tag", "_hf", "--sequential"], cwd=ROOT, capture_output=True,
                        text=True, env={**ENV, "TRITON_INTERPRET": "1"}, timeout=300)
    assert hf.returncode == 0, hf.stdout + hf.stderr
    rows = list(csv.DictReader(open(tmp_path / "overhead_hf.csv")))
    assert {(r["module"], r["backend"]) for r in rows} == {
        ("hf", b) for b in ("triton", "torch", "auto", "eager")} and len(rows) == 12


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


def test_host_and_device_fields_on_cpu():
    """``profile_step.host_and_device``: the host's time to issue a step, the profiled CPU
    time, and no device time or bound on CPU (nothing to compare with)."""
    import torch

    from benchmarks.profile_step import host_and_device

    x = torch.randn(256, 256)
    row = host_and_device(lambda: (x @ x).sum(), torch.device("cpu"), repeats=2)
    assert row["host_ms"] > 0 and row["profiled_cpu_ms"] > 0, row
    assert row["device_ms"] == "n/a" and row["bound"] == "n/a", row


def test_graph_provider_needs_cuda_and_keys_on_drop_path():
    """The ``+graph`` providers refuse CPU inputs with the reason; a call signature includes
    whether drop path draws masks (a check with it off and a timed step with it on capture
    different graphs)."""
    import pytest
    import torch

    from benchmarks.models import Graphed, build_eager, drop_path_on

    model = build_eager("cvt_13-tiny", 32, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        Graphed(model)(torch.randn(1, 3, 32, 32))
    from cvt_kernels import agreement
    assert not drop_path_on(model.eval())
    assert drop_path_on(model.train())  # CvT-13's last stage
    with agreement.no_drop_path(model):
        assert not drop_path_on(model)


def test_append_keeps_an_earlier_steps_rows(tmp_path):
    """``--append`` (a later step of a GPU session adding to one file): the file's rows stay,
    with their own stamp, except those measured again, which the new ones replace."""
    common = _common()

    def rows(*pairs):
        return [dict(model="m", mode="eval", batch=2, provider=p, status="ok", ms=ms)
                for p, ms in pairs]

    common.save_results(str(tmp_path), "models", "t", argparse.Namespace(),
                        rows(("eager", 1.0), ("torch", 2.0)), command="first", plot=False,
                        verbose=False)
    common._APPENDED_TO.clear()  # a new process
    later = argparse.Namespace(append=True)
    for n in (1, 2):  # saved after every row: the earlier rows are read once
        common.save_results(str(tmp_path), "models", "t", later,
                            rows(("eager", 1.5), ("compile", 3.0))[:n], command="second",
                            plot=False, verbose=False)
    got = [(r["provider"], r["ms"], r["command"])
           for r in csv.DictReader(open(tmp_path / "models.csv"))]
    assert got == [("torch", "2.0", "first"), ("eager", "1.5", "second"),
                   ("compile", "3.0", "second")], got
    assert "| torch | ok | 2.0 |" in (tmp_path / "models.md").read_text()


def test_size_arguments_benchmark_writes_every_form(tmp_path):
    """benchmarks.size_arguments (the measurement behind the launchers' int sizes): one row
    per statement, each form of each op, positive times, in the results file."""
    from benchmarks import size_arguments

    assert size_arguments.main(["--number", "20", "--repeats", "1", "--out",
                                str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "size_arguments.csv")))
    forms = {(r["op"], r["form"]) for r in rows}
    assert {("torch.empty(..., dtype, device)", f) for f in ("ints", "tuple", "torch.Size")
            } <= forms
    assert {("y.view(...)", f) for f in ("ints", "torch.Size")} <= forms
    assert {("launch(*24 args, 14 keywords)", f)
            for f in ("literal", "**dict", "**MappingProxyType")} <= forms
    assert all(float(r["us_per_call"]) > 0 for r in rows)
