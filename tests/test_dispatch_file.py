"""The decisions file (cvt_kernels.dispatch_file, through cvt_kernels.dispatch): hostile
contents and paths are one warning, never an error, a hang or a replaced user file."""

import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import warnings

import pytest
import torch

from cvt_kernels import dispatch, dispatch_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The decisions file at ``tmp_path/user/d.json``; the package's cache directory (the
    lock's) at ``tmp_path/cache/cvt_kernels``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "user" / "d.json"
    path.parent.mkdir()
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    dispatch_file.forget()
    return path


def entry(choice="torch", **extra):
    return {"choice": choice, "source": "measured", "candidates": ["torch", "triton"],
            "times_ms": {"torch": 1.0, "triton": 2.0}, "errors": {"torch": "1e-3"},
            "excluded": {}, **extra}


def write(path, decisions, fmt=1):
    path.write_text(json.dumps({"format": fmt, "decisions": decisions}))


def decision(choice="torch"):
    return dispatch.Decision(choice, "measured", ["torch", "triton"], {"torch": 1.0})


@pytest.fixture
def caught():
    """Every RuntimeWarning raised in the test (no deduplication by the filters)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield lambda: [w for w in seen if issubclass(w.category, RuntimeWarning)]


def test_malformed_entries_are_skipped_with_one_warning_naming_the_file(cache, caught):
    bad = {"str": "triton", "list": ["triton"], "number": 3, "null": None,
           "times": entry(times_ms="fast"), "nested": entry(errors={"torch": 1.0}),
           "candidates": entry(candidates=["torch", 3]), "missing": {"choice": "torch"},
           "stranger": entry(choice="cuda"), "harness": entry(harness_ms={"torch": "x"})}
    write(cache, {**bad, "good": entry("triton", harness_ms={"torch": 0.1}, digest="ab",
                                       future={"a": [1]})})
    for _ in range(3):  # one warning per file, not per call
        for key in bad:
            assert dispatch._load(key, ["torch", "triton", "cuda"]) is None
        good = dispatch._load("good", ["torch", "triton"])
        assert good.choice == "triton" and good.source == "cache"
        assert "triton" in dispatch.describe(good)
    warning, = caught()
    assert str(cache) in str(warning.message) and "10 malformed" in str(warning.message)
    assert set(dispatch_file.entries()) == {"good"}
    assert "future" not in dispatch_file.load("good")  # a newer version's field: ignored


@pytest.mark.parametrize("text", ["{ not json", "[" * 100_000 + "]" * 100_000,
                                  '{"format": 1, "decisions": {"k": ' + "[" * 100_000,
                                  '{"format": 2, "decisions": {}}', "[1, 2]"],
                         ids=["not-json", "deep", "deep-entry", "format-2", "list"])
def test_unparseable_files_count_as_empty_with_one_warning_and_are_replaced(cache, caught,
                                                                           text):
    cache.write_text(text)
    assert dispatch._load("k", ["torch"]) is None and dispatch._load("j", ["torch"]) is None
    warning, = caught()
    assert str(cache) in str(warning.message)
    dispatch._store("k", decision())
    assert json.loads(cache.read_text())["decisions"]["k"]["choice"] == "torch"


def test_a_file_over_the_size_limit_is_not_parsed(cache, caught):
    write(cache, {"k": entry()})
    with open(cache, "a") as f:
        f.write(" " * dispatch_file.MAX_BYTES)
    assert dispatch._load("k", ["torch", "triton"]) is None
    assert dispatch._load("j", ["torch", "triton"]) is None
    warning, = caught()
    assert "larger than" in str(warning.message) and str(cache) in str(warning.message)


def test_an_unchanged_file_is_parsed_once_per_process(cache, monkeypatch):
    write(cache, {"a": entry(), "b": entry("triton")})
    parses = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parses.append(1) or real(*a, **k))
    assert dispatch._load("a", ["torch", "triton"]).choice == "torch"
    assert dispatch._load("b", ["torch", "triton"]).choice == "triton"
    assert dispatch._load("c", ["torch", "triton"]) is None
    assert len(parses) == 1  # three keys, one parse
    dispatch._store("c", decision())  # our own write: known without parsing it again
    assert dispatch._load("c", ["torch", "triton"]).choice == "torch"
    assert len(parses) == 1
    write(cache, {"a": entry("triton")})  # another process rewrote it
    assert dispatch._load("a", ["torch", "triton"]).choice == "triton"
    assert len(parses) == 2


def test_a_symlink_is_read_through_but_never_replaced_nor_written_through(cache, caught):
    target = cache.parent / "real.json"
    write(target, {"a": entry("triton")})
    before = target.read_text()
    cache.symlink_to(target)
    assert dispatch._load("a", ["torch", "triton"]).choice == "triton"
    dispatch._store("b", decision())
    dispatch._store("c", decision())
    assert cache.is_symlink() and target.read_text() == before
    warning, = caught()
    assert "symbolic link" in str(warning.message) and str(cache) in str(warning.message)


def test_a_fifo_never_hangs_a_call_and_is_never_replaced(cache, caught):
    os.mkfifo(cache)
    done = []

    def lookups():
        done.append(dispatch._load("k", ["torch", "triton"]))
        dispatch._store("k", decision())
        dispatch._store("j", decision())
        done.append("stored")

    worker = threading.Thread(target=lookups, daemon=True)
    worker.start()
    worker.join(20)
    hung = worker.is_alive()
    while worker.is_alive():  # release a reader blocked in open() (the old code)
        try:
            os.close(os.open(cache, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        worker.join(0.5)
    assert not hung and done == [None, "stored"]
    assert stat.S_ISFIFO(os.lstat(cache).st_mode)
    assert len(caught()) == 2  # the read, then the writes
    assert all(str(cache) in str(w.message) for w in caught())


def test_a_directory_is_refused_with_one_warning_and_nothing_left_beside_it(cache, caught):
    cache.mkdir()
    assert dispatch._load("k", ["torch"]) is None
    dispatch._store("k", decision())
    dispatch._store("j", decision())
    assert cache.is_dir() and os.listdir(cache) == [] and os.listdir(cache.parent) == ["d.json"]
    assert len(caught()) == 2 and all(str(cache) in str(w.message) for w in caught())


def test_the_lock_lives_in_the_package_cache_and_no_file_is_left_beside_the_users(
        cache, monkeypatch, caught):
    dispatch._store("a", decision())
    dispatch._store("b", decision("triton"))
    assert os.listdir(cache.parent) == ["d.json"]
    assert set(json.loads(cache.read_text())["decisions"]) == {"a", "b"}
    assert (cache.parent.parent / "cache" / "cvt_kernels" / "dispatch.lock").exists()
    before = cache.read_text()

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the write fails half-way
    dispatch._store("c", decision())
    assert os.listdir(cache.parent) == ["d.json"] and cache.read_text() == before
    warning, = caught()
    assert "No space left" in str(warning.message)


def test_a_store_keeps_the_files_mode_and_a_new_file_gets_0644_minus_the_umask(cache):
    write(cache, {"a": entry()})
    os.chmod(cache, 0o640)
    dispatch._store("b", decision())
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o640
    assert set(json.loads(cache.read_text())["decisions"]) == {"a", "b"}
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o644)):
        os.unlink(cache)
        old = os.umask(umask)
        try:
            dispatch._store("c", decision())
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(cache).st_mode) == mode


def test_an_unchanged_entry_is_not_rewritten(cache):
    dispatch._store("a", decision())
    first = os.stat(cache)
    dispatch_file.forget()  # as if another process measured the same again
    dispatch._store("a", decision())
    again = os.stat(cache)
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    dispatch._store("a", decision("triton"))  # a changed decision is written
    assert json.loads(cache.read_text())["decisions"]["a"]["choice"] == "triton"


def test_the_oldest_entries_are_dropped_past_the_size_limit(cache, monkeypatch):
    monkeypatch.setattr(dispatch_file, "MAX_BYTES", 4000)
    for i in range(40):
        dispatch_file.store(f"k{i:02d}", entry(date=f"2026-12-01 00:{i:02d} UTC"))
    kept = json.loads(cache.read_text())["decisions"]
    assert os.path.getsize(cache) <= 4000 and "k39" in kept and "k00" not in kept
    assert sorted(kept) == [f"k{i:02d}" for i in range(40 - len(kept), 40)]


def test_store_refuses_an_invalid_or_undeclared_entry(cache):
    with pytest.raises(ValueError, match="times_ms"):
        dispatch_file.store("k", entry(times_ms={"torch": "fast"}))
    with pytest.raises(ValueError, match="FIELDS"):
        dispatch_file.store("k", entry(samples=[1.0]))
    with pytest.raises(TypeError, match="key"):
        dispatch_file.store(("k",), entry())
    assert not cache.exists()


@pytest.mark.parametrize("home", ["", None], ids=["empty", "unset"])
def test_without_home_the_cache_is_a_private_temporary_directory(monkeypatch, tmp_path, home,
                                                                 caught):
    monkeypatch.delenv(dispatch.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        monkeypatch.setenv("HOME", home)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = tmp_path / f"cvt_kernels-{os.getuid()}"
    assert dispatch.cache_path() == private / "dispatch.json"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    dispatch._store("k", decision())
    assert sorted(os.listdir(private)) == ["dispatch.json", "dispatch.lock"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # XDG alone is enough
    assert dispatch.cache_path() == tmp_path / "xdg" / "cvt_kernels" / "dispatch.json"
    assert caught() == []


def test_a_shared_temporary_directory_turns_caching_off_with_one_warning(monkeypatch,
                                                                         tmp_path, caught):
    monkeypatch.delenv(dispatch.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dispatch_file.forget()
    planted = tmp_path / f"cvt_kernels-{os.getuid()}"
    planted.mkdir()
    os.chmod(planted, 0o777)  # anyone could plant a decision there
    assert dispatch.cache_path() is None and dispatch.cache_path() is None
    dispatch._store("k", decision())
    assert os.listdir(planted) == []
    warning, = caught()
    assert str(planted) in str(warning.message)


def test_info_exits_0_and_names_the_file_when_it_holds_malformed_entries(tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = [dispatch.make_key("attention", (("n", i),), device) for i in range(5)]
    path = tmp_path / "bad.json"
    write(path, {keys[0]: "triton", keys[1]: ["torch"], keys[2]: entry(times_ms="fast"),
                 keys[3]: 7, keys[4]: entry(), "[1]": entry(),
                 "[" * 100_000 + "]" * 100_000: entry()})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({dispatch.CACHE_ENV: str(path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                "OMP_NUM_THREADS": "1"})
    done = subprocess.run([sys.executable, "-m", "cvt_kernels.info"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and str(path) in done.stderr
    assert "4 malformed" in done.stderr
    # (not "1 for this device": the key holds a digest of the sources, which may change
    # between this process and the subprocess while someone edits the package)
    assert "3 stored" in done.stdout, done.stdout
