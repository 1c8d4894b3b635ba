"""The store across a process boundary: the ingest frontend (receivers + decoding) runs in its
own process and hands normalized batches to the store process over a pipe.

Why: DuckDB's Python binding takes the GIL back many times while an INSERT runs, so a decoding
thread in the same process slows every insert (measured: 80k -> 5k rows/s with one busy Python
thread beside it). Two processes, two GILs: the frontend decodes while the store inserts.

Messages (pickled over a ``multiprocessing`` pipe; Arrow batches pickle as IPC buffers):
  frontend -> store: ("ready",), ("failed", message), ("batch", id, NormalizedBatch, (segment, offset, length)),
                     ("stats", snapshot), ("stopped",)
  store -> frontend: ("ack", id, stored, duplicates), ("nack", id, kind, message, retry_after), ("stop",)
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future

from ..decode.normalize import NormalizedBatch
from ..errors import Overloaded, ShuttingDown
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
        self._pending: dict[int, tuple[Future, int]] = {}
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
        n = batch.accepted
        with self._lock:
            admit(self.stopping, self._inflight_spans, n, self.queue_max_spans, self.stats)
            self._inflight_spans += n
            rid = next(self._ids)
            fut: Future = Future()
            self._pending[rid] = (fut, n)
        try:
            seg, off = self.segments.append(batch.payload)
            ref = (seg, off, len(batch.payload))
            batch.payload = b""            # the bytes are on disk; only their place travels
            self.send(("batch", rid, batch, ref))
        except BaseException as exc:
            self._resolve(rid, exc)
            raise
        return fut

    def _resolve(self, rid: int, result) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
            if entry is None:
                return
            self._inflight_spans -= entry[1]
        if isinstance(result, BaseException):
            entry[0].set_exception(result)
        else:
            entry[0].set_result(result)

    def on_message(self, msg) -> None:
        if msg[0] == "ack":
            _, rid, stored, dups = msg
            self._resolve(rid, Commit(0, stored, dups))
        elif msg[0] == "nack":
            _, rid, kind, message, retry = msg
            exc = ShuttingDown(message, retry) if kind == "shutting_down" else \
                Overloaded(message, retry) if kind == "overloaded" else RuntimeError(message)
            self._resolve(rid, exc)

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            rids = list(self._pending)
        for rid in rids:
            self._resolve(rid, exc)

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

    def start(self) -> None:
        from .. import frontend
        ctx = multiprocessing.get_context("spawn")
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
                self._submit(msg[1], msg[2], msg[3])
            elif kind == "stats":
                self.child_stats.clear()
                self.child_stats.update(msg[1])
            elif kind == "ready":
                self._ready.set()
            elif kind == "failed":
                self._failure = msg[1]
            elif kind == "stopped":
                self._stopped.set()

    def _submit(self, rid: int, batch: NormalizedBatch, ref) -> None:
        try:
            fut = self.store.submit(batch, ref)
        except Overloaded as exc:
            kind = "shutting_down" if isinstance(exc, ShuttingDown) else "overloaded"
            self._send(("nack", rid, kind, str(exc), exc.retry_after_s))
            return

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                c = f.result()
                self._send(("ack", rid, c.stored, c.duplicates))
            else:
                self._send(("nack", rid, "error", f"store commit failed: {exc}", 1.0))
        fut.add_done_callback(done)

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
