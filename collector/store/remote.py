"""The store across process boundaries: serve's ingest runs in three processes.

    frontend (receivers)  --records-->  decoder  --Arrow batches-->  store (this process)
          ^------------------------- acks, stop, barriers ------------------'

- frontend (collector/frontend.py): receives, checks each request (span count, invalid spans:
  the C scanner's dry run), appends the payload to the segment log, fdatasyncs (group commit)
  and acknowledges. Then it sends the record's place, not its bytes, to the decoder.
- decoder (collector/decoder.py): reads the payload back (page cache), normalizes it to Arrow
  columns and sends them to the store.
- store: StoreWriter inserts into DuckDB in large groups and acks each record to the frontend,
  which counts what is not committed yet against ``store.queue_max_spans`` (beyond it clients
  get UNAVAILABLE, so a store that falls behind does not turn into unbounded memory).

Why processes: decoding is GIL-bound Python, the receivers are GIL-bound Python, and DuckDB's
Python binding takes the GIL back many times while an INSERT runs (measured: 80k -> 5k rows/s
with one busy Python thread beside it). Three GILs let the three run side by side, and decoding
is off the acknowledgement path.

Messages (pickled over ``multiprocessing`` pipes; Arrow batches as IPC buffers):
  frontend -> store:   ("ready",), ("failed", message), ("stats", snapshot), ("stopped",)
  store -> frontend:   ("ack", id) once committed (("nack", id, message) if the commit failed: the
                       record stays in the segment log for the next start), ("barrier", token), ("stop",)
  frontend -> decoder: ("record", id, segment, offset, length, signal, low_segment), ("barrier", token)
  decoder -> store:    ("batch", id, NormalizedBatch, (segment, offset, length), low_segment),
                       ("skip", id, low_segment, (segment, offset, length), signal, reason), ("stats", snapshot), ("barrier", token), ("stopped",)
Pipes are ordered: a barrier the store sends to the frontend comes back through the decoder after
every record acknowledged before it, which is how a query sees every acknowledged span.
``low_segment``: the lowest segment the frontend may still send records of (see writer.replay_from).
"""
from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import threading
import time

from ..errors import SetAside, StorageFull
from ..stats import IngestStats, sum_snapshots
from .commit import admit
from .segments import SegmentLog

log = logging.getLogger("shadowlens.bridge")

# A full queue makes an Export wait this long for room before it is refused: refusing at once
# sent clients into their retry back-off (1 s or more) while the store caught up in a fraction of
# that, and throughput came in bursts (measured: per-second acks swinging between 0 and 90k).
ADMIT_WAIT_S = 5.0
# Decoded spans the store process holds for the writer: two of its largest groups (writer.MAX_GROUP_SPANS).
DECODED_MAX_SPANS = 65536


class RemoteStore:
    """Frontend side: ``submit_record`` makes a payload durable and hands it on."""

    def __init__(self, conn, decoder_conn, segments: SegmentLog, stats: IngestStats, queue_max_spans: int):
        self.conn = conn                       # to and from the store process
        self.decoder_conn = decoder_conn       # to the decoder process
        self.segments = segments
        self.stats = stats
        self.queue_max_spans = queue_max_spans
        self._pending: dict[int, int] = {}      # request id -> spans the store has not committed yet
        self._unsent: collections.Counter = collections.Counter()   # segment -> records not yet sent
        self._inflight_spans = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._decoder_lock = threading.Lock()
        self.stopping = False
        stats.gauges["ingest_queue_spans"] = lambda: float(self._inflight_spans)

    def send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def stats_message(self) -> tuple:
        """This process's counters for the store process, with the admission queue's depth (the
        ``shadowlens_ingest_queue_spans`` gauge: spans acknowledged and not yet committed)."""
        return ("stats", dict(self.stats.snapshot(), ingest_queue_spans=self._inflight_spans))

    def send_decoder(self, msg) -> None:
        with self._decoder_lock:
            self.decoder_conn.send(msg)

    def submit_record(self, payload: bytes, signal: str, n: int) -> None:
        """Durable on return: appended and fdatasynced (group commit with the other receiver
        threads), and on its way to the decoder. Raises Overloaded / ShuttingDown instead."""
        with self._lock:
            t0 = time.monotonic()
            self._room.wait_for(lambda: self.stopping or not self._inflight_spans
                                or self._inflight_spans + n <= self.queue_max_spans, ADMIT_WAIT_S)
            if time.monotonic() - t0 > 0.5:
                log.info("waited %.2f s for room in the ingest queue", time.monotonic() - t0)
            admit(self.stopping, self._inflight_spans, n, self.queue_max_spans, self.stats)
            self._inflight_spans += n
            rid = next(self._ids)
            self._pending[rid] = n
            # the record lands in this segment or a later one; until it is sent, the store must
            # not consider this segment complete
            floor = self.segments.segment
            self._unsent[floor] += 1
        sent = False
        try:
            seg, off, ticket = self.segments.append(payload, signal)
            self.segments.wait_durable(ticket)
            with self._lock:
                self._unsent[floor] -= 1
                if not self._unsent[floor]:
                    del self._unsent[floor]
                low = min(min(self._unsent, default=self.segments.segment), self.segments.segment)
            sent = True
            self.send_decoder(("record", rid, seg, off, len(payload), signal, low))
        except BaseException as exc:
            if isinstance(exc, StorageFull):
                self.stats.add("requests_refused", exc.reason)
            with self._lock:
                if not sent:
                    self._unsent[floor] -= 1
                    if not self._unsent[floor]:
                        del self._unsent[floor]
            self._release(rid)
            raise

    def _release(self, rid: int) -> None:
        with self._lock:
            n = self._pending.pop(rid, None)
            if n is not None:
                self._inflight_spans -= n
                self._room.notify_all()

    def on_message(self, msg) -> None:
        if msg[0] in ("ack", "nack"):
            if msg[0] == "nack":
                log.error("the store could not commit request %d: %s", msg[1], msg[2])
            self._release(msg[1])
        elif msg[0] == "barrier":
            self.send(self.stats_message())    # counters as fresh as the data
            self.send_decoder(msg)

    def stop_accepting(self) -> None:
        with self._lock:
            self.stopping = True
            self._room.notify_all()

    def fail_all(self) -> None:
        """The store is gone: nothing waits on it any more (acknowledged records are in the log)."""
        with self._lock:
            self._pending.clear()
            self._inflight_spans = 0
            self._room.notify_all()

    def drained(self) -> bool:
        with self._lock:
            return not self._pending


class StoreBridge:
    """Store side, a Component: starts the frontend and decoder processes, commits what they send."""

    def __init__(self, store, config_tree: dict, child_stats: dict, start_timeout: float = 60.0):
        """``store``: the StoreWriter of this process. ``child_stats`` is kept equal to the sum of
        the two children's counters (the Prometheus collector reads it)."""
        self.store = store
        self.config_tree = config_tree
        self.child_stats = child_stats
        self.start_timeout = start_timeout
        self.ready = False
        self._procs: dict[str, multiprocessing.Process] = {}
        self._fe_conn = None
        self._dec_conn = None
        self._send_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._ready = threading.Event()
        self._stopped = {"frontend": threading.Event(), "decoder": threading.Event()}
        self._stats = {"frontend": {}, "decoder": {}}
        self._failure: str | None = None
        self._barriers: dict[int, threading.Event] = {}
        self._barrier_ids = itertools.count(1)
        self._stopping = False
        self._child_died = False
        self.on_child_exit = None     # called once if a child process ends without being asked to

    def start(self) -> None:
        from .. import decoder, frontend
        ctx = multiprocessing.get_context("spawn")
        # glibc gives each thread that allocates its own malloc arena (up to 8 per core); with
        # 30-odd receiver threads holding 1 MB requests that was ~150 MB of RSS in the frontend.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        fe_parent, fe_child = ctx.Pipe(duplex=True)
        dec_in, fe_to_dec = ctx.Pipe(duplex=False)        # frontend -> decoder
        dec_parent, dec_out = ctx.Pipe(duplex=False)      # decoder -> store
        self._fe_conn, self._dec_conn = fe_parent, dec_parent
        self._procs["decoder"] = ctx.Process(target=decoder.main, name="shadowlens-decoder", daemon=True,
                                             args=(dec_in, dec_out, self.config_tree))
        self._procs["frontend"] = ctx.Process(target=frontend.main, name="shadowlens-frontend", daemon=True,
                                              args=(fe_child, fe_to_dec, self.config_tree, self.store.first_segment))
        for p in self._procs.values():
            p.start()
        for c in (fe_child, fe_to_dec, dec_in, dec_out):
            c.close()
        for name, conn in (("frontend", fe_parent), ("decoder", dec_parent)):
            t = threading.Thread(target=self._read, args=(name, conn), name=f"shadowlens-bridge-{name}", daemon=True)
            t.start()
            self._readers.append(t)
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            dead = [n for n, p in self._procs.items() if not p.is_alive()]
            if self._failure or dead or time.monotonic() > deadline:
                self._kill()
                raise OSError(self._failure or f"the ingest {' and '.join(dead) or 'frontend'} did not start")
        log.info("ingest processes: frontend pid %d, decoder pid %d", self._procs["frontend"].pid,
                 self._procs["decoder"].pid)
        self.ready = True
        # Exported queue depth: the frontend's (acknowledged, not committed; what admission bounds),
        # not this process's writer queue, which holds only what the decoder has passed on so far.
        self.store.stats.gauges["ingest_queue_spans"] = lambda: float(self.child_stats.get("ingest_queue_spans", 0))

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self._fe_conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                pass   # the frontend is gone; its clients get no more acks

    def _read(self, name: str, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._stopped[name].set()
                if self.ready and not self._stopping:
                    log.error("the ingest %s process exited unexpectedly", name)
                    self._child_died = True
                    if self.on_child_exit is not None:
                        self.on_child_exit()
                return
            kind = msg[0]
            if kind == "batch":
                # Decoded batches wait in the decoder's pipe, not here, while DuckDB is behind: the
                # records are durable already, and a full queue of decoded columns cost ~90 MB.
                while not self.store.wait_for_room(DECODED_MAX_SPANS, 1.0):
                    pass
                self._submit(msg[1], msg[2], msg[3], msg[4])
            elif kind == "skip":     # a record the decoder could not read: set aside, the frontend stops counting it
                _, rid, _low, ref, signal, reason = msg
                try:
                    where = f"set aside in {self.store.set_aside(ref, signal, 'decode', reason)}"
                except Exception as exc:  # the record stays in the segment log either way
                    log.exception("could not set aside record %d", rid)
                    where = f"left in the segment log ({exc})"
                self._send(("nack", rid, f"the decoder could not read it ({reason}); {where}"))
            elif kind == "barrier":
                ev = self._barriers.pop(msg[1], None)
                if ev is not None:
                    ev.set()
            elif kind == "stats":
                self._stats[name] = msg[1]
                merged = sum_snapshots(self._stats["frontend"], self._stats["decoder"])
                self.child_stats.clear()
                self.child_stats.update(merged)
            elif kind == "ready":
                self._ready.set()
            elif kind == "failed":
                self._failure = msg[1]
            elif kind == "stopped":
                self._stopped[name].set()

    def _submit(self, rid: int, batch, ref, low: int) -> None:
        fut = self.store.submit(batch, ref, low)    # acknowledged already: the store takes it

        def done(f) -> None:
            exc = f.exception()
            if exc is None:
                self._send(("ack", rid))
            elif isinstance(exc, SetAside):
                self._send(("nack", rid, str(exc)))
            else:
                self._send(("nack", rid, f"{exc}; it stays in the segment log and is inserted on the next start"))
        fut.add_done_callback(done)

    def sync(self, timeout: float = 10.0) -> bool:
        """Read-your-acks: wait until every record the frontend acknowledged so far is committed."""
        if not self.ready:
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
        """Ask the frontend to stop accepting and drain; the decoder follows when its input closes."""
        if not self._procs:
            return
        self._stopping = True
        self.ready = False
        if self._child_died:       # nothing will drain: what was acknowledged is in the payload log
            timeout = 2.0
        self._send(("stop",))
        for name in ("frontend", "decoder"):
            self._stopped[name].wait(timeout)
            self._procs[name].join(timeout)
        self._kill()

    def _kill(self) -> None:
        for p in self._procs.values():
            if p.is_alive():
                p.kill()
            p.join(1)
        self._procs = {}

