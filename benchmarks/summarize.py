"""One screen from a GPU session's files: tests, block and model speed-ups, top kernels.

    python -m benchmarks.summarize OUT_DIR            # writes OUT_DIR/summary.txt, prints it

Reads what ``benchmarks/gpu_session.sh quick`` writes under ``OUT_DIR`` (each part is
optional: a step that did not run is reported as missing): ``info.txt``, ``tests_gpu.txt``
(pytest output of each test group), ``bench/blocks_quick.csv``, ``bench/models_quick.csv``
and ``profile.txt``; and checks the measured ratios against the targets of
``../shared/docs/performance.md`` (named "met" or "not met", never judged where a number is
missing).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import List, Optional

# performance.md's targets (H100, bf16, batch 64, 224x224, CvT-13): (what, how to find the
# measured ratio in the block or model rows, the bar).
BLOCK_TARGETS = [("stage-1 block fwd+bwd vs eager", 1, "train", "triton", "eager", 4.0),
                 ("stage-1 block fwd+bwd vs torch backend", 1, "train", "triton", "torch", 1.2),
                 ("stage-3 block fwd+bwd vs eager", 3, "train", "triton", "eager", 2.0)]
MODEL_TARGETS = [("CvT-13 train step vs eager", "train", 1.5),
                 ("CvT-13 inference vs eager", "eval", 2.0)]
MODEL_PROVIDERS = ("accelerated", "accelerated-triton", "accelerated-block",
                   "accelerated-block-triton")


def _rows(path: Path) -> Optional[List[dict]]:
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ms(rows: List[dict], **match) -> Optional[float]:
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()) and r.get("status") == "ok":
            return float(r["ms"])
    return None


def _ratio(base: Optional[float], ours: Optional[float]) -> str:
    return f"x{base / ours:.2f}" if base and ours else "-"


def _status(rows: List[dict], **match) -> str:
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            return r.get("status", "")
    return "no row"


def tests_section(path: Path) -> List[str]:
    if not path.exists():
        return ["tests: no tests_gpu.txt (the step did not run)"]
    text = path.read_text(errors="replace")
    out = []
    for group, body in re.findall(r"^== (\S+).*?\n(.*?)(?=^== |\Z)", text, re.M | re.S):
        tail = [ln for ln in body.splitlines() if re.search(r"\b(passed|failed|error|no tests "
                                                           r"ran|skipped)\b", ln)]
        final = tail[-1].strip("= ") if tail else "no pytest summary (killed before it?)"
        rc = re.search(r"^exit (\S+)", body, re.M)
        out.append(f"  {group:28s} {final}" + (f"  [exit {rc.group(1)}]" if rc else ""))
        for ln in body.splitlines():
            if ln.startswith(("FAILED ", "ERROR ")):
                out.append(f"    {ln[:150]}")
    return ["tests (tests_gpu.txt):"] + (out or ["  no test groups found"])


def blocks_section(rows: Optional[List[dict]], targets: List[str]) -> List[str]:
    if rows is None:
        return ["blocks: no bench/blocks_quick.csv (the step did not run)"]
    out = ["blocks (bench/blocks_quick.csv): ms, and speed-up of each provider vs eager",
           f"  {'stage':5s} {'mode':5s} {'eager ms':>9s} {'torch':>7s} {'triton':>7s} "
           f"{'tri/torch':>9s} {'1-pass':>7s}  not ok"]
    keys = []
    for r in rows:
        key = (r["model"], r["img"], r["stage"], r["dtype"], r["mode"], r["batch"])
        if key not in keys:
            keys.append(key)
    for model, img, stage, dtype, mode, batch in keys:
        sel = [r for r in rows if (r["model"], r["img"], r["stage"], r["dtype"], r["mode"],
                                   r["batch"]) == (model, img, stage, dtype, mode, batch)]
        ms = {p: _ms(sel, provider=p) for p in ("eager", "torch", "triton", "triton-one-pass")}
        bad = [f"{r['provider']}: {r['status'][:70]}" for r in sel
               if r["status"] != "ok" and not r["status"].startswith("skipped")]
        out.append(f"  s{stage:4s} {mode:5s} {ms['eager'] or float('nan'):9.3f} "
                   f"{_ratio(ms['eager'], ms['torch']):>7s} {_ratio(ms['eager'], ms['triton']):>7s} "
                   f"{_ratio(ms['torch'], ms['triton']):>9s} "
                   f"{_ratio(ms['eager'], ms['triton-one-pass']):>7s}  {'; '.join(bad)}")
    for what, stage, mode, ours, base, bar in BLOCK_TARGETS:
        a = _ms(rows, stage=stage, mode=mode, provider=base)
        b = _ms(rows, stage=stage, mode=mode, provider=ours)
        targets.append(_verdict(what, a / b if a and b else None, bar,
                                _status(rows, stage=stage, mode=mode, provider=ours)))
    return out


def models_section(rows: Optional[List[dict]], targets: List[str]) -> List[str]:
    if rows is None:
        return ["models: no bench/models_quick.csv (the step did not run)"]
    out = ["models (bench/models_quick.csv):"]
    for r in rows:
        shown = (f"{float(r['ms']):9.2f} ms {float(r['images_per_s']):8.1f} img/s "
                 f"err {r.get('rel_err')} (eager {r.get('eager_err')})"
                 if r["status"] == "ok" else r["status"][:110])
        out.append(f"  {r['model']} {r['mode']:5s} b{r['batch']:4s} {r['provider']:20s} {shown}")
    for what, mode, bar in MODEL_TARGETS:
        a = _ms(rows, mode=mode, provider="eager")
        for provider in MODEL_PROVIDERS:
            if not any(r["provider"] == provider for r in rows):
                continue
            b = _ms(rows, mode=mode, provider=provider)
            targets.append(_verdict(f"{what} ({provider})", a / b if a and b else None, bar,
                                    _status(rows, mode=mode, provider=provider)))
    return out


def _verdict(what: str, ratio: Optional[float], bar: float, status: str) -> str:
    if ratio is None:
        return f"  {what:54s} not measured ({status[:70]})"
    return f"  {what:54s} x{ratio:.2f} (target >= {bar}x): {'met' if ratio >= bar else 'NOT met'}"


def profile_section(path: Path, top: int = 8) -> List[str]:
    if not path.exists():
        return ["profile: no profile.txt (the step did not run)"]
    out = ["profile (profile.txt): top kernels by self device time, and by category"]
    lines = path.read_text(errors="replace").splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("== "):
            out.append("  " + ln[:150])
            table = [x for x in lines[i + 1:] if x.strip()]
            rows = [x for x in table[3:] if not x.startswith("-")][:top]
            out += ["    " + x.strip()[:140] for x in rows if not x.startswith(("Self", "=="))]
        elif ln.startswith("by category"):
            j = i + 1
            while j < len(lines) and lines[j].startswith("  "):
                out.append("    " + lines[j].strip())
                j += 1
        i += 1
    return out


def summarize(out_dir: Path) -> str:
    info = out_dir / "info.txt"
    head = info.read_text(errors="replace").splitlines()[:3] if info.exists() else [
        "no info.txt"]
    targets: List[str] = []
    parts = [["cvt_kernels GPU session summary"] + ["  " + h for h in head],
             tests_section(out_dir / "tests_gpu.txt"),
             blocks_section(_rows(out_dir / "bench" / "blocks_quick.csv"), targets),
             models_section(_rows(out_dir / "bench" / "models_quick.csv"), targets),
             ["targets (../shared/docs/performance.md; H100 targets, this run's device):"]
             + targets,
             profile_section(out_dir / "profile.txt")]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out_dir = Path(argv[0])
    text = summarize(out_dir)
    (out_dir / "summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
