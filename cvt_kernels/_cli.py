"""What every command of this package has in common (``python -m cvt_kernels.convert``, the
scripts in ``python/``, ``python -m benchmarks.run``): an error a user can fix is one line
on stderr that says what is wrong and what to do, with exit code 2 for usage (a bad option
value, a wrong file given) and 1 for a failure while running; ``--debug`` shows the
traceback instead. Help texts keep the description's line breaks and show the defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Iterable, List, Optional, Sequence

__all__ = ["ArgumentParser", "UsageError", "check_device", "existing_file", "run",
           "safe_torch_load", "writable_path"]

USAGE_EXIT = 2
FAILURE_EXIT = 1
# A runtime error's text beyond this is cut (at a word): load_state_dict's can run to
# kilobytes, and one screen line is what the user reads.
MAX_MESSAGE = 400


class UsageError(Exception):
    """The user asked for something that cannot work (exit code 2); the message says what to
    do instead."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example commands), every option's default shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text
                and action.default not in (None, False, "", argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (exit code 2) and a ``--debug`` option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="on an error, show the Python traceback instead of one line")

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ... (--debug shows all of it)"


def run(main: Callable[[List[str]], int], argv: Optional[Sequence[str]], prog: str) -> int:
    """``main(argv)``'s exit code; its exceptions become one line on stderr and exit code 2
    (:class:`UsageError`) or 1 (anything else), unless ``--debug`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- every failure ends as one line, by design
        if debug:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return FAILURE_EXIT


def existing_file(path: str, option: str) -> str:
    """``path``, or a :class:`UsageError` naming ``option`` when there is no such file."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path}: no such file")
    return path


def writable_path(path: str, option: str) -> str:
    """``path``, or a :class:`UsageError` when its directory does not exist or it is one."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    return path


def check_device(name: str, option: str = "--device"):
    """``torch.device(name)``, or a :class:`UsageError` when this machine has no such device."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {name!r}: not a device name; use cpu or cuda (cuda:N)") \
            from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU build" if torch.version.cuda is None
               else "torch.cuda.is_available() is False")
        raise UsageError(f"{option} {name}: no CUDA device here ({why}, torch "
                         f"{torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) "
                         f"here (cuda:0 ...)")
    return device


def safe_torch_load(path: str, map_location="cpu", allowed: Iterable[type] = ()):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, ``None`` and
    containers of them (plus the classes in ``allowed``, for this call only). Every file the
    package and the scripts in ``python/`` read goes through here (``tests/
    test_checkpoint_security.py``), so a file can never run code when it is read: a pickle of
    anything else is refused before it is built. Raises a
    ``ValueError`` saying what the file holds (without its name: the caller adds the option
    and path)."""
    import torch

    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- every reason becomes one ValueError
            refused = unsafe_pickle_message(exc)
            if refused:
                raise ValueError(refused) from exc
            raise ValueError(f"not a torch.save file ({type(exc).__name__}: "
                             f"{one_line(exc, 120)})") from exc


def unsafe_pickle_message(exc: BaseException) -> Optional[str]:
    """When ``exc`` is ``torch.load(weights_only=True)`` refusing a file (a pickle of code or
    of a class it does not know, or bytes that are no pickle at all), what to tell the user,
    in one sentence; else ``None``."""
    text = str(exc)
    if "weights_only" not in text and "Weights only" not in text:
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found is None and "Unsupported operand" in text:  # bytes no pickler wrote
        operand = re.search(r"Unsupported operand \S+", text).group(0)
        return (f"not a torch.save file (safe loading, torch.load with weights_only=True, "
                f"stopped at: {operand}), so nothing in it was run")
    what = f" ({found.group(1)})" if found else ""
    return (f"holds Python objects{what} that safe loading (torch.load with weights_only=True) "
            f"refuses, so nothing in it was run; if you trust the file, load it with "
            f"torch.load(path, weights_only=False) and torch.save only its tensors")
