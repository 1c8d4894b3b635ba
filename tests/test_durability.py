"""Acknowledged means durable: SIGTERM drains, kill -9 loses nothing acknowledged, overload pushes back."""
from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otlp_builders import random_spans, span_request
from test_receivers import TRACE_METHOD, http_post


class RecordingClient:
    """Sends distinct requests from several threads and records which spans were acknowledged."""

    def __init__(self, endpoint: str, threads: int = 4, spans_per_request: int = 256):
        self.endpoint = endpoint
        self.threads = threads
        self.n = spans_per_request
        self.acked: set[str] = set()
        self.failed_requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(self.endpoint) as ch:
            call = ch.unary_unary(TRACE_METHOD, request_serializer=None,
                                  response_deserializer=ExportTraceServiceResponse.FromString)
            while not self._stop.is_set():
                spans = random_spans(self.n, rng)
                try:
                    resp = call(span_request(spans).SerializeToString(), timeout=20)
                except grpc.RpcError:
                    with self._lock:
                        self.failed_requests += 1
                    time.sleep(0.05)
                    continue
                assert resp.partial_success.rejected_spans == 0
                with self._lock:
                    self.acked.update(s["trace_id"].hex() + s["span_id"].hex() for s in spans)

    def start(self) -> "RecordingClient":
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def wait_for(self, n_acked: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n_acked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.acked) >= n_acked, f"only {len(self.acked)} spans acknowledged in {timeout}s"

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)


def stored_keys(server) -> set[str]:
    return {r["k"] for r in server.query("select trace_id || span_id as k from spans_core")}


def test_sigterm_drains_commits_and_exits_zero(serve_factory, tmp_path):
    srv = serve_factory(data_dir=tmp_path / "d")
    client = RecordingClient(srv.grpc_endpoint).start()
    client.wait_for(3000)
    assert srv.stop() == 0, srv.log()
    client.stop()
    assert "stopped cleanly" in srv.log()
    stored = stored_keys(srv)             # the server is gone: the file is read directly
    assert client.acked <= stored
    assert len(stored) >= len(client.acked)


def test_kill_9_loses_no_acknowledged_span(serve_factory, tmp_path):
    srv = serve_factory(data_dir=tmp_path / "d")
    client = RecordingClient(srv.grpc_endpoint).start()
    client.wait_for(4000)
    srv.kill9()                           # mid-load: exports are in flight right now
    client.stop()
    acked = set(client.acked)
    restarted = serve_factory(data_dir=tmp_path / "d")
    stored = stored_keys(restarted)
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged spans lost after kill -9"
    # the restarted server keeps working on the same store
    body = span_request(random_spans(8, random.Random(99))).SerializeToString()
    assert http_post(restarted.http_endpoint + "/v1/traces", body)[0] == 200
    assert len(stored_keys(restarted)) == len(stored) + 8


def test_a_dead_decoder_stops_serve_with_status_1_and_a_restart_keeps_every_ack(serve_factory, tmp_path):
    """Fail fast: without its decoder the sidecar could acknowledge but never store, so it exits for
    its supervisor; what it acknowledged is in the payload log and is inserted on the next start."""
    import os
    import re
    import signal
    srv = serve_factory(data_dir=tmp_path / "d")
    client = RecordingClient(srv.grpc_endpoint).start()
    client.wait_for(2000)
    decoder_pid = int(re.search(r"decoder pid (\d+)", srv.log()).group(1))
    os.kill(decoder_pid, signal.SIGKILL)
    assert srv.proc.wait(30) == 1, srv.log()
    client.stop()
    assert "exited unexpectedly" in srv.log()
    acked = set(client.acked)
    restarted = serve_factory(data_dir=tmp_path / "d")
    missing = acked - stored_keys(restarted)
    assert not missing, f"{len(missing)} acknowledged spans lost when the decoder died"


def _queue_gauge(srv) -> float:
    line = next(ln for ln in srv.metrics_text().splitlines() if ln.startswith("shadowlens_ingest_queue_spans "))
    return float(line.split()[1])


def test_acks_do_not_wait_for_the_decoder_and_the_queue_gauge_counts_what_waits(server):
    """With the decoder paused, Exports are still acknowledged (durable in the payload log) and
    shadowlens_ingest_queue_spans shows them waiting; resumed, they are stored and the gauge drops."""
    import os
    import re
    import signal

    from test_receivers import grpc_export
    decoder_pid = int(re.search(r"decoder pid (\d+)", server.log()).group(1))
    os.kill(decoder_pid, signal.SIGSTOP)
    try:
        for seed in range(3):
            grpc_export(server.grpc_endpoint, span_request(random_spans(40, random.Random(seed))).SerializeToString())
        deadline = time.monotonic() + 10
        while _queue_gauge(server) != 120 and time.monotonic() < deadline:
            time.sleep(0.1)                    # the frontend reports its counters twice a second
        assert _queue_gauge(server) == 120
    finally:
        os.kill(decoder_pid, signal.SIGCONT)
    assert server.query("select count(*) as n from spans_core")[0]["n"] == 120   # read-your-acks
    deadline = time.monotonic() + 10
    while _queue_gauge(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _queue_gauge(server) == 0


def test_full_queue_answers_unavailable_with_retry_info_and_503(tmp_path):
    """A writer that is not draining (not started) fills its queue; the next export is pushed back."""
    from google.rpc import error_details_pb2, status_pb2

    from shadowlens.config import Endpoint, default_config
    from shadowlens.collector.decode.normalize import Normalizer
    from shadowlens.collector.receivers.export import ExportHandler
    from shadowlens.collector.receivers.grpc import GrpcReceiver
    from shadowlens.collector.receivers.http import HttpReceiver
    from shadowlens.collector.stats import IngestStats
    from shadowlens.collector.store.writer import StoreWriter

    cfg = default_config()
    stats = IngestStats()
    store = StoreWriter(tmp_path / "d", cfg.cohort_labels, stats, queue_max_spans=10)
    store.open()
    handler = ExportHandler(Normalizer(cfg.cohort_labels, cfg.evals), store, stats)
    rx_grpc = GrpcReceiver(Endpoint("127.0.0.1", 0), handler, 4 << 20)
    rx_http = HttpReceiver(Endpoint("127.0.0.1", 0), handler, 4 << 20)
    rx_grpc.start()
    rx_http.start()
    first_done = threading.Event()
    try:
        def first():
            with grpc.insecure_channel(f"127.0.0.1:{rx_grpc.port}") as ch:
                ch.unary_unary(TRACE_METHOD)(span_request(random_spans(8)).SerializeToString(), timeout=30)
            first_done.set()
        threading.Thread(target=first, daemon=True).start()
        deadline = time.monotonic() + 10
        while stats.gauges["ingest_queue_spans"]() < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        body = span_request(random_spans(8, random.Random(1))).SerializeToString()
        with grpc.insecure_channel(f"127.0.0.1:{rx_grpc.port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(TRACE_METHOD)(body, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(details)
        info = error_details_pb2.RetryInfo()
        assert st.details[0].Unpack(info) and info.retry_delay.seconds >= 1
        status, headers, _ = http_post(f"http://127.0.0.1:{rx_http.port}/v1/traces", body)
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert not first_done.is_set()           # not acknowledged before its commit
        store.start()                            # the writer drains: the first export completes
        assert first_done.wait(30)
    finally:
        rx_grpc.shutdown(1)
        rx_http.shutdown(1)
        store.shutdown()
