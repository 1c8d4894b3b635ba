#!/usr/bin/env python3
"""Parquet export benchmark: `shadowlens export parquet` speed, and bytes per span in the lake vs the store.

One run: starts `shadowlens serve` on a fresh data dir, sends the ingest benchmark's realistic traffic
(bench/ingest.py's pool: 512-span requests, ~15-20 attributes and 200-2000 bytes of prompt text per
span) over OTLP/HTTP, waits for every trace row, then times the command (a subprocess, start-up
included) with serve running (rows through the query socket) and stopped (the store file read-only),
for all tables and for spans alone. Prints one JSON document (bench/common.py), or writes it with --json FILE.

  python bench/export.py                 # 100k spans
  python bench/export.py --spans 300000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from clients import http_sender  # noqa: E402
from common import add_json_arg, emit, say  # noqa: E402
from harness import SHADOWLENS, Server, free_port, server_env  # noqa: E402
from pool import build_pool, id_suffix, materialize  # noqa: E402


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def _export(server: Server, out: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(SHADOWLENS + ["export", "parquet", "--data-dir", str(server.data_dir), "--out", str(out), *args],
                       env=server.env, capture_output=True, text=True, cwd=REPO, timeout=3600)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"export failed: {r.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", help="work in this directory and keep it (the store and the lakes)")
    ap.add_argument("--poll", type=float, default=3.0,
                    help="seconds between counts of the trace rows; two equal counts in a row mean all are written (3)")
    add_json_arg(ap)
    args = ap.parse_args()
    n_req = max(1, args.spans // 512)
    templates, pool_stats, _ = build_pool(min(n_req, 64), args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        g, h, m = free_port(), free_port(), free_port()
        server = Server(data_dir=tmp / "data", grpc_port=g, http_port=h, metrics_port=m,
                        env=server_env(g, h, m, SHADOWLENS_TRACES__IDLE_SECONDS="1")).start(60)
        try:
            send = http_sender("127.0.0.1", h, 60)
            for i in range(n_req):
                t = templates[i % len(templates)]
                status, _ = send(materialize(t, id_suffix(os.getpid(), 0, i)))
                if status != "ok":
                    raise SystemExit(f"send failed: {status}")
            spans = server.query("select count(*) AS n from spans_core")[0]["n"]
            deadline = time.monotonic() + 600
            want = None
            while time.monotonic() < deadline:       # every trace row written (none open any more)
                traces = server.query("select count(*) AS n from traces")[0]["n"]
                if traces == want:
                    break
                want = traces
                time.sleep(args.poll)
            rows = {t: server.query(f"select count(*) AS n from {t}")[0]["n"] for t in ("spans", "traces", "evals", "logs")}
            running_all = _export(server, tmp / "lake_running")
            running_spans = _export(server, tmp / "lake_running_spans", "--tables", "spans")
        finally:
            assert server.stop() == 0
        stopped_all = _export(server, tmp / "lake_stopped")
        stopped_spans = _export(server, tmp / "lake_stopped_spans", "--tables", "spans")
        lake = tmp / "lake_stopped"
        store_bytes = _dir_bytes(server.data_dir / "segments") + sum(
            p.stat().st_size for p in server.data_dir.glob("shadowlens.duckdb*"))
        total = sum(rows.values())
        out = {
            "spans": spans, "rows": rows, "otlp_bytes_per_span": round(pool_stats.bytes / pool_stats.spans, 1),
            "export_rows_per_s": {"running_all_tables": round(total / running_all),
                                  "stopped_all_tables": round(total / stopped_all),
                                  "running_spans": round(spans / running_spans),
                                  "stopped_spans": round(spans / stopped_spans)},
            "export_seconds": {"running_all_tables": round(running_all, 2), "stopped_all_tables": round(stopped_all, 2),
                               "running_spans": round(running_spans, 2), "stopped_spans": round(stopped_spans, 2)},
            "bytes_per_span": {"lake_spans_table": round(_dir_bytes(lake / "spans", "*.parquet") / spans, 1),
                               "lake_all_tables": round(_dir_bytes(lake, "*.parquet") / spans, 1),
                               "store_all_tables": round(store_bytes / spans, 1)},
            "files": len(list(lake.rglob("*.parquet"))),
        }
        say(f"export parquet: {out['export_rows_per_s']} rows/s; bytes/span {out['bytes_per_span']}")
        emit("export", args, out, args.json)


if __name__ == "__main__":
    main()
