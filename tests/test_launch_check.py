"""The launch-faithful compile check (``benchmarks.launch_check``) and its
committed reports (``benchmarks/results/aot/launch_triton*.txt``, one per Triton version the
project supports: 3.9 here, 3.6 on the GPU machines).

The full check compiles every binary the launchers make at CvT-13/W24 shapes for three
architectures (tens of minutes on CI's two cores, minutes with a warm Triton cache), so CI
reads the reports instead: a kernel edited without rerunning the check under both versions
fails here. One small live run (the attention forward, bf16, sm_90) checks the machinery
itself: that it sees what a launch specializes on.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package (a developer tool, not installed)

from benchmarks import launch_check  # noqa: E402

REPORTS = ROOT / "benchmarks" / "results" / "aot"
VERSIONS = {"3.9": "launch_triton3.9.txt", "3.6": "launch_triton3.6.txt"}
ARCHES = (90, 80, 86, 89)
REGENERATE = ("rerun `python -m benchmarks.launch_check > "
              "benchmarks/results/aot/{file}` with Triton {version} (no TRITON_INTERPRET) and "
              "commit it")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET: a process that has it holds interpreter-only kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.launch_check", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_report_is_from_the_current_kernel_sources(version):
    text = (REPORTS / VERSIONS[version]).read_text()
    header = text.splitlines()[0]
    assert header.startswith(f"triton {version}"), header
    assert f"kernels {launch_check.kernel_sources_digest()};" in header, (
        "the Triton kernels changed since this report was made: "
        + REGENERATE.format(file=VERSIONS[version], version=version))


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_report_covers_every_architecture_and_every_binary_may_ship(version):
    text = (REPORTS / VERSIONS[version]).read_text()
    for arch in ARCHES:
        assert f"## sm_{arch}: compiled binaries" in text, (version, arch)
    known = KNOWN_SPILLS.get(version, set())
    # One "N binaries must not ship:" list per run the report joins (its sections' runs).
    blocks = re.findall(r"^(\d+) binaries must not ship:\n((?:  sm_\d+ .*\n?)+)", text, re.M)
    listed = [hit for _, body in blocks for hit in
              re.findall(r"^  sm_(\d+) (\S+) .*?\[(\w+) .*bytes spilled$", body, re.M)]
    if "must not ship" in text:  # only the spills named below, nothing else
        assert listed and {(int(a), k, o) for a, k, o in listed} <= known, (version, listed)
        assert len(listed) == sum(int(n) for n, _ in blocks) and len(blocks) == text.count(
            "binaries must not ship"), (version, blocks)
    else:
        assert text.rstrip().endswith("fp16/bf16 dots on wgmma on sm_90"), text[-300:]
    assert "FAILED" not in text, version
    # every row: no spill (forced-only rows aside), a block fits, half-precision dots on
    # wgmma on sm_90
    section = None
    rows = 0
    for line in text.splitlines():
        m = re.match(r"## sm_(\d+): compiled binaries", line)
        if m:
            section = int(m.group(1))
            continue
        if line.startswith("#") or not line.strip():
            section = None if line.startswith("##") else section
            continue
        row = parse_binary_row(line) if section is not None else None
        if row is None:
            continue
        rows += 1
        if row["use"] == "forced":
            continue
        assert row["ctas"] >= 1, line
        assert row["spill"] == 0 or (section, row["kernel"], row["operands"]) in known, line
        if section == 90 and row["operands"] in ("bf16", "fp16") and row["mma"]:
            assert row["wgmma"], line
    assert rows > 100, rows


# Spills the 2026-12-07 reruns found in the second-generation projection and GEMM kernels
# (8-16 bytes each; the reports list every one). A spill costs speed, not correctness, and
# the dispatcher times these kernels against the torch backend before choosing them; they
# are named here one by one so that any other spill still fails. To fix next: smaller tiles
# or fewer stages for these specializations (configs.py), then rerun both reports and
# delete the entries.
KNOWN_SPILLS = {
    "3.6": {(80, "_grad_tokens_kernel", "fp32"), (86, "_grad_tokens_kernel", "fp32"),
            (89, "_grad_tokens_kernel", "fp32"), (86, "_forward_kernel", "bf16"),
            (89, "_forward_kernel", "bf16"), (86, "_gemm_kernel", "fp32"),
            (89, "_gemm_kernel", "fp32"), (90, "_stats_partials_kernel", "fp32")},
    "3.9": {(86, "_forward_kernel", "bf16"), (89, "_forward_kernel", "bf16"),
            (86, "_layer_norm_fwd_kernel", "fp32"), (89, "_layer_norm_fwd_kernel", "fp32"),
            # sm_90, full shapes (CvT-W24's widest rows)
            (90, "_layer_norm_bwd_kernel", "fp16")},
}


def parse_binary_row(line: str):
    """The numbers of one row of a report's binary table (``None``: not such a row):
    ``kernel config... st<N> regs spill smem cta/SM wgmma mma cp.async tma launches use
    operands specialization...``."""
    tokens = line.split()
    idx = next((i for i, t in enumerate(tokens) if re.fullmatch(r"st\d+", t)), None)
    if idx is None or len(tokens) < idx + 12:
        return None
    numbers = tokens[idx + 1:idx + 10]
    if not all(t.isdigit() for t in numbers):
        return None
    names = ("regs", "spill", "smem", "ctas", "wgmma", "mma", "cp_async", "tma", "launches")
    row = dict(zip(names, map(int, numbers)))
    row.update(kernel=tokens[0], use=tokens[idx + 10], operands=tokens[idx + 11])
    return row


def test_occupancy_estimate():
    # 255 registers x 128 threads: 32,768 of 65,536 registers -> 2 blocks by registers.
    assert launch_check.ctas_per_sm(90, 255, 0, 4) == 2
    # 64 KB of shared memory per block: 3 blocks in sm_90's 228 KB, 1 in sm_86's 100 KB.
    assert launch_check.ctas_per_sm(90, 32, 65536, 4) == 3
    assert launch_check.ctas_per_sm(86, 32, 65536, 4) == 1
    assert launch_check.ctas_per_sm(86, 32, 0, 4) == 12  # 48 warps per SM on sm_86
    assert launch_check.ctas_per_sm(86, 32, 120000, 4) == 0  # does not fit at all


def test_live_check_sees_launch_time_specialization():
    """The attention forward as the launcher compiles it for sm_90 (bf16, CvT-13 b64):
    every autotune candidate is compiled, on wgmma with cp.async pipelining, and the stage-1
    launch (one head) is its own binary specialized on ``num_heads == 1``."""
    run = _run("--quick", "--arch", "90", "--only", "_attn_fwd_kernel", "--dtype", "bf16")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("_attn_fwd_kernel ")]
    assert rows, run.stdout
    assert any("num_heads=1" in ln for ln in rows), rows
    candidates = [ln for ln in run.stdout.splitlines()
                  if "train attention" in ln and "_attn_fwd_kernel" in ln and " cand " in ln]
    assert len({ln.split("_attn_fwd_kernel")[1].split("cand")[0] for ln in candidates}) >= 2
    for ln in rows:
        row = parse_binary_row(ln)
        assert row is not None, ln
        assert row["spill"] == 0 and row["wgmma"] > 0 and row["mma"] == 0, ln
        if re.search(r"\bst[2-9]\b", ln):  # a pipelined config streams keys with cp.async
            assert row["cp_async"] > 0, ln


def test_attention_spill_tables_are_emptied_only_inside_the_unpruned_run():
    """``--attention-spills`` compiles every candidate by emptying the tables for its run;
    the shipped tables are back afterwards (even after an error)."""
    from cvt_kernels.backends.triton import attention as attn
    from cvt_kernels.backends.triton import configs

    tables = configs.ATTENTION_SPILLS
    before = {k: set(v) for k, v in tables.items()}
    assert attn.shipped_configs("dkdv", torch.float32, 64, 80) != attn.DKDV_CANDIDATES
    with pytest.raises(RuntimeError, match="inside"):
        with launch_check._spill_tables_emptied():
            assert all(not v for v in tables.values())
            assert attn.shipped_configs("dkdv", torch.float32, 64, 80) == attn.DKDV_CANDIDATES
            raise RuntimeError("inside")
    assert tables == before and before[90]


def test_a_long_compile_says_it_is_still_going(monkeypatch):
    """Issue 25: on a cold Triton cache one shape is minutes of compiling; the check prints
    a "still compiling" line at most every HEARTBEAT_S seconds instead of going silent."""
    now = [100.0]
    monkeypatch.setattr(launch_check.time, "monotonic", lambda: now[0])
    said = []
    rec = launch_check.Recorder()
    rec.what = "bf16 cvt13 s2 224px"
    tick = launch_check._heartbeat(said.append, rec, 90)
    for _ in range(5):  # compiles finishing within the interval: silent
        now[0] += launch_check.HEARTBEAT_S / 10
        tick()
    assert said == []
    now[0] += launch_check.HEARTBEAT_S
    tick()
    assert said == ["sm_90 bf16 cvt13 s2 224px: still compiling (0 launches, 15 s)"], said
    tick()
    assert len(said) == 1
