"""Every metric name shadowlens exposes, declared once (CONTRACT §6). Never rename one."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str          # without the _total suffix for counters (prometheus_client adds it)
    type: str          # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


SELF_METRICS = (
    MetricSpec("shadowlens_spans_received", "counter", ("receiver",), "Spans received, by receiver (grpc|http)."),
    MetricSpec("shadowlens_spans_rejected", "counter", ("reason",),
               "Spans rejected as invalid and reported in partial_success, by reason."),
    MetricSpec("shadowlens_spans_duplicate", "counter", (), "Spans received again (same trace_id+span_id), stored once."),
    MetricSpec("shadowlens_log_records_received", "counter", ("receiver",), "OTLP log records received."),
    MetricSpec("shadowlens_log_records_rejected", "counter", ("reason",), "OTLP log records rejected as invalid."),
    MetricSpec("shadowlens_requests_refused", "counter", ("reason",),
               "Export requests refused whole (queue_full, too_large, invalid)."),
    MetricSpec("shadowlens_ingest_queue_spans", "gauge", (), "Spans accepted and waiting for their commit."),
    MetricSpec("shadowlens_store_bytes", "gauge", (), "Bytes on disk: DuckDB file, its WAL and payload segments."),
)
