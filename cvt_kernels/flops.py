"""FLOP and byte counts of CvT's convolutional attention, for the benchmarks' roofline column.

Counts are per image, multiply-accumulate = 2 FLOPs, BatchNorm/softmax/bias adds not
counted (the convention that gives CvT-13's published per-block numbers: stage 1 0.699,
stage 2 0.267, stage 3 0.163 GFLOP at 224x224). The class token is an extra query and
key/value row that skips the depthwise conv.
"""

from __future__ import annotations

from typing import Dict, List

from .models.cvt import CVT_SPECS


def _out(n: int, stride: int) -> int:
    return (n + 2 - 3) // stride + 1  # 3x3 conv, padding 1


def attention_block_flops(h: int, w: int, dim_in: int, dim_out: int, num_heads: int,
                          with_cls_token: bool, stride_q: int = 1, stride_kv: int = 2
                          ) -> Dict[str, float]:
    """Forward FLOPs per image of one ``dw_bn`` attention block, by part."""
    cls = 1 if with_cls_token else 0
    hq, wq = _out(h, stride_q), _out(w, stride_q)
    hk, wk = _out(h, stride_kv), _out(w, stride_kv)
    n_q, n_k = hq * wq + cls, hk * wk + cls
    n_tokens = h * w + cls
    parts = {
        "conv_q": 9 * dim_in * hq * wq,
        "conv_kv": 2 * 9 * dim_in * hk * wk,
        "linear_q": n_q * dim_in * dim_out,
        "linear_kv": 2 * n_k * dim_in * dim_out,
        "attention": 2 * n_q * n_k * dim_out,  # q k^T and p v over all heads
        "proj": n_tokens * dim_out * dim_out,
    }
    flops = {k: 2.0 * v for k, v in parts.items()}
    flops["total"] = sum(flops.values())
    return flops


def attention_block_bytes(h: int, w: int, dim_in: int, dim_out: int, with_cls_token: bool,
                          elem_bytes: int) -> float:
    """The least memory traffic of one block's forward per image: read x, write the output
    (what a fully fused block approaches; weights amortise over the batch and are left out)."""
    n = h * w + (1 if with_cls_token else 0)
    return float(elem_bytes * n * (dim_in + dim_out))


def stage_shapes(model: str, img_size: int) -> List[Dict[str, object]]:
    """The attention block shape of each stage of a released CvT at ``img_size``."""
    spec = CVT_SPECS[model]
    size, out = img_size, []
    for i in range(spec["NUM_STAGES"]):
        k, s, p = spec["PATCH_SIZE"][i], spec["PATCH_STRIDE"][i], spec["PATCH_PADDING"][i]
        size = (size + 2 * p - k) // s + 1
        dim = spec["DIM_EMBED"][i]
        out.append(dict(stage=i + 1, h=size, w=size, dim_in=dim, dim_out=dim,
                        num_heads=spec["NUM_HEADS"][i], with_cls_token=spec["CLS_TOKEN"][i],
                        depth=spec["DEPTH"][i]))
    return out


def model_attention_flops(model: str, img_size: int) -> float:
    """Forward FLOPs per image of all attention blocks of a released CvT."""
    total = 0.0
    for st in stage_shapes(model, img_size):
        f = attention_block_flops(st["h"], st["w"], st["dim_in"], st["dim_out"],
                                  st["num_heads"], st["with_cls_token"])
        total += st["depth"] * f["total"]
    return total
