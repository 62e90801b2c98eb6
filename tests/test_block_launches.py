"""What the block ops launch on the triton backend, counted on the meta device as
``benchmarks.step_cost`` counts a step (issue 24): the kernels and nothing around them (no
casts, partial sums, zero gradients or copies), nothing written that no backward reads.
CPU only: the launches are recorded with an H100's grids, never compiled or run."""

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import cvt_kernels  # noqa: E402
from benchmarks import step_cost as sc  # noqa: E402
from launch_counting import BF16, counted, kinds, meta  # noqa: E402
from cvt_kernels import models  # noqa: E402
from cvt_kernels.block import FusedLayerNorm  # noqa: E402
from cvt_kernels.ops import add_layer_norm, layer_norm, mlp  # noqa: E402
from cvt_kernels.ops.linear import linear, run_linear  # noqa: E402
from cvt_kernels.ops.mlp import run_mlp, run_norm_mlp  # noqa: E402

# CvT-13 stage 1 at batch 2: K = 6,272 rows, enough for the weight gradients' split-K.
ROWS, C = (2, 3136), 64


GEMM, PARTIALS = ("triton", "_gemm_kernel"), ("triton", "_gemm_partials_kernel")
LN_FWD, LN_BWD = ("triton", "_layer_norm_fwd_kernel"), ("triton", "_layer_norm_bwd_kernel")


def mlp_tensors(grad: bool):
    # The residual's gradient is the incoming one, passed on: a leaf residual would only
    # add AccumulateGrad's copy of it (in a model the residual stream is no leaf).
    return (meta(*ROWS, C, grad=grad), meta(4 * C, C, grad=grad), meta(4 * C, grad=grad),
            meta(C, 4 * C, grad=grad), meta(C, grad=grad), meta(*ROWS, C))


def test_mlp_training_step_is_two_gemms_forward_five_launches_backward():
    """Backward: dz, dW2 + db2, dW1 + db1 (bias gradients in the split-K GEMMs), one sum of
    every partial in the weights' dtype, dx. Before: 4 GEMMs + 2 partial sums + 2 casts +
    6 launches of bias gradients + a zero gradient for z."""
    x, w1, b1, w2, b2, r = mlp_tensors(grad=True)
    cot = meta(*ROWS, C)
    fwd = counted(lambda: mlp(x, w1, b1, w2, b2, "quick_gelu", r))
    both = counted(lambda: mlp(x, w1, b1, w2, b2, "quick_gelu", r).backward(cot))
    assert kinds(fwd) == [GEMM, GEMM]
    assert kinds(both)[2:] == [GEMM, GEMM, GEMM, PARTIALS, GEMM]


def test_mlp_forward_writes_one_hidden_tensor():
    """fc1 writes one (M x hidden) tensor: in eval the activation (no pre-activation z:
    nothing will read it), in training z alone (fc2 activates it as it loads it; the
    backward reads z). Before: the activation and z in both."""
    m, hidden = ROWS[0] * ROWS[1], 4 * C
    one = 2 * (m * C + hidden * C + hidden + m * hidden)  # x, W1, b1 read; one written
    with torch.no_grad():
        assert counted(lambda: mlp(*mlp_tensors(False)[:5], "quick_gelu")
                       ).launches[0].nbytes == one
    assert counted(lambda: mlp(*mlp_tensors(True)[:5], "quick_gelu")).launches[0].nbytes == one


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_layer_norm_backward_is_two_launches(residual):
    """The kernel and one sum of both affine gradients' partials (into the affine's dtype):
    no zero gradients for the statistics or an unused sum, no zeroed partials."""
    x, r, cot = meta(*ROWS, C, grad=True), meta(*ROWS, C), meta(*ROWS, C)
    w, b = meta(C, grad=True, dtype=torch.float32), meta(C, grad=True, dtype=torch.float32)

    def step():
        y = add_layer_norm(x, r, w, b)[0] if residual else layer_norm(x, w, b)
        y.backward(cot)

    assert kinds(counted(step)) == [LN_FWD, LN_BWD, PARTIALS]


def test_layer_norm_reads_transposed_input_and_sliced_gradient_in_place():
    """The stage norms' input is a conv output seen as tokens (a transposed view) and the
    last stage's gradient arrives as a slice (beside the class token): no copies."""
    x = meta(2, C, 196, grad=True).transpose(1, 2)
    w, b = meta(C, grad=True), meta(C, grad=True)
    cot = meta(2, 197, C)[:, 1:]
    # (autograd.grad: a leaf x would add AccumulateGrad's copy into its own layout)
    assert kinds(counted(lambda: torch.autograd.grad(layer_norm(x, w, b), (x, w, b), cot))
                 ) == [LN_FWD, LN_BWD, PARTIALS]


def test_linear_with_residual_is_one_gemm():
    """The attention's output projection + the block's skip connection: one launch
    (stock PyTorch: an add and an addmm); training backward: dx, dW + db, their sum."""
    x, w, b, r = meta(*ROWS, C, grad=True), meta(C, C, grad=True), meta(C, grad=True), \
        meta(*ROWS, C)
    with torch.no_grad():
        assert kinds(counted(lambda: linear(x, w, b, r))) == [GEMM]
    cost = counted(lambda: linear(x, w, b, r).backward(meta(*ROWS, C)))
    assert kinds(cost) == [GEMM, GEMM, GEMM, PARTIALS]


def test_eval_norm2_rides_in_fc1():
    """Eval: the block's norm2 in fc1's prologue: norm + MLP + skip connection are the
    MLP's two GEMMs (three launches before), nothing stored for a backward, at every
    width (CvT-W24's 1,024 too)."""
    for c in (C, 384, 1024):
        x, r, nw, nb = meta(*ROWS, c), meta(*ROWS, c), meta(c), meta(c)
        w1, b1, w2, b2 = meta(4 * c, c), meta(4 * c), meta(c, 4 * c), meta(c)
        with torch.no_grad():
            cost = counted(lambda: run_norm_mlp(x, nw, nb, 1e-5, w1, b1, w2, b2, "gelu", r))
        assert kinds(cost) == [GEMM, GEMM]
        m = ROWS[0] * ROWS[1]  # fc1: x, norm affine, W1, b1 read; the activation written
        assert cost.launches[0].nbytes == 2 * (m * c + 2 * c + 4 * c * c + 4 * c + 4 * m * c)


def test_drop_path_costs_its_draw_only():
    """Drop path in training (DropPath: rand, add, floor, div, mul forward, mul and div
    backward, and the residual add) is one rand launch: the factor rides in the GEMMs."""
    x, w, b, r = meta(*ROWS, C, grad=True), meta(C, C, grad=True), meta(C, grad=True), \
        meta(*ROWS, C)
    cost = counted(lambda: run_linear(x, w, b, r, 0.1).backward(meta(*ROWS, C)))
    assert kinds(cost) == [("aten", "rand"), GEMM, GEMM, GEMM, PARTIALS]
    x, w1, b1, w2, b2, r = mlp_tensors(grad=True)
    cost = counted(lambda: run_mlp(x, w1, b1, w2, b2, "quick_gelu", r, 0.1).backward(
        meta(*ROWS, C)))
    assert kinds(cost) == [("aten", "rand"), GEMM, GEMM, GEMM, GEMM, GEMM, PARTIALS, GEMM]


def test_stage_norm_is_one_launch():
    """The reference's float32 LayerNorm of a bf16 model: weight and bias casts, the input
    cast, the norm and the cast back; accelerated at block scope: one kernel."""
    norm = models.LayerNorm(C, device="meta", dtype=BF16)
    x = meta(2, C, 196).transpose(1, 2)
    with torch.no_grad():
        assert len(counted(lambda: norm(x)).launches) == 5
        fused = FusedLayerNorm.from_reference(norm)
        assert kinds(counted(lambda: fused(x))) == [LN_FWD]


def test_block_scope_replaces_the_stage_norms_sharing_their_parameters():
    with torch.device("meta"):
        model = models.cvt_13(num_classes=5, img_size=32,
                              spec_overrides={"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3],
                                              "DEPTH": [1, 1, 1]})
    before = dict(model.state_dict(keep_vars=True))
    fused = cvt_kernels.accelerate(copy.deepcopy(model), scope="block")[0]
    stage_norms = [fused.stage0.patch_embed.norm, fused.stage1.patch_embed.norm,
                   fused.stage2.patch_embed.norm, fused.norm]
    assert all(type(n) is FusedLayerNorm for n in stage_norms)
    # inside the blocks the norms stay as they are (the block runs them on the op itself)
    assert type(fused.stage0.blocks[0].norm1) is models.LayerNorm
    after = fused.state_dict(keep_vars=True)
    assert list(after) == list(before)
    attention_only = cvt_kernels.accelerate(copy.deepcopy(model))[0]
    assert type(attention_only.norm) is models.LayerNorm
    same = cvt_kernels.accelerate(model, scope="block")[0]  # in place: the same tensors
    assert all(same.state_dict(keep_vars=True)[k] is before[k] for k in before)


MINE = ("cvt_kernels/block.py", "cvt_kernels/modules.py", "cvt_kernels/ops/mlp.py",
        "cvt_kernels/ops/linear.py",
        "cvt_kernels/ops/layer_norm.py", "cvt_kernels/ops/_drop_path.py",
        "cvt_kernels/backends/reference_math.py",  # drop path's arithmetic (_drop_path.apply)
        "cvt_kernels/backends/triton/mlp.py", "cvt_kernels/backends/triton/layer_norm.py")


def _block_costs(training: bool, warmup: bool = False) -> sc.StepCost:
    from cvt_kernels import FusedBlock

    with torch.device("meta"):
        ref = models.Block(C, C, 1, drop_path=0.1, act_layer=models.QuickGELU,
                           norm_layer=models.LayerNorm, stride_kv=2, with_cls_token=False)
    block = FusedBlock.from_reference(ref.to(BF16)).train(training)
    x = meta(2, 56 * 56, C, grad=training)
    if not training:
        with torch.no_grad():
            return counted(lambda: block(x, 56, 56), warmup)
    return counted(lambda: torch.autograd.grad(block(x, 56, 56), [x] + list(
        block.parameters()), meta(2, 56 * 56, C)), warmup)


def test_a_fused_block_launches_its_kernels_and_no_glue_of_its_own():
    """Eval: norm1, the output projection with skip connection and norm2, fc1, fc2 (the
    attention's own launches aside). Training with drop path: two draws, and the two adds
    where autograd sums the residual stream's gradients (the block input and x + attn each
    feed a LayerNorm and a skip connection: on this first call, which records the plan;
    a planned call folds them, below). No zero gradient materialized (the attention's
    log-sum-exp has none)."""
    cost = _block_costs(training=False)
    counts = cost.op_counts("triton")
    assert counts["_layer_norm_fwd_kernel"] == 1 and counts["_gemm_kernel"] == 3
    assert not [x for x in cost.launches if x.kind == "aten" and x.site.startswith(MINE)]
    cost = _block_costs(training=True)
    counts = cost.op_counts("triton")
    assert counts["_layer_norm_fwd_kernel"] == counts["_layer_norm_bwd_kernel"] == 2
    assert counts["_gemm_kernel"] == 3 + 4 + 2 and counts["_gemm_partials_kernel"] == 2 + 2
    glue = sorted(x.name for x in cost.launches if x.kind == "aten"
                  and x.site.replace("bwd of ", "").startswith(MINE))
    assert glue == ["add", "add", "rand", "rand"], glue
    assert not [x for x in cost.launches if x.kind == "aten" and x.name == "zeros"]


def test_a_planned_training_call_sums_no_residual_gradient_outside_the_kernels():
    """The second call takes the plan's direct path (cvt_kernels/block_train.py, one
    autograd node): the residual stream's gradients enter the LayerNorm backward kernels
    (their grad_sum), and k's and v's projection backwards add their input gradients to
    q's in their kernels' stores, so what is left of glue is the two drop-path draws; the
    kernels are the first call's (autograd's two sums of the three projections' input
    gradients, and the two of the residual stream, gone)."""
    first, planned = _block_costs(training=True), _block_costs(training=True, warmup=True)
    mine = MINE + ("cvt_kernels/block_train.py",)
    glue = sorted(x.name for x in planned.launches if x.kind == "aten"
                  and x.site.replace("bwd of ", "").startswith(mine))
    assert glue == ["rand", "rand"], glue
    assert planned.op_counts("triton") == first.op_counts("triton")
    assert len(planned.launches) == len(first.launches) - 4
