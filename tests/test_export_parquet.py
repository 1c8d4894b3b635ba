"""`shadowlens export parquet` and serve's `export.parquet`: the lake read back with DuckDB, pyarrow
and polars and compared with the store; idempotent; with serve running, stopped, and continuous.

Expected values come from what the test sent (times, ids, attributes) and from the store read through
`shadowlens query`, never from the exporter's code."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from harness import REPO, SHADOWLENS, wait_for
from otlp_builders import log_request, span_request

HOUR_NS = 3600 * 10**9
TABLES = ("spans", "traces", "evals", "logs")
# key columns per table: the checksum compares these between the store and the lake
KEYS = {
    "spans": ("trace_id", "span_id", "start_time", "name", "input_tokens", "route"),
    "traces": ("trace_id", "start_time", "route", "span_count", "input_tokens"),
    "evals": ("trace_id", "span_id", "name", "passed"),
    "logs": ("trace_id", "event_name", "time"),
}


def _base_ns() -> int:
    """22:00 UTC two days ago: the sent hours (22:00 .. 01:59) cross a date and are all closed."""
    day = int(time.time()) // 86400 - 1
    return (day * 86400 - 2 * 3600) * 10**9


def _post(server, path: str, body: bytes) -> None:
    req = urllib.request.Request(server.http_endpoint + path, data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def _traffic(base_ns: int, n_traces: int, seed: int, hours: int = 4) -> tuple[list[dict], list[dict]]:
    """Traces spread over ``hours`` hours from base: a root and two LLM children each (one with an eval
    result); log records: one per trace with a time, plus every tenth without a time."""
    rng = random.Random(seed)
    spans, logs = [], []
    for i in range(n_traces):
        tid, root = rng.randbytes(16), rng.randbytes(8)
        start = base_ns + rng.randrange(hours * HOUR_NS - 10**10)
        route = ("baseline", "candidate")[i % 2]
        spans.append({"trace_id": tid, "span_id": root, "name": "agent.run", "start": start, "end": start + 5 * 10**9,
                      "attrs": {"shadow.route": route, "shadow.request_id": f"r{i // 2}",
                                "cohort.intent": rng.choice(["billing", "refund"])}})
        for j in range(2):
            attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                     "gen_ai.usage.input_tokens": rng.randint(1, 999), "input.value": f"question {i}.{j} ü"}
            if j == 1:
                attrs.update({"eval.name": "task_completion", "eval.passed": rng.random() < 0.8})
            spans.append({"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": f"chat{j}",
                          "start": start + (j + 1) * 10**9, "end": start + (j + 2) * 10**9, "attrs": attrs,
                          "events": [("gen_ai.choice", {"index": j})]})
        logs.append({"trace_id": tid, "time": start + 10**8, "event_name": "gen_ai.client.note", "body": f"log {i}"})
        if i % 10 == 0:
            logs.append({"event_name": "untimed", "body": f"no time {i}", "time": 0})
    return spans, logs


def _send(server, spans: list[dict], logs: list[dict]) -> None:
    for k in range(0, len(spans), 300):
        _post(server, "/v1/traces", span_request(spans[k:k + 300]).SerializeToString())
    if logs:
        _post(server, "/v1/logs", log_request(logs).SerializeToString())


def _wait_traces(server, n: int, timeout: float = 60) -> None:
    wait_for(lambda: server.query("select count(*) AS n from traces")[0]["n"] >= n, timeout, 0.3,
             what=f"{n} traces completed")


def _cli(server, *args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(SHADOWLENS + ["export", "parquet", "--data-dir", str(data_dir or server.data_dir), *args],
                         env=server.env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def _norm(v):
    """One text form for a value read from JSON (the store, through `shadowlens query`) or Parquet."""
    if isinstance(v, datetime):
        v = v.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    elif isinstance(v, str) and len(v) >= 19 and v[4] == "-" and v[10] in " T" and v[13] == ":":
        # the store's ns text "2026-..-.. 22:01:02.123456789": microseconds (the lake's unit)
        head, _, frac = v.replace("T", " ").partition(".")
        v = f"{head}.{(frac + '000000')[:6]}"
    return "" if v is None else str(v)


def _checksum(rows) -> str:
    return hashlib.sha256("\n".join(sorted("|".join(map(_norm, r)) for r in rows)).encode()).hexdigest()


def _store_figures(server) -> dict:
    out = {}
    for t in TABLES:
        rows = server.query(f"select {', '.join(KEYS[t])} from {t}")
        out[t] = (len(rows), _checksum([tuple(r[c] for c in KEYS[t]) for r in rows]))
    return out


def _lake_figures_pyarrow(lake: Path) -> dict:
    out = {}
    for t in TABLES:
        table = ds.dataset(lake / t, format="parquet", partitioning="hive").to_table(columns=list(KEYS[t]))
        out[t] = (table.num_rows, _checksum(zip(*(table.column(c).to_pylist() for c in KEYS[t]))))
    return out


def _lake_figures_duckdb(lake: Path) -> dict:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    out = {}
    for t in TABLES:
        rows = con.execute(f"SELECT {', '.join(KEYS[t])} FROM read_parquet('{lake}/{t}/**/*.parquet',"
                           " hive_partitioning = true)").fetchall()
        out[t] = (len(rows), _checksum(rows))
    return out


def _parquet_files(lake: Path) -> list[Path]:
    return sorted(p for p in lake.rglob("*") if p.is_file())


@pytest.fixture
def loaded(serve_factory):
    server = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "0.5"})
    base = _base_ns()
    spans, logs = _traffic(base, 120, seed=7)
    _send(server, spans, logs)
    _wait_traces(server, 120)
    return server, base, spans, logs


def test_export_round_trips_with_serve_running_then_stopped(loaded, tmp_path):
    server, base, spans, logs = loaded
    store = _store_figures(server)
    assert store["spans"][0] == len(spans) and store["traces"][0] == 120 and store["evals"][0] == 120
    assert store["logs"][0] == len(logs)

    lake = tmp_path / "lake"
    out = _cli(server, "--out", str(lake))
    assert "rows/s" in out.stdout
    assert _lake_figures_duckdb(lake) == store
    assert _lake_figures_pyarrow(lake) == store

    # the layout: one folder per table, date=YYYY-MM-DD below, the dates of the times sent
    def day(ns):
        return datetime.fromtimestamp(ns // 10**9, timezone.utc).strftime("%Y-%m-%d")
    want_days = {day(s["start"]) for s in spans if "parent" not in s}
    assert len(want_days) == 2          # 22:00 .. 01:59 crosses midnight
    got_days = {p.name for p in (lake / "traces").iterdir()}
    assert got_days == {f"date={d}" for d in want_days}
    files = _parquet_files(lake)
    assert all(p.suffix == ".parquet" and p.parent.name.startswith("date=") for p in files), files

    # spans keep every column of the spans view; JSON as text, what was sent
    view_cols = list(server.query("select * from spans limit 1")[0])
    lake_spans = ds.dataset(lake / "spans", format="parquet", partitioning="hive").to_table()
    assert [c for c in lake_spans.column_names if c != "date"] == view_cols
    sent = {s["span_id"].hex(): s for s in spans}
    for row in lake_spans.to_pylist()[:50]:
        attrs = json.loads(row["attributes"])
        s = sent[row["span_id"]]
        assert attrs.get("input.value") == s["attrs"].get("input.value")
        assert json.loads(row["resource_attributes"]) == {"service.name": "test-agent"}
        assert [e["name"] for e in json.loads(row["events"])] == [e for e, _ in s.get("events", [])]
        assert row["start_time"] == datetime.fromtimestamp(s["start"] / 1e9, timezone.utc).replace(
            microsecond=(s["start"] // 1000) % 10**6)

    # plain Parquet: zstd, no extension types, readable by polars
    for p in files:
        md = pq.read_metadata(p)
        assert {md.row_group(0).column(i).compression for i in range(md.num_columns)} == {"ZSTD"}
        schema = pq.read_schema(p)
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
        assert b"ARROW:extension:name" not in str(schema).encode()
    import polars as pl
    assert pl.scan_parquet(str(lake / "spans" / "**" / "*.parquet"), hive_partitioning=True).select(
        pl.len()).collect().item() == store["spans"][0]

    # stopped: the same lake from the file
    assert server.stop() == 0
    lake2 = tmp_path / "lake2"
    _cli(server, "--out", str(lake2))
    assert _lake_figures_duckdb(lake2) == store
    assert [p.relative_to(lake2) for p in _parquet_files(lake2)] == [p.relative_to(lake) for p in files]


def test_an_hour_larger_than_a_slice_is_read_in_slices_and_written_whole(loaded, tmp_path, monkeypatch):
    """Hours are read in slices cut at quantiles of the time (memory); every row lands in one slice."""
    from shadowlens.collector.store.reader import query
    from shadowlens.exporters import parquet
    server, base, spans, logs = loaded
    store = _store_figures(server)
    assert server.stop() == 0
    monkeypatch.setattr(parquet, "SLICE_ROWS", {t: 40 for t in TABLES})
    lake = tmp_path / "lake"
    parquet.export(lambda sql: query(server.data_dir, sql), lake, "s1", TABLES)
    assert _lake_figures_duckdb(lake) == store
    assert max(pq.read_metadata(p).num_row_groups for p in _parquet_files(lake)) >= 2


def test_exporting_again_and_overlapping_ranges_keep_each_row_once(loaded, tmp_path):
    server, base, spans, logs = loaded
    store = _store_figures(server)
    lake = tmp_path / "lake"
    _cli(server, "--out", str(lake))
    first = _parquet_files(lake)
    _cli(server, "--out", str(lake))
    # a range that starts mid-hour: its hours are written whole, under the same names
    mid = datetime.fromtimestamp((base + HOUR_NS + HOUR_NS // 2) // 10**9, timezone.utc).isoformat()
    _cli(server, "--out", str(lake), "--since", mid, "--tables", "spans,logs")
    assert _parquet_files(lake) == first, "no new files, no temporary files left"
    assert _lake_figures_duckdb(lake) == store
    # --until before the data: nothing written; a range of one hour: only that hour's files
    lake3 = tmp_path / "lake3"
    start = datetime.fromtimestamp(base // 10**9, timezone.utc)
    _cli(server, "--out", str(lake3), "--since", start.isoformat(),
         "--until", start.replace(minute=59).isoformat(), "--tables", "spans")
    names = [p.name for p in _parquet_files(lake3)]
    assert len(names) == 1 and names[0].startswith(start.strftime("%Y%m%dT%H")), names
    want = sum(1 for s in spans if base <= s["start"] < base + HOUR_NS)
    assert pq.read_metadata(_parquet_files(lake3)[0]).num_rows == want


def test_export_options_errors_exit_2(server, tmp_path):
    for args in (["--tables", "spans,nope"], ["--since", "yesterday-ish"]):
        out = subprocess.run(SHADOWLENS + ["export", "parquet", "--data-dir", str(server.data_dir), "--out",
                                           str(tmp_path / "l"), *args], env=server.env, capture_output=True,
                             text=True, cwd=REPO, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    out = subprocess.run(SHADOWLENS + ["export", "parquet", "--data-dir", str(tmp_path / "none"), "--out",
                                       str(tmp_path / "l")], env=server.env, capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 2 and "no store" in out.stderr


def _metric(server, name: str) -> float:
    for line in server.metrics_text().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def test_serve_exports_closed_hours_on_its_own_and_rewrites_an_hour_that_changed(serve_factory, tmp_path):
    lake = tmp_path / "lake"
    lake.write_text("not a directory yet")          # the first passes fail: counted, retried, ingest goes on
    server = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "0.5", "SHADOWLENS_EXPORT__PARQUET__DIR": str(lake),
                                "SHADOWLENS_EXPORT__PARQUET__INTERVAL": "1s",
                                "SHADOWLENS_EXPORT__PARQUET__DELAY": "0s"})
    base = _base_ns()
    spans, logs = _traffic(base, 60, seed=3)
    logs = [r for r in logs if r["time"]]          # an untimed record falls in the current hour, not closed yet
    _send(server, spans, logs)
    _wait_traces(server, 60)
    assert server.query("select count(*) AS n from spans")[0]["n"] == len(spans)
    wait_for(lambda: _metric(server, "shadowlens_export_parquet_failures_total") >= 2, 30, 0.3, what="two failures counted")
    lag_failing = _metric(server, "shadowlens_export_parquet_lag_seconds")

    lake.unlink()                                    # the next retry succeeds
    store = _store_figures(server)
    wait_for(lambda: lake.is_dir() and _lake_figures_duckdb(lake) == store, 60, 0.3, what="the lake matching the store")
    assert _metric(server, "shadowlens_export_parquet_lag_seconds") <= max(lag_failing, 3600 + 5)
    assert _metric(server, 'shadowlens_export_parquet_rows_total{table="spans"}') == len(spans)

    # a late span into an exported hour: that hour's file is written again, each row once
    late_spans, _ = _traffic(base, 1, seed=99, hours=1)
    files_before = {p.name for p in _parquet_files(lake)}
    _send(server, late_spans, [])
    _wait_traces(server, 61)
    store = _store_figures(server)
    wait_for(lambda: _lake_figures_duckdb(lake) == store, 60, 0.3, what="the late trace reaching the lake")
    assert {p.name for p in _parquet_files(lake)} == files_before, "the hour's files replaced, none added"
    assert _lake_figures_pyarrow(lake) == store

    # the command line writes the same names: exporting the same store again changes no row
    _cli(server, "--out", str(lake))
    assert _lake_figures_duckdb(lake) == store
    assert server.stop() == 0
