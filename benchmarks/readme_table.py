"""The performance page's headline table, rendered from a committed model-level results file.

    python -m benchmarks.readme_table benchmarks/results/cpu/models_cvt_13_224_float32.csv
    python -m benchmarks.readme_table RESULTS.csv --write    # put it into docs/performance.md
    python -m benchmarks.readme_table RESULTS.csv --check    # exit 1 if the page differs

Prints the table; ``--write`` rewrites :data:`DOC` (``--readme`` names another file) between
``<!-- perf-table:begin -->`` and ``<!-- perf-table:end -->`` and nothing else.
``tests/test_benchmarks.py`` renders the file the page names and compares, so the table
cannot drift from its data: to change a number, commit a new results file and rerun this
with ``--write``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
#: The page that holds the table (README.md's first screen links it).
DOC = "docs/performance.md"
# Headline providers, beside eager, when they ran: the user's one call, and the compiler.
HEADLINE = ("accelerated", "compile")


def render(csv_path: str) -> str:
    """The Markdown between the markers (markers excluded), from ``csv_path`` (relative to
    the repository root)."""
    rows = list(csv.DictReader(open(ROOT / csv_path, newline="")))
    ok = [r for r in rows if r["status"] == "ok"]
    shown = [p for p in HEADLINE if any(r["provider"] == p for r in ok)]
    groups: List[tuple] = []
    for r in rows:
        key = (r["model"], r["img"], r["dtype"], r["mode"], r["batch"])
        if key not in groups:
            groups.append(key)
    head = "| model | size | dtype | mode | batch | eager img/s |"
    for p in shown:
        head += f" {p} img/s | vs eager | {p} rel. err |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for key in groups:
        by = {r["provider"]: r for r in ok if
              (r["model"], r["img"], r["dtype"], r["mode"], r["batch"]) == key}
        if "eager" not in by:
            continue
        model, img, dtype, mode, batch = key
        mode_name = "inference (eval)" if mode == "eval" else "train step (fwd+bwd+AdamW)"
        line = (f"| {model} | {img} | {dtype} | {mode_name} | {batch} | "
                f"{by['eager']['images_per_s']} |")
        for p in shown:
            r = by.get(p)
            err = r["rel_err"] + (f" (eager {r['eager_err']})" if r and r.get("eager_err") else
                                  "") if r else ""
            line += (f" {r['images_per_s']} | {float(r['vs_eager']):.2f}x | {err} |"
                     if r else " - | - | - |")
        lines.append(line)
    first = rows[0]
    md = Path(csv_path).with_suffix(".md").as_posix()
    return "\n".join([
        f"Rendered by `python -m benchmarks.readme_table {Path(csv_path).as_posix()}`",
        f"from [`{md}`](../{md})",  # the link is relative to docs/
        f"({first['device']}, torch {first['torch']}, commit {first['commit']}, "
        f"{first['date']}); medians;",
        ("`rel. err`: max |diff| / max |truth| of the logits against a higher-precision truth "
         "(float32 for half dtypes), eager's own in parentheses; in training after one step "
         "(every gradient and running statistic passed the 2x rule too), checked before timing."
         if first.get("eager_err") else
         "`rel. err`: max |diff| / max |eager| of the logits (eval) or of the first step's "
         "loss (train), checked before timing."),
        "",
        *lines,
    ])


def _span(readme_text: str):
    begin, end = readme_text.find(BEGIN), readme_text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return begin + len(BEGIN), end


def block(readme_text: str) -> str:
    """What the README holds between the markers (without the newlines next to them)."""
    begin, end = _span(readme_text)
    return readme_text[begin:end].strip("\n")


def source_of(readme_text: str) -> str:
    """The results file the README's table says it was rendered from."""
    return re.search(r"python -m benchmarks\.readme_table (\S+?)`", block(readme_text)).group(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_table",
                                description=__doc__.splitlines()[0])
    p.add_argument("csv", help="a model-level results file, relative to the repository root")
    p.add_argument("--readme", default=str(ROOT / DOC),
                   help="the Markdown file holding the table")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true",
                        help="rewrite the table in --readme (default: print it only)")
    action.add_argument("--check", action="store_true",
                        help="compare only; exit 1 if it differs")
    args = p.parse_args(argv)
    new = render(args.csv)
    if not (args.write or args.check):  # editing a tracked file is what the user asks for
        print(new)
        print(f"(printed only: --write puts it into {args.readme})", file=sys.stderr)
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    if args.check:
        same = block(text) == new
        print(f"the table in {readme} is up to date" if same
              else f"the table in {readme} differs from {args.csv}")
        return 0 if same else 1
    begin, end = _span(text)
    readme.write_text(text[:begin] + "\n" + new + "\n" + text[end:])
    print(f"rewrote the table in {readme} from {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
