"""Build OTLP requests for tests with the official proto classes (independent of shadowlens code)."""
from __future__ import annotations

import os
import random

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

T0 = 1_760_000_000_000_000_000


def set_attr(attrs, key, value):
    kv = attrs.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    elif isinstance(value, (list, tuple)):
        for v in value:
            kv.value.array_value.values.add().string_value = v
    else:
        kv.value.string_value = value


def span_request(spans: list[dict], resource: dict | None = None) -> ExportTraceServiceRequest:
    """spans: dicts with trace_id/span_id (bytes), optional parent, name, start, end, attrs, events."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in (resource or {"service.name": "test-agent"}).items():
        set_attr(rs.resource.attributes, k, v)
    ss = rs.scope_spans.add()
    ss.scope.name = "tests"
    for d in spans:
        s = ss.spans.add()
        s.trace_id = d["trace_id"]
        s.span_id = d["span_id"]
        if d.get("parent"):
            s.parent_span_id = d["parent"]
        s.name = d.get("name", "span")
        s.kind = d.get("kind", 1)
        s.start_time_unix_nano = d.get("start", T0)
        s.end_time_unix_nano = d.get("end", d.get("start", T0) + 1_000_000_000)
        for k, v in d.get("attrs", {}).items():
            set_attr(s.attributes, k, v)
        for ev_name, ev_attrs in d.get("events", []):
            ev = s.events.add(name=ev_name, time_unix_nano=s.start_time_unix_nano)
            for k, v in ev_attrs.items():
                set_attr(ev.attributes, k, v)
    return req


def random_spans(n: int, rng: random.Random | None = None, per_trace: int = 4) -> list[dict]:
    rng = rng or random.Random(0)
    out = []
    for i in range(n):
        if i % per_trace == 0:
            tid = rng.randbytes(16)
            root = rng.randbytes(8)
            out.append({"trace_id": tid, "span_id": root, "name": "agent.run", "start": T0 + i,
                        "attrs": {"shadow.route": rng.choice(["baseline", "candidate"]), "shadow.request_id": f"r{i}",
                                  "cohort.intent": "billing"}})
        else:
            out.append({"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": "chat",
                        "start": T0 + i, "attrs": {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                                                   "gen_ai.usage.input_tokens": rng.randint(1, 999),
                                                   "input.value": "x" * rng.randint(200, 2000)}})
    return out


def log_request(records: list[dict]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    set_attr(rl.resource.attributes, "service.name", "test-agent")
    sl = rl.scope_logs.add()
    for d in records:
        r = sl.log_records.add()
        r.time_unix_nano = d.get("time", T0)
        if d.get("trace_id"):
            r.trace_id = d["trace_id"]
        if d.get("span_id"):
            r.span_id = d["span_id"]
        r.event_name = d.get("event_name", "")
        if "body" in d:
            r.body.string_value = d["body"]
        for k, v in d.get("attrs", {}).items():
            set_attr(r.attributes, k, v)
    return req


def ids(rng=None):
    rng = rng or random
    return os.urandom(16), os.urandom(8)
