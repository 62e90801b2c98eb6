"""Shared by the benchmarks: device names, the roofline floor, result stamps and tables."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

# The Markdown tables (benchmarks/plot.py rebuilds them too): re-exported for the callers here.
from .results_md import STAMP_KEYS, TITLES, markdown_from_csv, write_markdown  # noqa: F401

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# ``<model>-tiny`` (benchmarks.models, profile_step, step_cost): CvT-13's layout at a
# fraction of its width and depth, seconds on a CPU.
TINY = dict(DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 2])

# Dense peak (TFLOP/s for 16-bit tensor cores, TF32 for float32) and copy bandwidth (TB/s).
# H100: ../shared/docs/performance.md's working figures (about 800 bf16, 3.0 TB/s measured
# copy); H200: same compute, 4.8 TB/s HBM3e; A100: datasheet 312 / 156 TF32, 2.0 TB/s.
PEAKS = {
    "H100": {"tflops16": 800.0, "tflops32": 400.0, "tbps": 3.0},
    "H200": {"tflops16": 800.0, "tflops32": 400.0, "tbps": 4.8},
    "A100": {"tflops16": 312.0, "tflops32": 156.0, "tbps": 2.0},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def peak_for(device: torch.device) -> Optional[Dict[str, float]]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


def floor_us(device: torch.device, dtype: torch.dtype, flop: float, nbytes: float
             ) -> Optional[float]:
    """The roofline floor in microseconds: max(compute time, memory time) at peak."""
    peak = peak_for(device)
    if peak is None:
        return None
    tflops = peak["tflops16"] if dtype in (torch.float16, torch.bfloat16) else peak["tflops32"]
    return max(flop / (tflops * 1e12), nbytes / (peak["tbps"] * 1e12)) * 1e6


def git_commit() -> str:
    """``CVT_KERNELS_COMMIT`` when set, else ``git rev-parse`` with ``+dirty`` appended when
    the package, the benchmarks or ``csrc/`` differ from that commit (a number measured on
    an uncommitted tree must not pass for the commit's). The variable comes first: the GPU
    machines' copy of the tree carried a stale ``.git`` whose HEAD was an older commit (both
    H200 runs of 2026-11-30 were stamped e04b088 that way)."""
    if os.environ.get("CVT_KERNELS_COMMIT"):
        return os.environ["CVT_KERNELS_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=root).stdout.strip()
    except Exception:
        return "unknown"
    return sha + ("+dirty" if tree_is_dirty(root) else "")


def tree_is_dirty(root: Path) -> bool:
    """Whether tracked or new files under the code that makes a number changed."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "-uall", "--", "cvt_kernels",
                            "benchmarks", "csrc"], cwd=root, capture_output=True, text=True,
                           check=True)
    except Exception:
        return False
    # results files written by the run itself do not make its code dirty
    return any(not line[3:].startswith("benchmarks/results/")
               for line in r.stdout.splitlines() if line.strip())


def stamp(device: torch.device, command: str) -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "one_pass": one_pass_summary(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def one_pass_summary() -> str:
    """``CVT_KERNELS_ONE_PASS`` and what its ``auto`` policy chose in this process, per shape
    (x shape, h x w, heads: path, one-pass vs separate ms)."""
    from cvt_kernels.ops import one_pass
    try:
        summary = one_pass.mode()
    except ValueError as e:
        return f"invalid: {e}"
    for key, d in one_pass.decisions().items():
        shape = "x".join(map(str, key[2]))
        times = (f"{d.one_pass_ms:.3g} vs {d.separate_ms:.3g} ms" if d.one_pass_ms is not None
                 else d.why)
        summary += f"; {shape} {key[3]}x{key[4]} h{key[5]} {str(key[1])[6:]}: {d.path} ({times})"
    return summary


def current_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The finest time a row can hold: CUDA events (do_bench) resolve about 0.5 us, and rows keep
# four decimals of a millisecond; perf_counter itself is finer.
TIMER_TICK_MS = max(time.get_clock_info("perf_counter").resolution * 1e3, 5e-4)


def unresolved(row: dict) -> Optional[str]:
    """Why ``row``'s time is below the timer's resolution (``None``: it is not): at or below
    the clock's tick, or smaller than its own noise, the spread between its 20th and 80th
    percentile samples (a tiny CPU shape on a busy machine). A ratio of such a time says
    more about the machine's load than about the code (``x286.64``, ``x0.0``)."""
    ms, q20, q80 = (row.get(k) for k in ("ms", "q20_ms", "q80_ms"))
    if not isinstance(ms, (int, float)):
        return None
    if ms <= TIMER_TICK_MS:
        return f"below the timer's resolution: {ms} ms <= its {TIMER_TICK_MS:.1g} ms tick"
    if isinstance(q20, (int, float)) and isinstance(q80, (int, float)) and q80 - q20 >= ms:
        return (f"below the timer's resolution in this run: the q20-q80 spread "
                f"({q80 - q20:.3g} ms) is larger than the time ({ms:.3g} ms)")
    return None


def _ratio(ratio: float) -> float:
    # Two decimals turn a 300x slowdown into 0.0: keep two significant digits below 0.1.
    return round(ratio, 2) if ratio >= 0.1 else float(f"{ratio:.2g}")


def add_speedups(rows: List[dict], baselines=("eager", "torch", "compile")) -> None:
    """``vs_<baseline>`` = baseline time / provider time, within one group of rows (one
    shape, dtype and mode), for every provider that ran, when both times are above the
    timer's resolution; a row whose time is not gets ``timing`` saying so, and no ratio."""
    done = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    why = {name: unresolved(r) for name, r in done.items()}
    for name, r in done.items():
        if why[name]:
            r["timing"] = why[name]
        for base in baselines:
            if base in done and base != name and not why[base] and not why[name]:
                r[f"vs_{base}"] = _ratio(done[base]["ms"] / r["ms"])


def ratio_text(row: dict, base: str = "eager") -> str:
    """``x1.19 vs eager``, or why that row has no ratio (one of the times is below the
    timer's resolution)."""
    if row.get("timing"):
        return f"(no ratio: {row['timing']})"
    if f"vs_{base}" in row:
        return f"x{row[f'vs_{base}']} vs {base}"
    if row.get("provider") == base:
        return f"x1 vs {base}"
    return f"(no ratio: {base}'s time is below the timer's resolution or was not measured)"


# What makes two rows the same measurement, for ``--append`` (the keys a row has of these).
IDENTITY_KEYS = ("model", "img", "scope", "stage", "batch", "dtype", "mode", "provider")
# path -> the rows its file held when this process first saved to it with --append.
_APPENDED_TO: Dict[str, List[dict]] = {}


def row_identity(row: dict) -> tuple:
    return tuple((k, str(row[k])) for k in IDENTITY_KEYS if k in row)


def kept_rows(path: Path, rows: List[dict]) -> List[dict]:
    """``--append``: the rows of ``path`` as it was before this process first wrote it (an
    earlier step's, each with its own stamp), less those ``rows`` measure again."""
    key = str(path.resolve())
    if key not in _APPENDED_TO:
        try:
            with open(path, newline="") as f:
                _APPENDED_TO[key] = list(csv.DictReader(f))
        except FileNotFoundError:
            _APPENDED_TO[key] = []
    again = {row_identity(r) for r in rows}
    return [r for r in _APPENDED_TO[key] if row_identity(r) not in again]


def save_results(out_dir: str, name: str, title: str, args: argparse.Namespace,
                 rows: List[dict], command: Optional[str] = None, plot: bool = True,
                 verbose: bool = True, markdown: bool = True) -> None:
    """``<out_dir>/<name>.csv`` and ``.md`` (and ``.png`` when ``plot`` and matplotlib is
    importable), every row stamped with device, versions, commit, date and the command that
    reproduces the run (``command``; by default ``python -m benchmarks.<name>`` + ``args``).
    With ``args.append`` the rows the file held before (another run's, stamped with their
    own command) come first, except those measured again (:data:`IDENTITY_KEYS`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = current_device()
    if command is None:
        command = f"python -m benchmarks.{name} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v not in (None, False) and k != "out")
    meta = stamp(device, command.strip())
    kept = kept_rows(out / f"{name}.csv", rows) if getattr(args, "append", False) else []
    keys: List[str] = []
    for r in kept + rows:
        keys += [k for k in r if k not in keys and k not in meta]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(meta))
        writer.writeheader()
        for r in kept:
            writer.writerow(r)
        for r in rows:
            writer.writerow({**r, **meta})
    if markdown:
        write_markdown(out / f"{name}.md", title, meta, kept + rows)
    written = [".csv"] + ([".md"] if markdown else [])
    notes = [] if markdown else ["no .md: --no-md"]
    if plot:
        from .plot import plot_csv  # matplotlib is optional: plot_csv says why it skipped
        skipped = plot_csv(out / f"{name}.csv")
        if skipped is None:
            written.append(".png")
        else:
            notes.append(f"no .png: {skipped}")
    else:
        notes.append("no .png: plotting off; python -m benchmarks.plot CSV makes it later")
    written = (", ".join(written[:-1]) + " and " + written[-1] if len(written) > 1
               else written[0]) + (f" ({'; '.join(notes)})" if notes else "")
    if verbose:
        print(f"wrote {out}/{name}{written} on {device_name(device)}", flush=True)


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The options every shape-sweeping benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CPU smoke run (one tiny shape)")
    p.add_argument("--model", choices=["cvt_13", "cvt_w24"])
    p.add_argument("--img-size", type=int, choices=[224, 384])
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", help="directory for the .csv and .md results")
    return p


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool,
            cudagraph: bool = False, repeats: Optional[int] = None
            ) -> Tuple[float, float, float]:
    """(median, q20, q80) in milliseconds: ``triton.testing.do_bench`` on GPU (or
    ``do_bench_cudagraph`` with ``cudagraph=True``: one graph replays the calls, so launch
    overhead drops out; ``fn`` must be capturable), wall clock on CPU after a warm-up call
    (``repeats`` samples, default 3 quick / 10)."""
    if device.type == "cuda":
        import triton.testing
        if cudagraph:
            res = triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100,
                                                    quantiles=[0.5, 0.2, 0.8])
        else:
            res = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8],
                                          warmup=25 if quick else 100, rep=50 if quick else 200)
        return tuple(res)  # type: ignore[return-value]
    if cudagraph:
        raise RuntimeError("CUDA graphs need a CUDA device")
    fn()
    samples = []
    for _ in range(repeats or (3 if quick else 10)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    qs = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return statistics.median(samples), qs[0], qs[-1]


def time_interleaved_cpu(fns: Dict[str, Callable[[], object]], repeats: int
                         ) -> Dict[str, Tuple[float, float, float, float]]:
    """CPU wall clock of several providers, one warm-up call each, then ``repeats`` rounds
    that call every provider in turn: a burst of load from another process hits all of them
    alike instead of one provider's whole measurement. Per provider (median, q20, q80) in ms
    and ``cpu_share``: this process's CPU time / (wall time x torch threads); well below 1
    means other processes took the cores and the times are inflated."""
    for fn in fns.values():
        fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, float] = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
            cpu[name] += (time.process_time() - start_cpu) * 1e3
    out = {}
    for name, xs in samples.items():
        qs = statistics.quantiles(xs, n=5) if len(xs) > 1 else xs * 4
        share = cpu[name] / (sum(xs) * torch.get_num_threads())
        out[name] = (statistics.median(xs), qs[0], qs[-1], round(share, 2))
    return out


def peak_mb(fn: Callable[[], object], device: torch.device):
    """Peak allocated GPU memory (MiB) of one call of ``fn``; "n/a" on CPU (torch does not
    track CPU allocations)."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also when torch.compile or Triton wrapped it."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# Errors after which the process's CUDA context is unusable: every later call fails too.
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "illegal instruction", "misaligned address", "an illegal", "launch timed out",
           "uncorrectable ecc", "hardware stack error", "context is destroyed")


class ContextLost(RuntimeError):
    """A row crashed the CUDA context; the worker saves and exits with CONTEXT_LOST_EXIT so
    that ``benchmarks.run`` continues the level in a fresh process (see ``journal.py``)."""


CONTEXT_LOST_EXIT = 75


def is_context_lost(exc: BaseException) -> bool:
    """A sticky CUDA error: by its message, or because the device no longer synchronizes."""
    text = str(exc).lower()
    if any(s in text for s in _STICKY):
        return True
    if "cuda error" in text and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:
            return True
    return False


def failure_status(exc: BaseException, batch: int) -> str:
    """A row's status for an exception: out of memory (skipped), a crash of the CUDA context
    (the rest of the level runs in a new process) or any other failure, with its message."""
    # The whole first line: the .md and .csv are where a failure is read later, in full.
    first = str(exc).splitlines()[0] if str(exc) else ""
    if is_context_lost(exc):
        return f"crashed: {type(exc).__name__}: {first} (CUDA context lost)"
    if is_oom(exc):
        return f"skipped: out of memory at batch {batch}"
    return f"failed: {type(exc).__name__}: {first}"


FAULT_ENV = "CVT_KERNELS_BENCH_FAULT"


def inject_fault(provider: str) -> None:
    """Testing hook for the crash handling, off unless ``CVT_KERNELS_BENCH_FAULT`` names
    ``provider``: ``NAME`` raises the error a sticky CUDA fault raises, ``NAME:die`` kills
    the process the way a segfault would (no Python cleanup, no results written)."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, how = spec.partition(":")
    if not spec or name != provider:
        return
    if how == "die":
        os._exit(134)
    raise RuntimeError("CUDA error: an illegal memory access was encountered "
                       f"(injected by {FAULT_ENV})")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cudagraph_ms(fn: Callable[[], object], device: torch.device, quick: bool):
    """The CUDA-graph median as a table cell: "n/a" on CPU, the reason when capture fails."""
    if device.type != "cuda":
        return "n/a"
    try:
        return round(time_ms(fn, device, quick, cudagraph=True)[0], 4)
    except Exception as exc:  # not capturable (a host sync, a CPU-side branch): say why
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"failed: {type(exc).__name__}: {first}"


def captured_step_ms(module: torch.nn.Module, call: Callable, x: torch.Tensor,
                     labels: torch.Tensor, device: torch.device, quick: bool, warmup: int = 3):
    """A whole training step from one CUDA graph, as a table cell: forward (``call(x)``),
    cross-entropy, backward and an AdamW step with ``capturable=True`` (its step counts on
    the device), captured once after ``warmup`` eager steps on a side stream (PyTorch's
    whole-network capture recipe: gradients set to None before capture, so the captured
    backward writes them in place on every replay), then its replay timed. Milliseconds,
    "n/a" on CPU, or why capture failed. ``module``'s weights move (a tiny learning rate)
    and its gradients are left set: callers reload and clear them."""
    if device.type != "cuda":
        return "n/a"
    import torch.nn.functional as F

    graph = opt = None
    try:
        opt = torch.optim.AdamW(module.parameters(), lr=1e-6, capturable=True)

        def step():
            F.cross_entropy(call(x).float(), labels).backward()
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return round(time_ms(graph.replay, device, quick)[0], 4)
    except Exception as exc:  # not capturable (a host sync, a CPU-side branch): say why
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"failed: {type(exc).__name__}: {first}"
    finally:
        del graph, opt
        module.zero_grad(set_to_none=True)
        free_memory()


def time_call(call: Callable[[], object], device: torch.device, quick: bool, graph: bool
              ) -> dict:
    """The timing fields of a row: median and quantiles, peak GPU memory, and (``graph``)
    a CUDA-graph median beside them, since launch overhead matters at these small shapes."""
    ms, q20, q80 = time_ms(call, device, quick)
    peak = peak_mb(call, device)
    cg = cudagraph_ms(call, device, quick) if graph else "n/a"
    return {"ms": round(ms, 4), "q20_ms": round(q20, 4), "q80_ms": round(q80, 4),
            "cudagraph_ms": cg, "peak_mb": peak}


def block_call(fn: Callable, x: torch.Tensor, h: int, w: int, grad: torch.Tensor,
               train: bool) -> Callable[[], None]:
    """The call a block benchmark times: ``fn(x, h, w)`` without grad, or forward and
    backward with the cotangent ``grad``."""
    xg = x.detach().requires_grad_(train)

    def call():
        if train:
            fn(xg, h, w).backward(grad)
        else:
            with torch.no_grad():
                fn(xg, h, w)
    return call


def measure(fn: Callable, x: torch.Tensor, h: int, w: int, ref: torch.Tensor, tolerance: float,
            train: bool, device: torch.device, quick: bool, cudagraph: bool = True) -> dict:
    """Checks ``fn(x, h, w)`` against ``ref`` (max |diff| / max |ref|), then times it: forward
    without grad (``train=False``) or forward + backward, and on GPU its peak memory and
    (forward, ``cudagraph``) a CUDA-graph time. Returns the row's status fields."""
    try:
        with torch.no_grad():
            err = ((fn(x, h, w).float() - ref).abs().max() / ref.abs().max()).item()
        if not err <= tolerance:
            return {"status": f"wrong: rel err {err:.2e}"}
        call = block_call(fn, x, h, w, torch.randn_like(ref).to(x.dtype), train)
        # (No CUDA graph around torch.compile's max-autotune, which replays graphs itself.)
        timing = time_call(call, device, quick, graph=cudagraph and not train)
    except Exception as exc:  # the provider declined this call: say why
        status = failure_status(exc, x.shape[0])
        if status.startswith("skipped: out of memory"):
            free_memory()
        return {"status": status}
    return {"status": "ok", "rel_err": f"{err:.1e}", **timing}


def out_of_time(args: argparse.Namespace) -> bool:
    """``benchmarks.run --budget-s``: past the deadline, measurements are skipped (and say so)."""
    deadline = getattr(args, "deadline", None)
    return deadline is not None and time.monotonic() > deadline


BUDGET_SPENT = "skipped: time budget (--budget-s) spent"


def not_run_status(fn, reason: str, args: argparse.Namespace) -> Optional[str]:
    """The status of a provider row that will not be measured (``fn`` is ``None``: it cannot
    run, for ``reason``; or the time budget is spent), else ``None``."""
    if fn is None:
        return f"skipped: {reason}"
    if out_of_time(args):
        return BUDGET_SPENT
    return None


def floor_fraction(device: torch.device, dtype: torch.dtype, flop: float, nbytes: float,
                   ms: float):
    floor = floor_us(device, dtype, flop, nbytes)
    return round(floor / (ms * 1e3), 3) if floor is not None else "n/a"


def print_group(rows: List[dict], label: str, speedups: bool = True) -> None:
    """One line per provider of a (shape, dtype, mode) group, speed-ups added first (unless
    the caller added them, over a larger group)."""
    if speedups:
        add_speedups(rows)
    for r in rows:
        result = (f"{r['ms']:9.4f} ms  {ratio_text(r)}" if r["status"] == "ok"
                  else r["status"])
        print(f"{label} {r['provider']:9s} {result}", flush=True)
