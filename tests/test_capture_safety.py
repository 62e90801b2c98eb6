"""Capture safety on CPU: once an accelerated model has run a call signature, the next call of
the same signature is what a CUDA graph (or ``torch.compile(mode="reduce-overhead")``) can
capture and replay: no host synchronization, no shape that depends on data, no cache filled
and nothing allocated that outlives the call.

Each case runs the same call three times (a tiny CvT, both scopes, eval and a training
forward + backward, the ``torch`` backend and, under ``TRITON_INTERPRET=1``, ``triton``):
the first may decide, compile and cache; the second and third are watched by a
``TorchDispatchMode`` (every aten op, ours and autograd's), and the package's module-level
caches and the modules' own attributes are compared between them."""

from __future__ import annotations

import collections
import copy
import gc
import sys
import weakref
from typing import Dict, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cvt_kernels
from cvt_kernels import models

from conftest import randomize_bn

aten = torch.ops.aten
# Ops that read a device value on the host (a GPU waits there; capture fails), or whose
# output shape depends on data (a capture would bake one shape in).
HOST_SYNC = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
BAD_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape,
            torch.Tag.cudagraph_unsafe)
# CvT-13's kinds of stage (the first without, the last with the class token and drop path)
# in two stages at a width, depth and size the interpreter runs in seconds (maps of 4x4 and
# 2x2; the head reads the last of DIM_EMBED).
TINY = dict(NUM_STAGES=2, DIM_EMBED=[8, 16], NUM_HEADS=[1, 2], DEPTH=[1, 1],
            CLS_TOKEN=[False, True], DROP_PATH_RATE=[0.0, 0.1])
IMG = 16


def _storages(tree) -> set:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor)}


class Watch(TorchDispatchMode):
    """Every aten op of a call: the host syncs and data-dependent ops (with the op), and a
    weak reference to each output that owns new memory (its storage is none of the inputs')."""

    def __init__(self):
        super().__init__()
        self.bad: List[str] = []
        self.new: List[Tuple[str, weakref.ref]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNC or any(tag in func.tags for tag in BAD_TAGS):
            self.bad.append(str(func))
        out = func(*args, **kwargs)
        inputs = _storages((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.new.append((str(func), weakref.ref(t)))
        return out


def _containers(where: str, namespace: dict, snap: Dict[str, object]) -> None:
    for name, value in list(namespace.items()):
        if isinstance(value, dict) and not name.startswith("__"):
            snap[f"{where}.{name}"] = {k: id(v) for k, v in value.items()}
        elif isinstance(value, (set, list)) and not name.startswith("__"):
            snap[f"{where}.{name}"] = (len(value), sorted(id(v) for v in value))


def _package_caches() -> Dict[str, object]:
    """Every container of the package's loaded modules (module-level, class-level, and in
    the objects their dicts hold, such as the registered backends) and every lru_cache, as
    a comparable snapshot: a call that changes one has filled a cache."""
    snap: Dict[str, object] = {}
    loaded = [(n, m) for n, m in list(sys.modules.items())
              if m is not None and (n == "cvt_kernels" or n.startswith("cvt_kernels."))]
    for mod_name, mod in loaded:
        _containers(mod_name, vars(mod), snap)
        for name, value in list(vars(mod).items()):
            where = f"{mod_name}.{name}"
            if isinstance(value, type) and value.__module__ == mod_name:
                _containers(where, dict(vars(value)), snap)
            elif hasattr(value, "cache_info") and getattr(value, "__module__", "") == mod_name:
                snap[where] = value.cache_info().currsize
            elif isinstance(value, dict):
                for key, obj in list(value.items()):
                    if type(obj).__module__.startswith("cvt_kernels") and hasattr(obj,
                                                                                  "__dict__"):
                        _containers(f"{where}[{key!r}]", vars(obj), snap)
    return snap


def _module_state(model: torch.nn.Module) -> Dict[str, tuple]:
    """Each submodule's own attributes (a plan or tensor kept on the module is a cache)."""
    return {name: tuple(sorted((k, id(v)) for k, v in vars(m).items()
                               if k not in ("_parameters", "_buffers", "_modules")))
            for name, m in model.named_modules()}


def _backend_or_skip(backend: str) -> None:
    reason = cvt_kernels.backends.available_backends().get(backend, "not registered")
    if reason:
        pytest.skip(f"{backend} backend: {reason}")


def _model(scope: str, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.cvt_13(num_classes=5, img_size=IMG, spec_overrides=TINY)
    randomize_bn(model)
    return cvt_kernels.accelerate(model, scope=scope)[0].train(train)


def _call(model, x, cot, train: bool):
    """One call as a benchmark step makes it: eval under no_grad, or forward + backward."""
    if not train:
        with torch.no_grad():
            return model(x)
    out = model(x)
    out.backward(cot)
    return out.detach()


# Every scope and mode on the torch backend; triton (the interpreter: ~5-15 s per training
# call even at this size) in eval at both scopes and in training at block scope, whose calls
# run every kernel the attention scope's do (the projections, attention) and the block's.
CASES = ([(scope, train, "torch") for scope in ("attention", "block") for train in (False, True)]
         + [("attention", False, "triton"), ("block", False, "triton"), ("block", True, "triton")])


def check_capture_safe(model: torch.nn.Module, train: bool, backend: str) -> None:
    """Three calls of one signature; the second and third watched (AssertionError naming
    what is wrong)."""
    x = torch.randn(2, 3, IMG, IMG)
    cot = torch.randn(2, 5)
    with cvt_kernels.use_backend(backend):
        _call(model, x, cot, train)  # the first call may decide, compile and cache
        model.zero_grad(set_to_none=True)
        for call in ("second", "third"):
            caches, state = _package_caches(), _module_state(model)
            watch = Watch()
            with watch:
                out = _call(model, x, cot, train)
            del out
            model.zero_grad(set_to_none=True)  # gradients are the step's own outputs
            gc.collect()
            assert not watch.bad, f"{call} call: host syncs / data-dependent ops: {watch.bad}"
            alive = sorted({op for op, ref in watch.new if ref() is not None})
            assert not alive, f"{call} call: tensors that outlive the call, made by {alive}"
    # Around the third call (the second may still settle what the first began):
    after = _package_caches()
    changed = sorted(k for k in set(caches) | set(after) if caches.get(k) != after.get(k))
    assert not changed, f"the third call filled package caches: {changed}"
    assert _module_state(model) == state, "the third call changed the modules' attributes"


@pytest.mark.parametrize("scope,train,backend", CASES,
                         ids=[f"{s}-{'train' if t else 'eval'}-{b}" for s, t, b in CASES])
def test_second_call_is_capture_safe(scope, train, backend):
    """The second and third calls of one signature: no host sync or data-dependent op, no
    package cache or module attribute changed, no tensor allocated that outlives the call."""
    _backend_or_skip(backend)
    check_capture_safe(_model(scope, train), train, backend)


def _sabotage(monkeypatch, how: str) -> None:
    """FusedBlock.forward with one capture hazard added to every call."""
    import cvt_kernels.block as block

    forward = block.FusedBlock.forward
    monkeypatch.setattr(block, "_PROBE_CACHE", {}, raising=False)

    def hazardous(self, x, h, w):
        if how == "sync":
            float(x.sum())
        elif how == "cache":
            block._PROBE_CACHE[len(block._PROBE_CACHE)] = True
        elif how == "kept":
            block._PROBE_CACHE["scale"] = x.abs().amax()
        return forward(self, x, h, w)

    monkeypatch.setattr(block.FusedBlock, "forward", hazardous)


@pytest.mark.parametrize("how,message", [("sync", "host syncs"),
                                         ("cache", "filled package caches"),
                                         ("kept", "outlive the call")])
def test_each_hazard_is_caught(monkeypatch, how, message):
    """The check fails on a model with a host sync, a growing cache, or a tensor kept from a
    call (the hazards it exists to find), each added to the block's forward."""
    _sabotage(monkeypatch, how)
    with pytest.raises(AssertionError, match=message):
        check_capture_safe(_model("block", False), False, "torch")

def test_the_watch_sees_a_sync_a_cache_and_a_kept_tensor():
    """The detectors detect: ``.item()``, ``bool(tensor)``, ``nonzero`` and a tensor kept in
    a dict are each reported."""
    kept = {}
    watch = Watch()
    t = torch.randn(4)
    with watch:
        t.sum().item()
        bool(t[0] > 0)
        t.nonzero()
        kept["x"] = t * 2
        (t + 1).sum()
    gc.collect()
    # bool(t) reaches the dispatcher as is_nonzero's _local_scalar_dense
    assert sum("_local_scalar_dense" in b for b in watch.bad) == 2, watch.bad
    assert any("nonzero" in b and "is_nonzero" not in b for b in watch.bad)
    alive = [op for op, ref in watch.new if ref() is not None]
    assert alive == ["aten.mul.Tensor"], alive


def test_cache_snapshot_sees_a_filled_package_cache(monkeypatch):
    before = _package_caches()
    monkeypatch.setitem(cvt_kernels.backends._SELECTED, ("probe",), "torch")
    after = _package_caches()
    assert after["cvt_kernels.backends._SELECTED"] != before["cvt_kernels.backends._SELECTED"]
    model = copy.deepcopy(_model("block", False))
    state = _module_state(model)
    model.blocks_plan = object()  # what a plan kept on a module would look like
    assert _module_state(model) != state
