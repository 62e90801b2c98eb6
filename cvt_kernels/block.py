"""``FusedBlock``: CvT's transformer block on the fused ops (``accelerate(model, scope="block")``).

The reference block::

    x = x + drop_path(attn(norm1(x), h, w))
    x = x + drop_path(mlp(norm2(x)))           # mlp = fc2(QuickGELU(fc1(.)))

on the ops: :func:`cvt_kernels.ops.layer_norm` for both norms (float32 statistics,
input-dtype I/O), :class:`~cvt_kernels.FusedConvAttention` for the attention and
:func:`cvt_kernels.ops.mlp` for the MLP. The residual adds go into the GEMMs that precede
them (the attention's output projection, the ``linear`` op; fc2), and so does CvT's drop
path when it is on (training): its per-sample factor is applied in those GEMMs' epilogues
(forward) and to the incoming gradient (backward), with the random draws ``DropPath``
would make, in its order. A drop-path module of another kind (active) keeps the module:
the first add is then fused with norm2 (:func:`cvt_kernels.ops.add_layer_norm`). A
submodule the ops cannot run (another activation or norm, MLP dropout in training) runs
as the module it is.

:class:`FusedLayerNorm` puts the model's other float32 LayerNorms (the stage norms: each
stage's token embedding, the final norm) on the ``layer_norm`` op too
(``accelerate(scope="block")`` replaces them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import _plan, backends
from .backends.base import eager_call, uses_batch_stats
from .block_train import direct_train_for
from .models.cvt import Attention, Block, DropPath, LayerNorm, Mlp, QuickGELU
from .modules import AttentionArgs, FusedConvAttention, Linear, fused_attention, linear_of
from .ops._checks import autocast_dtype, check_tensor
from .ops.layer_norm import run_layer_norm, validate_layer_norm
from .ops.mlp import run_mlp, run_norm_mlp, validate_mlp
from .ops.one_pass import kept_path, one_pass_reasons, run_one_pass

__all__ = ["BlockArgs", "FusedBlock", "FusedLayerNorm", "block_args", "block_forward",
           "direct_eval", "direct_eval_for", "direct_eval_one_pass", "direct_for",
           "drop_path_active", "fused_drop_prob", "layer_norm_of", "mlp_activation"]


def layer_norm_of(norm: nn.Module) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], float]]:
    """``(weight, bias, eps)`` of a LayerNorm over the last axis (``nn.LayerNorm`` or the
    reference's float32 ``LayerNorm``, which compute the same), else ``None``."""
    if type(norm) in _STOCK_LAYER_NORMS and len(norm.normalized_shape) == 1:
        # Read from the dict: nn.Module.__getattr__ costs a call plan ~1 us a read.
        params = norm._parameters
        return params.get("weight"), params.get("bias"), norm.eps
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps  # a subclass may define them otherwise
    return None


_STOCK_LAYER_NORMS = (nn.LayerNorm, LayerNorm)


def mlp_activation(act: nn.Module) -> Optional[str]:
    """The ``mlp`` op's name for an activation module, or ``None`` when it has none."""
    if type(act) is QuickGELU:
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def dropout_active(drop: nn.Module) -> bool:
    return isinstance(drop, nn.Dropout) and drop.training and drop.p > 0


def drop_path_active(drop_path: nn.Module) -> bool:
    """Whether ``drop_path`` may change its input (an unknown module: assume it may)."""
    if isinstance(drop_path, nn.Identity):
        return False
    prob = getattr(drop_path, "drop_prob", None)
    if prob is None:
        return True
    return bool(drop_path.training and prob > 0)


def fused_drop_prob(drop_path: nn.Module) -> Optional[float]:
    """The drop probability the ops apply in a GEMM's epilogue for ``drop_path``: 0 when
    it changes nothing, CvT's ``DropPath``'s when active; ``None`` for an active module of
    another kind (it runs as itself)."""
    if type(drop_path) is DropPath:
        return float(drop_path.drop_prob) if drop_path_active(drop_path) else 0.0
    return None if drop_path_active(drop_path) else 0.0


def norm(norm_module: nn.Module, x: Tensor, residual: Optional[Tensor] = None
         ) -> Tuple[Tensor, Tensor]:
    """``(norm(s), s)`` with ``s = x + residual`` (or ``x``): the op when the module is a
    LayerNorm, else the module itself."""
    args = layer_norm_of(norm_module)
    if args is None:
        s = x if residual is None else x + residual
        return norm_module(s), s
    weight, bias, eps = args
    validate_layer_norm(x, weight, bias, eps, residual)
    y, s = run_layer_norm(x, residual, weight, bias, eps)
    return y, (x if s is None else s)


class BlockArgs(NamedTuple):
    """What :func:`block_forward` reads of a block besides ``x, h, w``: each LayerNorm's
    ``(weight, bias, eps)``, the drop probability the GEMMs apply (0: none), the MLP's
    activation and Linear layers, and the attention's arguments."""
    norm1: Tuple[Optional[Tensor], Optional[Tensor], float]
    norm2: Tuple[Optional[Tensor], Optional[Tensor], float]
    drop_prob: float
    act: str
    fc1: Linear
    fc2: Linear
    attn: AttentionArgs


def block_args(norm1: nn.Module, attn_args: Optional[AttentionArgs], drop_path: nn.Module,
               norm2: nn.Module, fc1: nn.Module, act: nn.Module, fc2: nn.Module,
               dropouts: Tuple[nn.Module, ...]) -> Optional[BlockArgs]:
    """A block's :class:`BlockArgs` from its parts (the reference's and transformers'
    name them differently), or ``None`` where :func:`block_forward` cannot run it (a norm
    other than a LayerNorm over the last axis, another activation, an active drop path of
    another kind than CvT's, an active MLP dropout): the module's general forward then."""
    ln1, ln2, name = layer_norm_of(norm1), layer_norm_of(norm2), mlp_activation(act)
    drop_prob = fused_drop_prob(drop_path)
    if (ln1 is None or ln2 is None or name is None or drop_prob is None or attn_args is None
            or not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear)
            or any(dropout_active(d) for d in dropouts)):
        return None
    return BlockArgs(ln1, ln2, drop_prob, name, linear_of(fc1), linear_of(fc2), attn_args)


def block_forward(x: Tensor, h: int, w: int, args: BlockArgs, checked: bool = True) -> Tensor:
    """``x + drop_path(attn(norm1(x)))``, then ``+ drop_path(mlp(norm2(.)))``, on the ops:
    the forward ``FusedBlock`` and the Hugging Face ``FusedHFCvtLayer`` share (through
    their call plans, :mod:`cvt_kernels._plan`). ``checked=False``: the arguments passed
    every check before, for the same signature."""
    # What stays outside the kernels on the triton backend (benchmarks.step_cost):
    # drop path's draws in training (one rand each: DropPath's own draw, so the masks
    # are the reference's; ops/_drop_path.py), and in the backward two adds a block
    # where autograd sums the residual stream's gradients: x feeds norm1 and the
    # projection's skip connection, x + attn feeds norm2 and fc2's. Folding them into
    # the LayerNorm backward (its grad_sum) needs the block as one autograd node.
    (w1, b1, eps1), (w2, b2, eps2) = args.norm1, args.norm2
    fc1, fc2, act, drop_prob = args.fc1, args.fc2, args.act, args.drop_prob
    a = args.attn
    if checked:
        check_tensor(x, "x", ndim=3)
        validate_layer_norm(x, w1, b1, eps1)
    normed = run_layer_norm(x, None, w1, b1, eps1)[0]
    eval_path = (drop_prob == 0.0 and not torch.is_grad_enabled() and w2 is not None
                 and b2 is not None)
    x = fused_attention(normed, h, w, a.projections, a.num_heads, a.scale, a.dropout_p,
                        a.proj, residual=x, drop_prob=0.0 if eval_path else drop_prob,
                        checked=checked)
    if eval_path:
        # Eval: norm2 in fc1's prologue (ops.mlp.run_norm_mlp), both skip connections
        # in the GEMMs before them.
        if checked:
            validate_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, x)
        return run_norm_mlp(x, w2, b2, eps2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act,
                            x, checked=checked)
    if checked:
        validate_layer_norm(x, w2, b2, eps2)
    normed = run_layer_norm(x, None, w2, b2, eps2)[0]
    if checked:
        validate_mlp(normed, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, x)
    return run_mlp(normed, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, x, drop_prob)


# What block_forward's eval call chooses, in order, when every op is one kernel backend's
# and the one-pass path is off (the choices a plan records).
_EVAL_OPS = ("layer_norm", "conv_projection", "conv_projection", "conv_projection",
             "attention", "linear", "norm_mlp")
# The same where the one-pass kernel serves q's projection and the attention (it is no
# choice of an op: the triton backend's kernel, chosen by CVT_KERNELS_ONE_PASS or the
# dispatcher's kept decision).
_EVAL_OPS_ONE_PASS = ("layer_norm", "conv_projection", "conv_projection", "norm_mlp")


def direct_eval_for(choices: tuple, x: Tensor, h: int, w: int,
                    args: BlockArgs) -> Optional[functools.partial]:
    """A call plan's direct path (:func:`cvt_kernels._plan.run`): :func:`direct_eval` on
    the chosen backend when the recorded call is block_forward's eval call with every op
    on that one kernel backend and the separate kernels serve its attention,
    :func:`direct_eval_one_pass` where the one-pass kernel does (the triton backend), else
    ``None`` (the plan replays ``block_forward``). Asked once per plan:
    everything read here is part of the plan's key (grad mode, autocast, one-pass policy,
    forced backend and generation in its state; tensor types, shapes, dtypes, training
    flags and settings in its signature)."""
    names = {name for _, name in choices}
    ops = tuple(op for op, _ in choices)
    if ops not in (_EVAL_OPS, _EVAL_OPS_ONE_PASS) or len(names) != 1:
        return None
    backend = backends.get_backend(names.pop())
    a = args.attn
    if (backend.composite or not hasattr(backend, "norm_mlp_forward")
            or torch.is_grad_enabled() or autocast_dtype(x) is not None
            or args.drop_prob != 0.0 or a.dropout_p != 0.0
            or args.norm2[0] is None or args.norm2[1] is None):
        return None
    for params, cfg, training, _, _ in a.projections:
        if (cfg.method != "dw_bn" or uses_batch_stats(training, params)
                or params.running_mean is None or params.running_var is None):
            return None
    tensors = [x, *args.norm1[:2], *args.norm2[:2], *args.fc1, *args.fc2, *a.proj]
    for p in a.projections:
        tensors += p.params
    if not eager_call(*tensors):
        return None
    # (x stands for the attention's input, norm1's output: same shape, dtype and device.)
    path = "separate"
    if not one_pass_reasons(x, list(a.projections), a.num_heads, a.dropout_p, a.proj):
        # The one-pass kernel is a candidate here: direct where the path that serves is
        # fixed (CVT_KERNELS_ONE_PASS=1, or the dispatcher's kept choice, remembered until
        # dispatch.clear bumps the plans' generation) and is the path the plan recorded.
        k_params, k_cfg = a.projections[1][:2]
        k_shape = torch.Size((x.shape[0], k_cfg.out_size(h) * k_cfg.out_size(w)
                              + int(k_cfg.with_cls_token), k_params.proj_weight.shape[0]))
        path = kept_path(x, h, w, a.num_heads, a.proj.weight.shape[1], k_shape)
    if path == "separate" and ops == _EVAL_OPS:
        return functools.partial(direct_eval, backend.name)
    if path == "one-pass" and ops == _EVAL_OPS_ONE_PASS and backend.name == "triton":
        return functools.partial(direct_eval_one_pass, backend.name)
    return None


def direct_for(choices: tuple, x: Tensor, h: int, w: int,
               args: BlockArgs) -> Optional[functools.partial]:
    """A call plan's direct path (:func:`cvt_kernels._plan.run`): with autograd recording,
    the training call as one autograd node (:func:`cvt_kernels.block_train.direct_train_for`),
    else :func:`direct_eval_for`; ``None`` where the plan replays ``block_forward``."""
    if torch.is_grad_enabled():
        return direct_train_for(choices, x, h, w, args)
    return direct_eval_for(choices, x, h, w, args)


def direct_eval(backend_name: str, x: Tensor, h: int, w: int, args: BlockArgs) -> Tensor:
    """block_forward's eval call (no autograd, no autocast, running statistics, separate
    attention kernels) with every op on the kernel backend ``backend_name``: the backend
    functions the ops would call, in their order, with their arguments, each output made
    contiguous as the ops make it (so the numbers are the ops' bit for bit, tests/test_plan.py), and
    none of the op layer around them (choices, autocast and eager-mode checks: a plan's
    key already fixed their answers)."""
    kernels = backends.get_backend(backend_name)
    (w1, b1, eps1), (w2, b2, eps2) = args.norm1, args.norm2
    a = args.attn
    normed = kernels.layer_norm_forward(x, None, w1, b1, float(eps1))[0].contiguous()
    q, k, v = (kernels.conv_projection_forward(normed, h, w, params, None, None, cfg,
                                               eps).contiguous()
               for params, cfg, _, _, eps in a.projections)
    out = kernels.attention_forward(q, k, v, a.num_heads, float(a.scale))[0].contiguous()
    x = kernels.linear_forward(out, a.proj.weight, a.proj.bias, x, drop_rand=None,
                               keep_prob=1.0).contiguous()
    return kernels.norm_mlp_forward(x, w2, b2, float(eps2), args.fc1.weight, args.fc1.bias,
                                    args.fc2.weight, args.fc2.bias, args.act, x).contiguous()


def direct_eval_one_pass(backend_name: str, x: Tensor, h: int, w: int,
                         args: BlockArgs) -> Tensor:
    """:func:`direct_eval` where the one-pass kernel serves q's projection and the
    attention (``cvt_kernels.ops.one_pass``): norm1, k and v's projections, the one-pass
    call (and its output projection, in it for one head), the skip connection's add, then
    norm2 and the MLP, as ``fused_attention`` and ``block_forward`` run them."""
    kernels = backends.get_backend(backend_name)
    (w1, b1, eps1), (w2, b2, eps2) = args.norm1, args.norm2
    a = args.attn
    normed = kernels.layer_norm_forward(x, None, w1, b1, float(eps1))[0].contiguous()
    k, v = (kernels.conv_projection_forward(normed, h, w, params, None, None, cfg,
                                            eps).contiguous()
            for params, cfg, _, _, eps in a.projections[1:])
    x = x + run_one_pass(normed, h, w, a.projections[0], k, v, a.num_heads, a.scale, a.proj)
    return kernels.norm_mlp_forward(x, w2, b2, float(eps2), args.fc1.weight, args.fc1.bias,
                                    args.fc2.weight, args.fc2.bias, args.act, x).contiguous()


def mlp_call(fc1: nn.Linear, fc2: nn.Linear, act: str, x: Tensor,
             residual: Optional[Tensor], drop_prob: float = 0.0) -> Tensor:
    validate_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, residual)
    return run_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, residual, drop_prob)


class FusedBlock(Block):
    """Drop-in for :class:`cvt_kernels.models.Block` (the reference CvT block).

    Same submodules (``norm1``, ``attn``, ``drop_path``, ``norm2``, ``mlp``), parameters,
    buffers and state_dict keys; ``attn`` is a :class:`~cvt_kernels.FusedConvAttention`.
    ``forward(x, h, w)``: ``x`` ``(B, h*w [+1], C)``, returns the same shape and dtype,
    with the reference block's numbers (float64 tests: outputs, gradients, BatchNorm
    running statistics) and the same random draws of drop path, in the same order.
    """

    @classmethod
    def from_reference(cls, block: Block) -> "FusedBlock":
        """A ``FusedBlock`` sharing ``block``'s submodules (its attention made a
        ``FusedConvAttention`` over the same parameters), with the same train/eval state."""
        if not isinstance(block, Block):
            raise TypeError(f"block: expected a cvt_kernels.models.Block, got "
                            f"{type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.with_cls_token = block.with_cls_token
        for name, child in block.named_children():  # the reference's order: same keys
            if name == "attn" and type(child) is Attention:
                child = FusedConvAttention.from_reference(child)
            setattr(new, name, child)
        new.training = block.training  # not .train(): that would also flip shared children
        return new

    def plan_args(self) -> Optional[BlockArgs]:
        """:func:`block_forward`'s arguments read from the submodules now (``None``: the
        general forward runs the call)."""
        # Submodules read from the dicts (nn.Module.__getattr__: ~1 us a read); a missing
        # one makes block_args decline and the general forward say what is wrong.
        modules = self._modules
        attn, mlp = modules.get("attn"), modules.get("mlp")
        if not isinstance(attn, FusedConvAttention) or type(mlp) is not Mlp:
            return None
        parts = mlp._modules
        return block_args(modules.get("norm1"), attn.plan_args(), modules.get("drop_path"),
                          modules.get("norm2"), parts.get("fc1"), parts.get("act"),
                          parts.get("fc2"), (parts.get("drop"),))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        # The submodules' settings are read on every call (none is cached: modules can be
        # changed or replaced between calls); checks and backend choices are made once per
        # signature of what was read (the module's call plan, cvt_kernels._plan).
        args = self.plan_args()
        if args is not None:
            return _plan.run(self, x, h, w, args, block_forward, direct_for)
        return self.forward_general(x, h, w)

    def forward_general(self, x: Tensor, h: int, w: int) -> Tensor:
        """The forward for submodules :func:`block_forward` cannot run (each module that is
        not an op's runs as itself), checked and dispatched on every call."""
        check_tensor(x, "x", ndim=3)
        normed, _ = norm(self.norm1, x)
        drop_prob = fused_drop_prob(self.drop_path)
        mlp = self.mlp
        act = (mlp_activation(mlp.act) if isinstance(mlp, Mlp)
               and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear) else None)
        norm2 = layer_norm_of(self.norm2)
        if (drop_prob == 0.0 and not torch.is_grad_enabled() and act is not None
                and not dropout_active(mlp.drop) and isinstance(self.attn, FusedConvAttention)
                and norm2 is not None and norm2[0] is not None and norm2[1] is not None):
            # Eval: norm2 in fc1's prologue (ops.mlp.run_norm_mlp), both skip connections
            # in the GEMMs before them.
            x = self.attn.forward_residual(normed, h, w, x)
            validate_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, act, x)
            return run_norm_mlp(x, norm2[0], norm2[1], norm2[2], mlp.fc1.weight, mlp.fc1.bias,
                                mlp.fc2.weight, mlp.fc2.bias, act, x)
        if drop_prob is not None and isinstance(self.attn, FusedConvAttention):
            x = self.attn.forward_residual(normed, h, w, x, drop_prob)
            normed, _ = norm(self.norm2, x)
        else:
            # x + drop_path(attn): the add is commutative in IEEE arithmetic, bit for bit.
            normed, x = norm(self.norm2, self.drop_path(self.attn(normed, h, w)), x)
        if act is None or dropout_active(mlp.drop):
            return x + self.drop_path(mlp(normed))
        if drop_prob is None:
            return x + self.drop_path(mlp_call(mlp.fc1, mlp.fc2, act, normed, None))
        return mlp_call(mlp.fc1, mlp.fc2, act, normed, x, drop_prob)


class FusedLayerNorm(LayerNorm):
    """Drop-in for the reference's float32 :class:`cvt_kernels.models.LayerNorm` on the
    ``layer_norm`` op: one launch where the reference casts the activations (and, for a
    half-precision model, the affine) to float32 and back around ``F.layer_norm`` (three
    to five launches and a float32 copy of the activations each way). Same parameters
    (shared with the module it was made from), state_dict keys and numbers (float32
    statistics and affine, rounded once to the input's dtype). Where the op does not take
    the call (autocast on, whose rules the reference's casts follow; a normalized shape of
    more than one axis; an affine dtype other than the input's or float32) it runs the
    reference's forward."""

    @classmethod
    def from_reference(cls, norm_module: LayerNorm) -> "FusedLayerNorm":
        if not isinstance(norm_module, nn.LayerNorm):
            raise TypeError(f"norm_module: expected a cvt_kernels.models.LayerNorm, got "
                            f"{type(norm_module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = norm_module.normalized_shape
        new.eps = norm_module.eps
        new.elementwise_affine = norm_module.elementwise_affine
        for name in ("weight", "bias"):  # the same Parameter objects: same keys, order
            new.register_parameter(name, getattr(norm_module, name))
        new.training = norm_module.training
        return new

    def _op_takes(self, x: Tensor) -> bool:
        if (not isinstance(x, Tensor) or len(self.normalized_shape) != 1
                or x.ndim < 1 or x.shape[-1] != self.normalized_shape[0]
                or autocast_dtype(x) is not None):
            return False
        half = (torch.float16, torch.bfloat16)
        allowed = (x.dtype, torch.float32) if x.dtype in half else (x.dtype,)
        return all(p is None or (p.dtype in allowed and p.device == x.device)
                   for p in (self.weight, self.bias))

    def forward(self, x: Tensor) -> Tensor:
        if not self._op_takes(x):
            return super().forward(x)
        validate_layer_norm(x, self.weight, self.bias, self.eps)
        return run_layer_norm(x, None, self.weight, self.bias, self.eps)[0]
