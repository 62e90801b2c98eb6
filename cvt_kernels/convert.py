"""State dicts between this package's CvT naming (microsoft/CvT's) and Hugging Face's.

::

    python -m cvt_kernels.convert SRC DST --to package|hf

The two models hold the same tensors with the same shapes; only the names differ, one
module at a time (table below). Every conversion is strict: a key no rule matches, a key
missing or left over, or a tensor of the wrong shape raises a ``ValueError`` that lists
them. Without a target model the keys and shapes are checked against a CvT built (on the
meta device) from the architecture the state_dict itself implies.

To reproduce a Hugging Face model's outputs, build ours with its activation and LayerNorm:
:func:`model_from_hf_config` (exact GELU, plain ``nn.LayerNorm``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .models.cvt import ConvolutionalVisionTransformer

__all__ = ["check_state_dict", "convert_file", "hf_to_package", "model_from_hf_config",
           "package_to_hf", "spec_from_hf_config"]

_ATTN_HF = "attention.attention"
# package module -> HF module, within a block (HF: a layer) ...
_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "attn.proj": "attention.output.dense",
    **{f"attn.proj_{p}": f"{_ATTN_HF}.projection_{hf}"
       for p, hf in (("q", "query"), ("k", "key"), ("v", "value"))},
    **{f"attn.conv_proj_{p}.{m}":
       f"{_ATTN_HF}.convolution_projection_{hf}.convolution_projection.{hf_m}"
       for p, hf in (("q", "query"), ("k", "key"), ("v", "value"))
       for m, hf_m in (("conv", "convolution"), ("bn", "normalization"))},
}
# ... within a stage ...
_STAGE = {
    "patch_embed.proj": "embedding.convolution_embeddings.projection",
    "patch_embed.norm": "embedding.convolution_embeddings.normalization",
}
# ... and at the top (HF's CvtForImageClassification: LayerNorm of the class token, then
# the mean over that one token, which is our norm(cls)[:, 0]).
_TOP = {"norm": "layernorm", "head": "classifier"}

_PACKAGE_KEY = re.compile(r"stage(?P<stage>\d+)\.(?:blocks\.(?P<block>\d+)\.)?(?P<rest>.+)")
# CvtForImageClassification keys start with "cvt.", CvtModel keys with "encoder.".
_HF_KEY = re.compile(
    r"(?:cvt\.)?encoder\.stages\.(?P<stage>\d+)\.(?:layers\.(?P<block>\d+)\.)?(?P<rest>.+)")

StateDict = Mapping[str, Tensor]
Target = Union[nn.Module, StateDict, None]


def _map_key(key: str, to_hf: bool, hf_prefix: str) -> Optional[str]:
    match = (_PACKAGE_KEY if to_hf else _HF_KEY).fullmatch(key)
    if match is None:
        table, prefix, rest = _TOP, "", key
    elif match["block"] is None:
        table, rest = _STAGE, match["rest"]
        prefix = (f"{hf_prefix}encoder.stages.{match['stage']}." if to_hf
                  else f"stage{match['stage']}.")
    else:
        table, rest = _BLOCK, match["rest"]
        prefix = (f"{hf_prefix}encoder.stages.{match['stage']}.layers.{match['block']}."
                  if to_hf else f"stage{match['stage']}.blocks.{match['block']}.")
    if table is _STAGE and rest == "cls_token":
        return prefix + rest
    if not to_hf:
        table = {hf: ours for ours, hf in table.items()}
    module, _, tensor = rest.rpartition(".")
    if module not in table:
        return None
    return f"{prefix}{table[module]}.{tensor}"


def _rename(state_dict: StateDict, to_hf: bool, hf_prefix: str = "cvt.") -> Dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    out: Dict[str, Tensor] = OrderedDict()
    unmatched: List[str] = []
    for key, value in state_dict.items():
        new = _map_key(key, to_hf, hf_prefix)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        naming = "package (microsoft/CvT)" if to_hf else "Hugging Face"
        raise ValueError(f"state_dict: {len(unmatched)} key(s) are not {naming} CvT names: "
                         f"{unmatched}")
    return out


def check_state_dict(state_dict: StateDict, expected: StateDict, name: str = "state_dict") -> None:
    """Raises a ``ValueError`` listing missing, unexpected and misshaped keys (as
    ``load_state_dict(strict=True)`` would refuse them, but all at once and by shape)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    problems = [f"{label}: {keys}" for label, keys in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    if problems:
        raise ValueError(f"{name}: does not match the target model; " + "; ".join(problems))


def _expected(target: Target, package_state_dict: StateDict) -> StateDict:
    if target is None:
        return _infer_model(package_state_dict).state_dict()
    if isinstance(target, nn.Module):
        return target.state_dict()
    if isinstance(target, Mapping):
        return target
    raise TypeError(f"target: expected an nn.Module, a state_dict or None, got "
                    f"{type(target).__name__}")


def hf_to_package(state_dict: StateDict, target: Target = None) -> Dict[str, Tensor]:
    """A Hugging Face CvT state_dict (``CvtForImageClassification``'s, or ``CvtModel``'s, which
    lacks the final norm and head) under this package's names, checked against ``target``
    (our model or its state_dict; ``None``: the architecture the keys and shapes imply)."""
    out = _rename(state_dict, to_hf=False)
    check_state_dict(out, _expected(target, out))
    return out


def package_to_hf(state_dict: StateDict, target: Target = None,
                  hf_prefix: str = "cvt.") -> Dict[str, Tensor]:
    """This package's CvT state_dict under Hugging Face's names (``hf_prefix="cvt."``:
    ``CvtForImageClassification``; ``""``: ``CvtModel``, whose keys start with ``encoder.``),
    checked against ``target`` (an HF model or its state_dict; ``None``: our model of the
    architecture the keys and shapes imply)."""
    if hf_prefix not in ("cvt.", ""):
        raise ValueError(f"hf_prefix: expected 'cvt.' or '', got {hf_prefix!r}")
    out = _rename(state_dict, to_hf=True, hf_prefix=hf_prefix)
    if target is None:
        check_state_dict(state_dict, _expected(None, state_dict))
    else:
        check_state_dict(out, _expected(target, out))
    return out


def _infer_model(sd: StateDict) -> ConvolutionalVisionTransformer:
    """Our CvT with the tensors ``sd`` (package naming) implies. What leaves no trace in
    the shapes (strides, paddings, heads) is set to anything valid: only keys and shapes of
    the result are used."""
    stages = sorted({int(m["stage"]) for k in sd if (m := _PACKAGE_KEY.fullmatch(k))})
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f"state_dict: expected keys of stages 0, 1, ... (stage0.*), got "
                         f"stages {stages}")
    spec: Dict[str, list] = {}

    def put(key, value):
        spec.setdefault(key, []).append(value)

    in_chans = None
    for i in stages:
        embed = sd.get(f"stage{i}.patch_embed.proj.weight")
        if embed is None or embed.ndim != 4:
            raise ValueError(f"state_dict: expected a 4-D 'stage{i}.patch_embed.proj.weight', "
                             f"got {None if embed is None else tuple(embed.shape)}")
        dim = embed.shape[0]
        in_chans = embed.shape[1] if in_chans is None else in_chans
        blocks = {int(m["block"]) for k in sd
                  if (m := _PACKAGE_KEY.fullmatch(k)) and m["stage"] == str(i) and m["block"]}
        first = f"stage{i}.blocks.0."
        fc1 = sd.get(first + "mlp.fc1.weight")
        conv = sd.get(first + "attn.conv_proj_q.conv.weight")
        put("PATCH_SIZE", tuple(embed.shape[2:]))
        put("DIM_EMBED", dim)
        put("DEPTH", max(blocks) + 1 if blocks else 0)
        put("MLP_RATIO", fc1.shape[0] / dim if fc1 is not None else 4.0)
        put("QKV_BIAS", first + "attn.proj_q.bias" in sd)
        put("CLS_TOKEN", f"stage{i}.cls_token" in sd)
        # "avg" and "linear" hold the same (no) conv tensors: either gives the same keys.
        put("QKV_PROJ_METHOD", "dw_bn" if conv is not None else "linear")
        put("KERNEL_QKV", conv.shape[-1] if conv is not None else 3)
        for key, value in (("NUM_HEADS", 1), ("PATCH_STRIDE", 1), ("PATCH_PADDING", 0),
                           ("DROP_RATE", 0.0), ("ATTN_DROP_RATE", 0.0), ("DROP_PATH_RATE", 0.0),
                           ("PADDING_Q", 1), ("PADDING_KV", 1), ("STRIDE_Q", 1),
                           ("STRIDE_KV", 1)):
            put(key, value)
    spec["NUM_STAGES"] = len(stages)
    head = sd.get("head.weight")
    with torch.device("meta"):
        return ConvolutionalVisionTransformer(
            in_chans=in_chans, num_classes=head.shape[0] if head is not None else 0, spec=spec)


def spec_from_hf_config(config) -> dict:
    """Our spec dict (see :data:`cvt_kernels.models.CVT_SPECS`) from a ``CvtConfig``.

    Drop-path: ours follows the reference (rising linearly over a stage's blocks);
    transformers gives every layer of stage ``i`` the ``i``-th value of that schedule.
    """
    n = len(config.depth)
    return {
        "NUM_STAGES": n,
        "PATCH_SIZE": list(config.patch_sizes),
        "PATCH_STRIDE": list(config.patch_stride),
        "PATCH_PADDING": list(config.patch_padding),
        "DIM_EMBED": list(config.embed_dim),
        "NUM_HEADS": list(config.num_heads),
        "DEPTH": list(config.depth),
        "MLP_RATIO": list(config.mlp_ratio),
        "ATTN_DROP_RATE": list(config.attention_drop_rate),
        "DROP_RATE": list(config.drop_rate),
        "DROP_PATH_RATE": list(config.drop_path_rate),
        "QKV_BIAS": list(config.qkv_bias),
        "CLS_TOKEN": list(config.cls_token),
        "POS_EMBED": [False] * n,
        "QKV_PROJ_METHOD": list(config.qkv_projection_method),
        "KERNEL_QKV": list(config.kernel_qkv),
        "PADDING_KV": list(config.padding_kv),
        "STRIDE_KV": list(config.stride_kv),
        "PADDING_Q": list(config.padding_q),
        "STRIDE_Q": list(config.stride_q),
    }


def model_from_hf_config(config, layer_norm_eps: float = 1e-5) -> ConvolutionalVisionTransformer:
    """Our CvT computing what transformers' ``CvtForImageClassification(config)`` computes:
    exact GELU and plain ``nn.LayerNorm`` (transformers 5.x builds every LayerNorm with the
    default eps 1e-5 and ignores ``config.layer_norm_eps``), ``config.num_labels`` classes.
    Load an HF state_dict with ``model.load_state_dict(hf_to_package(sd, model))``."""
    return ConvolutionalVisionTransformer(
        in_chans=config.num_channels, num_classes=config.num_labels, act_layer=nn.GELU,
        norm_layer=lambda dim: nn.LayerNorm(dim, eps=layer_norm_eps),
        spec=spec_from_hf_config(config))


# --------------------------------------------------------------------------------- files
def load_file(path: str) -> Dict[str, Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file (tensors only)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors
        return load_safetensors(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"SRC: expected a file holding a state_dict (a mapping of names to "
                         f"tensors), got {type(state_dict).__name__}")
    return state_dict


def save_file(state_dict: StateDict, path: str) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file as save_safetensors
        save_safetensors({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(dict(state_dict), path)


def convert_file(src: str, dst: str, to: str, hf_prefix: str = "cvt.") -> int:
    """Converts the state_dict in ``src`` and writes it to ``dst``; returns the tensor count."""
    if to not in ("package", "hf"):
        raise ValueError(f"to: expected 'package' or 'hf', got {to!r}")
    state_dict = load_file(src)
    out = hf_to_package(state_dict) if to == "package" else package_to_hf(
        state_dict, hf_prefix=hf_prefix)
    save_file(out, dst)
    return len(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cvt_kernels.convert",
        description="Convert a CvT state_dict between this package's (microsoft/CvT) names "
                    "and Hugging Face's. Files: .safetensors or torch.save (.pth, .bin, ...).")
    parser.add_argument("src", help="input state_dict file")
    parser.add_argument("dst", help="output state_dict file")
    parser.add_argument("--to", required=True, choices=("package", "hf"),
                        help="naming of the output")
    parser.add_argument("--hf-prefix", default="cvt.", choices=("cvt.", ""),
                        help="with --to hf: 'cvt.' for CvtForImageClassification (default), "
                             "'' for CvtModel")
    args = parser.parse_args(argv)
    try:
        n = convert_file(args.src, args.dst, args.to, args.hf_prefix)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.dst}: {n} tensors, {args.to} naming")
    return 0


if __name__ == "__main__":
    sys.exit(main())
