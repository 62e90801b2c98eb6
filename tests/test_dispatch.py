"""The measured dispatcher (cvt_kernels.dispatch): checked, timed, kept, persisted.

Fake candidates and a fake clock on CPU; under TRITON_INTERPRET=1 the real triton and torch
candidates end to end at tiny shapes (timing faked)."""

import contextlib
import copy
import json
import multiprocessing
import os

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, dispatch, trials
from cvt_kernels.backends.triton import TritonBackend

from conftest import make_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU = torch.device("cpu")


@pytest.fixture
def clock(monkeypatch):
    """Measuring allowed on this device; ``clock["ms"]`` holds each candidate's fake time;
    ``clock["timed"]`` lists the candidates timed, call by call."""
    state = {"ms": {}, "timed": []}

    def fake(runs, clock=None):
        state["timed"].append(sorted(runs))
        return {name: state["ms"][name] for name in runs}

    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_candidates", fake)
    return state


def _fake_call(errors, raising=()):
    """A prepare(name, truth) whose candidates return truth + errors[name] (raising ones
    raise); the truth run returns the truth."""
    truth = torch.linspace(-1, 1, 64, dtype=torch.float64)
    runs = []

    def prepare(name, is_truth):
        def forward():
            if is_truth:
                return truth
            runs.append(name)
            if name in raising:
                raise RuntimeError(f"{name} cannot compile here")
            return (truth + errors[name]).to(torch.bfloat16)

        return trials.Run(contextlib.nullcontext, forward, (), (), ("out",), False,
                          torch.bfloat16, candidate=name)

    return prepare, runs


def _decide(prepare, parts=(), dtype=torch.bfloat16, candidates=("torch", "triton")):
    return dispatch.decide("op", parts, list(candidates), prepare, "torch", dtype, CPU)


@pytest.mark.parametrize("fast", ["triton", "torch"])
def test_the_faster_correct_candidate_wins_and_is_kept(clock, fast):
    clock["ms"] = {"torch": 2.0, "triton": 1.0} if fast == "triton" else {"torch": 1.0,
                                                                          "triton": 2.0}
    prepare, runs = _fake_call({"torch": 0.004, "triton": 0.005})
    parts = (("x", (2, 3)),)
    first = _decide(prepare, parts)
    again = _decide(prepare, parts)
    assert first.choice == again.choice == fast and first.source == "measured"
    assert clock["timed"] == [["torch", "triton"]]  # measured once, then remembered
    assert set(first.errors) == {"torch", "triton"} and first.times_ms == clock["ms"]
    assert set(first.harness_ms) == {"torch", "triton"}
    assert fast in dispatch.describe(first) and "ms" in dispatch.describe(first)


@pytest.mark.parametrize("broken", ["wrong", "raising"])
def test_a_wrong_or_failing_candidate_is_excluded_with_a_warning_and_never_timed(clock,
                                                                               broken):
    clock["ms"] = {"torch": 2.0, "triton": 1.0}  # the broken one would be faster
    errors = {"torch": 0.004, "triton": 0.05 if broken == "wrong" else 0.0}
    prepare, runs = _fake_call(errors, raising=("triton",) if broken == "raising" else ())
    with pytest.warns(RuntimeWarning, match="triton candidate is excluded"):
        decision = _decide(prepare)
    assert decision.choice == "torch" and "triton" in decision.excluded
    assert ("twice the torch backend" if broken == "wrong" else "cannot compile") in \
        decision.excluded["triton"]
    assert clock["timed"] == []  # one candidate left: nothing to time
    _decide(prepare)
    assert runs.count("triton") == 1  # excluded for good


def test_the_baseline_that_fails_is_an_error_not_a_silent_choice(clock):
    prepare, _ = _fake_call({"torch": 0.0, "triton": 0.0}, raising=("torch",))
    with pytest.raises(RuntimeError, match="torch cannot compile"):
        _decide(prepare, dtype=torch.float32)


def test_where_nothing_may_be_timed_the_fixed_order_serves_and_nothing_is_kept(monkeypatch):
    monkeypatch.setattr(dispatch, "can_measure", lambda device: False)
    prepare, runs = _fake_call({"torch": 0.0, "triton": 0.0})
    decision = _decide(prepare, dtype=torch.float32)
    assert decision.choice == "torch" and decision.source == "fixed" and runs == []
    assert dispatch.decisions() == {}


def test_timing_is_refused_on_cpu_under_deterministic_mode_and_the_fixed_policy(monkeypatch):
    assert not dispatch.can_measure(CPU)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda")
    assert dispatch.can_measure(cuda)  # the checks themselves touch no device
    torch.use_deterministic_algorithms(True)
    try:
        assert not dispatch.can_measure(cuda)
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dispatch.can_measure(cuda)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not dispatch.can_measure(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv(dispatch.POLICY_ENV, "fixed")
    assert not dispatch.can_measure(cuda)


def test_the_fixed_policy_uses_the_fixed_order_even_after_a_measured_choice(clock,
                                                                            monkeypatch):
    clock["ms"] = {"torch": 2.0, "triton": 1.0}
    prepare, _ = _fake_call({"torch": 0.004, "triton": 0.004})
    assert _decide(prepare).choice == "triton"
    monkeypatch.setenv(dispatch.POLICY_ENV, "FIXED")
    assert _decide(prepare).choice == "torch"
    monkeypatch.setenv(dispatch.POLICY_ENV, "fast")
    with pytest.raises(ValueError, match=dispatch.POLICY_ENV):
        _decide(prepare)


def test_decisions_persist_across_processes_and_a_version_change_invalidates_them(
        clock, monkeypatch, tmp_path):
    path = tmp_path / "sub" / "dispatch.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    clock["ms"] = {"torch": 2.0, "triton": 1.0}
    prepare, runs = _fake_call({"torch": 0.004, "triton": 0.004})
    args = ("op", (("x", (4, 5)),), ["torch", "triton"], prepare, "torch", torch.bfloat16,
            CPU)
    assert dispatch.decide(*args).choice == "triton"
    stored = json.loads(path.read_text())["decisions"]
    (key, entry), = stored.items()
    assert entry["choice"] == "triton" and '"op": "op"' in key and '"torch": ' in key
    dispatch.clear()  # a new process: nothing in memory
    monkeypatch.setattr(dispatch, "can_measure", lambda device: False)
    loaded = dispatch.decide(*args)
    assert loaded.choice == "triton" and loaded.source == "cache" and len(clock["timed"]) == 1
    dispatch.clear()
    real = dispatch.versions
    monkeypatch.setattr(dispatch, "versions", lambda d: {**real(d), "torch": "9.9"})
    assert dispatch.decide(*args).source == "fixed"  # another torch: not this decision
    monkeypatch.setenv(dispatch.CACHE_ENV, "off")
    assert dispatch.cache_path() is None


def test_an_unreadable_cache_file_is_ignored_not_fatal(clock, monkeypatch, tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text("{ not json")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    clock["ms"] = {"torch": 1.0, "triton": 2.0}
    prepare, _ = _fake_call({"torch": 0.0, "triton": 0.0})
    assert _decide(prepare, dtype=torch.float32).choice == "torch"
    assert json.loads(path.read_text())["format"] == 1  # rewritten, valid


def _write_many(path, start):
    os.environ[dispatch.CACHE_ENV] = path
    for i in range(start, start + 20):
        dispatch._store(f"key-{i}", dispatch.Decision("torch", "measured", ["torch"]))


def test_concurrent_writers_neither_corrupt_the_file_nor_lose_entries(tmp_path):
    path = str(tmp_path / "dispatch.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, 100 * i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    keys = set(json.loads(open(path).read())["decisions"])
    assert keys == {f"key-{i}" for s in range(4) for i in range(100 * s, 100 * s + 20)}


# ----------------------------------------------------------- end to end, the real backends
@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The triton backend as a candidate for CPU tensors (the interpreter runs it)."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setattr(TritonBackend, "tensor_reasons", lambda self, x: [])
    cvt_kernels.backends.clear_selection_cache()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("winner", ["triton", "torch"])
def test_end_to_end_the_chosen_backend_serves_and_statistics_move_once(
        triton_on_cpu, clock, training, winner):
    """A whole FusedConvAttention call: every projection and the attention core decided
    between the real triton and torch backends (checked against a float64 truth, timed by
    the fake clock); the outputs equal the winner's forced run; measuring in training
    leaves the running statistics and counters as one ordinary call leaves them."""
    clock["ms"] = {"torch": 1.0, "triton": 2.0} if winner == "torch" else {
        "torch": 2.0, "triton": 1.0}
    base = make_attention(dim_in=8, dim_out=8, heads=2, training=training,
                          dtype=torch.float32)
    measured = FusedConvAttention.from_reference(copy.deepcopy(base))
    forced = FusedConvAttention.from_reference(copy.deepcopy(base))
    x = torch.randn(2, 10, 8)
    out = measured(x.clone().requires_grad_(training), 3, 3)
    with cvt_kernels.use_backend(winner):
        expected = forced(x.clone().requires_grad_(training), 3, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(measured.buffers(), forced.buffers()):
        assert torch.equal(a, b)
    made = dispatch.decisions()
    assert {json.loads(k)["op"] for k in made} == {"conv_projection", "attention"}
    assert all(d.choice == winner and d.source == "measured" for d in made.values())
    assert all(set(d.errors) == {"torch", "triton"} for d in made.values())


def test_tune_cli_on_cpu_prints_every_key_and_refuses_a_missing_gpu(tmp_path):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({dispatch.CACHE_ENV: str(tmp_path / "d.json"), "OMP_NUM_THREADS": "1"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "cvt_kernels.tune", "--img-size", "32",
                           "--batch", "2", "--dtype", "float32", "--eval"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "on CPU nothing is timed" in out and "attention 13/13" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("conv_projection", "attention "))]
    assert len(rows) == 9 and all(" torch " in r for r in rows), out  # 3 keys x 3 stages
    block = subprocess.run([sys.executable, "-m", "cvt_kernels.tune", "--img-size", "32",
                            "--batch", "2", "--dtype", "float32", "--eval", "--scope", "block"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert block.returncode == 0, block.stdout + block.stderr
    ops = [ln.split()[0] for ln in block.stdout.splitlines()
           if ln.startswith(("conv_projection", "attention ", "norm_mlp ", "layer_norm ",
                             "linear "))]
    assert "13 blocks, eval" in block.stdout
    # eval at block scope: LayerNorm+MLP as one op, the output projection + residual as one
    assert {"norm_mlp", "layer_norm", "linear"} <= set(ops) and len(ops) > 9, block.stdout
    refused = subprocess.run([sys.executable, "-m", "cvt_kernels.tune", "--device", "cuda"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=120)
    if not torch.cuda.is_available():
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr
        assert "Traceback" not in refused.stderr
