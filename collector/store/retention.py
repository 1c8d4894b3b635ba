"""Deletes data older than ``store.retention``, every ``store.retention_check``; and, over ``store.max_bytes``,
the oldest data first until the store is under that budget.

The deletes are a derived write (``derived.delete_older_than``, ``derived.delete_segments_before``): the
store's writer runs them between two span commits, so one thread writes the file. A pass deletes what aged
out since the last one (a minute of data by default), so commits wait for a short delete, not for a backlog.
Payload segments are removed here, off the writer thread, once no payload row references them.

The budget counts what deleting can give back: the payload segments (every kind, ``segments.segment_sizes``),
DuckDB's *used* blocks and its WAL. DuckDB's file never shrinks after a DELETE (freed blocks are reused), so
counting its size would delete everything trying to shrink a file that cannot shrink. The budget deletes whole
closed segments, oldest first, and the rows whose payloads they hold; never a segment from
``StoreWriter.current_segment`` on, which may hold acknowledged records DuckDB lacks yet: a budget smaller
than that backlog logs loudly instead of losing data that was never stored.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb

from .database import DB_FILE, SEGMENTS_DIR
from .derived import DerivedWrite, delete_older_than, delete_segments_before
from .segments import list_segments, remove_segment, segment_sizes

log = logging.getLogger("shadowlens.retention")

# How often the budget is checked (when retention_check is longer): one stat of each segment and a PRAGMA.
BUDGET_CHECK_S = 10.0
# A DELETE frees DuckDB blocks at a checkpoint, and only if no reader's transaction was open at the DELETE's
# commit; else at a later checkpoint that finds the table changed (the next inserts). The estimate of what a
# budget pass deleted counts as freed until a measurement shows it; it lapses only once a checkpoint has run
# since (the used blocks changed) and this long has passed, so an idle store never deletes a second time for
# blocks a checkpoint has yet to free (measured on duckdb 2.0.1: tests/test_store_budget.py).
CREDIT_S = 120.0
LOUD_EVERY_S = 300.0        # the "cannot get under the budget" error, at most this often


@dataclass(frozen=True)
class StoreUsage:
    """What the disk budget counts, in bytes."""
    segments: int           # payload log files, closed and open, plain and compressed
    duckdb: int             # DuckDB's used blocks x block size (not its file size: see the module's note)
    wal: int                # DuckDB's WAL file

    @property
    def total(self) -> int:
        return self.segments + self.duckdb + self.wal


@dataclass(frozen=True)
class BudgetCounts:
    """What the budget deleted since start (``shadowlens_store_budget_deleted_*``)."""
    spans: int = 0
    segments: int = 0
    bytes: int = 0          # payload-log bytes deleted (segment files)


def duckdb_used_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes in DuckDB's used blocks (``PRAGMA database_size``: used_blocks x block_size, as duckdb 1.x and
    2.0 report them); the file holds free blocks besides, reused before it grows."""
    row = con.execute("SELECT used_blocks * block_size FROM pragma_database_size() "
                      "WHERE database_name = current_database()").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def store_usage(data_dir: Path, con: duckdb.DuckDBPyConnection | None) -> StoreUsage:
    """``con``: a connection to the store (None: its DuckDB part counts as 0)."""
    data_dir = Path(data_dir)
    try:
        wal = os.path.getsize(data_dir / (DB_FILE + ".wal"))
    except OSError:
        wal = 0
    return StoreUsage(segments=sum(segment_sizes(data_dir / SEGMENTS_DIR).values()),
                      duckdb=duckdb_used_bytes(con) if con is not None else 0, wal=wal)


class Retention:
    def __init__(self, data_dir: Path, write: Callable[[DerivedWrite], Future], retention_s: float, interval_s: float,
                 current_segment: Callable[[], int], now: Callable[[], float] = time.time, max_bytes: int = 0,
                 cursor: Callable[[], duckdb.DuckDBPyConnection] | None = None):
        """``write``: the store writer's ``write`` (its deletes run on the writer's thread). ``max_bytes``: the
        disk budget, 0 = none. ``cursor``: the writer's ``cursor`` (measures DuckDB's used blocks, checkpoints)."""
        self.data_dir = Path(data_dir)
        self.write = write
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.current_segment = current_segment
        self.now = now
        self.max_bytes = max_bytes
        self._cursor_factory = cursor
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()       # the counters and gauges /metrics reads
        self.deleted_spans = 0
        self.budget = BudgetCounts()
        self.usage = StoreUsage(0, 0, 0)    # as of the last check
        self.oldest_s: float | None = None  # receive time of the oldest payload kept, as of the last check
        self._credit = 0                    # DuckDB bytes a budget pass deleted that no measurement shows yet
        self._credit_base = 0               # DuckDB's used bytes when it deleted them
        self._credit_until = 0.0
        self._loud_at = 0.0

    def start(self) -> None:
        try:
            self.measure()      # /metrics shows the store's usage from the start
        except (duckdb.Error, OSError) as exc:
            log.warning("could not measure the store at start: %s", exc)
        self._thread = threading.Thread(target=self._loop, name="shadowlens-retention", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # without a budget the gauges (usage, oldest age) are refreshed on retention's interval only
        tick = min(self.interval_s, BUDGET_CHECK_S) if self.max_bytes else self.interval_s
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(tick):
            try:
                if time.monotonic() >= due:
                    due = time.monotonic() + self.interval_s
                    self.run_once()
                self.check_budget()
            except duckdb.Error as exc:   # e.g. a full disk: rolled back by the writer; the next round retries
                log.warning("retention pass failed, will retry: %s", exc)

    def run_once(self) -> int:
        cutoff_us = int((self.now() - self.retention_s) * 1e6)
        done = self.write(delete_older_than(cutoff_us)).result()
        n, live = done.spans, done.live_segments
        current = self.current_segment()
        for seg in list_segments(self.data_dir / SEGMENTS_DIR):
            if seg < current and seg not in live:
                remove_segment(self.data_dir / SEGMENTS_DIR, seg)
        with self._lock:
            self.deleted_spans += n
        return n

    # -- the disk budget ----------------------------------------------------------------------
    def _con(self) -> duckdb.DuckDBPyConnection | None:
        if self._cursor is None and self._cursor_factory is not None:
            self._cursor = self._cursor_factory()
        return self._cursor

    def measure(self) -> StoreUsage:
        """The store's usage now, kept for /metrics with the oldest payload's receive time."""
        usage = store_usage(self.data_dir, self._con())
        con = self._con()
        oldest = None
        if con is not None:
            first = list_segments(self.data_dir / SEGMENTS_DIR)[:1]
            # the oldest segment's rows only: payloads are appended in segment order, so zonemaps skip the rest
            row = con.execute("SELECT epoch_us(min(received_at)) FROM payloads WHERE segment <= ?",
                              [first[0] if first else 0]).fetchone()
            if (not row or row[0] is None) and first:
                row = con.execute("SELECT epoch_us(min(received_at)) FROM payloads").fetchone()
            oldest = row[0] / 1e6 if row and row[0] is not None else None
        with self._lock:
            self.usage, self.oldest_s = usage, oldest
        return usage

    def _outstanding(self, usage: StoreUsage) -> int:
        """The part of the last budget pass's DuckDB estimate that no checkpoint has shown freed yet."""
        if not self._credit:
            return 0
        seen = max(0, self._credit_base - usage.duckdb)
        if seen >= self._credit or (usage.duckdb != self._credit_base and time.monotonic() > self._credit_until):
            self._credit = 0
        return max(0, self._credit - seen)

    def check_budget(self) -> BudgetCounts:
        """Over ``max_bytes``: delete the oldest closed segments and their rows, as many as the excess takes
        by estimate (one step; the next check measures again). What this step deleted."""
        usage = self.measure()
        if not self.max_bytes:
            return BudgetCounts()
        over = usage.total - self._outstanding(usage) - self.max_bytes
        if over <= 0:
            return BudgetCounts()
        seg_dir = self.data_dir / SEGMENTS_DIR
        sizes = segment_sizes(seg_dir)
        current = self.current_segment()
        closed = sorted(n for n in sizes if n < current)
        # DuckDB's rows per segment: every segment held SEGMENT_BYTES of requests before compression, so an
        # equal share each is closer than a share by (compressed) file size
        share = (usage.duckdb + usage.wal) // max(1, len(sizes))
        chosen, freed = [], 0
        for n in closed:
            if freed >= over:
                break
            chosen.append(n)
            freed += sizes[n] + share
        if freed < over:
            self._loud(usage, current, len(sizes) - len(closed))
        if not chosen:
            return BudgetCounts()
        done = self.write(delete_segments_before(chosen[-1] + 1)).result()
        for n in chosen:
            remove_segment(seg_dir, n)
        step = BudgetCounts(spans=done.spans, segments=len(chosen), bytes=sum(sizes[n] for n in chosen))
        log.info("store over its budget (store.max_bytes %d, counted %d): deleted the oldest %d segment(s), %d"
                 " bytes, and %d spans", self.max_bytes, usage.total, step.segments, step.bytes, step.spans)
        self._checkpoint(usage.duckdb, share * len(chosen))
        with self._lock:
            b = self.budget
            self.budget = BudgetCounts(b.spans + step.spans, b.segments + step.segments, b.bytes + step.bytes)
        self.measure()      # /metrics shows the usage after the step
        return step

    def _checkpoint(self, used_before: int, estimate: int) -> None:
        """Free the deleted rows' blocks now if a checkpoint can; else count the estimate until one does."""
        con = self._con()
        if con is None:
            return
        for _ in range(3):
            try:
                con.execute("CHECKPOINT")
            except duckdb.Error as exc:
                log.debug("checkpoint after a budget pass: %s", exc)
            if duckdb_used_bytes(con) < used_before:
                return
            time.sleep(0.1)
        self._credit, self._credit_base = estimate, used_before
        self._credit_until = time.monotonic() + CREDIT_S

    def _loud(self, usage: StoreUsage, current: int, open_segments: int) -> None:
        if time.monotonic() < self._loud_at:
            return
        self._loud_at = time.monotonic() + LOUD_EVERY_S
        log.error("store.max_bytes %d is too small: the store counts %d bytes, and the %d newest payload segment(s)"
                  " (from %d on) hold acknowledged records not yet in DuckDB or the one being written, which are"
                  " never deleted; raise store.max_bytes (or the volume) above what ingest keeps in flight",
                  self.max_bytes, usage.total, open_segments, current)

    def snapshot(self) -> dict:
        """For /metrics (read by the scrape, never querying DuckDB)."""
        with self._lock:
            return {"max_bytes": self.max_bytes, "used_bytes": self.usage.total, "retention_s": self.retention_s,
                    "oldest_s": self.oldest_s, "budget": self.budget, "now_s": self.now()}

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._cursor is not None:
            try:
                self._cursor.close()
            except duckdb.Error:
                pass
            self._cursor = None


def store_bytes(data_dir: Path) -> float:
    total = 0
    for root, _, files in os.walk(data_dir):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return float(total)
