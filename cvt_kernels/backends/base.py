"""What every backend implements, and the small records the ops pass to it.

Two kinds of backend exist:

* **composite** backends (``torch``) are compositions of stock PyTorch ops. They are
  called directly: autograd differentiates them and ``torch.compile`` sees every op, so
  wrapping them in a custom op would only hide them from the compiler.
* **kernel** backends (``reference``, ``triton``, ``cuda``) implement explicit
  forward and backward functions. The ops layer calls them through the
  ``cvt_kernels::*`` ``torch.library`` custom ops, which give them autograd,
  ``torch.compile`` and ``torch.export`` support. The ``reference`` backend is the
  float32 oracle for that explicit math: a new kernel backend is tested function by
  function against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

METHODS = ("dw_bn", "avg", "linear")


@dataclass(frozen=True)
class ProjectionConfig:
    """How one of q, k, v is projected (everything that is not a tensor)."""

    method: str = "dw_bn"  # "dw_bn" | "avg" | "linear"
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    with_cls_token: bool = False

    def out_size(self, n: int) -> int:
        """Spatial size after the projection along an axis of size ``n``."""
        if self.method == "linear":
            return n
        span = n + 2 * self.padding - self.kernel_size
        if self.method == "avg":  # AvgPool2d(ceil_mode=True)
            out = -(-span // self.stride) + 1
            # PyTorch drops a last window that would start in the right padding.
            if (out - 1) * self.stride >= n + self.padding:
                out -= 1
            return out
        return span // self.stride + 1


class ProjectionParams(NamedTuple):
    """The tensors of one projection (``None`` where the method has none)."""

    conv_weight: Optional[Tensor]
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    proj_weight: Tensor
    proj_bias: Optional[Tensor]


class ProjectionGrads(NamedTuple):
    x: Optional[Tensor]
    conv_weight: Optional[Tensor]
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    proj_weight: Optional[Tensor]
    proj_bias: Optional[Tensor]


def uses_batch_stats(training: bool, params: ProjectionParams) -> bool:
    """``nn.BatchNorm2d``'s rule: batch statistics in training, or when no running stats exist."""
    return training or (params.running_mean is None and params.running_var is None)


class ProjectionCall(NamedTuple):
    """One of q, k, v's projection arguments as a module passes them to the ops (after
    ``x, h, w``): its tensors, its configuration, and the BatchNorm mode and constants."""
    params: ProjectionParams
    cfg: ProjectionConfig
    training: bool
    momentum: Optional[float]
    eps: float


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids: ``triton.cdiv`` is a JIT function, whose call from
    host code costs microseconds, a dozen times per training step of each projection."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``
    without its JIT-function call from host code."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bn_momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    """The running-average factor ``nn.BatchNorm2d`` uses after ``num_batches_tracked += 1``.

    ``momentum=None`` means a cumulative moving average (factor ``1 / num_batches_tracked``).
    """
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / float(num_batches_tracked.item())


def update_running_stats(params: ProjectionParams, mean: Tensor, var: Tensor, count: int,
                         momentum: Optional[float]) -> None:
    """``nn.BatchNorm2d``'s running-stat update from the batch ``mean`` and biased ``var``.

    Counter first, then ``running = (1 - f) * running + f * batch`` with the unbiased
    variance, ``f = momentum`` or ``1 / num_batches_tracked`` when ``momentum is None``.
    Stock in-place ops without ``.item()``, so ``torch.compile`` traces it. The generic form
    (:meth:`Backend.conv_projection_batch_stats`, ``cvt_kernels.distributed``); the triton
    statistics kernels apply the same update on the device, in one launch.
    """
    with torch.no_grad():
        tracked = params.num_batches_tracked
        if tracked is not None:
            tracked.add_(1)
        if params.running_mean is None:
            return
        unbiased = var * (count / (count - 1))
        if momentum is None:
            if tracked is None:
                return  # nn.BatchNorm2d's factor is 0 here: nothing moves
            factor = 1.0 / tracked.to(mean.dtype)
            params.running_mean.mul_(1.0 - factor).add_(
                (mean * factor).to(params.running_mean.dtype))
            params.running_var.mul_(1.0 - factor).add_(
                (unbiased * factor).to(params.running_var.dtype))
        else:
            params.running_mean.mul_(1.0 - momentum).add_(
                mean.to(params.running_mean.dtype), alpha=momentum)
            params.running_var.mul_(1.0 - momentum).add_(
                unbiased.to(params.running_var.dtype), alpha=momentum)


def given_or_running_stats(params: ProjectionParams, mean: Optional[Tensor],
                           rstd: Optional[Tensor], eps: Optional[float], dtype: torch.dtype
                           ) -> Tuple[Tensor, Tensor]:
    """``(mean, rstd)`` as given, or, when ``mean`` is ``None`` (eval), from ``params``'
    running statistics: ``running_mean`` and ``rsqrt(running_var + eps)`` in the stat dtype
    of ``dtype``. The generic fallback of kernel backends that take explicit statistics
    (reference, cuda): up to four small launches per call, recomputed every call (a cache
    keyed on tensor versions serves stale values: tests/test_eval_caches.py)."""
    if mean is not None:
        return mean, rstd
    if eps is None:
        raise ValueError("eps: needed to normalize with the running statistics (mean and "
                         "rstd are None)")
    sdt = stat_dtype(dtype)
    with torch.no_grad():
        return (params.running_mean.detach().to(sdt),
                torch.rsqrt(params.running_var.detach().to(sdt) + eps))


_ANY_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Support:
    """What a backend runs, declared once; :class:`Backend` derives every reason a call is
    declined from it (one place for the messages). ``None`` means "any"."""

    kernels: str = ""                       # in messages: "the {kernels} kernels"
    devices: Tuple[str, ...] = ("cpu", "cuda")
    dtypes: Tuple[torch.dtype, ...] = _ANY_FLOAT
    min_capability: Tuple[int, int] = (0, 0)           # on CUDA, for every dtype
    bf16_min_capability: Tuple[int, int] = (8, 0)      # on CUDA, for bfloat16
    methods: Optional[Tuple[str, ...]] = None          # projection methods
    kernel_padding: Optional[Tuple[int, int]] = None   # the only (kernel_size, padding)
    strides: Optional[Tuple[int, ...]] = None
    attention_dropout: bool = True


def projection_support_reasons(support: Support, cfg: ProjectionConfig) -> List[str]:
    """Why ``support`` excludes the projection configuration ``cfg``."""
    reasons = []
    if support.methods is not None and cfg.method not in support.methods:
        only = " and ".join(repr(m) for m in support.methods)
        reasons.append(f"method {cfg.method!r}: only {only} has a {support.kernels} kernel")
    if (support.kernel_padding is not None
            and (cfg.kernel_size, cfg.padding) != support.kernel_padding):
        k, pad = support.kernel_padding
        reasons.append(f"kernel_size {cfg.kernel_size}, padding {cfg.padding}: the kernel "
                       f"is a {k}x{k} conv with padding {pad}")
    if support.strides is not None and cfg.stride not in support.strides:
        handled = " and ".join(str(st) for st in support.strides)
        reasons.append(f"stride {cfg.stride}: the kernel handles stride {handled}")
    return reasons


def tensor_support_reasons(support: Support, x: Tensor) -> List[str]:
    """Why ``support`` excludes a call on ``x`` (its device, dtype, GPU generation)."""
    if x.device.type not in support.devices:
        return [f"x is on {x.device.type}: the {support.kernels} kernels need a "
                f"{' or '.join(d.upper() if d == 'cuda' else d for d in support.devices)} "
                f"tensor"]
    if x.dtype not in support.dtypes:
        names = ", ".join(str(d)[6:] for d in support.dtypes)
        return [f"dtype {x.dtype}: the {support.kernels} kernels take {names}"]
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        if capability < support.min_capability:
            return [f"the {support.kernels} kernels are built for compute capability "
                    f"{'.'.join(map(str, support.min_capability))} and newer"]
        if x.dtype == torch.bfloat16 and capability < support.bf16_min_capability:
            return [f"bfloat16 needs a GPU of compute capability "
                    f"{'.'.join(map(str, support.bf16_min_capability))} or newer"]
    return []


def dropout_support_reasons(support: Support, dropout_p: float) -> List[str]:
    if dropout_p > 0.0 and not support.attention_dropout:
        return [f"attention dropout (attn_drop > 0 in training) is not implemented in the "
                f"{support.kernels} kernels; the torch backend implements it"]
    return []


class Backend:
    """A named implementation of the ops. Subclasses declare what they run in
    :attr:`support`; the reasons a call is declined are derived from it here (a backend adds
    its own only where a declaration cannot say it: Triton's configs per GPU family, the
    interpreter)."""

    name: str = "?"
    composite: bool = False
    support: Support = Support()

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all here (``None`` when it can)."""
        return None

    def tensor_reasons(self, x: Tensor) -> List[str]:
        return tensor_support_reasons(self.support, x)

    def conv_projection_reasons(self, x: Tensor, cfg: ProjectionConfig,
                                training: bool) -> List[str]:
        """Why this backend cannot run this projection call (empty list: it can)."""
        return projection_support_reasons(self.support, cfg) + self.tensor_reasons(x)

    def attention_reasons(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          dropout_p: float) -> List[str]:
        """Why this backend cannot run this attention call (empty list: it can)."""
        return dropout_support_reasons(self.support, dropout_p) + self.tensor_reasons(q)

    #: The block ops (issue 18) this backend implements: ``"mlp"``, ``"layer_norm"``. A
    #: backend written before them (the triton and cuda kernels of the attention) declines
    #: them with a reason instead of raising NotImplementedError mid-call.
    block_ops: Tuple[str, ...] = ()

    def _block_op_reasons(self, op: str, x: Tensor) -> List[str]:
        if op not in self.block_ops:
            return [f"no {op} implementation in the {self.name} backend"]
        return self.tensor_reasons(x)

    def mlp_reasons(self, x: Tensor, act: str) -> List[str]:
        """Why this backend cannot run this ``mlp`` call (empty list: it can)."""
        return self._block_op_reasons("mlp", x)

    def layer_norm_reasons(self, x: Tensor) -> List[str]:
        """Why this backend cannot run this ``layer_norm`` call (empty list: it can)."""
        return self._block_op_reasons("layer_norm", x)

    # Composite backends implement these two (differentiable by autograd).
    def conv_projection(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                        cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                        eps: float) -> Tensor:
        raise NotImplementedError

    def attention(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                  dropout_p: float) -> Tensor:
        raise NotImplementedError

    # Kernel backends implement these (called through the custom ops). The training
    # forward is two passes, as the fused kernels do it: statistics, then normalize + GEMM.
    def conv_projection_stats(self, x: Tensor, h: int, w: int, conv_weight: Tensor,
                              cfg: ProjectionConfig) -> Tuple[Tensor, Tensor]:
        """Pass 1's math: per-channel ``(mean, biased var)`` of the depthwise conv output,
        float32 (float64 for float64 inputs). Nothing else moves."""
        raise NotImplementedError

    def conv_projection_batch_stats(self, x: Tensor, h: int, w: int,
                                    params: ProjectionParams, cfg: ProjectionConfig,
                                    update: bool, momentum: Optional[float],
                                    eps: float) -> Tuple[Tensor, Tensor]:
        """Pass 1 as the ops run it: the batch ``(mean, rstd = 1 / sqrt(var + eps))`` the
        forward normalizes with (stat dtype) and, with ``update`` (training), ``nn.BatchNorm2d``'s
        update of ``params``' ``running_mean``, ``running_var`` and ``num_batches_tracked`` in
        place (:func:`update_running_stats`'s semantics).

        This generic form is :meth:`conv_projection_stats` plus stock ops (rsqrt, the
        update's in-place ops: about a dozen small launches); a backend whose statistics
        kernels do it all on the device overrides it (triton: two launches)."""
        mean, var = self.conv_projection_stats(x, h, w, params.conv_weight, cfg)
        with torch.no_grad():
            rstd = torch.rsqrt(var + eps)
            if update:
                count = x.shape[0] * cfg.out_size(h) * cfg.out_size(w)
                update_running_stats(params, mean, var, count, momentum)
        return mean, rstd

    def conv_projection_forward(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                                mean: Optional[Tensor], rstd: Optional[Tensor],
                                cfg: ProjectionConfig, eps: Optional[float] = None) -> Tensor:
        """Pass 2: ``Linear(flatten((dwconv(x) - mean) * rstd * bn_weight + bn_bias))``.

        ``mean``/``rstd`` are the statistics to normalize with (the batch's in training),
        float32; empty for methods without BatchNorm. ``None`` (eval): ``params``'
        ``running_mean`` and ``running_var`` with ``eps``, read at this call
        (:func:`given_or_running_stats` derives them for a backend whose kernels cannot).
        """
        raise NotImplementedError

    def conv_projection_backward(self, grad_out: Tensor, x: Tensor, h: int, w: int,
                                 params: ProjectionParams, mean: Optional[Tensor],
                                 rstd: Optional[Tensor], cfg: ProjectionConfig,
                                 batch_stats: bool, eps: Optional[float] = None
                                 ) -> ProjectionGrads:
        """Gradients of pass 2 (statistics as in :meth:`conv_projection_forward`). With
        ``batch_stats`` the statistics are functions of ``x`` and the BatchNorm training
        backward is applied. Each parameter's gradient in that parameter's dtype."""
        raise NotImplementedError

    def conv_projection_backward_into(self, grad_x: Tensor, grad_out: Tensor, x: Tensor,
                                      h: int, w: int, params: ProjectionParams,
                                      mean: Optional[Tensor], rstd: Optional[Tensor],
                                      cfg: ProjectionConfig, batch_stats: bool,
                                      eps: Optional[float] = None) -> ProjectionGrads:
        """:meth:`conv_projection_backward` with ``x``'s gradient added to ``grad_x`` (a
        contiguous tensor of ``x``'s shape and dtype), which is returned as the gradients'
        ``x``: a block's three projections read one input, and their gradients meet there.
        A kernel backend may add in its kernels' stores; this default adds after."""
        grads = self.conv_projection_backward(grad_out, x, h, w, params, mean, rstd, cfg,
                                              batch_stats, eps)
        return grads._replace(x=grad_x.add_(grads.x))

    def attention_forward(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          scale: float) -> Tuple[Tensor, Tensor]:
        """Returns ``(out, lse)``, ``lse`` the float32 log-sum-exp of each score row ``(B, H, Nq)``."""
        raise NotImplementedError

    def attention_backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                           out: Tensor, lse: Tensor, num_heads: int, scale: float
                           ) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    # The block ops. Composite backends implement ``mlp`` and ``layer_norm``; kernel
    # backends the ``*_forward``/``*_backward`` pairs (called through the custom ops of
    # ``cvt_kernels/ops/mlp.py`` and ``layer_norm.py``, whose docstrings give the math).
    def mlp(self, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
            fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str,
            residual: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def mlp_forward(self, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Tensor, fc2_bias: Optional[Tensor], act: str,
                    residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Returns ``(out, z)``: ``z`` the pre-activation ``x W1^T + b1`` in ``x``'s dtype,
        saved for the backward (``(B*N, hidden)``)."""
        raise NotImplementedError

    def mlp_backward(self, grad_out: Tensor, x: Tensor, fc1_weight: Tensor,
                     fc2_weight: Tensor, z: Tensor, act: str, has_bias1: bool,
                     has_bias2: bool) -> Tuple[Optional[Tensor], ...]:
        """``(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias)``; the residual's
        gradient is ``grad_out`` itself (the op layer passes it on)."""
        raise NotImplementedError

    def layer_norm(self, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
        """``(normed, x + residual)``; the second is ``None`` without ``residual``."""
        raise NotImplementedError

    def layer_norm_forward(self, x: Tensor, residual: Optional[Tensor],
                           weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(normed, sum, mean, rstd)``: ``sum = x + residual`` in ``x``'s dtype (an empty
        tensor without ``residual``), ``mean``/``rstd`` per row in :func:`stat_dtype`."""
        raise NotImplementedError

    def layer_norm_backward(self, grad_normed: Tensor, grad_sum: Optional[Tensor],
                            s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                            has_bias: bool) -> Tuple[Optional[Tensor], ...]:
        """``(d s, d weight, d bias)``: ``s`` the normalized input (the sum with a residual),
        ``grad_sum`` the gradient reaching the sum directly (``None``: none)."""
        raise NotImplementedError


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def eager_call(*tensors: Optional[Tensor]) -> bool:
    """Whether a call runs in plain eager mode: not traced (``torch.compile``,
    ``torch.export``), no ``torch.func`` transform, ordinary tensors (no fake or functional
    subclass). Such calls may skip ``torch.library``'s custom-op dispatch (an
    ``autograd.Function`` runs the same backend functions: ~8 us a call instead of ~54 with
    autograd, torch 2.13 on this project's CPU machine); traced calls keep the custom ops,
    whose fake kernels tracing needs.
    ``python -m benchmarks.overhead`` measures what these save."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)
