"""One bad record never takes its commit group down, and never keeps `serve` from starting.

The receivers check values before they acknowledge; these tests hand the store records that
fail anyway (as a check's gap or a decoder bug would), and a real crash-restart cycle with the
span that used to crash-loop `serve`.
"""
from __future__ import annotations

import random
import signal

import pyarrow as pa
import pytest
from otlp_builders import T0, random_spans, span_request
from test_receivers import grpc_export

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.errors import SetAside
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.quarantine import QUARANTINE_DIR
from shadowlens.collector.store.segments import SegmentLog
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config

INT64_MIN = -(2**63)


def poison(batch):
    """The batch with an end time DuckDB cannot subtract from (as a uint64 >= 2^63 reads as int64)."""
    i = batch.spans.schema.get_field_index("end_ns")
    batch.spans = batch.spans.set_column(i, "end_ns", pa.array([INT64_MIN + 5] * batch.spans.num_rows, pa.int64()))
    return batch


def _payloads(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [span_request(random_spans(8, rng)).SerializeToString() for _ in range(n)]


def _count(store: StoreWriter, sql: str):
    con = store.cursor()
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _running_store(tmp_path):
    """A started writer and a segment log to append to, as serve's frontend does."""
    cfg = default_config()
    stats = IngestCounters()
    store = StoreWriter(tmp_path, cfg.cohort_labels, stats)
    store.start()
    return store, Normalizer(cfg.cohort_labels, cfg.evals), stats, SegmentLog(tmp_path / SEGMENTS_DIR, 100)


def test_a_record_that_fails_its_commit_group_is_set_aside_and_its_neighbours_are_stored(tmp_path):
    store, norm, stats, log = _running_store(tmp_path)
    payloads = _payloads(4, 1)
    futures = []
    for i, payload in enumerate(payloads):           # as the frontend hands them over: appended, synced, acked
        ref = log.append(payload)
        batch = norm.normalize_traces(payload)
        futures.append(store.submit(poison(batch) if i == 2 else batch, ref))
    log.sync()
    results = [f.exception(10) for f in futures]
    assert [r is None for r in results] == [True, True, False, True]
    assert isinstance(results[2], SetAside) and "quarantine" in str(results[2])
    assert _count(store, "select count(*) from spans_core") == [(24,)]
    rows = _count(store, "select segment, stage, reason, file from quarantine")
    assert len(rows) == 1 and rows[0][0] == 100 and rows[0][1] == "insert" and "Overflow" in rows[0][2]
    # the set-aside file holds the acknowledged bytes, ready to be sent again once the cause is fixed
    files = sorted((tmp_path / QUARANTINE_DIR).iterdir())
    assert [f.suffix for f in files] == [".pb", ".txt"]
    assert files[0].read_bytes() == payloads[2]
    assert stats.records_quarantined == {"insert": 1}
    store.shutdown()
    log.close()


class _Poisoning:
    """A normalizer that returns a poisoned batch for one payload and fails to decode another."""

    def __init__(self, norm: Normalizer, bad_insert: bytes, bad_decode: bytes):
        self.norm, self.bad_insert, self.bad_decode = norm, bad_insert, bad_decode

    def normalize_traces(self, payload: bytes):
        if payload == self.bad_decode:
            raise ValueError("a decoder bug")
        batch = self.norm.normalize_traces(payload)
        return poison(batch) if payload == self.bad_insert else batch


def test_replay_sets_aside_what_fails_again_and_the_store_opens(tmp_path):
    """Records acknowledged before a crash, one of which no longer inserts and one no longer decodes:
    the store opens (it used to raise, every start), the others are inserted, and a second start
    does not set the two aside again."""
    cfg = default_config()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    payloads = _payloads(5, 2)
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.open()            # a new store: it replays from segment 1, which the "crashed" server wrote below
    store.shutdown()
    log = SegmentLog(tmp_path / SEGMENTS_DIR, 1)
    for p in payloads:
        log.append(p)
    log.sync()
    log.close()
    for _ in range(2):
        stats = IngestCounters()
        store = StoreWriter(tmp_path, cfg.cohort_labels, stats)
        store.replay_normalizer = _Poisoning(norm, bad_insert=payloads[1], bad_decode=payloads[3])
        store.open()
        assert _count(store, "select count(*) from spans_core") == [(24,)]
        assert _count(store, "select byte_offset, stage from quarantine order by byte_offset") == [
            (off, stage) for off, stage in zip(sorted(_offsets(tmp_path)[i] for i in (1, 3)), ("insert", "decode"))]
        store.shutdown()
    assert stats.records_quarantined == {}      # the second start found them set aside already


def _offsets(data_dir) -> list[int]:
    from shadowlens.collector.store.segments import read_frames
    return [off for off, _, _ in read_frames(data_dir / SEGMENTS_DIR, 1)]


def test_a_failure_every_record_shares_sets_nothing_aside(tmp_path):
    """When each record fails alone too, the store is at fault (here: every batch poisoned), not a
    record: nothing is set aside, nothing acknowledged is lost, the records stay for the next start."""
    store, norm, stats, log = _running_store(tmp_path)
    futures = [store.submit(poison(norm.normalize_traces(p)), log.append(p)) for p in _payloads(3, 3)]
    log.sync()
    assert all(f.exception(10) is not None and not isinstance(f.exception(), SetAside) for f in futures)
    assert _count(store, "select count(*) from quarantine") == [(0,)]
    assert stats.records_quarantined == {}
    store.shutdown()
    log.close()


@pytest.mark.parametrize("end", [2**63, 2**64 - 1])
def test_a_span_ending_past_int64_never_costs_its_neighbours_or_a_restart(serve_factory, end):
    """The issue's repro: a span with a normal start and end_time_unix_nano >= 2^63 got OK, failed
    its whole commit group, and after a restart replay failed on it every time (serve exit 1)."""
    rng = random.Random(7)
    neighbours = [span_request(random_spans(5, rng)).SerializeToString() for _ in range(2)]
    bad = random_spans(3, rng)
    bad[1]["start"], bad[1]["end"] = T0, end
    srv = serve_factory()
    grpc_export(srv.grpc_endpoint, neighbours[0])
    resp = grpc_export(srv.grpc_endpoint, span_request(bad).SerializeToString())
    grpc_export(srv.grpc_endpoint, neighbours[1])
    srv.kill9()             # before DuckDB may have the records: the restart replays them
    for _ in range(3):
        srv.start()
        got = srv.query("select count(*) as n from spans")[0]["n"]
        assert got == 10 + 3 - resp.partial_success.rejected_spans
        srv.stop(signal.SIGKILL)
    assert resp.partial_success.rejected_spans in (0, 1)


def test_a_group_that_fails_for_the_store_is_inserted_on_the_next_start(tmp_path, monkeypatch):
    """A commit that fails for the store's sake (I/O) leaves its acknowledged records to the next
    start's replay: later commits must not move the replay point past their segment (they did, and
    the records were never inserted)."""
    import duckdb
    cfg = default_config()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.start()
    first = store.first_segment
    real_commit = store._commit
    calls = []

    def failing_once(group, low=None):
        calls.append(len(group))
        if len(calls) == 1:
            raise duckdb.IOException("IO Error: simulated read error on the store's disk")
        return real_commit(group, low)

    monkeypatch.setattr(store, "_commit", failing_once)
    a, b = _payloads(2, 4)
    log_a = SegmentLog(tmp_path / SEGMENTS_DIR, first)
    fut_a = store.submit(norm.normalize_traces(a), log_a.append(a), low_segment=first)
    log_a.sync()
    assert isinstance(fut_a.exception(10), duckdb.IOException)
    log_a.close()
    # the frontend moved on to a new segment (as after a rotation) and says so with its next record
    log_b = SegmentLog(tmp_path / SEGMENTS_DIR, first + 1)
    store.submit(norm.normalize_traces(b), log_b.append(b), low_segment=first + 1).result(10)
    log_b.close()
    store.shutdown()
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.start()
    assert _count(store, "select count(*) from spans_core") == [(16,)]
    assert _count(store, "select count(*) from quarantine") == [(0,)]
    store.shutdown()
