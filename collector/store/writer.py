"""The only DuckDB writer: one thread, group commit (``group.py``), deduplication (``dedup.py``), and
the derived writes (``derived.py``: trace rows, retention, reprice, quarantine) between the commits.

One way in. The ingest frontend has already made each payload durable in the segment log (the
write-ahead log: framed, fdatasynced) and acknowledged it; the supervisor hands the decoded
columns over with the payload's place (``payload_ref``) and the writer inserts them in large
groups, off the acknowledgement path, so DuckDB's commits and checkpoints never hold up a client.
An acknowledged span survives ``kill -9``: records the database never got are re-inserted from
the segment log on restart (``replay.py``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np

from .. import schema
from ..counters import IngestCounters
from ..decode.normalize import NormalizedBatch
from ..errors import SetAside, ShuttingDown
from ..settings import StoreSettings, byte_count, default_store
from . import dedup, diskfull
from .commit import CommitReceipt, CommittedRows
from .database import SEGMENTS_DIR, SegmentPayloads, connect_writer, db_path, drop_torn_payloads, migrate, register_functions
from .dedup import RecentKeys
from .derived import DerivedQueue, DerivedWrite
from .files import make_private_dir, tighten
from .group import group_rows, insert_group
from .quarantine import DDL as QUARANTINE_DDL
from .quarantine import Quarantine, is_data_error
from .segments import list_segments

log = logging.getLogger("shadowlens.store")

# Group sizes, measured on bench/ingest.py (medians of 3-run sets, ingest only): at least 8k spans or
# 0.1 s: 42-44k spans/s; 16k or 0.2 s: 50.5k, 47.8k, 43.1k; 32k or 0.3 s: 44k. Within the run-to-run
# spread, but not worse. In isolation DuckDB appends 1M unique rows at 8.6 us/row in 8k-row groups
# and 7.8 in 32k; but each commit frees room in the frontend's queue, and big commits free it in lumps.
MAX_GROUP_SPANS = 32768
MIN_GROUP_SPANS = 16384
# Bounds the time to visibility of acknowledged spans, unless a reader asks (flush: read-your-acks,
# and the assembler's round before the window or the gate refreshes, cut it short). A commit has a
# fixed cost of ~20 ms of the writer's CPU whatever its size (statement binding in this DuckDB
# binding, the commit itself): at 1,000 spans/s a 1 s linger made a commit of ~1,000 spans a second,
# 0.037 cores; 5 s makes ~5,000-span commits, 0.016 cores (the tree 0.142 -> 0.103 cores, 2 alternating
# runs each: per-thread CPU in the paced phase of bench/footprint.py). The window's refresh
# (analyzers.window_refresh, 5 s) flushes first, so spans reach the assembler at most one window refresh
# after they were acknowledged (1 s before). Under load a group fills long before.
GROUP_LINGER_S = 5.0
# While the writer lingers (less than a group queued: a quiet sidecar, or a low rate), it checkpoints
# from this much WAL on instead of ``store.checkpoint_threshold``: the rows of a WAL stay in DuckDB's
# memory until their checkpoint (~2 MB of memory per MB of WAL on the bench traffic: 31 MB of DuckDB's
# at 15 MB of WAL), and 64MB of WAL took a minute at 1,000 spans/s to build, holding ~100 MB. Under load
# the larger threshold stands (fewer checkpoints: docs/performance.md).
QUIET_CHECKPOINT_BYTES = 16 << 20
CHECKPOINT_RETRY_S = 1.0
SLOW_COMMIT_S = 0.5
REPLAY_META_KEY = "replay_from_segment"


@dataclass
class _Task:
    batch: NormalizedBatch
    future: Future
    payload_ref: tuple[int, int, int]   # (segment, offset, length) of the payload in the segment log


class StoreWriter:
    """Owns the DuckDB file for writing. ``submit`` from any thread; everything else runs on one thread."""

    def __init__(self, data_dir: Path, cohort_labels, stats: IngestCounters, *, settings: StoreSettings | None = None,
                 dedup_max_keys: int | None = None, now: Callable[[], float] = time.time):
        """``settings``: the store's settings (``store.*``); None: their defaults (``collector/settings.py``,
        which also says why they are what they are). ``dedup_max_keys`` overrides the setting (0: no dedup)."""
        settings = settings or default_store()
        self.data_dir = Path(data_dir)
        self.cohort_labels = tuple(cohort_labels)
        self.stats = stats
        self.now = now
        self.duckdb_settings = {"threads": settings.duckdb_threads, "memory_limit": settings.duckdb_memory_limit,
                                "checkpoint_threshold": settings.checkpoint_threshold}
        self.checkpoint_bytes = byte_count(settings.checkpoint_threshold, "store.checkpoint_threshold")
        self._wal = Path(f"{db_path(self.data_dir)}.wal")
        self._checkpoint_retry_at: float | None = None   # a checkpoint was postponed: try again from then
        keys = settings.dedup_max_keys if dedup_max_keys is None else dedup_max_keys
        self._dedup = RecentKeys(keys) if keys else None
        self._queue: deque[_Task] = deque()
        self._queued_spans = 0
        # a group lingers only while it holds less than half of what the frontend admits unacknowledged by
        # the store (store.queue_max_spans): past that, clients may be waiting for room (ADMIT_WAIT_S, 5 s,
        # as long as a linger), and a smaller queue than a group must not stall them
        self._linger_below = min(MIN_GROUP_SPANS, max(1, settings.queue_max_spans // 2))
        self._queued_tasks = 0          # ever queued / ever finished (committed or failed): flush()
        self._finished_tasks = 0
        self._frontend_low = 0          # lowest segment the frontend may still send records of
        self.replay_from = 0            # every record in lower segments is in DuckDB
        self._failed_low = 1 << 62      # lowest segment of a record whose commit failed (replayed on start)
        self._cond = threading.Condition()
        self._flushing = 0              # flush() callers waiting: a group stops lingering for them
        self._commit_cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.committed_seq = 0
        self.con: duckdb.DuckDBPyConnection | None = None
        self.decoder: SegmentPayloads | None = None
        self._insert_spans = schema.spans_insert_select(self.cohort_labels, "new_spans")
        self.replay_normalizer = None   # set by serve: re-decodes records found only in the segment log
        # called on the writer thread after each commit, in seq order; must be quick (append to a queue)
        self._followers: list[Callable[[CommittedRows], None]] = []
        self.derived = DerivedQueue()   # trace rows, retention, reprice, quarantine: run between span commits
        stats.gauges["ingest_queue_spans"] = lambda: float(self._queued_spans)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Open or create the store (also rebuilds dedup memory); called before receivers start."""
        make_private_dir(self.data_dir)
        self.con = connect_writer(db_path(self.data_dir), self.duckdb_settings)
        tighten(self.data_dir)      # the database just created, and what an older version left readable
        self._catalog = self.con.execute("SELECT current_database()").fetchall()[0][0]
        self.decoder = SegmentPayloads(self.data_dir)
        register_functions(self.con, self.decoder)
        migrate(self.con, self.cohort_labels)
        self.con.execute(QUARANTINE_DDL)
        self.quarantine = Quarantine(self.data_dir, self.data_dir / SEGMENTS_DIR, self.stats)
        row = self.con.execute("SELECT coalesce(max(payload_id), 0), coalesce(max(ingest_seq), 0) FROM payloads").fetchone()
        self._next_payload_id = int(row[0]) + 1
        self.committed_seq = int(row[1])
        existing = list_segments(self.data_dir / SEGMENTS_DIR)
        # A fresh segment per start: a torn tail from a crash is never appended to.
        drop_torn_payloads(self.con, self.data_dir / SEGMENTS_DIR)
        self.first_segment = (existing[-1] + 1) if existing else 1
        self.replay_from = self._read_replay_from()
        self._frontend_low = self.first_segment
        if self._dedup is not None:
            dedup.seed(self._dedup, self.con, self.now())
        from .replay import replay
        replay(self, self.data_dir / SEGMENTS_DIR, self.replay_from, self.first_segment)
        # one row from now on: the earlier ones (and an older store's key) are history, replaced at start,
        # before anything else reads the store (_write_replay_from says why not later)
        self.con.begin()
        self.con.execute("DELETE FROM shadowlens_replay_from")
        self.con.execute("DELETE FROM shadowlens_meta WHERE key = ?", [REPLAY_META_KEY])
        self._write_replay_from(self.first_segment)
        self.con.commit()
        self.replay_from = self.first_segment

    def start(self) -> None:
        if self.con is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="shadowlens-store-writer", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new work, commit everything queued, checkpoint, close. Safe twice and without start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.con is not None:
            try:
                self.con.execute("CHECKPOINT")
            except duckdb.Error as exc:
                log.warning("checkpoint at shutdown failed: %s", exc)
            self.con.close()
            self.con = None
            self.decoder.close()

    # -- API for receivers -----------------------------------------------------------------
    def current_segment(self) -> int:
        """Retention deletes no segment from this one on: it may hold records DuckDB lacks yet."""
        return min(self.replay_from, self._frontend_low) if self._frontend_low else self.replay_from

    def submit(self, batch: NormalizedBatch, payload_ref: tuple[int, int, int], low_segment: int | None = None) -> Future:
        """Queue a decoded record for the next group commit; the Future resolves once it is in DuckDB.

        The ingest frontend has appended, synced and acknowledged the payload (``payload_ref``: its
        segment, offset and length) and admitted it against its own limit: the writer must take it.
        ``low_segment``: the lowest segment the frontend may still send records of.
        """
        fut: Future = Future()
        with self._cond:
            self._queued_spans += batch.accepted
            if low_segment is not None:
                self._frontend_low = max(self._frontend_low, low_segment)
            self._queue.append(_Task(batch, fut, payload_ref))
            self._queued_tasks += 1
            self._cond.notify()
        return fut

    def wait_for_room(self, limit: int, timeout: float) -> bool:
        """Block while more than ``limit`` spans wait for their commit (or until stopping); False on timeout."""
        with self._commit_cond:
            return self._commit_cond.wait_for(lambda: self._queued_spans <= limit or self._stopping, timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is committed (or failed); False on timeout.
        A group that lingers for more records is committed now."""
        with self._cond:
            self._flushing += 1
            self._cond.notify()
        try:
            with self._commit_cond:
                target = self._queued_tasks
                return self._commit_cond.wait_for(lambda: self._finished_tasks >= target, timeout)
        finally:
            with self._cond:
                self._flushing -= 1

    def wait_for_commit(self, seq: int, timeout: float) -> int:
        """Block until a commit newer than ``seq`` exists (or timeout); returns the newest seq."""
        with self._commit_cond:
            self._commit_cond.wait_for(lambda: self.committed_seq > seq, timeout)
            return self.committed_seq

    def generation(self) -> int:
        """A number that changes whenever a span commit or a derived write (trace rows, retention,
        reprice, quarantine) has changed the tables: a reader that computes over them (the window)
        can skip a refresh while it stays the same. Read it before the reader's queries."""
        try:
            return self.committed_seq + sum(self.derived.done.values())
        except RuntimeError:      # a write of a new name was counted meanwhile: say "changed"
            return -1

    def follow(self, callback: Callable[[CommittedRows], None]) -> None:
        """Call ``callback`` with every later commit's stored rows, on the writer thread, in seq order.
        Commits before the call are not replayed: read them from the store (``committed_seq``)."""
        self._followers.append(callback)

    def write(self, write: DerivedWrite) -> Future:
        """Queue a derived write (trace rows, retention, reprice, quarantine: ``derived.py``) for the writer
        thread, which runs it in one transaction between span commits. The Future resolves with its result
        once committed, or with the exception that rolled it back."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown(f"the store writer is not running: {write.name!r} cannot be written now "
                                   "(start the store first; at shutdown, stop writing before it)")
            fut = self.derived.put(write)
            self._cond.notify()
        return fut

    def set_aside(self, ref: tuple[int, int, int], signal: str, stage: str, reason: str):
        """Set an acknowledged record aside from any thread (the decoder could not read it); its path."""
        write = DerivedWrite("quarantine", lambda con: self.quarantine.set_aside(con, ref, signal, stage, reason))
        return self.write(write).result()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection for another thread's reads (readers, analyzers, exporters); SQL functions are shared
        with it. Writes go through ``write``."""
        cur = self.con.cursor()
        cur.execute(f'USE "{self._catalog}"')     # a cursor starts in the connection's default catalog
        return cur

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while (taken := self._take_group()) is not None:
            group, spans, low = taken
            results = self._commit_group(group, spans, low)
            self._checkpoint_if_due()
            failed = [t.payload_ref[0] for t, r in zip(group, results)
                      if isinstance(r, BaseException) and not isinstance(r, SetAside)]
            with self._cond:
                self._queued_spans -= spans
                if failed:     # left for the next start's replay: replay_from must not pass them
                    self._failed_low = min(self._failed_low, *failed)
            for task, result in zip(group, results):
                if isinstance(result, BaseException):
                    task.future.set_exception(result)
                else:
                    task.future.set_result(result)
            with self._commit_cond:
                self._finished_tasks += len(group)
                self._commit_cond.notify_all()

    def _checkpoint_if_due(self, held: threading.Condition | None = None, quiet: bool = False) -> None:
        """Checkpoint once the WAL has grown past ``store.checkpoint_threshold`` (``quiet``: past
        QUIET_CHECKPOINT_BYTES, if smaller). DuckDB's automatic
        checkpoint at a commit is skipped while another connection has a transaction open, and the
        analyzers nearly always have one: after a saturation burst the WAL stayed at 77-82 MB (the
        threshold 64MB) and its rows in memory (98 MB of DuckDB's, kept while the sidecar went quiet)
        until the next commit that happened to run alone. An explicit CHECKPOINT runs beside readers.
        ``held``: the writer's lock, held by the caller and released while the checkpoint runs."""
        limit = min(self.checkpoint_bytes, QUIET_CHECKPOINT_BYTES) if quiet else self.checkpoint_bytes
        if self._checkpoint_retry_at is not None and time.monotonic() < self._checkpoint_retry_at:
            return
        try:
            if self._wal.stat().st_size < limit:
                return
        except OSError:          # no WAL: nothing to checkpoint
            return
        t0 = time.perf_counter()
        if held is not None:
            held.release()
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.Error as exc:
            # "other write transactions active" (a reader's transaction older than a commit that changed a row:
            # _write_replay_from): the commits stand, and the writer tries again in a second, also when nothing
            # else arrives
            if self._checkpoint_retry_at is None:
                log.info("checkpoint postponed: %s", exc)
            self._checkpoint_retry_at = time.monotonic() + CHECKPOINT_RETRY_S
            return
        finally:
            if held is not None:
                held.acquire()
        self._checkpoint_retry_at = None
        took = time.perf_counter() - t0
        if took > SLOW_COMMIT_S:
            log.info("a checkpoint took %.2f s", took)

    def _take_group(self) -> tuple[list[_Task], int, int] | None:
        """Wait for a group to commit (running derived writes meanwhile): (records, spans, the lowest
        segment a record may still come from); None once stopping with nothing queued."""
        with self._cond:
            while True:
                self.derived.run_pending(self.con, self._cond)      # releases the lock while each runs
                # trace rows keep coming after a burst's last spans
                self._checkpoint_if_due(self._cond, quiet=self._queued_spans < MIN_GROUP_SPANS)
                if self._queue or self._stopping:
                    break
                self._cond.wait(None if self._checkpoint_retry_at is None else CHECKPOINT_RETRY_S)
            if not self._queue and self._stopping:
                return None
            # Linger for a bigger group: fewer, larger commits (the clients have their acks already).
            deadline = time.monotonic() + GROUP_LINGER_S
            while (self._queued_spans < self._linger_below and not self._stopping and not self._flushing
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
                self.derived.run_pending(self.con, self._cond)      # a linger's idle time is theirs
                self._checkpoint_if_due(self._cond, quiet=True)
            group, spans = [], 0
            while self._queue and spans < MAX_GROUP_SPANS:
                task = self._queue.popleft()
                group.append(task)
                spans += task.batch.accepted
            # every record below this segment has reached the queue; those still queued are later
            low = min([self._frontend_low or self.first_segment, self._failed_low]
                      + [t.payload_ref[0] for t in self._queue])
            return group, spans, low

    def _commit_group(self, group: list[_Task], spans: int, low: int) -> list:
        """Commit ``group``; each record's ``CommitReceipt`` or the exception that failed it, in order."""
        try:
            t0 = time.perf_counter()
            results = self._commit(group, low)
            self.stats.add("store_insert_seconds", None, time.perf_counter() - t0)
            self.stats.add("store_commits", None, 1)
            took = time.perf_counter() - t0
            self.stats.add("store_commit_seconds", None, took)
            if took > SLOW_COMMIT_S:
                log.info("a commit of %d spans took %.2f s (DuckDB checkpoints run inside commits)", spans, took)
            return results
        except BaseException as exc:  # the store failed: no waiting caller gets an ack
            # (records the frontend acknowledged stay in the segment log; replay_from did not
            # move past them, so the next start inserts them)
            log.exception("commit of %d requests failed", len(group))
            self._rollback()
            # disk full: keep the group and retry it until space returns (diskfull.py); else it fails
            # else a record's values: commit the others, set the culprit aside (quarantine.py)
            return diskfull.retry_group(self, group, low, exc) or self._isolate(group, low, exc)

    def commit_replayed(self, items: list[tuple[NormalizedBatch, tuple[int, int, int]]]) -> None:
        """Insert records recovered from the segment log (before the writer thread starts). A record
        that cannot be inserted is set aside, so that it cannot keep ``serve`` from starting."""
        group = [_Task(batch, Future(), ref) for batch, ref in items]
        try:
            self._commit(group)
        except Exception as exc:  # isolated, or raised again, below
            self._rollback()
            for result in self._isolate(group, None, exc):
                if isinstance(result, BaseException) and not isinstance(result, SetAside):
                    raise result

    def _isolate(self, group: list[_Task], low: int | None, exc: BaseException) -> list:
        """The commit of ``group`` failed with ``exc``: if a record's values can be the cause, commit
        the records one by one and set aside each that fails alone; the results in ``group``'s order.

        One bad record never takes its group down with it. Failures that are not about values (I/O,
        a broken database), or that every record of a group shares, set nothing aside: the records
        stay in the segment log and are inserted on the next start, as before."""
        if not is_data_error(exc):
            return [exc] * len(group)
        results: list = []
        culprits: list[int] = []
        for i, task in enumerate(group):
            try:
                # replay_from does not move until every record of the group is committed or set aside
                results.extend(self._commit([task]))
            except Exception as one:  # classified below
                self._rollback()
                results.append(one)
                culprits.append(i)
        if len(group) > 1 and len(culprits) == len(group):
            log.error("every one of %d records failed alone (%s): the store is at fault, not a record; they stay in "
                      "the segment log", len(group), exc)
            return results
        for i in culprits:
            task, error = group[i], results[i]
            if not is_data_error(error):
                continue
            path = self.quarantine.set_aside(self.con, task.payload_ref, task.batch.signal, "insert", error,
                                             task.batch.payload or None)
            results[i] = SetAside(f"the store could not insert this request ({error}); it was set aside in {path}")
        if low is not None and low > self.replay_from and all(
                not isinstance(r, BaseException) or isinstance(r, SetAside) for r in results):
            self._write_replay_from(low)
            self.replay_from = low
        return results

    def _rollback(self) -> None:
        try:
            self.con.rollback()
        except duckdb.Error:      # no transaction open (it failed in COMMIT, or before BEGIN)
            pass

    def _read_replay_from(self) -> int:
        """The segment the last run recorded (the newest row: rows are only appended while it runs)."""
        rows = self.con.execute("SELECT max(segment) FROM shadowlens_replay_from").fetchall()
        if rows[0][0] is not None:
            return int(rows[0][0])
        # a store written before the table: the key in shadowlens_meta; a store without it predates framed
        # segments, and nothing in it can be replayed
        rows = self.con.execute("SELECT value FROM shadowlens_meta WHERE key = ?", [REPLAY_META_KEY]).fetchall()
        return int(rows[0][0]) if rows else self.first_segment

    def _write_replay_from(self, segment: int) -> None:
        """Record in the open transaction (or auto-commit) that segments below ``segment`` are all in DuckDB.

        A row appended, not a value replaced (INSERT OR REPLACE on ``shadowlens_meta`` before; an UPDATE
        did the same): DuckDB keeps a committed transaction that changed a row, and with it a share of its
        checkpoint lock, until every transaction that started before the commit has ended, and under load
        the analyzers' reads overlap without a gap. Every CHECKPOINT, ours and DuckDB's own, then
        failed ("other write transactions active") for as long as the load lasted: after 60 s of
        saturation the WAL held 236 MB (tests/test_store_checkpoint.py). One row per segment the frontend
        moves past (256 MB of payloads); the rows before the newest go at the next start."""
        self.con.execute("INSERT INTO shadowlens_replay_from VALUES (?)", [segment])

    def _commit(self, group: list[_Task], low: int | None = None) -> list[CommitReceipt]:
        seq = self.committed_seq + 1
        now_us = int(self.now() * 1e6)
        keeps, stored_keys = self._deduplicate(group)
        rows = group_rows([t.batch for t in group], [t.payload_ref for t in group], keeps, seq, self._next_payload_id)
        self._next_payload_id = rows.next_payload_id
        con = self.con
        con.begin()
        new_spans, new_evals = insert_group(con, rows, self._insert_spans, seq, now_us)
        moved = low is not None and low > self.replay_from
        if moved:
            self._write_replay_from(low)
        con.commit()
        if moved:
            self.replay_from = low
        if stored_keys:          # only what is committed: a failed commit stored nothing to remember
            self._dedup.remember(np.concatenate(stored_keys), seq)
        if rows.duplicates:
            self.stats.add("spans_duplicate", None, rows.duplicates)
        if self._followers and (new_spans is not None or new_evals is not None):
            committed = CommittedRows(seq, new_spans, new_evals)   # before the notify: waiters find it queued
            for follower in self._followers:
                try:
                    follower(committed)
                except Exception:  # the rows are committed; a follower's bug must not fail the commit
                    log.exception("a commit follower failed")
        with self._commit_cond:
            self.committed_seq = seq
            self._commit_cond.notify_all()
        return rows.results

    def _deduplicate(self, group: list[_Task]) -> tuple[list, list[np.ndarray]]:
        """Per record, True for the spans to store (None: all), and the keys of those to remember once
        committed: one decision for the whole group (``dedup.new_spans``), then each record's slice."""
        keeps: list = [None] * len(group)
        traced = [i for i, t in enumerate(group) if t.batch.signal == "traces" and t.batch.accepted]
        if self._dedup is None or not traced:
            return keeps, []
        mask = dedup.new_spans(self._dedup, self.con, [group[i].batch for i in traced])
        stored_keys, pos = [], 0
        for i in traced:
            b = group[i].batch
            keeps[i] = mask[pos:pos + b.accepted]
            stored_keys.append(np.asarray(b.keys, dtype=np.uint64)[keeps[i]])
            pos += b.accepted
        return keeps, stored_keys
