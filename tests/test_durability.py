"""Acknowledged means durable: SIGTERM drains, kill -9 loses nothing acknowledged, overload pushes back."""
from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from harness import wait_for
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
        wait_for(lambda: len(self.acked) >= n_acked, timeout, 0.05, what=f"{n_acked} spans acknowledged",
                 detail=lambda: f"only {len(self.acked)}")

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
    srv = serve_factory(data_dir=tmp_path / "d", env={"SHADOWLENS_RECEIVERS__DECODER_PROCESS": "always"})
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


def test_acks_do_not_wait_for_the_decoder_and_the_queue_gauge_counts_what_waits(serve_factory):
    """With the decoder (process) paused, Exports are still acknowledged (durable in the payload log) and
    shadowlens_ingest_queue_spans shows them waiting; resumed, they are stored and the gauge drops."""
    import os
    import re
    import signal

    from test_receivers import grpc_export
    server = serve_factory(env={"SHADOWLENS_RECEIVERS__DECODER_PROCESS": "always"})
    decoder_pid = int(re.search(r"decoder pid (\d+)", server.log()).group(1))
    os.kill(decoder_pid, signal.SIGSTOP)
    try:
        for seed in range(3):
            grpc_export(server.grpc_endpoint, span_request(random_spans(40, random.Random(seed))).SerializeToString())
        # the frontend reports its counters twice a second
        wait_for(lambda: _queue_gauge(server) == 120, 10, what="120 spans queued", detail=lambda: str(_queue_gauge(server)))
    finally:
        os.kill(decoder_pid, signal.SIGCONT)
    assert server.query("select count(*) as n from spans_core")[0]["n"] == 120   # read-your-acks
    wait_for(lambda: _queue_gauge(server) == 0, 10, what="the ingest queue drained", detail=lambda: str(_queue_gauge(server)))


def test_full_queue_answers_unavailable_with_retry_info_and_503(tmp_path):
    """Spans acknowledged and not yet committed are bounded (store.queue_max_spans): while the writer does
    not drain, the next export is pushed back (UNAVAILABLE + RetryInfo, HTTP 503 + Retry-After); once it
    commits, there is room again."""
    from google.rpc import error_details_pb2, status_pb2
    from pipeline import Pipeline

    with Pipeline(tmp_path, queue_max_spans=10).start(writer=False) as p:
        p.export(span_request(random_spans(8)).SerializeToString())    # durable in the payload log: acknowledged
        assert p.query("select count(*) from spans_core") == [(0,)]   # though not committed
        body = span_request(random_spans(8, random.Random(1))).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            p.export(body)             # 8 + 8 > 10: waits for room (intake.ADMIT_WAIT_S), then is refused
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(details)
        info = error_details_pb2.RetryInfo()
        assert st.details[0].Unpack(info) and info.retry_delay.seconds >= 1
        status, headers, _ = http_post(f"{p.http_url}/v1/traces", body)
        assert status == 503 and int(headers["Retry-After"]) >= 1
        p.store.start()                # the writer drains: its commit frees the room, without lingering for a
        p.export(body)                 # bigger group while clients may wait for room (they wait 5 s, as a linger)
        p.sync()
        assert p.query("select count(*) from spans_core") == [(16,)]
