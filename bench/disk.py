"""Disk at rest: bytes per stored span once the store's compactor has caught up (issue 18, part 4).

``serve`` compresses closed payload segments in the background (collector/store/compaction.py); the
segment being written stays plain until it is closed. ``at_rest`` measures a stopped store's data dir
twice: as the run left it (``live``: the last segment plain, compaction possibly behind) and after a
restart of ``serve`` on it has compressed every segment of the previous run (``compacted``: a start
closes the previous run's segments, and its compactor takes them at once), which is what a long-running
sidecar's store holds apart from its one open segment. Sizes are allocated bytes (``st_blocks``).

Compression ratio caveat: bench/pool.py cycles through ``--pool-requests`` pre-serialized requests
with fresh ids. A compressed block holds about 1 MiB of consecutive records and a bench request is
~1.3 MB, so every block holds exactly one request and never sees a repeated pool request: the figure
is that of distinct requests (``block_records`` in the result says how many records the blocks held).

Usage (on a data dir a run kept, with serve stopped):
  python bench/disk.py DATA_DIR [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

from common import REPO, add_json_arg, emit, say
from server import Server, count_stored

PENDING = "shadowlens_store_compaction_pending_bytes"


def disk_bytes(data_dir: str) -> dict:
    """Allocated bytes under the data dir: payload segments (plain and compressed apart), DuckDB, the rest."""
    parts = {"segments_plain": 0, "segments_compressed": 0, "duckdb": 0, "other": 0}
    for root, _, files in os.walk(data_dir):
        top = os.path.relpath(root, data_dir).split(os.sep)[0]
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
            if top == "segments":
                parts["segments_compressed" if ".segz" in name else "segments_plain"] += size
            elif ".duckdb" in name:
                parts["duckdb"] += size
            else:
                parts["other"] += size
    parts["segments"] = parts["segments_plain"] + parts["segments_compressed"]
    parts["total"] = parts["segments"] + parts["duckdb"] + parts["other"]
    return parts


def per_span(parts: dict, spans: int | None) -> dict:
    return {k: round(v / spans, 1) for k, v in parts.items()} if spans else {}


def _pending(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(PENDING + " "):
            return float(line.split()[1])
    return None


def compact_by_restart(exe: str, data_dir: str, timeout: float = 600.0) -> dict:
    """Start serve on a stopped store, wait until its compactor reports nothing pending, stop it."""
    t0 = time.monotonic()
    server = Server(exe, data_dir, {})
    try:
        server.wait_ready()
        deadline = time.monotonic() + timeout
        pending = _pending(server.metrics_port)
        while pending != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            pending = _pending(server.metrics_port)
    finally:
        server.stop()
    return {"seconds": round(time.monotonic() - t0, 1), "pending_bytes_at_stop": pending,
            "server_exit": server.exit_code}


def block_records(data_dir: str) -> dict:
    """How many records the compressed blocks held (1 for the bench's 1.3 MB requests)."""
    from shadowlens.collector.store.segments import list_segments, open_segment, read_frames
    seg_dir = os.path.join(data_dir, "segments")
    blocks = records = 0
    for seg in list_segments(seg_dir):
        with open_segment(seg_dir, seg) as f:
            if not f.compressed:
                continue
            blocks += len(f.blocks)
        records += sum(1 for _ in read_frames(seg_dir, seg))
    return {"blocks": blocks, "records": records, "records_per_block": round(records / blocks, 2) if blocks else None}


def at_rest(exe: str, data_dir: str, stored: int | None = None) -> dict:
    """Bytes per stored span as the run left the store, and after a restart compacted it. ``stored``: the
    spans in the store (counted with ``shadowlens query`` when not given)."""
    if stored is None:
        stored = count_stored(exe, data_dir)
    live = disk_bytes(data_dir)
    restart = compact_by_restart(exe, data_dir)
    compacted = disk_bytes(data_dir)
    return {"stored_spans": stored, "live": {"bytes": live, "bytes_per_span": per_span(live, stored)},
            "compacted": {"bytes": compacted, "bytes_per_span": per_span(compacted, stored)},
            "restart": restart, "blocks": block_records(data_dir)}


def say_at_rest(d: dict) -> None:
    for key in ("live", "compacted"):
        b = d[key]["bytes_per_span"]
        if b:
            say(f"  disk {key}: {b['total']:,.0f} B/span (segments {b['segments']:,.0f}: plain "
                f"{b['segments_plain']:,.0f} + compressed {b['segments_compressed']:,.0f}; DuckDB {b['duckdb']:,.0f})"
                f" over {d['stored_spans']:,} spans")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--shadowlens", default=os.path.join(REPO, ".venv", "bin", "shadowlens"))
    add_json_arg(ap)
    a = ap.parse_args(argv)
    d = at_rest(a.shadowlens, a.data_dir)
    say_at_rest(d)
    emit("disk", {"data_dir": a.data_dir}, d, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
