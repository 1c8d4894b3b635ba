"""The tests' span dicts as OTLP requests, built with shadowlens/otlp.py (the synthetic traffic's building blocks).

A span dict holds ``trace_id``/``span_id`` (bytes) and optionally ``parent``, ``name``, ``kind``, ``start``,
``end``, ``attrs`` and ``events`` ([(name, attrs)]): the keyword arguments of ``shadowlens.otlp.span``.
"""
from __future__ import annotations

import random

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shadowlens.otlp import T0, log_record_request, set_attr, span, trace_request

__all__ = ["T0", "set_attr", "span_request", "random_spans", "log_request"]
TEST_RESOURCE = {"service.name": "test-agent"}


def span_request(spans: list[dict], resource: dict | None = None) -> ExportTraceServiceRequest:
    return trace_request([span(**d) for d in spans], resource or TEST_RESOURCE, scope="tests")


def random_spans(n: int, rng: random.Random | None = None, per_trace: int = 4) -> list[dict]:
    """``n`` spans in traces of ``per_trace``: a root with route, request id and intent, then chat spans
    with 200-2000 bytes of ``input.value``."""
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
    return log_record_request(records, TEST_RESOURCE)

