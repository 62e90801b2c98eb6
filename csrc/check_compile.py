"""Compile every CUDA source in csrc/kernels/ for sm_90 and sm_80 without a GPU; report
registers, shared memory and spills of every kernel instantiation.

    python csrc/check_compile.py [--arch 90 80] [--out FILE] [--bindings]

For each ``csrc/kernels/*.cu`` and architecture: ``nvcc -cubin -arch=sm_XX`` with the
extension's flags and ``-Xptxas -v``, then ``cuobjdump --dump-resource-usage`` on the cubin
(the toolkit's cuobjdump, else the one Triton bundles in ``triton/backends/nvidia/bin``).
Exits 1 when a file fails to compile, or a kernel spills (ptxas spill stores/loads) or uses
local memory (cuobjdump ``LOCAL``): each is a bug to fix before a GPU sees the code.

``--bindings`` also runs ``g++ -fsyntax-only`` on ``csrc/bindings.cpp`` against the installed
torch's headers (a CPU torch ships the CUDA headers too), the only check of the binding code
possible without a CUDA torch; it is skipped with a reason when torch or the headers are
missing. Needs nvcc (found as setup.py finds it: CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda*).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _build_config():
    spec = importlib.util.spec_from_file_location(
        "_cvt_build_config", ROOT / "cvt_kernels" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump(cuda_home: Optional[str]) -> Optional[str]:
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "cuobjdump")):
        return os.path.join(cuda_home, "bin", "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "backends/nvidia/bin/cuobjdump"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("cuobjdump")


def demangle(names: List[str]) -> Dict[str, str]:
    """Readable kernel names: ``stats_partials_kernel<__half, 8>`` (c++filt when present)."""
    out = {n: n for n in names}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0:
            out = dict(zip(names, res.stdout.splitlines()))
    for k, v in out.items():
        v = v.replace("(anonymous namespace)::", "")
        v = re.sub(r"^void ", "", v)
        v = v[:v.index("(")] if "(" in v else v                # parameter list
        v = re.sub(r"^[\w:]*::", "", v)                       # namespaces
        v = v.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
        out[k] = re.sub(r"\bfloat\b", "f32", v)
    return out


def _ptxas_spills(log: str) -> Dict[str, Tuple[int, int, int]]:
    """function -> (stack frame, spill stores, spill loads) bytes from ``-Xptxas -v``."""
    out: Dict[str, Tuple[int, int, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m and current:
            out[current] = tuple(int(g) for g in m.groups())  # type: ignore[assignment]
            current = None
    return out


def _resource_usage(cuobjdump: str, cubin: str) -> Dict[str, Dict[str, int]]:
    text = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True,
                          text=True, check=True).stdout
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)",
                                                              line)}
            current = None
    return out


def compile_one(nvcc: str, flags: List[str], source: Path, arch: int, tmp: str
                ) -> Tuple[Path, int, str, Optional[str], float]:
    cubin = os.path.join(tmp, f"{source.stem}.sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *flags, "-Xptxas", "-v", "-I", str(CSRC),
           "-o", cubin, str(source)]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    return source, arch, log, cubin if res.returncode == 0 else None, time.time() - start


def check_bindings(cuda_home: str) -> Tuple[str, bool]:
    """``g++ -fsyntax-only csrc/bindings.cpp`` against torch's headers: (message, ok)."""
    try:
        import torch.utils.cpp_extension as cpp
    except Exception as exc:  # no torch here
        return f"bindings.cpp: skipped (torch not importable: {type(exc).__name__})", True
    includes = cpp.include_paths() + [os.path.join(cuda_home, "include"), str(CSRC)]
    if not any(os.path.isfile(os.path.join(p, "ATen", "cuda", "CUDAContext.h")) for p in includes):
        return "bindings.cpp: skipped (this torch ships no ATen/cuda headers)", True
    import sysconfig
    import torch
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "bindings.cpp: skipped (no g++)", True
    # A CPU torch lacks c10/cuda/impl/cuda_cmake_macros.h (generated for CUDA builds; it only
    # sets export macros): C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it for this syntax check.
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DTORCH_EXTENSION_NAME=_C",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in includes), f"-I{sysconfig.get_paths()['include']}",
           str(CSRC / "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return "bindings.cpp: g++ -fsyntax-only FAILED\n" + res.stderr[-4000:], False
    return f"bindings.cpp: g++ -fsyntax-only ok against torch {torch.__version__} headers", True


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--bindings", action="store_true",
                   help="also syntax-check csrc/bindings.cpp against torch's headers")
    args = p.parse_args(argv)

    cfg = _build_config()
    cuda_home = cfg.find_cuda_home()
    if cuda_home is None:
        print("check_compile: no CUDA toolkit found (nvcc); set CUDA_HOME", file=sys.stderr)
        return 2
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    cuobjdump = find_cuobjdump(cuda_home)
    if cuobjdump is None:
        print("check_compile: no cuobjdump (toolkit or triton's bundled one)", file=sys.stderr)
        return 2
    sources = sorted((CSRC / "kernels").glob("*.cu"))
    version = cfg.toolkit_version(cuda_home)
    lines = [f"nvcc {version} at {cuda_home}; cuobjdump {cuobjdump}",
             f"flags: {' '.join(cfg.NVCC_FLAGS)}; regs/shared/local from cuobjdump "
             f"--dump-resource-usage, spill = ptxas spill stores + loads (bytes)",
             f"{'kernel':48s} {'sm':>3s} {'regs':>5s} {'smem':>6s} {'local':>6s} "
             f"{'spill':>6s}  status"]
    failed = False
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(compile_one, nvcc, cfg.NVCC_FLAGS, s, a, tmp)
                for s in sources for a in args.arch]
        bindings = pool.submit(check_bindings, cuda_home) if args.bindings else None
        for job in jobs:
            source, arch, log, cubin, secs = job.result()
            rel = source.relative_to(ROOT)
            if cubin is None:
                failed = True
                lines.append(f"{rel} sm_{arch}: COMPILE FAILED\n{log[-4000:]}")
                continue
            warnings = [l for l in log.splitlines() if "warning" in l.lower()]
            lines.append(f"-- {rel} sm_{arch} ({secs:.0f} s){': ' + str(len(warnings)) + ' warnings' if warnings else ''}")
            lines += [f"   {w}" for w in warnings[:20]]
            usage = _resource_usage(cuobjdump, cubin)
            spills = _ptxas_spills(log)
            names = demangle(sorted(usage))
            for mangled in sorted(usage, key=lambda n: names[n]):
                u = usage[mangled]
                stack, st, ld = spills.get(mangled, (0, 0, 0))
                bad = st + ld > 0 or u.get("LOCAL", 0) > 0
                failed |= bad
                lines.append(f"{names[mangled][:48]:48s} {arch:3d} {u.get('REG', 0):5d} "
                             f"{u.get('SHARED', 0):6d} {u.get('LOCAL', 0):6d} {st + ld:6d}  "
                             f"{'SPILLS/LOCAL MEMORY' if bad else 'ok'}")
        if bindings is not None:
            msg, ok = bindings.result()
            lines.append(msg)
            failed |= not ok
    lines.append(f"{'FAILED' if failed else 'ok: every kernel compiles, no spills, no local memory'}"
                 f" ({time.time() - start:.0f} s; smem = static bytes, the launchers add "
                 f"dynamic shared memory)")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
