"""Measured dispatch you can trust (issue 23): it checks everything a candidate returns,
times only the candidate, keys decisions on everything they depend on, never leaks a forced
backend across threads and never flips process-wide settings.

On CPU the ``reference`` backend (explicit forward and backward through the ops' custom-op
path, as the kernel backends run) stands in as the second candidate beside ``torch``;
measuring is allowed and the timing faked unless a test says otherwise."""

import json
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cvt_kernels
from cvt_kernels import backends, dispatch, trials
from cvt_kernels.backends import ProjectionConfig, ProjectionParams
from cvt_kernels.ops import attention, conv_projection
from cvt_kernels.ops.layer_norm import add_layer_norm, layer_norm
from cvt_kernels.ops.mlp import mlp

FAST = "reference"


@pytest.fixture
def measured(monkeypatch):
    """``torch`` and ``reference`` are the candidates of every call; measuring is allowed;
    the fake timing makes ``reference`` faster (``times`` can change that per dtype)."""
    times = {"default": {"torch": 2.0, FAST: 1.0}}
    monkeypatch.setattr(backends, "CANDIDATES", ("torch", FAST))
    backends.clear_selection_cache()
    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)

    def fake(runs, clock=None):
        table = times.get(times.get("now", "default"), times["default"])
        return {name: table[name] for name in runs}

    monkeypatch.setattr(dispatch, "time_candidates", fake)
    yield times
    backends.clear_selection_cache()


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _projection(training: bool, grad: bool):
    c, c_out = 8, 12
    params = ProjectionParams(_leaf(c, 1, 3, 3, grad=grad), _leaf(c, grad=grad),
                              _leaf(c, grad=grad), torch.zeros(c), torch.ones(c),
                              torch.zeros((), dtype=torch.long), _leaf(c_out, c, grad=grad),
                              _leaf(c_out, grad=grad))
    x = _leaf(2, 1 + 4 * 5, c, grad=grad)
    cfg = ProjectionConfig("dw_bn", 3, 2, 1, True)
    return lambda: conv_projection(x, 4, 5, params, cfg, training=training)


def _attention(grad: bool):
    q, k, v = _leaf(2, 9, 8, grad=grad), _leaf(2, 4, 8, grad=grad), _leaf(2, 4, 8, grad=grad)
    return lambda: attention(q, k, v, 2, 8 ** -0.5)


def _mlp():
    x, r = _leaf(2, 5, 8), _leaf(2, 5, 6)
    w1, b1, w2, b2 = _leaf(16, 8), _leaf(16), _leaf(6, 16), _leaf(6)
    return lambda: mlp(x, w1, b1, w2, b2, "quick_gelu", r)


def _layer_norm(residual: bool):
    x, r, w, b = _leaf(2, 5, 8), _leaf(2, 5, 8), _leaf(8), _leaf(8)
    if residual:
        return lambda: add_layer_norm(x, r, w, b)
    return lambda: layer_norm(x, w, b)


_GRADS = {"attention": ["grad_q", "grad_k", "grad_v"],
          "conv_projection": ["grad_x", "grad_conv_weight", "grad_bn_weight", "grad_bn_bias",
                              "grad_proj_weight", "grad_proj_bias"]}
# Each op call, and every named result its trial must return (outputs, the gradient of
# every input that requires one, the running statistics).
CALLS = {
    "attention-train": (_attention, (True,), "attention", ["out"] + _GRADS["attention"]),
    "attention-eval": (_attention, (False,), "attention", ["out"]),
    "projection-train": (_projection, (True, True), "conv_projection",
                         ["out"] + _GRADS["conv_projection"] + ["running_mean",
                                                                "running_var"]),
    "projection-eval": (_projection, (False, False), "conv_projection", ["out"]),
    "mlp": (_mlp, (), "mlp", ["out", "grad_x", "grad_fc1_weight", "grad_fc1_bias",
                              "grad_fc2_weight", "grad_fc2_bias", "grad_residual"]),
    "layer_norm": (_layer_norm, (False,), "layer_norm",
                   ["normed", "grad_x", "grad_weight", "grad_bias"]),
    "add_layer_norm": (_layer_norm, (True,), "layer_norm",
                       ["normed", "sum", "grad_x", "grad_residual", "grad_weight",
                        "grad_bias"]),
}


def _record_results(monkeypatch):
    """Every named result a candidate's checking run returns, by candidate."""
    seen = {}
    real = trials.Run.__call__

    def spy(self):
        out = real(self)
        seen.setdefault(self.candidate, set()).update(n for n, t in out.items()
                                                      if t is not None)
        return out

    monkeypatch.setattr(trials.Run, "__call__", spy)
    return seen


@pytest.mark.parametrize("case", list(CALLS))
def test_a_correct_candidate_returns_every_output_gradient_and_statistic_and_wins(
        measured, monkeypatch, case):
    make, args, op, names = CALLS[case]
    seen = _record_results(monkeypatch)
    make(*args)()
    made = [d for d in dispatch.decisions().values() if json.loads(d.key)["op"] == op]
    assert len(made) == 1 and made[0].choice == FAST and not made[0].excluded, made
    assert seen[FAST] == seen["torch"] == seen["truth"] == set(names)


def _perturbed(name, monkeypatch):
    """The candidate's ``name`` result gets one wrong entry: 5 % of the call's largest
    value of that kind (a gradient: of every gradient, so it clears the floor)."""
    real = trials.Run.__call__

    def wrong(self):
        out = real(self)
        if self.candidate == FAST:
            t = out[name].clone()
            group = [v for n, v in out.items()
                     if v is not None and n.startswith("grad_") == name.startswith("grad_")]
            t.view(-1)[0] += 0.05 * max(v.abs().max().item() for v in group) + 1e-3
            out[name] = t
        return out

    monkeypatch.setattr(trials.Run, "__call__", wrong)


@pytest.mark.parametrize("case,name", [(c, n) for c, (_, _, _, ns) in CALLS.items()
                                       for n in ns])
def test_one_wrong_output_gradient_or_statistic_excludes_the_candidate(measured, monkeypatch,
                                                                       case, name):
    make, args, op, _ = CALLS[case]
    _perturbed(name, monkeypatch)
    with pytest.warns(RuntimeWarning, match=f"{FAST} candidate is excluded.*{name}"):
        make(*args)()
    made = [d for d in dispatch.decisions().values() if json.loads(d.key)["op"] == op]
    assert made[0].choice == "torch" and FAST in made[0].excluded


def test_a_missing_gradient_excludes_the_candidate(measured, monkeypatch):
    real = trials.Run.__call__

    def lose(self):
        out = real(self)
        if self.candidate == FAST:
            out.pop("grad_fc2_bias")
        return out

    monkeypatch.setattr(trials.Run, "__call__", lose)
    with pytest.warns(RuntimeWarning, match="returned no grad_fc2_bias"):
        _mlp()()


def test_a_small_gradient_error_is_caught_where_a_lenient_check_would_pass():
    """The 2x rule per tensor, each relative to its own size: a 1e-3 relative error in a
    float32 gradient 100x smaller than the largest fails (judged against the largest one,
    or with 1000x the eps, it would pass), and so does a 5 % error in a bfloat16 gradient
    (1000x the factor would pass it)."""
    g = torch.randn(64, dtype=torch.float64)
    truth = {"out": g, "grad_w": g * 3, "grad_b": g * 0.01}
    for dtype, error in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        base = {k: v.to(dtype) for k, v in truth.items()}
        ours = dict(base, grad_b=(base["grad_b"].double() * (1 + error)).to(dtype))
        assert trials.disagreement(base, base, truth, dtype, "torch") is None
        assert "grad_b" in trials.disagreement(ours, base, truth, dtype, "torch"), dtype


# ------------------------------------------------------------------------------- keys
def test_decisions_are_kept_apart_by_dtype(measured):
    measured["float64"] = {"torch": 1.0, FAST: 2.0}
    for dtype, want in ((torch.float32, FAST), (torch.float64, "torch")):
        measured["now"] = str(dtype)[6:]
        q = torch.randn(2, 9, 8, dtype=dtype)
        attention(q, q, q, 2, 0.3)
        made = [d for d in dispatch.decisions().values()
                if json.loads(d.key)["dtype"] == str(dtype)]
        assert len(made) == 1 and made[0].choice == want


def test_decisions_are_kept_apart_by_training_flag(measured):
    seen = []
    for training in (True, False):
        with torch.no_grad():
            _projection(training, False)()
        seen.append({json.loads(k)["training"] for k in dispatch.decisions()})
    assert seen == [{True}, {True, False}]


def test_the_candidates_cache_is_kept_apart_by_dtype(measured, monkeypatch):
    real = backends.get_backend(FAST).attention_reasons

    def no_float64(q, k, v, heads, p):
        return real(q, k, v, heads, p) + (["no float64"] if q.dtype == torch.float64 else [])

    monkeypatch.setattr(backends.get_backend(FAST), "attention_reasons", no_float64)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(2, 9, 8, dtype=dtype)
        attention(q, q, q, 2, 0.3)
    by_dtype = {json.loads(d.key)["dtype"]: d.candidates for d in dispatch.decisions().values()}
    assert by_dtype == {"torch.float32": ["torch", FAST], "torch.float64": ["torch"]}


def test_the_key_holds_what_a_decision_depends_on(monkeypatch):
    parts = (("x", torch.Size([2, 3])), ("dtype", torch.bfloat16))
    key = json.loads(dispatch.make_key("op", parts, torch.device("cpu"), ("torch", "triton")))
    for field in ("candidates", "autocast", "cublas_tf32", "cudnn_tf32", "fp32_matmul",
                  "device", "torch", "triton", "cvt_kernels", "code"):
        assert field in key, field
    assert key["candidates"] == ["torch", "triton"] and key["x"] == [2, 3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert json.loads(dispatch.make_key("op", parts, torch.device("cpu")))["autocast"] \
            == "torch.bfloat16"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        high = dispatch.make_key("op", parts, torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(old)
    assert high != dispatch.make_key("op", parts, torch.device("cpu"))
    monkeypatch.setattr(dispatch, "_CODE_DIGEST", "another-build")
    assert json.loads(dispatch.make_key("op", parts, torch.device("cpu")))["code"] == \
        "another-build"


def test_a_decision_under_other_settings_is_measured_again(measured):
    q = torch.randn(2, 9, 8)
    attention(q, q, q, 2, 0.3)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        attention(q, q, q, 2, 0.3)
    finally:
        torch.set_float32_matmul_precision(old)
    assert sorted(json.loads(k)["fp32_matmul"] for k in dispatch.decisions()) == \
        ["highest", "medium"]


# ------------------------------------------------------------------------ trials
def test_no_process_wide_setting_changes_during_a_trial(measured, monkeypatch):
    seen = []
    real = trials.Run.__call__

    def spy(self):
        seen.append((self.candidate, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
        return real(self)

    monkeypatch.setattr(trials.Run, "__call__", spy)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        _attention(True)()
        assert {c for c, _, _ in seen} == {"torch", FAST, "truth"}
        assert all(m and c for _, m, c in seen)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class _Log(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.log.append(str(func))
        return func(*args, **(kwargs or {}))


def test_only_the_candidate_runs_between_the_clock_marks(monkeypatch):
    """The real timing loop with an injected clock: every aten op between a pair of marks
    lies inside one of the candidate's own runs (no copy, cotangent or clone of the
    harness), and each sample holds the planned number of runs."""
    log = []

    class Clock:
        def mark(self):
            log.append("MARK")
            return len(log)

        def elapsed_ms(self, start, end):
            return 0.25

    monkeypatch.setattr(trials, "CudaClock", Clock)
    monkeypatch.setattr(backends, "CANDIDATES", ("torch", FAST))
    backends.clear_selection_cache()
    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    real = trials.Run.timed

    def timed(self):
        log.append("RUN")
        real(self)
        log.append("END")

    monkeypatch.setattr(trials.Run, "timed", timed)
    with _Log(log):
        _mlp()()
    marks = [i for i, e in enumerate(log) if e == "MARK"]
    assert len(marks) == 2 * 2 * (1 + trials.SAMPLES)  # two candidates, sizing + samples
    runs_per_sample = []
    for start, end in zip(marks[0::2], marks[1::2]):
        inside, depth, runs = log[start + 1:end], 0, 0
        for e in inside:
            if e == "RUN":
                depth, runs = depth + 1, runs + 1
            elif e == "END":
                depth -= 1
            else:
                assert depth == 1, f"{e} ran between the marks outside the candidate"
        runs_per_sample.append(runs)
    # 0.25 ms a run -> 4 runs per sample reach the ~1 ms target; the sizing pairs hold 1.
    assert sorted(set(runs_per_sample)) == [1, 4]


def test_the_harness_cost_is_recorded_and_shown(measured):
    _mlp()()
    (decision,) = [d for d in dispatch.decisions().values()]
    assert set(decision.harness_ms) == {"torch", FAST}
    assert "harness" in dispatch.describe(decision)


# ----------------------------------------------------------------------------- threads
def test_a_forced_backend_stays_in_its_thread(monkeypatch):
    """While one thread is inside ``use_backend("reference")``, another thread's calls are
    not forced (issue 23: 200 of 200 calls ran the other thread's forced backend)."""
    inside, done = threading.Event(), threading.Event()
    ran = []
    real = backends.get_backend(FAST).attention_forward

    def counting(*args):
        ran.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(backends.get_backend(FAST), "attention_forward", counting)

    def forced():
        with cvt_kernels.use_backend(FAST):
            inside.set()
            done.wait(30)

    t = threading.Thread(target=forced, name="forcing")
    t.start()
    try:
        assert inside.wait(30)
        q = torch.randn(2, 9, 8)
        for _ in range(20):
            attention(q, q, q, 2, 0.3)
            assert backends.forced_backend() is None
    finally:
        done.set()
        t.join(30)
    assert ran == []


def test_a_trial_in_one_thread_forces_nothing_in_another(measured, monkeypatch):
    """A first-call measurement forces each candidate in its own thread only."""
    in_trial, release = threading.Event(), threading.Event()
    real = trials.Run.__call__

    def slow(self):
        if self.candidate == FAST:
            with self.context():
                in_trial.set()
                release.wait(30)
        return real(self)

    monkeypatch.setattr(trials.Run, "__call__", slow)
    t = threading.Thread(target=_attention(False))
    t.start()
    try:
        assert in_trial.wait(30)
        assert backends.forced_backend() is None
    finally:
        release.set()
        t.join(60)


# -------------------------------------------------------------------------- misc
def test_with_policy_fixed_no_trial_runs_and_no_decision_is_kept(measured, monkeypatch):
    monkeypatch.setenv(dispatch.POLICY_ENV, "fixed")
    calls = []
    monkeypatch.setattr(trials.Run, "__call__", lambda self: calls.append(self))
    _mlp()()
    assert calls == [] and dispatch.decisions() == {}


def test_a_truth_that_cannot_be_computed_trusts_no_candidate(measured, monkeypatch):
    real = trials.Run.__call__

    def no_truth(self):
        if self.candidate == "truth":
            raise MemoryError("float64 does not fit")
        return real(self)

    monkeypatch.setattr(trials.Run, "__call__", no_truth)
    with pytest.warns(RuntimeWarning, match="truth could not be computed"):
        _mlp()()
    (decision,) = dispatch.decisions().values()
    assert decision.choice == "torch"
