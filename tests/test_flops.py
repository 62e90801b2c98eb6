"""FLOP counts against a hand count for CvT-13 at 224x224."""

import pytest

from cvt_kernels.flops import attention_block_flops, model_attention_flops, stage_shapes


def test_stage_shapes_cvt13():
    shapes = stage_shapes("cvt_13", 224)
    assert [(s["h"], s["dim_in"], s["num_heads"], s["with_cls_token"]) for s in shapes] == [
        (56, 64, 1, False), (28, 192, 3, False), (14, 384, 6, True)]


def test_hand_count_stage1():
    # Stage 1 of CvT-13 at 224: 56x56 tokens, C=64, k/v 28x28, one head. MACs:
    conv = 9 * 64 * 3136 + 2 * 9 * 64 * 784
    linears = 3136 * 64 * 64 + 2 * 784 * 64 * 64 + 3136 * 64 * 64
    attention = 2 * 3136 * 784 * 64
    f = attention_block_flops(56, 56, 64, 64, 1, False)
    assert f["total"] == 2 * (conv + linears + attention)


@pytest.mark.parametrize("shape,gflop", [((56, 64, 1, False), 0.699), ((28, 192, 3, False), 0.267),
                                         ((14, 384, 6, True), 0.163)])
def test_published_per_block_numbers(shape, gflop):
    size, dim, heads, cls = shape
    assert round(attention_block_flops(size, size, dim, dim, heads, cls)["total"] / 1e9, 3) == gflop


def test_class_token_counts_as_a_row_and_column_but_skips_the_conv():
    with_cls = attention_block_flops(14, 14, 384, 384, 6, True)
    without = attention_block_flops(14, 14, 384, 384, 6, False)
    assert with_cls["conv_q"] == without["conv_q"]
    assert with_cls["attention"] == 2 * 2 * 197 * 50 * 384


def test_whole_model_attention():
    total = model_attention_flops("cvt_13", 224)
    assert round(total / 1e9, 2) == round(0.699 + 2 * 0.2666 + 10 * 0.1628, 2)
