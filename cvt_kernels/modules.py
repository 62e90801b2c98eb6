"""``FusedConvAttention``, the drop-in for CvT's ``Attention``, and ``fused_attention``,
the attention on the ops that the block (:mod:`cvt_kernels.block`) and the Hugging Face
adapters (:mod:`cvt_kernels.hf`) share. ``accelerate()``: :mod:`cvt_kernels.acceleration`
(still importable from here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .backends import use_backend
from .backends.base import ProjectionCall, ProjectionConfig, ProjectionParams
from .backends.torch_ops import linear
from .distributed import sync_bn_active, sync_conv_projection
from .models.cvt import Attention
from .ops import _drop_path, attention, run_conv_projection, validate_conv_projection
from .ops._checks import check_tensor
from .ops.attention import run_attention
from .ops.linear import run_linear
from .ops.one_pass import one_pass_reasons, run_faster, run_one_pass

__all__ = ["AttentionArgs", "FusedConvAttention", "Linear", "fused_attention",
           "stock_projection_call"]


class FusedConvAttention(Attention):
    """CvT's convolutional attention on the fused ops.

    Same constructor (arguments and defaults), ``forward(x, h, w)``, submodules, parameter
    and buffer names as :class:`cvt_kernels.models.Attention` (the reference), so state
    dicts load both ways with ``strict=True``. Parameters stay in the standard
    ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` submodules; the forward reads them and
    runs the ops of the backend the dispatcher picks (see :mod:`cvt_kernels.backends`).

    ``sync_bn`` (default ``False``; set by ``accelerate(model, sync_bn=True)``) makes the
    projections' BatchNorm use statistics all-reduced over ``sync_bn_group`` in training, as
    ``nn.SyncBatchNorm`` does (see :mod:`cvt_kernels.distributed`). Neither is state.
    """

    sync_bn: bool = False
    sync_bn_group = None  # None: the default process group

    @classmethod
    def from_reference(cls, attn: Attention) -> "FusedConvAttention":
        """A ``FusedConvAttention`` sharing ``attn``'s submodules (so its parameters and
        buffers), with the same train/eval state."""
        if not isinstance(attn, Attention):
            raise TypeError(f"attn: expected a cvt_kernels.models.Attention, got "
                            f"{type(attn).__name__}")
        with torch.device("meta"):  # the submodules built here are replaced just below
            new = cls(attn.dim_in, attn.dim, attn.num_heads, qkv_bias=attn.qkv_bias,
                      attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                      method=attn.method, kernel_size=attn.kernel_size,
                      stride_kv=attn.stride_kv, stride_q=attn.stride_q,
                      padding_kv=attn.padding_kv, padding_q=attn.padding_q,
                      with_cls_token=attn.with_cls_token)
        for name, child in attn.named_children():
            setattr(new, name, child)
        new.training = attn.training  # not .train(): that would also flip shared children
        return new

    def _projection(self, which: str) -> ProjectionCall:
        conv_proj = getattr(self, f"conv_proj_{which}")
        linear = getattr(self, f"proj_{which}")
        stride = self.stride_q if which == "q" else self.stride_kv
        padding = self.padding_q if which == "q" else self.padding_kv
        method = "linear" if conv_proj is None else ("avg" if hasattr(conv_proj, "avg") else "dw_bn")
        cfg = ProjectionConfig(method, self.kernel_size, stride, padding, self.with_cls_token)
        if method == "dw_bn":
            conv, bn = conv_proj.conv, conv_proj.bn
            params = ProjectionParams(conv.weight, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, bn.num_batches_tracked, linear.weight,
                                      linear.bias)
            return ProjectionCall(params, cfg, bn.training, bn.momentum, bn.eps)
        params = ProjectionParams(None, None, None, None, None, None, linear.weight, linear.bias)
        return ProjectionCall(params, cfg, self.training, None, 0.0)

    def plan_args(self) -> Optional["AttentionArgs"]:
        """What :func:`fused_attention` takes from this module for a call with the
        residual in the output projection (a block's call plan, :mod:`cvt_kernels._plan`),
        or ``None`` where that call is not the module's (output dropout on, sync_bn)."""
        modules = self._modules  # (nn.Module.__getattr__ costs ~1 us a read)
        proj_drop, proj, attn_drop = (modules.get(n) for n in ("proj_drop", "proj",
                                                                "attn_drop"))
        if proj_drop is None or proj is None or attn_drop is None:
            return None  # (the module's own forward says what is missing)
        if (proj_drop.training and proj_drop.p > 0) or self.sync_bn:
            return None
        fast = not torch.compiler.is_compiling()
        out = linear_of(proj) if fast else Linear(proj.weight, proj.bias)
        return AttentionArgs(tuple((fast and self._dw_bn_projection(which))
                                   or self._projection(which) for which in "qkv"),
                             self.num_heads, self.scale,
                             attn_drop.p if self.training else 0.0, out)

    def _dw_bn_projection(self, which: str) -> Optional[ProjectionCall]:
        """:meth:`_projection` of a ``dw_bn`` projection built of the stock modules, read
        from their dicts (``nn.Module.__getattr__`` and ``hasattr``'s exception cost more
        than the rest of a planned call's reads); ``None`` for anything else."""
        modules = self._modules
        conv_proj, linear = modules.get(f"conv_proj_{which}"), modules.get(f"proj_{which}")
        if type(conv_proj) is not nn.Sequential or type(linear) is not nn.Linear:
            return None
        children = conv_proj._modules
        conv, bn = children.get("conv"), children.get("bn")
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or "avg" in children:
            return None
        q = which == "q"
        cfg = ProjectionConfig("dw_bn", self.kernel_size, self.stride_q if q else self.stride_kv,
                               self.padding_q if q else self.padding_kv, self.with_cls_token)
        return stock_projection_call(conv, bn, linear, cfg)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = fused_attention(x, h, w, [self._projection(which) for which in "qkv"],
                              self.num_heads, self.scale, dropout_p, self.proj,
                              sync_bn=self.sync_bn, sync_bn_group=self.sync_bn_group)
        return self.proj_drop(out)

    def forward_residual(self, x: Tensor, h: int, w: int, residual: Tensor,
                         drop_prob: float = 0.0) -> Tensor:
        """``residual + drop_path(self(x, h, w))`` (``drop_prob``: CvT's ``DropPath``'s,
        0 when it is inactive), the add and the drop path inside the output projection's
        GEMM when the output dropout is off (eval, or ``proj_drop`` 0)."""
        if self.proj_drop.training and self.proj_drop.p > 0:
            out = self(x, h, w)
            rand = _drop_path.draw(out.shape, out.dtype, out.device, drop_prob)
            return residual + (out if rand is None
                               else _drop_path.apply(out, rand, 1.0 - drop_prob))
        dropout_p = self.attn_drop.p if self.training else 0.0
        return fused_attention(x, h, w, [self._projection(which) for which in "qkv"],
                               self.num_heads, self.scale, dropout_p, self.proj,
                               sync_bn=self.sync_bn, sync_bn_group=self.sync_bn_group,
                               residual=residual, drop_prob=drop_prob)


def stock_projection_call(conv: nn.Conv2d, bn: nn.BatchNorm2d, linear: nn.Linear,
                          cfg: ProjectionConfig) -> Optional[ProjectionCall]:
    """A ``dw_bn`` projection's call read from the stock modules' dicts (a call plan's
    reads: ``nn.Module.__getattr__`` costs ~1 us a read), or ``None`` when one of the
    parameters or buffers the ops read is not registered (the caller's general reads then
    say what is wrong). The caller has checked the modules' types."""
    cp, bp, bb, lp = conv._parameters, bn._parameters, bn._buffers, linear._parameters
    if not (all(n in bp and n in lp for n in ("weight", "bias")) and "weight" in cp
            and all(n in bb for n in ("running_mean", "running_var", "num_batches_tracked"))):
        return None
    params = ProjectionParams(cp["weight"], bp["weight"], bp["bias"], bb["running_mean"],
                              bb["running_var"], bb["num_batches_tracked"], lp["weight"],
                              lp["bias"])
    return ProjectionCall(params, cfg, bn.training, bn.momentum, bn.eps)


class Linear(NamedTuple):
    """A Linear layer's tensors (what :func:`fused_attention` reads of ``proj``)."""
    weight: Tensor
    bias: Optional[Tensor]


def linear_of(linear: nn.Module) -> Linear:
    """A Linear layer's ``(weight, bias)``, read from its dict for ``nn.Linear`` itself
    (``nn.Module.__getattr__`` costs a call plan ~1 us a read; a subclass may define them
    otherwise)."""
    if type(linear) is nn.Linear:
        params = linear._parameters
        return Linear(params.get("weight"), params.get("bias"))
    return Linear(linear.weight, linear.bias)


class AttentionArgs(NamedTuple):
    """:func:`fused_attention`'s arguments after ``x, h, w`` that a module supplies."""
    projections: Tuple[ProjectionCall, ...]
    num_heads: int
    scale: float
    dropout_p: float
    proj: Linear


def fused_attention(x: Tensor, h: int, w: int, projections: List[ProjectionCall],
                    num_heads: int, scale: float, dropout_p: float, proj: nn.Linear,
                    sync_bn: bool = False, sync_bn_group=None,
                    residual: Optional[Tensor] = None, drop_prob: float = 0.0,
                    checked: bool = True) -> Tensor:
    """CvT attention on the ops, shared by the modules that adapt a parameter layout
    (``FusedConvAttention``, the Hugging Face adapter).

    ``x``: ``(B, h*w [+1], C_in)`` token-major, the class token first when the projections
    say so; floating dtype (bf16/fp16/fp32/fp64), all parameters on its device.
    ``projections``: the q, k, v ``conv_projection`` arguments after ``x, h, w``, each a
    ``ProjectionCall`` (params, cfg, training, momentum, eps); all three are
    validated before any runs (a bad call moves no running statistic). ``num_heads`` must
    divide the projections' width; ``scale`` multiplies q k^T (CvT: ``dim_out ** -0.5``);
    ``dropout_p`` drops attention probabilities (0 in eval). ``proj``: the output Linear
    (its dropout is the caller's). Returns ``(B, h*w [+1], C_out)`` in ``x``'s dtype.
    In training each projection's BatchNorm updates its running statistics once.
    ``residual``: ``(B, h*w [+1], C_out)`` added to the result (the block's skip
    connection; the caller's output dropout must be off) by the output projection's GEMM:
    the ``linear`` op (:mod:`cvt_kernels.ops.linear`: one Triton launch on a kernel
    backend, ``torch_ops.linear_add`` on stock ops), with CvT's drop path of probability
    ``drop_prob`` applied to the projection first (``residual + drop_path(proj(...))``;
    only with a residual). Without a residual the projection is stock ``F.linear``.
    ``checked=False``: the arguments passed these checks before (a module's call plan,
    :mod:`cvt_kernels._plan`, for the same signature)."""
    if checked:
        check_tensor(x, "x", ndim=3)
        for params, cfg, training, _, _ in projections:  # all checked before any runs
            validate_conv_projection(x, h, w, params, cfg, training)

    def project(params, cfg, training, momentum, eps):
        if sync_bn and sync_bn_active(sync_bn_group, cfg, training, params):
            return sync_conv_projection(x, h, w, params, cfg, training, momentum, eps,
                                        sync_bn_group)
        return run_conv_projection(x, h, w, params, cfg, training, momentum, eps)

    if not checked:
        pass
    elif residual is not None:
        check_tensor(residual, "residual", ndim=3)
        want = (x.shape[0], x.shape[1], proj.weight.shape[0])
        if tuple(residual.shape) != want:
            raise ValueError(f"residual: expected shape {want}, got {tuple(residual.shape)}")
    elif drop_prob:
        raise ValueError("drop_prob: drop path is fused with the residual add; pass residual")

    def separate(q, k, v):
        out = (attention if checked else run_attention)(q, k, v, num_heads, scale, dropout_p)
        if residual is None:
            return linear(out, proj.weight, proj.bias)
        return run_linear(out, proj.weight, proj.bias, residual, drop_prob)

    # (Drop path only in training, where the forward-only one-pass kernel never serves.)
    if not drop_prob and not one_pass_reasons(x, projections, num_heads, dropout_p, proj):
        k, v = (project(*p) for p in projections[1:])

        def one_pass():
            out = run_one_pass(x, h, w, projections[0], k, v, num_heads, scale, proj)
            return out if residual is None else residual + out

        return run_faster(x, h, w, num_heads, proj.weight.shape[1], k, one_pass,
                          lambda: separate(project(*projections[0]), k, v),
                          lambda: _float64_truth(x, h, w, projections, num_heads, scale,
                                                 proj, residual))
    return separate(*(project(*p) for p in projections))


def _float64_truth(x: Tensor, h: int, w: int, projections: List[ProjectionCall],
                   num_heads: int, scale: float, proj: nn.Linear,
                   residual: Optional[Tensor]) -> Tensor:
    """The same eval call in float64 on the torch backend, autocast off: the truth the
    one-pass and separate paths are checked against (``ops.one_pass.run_faster``)."""
    def f64(t: Optional[Tensor]) -> Optional[Tensor]:
        return t.detach().to(torch.float64) if t is not None and t.is_floating_point() else t

    calls = [ProjectionCall(ProjectionParams(*(f64(t) for t in params)), cfg, training,
                            momentum, eps)
             for params, cfg, training, momentum, eps in projections]
    proj64 = SimpleNamespace(weight=f64(proj.weight), bias=f64(proj.bias))
    with use_backend("torch"), torch.autocast(x.device.type, enabled=False):
        return fused_attention(f64(x), h, w, calls, num_heads, scale, 0.0, proj64,
                               residual=f64(residual))


def __getattr__(name: str):
    # accelerate() and its helpers live in cvt_kernels.acceleration, which imports this
    # module, block.py and hf.py (the layering is one-way: modules <- block <- hf <-
    # acceleration); their old names here still work, resolved on first use.
    if name in _MOVED:
        from . import acceleration

        return getattr(acceleration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = ("SCOPES", "accelerate", "_is_fused", "_is_hf_cvt_attention", "_is_hf_cvt_layer")
