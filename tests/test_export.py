"""torch.export of an accelerated CvT in eval mode (attention and block scope): the exported
program computes what the model computes, survives save/load, and holds our custom ops when
a kernel backend runs."""

import copy
import io

import pytest
import torch

import cvt_kernels
from cvt_kernels import models

from conftest import CPU_BACKENDS, randomize_bn

NARROW = {"DIM_EMBED": [8, 16, 24], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 1]}


@pytest.mark.parametrize("scope", ["attention", "block"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_eval_model(backend, scope):
    torch.manual_seed(0)
    eager = models.cvt_13(num_classes=5, img_size=32, spec_overrides=NARROW).eval()
    randomize_bn(eager)
    fused, n = cvt_kernels.accelerate(copy.deepcopy(eager), scope=scope)
    assert n == 3
    x = torch.randn(2, 3, 32, 32)
    # The dispatcher's choice is made while tracing: the exported program keeps it.
    with cvt_kernels.use_backend(backend):
        program = torch.export.export(fused, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    if backend == "reference":  # a kernel backend: our torch.library ops, opaque to export
        ours = {"cvt_kernels.conv_projection.default", "cvt_kernels.attention.default"}
        if scope == "block":
            ours |= {"cvt_kernels.mlp.default", "cvt_kernels.layer_norm.default"}
        assert ours <= targets, targets
    else:  # a composite backend: stock ops, traced through
        assert not any(t.startswith("cvt_kernels.") for t in targets), targets

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = eager(x2)
    torch.testing.assert_close(program.module()(x2), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.module()(x2), expected, rtol=1e-5, atol=1e-5)
