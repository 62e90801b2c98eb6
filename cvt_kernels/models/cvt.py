"""The reference CvT (Wu et al., ICCV 2021), faithful to microsoft/CvT ``lib/models/cls_cvt.py``.

Module names, constructor arguments, initialisation and state_dict keys follow the
public reference implementation, so its checkpoints load with ``strict=True``.
Departures, all of them fixes of known defects of the reference:

* batch size 1 works (the reference ``squeeze()``s the batch axis away in the head);
* no ``torch._six``, no einops/timm/scipy dependency (rearranges are written out);
* the head reads the class token with ``x[:, 0]`` instead of a bare ``squeeze``.

This file is the oracle every accelerated path is tested against: keep it plain.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Attention",
    "Block",
    "ConvEmbed",
    "ConvolutionalVisionTransformer",
    "DropPath",
    "LayerNorm",
    "Mlp",
    "QuickGELU",
    "MapToTokens",
    "tokens_to_map",
    "VisionTransformer",
    "CVT_SPECS",
    "cvt_13",
    "cvt_21",
    "cvt_w24",
]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 for half-precision inputs (as the reference does).

    Unlike the reference, float64 stays float64, and the affine parameters are cast to the
    compute dtype too, so a model converted with ``.half()``/``.to(torch.bfloat16)`` works.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        cdt = torch.promote_types(x.dtype, torch.float32)

        def cast(t):
            return None if t is None else t.to(cdt)

        ret = F.layer_norm(x.to(cdt), self.normalized_shape, cast(self.weight), cast(self.bias),
                           self.eps)
        return ret.to(orig_type)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the reference CvT's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth per sample (same arithmetic as timm's ``DropPath``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
        random_tensor.floor_()
        return x.div(keep_prob) * random_tensor

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class MapToTokens(nn.Module):
    """``b c h w -> b (h w) c`` (the reference's ``Rearrange`` layer; it holds no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``b (h w) c -> b c h w``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class Attention(nn.Module):
    """CvT's convolutional attention, exactly as the reference computes it.

    ``forward(x, h, w)`` takes tokens ``(B, T, dim_in)`` with ``T = h*w`` (``1 + h*w``
    with a class token, which is token 0) and returns ``(B, T_q, dim_out)``.
    Note ``scale = dim_out ** -0.5`` (the full width, not the head dim).
    """

    def __init__(self, dim_in, dim_out, num_heads, qkv_bias=False, attn_drop=0.0,
                 proj_drop=0.0, method="dw_bn", kernel_size=3, stride_kv=1, stride_q=1,
                 padding_kv=1, padding_q=1, with_cls_token=True, **kwargs):
        super().__init__()
        # Here, not at the first forward: a wrong width fails where it was written.
        if not isinstance(num_heads, int) or num_heads < 1 or dim_out % num_heads:
            raise ValueError(f"{type(self).__name__}: dim_out={dim_out} does not split into "
                             f"num_heads={num_heads} heads; pick num_heads >= 1 dividing "
                             f"dim_out")
        self.stride_kv = stride_kv
        self.stride_q = stride_q
        self.dim = dim_out
        self.num_heads = num_heads
        self.scale = dim_out ** -0.5
        self.with_cls_token = with_cls_token
        # Not in the reference; kept so an accelerated copy can be built from this module.
        self.dim_in = dim_in
        self.method = method
        self.kernel_size = kernel_size
        self.padding_kv = padding_kv
        self.padding_q = padding_q
        self.qkv_bias = qkv_bias

        self.conv_proj_q = self._build_projection(
            dim_in, dim_out, kernel_size, padding_q, stride_q,
            "linear" if method == "avg" else method)
        self.conv_proj_k = self._build_projection(
            dim_in, dim_out, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = self._build_projection(
            dim_in, dim_out, kernel_size, padding_kv, stride_kv, method)

        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)

        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    def _build_projection(self, dim_in, dim_out, kernel_size, padding, stride, method):
        if method == "dw_bn":
            proj = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(dim_in, dim_in, kernel_size=kernel_size, padding=padding,
                                   stride=stride, bias=False, groups=dim_in)),
                ("bn", nn.BatchNorm2d(dim_in)),
                ("rearrage", MapToTokens()),  # sic: the reference's name
            ]))
        elif method == "avg":
            proj = nn.Sequential(OrderedDict([
                ("avg", nn.AvgPool2d(kernel_size=kernel_size, padding=padding, stride=stride,
                                     ceil_mode=True)),
                ("rearrage", MapToTokens()),
            ]))
        elif method == "linear":
            proj = None
        else:
            raise ValueError(f"Unknown method ({method})")
        return proj

    def forward_conv(self, x, h, w):
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], 1)
        x = tokens_to_map(x, h, w)

        def project(conv_proj):
            if conv_proj is not None:
                return conv_proj(x)
            return x.flatten(2).transpose(1, 2)

        q = project(self.conv_proj_q)
        k = project(self.conv_proj_k)
        v = project(self.conv_proj_v)

        if self.with_cls_token:
            q = torch.cat((cls_token, q), dim=1)
            k = torch.cat((cls_token, k), dim=1)
            v = torch.cat((cls_token, v), dim=1)
        return q, k, v

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # b t (h d) -> b h t d
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x, h, w):
        q, k, v = self.forward_conv(x, h, w)

        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))

        attn_score = torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale
        attn = F.softmax(attn_score, dim=-1)
        attn = self.attn_drop(attn)

        x = torch.einsum("bhlt,bhtv->bhlv", attn, v)
        x = x.transpose(1, 2).flatten(2)  # b h t d -> b t (h d)

        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    def __init__(self, dim_in, dim_out, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 **kwargs):
        super().__init__()
        self.with_cls_token = kwargs["with_cls_token"]
        self.norm1 = norm_layer(dim_in)
        self.attn = Attention(dim_in, dim_out, num_heads, qkv_bias, attn_drop, drop, **kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(in_features=dim_out, hidden_features=int(dim_out * mlp_ratio),
                       act_layer=act_layer, drop=drop)

    def forward(self, x, h, w):
        res = x
        x = self.norm1(x)
        attn = self.attn(x, h, w)
        x = res + self.drop_path(attn)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided conv, then LayerNorm over channels."""

    def __init__(self, patch_size=7, in_chans=3, embed_dim=64, stride=4, padding=2,
                 norm_layer=None):
        super().__init__()
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=padding)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x):
        x = self.proj(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.norm:
            x = self.norm(x)
        x = tokens_to_map(x, H, W)
        return x


def _init_weights_trunc_normal(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _init_weights_xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class VisionTransformer(nn.Module):
    """One CvT stage: conv embedding, optional class token, a stack of blocks."""

    def __init__(self, patch_size=16, patch_stride=16, patch_padding=0, in_chans=3,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, init="trunc_norm", **kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.rearrage = None
        self.patch_embed = ConvEmbed(patch_size=patch_size, in_chans=in_chans,
                                     stride=patch_stride, padding=patch_padding,
                                     embed_dim=embed_dim, norm_layer=norm_layer)
        with_cls_token = kwargs["with_cls_token"]
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.cls_token = None
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Built on the CPU so that a model can be built on the meta device.
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(dim_in=embed_dim, dim_out=embed_dim, num_heads=num_heads,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[j], act_layer=act_layer,
                  norm_layer=norm_layer, **kwargs)
            for j in range(depth)
        ])
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights_xavier if init == "xavier" else _init_weights_trunc_normal)

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.size()
        x = x.flatten(2).transpose(1, 2)
        cls_tokens = None
        if self.cls_token is not None:
            cls_tokens = self.cls_token.expand(B, -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, H, W)
        if self.cls_token is not None:
            cls_tokens, x = torch.split(x, [1, H * W], 1)
        x = tokens_to_map(x, H, W)
        return x, cls_tokens


class ConvolutionalVisionTransformer(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, init="trunc_norm", spec: Optional[dict] = None):
        super().__init__()
        if spec is None:
            raise ValueError("spec: expected a CvT spec dict (see cvt_kernels.models.CVT_SPECS)")
        self.num_classes = num_classes
        self.num_stages = spec["NUM_STAGES"]
        for i in range(self.num_stages):
            kwargs = {
                "patch_size": spec["PATCH_SIZE"][i],
                "patch_stride": spec["PATCH_STRIDE"][i],
                "patch_padding": spec["PATCH_PADDING"][i],
                "embed_dim": spec["DIM_EMBED"][i],
                "depth": spec["DEPTH"][i],
                "num_heads": spec["NUM_HEADS"][i],
                "mlp_ratio": spec["MLP_RATIO"][i],
                "qkv_bias": spec["QKV_BIAS"][i],
                "drop_rate": spec["DROP_RATE"][i],
                "attn_drop_rate": spec["ATTN_DROP_RATE"][i],
                "drop_path_rate": spec["DROP_PATH_RATE"][i],
                "with_cls_token": spec["CLS_TOKEN"][i],
                "method": spec["QKV_PROJ_METHOD"][i],
                "kernel_size": spec["KERNEL_QKV"][i],
                "padding_q": spec["PADDING_Q"][i],
                "padding_kv": spec["PADDING_KV"][i],
                "stride_kv": spec["STRIDE_KV"][i],
                "stride_q": spec["STRIDE_Q"][i],
            }
            stage = VisionTransformer(in_chans=in_chans, init=init, act_layer=act_layer,
                                      norm_layer=norm_layer, **kwargs)
            setattr(self, f"stage{i}", stage)
            in_chans = spec["DIM_EMBED"][i]

        dim_embed = spec["DIM_EMBED"][-1]
        self.norm = norm_layer(dim_embed)
        self.cls_token = spec["CLS_TOKEN"][-1]
        self.head = nn.Linear(dim_embed, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        layers = set()
        for i in range(self.num_stages):
            layers.add(f"stage{i}.pos_embed")
            layers.add(f"stage{i}.cls_token")
        return layers

    def forward_features(self, x):
        for i in range(self.num_stages):
            x, cls_tokens = getattr(self, f"stage{i}")(x)
        if self.cls_token:
            # The reference squeezes here, which also drops the batch axis when B == 1.
            x = self.norm(cls_tokens)[:, 0]
        else:
            x = x.flatten(2).transpose(1, 2)
            x = self.norm(x)
            x = torch.mean(x, dim=1)
        return x

    def forward(self, x):
        return self.head(self.forward_features(x))


def _spec(dims, heads, depths, drop_path) -> dict:
    return {
        "NUM_STAGES": 3,
        "PATCH_SIZE": [7, 3, 3],
        "PATCH_STRIDE": [4, 2, 2],
        "PATCH_PADDING": [2, 1, 1],
        "DIM_EMBED": list(dims),
        "NUM_HEADS": list(heads),
        "DEPTH": list(depths),
        "MLP_RATIO": [4.0, 4.0, 4.0],
        "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
        "DROP_RATE": [0.0, 0.0, 0.0],
        "DROP_PATH_RATE": [0.0, 0.0, drop_path],
        "QKV_BIAS": [True, True, True],
        "CLS_TOKEN": [False, False, True],
        "POS_EMBED": [False, False, False],
        "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"],
        "KERNEL_QKV": [3, 3, 3],
        "PADDING_KV": [1, 1, 1],
        "STRIDE_KV": [2, 2, 2],
        "PADDING_Q": [1, 1, 1],
        "STRIDE_Q": [1, 1, 1],
    }


#: The released configurations (microsoft/CvT ``experiments/imagenet/cvt/*.yaml``).
CVT_SPECS = {
    "cvt_13": _spec((64, 192, 384), (1, 3, 6), (1, 2, 10), 0.1),
    "cvt_21": _spec((64, 192, 384), (1, 3, 6), (1, 4, 16), 0.1),
    "cvt_w24": _spec((192, 768, 1024), (3, 12, 16), (2, 2, 20), 0.3),
}


_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
_LAYER_NORMS = {"float32": LayerNorm, "plain": nn.LayerNorm}


def _build(name: str, num_classes: int, img_size: int, spec_overrides: Optional[dict],
           act: str = "quick_gelu", layer_norm: str = "float32", layer_norm_eps: float = 1e-5,
           **kwargs: Any) -> ConvolutionalVisionTransformer:
    """The defaults are the reference's. ``act="gelu"``: exact GELU, ``layer_norm="plain"``:
    ``nn.LayerNorm`` (no float32 compute for half inputs), as Hugging Face's CvT has them."""
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size: expected a positive int, got {img_size!r}")
    if act not in _ACTIVATIONS:
        raise ValueError(f"act: expected one of {sorted(_ACTIVATIONS)}, got {act!r}")
    if layer_norm not in _LAYER_NORMS:
        raise ValueError(f"layer_norm: expected one of {sorted(_LAYER_NORMS)}, got {layer_norm!r}")
    spec = {k: list(v) if isinstance(v, list) else v for k, v in CVT_SPECS[name].items()}
    for key, value in (spec_overrides or {}).items():
        if key not in spec:
            raise ValueError(f"spec_overrides: unknown key {key!r}; expected one of {sorted(spec)}")
        spec[key] = value
    norm_class = _LAYER_NORMS[layer_norm]
    model = ConvolutionalVisionTransformer(
        in_chans=kwargs.pop("in_chans", 3), num_classes=num_classes, act_layer=_ACTIVATIONS[act],
        norm_layer=lambda dim: norm_class(dim, eps=layer_norm_eps), spec=spec, **kwargs)
    # CvT has no positional embedding: any input size works; this is the size it was built for.
    model.img_size = img_size
    return model


def cvt_13(num_classes: int = 1000, img_size: int = 224, spec_overrides: Optional[dict] = None,
           *, act: str = "quick_gelu", layer_norm: str = "float32", layer_norm_eps: float = 1e-5,
           **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-13 (19,997,480 parameters with 1000 classes). ``act``: ``"quick_gelu"`` (the
    reference's) or ``"gelu"`` (exact, Hugging Face's); ``layer_norm``: ``"float32"`` (the
    reference's) or ``"plain"`` (``nn.LayerNorm``, Hugging Face's)."""
    return _build("cvt_13", num_classes, img_size, spec_overrides, act, layer_norm,
                  layer_norm_eps, **kwargs)


def cvt_21(num_classes: int = 1000, img_size: int = 224, spec_overrides: Optional[dict] = None,
           *, act: str = "quick_gelu", layer_norm: str = "float32", layer_norm_eps: float = 1e-5,
           **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-21 (31,622,696 parameters with 1000 classes); options as :func:`cvt_13`."""
    return _build("cvt_21", num_classes, img_size, spec_overrides, act, layer_norm,
                  layer_norm_eps, **kwargs)


def cvt_w24(num_classes: int = 1000, img_size: int = 384, spec_overrides: Optional[dict] = None,
            *, act: str = "quick_gelu", layer_norm: str = "float32", layer_norm_eps: float = 1e-5,
            **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-W24 (277,196,392 parameters with 1000 classes); released at 384x384; options as
    :func:`cvt_13`."""
    return _build("cvt_w24", num_classes, img_size, spec_overrides, act, layer_norm,
                  layer_norm_eps, **kwargs)
