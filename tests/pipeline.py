"""The production ingest pipeline inside a test: frontend -> decoder -> store, as ``serve`` wires it.

A StoreWriter runs in the test's process (so a test can inject a clock, a failing connection, or
read the store directly), and the IngestSupervisor starts the real frontend process (and the decoder
process, as ``receivers.decoder_process`` says) on free loopback ports. Requests go in over OTLP/gRPC,
exactly as a client sends them.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from harness import free_port
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.decode.batch import NormalizedBatch
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.ingest.supervisor import DecodePolicy, IngestSupervisor
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.segments import SegmentLog
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config, load
from shadowlens.serve import ingest_settings

METHODS = {"traces": ("/opentelemetry.proto.collector.trace.v1.TraceService/Export", ExportTraceServiceResponse),
           "logs": ("/opentelemetry.proto.collector.logs.v1.LogsService/Export", ExportLogsServiceResponse)}


class Pipeline:
    """``export`` a request, ``sync`` (read-your-acks), then read ``store``; ``shutdown`` stops it all."""

    def __init__(self, data_dir: Path, queue_max_spans: int = 262144, decoder_process: str = "auto",
                 policy: DecodePolicy = DecodePolicy(), **writer_kwargs):
        """``decoder_process``: as the key (auto, always, never); ``policy``: when auto starts and stops it.
        ``writer_kwargs``: StoreWriter's keyword arguments (``now``, ``dedup_max_keys`` ...)."""
        self.cfg = load(None, env={}, overrides={
            ("receivers", "grpc", "endpoint"): f"127.0.0.1:{free_port()}",
            ("receivers", "http", "endpoint"): f"127.0.0.1:{free_port()}",
            ("receivers", "decoder_process"): decoder_process,
            ("store", "data_dir"): str(data_dir), ("store", "queue_max_spans"): queue_max_spans})
        self.stats = IngestCounters()
        writer_kwargs.setdefault("settings", self.cfg.store)     # as serve builds it (store.queue_max_spans ...)
        self.store = StoreWriter(Path(data_dir), self.cfg.cohort_labels, self.stats, **writer_kwargs)
        self.child_counters: dict = {}
        self.ingest = IngestSupervisor(self.store, ingest_settings(self.cfg), self.child_counters, policy=policy)
        self._channel: grpc.Channel | None = None

    def start(self, writer: bool = True) -> "Pipeline":
        """Start the store (its writer thread too unless ``writer`` is False), then the ingest processes."""
        if writer:
            self.store.start()
        else:
            self.store.open()
        self.ingest.start()
        self._channel = grpc.insecure_channel(str(self.cfg.receivers.grpc))
        return self

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.receivers.http}"

    def export(self, payload: bytes, signal: str = "traces", timeout: float = 30.0):
        """One OTLP/gRPC Export; the response once acknowledged (grpc.RpcError otherwise)."""
        return self.export_future(payload, signal, timeout).result()

    def export_future(self, payload: bytes, signal: str = "traces", timeout: float = 30.0) -> grpc.Future:
        method, response = METHODS[signal]
        call = self._channel.unary_unary(method, request_serializer=None, response_deserializer=response.FromString)
        return call.future(payload, timeout=timeout)

    def sync(self, timeout: float = 30.0) -> None:
        """Every acknowledged record is committed (or set aside) on return."""
        assert self.ingest.sync(timeout), f"the pipeline did not commit what it acknowledged within {timeout} s"

    def query(self, sql: str, params=None) -> list[tuple]:
        con = self.store.cursor()
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def shutdown(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.ingest.shutdown(30.0)
        self.store.shutdown()

    def __enter__(self) -> "Pipeline":
        return self if self._channel is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


class Handover:
    """For tests of the writer alone: the writer's one way in, called as the supervisor calls it.

    ``submit`` does in this process what the frontend and the decoder do with a request: append
    the payload to the segment log and wait until it is durable, decode it, and submit the columns
    with the payload's place. The Future is the writer's (it resolves at the commit, where the
    supervisor sends its Ack). ``store`` must be open (``first_segment`` known).
    """

    def __init__(self, store: StoreWriter):
        cfg = default_config()
        self.store = store
        self.normalizer = Normalizer(cfg.cohort_labels, cfg.evals)     # what the decoder runs, by default
        self.log = SegmentLog(store.data_dir / SEGMENTS_DIR, store.first_segment)

    def submit(self, request: bytes | NormalizedBatch) -> Future:
        """``request``: the payload bytes, or a batch the test decoded (``batch.payload`` is its payload)."""
        batch = request if isinstance(request, NormalizedBatch) else self.normalizer.normalize_traces(request)
        seg, off, ticket = self.log.append(batch.payload, batch.signal)
        self.log.wait_durable(ticket)
        return self.store.submit(batch, (seg, off, len(batch.payload)), self.log.segment)

    def commit(self, request: bytes | NormalizedBatch, timeout: float = 30.0):
        """``submit``, then commit now: the writer lingers up to writer.GROUP_LINGER_S for a bigger group (fewer commits at
        low rates), which a test that commits one request at a time need not wait for. The commit's result."""
        future = self.submit(request)
        self.store.flush(timeout)
        return future.result(timeout)

    def close(self) -> None:
        self.log.close()


@pytest.fixture
def pipeline(tmp_path):
    """A started Pipeline on ``tmp_path``; stopped after the test."""
    with Pipeline(tmp_path) as p:
        yield p
