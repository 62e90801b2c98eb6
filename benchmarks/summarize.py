"""One screen from a GPU session's files: steps, tests, whole-model and block rows, the
dispatcher's decisions, the targets met or not, and the comparison with the 2026-11-30 run.

    python -m benchmarks.summarize OUT_DIR            # writes OUT_DIR/summary.txt, prints it
    python -m benchmarks.summarize OUT_DIR --step-cost CSV
    python -m benchmarks.summarize --decisions LABEL=FILE [LABEL=FILE ...]

Reads what ``benchmarks/gpu_session.sh quick`` writes under ``OUT_DIR`` (each part is
optional: a step that did not run is reported as missing): ``info.txt``, ``tests_gpu.txt``
(pytest output of each test group), ``log.txt`` (each step's output and exit: the profile
sections are read from it), ``dispatch.txt`` (the decisions' agreement lines),
``bench/models_quick.csv`` and ``bench/blocks_quick.csv``. The step-cost counter's estimate
(``benchmarks.step_cost``: launches, GB, estimated ms) is shown beside each measured model
row whose provider it counts: from ``--step-cost CSV``, else from the committed
``results/step_cost/`` file of the session's commit, else the newest committed one (named).
Targets are ``../shared/docs/performance.md``'s and issue 24's, named "met" or "NOT met",
never judged where a number is missing.

``--decisions`` prints each decisions file of the measured dispatcher (``cvt_kernels``'s
``dispatch.json`` format: every call's choice, its candidates' times, errors and harness
costs, what ``python -m cvt_kernels.info --decisions`` shows) and ``agreement:`` lines: the
first file against each other one, how many keys both hold and whether they chose the same.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
BASELINE_DIR = REPO / "benchmarks" / "results" / "h200" / "2026-11-30_e4e1ada"
STEP_COST_DIR = REPO / "benchmarks" / "results" / "step_cost"

# The model providers the step-cost counter counts, by its own names (the graph providers
# launch the same kernels as their base; the dispatcher's mix and compile are not counted).
STEP_COST_OF = {"eager": "eager", "eager+graph": "eager",
                "accelerated-torch": "attention-torch", "accelerated-triton": "attention-triton",
                "accelerated-block-torch": "block-torch",
                "accelerated-block-triton": "block-triton"}
GRAPH_PROVIDERS = ("eager+graph", "accelerated+graph", "accelerated-block+graph")
# Whole CvT-13 b64 bf16: (what, mode, baseline, CUDA graphs?, ((source, bar), ...)) from
# performance.md and issue 24. The best accelerated provider of the kind is judged, named.
MODEL_TARGETS = [
    ("train vs eager", "train", "eager", False, (("perf.md", 1.5), ("issue 24", 1.2))),
    ("train vs compile", "train", "compile", False, (("perf.md", 1.15),)),
    ("train, graphs, vs eager", "train", "eager", True, (("issue 24", 1.5),)),
    ("eval vs eager", "eval", "eager", False, (("perf.md", 2.0), ("issue 24", 1.5))),
    ("eval vs compile", "eval", "compile", False, (("perf.md", 1.2),)),
    ("eval, graphs, vs eager", "eval", "eager", True, (("perf.md", 2.5), ("issue 24", 2.0))),
    ("eval, graphs, vs compile", "eval", "compile", True, (("perf.md", 1.3),)),
]
# Blocks (performance.md's are for the attention block; the quick session measures whole
# blocks at block scope, and says so): (what, stage, mode, baseline, bar).
BLOCK_TARGETS = [("s1 train vs eager", 1, "train", "eager", 4.0),
                 ("s1 train vs torch backend", 1, "train", "torch", 1.2),
                 ("s1 train vs compile", 1, "train", "compile", 1.3),
                 ("s3 train vs eager", 3, "train", "eager", 2.0),
                 ("s3 train vs compile", 3, "train", "compile", 1.2)]
DISPATCH_MARGIN = 1.05  # the decided provider within 5% of the best forced backend
WIDTH = 125


# ------------------------------------------------------------------------------ reading
def _rows(path: Path) -> Optional[List[dict]]:
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _find(rows: List[dict], **match) -> Optional[dict]:
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            return r
    return None


def _ms(rows: List[dict], **match) -> Optional[float]:
    r = _find(rows, **match)
    return _num(r["ms"]) if r is not None and r.get("status") == "ok" else None


def _status(rows: List[dict], **match) -> str:
    r = _find(rows, **match)
    return r.get("status", "") if r is not None else "no row"


def _x(base: Optional[float], ours: Optional[float]) -> str:
    return f"x{base / ours:.2f}" if base and ours else "-"


def _cut(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# -------------------------------------------------------------------------------- parts
def steps_section(log: Path) -> List[str]:
    """Each step's exit code and seconds, from log.txt's ``NAME exit RC (S s)`` lines."""
    if not log.exists():
        return ["steps: no log.txt"]
    found = re.findall(r"^(\S+) exit (\S+)(?: \((\d+) s\))?$", log.read_text(errors="replace"),
                       re.M)
    if not found:
        return ["steps (log.txt): none finished"]
    parts = [f"{name} {secs + ' s' if secs else ''}{'' if rc == '0' else f' [exit {rc}]'}"
             for name, rc, secs in found]
    lines, line = ["steps (log.txt; exit 124: its cap was hit):"], " "
    for part in parts:
        if len(line) + len(part) + 3 > WIDTH:
            lines.append(line)
            line = " "
        line += " " + part + " |"
    return lines + [line.rstrip(" |")]


def tests_section(path: Path) -> List[str]:
    if not path.exists():
        return ["tests: no tests_gpu.txt (the step did not run)"]
    text = path.read_text(errors="replace")
    out = []
    for group, body in re.findall(r"^== (\S+).*?\n(.*?)(?=^== |\Z)", text, re.M | re.S):
        tail = [ln for ln in body.splitlines() if re.search(r"\b(passed|failed|error|errors|no "
                                                           r"tests ran|skipped|collected)\b",
                                                           ln)]
        final = tail[-1].strip("= ") if tail else "no pytest summary (killed before it?)"
        rc = re.search(r"^exit (\S+)", body, re.M)
        out.append(f"  {group:26s} {final}" + (f"  [exit {rc.group(1)}]" if rc else ""))
        for ln in body.splitlines():
            if ln.startswith(("FAILED ", "ERROR ")):
                out.append(_cut(f"    {ln}"))
    return ["tests (tests_gpu.txt):"] + (out or ["  no test groups found"])


def step_cost_rows(paths: Sequence[Path], shape: tuple, commit: str
                   ) -> Tuple[Dict[tuple, dict], str]:
    """(provider, mode) -> the counter's row for ``shape`` (model, img, batch, dtype of the
    measured rows), and where it came from: the first of ``paths`` that counted this shape,
    else the committed file of this commit, else the newest committed one (named)."""
    committed = sorted((p for p in STEP_COST_DIR.glob("*.csv") if not p.stem.endswith("_sites")),
                       key=lambda p: (not p.stem.endswith("_" + commit), -p.stat().st_mtime))
    for path in [*paths, *committed]:
        rows = _rows(path) if path is not None else None
        if not rows or tuple(str(rows[0].get(k)) for k in ("model", "img", "batch", "dtype")
                             ) != tuple(map(str, shape)):
            continue
        made_at = rows[0].get("commit", "?")
        note = ("this run's commit" if made_at.split("+")[0] == commit
                else f"counted at commit {made_at}, not this run's")
        return {(r["provider"], r["mode"]): r for r in rows}, f"{path.name}, {note}"
    return {}, f"no step-cost file for {' '.join(map(str, shape))}"


def _est(cost: Dict[tuple, dict], provider: str, mode: str, gpu: str) -> str:
    r = cost.get((STEP_COST_OF.get(provider, ""), mode))
    if r is None:
        return ""
    ms = r.get(f"est_ms_{gpu.lower()}") or r.get("est_ms_h100")
    return f"{r['launches']:>5s} {float(r['gb']):5.1f} {float(ms):6.2f}"


def models_section(rows: Optional[List[dict]], cost: Dict[tuple, dict], cost_note: str,
                   gpu: str) -> List[str]:
    if rows is None:
        return ["models: no bench/models_quick.csv (the step did not run)"]
    out = []
    for key in dict.fromkeys((r["model"], r["img"], r["batch"], r["dtype"], r["mode"])
                             for r in rows):
        model, img, batch, dtype, mode = key
        sel = [r for r in rows if (r["model"], r["img"], r["batch"], r["dtype"], r["mode"])
               == key]
        sel.sort(key=lambda r: r["provider"] != "eager")  # (a later step re-measures eager)
        eager = _ms(sel, provider="eager")
        adam = ", without AdamW" if mode == "train" else ""
        out.append(f"{model} {img} b{batch} {dtype} {mode} (bench/models_quick.csv; est. = "
                   f"counted launches, GB, ms on {gpu}{adam})")
        out.append(f"  {'provider':26s} {'ms':>8s} {'xeager':>6s} {'graph ms':>8s} "
                   f"{'peak MB':>8s} {'host/dev ms':>13s} {'bound':6s} {'1st s':>6s} "
                   f"{'est.':>19s}")
        skipped = []
        for r in sel:
            if r["status"].startswith("skipped"):
                skipped.append(r["provider"])
                continue
            if r["status"] != "ok":
                out.append(_cut(f"  {r['provider']:26s} {r['status']}"))
                continue
            cg = r.get("cudagraph_ms", "")
            cg = f"{float(cg):8.2f}" if _num(cg) is not None else ("   fail" if cg.startswith(
                "failed") else "       -")
            host, dev = _num(r.get("host_ms")), _num(r.get("device_ms"))
            hd = f"{host:6.1f}/{dev:<6.1f}" if host is not None and dev is not None else (
                f"{host:6.1f}/-     " if host is not None else "")
            first = _num(r.get("first_call_s"))
            out.append(f"  {r['provider']:26s} {float(r['ms']):8.2f} "
                       f"{_x(eager, _num(r['ms'])):>6s} {cg} {r.get('peak_mb', ''):>8s} "
                       f"{hd:>13s} {r.get('bound', ''):6s} "
                       f"{(f'{first:.1f}' if first is not None else ''):>6s} "
                       f"{_est(cost, r['provider'], mode, gpu):>19s}")
        if skipped:
            out.append(_cut(f"  skipped: {', '.join(skipped)}"))
        fails = [r for r in sel if r["status"] == "ok" and str(r.get("cudagraph_ms", ""))
                 .startswith("failed")]
        for r in fails[:3]:
            out.append(_cut(f"  graph capture failed, {r['provider']}: {r['cudagraph_ms']}"))
    return out + [f"  (step cost: {cost_note})"]


def _best(rows: List[dict], mode: str, graphs: bool) -> Tuple[Optional[str], Optional[float]]:
    """The fastest accelerated provider of a mode, with or without CUDA graphs (a graph
    provider, or any provider's CUDA-graph time where graphs are asked for)."""
    best: Tuple[Optional[str], Optional[float]] = (None, None)
    for r in rows:
        if r.get("mode") != mode or r.get("status") != "ok":
            continue
        p = r["provider"]
        if not p.startswith("accelerated"):
            continue
        if graphs:
            ms = _num(r["ms"]) if p in GRAPH_PROVIDERS else _num(r.get("cudagraph_ms"))
            label = p if p in GRAPH_PROVIDERS else f"{p} (graph ms)"
        elif p in GRAPH_PROVIDERS:
            continue
        else:
            ms, label = _num(r["ms"]), p
        if ms is not None and (best[1] is None or ms < best[1]):
            best = (label, ms)
    return best


def _verdict(what: str, ratio: Optional[float], bars, why: str) -> str:
    """``what``, the ratio and each (source, bar) met or not; or why it was not measured."""
    if ratio is None:
        return _cut(f"  {what:34s} not measured ({why})")
    judged = "; ".join(f"{source + ' ' if source else ''}>={bar:g}x: "
                       f"{'met' if ratio >= bar else 'NOT met'}" for source, bar in bars)
    return _cut(f"  {what:34s} x{ratio:.2f} ({judged}){why}")


def model_targets(rows: Optional[List[dict]]) -> List[str]:
    if not rows:
        return ["  whole model: no rows"]
    out = []
    for what, mode, base, graphs, bars in MODEL_TARGETS:
        b = _ms(rows, mode=mode, provider=base)
        name, ms = _best(rows, mode, graphs)
        why = f", {name}" if name else "no accelerated row"
        if not b:
            why = f"{base}: {_status(rows, mode=mode, provider=base)}"
        out.append(_verdict(f"CvT-13 {what}", b / ms if b and ms else None, bars, why))
    eager_peak = _num((_find(rows, mode="train", provider="eager") or {}).get("peak_mb"))
    peaks = [(r["provider"], _num(r.get("peak_mb"))) for r in rows
             if r.get("mode") == "train" and r.get("status") == "ok"
             and r["provider"].startswith("accelerated") and _num(r.get("peak_mb"))]
    label = "CvT-13 train peak memory vs eager"  # (34 characters: the column)
    if eager_peak and peaks:
        name, peak = min(peaks, key=lambda p: p[1])
        ratio = peak / eager_peak
        out.append(_cut(f"  {label:34s} x{ratio:.2f} (perf.md <=0.6x: "
                        f"{'met' if ratio <= 0.6 else 'NOT met'}), {name}"))
    else:
        out.append(f"  {label:34s} not measured")
    return out


def blocks_section(rows: Optional[List[dict]]) -> List[str]:
    if rows is None:
        return ["blocks: no bench/blocks_quick.csv (the step did not run)"]
    scope = rows[0].get("scope") or "attention" if rows else "?"
    out = [f"blocks (bench/blocks_quick.csv, scope {scope}): eager ms, speed-up vs eager, "
           f"graph ms of auto; auto vs the best forced backend",
           f"  {'stage':5s} {'mode':5s} {'eager':>7s} {'torch':>6s} {'triton':>6s} "
           f"{'1-pass':>6s} {'auto':>6s} {'compile':>7s} {'a+comp':>6s} {'auto gr':>7s}  "
           f"dispatcher"]
    keys = list(dict.fromkeys((r["model"], r["img"], r["stage"], r["dtype"], r["mode"],
                               r["batch"]) for r in rows))
    within = []
    for key in keys:
        sel = [r for r in rows if (r["model"], r["img"], r["stage"], r["dtype"], r["mode"],
                                   r["batch"]) == key]
        ms = {p: _ms(sel, provider=p) for p in ("eager", "torch", "triton", "triton-one-pass",
                                                 "auto", "compile", "auto+compile")}
        forced = {p: ms[p] for p in ("torch", "triton", "triton-one-pass") if ms[p]}
        verdict = "-"
        if ms["auto"] and forced:
            best = min(forced, key=forced.get)
            ratio = ms["auto"] / forced[best]
            ok = ratio <= DISPATCH_MARGIN
            within.append(ok)
            verdict = (f"auto/{best} {ratio:.2f}: "
                       f"{'within 5%' if ok else 'NOT within 5%'}")
        auto_cg = _num((_find(sel, provider="auto") or {}).get("cudagraph_ms"))
        bad = [f"{r['provider']}: {r['status'][:40]}" for r in sel
               if r["status"] != "ok" and not r["status"].startswith("skipped")]
        line = (f"  s{key[2]:4s} {key[4]:5s} {ms['eager'] or float('nan'):7.3f} "
                + " ".join(f"{_x(ms['eager'], ms[p]):>6s}" for p in
                           ("torch", "triton", "triton-one-pass", "auto"))
                + f" {_x(ms['eager'], ms['compile']):>7s} {_x(ms['eager'], ms['auto+compile']):>6s}"
                + f" {(f'{auto_cg:.3f}' if auto_cg else '-'):>7s}  {verdict}")
        out.append(_cut(line + (f"  | {'; '.join(bad)}" if bad else "")))
    if within:
        out.append(f"  dispatcher within 5% of the best forced backend at "
                   f"{sum(within)} of {len(within)} shapes: "
                   f"{'met' if all(within) else 'NOT met'}")
    return out


def block_targets(rows: Optional[List[dict]]) -> List[str]:
    """One line per target: triton's and auto's ratio, judged by the better of the two."""
    if not rows:
        return ["  blocks: no rows"]
    scope = rows[0].get("scope") or "attention"
    out = []
    for what, stage, mode, base, bar in BLOCK_TARGETS:
        b = _ms(rows, stage=stage, mode=mode, provider=base)
        ratios = {p: b / o for p in ("triton", "auto")
                  for o in [_ms(rows, stage=stage, mode=mode, provider=p)] if b and o}
        label = _cut(f"{scope} {what}", 34)
        if not ratios:
            why = (f"{base}: {_status(rows, stage=stage, mode=mode, provider=base)}" if not b
                   else f"triton: {_status(rows, stage=stage, mode=mode, provider='triton')}")
            out.append(_cut(f"  {label:34s} not measured ({why})"))
            continue
        best = max(ratios.values())
        shown = ", ".join(f"{p} x{r:.2f}" for p, r in ratios.items())
        out.append(_cut(f"  {label:34s} {shown} (>={bar:g}x): "
                        f"{'met' if best >= bar else 'NOT met'}"))
    return out


def budget_targets(cost: Dict[tuple, dict]) -> List[str]:
    """Issue 24's counted budgets (block scope, triton), from the step-cost file."""
    out = []
    for mode, launches, gb in (("eval", 120, 4.5), ("train", 700, 20.0)):
        r = cost.get(("block-triton", mode))
        if r is None:
            out.append(f"  {'block-triton ' + mode + ' launches, GB':34s} not counted")
            continue
        n, g = int(float(r["launches"])), float(r["gb"])
        out.append(f"  {'block-triton ' + mode + ' launches, GB':34s} {n}, {g:.1f} "
                   f"(<={launches}, <={gb:g}): "
                   f"{'met' if n <= launches and g <= gb else 'NOT met'}")
    return out


def dispatch_section(path: Path) -> List[str]:
    if not path.exists():
        return ["dispatcher: no dispatch.txt (the step did not run)"]
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if ln.startswith(("agreement:", "decisions:"))]
    return ["dispatcher (dispatch.txt):"] + ["  " + _cut(ln, WIDTH - 2) for ln in lines] + (
        [] if lines else ["  no agreement lines (tune did not finish?)"])


def baseline_section(rows: Optional[List[dict]]) -> List[str]:
    """The same rows in the 2026-11-30 H200 run (attention scope, first-generation
    kernels): eager and accelerated, eval and train."""
    old = _rows(BASELINE_DIR / "bench" / "models_quick.csv")
    if old is None:
        return [f"vs 2026-11-30: {BASELINE_DIR} not found"]
    out = [f"vs 2026-11-30 (NVIDIA H200, commit e4e1ada, {BASELINE_DIR.name}/bench/"
           f"models_quick.csv): ms then -> now"]
    for mode in ("eval", "train"):
        parts = []
        for p in ("eager", "accelerated"):
            then, now = _ms(old, mode=mode, provider=p), _ms(rows or [], mode=mode, provider=p)
            parts.append(f"{p} {f'{then:.2f}' if then else '-'} -> {f'{now:.2f}' if now else '-'}")
        r_then = _x(_ms(old, mode=mode, provider="eager"), _ms(old, mode=mode,
                                                                provider="accelerated"))
        name, best = _best(rows or [], mode, False)
        r_now = _x(_ms(rows or [], mode=mode, provider="eager"), best)
        out.append(_cut(f"  {mode:5s} {'; '.join(parts)}; vs eager {r_then} -> best "
                        f"{r_now} ({name or '-'})"))
    return out


def profile_section(log: Path, top: int = 3) -> List[str]:
    """The profile step's headers (wall and kernel ms per step) and top categories, from
    its part of log.txt."""
    if not log.exists():
        return ["profile: no log.txt"]
    text = log.read_text(errors="replace")
    m = re.search(r"^== profile .*?$(.*?)^profile exit", text, re.M | re.S)
    if not m:
        return ["profile: no profile step in log.txt"]
    out = ["profile (log.txt): ms per step, kernels' ms, top categories of device time"]
    lines = m.group(1).splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("== "):
            fields = ln[3:].split(" | ")
            keep = [f for f in fields[1:] if re.search(r"backend|fused|ms/step|failed", f)]
            out.append(_cut("  " + " | ".join(fields[:1] + keep)))
        elif ln.startswith("by category"):
            cats = [x.strip() for x in lines[i + 1:i + 1 + top] if x.startswith("  ")]
            out.append(_cut("    " + "; ".join(re.sub(r"\s+", " ", c) for c in cats)))
    return out


def host_section(path: Path) -> List[str]:
    """Our Python per FusedBlock call on the session machine's CPU (``benchmarks.overhead
    --module block``, kernels stubbed): triton over eager, with issue 24's host targets."""
    rows = _rows(path)
    if not rows:
        return ["host us per FusedBlock call (benchmarks.overhead): no rows (not run, or "
                "stopped at the end)"]
    out = ["host us per FusedBlock call on this machine's CPU (benchmarks.overhead --module "
           "block, kernels stubbed):"]
    for call, target in (("eval forward", 0.4), ("train forward+backward", 0.5)):
        ours = _num((_find(rows, backend="triton", call=call) or {}).get("us_per_call"))
        eager = _num((_find(rows, backend="eager", call=call) or {}).get("us_per_call"))
        if ours is None or not eager:
            out.append(f"  {call}: missing")
            continue
        ratio = ours / eager
        out.append(f"  {call}: triton {ours:.0f} us, eager {eager:.0f} us: {ratio:.2f}x "
                   f"(target <= {target}: {'met' if ratio <= target else 'NOT met'})")
    return out


def _gpu(info_head: List[str]) -> str:
    text = " ".join(info_head)
    return next((g for g in ("H200", "H100", "A100") if g in text), "H100")


def summarize(out_dir: Path, step_cost: Optional[Path] = None) -> str:
    info = out_dir / "info.txt"
    head = info.read_text(errors="replace").splitlines()[:3] if info.exists() else [
        "no info.txt"]
    commit = (re.search(r"commit (\S+)", head[0]) or [None, "unknown"])[1]
    gpu = _gpu(head)
    models = _rows(out_dir / "bench" / "models_quick.csv")
    blocks = _rows(out_dir / "bench" / "blocks_quick.csv")
    shape = (tuple(models[0][k] for k in ("model", "img", "batch", "dtype")) if models
             else ("cvt_13", "224", "64", "bfloat16"))
    device = (models or blocks or [{}])[0].get("device") or "no rows"
    cost, cost_note = step_cost_rows(
        [p for p in (step_cost, out_dir / "bench" / "step_cost.csv") if p is not None],
        shape, commit)
    parts = [["cvt_kernels GPU session summary"] + ["  " + h for h in head],
             steps_section(out_dir / "log.txt"),
             tests_section(out_dir / "tests_gpu.txt"),
             models_section(models, cost, cost_note, gpu),
             blocks_section(blocks),
             dispatch_section(out_dir / "dispatch.txt"),
             host_section(out_dir / "bench" / "overhead_block.csv"),
             [f"targets (../shared/docs/performance.md and issue 24, stated for an H100; this run: "
              f"{device}; launches and GB: counted):"]
             + model_targets(models) + block_targets(blocks) + budget_targets(cost),
             baseline_section(models),
             profile_section(out_dir / "log.txt")]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


# ---------------------------------------------------------------------------- decisions
_NOT_CALL = {"op", "candidates", "autocast", "cublas_tf32", "cudnn_tf32", "fp32_matmul",
             "torch", "triton", "cvt_kernels", "code", "device"}


def _decisions(path: Path) -> Dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable decisions file ({exc})") from None
    entries = data.get("decisions", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and "choice" in v}


def _call_text(key: str) -> Tuple[str, str]:
    try:
        parsed = json.loads(key)
    except ValueError:
        return "?", key
    if not isinstance(parsed, dict):
        return "?", key
    return str(parsed.get("op")), " ".join(f"{k}={v}" for k, v in parsed.items()
                                           if k not in _NOT_CALL)


def _evidence(entry: dict) -> str:
    texts = []
    for name in entry.get("candidates", []):
        if name in entry.get("excluded", {}):
            texts.append(f"{name}: excluded ({str(entry['excluded'][name])[:80]})")
            continue
        t = entry.get("times_ms", {}).get(name)
        text = f"{name}: {t:.3f} ms" if isinstance(t, (int, float)) else name
        if name in entry.get("errors", {}):
            text += f", err {entry['errors'][name]}"
        if isinstance(entry.get("harness_ms", {}).get(name), (int, float)):
            text += f", harness {entry['harness_ms'][name]:.2f} ms"
        texts.append(text)
    return "; ".join(texts)


def decisions_report(labelled: Sequence[Tuple[str, Path]]) -> str:
    """Each file's decisions (op, call, choice, evidence), then the ``agreement:`` line of the
    first file against each other one: keys in common, same choice, and for each difference
    both choices' evidence (a flip between two candidates within noise of each other is
    harmless; one between far-apart times is a timing bug)."""
    tables: Dict[str, Dict[str, dict]] = {}
    lines: List[str] = []
    for label, path in labelled:
        try:
            tables[label] = _decisions(path) if path.exists() else {}
        except ValueError as exc:
            lines.append(f"== {label}: {exc}")
            continue
        found = tables[label]
        lines.append(f"== {label}: {path}: {len(found)} decisions" + (
            "" if found else " (none: nothing measured, e.g. on CPU)"))
        for key, entry in sorted(found.items(), key=lambda kv: _call_text(kv[0])):
            op, call = _call_text(key)
            lines.append(f"  {op}: {call}\n      -> {entry['choice']} ({entry.get('source')}); "
                         f"{_evidence(entry)}")
        choices = {}
        for entry in found.values():
            choices[entry["choice"]] = choices.get(entry["choice"], 0) + 1
        lines.append(f"decisions: {label}: {len(found)} keys; chosen "
                     + (", ".join(f"{c} {n}" for c, n in sorted(choices.items())) or "none"))
    labels = list(tables)
    for a, b in ((labels[0], other) for other in labels[1:]):
        common = sorted(set(tables[a]) & set(tables[b]))
        differ = [k for k in common if tables[a][k]["choice"] != tables[b][k]["choice"]]
        verdict = ("no keys in common" if not common else
                   "agree" if not differ else f"{len(differ)} differ")
        lines.append(f"agreement: {a} vs {b}: {len(common)} keys in common, "
                     f"{len(common) - len(differ)} same choice: {verdict}")
        for k in differ:
            op, call = _call_text(k)
            ta, tb = tables[a][k], tables[b][k]
            lines.append(_cut(f"  differ {op} {call}: {a} {ta['choice']} ({_evidence(ta)})"
                              f" / {b} {tb['choice']} ({_evidence(tb)})", 400))
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    if argv[:1] == ["--decisions"]:
        pairs = [a.partition("=") for a in argv[1:]]
        if not pairs or any(not sep or not label or not path for label, sep, path in pairs):
            print("usage: python -m benchmarks.summarize --decisions LABEL=FILE [...]",
                  file=sys.stderr)
            return 2
        print(decisions_report([(label, Path(path)) for label, _, path in pairs]), end="")
        return 0
    step_cost = None
    if "--step-cost" in argv:
        i = argv.index("--step-cost")
        if i + 1 >= len(argv):
            print("--step-cost: expected a CSV path", file=sys.stderr)
            return 2
        step_cost = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 1:
        print(__doc__)
        return 2
    out_dir = Path(argv[0])
    text = summarize(out_dir, step_cost)
    (out_dir / "summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
