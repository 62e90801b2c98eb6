"""The convolutional projection op: ``Linear(flatten(BN(dwconv(x_map))))``, class token kept.

Layers, top to bottom:

* :func:`conv_projection` -- the public function: validates, asks the dispatcher, and calls
  either a composite backend directly or the custom op below;
* ``cvt_kernels::conv_projection`` / ``cvt_kernels::conv_projection_backward`` --
  ``torch.library`` custom ops (with fake and autograd registrations) around a kernel
  backend's explicit forward and backward, for tracing (``torch.compile``, ``torch.export``);
* ``_ConvProjectionFunction`` -- their ``autograd.Function`` twin for eager calls (the same
  functions without the custom-op dispatch, ``_checks.eager_call``).

In training mode the op updates ``running_mean``, ``running_var`` and
``num_batches_tracked`` in place exactly as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _plan, backends, trials
from ..backends.base import ProjectionConfig, ProjectionParams, stat_dtype, uses_batch_stats
from ._checks import (autocast_cast, autocast_dtype, check_positive_int, check_same,
                      check_tensor, eager_call, no_autocast)
from ._choice import choose_backend, trial_context
from ._register import differentiable_op, forward_op

__all__ = ["conv_projection", "run_conv_projection", "validate_conv_projection"]


def validate_conv_projection(x: Tensor, h: int, w: int, params: ProjectionParams,
                             cfg: ProjectionConfig, training: bool) -> None:
    """Raises a ``TypeError``/``ValueError``/``RuntimeError`` naming the bad argument."""
    check_tensor(x, "x", ndim=3)
    check_positive_int(h, "h")
    check_positive_int(w, "w")
    if cfg.method not in ("dw_bn", "avg", "linear"):
        raise ValueError(f"method: expected 'dw_bn', 'avg' or 'linear', got {cfg.method!r}")
    tokens = h * w + (1 if cfg.with_cls_token else 0)
    if x.shape[1] != tokens:
        cls = " + 1 (class token)" if cfg.with_cls_token else ""
        raise ValueError(f"x: expected {tokens} tokens (h*w = {h}*{w}{cls}), got "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")
    proj_weight = check_tensor(params.proj_weight, "proj_weight", ndim=2)
    channels = x.shape[2]
    if proj_weight.shape[1] != channels:
        raise ValueError(f"x: expected {proj_weight.shape[1]} channels (dim_in of the "
                         f"projection), got {channels} (shape {tuple(x.shape)})")
    named = [("proj_weight", params.proj_weight), ("proj_bias", params.proj_bias)]
    if cfg.method == "dw_bn":
        conv_weight = check_tensor(params.conv_weight, "conv_weight", ndim=4)
        k = cfg.kernel_size
        if tuple(conv_weight.shape) != (channels, 1, k, k):
            raise ValueError(f"conv_weight: expected shape {(channels, 1, k, k)} (depthwise), "
                             f"got {tuple(conv_weight.shape)}")
        named += [("conv_weight", params.conv_weight), ("bn_weight", params.bn_weight),
                  ("bn_bias", params.bn_bias)]
        if (h + 2 * cfg.padding < k) or (w + 2 * cfg.padding < k):
            raise ValueError(f"h, w: a {h}x{w} map with padding {cfg.padding} is smaller than "
                             f"the {k}x{k} kernel")
        if uses_batch_stats(training, params):
            per_channel = x.shape[0] * cfg.out_size(h) * cfg.out_size(w)
            if per_channel <= 1:
                raise ValueError(
                    f"x: BatchNorm in training mode needs more than 1 value per channel, got "
                    f"{per_channel} (batch {x.shape[0]}, {cfg.out_size(h)}x{cfg.out_size(w)} "
                    f"map); use eval mode or a larger batch")
        for name in ("running_mean", "running_var"):
            stat = getattr(params, name)
            if stat is not None and stat.shape != (channels,):
                raise ValueError(f"{name}: expected shape ({channels},), got {tuple(stat.shape)}")
        check_same(x, "x", [("running_mean", params.running_mean),
                            ("running_var", params.running_var),
                            ("num_batches_tracked", params.num_batches_tracked)], dtype=False)
    check_same(x, "x", named)


# ----------------------------------------------------------------------------- custom ops
# Two ops, as the fused kernels run it. Pass 1 (``conv_projection_stats``): the batch mean
# and rstd, and in training ``nn.BatchNorm2d``'s update of the running statistics, in place,
# inside the op (declared in ``mutates_args``; the triton kernels do it on the device, so no
# stock ops run beside them). Pass 2 (``conv_projection``: normalize + Linear,
# differentiable) takes the statistics as constants: with ``batch_stats`` the batch's
# ``mean``/``rstd`` (its backward is BatchNorm's training backward, which accounts for
# their dependence on ``x``), else (eval) ``running_mean``/``running_var`` with ``eps``,
# which the backend reads as they are at this call.


def _stats(x: Tensor, conv_weight: Tensor, h: int, w: int, kernel_size: int, stride: int,
           padding: int, with_cls_token: bool, backend: str, running_mean: Optional[Tensor],
           running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
           momentum: Optional[float] = 0.1, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """The batch ``(mean, rstd)``; given any running buffer (training), the update too.
    The mutated buffers take no default (``_register.forward_op`` says why)."""
    cfg = ProjectionConfig("dw_bn", kernel_size, stride, padding, with_cls_token)
    params = ProjectionParams(conv_weight, None, None, running_mean, running_var,
                              num_batches_tracked, None, None)
    update = not (running_mean is None and running_var is None and num_batches_tracked is None)
    with no_autocast(x):
        mean, rstd = backends.get_backend(backend).conv_projection_batch_stats(
            x, h, w, params, cfg, update, momentum, eps)
    return mean.contiguous(), rstd.contiguous()


def _forward(x: Tensor, conv_weight: Optional[Tensor], bn_weight: Optional[Tensor],
             bn_bias: Optional[Tensor], mean: Optional[Tensor], rstd: Optional[Tensor],
             proj_weight: Tensor, proj_bias: Optional[Tensor], h: int, w: int, method: str,
             kernel_size: int, stride: int, padding: int, with_cls_token: bool,
             batch_stats: bool, backend: str, running_mean: Optional[Tensor] = None,
             running_var: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    params = ProjectionParams(conv_weight, bn_weight, bn_bias, running_mean, running_var, None,
                              proj_weight, proj_bias)
    cfg = ProjectionConfig(method, kernel_size, stride, padding, with_cls_token)
    # Outputs are contiguous, as the fake implementations promise torch.compile.
    with no_autocast(x):
        return backends.get_backend(backend).conv_projection_forward(
            x, h, w, params, mean, rstd, cfg, eps).contiguous()


def _backward_impl(grad_out: Tensor, x: Tensor, conv_weight: Optional[Tensor],
                   bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   mean: Optional[Tensor], rstd: Optional[Tensor], proj_weight: Tensor,
                   proj_bias: Optional[Tensor], h: int, w: int, method: str, kernel_size: int,
                   stride: int, padding: int, with_cls_token: bool, batch_stats: bool,
                   backend: str, running_mean: Optional[Tensor] = None,
                   running_var: Optional[Tensor] = None, eps: float = 1e-5
                   ) -> List[Optional[Tensor]]:
    params = ProjectionParams(conv_weight, bn_weight, bn_bias, running_mean, running_var, None,
                              proj_weight, proj_bias)
    cfg = ProjectionConfig(method, kernel_size, stride, padding, with_cls_token)
    with no_autocast(x):
        grads = backends.get_backend(backend).conv_projection_backward(
            grad_out, x, h, w, params, mean, rstd, cfg, batch_stats, eps)
    return [g.contiguous() if g is not None else None for g in grads]


def _stats_fake(x, conv_weight, h, w, kernel_size, stride, padding, with_cls_token, backend,
                running_mean, running_var, num_batches_tracked, momentum=0.1, eps=1e-5):
    mean = x.new_empty((x.shape[2],), dtype=stat_dtype(x.dtype))
    return mean, torch.empty_like(mean)


_conv_projection_stats_op = forward_op(
    "conv_projection_stats", _stats, _stats_fake,
    mutates_args=("running_mean", "running_var", "num_batches_tracked")).op


def _forward_fake(x, conv_weight, bn_weight, bn_bias, mean, rstd, proj_weight, proj_bias, h, w,
                  method, kernel_size, stride, padding, with_cls_token, batch_stats, backend,
                  running_mean=None, running_var=None, eps=1e-5):
    cfg = ProjectionConfig(method, kernel_size, stride, padding, with_cls_token)
    tokens = cfg.out_size(h) * cfg.out_size(w) + (1 if with_cls_token else 0)
    return x.new_empty((x.shape[0], tokens, proj_weight.shape[0]))


def _backward_fake(grad_out, x, conv_weight, bn_weight, bn_bias, mean, rstd, proj_weight,
                   proj_bias, h, w, method, kernel_size, stride, padding, with_cls_token,
                   batch_stats, backend, running_mean=None, running_var=None, eps=1e-5):
    def like(t: Optional[Tensor]) -> Tensor:
        return t.new_empty(t.shape) if t is not None else x.new_empty((0,))

    return [like(x), like(conv_weight), like(bn_weight), like(bn_bias), like(proj_weight),
            like(proj_bias)]


# The forward op's arguments: 8 tensors (saved for the backward), 9 constants (h, w, method,
# kernel_size, stride, padding, with_cls_token, batch_stats, backend), then the running
# buffers (saved too: an eval-mode backward reads them again) and eps. (Appended with
# defaults: a call written before them still binds. Tensor arguments of a custom op cannot
# be keyword-only.)
_SAVED, _CONSTANTS, _RUNNING, _EPS = slice(0, 8), slice(8, 17), slice(17, 19), 19
_DIFFERENTIABLE = (0, 1, 2, 3, 6, 7)  # x, conv_weight, bn_weight, bn_bias, proj_weight, proj_bias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[_SAVED], *inputs[_RUNNING])
    ctx.constants = inputs[_CONSTANTS]
    ctx.eps = inputs[_EPS]
    ctx.n_inputs = len(inputs)


def _formula(backward_op):
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        tensors, (running_mean, running_var) = saved[:8], saved[8:]
        grads = backward_op(grad_out.contiguous(), *tensors, *ctx.constants,
                            running_mean=running_mean, running_var=running_var, eps=ctx.eps)
        out = [None] * ctx.n_inputs
        for g, i in zip(grads, _DIFFERENTIABLE):
            if tensors[i] is not None and ctx.needs_input_grad[i]:
                out[i] = g
        return tuple(out)
    return backward


_REGISTERED = differentiable_op("conv_projection", _forward, _forward_fake, _backward_impl,
                                _backward_fake, _setup_context, _formula,
                                "_ConvProjectionFunction")
_conv_projection_op, _ConvProjectionFunction = _REGISTERED.op, _REGISTERED.twin


# ------------------------------------------------------------------------ public function
def conv_projection(x: Tensor, h: int, w: int, params: ProjectionParams,
                    cfg: ProjectionConfig = ProjectionConfig(), training: bool = False,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5) -> Tensor:
    """One convolutional projection of CvT attention, ``(B, T, C_in) -> (B, T', C_out)``:
    ``Linear(flatten(BatchNorm(depthwise_conv(x as a (B, C_in, h, w) map))))``.

    Arguments:
        x: ``(B, T, C_in)`` tokens, row-major over the ``h x w`` map (token ``i*w + j`` is
            pixel ``(i, j)``): ``T = h*w``, or ``1 + h*w`` when ``cfg.with_cls_token`` (the
            class token is token 0; it skips the conv and BatchNorm and goes through the
            Linear alone). Token-major, as a ``Linear`` produces it; no ``(B, C, h, w)``
            map goes in or comes out. Any strides are accepted.
        h, w: the map's height and width (positive ints).
        params: the tensors (:class:`~cvt_kernels.backends.ProjectionParams`):
            ``conv_weight`` ``(C_in, 1, k, k)`` (depthwise, no bias), BatchNorm's
            ``bn_weight``/``bn_bias`` ``(C_in,)`` (or ``None``: no affine),
            ``running_mean``/``running_var`` ``(C_in,)`` and ``num_batches_tracked`` (or
            ``None``: batch statistics always), ``proj_weight`` ``(C_out, C_in)`` and
            ``proj_bias`` ``(C_out,)`` or ``None``. For ``method`` ``"avg"``/``"linear"``
            only the last two.
        cfg: :class:`~cvt_kernels.backends.ProjectionConfig`: ``method`` (``"dw_bn"``,
            CvT's; ``"avg"``; ``"linear"``), ``kernel_size``, ``stride``, ``padding``,
            ``with_cls_token``.
        training: BatchNorm uses the batch's statistics and updates ``running_mean``,
            ``running_var`` (unbiased) and ``num_batches_tracked`` in place, exactly as
            ``nn.BatchNorm2d`` in training mode (it needs more than one value per channel);
            ``False``: the running statistics.
        momentum, eps: as ``nn.BatchNorm2d``'s (``momentum=None``: cumulative average).

    Dtypes: float16, bfloat16, float32 or float64; ``x`` and the weights alike (under
    autocast the conv and Linear run in its dtype, as eager does); every tensor on ``x``'s
    device (CPU or CUDA). BatchNorm statistics are computed in float32 (float64 for
    float64) whatever the input dtype.

    Returns:
        ``(B, T', C_out)`` in ``x``'s dtype (the autocast dtype under autocast), with
        ``T' = h'*w'`` (``+1`` with the class token), ``h' = (h + 2*padding - k) // stride
        + 1`` for ``"dw_bn"``; differentiable with respect to ``x`` and every weight.

    Raises ``TypeError``/``ValueError``/``RuntimeError`` naming the argument before anything
    runs or any running statistic moves; a forced backend that cannot run the call raises
    ``BackendUnavailableError`` with its reasons.
    """
    validate_conv_projection(x, h, w, params, cfg, training)
    return run_conv_projection(x, h, w, params, cfg, training, momentum, eps)


def run_conv_projection(x: Tensor, h: int, w: int, params: ProjectionParams,
                        cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                        eps: float) -> Tensor:
    """:func:`conv_projection` for inputs already validated (the module checks q, k and v
    before running any of them, so a bad call changes no running statistic)."""
    amp = autocast_dtype(x)
    backend = _choose_backend(x, h, w, params, cfg, training, momentum, eps, amp)
    if backend.composite:  # stock ops: autocast applies to them by itself
        return backend.conv_projection(x, h, w, params, cfg, training, momentum, eps)
    if amp is not None:
        # Custom ops are invisible to autocast: cast as it would for a conv and a Linear.
        # BatchNorm's affine and all statistics stay in float32, as autocast keeps them.
        x = autocast_cast(x, amp)
        params = params._replace(conv_weight=autocast_cast(params.conv_weight, amp),
                                 proj_weight=autocast_cast(params.proj_weight, amp),
                                 proj_bias=autocast_cast(params.proj_bias, amp))

    eager = eager_call(x, params.conv_weight, params.bn_weight, params.bn_bias,
                       params.proj_weight, params.proj_bias)
    batch_stats = cfg.method == "dw_bn" and uses_batch_stats(training, params)
    running_mean = running_var = None
    if cfg.method != "dw_bn":
        mean = rstd = x.new_empty((0,), dtype=stat_dtype(x.dtype))
    elif batch_stats:
        # Pass 1; in training it updates the running statistics too (nothing moves without
        # running buffers and counter, or in eval without running statistics).
        update = ((params.running_mean, params.running_var, params.num_batches_tracked)
                  if training else (None, None, None))
        mean, rstd = (_stats if eager else _conv_projection_stats_op)(
            x.detach(), params.conv_weight.detach(), h, w, cfg.kernel_size, cfg.stride,
            cfg.padding, cfg.with_cls_token, backend.name, running_mean=update[0],
            running_var=update[1], num_batches_tracked=update[2], momentum=momentum, eps=eps)
    else:
        # Eval: the running buffers as they are; the backend derives rstd from them (the
        # triton kernels as they load them, so an eval call is one launch).
        mean = rstd = None
        running_mean, running_var = params.running_mean, params.running_var
    op = _ConvProjectionFunction.call if eager else _conv_projection_op
    return op(
        x, params.conv_weight, params.bn_weight, params.bn_bias, mean, rstd,
        params.proj_weight, params.proj_bias, h, w, cfg.method, cfg.kernel_size, cfg.stride,
        cfg.padding, cfg.with_cls_token, batch_stats, backend.name, running_mean,
        running_var, eps)


# --------------------------------------------------------------------- which backend runs
_LEAVES = ("conv_weight", "bn_weight", "bn_bias", "proj_weight", "proj_bias")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _choose_backend(x: Tensor, h: int, w: int, params: ProjectionParams,
                    cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                    eps: float, amp: Optional[torch.dtype]) -> backends.Backend:
    """A forced backend, else the dispatcher's choice among the backends that can run the
    call (measured on its first call on a GPU: ``cvt_kernels.dispatch``)."""
    planned = _plan.next_choice("conv_projection")  # a module's call plan answers
    if planned is not None:
        return planned

    def ask(b):
        return b.conv_projection_reasons(autocast_cast(x, amp) if not b.composite else x,
                                         cfg, training)

    def signature(grad: bool) -> tuple:
        # Raw values (sizes, dtypes): hashed on every call, turned into text only for the file.
        return (("x", x.shape), ("h", h), ("w", w), ("method", cfg.method),
                ("kernel", cfg.kernel_size), ("stride", cfg.stride), ("padding", cfg.padding),
                ("cls", cfg.with_cls_token), ("c_out", params.proj_weight.shape[0]),
                ("dtype", x.dtype), ("weight_dtype", params.proj_weight.dtype),
                ("training", training), ("batch_stats", uses_batch_stats(training, params)),
                ("momentum", momentum), ("eps", eps), ("grad", grad),
                ("affine", params.bn_weight is not None), ("bn_bias", params.bn_bias is not None),
                ("bias", params.proj_bias is not None))

    def prepare(name: str, truth: bool, grad: bool) -> trials.Run:
        return _prepare_trial(name, x, h, w, params, cfg, training, momentum, eps, grad,
                              amp or x.dtype, truth)

    inputs = (("x", x),) + tuple((k, getattr(params, k)) for k in _LEAVES)
    return choose_backend(
        "conv_projection", ask, (x.device, x.dtype, amp, cfg, training), inputs, None,
        signature, amp or x.dtype, x.device, prepare=prepare)


def _prepare_trial(name: str, x: Tensor, h: int, w: int, params: ProjectionParams,
                   cfg: ProjectionConfig, training: bool, momentum: Optional[float],
                   eps: float, grad: bool, dtype: torch.dtype, truth: bool) -> trials.Run:
    """A run of one call on backend ``name`` (the truth: ``torch`` in float64) on copies:
    the output, with ``grad`` the gradients of x and every parameter, and the running
    statistics after the call (the module's own statistics and counter do not move)."""
    start = time.perf_counter()
    to = trials.TRUTH_DTYPE if truth else None
    xc = trials.copy_input(x, to, True, grad)
    leaves = {k: trials.copy_input(getattr(params, k), to, True, grad) for k in _LEAVES}
    stats = {k: trials.copy_input(getattr(params, k), to, False, grad) for k in _STATS}
    copied = params._replace(**leaves, **stats)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)

    def forward(xc_, *_leaves):
        return run_conv_projection(xc_, h, w, copied, cfg, training, momentum, eps)

    def extra():
        return {k: stats[k].clone() for k in ("running_mean", "running_var")
                if stats[k] is not None and training}

    return trials.Run(lambda: trial_context(name, truth, x.device), forward,
                      [xc] + [leaves[k] for k in _LEAVES], ("x",) + _LEAVES, ("out",), grad,
                      dtype, extra=extra, harness_ms=1e3 * (time.perf_counter() - start),
                      candidate="truth" if truth else name)
