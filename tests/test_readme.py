"""The README's commands are the ones CI runs, its first screen runs as written (at a
smaller image size), the pages it links exist, and its numbers come from results files."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str):
    return re.findall(r"```python\n(.+?)\n```", text, re.S)


def run_block(code: str, size: int = 64) -> dict:
    """Exec a documented snippet with its 224x224 inputs made ``size`` (CvT has no position
    embedding: any size runs the same code)."""
    code = code.replace("224, 224", f"{size}, {size}")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    blocks = re.findall(r"```bash\n(.+?)\n```", README, re.S)
    assert len(blocks) >= 2, "README must open with two bash commands"
    assert blocks[1].strip() == command, (blocks[1], command)
    assert "python/demo.py" in blocks[0]


def test_the_first_screen_fits_and_links_pages_that_exist():
    first = README[:README.index("## More")]
    assert len(first.splitlines()) <= 80, len(first.splitlines())
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", README):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize("which", ["reference", "hugging face"])
def test_readme_accelerate_examples_run_as_written(which):
    blocks = python_blocks(README)
    assert len(blocks) == 2
    code = blocks[0] if which == "reference" else blocks[1]
    if which == "hugging face":
        pytest.importorskip("transformers")
    namespace = run_block(code)
    assert namespace["n"] == 13
    assert tuple(namespace["logits"].shape) == (2, 1000)


def test_every_table_row_of_the_readme_names_a_committed_results_file():
    rows = [ln for ln in README.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert rows
    last_source = None
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        source = cells[-1]
        if source == "same":
            assert last_source is not None
            continue
        path = re.search(r"\((benchmarks/results/[^)]+)\)", source).group(1)
        assert (ROOT / path).exists(), path
        last_source = path


def test_usage_module_example_runs():
    code = python_blocks((ROOT / "docs" / "usage.md").read_text())[0]
    namespace = run_block(code)
    assert namespace["n"] == 13
    assert tuple(namespace["out"].shape) == (2, 56 * 56, 64)


def test_usage_compile_autocast_export_example_runs(monkeypatch):
    """The compile/autocast/export block (torch.compile with aot_eager here: inductor would
    spend minutes compiling a whole CvT on a CPU test machine)."""
    import torch

    code = next(block for block in python_blocks((ROOT / "docs" / "usage.md").read_text())
                if "torch.export.export" in block)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    namespace: dict = {}
    exec(compile(code, "docs/usage.md", "exec"), namespace)
    torch._dynamo.reset()
    assert namespace["n"] == 13
    assert namespace["program"].module()(namespace["images"]).shape == (2, 10)


def test_links_in_the_docs_point_at_files_that_exist():
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).resolve().exists(), (doc.name, target)
