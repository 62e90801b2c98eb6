"""GPU-only checks (the `gpu` marker: skipped without CUDA): CUDA-graph capture and replay
of accelerated models (eval forward, a whole training step, the benchmarks' graph
provider), grids larger than a CUDA grid dimension's 65,535 limit, ragged tails at odd
sizes, and no growth of CUDA memory over repeated calls."""

import contextlib
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import cvt_kernels
from cvt_kernels import FusedConvAttention, models

from conftest import dtype_id, make_attention, mode_id, randomize_bn

pytestmark = pytest.mark.gpu


def _triton_or_skip():
    reason = cvt_kernels.backends.available_backends().get("triton", "not registered")
    if reason:
        pytest.skip(f"triton backend: {reason}")


def test_cuda_graph_capture_of_an_eval_model():
    """Eval CvT-13 on the auto backend is capturable: no host syncs, no CPU tensors, no
    allocation outside the graph's pool once warmed up (autotuning happens in warm-up)."""
    torch.manual_seed(0)
    model = models.cvt_13(num_classes=10).cuda().to(torch.bfloat16).eval()
    randomize_bn(model)
    eager = copy.deepcopy(model)
    cvt_kernels.accelerate(model)
    static_x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = model(static_x)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = eager(new_x)
    err = ((static_out.float() - expected.float()).abs().max() / expected.float().abs().max())
    assert err.item() < 5e-2, err.item()


def test_attention_grid_beyond_65535_batch_heads():
    """B * H = 70,000 programs along one grid axis (the y and z axes stop at 65,535)."""
    _triton_or_skip()
    q = torch.randn(35_000, 3, 2 * 16, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(35_000, 2, 2 * 16, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    with cvt_kernels.use_backend("triton"):
        out = cvt_kernels.ops.attention(q, k, v, 2, 32 ** -0.5)
    out.float().sum().backward()
    with cvt_kernels.use_backend("reference"):
        ref = cvt_kernels.ops.attention(q.detach(), k.detach(), v.detach(), 2, 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # The last programs of the grid ran: the tail of the batch is right, not zero.
    torch.testing.assert_close(out[-1].float(), ref[-1].float(), rtol=2e-2, atol=2e-2)
    assert q.grad[-1].abs().sum() > 0


@pytest.mark.parametrize("h,w,cls", [(1, 1, False), (3, 5, True), (7, 7, False),
                                     (13, 11, True), (57, 55, False)])
@pytest.mark.parametrize("training", [True, False], ids=mode_id)
def test_ragged_tails_at_odd_sizes(h, w, cls, training):
    """Sizes that are no multiple of any block: every masked tail is exercised."""
    _triton_or_skip()
    if training and h * w == 1:
        pytest.skip("BatchNorm training needs more than one value per channel")
    ref = make_attention(dim_in=24, dim_out=40, heads=5, cls=cls, training=training,
                         dtype=torch.float32).cuda()
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(3, h * w + cls, 24, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    expected = ref(x, h, w)
    expected.square().sum().backward()
    with cvt_kernels.use_backend("triton"):
        out = ours(x2, h, w)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x2.grad, x.grad, rtol=5e-3, atol=5e-3)


def test_cuda_memory_does_not_grow_over_repeated_calls():
    ref = make_attention(dim_in=64, dim_out=64, heads=1, training=True,
                         dtype=torch.float32).cuda()
    ours = FusedConvAttention.from_reference(ref)
    x = torch.randn(4, 1 + 28 * 28, 64, device="cuda", requires_grad=True)

    def step():
        ours(x, 28, 28).sum().backward()
        x.grad = None
        for p in ours.parameters():
            p.grad = None

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before, (before, torch.cuda.memory_allocated())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_triton_backend_is_bitwise_deterministic(dtype):
    """No atomics anywhere (per-block partials reduced in a fixed order): two runs agree to
    the bit, outputs, input and parameter gradients and running statistics."""
    _triton_or_skip()
    base = make_attention(dim_in=64, dim_out=64, heads=1, cls=False, training=True,
                          dtype=torch.float32).cuda().to(dtype)
    x = torch.randn(8, 28 * 28, 64, device="cuda", dtype=dtype)

    def run():
        module = FusedConvAttention.from_reference(copy.deepcopy(base))
        xi = x.clone().requires_grad_()
        with cvt_kernels.use_backend("triton"):
            out = module(xi, 28, 28)
        out.float().square().sum().backward()
        return [out, xi.grad] + [p.grad for p in module.parameters()] + list(module.buffers())

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=mode_id)
def test_measured_dispatch_at_cvt_shapes(monkeypatch, tmp_path, training):
    """Real timing on the GPU: every key of a CvT-13 stage-1 and stage-3 block is decided
    once with both candidates checked and timed, the decisions reach the file, and a second
    call (served by the decisions) gives the first call's output to the bit."""
    from cvt_kernels import dispatch

    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    for dim, heads, side, cls in ((64, 1, 56, False), (384, 6, 14, True)):
        ref = make_attention(dim_in=dim, dim_out=dim, heads=heads, cls=cls, training=training,
                             dtype=torch.float32).cuda().to(torch.bfloat16)
        ours = FusedConvAttention.from_reference(ref)
        x = torch.randn(8, side * side + cls, dim, device="cuda", dtype=torch.bfloat16)
        with torch.set_grad_enabled(training):
            first, second = ours(x, side, side), ours(x, side, side)
        assert torch.equal(first, second)
    made = list(dispatch.decisions().values())
    assert made and all(d.source == "measured" for d in made), made
    for d in made:
        assert set(d.times_ms) | set(d.excluded) == set(d.candidates), d
    stored = json.loads((tmp_path / "dispatch.json").read_text())["decisions"]
    assert len(stored) == len(made)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_gpu_not_the_current_one():
    _triton_or_skip()
    ref = make_attention(dim_in=16, dim_out=16, heads=2, training=True,
                         dtype=torch.float32).to("cuda:1")
    ours = FusedConvAttention.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 1 + 5 * 5, 16, device="cuda:1")
    torch.cuda.set_device(0)
    with cvt_kernels.use_backend("triton"):
        out = ours(x, 5, 5)
    torch.testing.assert_close(out, ref(x, 5, 5), rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- CUDA graphs
# CvT-13's layout at a small width and size (drop path off: a replay draws other random
# numbers than an uncaptured run), float32: a replay runs the same kernels as the
# uncaptured call, so the two agree to rounding; the reference model agrees by a loose bar.
GRAPH_SPEC = dict(DIM_EMBED=[32, 64, 96], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 2],
                  DROP_PATH_RATE=[0.0, 0.0, 0.0])
# The dispatcher's choice (on a GPU it measures: torch or triton per call) and triton forced.
GRAPH_CASES = [(scope, backend) for scope in ("attention", "block") for backend in (None, "triton")]


def _graph_model(scope, backend):
    if backend == "triton":
        _triton_or_skip()
    torch.manual_seed(0)
    model = models.cvt_13(num_classes=10, img_size=64, spec_overrides=GRAPH_SPEC).cuda()
    randomize_bn(model)
    return model, cvt_kernels.accelerate(copy.deepcopy(model), scope=scope)[0]


def _forced(backend):
    return cvt_kernels.use_backend(backend) if backend else contextlib.nullcontext()


def _warm_up_on_a_side_stream(fn, calls=3):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("scope,backend", GRAPH_CASES)
def test_cuda_graph_replay_of_an_accelerated_eval_model(scope, backend):
    """An accelerated eval forward captured once (after warm-up calls, where the dispatcher
    decides) and replayed on new inputs gives the uncaptured call's output."""
    reference, model = _graph_model(scope, backend)
    reference.eval(), model.eval()
    static_x = torch.randn(4, 3, 64, 64, device="cuda")
    with _forced(backend), torch.no_grad():
        _warm_up_on_a_side_stream(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for seed in (1, 2):
            new_x = torch.randn(4, 3, 64, 64, device="cuda",
                                generator=torch.Generator("cuda").manual_seed(seed))
            static_x.copy_(new_x)
            graph.replay()
            expected = model(new_x)
            torch.testing.assert_close(static_out, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(static_out, reference(new_x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scope,backend", GRAPH_CASES)
def test_cuda_graph_replay_of_a_whole_training_step(scope, backend):
    """Forward, cross-entropy, backward and AdamW (``capturable=True``) captured as one
    graph and replayed on three batches end with the weights, running statistics and losses
    of the same three steps run uncaptured."""
    _, model = _graph_model(scope, backend)
    twin = copy.deepcopy(model)
    model.train(), twin.train()
    batches = [(torch.randn(4, 3, 64, 64, device="cuda"),
                torch.randint(0, 10, (4,), device="cuda")) for _ in range(3)]

    def stepper(m, capturable):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=capturable)

        def step(x, y):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            return loss
        return opt, step

    with _forced(backend):
        opt, step = stepper(model, True)
        static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
        state = copy.deepcopy(model.state_dict())
        _warm_up_on_a_side_stream(lambda: (opt.zero_grad(set_to_none=True),
                                           step(static_x, static_y)))
        # The warm-up steps moved weights and statistics (and made AdamW's state, so that
        # nothing is allocated for it during capture): back to the start.
        model.load_state_dict(state)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(static_x, static_y)
        for p in model.parameters():  # AdamW's state as before a first step
            for v in opt.state[p].values():
                v.zero_()
        losses = []
        for x, y in batches:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            losses.append(static_loss.item())
        twin_opt, twin_step = stepper(twin, False)
        twin_losses = []
        for x, y in batches:
            twin_opt.zero_grad(set_to_none=True)
            twin_losses.append(twin_step(x, y).item())
    assert losses == pytest.approx(twin_losses, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name


def test_benchmark_graph_provider_replays_like_the_model():
    """``benchmarks.models.Graphed`` (the ``+graph`` providers): eval replays the forward on
    each new input; training replays forward and backward graphs whose gradients and running
    statistics after one call are the uncaptured call's (the warm-ups' updates undone)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.models import Graphed

    _, model = _graph_model("block", None)
    twin = copy.deepcopy(model)
    graphed = Graphed(model)
    model.eval(), twin.eval()
    with torch.no_grad():
        for seed in (1, 2):
            x = torch.randn(4, 3, 64, 64, device="cuda")
            torch.testing.assert_close(graphed(x), twin(x), rtol=1e-5, atol=1e-5)
    model.train(), twin.train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    cot = torch.randn(4, 10, device="cuda")
    graphed(x).backward(cot)
    twin(x).backward(cot)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
