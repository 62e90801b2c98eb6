"""The decisions file of the measured dispatch: where it lives, how it is read and written.

:mod:`cvt_kernels.dispatch` keeps each decision (the chosen backend and its evidence) for
later processes in one JSON file, ``{"format": 1, "decisions": {key: entry}}``, an entry
being a plain dict of the fields in :data:`FIELDS`. The file is a cache: whatever it holds,
whatever it is, a model never fails, hangs or loses a user's file over it.

- **Where** (:func:`cache_path`): ``CVT_KERNELS_DISPATCH_CACHE=PATH``, or ``off`` (``0``,
  ``none``, ``false``, ``no``) to keep decisions in memory; by default ``dispatch.json`` in
  :func:`cache_dir`: ``$XDG_CACHE_HOME/cvt_kernels``, else ``$HOME/.cache/cvt_kernels``,
  else (``HOME`` unset, empty or relative: a service, a container, ``env -i``)
  ``<tempdir>/cvt_kernels-<uid>``, which must be this user's own directory and writable by
  nobody else (else caching is off, with one warning), since a decision read from the file
  is not checked again. A temporary directory rather than ``/.cache`` or caching off: the
  cost of measuring is paid once per boot instead of once per process.
- **Read** (:func:`load`, :func:`entries`): only a regular file (stat before opening,
  opened non-blocking: a FIFO or a device never hangs a forward) of at most
  :data:`MAX_BYTES`, parsed at most once per process and version of the file (device,
  inode, size, times). Each entry is checked against :data:`FIELDS`; malformed ones are
  skipped. Any problem (not JSON, nested too deep, too big, not a regular file, malformed
  entries) gives one ``RuntimeWarning`` naming the file per version of the file, and what
  cannot be parsed counts as empty.
- **Written** (:func:`store`): one entry merged into the file, one line per entry (an
  unchanged entry is not rewritten; malformed ones are dropped), through a temporary file
  beside it renamed over it (atomic; removed on any failure), under an advisory lock in
  :func:`cache_dir` (never beside a user's path), keeping an existing file's permission
  bits. A new file gets 0644 minus the umask: decisions are not secret (shapes, GPU model,
  times), but nobody else may change them. A path that exists and is not a regular file (a
  symlink, a directory, a FIFO) is never replaced nor written through: one warning, and the
  decisions stay in memory. Past :data:`MAX_BYTES` the oldest entries are dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

try:
    import fcntl
except ImportError:  # Windows: the atomic replace alone (a concurrent entry may be lost)
    fcntl = None

#: Path of the JSON file of decisions; one of :data:`OFF` keeps them in memory.
CACHE_ENV = "CVT_KERNELS_DISPATCH_CACHE"
OFF = ("off", "0", "none", "false", "no")
#: A bigger file is neither parsed nor grown (a CvT-13 key's entry is ~0.6 kB).
MAX_BYTES = 4 * 2**20
FILE_FORMAT = 1
FILE_NAME = "dispatch.json"
LOCK_NAME = "dispatch.lock"
NEW_FILE_MODE = 0o644


class Kind(NamedTuple):
    """A JSON value's expected type: its name in messages and its check."""
    name: str
    check: Callable[[object], bool]


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v: object) -> bool:
    return isinstance(v, str)


STR = Kind("str", _text)
STR_LIST = Kind("list[str]", lambda v: isinstance(v, list) and all(map(_text, v)))
FLOAT_MAP = Kind("dict[str, float]", lambda v: isinstance(v, dict)
                 and all(_text(k) and _number(x) for k, x in v.items()))
STR_MAP = Kind("dict[str, str]", lambda v: isinstance(v, dict)
               and all(_text(k) and _text(x) for k, x in v.items()))

#: An entry's fields: name -> (kind, required). A field the dispatcher adds is one line here.
#: Unknown fields in the file (a newer version's) are ignored on reading and kept on writing;
#: :func:`store` refuses them, so that a new field is declared here before it is written.
FIELDS: Dict[str, tuple] = {
    "choice": (STR, True),
    "source": (STR, True),
    "candidates": (STR_LIST, True),
    "times_ms": (FLOAT_MAP, True),
    "errors": (STR_MAP, True),
    "excluded": (STR_MAP, True),
    "date": (STR, False),
    "harness_ms": (FLOAT_MAP, False),
    "digest": (STR, False),
}


def entry_problem(entry: object, strict: bool = False) -> Optional[str]:
    """Why ``entry`` is not a valid decision entry (``None`` when it is); ``strict`` also
    refuses fields that :data:`FIELDS` does not declare."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for name, (kind, required) in FIELDS.items():
        if name not in entry:
            if required:
                return f"no {name!r}"
        elif not kind.check(entry[name]):
            return f"{name!r} is not {kind.name} (got {type(entry[name]).__name__})"
    unknown = sorted(set(entry) - set(FIELDS))
    if strict and unknown:
        return (f"undeclared field(s) {', '.join(map(repr, unknown))}: declare each in "
                f"cvt_kernels.dispatch_file.FIELDS")
    if entry["choice"] not in entry["candidates"]:
        return f"its choice {entry['choice']!r} is not among its candidates"
    return None


# ------------------------------------------------------------------------- where
def cache_dir() -> Optional[Path]:
    """The package's own cache directory (the default file and the lock live there), or
    ``None`` when no safe one exists (see the module's docstring)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return Path(xdg) / "cvt_kernels"
    home = os.environ.get("HOME", "") if os.name == "posix" else os.path.expanduser("~")
    if os.path.isabs(home):
        return Path(home) / ".cache" / "cvt_kernels"
    return _private_temp_dir()


def cache_path() -> Optional[Path]:
    """The decisions file, or ``None`` when persistence is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    directory = cache_dir()
    return None if directory is None else directory / FILE_NAME


def _private_temp_dir() -> Optional[Path]:
    uid = os.getuid() if hasattr(os, "getuid") else None
    directory = Path(tempfile.gettempdir()) / (f"cvt_kernels-{uid}" if uid is not None
                                               else "cvt_kernels")
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        why = f"cannot be created ({exc})"
    else:
        if not stat.S_ISDIR(st.st_mode):
            why = "is not a directory"
        elif uid is not None and (st.st_uid != uid or st.st_mode & 0o022):
            why = "belongs to another user or is writable by others"
        else:
            return directory
    _warn_once(("tempdir", str(directory)),
               f"HOME is unset or empty and {directory} {why}: dispatch decisions stay in "
               f"memory; set HOME, XDG_CACHE_HOME or {CACHE_ENV}=PATH to keep them")
    return None


# ------------------------------------------------------------------------- reading
class _Snapshot(NamedTuple):
    signature: tuple         # of the version parsed; () when there was no file
    entries: Dict[str, dict]  # the valid entries, as in the file
    dropped: int             # malformed entries skipped


_EMPTY = _Snapshot((), {}, 0)
_LOCK = threading.RLock()
_SNAPSHOTS: Dict[str, _Snapshot] = {}  # absolute path -> its last parsed version
_WARNED: set = set()


def load(key: str) -> Optional[dict]:
    """The valid entry stored under ``key`` (a copy, with the fields of :data:`FIELDS`), or
    ``None``: no file, no such entry, or a malformed one."""
    path = cache_path()
    if path is None:
        return None
    with _LOCK:
        entry = _snapshot(path).entries.get(key)
    return None if entry is None else _known(entry)


def entries() -> Dict[str, dict]:
    """Every valid entry of the file by key (copies, for listings), empty when off."""
    path = cache_path()
    if path is None:
        return {}
    with _LOCK:
        stored = _snapshot(path).entries
    return {key: _known(entry) for key, entry in stored.items()}


def forget() -> None:
    """Forget what this process parsed and warned about (the file stays)."""
    with _LOCK:
        _SNAPSHOTS.clear()
        _WARNED.clear()


def _known(entry: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in entry.items() if k in FIELDS}


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _snapshot(path: Path) -> _Snapshot:
    """The file's valid entries, parsed at most once per version of the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _EMPTY
    except OSError as exc:
        _warn_once((str(path), "stat"), f"cannot read the dispatch decisions file {path} "
                   f"({exc}); it is ignored")
        return _EMPTY
    name = os.path.abspath(path)
    hit = _SNAPSHOTS.get(name)
    if hit is None or hit.signature != _signature(st):
        hit = _SNAPSHOTS[name] = _parse(path, st)
    return hit


def _parse(path: Path, st: os.stat_result) -> _Snapshot:
    refused = _Snapshot(_signature(st), {}, 0)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device worse
        _warn(f"{path} is not a regular file ({_kind(st.st_mode)}): it is ignored")
        return refused
    if st.st_size > MAX_BYTES:
        _warn(f"{path} is larger than {MAX_BYTES} bytes ({st.st_size}): it is ignored "
              f"(and replaced at the next store)")
        return refused
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) |
                     getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, which may have been swapped
            refused = _Snapshot(_signature(st), {}, 0)
            if not stat.S_ISREG(st.st_mode):
                _warn(f"{path} is not a regular file ({_kind(st.st_mode)}): it is ignored")
                return refused
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        _warn(f"cannot read {path} ({exc}): it is ignored")
        return refused
    if len(raw) > MAX_BYTES:
        _warn(f"{path} grew past {MAX_BYTES} bytes while read: it is ignored")
        return refused
    try:
        data = json.loads(raw)
    except RecursionError:
        _warn(f"{path} nests deeper than the JSON parser follows: it is ignored (and "
              f"replaced at the next store)")
        return refused
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        _warn(f"{path} is not JSON ({str(exc)[:80]}): it is ignored (and replaced at the "
              f"next store)")
        return refused
    if (not isinstance(data, dict) or data.get("format") != FILE_FORMAT
            or not isinstance(data.get("decisions"), dict)):
        _warn(f"{path} is not a decisions file of format {FILE_FORMAT}: it is ignored (and "
              f"replaced at the next store)")
        return refused
    valid, bad = {}, {}
    for key, entry in data["decisions"].items():
        why = entry_problem(entry)
        if why is None:
            valid[key] = entry
        else:
            bad[key] = why
    if bad:
        key, why = next(iter(bad.items()))
        _warn(f"{path}: {len(bad)} malformed decision entr{'y' if len(bad) == 1 else 'ies'} "
              f"skipped (and dropped at the next store), e.g. {key[:80]!r}: {why}")
    return _Snapshot(refused.signature, valid, len(bad))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _warn(message: str) -> None:
    # Called once per parsed version of a file: a call per lookup would flood the log.
    warnings.warn(f"cvt_kernels: {message}", RuntimeWarning, stacklevel=5)


def _warn_once(tag: tuple, message: str) -> None:
    with _LOCK:
        if tag in _WARNED:
            return
        _WARNED.add(tag)
    _warn(message)


# ------------------------------------------------------------------------- writing
def store(key: str, entry: dict) -> None:
    """Adds or replaces the entry of ``key`` in the file (``date`` stamped when absent).
    Raises ``TypeError``/``ValueError`` for an invalid key or entry; any trouble with the file
    itself is one warning, and the decision stays in this process's memory."""
    if not isinstance(key, str):
        raise TypeError(f"dispatch_file.store: key must be a str, got {type(key).__name__}")
    why = entry_problem(entry, strict=True)
    if why is not None:
        raise ValueError(f"dispatch_file.store: the entry of {key[:80]!r} is invalid: {why}")
    path = cache_path()
    if path is None:
        return
    entry = {**entry}
    entry.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        with _LOCK, _file_lock():
            _merge(path, key, entry)
    except OSError as exc:  # a read-only home must not fail a model: keep it in memory
        _warn_once((str(path), "write"),
                   f"could not write the dispatch decisions file {path} ({exc}): decisions "
                   f"stay in memory; set {CACHE_ENV}=off or to a writable path")


def _merge(path: Path, key: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        _warn_once((str(path), "not regular"),
                   f"{path} is {_kind(st.st_mode)}, not a regular file: it is never replaced "
                   f"nor written through, and decisions stay in memory; set {CACHE_ENV} to "
                   f"a file's path or off")
        return
    snap = _snapshot(path) if st is not None else _EMPTY
    old = snap.entries.get(key)
    if old is not None and not snap.dropped and _without_date(old) == _without_date(entry):
        return  # the same decision measured again: nothing to write
    merged = {**snap.entries, key: entry}
    text, merged = _serialize(merged, keep=key)
    mode = stat.S_IMODE(st.st_mode) if st is not None else None
    _replace(path, text, mode)
    _SNAPSHOTS[os.path.abspath(path)] = _Snapshot(_signature(os.stat(path)), merged, 0)


def _without_date(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "date"}


def _line(key: str, entry: dict) -> str:
    return f"{json.dumps(key)}: {json.dumps(entry, sort_keys=True)}"


def _dump(decisions: Dict[str, dict]) -> str:
    # One line per decision: readable and diffable, and written by json's C encoder (an
    # indented dump goes through its Python one, ~10x slower on a file of thousands).
    lines = ",\n".join(_line(k, decisions[k]) for k in sorted(decisions))
    return f'{{"format": {FILE_FORMAT}, "decisions": {{\n{lines}\n}}}}\n'


def _serialize(decisions: Dict[str, dict], keep: str) -> tuple:
    """The file's text, and the entries it holds: past :data:`MAX_BYTES`, the oldest ones
    (by date; undated first) are dropped until it is 3/4 of that, so pruning is rare."""
    text = _dump(decisions)
    if len(text.encode()) <= MAX_BYTES:
        return text, decisions
    kept = dict(decisions)
    size = len(text.encode())
    for old in sorted(kept, key=lambda k: kept[k].get("date", "")):
        if size <= MAX_BYTES * 3 // 4:
            break
        if old != keep:
            size -= len(_line(old, kept.pop(old)).encode()) + 2
    text = _dump(kept)
    while len(text.encode()) > MAX_BYTES and len(kept) > 1:  # the estimate fell short
        kept.pop(min((k for k in kept if k != keep), key=lambda k: kept[k].get("date", "")))
        text = _dump(kept)
    return text, kept


def _replace(path: Path, text: str, mode: Optional[int]) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 NEW_FILE_MODE if mode is None else 0o600)  # the umask applies to a new file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if mode is not None and hasattr(os, "fchmod"):
                with contextlib.suppress(OSError):  # a filesystem without modes: 0600 stays
                    os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock():
    """An exclusive advisory lock on :data:`LOCK_NAME` in :func:`cache_dir`, so concurrent
    processes do not lose each other's entries; without one (no ``fcntl``, no usable cache
    directory) the atomic replace still keeps the file whole."""
    fd = None
    directory = cache_dir() if fcntl is not None else None
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT |
                         getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


__all__ = ["CACHE_ENV", "FIELDS", "MAX_BYTES", "OFF", "cache_dir", "cache_path", "entries",
           "entry_problem", "forget", "load", "store"]
