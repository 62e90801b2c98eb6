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
    Stock in-place ops without ``.item()``, so ``torch.compile`` traces it.
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


def dw3x3_projection_reasons(cfg: ProjectionConfig, kernel_name: str) -> List[str]:
    """Why a fused depthwise-3x3 projection kernel (Triton's, CUDA's) cannot run ``cfg``."""
    reasons = []
    if cfg.method != "dw_bn":
        reasons.append(f"method {cfg.method!r}: only 'dw_bn' has a {kernel_name} kernel")
    if cfg.kernel_size != 3 or cfg.padding != 1:
        reasons.append(f"kernel_size {cfg.kernel_size}, padding {cfg.padding}: the kernel "
                       f"is a 3x3 conv with padding 1")
    if cfg.stride not in (1, 2):
        reasons.append(f"stride {cfg.stride}: the kernel handles stride 1 and 2")
    return reasons


class Backend:
    """A named implementation of the ops. Subclasses override what they support."""

    name: str = "?"
    composite: bool = False

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all here (``None`` when it can)."""
        return None

    def conv_projection_reasons(self, x: Tensor, cfg: ProjectionConfig, training: bool) -> List[str]:
        """Why this backend cannot run this projection call (empty list: it can)."""
        return []

    def attention_reasons(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          dropout_p: float) -> List[str]:
        """Why this backend cannot run this attention call (empty list: it can)."""
        return []

    # Composite backends implement these two (differentiable by autograd).
    def conv_projection(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                        cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                        eps: float) -> Tensor:
        raise NotImplementedError

    def attention(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                  dropout_p: float) -> Tensor:
        raise NotImplementedError

    # Kernel backends implement these five (called through the custom ops). The training
    # forward is two passes, as the fused kernels do it: statistics, then normalize + GEMM.
    def conv_projection_stats(self, x: Tensor, h: int, w: int, conv_weight: Tensor,
                              cfg: ProjectionConfig) -> Tuple[Tensor, Tensor]:
        """Pass 1: per-channel ``(mean, biased var)`` of the depthwise conv output, float32
        (float64 for float64 inputs). The caller updates the running statistics."""
        raise NotImplementedError

    def conv_projection_forward(self, x: Tensor, h: int, w: int, params: ProjectionParams,
                                mean: Tensor, rstd: Tensor, cfg: ProjectionConfig) -> Tensor:
        """Pass 2: ``Linear(flatten((dwconv(x) - mean) * rstd * bn_weight + bn_bias))``.

        ``mean``/``rstd`` are the batch statistics (training) or the running ones (eval),
        float32; empty for methods without BatchNorm. The running stats in ``params`` are
        not read.
        """
        raise NotImplementedError

    def conv_projection_backward(self, grad_out: Tensor, x: Tensor, h: int, w: int,
                                 params: ProjectionParams, mean: Tensor, rstd: Tensor,
                                 cfg: ProjectionConfig, batch_stats: bool) -> ProjectionGrads:
        """Gradients of pass 2. With ``batch_stats`` the statistics are functions of ``x``
        and the BatchNorm training backward is applied."""
        raise NotImplementedError

    def attention_forward(self, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          scale: float) -> Tuple[Tensor, Tensor]:
        """Returns ``(out, lse)``, ``lse`` the float32 log-sum-exp of each score row ``(B, H, Nq)``."""
        raise NotImplementedError

    def attention_backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                           out: Tensor, lse: Tensor, num_heads: int, scale: float
                           ) -> Tuple[Tensor, Tensor, Tensor]:
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
    autograd, torch 2.13 on this project's CPU machine) and reuse eval-mode constants cached
    per tensor version; traced calls keep the custom ops, whose fake kernels tracing needs.
    ``python -m benchmarks.overhead`` measures what these save."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)
