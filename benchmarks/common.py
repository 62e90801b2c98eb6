"""Shared by the benchmarks: device names, the roofline floor, result stamps and tables."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

# Dense peak (TFLOP/s for 16-bit tensor cores, TF32 for float32) and copy bandwidth (TB/s).
# H100: ../shared/docs/performance.md's working figures (about 800 bf16, 3.0 TB/s measured
# copy); H200: same compute, 4.8 TB/s HBM3e; A100: datasheet 312 / 156 TF32, 2.0 TB/s.
PEAKS = {
    "H100": {"tflops16": 800.0, "tflops32": 400.0, "tbps": 3.0},
    "H200": {"tflops16": 800.0, "tflops32": 400.0, "tbps": 4.8},
    "A100": {"tflops16": 312.0, "tflops32": 156.0, "tbps": 2.0},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def peak_for(device: torch.device) -> Optional[Dict[str, float]]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


def floor_us(device: torch.device, dtype: torch.dtype, flop: float, nbytes: float
             ) -> Optional[float]:
    """The roofline floor in microseconds: max(compute time, memory time) at peak."""
    peak = peak_for(device)
    if peak is None:
        return None
    tflops = peak["tflops16"] if dtype in (torch.float16, torch.bfloat16) else peak["tflops32"]
    return max(flop / (tflops * 1e12), nbytes / (peak["tbps"] * 1e12)) * 1e6


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return os.environ.get("CVT_KERNELS_COMMIT", "unknown")


def stamp(device: torch.device, command: str) -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def write_markdown(path: Path, title: str, meta: Dict[str, str], rows: List[dict]) -> None:
    keys = [k for k in rows[0]] if rows else []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w") as f:
        f.write(f"# {title}\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in meta.items()))
        f.write("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |\n")


def current_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_speedups(rows: List[dict], baselines=("eager", "torch", "compile")) -> None:
    """``vs_<baseline>`` = baseline time / provider time, within one group of rows (one
    shape, dtype and mode), for every provider that ran."""
    done = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    for r in done.values():
        for base in baselines:
            if base in done and base != r["provider"]:
                r[f"vs_{base}"] = round(done[base]["ms"] / r["ms"], 2)


def save_results(out_dir: str, name: str, title: str, args: argparse.Namespace,
                 rows: List[dict]) -> None:
    """``<out_dir>/<name>.csv`` and ``.md``, every row stamped with device, versions,
    commit, date and the command that reproduces the run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = current_device()
    command = f"python -m benchmarks.{name} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v not in (None, False) and k != "out")
    meta = stamp(device, command.strip())
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(meta))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **meta})
    write_markdown(out / f"{name}.md", title, meta, rows)
    print(f"wrote {out}/{name}.csv and .md on {device_name(device)}")
