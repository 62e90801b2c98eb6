"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README must open with two bash commands"
    assert blocks[1].strip() == command, (blocks[1], command)
    assert "python/demo.py" in blocks[0]


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.+?)\n```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["n"] == 13
    assert tuple(namespace["out"].shape) == (2, 56 * 56, 64)


def test_readme_compile_autocast_export_example_runs(monkeypatch):
    """The compile/autocast/export block (torch.compile with aot_eager here: inductor would spend
    minutes compiling a whole CvT on a CPU test machine)."""
    import torch

    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.+?)\n```", readme, re.S)
                if "torch.export.export" in block)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    torch._dynamo.reset()
    assert namespace["n"] == 13
    assert namespace["program"].module()(namespace["images"]).shape == (2, 10)
