"""The reference CvT: parameter counts, state_dict keys, shapes, the batch-1 fix."""

import pytest
import torch

from cvt_kernels import models

EXPECTED_PARAMS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):  # counts need no memory: W24 alone is 1.1 GB in float32
        model = getattr(models, name)(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_parameter_count_with_other_head():
    with torch.device("meta"):
        model = models.cvt_13(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS["cvt_13"] - 990 * 385


def test_state_dict_keys_follow_the_reference():
    with torch.device("meta"):
        keys = set(models.cvt_13().state_dict())
    expected = {
        "stage0.patch_embed.proj.weight", "stage0.patch_embed.proj.bias",
        "stage0.patch_embed.norm.weight", "stage0.patch_embed.norm.bias",
        "stage2.cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias",
        "stage2.blocks.9.norm1.weight", "stage2.blocks.9.mlp.fc1.weight",
        "stage2.blocks.9.mlp.fc2.bias", "stage2.blocks.9.norm2.bias",
    }
    for which in "qkv":
        prefix = f"stage1.blocks.1.attn.conv_proj_{which}"
        expected |= {f"{prefix}.conv.weight", f"{prefix}.bn.weight", f"{prefix}.bn.bias",
                     f"{prefix}.bn.running_mean", f"{prefix}.bn.running_var",
                     f"{prefix}.bn.num_batches_tracked",
                     f"stage1.blocks.1.attn.proj_{which}.weight",
                     f"stage1.blocks.1.attn.proj_{which}.bias"}
    expected |= {"stage1.blocks.1.attn.proj.weight", "stage1.blocks.1.attn.proj.bias"}
    assert expected <= keys
    assert not any("cls_token" in k for k in keys if not k.startswith("stage2."))
    assert not any("rearrage" in k for k in keys)  # the Rearrange layer holds no state


def test_released_config():
    spec = models.CVT_SPECS["cvt_13"]
    assert spec["DIM_EMBED"] == [64, 192, 384] and spec["NUM_HEADS"] == [1, 3, 6]
    assert spec["STRIDE_KV"] == [2, 2, 2] and spec["CLS_TOKEN"] == [False, False, True]
    attn = models.cvt_13().stage0.blocks[0].attn
    assert attn.scale == 64 ** -0.5 and attn.stride_kv == 2 and attn.stride_q == 1


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", [(64, 64), (72, 56), (33, 47)])
def test_forward_shapes_and_batch_one(batch, size):
    model = models.cvt_13(num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, *size))
    assert out.shape == (batch, 7)  # the reference's squeeze() gave (7,) for batch 1
    assert torch.isfinite(out).all()


def test_stage_token_counts():
    model = models.cvt_13().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x0, c0 = model.stage0(x)
        x1, c1 = model.stage1(x0)
        x2, c2 = model.stage2(x1)
    assert x0.shape == (1, 64, 16, 16) and c0 is None
    assert x1.shape == (1, 192, 8, 8) and c1 is None
    assert x2.shape == (1, 384, 4, 4) and c2.shape == (1, 1, 384)


def test_drop_path_is_per_sample_and_identity_in_eval():
    dp = models.DropPath(0.5).train()
    out = dp(torch.ones(64, 3, 5))
    per_sample = out.flatten(1)
    assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    dp.eval()
    x = torch.randn(4, 3)
    assert torch.equal(dp(x), x)


def test_quick_gelu_and_float32_layernorm():
    x = torch.randn(10, dtype=torch.float64)
    assert torch.allclose(models.QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    ln = models.LayerNorm(8)
    y = ln(torch.randn(3, 8).half())
    assert y.dtype == torch.float16


def test_unknown_method_and_bad_spec():
    with pytest.raises(ValueError, match="Unknown method"):
        models.Attention(8, 8, 1, method="conv")
    with pytest.raises(ValueError, match="img_size"):
        models.cvt_13(img_size=0)
    with pytest.raises(ValueError, match="spec_overrides"):
        models.cvt_13(spec_overrides={"NOT_A_KEY": 1})
