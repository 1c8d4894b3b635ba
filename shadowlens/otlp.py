"""OTLP protobuf messages from plain Python values: the building blocks of the synthetic traffic
(``traffic_pool``) and of the tests' hand-made requests.

>>> req = trace_request([span(b"\\x01" * 16, b"\\x02" * 8, name="agent.run", attrs={"shadow.route": "baseline"})],
...                     resource={"service.name": "doc-agent"})
>>> s = req.resource_spans[0].scope_spans[0].spans[0]
>>> s.name, s.attributes[0].value.string_value, s.end_time_unix_nano - s.start_time_unix_nano
('agent.run', 'baseline', 1000000000)

Imports only the OpenTelemetry protobuf classes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

T0 = 1_760_000_000_000_000_000          # a fixed start time (2025-10-09) for spans that need no real one
SECOND = 1_000_000_000


def any_value(v) -> AnyValue:
    """bool, int, float, str, or a list/tuple of those (nested lists too) as an OTLP ``AnyValue``."""
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
    return AnyValue(string_value=v)


def key_values(attrs: Mapping) -> list[KeyValue]:
    """An attribute dict as OTLP ``KeyValue``s, in the dict's order."""
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def set_attr(attrs, key: str, value) -> None:
    """Append one attribute to a repeated ``KeyValue`` field (resource, span, event or log attributes)."""
    attrs.append(KeyValue(key=key, value=any_value(value)))


def span(trace_id: bytes, span_id: bytes, *, parent: bytes | None = None, name: str = "span",
         kind: int = Span.SPAN_KIND_INTERNAL, start: int = T0, end: int | None = None, attrs: Mapping | None = None,
         events: Iterable[tuple[str, Mapping]] = (), status: Status | None = None) -> Span:
    """One span; ``end`` defaults to a second after ``start``; ``events`` are (name, attributes) at ``start``."""
    s = Span(trace_id=trace_id, span_id=span_id, name=name, kind=kind, start_time_unix_nano=start,
             end_time_unix_nano=start + SECOND if end is None else end, attributes=key_values(attrs or {}))
    if parent:
        s.parent_span_id = parent
    for ev_name, ev_attrs in events:
        s.events.add(name=ev_name, time_unix_nano=start, attributes=key_values(ev_attrs))
    if status is not None:
        s.status.CopyFrom(status)
    return s


def trace_request(spans: Iterable[Span], resource: Mapping | None = None,
                  scope: str = "shadowlens.traffic") -> ExportTraceServiceRequest:
    """One ``ExportTraceServiceRequest``: all ``spans`` under one resource and one instrumentation scope."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(key_values(resource or {"service.name": "shadowlens-traffic"}))
    ss = rs.scope_spans.add(scope=InstrumentationScope(name=scope))
    ss.spans.extend(spans)
    return req


def log_record_request(records: Iterable[Mapping], resource: Mapping | None = None) -> ExportLogsServiceRequest:
    """One ``ExportLogsServiceRequest``; each record is a dict of ``time`` (ns), ``trace_id``, ``span_id``,
    ``event_name``, ``body`` (a string) and ``attrs``, all optional."""
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend(key_values(resource or {"service.name": "shadowlens-traffic"}))
    sl = rl.scope_logs.add()
    for d in records:
        r = sl.log_records.add(time_unix_nano=d.get("time", T0), event_name=d.get("event_name", ""),
                               attributes=key_values(d.get("attrs", {})))
        if d.get("trace_id"):
            r.trace_id = d["trace_id"]
        if d.get("span_id"):
            r.span_id = d["span_id"]
        if "body" in d:
            r.body.string_value = d["body"]
    return req
