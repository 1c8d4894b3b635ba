"""The ingest frontend process: OTLP receivers, request checks and the write-ahead log.

Started by ``serve`` (collector/store/remote.py explains the three processes). It acknowledges
an Export once its payload is fdatasynced in the segment log and hands the record to the decoder
process. It ignores SIGINT/SIGTERM: the store process decides when it stops, and it exits by
itself when the store process's end of the pipe closes (e.g. after ``kill -9``).
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time


def main(conn, decoder_conn, config_tree: dict, first_segment: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A long switch interval: decoding holds the GIL in long runs, and forcing it to hand over
    # every 1 ms to the 30-odd receiver threads that wake for I/O made the handovers the cost
    # (measured on the benchmark: 1 ms 32.7k, 10 ms 37-38k, 50 ms 36k acknowledged spans/s).
    sys.setswitchinterval(0.01)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shadowlens.config import build
    from .decode.check import Checker
    from .receivers.export import ExportHandler
    from .receivers.grpc import GrpcReceiver
    from .receivers.http import HttpReceiver
    from .security import load as load_security
    from .stats import IngestStats
    from .store.diskfull import WriteHealth
    from .store.remote import RemoteStore
    from .store.segments import SEGMENTS_DIR, SegmentLog

    cfg = build(config_tree)
    stats = IngestStats()
    segments = SegmentLog(cfg.store.data_dir / SEGMENTS_DIR, first_segment,
                          health=WriteHealth("payload log", stats))
    store = RemoteStore(conn, decoder_conn, segments, stats, cfg.store.queue_max_spans)
    # Checks only: the decoder process builds the columns (no numpy, pyarrow or DuckDB here).
    handler = ExportHandler(Checker(cfg.cohort_labels, cfg.receivers.scanner), store, stats)
    listeners = load_security(cfg)      # serve checked the files before starting this process
    receivers = [GrpcReceiver(cfg.receivers.grpc, handler, cfg.receivers.grpc_max_bytes, cfg.receivers.grpc_max_workers,
                              tls=listeners.grpc_tls, token=listeners.receivers_token),
                 HttpReceiver(cfg.receivers.http, handler, cfg.receivers.http_max_bytes, cfg.receivers.http_read_timeout_s,
                              cfg.receivers.http_idle_timeout_s, cfg.receivers.http_max_connections,
                              tls=listeners.http_tls, token=listeners.receivers_token)]
    started = []
    try:
        for r in receivers:
            r.start()
            started.append(r)
    except OSError as exc:
        store.send(("failed", f"cannot start the OTLP receivers: {exc}"))
        os._exit(2)
    stop = threading.Event()

    def report_stats() -> None:
        while not stop.wait(0.5):
            stats.store_sync_seconds = segments.sync_seconds     # the write-ahead fdatasyncs happen here
            segments.recheck()       # after a full disk, readiness returns with the space, not with a client
            store.send(store.stats_message())

    threading.Thread(target=report_stats, name="stats", daemon=True).start()
    # Decoding allocates many short-lived objects; the default gen-0 threshold (700) ran the
    # collector thousands of times a second (3 % of the GIL). Startup objects are frozen out of it.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    store.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            # The store process is gone (crash, kill -9): nothing more can be acknowledged.
            store.fail_all()
            os._exit(1)
        if msg[0] == "stop":
            break
        store.on_message(msg)
    # Stop accepting, let in-flight Exports get their acks, then leave.
    store.stop_accepting()
    drain = threading.Thread(target=_drain, args=(conn, store), daemon=True)
    drain.start()
    for r in started:
        r.shutdown(25.0)
    stop.set()
    deadline = time.monotonic() + 30
    while not store.drained() and time.monotonic() < deadline:
        time.sleep(0.01)
    segments.close()
    store.send(store.stats_message())
    store.send(("stopped",))
    os._exit(0)


def _drain(conn, store) -> None:
    """Keeps reading acks while the receivers stop (they wait for them)."""
    while True:
        try:
            store.on_message(conn.recv())
        except (EOFError, OSError):
            return
