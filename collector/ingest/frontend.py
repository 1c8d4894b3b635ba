"""The frontend process's entry point: OTLP receivers, request checks and the write-ahead log.

Started by the supervisor. It acknowledges an Export once its payload is fdatasynced in the
segment log and hands the Record to the decoder process. It ignores SIGINT/SIGTERM: the supervisor
decides when it stops (Stop), and it exits by itself when the supervisor's end of the pipe closes
(e.g. after ``kill -9``). No numpy, pyarrow or DuckDB is loaded here.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time

from .messages import Failed, IngestSettings, Ready, Stop, Stopped

STATS_INTERVAL_S = 0.5
DRAIN_TIMEOUT_S = 30.0


def main(conn, decoder_conn, settings: IngestSettings, first_segment: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A long switch interval: decoding holds the GIL in long runs, and forcing it to hand over
    # every 1 ms to the 30-odd receiver threads that wake for I/O made the handovers the cost
    # (measured on the benchmark: 1 ms 32.7k, 10 ms 37-38k, 50 ms 36k acknowledged spans/s).
    sys.setswitchinterval(0.01)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..counters import IngestCounters
    from ..store.diskfull import WriteHealth
    from ..store.segments import SEGMENTS_DIR, SegmentLog
    from .intake import Intake
    from .memory import HeapTrim, IdleRelease

    stats = IngestCounters()
    segments = SegmentLog(settings.data_dir / SEGMENTS_DIR, first_segment, health=WriteHealth("payload log", stats))
    intake = Intake(conn, decoder_conn, segments, stats, settings.queue_max_spans)
    try:
        receivers = _start_receivers(settings, intake, stats)
    except OSError as exc:
        intake.send(Failed(f"cannot start the OTLP receivers: {exc}"))
        os._exit(2)
    stop = threading.Event()

    trim = HeapTrim()
    idle = IdleRelease()

    def report_counters() -> None:
        last = None
        while not stop.wait(STATS_INTERVAL_S):
            trim.maybe()         # what a burst's receive buffers left in the heap goes back (memory.py)
            stats.store_sync_seconds = segments.sync_seconds     # the write-ahead fdatasyncs happen here
            segments.recheck()       # after a full disk, readiness returns with the space, not with a client
            counters = intake.counters()
            if counters.values != last:      # unchanged (an idle sidecar): the supervisor has them already
                intake.send(counters)
                last = counters.values
                idle.busy()
            else:
                idle.maybe()     # at rest: the library code only startup ran goes back (memory.py)

    threading.Thread(target=report_counters, name="counters", daemon=True).start()
    # Decoding allocates many short-lived objects; the default gen-0 threshold (700) ran the
    # collector thousands of times a second (3 % of the GIL). Startup objects are frozen out of it.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    intake.send(Ready())
    _serve(conn, intake)
    # Stop accepting, let in-flight Exports get their acks, then leave.
    intake.stop_accepting()
    threading.Thread(target=_drain, args=(conn, intake), daemon=True).start()
    for r in receivers:
        r.shutdown(25.0)
    stop.set()
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not intake.drained() and time.monotonic() < deadline:
        time.sleep(0.01)
    segments.close()
    intake.send(intake.counters())
    intake.send(Stopped())
    os._exit(0)


def _start_receivers(settings: IngestSettings, intake, stats) -> list:
    """The gRPC and HTTP receivers, listening; OSError (none left running) if one cannot."""
    from ..decode.check import Checker
    from ..receivers.export import ExportHandler
    from ..receivers.grpc import GrpcReceiver
    from ..receivers.http import HttpReceiver
    from ..security import BearerToken, ServerTLS

    r = settings.receivers
    # Checks only: the decoder process builds the columns.
    handler = ExportHandler(Checker(settings.cohort_labels, r.scanner), intake, stats)
    # the supervisor's caller checked these files before starting this process
    token = BearerToken(r.token_file, "receivers.auth.bearer_token_file") if r.token_file else None
    grpc_tls = ServerTLS(r.grpc_tls) if r.grpc_tls is not None else None
    http_tls = ServerTLS(r.http_tls) if r.http_tls is not None else None
    receivers = [GrpcReceiver(r.grpc, handler, r.grpc_max_bytes, r.grpc_max_workers, tls=grpc_tls, token=token),
                 HttpReceiver(r.http, handler, r.http_max_bytes, r.http_read_timeout_s, r.http_idle_timeout_s,
                              r.http_max_connections, tls=http_tls, token=token)]
    started = []
    try:
        for each in receivers:
            each.start()
            started.append(each)
    except OSError:
        for each in started:
            each.shutdown(1.0)
        raise
    return started


def _serve(conn, intake) -> None:
    """Pass the supervisor's Acks, Nacks and Barriers to the intake until Stop."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            # The supervisor is gone (crash, kill -9): nothing more can be acknowledged.
            intake.fail_all()
            os._exit(1)
        if isinstance(msg, Stop):
            return
        intake.on_message(msg)


def _drain(conn, intake) -> None:
    """Keeps reading acks while the receivers stop (they wait for them)."""
    while True:
        try:
            intake.on_message(conn.recv())
        except (EOFError, OSError):
            return
