"""The store: retention, read-only queries with and without a running server, size metric."""
from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
from conftest import REPO, SHADOWLENS
from otlp_builders import random_spans, span_request

from collector.config import default_config
from collector.decode.normalize import Normalizer
from collector.stats import IngestStats
from collector.store.database import SEGMENTS_DIR
from collector.store.reader import QueryError, query
from collector.store.retention import Retention
from collector.store.segments import list_segments
from collector.store.writer import StoreWriter

HOUR_NS = 3600 * 10**9


def _spans_at(start_ns: int, n: int, seed: int):
    spans = random_spans(n, random.Random(seed))
    for i, d in enumerate(spans):
        d["start"] = start_ns + i
        d["end"] = start_ns + i + 10**6
    return span_request(spans).SerializeToString()


def test_retention_deletes_old_spans_and_their_segments(tmp_path):
    cfg = default_config()
    clock = [time.time()]
    stats = IngestStats()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    store = StoreWriter(tmp_path, cfg.cohort_labels, stats, now=lambda: clock[0])
    store.start()
    now_ns = int(clock[0] * 1e9)
    store.submit(norm.normalize_traces(_spans_at(now_ns - 10 * HOUR_NS, 20, 1))).result(10)
    store.shutdown()
    # a restart starts a new segment; the old one holds only old payloads
    clock[0] += 10 * 3600
    store = StoreWriter(tmp_path, cfg.cohort_labels, stats, now=lambda: clock[0])
    store.start()
    store.submit(norm.normalize_traces(_spans_at(int(clock[0] * 1e9), 12, 2))).result(10)
    assert len(list_segments(tmp_path / SEGMENTS_DIR)) == 2
    retention = Retention(tmp_path, store.cursor, retention_s=3600, interval_s=3600,
                          current_segment=store.current_segment, now=lambda: clock[0])
    assert retention.run_once() == 20
    con = store.cursor()
    assert con.execute("select count(*) from spans_core").fetchone()[0] == 12
    assert con.execute("select count(*) from payloads").fetchone()[0] == 1
    # the remaining spans still decode their attributes from the surviving segment
    assert con.execute("select count(*) from spans where attributes is not null").fetchone()[0] == 12
    con.close()
    assert len(list_segments(tmp_path / SEGMENTS_DIR)) == 1
    store.shutdown()


def test_query_is_read_only_through_the_server_and_directly(server, tmp_path):
    with pytest.raises(QueryError, match="read-only"):
        query(server.data_dir, "delete from spans_core")
    assert query(server.data_dir, "select 41 + 1 as x").to_pylist() == [{"x": 42}]
    server.stop()
    with pytest.raises(QueryError, match="read-only|read only|Cannot execute"):
        query(server.data_dir, "insert into evals (name) values ('x')")
    assert query(server.data_dir, "select count(*) as n from spans_core").to_pylist() == [{"n": 0}]


def test_query_command_formats(server):
    from test_receivers import grpc_export
    grpc_export(server.grpc_endpoint, span_request(random_spans(4, random.Random(3))).SerializeToString())

    def run(*args):
        out = subprocess.run(SHADOWLENS + ["query", "--data-dir", str(server.data_dir), *args],
                             capture_output=True, text=True, cwd=REPO, env=server.env, timeout=60)
        return out.returncode, out.stdout, out.stderr

    code, out, _ = run("select name, count(*) as n from spans group by name order by name", "--format", "csv")
    assert code == 0 and out.splitlines() == ["name,n", "agent.run,1", "chat,3"]
    code, out, _ = run("select count(*) as n from spans", "--format", "json")
    assert json.loads(out) == [{"n": 4}]
    code, out, _ = run("select count(*) as n from spans")
    assert code == 0 and "(1 row)" in out
    code, _, err = run("select * from no_such_table")
    assert code == 1 and "no_such_table" in err and len(err.strip().splitlines()) == 1


def test_store_bytes_metric_reports_disk_use(server):
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    assert fams["shadowlens_store_bytes"].samples[0].value > 0


def test_dedup_keys_match_between_python_and_sql(tmp_path):
    """The key a restart reloads with SQL equals the one ingest computes from the raw ids."""
    import duckdb
    import numpy as np

    from collector.decode.normalize import span_keys
    from collector.store.writer import KEY_SQL, RecentKeys
    rng = random.Random(8)
    tids = [rng.randbytes(16) for _ in range(50)]
    sids = [rng.randbytes(8) for _ in range(50)]
    con = duckdb.connect()
    con.execute("CREATE TABLE spans_core (trace_id VARCHAR, span_id VARCHAR)")
    con.executemany("INSERT INTO spans_core VALUES (?, ?)", [(t.hex(), s.hex()) for t, s in zip(tids, sids)])
    sql_keys = [r[0] for r in con.execute(f"SELECT {KEY_SQL} FROM spans_core").fetchall()]
    assert sql_keys == span_keys(tids, sids).tolist()
    keys = RecentKeys(4 * RecentKeys.GENERATION)
    first = span_keys(tids, sids)
    assert keys.filter_new(first).all()
    again = np.concatenate([first[:5], span_keys([rng.randbytes(16)], [rng.randbytes(8)])])
    assert keys.filter_new(again).tolist() == [False] * 5 + [True]
