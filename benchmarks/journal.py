"""Rows of a benchmark level, journaled as they are measured, so a crash costs one row.

A kernel that faults on the GPU (an illegal address, say) leaves the process's CUDA context
unusable: every later call fails, eager PyTorch's included. ``benchmarks.run`` therefore
runs a level in a worker process that appends to a JSON-lines journal before and after each
row; when the worker stops early, the supervisor starts a new one on the same journal:

* a row that finished is reused as it is;
* a row that started and never finished (the process died: a segfault, ``os._exit``, a
  timeout's kill) is recorded as ``crashed: the worker process died while this row ran``;
* a row whose provider crashed earlier in the run is not attempted again: ``skipped``, with
  the row where it crashed (so one broken kernel costs one restart, not one per shape).

Rows are plain dicts; a row's identity is the fields it has when it starts (model, shape,
dtype, mode, batch, provider...), its result the fields added when it finishes.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Tuple

DIED = "crashed: the worker process died while this row ran"


def _key(identity: dict) -> str:
    return json.dumps(sorted((k, str(v)) for k, v in identity.items()))


def _where(row: dict) -> str:
    skip = {"provider", "status"}
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip and v is not None)


class Journal:
    """One level's journal (``path`` None: nothing is written, nothing is resumed)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.done: Dict[str, dict] = {}
        self.crashed: Dict[str, str] = {}  # provider -> the row where it crashed
        if path and os.path.exists(path):
            self._load(path)

    def _load(self, path: str) -> None:
        pending: Dict[str, dict] = {}
        with open(path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash itself
                    continue
                if event["event"] == "start":
                    pending[_key(event["row"])] = event["row"]
                elif event["event"] == "row":
                    identity = event["identity"]
                    pending.pop(_key(identity), None)
                    self._finish(identity, event["row"])
                elif event["event"] == "exit":  # the supervisor saw the worker die
                    for key, identity in pending.items():
                        self._finish(identity, {**identity,
                                                "status": f"{DIED} ({event['how']})"})
                    pending.clear()

    def _finish(self, identity: dict, row: dict) -> None:
        self.done[_key(identity)] = row
        if str(row.get("status", "")).startswith("crashed"):
            self.crashed.setdefault(str(identity.get("provider")), _where(identity))

    def _append(self, event: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def lookup(self, identity: dict) -> Optional[dict]:
        """The finished row of ``identity``, or a skipped row for a provider that crashed
        earlier in this run; None: run it."""
        row = self.done.get(_key(identity))
        if row is not None and not str(row.get("status", "")).startswith("pending"):
            return row
        where = self.crashed.get(str(identity.get("provider")))
        if where is not None:
            return {**identity, "status": f"skipped: this provider crashed the CUDA context "
                                          f"earlier in this run ({where})"}
        return None

    def start(self, identity: dict) -> None:
        self._append({"event": "start", "row": identity})

    def finish(self, identity: dict, row: dict) -> None:
        self._finish(identity, row)
        self._append({"event": "row", "identity": identity, "row": row})

    def all_done(self, identities: List[dict]) -> bool:
        return all(self.lookup(i) is not None for i in identities)


def mark_exit(path: str, how: str) -> bool:
    """Appends the supervisor's note that the worker stopped (``how``); True when a row was
    left unfinished (then a new worker can go on past it)."""
    if not os.path.exists(path):
        return False
    started, finished = set(), set()
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event["event"] == "start":
                started.add(_key(event["row"]))
            elif event["event"] == "row":
                finished.add(_key(event["identity"]))
            elif event["event"] == "exit":
                started.clear()
                finished.clear()
    unfinished = bool(started - finished)
    if unfinished:
        with open(path, "a") as f:
            f.write(json.dumps({"event": "exit", "how": how}) + "\n")
    return unfinished


def run_row(journal: Journal, identity: dict, measure: Callable[[], dict]
            ) -> Tuple[dict, bool]:
    """The row of ``identity`` and whether it was measured now: from the journal if it is
    there, else measured (``measure`` returns the result fields, failures as a status) and
    journaled before and after."""
    known = journal.lookup(identity)
    if known is not None:
        return dict(known), False
    journal.start(identity)
    row = {**identity, **measure()}
    journal.finish(identity, row)
    return row, True


def crashed_now(row: dict, measured: bool) -> bool:
    """A row measured in this process that lost the CUDA context: save, then hand over."""
    return measured and str(row.get("status", "")).startswith("crashed")


__all__ = ["DIED", "Journal", "crashed_now", "mark_exit", "run_row"]
