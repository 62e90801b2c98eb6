"""The ``triton`` backend: fused Triton kernels (see ``conv_projection.py`` for the design).

Only imported when ``import triton`` works (``cvt_kernels.backends`` checks). Kernels run on
CUDA tensors; on CPU they run only under Triton's interpreter (``TRITON_INTERPRET=1``) and
only when this backend is forced, so the tests can drive them while auto mode on a CPU
machine keeps picking ``torch``.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from ..base import Backend, ProjectionGrads, Support
from . import attention as _attn
from . import conv_projection as _cp
from ._runtime import dot_precision, interpreting, simulated, target_of

__all__ = ["TritonBackend"]

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _forced_here() -> bool:
    from .. import forced_backend  # the registry imports this module: import late

    return forced_backend() == "triton"


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU, not on whichever is current: Triton launches on the current
    device, so a model on ``cuda:1`` would otherwise run its kernels on ``cuda:0``'s
    stream with pointers into another GPU's memory."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_DEVICE_GUARD  # (a device guard costs a few us; 19 a block training call)
    return torch.cuda.device(t.device)


_NO_DEVICE_GUARD = contextlib.nullcontext()  # stateless: one for every call that needs none


def _drop(rand: Optional[Tensor], keep: float):
    """The GEMM kernels' drop path argument (``None``: no drop path)."""
    if rand is None:
        return None
    from .mlp import Drop

    return Drop(rand, keep)


class TritonBackend(Backend):
    name = "triton"
    composite = False

    def unavailable_reason(self) -> Optional[str]:
        if torch.cuda.is_available() or interpreting():
            return None
        return ("no CUDA device (torch.cuda.is_available() is False); on CPU the kernels run "
                "only under TRITON_INTERPRET=1 with the triton backend forced")

    support = Support(kernels="Triton", devices=("cuda",), dtypes=_GPU_DTYPES,
                      methods=("dw_bn",), kernel_padding=(3, 1), strides=(1, 2),
                      attention_dropout=False)

    def tensor_reasons(self, x: Tensor) -> List[str]:
        # The declaration says CUDA; under the interpreter, a CPU tensor (float64 too) runs
        # when the backend is forced: the tests' way to run the kernels without a GPU.
        if x.device.type != "cuda" and simulated() is not None:
            # The compile check (launch_check): CPU tensors stand for a simulated GPU's.
            return [] if x.dtype in _GPU_DTYPES else [f"dtype {x.dtype} is not supported"]
        if x.device.type != "cuda" and interpreting() and _forced_here():
            return ([] if x.dtype in _GPU_DTYPES + (torch.float64,)
                    else [f"dtype {x.dtype} is not supported"])
        reasons = super().tensor_reasons(x)
        if x.device.type != "cuda":
            reasons = [r + " (on CPU: TRITON_INTERPRET=1 and the triton backend forced)"
                       for r in reasons]
        return reasons

    def attention_reasons(self, q, k, v, num_heads, dropout_p) -> List[str]:
        reasons = super().attention_reasons(q, k, v, num_heads, dropout_p)
        # Beyond a declaration: which head dims have spill-free configs on this GPU family.
        target = target_of(q)
        arch = 90 if target is None else target.family
        # The interpreter (no target) runs every precision: the tests' float32 and float64;
        # a forced backend runs a spilling config too (correct, slower): never chosen.
        precision = ("tf32" if target is None or _forced_here() else dot_precision(q.dtype))
        config_reason = _attn.unsupported_reason(q.dtype, q.shape[-1] // num_heads, arch,
                                                 precision)
        return reasons + ([config_reason] if config_reason is not None else [])

    # ------------------------------------------------------------------- attention
    def attention_forward(self, q, k, v, num_heads, scale):
        with _on_device(q):
            return _attn.attention_forward(q, k, v, num_heads, scale)

    def attention_backward(self, grad_out, q, k, v, out, lse, num_heads, scale):
        with _on_device(q):
            return _attn.attention_backward(grad_out, q, k, v, out, lse, num_heads, scale)

    # ------------------------------------------------------------------ projection
    def conv_projection_stats(self, x, h, w, conv_weight, cfg):
        with _on_device(x):
            mean, var, _ = _cp.conv_projection_stats(x, h, w, conv_weight, cfg.stride,
                                                     cfg.with_cls_token)
        return mean, var

    def conv_projection_batch_stats(self, x, h, w, params, cfg, update, momentum, eps):
        running = (_cp.RunningUpdate(params.running_mean, params.running_var,
                                     params.num_batches_tracked, momentum) if update else None)
        with _on_device(x):
            mean, _, rstd = _cp.conv_projection_stats(x, h, w, params.conv_weight, cfg.stride,
                                                      cfg.with_cls_token, eps, running)
        return mean, rstd

    @staticmethod
    def _stats(params, mean, rstd, eps) -> "_cp.BatchNormStats":
        # None (eval): the kernels read the running buffers themselves (no launch for rstd).
        if mean is None:
            if eps is None:
                raise ValueError("eps: needed to normalize with the running statistics")
            return _cp.BatchNormStats(params.running_mean, params.running_var, eps, True)
        return _cp.BatchNormStats(mean, rstd)

    def conv_projection_forward(self, x, h, w, params, mean, rstd, cfg, eps=None):
        with _on_device(x):
            return _cp.conv_projection_forward(
                x, h, w, params.conv_weight, self._stats(params, mean, rstd, eps),
                params.bn_weight, params.bn_bias, params.proj_weight, params.proj_bias,
                cfg.stride, cfg.with_cls_token)

    def conv_projection_backward(self, grad_out, x, h, w, params, mean, rstd, cfg, batch_stats,
                                 eps=None, _dx_into=None):
        with _on_device(x):
            grads = _cp.conv_projection_backward(
                grad_out, x, h, w, params.conv_weight, self._stats(params, mean, rstd, eps),
                params.bn_weight, params.bn_bias, params.proj_weight, params.proj_bias,
                cfg.stride, cfg.with_cls_token, batch_stats, _dx_into)
        # Each already in its parameter's dtype (the last kernel stores them so).
        return ProjectionGrads(**grads)

    def conv_projection_backward_into(self, grad_x, grad_out, x, h, w, params, mean, rstd, cfg,
                                      batch_stats, eps=None):
        # The input gradient added in the kernels' stores (no add pass over (B, T, C)).
        return self.conv_projection_backward(grad_out, x, h, w, params, mean, rstd, cfg,
                                             batch_stats, eps, _dx_into=grad_x)

    # ------------------------------------------------------------------ block ops
    # Not yet run on a GPU: the measured dispatch compares them with the torch backend's
    # compositions per shape before either serves (cvt_kernels.dispatch).
    block_ops = ("layer_norm", "mlp", "linear")

    def layer_norm_reasons(self, x: Tensor) -> List[str]:
        from .layer_norm import MAX_WIDTH

        reasons = super().layer_norm_reasons(x)
        if x.dim() > 0 and x.shape[-1] > MAX_WIDTH:
            reasons.append(f"layer_norm over {x.shape[-1]} features: the triton kernel holds "
                           f"a row in one program's registers, at most {MAX_WIDTH}")
        return reasons

    def mlp_forward(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, residual,
                    drop_rand=None, keep_prob=1.0, store_z=True):
        from . import mlp as _mlp  # imported on first use: most models never call it

        with _on_device(x):
            return _mlp.mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act,
                                    residual, _drop(drop_rand, keep_prob), store_z)

    def norm_mlp_forward(self, x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias,
                         fc2_weight, fc2_bias, act, residual):
        """Eval: the block's norm2 in fc1's prologue (``ops.mlp.run_norm_mlp``)."""
        from . import mlp as _mlp

        with _on_device(x):
            return _mlp.norm_mlp_forward(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias,
                                         fc2_weight, fc2_bias, act, residual)

    def mlp_backward(self, grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1, has_bias2,
                     drop_rand=None, keep_prob=1.0):
        from . import mlp as _mlp

        with _on_device(x):
            return _mlp.mlp_backward(grad_out, x, fc1_weight, fc2_weight, z, act, has_bias1,
                                     has_bias2, _drop(drop_rand, keep_prob))

    # The output projection (cvt_kernels/ops/linear.py): the MLP's GEMM kernel.
    def linear_forward(self, x, weight, bias, residual, drop_rand=None, keep_prob=1.0):
        from . import mlp as _mlp

        with _on_device(x):
            return _mlp.linear_forward(x, weight, bias, residual, _drop(drop_rand, keep_prob))

    def linear_backward(self, grad_out, x, weight, has_bias, drop_rand=None, keep_prob=1.0):
        from . import mlp as _mlp

        with _on_device(x):
            return _mlp.linear_backward(grad_out, x, weight, has_bias,
                                        _drop(drop_rand, keep_prob))

    def layer_norm_forward(self, x, residual, weight, bias, eps):
        from . import layer_norm as _ln  # imported on first use: most models never call it

        with _on_device(x):
            return _ln.layer_norm_forward(x, residual, weight, bias, eps)

    def layer_norm_backward(self, grad_normed, grad_sum, s, weight, mean, rstd, has_bias):
        from . import layer_norm as _ln

        with _on_device(s):
            return _ln.layer_norm_backward(grad_normed, grad_sum, s, weight, mean, rstd,
                                           has_bias)
