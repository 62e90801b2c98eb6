"""The committed AOT reports (``benchmarks/results/aot/triton*_sm90_sm80.txt``, one per
Triton version the project supports) stay true: they were made from the current kernel
sources, and every config a GPU can launch is in them, compiled without spills and, for
fp16/bf16 GEMMs on sm_90, on wgmma.

Compiling everything takes ~8 minutes per Triton version, too long for CI; this reads the
reports instead (no compile), so a kernel edit or a new candidate config without a rerun of
``python -m cvt_kernels.backends.triton.aot --arch 90 80`` under both versions fails here.
"""

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from cvt_kernels.backends.triton import aot  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "aot"
VERSIONS = {"3.9": "triton_sm90_sm80.txt", "3.6": "triton3.6_sm90_sm80.txt"}
REGENERATE = ("rerun `TRITON_DEFAULT_FP_FUSION=1 python -m cvt_kernels.backends.triton.aot "
              "--arch 90 80 > benchmarks/results/aot/{file}` with Triton {version} and commit it")


def read_report(path: Path):
    """(header, {(name, arch): row}) of one report."""
    lines = path.read_text().splitlines()
    rows = {}
    for line in lines[2:]:
        tokens = line.split()
        if len(tokens) < 7 or not tokens[-6].isdigit():
            continue
        arch, regs, smem, spill, wgmma, mma = tokens[-6:]
        rows[(" ".join(tokens[:-6]), int(arch))] = dict(
            regs=int(regs), smem=int(smem), spill=int(spill), wgmma=wgmma == "yes")
    return lines[0], rows


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_report_is_from_the_current_kernel_sources(version):
    header, _ = read_report(REPORTS / VERSIONS[version])
    assert header.startswith(f"triton {version}"), header
    assert f"kernels {aot.kernel_sources_digest()};" in header, (
        "the Triton kernels changed since this report was made: "
        + REGENERATE.format(file=VERSIONS[version], version=version))


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize("arch", [90, 80])
def test_every_shipped_config_is_in_the_report_clean(version, arch):
    _, rows = read_report(REPORTS / VERSIONS[version])
    for job in aot.jobs(full=False, arch=arch):
        name = " ".join(job.name.split())
        row = rows.get((name, arch))
        assert row is not None, (f"sm_{arch} {name} is shipped but not in the Triton {version} "
                                 f"report: " + REGENERATE.format(file=VERSIONS[version],
                                                                 version=version))
        assert row["spill"] == 0, (version, arch, name, row)
        assert row["smem"] <= aot.SMEM_LIMIT[arch], (version, arch, name, row)
        if arch == 90 and job.tensor_cores:
            assert row["wgmma"], (version, name, row)
