"""``shadowlens query`` sees the store's tables and no other file (CONTRACT §8), on both of its paths:
through a running server's socket (cursors of the writer's own connection) and straight on the file.

Each refused statement is one a reader of the machine would try; the files they name exist and are
readable by this process, so only the sandbox stands between the query and their bytes."""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harness import REPO, SHADOWLENS
from otlp_builders import span_request
from pipeline import Handover

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.store.reader import QueryError, QueryServer, query
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config

SECRET = "do-not-leak-7f3a"


def _request(n: int, first: int):
    spans = [{"trace_id": (first + i).to_bytes(16, "big"), "span_id": (first + i).to_bytes(8, "big"),
              "name": "llm", "attrs": {"note": f"kept-{first + i}"}} for i in range(n)]
    return span_request(spans).SerializeToString()


@pytest.fixture
def secrets(tmp_path):
    """Files outside the store, in every format DuckDB reads, holding SECRET."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "s.csv").write_text(f"k,v\nsecret,{SECRET}\n")
    (d / "s.txt").write_text(SECRET)
    (d / "s.json").write_text(json.dumps([{"v": SECRET}]))
    pq.write_table(pa.table({"v": [SECRET]}), d / "s.parquet")
    return d


def attempts(d) -> list[str]:
    return [
        "select * from read_csv('/etc/passwd')",
        "select * from read_csv_auto('/etc/passwd')",
        "select * from sniff_csv('/etc/passwd')",
        "select content from read_text('/proc/self/environ')",
        "select content from read_text('/etc/shadow')",
        "select content from read_blob('/etc/passwd')",
        f"select * from read_csv('{d}/s.csv')",
        f"select content from read_text('{d}/s.txt')",
        f"select content from read_blob('{d}/s.txt')",
        f"select * from read_json('{d}/s.json')",
        f"select * from read_json_auto('{d}/s.json')",
        f"select * from read_parquet('{d}/s.parquet')",
        f"select * from parquet_metadata('{d}/s.parquet')",
        f"select * from '{d}/s.csv'",
        f"select * from glob('{d}/*')",
        "select * from glob('/etc/*')",
        f"copy (select 1) to '{d}/out.csv'",
        f"attach '{d}/other.duckdb' as other",
        "install httpfs",
        "load httpfs",
        "set enable_external_access = true",
        "set lock_configuration = false",
        "select * from duckdb_extensions() where loaded",
    ]


def assert_sandboxed(run, d) -> None:
    leaked = []
    for sql in attempts(d):
        try:
            table = run(sql)
        except QueryError:
            continue
        leaked.append(f"{sql} -> {str(table.to_pylist())[:120]}")
    assert not leaked, "statements the query sandbox let through:\n" + "\n".join(leaked)
    assert not (d / "out.csv").exists() and not (d / "other.duckdb").exists()


def assert_store_readable(run, n: int) -> None:
    rows = run("select attributes from spans order by trace_id").to_pylist()
    assert [json.loads(r["attributes"])["note"] for r in rows] == [f"kept-{i}" for i in range(1, n + 1)]


def test_queries_see_the_store_and_no_other_file_on_both_paths(tmp_path, secrets):
    cfg = default_config()
    data = tmp_path / "data"
    store = StoreWriter(data, cfg.cohort_labels, IngestCounters())
    store.start()
    handover = Handover(store)
    server = QueryServer(data, store.cursor)           # as serve composes it (shadowlens/serve.py)
    server.start()
    try:
        handover.commit(_request(3, 1))
        assert_store_readable(lambda sql: query(data, sql), 3)      # through serve.sock
        assert_sandboxed(lambda sql: query(data, sql), secrets)
        # the writer's own connection, which the socket's cursors share, still writes and checkpoints
        handover.commit(_request(2, 4))
        assert_store_readable(lambda sql: query(data, sql), 5)
        con = store.cursor()
        con.execute("CHECKPOINT")
        con.close()
    finally:
        server.shutdown()
        store.shutdown()
        handover.close()
    assert not (data / "serve.sock").exists()
    assert_store_readable(lambda sql: query(data, sql), 5)           # on the file, no server
    assert_sandboxed(lambda sql: query(data, sql), secrets)
    # and the store opens for writing again after its connections were sandboxed
    store = StoreWriter(data, cfg.cohort_labels, IngestCounters())
    store.start()
    handover = Handover(store)
    handover.commit(_request(1, 6))
    store.shutdown()
    handover.close()
    assert_store_readable(lambda sql: query(data, sql), 6)


def test_query_command_refuses_files_through_a_running_serve(server):
    out = subprocess.run(SHADOWLENS + ["query", "--data-dir", str(server.data_dir),
                                       "select * from read_csv('/etc/passwd')"],
                         capture_output=True, text=True, cwd=REPO, env=server.env, timeout=60)
    assert out.returncode == 2, out
    assert "root:" not in out.stdout
    assert "file system operations are disabled" in out.stderr
    assert os.path.exists(server.data_dir / "serve.sock")        # it went through the server
