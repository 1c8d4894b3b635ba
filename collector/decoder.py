"""The decoder process: acknowledged records from the segment log -> Arrow columns for the store.

Started by ``serve`` beside the frontend (collector/store/remote.py explains the three
processes). The frontend has already made each payload durable and acknowledged it; this
process reads the bytes back from the segment file (they are in the page cache, and leave it
once read: see SegmentReader.read), normalizes them (normalize.py, the GIL-bound part of
ingest) and sends the batch to the store process.
It exits when the frontend's end of its input pipe closes, after passing on everything before.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import time

STATS_INTERVAL_S = 0.5


def main(conn_in, conn_out, config_tree: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("shadowlens.decoder")
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from shadowlens.collector.decode.pricing import PriceTable

    from shadowlens.config import build
    from .decode.normalize import Normalizer
    from .stats import IngestStats
    from .store.segments import SEGMENTS_DIR, SegmentReader

    cfg = build(config_tree)
    stats = IngestStats(max_models=cfg.metrics_max_models)
    normalizer = Normalizer(cfg.cohort_labels, cfg.evals, PriceTable.load(cfg.prices), cfg.receivers.scanner)
    reader = SegmentReader(cfg.store.data_dir / SEGMENTS_DIR)
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)     # decoding allocates many short-lived objects (see frontend.py)

    def send(msg) -> None:
        try:
            conn_out.send(msg)
        except (OSError, EOFError):      # the store process is gone: nothing more to do
            os._exit(1)

    last_stats = time.monotonic()
    dirty = False
    while True:
        try:
            if not conn_in.poll(STATS_INTERVAL_S):
                if dirty:              # counters of the last records, also when no more arrive
                    send(("stats", stats.snapshot()))
                    dirty = False
                continue
            msg = conn_in.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "record":
            _, rid, seg, off, length, sig, low = msg
            try:
                payload = reader.read(seg, off, length, last_read=True)
                if sig == "traces":
                    batch = normalizer.normalize_traces(payload)
                else:
                    batch = normalizer.normalize_logs(ExportLogsServiceRequest.FromString(payload), payload)
            except Exception as exc:  # the frontend checked it; a failure here is a bug, not input
                log.exception("record %d (segment %d, offset %d) could not be decoded; the store sets it aside", rid,
                              seg, off)
                send(("skip", rid, low, (seg, off, length), sig, f"{type(exc).__name__}: {exc}"))
                continue
            if batch.unpriced:
                stats.add_many("unpriced_spans", batch.unpriced)
                dirty = True
            batch.payload = b""
            send(("batch", rid, batch, (seg, off, length), low))
        elif msg[0] == "barrier":
            send(("stats", stats.snapshot()))
            send(msg)
        now = time.monotonic()
        if dirty and now - last_stats >= STATS_INTERVAL_S:
            last_stats = now
            dirty = False
            send(("stats", stats.snapshot()))
    send(("stats", stats.snapshot()))
    send(("stopped",))
    os._exit(0)
