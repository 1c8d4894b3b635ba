#!/usr/bin/env python3
"""Footprint bench: what a `shadowlens serve` sidecar costs in memory, CPU and disk (issue 18, part 4).

One server (bench/server.py) on a fresh data dir goes through these phases, in order:

  1. warm-up   (``--warmup`` s after /readyz): imports done, the analyzers' first rounds run;
  2. idle      (``--idle`` s): no traffic; the tree's PSS every ``--sample`` s, its CPU over the phase;
  3. paced     (``--paced`` s at ``--rate`` spans/s, default 1,000): bench/clients.py's paced sends of the
               bench traffic (bench/pool.py, ~2.45 KB spans); PSS samples (median = steady state) and CPU;
  4. saturation (``--saturation`` s, closed loop, ``--clients`` x ``--concurrency`` in flight): PSS
               peak and median; then, once the store has settled, the paced phase again ("paced_full"):
               the window now holds the saturation's traces, as in a sidecar that has run for a while;
  5. settle    : until the frontend's queue is empty and then the data dir's bytes stay put for ``--settle``
               s (the store's background work: compression of the payload log, checkpoints), then the
               bytes per stored span, the payload log (segments/) and DuckDB (the .duckdb file and its
               WAL) apart;
  6. stop      : SIGTERM, then the bytes again (DuckDB checkpoints on close); then a restart of serve on the
               store compresses the last payload segment, which stays plain while it is written
               (bench/disk.py), and the bytes at rest are read once more (``--no-compact`` skips it).

Memory is the summed PSS of the process tree: shared pages are split among the processes that map
them, so the sum counts each page once. On a shared machine the kernel's PSS (smaps_rollup) also
splits library pages with unrelated processes of the same venv, so it reads low and moves with what
else runs; the bench therefore also counts the tree's distinct resident pages (/proc/PID/pagemap,
root only), which is the summed PSS the sidecar has alone in its container, and reads the goals on
that ("alone"). Each process's share is kept too (serve's main process, the frontend, the decoder,
multiprocessing's resource tracker). CPU is utime+stime of the tree over a phase, in cores. A paced
phase's payload stays in the live segment of the payload log, compressed only once the segment is closed
(256 MB, ~100 s at 1,000 spans/s): so the bench also measures what compressing it costs (the product's
compact_segment on the pool's payloads, after the server stopped) and charges each paced phase its share;
"steady" is the phase's CPU plus that share, what a sidecar at that rate pays, and the CPU goals are read
on it. Before the window-full phase the saturation's backlog is compressed (``compaction_wait_s``).

The gate's refresh time at 1M and 8M traces in the window comes from bench/gate.py: by default its
last committed results (bench/results/gate-speed.json) are read; ``--gate run`` runs it (slow: it builds
the stores), ``--gate skip`` leaves it out.

Usage:
  python bench/footprint.py                                  # full: ~5 min
  python bench/footprint.py --quick                          # ~2 min (shorter phases)
  python bench/footprint.py --quick --saturation 0 --gate skip --no-compact   # idle and 1k/s only, ~1.5 min
  python bench/footprint.py --json bench/results/footprint.json
  python bench/footprint.py --server-env SHADOWLENS_X__Y=z   # extra server env (repeatable)

Goals (issue 18): summed PSS <= 150 MB idle, <= 250 MB at 1,000 spans/s, <= 400 MB at saturation;
CPU <= 0.01 cores idle, <= 0.03 cores at 1,000 spans/s (steady); <= 500 bytes per span at rest; the gate's
refresh <= 50 ms at 8M traces in the window. Misses are reported, not turned into an exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import clients
from common import REPO, add_json_arg, emit, proc_tree, say
from ingest import _drive_clients
from pool import SPANS_PER_REQUEST
from server import Server, count_stored

# The CPU goals are read on the steady figures: the phase's CPU plus the compression of the payload it wrote
# (charge_compression), which the phase itself does not see.
GOALS = {"pss_idle_mb": 150, "pss_paced_mb": 250, "pss_saturation_mb": 400, "cpu_idle_cores": 0.01,
         "cpu_paced_steady_cores": 0.03, "cpu_paced_full_steady_cores": 0.03, "pss_paced_full_mb": 250,
         "bytes_per_span": 500, "gate_refresh_8m_s": 0.05}
COMPACTION_WAIT_S = 600.0
ROLES = ("main", "frontend", "decoder", "resource_tracker", "other")


# ---- memory --------------------------------------------------------------------------------------

def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss, Pss_Anon, Pss_File and Rss of one process, in kB (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_File", "Rss"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class Roles:
    """Which process of the tree is which: serve's pid, the children named in its log, the resource tracker."""

    def __init__(self, server: Server):
        self.server = server
        self.known: dict[int, str] = {server.proc.pid: "main"}

    def of(self, pid: int) -> str:
        if pid not in self.known:
            self._learn(pid)
        return self.known.get(pid, "other")

    def _learn(self, pid: int) -> None:
        try:
            text = Path(self.server.log_path).read_text(errors="replace")
            # "frontend pid N, decoder pid M" at start, "decoder pid M started" when auto starts one
            for role in ("frontend", "decoder"):
                for m in re.finditer(rf"{role} pid (\d+)", text):
                    self.known[int(m.group(1))] = role
        except OSError:
            pass
        if pid not in self.known:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                return
            if b"resource_tracker" in cmd:
                self.known[pid] = "resource_tracker"


_PFN = (1 << 55) - 1
_PRESENT = 1 << 63


def resident_pages(pid: int):
    """The physical page numbers (numpy uint64, unique) a process has resident, from /proc/PID/pagemap.
    Needs CAP_SYS_ADMIN (root) to see page numbers; None without it (they read as 0) or when it is gone."""
    import numpy as np
    ranges, cur = [], None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = head.split("-")
                    cur = (int(a, 16), int(b, 16))
                elif line.startswith("Rss:") and int(line.split()[1]) > 0:
                    ranges.append(cur)
        chunks = []
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for a, b in ranges:
                pm.seek(a // 4096 * 8)
                arr = np.frombuffer(pm.read((b - a) // 4096 * 8), dtype=np.uint64)
                chunks.append(arr[(arr & np.uint64(_PRESENT)) != 0] & np.uint64(_PFN))
    except (OSError, ValueError):
        return None
    pages = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)
    if len(pages) and pages[0] == 0:      # page numbers hidden: not root
        return None
    return pages


def tree_memory(server: Server, roles: Roles) -> dict:
    """The tree's memory in MB, two ways.

    ``pss_mb``: summed PSS from smaps_rollup, as the kernel reports it on this machine. A library page
    that other processes on the machine map too (other Python servers of the same venv) is split with
    them, so it reads low on a shared machine and moves with what else runs.
    ``alone_mb``: the tree's distinct resident pages (pagemap): what summed PSS is when nothing outside
    the tree maps the same files, as in the sidecar's own container. Each process's share of it splits
    a page among the tree's processes that map it (its PSS within the tree). The goals are read on this."""
    import numpy as np
    per: dict[str, dict[str, float]] = {}
    total = 0
    pages: dict[str, list] = {}
    for pid in proc_tree(server.proc.pid):
        m = smaps_rollup(pid)
        if not m:
            continue
        role = roles.of(pid)
        slot = per.setdefault(role, {"pss": 0.0, "anon": 0.0, "file": 0.0})
        slot["pss"] += m.get("Pss", 0) / 1024
        slot["anon"] += m.get("Pss_Anon", 0) / 1024
        slot["file"] += m.get("Pss_File", 0) / 1024
        total += m.get("Pss", 0)
        pages.setdefault(role, []).append(resident_pages(pid))
    out = {"pss_mb": round(total / 1024, 1)}
    if pages and all(p is not None for ps in pages.values() for p in ps):
        flat = [(role, p) for role, ps in pages.items() for p in ps]
        everything, counts = np.unique(np.concatenate([p for _, p in flat]), return_counts=True)
        out["alone_mb"] = round(len(everything) * 4096 / 2**20, 1)
        for role, p in flat:
            share = float((1.0 / counts[np.searchsorted(everything, p)]).sum()) * 4096 / 2**20
            per[role]["alone"] = per[role].get("alone", 0.0) + share
    out["by_process"] = {r: {k: round(v, 1) for k, v in d.items()} for r, d in sorted(per.items())}
    return out


class MemorySampler(threading.Thread):
    """tree_memory every ``interval`` s until stopped (smaps_rollup walks page tables: not too often)."""

    def __init__(self, server: Server, roles: Roles, interval: float):
        super().__init__(daemon=True)
        self.server, self.roles, self.interval = server, roles, interval
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(tree_memory(self.server, self.roles))
            self._halt.wait(self.interval)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(5)
        return self.samples


def memory_figures(samples: list[dict]) -> dict:
    """Median and peak of the tree's memory (alone, and summed PSS on this machine), each process's median."""
    if not samples:
        return {"samples": 0}
    out: dict = {"samples": len(samples)}
    for key in ("alone", "pss"):
        totals = [s[f"{key}_mb"] for s in samples if f"{key}_mb" in s]
        if totals:
            out.update({f"{key}_median_mb": round(statistics.median(totals), 1), f"{key}_peak_mb": round(max(totals), 1),
                        f"{key}_min_mb": round(min(totals), 1)})
    by = {}
    for r in sorted({r for s in samples for r in s["by_process"]}):
        vals = [s["by_process"][r] for s in samples if r in s["by_process"]]
        by[r] = {k: round(statistics.median(v[k] for v in vals), 1) for k in ("alone", "pss", "anon", "file")
                 if all(k in v for v in vals)}
    out["by_process"] = by
    return out


# ---- disk ----------------------------------------------------------------------------------------

def disk_bytes(data_dir: str) -> dict:
    """Allocated bytes (st_blocks, what the disk holds) under the data dir: segments/, DuckDB, the rest."""
    parts = {"segments": 0, "duckdb": 0, "other": 0}
    for root, _, files in os.walk(data_dir):
        rel = os.path.relpath(root, data_dir)
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            size = st.st_blocks * 512
            if rel.split(os.sep)[0] == "segments":
                parts["segments"] += size
            elif ".duckdb" in name:
                parts["duckdb"] += size
            else:
                parts["other"] += size
    parts["total"] = sum(parts.values())
    return parts


def per_span(parts: dict, stored: int | None) -> dict:
    if not stored:
        return {}
    return {k: round(v / stored, 1) for k, v in parts.items()}


def wait_drained(server: Server, timeout: float) -> float:
    """Seconds until the frontend's queue (acknowledged, not yet in DuckDB) is empty."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.scrape().get("shadowlens_ingest_queue_spans", 1) == 0:
            break
        time.sleep(1.0)
    return round(time.monotonic() - t0, 1)


def wait_settled(data_dir: str, quiet: float, longest: float) -> float:
    """Seconds until the data dir's bytes have not changed for ``quiet`` s (the payload log's compression
    and DuckDB's checkpoints caught up), at most ``longest``."""
    t0 = last_change = time.monotonic()
    last = disk_bytes(data_dir)["total"]
    while time.monotonic() - last_change < quiet and time.monotonic() - t0 < longest:
        time.sleep(1.0)
        now = disk_bytes(data_dir)["total"]
        if now != last:
            last, last_change = now, time.monotonic()
    return round(time.monotonic() - t0, 1)


# ---- phases --------------------------------------------------------------------------------------

def quiet_phase(server, roles, seconds, interval) -> dict:
    sampler = MemorySampler(server, roles, interval)
    cpu0, t0 = server.cpu(), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = server.cpu(), time.monotonic()
    out = memory_figures(sampler.stop())
    out.update({"seconds": round(t1 - t0, 1), "cpu_s": round(cpu1 - cpu0, 2), "cores": round((cpu1 - cpu0) / (t1 - t0), 4)})
    return out


def load_phase(server, roles, args, seconds, rate, n_clients, concurrency) -> dict:
    """Clients for ``seconds`` (paced at ``rate`` or closed loop) while the tree's PSS is sampled."""
    load = argparse.Namespace(clients=n_clients, concurrency=concurrency, duration=seconds, rate=rate,
                              timeout=args.timeout, http=False,
                              target=f"127.0.0.1:{server.grpc_port}")
    res: dict = {"problems": []}
    sampler = MemorySampler(server, roles, args.sample if rate else min(args.sample, 2.0))
    total, _, start, end, cpu0, _ = _drive_clients(load, server, res)
    cpu1 = server.cpu()
    out = memory_figures(sampler.stop())
    elapsed = max(end - start, 1e-9)
    out.update({"seconds": round(elapsed, 1), "offered_per_s": rate, "acked": total.acked,
                "acked_per_s": round(total.acked / max(total.last_done - start, 1e-9), 1),
                "cpu_s": round(cpu1 - cpu0, 2), "cores": round((cpu1 - cpu0) / elapsed, 4),
                "us_per_span": round((cpu1 - cpu0) / total.acked * 1e6, 1) if total.acked else None,
                "errors": dict(total.errors), "problems": res["problems"]})
    return out


# ---- the payload log's compression -----------------------------------------------------------------

def compression_level(extra_env: dict) -> int:
    """The server's ``store.compression_level`` (its default unless --server-env sets it)."""
    from shadowlens.collector.store.compaction import DEFAULT_LEVEL
    return int(extra_env.get("SHADOWLENS_STORE__COMPRESSION_LEVEL", DEFAULT_LEVEL))


def compression_cost(level: int, tmp_dir: str | None) -> dict:
    """CPU seconds per MB that serve's compactor spends on the pool's payloads (bench/compaction.py's
    cpu_per_byte: the product's compact_segment, run here after the server stopped).

    Why the bench adds it: a paced phase's payload stays in the live segment of the payload log, which is
    compressed once it is closed at 256 MB, ~100 s of 1,000 spans/s; so the phase never pays for it, while a
    sidecar at that rate pays it all the time (~0.01 cores at 1,000 spans/s)."""
    if level <= 0:
        return {"level": level, "cpu_s_per_mb": 0.0}
    from compaction import cpu_per_byte
    tmp = tempfile.mkdtemp(prefix="shadowlens-compress-", dir=tmp_dir)
    try:
        per_byte = cpu_per_byte([t.data for t in clients.POOL], level, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"level": level, "cpu_s_per_mb": round(per_byte * 1e6, 5)}


def payload_bytes_per_s(phase: dict) -> float | None:
    """The payload a paced phase wrote to the log, per second: its acknowledged spans in the pool's requests."""
    if not phase.get("acked") or not clients.POOL:
        return None
    per_span = sum(len(t.data) for t in clients.POOL) / sum(t.n_spans for t in clients.POOL)
    return phase["acked"] * per_span / phase["seconds"]


def charge_compression(out: dict, cost: dict) -> None:
    """Each paced phase's compression share (cores) and steady CPU (the phase's CPU plus that share)."""
    out["compression"] = cost
    for phase in ("paced", "paced_full"):
        r = out.get(phase)
        rate = payload_bytes_per_s(r) if r else None
        if rate is None or r.get("cores") is None:
            continue
        r["payload_bytes_per_s"] = round(rate)
        r["compression_cores"] = round(rate / 1e6 * cost["cpu_s_per_mb"], 4)
        r["steady_cores"] = round(r["cores"] + r["compression_cores"], 4)


def wait_compacted(server: Server, timeout: float) -> float:
    """Until the closed payload segments are compressed (shadowlens_store_compaction_pending_bytes is 0):
    the saturation's backlog is compressed before the window-full phase, not during it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not server.scrape().get("shadowlens_store_compaction_pending_bytes"):
            break
        time.sleep(1.0)
    return round(time.monotonic() - t0, 1)


# ---- gate ----------------------------------------------------------------------------------------

def gate_figures(mode: str) -> dict | None:
    """The gate's refresh time by traces in the window, from bench/gate.py's results (or a run of it)."""
    if mode == "skip":
        return None
    if mode == "run":
        for traces in (1_000_000, 8_000_000):
            out = REPO / "bench" / "results" / f"gate-speed-{traces // 1_000_000}m.json"
            say(f"gate: bench/gate.py speed --traces {traces} (builds the store first: minutes)")
            subprocess.run([sys.executable, str(REPO / "bench" / "gate.py"), "speed", "--traces", str(traces),
                            "--json", str(out)], check=False)
    # oldest first: a figure a newer file has for the same window size replaces an older one
    docs = sorted((REPO / "bench" / "results").glob("gate-speed*.json"), key=lambda p: p.stat().st_mtime)
    found: dict = {"sources": [], "refresh_s": {}, "cli_s": {}}
    for p in docs:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        r = d.get("results", {})
        found["sources"].append({"file": str(p.relative_to(REPO)), "commit": d.get("env", {}).get("commit"),
                                 "date": d.get("env", {}).get("date")})
        _collect_gate(r, found)
    return found if found["sources"] else None


def _seconds(v) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        for k in ("median", "median_s", "s"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
    return None


def _collect_gate(r: dict, found: dict) -> None:
    """Refresh seconds keyed by traces, from the shapes bench/gate.py writes: serve's refresh as
    ``serve_refresh.refresh_s`` beside ``traces`` (one store per file), ``refresh_s`` as
    {traces: seconds or spread} or a list of {traces, refresh_s}; the full `gate --data-dir` run as
    ``gate_cli_s`` beside ``traces``."""
    traces = r.get("traces")
    if isinstance(r.get("gate_cli_s"), dict) and traces:
        found["cli_s"][str(traces)] = _seconds(r["gate_cli_s"])
    serve = r.get("serve_refresh")
    if isinstance(serve, dict) and traces and _seconds(serve.get("refresh_s")) is not None:
        found["refresh_s"][str(traces)] = _seconds(serve["refresh_s"])
    ref = r.get("refresh_s")
    if isinstance(ref, dict):
        if _seconds(ref) is not None and traces:
            found["refresh_s"][str(traces)] = _seconds(ref)
        else:
            for k, v in ref.items():
                if _seconds(v) is not None:
                    found["refresh_s"][str(k)] = _seconds(v)
    for item in r.get("windows", []) if isinstance(r.get("windows"), list) else []:
        if isinstance(item, dict) and item.get("traces") and _seconds(item.get("refresh_s")) is not None:
            found["refresh_s"][str(item["traces"])] = _seconds(item["refresh_s"])


# ---- the run -------------------------------------------------------------------------------------

def run(args) -> dict:
    data_root = tempfile.mkdtemp(prefix="shadowlens-footprint-", dir=args.tmp_dir)
    server = Server(args.shadowlens, os.path.join(data_root, "data"), args.extra_env)
    out: dict = {"problems": []}
    try:
        server.wait_ready()
        roles = Roles(server)
        say(f"server ready (pid {server.proc.pid}); warm-up {args.warmup:g} s")
        time.sleep(args.warmup)
        out["idle"] = quiet_phase(server, roles, args.idle, args.sample)
        _say_phase("idle", out["idle"])
        if args.paced > 0:
            out["paced"] = load_phase(server, roles, args, args.paced, args.rate, 1, 1)
            _say_phase(f"paced {args.rate:g} spans/s", out["paced"])
        if args.saturation > 0:
            out["saturation"] = load_phase(server, roles, args, args.saturation, None, args.clients, args.concurrency)
            _say_phase("saturation", out["saturation"])
        out["drain_s"] = wait_drained(server, 300)
        out["settle_s"] = wait_settled(server.data_dir, args.settle, args.settle_max)
        if args.paced > 0 and args.saturation > 0:
            # The paced phase again, now that the window holds the saturation's traces (10-20 minutes' worth
            # of 1,000 spans/s on the bench machine; window_traces says how many): the window's and the gate's
            # refreshes cost what they cost in a sidecar that has run for a while, which the first paced phase
            # (an empty window) does not show.
            # the saturation's payload is compressed first: the phase then pays for its own (charge_compression)
            out["compaction_wait_s"] = wait_compacted(server, COMPACTION_WAIT_S)
            in_window = server.scrape().get("shadowlens_traces_total")     # the run is shorter than the window
            out["paced_full"] = load_phase(server, roles, args, args.paced, args.rate, 1, 1)
            out["paced_full"]["window_traces"] = None if in_window is None else int(in_window)
            _say_phase(f"paced {args.rate:g} spans/s, window full", out["paced_full"])
            out["drain_s"] += wait_drained(server, 300)
            out["settle_s"] += wait_settled(server.data_dir, args.settle, args.settle_max)
        stored = count_stored(args.shadowlens, server.data_dir)
        live = disk_bytes(server.data_dir)
        out["disk_live"] = {"stored_spans": stored, "bytes": live, "bytes_per_span": per_span(live, stored)}
        out["after_settle"] = tree_memory(server, roles)
    except Exception as e:   # a figure like the others: say what went wrong, keep what was measured
        out["problems"].append(f"{type(e).__name__}: {e}\n{server.log_tail()}")
    finally:
        server.stop()
    out["server_exit"] = server.exit_code
    if "disk_live" in out:
        rest = disk_bytes(server.data_dir)
        stored = out["disk_live"]["stored_spans"]
        out["disk_at_rest"] = {"stored_spans": stored, "bytes": rest, "bytes_per_span": per_span(rest, stored)}
        if args.compact:
            try:    # a restart compresses the run's last payload segment: what a long-running store holds
                from disk import at_rest
                out["disk_compacted"] = at_rest(args.shadowlens, server.data_dir, stored)["compacted"]
                out["disk_compacted"]["stored_spans"] = stored
            except Exception as e:   # a figure like the others: say what went wrong
                out["problems"].append(f"could not compact the store by a restart: {e}")
        _say_disk(out)
    problems = server.log_problems()
    if problems:
        out["server_log_problem_lines"] = problems[:10]
    if args.keep_data:
        out["data_dir"] = data_root
    else:
        shutil.rmtree(data_root, ignore_errors=True)
    return out


def _mem(out: dict, phase: str, stat: str) -> float | None:
    """The tree's memory alone (summed PSS with nothing else mapping its files), or the machine's PSS without root."""
    r = out.get(phase, {})
    v = r.get(f"alone_{stat}_mb")
    return v if v is not None else r.get(f"pss_{stat}_mb")


def summary(out: dict, gate: dict | None) -> dict:
    """The figures against the goals, flat."""
    disk = out.get("disk_compacted", out.get("disk_at_rest", {})).get("bytes_per_span", {})
    s = {
        "pss_idle_mb": _mem(out, "idle", "median"),
        "pss_paced_mb": _mem(out, "paced", "median"),
        "pss_saturation_mb": _mem(out, "saturation", "peak"),
        "pss_saturation_median_mb": _mem(out, "saturation", "median"),
        "memory_basis": "alone" if out.get("idle", {}).get("alone_median_mb") is not None else "pss",
        "machine_pss_idle_mb": out.get("idle", {}).get("pss_median_mb"),
        "machine_pss_paced_mb": out.get("paced", {}).get("pss_median_mb"),
        "machine_pss_saturation_mb": out.get("saturation", {}).get("pss_peak_mb"),
        "cpu_idle_cores": out.get("idle", {}).get("cores"),
        "cpu_paced_cores": out.get("paced", {}).get("cores"),
        "cpu_paced_full_cores": out.get("paced_full", {}).get("cores"),
        "cpu_paced_compression_cores": out.get("paced", {}).get("compression_cores"),
        "cpu_paced_steady_cores": out.get("paced", {}).get("steady_cores"),
        "cpu_paced_full_compression_cores": out.get("paced_full", {}).get("compression_cores"),
        "cpu_paced_full_steady_cores": out.get("paced_full", {}).get("steady_cores"),
        "pss_paced_full_mb": _mem(out, "paced_full", "median"),
        "saturation_acked_per_s": out.get("saturation", {}).get("acked_per_s"),
        "bytes_per_span": disk.get("total"),
        "segments_bytes_per_span": disk.get("segments"),
        "duckdb_bytes_per_span": disk.get("duckdb"),
        "disk_basis": "compacted" if "disk_compacted" in out else "stopped",
    }
    if gate:
        for traces, key in ((1_000_000, "gate_refresh_1m_s"), (8_000_000, "gate_refresh_8m_s")):
            s[key] = gate["refresh_s"].get(str(traces))
            s[key.replace("refresh", "cli")] = gate["cli_s"].get(str(traces))
    s["goals"] = GOALS
    s["met"] = {k: (s.get(k) is not None and s[k] <= g) if s.get(k) is not None else None for k, g in GOALS.items()}
    return s


def _say_phase(name: str, r: dict) -> None:
    by = ", ".join(f"{k} {v.get('alone', v['pss']):.0f}" for k, v in r.get("by_process", {}).items())
    extra = f"; acked {r['acked_per_s']:,.0f} spans/s" if "acked_per_s" in r else ""
    say(f"{name}: alone median {r.get('alone_median_mb', 0):.0f} MB, peak {r.get('alone_peak_mb', 0):.0f} MB ({by}); "
        f"machine PSS median {r.get('pss_median_mb', 0):.0f} MB; "
        f"CPU {r.get('cores', 0):.3f} cores{extra}")


def _say_disk(out: dict) -> None:
    for key in ("disk_live", "disk_at_rest", "disk_compacted"):
        if key not in out:
            continue
        d = out[key]
        b = d["bytes_per_span"]
        say(f"{key}: {d['stored_spans']:,} spans; bytes/span total {b.get('total')}, segments {b.get('segments')}, "
            f"duckdb {b.get('duckdb')}, other {b.get('other')}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="shorter phases (~2 min): warm-up 10, idle 20, paced 30, saturation 20, settle 5 s")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds after /readyz before the idle phase (15)")
    ap.add_argument("--idle", type=float, default=60.0, help="idle phase, seconds (60)")
    ap.add_argument("--paced", type=float, default=60.0, help="paced phase, seconds (60; 0 skips it)")
    ap.add_argument("--rate", type=float, default=1000.0, help="the paced phase's spans/s (1000)")
    ap.add_argument("--saturation", type=float, default=30.0, help="closed-loop phase, seconds (30; 0 skips it)")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop client processes (4)")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop in-flight Exports per client (4)")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="the disk is read once the queue drained and the data dir's bytes stayed put this long "
                         "(15 s): the store's background work (compression, checkpoints) caught up")
    ap.add_argument("--settle-max", type=float, default=180.0, help="read the disk after this long regardless (180 s)")
    ap.add_argument("--no-compact", dest="compact", action="store_false",
                    help="skip the restart that compresses the run's last payload segment (bench/disk.py) before "
                         "the disk is read at rest")
    ap.add_argument("--sample", type=float, default=5.0,
                    help="memory sample interval, seconds (5; 2 at saturation): reading a tree's page map costs the "
                         "bench ~0.5 s of CPU, which on a small machine is taken from the server it measures")
    ap.add_argument("--gate", choices=("read", "run", "skip"), default="read",
                    help="the gate's refresh figures: read bench/results/gate-speed*.json (default), run "
                         "bench/gate.py at 1M and 8M traces (slow), or skip")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the started server (repeatable)")
    ap.add_argument("--shadowlens", default=os.path.join(REPO, ".venv", "bin", "shadowlens"))
    ap.add_argument("--pool-requests", type=int, default=64, help="distinct 512-span requests in the pool (64)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-Export deadline, seconds (30)")
    ap.add_argument("--tmp-dir", default=None)
    ap.add_argument("--keep-data", action="store_true")
    add_json_arg(ap)
    a = ap.parse_args(argv)
    if a.quick:     # shorter defaults; a phase's length given on the command line still wins (--saturation 0)
        ap.set_defaults(warmup=10.0, idle=20.0, paced=30.0, saturation=20.0, settle=5.0)
        a = ap.parse_args(argv)
    a.extra_env = {}
    for kv in a.server_env:
        if "=" not in kv:
            ap.error(f"--server-env expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        a.extra_env[k] = v
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    gstats = clients.load_pool(args.pool_requests, args.seed)
    out = run(args)
    charge_compression(out, compression_cost(compression_level(args.extra_env), args.tmp_dir))
    for phase in ("paced", "paced_full"):
        if "steady_cores" in out.get(phase, {}):
            r = out[phase]
            say(f"{phase}: {r['cores']:.4f} cores + {r['compression_cores']:.4f} compressing its payload "
                f"({r['payload_bytes_per_s'] / 1e6:.2f} MB/s) = {r['steady_cores']:.4f} steady")
    gate = gate_figures(args.gate)
    s = summary(out, gate)
    for k, g in GOALS.items():
        v = s.get(k)
        say(f"  {k:22s} {'–' if v is None else v:>10} goal <= {g}  {'' if v is None else 'ok' if v <= g else 'MISS'}")
    params = {k: v for k, v in vars(args).items() if k not in ("json", "extra_env")}
    emit("footprint", params, {"summary": s, "phases": out, "gate": gate, "generator": gstats.as_dict(),
                               "spans_per_request": SPANS_PER_REQUEST}, args.json)
    return 1 if out["problems"] or out.get("server_exit") not in (0, None) else 0


if __name__ == "__main__":
    sys.exit(main())
