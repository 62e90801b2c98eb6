"""The package's layers import one way (issue 24: "the house drawn plainly").

Every ``import`` under ``cvt_kernels/`` and ``benchmarks/`` is read with ``ast``: at module
level and inside functions (a lazy import is still a dependency), relative imports resolved,
``from pkg import name`` counted as an import of ``pkg.name`` when that is a module. Each
module belongs to one layer of :data:`LAYERS`; an import may only reach its own layer or one
below, and no two modules may import each other through any chain (a cycle), inside a layer
too. A new module fails here until it is given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cvt_kernels", "benchmarks")

# Lowest first. A module is in the first layer one of whose names is the module itself or a
# package above it. The order is the drawing in cvt_kernels/__init__.py's docstring.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    # Leaves: stdlib/torch only, used from anywhere (build discovery, CLI plumbing, progress
    # lines, double-backward guards, the 2x agreement rule, the decisions file's format).
    ("foundation", ("cvt_kernels._version", "cvt_kernels._build_config", "cvt_kernels._cli",
                    "cvt_kernels._cuda_ext", "cvt_kernels._progress",
                    "cvt_kernels._double_backward", "cvt_kernels.agreement",
                    "cvt_kernels.dispatch_file", "cvt_kernels._plan_generation")),
    # The reference CvT (the parameter holders) and FLOP counts read off its specs.
    ("models", ("cvt_kernels.models", "cvt_kernels.flops")),
    # Measured dispatch: candidates tried, timed and judged, decisions kept. Below the
    # backends: the Triton autotuner reads the decisions cache's switch.
    ("dispatch", ("cvt_kernels.trials", "cvt_kernels.dispatch")),
    # Backends: the registry, the reference math, stock PyTorch, Triton and CUDA launchers
    # and kernels. They know nothing of the ops that call them.
    ("backends", ("cvt_kernels.backends",)),
    # Ops: validation, backend choice, custom ops and autograd around the backends; the
    # process-group glue for the projection's BatchNorm statistics.
    ("ops", ("cvt_kernels.ops", "cvt_kernels.distributed", "cvt_kernels._plan")),
    # nn.Modules on the ops: FusedConvAttention and accelerate(model).
    ("modules", ("cvt_kernels.modules",)),
    # Block scope: LayerNorm + attention + MLP of a CvT block on the ops.
    ("block", ("cvt_kernels.block", "cvt_kernels.block_train")),
    # Hugging Face CvT on the same ops.
    ("hf", ("cvt_kernels.hf",)),
    # What users import and run: the package root (accelerate, accelerate_hf) and the
    # command-line tools (python -m cvt_kernels.info / .tune / .convert).
    ("accelerate", ("cvt_kernels", "cvt_kernels.acceleration", "cvt_kernels.info",
                    "cvt_kernels.tune", "cvt_kernels.convert")),
    # Developer tools on top of everything, never imported by the package: benchmarks, the
    # launch-faithful compile check, result tables.
    ("benchmarks", ("benchmarks",)),
]

# Imports that break the order today, each with why. The lead deletes an entry when the
# change that removes it is merged; an entry that no longer matches an import fails below.
KNOWN_WRONG_WAY: Dict[Tuple[str, str], str] = {
    # The old name cvt_kernels.modules.accelerate, resolved lazily in modules.__getattr__
    # (accelerate() lives in acceleration.py, on top of modules <- block <- hf).
    ("cvt_kernels.modules", "cvt_kernels.acceleration"): "the old public name, lazily",
}
# Cycles inside one layer that are kept, each import named with why.
KNOWN_CYCLE_EDGES: Dict[Tuple[str, str], str] = {
    # A backend asks the registry that constructs it (its parent package) at call time:
    # cuda for the triton backend it borrows attention from, triton for a forced backend.
    ("cvt_kernels.backends.cuda", "cvt_kernels.backends"): "the registry, at call time",
    ("cvt_kernels.backends.triton", "cvt_kernels.backends"): "the registry, at call time",
    # The fused norm+MLP launcher calls the LayerNorm launcher, whose kernel module imports
    # the MLP module's partial-sum kernel. Moving kernels between modules changes the kernel
    # digest the committed compile reports name, so this waits for the next report rerun.
    ("cvt_kernels.backends.triton.mlp", "cvt_kernels.backends.triton.layer_norm"):
        "kernels shared both ways",
}


def module_files() -> Dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: Set[str]) -> str:
    """The longest known module ``name`` is, or is inside (``''``: not ours)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name, known) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else _resolve(base, known))
    found.discard("")
    found.discard(module)  # `from benchmarks.run import main` under __main__
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def layer_of(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise KeyError(module)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    return import_graph()


def test_every_module_has_a_layer(graph):
    missing = []
    for m in graph:
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_imports_go_down_the_layers(graph):
    wrong = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
             for src, targets in sorted(graph.items()) for dst in sorted(targets)
             if layer_of(dst) > layer_of(src) and (src, dst) not in KNOWN_WRONG_WAY]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    allowed = set(KNOWN_WRONG_WAY) | set(KNOWN_CYCLE_EDGES)
    pruned = {src: {dst for dst in targets if (src, dst) not in allowed}
              for src, targets in graph.items()}
    assert not cycles(pruned), "import cycles:\n" + "\n".join(
        " <-> ".join(c) for c in cycles(pruned))


def test_the_package_never_imports_the_benchmarks(graph):
    wrong = [f"{src} imports {dst}" for src, targets in sorted(graph.items())
             if src.split(".")[0] == "cvt_kernels"
             for dst in sorted(targets) if dst.split(".")[0] == "benchmarks"]
    assert not wrong, wrong


@pytest.mark.parametrize("edge", sorted(set(KNOWN_WRONG_WAY) | set(KNOWN_CYCLE_EDGES)),
                         ids=lambda e: f"{e[0]}->{e[1]}")
def test_known_exceptions_still_exist(graph, edge):
    """An exception whose import is gone must leave the lists (so they only shrink)."""
    src, dst = edge
    assert dst in graph.get(src, ()), f"{src} no longer imports {dst}: delete the exception"
    if edge in KNOWN_CYCLE_EDGES:
        assert layer_of(src) == layer_of(dst), edge


def test_the_reader_resolves_lazy_relative_and_submodule_imports(tmp_path):
    """The reader itself: a lazy relative import inside a function, ``from . import sub``
    (a module) and ``from .. import name`` (an attribute of the package) all count."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "leaf.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import mod\n")
    (pkg / "sub" / "mod.py").write_text("def f():\n    from ..leaf import x\n"
                                        "    from .. import VALUE\n")
    known = {"p", "p.leaf", "p.sub", "p.sub.mod"}
    assert imports_of("p.sub", pkg / "sub" / "__init__.py", known) == {"p.sub.mod"}
    assert imports_of("p.sub.mod", pkg / "sub" / "mod.py", known) == {"p.leaf", "p"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_public_names_stay_importable():
    """accelerate() moved to acceleration.py (the call-plan change); the old names stay."""
    import cvt_kernels
    from cvt_kernels import FusedBlock, FusedConvAttention, accelerate
    from cvt_kernels.acceleration import accelerate as moved
    from cvt_kernels.block import FusedLayerNorm  # noqa: F401
    from cvt_kernels.modules import SCOPES, accelerate as old, fused_attention  # noqa: F401

    assert accelerate is old is moved is cvt_kernels.accelerate
    assert SCOPES == ("attention", "block")
    assert FusedBlock.__module__ == "cvt_kernels.block"
    assert FusedConvAttention.__module__ == "cvt_kernels.modules"
