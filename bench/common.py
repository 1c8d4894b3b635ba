"""What every bench shares: the JSON result document, human lines on stderr, medians, and /proc sampling.

Every bench prints its results as one JSON document: on stdout, or into the file given with
``--json FILE``. Progress and the human-readable summary go to stderr, so
``python bench/x.py > x.json`` keeps a clean document. bench/figures.py renders docs from these
documents (bench/results/*.json).

The document:

    {"bench": "ingest", "params": {...the command line...}, "results": {...}, "env": {...}}

``env`` says where it ran (commit, Python, cores, date), since figures from different machines or
sittings do not compare.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- output ------------------------------------------------------------------------------------

def say(*parts: Any, end: str = "\n") -> None:
    """A human-readable line on stderr (stdout carries the JSON document)."""
    print(*parts, end=end, file=sys.stderr, flush=True)


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    """``--json FILE`` writes the document there instead of stdout; ``--json`` alone (or ``-``) means stdout."""
    ap.add_argument("--json", metavar="FILE", nargs="?", const="-", default="-",
                    help="write the JSON result document to FILE (default: stdout)")


def env_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    # the 1-minute load average at the end: other work on the machine moves every figure
    return {"commit": commit, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "date": datetime.date.today().isoformat(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def document(bench: str, params: dict, results: Any) -> dict:
    return {"bench": bench, "params": params, "results": results, "env": env_info()}


def emit(bench: str, args: argparse.Namespace | dict, results: Any, dest: str | None = "-") -> dict:
    """Print (or write to ``dest``) the bench's one JSON document; returns it."""
    params = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    params.pop("json", None)
    doc = _finite(document(bench, params, results))
    text = json.dumps(doc, indent=1, default=_jsonable, allow_nan=False) + "\n"
    if dest in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(text)
        say(f"wrote {dest}")
    return doc


def _finite(value: Any) -> Any:
    """NaN and infinities (a percentile of no values) as null: strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_document(text: str) -> dict:
    """The bench's JSON document from its stdout (the whole of it, or its last line that is a JSON object)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON document in the bench's output: was it run with its results on stdout?")


# ---- numbers -----------------------------------------------------------------------------------

def pct(xs: Iterable[float], p: float) -> float:
    """The p-th percentile, linearly interpolated; NaN for no values."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def spread(xs: list[float], digits: int = 4) -> dict:
    """median, min, max and count of repeated measurements."""
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs)}


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Seconds of each of ``repeat`` calls of ``fn``, and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- /proc sampling of a process tree ----------------------------------------------------------

def proc_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree (live descendants, plus reaped children via cutime/cstime)."""
    total = 0
    for i, p in enumerate(proc_tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])           # utime, stime
        if i == 0:
            total += int(fields[13]) + int(fields[14])       # cutime, cstime
    return total / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the libraries every server process maps) split among
    the processes that map them, so a sum over the tree counts each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Peak memory of a process tree: VmRSS summed every ``interval``, PSS every PSS_EVERY samples, VmHWM."""

    # PSS needs smaps_rollup, which walks every page table of the tree: every 100 ms it costs ~5 % of
    # the machine's CPU (perf, a saturated run), taken from the server it measures. VmRSS is cheap.
    PSS_EVERY = 10

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_tree_kb = 0
        self.peak_pss_kb = 0
        self.peak_hwm_kb = 0
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            tree = proc_tree(self.pid)
            kb = sum(status_kb(p, "VmRSS:") for p in tree)
            hwm = status_kb(self.pid, "VmHWM:")
            if kb == 0 and hwm == 0:
                break
            self.peak_tree_kb = max(self.peak_tree_kb, kb)
            if len(self.samples) % self.PSS_EVERY == 0:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_kb(p) for p in tree))
            self.peak_hwm_kb = max(self.peak_hwm_kb, hwm)
            self.samples.append((time.monotonic(), kb))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)

    @property
    def peak_mb(self) -> float:
        return max(self.peak_tree_kb, self.peak_hwm_kb) / 1024

    def mb_per_second(self, start: float, seconds: int) -> list[int]:
        """The highest RSS sample of each whole second after ``start`` (monotonic), in MB."""
        per: dict[int, int] = {}
        for ts, kb in self.samples:
            sec = int(ts - start)
            if 0 <= sec < seconds:
                per[sec] = max(per.get(sec, 0), kb)
        return [round(per.get(k, 0) / 1024) for k in range(seconds)]
