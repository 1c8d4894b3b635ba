#!/usr/bin/env python3
"""Analyzer benchmark: /metrics latency with many cohort series, and the window refresh over 1M spans.

Prints figures (medians) as one JSON document (stdout, or --json FILE), its lines on stderr; it is not a
test. Bars (issue): /metrics with 1,000 cohort series answers in <= 100 ms; windowed gauges refresh in
<= 1 s with 1M spans in the window.

  python bench/analyzers.py                  # both measurements
  python bench/analyzers.py --series 1000 --spans 1000000 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402
from common import add_json_arg, emit, say, spread  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from shadowlens.analyzers.aggregates import StreamingAggregates  # noqa: E402
from shadowlens.analyzers.assembly import AssemblyCounters, CompletedTraces  # noqa: E402
from shadowlens.analyzers.cohorts import CohortLimiter  # noqa: E402
from shadowlens.analyzers.window import WindowQuery  # noqa: E402
from shadowlens.collector.counters import IngestCounters  # noqa: E402
from shadowlens.collector.store.writer import StoreWriter  # noqa: E402
from shadowlens.config import default_config  # noqa: E402
from shadowlens.exporters.analysis import AnalysisMetrics  # noqa: E402
from shadowlens.exporters.http import MetricsServer  # noqa: E402

LABELS = ("intent", "language", "tier")


def cohorts(n_series: int) -> list[tuple]:
    """n_series (route, intent, language, tier) combinations, half per route."""
    per_route = n_series // 2
    out = []
    for route in ("baseline", "candidate"):
        for i in range(per_route):
            out.append((route, f"intent-{i % 25}", f"lang-{(i // 25) % 10}", f"tier-{i // 250}"))
    return out


def fill_store(data_dir: Path, n_spans: int, series: list[tuple], spans_per_trace: int = 10) -> int:
    """Writes n_spans span rows and their trace rows, all completed within the window, with SQL."""
    cfg = default_config()
    store = StoreWriter(data_dir, cfg.cohort_labels, IngestCounters())
    store.open()
    con = store.con
    n_traces = n_spans // spans_per_trace
    combos = pl.DataFrame({"k": list(range(len(series))), "route": [s[0] for s in series],
                           "intent": [s[1] for s in series], "language": [s[2] for s in series],
                           "tier": [s[3] for s in series]})
    con.register("combos", combos.to_arrow())
    now_us = int(time.time() * 1e6)
    con.execute(f"""
        INSERT INTO traces (trace_id, route, request_id, intent, language, tier, start_time, end_time,
                            duration_seconds, steps, llm_calls, tool_calls, input_tokens, output_tokens, cost_usd,
                            evals_total, evals_failed, refused, escalated, model, incomplete, span_count,
                            min_ingest_seq, max_ingest_seq, completed_at, revision)
        SELECT printf('%032x', i), c.route, 'r' || i, c.intent, c.language, c.tier,
               make_timestamp({now_us} - 60000000), make_timestamp({now_us} - 30000000),
               exp(random() * 4), 1 + (random() * 12)::INT, 5, 3, 1000, 200, random() / 100,
               1, (random() < 0.1)::INT, random() < 0.05, random() < 0.02, 'gpt-4o', false, {spans_per_trace},
               1, 1, make_timestamp({now_us} - (random() * 600000000)::BIGINT), 0
        FROM range({n_traces}) t(i) JOIN combos c ON c.k = i % {len(series)}""")
    con.execute("""
        INSERT INTO evals (trace_id, span_id, name, score, label, passed, explanation, source, ingest_seq)
        SELECT trace_id, 'ab', 'task_completion', NULL, NULL, evals_failed = 0, NULL, 'span_attribute', 1 FROM traces""")
    con.execute(f"""
        INSERT INTO spans_core (trace_id_hi, trace_id_lo, span_id_int, name, span_kind, start_time, end_time,
                                duration_seconds, input_tokens, output_tokens, ingest_seq, received_at)
        SELECT 0, i // {spans_per_trace}, i, 'chat', 'LLM',
               make_timestamp_ns(({now_us} - 60000000) * 1000), make_timestamp_ns(({now_us} - 59000000) * 1000), 1.0,
               1000, 200, 1, make_timestamp({now_us})
        FROM range({n_spans}) t(i)""")
    con.execute("CHECKPOINT")
    store.shutdown()
    return n_traces


def bench_window(data_dir: Path, series, repeat: int) -> list[float]:
    cfg = default_config()
    store = StoreWriter(data_dir, cfg.cohort_labels, IngestCounters())
    store.open()
    limiter = CohortLimiter(LABELS, max_values=1000, forget_after_s=3600)
    window = WindowQuery(store.cursor, limiter, 900)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        snap = window.refresh()
        times.append(time.perf_counter() - t0)
    store.shutdown()
    say(f"  window rows: {snap.traces.height} (route x cohort), eval rows: {snap.evals.height}")
    return times, snap


def bench_metrics(series, snap, repeat: int) -> list[float]:
    limiter = CohortLimiter(LABELS, max_values=1000, forget_after_s=3600)
    agg = StreamingAggregates(limiter)
    rng = random.Random(1)
    n = len(series) * 20
    rows = [series[i % len(series)] for i in range(n)]
    traces = pl.DataFrame({
        "trace_id": [f"{i:032x}" for i in range(n)], "route": [r[0] for r in rows],
        "intent": [r[1] for r in rows], "language": [r[2] for r in rows], "tier": [r[3] for r in rows],
        "duration_seconds": [rng.lognormvariate(1, 1) for _ in range(n)], "steps": [rng.randint(1, 12) for _ in range(n)],
        "cost_usd": [rng.random() / 50 for _ in range(n)], "refused": [rng.random() < 0.05 for _ in range(n)],
        "escalated": [rng.random() < 0.02 for _ in range(n)]})
    evals = pl.DataFrame({"trace_id": traces["trace_id"], "name": ["task_completion"] * n,
                          "passed": [rng.random() > 0.1 for _ in range(n)], "n": [1] * n})
    agg.add(CompletedTraces(traces, evals, None, 0, 0))
    registry = CollectorRegistry(auto_describe=False)
    server = MetricsServer("127.0.0.1", 0, registry, ready=lambda: (True, "ok"))
    server.extra = AnalysisMetrics(agg, lambda: snap, AssemblyCounters(), limiter).render
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    times, size, lines = [], 0, 0
    try:
        for accept in ("text/plain", "application/openmetrics-text"):
            for _ in range(repeat):
                req = urllib.request.Request(url, headers={"Accept": accept})
                t0 = time.perf_counter()
                body = urllib.request.urlopen(req, timeout=30).read()
                times.append((accept, time.perf_counter() - t0))
                size, lines = len(body), body.count(b"\n")
        if shutil.which("curl"):   # a C client, like Prometheus's Go scraper (urllib's own reading is slow)
            for accept in ("text/plain", "application/openmetrics-text"):
                for _ in range(repeat):
                    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Accept: {accept}", "-w",
                                          "%{time_total}", url], capture_output=True, text=True)
                    times.append((f"curl {accept}", float(out.stdout)))
    finally:
        server.shutdown()
    say(f"  /metrics: {lines:,} lines, {size / 1e6:.1f} MB")
    return times, lines, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1000, help="route x cohort series (default 1000)")
    ap.add_argument("--spans", type=int, default=1_000_000, help="spans in the window (default 1M)")
    ap.add_argument("--repeat", type=int, default=5)
    add_json_arg(ap)
    args = ap.parse_args(argv)
    series = cohorts(args.series)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        t0 = time.perf_counter()
        n_traces = fill_store(Path(d), args.spans, series)
        say(f"store: {args.spans:,} spans, {n_traces:,} traces over {len(series)} series "
              f"(filled in {time.perf_counter() - t0:.1f} s)")
        times, snap = bench_window(Path(d), series, args.repeat)
        med = statistics.median(times)
        say(f"window refresh: median {med * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})"
            f"  bar <= 1000 ms: {'PASS' if med <= 1.0 else 'MISS'}")
    out = {"spans": args.spans, "traces": n_traces, "series": len(series), "window_refresh_s": spread(times)}
    mt, lines, size = bench_metrics(series, snap, args.repeat)
    out.update({"metrics_lines": lines, "metrics_bytes": size, "metrics_get_s": {}})
    for accept in dict.fromkeys(a for a, _ in mt):
        xs = [t for a, t in mt if a == accept]
        med = statistics.median(xs)
        out["metrics_get_s"][accept] = spread(xs)
        say(f"GET /metrics ({accept}): median {med * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"
            f"  bar <= 100 ms: {'PASS' if med <= 0.1 else 'MISS'}")
    emit("analyzers", args, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
