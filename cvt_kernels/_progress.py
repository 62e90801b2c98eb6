"""Progress on stderr for commands that can run longer than ~10 s.

A newcomer's first command once ran 8 minutes with long silent stretches: every such command
now says what it is doing, step n of m, and the time elapsed, on stderr (stdout keeps the
results), and a long step says it is still going at most every :data:`HEARTBEAT_S`.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

#: A step running longer than this prints a "still ..." line (seconds).
HEARTBEAT_S = 10.0


class Progress:
    """``step(what)`` starts step n of ``total``; ``tick(detail)`` inside a long step prints
    at most every :data:`HEARTBEAT_S` seconds; ``done()`` prints the total time."""

    def __init__(self, prog: str, total: Optional[int] = None, stream: Optional[TextIO] = None,
                 enabled: bool = True):
        self.prog, self.total, self.enabled = prog, total, enabled
        self.stream = stream
        self.start = time.monotonic()
        self.n = 0
        self.what = ""
        self._last = self.start

    def _print(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.prog} {time.monotonic() - self.start:6.1f} s] {text}",
                  file=self.stream or sys.stderr, flush=True)
        self._last = time.monotonic()

    def step(self, what: str) -> None:
        self.n += 1
        self.what = what
        of = f"/{self.total}" if self.total else ""
        self._print(f"{self.n}{of} {what}")

    def tick(self, detail: str = "") -> None:
        if time.monotonic() - self._last >= HEARTBEAT_S:
            self._print(f"  still {self.what}" + (f": {detail}" if detail else ""))

    def done(self, what: str = "done") -> None:
        self._print(what)


__all__ = ["HEARTBEAT_S", "Progress"]
