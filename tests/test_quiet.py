"""A quiet sidecar does not recompute what cannot have changed (issue 18, CPU idle), and a span that
arrives afterwards is still seen as soon as before: the assembler sleeps until a commit, the window
refresher skips ticks while the store's generation and the window's oldest trace stay the same."""
from __future__ import annotations

import random
import threading
import time

from harness import wait_for
from otlp_builders import random_spans
from test_one_writer import _commit, _count, _store

from shadowlens.analyzers.assembly import TraceAssembler
from shadowlens.analyzers.cohorts import CohortLimiter
from shadowlens.analyzers.window import WindowQuery, WindowRefresher
from shadowlens.config import default_config

IDLE_S = 0.2          # traces complete 0.2 s after their last span; rounds every 0.1 s
TICK_S = 0.05         # the window refresher's interval and the assembler's poll


def _assembler(store) -> TraceAssembler:
    asm = TraceAssembler(store, default_config().cohort_labels, idle_s=IDLE_S, max_s=60.0, routes={},
                         poll_s=TICK_S)
    asm.start()
    return asm


def _window(store, window_s: float = 600.0, now=time.time, generation=True) -> WindowRefresher:
    cfg = default_config()
    limiter = CohortLimiter(cfg.cohort_labels, cfg.cohort_max_values, forget_after_s=2 * window_s)
    return WindowRefresher(WindowQuery(store.cursor, limiter, window_s, now=now), TICK_S,
                           generation=store.generation if generation else None)


def _traces(refresher: WindowRefresher) -> int:
    snap = refresher.latest
    return 0 if snap is None or not snap.traces.height else int(snap.traces["n"].sum())


def test_an_idle_assembler_sleeps_until_a_span_arrives_and_then_completes_it_as_soon_as_before(tmp_path):
    store = _store(tmp_path)
    asm = _assembler(store)
    try:
        spans = random_spans(12, random.Random(7))          # three traces of four spans
        _commit(store, spans[:8])
        wait_for(lambda: _count(store, "SELECT count(*) FROM traces") == 2 and asm.stats.open_traces == 0, 30,
                 what="two completed traces")
        before = asm.wakeups
        time.sleep(20 * TICK_S)                             # 20 polls' worth of nothing arriving
        assert asm.wakeups - before <= 1, "an assembler with no open trace woke without a commit"
        _commit(store, spans[8:])                           # a commit wakes it: the trace completes as before
        wait_for(lambda: _count(store, "SELECT count(*) FROM traces") == 3, 10, interval=0.01,
                 what="the new trace completed")
    finally:
        asm.shutdown()
        store.shutdown()


def test_the_window_is_not_recomputed_while_nothing_is_written_and_is_fresh_after_a_write(tmp_path):
    store = _store(tmp_path)
    asm = _assembler(store)
    window = _window(store)
    window.start()
    try:
        spans = random_spans(12, random.Random(8))
        _commit(store, spans[:8])
        wait_for(lambda: _traces(window) == 2, 30, interval=0.01, what="the window to count two traces")
        time.sleep(4 * TICK_S)                              # any write still in flight has landed
        before = window.refreshes
        time.sleep(20 * TICK_S)
        assert window.refreshes == before, "the window was recomputed with nothing written"
        _commit(store, spans[8:])
        wait_for(lambda: _traces(window) == 3, 30, interval=0.01, what="the window to count the new trace")
        assert window.refreshes > before
    finally:
        window.shutdown()
        asm.shutdown()
        store.shutdown()


def test_the_window_is_recomputed_when_its_oldest_trace_leaves_it_with_nothing_written(tmp_path):
    clock = [time.time()]
    store = _store(tmp_path)
    asm = _assembler(store)
    window = _window(store, window_s=60.0, now=lambda: clock[0])
    try:
        _commit(store, random_spans(8, random.Random(9)))
        wait_for(lambda: _count(store, "SELECT count(*) FROM traces") == 2, 30, what="two completed traces")
        time.sleep(4 * TICK_S)
        asm.shutdown()                                      # nothing more is written from here on
        assert window.stale()
        window.refresh_now()
        assert _traces(window) == 2
        assert not window.stale()
        clock[0] += 59.0                                    # still inside the window: the same result
        assert not window.stale()
        clock[0] += 10.0                                    # the traces left the window: recompute
        assert window.stale()
        window.refresh_now()
        assert _traces(window) == 0
        assert not window.stale()                           # an empty window stays empty until a write
    finally:
        asm.shutdown()
        store.shutdown()


def test_without_a_generation_every_tick_recomputes(tmp_path):
    store = _store(tmp_path)
    window = _window(store, generation=False)
    try:
        window.refresh_now()
        assert window.stale()
    finally:
        store.shutdown()


def test_a_flush_commits_a_lingering_group_at_once(tmp_path, monkeypatch):
    """Groups linger for more records at low rates (fewer commits); a reader that asks does not wait."""
    from shadowlens.collector.store import writer

    monkeypatch.setattr(writer, "GROUP_LINGER_S", 60.0)
    store = _store(tmp_path)
    try:
        payload_spans = random_spans(4, random.Random(10))
        done = threading.Event()
        threading.Thread(target=lambda: (_commit(store, payload_spans), done.set()), daemon=True).start()
        wait_for(lambda: store._queued_tasks == 1, 30, interval=0.01, what="the record to be queued")
        assert not done.wait(0.3), "the group did not linger"
        assert store.flush(10.0)
        assert done.wait(10.0)
        assert _count(store, "SELECT count(*) FROM spans_core") == 4
    finally:
        store.shutdown()


def test_a_quiet_writer_checkpoints_the_wal_that_a_burst_left(tmp_path, monkeypatch):
    """The rows of DuckDB's WAL stay in its memory until a checkpoint; DuckDB's own checkpoint waits for
    store.checkpoint_threshold (64MB), which a sidecar that went quiet after a burst may never reach again.
    Once the writer has less than a group queued, it checkpoints from QUIET_CHECKPOINT_BYTES on."""
    from shadowlens.collector.store import writer
    from shadowlens.collector.store.database import db_path

    monkeypatch.setattr(writer, "QUIET_CHECKPOINT_BYTES", 64 << 10)
    store = _store(tmp_path)
    wal = db_path(tmp_path).with_name(db_path(tmp_path).name + ".wal")
    try:
        assert store.checkpoint_bytes == 64_000_000        # the default 64MB, far above this test's WAL
        grew = []
        for i in range(6):
            _commit(store, random_spans(80, random.Random(i)))
            store.flush(10.0)
            grew.append(wal.stat().st_size if wal.exists() else 0)
        wait_for(lambda: not wal.exists() or wal.stat().st_size < 64 << 10, 10, interval=0.05,
                 what=f"the WAL to be checkpointed (sizes after each commit: {grew})")
        assert _count(store, "SELECT count(*) FROM spans_core") == 6 * 80
    finally:
        store.shutdown()
