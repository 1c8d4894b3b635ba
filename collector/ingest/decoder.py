"""Acknowledged Records -> Arrow columns for the writer: RecordDecoder, and the decoder process's main.

The frontend has already made each payload durable and acknowledged it; the decoder reads the bytes
back from the segment file (they are in the page cache, and leave it once read: see
SegmentReader.read), normalizes them (the GIL-bound part of ingest) and hands a Batch to the
supervisor. A record it cannot decode goes back as Undecodable, and the supervisor sets it aside
(the rule: ``shadowlens.collector.ingest``).

Serve decodes in its own process while decoding takes a small share of a core, and runs ``main`` in
a decoder process of its own beside it when decoding needs more (``receivers.decoder_process``,
supervisor.py). The process exits when its input pipe closes, after passing on everything before.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import time

from .messages import Barrier, Batch, Counters, IngestSettings, Record, Stopped, Undecodable

STATS_INTERVAL_S = 0.5

log = logging.getLogger("shadowlens.decoder")


class RecordDecoder:
    """Record -> Batch, or Undecodable when the payload does not decode; counts the spans it could not
    price and the gateways' mixed spans into ``stats``. The decoder process runs one, and serve's own
    process another while it decodes in-process (supervisor.py)."""

    def __init__(self, settings: IngestSettings, stats) -> None:
        from ..decode.litellm import MixedSpansWarning
        from ..store.segments import SEGMENTS_DIR, SegmentReader

        self.stats = stats
        self._mixed_warning = MixedSpansWarning()      # one log line per interval, not per span
        self._decode = _record_decoder(settings, SegmentReader(settings.data_dir / SEGMENTS_DIR))

    def __call__(self, rec: Record) -> tuple[Batch | Undecodable, bool]:
        """The record's Batch (or Undecodable), and whether ``stats`` changed."""
        out = self._decode(rec)
        counted = False
        if isinstance(out, Batch) and out.batch.unpriced:
            self.stats.add_many("unpriced_spans", out.batch.unpriced)
            counted = True
        if isinstance(out, Batch) and out.batch.mixed:
            self.stats.add_many("mixed_spans", out.batch.mixed)
            self._mixed_warning.note(sum(out.batch.mixed.values()))
            counted = True
        return out, counted


def main(conn_in, conn_out, settings: IngestSettings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..counters import IngestCounters
    from .memory import IdleRelease

    stats = IngestCounters(max_models=settings.metrics_max_models)
    decode = RecordDecoder(settings, stats)
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)     # decoding allocates many short-lived objects (see frontend.py)

    def send(msg) -> None:
        try:
            conn_out.send(msg)
        except (OSError, EOFError):      # the supervisor is gone: nothing more to do
            os._exit(1)

    last_sent = time.monotonic()
    dirty = False
    idle = IdleRelease()
    while True:
        try:
            # with no counters to send, block until a record comes (or it is time to give back the
            # library code only startup ran, memory.py): an idle decoder does not wake
            if not conn_in.poll(STATS_INTERVAL_S if dirty else idle.wait_s()):
                if dirty:              # counters of the last records, also when no more arrive
                    send(Counters(stats.snapshot()))
                    dirty = False
                idle.maybe()
                continue
            msg = conn_in.recv()
        except (EOFError, OSError):
            break
        if isinstance(msg, Record):
            idle.busy()         # a reader's barrier (read-your-acks) is not work
            out, counted = decode(msg)
            dirty = dirty or counted
            send(out)
        elif isinstance(msg, Barrier):
            send(Counters(stats.snapshot()))
            send(msg)
        now = time.monotonic()
        if dirty and now - last_sent >= STATS_INTERVAL_S:
            last_sent = now
            dirty = False
            send(Counters(stats.snapshot()))
    send(Counters(stats.snapshot()))
    send(Stopped())
    os._exit(0)


def _record_decoder(settings: IngestSettings, reader):
    """A function: Record -> Batch, or Undecodable when the payload does not decode."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from ..decode.normalize import Normalizer
    from ..decode.pricing import PriceTable

    normalizer = Normalizer(settings.cohort_labels, settings.evals, PriceTable.load(settings.prices),
                            settings.receivers.scanner)

    def decode(rec: Record) -> Batch | Undecodable:
        try:
            payload = reader.read(rec.segment, rec.offset, rec.length, last_read=True)
            if rec.signal == "traces":
                batch = normalizer.normalize_traces(payload)
            else:
                batch = normalizer.normalize_logs(ExportLogsServiceRequest.FromString(payload), payload)
        except Exception as exc:  # acknowledged, yet it does not decode: the supervisor keeps it
            log.exception("record %d (segment %d, offset %d) could not be decoded; it is set aside", rec.rid,
                          rec.segment, rec.offset)
            return Undecodable(rec.rid, rec.ref, rec.signal, rec.low_segment, f"{type(exc).__name__}: {exc}")
        batch.payload = b""          # the payload stays in the segment log; only the columns cross
        return Batch(rec.rid, batch, rec.ref, rec.low_segment)

    return decode
