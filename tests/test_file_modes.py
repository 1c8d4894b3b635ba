"""The store is readable by its owner only (CONTRACT §8), whatever the umask: it holds prompts and
completions. Directories 0700, files 0600 (the socket too: connecting to it needs write permission)."""
from __future__ import annotations

import os
import random
import stat
from contextlib import contextmanager
from pathlib import Path

import duckdb
from harness import wait_for
from otlp_builders import random_spans, span_request
from test_receivers import grpc_export

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.store.quarantine import DDL, Quarantine


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def loose(data_dir: Path) -> list[str]:
    """Every path under the data dir (itself included) that the group or others can reach."""
    paths = [data_dir] + [Path(root) / n for root, dirs, files in os.walk(data_dir) for n in dirs + files]
    return [f"{p.relative_to(data_dir.parent)} {oct(mode(p))}" for p in paths if mode(p) & 0o077]


def test_a_store_created_under_umask_0_is_owner_only(serve_factory, tmp_path):
    data = tmp_path / "store"
    with umask(0):                     # serve (and its ingest processes) inherit it
        srv = serve_factory(data_dir=data)
    grpc_export(srv.grpc_endpoint, span_request(random_spans(8, random.Random(1))).SerializeToString())
    wait_for((data / "shadowlens.duckdb.wal").exists, 10, what="the DuckDB WAL")
    names = {p.name for p in data.rglob("*")}
    # what the test means to see: the payload log, the database, its WAL and the query socket
    assert {"segments", "shadowlens.duckdb", "shadowlens.duckdb.wal", "serve.sock"} <= names, names
    assert any(n.endswith(".seg") for n in names)
    assert mode(data) == 0o700 and mode(data / "segments") == 0o700
    assert mode(data / "serve.sock") == 0o600
    assert loose(data) == []
    assert srv.stop() == 0
    assert loose(data) == []


def test_opening_a_store_tightens_what_an_older_version_left_readable(serve_factory, tmp_path):
    data = tmp_path / "store"
    srv = serve_factory(data_dir=data)
    grpc_export(srv.grpc_endpoint, span_request(random_spans(4, random.Random(2))).SerializeToString())
    assert srv.stop() == 0
    for p in [data] + list(data.rglob("*")):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert loose(data)
    with umask(0):
        srv = serve_factory(data_dir=data)
    assert loose(data) == []
    assert srv.query("select count(*) as n from spans") == [{"n": 4}]       # and nothing was lost
    assert srv.stop() == 0


def test_quarantined_records_are_owner_only(tmp_path):
    con = duckdb.connect(str(tmp_path / "q.duckdb"))
    con.execute(DDL)
    q = Quarantine(tmp_path / "data", tmp_path / "data" / "segments", IngestCounters())
    with umask(0):
        path = q.set_aside(con, (1, 16, 5), "traces", "insert", "a test reason", payload=b"bytes")
    assert path.read_bytes() == b"bytes"
    assert mode(path.parent) == 0o700
    assert sorted((p.name, oct(mode(p))) for p in path.parent.iterdir()) == [
        (path.name, "0o600"), (path.with_suffix(".txt").name, "0o600")]
    con.close()
