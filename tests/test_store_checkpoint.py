"""The store's WAL is checkpointed while readers keep reading (a sidecar under load).

Under load the trace assembler, the window and the gate read the store almost without a gap. DuckDB runs a
checkpoint only when no transaction holds a share of its checkpoint lock, and a committed transaction
that replaced a row keeps its share until every transaction that started before it has ended. The writer
recorded where a restart replays from with INSERT OR REPLACE on each commit that moved it, so with
overlapping readers every CHECKPOINT failed for as long as the load lasted (serve, 60 s of saturation:
the WAL at 236 MB, DuckDB's memory holding its rows).
"""
from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path

import duckdb
from otlp_builders import random_spans, span_request

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.store import replay as replay_module
from shadowlens.collector.store.database import db_path
from shadowlens.collector.store.writer import REPLAY_META_KEY, StoreWriter
from shadowlens.config import default_config

COMMITS = 30


def _overlapping_readers(store: StoreWriter, n: int, stop: threading.Event) -> list[threading.Thread]:
    """``n`` readers, each in a read-only transaction most of the time, so that one is always open."""
    def read() -> None:
        cur = store.cursor()
        try:
            while not stop.is_set():
                cur.execute("BEGIN TRANSACTION READ ONLY")
                cur.execute("SELECT count(*) FROM spans_core").fetchall()
                stop.wait(0.005)
                cur.execute("ROLLBACK")
        finally:
            cur.close()
    threads = [threading.Thread(target=read, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_checkpoints_run_beside_readers_and_the_wal_stays_small(tmp_path):
    cfg = default_config()
    settings = dataclasses.replace(cfg.store, checkpoint_threshold="256KB")
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters(), settings=settings)
    store.start()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    rng = random.Random(7)
    stop = threading.Event()
    readers = _overlapping_readers(store, 3, stop)
    try:
        for i in range(COMMITS):
            batch = norm.normalize_traces(span_request(random_spans(200, rng)).SerializeToString())
            # each record in a later segment, and the frontend past the previous one: every commit moves the
            # segment a restart replays from
            store.submit(batch, (i + 1, 0, len(batch.payload)), low_segment=i + 1)
            assert store.flush(30)
        wal_file = Path(f"{db_path(tmp_path)}.wal")
        wal = wal_file.stat().st_size if wal_file.exists() else 0
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    stored = _query(store, "SELECT count(*) FROM spans_core")
    store.shutdown()
    assert stored == [(COMMITS * 200,)]
    # 30 commits of ~100 KB of WAL each against a 256 KB threshold: checkpoints kept it near the threshold
    assert wal < 4 * 256 * 1024, f"the WAL grew to {wal} bytes: no checkpoint could run beside the readers"


def _query(store: StoreWriter, sql: str) -> list[tuple]:
    cur = store.cursor()
    try:
        return cur.execute(sql).fetchall()
    finally:
        cur.close()


def _replays_from(monkeypatch) -> list[int]:
    """The segment each start replays from (the argument StoreWriter.open gives replay)."""
    seen: list[int] = []
    real = replay_module.replay

    def recording(writer, segments_dir, replay_from, first_segment):
        seen.append(replay_from)
        return real(writer, segments_dir, replay_from, first_segment)
    monkeypatch.setattr(replay_module, "replay", recording)
    return seen


def test_a_restart_replays_from_the_last_recorded_segment(tmp_path, monkeypatch):
    replayed = _replays_from(monkeypatch)
    cfg = default_config()
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.start()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    batch = norm.normalize_traces(span_request(random_spans(5, random.Random(1))).SerializeToString())
    store.submit(batch, (store.first_segment, 0, len(batch.payload)), low_segment=store.first_segment + 3)
    assert store.flush(30)
    first = store.first_segment
    store.shutdown()
    # what the first run recorded (its commit moved past three segments), before a new start records its own
    with duckdb.connect(str(db_path(tmp_path)), read_only=True) as con:
        assert con.execute("SELECT max(segment) FROM shadowlens_replay_from").fetchone()[0] == first + 3
    again = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    again.start()
    rows = _query(again, "SELECT segment FROM shadowlens_replay_from")
    again.shutdown()
    assert replayed[-1] == first + 3
    assert rows == [(again.first_segment,)]       # one row left: the history goes at start


def test_a_store_from_before_the_table_replays_from_its_meta_key_once(tmp_path, monkeypatch):
    """An upgrade: the store recorded the segment as a ``shadowlens_meta`` key. The first start replays from
    it, and from then on the table holds it (the key is gone, so no later start reads a stale one)."""
    replayed = _replays_from(monkeypatch)
    cfg = default_config()
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    store.start()
    store.shutdown()
    with duckdb.connect(str(db_path(tmp_path))) as con:      # as the old writer left it
        con.execute("DELETE FROM shadowlens_replay_from")
        con.execute("INSERT INTO shadowlens_meta VALUES (?, '7')", [REPLAY_META_KEY])
    upgraded = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters())
    upgraded.start()
    rows = _query(upgraded, "SELECT segment FROM shadowlens_replay_from")
    key = _query(upgraded, f"SELECT count(*) FROM shadowlens_meta WHERE key = '{REPLAY_META_KEY}'")
    upgraded.shutdown()
    assert replayed[-1] == 7
    assert rows == [(upgraded.first_segment,)] and key == [(0,)]
