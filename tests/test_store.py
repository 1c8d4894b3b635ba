"""The store: retention, read-only queries with and without a running server, size metric."""
from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
from harness import REPO, SHADOWLENS
from otlp_builders import random_spans, span_request
from pipeline import Pipeline

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.reader import QueryError, query
from shadowlens.collector.store.retention import Retention
from shadowlens.collector.store.segments import list_segments
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config

HOUR_NS = 3600 * 10**9


def _spans_at(start_ns: int, n: int, seed: int):
    spans = random_spans(n, random.Random(seed))
    for i, d in enumerate(spans):
        d["start"] = start_ns + i
        d["end"] = start_ns + i + 10**6
    return span_request(spans).SerializeToString()


def test_retention_deletes_old_spans_and_their_segments(tmp_path):
    clock = [time.time()]
    with Pipeline(tmp_path, now=lambda: clock[0]) as p:
        p.export(_spans_at(int(clock[0] * 1e9) - 10 * HOUR_NS, 20, 1))
        p.sync()
    # a restart starts a new segment; the old one holds only old payloads
    clock[0] += 10 * 3600
    p = Pipeline(tmp_path, now=lambda: clock[0]).start()
    p.export(_spans_at(int(clock[0] * 1e9), 12, 2))
    p.sync()
    store = p.store
    assert len(list_segments(tmp_path / SEGMENTS_DIR)) == 2
    retention = Retention(tmp_path, store.write, retention_s=3600, interval_s=3600,
                          current_segment=store.current_segment, now=lambda: clock[0])
    assert retention.run_once() == 20
    con = store.cursor()
    assert con.execute("select count(*) from spans_core").fetchone()[0] == 12
    assert con.execute("select count(*) from payloads").fetchone()[0] == 1
    # the remaining spans still decode their attributes from the surviving segment
    assert con.execute("select count(*) from spans where attributes is not null").fetchone()[0] == 12
    con.close()
    assert len(list_segments(tmp_path / SEGMENTS_DIR)) == 1
    p.shutdown()


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
    assert code == 2 and "no_such_table" in err and len(err.strip().splitlines()) == 1


def test_store_bytes_metric_reports_disk_use(server):
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    assert fams["shadowlens_store_bytes"].samples[0].value > 0


def test_stored_ids_read_back_as_hex_and_dedup_keys_match_the_reloaded_ones(tmp_path):
    """Ids are stored as integers: they read back as the lower-case hex of the raw bytes (absent
    parent: null), and the key a restart computes from the stored columns equals the one ingest computed."""
    import numpy as np

    from shadowlens.collector.decode.normalize import span_keys
    rng = random.Random(8)
    spans = random_spans(50, rng)
    spans[0]["trace_id"] = bytes(15) + b"\x01"             # leading zeros must survive
    spans[1]["span_id"] = b"\xff" * 8
    payload = span_request(spans).SerializeToString()
    cfg = default_config()
    batch = Normalizer(cfg.cohort_labels, cfg.evals).normalize_traces(payload)     # the keys the decoder computes
    with Pipeline(tmp_path) as p:
        p.export(payload)
        p.sync()
        rows = p.query("SELECT trace_id, span_id, parent_span_id, trace_id_hi, trace_id_lo, span_id_int"
                       " FROM spans_core ORDER BY sp_idx")
    assert [r[:3] for r in rows] == [(d["trace_id"].hex(), d["span_id"].hex(), (d.get("parent") or b"").hex() or None)
                                     for d in spans]
    assert [r[3:] for r in rows] == [(int.from_bytes(d["trace_id"][:8], "big"), int.from_bytes(d["trace_id"][8:], "big"),
                                      int.from_bytes(d["span_id"], "big")) for d in spans]
    cols = [np.array([r[i] for r in rows], dtype=np.uint64) for i in (3, 4, 5)]
    assert batch.keys.tolist() == span_keys(*cols).tolist()
    assert len(set(batch.keys.tolist())) == 50


def test_a_store_with_text_ids_is_converted_on_open(tmp_path):
    """Stores written before ids were integers: spans_core is rebuilt once, every row and column kept."""
    import duckdb

    from shadowlens.collector.store.database import db_path
    rng = random.Random(3)
    rows = [(rng.randbytes(16).hex(), rng.randbytes(8).hex(), rng.choice([None, rng.randbytes(8).hex()]), f"s{i}",
             rng.choice(["de", "en"]), i) for i in range(40)]
    tmp_path.mkdir(exist_ok=True)
    con = duckdb.connect(str(db_path(tmp_path)))
    con.execute("CREATE TABLE spans_core (trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR, name VARCHAR,"
                " kind VARCHAR, span_kind VARCHAR, service_name VARCHAR, scope_name VARCHAR, start_time TIMESTAMP_NS,"
                " end_time TIMESTAMP_NS, duration_seconds DOUBLE, status_code VARCHAR, status_message VARCHAR,"
                " route VARCHAR, request_id VARCHAR, session_id VARCHAR, step BIGINT, model VARCHAR,"
                " request_model VARCHAR, input_tokens BIGINT, output_tokens BIGINT, cache_read_tokens BIGINT,"
                " cache_write_tokens BIGINT, reasoning_tokens BIGINT, reported_cost_usd DOUBLE, cost_usd DOUBLE,"
                " finish_reason VARCHAR, refused BOOLEAN, escalated BOOLEAN, rs_idx INTEGER, ss_idx INTEGER,"
                " sp_idx INTEGER, intent VARCHAR, language VARCHAR, payload_id BIGINT, ingest_seq BIGINT,"
                " received_at TIMESTAMP)")
    con.executemany("INSERT INTO spans_core (trace_id, span_id, parent_span_id, name, language, ingest_seq)"
                    " VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.close()
    cfg = default_config()
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.start()
    con = store.cursor()
    got = con.execute("SELECT trace_id, span_id, parent_span_id, name, language, ingest_seq FROM spans"
                      " ORDER BY ingest_seq").fetchall()
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns"
                             " WHERE table_name = 'spans_core'").fetchall())
    con.close()
    store.shutdown()
    assert got == rows
    assert types["trace_id_hi"] == "UBIGINT" and types["intent"] == "VARCHAR"


def test_writer_writes_small_row_groups_that_survive_reopening(tmp_path):
    # A commit of 16k+ spans fills whole row groups, which DuckDB writes straight to the file
    # instead of through its WAL (see database.connect_writer); each writing session must ask for the size.
    for session in range(2):
        with Pipeline(tmp_path) as p:
            p.export(_spans_at(time.time_ns() + session * HOUR_NS, 20_000, session), timeout=120)
            p.sync(60)
            groups = p.query("SELECT row_group_id, max(start + count) - min(start) FROM pragma_storage_info('spans_core') "
                             "WHERE column_name = 'span_id_int' GROUP BY row_group_id")
            assert p.query("SELECT count(*) FROM spans_core") == [(20_000 * (session + 1),)]
        assert len(groups) >= 2 * (session + 1)
        assert max(rows for _, rows in groups) <= 16384


def _resident_pages(path, size: int) -> list[bool]:
    """mincore(2) over a read-only mapping of ``path``: which of its pages are in the page cache."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    with open(path, "rb") as fh:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    return [bool(b & 1) for b in vec.raw]


def test_the_decoders_read_drops_the_record_from_the_page_cache(tmp_path):
    """The decoder reads each record once (last_read=True): the record's whole pages leave the page
    cache, its neighbours stay, and the bytes read are the bytes written."""
    import mmap

    from shadowlens.collector.store.segments import SegmentLog, SegmentReader, segment_path
    log = SegmentLog(tmp_path, 1)
    payloads = [bytes([k]) * (40 * mmap.PAGESIZE + 123) for k in (1, 2, 3)]
    places = []
    for p in payloads:
        seg, off, ticket = log.append(p)
        log.wait_durable(ticket)
        places.append((seg, off))
    log.close()
    path = segment_path(tmp_path, 1)
    size = path.stat().st_size
    reader = SegmentReader(tmp_path)
    for (seg, off), p in zip(places, payloads):
        assert reader.read(seg, off, len(p)) == p         # every page of the file is cached now
    if not all(_resident_pages(path, size)):
        pytest.skip("this file system does not keep written pages in the page cache")
    seg, off = places[1]
    assert reader.read(seg, off, len(payloads[1]), last_read=True) == payloads[1]
    resident = _resident_pages(path, size)
    first, last = (off + mmap.PAGESIZE - 1) // mmap.PAGESIZE, (off + len(payloads[1])) // mmap.PAGESIZE
    assert not any(resident[first:last])                  # the record's whole pages are gone
    assert all(resident[:first - 1]) and all(resident[last + 1:])   # its neighbours' pages are not
    assert reader.read(seg, off, len(payloads[1])) == payloads[1]   # and it still reads back from disk
    reader.close()
