"""Markdown tables of benchmark results, from rows (:func:`write_markdown`) or from a results
CSV (:func:`markdown_from_csv`). Below both ``common`` (which writes results) and ``plot``
(which rebuilds a missing table), so neither imports the other's caller.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List


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


STAMP_KEYS = ("device", "torch", "triton", "cuda", "commit", "one_pass", "date", "command")
TITLES = {"attention_core": "Attention core: CvT stage shapes",
          "conv_projection": "q/k/v convolutional projection",
          "blocks": "Attention blocks: CvT stage shapes", "models": "Whole CvT models: images/s"}


def markdown_from_csv(csv_path: Path) -> Path:
    """``<stem>.md`` rebuilt from a results CSV (its stamp columns become the header), for
    files written with ``--no-md`` (the GPU machine returns at most 8 files)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    meta = {k: rows[0][k] for k in STAMP_KEYS if rows and k in rows[0]}
    body = [{k: v for k, v in r.items() if k not in STAMP_KEYS} for r in rows]
    level = next((t for k, t in TITLES.items() if csv_path.stem.startswith(k)), csv_path.stem)
    path = csv_path.with_suffix(".md")
    write_markdown(path, level, meta, body)
    return path
