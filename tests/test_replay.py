"""The segment log is the write-ahead log: what was synced there but never reached DuckDB is
inserted on the next start, exactly once; a torn tail is ignored; dedup memory forgets in order."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from otlp_builders import random_spans, span_request

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.segments import FRAME, SegmentLog, read_frames, segment_path
from shadowlens.collector.store.writer import RecentKeys, StoreWriter
from shadowlens.config import default_config


def _request(n: int, seed: int) -> tuple[bytes, set[tuple[str, str]]]:
    spans = random_spans(n, random.Random(seed))
    ids = {(d["trace_id"].hex(), d["span_id"].hex()) for d in spans}
    return span_request(spans).SerializeToString(), ids


def _stored_ids(store: StoreWriter) -> list[tuple[str, str]]:
    con = store.cursor()
    try:
        return [tuple(r) for r in con.execute("SELECT trace_id, span_id FROM spans_core").fetchall()]
    finally:
        con.close()


def _open(data_dir) -> StoreWriter:
    store = StoreWriter(data_dir, default_config().cohort_labels, IngestCounters())
    store.open()
    return store


def test_synced_records_missing_from_duckdb_are_inserted_once_on_restart(tmp_path):
    store = _open(tmp_path)            # creates the database; nothing to replay yet
    first = store.first_segment
    store.shutdown()
    # what the frontend does before acknowledging: append + fdatasync, then the process dies
    log = SegmentLog(tmp_path / SEGMENTS_DIR, first)
    expected: set = set()
    for seed in (1, 2, 3):
        payload, ids = _request(40, seed)
        _, _, ticket = log.append(payload)
        log.wait_durable(ticket)
        expected |= ids
    log.close()

    store = _open(tmp_path)
    assert sorted(_stored_ids(store)) == sorted(expected)
    con = store.cursor()
    # the replayed rows point at their payload, so the JSON columns decode
    assert con.execute("SELECT count(*) FROM spans WHERE attributes IS NOT NULL").fetchone()[0] == len(expected)
    con.close()
    assert store.replay_from == store.first_segment > first
    store.shutdown()

    store = _open(tmp_path)            # a second restart finds nothing new to insert
    assert len(_stored_ids(store)) == len(expected)
    store.shutdown()


def test_a_torn_tail_is_ignored_and_the_records_before_it_kept(tmp_path):
    store = _open(tmp_path)
    first = store.first_segment
    store.shutdown()
    log = SegmentLog(tmp_path / SEGMENTS_DIR, first)
    good, good_ids = _request(10, 4)
    log.wait_durable(log.append(good)[2])
    log.close()
    torn, _ = _request(10, 5)
    path = segment_path(tmp_path / SEGMENTS_DIR, first)
    whole = bytearray(path.read_bytes())
    log = SegmentLog(tmp_path / SEGMENTS_DIR, first)
    log.append(torn)
    log.close()
    cut = path.read_bytes()[: len(whole) + FRAME.size + len(torn) // 2]   # a crash mid-write
    path.write_bytes(cut)
    assert [len(p) for _, _, p in read_frames(tmp_path / SEGMENTS_DIR, first)] == [len(good)]

    store = _open(tmp_path)
    assert set(_stored_ids(store)) == good_ids
    store.shutdown()


def test_a_record_whose_bytes_were_overwritten_fails_its_checksum(tmp_path):
    log = SegmentLog(tmp_path, 1)
    a, _ = _request(5, 6)
    b, _ = _request(5, 7)
    log.append(a)
    _, off_b, _ = log.append(b)
    log.close()
    data = bytearray(segment_path(tmp_path, 1).read_bytes())
    data[off_b + 10] ^= 0xFF
    segment_path(tmp_path, 1).write_bytes(bytes(data))
    assert [p for _, _, p in read_frames(tmp_path, 1)] == [a]


def test_an_acknowledged_record_damaged_on_disk_is_kept_on_restart_not_skipped(tmp_path):
    """Three durable records; the middle one's bytes are damaged on disk before DuckDB got any of them.
    The restart stores the other two, and keeps the damaged bytes as they are in quarantine/ (a row with
    stage "read", a counter, a note): counted, kept and said where, once, however often serve restarts."""
    store = _open(tmp_path)
    first = store.first_segment
    store.shutdown()
    log = SegmentLog(tmp_path / SEGMENTS_DIR, first)
    (a, ids_a), (b, _), (c, ids_c) = _request(8, 11), _request(8, 12), _request(8, 13)
    offsets = []
    for payload in (a, b, c):
        _, off, ticket = log.append(payload)
        log.wait_durable(ticket)
        offsets.append(off)
    log.close()
    path = segment_path(tmp_path / SEGMENTS_DIR, first)
    data = bytearray(path.read_bytes())
    data[offsets[1] + 10] ^= 0xFF
    damaged = bytes(data[offsets[1] - FRAME.size: offsets[2] - FRAME.size])   # b's frame, as it is on disk now
    path.write_bytes(bytes(data))

    for _restart in range(2):
        counters = IngestCounters()
        store = StoreWriter(tmp_path, default_config().cohort_labels, counters)
        store.open()
        assert set(_stored_ids(store)) == ids_a | ids_c
        con = store.cursor()
        rows = con.execute("SELECT segment, byte_offset, length, stage, file FROM quarantine").fetchall()
        con.close()
        store.shutdown()
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(first, offsets[1] - FRAME.size, len(damaged), "read")]
        kept = Path(rows[0][4])
        assert kept.read_bytes() == damaged
        assert "damaged on disk" in kept.with_suffix(".txt").read_text()
        assert counters.snapshot()["records_quarantined"] == ({"read": 1} if _restart == 0 else {})


def test_recent_keys_nominate_what_they_remember_and_forget_the_oldest():
    keys = RecentKeys(2 * RecentKeys.GENERATION)
    rng = np.random.default_rng(3)
    batch = rng.integers(1, 2**63, size=1000, dtype=np.uint64)
    assert not keys.lookup(batch)[0].any()
    keys.remember(batch, seq=1)
    seen, commits, _ = keys.lookup(batch[::7])
    assert seen.all() and commits == (1, 1)
    # three generations later the first batch is forgotten (memory is bounded), the newest is not
    later = [rng.integers(1, 2**63, size=RecentKeys.GENERATION, dtype=np.uint64) for _ in range(3)]
    for seq, arr in enumerate(later, start=2):
        keys.remember(arr, seq)
    assert not keys.lookup(batch[:100])[0].any()
    seen, commits, _ = keys.lookup(later[-1][:100])
    assert seen.all() and commits == (4, 4)
    assert keys.size() <= keys.max_keys + 100
    assert keys.nbytes() == 8 * keys.size()
