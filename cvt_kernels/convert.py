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

Files (:func:`load_checkpoint`): ``.safetensors`` or ``torch.save``; a training checkpoint
(``{"model": ..., "optimizer": ...}`` or ``{"state_dict": ...}``, as microsoft/CvT, timm and
``python/train_synthetic.py`` save) is unwrapped, and a ``module.`` (DistributedDataParallel)
or ``_orig_mod.`` (``torch.compile``) prefix removed; the command line says when it did.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import _cli
from .models.cvt import ConvolutionalVisionTransformer

__all__ = ["check_state_dict", "convert_file", "hf_to_package", "load_checkpoint",
           "load_file", "model_from_hf_config", "naming", "package_to_hf",
           "spec_from_hf_config"]

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


_NAMINGS = {"package": "package (microsoft/CvT)", "hf": "Hugging Face"}


def naming(state_dict: StateDict) -> Optional[str]:
    """``"package"`` or ``"hf"`` when every key is a CvT name of that naming, else ``None``
    (a key of one naming never matches the other's rules)."""
    for name, to_hf in (("package", True), ("hf", False)):
        if state_dict and all(_map_key(k, to_hf, "cvt.") is not None for k in state_dict):
            return name
    return None


def _some(keys: Sequence[str], shown: int = 3) -> str:
    """A few of ``keys``: a whole model's worth is unreadable in one message."""
    more = f" ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return "[" + ", ".join(repr(k) for k in keys[:shown]) + more + "]"


def _rename(state_dict: StateDict, to_hf: bool, hf_prefix: str = "cvt.") -> Dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    _check_keys(state_dict, "state_dict: ")
    target, source = ("hf", "package") if to_hf else ("package", "hf")
    if naming(state_dict) == target:
        raise ValueError(f"state_dict: already uses {_NAMINGS[target]} names, not "
                         f"{_NAMINGS[source]}'s: nothing to convert")
    out: Dict[str, Tensor] = OrderedDict()
    unmatched: List[str] = []
    for key, value in state_dict.items():
        new = _map_key(key, to_hf, hf_prefix)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        raise ValueError(f"state_dict: {len(unmatched)} of {len(state_dict)} key(s) are not "
                         f"{_NAMINGS['package' if to_hf else 'hf']} CvT names: "
                         f"{_some(unmatched)}")
    return out


def check_state_dict(state_dict: StateDict, expected: StateDict, name: str = "state_dict") -> None:
    """Raises a ``ValueError`` listing missing, unexpected and misshaped keys (as
    ``load_state_dict(strict=True)`` would refuse them, but all at once and by shape)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    problems = [f"{label}: {_some(keys)}" for label, keys in (
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
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
_PREFIXES = {"module.": "DistributedDataParallel/DataParallel", "_orig_mod.": "torch.compile"}


def load_checkpoint(path: str) -> Tuple[Dict[str, Tensor], List[str]]:
    """``(state_dict, notes)`` from ``.safetensors`` or a ``torch.save`` file: a training
    checkpoint's model entry (``state_dict``, ``model``, ...), without a ``module.`` or
    ``_orig_mod.`` prefix; ``notes`` says what was unwrapped or removed. Raises a
    ``ValueError`` saying what the file holds when it is not a state_dict."""
    notes: List[str] = []
    obj = _unwrap(_read(path), notes)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    _check_keys(obj)
    other = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if other:
        raise ValueError(f"expected a state_dict or a training checkpoint with one of the "
                         f"entries {', '.join(_CONTAINER_KEYS)}; got a mapping with non-tensor "
                         f"entries {_some([str(k) for k in other])}")
    return _strip_prefixes(dict(obj), notes), notes


def _check_keys(state_dict: Mapping, prefix: str = "") -> None:
    """Names are strings: a mapping keyed by numbers or tuples is not a state_dict."""
    other = [k for k in state_dict if not isinstance(k, str)]
    if other:
        kinds = sorted({type(k).__name__ for k in other})
        raise ValueError(f"{prefix}expected a state_dict (a mapping of string names to "
                         f"tensors); got {len(other)} key(s) of type {', '.join(kinds)}: "
                         f"{_some(other)}")


def load_file(path: str) -> Dict[str, Tensor]:
    """The state_dict of :func:`load_checkpoint`, without its notes."""
    return load_checkpoint(path)[0]


def _read(path: str):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except Exception as exc:  # safetensors raises its own error type
            raise ValueError(f"not a readable .safetensors file ({_cli.one_line(exc)})") from exc
    # timm stores its argparse options beside the weights; nothing else non-tensor loads.
    return _cli.safe_torch_load(path, allowed=[argparse.Namespace])


def _unwrap(obj, notes: List[str]):
    """The model's state_dict inside a training checkpoint (nested at most twice)."""
    for _ in range(2):
        if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
            break
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        rest = [str(k) for k in obj if k != key]
        notes.append(f"took the {key!r} entry of a training checkpoint"
                     + (f" (left out: {', '.join(rest)})" if rest else ""))
        obj = obj[key]
    return obj


def _strip_prefixes(state_dict: Dict[str, Tensor], notes: List[str]) -> Dict[str, Tensor]:
    for prefix, by in _PREFIXES.items():
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            notes.append(f"removed the {prefix!r} prefix ({by}) from every key")
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
    out = _converted(load_file(src), to, hf_prefix)
    save_file(out, dst)
    return len(out)


def _converted(state_dict: StateDict, to: str, hf_prefix: str) -> Dict[str, Tensor]:
    if to == "package":
        return hf_to_package(state_dict)
    return package_to_hf(state_dict, hf_prefix=hf_prefix)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m cvt_kernels.convert"
         ) -> int:
    """Exit code 0, 2 when SRC is missing or not a CvT checkpoint of the other naming, 1 when
    writing DST fails; errors are one line on stderr (``--debug``: the traceback)."""
    return _cli.run(lambda args: _main(args, prog), argv, prog)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = _cli.ArgumentParser(
        prog=prog,
        description="Convert a CvT state_dict between this package's (microsoft/CvT) names "
                    "and Hugging Face's.\n\nFiles: .safetensors or torch.save (.pth, .bin, "
                    "...). A training checkpoint\n({'model': ..., 'optimizer': ...}, "
                    "{'state_dict': ...}) is unwrapped, and a 'module.' (DDP)\nor '_orig_mod.' "
                    "(torch.compile) prefix removed; the output says so.")
    parser.add_argument("src", help="input state_dict or training checkpoint file")
    parser.add_argument("dst", help="output state_dict file")
    parser.add_argument("--to", required=True, choices=("package", "hf"),
                        help="naming of the output")
    parser.add_argument("--hf-prefix", default="cvt.", choices=("cvt.", ""),
                        help="with --to hf: 'cvt.' for CvtForImageClassification, '' for "
                             "CvtModel")
    return parser


def _main(argv: List[str], prog: str) -> int:
    args = _parser(prog).parse_args(argv)
    _cli.existing_file(args.src, "SRC")
    _cli.writable_path(args.dst, "DST")
    try:  # what SRC holds: a wrong file (or direction) given is a usage error
        state_dict, notes = load_checkpoint(args.src)
        if naming(state_dict) == args.to:
            other = "hf" if args.to == "package" else "package"
            raise ValueError(f"already uses {_NAMINGS[args.to]} names: nothing to convert "
                             f"(--to {other} converts it to {_NAMINGS[other]} names)")
        out = _converted(state_dict, args.to, args.hf_prefix)
    except ValueError as exc:
        message = str(exc).removeprefix("state_dict: ")
        raise _cli.UsageError(f"SRC {args.src}: {message}") from exc
    for note in notes:
        print(f"{args.src}: {note}")
    save_file(out, args.dst)
    print(f"{args.src} -> {args.dst}: {len(out)} tensors, {args.to} naming")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
