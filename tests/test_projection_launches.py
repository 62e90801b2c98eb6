"""What the conv projection launches on the triton backend (issue 24), counted on the meta
device as ``benchmarks.step_cost`` counts a step: its kernels and nothing around them. No
``conv_taps`` copies, no rstd precompute, no stock ops for the running-statistics update,
no partial sums between kernels, no gradient casts or clones. CPU only: the launches are
recorded with an H100's grids, never compiled or run."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from launch_counting import BF16, counted, kinds, meta  # noqa: E402
from cvt_kernels import ops  # noqa: E402
from cvt_kernels.backends import ProjectionConfig, ProjectionParams, get_backend  # noqa: E402

STATS = [("triton", "_stats_partials_kernel"), ("triton", "_stats_combine_kernel")]
FWD = ("triton", "_forward_kernel")
TOKENS, CONV, INPUT = (("triton", "_grad_tokens_kernel"), ("triton", "_grad_conv_out_kernel"),
                       ("triton", "_grad_input_kernel"))
WEIGHT, PARAMS = ("triton", "_grad_proj_weight_kernel"), ("triton", "_param_grads_kernel")
# CvT-13 stage 1 (C_out 64: the weight gradient from the token kernel) and stage 2.
SHAPES = [(56, 64, 64, [TOKENS, CONV, INPUT, PARAMS]),
          (28, 192, 192, [TOKENS, CONV, INPUT, WEIGHT, PARAMS])]


def projection(c_in, c_out, grad, dtype=BF16, bn_dtype=None, tracked=True):
    """A CvT projection's tensors as a model converted with ``.to(dtype)`` holds them."""
    bn_dtype = bn_dtype or dtype
    return ProjectionParams(
        meta(c_in, 1, 3, 3, grad=grad, dtype=dtype), meta(c_in, grad=grad, dtype=bn_dtype),
        meta(c_in, grad=grad, dtype=bn_dtype), meta(c_in, dtype=dtype), meta(c_in, dtype=dtype),
        meta((), dtype=torch.int64) if tracked else None, meta(c_out, c_in, grad=grad, dtype=dtype),
        meta(c_out, grad=grad, dtype=dtype))


LEAVES = ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")


@pytest.mark.parametrize("side,c_in,c_out,backward", SHAPES, ids=["s1", "s2"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_step_launches_only_the_kernels(side, c_in, c_out, backward, momentum):
    """Forward: the statistics pass and its combine (which also updates the running
    statistics and the counter, on the device, no host sync), then the forward kernel.
    Backward: the kernels and one launch writing every parameter gradient in its dtype.
    Before: ~30 launches per projection (copies, casts, clones, partial sums, ~9 stock ops
    for the update)."""
    p = projection(c_in, c_out, grad=True)
    x = meta(2, side * side, c_in, grad=True)
    cfg = ProjectionConfig(stride=1)
    fwd = counted(lambda: ops.conv_projection(x, side, side, p, cfg, True, momentum))
    assert kinds(fwd) == STATS + [FWD]
    assert not fwd.notes  # no host sync (.item()) reported

    def step():
        out = ops.conv_projection(x, side, side, p, cfg, True, momentum)
        grads = torch.autograd.grad(out, [x] + [getattr(p, k) for k in LEAVES],
                                    meta(*out.shape))
        assert [g.dtype for g in grads] == [x.dtype] + [getattr(p, k).dtype for k in LEAVES]

    assert kinds(counted(step)) == STATS + [FWD] + backward


@pytest.mark.parametrize("side,c_in,c_out,backward", SHAPES, ids=["s1", "s2"])
def test_eval_is_one_launch(side, c_in, c_out, backward):
    """The forward kernel reads running_mean, running_var (bf16 buffers, no casts) and eps
    itself: nothing is computed for the statistics before it."""
    p = projection(c_in, c_out, grad=False)
    x = meta(2, 1 + side * side, c_in)
    with torch.no_grad():
        cost = counted(lambda: ops.conv_projection(
            x, side, side, p, ProjectionConfig(stride=2, with_cls_token=True), False))
    assert kinds(cost) == [FWD]


def test_eval_backward_reads_the_running_statistics_too():
    """Frozen BatchNorm (eval) with gradients: the backward kernels read the running
    buffers as the forward did (no rstd launches there either)."""
    p = projection(64, 64, grad=True)
    x = meta(2, 56 * 56, 64, grad=True)

    def step():
        out = ops.conv_projection(x, 56, 56, p, ProjectionConfig(), False)
        torch.autograd.grad(out, [x] + [getattr(p, k) for k in LEAVES], meta(*out.shape))

    assert kinds(counted(step)) == [FWD] + SHAPES[0][3]


def test_gradients_are_written_in_each_parameter_dtype():
    """Under autocast the conv and Linear weights are bf16 and BatchNorm's affine float32:
    the last kernel stores each gradient in its own parameter's dtype (no casts)."""
    p = projection(64, 64, grad=True, bn_dtype=torch.float32)
    x = meta(2, 56 * 56, 64)
    mean, rstd = meta(64, dtype=torch.float32), meta(64, dtype=torch.float32)
    tri = get_backend("triton")
    grads = []

    def backward():
        grads.append(tri.conv_projection_backward(meta(2, 56 * 56, 64), x, 56, 56, p, mean,
                                                  rstd, ProjectionConfig(), True))

    assert kinds(counted(backward)) == SHAPES[0][3]
    (g,) = grads
    assert g.x.dtype == BF16
    for k in LEAVES:
        assert getattr(g, k).dtype == getattr(p, k).dtype, k
        assert getattr(g, k).shape == getattr(p, k).shape, k


def test_backward_into_launches_the_same_kernels_and_reads_dx_once_more():
    """``conv_projection_backward_into`` (a block's k and v): the same launches as the
    plain backward, no aten add, and the step-cost count has the map-token input-gradient
    kernel read the buffer it adds into (its extent once more, and nothing else)."""
    p = projection(64, 64, grad=True)
    x = meta(2, 56 * 56, 64)
    mean, rstd = meta(64, dtype=torch.float32), meta(64, dtype=torch.float32)
    tri = get_backend("triton")
    args = (meta(2, 56 * 56, 64), x, 56, 56, p, mean, rstd, ProjectionConfig(), True)
    plain = counted(lambda: tri.conv_projection_backward(*args))
    into = counted(lambda: tri.conv_projection_backward_into(meta(2, 56 * 56, 64), *args))
    assert kinds(into) == kinds(plain) == SHAPES[0][3]
    extra = [b.nbytes - a.nbytes for a, b in zip(plain.launches, into.launches)]
    assert extra == [0 if a.name != "_grad_input_kernel" else 2 * 56 * 56 * 64 * 2
                     for a in plain.launches], extra


def test_without_running_statistics_or_counter():
    """BatchNorm without running statistics (batch statistics in eval too) and without a
    counter (momentum None: nothing moves): the same two statistics launches."""
    p = projection(64, 64, grad=False, tracked=False)._replace(running_mean=None,
                                                                running_var=None)
    x = meta(2, 56 * 56, 64)
    with torch.no_grad():
        for training in (True, False):
            assert kinds(counted(lambda: ops.conv_projection(
                x, 56, 56, p, ProjectionConfig(), training, None))) == STATS + [FWD]


def test_one_pass_eval_is_one_launch():
    """The one-pass kernel reads the q projection's running statistics and eps itself."""
    from cvt_kernels.ops.one_pass import _one_pass

    p = projection(64, 64, grad=False)
    x, k = meta(2, 56 * 56, 64), meta(2, 28 * 28, 64)
    with torch.no_grad():
        cost = counted(lambda: _one_pass(
            x, p.conv_weight, p.running_mean, p.running_var, p.bn_weight, p.bn_bias,
            p.proj_weight, p.proj_bias, k, k, p.proj_weight, p.proj_bias, 56, 56, 1, 0.125,
            False, 1e-5))
    assert kinds(cost) == [("triton", "_one_pass_fwd_kernel")]
