"""The store across a process boundary: the ingest frontend (receivers + decoding) runs in its
own process and hands normalized batches to the store process over a pipe.

Why: DuckDB's Python binding takes the GIL back many times while an INSERT runs, so a decoding
thread in the same process slows every insert (measured: 80k -> 5k rows/s with one busy Python
thread beside it). Two processes, two GILs: the frontend decodes while the store inserts.

The frontend acknowledges an Export once the payload is fdatasynced in the segment log (the
write-ahead log), then hands the columns over; the store inserts them into DuckDB in large groups.
The frontend counts what the store has not committed yet against ``store.queue_max_spans``, so a
store that falls behind turns into UNAVAILABLE for clients, not into unbounded memory.

Messages (pickled over a ``multiprocessing`` pipe; Arrow batches pickle as IPC buffers):
  frontend -> store: ("ready",), ("failed", message),
                     ("batch", id, NormalizedBatch, (segment, offset, length), low_segment),
                     ("stats", snapshot), ("barrier", token), ("stopped",)
  store -> frontend: ("ack", id, stored, duplicates) once committed (or ("nack", id, ...) if the commit
                     failed: the record stays in the segment log for the next start), ("barrier", token),
                     ("stop",)
The pipe is ordered, so a barrier answered by the frontend arrives after every batch it sent before.
"""
from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future

from ..decode.normalize import NormalizedBatch
from ..stats import IngestStats
from .commit import Commit, admit
from .segments import SegmentLog

log = logging.getLogger("shadowlens.bridge")


class RemoteStore:
    """Frontend side: ``submit`` like StoreWriter's, answered by the store process."""

    def __init__(self, conn, segments: SegmentLog, stats: IngestStats, queue_max_spans: int):
        self.conn = conn
        self.segments = segments
        self.stats = stats
        self.queue_max_spans = queue_max_spans
        self._pending: dict[int, int] = {}      # request id -> spans the store has not committed yet
        self._unsent: collections.Counter = collections.Counter()   # segment -> records not yet sent
        self._inflight_spans = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.stopping = False
        stats.gauges["ingest_queue_spans"] = lambda: float(self._inflight_spans)

    def send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def submit(self, batch: NormalizedBatch) -> Future:
        """Durable on return: the payload is appended and fdatasynced (group commit with the other
        receiver threads); the columns are on their way to the store. The Future is resolved."""
        n = batch.accepted
        with self._lock:
            admit(self.stopping, self._inflight_spans, n, self.queue_max_spans, self.stats)
            self._inflight_spans += n
            rid = next(self._ids)
            self._pending[rid] = n
            # the record lands in this segment or a later one; until it is sent, the store must
            # not consider this segment complete
            floor = self.segments.segment
            self._unsent[floor] += 1
        try:
            seg, off, ticket = self.segments.append(batch.payload, batch.signal)
            self.segments.wait_durable(ticket)
            ref = (seg, off, len(batch.payload))
            batch.payload = b""            # the bytes are on disk; only their place travels
            with self._lock:
                self._unsent[floor] -= 1
                if not self._unsent[floor]:
                    del self._unsent[floor]
                low = min(self._unsent, default=self.segments.segment)
            self.send(("batch", rid, batch, ref, min(low, self.segments.segment)))
        except BaseException:
            with self._lock:
                if self._unsent.get(floor):
                    self._unsent[floor] -= 1
                    if not self._unsent[floor]:
                        del self._unsent[floor]
            self._release(rid)
            raise
        fut: Future = Future()
        fut.set_result(Commit(0, n, 0))
        return fut

    def _release(self, rid: int) -> None:
        with self._lock:
            n = self._pending.pop(rid, None)
            if n is not None:
                self._inflight_spans -= n

    def on_message(self, msg) -> None:
        if msg[0] in ("ack", "nack"):
            if msg[0] == "nack":
                log.error("the store could not commit request %d (%s); it stays in the segment log and is "
                          "inserted on the next start", msg[1], msg[3])
            self._release(msg[1])
        elif msg[0] == "barrier":
            self.send(("stats", self.stats.snapshot()))    # counters as fresh as the data
            self.send(msg)

    def fail_all(self, exc: BaseException) -> None:
        """The store is gone: nothing waits on it any more (acknowledged records are in the log)."""
        with self._lock:
            self._pending.clear()
            self._inflight_spans = 0

    def drained(self) -> bool:
        with self._lock:
            return not self._pending


class StoreBridge:
    """Store side, a Component: starts the frontend process and commits what it sends."""

    def __init__(self, store, config_tree: dict, child_stats: dict, start_timeout: float = 60.0):
        """``store``: the StoreWriter of this process."""
        self.store = store
        self.config_tree = config_tree
        self.child_stats = child_stats          # updated in place with the frontend's counters
        self.start_timeout = start_timeout
        self.ready = False
        self._proc = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._failure: str | None = None
        self._barriers: dict[int, threading.Event] = {}
        self._barrier_ids = itertools.count(1)

    def start(self) -> None:
        from .. import frontend
        ctx = multiprocessing.get_context("spawn")
        # glibc gives each thread that allocates its own malloc arena (up to 8 per core); with
        # 30-odd receiver threads holding 1 MB requests that was ~150 MB of RSS in the frontend.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        parent, child = ctx.Pipe(duplex=True)
        self._conn = parent
        self._proc = ctx.Process(target=frontend.main, name="shadowlens-frontend", daemon=True,
                                 args=(child, self.config_tree, self.store.first_segment))
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="shadowlens-bridge", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            if self._failure or not self._proc.is_alive() or time.monotonic() > deadline:
                self._proc.join(1)
                raise OSError(self._failure or f"the ingest frontend did not start (exit {self._proc.exitcode})")
        self.ready = True

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                pass   # the frontend is gone; its clients got no ack, so nothing is lost

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._stopped.set()
                return
            kind = msg[0]
            if kind == "batch":
                self._submit(msg[1], msg[2], msg[3], msg[4])
            elif kind == "barrier":
                ev = self._barriers.pop(msg[1], None)
                if ev is not None:
                    ev.set()
            elif kind == "stats":
                self.child_stats.clear()
                self.child_stats.update(msg[1])
            elif kind == "ready":
                self._ready.set()
            elif kind == "failed":
                self._failure = msg[1]
            elif kind == "stopped":
                self._stopped.set()

    def _submit(self, rid: int, batch: NormalizedBatch, ref, low: int) -> None:
        fut = self.store.submit(batch, ref, low)    # acknowledged already: the store takes it

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                c = f.result()
                self._send(("ack", rid, c.stored, c.duplicates))
            else:
                self._send(("nack", rid, "error", f"store commit failed: {exc}", 1.0))
        fut.add_done_callback(done)

    def sync(self, timeout: float = 10.0) -> bool:
        """Read-your-acks: wait until every batch the frontend acknowledged so far is committed."""
        if self._proc is None or not self.ready:
            return self.store.flush(timeout)
        token = next(self._barrier_ids)
        ev = self._barriers[token] = threading.Event()
        deadline = time.monotonic() + timeout
        self._send(("barrier", token))
        if not ev.wait(timeout):
            self._barriers.pop(token, None)
            return False
        return self.store.flush(max(0.0, deadline - time.monotonic()))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the frontend to stop accepting and drain (its Exports wait for their commits here)."""
        if self._proc is None:
            return
        self.ready = False
        self._send(("stop",))
        self._stopped.wait(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None
