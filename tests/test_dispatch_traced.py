"""Decisions reach traced code (issue 23): ``torch.export`` with a dynamic batch works on the
default dispatch (no symbolic shape is ever hashed), and what the dispatcher decided (in this
process or, through the decisions file, in an earlier one) is what exported and compiled
programs run.

As in ``test_dispatch_trust.py`` the ``reference`` backend stands in for a kernel backend
beside ``torch``: it runs through our custom ops, so a traced program shows which backend
each op call was given (the last argument of ``cvt_kernels.*`` nodes)."""

import copy

import pytest
import torch
from torch.export import Dim

import cvt_kernels
from cvt_kernels import backends, dispatch, models

from conftest import randomize_bn

NARROW = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 1]}
KERNEL = "reference"


def _model(scope: str):
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=5, img_size=32, spec_overrides=NARROW).eval()
    randomize_bn(eager)
    fused, _ = cvt_kernels.accelerate(copy.deepcopy(eager), scope=scope)
    return eager, fused


@pytest.fixture
def kernel_wins(monkeypatch, tmp_path):
    """``torch`` and ``reference`` are the candidates, measuring is allowed (timing faked:
    ``reference`` faster), decisions go to a file of their own."""
    monkeypatch.setattr(backends, "CANDIDATES", ("torch", KERNEL))
    backends.clear_selection_cache()
    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_candidates",
                        lambda runs, clock=None: {n: 1.0 if n == KERNEL else 2.0 for n in runs})
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    yield
    backends.clear_selection_cache()


def _backends_in(graph) -> set:
    """The backend argument of every cvt_kernels op node in an FX graph (found by name: the
    projection ops take arguments after it)."""
    found = set()
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("cvt_kernels."):
            names = [a.name for a in node.target._schema.arguments]
            found.add({**dict(zip(names, node.args)), **node.kwargs}["backend"])
    return found


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_export_with_a_dynamic_batch_on_the_default_dispatch(scope):
    """What Hugging Face's exporter does (``Dim.AUTO`` on the batch): failed with
    "unhashable type: non-nested SymInt" in the decision lookup."""
    eager, fused = _model(scope)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(fused, (x,), dynamic_shapes={"x": {0: Dim.AUTO}})
    x3 = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3), eager(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["attention", "block"])
@pytest.mark.parametrize("source", ["this process", "the file"])
def test_exported_programs_run_what_was_decided(kernel_wins, scope, source):
    eager, fused = _model(scope)
    x = torch.randn(2, 3, 32, 32)
    fused(x)  # the first eager call measures: the kernel backend wins every op
    made = dispatch.decisions()
    assert made and all(d.choice == KERNEL for d in made.values())
    if source == "the file":
        dispatch.clear()  # as a new process: only the file knows
    program = torch.export.export(fused, (x,))
    assert _backends_in(program.graph) == {KERNEL}
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_a_dynamic_batch_export_runs_the_decision_made_at_a_concrete_batch(kernel_wins,
                                                                          scope):
    _, fused = _model(scope)
    x = torch.randn(2, 3, 32, 32)
    fused(x)
    program = torch.export.export(fused, (x,), dynamic_shapes={"x": {0: Dim.AUTO}})
    assert _backends_in(program.graph) == {KERNEL}


def test_without_a_decision_an_export_runs_the_fixed_order(kernel_wins):
    _, fused = _model("attention")
    program = torch.export.export(fused, (torch.randn(2, 3, 32, 32),))
    assert _backends_in(program.graph) == set()  # torch: stock ops, traced through


def test_compiled_models_run_what_was_decided(kernel_wins):
    eager, fused = _model("attention")
    x = torch.randn(2, 3, 32, 32)
    fused(x)
    dispatch.clear()  # only the file knows
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(fused, backend=capture, fullgraph=True)
    out = compiled(x)
    assert len(graphs) == 1 and _backends_in(graphs[0].graph) == {KERNEL}
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)


def test_info_lists_each_decision_with_its_evidence_and_forgets_them(kernel_wins, tmp_path):
    import os
    import subprocess
    import sys

    _, fused = _model("attention")
    fused(torch.randn(2, 3, 32, 32))
    env = dict(os.environ, **{dispatch.CACHE_ENV: str(tmp_path / "dispatch.json")})
    env.pop("TRITON_INTERPRET", None)

    def info(*args):
        return subprocess.run([sys.executable, "-m", "cvt_kernels.info", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    listed = info("--decisions")
    assert listed.returncode == 0, listed.stderr
    rows = [ln for ln in listed.stdout.splitlines() if ln.startswith("      -> ")]
    assert len(rows) == len(dispatch.decisions()) > 0
    assert all(f"-> {KERNEL};" in r and "ms, err" in r and "harness" in r for r in rows), rows
    forgot = info("--forget")
    assert forgot.returncode == 0 and "deleted" in forgot.stdout
    assert not (tmp_path / "dispatch.json").exists()
    assert info("--bogus").returncode == 2
