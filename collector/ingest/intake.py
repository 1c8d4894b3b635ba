"""The frontend's side of the store: make a payload durable, admit it, hand its place to the decoder.

Runs in the frontend process (no numpy, pyarrow or DuckDB). It counts the spans acknowledged and
not yet committed (the ``shadowlens_ingest_queue_spans`` gauge) and refuses new requests beyond
``queue_max_spans``; the supervisor's Ack or Nack for a record releases its spans.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

from ..counters import IngestCounters
from ..errors import StorageFull
from ..store.commit import admit
from ..store.segments import SegmentLog
from .messages import Ack, Barrier, Counters, Nack, Record

log = logging.getLogger("shadowlens.intake")

# A full queue makes an Export wait this long for room before it is refused: refusing at once
# sent clients into their retry back-off (1 s or more) while the store caught up in a fraction of
# that, and throughput came in bursts (measured: per-second acks swinging between 0 and 90k).
ADMIT_WAIT_S = 5.0


class Intake:
    """``persist`` makes a payload durable and sends its Record to the decoder; thread-safe."""

    def __init__(self, conn, decoder_conn, segments: SegmentLog, stats: IngestCounters, queue_max_spans: int):
        self.conn = conn                       # to and from the supervisor
        self.decoder_conn = decoder_conn       # to the decoder process
        self.segments = segments
        self.stats = stats
        self.queue_max_spans = queue_max_spans
        self._pending: dict[int, int] = {}      # record id -> spans the store has not committed yet
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

    def counters(self) -> Counters:
        """This process's counters for the supervisor, with the admission queue's depth (the
        ``shadowlens_ingest_queue_spans`` gauge: spans acknowledged and not yet committed)."""
        return Counters(dict(self.stats.snapshot(), ingest_queue_spans=self._inflight_spans))

    def send_decoder(self, msg) -> None:
        with self._decoder_lock:
            self.decoder_conn.send(msg)

    def persist(self, payload: bytes, signal: str, n: int) -> None:
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
                self._sent(floor)
                low = min(min(self._unsent, default=self.segments.segment), self.segments.segment)
            sent = True
            self.send_decoder(Record(rid, seg, off, len(payload), signal, low))
        except BaseException as exc:
            if isinstance(exc, StorageFull):
                self.stats.add("requests_refused", exc.reason)
            if not sent:
                with self._lock:
                    self._sent(floor)
            self._release(rid)
            raise

    def _sent(self, floor: int) -> None:
        self._unsent[floor] -= 1
        if not self._unsent[floor]:
            del self._unsent[floor]

    def _release(self, rid: int) -> None:
        with self._lock:
            n = self._pending.pop(rid, None)
            if n is not None:
                self._inflight_spans -= n
                self._room.notify_all()

    def on_message(self, msg) -> None:
        """An Ack, Nack or Barrier from the supervisor."""
        if isinstance(msg, Ack):
            self._release(msg.rid)
        elif isinstance(msg, Nack):
            log.error("the store could not commit request %d: %s", msg.rid, msg.message)
            self._release(msg.rid)
        elif isinstance(msg, Barrier):
            self.send(self.counters())    # counters as fresh as the data
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
