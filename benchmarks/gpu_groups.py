"""The GPU session's test groups collected, not run, in one process (the dry run's check).

    python -m benchmarks.gpu_groups FILE

``FILE`` holds one group per line: its name, then its pytest arguments, shell-quoted (what
``benchmarks/gpu_session.sh``'s ``test_group`` writes under ``DRY_RUN=1``). Each group is
printed as a real run prints it (``== NAME (collect only)``, pytest's output, ``exit N``;
``exit 5``: the selection found no test), so ``benchmarks.summarize`` reads both alike. One
process instead of one per group: a start of Python, torch and the test modules costs
several seconds on a CI machine, and on CPU every GPU test would be skipped anyway.
Run it with ``TRITON_INTERPRET=1``, so that the Triton test modules import instead of
skipping themselves whole, and their ``-k`` selections are checked too.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import List


def collect(lines: List[str]) -> int:
    """Collects every group; returns how many found no test or failed to collect."""
    import pytest

    bad = 0
    for line in lines:
        if not line.strip():
            continue
        name, *args = shlex.split(line)
        print(f"== {name} (collect only, started {time.strftime('%H:%M:%S', time.gmtime())})",
              flush=True)
        start = time.monotonic()
        rc = int(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args]))
        print(f"exit {rc} ({time.monotonic() - start:.0f} s)", flush=True)
        bad += rc != 0
    return bad


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        return 1 if collect(f.read().splitlines()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
