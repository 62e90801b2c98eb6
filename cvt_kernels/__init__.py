"""cvt_kernels: fused kernels for the Convolutional vision Transformer (CvT).

``FusedConvAttention`` is a drop-in for CvT's attention module; ``accelerate(model)``
swaps it into an existing model in place. See README.md.

One call, in five steps (``FusedConvAttention.forward``; its attention, for example)::

    1 modules.FusedConvAttention.forward -> fused_attention: checks x and all three
      projections before any runs, then ops.run_conv_projection (q, k, v), ops.attention
    2 ops.attention: validate_attention (errors name the argument), autocast cast
    3 ops._choice.choose_backend: a forced backend (CVT_KERNELS_BACKEND, use_backend) or
      dispatch.decide among the backends that can run it (measured, judged, remembered)
    4 a composite backend (torch) runs as stock ops; a kernel backend through the custom op
      cvt_kernels::attention -> TritonBackend.attention_forward -> the launcher
      backends/triton/attention.py attention_forward (checks, allocates, picks a config)
    5 the @triton.jit kernel _attn_fwd_kernel
    backward, mirrored: autograd -> cvt_kernels::attention_backward -> the same backend's
    attention_backward -> its launcher -> _attn_bwd_dq_kernel, _attn_bwd_dkdv_kernel

Layers, lowest first; a module imports only from its own layer and those listed before it
(``tests/test_layering.py``, which names the one exception left: the old name
``cvt_kernels.modules.accelerate``, resolved lazily)::

    foundation  _version, _build_config, _cli, _cuda_ext, _progress, _double_backward,
                agreement, dispatch_file, _plan_generation
    models      models (the reference CvT), flops
    dispatch    trials, dispatch (measured choice among candidates)
    backends    backends/ (registry, reference + reference_math, torch_ops, triton/, cuda)
    ops         ops/ (validate, choose, custom ops), distributed, _plan (call plans)
    modules     modules (FusedConvAttention)
    block       block (FusedBlock, block_forward shared with the Hugging Face layer; a
                plan's direct paths: direct_eval, block_train's one autograd node a block)
    hf          hf (Hugging Face CvT)
    accelerate  this package root, acceleration (accelerate), info, tune, convert
    benchmarks  benchmarks/ (outside the package; never imported by it)
"""

from ._version import __version__
from . import agreement, backends, dispatch, models, ops  # noqa: E402
from .backends import BackendUnavailableError, use_backend  # noqa: E402
from .modules import FusedConvAttention  # noqa: E402
from .block import FusedBlock  # noqa: E402
from .acceleration import accelerate  # noqa: E402


def accelerate_hf(model, scope: str = "attention"):
    """:func:`cvt_kernels.hf.accelerate_hf`: transformers' CvT (``CvtModel``,
    ``CvtForImageClassification``) on the fused ops, in place; returns ``(model,
    number_replaced)``. Imports ``transformers`` (``import cvt_kernels`` alone does not);
    ``accelerate(model, sync_bn=True)`` handles data-parallel BatchNorm for such models."""
    from .hf import accelerate_hf as impl

    return impl(model, scope=scope)


__all__ = [
    "BackendUnavailableError",
    "FusedBlock",
    "FusedConvAttention",
    "__version__",
    "accelerate",
    "accelerate_hf",
    "agreement",
    "backends",
    "dispatch",
    "models",
    "ops",
    "use_backend",
]
