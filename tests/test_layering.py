"""The fused modules import one way: modules <- block <- hf <- acceleration (accelerate()),
and every public name stays importable from where it was."""

import ast
from pathlib import Path

import cvt_kernels

PACKAGE = Path(cvt_kernels.__file__).parent
ORDER = ("modules", "block", "hf", "acceleration")


def _imports(name: str, source=None):
    """(imported module, enclosing function or None) for each relative import in name.py."""
    tree = ast.parse(source if source is not None else (PACKAGE / f"{name}.py").read_text())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef) else function
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                targets = [child.module] if child.module else [a.name for a in child.names]
                found.extend((t.split(".")[0], function) for t in targets)
            visit(child, inner)

    visit(tree, None)
    return found


def test_layering_is_one_way():
    for i, name in enumerate(ORDER):
        above = set(ORDER[i + 1:])
        upward = [(t, f) for t, f in _imports(name) if t in above]
        # modules.__getattr__ resolves the old name cvt_kernels.modules.accelerate lazily.
        allowed = [("acceleration", "__getattr__")] if name == "modules" else []
        assert upward == allowed, f"{name}.py imports {upward}"


def test_public_names_stay_importable():
    from cvt_kernels import FusedBlock, FusedConvAttention, accelerate
    from cvt_kernels.acceleration import accelerate as moved
    from cvt_kernels.block import FusedLayerNorm  # noqa: F401
    from cvt_kernels.modules import SCOPES, accelerate as old, fused_attention  # noqa: F401

    assert accelerate is old is moved is cvt_kernels.accelerate
    assert SCOPES == ("attention", "block")
    assert FusedBlock.__module__ == "cvt_kernels.block"
    assert FusedConvAttention.__module__ == "cvt_kernels.modules"
