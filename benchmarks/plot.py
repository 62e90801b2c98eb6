"""Plots from a results CSV, so a PNG can always be re-made from the committed data.

    python -m benchmarks.plot benchmarks/results/cpu/models_cvt_13_224.csv [more.csv ...]

Writes ``<csv stem>.png`` beside each file (and ``<csv stem>.md`` where it is missing:
the GPU session writes CSVs only). Model-level files (an ``images_per_s`` column):
images/s against batch, one line per provider, one panel per (model, size, dtype, mode).
Op and block files: speed-up over ``eager`` per shape, one bar per provider, one panel per
(dtype, mode). matplotlib is optional (``pip install -e ".[bench]"``): without it nothing is
drawn and the reason is returned/printed, the CSV and Markdown are unaffected.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def _load(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _panels(rows: List[dict], keys: Tuple[str, ...]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(k, "") for k in keys)].append(r)
    return dict(out)


def _model_panel(ax, rows: List[dict]) -> None:
    lines: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            lines[r["provider"]].append((int(r["batch"]), float(r["images_per_s"])))
    for provider, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
    batches = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch")
    ax.set_ylabel("images/s")


def _speedup_panel(ax, rows: List[dict]) -> None:
    shapes: List[str] = []
    bars: Dict[str, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        shape = f"{r.get('model', '')} {r.get('img', '')} s{r.get('stage', '')} b{r.get('batch', '')}"
        if shape not in shapes:
            shapes.append(shape)
        if r["status"] == "ok" and r.get("vs_eager"):
            bars[r["provider"]][shape] = float(r["vs_eager"])
    width = 0.8 / max(1, len(bars))
    for i, (provider, values) in enumerate(sorted(bars.items())):
        xs = [j + i * width for j, s in enumerate(shapes) if s in values]
        ax.bar(xs, [values[s] for s in shapes if s in values], width, label=provider)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over eager")


def plot_csv(csv_path, png_path=None) -> Optional[str]:
    """Draws ``csv_path`` into ``png_path`` (default: beside it). Returns None when written,
    else the reason it was not (no matplotlib, nothing that ran)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not importable ({exc}); pip install -e \".[bench]\""
    csv_path = Path(csv_path)
    rows = _load(csv_path)
    if not any(r.get("status") == "ok" for r in rows):
        return "no row ran"
    model_level = "images_per_s" in rows[0]
    keys = ("model", "img", "dtype", "mode") if model_level else ("dtype", "mode")
    panels = _panels(rows, keys)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, panel_rows) in zip(axes[0], panels.items()):
        (_model_panel if model_level else _speedup_panel)(ax, panel_rows)
        ax.set_title(" ".join(str(k) for k in key), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"{csv_path.stem}: {first.get('device', '?')}, commit {first.get('commit', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path or csv_path.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return None


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    status = 0
    for path in argv:
        if not Path(path).with_suffix(".md").exists():  # written with --no-md
            from .results_md import markdown_from_csv

            print(f"{path}: wrote {markdown_from_csv(Path(path))}")
        reason = plot_csv(path)
        print(f"{path}: " + ("wrote " + str(Path(path).with_suffix(".png")) if reason is None
                             else f"no plot: {reason}"))
        status |= reason is not None
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
