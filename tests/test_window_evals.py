"""The window's eval fail ratios read the window's evals only: the store keeps every eval for
``store.retention`` (7 days by default), and a refresh every ``analyzers.window_refresh`` that read them
all grew with the retention instead of the window (issue 18, CPU at a steady rate)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest

from shadowlens.analyzers.cohorts import CohortLimiter
from shadowlens.analyzers.window import WindowQuery
from shadowlens.collector.store.database import SegmentPayloads, migrate, register_functions

LABELS = ("intent", "language", "tier")
OLD_TRACES = 150_000        # completed a day ago: their evals fill two of DuckDB's 122,880-row groups
NEW_TRACES = 2_000          # in the window
NOW = time.time()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store file (trace ids are random hex, as real ones are, so no id range prunes a scan): old traces
    and their evals (ingest_seq 1..OLD_TRACES), then the window's traces, each with a task_completion eval
    that fails for every third trace and a tone eval that fails for every fifth (both counted in its row's
    evals_total: the window counts the evals a row was written with, analyzers/window.py)."""
    data = tmp_path_factory.mktemp("window-evals")
    path = data / "store.duckdb"
    con = duckdb.connect(str(path))
    register_functions(con, SegmentPayloads(data))
    migrate(con, LABELS)
    con.execute(f"""
        INSERT INTO traces (trace_id, route, intent, language, tier, duration_seconds, steps, cost_usd, refused,
                            escalated, completed_at, min_ingest_seq, max_ingest_seq, incomplete, revision, evals_total)
        SELECT md5('old-' || i), 'baseline', 'faq', 'en', 'free', 1.0, 2, 0.01, false, false,
               make_timestamp({int((NOW - 86400) * 1e6)}::BIGINT), i, i, false, 0, 1
        FROM range(1, {OLD_TRACES} + 1) t(i)""")
    con.execute("""
        INSERT INTO evals (trace_id, span_id, name, passed, source, ingest_seq)
        SELECT trace_id, '00', 'task_completion', false, 'test', min_ingest_seq FROM traces""")
    first_new = OLD_TRACES + 1
    con.execute(f"""
        INSERT INTO traces (trace_id, route, intent, language, tier, duration_seconds, steps, cost_usd, refused,
                            escalated, completed_at, min_ingest_seq, max_ingest_seq, incomplete, revision, evals_total)
        SELECT md5('new-' || i), CASE WHEN i % 2 = 0 THEN 'baseline' ELSE 'candidate' END, 'faq', 'en', 'free',
               1.0, 2, 0.01, false, false, make_timestamp({int((NOW - 60) * 1e6)}::BIGINT), {first_new} + i // 100,
               {first_new} + i // 100, false, 0, 2
        FROM range({NEW_TRACES}) t(i)""")
    con.execute(f"""
        INSERT INTO evals (trace_id, span_id, name, passed, source, ingest_seq)
        SELECT md5('new-' || i), '00', 'task_completion', i % 3 <> 0, 'test', {first_new} + i // 100 + 1
        FROM range({NEW_TRACES}) t(i)
        UNION ALL
        SELECT md5('new-' || i), '00', 'tone', i % 5 <> 0, 'test', {first_new} + i // 100 + 2 FROM range({NEW_TRACES}) t(i)""")
    con.execute("CHECKPOINT")
    con.close()
    return path


def _window(path: Path, profile: Path) -> WindowQuery:
    con = duckdb.connect(str(path), read_only=True)

    def cursor():
        cur = con.cursor()
        # each statement's profile overwrites the file: after a refresh it holds the evals query's, its last
        cur.execute("PRAGMA enable_profiling='json'")
        cur.execute(f"SET profiling_output='{profile}'")
        return cur
    return WindowQuery(cursor, CohortLimiter(LABELS, 50, forget_after_s=1800), 900, now=lambda: NOW)


def _scans(node: dict, table: str):
    if node.get("type") == "TABLE_SCAN" and node.get("extra_info", {}).get("Table", "").endswith(f".{table}"):
        yield node
    for child in node.get("children", []):
        yield from _scans(child, table)


def test_fail_ratios_are_those_of_the_windows_evals(store, tmp_path):
    snap = _window(store, tmp_path / "profile.json").refresh()
    got = {(r["route"], r["eval"]): (r["fail_ratio"], r["n"]) for r in snap.evals.iter_rows(named=True)}
    want = {}
    for route, parity in (("baseline", 0), ("candidate", 1)):
        ids = [i for i in range(NEW_TRACES) if i % 2 == parity]
        want[(route, "task_completion")] = (sum(i % 3 == 0 for i in ids) / len(ids), len(ids))
        want[(route, "tone")] = (sum(i % 5 == 0 for i in ids) / len(ids), len(ids))
    assert got.keys() == want.keys()
    for key, (ratio, n) in want.items():
        assert got[key][0] == pytest.approx(ratio) and got[key][1] == n


def test_a_refresh_does_not_read_the_evals_of_traces_that_left_the_window(store, tmp_path):
    """Before, the evals scan read all 154,000 rows; now the row groups before the window's first
    ingest_seq are skipped by their zonemaps."""
    profile = tmp_path / "profile.json"
    _window(store, profile).refresh()
    scans = [s for op in json.loads(profile.read_text())["operator"] for s in _scans(op, "evals")]
    assert len(scans) == 1, "the profile is not the evals query's"
    total = OLD_TRACES + 2 * NEW_TRACES
    assert scans[0]["rows_scanned"] < total - 100_000, (
        f"{scans[0]['rows_scanned']} of {total} eval rows read for {2 * NEW_TRACES} in the window")
